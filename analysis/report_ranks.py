"""The report's rank-test section: the Friedman/Nemenyi test of :mod:`bioplaus.analysis.rank_stats` in each of its
scopes (every rule on the cells they all share; every cell with the rules that have results on all of them), each
with its critical-difference diagram, a sentence saying which rules and cells it covers and which it leaves out
and why (the sweep's ``cells.parquet`` reasons), and the pairs it resolves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from bioplaus.analysis.plots import cell_label
from bioplaus.analysis.rank_stats import ALL_CELLS, BLOCK, CELL, RankTest, cd_diagram, rank_tests, rules_of
from bioplaus.analysis.report_format import Section, fmt

# the diagram's file per scope; the first scope (every rule) gets the plain name, the default
DIAGRAM_FILE = {ALL_CELLS: "critical_difference_all_cells"}
NO_RESULT = "no final result: failed or missing run"


@dataclass
class RankPart:
    """The rank-test section with the tables (one row per scope and rule / pair) and diagrams behind it."""

    section: Section
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    pngs: dict[str, Path] = field(default_factory=dict)


def rank_part(final_runs: pl.DataFrame, cells: pl.DataFrame, order: list[tuple[str, str]], out: Path,
              view: str = "") -> RankPart:
    """Every scope's rank test on ``final_runs``, described against the sweep's ``cells`` (supported or not, with
    reasons) in the report's cell ``order``. ``view``: the budget view of a compared sweep, which names its own
    section, diagrams and tables (``rank_test_<view>``) beside the main sweep's."""
    tests = rank_tests(final_runs)
    tag = f"_{view}" if view else ""
    diagrams = [cd_diagram(t, out / "plots" / f"{DIAGRAM_FILE.get(t.scope, 'critical_difference')}{tag}.png")
                for t in tests]
    reasons = {(r["rule"], r["arch"], r["dataset"]): r["reason"] or "not supported"
               for r in cells.filter(~pl.col("supported")).iter_rows(named=True)} if cells.height else {}
    section = rank_test_section(tests, diagrams, reasons, order)
    if view:
        section.title = f"{section.title}: equal {view}"
    tables = {f"rank_test{tag}": pl.concat([t.rules.select(pl.lit(t.scope).alias("scope"), pl.all()) for t in tests]),
              f"rank_test_pairs{tag}": pl.concat([t.pairs.select(pl.lit(t.scope).alias("scope"), pl.all())
                                                 for t in tests])}
    return RankPart(section, tables, {png.stem: png for png in diagrams if png})


def _cells_of(blocks: pl.DataFrame, order: list[tuple[str, str]]) -> list[tuple[str, str]]:
    at = {c: i for i, c in enumerate(order)}
    return sorted(set(blocks.select(CELL).iter_rows()), key=lambda c: (at.get(c, len(at)), c))


def _where(rows: pl.DataFrame, available: pl.DataFrame, order: list[tuple[str, str]]) -> list[tuple[tuple, str]]:
    """``rows`` (blocks) by cell: the cell's label, with the seeds when not all of the cell's blocks are there."""
    out = []
    for cell in _cells_of(rows, order):
        seeds = sorted(rows.filter(pl.col("arch") == cell[0], pl.col("dataset") == cell[1])["seed"])
        every = available.filter(pl.col("arch") == cell[0], pl.col("dataset") == cell[1]).height
        out.append((cell, cell_label(*cell) + ("" if len(seeds) == every else
                                               " seed" + "s" * (len(seeds) > 1) + " " + ", ".join(map(str, seeds)))))
    return out


def _gaps(test: RankTest, rule: str, reasons: dict, order: list[tuple[str, str]]) -> str:
    """Where ``rule`` has no result, grouped by why (the sweep's reason for an unsupported cell)."""
    by_reason: dict[str, list[str]] = {}
    for cell, label in _where(test.available.filter(pl.col(rule).is_null()), test.available, order):
        whole = label == cell_label(*cell)
        by_reason.setdefault(reasons.get((rule, *cell), NO_RESULT) if whole else NO_RESULT, []).append(label)
    return " and ".join(f"{', '.join(labels)} ({why})" for why, labels in by_reason.items())


def _count(some: list, every: list, noun: str) -> str:
    return f"all {len(every)} {noun}" if len(some) == len(every) else f"{len(some)} of {len(every)} {noun}"


def coverage(test: RankTest, reasons: dict, order: list[tuple[str, str]]) -> str:
    """One sentence: the rules and cells ``test`` covers, the blocks and rules it leaves out, and why."""
    available, blocks = test.available, test.blocks
    if available.is_empty() or blocks.width == 0:
        return ""
    every, tested = rules_of(available), rules_of(blocks)
    cells = [cell_label(*c) for c in _cells_of(blocks, order)]
    text = [f"Covers {_count(tested, every, 'rules')} ({', '.join(tested)}) on "
            f"{_count(cells, _cells_of(available, order), 'cells')} ({', '.join(cells)}): {blocks.height} of "
            f"{available.height} (cell, seed) blocks."]
    out_blocks = available.join(blocks.select(BLOCK), on=BLOCK, how="anti")
    blamed = [r for r in tested if out_blocks.height and out_blocks[r].null_count()]
    if out_blocks.height:
        text.append(f"Leaves out {out_blocks.height} blocks ({', '.join(label for _, label in _where(out_blocks, available, order))}), "
                    f"where {' or '.join(blamed)} has no result.")
    left_out = [r for r in every if r not in tested]
    if left_out:
        text.append(f"Leaves out {', '.join(left_out)}: no result on some of these cells.")
    why = [f"{r} has none on {_gaps(test, r, reasons, order)}" for r in [*left_out, *blamed]]
    return " ".join(text + ([f"Why: {'; '.join(why)}."] if why else []))


