"""The block contract every architecture is built from, and the parts blocks are made of.

Every block has the same named parts, ``pre -> layer -> norm -> act -> pool``, so a rule can act
block by block without knowing which architecture it is in: ``block.layer`` is the one weight layer
(Linear or Conv2d) a feedback matrix or a Hebbian update refers to, ``block.preact(x)`` is the
layer's input current and ``block.post(u)`` the rest of the block. ``block.weight_layers()`` lists
every weight layer of the block (one for a plain block, more for a residual block). The output block
(``head``) is a Block too, with no activation. :class:`Network` is the ordered list of blocks.
"""

from __future__ import annotations

import math
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
NORMS = ("none", "batch", "group", "layer")
"""none; batch (per-channel batch statistics: couples the samples of a batch); group (GroupNorm with
GROUP_NORM_GROUPS groups, or fewer where the width is not divisible); layer (one group per sample)."""
GROUP_NORM_GROUPS = 8
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

    def weight_layers(self) -> list[tuple[nn.Module, bool]]:
        """Every weight layer of the block, with whether its input is the block's input (True) or a
        quantity inside the block (False): a plain block has one, ``layer``, reading the block input."""
        return [(self.layer, True)]


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


def make_act(name: str) -> nn.Module:
    """A fresh nonlinearity module by name (ValueError naming the known ones)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def make_norm(kind: str, width: int, conv: bool) -> nn.Module | None:
    """The normalisation ``kind`` for ``width`` features (channels when ``conv``); None for none."""
    if kind == "none":
        return None
    if kind == "batch":
        return nn.BatchNorm2d(width) if conv else nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.GroupNorm(1, width) if conv else nn.LayerNorm(width)
    if kind == "group":
        return nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, width), width)
    raise ValueError(f"unknown norm {kind!r}; use one of {', '.join(NORMS)}")


def make_pool(kind: str) -> nn.Module:
    """Pooling by 2: max or avg."""
    if kind not in POOLS:
        raise ValueError(f"unknown pool {kind!r}; use one of {', '.join(POOLS)}")
    return nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)


__all__ = ["ACTIVATIONS", "GROUP_NORM_GROUPS", "NORMS", "POOLS", "Block", "Network", "make_act", "make_norm",
           "make_pool"]
