"""Sweeps on the real Ray, embedded and loopback-only: end to end, resume, and injected faults.

Each case counts result rows before and after: nothing lost, nothing duplicated, every cell
accounted for. Faults come from the ``faulty`` rule (algorithms/faulty.py), loaded in the driver and
the Ray workers through BIOPLAUS_RULE_MODULES.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.sweep import Sweep, parse_sweep
from conftest import faulty_rule_everywhere

BIN = Path(sys.executable).parent / "bioplaus"
FAULTY = {"BIOPLAUS_RULE_MODULES": "bioplaus.algorithms.faulty"}


def sweep(root: Path, *overrides: str) -> Sweep:
    s = Sweep(parse_sweep(["preset=smoke", f"root={root}", "name=s", *overrides]))
    s.run(log=lambda m: None)
    return s


def rows(s: Sweep, table: str) -> pl.DataFrame:
    return s.table(table)


@pytest.mark.slow
def test_sweep_end_to_end_resume_and_extend(ray_session, tmp_path):
    s = sweep(tmp_path, "rules=[bp]", "budget.trials=3", "wandb.mode=offline")
    trials, finals, final_runs = rows(s, "trials"), rows(s, "finals"), rows(s, "final_runs")
    digest = finals["config_hash"][0]  # a final run's id and network file name its configuration
    assert sorted(p.name for p in (s.dir / "models").glob("*.pt")) == [f"bp.mlp.digits.final1000.{digest}.pt",
                                                                       f"bp.mlp.digits.final1001.{digest}.pt"]
    assert sorted(trials["trial_number"].to_list()) == [0, 1, 2]
    assert set(trials["status"]) <= {"ok", "pruned"} and trials["node_id"].null_count() == 0
    assert trials["test_acc"].is_nan().all()  # tuning never evaluates the test set
    for size in ("n_params", "n_train", "n_val", "n_test"):  # the report's "data used" reads these per phase
        assert trials[size].null_count() == 0 and (trials[size] > 0).all(), size
    assert trials.select("n_train", "n_val", "n_test").unique().rows() == final_runs.select(
        "n_train", "n_val", "n_test").unique().rows()
    assert sorted(final_runs["seed"].to_list()) == [1000, 1001] and final_runs["test_acc"].is_finite().all()
    f = finals.row(0, named=True)
    assert f["n_seeds"] == 2 and f["test_acc_ci95_low"] <= f["test_acc_mean"] <= f["test_acc_ci95_high"]
    epochs = rows(s, "epochs")
    assert set(epochs["phase"]) == {"tune", "final"}
    assert pl.read_parquet(s.dir / "manifest.parquet")["status"][0] == "complete"
    assert pl.read_parquet(s.dir / "cells.parquet").height == 1
    crit = pl.scan_parquet(s.dir / "criteria").collect()  # measured at the settings the finals ran with
    assert set(crit.select("rule", "arch", "dataset").unique().rows()) == {("bp", "mlp", "digits")}
    assert {"C1", "C2", "C3", "C4"} <= set(crit["criterion"]) and crit["hp_json"].n_unique() == 1
    assert crit.filter(pl.col("criterion").is_in(["C1", "C2", "C3", "C4"]))["holds"].to_list() == [False] * 4
    # W&B offline: one run per trial and per final run, never merged
    assert len(list((s.dir / "wandb").glob("offline-run-*"))) == 3 + 2

    before = {p: p.stat().st_mtime_ns for p in s.dir.rglob("*.parquet") if "trials" in p.parts or "final_runs" in p.parts}
    again = sweep(tmp_path, "rules=[bp]", "budget.trials=3", "wandb.mode=offline")
    assert rows(again, "trials").height == 3 and rows(again, "final_runs").height == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing re-run or rewritten

    more = sweep(tmp_path, "rules=[bp]", "budget.trials=4", "progress=true")  # the live view on, as in make sweep
    assert sorted(rows(more, "trials")["trial_number"].to_list()) == [0, 1, 2, 3]


def test_nan_trial_is_recorded_as_diverged_and_the_sweep_finishes(ray_session, tmp_path):
    s = sweep(tmp_path, "rules=[faulty]", "budget.trials=1", "trial.hp.nan_at_step=2", "budget.final_seeds=1")
    trials = rows(s, "trials")
    assert trials["status"].to_list() == ["diverged"]
    assert s.summary()["trials"].to_list() == [1]  # the cell is accounted for


def test_raising_trial_is_retried_then_recorded_as_failed_with_its_error(failing_trial_sweep):
    s = failing_trial_sweep  # faulty, 1 trial raising at step 2, retries=1, 1 final seed
    trial = rows(s, "trials").row(0, named=True)
    assert trial["status"] == "failed" and "injected failure at step 2" in trial["error"]
    assert rows(s, "final_runs").is_empty()


@pytest.mark.slow
def test_killed_worker_process_is_retried_and_nothing_is_lost(ray_session, tmp_path):
    marker = tmp_path / "died"
    s = sweep(tmp_path, "rules=[faulty]", "budget.trials=2", f"trial.hp.die_once_marker={marker}", "retries=2",
              "budget.final_seeds=1")
    assert marker.exists()  # a worker really was killed mid-trial
    trials = rows(s, "trials")
    assert sorted(trials["trial_number"].to_list()) == [0, 1] and set(trials["status"]) <= {"ok", "pruned"}
    assert rows(s, "final_runs").height == 1


@pytest.mark.slow
def test_killed_driver_resumes_without_repeats_or_duplicates(tmp_path):
    # One trial at a time; the first goes on, the second hangs at its first step (it creates `hung`), so the
    # driver is killed during a trial after exactly one committed trial, however fast or slow the machine.
    # On the rerun the marker exists: no trial hangs.
    hung = tmp_path / "hung"
    args = [str(BIN), "sweep", "preset=smoke", "rules=[faulty]", f"root={tmp_path}", "name=k", "budget.trials=4",
            "trial.hp.hang_at_step=1", f"trial.hp.hang_once_marker={hung}", "trial.hp.hang_skip=1",
            "resources.max_concurrent=1", "ray.num_cpus=2"]
    env = {**os.environ, **FAULTY}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trials_dir = tmp_path / "k" / "trials"
    try:
        deadline = time.monotonic() + 600  # a guard: the sweep cannot finish while the second trial hangs
        while time.monotonic() < deadline and proc.poll() is None and not (
                hung.exists() and trials_dir.exists() and list(trials_dir.rglob("*.parquet"))):
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        assert hung.exists(), "the second trial never started"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session, mid-sweep
        proc.wait()
    done_before = pl.scan_parquet(trials_dir).collect()
    assert done_before.height == 1
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    trials = pl.scan_parquet(trials_dir).collect()
    assert trials.height == 4 and trials["trial_number"].n_unique() == 4
    assert set(done_before["run_id"]) <= set(trials["run_id"])
    assert pl.scan_parquet(tmp_path / "k" / "final_runs").collect().height == 2


def test_cells_lists_supported_cells_and_cli_errors_are_one_line():
    out = subprocess.run([str(BIN), "cells", "preset=local", "rules=[bp]"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "bp" in out.stdout and "fashion_mnist" in out.stdout
    bad = subprocess.run([str(BIN), "sweep", "rules=[nope]"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "unknown rule" in bad.stderr


def test_hyperparameter_set_on_the_command_line_is_pinned_not_searched(tmp_path):
    s = Sweep(parse_sweep(["preset=smoke", "rules=[bp]", f"root={tmp_path}", "trial.hp.lr=0.0123"]))
    assert "lr" not in s.spaces["bp"] and {"optimizer", "momentum", "weight_decay"} <= set(s.spaces["bp"])
    from bioplaus.orchestrator.sweep import trial_config

    searched = {"lr": 0.5, "optimizer": "sgd"}  # what a searcher could hand over is ignored for a pinned key
    point = {k: v for k, v in searched.items() if k in s.spaces["bp"]}
    assert trial_config(s.cfg, s.cells[0], point, 0, 1)["hp"] == {"lr": 0.0123, "optimizer": "sgd"}
    with pytest.raises(UsageError, match="pins every searched hyperparameter of faulty"), faulty_rule_everywhere():
        Sweep(parse_sweep(["preset=smoke", "rules=[faulty]", f"root={tmp_path}", "trial.hp.lr=0.01"]))


@pytest.mark.slow
def test_tuning_proposes_the_same_points_whatever_order_trials_finish_in(ray_session, tmp_path):
    # Until budget.startup_trials have finished, a cell's points are the rule's defaults then seeded random draws
    # in the order they are asked for: two trials at once propose what one at a time does. Past it, TPE models
    # the results so far, which one trial at a time makes the same on every run.
    def points(name: str, *overrides: str) -> list[str]:
        s = sweep(tmp_path, f"name={name}", "rules=[bp]", "budget.trials=5", "budget.final_seeds=1", *overrides)
        return rows(s, "trials").sort("trial_number")["hp_json"].to_list()

    random_serial = points("random1", "resources.max_concurrent=1")
    assert points("random2", "resources.max_concurrent=2") == random_serial
    tpe = points("tpe1", "resources.max_concurrent=1", "budget.startup_trials=2")
    assert points("tpe2", "resources.max_concurrent=1", "budget.startup_trials=2") == tpe
    assert tpe[:2] == random_serial[:2] and tpe[2:] != random_serial[2:]  # the same start, then TPE's own points
