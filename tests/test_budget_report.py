"""The report's budget and statistics sections: accuracy at equal epochs and at equal compute (two sweep
folders, one of each budget kind: ``bioplaus report SWEEP --compare OTHER``), the accuracy-vs-compute Pareto
figure and the Friedman/Nemenyi rank test with its critical-difference diagram.

The two sweep folders are written by hand, no training: real sweep configs and trial configs (so the report
can count the epochs sweep's FLOPs itself), final runs with planted test accuracies (bp > fa > dfa in every
cell and seed), 2 cells x 3 seeds = 6 blocks.
"""

from __future__ import annotations

import time

import polars as pl
import pytest

from bioplaus.analysis.load import load_sweep
from bioplaus.analysis.rank_stats import rank_tests
from bioplaus.orchestrator import cli
from bioplaus.orchestrator.results import RunRecord, write_run
from bioplaus.orchestrator.sweep import Sweep, parse_sweep, write_finals
from bioplaus.orchestrator.sweep.finals import final_run_id

PLANTED = {"bp": 0.90, "fa": 0.80, "dfa": 0.70}
SEEDS = (1000, 1001, 1002)


def _sweep(root, kind: str) -> Sweep:
    s = Sweep(parse_sweep(["preset=smoke", "rules=[bp,fa,dfa]", "archs=[mlp,cnn]", f"budget.kind={kind}",
                           "budget.epochs=4", f"budget.final_seeds={len(SEEDS)}", f"root={root}", f"name={kind}"]))
    s.write_manifest("complete", time.time())
    for cell in s.cells:
        for i, seed in enumerate(SEEDS):
            plain = s.run_config(cell, {}, seed, s.final_epochs)
            acc = PLANTED[cell.rule] - (0.05 if kind == "compute" and cell.rule == "fa" else 0) + 0.01 * i
            record = RunRecord(**cell.record(), seed=seed, status="ok", phase="final", val_acc=acc, test_acc=acc,
                               epochs_planned=plain["train"]["epochs"], epochs_run=plain["train"]["epochs"],
                               config=plain, **s.run_budget(plain).columns())
            write_run(s.dir, record, run_id=final_run_id(cell.key, seed, plain), runs_table="final_runs")
    write_finals(s.dir, s.final_epochs)
    return s


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-sweeps")
    epochs, compute = _sweep(root, "epochs"), _sweep(root, "compute")
    assert cli.main(["report", str(epochs.dir), "--compare", str(compute.dir), "--quiet"]) == 0
    out = epochs.dir / "report"
    return {"out": out, "md": (out / "report.md").read_text(), "html": (out / "index.html").read_text(),
            "epochs": epochs, "compute": compute}


def _section(md: str, title: str) -> str:
    return md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_report_shows_accuracy_at_equal_epochs_and_at_equal_compute(report):
    part = _section(report["md"], "Equal epochs and equal compute")
    assert "| equal epochs" in part and "| equal compute" in part and "compute − epochs" in part
    views = pl.read_parquet(report["out"] / "tables" / "budget_views.parquet")
    fa = views.filter((pl.col("rule") == "fa") & (pl.col("arch") == "mlp")).row(0, named=True)
    assert fa["epochs_test_acc_mean"] == pytest.approx(0.81) and fa["compute_test_acc_mean"] == pytest.approx(0.76)
    assert fa["compute_minus_epochs"] == pytest.approx(-0.05)
    costs = pl.read_parquet(report["out"] / "tables" / "budget_costs.parquet")
    assert set(costs["budget_kind"]) == {"epochs", "compute"} and costs["cost_vs_bp"].null_count() == 0
    # The epochs sweep recorded no counts: the report counted them; the compute sweep's came from its rows.
    sources = dict(costs.group_by("budget_kind").agg(pl.col("cost_source").first()).iter_rows())
    assert sources == {"epochs": "counted by the report", "compute": "recorded by the sweep"}
    bp = costs.filter(pl.col("rule") == "bp")
    assert (bp["cost_vs_bp"] == 1.0).all() and (bp["compute_bp_epochs"] == 4.0).all()
    same = costs.filter(pl.col("budget_kind") == "epochs").select("rule", "arch", "cost_vs_bp").sort("rule", "arch")
    assert same.equals(costs.filter(pl.col("budget_kind") == "compute").select("rule", "arch", "cost_vs_bp")
                       .sort("rule", "arch"))  # the same configurations, counted by the sweep and by the report
    assert "plots/accuracy_vs_compute.png" in part and (report["out"] / "plots" / "accuracy_vs_compute.png").is_file()


def test_report_shows_the_rank_test_and_its_critical_difference_diagram(report):
    part = _section(report["md"], "Rank test across cells (Friedman, Nemenyi)")
    assert "friedman+nemenyi: 6 (cell, seed) blocks, 3 rules" in part
    assert "plots/critical_difference.png" in part and "critical-difference diagram" in report["html"]
    pairs = pl.read_parquet(report["out"] / "tables" / "rank_test_pairs.parquet")
    resolved = {(r["rule_a"], r["rule_b"]): r["resolved"] for r in pairs.iter_rows(named=True)}
    # Mean ranks 1, 2, 3 over 6 blocks: bp vs dfa (2 apart) beats the critical difference (1.35), neighbours do not.
    assert resolved == {("bp", "fa"): False, ("bp", "dfa"): True, ("fa", "dfa"): False}
    # Every rule has every cell: one test, no second scope and no second diagram.
    assert set(pairs["scope"]) == {"all rules, common cells"} and "Covers all 3 rules (bp, dfa, fa) on all 2 cells" in part
    assert not (report["out"] / "plots" / "critical_difference_all_cells.png").exists()


def test_compare_needs_a_sweep_of_the_other_kind(report, capsys):
    code = cli.main(["report", str(report["epochs"].dir), "--compare", str(report["epochs"].dir), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "both sweeps have budget.kind=epochs" in err


def test_the_compared_view_gets_its_own_rank_test(report):
    part = _section(report["md"], "Rank test across cells (Friedman, Nemenyi): equal compute")
    assert "plots/critical_difference_compute.png" in part
    assert (report["out"] / "plots" / "critical_difference_compute.png").is_file()
    table = pl.read_parquet(report["out"] / "tables" / "rank_test_compute.parquet")
    expected = rank_tests(load_sweep(report["compute"].dir).final_runs.collect())[0].rules
    assert table.drop("scope").sort("rule").equals(expected.sort("rule"))
    main = pl.read_parquet(report["out"] / "tables" / "rank_test.parquet")
    assert not table.drop("scope").sort("rule").equals(main.drop("scope").sort("rule"))  # the two views differ
