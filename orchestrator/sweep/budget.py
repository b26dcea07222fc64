"""Training budgets: what every run of a cell gets the same of, epochs or compute (``budget.kind``).

* ``budget.kind=epochs``: every tuning trial gets ``budget.epochs`` epochs and ASHA's rungs are epochs.
* ``budget.kind=compute``: every tuning trial gets ``budget.epochs`` **bp-epochs** of training compute: the
  floating-point operations one epoch of ``bp`` costs on the same cell (same architecture, data and batch
  size), so a run whose training step costs 3x bp's per sample gets a third of the epochs and a cheaper one
  more. ASHA's rungs (``grace_epochs``, ``max_t``) are then bp-epochs of compute spent, so pruning compares
  trials at equal compute, and a final run gets ``budget.final_epochs`` (else ``budget.epochs``) bp-epochs.

Why counted FLOPs, not seconds: a count is a property of the configuration alone, the same on every machine,
device and load, so the epochs a trial gets (part of its configuration and of a final run's id) follow from
the config and the seed, a resumed sweep rebuilds exactly the configurations it recorded, and two machines
give the same budget. A wall-clock ratio would move with the device (dispatch overhead dominates small
networks on a CPU, matrix products large ones on a GPU) and with whatever else the machine runs. FLOPs are
counted with torch's own FLOP registry (matrix products, convolutions, attention: forward, backward,
forward-mode and hand-written updates alike) on the run's real first training steps, per configuration, so
hyperparameters that change cost (inference or settling steps, perturbations, negatives) change the epochs.
What a count leaves out is element-wise work, random draws and per-operation overhead: it prices the
algorithm, not how many small operations this implementation of it dispatches (on a small mlp on a CPU a
rule can be many times slower than bp at about bp's FLOPs); measured wall time (the cost table's
throughput) stays the other, machine-bound view. The first training steps are what is counted: a rule whose
cost changes later (softhebb's and stdp's ``plastic_epochs`` freeze the hidden blocks) is priced at its first
epochs' cost.

Whole epochs only: a run's epochs are ``round(budget / cost)``, at least 1 (a run whose one epoch costs more
than the budget gets one epoch, over budget, and its rows say by how much) and at most
``budget.max_epochs_factor x budget`` (a rule whose work is mostly element-wise counts few FLOPs; this bounds
its epochs). The rows of every run record the kind, its FLOPs per sample, bp's, and the compute it was given
in bp-epochs (``budget_bp_epochs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from bioplaus.orchestrator.errors import UsageError, one_line
from bioplaus.orchestrator.flops import FlopCounter
from bioplaus.orchestrator.sweep.cells import Cell, trial_config

COMPUTE_TIME_ATTR = "bp_epochs"
"""The result key a compute-budget trial reports its compute spent in (bp-epochs): ASHA's time attribute."""


def compute_spent(tune_config: dict):
    """For a tuning trial's Tune config: epoch report -> the keys to add to it; with budget.kind=compute the
    compute spent so far in bp-epochs (:data:`COMPUTE_TIME_ATTR`, what ASHA's rungs count), else none."""
    cost = (tune_config.get("budget") or {}).get("cost_vs_bp")
    if not cost:
        return lambda row: {}
    return lambda row: {COMPUTE_TIME_ATTR: row["epoch"] * cost}


def epochs_for(budget_bp_epochs: float, cost_vs_bp: float, max_factor: float) -> int:
    """Whole epochs of a run costing ``cost_vs_bp`` x bp per sample under a budget of ``budget_bp_epochs``
    bp-epochs: the nearest whole number, at least 1, at most ``max_factor`` x the budget."""
    cap = max(1, math.floor(max_factor * budget_bp_epochs))
    if not math.isfinite(cost_vs_bp) or cost_vs_bp <= 0:
        return cap
    return max(1, min(cap, math.floor(budget_bp_epochs / cost_vs_bp + 0.5)))


@dataclass(frozen=True)
class RunBudget:
    """What one run was given: its epochs, and under which budget kind; the counted costs where known."""

    kind: str
    epochs: int
    flops_per_sample: float | None = None
    bp_flops_per_sample: float | None = None

    @property
    def cost_vs_bp(self) -> float | None:
        if not self.flops_per_sample or not self.bp_flops_per_sample:
            return None
        return self.flops_per_sample / self.bp_flops_per_sample

    @property
    def bp_epochs(self) -> float | None:
        """The training compute the run was given, in bp-epochs."""
        return None if self.cost_vs_bp is None else self.epochs * self.cost_vs_bp

    def columns(self) -> dict[str, Any]:
        """The run-table columns (``RunRecord`` fields) describing this budget."""
        return {"budget_kind": self.kind, "train_flops_per_sample": self.flops_per_sample,
                "bp_train_flops_per_sample": self.bp_flops_per_sample, "budget_bp_epochs": self.bp_epochs}

    def tune_config(self) -> dict[str, Any]:
        """What a tuning trial's Tune config carries about its budget (the worker reports compute spent)."""
        return {"kind": self.kind, "epochs": self.epochs, "cost_vs_bp": self.cost_vs_bp,
                "flops_per_sample": self.flops_per_sample, "bp_flops_per_sample": self.bp_flops_per_sample}

    @classmethod
    def from_tune_config(cls, budget: dict | None, kind: str, epochs: int) -> RunBudget:
        if not budget:
            return cls(kind, epochs)
        return cls(budget["kind"], int(budget["epochs"]), budget.get("flops_per_sample"),
                   budget.get("bp_flops_per_sample"))


class ComputeBudgets:
    """The driver's side of ``budget.kind=compute``: each configuration's FLOPs per sample and its bp
    reference's, counted once each on the CPU (orchestrator/flops.py: two training steps of a copy of the run
    on the cell's real data, the caller's random streams untouched), and the whole epochs each run gets."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.counter = FlopCounter(int(cfg.seed))

    def costs(self, plain: dict) -> tuple[float, float]:
        """(FLOPs per sample of the run ``plain``, of bp on its cell); UsageError naming the rule if it fails."""
        try:
            return self.counter.with_reference(plain)
        except UsageError:
            raise
        except Exception as e:  # a rule that fails here fails in its runs too: say which, before they run
            raise UsageError(f"budget.kind=compute could not count the training FLOPs of {plain['rule']} on "
                             f"{plain['arch']}/{plain['dataset']} ({one_line(e)}); use budget.kind=epochs, or fix "
                             "the rule") from None

    def plan(self, cell: Cell, hp: dict, seed: int, budget_bp_epochs: float) -> tuple[dict, RunBudget]:
        """The trial config of a run of ``cell`` with ``hp`` and ``seed``, its epochs set by its counted cost."""
        plain = trial_config(self.cfg, cell, hp, seed, self.cfg.budget.epochs)
        flops, bp = self.costs(plain)
        epochs = epochs_for(budget_bp_epochs, flops / bp if bp else float("nan"), self.cfg.budget.max_epochs_factor)
        plain["train"]["epochs"] = epochs
        return plain, RunBudget("compute", epochs, flops, bp)
