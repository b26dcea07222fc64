"""The report's "Cost estimate vs actual" section: the device-hours the sweep's manifest estimated before
launch (orchestrator/sweep/estimate.py) beside what its runs took.

What the runs record is their training time (``train_seconds``: the training steps, no set-up and no
evaluation), so the comparison is of training device-hours: the estimate's training part (steps x step time,
over the same sharing gain) against the runs' summed ``train_seconds`` over the trials sharing a device. The
tuning trials' mean epochs against ASHA's expected number checks the pruning model.
"""

from __future__ import annotations

import json

import polars as pl

from bioplaus.analysis.load import SweepData
from bioplaus.analysis.report_format import Section, fmt


def manifest_estimate(d: SweepData) -> dict | None:
    """The estimate the sweep's manifest recorded (None: an older sweep, or no manifest)."""
    if d.manifest is None:
        return None
    row = d.manifest.collect().row(0, named=True)
    try:
        return json.loads(row.get("estimate_json") or "null")
    except ValueError:
        return None


def actual_by_cell(d: SweepData) -> dict[str, dict]:
    """Per cell key: summed train seconds of its tuning trials and final runs, and its trials' mean epochs."""
    out: dict[str, dict] = {}
    for name, lf in (("tune", d.trials), ("final", d.final_runs)):
        if lf is None:
            continue
        df = lf.select("rule", "arch", "dataset", "train_seconds", "epochs_run").collect()
        per = df.group_by("rule", "arch", "dataset").agg(pl.col("train_seconds").fill_null(0).sum(),
                                                         pl.col("epochs_run").mean())
        for r in per.iter_rows(named=True):
            row = out.setdefault(f"{r['rule']}.{r['arch']}.{r['dataset']}", {"train_s": 0.0, "epochs": None})
            row["train_s"] += r["train_seconds"] or 0.0
            if name == "tune":
                row["epochs"] = r["epochs_run"]
    return out


def estimate_section(d: SweepData) -> Section | None:
    """None when the manifest holds no estimate at all; a one-note section when it says why there is none."""
    est = manifest_estimate(d)
    if est is None:
        return None
    if est.get("status") != "ok":
        return Section("Cost estimate vs actual", notes=[f"No estimate was recorded: {est.get('status')}"])
    actual = actual_by_cell(d)
    share = 1 / max(1, est.get("packing", 1))
    rows, est_total, act_total = [], 0.0, 0.0
    for r in sorted(est["cells"], key=lambda r: r["cell"]):
        a = actual.get(r["cell"])
        act = a["train_s"] * share / 3600 if a else None
        est_total += r["train_device_hours"]
        act_total += act or 0.0
        ratio = act / r["train_device_hours"] if act and r["train_device_hours"] else None
        rows.append([r["cell"], fmt(r["device_hours"]), fmt(r["train_device_hours"]), fmt(act),
                     fmt(ratio, 2) + "×" if ratio else "—", fmt(a["epochs"] if a else None, 1)])
    rows.append(["total", fmt(est["device_hours"]), fmt(est_total), fmt(act_total),
                 fmt(act_total / est_total, 2) + "×" if est_total and act_total else "—", ""])
    notes = [f"Estimated before launch from the calibration {est.get('calibration')} ({est.get('device')}; "
             f"{est.get('packing')} trial(s) per device, population {est.get('population')}); ASHA's expected "
             f"epochs per tuning trial {fmt(est.get('expected_epochs_per_trial'), 1)}. Device-h: the whole "
             "estimate (set-up and evaluation included); training device-h: its training steps alone, comparable "
             "with the runs' own train_seconds, summed over tuning trials and final runs and divided by the "
             "trials sharing a device."]
    return Section("Cost estimate vs actual", header=["cell", "est. device-h", "est. training device-h",
                                                      "actual training device-h", "actual / est.",
                                                      "epochs per tuning trial"], rows=rows, notes=notes)
