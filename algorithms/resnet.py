"""Residual networks (He, Zhang, Ren & Sun 2016) as block lists of the block contract.

A basic residual block is one :class:`ResidualBlock`: ``layer`` is its first 3x3 conv, ``preact(x)``
the current summed at its output units (second conv's normalised output plus the shortcut) and
``post(u)`` the output nonlinearity, so block-local rules and the pipeline split a ResNet at residual
blocks. The shortcut is the identity, or, where the block changes width or resolution, a 1x1 strided
projection conv with its own normalisation (He et al.'s option B; BioTorch gives such projections their
own feedback weights like any conv, which ``weight_layers()`` makes possible).

``resnet20`` is the CIFAR network of He et al. section 4.2 (a 3x3 stem, 3 stages of 3 blocks,
16-32-64 channels, global average pooling, linear); ``resnet18`` the CIFAR adaptation of the ImageNet
ResNet-18 (3x3 stem, 4 stages of 2 blocks, 64-128-256-512 channels, no stem pooling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bioplaus.algorithms.blocks import Block, Network, make_act, make_norm


class ResidualBlock(Block):
    """x -> act(norm2(conv2(act1(norm1(conv1(x))))) + shortcut(x)); ``layer`` is conv1."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, activation: str, bias: bool):
        super().__init__(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias), act=make_act(activation))
        self.norm1 = make_norm(norm, c_out, conv=True) or nn.Identity()
        self.act1 = make_act(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, c_out, conv=True) or nn.Identity()
        if stride != 1 or c_in != c_out:
            self.proj: nn.Module | None = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias)
            self.proj_norm = make_norm(norm, c_out, conv=True) or nn.Identity()
        else:
            self.proj = None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj is None else self.proj_norm(self.proj(x))

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch's output plus the shortcut: the current summed at the block's output units."""
        x = self.pre(x)
        branch = self.norm2(self.conv2(self.act1(self.norm1(self.layer(x)))))
        return branch + self.shortcut(x)

    def weight_layers(self) -> list[tuple[nn.Module, bool]]:
        """conv1 and the projection read the block input; conv2 reads conv1's activity inside the block."""
        layers = [(self.layer, True), (self.conv2, False)]
        return layers + ([(self.proj, True)] if self.proj is not None else [])


@dataclass
class ResNet20Config:
    """CIFAR ResNet (He et al. 2016): 3x3 stem, stages of basic residual blocks, global pooling, linear."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Width of each stage (the stem has the first stage's width); stages after the first halve the resolution."""
    blocks_per_stage: int = 3
    """Residual blocks per stage (3 gives ResNet-20: 1 + 3 x 3 x 2 + 1 weight layers)."""
    activation: str = "relu"
    """Nonlinearity: relu, tanh, sigmoid, gelu, leaky_relu, hardtanh, identity."""
    norm: str = "batch"
    """Normalisation after each conv: none, batch, group (GroupNorm, 8 groups) or layer (GroupNorm, one group)."""
    bias: bool = False
    """Whether weight layers have biases (He et al.: none before batch norm; the head always has one)."""


@dataclass
class ResNet18Config(ResNet20Config):
    """ResNet-18 adapted to 32x32 inputs: 3x3 stem, 4 stages of 2 basic blocks, 64-128-256-512 channels."""

    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    """Width of each stage (the stem has the first stage's width); stages after the first halve the resolution."""
    blocks_per_stage: int = 2
    """Residual blocks per stage (2 gives ResNet-18: 1 + 4 x 2 x 2 + 1 weight layers, plus projections)."""


def build_resnet(name: str, cfg: ResNet20Config, input_shape: tuple[int, ...], num_classes: int) -> Network:
    """Stem block, ``blocks_per_stage`` residual blocks per stage, then pool-and-linear head."""
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image input (C, H, W); the dataset gives shape {tuple(input_shape)}")
    c, h, w = input_shape
    if min(h, w) < 2 ** (len(cfg.channels) - 1):
        raise ValueError(f"{name}: input {tuple(input_shape)} is too small for {len(cfg.channels) - 1} "
                         "stride-2 stages")
    width = cfg.channels[0]
    blocks: list[Block] = [Block(nn.Conv2d(c, width, 3, padding=1, bias=cfg.bias),
                                 norm=make_norm(cfg.norm, width, conv=True), act=make_act(cfg.activation))]
    for s, out in enumerate(cfg.channels):
        for b in range(cfg.blocks_per_stage):
            stride = 2 if s > 0 and b == 0 else 1
            blocks.append(ResidualBlock(width, out, stride, cfg.norm, cfg.activation, cfg.bias))
            width = out
    head = Block(nn.Linear(width, num_classes), pre=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net = Network(name, blocks, head, input_shape, num_classes)
    for m in net.modules():  # He et al.'s initialisation of the convolutions
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


__all__ = ["ResNet18Config", "ResNet20Config", "ResidualBlock", "build_resnet"]
