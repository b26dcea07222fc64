"""The report's sections: each table of the sweep (:mod:`bioplaus.analysis.tables`) formatted for reading.

Each function returns a :class:`~bioplaus.analysis.report_format.Section` that both renderers draw.
"""

from __future__ import annotations

import polars as pl

from bioplaus.analysis import plots
from bioplaus.analysis.report_format import Cell, Figure, Section, fmt, fmt_big, fmt_hp


# --- sections -----------------------------------------------------------------------------------------------
def main_section(main: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]]) -> Section:
    lookup = {(r["rule"], r["arch"], r["dataset"]): r for r in main.iter_rows(named=True)}
    rows, unsupported = [], []
    for rule in rules:
        row = [rule]
        for arch, dataset in cells:
            r = lookup.get((rule, arch, dataset))
            if r is None:
                row.append("")
            elif r["status"] == "unsupported":
                row.append(Cell("n/a", r["reason"]))
                unsupported.append(f"{rule} on {plots.cell_label(arch, dataset)}: {r['reason'] or 'no reason given'}")
            elif r["status"] == "no finals":
                row.append(Cell("no result", "no final runs recorded for this cell"))
            else:
                n = r["n_seeds"]
                text = fmt(r["test_acc_mean"]) + (f" ± {fmt(r['test_acc_ci95_half'])}" if n and n > 1 else
                                                  f" ({n} seed)")
                if r["best"]:
                    text = f"**{text}**"
                if r["gap_to_bp"] is not None:
                    sig = (r["gap_ci95_low"] is not None and (r["gap_ci95_low"] > 0 or r["gap_ci95_high"] < 0))
                    text += f"\n({fmt(r['gap_to_bp'], signed=True)}{'†' if sig else ''})"
                title = (f"mean {fmt(r['test_acc_mean'], 4)}, std {fmt(r['test_acc_std'], 4)}, 95% CI "
                         f"[{fmt(r['test_acc_ci95_low'], 4)}, {fmt(r['test_acc_ci95_high'], 4)}], {n} seeds; rank "
                         f"{fmt(r['rank'], 1)}; gap to bp {fmt(r['gap_to_bp'], 4, True)} [95% Welch CI "
                         f"{fmt(r['gap_ci95_low'], 4, True)}, {fmt(r['gap_ci95_high'], 4, True)}]")
                row.append(Cell(text, title))
        rows.append(row)
    notes = [("Mean test accuracy of the final runs ± half-width of the 95 % t-interval over seeds; **bold** = best "
              "mean of the column. In parentheses: difference to bp on the same cell; † = its 95 % Welch interval "
              "excludes 0.")]
    if unsupported:
        notes.append("n/a (unsupported, as the rule declares): " + "; ".join(unsupported))
    return Section("Main table: final test accuracy", header=["rule", *(plots.cell_label(a, d) for a, d in cells)],
                   rows=rows, notes=notes)


def rank_section(ranks: pl.DataFrame) -> Section:
    rows = [[r["rule"], f"{r['n_cells']} / {r['cells_in_sweep']}", fmt(r["mean_rank"], 2), str(r["wins"]),
             fmt(r["mean_normalized_acc"]), f"{fmt(r['min_normalized_acc'])} – {fmt(r['max_normalized_acc'])}",
             fmt(r["mean_test_acc"])] for r in ranks.iter_rows(named=True)]
    notes = [("Rank 1 = best mean test accuracy of a cell (ties share the average rank), averaged over the cells "
              "the rule has results on. Normalised accuracy = (acc − chance) / (acc_bp − chance): 0 = chance, "
              "1 = bp, so cells of different difficulty can be averaged (undefined where bp did not beat chance).")]
    if ranks.height and ranks["n_cells"].n_unique() > 1:
        notes.append("Rules cover different numbers of cells (unsupported or missing cells): compare mean ranks "
                     "with care.")
    return Section("Ranking across cells", header=["rule", "cells", "mean rank", "wins", "normalised acc (mean)",
                                                   "normalised (min – max)", "mean test acc"], rows=rows, notes=notes)


def rows_by_cell_and_rule(df: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]]) -> list[dict]:
    """The rows of a per-cell table in report order: cells as listed, then rules as listed (unknown ones last)."""
    order = {r: i for i, r in enumerate(rules)}
    cell_i = {c: i for i, c in enumerate(cells)}
    return sorted(df.iter_rows(named=True),
                  key=lambda r: (cell_i.get((r["arch"], r["dataset"]), 1e9), order.get(r["rule"], 1e9)))


