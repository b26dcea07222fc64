"""``bioplaus cells --estimate``: a calibration on this device, saved and reused; the estimate a sweep records
in its manifest, and the report's estimate-vs-actual section."""

from __future__ import annotations

import contextlib
import io
import json
import time

import pytest

from bioplaus.orchestrator import cli
from bioplaus.orchestrator.cost_model import asha_expected_epochs

SMOKE_BP = ["preset=smoke", "rules=[bp,fa]", "ray.num_cpus=2"]


def _cells_estimate(*args: str) -> tuple[int, dict, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["cells", *SMOKE_BP, "--estimate", *args, "--json"])
    return code, json.loads(out.getvalue()) if code == 0 else {}, err.getvalue()


def test_estimate_calibrates_saves_and_then_reads_the_calibration(tmp_path, monkeypatch):
    cal = tmp_path / "cal.json"
    code, est, err = _cells_estimate("--calibration", str(cal), "--calibrate-steps", "1", "--calibrate-seconds", "0")
    assert code == 0, err
    assert {r["cell"] for r in est["cells"]} == {"bp.mlp.digits", "fa.mlp.digits"}
    stored = json.loads(cal.read_text())
    assert stored["device_type"] == "cpu" and set(stored["cells"]) == {"bp.mlp.digits", "fa.mlp.digits"}
    assert all(row["step_s"] > 0 and row["batch"] == 64 for row in stored["cells"].values())
    # smoke: 400 images, 10 % for validation, batches of 64 -> 5 steps per epoch
    assert {r["steps_per_epoch"] for r in est["cells"]} == {5}
    assert est["device_hours"] == pytest.approx(sum(r["device_hours"] for r in est["cells"]))
    assert est["device_hours"] > 0

    import bioplaus.orchestrator.sweep.estimate as estimate_module

    def no_calibration(*a, **k):
        raise AssertionError("a stored calibration must be read, not redone")

    monkeypatch.setattr(estimate_module, "calibrate", no_calibration)
    code, again, err = _cells_estimate("--calibration", str(cal))
    assert code == 0, err
    assert again["device_hours"] == est["device_hours"]


def test_estimate_flags_refuse_bad_values_in_one_line(tmp_path):
    code, _, err = _cells_estimate("--calibrate-steps", "0")
    assert code == 2 and err.count("\n") == 1 and "--calibrate-steps" in err


def _fake_calibration(path, step_s=0.01) -> None:
    path.write_text(json.dumps({"device": "fake device", "device_type": "cpu", "created_at": time.time(),
                                "cells": {"bp.mlp.digits": {"step_s": step_s, "batch": 64, "eval_s_per_sample": 0.0,
                                                            "setup_s": 0.0}}}))


def test_sweep_manifest_records_the_estimate_and_the_report_sets_it_beside_the_runs(tmp_path, monkeypatch):
    from bioplaus.analysis.load import load_sweep
    from bioplaus.analysis.report_estimate import estimate_section
    from bioplaus.orchestrator.results import write_run
    from bioplaus.orchestrator.sweep import Sweep, parse_sweep

    _fake_calibration(tmp_path / "cal.json")
    monkeypatch.setenv("BIOPLAUS_CALIBRATION", str(tmp_path / "cal.json"))
    s = Sweep(parse_sweep(["preset=smoke", "rules=[bp]", "ray.num_cpus=2", f"root={tmp_path}", "name=est"]))
    s.write_manifest("complete", time.time())
    manifest = json.loads((s.dir / "manifest.json").read_text())
    est = json.loads(manifest["estimate_json"])
    assert est["status"] == "ok" and est["packing"] == 2
    # 2 trials x ASHA's expected epochs + 2 final seeds x 2 epochs, 5 steps of 10 ms each, two trials per device
    epochs = 2 * asha_expected_epochs(2, 2, 1, 3) + 2 * 2
    assert manifest["estimate_device_hours"] == pytest.approx(epochs * 5 * 0.01 / 3600)

    cell = {"rule": "bp", "arch": "mlp", "dataset": "digits", "seed": 0, "status": "ok", "epochs": []}
    write_run(s.dir, {**cell, "phase": "tune", "trial_number": 0, "train_seconds": 30.0, "epochs_run": 2},
              run_id="bp.mlp.digits.t0", runs_table="trials")
    write_run(s.dir, {**cell, "phase": "tune", "trial_number": 1, "train_seconds": 10.0, "epochs_run": 1},
              run_id="bp.mlp.digits.t1", runs_table="trials")
    write_run(s.dir, {**cell, "phase": "final", "seed": 1000, "train_seconds": 32.0}, run_id="bp.mlp.digits.f",
              runs_table="final_runs")
    section = estimate_section(load_sweep(s.dir))
    row = section.rows[0]
    assert row[0] == "bp.mlp.digits"
    assert float(row[3]) == pytest.approx(round(72.0 / 2 / 3600, 3))  # train seconds over the 2 trials per device
    assert float(row[5]) == pytest.approx(1.5)  # the tuning trials' mean epochs


