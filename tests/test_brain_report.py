"""The report's brain sections (analysis/brain_report.py, analysis/brain_tables.py) on a made-up brain table.

Two cells: on cnn / cifar10 ``ff`` is planted well above bp, the untrained network and pixels (resolved);
on mlp / cifar10 the rules differ by less than the resamples' noise (not resolved). The controls are the
same for every rule, as the brain step computes them for networks of the same seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bioplaus.analysis.brain_pairs import pairs_tables
from bioplaus.analysis.brain_report import brain_part, floor_warning
from bioplaus.analysis.brain_tables import family_counts
from bioplaus.analysis.load import SweepData
from bioplaus.analysis.report_render import render_markdown
from bioplaus.orchestrator.results import write_table

RULES = ("bp", "ff", "zeta")
SEEDS = (1000, 1001)
N_BOOT = 500  # enough for p = 2/501 to survive Holm over the six control pairs
# cross-validated score per (arch, network): rules, then the controls shared by every rule
PLANTED = {"cnn": {"bp": 0.10, "ff": 0.30, "zeta": 0.05, "untrained": 0.04, "pixels": 0.03},
           "mlp": {"bp": 0.061, "ff": 0.062, "zeta": 0.059, "untrained": 0.058, "pixels": 0.057}}


def _boot(arch: str, name: str, seed: int) -> np.ndarray:
    """Values on the shared resamples: a common part (the same stimuli drawn for everyone) plus the
    network's own part, small on cnn (differences resolve) and large on mlp (they do not)."""
    common = np.random.default_rng(0).normal(0, 0.05, N_BOOT)
    own = np.random.default_rng([list(PLANTED[arch]).index(name), seed]).normal(0, 0.002 if arch == "cnn" else 0.08, N_BOOT)
    return PLANTED[arch][name] + common - common.mean() + own - own.mean()  # centred: the score is the planted one


def _rows(arch: str, rule: str, control: str, seed: int) -> list[dict]:
    name = rule if control == "none" else control
    layers = [0] if control == "pixels" else [1, 2, 3]
    rows = []
    for target, ceiling in (("human_it_mean", (0.37, 0.67)), ("monkey_it", (None, None))):
        for layer in layers:
            cv = target == "human_it_mean" and layer == layers[-1]
            # zeta's last layer looks best in-sample (chosen on the data it is scored on), not cross-validated
            overfit = 0.3 if (rule, control) == ("zeta", "none") and layer == layers[-1] else 0.0
            sim = PLANTED[arch][name] + 0.01 * layer + 0.001 * (seed - 1000) + overfit
            boot = _boot(arch, name, seed)
            rows.append({"rule": rule, "arch": arch, "dataset": "cifar10", "seed": seed, "control": control,
                         "layer": layer, "layer_name": "pixels" if control == "pixels" else f"block{layer}",
                         "target": target, "method": "spearman", "similarity": sim, "ci_low": sim - 0.05,
                         "ci_high": sim + 0.05, "noise_ceiling_low": ceiling[0], "noise_ceiling_high": ceiling[1],
                         "best_layer": layer == layers[-1], "in_domain": True, "layer_cv": cv,
                         "cv_similarity": float(boot.mean()) if cv else None,
                         "cv_ci_low": float(np.quantile(boot, 0.025)) if cv else None,
                         "cv_ci_high": float(np.quantile(boot, 0.975)) if cv else None,
                         "cv_boot": boot.tolist() if cv else None, "boot_seed": 0, "n_boot_dual": N_BOOT})
    return rows


def brain_frame(rules=RULES) -> pl.DataFrame:
    return pl.DataFrame([r for arch in PLANTED for rule in rules for control in ("none", "untrained", "pixels")
                         for seed in SEEDS for r in _rows(arch, rule, control, seed)])


def _sweep(tmp_path: Path, df: pl.DataFrame, pairs_on_disk: bool = True) -> SweepData:
    if pairs_on_disk:
        pairs, _ = pairs_tables(df)
        write_table(pairs.to_arrow(), tmp_path / "brain_pairs" / "brain_pairs.parquet")
    return SweepData(tmp_path, None, None, None, None, df.lazy(), None, None)


