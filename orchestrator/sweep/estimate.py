"""A sweep's cost before it runs: calibrate its cells on this machine's device, estimate its device-hours.

``bioplaus cells preset=paper --estimate`` times a few training steps of every runnable cell (its first
trial's configuration: the rule's defaults, the preset's model and data settings) on the current device
(orchestrator/calibrate.py), saves that calibration under ``runs/calibration/``, and estimates the budget's
device-hours (orchestrator/cost_model.py). A sweep records the estimate of the calibration it finds
(``$BIOPLAUS_CALIBRATION``, else the newest calibration in ``runs/calibration/`` made on the kind of device
its trials ask for) in its manifest, and the report sets it beside what the runs took. Under
``budget.kind=compute`` a cell's epochs follow from its counted training FLOPs (orchestrator/sweep/budget.py):
the estimate counts them at each cell's first point, as the sweep does before it starts.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from bioplaus.algorithms.registry import load_rules
from bioplaus.orchestrator.calibrate import device_name, time_cell
from bioplaus.orchestrator.config import to_plain
from bioplaus.orchestrator.cost_model import Budget, CellCost, estimate
from bioplaus.orchestrator.data.synthetic import SHAPES, split_sizes
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.search_space import defaults_in_space, searched_space
from bioplaus.orchestrator.sweep.budget import ComputeBudgets
from bioplaus.orchestrator.sweep.cells import Cell, trial_config, trial_spec

CALIBRATION_DIR = Path("runs/calibration")
CURVES = ("cells", "packing", "population")  # the tables of a calibration file, merged cell by cell
Log = Callable[[str], None]


def first_point(cfg: DictConfig, cell: Cell) -> dict:
    """A cell's first tuning trial's hyperparameters: the rule's defaults in its space (pinned hp stay pinned)."""
    rule_cls = load_rules()[cell.rule]
    return defaults_in_space(rule_cls, searched_space(rule_cls, set(to_plain(cfg.trial.hp))), cell.arch)


def first_trial_config(cfg: DictConfig, cell: Cell) -> dict:
    """The plain trial config of a cell's first tuning trial."""
    return trial_config(cfg, cell, first_point(cfg, cell), cfg.seed, cfg.budget.epochs)


def calibrate(cfg: DictConfig, cells: list[Cell], data: str = "synthetic", min_steps: int = 5,
              min_seconds: float = 0.0, log: Log = lambda m: None, warmup: int = 2) -> dict:
    """Time every cell on this device; the calibration document (see :func:`save_calibration`)."""
    rows, errors, device = {}, {}, None
    for cell in cells:
        if data == "synthetic" and cell.dataset not in SHAPES:
            raise UsageError(f"cell {cell.key}: dataset {cell.dataset} has no synthetic stand-in; calibrate with "
                             "--calibrate-data real")
    for i, cell in enumerate(cells):
        try:
            row = time_cell(trial_spec(first_trial_config(cfg, cell)), data=data, warmup=warmup,
                            min_steps=min_steps, min_seconds=min_seconds)
        except Exception as e:  # a cell that cannot be timed here (out of memory, ...) is left out, and named
            errors[cell.key] = f"{type(e).__name__}: {e}"
            log(f"calibration of {cell.key} failed: {errors[cell.key]}")
            continue
        rows[cell.key] = row
        device = device or torch.device(row["device"])
        log(f"calibrated {i + 1}/{len(cells)} {cell.key}: {row['step_s'] * 1e3:.2f} ms per step of {row['batch']}")
    device = device or torch.device("cpu")
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "created_at": time.time(), "data": data, "cells": rows, "errors": errors, "packing": {},
            "population": {}}


def calibration_file(calibration: dict) -> Path:
    """Where a calibration made on its device is kept: ``runs/calibration/<device>.json``."""
    slug = re.sub(r"[^a-z0-9]+", "-", calibration["device"].lower()).strip("-")
    return CALIBRATION_DIR / f"{slug or 'device'}.json"