def test_a_sweep_without_calibration_says_why(tmp_path, monkeypatch):
    from bioplaus.analysis.load import load_sweep
    from bioplaus.analysis.report_estimate import estimate_section
    from bioplaus.orchestrator.results import write_run
    from bioplaus.orchestrator.sweep import Sweep, parse_sweep

    monkeypatch.setenv("BIOPLAUS_CALIBRATION", str(tmp_path / "absent.json"))
    s = Sweep(parse_sweep(["preset=smoke", "rules=[bp]", f"root={tmp_path}", "name=none"]))
    s.write_manifest("complete", time.time())
    write_run(s.dir, {"rule": "bp", "arch": "mlp", "dataset": "digits", "seed": 0, "status": "ok", "phase": "tune",
                      "trial_number": 0, "epochs": []}, run_id="bp.mlp.digits.t0", runs_table="trials")
    section = estimate_section(load_sweep(s.dir))
    assert not section.rows and "no calibration found" in section.notes[0]


def test_a_compute_budget_estimate_gives_each_cell_the_epochs_its_counted_flops_buy(tmp_path):
    # budget.kind=compute: budget.epochs are bp-epochs, so a rule dearer per sample than bp gets fewer of its own
    # epochs (and a cheaper one more); the estimate must price those, not budget.epochs for every cell.
    from bioplaus.orchestrator.sweep import parse_sweep, plan_cells
    from bioplaus.orchestrator.sweep.budget import ComputeBudgets, epochs_for
    from bioplaus.orchestrator.sweep.estimate import first_point, sweep_estimate

    rules = ["bp", "weight_perturbation"]
    calibration = {"device": "fake device", "device_type": "cpu", "cells": {
        f"{r}.mlp.digits": {"step_s": 0.01, "batch": 64, "eval_s_per_sample": 0.0, "setup_s": 0.0} for r in rules}}
    common = ["preset=smoke", f"rules=[{','.join(rules)}]", "ray.num_cpus=2", "budget.epochs=6",
              "budget.final_epochs=4", "budget.grace_epochs=6"]
    by_epochs = parse_sweep(common)
    by_compute = parse_sweep([*common, "budget.kind=compute"])
    cells, _ = plan_cells(by_compute)
    flat = {r["cell"]: r for r in sweep_estimate(by_epochs, cells, calibration)["cells"]}
    est = sweep_estimate(by_compute, cells, calibration)
    rows = {r["cell"]: r for r in est["cells"]}
    assert est["budget_kind"] == "compute"
    assert rows["bp.mlp.digits"]["tuning_epochs_scale"] == 1.0 and rows["bp.mlp.digits"]["final_epochs_scale"] == 1.0
    cell = next(c for c in cells if c.rule == "weight_perturbation")
    cost = ComputeBudgets(by_compute).plan(cell, first_point(by_compute, cell), 0, 6)[1].cost_vs_bp
    own = {b: epochs_for(b, cost, by_compute.budget.max_epochs_factor) for b in (6, 4)}
    assert own[6] != 6  # the case only tests something if the rule's cost differs from bp's
    row = rows[cell.key]
    assert row["tuning_epochs_scale"] == pytest.approx(own[6] / 6)
    assert row["final_epochs_scale"] == pytest.approx(own[4] / 4)
    # no ASHA stop (grace = max): every trial runs its whole budget; the training time scales with the epochs
    b = by_compute.budget
    assert row["train_s"] == pytest.approx(flat[cell.key]["train_s"] * (b.trials * own[6] + b.final_seeds * own[4])
                                           / (b.trials * 6 + b.final_seeds * 4))
