"""The plausibility criteria measured on a rule's actual training step, and compared with what it declares.

:func:`measure` runs a rule (as ``build()`` makes it: its network, its settings) for one step on one batch with
instruments attached and returns one :class:`Measurement` per measured criterion:

* ``C1``: weight transport of another block's weights (:mod:`bioplaus.algorithms.transport`: a block's update
  must not move when another block's weights change in directions no forward evaluation sees);
  ``C1_within``: the same between the weight layers of one block (a residual block's convs);
  ``C1_head``: the same for the weights of a block's own local head (``Rule.local_heads``). The criterion C1
  is the first; the other two are reported beside it because they are definitions a reader may weigh
  differently (transport confined to one block or its own head is local).
* ``C2``: block boundaries an autograd gradient crossed (an error chained from a block into the one below);
  not measurable for a step that runs no reverse-mode autograd at all.
* ``C3``: passes of the batch through the network: the most rows any weight layer was evaluated on, over the
  batch size, plus one if a gradient crossed a block boundary (a backward sweep); 1 = single phase.
* ``C4``: hidden blocks whose update changes when every label changes.

C5 (spiking) has no generic probe. :func:`compare` sets each measurement beside the rule's declared claim;
a claim whose ``probe_cannot_see`` is set, or a measurement the probe could not make, is established by the
claim's own test and the row says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bioplaus.algorithms.arch import ArchSpec
from bioplaus.algorithms.rule import CRITERIA, OptimHParams, Rule, RunInfo
from bioplaus.algorithms.transport import THRESHOLD, ForwardUnperturbed, Transport, measure_transport

MEASURED: dict[str, str] = {
    "C1": "weight transport of other blocks' weights: the largest relative change of a block's one-step update when "
          "another block's weights change by their own size in directions every forward evaluation is blind to",
    "C1_within": "the same between the weight layers of one block (a residual block's convs); reported beside C1",
    "C1_head": "the same for the weights of a block's own local head (auxiliary classifier, local readout): "
               "transport confined to the block's own head; reported beside C1",
    "C2": "block boundaries an autograd gradient crossed during the step (an error chained into the block below)",
    "C3": "passes of the batch through the network in one step: the most rows a weight layer was evaluated on over "
          "the batch size, plus one for a backward sweep (a gradient crossing a block boundary)",
    "C4": "hidden blocks whose one-step update changes when every label is changed (and with it which examples "
          "share a label)",
}
THRESHOLDS = {"C1": THRESHOLD, "C1_within": THRESHOLD, "C1_head": THRESHOLD, "C2": 0.0, "C3": 1.0, "C4": 0.0}


@dataclass(frozen=True)
class Measurement:
    """One criterion as measured: the value, the threshold it must not exceed, the verdict (None: not measurable
    by the probes), and what was measured or why it could not be."""

    criterion: str
    value: float
    threshold: float
    holds: bool | None
    method: str


def builder(rule_cls: type[Rule], hp: Any, arch: ArchSpec, model_cfg: Any, input_shape: tuple[int, ...],
            num_classes: int, seed: int = 0) -> Callable[[], Rule]:
    """A function returning the same freshly built rule on every call: its network (``model_cfg``, as small as
    the caller makes it) and settings ``hp``, in float64 (rounding ~1e-16, far below the thresholds), on the CPU,
    with the optimiser made plain SGD (no momentum): Adam's first step is lr * sign(g), which would hide a change
    of the learning signal that keeps its signs; the optimiser acts per parameter and reads no other weight."""
    if isinstance(hp, OptimHParams):
        hp = dataclasses.replace(hp, optimizer="sgd", momentum=0.0)

    def build() -> Rule:
        saved = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            torch.manual_seed(seed)
            net = arch.build(model_cfg, tuple(input_shape), num_classes)
            info = RunInfo(num_classes, tuple(input_shape), 1, 10, torch.device("cpu"), seed)
            return rule_cls(net, hp, info).double()
        finally:
            torch.set_default_dtype(saved)
    return build


def _fixed_step(x: torch.Tensor, y: torch.Tensor, seed: int) -> Callable[[Rule], None]:
    def step(rule: Rule) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rule.train_step(x, y)
    return step


@dataclass
class _Instruments:
    """What one instrumented step saw: rows each stage weight was evaluated on, boundaries a gradient crossed,
    tensors autograd saved for a backward pass."""

    rows: dict[int, int]
    crossed: set[int]
    saved: int = 0


def _instrumented_step(rule: Rule, step: Callable[[Rule], None]) -> _Instruments:
    layers = {id(layer.weight): (i, reads_input) for i, stage in enumerate(rule.net.stages)
              for layer, reads_input in stage.weight_layers()}
    seen = _Instruments({key: 0 for key in layers}, set())

    def on_call(inp: torch.Tensor, weight: torch.Tensor) -> None:
        where = layers.get(id(weight))
        if where is None:
            return
        seen.rows[id(weight)] += inp.shape[0] if inp.dim() == 4 else math.prod(inp.shape[:-1])
        index, reads_input = where
        if index > 0 and reads_input and inp.requires_grad:
            inp.register_hook(lambda g, index=index: seen.crossed.add(index))

    def pack(t):
        seen.saved += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ForwardUnperturbed({}, on_call):
        step(rule)
    return seen


def _label_dependent(build: Callable[[], Rule], x: torch.Tensor, y: torch.Tensor, seed: int) -> int:
    """Hidden blocks whose parameters after one step differ between the labels ``y`` and other labels: every
    example's label moved by 1 + (its index mod classes - 1), so each changes and so does which examples share a
    label (a uniform shift would leave label-similarity objectives unchanged)."""
    classes = build().net.num_classes
    other = (y + 1 + torch.arange(len(y), device=y.device) % (classes - 1)) % classes
    after = []
    for labels in (y, other):
        rule = build()
        _fixed_step(x, labels, seed)(rule)
        after.append([torch.cat([p.detach().flatten() for p in b.parameters()]) for b in rule.net.blocks])
    return sum(not torch.equal(a, b) for a, b in zip(*after))


def _transport_rows(t: Transport) -> list[Measurement]:
    rows = [Measurement("C1", t.other_blocks.value, THRESHOLD, t.other_blocks.value <= THRESHOLD,
                        f"null-space perturbation; largest: {t.other_blocks.where}")]
    for code, reading, none in (("C1_within", t.within_block, "no block has two weight layers"),
                                ("C1_head", t.own_head, "the rule gives its blocks no local head")):
        rows.append(Measurement(code, math.nan, THRESHOLD, None, f"n/a: {none}") if reading is None else
                    Measurement(code, reading.value, THRESHOLD, reading.value <= THRESHOLD,
                                f"null-space perturbation; largest: {reading.where}"))
    return rows


def measure(build: Callable[[], Rule], x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> list[Measurement]:
    """Every generic criterion of the rule ``build()`` returns (the same fresh state on every call) on one batch,
    on one thread (the networks are tiny: more threads only wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(build, x, y, seed)
    finally:
        torch.set_num_threads(threads)


def _measure(build: Callable[[], Rule], x: torch.Tensor, y: torch.Tensor, seed: int) -> list[Measurement]:
    step = _fixed_step(x, y, seed)
    seen = _instrumented_step(build(), step)
    rows = _transport_rows(measure_transport(build, step, x, seed))
    crossed = len(seen.crossed)
    if seen.saved == 0 and not crossed:
        rows.append(Measurement("C2", math.nan, 0.0, None, "not measurable: the step runs no reverse-mode autograd, "
                                                         "and the crossing probe sees autograd only"))
    else:
        rows.append(Measurement("C2", float(crossed), 0.0, crossed == 0,
                                f"autograd hooks on block inputs; crossed into blocks {sorted(seen.crossed) or 'none'}"))
    if min(seen.rows.values()) == 0:
        rows.append(Measurement("C3", math.nan, 1.0, None, "not measurable: a weight layer was never evaluated "
                                                           "through F.linear/F.conv2d, so its passes are unseen"))
    else:
        passes = max(seen.rows.values()) / len(x) + (1 if crossed else 0)
        rows.append(Measurement("C3", passes, 1.0, passes <= 1.0,
                                "rows evaluated per weight layer / batch" + (" + 1 backward sweep" if crossed else "")))
    dependent = _label_dependent(build, x, y, seed)
    rows.append(Measurement("C4", float(dependent), 0.0, dependent == 0, "one step with the labels and with other "
                                                                       f"labels: hidden blocks whose update differs: {dependent}"))
    return rows


def compare(rule_cls: type[Rule], measured: list[Measurement]) -> list[dict]:
    """One row per measured criterion and per declared one the probes do not measure: the measurement, the
    declared claim, whether they agree, and how the verdict is established (``probe`` or the claim's own test)."""
    by_code = {m.criterion: m for m in measured}
    rows = []
    for code in [*MEASURED, *sorted(set(rule_cls.criteria) - set(MEASURED))]:
        m, claim = by_code.get(code), rule_cls.criteria.get(code)
        declared = None if claim is None else claim.holds
        blind = claim is not None and claim.probe_cannot_see
        probed = m is not None and m.holds is not None and not blind
        if probed:
            established = "probe"
        elif claim is not None:
            reason = claim.probe_cannot_see or (m.method if m is not None else "no generic probe")
            established = f"test {claim.test} ({reason})"
        else:
            established = m.method if m is not None else "n/a"
        rows.append({"criterion": code, "criterion_text": MEASURED.get(code) or CRITERIA.get(code),
                     "value": m.value if m is not None else math.nan,
                     "threshold": m.threshold if m is not None else math.nan,
                     "holds": m.holds if m is not None else None, "method": m.method if m is not None else None,
                     "declared": declared, "agree": (m.holds == declared) if probed and declared is not None else None,
                     "established_by": established, "why": claim.why if claim is not None else None})
    return rows
