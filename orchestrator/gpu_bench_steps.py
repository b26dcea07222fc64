"""The GPU bench's steps (orchestrator/gpu_bench.py): each takes the bench's sizes, a shared context (the
output folder, what earlier steps left) and a log, and returns its numbers with ``lines`` of Markdown."""

from __future__ import annotations

import os
import platform
import time
import warnings

import torch
from omegaconf import OmegaConf

from bioplaus.orchestrator.calibrate import prepare, sync
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.data.synthetic import split_sizes, synthetic_splits
from bioplaus.orchestrator.errors import DataError
from bioplaus.orchestrator.packing import CASES, UtilisationSampler, curve_lines, measure_packing, saturation
from bioplaus.orchestrator.pipeline_model import Link, host_link, prediction_lines, predictions, profile_blocks
from bioplaus.orchestrator.spec import resolve
from bioplaus.orchestrator.speedups import time_modes
from bioplaus.orchestrator.training import epoch_order
from bioplaus.orchestrator.trial import load_splits, run_trial


def _spec(overrides, sizes):
    return resolve(parse_overrides([*overrides, *sizes.extra, "out=null", "data.download=false"]))


def environment(sizes, ctx, log) -> dict:
    """The device and software, and what a batch of the device-resident input path costs the host."""
    device = torch.device(sizes.device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count()}
    try:
        import ray  # noqa: F401  (only whether it is there)

        info["ray"] = "installed"
    except ImportError:
        info["ray"] = "not installed (not needed here)"
    checks = {augment: _input_path(sizes, augment) for augment in ("crop_flip", "affine")}
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
    lines += [f"| input path, {a} | order on {c['order_device']}, augmentation on {c['augment_device']}, "
              f"{c['host_syncs']} host synchronisations in {c['batches']} batches |" for a, c in checks.items()]
    return {**info, "input_path": checks, "lines": lines}


def _input_path(sizes, augment: str, batches: int = 20) -> dict:
    """Build ``batches`` augmented batches (and the epoch order) on the device, counting the host
    synchronisations CUDA's sync debug mode reports (none expected: nothing is drawn or copied on the host)."""
    trial = prepare(_spec(["rule=bp", "arch=mlp", "dataset=mnist", f"data.augment={augment}"], sizes), "synthetic")
    sync(trial.device)
    cuda = trial.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            perm = epoch_order(trial.plan)
            for b in range(min(batches, trial.plan.steps)):
                trial.feed.batch(perm[b * trial.plan.batch:(b + 1) * trial.plan.batch])
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught) if cuda else "n/a (cpu)"
    return {"order_device": str(trial.plan.order.device), "augment_device": str(trial.feed.aug_gen.device),
            "host_syncs": syncs, "batches": min(batches, trial.plan.steps)}


def single_trial_step(sizes, ctx, log) -> dict:
    """One trial through ``run_trial`` on its real data, with the device's utilisation meanwhile."""
    spec = _spec(sizes.trial, sizes)
    try:
        splits = load_splits(spec.cfg)
    except DataError as e:
        return {"status": "skipped", "reason": f"no real data for {spec.cfg.dataset}: {e}"}
    record, util = UtilisationSampler().around(lambda: run_trial(spec, splits=splits))
    keys = ("status", "samples_per_second", "train_seconds", "val_acc", "test_acc", "epochs_run", "peak_mem_mb",
            "device", "n_train")
    row = {k: record.get(k) for k in keys} | util
    lines = [f"`{' '.join(sizes.trial)}` (seed 0, {record['n_train']} training images): "
             f"{record['samples_per_second']:.0f} samples/s, {record['train_seconds']:.1f} s training, val "
             f"{record['val_acc']:.4f}, test {record['test_acc']:.4f}; GPU utilisation "
             f"{util.get('gpu_util_mean', float('nan')):.0f} % (mean), peak memory {record['peak_mem_mb']:.0f} MB"]
    return {**row, "lines": lines}


def packing_step(sizes, ctx, log) -> dict:
    """The packed-trial curve of each case; the curves join the calibration (the estimate reads them)."""
    from bioplaus.orchestrator.sweep.estimate import add_curves

    results = []
    for case in sizes.packing_cases:
        log(f"   packing {case}: N = {', '.join(map(str, sizes.packing_counts))}")
        results.append(measure_packing([*CASES[case], *sizes.packing_extra, *sizes.extra],
                                       list(sizes.packing_counts), sizes.packing_window_s))
    add_curves(ctx["out"] / "calibration.json", "packing", results)
    lines = []
    for r in results:
        best = max(r["points"], key=lambda p: p["samples_per_s"])
        r["best_n"], r["saturates_at_n"] = best["n"], saturation(r["points"])
        lines += curve_lines(r) + [f"best N = {best['n']}; 90 % of the best reached at N = {r['saturates_at_n']}", ""]
    return {"cases": results, "lines": lines}


