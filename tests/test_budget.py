"""Training budgets (budget.kind=epochs|compute), the ASHA fairness measurement and the rank test across cells.

Budgets: the epochs a run gets from its counted training FLOPs (orchestrator/flops.py, orchestrator/sweep/
budget.py), that budget.kind=epochs builds exactly the configurations it always did, one smoke compute sweep
on the real Ray, and the resume check. Statistics: Friedman/Nemenyi on planted tables (analysis/rank_stats.py). The report's budget sections are in tests/test_budget_report.py.
"""

from __future__ import annotations

import math
import random

import numpy as np
import polars as pl
import pytest
import torch

from bioplaus.analysis.rank_stats import rank_test
from bioplaus.orchestrator import cli
from bioplaus.orchestrator.bench_fairness import rank_agreement
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.sweep import CellASHA, CellSearcher, Sweep, parse_sweep, trial_config
from bioplaus.orchestrator.sweep.budget import ComputeBudgets, RunBudget, epochs_for
from bioplaus.orchestrator.sweep.cells import Cell

DIGITS = [("bp", "mlp", "digits"), ("pc", "mlp", "digits")]


def compute_cfg(*extra: str):
    return parse_sweep(["preset=smoke", "budget.kind=compute", "budget.epochs=6", *extra])


# --- the epochs a run gets ------------------------------------------------------------------------------
def test_epochs_follow_the_cost_rounded_clamped_and_capped():
    assert epochs_for(6, 1.0, 4) == 6  # bp itself
    assert epochs_for(6, 3.0, 4) == 2  # three times bp's cost: a third of the epochs
    assert epochs_for(6, 2.5, 4) == 2 and epochs_for(6, 2.3, 4) == 3  # the nearest whole number
    assert epochs_for(6, 0.5, 4) == 12  # cheaper than bp: more epochs
    assert epochs_for(6, 0.01, 4) == 24 and epochs_for(6, 0.0, 4) == 24  # at most max_epochs_factor x budget
    assert epochs_for(6, 40.0, 4) == 1  # at least one epoch, even over budget


def test_compute_budget_gives_a_costlier_rule_fewer_epochs_than_bp_on_the_same_cell():
    budgets = ComputeBudgets(compute_cfg())
    bp_plain, bp = budgets.plan(Cell("bp", "mlp", "digits"), {}, 0, 6)
    pc_plain, pc = budgets.plan(Cell("pc", "mlp", "digits"), {"inference_steps": 10}, 0, 6)
    assert bp.epochs == 6 and bp_plain["train"]["epochs"] == 6 and bp.cost_vs_bp == 1.0
    assert pc.cost_vs_bp > 2 and pc.epochs < bp.epochs and pc_plain["train"]["epochs"] == pc.epochs
    assert pc.bp_flops_per_sample == bp.flops_per_sample  # the same reference: bp on this cell
    assert abs(pc.bp_epochs - 6) <= pc.cost_vs_bp / 2  # whole epochs: within half an epoch's cost of the budget
    # The cost is counted per configuration: more inference steps cost more and get fewer epochs.
    _, longer = budgets.plan(Cell("pc", "mlp", "digits"), {"inference_steps": 40}, 0, 6)
    assert longer.flops_per_sample > pc.flops_per_sample and longer.epochs <= pc.epochs
    assert pc.columns()["budget_kind"] == "compute" and pc.columns()["budget_bp_epochs"] == pc.bp_epochs


def test_counting_is_deterministic_and_leaves_the_random_streams_alone():
    state = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = ComputeBudgets(compute_cfg()).plan(Cell("fa", "mlp", "digits"), {}, 0, 6)[1]
    assert torch.equal(torch.random.get_rng_state(), state[0]) and (np.random.get_state()[1] == state[1]).all()
    assert random.getstate() == state[2]
    again = ComputeBudgets(compute_cfg()).plan(Cell("fa", "mlp", "digits"), {}, 5, 6)[1]
    assert first == again  # same configuration, any seed, any process: the same count and the same epochs


def test_epochs_kind_builds_exactly_the_configurations_it_always_did(tmp_path):
    s = Sweep(parse_sweep(["preset=smoke", "rules=[bp,pc]", f"root={tmp_path}"]))
    assert s.cfg.budget.kind == "epochs" and s.budgets is None
    for cell in s.cells:
        for seed, epochs in ((0, s.cfg.budget.epochs), (1000, s.final_epochs)):
            assert s.run_config(cell, {"lr": 0.01}, seed, epochs) == trial_config(s.cfg, cell, {"lr": 0.01}, seed,
                                                                                  epochs)
    assert s.run_budget(s.run_config(s.cells[1], {}, 0, 2)) == RunBudget("epochs", 2)
    # The Tune config and the scheduler are today's: no budget key, rungs in training iterations.
    searcher = CellSearcher({}, {}, {}, {})
    assert searcher.budgets is None
    assert CellASHA(2, 1, 3).kwargs["time_attr"] == "training_iteration"


