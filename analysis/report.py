"""The sweep report: ``bioplaus report SWEEP_DIR`` (``make report SWEEP_DIR=...``).

Reads a sweep folder (:mod:`bioplaus.analysis.load`), computes the tables (:mod:`bioplaus.analysis.tables`),
the interactive figures (:mod:`bioplaus.analysis.figures`, plotly), their static twins
(:mod:`bioplaus.analysis.plots`) and Optuna's views of each cell's study
(:mod:`bioplaus.analysis.optuna_figures`), and writes, under ``SWEEP_DIR/report/``:

* ``index.html`` - one self-contained file (CSS, any PNG, and plotly.js with the figures' data
  gzip-compressed, inline): opens offline;
* ``report.md``  - the same tables in Markdown, the static figures linked from ``plots/``;
* ``tables/*.parquet`` - every table, tidy, for further queries (README "Querying results");
* ``plots/*.png`` - the static figures.

A short summary (the main table and the ranking) is returned for the terminal. Nothing here needs the
sweep to be complete: a sweep still tuning gets its tuning table and "no result" cells.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from bioplaus.analysis import figures, optuna_figures, plots, tables
from bioplaus.analysis.brain_report import brain_part
from bioplaus.analysis.criteria_report import criteria_section, criteria_table
from bioplaus.analysis.load import SweepData, load_sweep
from bioplaus.analysis.report_format import Cell, Figure, Section, md_table, text_of
from bioplaus.analysis.report_budget import budget_part, open_compare
from bioplaus.analysis.report_estimate import estimate_section
from bioplaus.analysis.report_render import render_html, render_markdown
from bioplaus.analysis.report_sections import (cost_section, data_section,
                                               main_section, optuna_section, rank_section, tuning_section)


@dataclass
class Report:
    dir: Path
    html: Path
    markdown: Path
    tables: dict[str, Path]
    figures: dict[str, Path]
    summary: str
    notes: list[str]
    seconds: float


@dataclass
class SweepTables:
    """Every table the report shows, and the order it lays rules and cells out in."""

    cells_df: pl.DataFrame
    main: pl.DataFrame
    ranks: pl.DataFrame
    cost: pl.DataFrame
    criteria: pl.DataFrame
    criteria_error: str | None
    tuning: pl.DataFrame
    data: pl.DataFrame
    rules: list[str]
    cells: list[tuple[str, str]]

    def saved(self) -> dict[str, pl.DataFrame]:
        return {"cells": self.cells_df, "main": self.main, "ranks": self.ranks, "cost": self.cost,
                "criteria": self.criteria, "tuning": self.tuning, "data": self.data}


def compute_tables(d: SweepData) -> SweepTables:
    cells_df = tables.cells_table(d)
    main = tables.main_table(d, cells_df)
    archs, datasets = tables.sweep_order(d, cells_df)
    cells = [(a, x) for x in datasets for a in archs
             if cells_df.filter((pl.col("arch") == a) & (pl.col("dataset") == x)).height]
    rules = tables.rule_order(main)
    crit, crit_error = criteria_table(d, rules)
    return SweepTables(cells_df, main, tables.rank_table(main), tables.cost_table(d, main), crit, crit_error,
                       tables.tuning_table(d, cells_df), tables.data_table(d), rules, cells)


def _config_json(d: SweepData) -> str | None:
    if d.manifest is None:
        return None
    return d.manifest.collect().row(0, named=True).get("config_json")


def sweep_meta(d: SweepData, cells: pl.DataFrame) -> list[tuple[str, str]]:
    # as the user gave it: the same command regenerates the same page wherever the checkout lies
    meta: list[tuple[str, str]] = [("sweep folder", str(d.dir))]
    if d.manifest is not None:
        m = d.manifest.collect().row(0, named=True)
        try:
            cfg = json.loads(m.get("config_json") or "{}")
        except ValueError:
            cfg = {}
        when = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if t else "—"
        budget = cfg.get("budget", {})
        meta += [("status", str(m.get("status"))), ("started / finished",
                                                    f"{when(m.get('started_at'))} / {when(m.get('finished_at'))}"),
                 ("preset", str(cfg.get("preset"))),
                 ("budget", (f"{budget.get('trials')} trials × ≤ {budget.get('epochs')} epochs per cell; finals: "
                             f"{budget.get('final_seeds')} seeds × "
                             f"{budget.get('final_epochs') or budget.get('epochs')} epochs")),
                 ("code", f"bioplaus {m.get('bioplaus_version')}, git {m.get('git_commit')}"),
                 ("versions", ", ".join(f"{k} {m.get(k)}" for k in ("python", "torch", "ray", "optuna", "polars")
                                        if m.get(k)))]
    n_sup = int(cells["supported"].sum())
    meta.append(("cells", f"{n_sup} run, {cells.height - n_sup} unsupported"))
    counts = []
    for name, lf in (("tuning trials", d.trials), ("final runs", d.final_runs)):
        counts.append(f"{lf.select(pl.len()).collect().item() if lf is not None else 0} {name}")
    meta.append(("runs", ", ".join(counts)))
    return meta


def sweep_notes(d: SweepData, t: SweepTables) -> list[str]:
    """Warnings shown at the top: a registry that did not load, an unfinished sweep, cells without results."""
    notes = [t.criteria_error] if t.criteria_error else []
    if d.manifest is not None:
        status = d.manifest.select("status").collect().item(0, 0)
        if status != "complete":
            notes.append(f"The sweep's manifest says status={status!r}: results may be incomplete.")
    if t.main.filter(pl.col("status") == "no finals").height:
        notes.append("Some supported cells have no final results yet (marked 'no result').")
    if t.data.filter(pl.col("subsampled").is_not_null()).height:
        notes.append("Some runs used a subsample of their dataset: see 'Data used'.")
    return notes


def draw_figures(d: SweepData, t: SweepTables, colors: dict, out: Path) -> dict[str, Figure]:
    """The three cross-cell figures, interactive with a static PNG for the Markdown report."""
    epochs = d.epochs.collect() if d.epochs is not None else None
    trials = d.trials.select("rule", "arch", "dataset", "trial_number", "run_id").collect() \
        if d.trials is not None else None
    curves = plots.curve_table(epochs, trials, t.tuning)
    png = out / "plots"
    return {
        "heatmap": Figure("accuracy heatmap", figures.accuracy_heatmap(t.main, t.rules, t.cells),
                          plots.accuracy_heatmap(t.main, t.rules, t.cells, png / "accuracy_heatmap.png")),
        "cost": Figure("accuracy vs cost", figures.accuracy_vs_cost(t.main, t.cost, t.cells, colors),
                       plots.accuracy_vs_cost(t.main, t.cost, t.cells, colors, png / "accuracy_vs_cost.png")),
        "curves": Figure("learning curves", figures.learning_curves(curves, t.cells, t.rules, colors),
                         plots.learning_curves(curves, t.cells, t.rules, colors, png / "learning_curves.png")),
    }


def build_sections(d: SweepData, t: SweepTables, figs: dict[str, Figure], brain_secs: list[Section]) -> list[Section]:
    main_sec = main_section(t.main, t.rules, t.cells)
    main_sec.plots = [figs["heatmap"]]
    cost_sec = cost_section(t.cost, t.rules, t.cells)
    cost_sec.plots = [figs["cost"]]
    cell_keys = [f"{r['rule']}.{r['arch']}.{r['dataset']}" for r in t.tuning.iter_rows(named=True) if r["trials"]]
    views, optuna_notes = optuna_figures.all_study_views(d.dir, _config_json(d), cell_keys)
    sections = [main_sec, data_section(t.data), rank_section(t.ranks), cost_sec,
                criteria_section(t.criteria, t.rules, t.criteria_error), tuning_section(t.tuning, t.rules, t.cells),
                Section("Learning curves", plots=[figs["curves"]]), optuna_section(views, optuna_notes)]
    estimate_sec = estimate_section(d)
    return sections + ([estimate_sec] if estimate_sec is not None else []) + brain_secs


def terminal_summary(name: str, main_sec: Section, rank_sec: Section, out: Path) -> str:
    plain = lambda rows: [[Cell(text_of(v).replace("**", "*").replace("\n", " ")) for v in r] for r in rows]
    return "\n".join([f"sweep {name}: final test accuracy (mean ± 95 % CI half-width; *best*; (gap to bp))",
                      md_table(main_sec.header, plain(main_sec.rows)), "", "ranking across cells:",
                      md_table(rank_sec.header, rank_sec.rows), "", f"report: {out / 'index.html'}",
                      f"         {out / 'report.md'}; tables: {out / 'tables'}/*.parquet"])


def build_report(sweep_dir: str | Path, out: str | Path | None = None, compare: str | Path | None = None) -> Report:
    """Compute every table and figure of a sweep folder and write the report; returns where it went.
    ``compare``: a sweep of the other budget kind over the same cells (analysis/report_budget.py)."""
    tick = time.perf_counter()
    d = load_sweep(sweep_dir)
    other = open_compare(d, compare)
    out = Path(out) if out else d.dir / "report"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    t = compute_tables(d)
    notes = sweep_notes(d, t)
    colors = plots.rule_colors(t.rules)
    brain_secs, brain_tables, brain_notes = brain_part(d, out, colors)
    notes += brain_notes
    budget = budget_part(d, t.main, other, t.rules, t.cells, colors, out)
    notes += budget.notes
    saved = t.saved() | budget.tables | brain_tables
    paths = {name: out / "tables" / f"{name}.parquet" for name in saved}
    for name, df in saved.items():
        df.write_parquet(paths[name])

    figs = draw_figures(d, t, colors, out)
    sections = build_sections(d, t, figs, brain_secs)
    at = next((i + 1 for i, s in enumerate(sections) if s.title == "Cost"), len(sections))
    sections[at:at] = budget.sections  # the budget views and the rank test follow the cost table
    pngs = {k: f.png for k, f in figs.items()} | budget.pngs
    pngs.update({f"brain{i}": p for i, (_, p) in enumerate(f for s in brain_secs for f in s.figures)})
    title = f"bioplaus sweep report: {d.name}"
    meta = sweep_meta(d, t.cells_df)
    meta.append(("generated", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    html_path, md_path = out / "index.html", out / "report.md"
    html_path.write_text(render_html(title, meta, notes, sections, out), encoding="utf-8")
    md_path.write_text(render_markdown(title, meta, notes, sections, out), encoding="utf-8")
    summary = terminal_summary(d.name, sections[0], sections[2], out)
    return Report(out, html_path, md_path, paths, pngs, summary, notes, time.perf_counter() - tick)