def resolved(test: RankTest) -> str:
    """Which pairs the test resolves, grouped by the better rule (best first)."""
    if not test.test:
        return ""
    pairs = test.pairs.filter(pl.col("resolved"))
    nemenyi = test.critical_difference is not None  # else two rules: Wilcoxon's test, no omnibus test first
    by = (f"mean ranks further apart than the critical difference {fmt(test.critical_difference, 2)}" if nemenyi
          else f"Wilcoxon p < {test.alpha}")
    if pairs.is_empty():
        why = (by.replace("further apart than", "no two further apart than") if test.significant
               else f"{'Friedman' if nemenyi else 'Wilcoxon'} does not reject")
        return f"Resolved pairs ({test.scope}): none ({why})."
    rank = dict(test.rules.select("rule", "mean_rank").iter_rows())
    worse: dict[str, list[str]] = {}
    for p in pairs.iter_rows(named=True):
        worse.setdefault(p["better"], []).append(p["rule_b"] if p["better"] == p["rule_a"] else p["rule_a"])
    groups = [f"{b} ranks better than {', '.join(sorted(w, key=lambda r: (rank[r], r)))}"
              for b, w in sorted(worse.items(), key=lambda bw: (rank[bw[0]], bw[0]))]
    return f"Resolved pairs ({test.scope}; {by}): {'; '.join(groups)}."


def _head(test: RankTest, scoped: bool) -> str:
    prefix = f"{test.scope}: " if scoped else ""
    if not test.test:
        return f"{prefix}the rank test was not run."
    cd = f", critical difference {fmt(test.critical_difference, 2)}" if test.critical_difference is not None else ""
    p = f"{test.p_value:.3g}" if test.p_value is not None and math.isfinite(test.p_value) else "—"
    return (f"{prefix}{test.test}: {test.n_blocks} (cell, seed) blocks, {test.rules.height} rules, p = {p}{cd}, "
            f"alpha {test.alpha}.")


def _rows(tests: list[RankTest]) -> list[list[str]]:
    order = list(dict.fromkeys(r for t in tests for r in t.rules["rule"]))
    by_test = [{r["rule"]: r for r in t.rules.iter_rows(named=True)} for t in tests]
    return [[rule, *(x for rows in by_test for x in ([fmt(rows[rule]["mean_rank"], 2), fmt(rows[rule]["median_acc"]),
                                                       str(rows[rule]["n_blocks"])] if rule in rows else ["—"] * 3))]
            for rule in order]


def _pairs(test: RankTest) -> list[list[str]]:
    return [[p["rule_a"], p["rule_b"], fmt(p["rank_difference"], 2),
             fmt(p["critical_difference"], 2) if p["critical_difference"] is not None else f"p = {fmt(p['p_value'], 4)}",
             f"yes: {p['better']} ranks better" if p["resolved"] else "no"] for p in test.pairs.iter_rows(named=True)]


def rank_test_section(tests: list[RankTest], diagrams: list[Path | None], reasons: dict | None = None,
                      order: list[tuple[str, str]] | None = None) -> Section:
    scoped = len(tests) > 1
    notes = []
    for t in tests:
        notes += [s for s in (_head(t, scoped), coverage(t, reasons or {}, order or []), resolved(t)) if s] + t.notes
    notes.append("Each block is one cell and one final seed; the rules are ranked by test accuracy within it (1 = "
                 "best) and the ranks averaged. Friedman's test asks whether the mean ranks differ at all; only if it "
                 "rejects are pairs compared (Nemenyi: resolved when the mean ranks differ by more than the critical "
                 "difference; two rules: Wilcoxon's signed-rank test). Computed by autorank.")
    suffix = [f" ({t.scope})" if scoped else "" for t in tests]
    header = ["rule", *(f"{h}{s}" for s in suffix for h in ("mean rank", "median test acc", "blocks"))]
    rows = _rows(tests)
    intro = ("Some rules have no results on some cells, so there are two tests: the first keeps every rule and only "
             "the cells they all have results on; the second keeps every cell and only the rules with results on all "
             "of them.") if scoped else ""
    alt = "critical-difference diagram"
    return Section("Rank test across cells (Friedman, Nemenyi)", intro=intro, header=header if rows else [], rows=rows,
                   notes=notes, figures=[(f"{alt}: {t.scope}" if scoped else alt, png)
                                         for t, png in zip(tests, diagrams) if png],
                   details=[(f"Pairwise differences{s}: which are resolved", ["rule", "rule", "mean-rank difference",
                                                                           "critical difference", "resolved"], _pairs(t))
                            for t, s in zip(tests, suffix) if not t.pairs.is_empty()])
