"""The two budget views of a comparison: accuracy at equal epochs and at equal compute, and what each costs.

A sweep has one budget kind (``budget.kind``, its manifest): ``epochs`` (every run of a cell the same epochs)
or ``compute`` (the same training FLOPs, in bp-epochs: orchestrator/sweep/budget.py). The report reads one
sweep, or two (``bioplaus report SWEEP --compare OTHER``, one of each kind, same cells) and shows, per rule
and cell, the accuracy under each view side by side. Tables:

* **costs** (:func:`final_costs`): per rule x cell with final runs: the budget kind, epochs, training FLOPs
  per sample and bp's on the cell, ``cost_vs_bp`` (the ratio) and ``compute_bp_epochs`` (epochs x ratio: the
  training compute of one final run in bp-epochs). A compute sweep records the counts in its rows; for other
  sweeps the report counts them now (orchestrator/flops.py: two training steps of the final configuration
  on the CPU; needs the data) and says so in ``cost_source``.
* **budget views** (:func:`budget_comparison`): per rule x cell, for each budget kind present: test accuracy
  (mean, 95 % t half-width, seeds), epochs, compute in bp-epochs and the rank within the cell.
* **Pareto points** (:func:`pareto_points`, :func:`compute_front`): accuracy with its 95 % CI over the final
  seeds against compute in bp-epochs; the front is the points no other point beats on both (less or equal
  compute and higher accuracy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import polars as pl

from bioplaus.analysis.load import SweepData
from bioplaus.orchestrator.flops import counts_of

KEYS = ["rule", "arch", "dataset"]
KINDS = ("epochs", "compute")
COST_SCHEMA = {"rule": pl.String, "arch": pl.String, "dataset": pl.String, "budget_kind": pl.String,
               "epochs": pl.Int64, "train_flops_per_sample": pl.Float64, "bp_train_flops_per_sample": pl.Float64,
               "cost_vs_bp": pl.Float64, "compute_bp_epochs": pl.Float64, "cost_source": pl.String}


def budget_kind(d: SweepData) -> str:
    """The sweep's ``budget.kind`` as its manifest records it (a sweep from before the setting: epochs)."""
    if d.manifest is None:
        return "epochs"
    try:
        cfg = json.loads(d.manifest.select("config_json").collect().item(0, 0) or "{}")
    except (ValueError, TypeError, pl.exceptions.PolarsError):
        return "epochs"
    return str((cfg.get("budget") or {}).get("kind") or "epochs")


def _first_rows(d: SweepData) -> pl.DataFrame:
    """Per cell with final runs: the recorded budget columns of its lowest seed, and the most epochs planned."""
    fr = d.final_runs.collect()
    for c in ("budget_kind", "train_flops_per_sample", "bp_train_flops_per_sample"):
        if c not in fr.columns:
            fr = fr.with_columns(pl.lit(None, dtype=COST_SCHEMA[c]).alias(c))
    return (fr.sort("seed").group_by(KEYS, maintain_order=True)
            .agg(pl.col("epochs_planned").max().alias("epochs"), pl.col("config_json").first(),
                 *(pl.col(c).drop_nulls().first() for c in ("budget_kind", "train_flops_per_sample",
                                                            "bp_train_flops_per_sample"))))