def _build(tmp_path: Path, df: pl.DataFrame | None = None, pairs_on_disk: bool = True):
    df = brain_frame() if df is None else df
    return brain_part(_sweep(tmp_path, df, pairs_on_disk), tmp_path / "report", {})


def _main_rows(section, arch: str) -> list[dict]:
    return [dict(zip(section.header, r)) for r in section.rows if r[2] == f"cifar10 / {arch}"]


def test_main_table_is_the_cross_validated_score_sorted_by_it(tmp_path):
    df = brain_frame()
    sections, saved, _ = _build(tmp_path, df)
    main = sections[0]
    assert main.title == "Brain similarity" and "CV score" in main.header
    assert "in-sample best layer (selection-biased)" in main.header
    rows = _main_rows(main, "cnn")
    names = [r["network"] for r in rows]
    assert names == ["**ff**", "bp", "zeta", "control: untrained", "control: pixels"]
    # The score is the mean over seeds of the cross-validated score, its CI the percentile interval of
    # that mean over the shared resamples (not the in-sample best layer, which is higher here).
    boot = np.mean([_boot("cnn", "ff", s) for s in SEEDS], 0)
    assert rows[0]["CV score"] == f"{boot.mean():.3f}"
    assert rows[0]["95 % CI"] == f"[{np.quantile(boot, 0.025):.3f}, {np.quantile(boot, 0.975):.3f}]"
    assert rows[0]["noise ceiling"] == "0.370 – 0.670"
    cv = saved["brain_cv"].filter((pl.col("arch") == "cnn") & (pl.col("network") == "ff")
                                  & (pl.col("target") == "human_it_mean")).row(0, named=True)
    assert cv["cv_similarity"] == pytest.approx(boot.mean())
    assert cv["best_layer_similarity"] > cv["cv_similarity"]  # the in-sample value, kept beside it
    assert "brain_best" in saved and saved["brain_best"].height


def test_controls_are_listed_once_per_cell_unless_they_differ(tmp_path):
    sections, saved, _ = _build(tmp_path)
    for arch in PLANTED:
        networks = [r["network"] for r in _main_rows(sections[0], arch)]
        assert networks.count("control: untrained") == 1 and networks.count("control: pixels") == 1
        assert len(networks) == len(RULES) + 2
    cv = saved["brain_cv"].filter(pl.col("control") == "untrained")
    assert set(cv["from_rules"]) == {"bp,ff,zeta"}
    # One rule whose untrained network differs (another initialisation): a row per group, named.
    df = brain_frame().with_columns(similarity=pl.when((pl.col("rule") == "zeta") & (pl.col("control") == "untrained"))
                                    .then(pl.col("similarity") + 0.01).otherwise(pl.col("similarity")))
    sections, _, _ = _build(tmp_path / "differs", df)
    networks = [r["network"] for r in _main_rows(sections[0], "cnn")]
    assert "control: untrained (bp, ff)" in networks and "control: untrained (zeta)" in networks


def test_pairs_summary_says_whether_the_top_rule_is_resolved(tmp_path):
    df = brain_frame()
    sections, saved, notes = _build(tmp_path, df)
    assert [s.title for s in sections] == ["Brain similarity", "Brain similarity: paired differences"]
    pairs, _ = pairs_tables(df)
    counts = saved["brain_pairs_summary"]
    expected = pairs.group_by("arch", "family").agg(pl.len(), pl.col("resolved").sum()).sort("arch", "family")
    assert counts.sort("arch", "family").select("arch", "family", "pairs", "resolved").rows() == expected.rows()
    top = saved["brain_top_rule"]
    cnn = {r["versus"]: r for r in top.filter(pl.col("arch") == "cnn").iter_rows(named=True)}
    # ff's next rule is bp: one row for both
    assert {r["top_rule"] for r in cnn.values()} == {"ff"} and set(cnn) == {"bp", "untrained", "pixels"}
    # The table holds (bp, ff) as bp - ff: the summary turns it round to ff - bp.
    held = pairs.filter((pl.col("arch") == "cnn") & (pl.col("a") == "bp") & (pl.col("b") == "ff")).row(0, named=True)
    assert cnn["bp"]["diff"] == pytest.approx(-held["diff"]) and cnn["bp"]["ci_low"] == pytest.approx(-held["ci_high"])
    assert all(r["resolved"] and r["diff"] > 0 and r["ci_low"] > 0 for r in cnn.values())
    assert cnn["untrained"]["other"] == "ff/untrained" and cnn["bp"]["rules_resolved_from"] == 2
    mlp = top.filter(pl.col("arch") == "mlp")
    assert not mlp["resolved"].any()
    intro = sections[1].intro.split("\n\n")
    assert intro[0].startswith("cifar10 / cnn") and "the top rule is ff" in intro[0]
    assert "**resolved** from bp" in intro[0] and "not resolved" not in intro[0]
    assert "resolved from 2 of the 2 other rules" in intro[0]
    assert "the top rule is ff" in intro[1] and "**not resolved** from bp" in intro[1] and "resolved from 0 of the 2 other rules" in intro[1]
    assert not notes