def test_asha_rungs_count_compute_spent_with_the_compute_kind():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from bioplaus.orchestrator.sweep.budget import compute_spent

    assert compute_spent({"budget": RunBudget("compute", 2, 250.0, 100.0).tune_config()})({"epoch": 2}) == {
        "bp_epochs": 5.0}
    assert compute_spent({"cell": "bp.mlp.digits"})({"epoch": 2}) == {}  # epochs: the report is today's
    trial = lambda i: SimpleNamespace(trial_id=f"t{i}", config={"cell": "pc.mlp.digits"})
    asha = CellASHA(5, 1, 3, time_attr="bp_epochs")
    for i, acc in enumerate((0.9, 0.95)):  # each at least the rung's cutoff so far
        asha.on_trial_add(None, trial(i))
        assert asha.on_trial_result(None, trial(i), {"best_val_acc": acc, "bp_epochs": 2.5}) == TrialScheduler.CONTINUE
    asha.on_trial_add(None, trial(2))
    # An epoch count alone is not what the rungs count; the compute spent is.
    assert asha.on_trial_result(None, trial(2), {"best_val_acc": 0.1, "training_iteration": 1}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, trial(2), {"best_val_acc": 0.1, "bp_epochs": 2.5}) == TrialScheduler.STOP
    off = CellASHA(5, 1, 3, time_attr="bp_epochs", pruning=False)
    off.on_trial_add(None, trial(3))
    assert off.on_trial_result(None, trial(3), {"best_val_acc": 0.0, "bp_epochs": 2.5}) == TrialScheduler.CONTINUE