def population_step(sizes, ctx, log) -> dict:
    """A P-member population against P = 1 (per-member throughput), where the population trainer exists."""
    try:
        from bioplaus.orchestrator.population import run_population
    except ImportError:
        return {"status": "skipped", "reason": "skipped: this checkout has no population trainer "
                                               "(orchestrator/population.py, run_population)"}
    base = _spec(sizes.population_trial, sizes)
    try:
        splits = load_splits(base.cfg)
    except DataError:
        n = split_sizes(base.cfg.dataset, base.cfg.data)
        splits = synthetic_splits(base.cfg.dataset, n["train"], n["val"], n["test"])
    lr = float(getattr(base.hp, "lr", 1e-3))
    rows, sampler = [], UtilisationSampler()
    for p in sizes.population_sizes:
        specs = [_spec([*sizes.population_trial, f"hp.lr={lr * 2 ** (i / max(1, p - 1) - 0.5):.6g}"], sizes)
                 for i in range(p)]
        tick = time.perf_counter()
        records, util = sampler.around(lambda specs=specs: run_population(specs, splits=splits))
        wall = time.perf_counter() - tick
        samples = sum(r["n_train"] * r["epochs_run"] for r in records)
        rows.append({"members": p, "wall_s": wall, "samples_per_s": samples / wall, **util})
    one = rows[0]["samples_per_s"]
    lines = ["| members P | wall s | samples/s (all members) | x one trial | goal 0.7 P | GPU util % |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['members']} | {r['wall_s']:.1f} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / one:.2f} | "
              f"{0.7 * r['members']:.1f} | {r.get('gpu_util_mean', float('nan')):.0f} |" for r in rows]
    return {"rows": rows, "lines": [f"`{' '.join(sizes.population_trial)}`, members differ in hp.lr; wall time "
                                    "includes evaluation"] + lines}


def estimate_step(sizes, ctx, log) -> dict:
    """Calibrate the preset's cells here, and its device-hours for each number of trials per device."""
    from bioplaus.orchestrator.sweep import parse_sweep, plan_cells
    from bioplaus.orchestrator.sweep.estimate import (calibrate, estimate_lines, load_calibration, save_calibration,
                                                      sweep_estimate)

    cfg = parse_sweep([*sizes.preset, *(f"trial.{o}" for o in sizes.extra)])
    cells, _ = plan_cells(cfg)
    log(f"   calibrating {len(cells)} cells of {' '.join(sizes.preset)}")
    fresh = calibrate(cfg, cells, "synthetic", sizes.calibrate_steps, sizes.calibrate_seconds,
                      warmup=sizes.calibrate_warmup)
    calibration = load_calibration(save_calibration(fresh, ctx["out"] / "calibration.json"))
    own = sweep_estimate(cfg, cells, calibration)
    totals = []
    for n in sizes.packings:
        alt = cfg.copy()
        OmegaConf.update(alt, "resources.gpus_per_trial", 1.0 / n)
        OmegaConf.update(alt, "ray.num_cpus", n)  # on a CPU: n one-CPU trials at once
        totals.append({"trials_per_device": n, "device_hours": sweep_estimate(alt, cells, calibration)["device_hours"]})
    lines = estimate_lines(own)[:22] + ["", "| trials per device | device-hours |", "|---|---|"]
    lines += [f"| {t['trials_per_device']}{' (preset)' if t['trials_per_device'] == own['packing'] else ''} | "
              f"{t['device_hours']:.2f} |" for t in totals]
    return {"device_hours": own["device_hours"], "packing": own["packing"], "by_packing": totals,
            "expected_epochs_per_trial": own["expected_epochs_per_trial"], "cells": own["cells"], "lines": lines}


def pipeline_step(sizes, ctx, log) -> dict:
    """Per-block times on this device and the model's predictions for K = 1..8 (host link; and a free link)."""
    out, lines = [], []
    for batch in sizes.pipeline_batches:
        spec = _spec([*sizes.pipeline, f"train.batch_size={batch}"], sizes)
        trial = prepare(spec, "synthetic")
        profile = profile_blocks(trial)
        link = Link(host_link(trial.device).bytes_per_s, sizes.message_ms / 1e3)
        steps = split_sizes(spec.cfg.dataset, spec.cfg.data)["train"] // batch
        rows = predictions(profile, link, 8, steps)
        free = predictions(profile, Link(float("inf"), 0.0), 8, steps)
        out.append({"batch": batch, "link_bytes_per_s": link.bytes_per_s, "message_s": link.message_s,
                    "profile": vars(profile), "predictions": rows, "free_link": free})
        lines += [f"batch {batch}, chunk 8, {steps} micro-batches per epoch; link through the host "
                  f"{link.bytes_per_s / 1e9:.1f} GB/s per side + {sizes.message_ms} ms per message:"]
        lines += prediction_lines(profile, rows)
        lines += ["efficiency with a free link (no transfer, no message cost): "
                  + ", ".join(f"K={r['k']} {r['efficiency']:.2f}" for r in free), ""]
    return {"batches": out, "lines": lines}


def speedups_step(sizes, ctx, log) -> dict:
    """bf16 autocast and torch.compile for bp, against fp32 eager on the same weights and batches."""
    cases, lines = [], ["| case | mode | samples/s | x fp32 | first 20 steps s | loss rel. diff vs fp32 |",
                        "|---|---|---|---|---|---|"]
    for case in sizes.speed_cases:
        rows = time_modes(_spec(case, sizes), sizes.speed_steps, sizes.compile_backend, modes=sizes.speed_modes)
        cases.append({"case": list(case), "rows": rows})
        lines += [f"| {' '.join(case)} | {r['mode']} | {r['samples_per_s']:.0f} | {r['speedup']:.2f} | "
                  f"{r['first_steps_s']:.1f} | {r['loss_rel_diff_vs_fp32']:.1e} |" for r in rows]
    return {"cases": cases, "lines": lines}