def save_calibration(calibration: dict, path: Path) -> Path:
    """Write a calibration, merged into the file's earlier one (cells and curves measured before and not now
    are kept, so the packed-trial curve and several presets' cells can share one file)."""
    old = load_calibration(path) if path.is_file() else {}
    merged = {"cells": {}, **old, **{k: v for k, v in calibration.items() if k not in CURVES}}
    for key in CURVES:
        merged[key] = {**old.get(key, {}), **calibration.get(key, {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return path


def load_calibration(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"calibration file {path} cannot be read ({e}); calibrate again with "
                         "`bioplaus cells ... --estimate`") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cells"), dict):
        raise UsageError(f"calibration file {path} has no 'cells' table; calibrate again with "
                         "`bioplaus cells ... --estimate`")
    return doc


def add_curves(path: str | Path, kind: str, results: list[dict]) -> Path:
    """Add measured sharing curves (``kind`` "packing" or "population": results with a ``case`` cell key, a
    ``device`` and ``points`` of ``n`` and ``samples_per_s``) to the calibration file at ``path``."""
    path = Path(path)
    device = torch.device(results[0]["device"]) if results else torch.device("cpu")
    curves = {r["case"]: {str(p["n"]): p["samples_per_s"] for p in r["points"]} for r in results}
    doc = {"device": device_name(device), "device_type": device.type, "created_at": time.time(), kind: curves}
    return save_calibration(doc, path)


def find_calibration(cfg: DictConfig) -> Path | None:
    """The calibration a sweep's estimate uses: ``$BIOPLAUS_CALIBRATION``, else the newest file in
    ``runs/calibration/`` made on a GPU when the sweep's trials ask for GPUs (on a CPU otherwise)."""
    if os.environ.get("BIOPLAUS_CALIBRATION"):
        return Path(os.environ["BIOPLAUS_CALIBRATION"])
    want = "cuda" if cfg.resources.gpus_per_trial > 0 else "cpu"
    found = []
    for path in CALIBRATION_DIR.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("device_type") == want:
            found.append((doc.get("created_at", 0), path))
    return max(found)[1] if found else None


def budget_of(cfg: DictConfig) -> Budget:
    b = cfg.budget
    return Budget(b.trials, b.epochs, b.grace_epochs, b.reduction_factor, b.final_seeds, b.final_epochs or b.epochs)


def packing_of(cfg: DictConfig, device_type: str) -> int:
    """Trials sharing one device: 1 / gpus_per_trial on a GPU, the CPUs over cpus_per_trial on a CPU."""
    res = cfg.resources
    if device_type == "cuda":
        return max(1, int(1 / res.gpus_per_trial + 1e-9)) if 0 < res.gpus_per_trial < 1 else 1
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    return max(1, int(cpus / res.cpus_per_trial + 1e-9))


def epochs_scales(cfg: DictConfig, cell: Cell, budgets: ComputeBudgets | None) -> tuple[float, float]:
    """(tuning, final) own epochs per budget epoch of ``cell`` at its first point: 1 under budget.kind=epochs;
    under compute, what its counted FLOPs give (a UsageError names a rule that cannot be counted)."""
    if budgets is None:
        return 1.0, 1.0
    b = cfg.budget
    point = first_point(cfg, cell)
    final_budget = b.final_epochs or b.epochs
    tuning = budgets.plan(cell, point, cfg.seed, b.epochs)[1].epochs / b.epochs
    return tuning, budgets.plan(cell, point, cfg.seed, final_budget)[1].epochs / final_budget


def sweep_estimate(cfg: DictConfig, cells: list[Cell], calibration: dict,
                   budgets: ComputeBudgets | None = None) -> dict:
    """The device-hours of ``cells`` under ``cfg``'s budget and resources, from ``calibration``. Under
    budget.kind=compute the cells' FLOPs are counted with ``budgets`` (a new counter when None)."""
    if cfg.budget.kind == "compute" and budgets is None:
        budgets = ComputeBudgets(cfg)
    costs, missing = {}, []
    for cell in cells:
        row = calibration["cells"].get(cell.key)
        if row is None:
            missing.append(cell.key)
            continue
        sizes = split_sizes(cell.dataset, cfg.trial.data) if cell.dataset in SHAPES else None
        if sizes is None:
            missing.append(cell.key)
            continue
        batch = min(int(cfg.trial.train.batch_size), sizes["train"])
        costs[cell.key] = CellCost(row["step_s"], sizes["train"] // batch, sizes["val"], sizes["test"],
                                   row.get("eval_s_per_sample", 0.0), row.get("setup_s", 0.0),
                                   *epochs_scales(cfg, cell, budgets))
    population = int(OmegaConf.select(cfg, "resources.population", default=1) or 1)
    packing = packing_of(cfg, calibration.get("device_type", "cpu"))
    out = estimate(costs, budget_of(cfg), packing, population, calibration.get("packing"),
                   calibration.get("population"))
    return {"device": calibration.get("device"), "device_type": calibration.get("device_type"),
            "budget_kind": cfg.budget.kind, "cells_estimated": len(costs), "cells_missing": missing, **out}


def manifest_estimate(cfg: DictConfig, cells: list[Cell], budgets: ComputeBudgets | None = None) -> dict:
    """The manifest's estimate columns: total device-hours (NaN without a calibration) and the estimate as
    JSON (per cell, with the calibration it came from, or why there is none). ``budgets``: the sweep's FLOP
    counts under budget.kind=compute (already counted, so this stays arithmetic)."""
    path = find_calibration(cfg)
    if path is None or not Path(path).is_file():
        why = f"no calibration found ({path or CALIBRATION_DIR}); run `bioplaus cells ... --estimate` first"
        return {"estimate_device_hours": float("nan"), "estimate_json": json.dumps({"status": why})}
    try:
        est = sweep_estimate(cfg, cells, load_calibration(path), budgets)
    except UsageError as e:
        return {"estimate_device_hours": float("nan"), "estimate_json": json.dumps({"status": str(e)})}
    keep = ("cell", "device_hours", "train_device_hours", "step_s", "packing_speedup", "population_speedup",
            "tuning_epochs_scale", "final_epochs_scale")
    est["cells"] = [{k: r[k] for k in keep} for r in est["cells"]]
    return {"estimate_device_hours": est["device_hours"],
            "estimate_json": json.dumps({"status": "ok", "calibration": str(path), **est})}


def estimate_lines(est: dict) -> list[str]:
    """The estimate as a Markdown table (one row per cell) and a closing summary line."""
    lines = ["| cell | ms / step | steps / epoch | epoch s | epochs x | tuning h | finals h | gain | device-h |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(est["cells"], key=lambda r: -r["device_hours"]):
        epoch = r["steps_per_epoch"] * r["step_s"] + r["n_val"] * r["eval_s_per_sample"]
        gain = max(r["packing_speedup"], r["population_speedup"])
        lines.append(f"| {r['cell']} | {r['step_s'] * 1e3:.2f} | {r['steps_per_epoch']} | {epoch:.1f} | "
                     f"{r.get('tuning_epochs_scale', 1.0):.2f} | {r['tuning_s'] / 3600:.3f} | {r['finals_s'] / 3600:.3f} | "
                     f"{gain:.2f}x | {r['device_hours']:.3f} |")
    b = est["budget"]
    if est.get("budget_kind") == "compute":
        lines.append("\nbudget.kind=compute: epochs are bp-epochs of compute; epochs x = the cell's own epochs per "
                     "bp-epoch at its first point, from its counted training FLOPs")
    lines.append(f"\ntotal {est['device_hours']:.2f} device-hours on {est['device']} ({est['cells_estimated']} cells; "
                 f"alone, one trial at a time: {est['work_hours_alone']:.2f} h); budget {b['trials']} trials x <= "
                 f"{b['epochs']} epochs per cell (ASHA: {est['expected_epochs_per_trial']:.1f} epochs per trial "
                 f"expected), finals {b['final_seeds']} seeds x {b['final_epochs']} epochs; {est['packing']} trial(s) "
                 f"per device, population {est['population']}; gain = measured throughput of that sharing over one "
                 f"trial alone (1.00x where no packed-trial or population curve was measured)")
    if est["cells_missing"]:
        lines.append(f"not estimated (no calibration or no known size): {', '.join(est['cells_missing'])}")
    return lines
