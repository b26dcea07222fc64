"""What a sweep will cost, in device-hours, from a calibration of each cell's step time (pure arithmetic).

A cell's work, on one device and alone, is its tuning trials plus its final runs:

* a tuning trial runs ``expected_epochs`` epochs on average (ASHA's pruning, :func:`asha_expected_epochs`),
  each ``steps_per_epoch`` training steps and one validation pass, plus its set-up;
* a final run runs ``final_epochs`` epochs, each with a validation pass, plus one test pass and its set-up.

Sharing a device changes how much of it that work occupies: ``packing`` trials on one device (a fraction
``resources.gpus_per_trial``) run ``S(N)`` times the throughput of one alone (the measured packed-trial
curve, orchestrator/packing.py), and a population of P members in one process (``resources.population``)
runs ``S_pop(P)`` times one member's. Both fill the same idle capacity of a device, so the estimate takes the
larger of the two gains, not their product. Device-hours = work / gain; with G devices the wall time is about
device-hours / G (ignoring the last trials' tail).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Budget:
    """The per-cell budget of a sweep (``budget.*``)."""

    trials: int
    epochs: int
    grace_epochs: int
    reduction_factor: int
    final_seeds: int
    final_epochs: int


@dataclass(frozen=True)
class CellCost:
    """One cell's calibration and sizes: seconds per training step, per evaluated sample, per set-up."""

    step_s: float
    steps_per_epoch: int
    n_val: int
    n_test: int
    eval_s_per_sample: float = 0.0
    setup_s: float = 0.0
    tuning_epochs_scale: float = 1.0
    """The cell's own epochs per budget epoch in tuning: 1 under budget.kind=epochs; under compute, the epochs
    a run at the cell's first point gets for ``budget.epochs`` bp-epochs, over ``budget.epochs`` (ASHA's rungs
    are bp-epochs too, so a pruned trial's epochs scale the same way)."""
    final_epochs_scale: float = 1.0
    """The same for a final run (its budget is ``budget.final_epochs``)."""


def asha_rungs(max_t: int, grace: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA compares a trial with its cell's others (Ray Tune's one-bracket ASHA)."""
    count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    return [grace * reduction_factor ** k for k in range(count) if grace * reduction_factor ** k < max_t]


def asha_epochs_run(qualities: list[float], max_t: int, grace: int, reduction_factor: int) -> list[int]:
    """Epochs each trial of one cell runs under Ray Tune's one-bracket ASHA, the trials arriving in the order
    given, each with a quality that keeps its rank at every rung: at a rung a trial stops when its value is
    below the (1 - 1/rf) quantile of the values recorded there before it (the first to arrive goes on)."""
    rungs = asha_rungs(max_t, grace, reduction_factor)
    quantile = (1 - 1 / reduction_factor) * 100
    recorded: list[list[float]] = [[] for _ in rungs]
    ran = []
    for quality in qualities:
        stop = max_t
        for k, rung in enumerate(rungs):
            cutoff = _percentile(recorded[k], quantile)
            recorded[k].append(quality)
            if cutoff is not None and quality < cutoff:
                stop = rung
                break
        ran.append(stop)
    return ran


def asha_expected_epochs(trials: int, max_t: int, grace: int, reduction_factor: int, repeats: int = 400,
                         seed: int = 0) -> float:
    """Mean epochs a cell's tuning trial runs under ASHA (:func:`asha_epochs_run`), over ``repeats`` random
    arrival orders of i.i.d. qualities: the pruning a sweep sees when its trials' early and late accuracies
    agree in order (trials arriving one after another). Seeded: the same budget gives the same number."""
    rng = random.Random(seed)
    total = sum(sum(asha_epochs_run([rng.random() for _ in range(trials)], max_t, grace, reduction_factor))
                for _ in range(repeats))
    return total / (repeats * trials)


def _percentile(values: list[float], q: float) -> float | None:
    """numpy's default (linear) percentile, as Ray's ASHA computes its cutoff."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def speedup(curve: dict | None, n: float) -> float:
    """Throughput of ``n`` sharing a device over that of one, from a measured curve ``{count: samples/s}``:
    linear between measured counts, flat beyond the largest (a saturated device gains nothing more);
    1 when nothing was measured or ``n`` <= 1."""
    if not curve or n <= 1:
        return 1.0
    points = sorted((int(k), float(v)) for k, v in curve.items())
    base = dict(points).get(1)
    if not base:
        return 1.0
    for (n0, v0), (n1, v1) in zip(points, points[1:]):
        if n0 <= n <= n1:
            return max(1.0, (v0 + (v1 - v0) * (n - n0) / (n1 - n0)) / base)
    return max(1.0, points[-1][1] / base) if n > points[-1][0] else 1.0


