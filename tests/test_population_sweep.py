"""Population tuning (``resources.population``; orchestrator/sweep/population.py): each member of a population is an
ordinary trial to everything downstream: its own Optuna trial and pruning decision, its own rows and run id, the
numbers its configuration gets alone; a rerun resumes without repeats, and a rule that cannot train as a
population tunes one trial at a time beside it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import optuna
import polars as pl
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from bioplaus.algorithms.registry import load_rules
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.population import run_population
from bioplaus.orchestrator.results import read_table
from bioplaus.orchestrator.search_space import load_search_space
from bioplaus.orchestrator.sweep import Sweep, parse_sweep
from bioplaus.orchestrator.sweep.cells import Cell, trial_config, trial_spec
from bioplaus.orchestrator.sweep.population import PopulationRecorder, PopulationSearcher, Rungs
from bioplaus.orchestrator.sweep.recording import WandbLogger
from bioplaus.orchestrator.sweep.search import METRIC, cell_search
from bioplaus.orchestrator.trial import run_trial

ARGS = ["preset=smoke", "name=p", "rules=[bp,faulty]", "budget.trials=3", "resources.population=2"]


def run(root, *extra: str) -> tuple[Sweep, list[str]]:
    lines: list[str] = []
    s = Sweep(parse_sweep([*ARGS, f"root={root}", *extra]))
    s.run(log=lines.append)
    return s, lines


def test_members_are_ordinary_trials_to_optuna_the_tables_and_a_resume(ray_session, tmp_path):
    s, log = run(tmp_path)
    assert any("faulty.mlp.digits tunes one trial at a time" in line for line in log)
    trials = s.table("trials")
    for cell in ("bp.mlp.digits", "faulty.mlp.digits"):
        mine = trials.filter(pl.col("run_id").str.starts_with(cell))
        assert sorted(mine["run_id"].to_list()) == [f"{cell}.t{n}" for n in range(3)]
        assert set(mine["status"]) <= {"ok", "pruned"} and mine["node_id"].null_count() == 0
    epochs = s.table("epochs").filter(pl.col("phase") == "tune")
    study = optuna.load_study(study_name="bp.mlp.digits",
                              storage=optuna.storages.JournalStorage(JournalFileBackend(str(s.dir / "optuna.journal"))))
    assert len(study.trials) == 3
    for t in study.trials:  # each member: its own study trial, state, intermediate values and row
        row = trials.filter(pl.col("run_id") == t.user_attrs["run_id"]).row(0, named=True)
        assert row["trial_number"] == t.number and t.state == (TrialState.PRUNED if row["status"] == "pruned"
                                                                 else TrialState.COMPLETE)
        assert sorted(t.intermediate_values) == list(range(1, row["epochs_run"] + 1))
        assert max(t.intermediate_values.values()) == pytest.approx(row["val_acc"])
        assert epochs.filter(pl.col("run_id") == row["run_id"]).height == row["epochs_run"]
        assert all(json.loads(row["hp_json"])[k] == v for k, v in t.params.items())
    # the defaults (trial 0) trained in a population: the numbers of the same configuration alone
    first = trials.filter(pl.col("run_id") == "bp.mlp.digits.t0").row(0, named=True)
    alone = run_trial(trial_spec(json.loads(first["config_json"])), evaluate_test=False)
    assert alone["epochs_run"] >= first["epochs_run"]
    mine = epochs.filter(pl.col("run_id") == "bp.mlp.digits.t0").sort("epoch")["val_acc"].to_list()
    assert all(abs(a["val_acc"] - v) <= 1 / alone["n_val"] + 1e-12 for a, v in zip(alone["epochs"], mine))
    assert pl.read_parquet(s.dir / "manifest.parquet")["status"][0] == "complete"

    before = {p: p.stat().st_mtime_ns for p in (s.dir / "trials").rglob("*.parquet")}
    again, _ = run(tmp_path)
    assert again.table("trials").height == 6
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing re-run or rewritten


def test_population_pruning_is_ashas_decision_within_the_cell():
    """The rung book decides each member's report as Tune's ASHA decides a trial's (grace 1, max 3, factor 3:
    rungs at epochs 1 and 3); reports arrive in order, as they would from trials of one cell."""
    rungs = Rungs(max_t=3, grace=1, reduction_factor=3)
    asha = AsyncHyperBandScheduler(time_attr="training_iteration", metric=METRIC, mode="max", max_t=3,
                                   grace_period=1, reduction_factor=3)
    reports = [("a", 1, 0.5), ("b", 1, 0.3), ("c", 1, 0.6), ("a", 2, 0.7), ("c", 2, 0.6), ("d", 1, 0.4),
               ("a", 3, 0.8), ("c", 3, 0.65)]
    stopped, tune_stopped = [], []
    for mid, epoch, value in reports:
        stopped += rungs.decide("cell", [(mid, epoch, value, epoch == 3)])
        trial = type("T", (), {"trial_id": mid})()
        if mid not in asha._trial_info:
            asha.on_trial_add(None, trial)
        if asha.on_trial_result(None, trial, {"training_iteration": epoch, METRIC: value}) == TrialScheduler.STOP:
            asha.on_trial_complete(None, trial, {"training_iteration": epoch, METRIC: value})
            tune_stopped += [] if epoch == 3 else [mid]
    assert stopped == tune_stopped == ["b", "d"]
    assert rungs.decide("other", [("b", 1, 0.0, False)]) == []  # another cell's records are its own


def test_population_must_be_at_least_one():
    with pytest.raises(UsageError, match="resources.population=0 must be >= 1"):
        parse_sweep(["preset=smoke", "resources.population=0"])


def test_a_failed_population_keeps_its_recorded_members_and_fails_the_rest(tmp_path):
    """The driver's side alone (no Ray): a member that ended before its population failed keeps its row and its
    PRUNED study trial; the member still training is recorded failed with the error and told FAIL."""
    cfg = parse_sweep(["preset=smoke", f"root={tmp_path}", "name=u", "rules=[bp]", "resources.population=2"])
    cell = Cell("bp", "mlp", "digits")
    storage = optuna.storages.InMemoryStorage()
    searcher = PopulationSearcher({cell.key: cell_search(cell.key, load_search_space(load_rules()["bp"]), storage,
                                                         seed=0, first_point=None,
                                                         startup_trials=cfg.budget.startup_trials)},
                                  {cell.key: 2}, {cell.key: lambda hp: trial_config(cfg, cell, hp, 0, 2)}, {},
                                  sizes={cell.key: 2}, book="unused")
    config = searcher.suggest("T")
    trial = SimpleNamespace(trial_id="T", config=config, num_failures=0, error_file=None, status="RUNNING")
    rows = {}

    def first_stops(epoch, reports):
        rows.update(reports)
        return {0}

    run_population([trial_spec(m["trial"]) for m in config["members"]], on_epoch=first_stops, evaluate_test=False)
    members = [{**rows[i], "id": m["id"], "node_id": "n", "done": i == 0} for i, m in enumerate(config["members"])]
    result = {"epoch": 1, METRIC: 0.0, "members_json": json.dumps(members)}
    recorder = PopulationRecorder(tmp_path / "u", cfg, WandbLogger(cfg, tmp_path / "u"), 2, book=None)
    searcher.on_trial_result("T", result)
    recorder.on_trial_result(1, [trial], trial, result)
    recorder.on_trial_error(2, [trial], trial)
    searcher.on_trial_complete("T", error=True)

    table = read_table(tmp_path / "u", "trials").sort("trial_number")
    assert table["status"].to_list() == ["pruned", "failed"] and table["error"].to_list() == [None, "worker failed"]
    assert table["epochs_run"].to_list() == [1, 1]
    study = optuna.load_study(study_name=cell.key, storage=storage)
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.FAIL]
    assert [t.user_attrs["run_id"] for t in study.trials] == [f"{cell.key}.t0", f"{cell.key}.t1"]