def cost_section(cost: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]]) -> Section:
    rows = []
    for r in rows_by_cell_and_rule(cost, rules, cells):
        e95 = fmt(r["epochs_to_95_mean"], 1) + (f" / {r['epochs']}" if r["epochs"] else "")
        params = fmt_big(r["n_params"]) + (f" (+{fmt_big(r['n_rule_params'])})" if r["n_rule_params"] else "")
        rows.append([plots.cell_label(r["arch"], r["dataset"]), r["rule"], fmt_big(r["samples_per_second_mean"]),
                     fmt(r["cost_ratio_vs_bp"], 2) + "×" if r["cost_ratio_vs_bp"] is not None else "—", e95,
                     fmt(r["train_seconds_mean"], 1 if (r["train_seconds_mean"] or 0) >= 10 else 2),
                     fmt_big(r["peak_mem_mb_max"]),
                     fmt(r["mem_ratio_vs_bp"], 2) + "×" if r["mem_ratio_vs_bp"] is not None else "—", params])
    kinds = sorted(set(cost["mem_kind"].drop_nulls())) if cost.height else []
    notes = [("Throughput = training samples per second of the final runs (mean over seeds). Cost vs bp = bp's "
              "throughput / the rule's on the same cell (2.00× = twice as slow). Epochs to 95 % = first epoch at "
              "which a final run's validation accuracy reaches 95 % of its best (mean over seeds) / epochs run. "
              f"Peak memory: {', '.join(kinds) or 'n/a'} (cpu_peak_rss is the process's peak resident memory, an "
              "upper bound that includes the framework). Params: network (+ the rule's own state: feedback "
              "weights, auxiliary heads).")]
    return Section("Cost", header=["cell", "rule", "samples/s", "cost vs bp", "epochs to 95 %", "train s",
                                   "peak MB", "mem vs bp", "params (+rule)"], rows=rows, notes=notes)


def tuning_section(tuning: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]]) -> Section:
    rows = []
    for r in rows_by_cell_and_rule(tuning, rules, cells):
        sel = (f"#{r['best_trial_number']}: {fmt(r['best_val_acc'])}" + (" (pruned)" if r["best_status"] == "pruned"
                                                                         else "")
               if r.get("best_trial_number") is not None else "—")
        rows.append([plots.cell_label(r["arch"], r["dataset"]), r["rule"], str(r["trials"]), str(r["ok"]),
                     str(r["pruned"]), str(r["failed"]), str(r["diverged"]), sel, fmt_hp(r.get("best_hp_json")),
                     (r.get("first_error") or "")[:160]])
    notes = [("Selected trial = the configuration the finals re-ran: fully trained trials before pruned ones, "
              "then the best validation accuracy (the test set is never used to select). Hyperparameters: the "
              "searched ones (the rest are the rule's defaults).")]
    return Section("Tuning", header=["cell", "rule", "trials", "ok", "pruned", "failed", "diverged",
                                     "selected (val acc)", "selected hyperparameters", "first error"],
                   rows=rows, notes=notes)


def data_section(data: pl.DataFrame) -> Section:
    """Images per split that the runs used, per dataset and phase, and any subsampling, in words."""
    rows = []
    for r in data.iter_rows(named=True):
        published = (f"{fmt_big(r['published_train'])} / {fmt_big(r['published_test'])}"
                     if r["published_train"] else "—")
        counts = [fmt_big(r["n_train"]), fmt_big(r["n_val"]), fmt_big(r["n_test"])] if r["n_train"] is not None \
            else ["—"] * 3
        if r["counts_vary"]:
            counts[0] += " (largest; varies between runs)"
        limits = ", ".join(f"{k}={r[k]}" for k in ("train_limit", "test_limit", "val_fraction") if r[k]) or "—"
        rows.append([r["dataset"], r["phase"], str(r["runs"]), *counts, limits, published,
                     f"**{r['subsampled']}**" if r["subsampled"] else "no (the published splits)"])
    notes = [("Counts are the images each run trained on, validated on (held out of the training set by the "
              "run's seed, used for selection and early stopping) and was tested on, from the run tables "
              "(n_train, n_val, n_test; — where the runs' rows do not record them), with the limits "
              "from each run's resolved config. Published = the dataset's official train / test sizes; fewer training "
              "images than that (train + validation) means the runs saw a subsample: a train_limit, or data "
              "files holding only part of the set (such as a 10,000-image MNIST mirror).")]
    if any(r["subsampled"] for r in data.iter_rows(named=True)):
        notes.append("**Subsampled data**: accuracies are not comparable with published full-data numbers.")
    return Section("Data used", header=["dataset", "phase", "runs", "train", "validation", "test", "limits",
                                        "published (train / test)", "subsampled"], rows=rows, notes=notes)


def optuna_section(views: list, notes: list[str]) -> Section:
    """Optuna's optimisation history and parameter importances of each cell's study (``views``:
    :func:`bioplaus.analysis.optuna_figures.all_study_views`'s)."""
    section = Section("Optuna studies", side_by_side=True, notes=[
        ("Each cell's Optuna study (the sweep's optuna.journal), drawn by optuna.visualization: the objective "
         "(best validation accuracy of a trial) per trial with the best so far, and fANOVA parameter "
         "importances (seeded). Explore further with `optuna-dashboard SWEEP_DIR/optuna.journal`."), *notes])
    rows = []
    for v in views:
        section.notes += v.notes
        if v.history is not None:
            section.plots.append(Figure(f"{v.cell}: optimisation history", v.history))
        if v.importances is not None:
            section.plots.append(Figure(f"{v.cell}: parameter importances", v.importances))
        if v.importance_values:
            ranked = sorted(v.importance_values.items(), key=lambda kv: -kv[1])
            rows.append([v.cell, str(v.complete), ", ".join(f"{k} {x:.2f}" for k, x in ranked)])
    if rows:
        section.header, section.rows = ["cell", "complete trials", "parameter importances (fANOVA)"], rows
    return section
