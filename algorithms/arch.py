"""Architectures as an ordered list of blocks plus an output block.

Every block has the same named parts, ``pre -> layer -> norm -> act -> pool``, so a rule can act
block by block without knowing which architecture it is in: ``block.layer`` is the one weight layer
(Linear or Conv2d) a feedback matrix or a Hebbian update refers to, ``block.preact(x)`` is the
layer's input current and ``block.post(u)`` the rest of the block. The output block (``head``) is a
Block too, with no activation. Input shapes and class counts come from the dataset, never from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "hardtanh": nn.Hardtanh,
    "identity": nn.Identity,
}
NORMS = ("none", "batch", "layer")
POOLS = ("max", "avg")


class Block(nn.Module):
    """One block h[l-1] -> h[l]: pre (reshape) -> layer (weights) -> norm -> act -> pool."""

    def __init__(self, layer: nn.Module, *, pre: nn.Module | None = None, norm: nn.Module | None = None,
                 act: nn.Module | None = None, pool: nn.Module | None = None):
        super().__init__()
        self.pre = pre or nn.Identity()
        self.layer = layer
        self.norm = norm or nn.Identity()
        self.act = act or nn.Identity()
        self.pool = pool or nn.Identity()

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """The weight layer's output (input current) for block input ``x``."""
        return self.layer(self.pre(x))

    def post(self, u: torch.Tensor) -> torch.Tensor:
        """Everything after the weight layer: normalisation, nonlinearity, pooling."""
        return self.pool(self.act(self.norm(u)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.preact(x))


class Network(nn.Module):
    """Hidden blocks then an output block; ``stages`` lists them all in order."""

    def __init__(self, arch: str, blocks: list[Block], head: Block, input_shape: tuple[int, ...],
                 num_classes: int):
        super().__init__()
        self.arch = arch
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes

    @property
    def stages(self) -> list[Block]:
        """All blocks in forward order, the output block last."""
        return [*self.blocks, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage (hidden blocks, then logits) for a batch."""
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    @torch.no_grad()
    def shapes(self) -> list[tuple[int, ...]]:
        """Per-sample output shape of every stage."""
        was_training = self.training
        self.eval()
        param = next(self.parameters())
        x = torch.zeros((1, *self.input_shape), device=param.device, dtype=param.dtype)
        shapes = [tuple(h.shape[1:]) for h in self.activations(x)]
        self.train(was_training)
        return shapes


# --- architecture configs ----------------------------------------------------------------------
@dataclass
class MLPConfig:
    """Fully connected network: flatten, hidden blocks of the given widths, linear output block."""

    widths: list[int] = field(default_factory=lambda: [1000, 1000])
    """Hidden layer widths (784-1000-1000-10 on MNIST with the default)."""
    activation: str = "relu"
    """Hidden nonlinearity: relu, tanh, sigmoid, gelu, leaky_relu, hardtanh, identity."""
    norm: str = "none"
    """Normalisation after each hidden layer: none, batch or layer."""
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
    """Normalisation after each conv: none, batch or layer (GroupNorm with one group)."""
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
    """Normalisation after each conv: none, batch or layer (GroupNorm with one group)."""
    pool: str = "max"
    """Pooling: max or avg."""
    bias: bool = True
    """Whether weight layers have biases."""


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _norm(kind: str, width: int, conv: bool) -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "batch":
        return nn.BatchNorm2d(width) if conv else nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.GroupNorm(1, width) if conv else nn.LayerNorm(width)
    raise ValueError(f"unknown norm {kind!r}; use one of {', '.join(NORMS)}")


def _pool(kind: str) -> nn.Module:
    if kind not in POOLS:
        raise ValueError(f"unknown pool {kind!r}; use one of {', '.join(POOLS)}")
    return nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)


def build_mlp(cfg: MLPConfig, input_shape: tuple[int, ...], num_classes: int) -> Network:
    fan_in = math.prod(input_shape)
    blocks = []
    for i, width in enumerate(cfg.widths):
        blocks.append(Block(nn.Linear(fan_in, width, bias=cfg.bias), pre=nn.Flatten() if i == 0 else None,
                            norm=_norm(cfg.norm, width, conv=False), act=_act(cfg.activation)))
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
                            norm=_norm(cfg.norm, width, conv=True), act=_act(cfg.activation),
                            pool=_pool(cfg.pool) if pooled else None))
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
                         "VGG-style 6 conv blocks with batch norm + linear classifier (CIFAR-size)"),
}
