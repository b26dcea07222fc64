"""The sweep report: ``bioplaus report SWEEP_DIR`` (``make report SWEEP_DIR=...``).

Reads a sweep folder (:mod:`bioplaus.analysis.load`), computes the tables (:mod:`bioplaus.analysis.tables`) and figures
(:mod:`bioplaus.analysis.plots`) and writes, under ``SWEEP_DIR/report/``:

* ``index.html`` - self-contained (CSS inline, figures embedded as data URIs, each linking its PNG);
* ``report.md``  - the same tables in Markdown, figures linked from ``plots/``;
* ``tables/*.parquet`` - every table, tidy, for further queries (README "Querying results");
* ``plots/*.png`` - the figures.

A short summary (the main table and the ranking) is returned for the terminal. Nothing here needs the
sweep to be complete: a sweep still tuning gets its tuning table and "no result" cells.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from bioplaus.analysis import plots, tables
from bioplaus.analysis.load import SweepData, load_sweep
from bioplaus.orchestrator.errors import one_line

Value = "str | Cell"


@dataclass
class Cell:
    """A table cell: its text (``**x**`` = emphasis) and an optional tooltip (HTML only)."""

    text: str
    title: str | None = None


@dataclass
class Section:
    title: str
    intro: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    details: list[tuple[str, list[str], list[list]]] = field(default_factory=list)  # (summary, header, rows), folded
    css_class: str = ""


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


# --- formatting ---------------------------------------------------------------------------------------
def fmt(x, digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_big(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:,.0f}"


def fmt_hp(hp_json: str | None) -> str:
    if not hp_json:
        return "—"
    try:
        hp = json.loads(hp_json)
    except ValueError:
        return hp_json
    items = (f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(hp.items()))
    return ", ".join(items) or "defaults"


def short_test(node_id: str | None) -> str:
    return (node_id or "—").split("::")[-1]


def _text(v) -> str:
    return v.text if isinstance(v, Cell) else str(v)


def md_table(header: list[str], rows: list[list]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    body = [[esc(_text(v)) for v in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def _html_text(s: str) -> str:
    out = html.escape(s)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return out.replace("\n", "<br>")


def html_table(header: list[str], rows: list[list], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r in rows:
        tds = []
        for v in r:
            title = f' title="{html.escape(v.title)}"' if isinstance(v, Cell) and v.title else ""
            tds.append(f"<td{title}>{_html_text(_text(v))}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    cls = f' class="{css_class}"' if css_class else ""
    return f'<table{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


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


def cost_section(cost: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]]) -> Section:
    order = {r: i for i, r in enumerate(rules)}
    cell_i = {c: i for i, c in enumerate(cells)}
    rows = []
    for r in sorted(cost.iter_rows(named=True),
                    key=lambda r: (cell_i.get((r["arch"], r["dataset"]), 1e9), order.get(r["rule"], 1e9))):
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


def criteria_section(crit: pl.DataFrame, rules: list[str], error: str | None) -> Section:
    from_registry = crit.filter(pl.col("criterion").is_not_null())
    codes = sorted(set(from_registry["criterion"])) if from_registry.height else []
    lookup = {(r["rule"], r["criterion"]): r for r in from_registry.iter_rows(named=True)}
    summaries = {r["rule"]: r["summary"] for r in crit.iter_rows(named=True)}
    rows = []
    for rule in rules:
        row = [Cell(rule, summaries.get(rule))]
        for code in codes:
            r = lookup.get((rule, code))
            row.append(Cell(("✓ " if r["holds"] else "✗ ") + short_test(r["test"]),
                            f"{r['why']} — proved by {r['test']}") if r else Cell("not declared"))
        rows.append(row)
    texts = {r["criterion"]: r["criterion_text"] for r in from_registry.iter_rows(named=True)}
    notes = [f"{c}: {texts.get(c)}" for c in codes]
    notes.insert(0, "✓ = the rule satisfies the criterion, ✗ = it does not, as each rule declares it; every claim "
                    "names the pytest test that proves it (full node ids and reasons below, and in "
                    "tables/criteria.parquet).")
    if error:
        notes.insert(0, f"**{error}**")
    details = [("What each rule does", ["rule", "summary"], [[r, summaries.get(r) or "—"] for r in rules]),
               ("All claims with their reasons and tests", ["rule", "criterion", "holds", "why", "test"],
                [[r["rule"], r["criterion"], "yes" if r["holds"] else "no", r["why"], r["test"]]
                 for r in from_registry.iter_rows(named=True)])]
    return Section("Plausibility criteria", header=["rule", *codes], rows=rows, notes=notes,
                   details=details, css_class="criteria")


def tuning_section(tuning: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]]) -> Section:
    order = {r: i for i, r in enumerate(rules)}
    cell_i = {c: i for i, c in enumerate(cells)}
    rows = []
    for r in sorted(tuning.iter_rows(named=True),
                    key=lambda r: (cell_i.get((r["arch"], r["dataset"]), 1e9), order.get(r["rule"], 1e9))):
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


def frame_rows(df: pl.DataFrame) -> list[list[str]]:
    """Any table as display strings (floats to 3 decimals)."""
    return [[fmt(v) if isinstance(v, float) else "—" if v is None else str(v) for v in row] for row in df.iter_rows()]


BRAIN_NOTE = ("Similarity of each network's most brain-like layer with the target's representational dissimilarity "
              "matrix (bracketed or ci_low/ci_high: 95 % bootstrap CI over stimuli); the noise ceiling bounds what "
              "any model could reach given the brain data's noise. Every layer's value is in the sweep's brain/ "
              "table; this summary is in tables/brain_best.parquet.")


def brain_part(d: SweepData, out: Path, colors: dict) -> tuple[Section | None, pl.DataFrame | None, list[str]]:
    """The brain-similarity section, from the brain step's own summary and figure (bioplaus.analysis.brain) when
    they run on this table, else a generic best-layer view of whatever the table holds."""
    if d.brain is None:
        return None, None, []
    df = d.brain.collect()
    notes = []
    try:
        from bioplaus.analysis.brain import brain_summary, plot_brain

        methods = sorted(set(df["method"].drop_nulls())) if "method" in df.columns else []
        method = "spearman" if "spearman" in methods or not methods else methods[0]
        present = set(df["target"].drop_nulls())
        targets = [t for t in ("human_it_mean", "monkey_it") if t in present] or sorted(present)[:2]
        if not targets:
            raise ValueError("no target values")
        summaries, figures = [], []
        for t in targets:
            summaries.append(brain_summary(df, target=t, method=method).with_columns(
                target=pl.lit(t), method=pl.lit(method)))
            figures.append((f"brain similarity vs {t}", plot_brain(df, out / "plots" / f"brain_{t}.png",
                                                                    target=t, method=method)))
        table = pl.concat(summaries, how="diagonal_relaxed")
        table = table.select("target", "method", pl.exclude("target", "method"))
        if not table.height:
            raise ValueError("the summary is empty")
    except Exception as e:  # noqa: BLE001  (the brain step's helpers missing or not matching this table)
        table, why = tables.brain_table(d)
        if table is None:
            return None, None, [why] if why else []
        notes.append(f"brain section: generic best-layer view ({one_line(e)})")
        roles = tables.brain_columns(df)
        png = plots.brain_figure(table, roles, colors, out / "plots" / "brain_similarity.png")
        figures = [("brain similarity", png)]
    section = Section("Brain similarity", header=list(table.columns), rows=frame_rows(table), notes=[BRAIN_NOTE],
                      figures=figures)
    return section, table, notes


# --- the report -------------------------------------------------------------------------------------------
def sweep_meta(d: SweepData, cells: pl.DataFrame) -> list[tuple[str, str]]:
    meta: list[tuple[str, str]] = [("sweep folder", str(d.dir.resolve()))]
    if d.manifest is not None:
        m = d.manifest.collect().row(0, named=True)
        cfg = {}
        try:
            cfg = json.loads(m.get("config_json") or "{}")
        except ValueError:
            pass
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


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.86rem}
th,td{border:1px solid #d6d6d6;padding:.25rem .5rem;vertical-align:top;text-align:left}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
td[title]{cursor:help}strong{color:#8b0000}
.meta td:first-child{font-weight:600;white-space:nowrap}
.note{color:#555;font-size:.84rem;margin:.25rem 0}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
.warning{background:#fff3cd;border:1px solid #e0c060;padding:.5rem .8rem}
#broken-images{display:none;background:#f8d7da;border:1px solid #d08080;padding:.5rem .8rem}
table.criteria td{white-space:nowrap;font-size:.8rem}.scroll{overflow-x:auto}
details{margin:.5rem 0}summary{cursor:pointer;color:#333}
"""

