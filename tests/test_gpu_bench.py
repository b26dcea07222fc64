"""The one-step GPU bench, dry-run on the CPU with tiny sizes (``--cpu-smoke``) where Ray, Optuna, Polars and
W&B cannot be imported (as on the lent GPU machine); and the optional speed-ups' parity on digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.spec import resolve
from bioplaus.orchestrator.speedups import fit_accuracy

ABSENT = ("ray", "optuna", "polars", "wandb")


def test_cpu_smoke_runs_every_step_without_ray(tmp_path):
    blocked = tmp_path / "absent"
    for name in ABSENT:  # packages that refuse to import, in this process's children too
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bioplaus.orchestrator.gpu_bench", "--cpu-smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert (out / "gpu_bench.json").is_file(), proc.stderr[-3000:]
    results = json.loads((out / "gpu_bench.json").read_text())
    steps = results["steps"]
    assert proc.returncode == 0, {k: v.get("error") for k, v in steps.items()} or proc.stderr[-3000:]
    assert list(steps) == ["environment", "single_trial", "packing", "population", "pipeline_model", "estimate",
                           "speedups"]
    assert all(s["status"] == "ok" for n, s in steps.items() if n != "population")
    assert steps["population"]["status"] in ("ok", "skipped")
    assert steps["environment"]["ray"].startswith("not installed")
    assert {c["order_device"] for c in steps["environment"]["input_path"].values()} == {"cpu"}
    assert steps["single_trial"]["samples_per_second"] > 0 and steps["single_trial"]["test_acc"] >= 0
    curve = steps["packing"]["cases"][0]["points"]
    assert [p["n"] for p in curve] == [1, 2] and all(p["samples_per_s"] > 0 for p in curve)
    assert steps["estimate"]["device_hours"] > 0
    assert [t["trials_per_device"] for t in steps["estimate"]["by_packing"]] == [1, 2]
    calibration = json.loads((out / "calibration.json").read_text())
    assert set(calibration["cells"]) == {"bp.mlp.digits", "pc.mlp.digits"} and "bp.mlp.mnist" in calibration["packing"]
    ks = [r["k"] for r in steps["pipeline_model"]["batches"][0]["predictions"]]
    assert ks == [1, 2, 3, 4]
    modes = {r["mode"]: r for r in steps["speedups"]["cases"][0]["rows"]}
    assert modes["compile"]["loss_rel_diff_vs_fp32"] == 0  # the eager backend computes exactly what eager does
    assert 0 < modes["bf16"]["loss_rel_diff_vs_fp32"] < 0.1
    assert "## speedups" in (out / "gpu_bench.md").read_text()


def test_the_bench_refuses_to_run_without_a_gpu_unless_told_to_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from bioplaus.orchestrator.gpu_bench import main

    assert main(["--out", str(tmp_path / "out")]) == 2


def _digits(*extra: str):
    return resolve(parse_overrides(["rule=bp", "arch=mlp", "dataset=digits", "model.widths=[64]", "train.epochs=5",
                                    "train.threads=1", "out=null", "train.device=cpu", *extra]))


def test_bf16_autocast_and_compile_keep_bps_accuracy_on_digits():
    fp32 = fit_accuracy(_digits(), "fp32")
    assert fp32 > 0.8
    assert abs(fit_accuracy(_digits(), "bf16") - fp32) <= 0.04  # 144 validation images: 0.04 is 6 of them
    # a compiled graph computes the same function; with the eager backend exactly the same numbers
    assert fit_accuracy(_digits(), "compile", backend="eager") == fp32


def test_packing_curve_saturation_and_case_keys():
    from bioplaus.orchestrator.packing import CASES, case_key, saturation

    points = [{"n": 1, "samples_per_s": 100.0}, {"n": 2, "samples_per_s": 190.0}, {"n": 4, "samples_per_s": 300.0},
              {"n": 8, "samples_per_s": 320.0}, {"n": 16, "samples_per_s": 310.0}]
    assert saturation(points) == 4  # 300 >= 0.9 x 320
    assert saturation(points, fraction=1.0) == 8
    assert case_key(CASES["bp-cnn-cifar10"]) == "bp.cnn.cifar10"