def test_pairs_come_from_the_brain_table_when_the_sweep_has_none(tmp_path):
    sections, saved, _ = _build(tmp_path, pairs_on_disk=False)
    assert "computed by the report" in " ".join(sections[1].notes)
    assert saved["brain_top_rule"].filter(pl.col("arch") == "cnn")["top_rule"][0] == "ff"


def test_pairs_older_than_the_brain_table_are_flagged(tmp_path):
    df = brain_frame()
    _sweep(tmp_path, df)  # pairs written from these scores, then the brain table changes
    newer = df.with_columns(cv_similarity=pl.col("cv_similarity") + 0.01)
    _, _, notes = brain_part(SweepData(tmp_path, None, None, None, None, newer.lazy(), None, None),
                             tmp_path / "report", {})
    assert any("does not match" in n for n in notes)


def test_markdown_has_each_heading_once_and_does_not_depend_on_row_order(tmp_path):
    df = brain_frame()
    texts = []
    _sweep(tmp_path, df)  # the brain step's pairs, as the sweep holds them
    for frame in (df, df.sample(fraction=1.0, shuffle=True, seed=3)):
        d = SweepData(tmp_path, None, None, None, None, frame.lazy(), None, None)
        sections, _, notes = brain_part(d, tmp_path / "report", {})
        texts.append(render_markdown("t", [], notes, sections, tmp_path / "report"))
    assert texts[0] == texts[1]
    headings = [line for line in texts[0].splitlines() if line.startswith("## ")]
    assert headings == ["## Brain similarity", "## Brain similarity: paired differences"]


def test_families_too_large_for_the_resamples_are_said_to_be_unresolvable(tmp_path):
    # 60 resamples: a bootstrap p is at least 2/61, so Holm over 3 rule pairs cannot go below 0.098
    df = brain_frame().with_columns(pl.col("cv_boot").list.head(60))
    sections, saved, _ = _build(tmp_path, df)
    counts = saved["brain_pairs_summary"].filter(pl.col("arch") == "cnn")
    assert counts["p_holm_floor"].to_list() == pytest.approx([6 * 2 / 61, 3 * 2 / 61])  # controls, rules
    assert (counts["resolved"] == 0).all()
    intro = sections[1].intro.split("\n\n")[0]
    assert "With 60 resamples" in intro and "n_boot_dual=N` with N of at least 240" in intro
    # 500 resamples (the other tests): floors under 0.05, no such sentence
    _, saved, _ = _build(tmp_path / "enough")
    assert (saved["brain_pairs_summary"]["p_holm_floor"] < 0.05).all()


def test_a_table_the_helpers_cannot_read_gets_the_generic_view_and_a_bug_is_not_hidden(tmp_path, monkeypatch):
    import bioplaus.analysis.brain_report as brain_report

    _, saved, notes = _build(tmp_path / "old", brain_frame().drop("layer_cv", "cv_similarity"))
    assert "brain_cv" not in saved and any("generic" in n for n in notes)  # a table of another shape

    def broken(*args, **kwargs):
        raise TypeError("a bug in the brain view")

    monkeypatch.setattr(brain_report, "network_table", broken)
    with pytest.raises(TypeError, match="a bug in the brain view"):
        _build(tmp_path / "bug")


def test_a_pairs_table_without_the_scores_is_recomputed_from_the_brain_table(tmp_path):
    df = brain_frame()
    pairs, _ = pairs_tables(df)
    write_table(pairs.drop("score_a", "score_b").to_arrow(), tmp_path / "brain_pairs" / "brain_pairs.parquet")
    sections, saved, _ = brain_part(_sweep(tmp_path, df, pairs_on_disk=False), tmp_path / "report", {})
    assert "pairs computed by the report" in str(sections[1])
    assert saved["brain_top_rule"]["other_score"].null_count() == 0


