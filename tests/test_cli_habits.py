"""Command-line habits: every listing and reporting command speaks JSON, `bioplaus config` prints the
resolved config, and progress written to a pipe or file is plain lines without terminal control sequences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bioplaus.orchestrator.cli import main
from bioplaus.orchestrator.config import to_plain
from bioplaus.orchestrator.progress import runs_bar
from bioplaus.orchestrator.sweep import parse_sweep, plan_cells
from conftest import FAULTY_ENV

REPO = Path(__file__).resolve().parent.parent
ESC = "\x1b["


def cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``python -m bioplaus ARGS`` with stdout and stderr as pipes (not terminals)."""
    return subprocess.run([sys.executable, "-m", "bioplaus", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "WANDB_MODE": "offline", **env})


def test_cells_json_through_a_pipe_is_json():
    shell = f"{sys.executable} -m bioplaus cells preset=paper --json | {sys.executable} -c " \
            "\"import json,sys; print(len(json.load(sys.stdin)))\""
    out = subprocess.run(shell, shell=True, capture_output=True, text=True, timeout=120, check=True)
    cells, skipped = plan_cells(parse_sweep(["preset=paper"]))
    assert int(out.stdout) == len(cells) + len(skipped)


@pytest.mark.parametrize("args, kind, key", [
    (["rules", "--json"], list, "name"),
    (["archs", "--json"], list, "model"),
    (["datasets", "--json"], list, "files"),
    (["cells", "preset=paper", "--json"], list, "reason"),
    (["space", "bp", "--json"], dict, "bp"),
    (["config", "preset=paper", "--json"], dict, "budget"),
])
def test_every_listing_command_prints_json_on_stdout(args, kind, key, capsys):
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, kind) and out
    assert key in (out[0] if kind is list else out)


def test_archs_and_datasets_json_name_every_registered_one(capsys):
    from bioplaus.algorithms.arch import ARCHS
    from bioplaus.orchestrator.data import DATASETS

    main(["archs", "--json"])
    assert [a["name"] for a in json.loads(capsys.readouterr().out)] == list(ARCHS)
    main(["datasets", "--json"])
    assert [d["name"] for d in json.loads(capsys.readouterr().out)] == list(DATASETS)


def test_config_prints_the_resolved_sweep_config_as_yaml(capsys):
    assert main(["config", "preset=paper", "budget.trials=8", "data.train_limit=100"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_plain(parse_sweep(["preset=paper", "budget.trials=8", "data.train_limit=100"]))
    assert printed["budget"]["trials"] == 8 and printed["budget"]["epochs"] == 30  # override over preset
    assert printed["trial"]["data"]["train_limit"] == 100 and printed["wandb"]["mode"] == "online"


def test_config_train_prints_every_hyperparameter_of_the_rule(capsys):
    assert main(["config", "--train", "rule=bp", "hp.lr=0.05"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rule"] == "bp" and printed["hp"]["lr"] == 0.05 and "optimizer" in printed["hp"]


def test_config_with_a_bad_override_is_one_line_exit_2(capsys):
    assert main(["config", "budget.trials=many"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "budget.trials" in err


def test_progress_on_a_pipe_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setenv("BIOPLAUS_PROGRESS_EVERY_S", "0")
    bar = runs_bar(True, "tuning", 3)
    for k in range(3):
        bar.update(running=1)
        bar.update(advance=1, info=f"run {k} ok")
    bar.close()
    err = capsys.readouterr().err
    assert ESC not in err and "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("tuning 1/3 running 1 info run 0 ok elapsed ")
    assert lines[-1].startswith("tuning 3/3 ")


def test_progress_lines_are_periodic_not_per_update(capsys, monkeypatch):
    monkeypatch.setenv("BIOPLAUS_PROGRESS_EVERY_S", "3600")
    bar = runs_bar(True, "finals", 50)
    for _ in range(49):
        bar.update(advance=1)
    bar.close()  # stopped short of the end: one line says where
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in lines] == ["1/50", "49/50"]


@pytest.mark.slow
def test_smoke_sweep_through_a_pipe_has_no_control_sequences_and_a_json_summary(tmp_path):
    # Every run's worker says a line (Ray passes it on with a prefix of its own), as library warnings do now
    # and then: the test does not depend on whether one happens to.
    said = "a line from a worker"
    run = cli("sweep", "preset=smoke", "rules=[faulty]", f"trial.hp.say={said}", "progress=true", f"root={tmp_path}",
              "--json", timeout=900, BIOPLAUS_PROGRESS_EVERY_S="0", **FAULTY_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    assert said in run.stderr  # the workers' output reached the pipe ...
    assert ESC not in run.stdout + run.stderr  # ... in plain text, as the progress lines
    summary = json.loads(run.stdout)
    assert summary["status"] == "complete" and summary["folder"] == str(tmp_path / "smoke")
    (cell,) = summary["cells"]
    assert (cell["rule"], cell["trials"], cell["n_seeds"]) == ("faulty", 2, 2)
    assert "tuning 2/2" in run.stderr and "finals 2/2" in run.stderr  # the plain progress lines