def epoch_seconds(cost: CellCost) -> float:
    """One training epoch and its validation pass."""
    return cost.steps_per_epoch * cost.step_s + cost.n_val * cost.eval_s_per_sample


def cell_seconds(cost: CellCost, budget: Budget, expected_epochs: float) -> dict[str, float]:
    """A cell's work alone on one device: its tuning trials and its final runs, in seconds."""
    epoch = epoch_seconds(cost)
    tuning_epochs = expected_epochs * cost.tuning_epochs_scale
    final_epochs = budget.final_epochs * cost.final_epochs_scale
    tuning = budget.trials * (cost.setup_s + tuning_epochs * epoch)
    finals = budget.final_seeds * (cost.setup_s + final_epochs * epoch + cost.n_test * cost.eval_s_per_sample)
    epochs = budget.trials * tuning_epochs + budget.final_seeds * final_epochs
    # train_s: the training steps alone, what the runs' own train_seconds measure (no set-up, no evaluation)
    return {"tuning_s": tuning, "finals_s": finals, "work_s": tuning + finals,
            "train_s": epochs * cost.steps_per_epoch * cost.step_s}


def estimate(costs: dict[str, CellCost], budget: Budget, packing: float = 1.0, population: int = 1,
             packing_curves: dict[str, dict] | None = None, population_curves: dict[str, dict] | None = None
             ) -> dict:
    """Per-cell and total device-hours of a sweep. ``packing``: trials sharing one device (1 / gpus_per_trial);
    ``population``: members per process; the curves, per cell key, as :func:`curve_for` finds them."""
    expected = asha_expected_epochs(budget.trials, budget.epochs, budget.grace_epochs, budget.reduction_factor)
    rows = []
    for key, cost in costs.items():
        seconds = cell_seconds(cost, budget, expected)
        pack = speedup(curve_for(packing_curves, key), packing)
        pop = speedup(curve_for(population_curves, key), population)
        gain = max(pack, pop)
        rows.append({"cell": key, **asdict(cost), **seconds, "packing_speedup": pack, "population_speedup": pop,
                     "device_hours": seconds["work_s"] / gain / 3600,
                     "train_device_hours": seconds["train_s"] / gain / 3600})
    return {"budget": asdict(budget), "expected_epochs_per_trial": expected, "packing": packing,
            "population": population, "cells": rows,
            "device_hours": sum(r["device_hours"] for r in rows),
            "work_hours_alone": sum(r["work_s"] for r in rows) / 3600}


def curve_for(curves: dict[str, dict] | None, key: str) -> dict | None:
    """The measured curve that stands for cell ``key`` ("rule.arch.dataset"): its own, else one of the same
    rule and arch, else one of the same arch, else none (no gain assumed)."""
    if not curves:
        return None
    if key in curves:
        return curves[key]
    rule, arch, _ = key.split(".")
    for match in (lambda k: k.split(".")[:2] == [rule, arch], lambda k: k.split(".")[1] == arch):
        found = sorted(k for k in curves if match(k))
        if found:
            return curves[found[0]]
    return None
