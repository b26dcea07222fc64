"""The report's budget and statistics sections: accuracy at equal epochs and at equal compute, the
accuracy-vs-compute Pareto front (:mod:`bioplaus.analysis.budget_views`, :mod:`bioplaus.analysis.budget_figures`)
and the Friedman/Nemenyi rank test across cells with its critical-difference diagrams
(:mod:`bioplaus.analysis.report_ranks`).

``bioplaus report SWEEP --compare OTHER``: OTHER is a sweep of the other budget kind over the same cells;
its results join this report's budget section and Pareto figure (the rest of the report is SWEEP's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from bioplaus.analysis import plots, tables
from bioplaus.analysis.budget_figures import pareto_plotly, pareto_png
from bioplaus.analysis.budget_views import BudgetView, budget_comparison, budget_kind, final_costs
from bioplaus.analysis.load import SweepData, load_sweep
from bioplaus.analysis.report_format import Cell, Figure, Section, fmt
from bioplaus.analysis.report_ranks import rank_part
from bioplaus.orchestrator.errors import UsageError


@dataclass
class BudgetPart:
    """What the budget and statistics part adds to a report."""

    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    pngs: dict[str, Path] = field(default_factory=dict)


def open_compare(d: SweepData, compare: str | Path | None) -> SweepData | None:
    """The second sweep of ``--compare``, checked: it must have the other budget kind (one line, exit 2)."""
    if compare is None:
        return None
    other = load_sweep(compare)
    if budget_kind(other) == budget_kind(d):
        raise UsageError(f"--compare {compare}: both sweeps have budget.kind={budget_kind(d)}; pass a sweep of the "
                         f"other kind over the same cells (bioplaus sweep ... budget.kind="
                         f"{'compute' if budget_kind(d) == 'epochs' else 'epochs'} name=...)")
    return other


def _final_budget(d: SweepData) -> float | None:
    """The final runs' budget in the sweep's own unit (budget.final_epochs, else budget.epochs)."""
    if d.manifest is None:
        return None
    try:
        budget = json.loads(d.manifest.select("config_json").collect().item(0, 0) or "{}").get("budget") or {}
    except (ValueError, TypeError, pl.exceptions.PolarsError):
        return None
    return budget.get("final_epochs") or budget.get("epochs")


def _view(d: SweepData, main: pl.DataFrame) -> tuple[BudgetView, list[str], float | None]:
    costs, notes = final_costs(d)
    return BudgetView(d.name, budget_kind(d), main, costs), notes, _final_budget(d)


def _result(r: dict, kind: str, budget: float | None) -> Cell:
    acc = r.get(f"{kind}_test_acc_mean")
    if acc is None:
        return Cell("—")
    half, n = r.get(f"{kind}_test_acc_ci95_half"), r.get(f"{kind}_n_seeds")
    compute, epochs = r.get(f"{kind}_compute_bp_epochs"), r.get(f"{kind}_epochs")
    over = kind == "compute" and budget and epochs == 1 and compute and compute > budget
    text = (f"{fmt(acc)}" + (f" ± {fmt(half)}" if n and n > 1 else f" ({n} seed)")
            + f"\n{epochs} ep = {fmt(compute, 2)} bp-ep" + (" ‡" if over else ""))
    return Cell(text, f"rank {fmt(r.get(f'{kind}_rank'), 1)} in the cell under equal {kind}; {n} seeds")


def budget_section(comparison: pl.DataFrame, views: list[BudgetView], budgets: dict, rules: list[str],
                   cells: list[tuple[str, str]], figure: Figure) -> Section:
    kinds = [k for k in ("epochs", "compute") if any(v.kind == k for v in views)]
    rows = []
    for r in _ordered(comparison, rules, cells):
        row = [plots.cell_label(r["arch"], r["dataset"]), r["rule"], *(_result(r, k, budgets.get(k)) for k in kinds)]
        if len(kinds) == 2:
            row.append(fmt(r.get("compute_minus_epochs"), signed=True))
        rows.append(row)
    named = "; ".join(f"equal {v.kind}: sweep {v.name} ({budgets.get(v.kind)} "
                      f"{'bp-epochs of compute' if v.kind == 'compute' else 'epochs'} per final run)" for v in views)
    notes = [("Test accuracy of the final runs (mean ± 95 % t half-width over seeds) under each budget kind, with the "
              "epochs each final run got and its training compute in bp-epochs (its counted training FLOPs per sample "
              "/ bp's on the same cell x its epochs; orchestrator/flops.py). " + named + "."),
             "‡ = one epoch of this rule costs more than the compute budget: it got one epoch anyway (over budget)."]
    if len(kinds) < 2:
        other = "compute" if kinds == ["epochs"] else "epochs"
        notes.append(f"Only the equal-{kinds[0] if kinds else 'epochs'} view is here: run the same sweep with "
                     f"budget.kind={other} and a new name=, then `bioplaus report SWEEP --compare OTHER`.")
    header = ["cell", "rule", *(f"equal {k}" for k in kinds)] + (["compute − epochs"] if len(kinds) == 2 else [])
    return Section("Equal epochs and equal compute", header=header, rows=rows, notes=notes, plots=[figure])


def _ordered(df: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]]) -> list[dict]:
    order, cell_i = {r: i for i, r in enumerate(rules)}, {c: i for i, c in enumerate(cells)}
    return sorted(df.iter_rows(named=True), key=lambda r: (cell_i.get((r["arch"], r["dataset"]), 1e9),
                                                           order.get(r["rule"], 1e9), r["rule"]))


def budget_part(d: SweepData, main: pl.DataFrame, other: SweepData | None, rules: list[str],
                cells: list[tuple[str, str]], colors: dict, out: Path) -> BudgetPart:
    """The budget section (one or two sweeps), the Pareto figure and the rank-test section, with their tables."""
    part = BudgetPart()
    view, notes, budget = _view(d, main)
    views, budgets = [view], {view.kind: budget}
    part.notes += notes
    if other is not None:
        other_view, notes, other_budget = _view(other, tables.main_table(other))
        views.append(other_view)
        budgets[other_view.kind] = other_budget
        part.notes += [f"--compare {other.dir}: {n}" for n in notes]
    comparison = budget_comparison(views)
    png = pareto_png(views, cells, colors, out / "plots" / "accuracy_vs_compute.png")
    figure = Figure("accuracy vs compute (Pareto front)", pareto_plotly(views, cells, colors), png)
    ranks = [rank_part(_final_runs(d), tables.cells_table(d), cells, out)]
    if other is not None:  # the compared view gets its own rank test: "who is best" may differ between views
        ranks.append(rank_part(_final_runs(other), tables.cells_table(other), cells, out, view=views[1].kind))
    part.sections = [budget_section(comparison, views, budgets, rules, cells, figure), *(r.section for r in ranks)]
    part.tables = {"budget_costs": pl.concat([v.costs for v in views], how="vertical_relaxed"),
                   "budget_views": comparison, **{k: v for r in ranks for k, v in r.tables.items()}}
    part.pngs = {"pareto_compute": png, **{k: v for r in ranks for k, v in r.pngs.items()}}
    return part


def _final_runs(d: SweepData) -> pl.DataFrame:
    return d.final_runs.collect() if d.final_runs is not None else pl.DataFrame()