def test_resume_with_another_budget_kind_is_refused_in_one_line(tmp_path, capsys):
    import time

    Sweep(parse_sweep(["preset=smoke", "rules=[bp]", f"root={tmp_path}", "name=s"])).write_manifest("complete",
                                                                                                   time.time())
    code = cli.main(["sweep", "preset=smoke", "rules=[bp]", f"root={tmp_path}", "name=s", "budget.kind=compute"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and 'budget.kind "epochs" -> "compute"' in err
    # A folder from before budget.kind existed (its manifest lacks the key) was an epochs sweep.
    from bioplaus.orchestrator.sweep.lifecycle import resume_differences

    old = {"budget": {"epochs": 2}, "rules": ["bp"]}
    assert resume_differences(old, {"budget": {"epochs": 2, "kind": "compute"}, "rules": ["bp"]}) == [
        'budget.kind "epochs" -> "compute"']
    assert resume_differences(old, {"budget": {"epochs": 2, "kind": "epochs"}, "rules": ["bp"]}) == []
    # ... and drew its first 10 trials of a cell at random (Optuna's default, before budget.startup_trials existed)
    assert resume_differences(old, {"budget": {"epochs": 2, "startup_trials": 10}, "rules": ["bp"]}) == []
    assert resume_differences(old, {"budget": {"epochs": 2, "startup_trials": 4}, "rules": ["bp"]}) == [
        "budget.startup_trials 10 -> 4"]
    with pytest.raises(UsageError, match="budget.startup_trials=0 must be >= 1"):
        parse_sweep(["preset=smoke", "budget.startup_trials=0"])
    with pytest.raises(UsageError, match="budget.kind='seconds' must be epochs or compute"):
        parse_sweep(["preset=smoke", "budget.kind=seconds"])


# --- smoke sweeps of each kind, on the real Ray --------------------------------------------------------------
@pytest.mark.slow
def test_compute_sweep_gives_each_run_its_epochs_and_records_its_budget(ray_session, tmp_path):
    s = Sweep(parse_sweep(["preset=smoke", "rules=[pc]", f"root={tmp_path}", "name=c", "budget.kind=compute",
                           "budget.epochs=4", "budget.trials=1", "budget.final_seeds=1"]))
    s.run(log=lambda m: None)
    trials, finals = s.table("trials"), s.table("final_runs")
    assert set(trials["budget_kind"]) == {"compute"} == set(finals["budget_kind"])
    for rows in (trials, finals):  # pc costs more per sample than bp on this cell: fewer epochs than the budget
        assert (rows["train_flops_per_sample"] > 2 * rows["bp_train_flops_per_sample"]).all()
        assert (rows["epochs_planned"] < 4).all() and (rows["epochs_run"] == rows["epochs_planned"]).all()
        given = rows["epochs_planned"] * rows["train_flops_per_sample"] / rows["bp_train_flops_per_sample"]
        assert (abs(rows["budget_bp_epochs"] - given) < 1e-9).all()
    assert s.table("finals")["epochs"][0] == finals["epochs_planned"][0]


# --- statistics across cells ----------------------------------------------------------------------------------
def _planted(means: dict[str, float], cells: int = 4, seeds: int = 3, noise: float = 0.02, seed: int = 0):
    rng = np.random.default_rng(seed)
    return pl.DataFrame([{"rule": rule, "arch": "mlp", "dataset": f"d{c}", "seed": 1000 + s, "status": "ok",
                          "test_acc": mu + noise * rng.standard_normal()}
                         for c in range(cells) for s in range(seeds) for rule, mu in means.items()])


def test_rank_test_resolves_a_planted_winner_and_a_null_claims_nothing():
    clear = rank_test(_planted({"winner": 0.9, "b": 0.6, "c": 0.6, "d": 0.6}))
    assert clear.test == "friedman+nemenyi" and clear.significant and clear.n_blocks == 12
    assert clear.rules["rule"][0] == "winner" and clear.rules["mean_rank"][0] == 1.0
    resolved = clear.pairs.filter(pl.col("resolved"))
    assert sorted(map(tuple, resolved.select("rule_a", "rule_b").rows())) == [("winner", "b"), ("winner", "c"),
                                                                             ("winner", "d")]
    assert set(resolved["better"]) == {"winner"}
    null = rank_test(_planted({"a": 0.6, "b": 0.6, "c": 0.6, "d": 0.6}, seed=3))
    assert null.test == "friedman+nemenyi" and not null.significant and not null.pairs["resolved"].any()
    assert any("no difference" in n for n in null.notes)
    two = rank_test(_planted({"a": 0.9, "b": 0.6}))
    assert two.test == "wilcoxon" and two.pairs["resolved"].to_list() == [True]


def test_no_pair_is_claimed_when_friedman_does_not_reject():
    # Pure noise, 8 rules x 5 blocks, drawn so that one pair's mean ranks lie further apart than Nemenyi's
    # critical difference while Friedman's test does not reject: Nemenyi alone would claim that pair.
    noise = np.random.default_rng(116).standard_normal((5, 8))
    runs = pl.DataFrame([{"rule": f"r{j}", "arch": "mlp", "dataset": f"d{i}", "seed": 1000,
                          "test_acc": 0.5 + 0.01 * noise[i, j]} for i in range(5) for j in range(8)])
    t = rank_test(runs)
    assert t.test == "friedman+nemenyi" and 0.05 < t.p_value < 0.5
    assert t.pairs["rank_difference"].max() > t.critical_difference
    assert not t.pairs["resolved"].any() and t.pairs["better"].null_count() == t.pairs.height


def test_rank_test_degenerate_inputs_are_notes_not_crashes():
    assert "at least two rules" in rank_test(_planted({"only": 0.5})).notes[-1]
    one_cell = rank_test(_planted({"a": 0.9, "b": 0.6, "c": 0.5}, cells=1))
    assert one_cell.test is None and "at least 5 complete" in one_cell.notes[-1] and one_cell.pairs.is_empty()
    assert rank_test(pl.DataFrame()).test is None
    # A rule missing from some cells (unsupported there): incomplete blocks are left out, and the test says which.
    gappy = _planted({"a": 0.9, "b": 0.6, "c": 0.5}, cells=3).filter(~((pl.col("rule") == "c") & (pl.col("dataset") == "d0")))
    t = rank_test(gappy)
    assert t.n_blocks == 6 and set(t.blocks["dataset"]) == {"d1", "d2"} and t.available.height == 9
    ties = _planted({"a": 0.5, "b": 0.5}, noise=0.0)
    assert rank_test(ties).test is None and "same accuracy" in rank_test(ties).notes[-1]


# --- ASHA fairness --------------------------------------------------------------------------------------------
def test_rank_agreement_is_kendalls_tau_and_names_the_rules_that_moved():
    asha = pl.DataFrame({"rule": ["a", "b", "c", "d"], "arch": "mlp", "dataset": "digits",
                         "val_acc": [0.9, 0.8, 0.7, 0.6], "test_acc": [0.9, 0.8, 0.7, 0.6]})
    same = rank_agreement(asha, asha)[0]
    assert same["tau"] == 1.0 and same["moved"] == {} and same["rules"] == 4
    swapped = asha.with_columns(val_acc=pl.Series([0.9, 0.7, 0.8, 0.6]))
    one = rank_agreement(asha, swapped)[0]
    assert math.isclose(one["tau"], 4 / 6) and one["moved"] == {"b": [3.0, 2.0], "c": [2.0, 3.0]}
    reversed_ = asha.with_columns(val_acc=pl.Series([0.6, 0.7, 0.8, 0.9]))
    assert rank_agreement(asha, reversed_)[0]["tau"] == -1.0