# Marks the page with how many images decoded (and shows a banner if any did not): a reader sees a
# broken report at once, and the headless-browser test reads the same marks.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-images-ok', String(imgs.length - bad.length));
  document.body.setAttribute('data-images-broken', String(bad.length));
  if (bad.length) {
    var b = document.getElementById('broken-images');
    b.textContent = bad.length + ' figure(s) failed to load: ' + bad.map(function (i) { return i.alt; }).join(', ');
    b.style.display = 'block';
  }
});
"""


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def render_html(title: str, meta: list[tuple[str, str]], notes: list[str], sections: list[Section], out: Path) -> str:
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
              f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
              f"<style>{_CSS}</style></head><body>"),
             f"<h1>{html.escape(title)}</h1>", "<div id='broken-images'></div>",
             "<table class='meta'>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                              for k, v in meta) + "</table>"]
    parts += [f"<p class='warning'>{_html_text(n)}</p>" for n in notes]
    parts.append("<p>" + " · ".join(f"<a href='#{_slug(s.title)}'>{html.escape(s.title)}</a>" for s in sections)
                 + "</p>")
    for s in sections:
        parts.append(f"<h2 id='{_slug(s.title)}'>{html.escape(s.title)}</h2>")
        if s.intro:
            parts.append(f"<p>{_html_text(s.intro)}</p>")
        if s.header:
            parts.append(f"<div class='scroll'>{html_table(s.header, s.rows, s.css_class)}</div>" if s.rows
                         else "<p class='note'>(no rows)</p>")
        parts += [f"<p class='note'>{_html_text(n)}</p>" for n in s.notes]
        for summary, header, rows in s.details:
            if rows:
                parts.append(f"<details><summary>{html.escape(summary)}</summary>"
                             f"<div class='scroll'>{html_table(header, rows)}</div></details>")
        for alt, png in s.figures:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            rel = png.relative_to(out).as_posix()
            parts.append(f"<a href='{html.escape(rel)}'><img alt='{html.escape(alt)}' "
                         f"src='data:image/png;base64,{data}'></a>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def render_markdown(title: str, meta: list[tuple[str, str]], notes: list[str], sections: list[Section],
                    out: Path) -> str:
    parts = [f"# {title}", "", *(f"- **{k}**: {v}" for k, v in meta), ""]
    parts += [f"> {n}\n" for n in notes]
    for s in sections:
        parts += [f"## {s.title}", ""]
        if s.intro:
            parts += [s.intro, ""]
        if s.header:
            parts += [md_table(s.header, s.rows) if s.rows else "(no rows)", ""]
        parts += [*(f"{n}\n" for n in s.notes)]
        for summary, header, rows in s.details:
            if rows:
                parts += [f"<details><summary>{summary}</summary>", "", md_table(header, rows), "", "</details>", ""]
        parts += [f"![{alt}]({png.relative_to(out).as_posix()})\n" for alt, png in s.figures]
    return "\n".join(parts)


def terminal_summary(name: str, main_sec: Section, rank_sec: Section, out: Path) -> str:
    plain = lambda rows: [[Cell(_text(v).replace("**", "*").replace("\n", " ")) for v in r] for r in rows]
    return "\n".join([f"sweep {name}: final test accuracy (mean ± 95 % CI half-width; *best*; (gap to bp))",
                      md_table(main_sec.header, plain(main_sec.rows)), "", "ranking across cells:",
                      md_table(rank_sec.header, rank_sec.rows), "", f"report: {out / 'index.html'}",
                      f"         {out / 'report.md'}; tables: {out / 'tables'}/*.parquet"])


def build_report(sweep_dir: str | Path, out: str | Path | None = None) -> Report:
    """Compute every table and figure of a sweep folder and write the report; returns where it went."""
    tick = time.perf_counter()
    d = load_sweep(sweep_dir)
    out = Path(out) if out else d.dir / "report"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    cells_df = tables.cells_table(d)
    main = tables.main_table(d, cells_df)
    archs, datasets = tables.sweep_order(d, cells_df)
    cells = [(a, x) for x in datasets for a in archs
             if cells_df.filter((pl.col("arch") == a) & (pl.col("dataset") == x)).height]
    rules = tables.rule_order(main)
    ranks = tables.rank_table(main)
    cost = tables.cost_table(d, main)
    crit, crit_error = tables.criteria_table(rules)
    tuning = tables.tuning_table(d, cells_df)
    if crit_error:
        notes.append(crit_error)
    if d.manifest is not None:
        status = d.manifest.select("status").collect().item(0, 0)
        if status != "complete":
            notes.append(f"The sweep's manifest says status={status!r}: results may be incomplete.")
    if main.filter(pl.col("status") == "no finals").height:
        notes.append("Some supported cells have no final results yet (marked 'no result').")

    colors = plots.rule_colors(rules)
    brain_sec, brain, brain_notes = brain_part(d, out, colors)
    notes += brain_notes
    saved = {"cells": cells_df, "main": main, "ranks": ranks, "cost": cost, "criteria": crit, "tuning": tuning}
    if brain is not None:
        saved["brain_best"] = brain
    paths = {}
    for name, df in saved.items():
        paths[name] = out / "tables" / f"{name}.parquet"
        df.write_parquet(paths[name])

    epochs = d.epochs.filter(pl.col("phase") == "final").collect() if d.epochs is not None else None
    figs = {"heatmap": plots.accuracy_heatmap(main, rules, cells, out / "plots" / "accuracy_heatmap.png"),
            "cost": plots.accuracy_vs_cost(main, cost, cells, colors, out / "plots" / "accuracy_vs_cost.png"),
            "curves": plots.learning_curves(epochs, cells, rules, colors, out / "plots" / "learning_curves.png")}

    main_sec = main_section(main, rules, cells)
    main_sec.figures = [("accuracy heatmap", figs["heatmap"])]
    rank_sec = rank_section(ranks)
    cost_sec = cost_section(cost, rules, cells)
    cost_sec.figures = [("accuracy vs cost", figs["cost"])]
    sections = [main_sec, rank_sec, cost_sec, criteria_section(crit, rules, crit_error),
                tuning_section(tuning, rules, cells),
                Section("Learning curves", figures=[("learning curves", figs["curves"])])]
    if brain_sec is not None:
        sections.append(brain_sec)
        figs.update({f"brain{i}": p for i, (_, p) in enumerate(brain_sec.figures)})

    title = f"bioplaus sweep report: {d.name}"
    meta = sweep_meta(d, cells_df)
    meta.append(("generated", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    html_path, md_path = out / "index.html", out / "report.md"
    html_path.write_text(render_html(title, meta, notes, sections, out), encoding="utf-8")
    md_path.write_text(render_markdown(title, meta, notes, sections, out), encoding="utf-8")
    return Report(out, html_path, md_path, paths, figs, terminal_summary(d.name, main_sec, rank_sec, out), notes,
                  time.perf_counter() - tick)
