"""Weight transport (C1) measured by perturbing weights in directions no forward evaluation can see.

A rule transports a weight W when the update of some *other* weight depends on W's values beyond what W
computes forwards: bp sends the error down through W^T, sign-symmetry reads sign(W), a copy of W made for
the backward pass is read, ... . The instrument: perturb W by a large random ``dW`` (as large as W itself, so
that non-linear reads such as sign(W) change too) while every forward evaluation of W still computes with the
unperturbed W, run one training step from the same state and random numbers, and measure how much every other
block's update moved (relative change; 0 up to rounding for a rule without transport, order 1 for bp).

"Every forward evaluation unchanged" is the issue's null-space perturbation made exact for every input a step
evaluates W on, not only the batch: a dense layer's ``dW`` is taken in the null space of the batch's inputs to
it (where the batch leaves one), and each ``F.linear``/``F.conv2d`` call on W during the step, whatever its
input (perturbed copies of the batch, negative data, relaxation states, an autograd Function's forward), gets
the value computed with the unperturbed W while its autograd graph is the perturbed W's (so reverse-mode
transport reads W + dW). Forward reads a rule writes by hand go through
:func:`bioplaus.algorithms.forward_reads.forward_weight` and are treated the same way. Anything else that
reads W (a transpose, a sign, a copy) reads W + dW.

Three kinds of transport are reported apart: of another block's weights (C1 proper), between the weight layers
of one block (a residual block's second conv carrying error to its first), and of the weights of a block's own
local head (auxiliary classifiers, local readouts: :meth:`~bioplaus.algorithms.rule.Rule.local_heads`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bioplaus.algorithms.forward_reads import substituting
from bioplaus.algorithms.rule import Rule

THRESHOLD = 1e-6
"""Relative change of an update above which a weight counts as read (bp: order 1; none: ~1e-15 in float64)."""
RELATIVE_SIZE = 1.0
"""The perturbation's norm relative to the weight's (or, for a zero weight, to a default-initialised one)."""

_FORWARD_OPS = (F.linear, torch.conv2d)


class ForwardUnperturbed(TorchFunctionMode):
    """While active, ``F.linear``/``F.conv2d`` with a weight in ``deltas`` (id -> dW) return the value computed with
    ``weight - dW`` and carry the graph of ``weight`` (exact: ``value + (out - out.detach())``)."""

    def __init__(self, deltas: dict[int, torch.Tensor], on_call: Callable | None = None):
        super().__init__()
        self.deltas, self.on_call = deltas, on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _FORWARD_OPS:
            return func(*args, **kwargs)
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if self.on_call is not None:
            self.on_call(args[0] if args else kwargs["input"], weight)
        delta = self.deltas.get(id(weight))
        out = func(*args, **kwargs)
        if delta is None:
            return out
        unperturbed = (weight - delta).detach()
        call = (args[0], unperturbed, *args[2:]) if len(args) > 1 else args
        with torch.no_grad():
            value = func(*call, **({**kwargs, "weight": unperturbed} if "weight" in kwargs else kwargs))
        return value + (out - out.detach()) if out.requires_grad else value


def substitute_forward_reads(deltas: dict[int, torch.Tensor]):
    """:func:`~bioplaus.algorithms.forward_reads.forward_weight` hands back ``weight - dW`` for a perturbed weight."""
    return substituting(lambda w: w - deltas[id(w)] if id(w) in deltas else w)


def weight_layers(module: nn.Module) -> list[nn.Module]:
    """Every Linear and Conv2d inside ``module`` (itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def batch_inputs(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Module name -> the rows a Linear layer of ``net`` reads on the batch ``x`` (one forward pass of a copy)."""
    clone, seen = copy.deepcopy(net), {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0].detach()))
               for name, m in clone.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            clone(x)
    finally:
        for h in handles:
            h.remove()
    return {name: rows.reshape(-1, rows.shape[-1]) for name, rows in seen.items()}


def direction(weight: torch.Tensor, rows: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """A random perturbation of ``weight``: Gaussian, projected onto the null space of ``rows`` (a dense layer's
    batch inputs, where they leave one), scaled to RELATIVE_SIZE times the weight's norm (a zero weight: the norm
    of PyTorch's default init for its shape, U(+-1/sqrt(fan_in)))."""
    d = torch.randn(weight.shape, generator=gen, dtype=weight.dtype).to(weight.device)
    if rows is not None and weight.dim() == 2 and rows.shape[0] < weight.shape[1]:
        basis, _ = torch.linalg.qr(rows.t().to(weight.dtype))  # orthonormal basis of the batch's input span
        d = d - (d @ basis) @ basis.t()
    fan_in = math.prod(weight.shape[1:])
    size = max(weight.norm().item(), math.sqrt(weight.numel() / (3 * fan_in)))
    return d * (RELATIVE_SIZE * size / d.norm().clamp_min(1e-300))


def relative_change(base: torch.Tensor, moved: torch.Tensor) -> float:
    """||moved - base|| / ||base|| (0 where both are zero, inf where only the base is)."""
    diff, scale = (moved - base).norm().item(), base.norm().item()
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else math.inf


@dataclass(frozen=True)
class Reading:
    """The largest relative change of an update under a perturbation of the kind named, and where it was seen."""

    value: float
    where: str

    @staticmethod
    def worst(readings: list[Reading]) -> Reading | None:
        return max(readings, key=lambda r: r.value) if readings else None


@dataclass(frozen=True)
class Transport:
    """C1's three readings (None where the network or rule has nothing of that kind)."""

    other_blocks: Reading
    within_block: Reading | None
    own_head: Reading | None


Step = Callable[[Rule], None]
"""Runs one training step of a rule, from the same random numbers every call."""


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)


def _updates(rule: Rule, step: Step, perturb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each stage's and each weight layer's update (flattened) over one step of ``rule`` with ``perturb``
    (parameter name -> dW) added to its parameters first."""
    params = dict(rule.named_parameters())
    groups = {f"stage {i}": list(s.parameters()) for i, s in enumerate(rule.net.stages)}
    for i, stage in enumerate(rule.net.stages):
        for j, layer in enumerate(weight_layers(stage)):
            groups[f"stage {i} layer {j}"] = list(layer.parameters())
    deltas = {}
    with torch.no_grad():
        for name, d in perturb.items():
            params[name].add_(d)
            deltas[id(params[name])] = d
    before = {k: _flat(v).clone() for k, v in groups.items()}
    with ExitStack() as stack:
        stack.enter_context(ForwardUnperturbed(deltas))
        stack.enter_context(substitute_forward_reads(deltas))
        step(rule)
    return {k: _flat(v) - before[k] for k, v in groups.items()}


def measure_transport(build: Callable[[], Rule], step: Step, x: torch.Tensor, seed: int = 0) -> Transport:
    """The three C1 readings of the rule ``build()`` makes (deterministic: the same state every call), each run of
    ``step`` starting from the same random numbers."""
    base_rule = build()
    names = {id(p): n for n, p in base_rule.named_parameters()}
    rows = batch_inputs(base_rule.net, x)
    module_names = {id(m): n for n, m in base_rule.net.named_modules()}
    gen = torch.Generator().manual_seed(seed)
    base = _updates(base_rule, step, {})
    other, within = [], []
    for i, stage in enumerate(base_rule.net.stages):
        layers = weight_layers(stage)
        for j, layer in enumerate(layers):
            d = direction(layer.weight, rows.get(module_names[id(layer)]), gen)
            moved = _updates(build(), step, {names[id(layer.weight)]: d})
            other += [Reading(relative_change(base[f"stage {k}"], moved[f"stage {k}"]),
                              f"stage {k}'s update under stage {i}'s weight layer {j}")
                      for k in range(len(base_rule.net.stages)) if k != i]
            within += [Reading(relative_change(base[f"stage {i} layer {k}"], moved[f"stage {i} layer {k}"]),
                               f"stage {i}'s layer {k} under its layer {j}") for k in range(len(layers)) if k != j]
    heads = []
    for i, modules in base_rule.local_heads().items():
        perturb = {names[id(m.weight)]: direction(m.weight, None, gen) for mod in modules for m in weight_layers(mod)}
        moved = _updates(build(), step, perturb)
        heads.append(Reading(relative_change(base[f"stage {i}"], moved[f"stage {i}"]),
                             f"block {i}'s update under its own local head"))
    return Transport(Reading.worst(other), Reading.worst(within), Reading.worst(heads))
