"""A sweep that says what happened: stop signals, failed cells, the folder lock, attempts, messages, seeds.

SIGINT and SIGTERM during tuning end the real CLI with 130 / 143 and status ``interrupted``, with no finals,
and the same command resumes; a second driver on a live sweep folder is refused naming the first one; a
cell whose every trial failed makes the sweep ``failed``; ``attempts`` counts attempts; the empty-space and
unsupported-cell messages say the real reason; a cell's sampler seed does not depend on the other cells.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bioplaus.algorithms.registry import load_rules
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.sweep import Sweep, SweepLock, parse_sweep, read_table
from bioplaus.orchestrator.sweep import driver as sweep_driver
from conftest import FAULTY_ENV

BIN = Path(sys.executable).parent / "bioplaus"


def held_sweep_args(root: Path, trials: int) -> list[str]:
    """A CLI sweep of one-at-a-time faulty trials held at a known point: the first trial runs to its end, the
    second hangs at its first step until the driver is signalled (it creates ``root/hung``). The same command
    run again finds the marker, and no trial hangs."""
    hung = root / "hung"
    return [str(BIN), "sweep", "preset=smoke", "rules=[faulty]", f"root={root}", "name=k", f"budget.trials={trials}",
            "trial.hp.hang_at_step=1", f"trial.hp.hang_once_marker={hung}", "trial.hp.hang_skip=1",
            "resources.max_concurrent=1", "ray.num_cpus=2"]


def wait_until_held(proc: subprocess.Popen, root: Path) -> None:
    """Until one trial is committed and the next hangs; the limit is a guard against a sweep that never gets
    there, not a measure of how fast it does."""
    trials_dir, hung = root / "k" / "trials", root / "hung"
    deadline = time.monotonic() + 600
    while not (hung.exists() and trials_dir.exists() and list(trials_dir.rglob("*.parquet"))):
        assert proc.poll() is None, "the sweep ended before it could be signalled"
        assert time.monotonic() < deadline, "the sweep did not reach its second trial within 600 s"
        time.sleep(0.2)


def manifest(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_during_tuning_exits_128_plus_signal_interrupted_without_finals(sig, tmp_path):
    # SIGTERM's case also starts a second driver meanwhile, and does not resume.
    trials = 4
    args = held_sweep_args(tmp_path, trials)
    env = {**os.environ, **FAULTY_ENV}
    err_file = tmp_path / "driver.err"  # a file, not a pipe: nobody reads a pipe while the sweep is held
    with open(err_file, "w") as err_out:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err_out, start_new_session=True)
    d = tmp_path / "k"
    try:
        wait_until_held(proc, tmp_path)
        if sig == signal.SIGTERM:  # the lock: a second driver on the live folder is refused, naming the first
            second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
            assert f"pid {proc.pid} on host {socket.gethostname()}" in lines[0] and "another sweep" in lines[0]
        os.kill(proc.pid, sig)  # the driver only, as SLURM's or Kubernetes' SIGTERM, or kill -INT
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + sig, err_file.read_text()[-3000:]
    assert manifest(d)["status"] == "interrupted" and manifest(d)["signal"] == sig
    assert read_table(d, "final_runs").is_empty() and read_table(d, "finals").is_empty()
    assert not list(d.glob("models/*.pt"))
    done = read_table(d, "trials")
    assert 1 <= done.height < trials and done["trial_number"].n_unique() == done.height
    assert done.height == 1  # held at its second trial: signalled mid-tuning, whatever the machine's speed
    if sig == signal.SIGTERM:
        return
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert manifest(d)["status"] == "complete"
    resumed = read_table(d, "trials")
    assert resumed.height == 4 and set(done["run_id"]) <= set(resumed["run_id"])
    assert read_table(d, "final_runs").height == 2


def test_second_driver_is_refused_while_the_lock_is_held(tmp_path):
    (tmp_path / "s").mkdir()
    lock = SweepLock(tmp_path / "s")
    lock.acquire()
    try:
        out = subprocess.run([str(BIN), "sweep", "preset=smoke", "rules=[bp]", f"root={tmp_path}", "name=s"],
                             capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in lines[0]
    assert not (tmp_path / "s" / "manifest.json").exists()  # refused before it wrote or cleaned anything


def test_trial_failing_every_attempt_counts_its_attempts_and_the_sweep_is_failed(failing_trial_sweep):
    s = failing_trial_sweep  # faulty, 1 trial raising at step 2, retries=1, 1 final seed
    trial = s.table("trials").row(0, named=True)
    assert trial["status"] == "failed" and trial["attempts"] == 2  # the first try and its one retry
    assert s.status == "failed"
    m = manifest(s.dir)
    assert m["status"] == "failed" and m["cells_without_finals"] == 1
    assert "1 failed" in json.loads(m["cells_without_finals_json"])["faulty.mlp.digits"]


def test_empty_search_space_says_so_not_that_trial_hp_pinned_it(tmp_path, monkeypatch):
    from bioplaus.orchestrator import search_space

    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "bp.yaml").write_text("rule: bp\nparams: {}\n")
    monkeypatch.setattr(search_space, "SEARCH_SPACES", spaces)
    with pytest.raises(UsageError) as e:
        Sweep(parse_sweep(["preset=smoke", "rules=[bp]", f"root={tmp_path}"]))
    assert "search space of bp has no parameters" in str(e.value) and "pins" not in str(e.value)


def test_unsupported_cell_named_on_the_command_line_is_refused_with_the_rules_reason(tmp_path, capsys):
    from bioplaus.orchestrator.cli import main

    ok, why = load_rules()["ep"].supports("resnet20")
    assert not ok and why
    code = main(["sweep", "preset=smoke", "rules=[ep]", "archs=[resnet20]", f"root={tmp_path}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "no runnable cell" in lines[0] and why in lines[0]


def test_cell_sampler_seed_is_the_same_with_and_without_other_cells(tmp_path, monkeypatch):
    seeds: dict[str, int] = {}

    def record(study_name, space, storage, seed, first_point, **search_settings):
        seeds.setdefault(study_name, seed)
        assert seeds[study_name] == seed, f"{study_name}: sampler seed depends on the other cells"

    monkeypatch.setattr(sweep_driver, "cell_search", record)
    for rules in ("[bp]", "[fa,bp]", "[bp,fa,dfa]"):
        s = Sweep(parse_sweep(["preset=smoke", f"rules={rules}", f"root={tmp_path}", f"name=s{len(rules)}"]))
        s.dir.mkdir(parents=True)
        s._searchers()
    assert set(seeds) >= {"bp.mlp.digits", "fa.mlp.digits", "dfa.mlp.digits"}
    assert len(set(seeds.values())) == len(seeds)  # and cells do not share one
    other = Sweep(parse_sweep(["preset=smoke", "rules=[bp]", f"root={tmp_path}", "name=t", "seed=1"]))
    other.dir.mkdir(parents=True)
    monkeypatch.setattr(sweep_driver, "cell_search", lambda study_name, space, storage, seed, first_point, **search_settings:
                        seeds.__setitem__("seed1", seed))
    other._searchers()
    assert seeds["seed1"] != seeds["bp.mlp.digits"]  # the sweep seed still matters


def test_manifest_status_is_one_of_the_documented_statuses():
    from bioplaus.orchestrator.sweep import EXIT_CODES, STATUSES

    assert set(STATUSES) == {"running", "interrupted", "failed", "partial", "complete"}
    assert EXIT_CODES["complete"] == 0 and all(EXIT_CODES[s] != 0 for s in ("failed", "partial"))
