"""The real command line: JSON output, rule listing, and one-line exit-2 errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "bioplaus"


def cli(*args, timeout=300):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout)


def test_train_json_prints_the_final_metrics_as_the_last_stdout_line(tmp_path):
    out = cli("train", "rule=bp", "arch=mlp", "dataset=digits", "smoke=true", "train.epochs=2", "seed=1",
              f"out={tmp_path / 'res'}", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("rule", "arch", "dataset", "seed", "status", "epochs", "val_acc", "test_acc", "train_seconds",
                "samples_per_second"):
        assert key in result
    assert result["status"] == "ok" and result["epochs"] == 2 and result["seed"] == 1
    assert list((tmp_path / "res" / "runs" / "rule=bp" / "arch=mlp" / "dataset=digits").glob("*.parquet"))


def test_train_shows_progress_and_a_summary_without_json(tmp_path):
    out = cli("train", "smoke=true", "out=null")
    assert out.returncode == 0 and "epoch 1:" in out.stderr and out.stdout.startswith("ok: test_acc=")
    quiet = cli("train", "smoke=true", "out=null", "--quiet")
    assert quiet.returncode == 0 and "epoch 1" not in quiet.stderr


def test_rules_lists_criteria_and_architectures():
    out = cli("rules", "--json")
    rules = {r["name"]: r for r in json.loads(out.stdout)}
    assert rules["bp"]["criteria"]["C1"]["holds"] is False and rules["bp"]["archs"]["deep_cnn"] is None
    assert rules["bp"]["hparams"]["lr"] == 1e-3
    assert "bp" in cli("rules").stdout


BAD_INPUTS = [
    (["train", "rule=nope"], "unknown rule 'nope'"),
    (["train", "arch=transformer"], "unknown arch 'transformer'"),
    (["train", "dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["train", "rule"], "malformed override 'rule'"),
    (["train", "train.epochs=three"], "train.epochs"),
    (["train", "train.epochz=3"], "epochz"),
    (["train", "hp.lrr=0.1"], "hp: .*lrr.*valid keys: lr"),
    (["train", "hp.lr=-1"], "hp.lr=-1.0 must be > 0"),
    (["train", "model.widths=oops"], "model"),
    (["train", "train.epochs=0"], "train.epochs=0 must be >= 1"),
    (["train", "data.val_fraction=1.5"], "data.val_fraction"),
    (["train", "train.device=cuda:0"] , "CUDA is not available"),
    (["train", "dataset=mnist", "data.mirror=http://127.0.0.1:9"], "cannot download .* data.root"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_no_traceback(args, message, tmp_path):
    import re

    out = cli(*args, f"data.root={tmp_path}") if args[0] == "train" else cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bioplaus: error: "), out.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in out.stderr