def test_holm_floor_counts_only_the_pairs_holm_tests():
    # three rule pairs, one without a p-value (NaN: Holm leaves it out of the family), 60 resamples
    panel = {"target": "human_it_mean", "method": "spearman", "arch": "mlp", "dataset": "mnist", "family": "rules"}
    pairs = pl.DataFrame([panel | {"p": p, "n_boot": 60, "resolved": False} for p in (0.2, float("nan"), 0.4)])
    counts = family_counts(pairs)
    assert counts["pairs"].to_list() == [3] and counts["tested"].to_list() == [2]
    assert counts["p_holm_floor"].to_list() == pytest.approx([2 * 2 / 61])
    assert floor_warning(counts).count("2 pairs tested") == 1


def test_cv_table_counts_the_seeds_its_score_averages(tmp_path):
    # zeta's second seed has no cross-validated score (its layers all NaN on a half, say): zeta's CV score is
    # the first seed's alone, while its in-sample best layer still averages both seeds.
    gone = (pl.col("rule") == "zeta") & (pl.col("control") == "none") & (pl.col("seed") == SEEDS[1])
    df = brain_frame().with_columns(pl.when(gone).then(None).otherwise(pl.col(c)).alias(c)
                                    for c in ("cv_similarity", "cv_ci_low", "cv_ci_high", "cv_boot"))
    sections, saved, _ = _build(tmp_path, df)
    rows = {r["network"]: r for r in _main_rows(sections[0], "cnn")}
    assert rows["zeta"]["CV score"] == f"{_boot('cnn', 'zeta', SEEDS[0]).mean():.3f}"
    assert rows["zeta"]["seeds"] == "1 of 2" and rows["bp"]["seeds"] == "2"
    cv = saved["brain_cv"].filter((pl.col("arch") == "cnn") & (pl.col("target") == "human_it_mean"))
    assert dict(cv.select("network", "cv_seeds").iter_rows())["zeta"] == 1


def test_a_network_without_cv_scores_stays_in_its_targets_cv_table(tmp_path):
    # zeta has no cross-validated score on cnn (every seed's layers NaN on a half, say); human IT has CV scores,
    # so zeta belongs in its CV table with none, not among the targets without cross-validated scores.
    gone = (pl.col("rule") == "zeta") & (pl.col("control") == "none") & (pl.col("arch") == "cnn")
    df = brain_frame().with_columns(pl.when(gone).then(None).otherwise(pl.col(c)).alias(c)
                                    for c in ("cv_similarity", "cv_ci_low", "cv_ci_high", "cv_boot"))
    sections, _, _ = _build(tmp_path, df)
    rows = {r["network"]: r for r in _main_rows(sections[0], "cnn")}
    assert list(rows) == ["**ff**", "bp", "control: untrained", "control: pixels", "zeta"]
    assert (rows["zeta"]["CV score"], rows["zeta"]["seeds"]) == ("—", "0 of 2")
    title, _, in_sample = sections[0].details[0]
    assert title.startswith("Targets without cross-validated scores")
    assert {r[0] for r in in_sample} == {"monkey_it"}


def test_pairs_left_from_before_a_rescoring_without_cv_scores_are_flagged(tmp_path):
    # `bioplaus brain SWEEP overwrite=true n_boot_dual=0` rescores without cross-validation and leaves the
    # brain_pairs table it no longer writes: the pairs have scores, the brain table none to match them.
    df = brain_frame()
    _sweep(tmp_path, df)
    rescored = df.with_columns(layer_cv=pl.lit(False), n_boot_dual=pl.lit(0), cv_boot=pl.lit(None, pl.List(pl.Float64)),
                               **{c: pl.lit(None, pl.Float64) for c in ("cv_similarity", "cv_ci_low", "cv_ci_high")})
    sections, _, notes = brain_part(SweepData(tmp_path, None, None, None, None, rescored.lazy(), None, None),
                                    tmp_path / "report", {})
    assert sections[0].title == "Brain similarity" and "CV score" not in sections[0].header
    assert any("does not match" in n for n in notes)
