"""Architectures: each a config dataclass and a builder returning a :class:`Network` of blocks.

The block contract lives in ``algorithms/blocks.py`` (re-exported here); residual networks in
``algorithms/resnet.py``. Input shapes and class counts come from the dataset, never from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from torch import nn

from bioplaus.algorithms.blocks import ACTIVATIONS, NORMS, POOLS, Block, Network, make_act, make_norm, make_pool
from bioplaus.algorithms.resnet import ResNet18Config, ResNet20Config, build_resnet

# --- architecture configs ----------------------------------------------------------------------
@dataclass
class MLPConfig:
    """Fully connected network: flatten, hidden blocks of the given widths, linear output block."""

    widths: list[int] = field(default_factory=lambda: [1000, 1000])
    """Hidden layer widths (784-1000-1000-10 on MNIST with the default)."""
    activation: str = "relu"
    """Hidden nonlinearity: relu, tanh, sigmoid, gelu, leaky_relu, hardtanh, identity."""
    norm: str = "none"
    """Normalisation after each hidden layer: none, batch, group or layer."""
    bias: bool = True
    """Whether weight layers have biases."""


@dataclass
class CNNConfig:
    """Small convolutional network: conv blocks (each pooled by 2), then a linear output block."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Output channels of each conv block."""
    kernel: int = 3
    """Square kernel size (padding keeps the spatial size before pooling)."""
    activation: str = "relu"
    """Nonlinearity: relu, tanh, sigmoid, gelu, leaky_relu, hardtanh, identity."""
    norm: str = "none"
    """Normalisation after each conv: none, batch, group (GroupNorm, 8 groups) or layer (GroupNorm, one group)."""
    pool: str = "max"
    """Pooling after each block: max or avg."""
    bias: bool = True
    """Whether weight layers have biases."""


@dataclass
class DeepCNNConfig:
    """VGG-style network: pairs of 3x3 conv blocks, pooling after each pair, linear output block."""

    channels: list[int] = field(default_factory=lambda: [32, 32, 64, 64, 128, 128])
    """Output channels of each conv block (pooled after every ``pool_every`` blocks)."""
    pool_every: int = 2
    """Pool by 2 after every this many blocks."""
    activation: str = "relu"
    """Nonlinearity: relu, tanh, sigmoid, gelu, leaky_relu, hardtanh, identity."""
    norm: str = "batch"
    """Normalisation after each conv: none, batch, group (GroupNorm, 8 groups) or layer (GroupNorm, one group).
    Rules whose math forbids batch statistics use their own default here (``Rule.arch_defaults``)."""
    pool: str = "max"
    """Pooling: max or avg."""
    bias: bool = True
    """Whether weight layers have biases."""


def build_mlp(cfg: MLPConfig, input_shape: tuple[int, ...], num_classes: int) -> Network:
    fan_in = math.prod(input_shape)
    blocks = []
    for i, width in enumerate(cfg.widths):
        blocks.append(Block(nn.Linear(fan_in, width, bias=cfg.bias), pre=nn.Flatten() if i == 0 else None,
                            norm=make_norm(cfg.norm, width, conv=False), act=make_act(cfg.activation)))
        fan_in = width
    head = Block(nn.Linear(fan_in, num_classes, bias=cfg.bias), pre=None if blocks else nn.Flatten())
    return Network("mlp", blocks, head, input_shape, num_classes)


def _conv_net(name: str, channels: list[int], pool_after: list[bool], kernel: int, cfg, input_shape,
              num_classes) -> Network:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image input (C, H, W); the dataset gives shape {tuple(input_shape)}")
    c, h, w = input_shape
    blocks = []
    for width, pooled in zip(channels, pool_after):
        if pooled and min(h, w) < 2:
            raise ValueError(f"{name}: input {tuple(input_shape)} is too small for {sum(pool_after)} poolings")
        blocks.append(Block(nn.Conv2d(c, width, kernel, padding=kernel // 2, bias=cfg.bias),
                            norm=make_norm(cfg.norm, width, conv=True), act=make_act(cfg.activation),
                            pool=make_pool(cfg.pool) if pooled else None))
        c = width
        if pooled:
            h, w = h // 2, w // 2
    head = Block(nn.Linear(c * h * w, num_classes, bias=cfg.bias), pre=nn.Flatten())
    return Network(name, blocks, head, input_shape, num_classes)


def build_cnn(cfg: CNNConfig, input_shape: tuple[int, ...], num_classes: int) -> Network:
    return _conv_net("cnn", cfg.channels, [True] * len(cfg.channels), cfg.kernel, cfg, input_shape, num_classes)


def build_deep_cnn(cfg: DeepCNNConfig, input_shape: tuple[int, ...], num_classes: int) -> Network:
    if cfg.pool_every < 1:
        raise ValueError(f"deep_cnn: pool_every={cfg.pool_every} must be >= 1")
    pool_after = [(i + 1) % cfg.pool_every == 0 for i in range(len(cfg.channels))]
    return _conv_net("deep_cnn", cfg.channels, pool_after, 3, cfg, input_shape, num_classes)


@dataclass(frozen=True)
class ArchSpec:
    """Registry entry: an architecture's config dataclass and its builder."""

    name: str
    config: type
    build: Callable[..., Network]
    summary: str


ARCHS: dict[str, ArchSpec] = {
    "mlp": ArchSpec("mlp", MLPConfig, build_mlp, "fully connected blocks (default 2x1000 hidden)"),
    "cnn": ArchSpec("cnn", CNNConfig, build_cnn, "2-3 conv blocks with pooling + linear classifier"),
    "deep_cnn": ArchSpec("deep_cnn", DeepCNNConfig, build_deep_cnn,
                         "VGG-style 6 conv blocks (norm per model.norm, batch by default) + linear classifier"),
    "resnet20": ArchSpec("resnet20", ResNet20Config, partial(build_resnet, "resnet20"),
                         "CIFAR ResNet-20 (He et al. 2016): stem + 3x3 basic residual blocks, 16-32-64 channels"),
    "resnet18": ArchSpec("resnet18", ResNet18Config, partial(build_resnet, "resnet18"),
                         "ResNet-18 for 32x32 inputs: stem + 4x2 basic residual blocks, 64-128-256-512 channels"),
}

__all__ = ["ACTIVATIONS", "ARCHS", "NORMS", "POOLS", "ArchSpec", "Block", "CNNConfig", "DeepCNNConfig", "MLPConfig",
           "Network", "build_cnn", "build_deep_cnn", "build_mlp"]