def final_costs(d: SweepData) -> tuple[pl.DataFrame, list[str]]:
    """(the costs table, notes): see the module docstring."""
    if d.final_runs is None:
        return pl.DataFrame(schema=COST_SCHEMA), []
    rows = _first_rows(d).to_dicts()
    todo = [r for r in rows if not (r["train_flops_per_sample"] and r["bp_train_flops_per_sample"])]
    counted = counts_of([json.loads(r["config_json"] or "{}") for r in todo])
    errors = []
    for r, (flops, bp, error) in zip(todo, counted):
        r.update(train_flops_per_sample=flops, bp_train_flops_per_sample=bp, cost_source="counted by the report")
        if error:
            errors.append(f"{r['rule']}.{r['arch']}.{r['dataset']}: {error}")
    kind = budget_kind(d)
    for r in rows:
        r.setdefault("cost_source", "recorded by the sweep")
        r["budget_kind"] = r["budget_kind"] or kind
        ratio = (r["train_flops_per_sample"] / r["bp_train_flops_per_sample"]
                 if r["train_flops_per_sample"] and r["bp_train_flops_per_sample"] else None)
        r.update(cost_vs_bp=ratio, compute_bp_epochs=ratio * r["epochs"] if ratio and r["epochs"] else None)
        if ratio is None:
            r["cost_source"] = None
    notes = [f"training FLOPs could not be counted for {len(errors)} cell(s), which have no compute cost "
             f"({errors[0]})"] if errors else []
    table = pl.DataFrame([{k: r.get(k) for k in COST_SCHEMA} for r in rows], schema=COST_SCHEMA)
    return table.sort(KEYS), notes


@dataclass
class BudgetView:
    """One sweep's results under its budget kind: the main table (analysis/tables.py) and the costs."""

    name: str
    kind: str
    main: pl.DataFrame
    costs: pl.DataFrame

    def joined(self) -> pl.DataFrame:
        ok = self.main.filter(pl.col("status") == "ok").select(
            *KEYS, "test_acc_mean", "test_acc_ci95_half", "n_seeds", "rank")
        return ok.join(self.costs.select(*KEYS, "epochs", "compute_bp_epochs"), on=KEYS, how="left")


def budget_comparison(views: list[BudgetView]) -> pl.DataFrame:
    """Per rule x cell: for each budget kind among ``views`` its accuracy, CI half-width, seeds, epochs, compute
    (bp-epochs) and rank within the cell, as ``<kind>_<column>``; ``compute_minus_epochs``: the accuracy
    difference where both views are there."""
    out = None
    for view in views:
        part = view.joined().rename({c: f"{view.kind}_{c}" for c in ("test_acc_mean", "test_acc_ci95_half",
                                                                   "n_seeds", "rank", "epochs", "compute_bp_epochs")})
        out = part if out is None else out.join(part, on=KEYS, how="full", coalesce=True)
    if out is None:
        return pl.DataFrame(schema={k: pl.String for k in KEYS})
    if all(f"{k}_test_acc_mean" in out.columns for k in KINDS):
        out = out.with_columns(compute_minus_epochs=pl.col("compute_test_acc_mean") - pl.col("epochs_test_acc_mean"))
    return out.sort(KEYS)


def pareto_points(views: list[BudgetView], arch: str, dataset: str) -> list[dict]:
    """The cell's results with a compute cost: rule, budget kind, compute (bp-epochs), accuracy and its 95 %
    CI over the final seeds clipped to [0, 1], and the number of seeds."""
    points = []
    for view in views:
        rows = view.joined().filter((pl.col("arch") == arch) & (pl.col("dataset") == dataset)
                                    & pl.col("compute_bp_epochs").is_not_null() & (pl.col("compute_bp_epochs") > 0))
        for r in rows.iter_rows(named=True):
            acc, half = r["test_acc_mean"], r["test_acc_ci95_half"]
            half = half if half is not None and math.isfinite(half) else 0.0
            points.append({"rule": r["rule"], "kind": view.kind, "compute": r["compute_bp_epochs"], "acc": acc,
                           "ci_low": max(0.0, acc - half), "ci_high": min(1.0, acc + half),
                           "n_seeds": r["n_seeds"], "epochs": r["epochs"]})
    return points


def compute_front(points: list[dict]) -> list[dict]:
    """The points no other point dominates (at most its compute and a higher mean accuracy), by compute."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p["compute"], -p["acc"])):
        if p["acc"] > best:
            front.append(p)
            best = p["acc"]
    return front
