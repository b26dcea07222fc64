"""Statistics across cells: do the rules' ranks differ beyond chance? (Friedman test, Nemenyi post-hoc test)

The unit of comparison is a **block**: one cell (arch x dataset) and one final seed. Within a block the rules
are ranked by test accuracy (1 = best, ties share the average rank): a rule's final run with seed 1000 on a
cell is paired with every other rule's run with seed 1000 on that cell (the same data split, the same seed).
The Friedman test asks whether the mean ranks over the blocks differ at all; only if it rejects (p < alpha)
are pairs compared, by the Nemenyi test: two rules differ when their mean ranks are further apart than the
critical difference ``CD = q_alpha * sqrt(k (k + 1) / (6 N))`` (k rules, N blocks; Demsar 2006). With two
rules it is Wilcoxon's signed-rank test instead. The tests are autorank's (Herbold 2020), not written here.

Blocks must be complete: a block where a rule has no finite result (the rule does not support the cell, a
final run failed, a cell is missing) is left out; when that would leave fewer than the five blocks autorank
needs, the rules covering the fewest blocks are left out one at a time, and the notes say which.

Two scopes (:func:`rank_tests`): the first test keeps every rule and so only the cells they all have results
on; where some rules lack cells (a sweep's exclude=, a rule that does not support an architecture) a second
test keeps every cell and so only the rules with a result on every cell that has results. When the two
coincide there is one test.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

ALPHA = 0.05
MIN_BLOCKS = 5  # autorank's minimum number of paired measurements
BLOCK = ["arch", "dataset", "seed"]
CELL = ["arch", "dataset"]
ALL_RULES = "all rules, common cells"
ALL_CELLS = "common rules, all cells"


@dataclass
class RankTest:
    """The outcome: per rule its mean rank; per pair whether the difference is resolved; and what was tested."""

    rules: pl.DataFrame  # rule, mean_rank, median_acc, n_blocks
    pairs: pl.DataFrame  # rule_a, rule_b, mean_rank_a, mean_rank_b, rank_difference, critical_difference, resolved
    test: str | None = None  # friedman+nemenyi | wilcoxon | None (not run)
    p_value: float | None = None
    critical_difference: float | None = None
    n_blocks: int = 0
    alpha: float = ALPHA
    notes: list[str] = field(default_factory=list)
    result: object = None  # autorank's RankResult, for the diagram
    scope: str = ALL_RULES
    available: pl.DataFrame = field(default_factory=pl.DataFrame)  # every block x every rule, null: no result
    blocks: pl.DataFrame = field(default_factory=pl.DataFrame)  # the complete blocks tested x the rules tested

    @property
    def significant(self) -> bool:
        return self.p_value is not None and math.isfinite(self.p_value) and self.p_value < self.alpha


PAIR_SCHEMA = {"rule_a": pl.String, "rule_b": pl.String, "mean_rank_a": pl.Float64, "mean_rank_b": pl.Float64,
               "rank_difference": pl.Float64, "critical_difference": pl.Float64, "p_value": pl.Float64,
               "resolved": pl.Boolean, "better": pl.String}
RULE_SCHEMA = {"rule": pl.String, "mean_rank": pl.Float64, "median_acc": pl.Float64, "n_blocks": pl.Int64}


def _not_run(notes: list[str], n_blocks: int = 0, **covered) -> RankTest:
    return RankTest(pl.DataFrame(schema=RULE_SCHEMA), pl.DataFrame(schema=PAIR_SCHEMA), n_blocks=n_blocks, notes=notes,
                    **covered)


def result_blocks(final_runs: pl.DataFrame) -> pl.DataFrame:
    """Every (cell, seed) block with any finite result x every rule: mean test accuracy, null where a rule has
    none (empty when the input has no usable final runs)."""
    need = {"rule", *BLOCK, "test_acc"}
    if final_runs is None or final_runs.is_empty() or not need <= set(final_runs.columns):
        return pl.DataFrame()
    ok = final_runs.filter(pl.col("test_acc").is_not_null() & pl.col("test_acc").is_finite())
    if "status" in ok.columns:
        ok = ok.filter(pl.col("status") != "failed")
    if ok.is_empty():
        return pl.DataFrame()
    return (ok.group_by(*BLOCK, "rule").agg(pl.col("test_acc").mean())
            .pivot(on="rule", index=BLOCK, values="test_acc").sort(BLOCK))


def rules_of(wide: pl.DataFrame) -> list[str]:
    return sorted(c for c in wide.columns if c not in BLOCK)


def common_rules(wide: pl.DataFrame) -> list[str]:
    """The rules with a result on every cell that has results (on at least one of the cell's seeds: a failed
    seed costs that block, not the rule)."""
    if wide.is_empty():
        return []
    per_cell = wide.group_by(CELL).agg(pl.col(r).count() for r in rules_of(wide))
    return [r for r in rules_of(wide) if (per_cell[r] > 0).all()]


def seed_blocks(wide: pl.DataFrame, rules: list[str] | None = None) -> tuple[pl.DataFrame, list[str]]:
    """(blocks x rules table of test accuracy, complete blocks only; notes on rules left out for want of blocks)
    for ``rules`` (default: every rule) of a :func:`result_blocks` table. The blocks left out are those of
    ``wide`` not in the result (the report says which and why)."""
    if wide.is_empty():
        return pl.DataFrame(), ["no final runs with test accuracies"]
    rules = list(rules_of(wide) if rules is None else rules)
    notes = []
    while len(rules) >= 2 and wide.height >= MIN_BLOCKS:  # leaving rules out cannot add blocks beyond these
        if wide.drop_nulls(rules).height >= MIN_BLOCKS:
            break
        counts = {r: wide[r].count() for r in rules}
        drop = min(rules, key=lambda r: (counts[r], r))
        notes.append(f"{drop} left out: results on {counts[drop]} of {wide.height} (cell, seed) blocks")
        rules.remove(drop)
    return wide.select(*BLOCK, *rules).drop_nulls(rules), notes


def rank_tests(final_runs: pl.DataFrame, alpha: float = ALPHA) -> list[RankTest]:
    """The rank test over every rule (on the blocks they all have), and, where that leaves blocks out, a second
    one over every block (with the rules that have a result on every cell); one test when both are the same."""
    wide = result_blocks(final_runs)
    scopes = [(ALL_RULES, None)]
    common = common_rules(wide)
    if len(common) >= 2 and _scope_of(wide, common) != _scope_of(wide, None):
        scopes.append((ALL_CELLS, common))
    return [_test_blocks(wide, alpha, rules, scope) for scope, rules in scopes]


def _scope_of(wide: pl.DataFrame, rules: list[str] | None) -> tuple[list[str], int]:
    blocks, _ = seed_blocks(wide, rules)
    return rules_of(blocks), blocks.height


def rank_test(final_runs: pl.DataFrame, alpha: float = ALPHA) -> RankTest:
    """Friedman + Nemenyi (Wilcoxon for two rules) over the complete (cell, seed) blocks of ``final_runs``;
    degenerate inputs (fewer than two rules, too few blocks) give a result with a note and no test."""
    return _test_blocks(result_blocks(final_runs), alpha)


def _test_blocks(wide: pl.DataFrame, alpha: float, rules: list[str] | None = None, scope: str = ALL_RULES) -> RankTest:
    blocks, notes = seed_blocks(wide, rules)
    rules = rules_of(blocks)
    covered = {"scope": scope, "available": wide, "blocks": blocks}
    if len(rules) < 2:
        return _not_run(notes + ["the rank test needs at least two rules with results on the same cells"], **covered)
    if blocks.height < MIN_BLOCKS:
        return _not_run(notes + [f"the rank test needs at least {MIN_BLOCKS} complete (cell, seed) blocks, "
                                 f"found {blocks.height}: run more final seeds or more cells"], blocks.height, **covered)
    values = blocks.select(rules).to_pandas()
    if (values.nunique(axis=1) <= 1).all():
        return _not_run(notes + ["every rule has the same accuracy in every block: nothing to rank"], blocks.height,
                        **covered)
    from autorank import autorank

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        result = autorank(values, alpha=alpha, verbose=False, order="descending", force_mode="nonparametric")
    return _summarise(result, blocks, rules, alpha, notes, covered)


def _summarise(result, blocks: pl.DataFrame, rules: list[str], alpha: float, notes: list[str],
               covered: dict) -> RankTest:
    ranks = result.rankdf
    mean_rank = {r: float(ranks.loc[r, "meanrank"]) for r in rules}
    table = pl.DataFrame({"rule": rules, "mean_rank": [mean_rank[r] for r in rules],
                          "median_acc": [float(blocks[r].median()) for r in rules],
                          "n_blocks": [blocks.height] * len(rules)}, schema=RULE_SCHEMA).sort("mean_rank", "rule")
    p = float(result.pvalue) if result.pvalue is not None else float("nan")
    significant = math.isfinite(p) and p < alpha
    cd = float(result.cd) if result.cd is not None else None
    pairs = []
    for a, b in itertools.combinations(table["rule"].to_list(), 2):
        diff = abs(mean_rank[a] - mean_rank[b])
        # Pairs are compared only once the omnibus test rejects; Wilcoxon's p-value is the pair's own.
        resolved = significant and (cd is None or diff > cd)
        pairs.append({"rule_a": a, "rule_b": b, "mean_rank_a": mean_rank[a], "mean_rank_b": mean_rank[b],
                      "rank_difference": diff, "critical_difference": cd, "p_value": p if cd is None else None,
                      "resolved": resolved, "better": (a if mean_rank[a] < mean_rank[b] else b) if resolved else None})
    test = "friedman+nemenyi" if result.omnibus == "friedman" else str(result.omnibus)
    if not significant:
        notes = notes + [f"{test.split('+')[0]} p = {p:.3g} >= alpha = {alpha}: no difference between the rules' "
                         "ranks is resolved"]
    return RankTest(table, pl.DataFrame(pairs, schema=PAIR_SCHEMA), test, p, cd, blocks.height, alpha, notes, result,
                    **covered)


def cd_diagram(test: RankTest, path: Path) -> Path | None:
    """The critical-difference diagram (autorank's), as a PNG; None when there is none to draw (no test run,
    or two rules: Wilcoxon has no diagram)."""
    if test.result is None or test.test != "friedman+nemenyi":
        return None
    import matplotlib.pyplot as plt
    from autorank import plot_stats

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        ax = plot_stats(test.result, allow_insignificant=True)
    fig = ax.get_figure()
    verdict = "differences resolved" if test.significant else "no difference resolved"
    fig.suptitle(f"{test.scope}: {test.rules.height} rules, mean rank over {test.n_blocks} (cell, seed) blocks; bars "
                 f"join rules closer than CD = {test.critical_difference:.2f} (Friedman p = {test.p_value:.3g}: "
                 f"{verdict})", fontsize=8, y=1.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
