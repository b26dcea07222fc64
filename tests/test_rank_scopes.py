"""The rank test's two scopes (analysis/rank_stats.py, analysis/report_ranks.py): where a rule has no results
on some cells, the first test keeps every rule on the cells they all share, and a second keeps every cell with
the rules that have results on all of them; both reach the report's tables, diagrams and text.

Planted table, no training: 2 archs x 2 datasets x 3 seeds = 12 (cell, seed) blocks; a > d > b > c by 0.1 in
every block (noise 0.01), and d has no cnn cells (excluded, with a reason, as a sweep's exclude= would).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bioplaus.analysis.rank_stats import ALL_CELLS, ALL_RULES, rank_tests
from bioplaus.analysis.report_ranks import rank_part, resolved

MEANS = {"a": 0.9, "d": 0.8, "b": 0.7, "c": 0.6}
CELLS = [(arch, dataset) for dataset in ("x1", "x2") for arch in ("mlp", "cnn")]
REASON = "excluded by the sweep's exclude=d.cnn.*: too slow here"


def _runs(gaps: dict[str, set[str]]) -> pl.DataFrame:
    """Final runs of MEANS' rules on CELLS x 3 seeds; ``gaps``: the archs a rule has no cells on."""
    rng = np.random.default_rng(0)
    return pl.DataFrame([{"rule": rule, "arch": arch, "dataset": dataset, "seed": 1000 + s, "status": "ok",
                          "test_acc": mu + 0.01 * rng.standard_normal()}
                         for arch, dataset in CELLS for s in range(3) for rule, mu in MEANS.items()
                         if arch not in gaps.get(rule, set())])


def _cells() -> pl.DataFrame:
    return pl.DataFrame([{"rule": r, "arch": a, "dataset": x, "supported": not (r == "d" and a == "cnn"),
                          "reason": REASON if r == "d" and a == "cnn" else None} for r in MEANS for a, x in CELLS])


def _ranks(test) -> dict[str, float]:
    return dict(test.rules.select("rule", "mean_rank").iter_rows())


def _resolved(test) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for p in test.pairs.filter(pl.col("resolved")).select("rule_a", "rule_b").iter_rows()}


def test_a_rule_missing_cells_gets_a_second_test_over_every_cell():
    first, second = rank_tests(_runs({"d": {"cnn"}}))
    assert first.scope == ALL_RULES and second.scope == ALL_CELLS
    # The first: every rule, only the 6 mlp blocks. CD (k=4, N=6) = 1.91: a (1) vs b (3) and c (4), d (2) vs c.
    assert first.n_blocks == 6 and set(first.blocks["arch"]) == {"mlp"}
    assert _ranks(first) == {"a": 1.0, "d": 2.0, "b": 3.0, "c": 4.0}
    assert _resolved(first) == {("a", "b"), ("a", "c"), ("c", "d")}
    # The second: every block of every cell, without d. CD (k=3, N=12) = 0.96: every pair is resolved.
    assert second.n_blocks == 12 and set(second.blocks.select("arch", "dataset").iter_rows()) == set(CELLS)
    assert _ranks(second) == {"a": 1.0, "b": 2.0, "c": 3.0} and second.significant
    assert _resolved(second) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert second.critical_difference == pytest.approx(2.343 * (3 * 4 / (6 * 12)) ** 0.5, abs=0.01)


def test_the_second_test_keeps_the_rules_on_every_cell_and_is_dropped_when_it_adds_nothing():
    # No block has every rule: the first test leaves out c (the fewest blocks, then by name) to keep 5 blocks.
    two_gaps = rank_tests(_runs({"d": {"cnn"}, "c": {"mlp"}}))
    assert [t.scope for t in two_gaps] == [ALL_RULES, ALL_CELLS]
    assert sorted(two_gaps[0].rules["rule"]) == ["a", "b", "d"] and two_gaps[0].n_blocks == 6
    assert sorted(two_gaps[1].rules["rule"]) == ["a", "b"] and two_gaps[1].n_blocks == 12
    assert [t.scope for t in rank_tests(_runs({}))] == [ALL_RULES]  # no gaps: one test over everything
    # A failed seed costs its block, not the rule: b stays in the second test, on 11 blocks.
    failed = _runs({"d": {"cnn"}}).with_columns(
        status=pl.when((pl.col("rule") == "b") & (pl.col("arch") == "cnn") & (pl.col("dataset") == "x1")
                       & (pl.col("seed") == 1001)).then(pl.lit("failed")).otherwise(pl.col("status")))
    second = rank_tests(failed)[1]
    assert sorted(second.rules["rule"]) == ["a", "b", "c"] and second.n_blocks == 11


def test_the_report_shows_both_tests_with_what_each_covers_and_leaves_out(tmp_path):
    part = rank_part(_runs({"d": {"cnn"}}), _cells(), CELLS, tmp_path)
    rules, pairs = part.tables["rank_test"], part.tables["rank_test_pairs"]
    assert dict(rules.group_by("scope").len().iter_rows()) == {ALL_RULES: 4, ALL_CELLS: 3}
    assert pairs.filter(pl.col("scope") == ALL_CELLS)["resolved"].all()
    assert sorted(part.pngs) == ["critical_difference", "critical_difference_all_cells"]
    assert all(p.is_file() for p in part.pngs.values()) and len(part.section.figures) == 2
    notes = " ".join(part.section.notes)
    assert ("Covers all 4 rules (a, b, c, d) on 2 of 4 cells (x1 / mlp, x2 / mlp): 6 of 12 (cell, seed) blocks. "
            "Leaves out 6 blocks (x1 / cnn, x2 / cnn), where d has no result.") in notes
    assert ("Covers 3 of 4 rules (a, b, c) on all 4 cells (x1 / mlp, x1 / cnn, x2 / mlp, x2 / cnn): 12 of 12 (cell, "
            f"seed) blocks. Leaves out d: no result on some of these cells. Why: d has none on x1 / cnn, x2 / cnn "
            f"({REASON}).") in notes
    assert f"Resolved pairs ({ALL_CELLS}; mean ranks further apart than the critical difference 0.96): a ranks " \
           "better than b, c; b ranks better than c." in notes
    assert f"Resolved pairs ({ALL_RULES}; mean ranks further apart than the critical difference 1.91): a ranks " \
           "better than b, c; d ranks better than c." in notes
    d = part.section.rows[1]  # rules in the first test's order; d has no second-test columns
    assert d[:2] == ["d", "2.00"] and d[3:] == ["6", "—", "—", "—"]


def test_two_rules_unresolved_name_the_test_that_ran():
    # Two rules: Wilcoxon's signed-rank test, not Friedman's; alike here, so it does not reject.
    runs = _runs({}).filter(pl.col("rule").is_in(["a", "b"])).with_columns(
        test_acc=pl.lit(0.8) + 0.01 * pl.Series(np.random.default_rng(1).standard_normal(24)))
    (test,) = rank_tests(runs)
    assert test.test == "wilcoxon" and not test.significant
    text = resolved(test)
    assert text.startswith(f"Resolved pairs ({ALL_RULES}): none (") and "Wilcoxon" in text and "Friedman" not in text
