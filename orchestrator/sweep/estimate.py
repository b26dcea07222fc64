"""A sweep's cost before it runs: calibrate its cells on this machine's device, estimate its device-hours.

``bioplaus cells preset=paper --estimate`` times a few training steps of every runnable cell (its first
trial's configuration: the rule's defaults, the preset's model and data settings) on the current device
(orchestrator/calibrate.py), saves that calibration under ``runs/calibration/``, and estimates the budget's
device-hours (orchestrator/cost_model.py). A sweep records the estimate of the calibration it finds
(``$BIOPLAUS_CALIBRATION``, else the newest calibration in ``runs/calibration/`` made on the kind of device
its trials ask for) in its manifest, and the report sets it beside what the runs took.
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
from bioplaus.orchestrator.search_space import defaults_in_space, load_search_space
from bioplaus.orchestrator.sweep.cells import Cell, trial_config, trial_spec

CALIBRATION_DIR = Path("runs/calibration")
Log = Callable[[str], None]


def first_trial_config(cfg: DictConfig, cell: Cell) -> dict:
    """The plain trial config of a cell's first tuning trial (the rule's defaults; pinned hp stay pinned)."""
    rule_cls = load_rules()[cell.rule]
    pinned = set(to_plain(cfg.trial.hp))
    space = {k: p for k, p in load_search_space(rule_cls).items() if k not in pinned}
    return trial_config(cfg, cell, defaults_in_space(rule_cls, space), cfg.seed, cfg.budget.epochs)


def calibrate(cfg: DictConfig, cells: list[Cell], data: str = "synthetic", min_steps: int = 5,
              min_seconds: float = 0.0, log: Log = lambda m: None) -> dict:
    """Time every cell on this device; the calibration document (see :func:`save_calibration`)."""
    rows, device = {}, None
    for i, cell in enumerate(cells):
        if data == "synthetic" and cell.dataset not in SHAPES:
            raise UsageError(f"cell {cell.key}: dataset {cell.dataset} has no synthetic stand-in; calibrate with "
                             "--calibrate-data real")
        row = time_cell(trial_spec(first_trial_config(cfg, cell)), data=data, min_steps=min_steps,
                        min_seconds=min_seconds)
        rows[cell.key] = row
        device = device or torch.device(row["device"])
        log(f"calibrated {i + 1}/{len(cells)} {cell.key}: {row['step_s'] * 1e3:.2f} ms per step of {row['batch']}")
    device = device or torch.device("cpu")
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "created_at": time.time(), "data": data, "cells": rows, "packing": {}, "population": {}}


def calibration_file(calibration: dict) -> Path:
    """Where a calibration made on its device is kept: ``runs/calibration/<device>.json``."""
    slug = re.sub(r"[^a-z0-9]+", "-", calibration["device"].lower()).strip("-")
    return CALIBRATION_DIR / f"{slug or 'device'}.json"


def save_calibration(calibration: dict, path: Path) -> Path:
    """Write a calibration, merged into the file's earlier one (cells and curves measured before and not now
    are kept, so the packed-trial curve and several presets' cells can share one file)."""
    old = load_calibration(path) if path.is_file() else {}
    merged = {**old, **{k: v for k, v in calibration.items() if k not in ("cells", "packing", "population")}}
    for key in ("cells", "packing", "population"):
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


def sweep_estimate(cfg: DictConfig, cells: list[Cell], calibration: dict) -> dict:
    """The device-hours of ``cells`` under ``cfg``'s budget and resources, from ``calibration``."""
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
                                   row.get("eval_s_per_sample", 0.0), row.get("setup_s", 0.0))
    population = int(OmegaConf.select(cfg, "resources.population", default=1) or 1)
    packing = packing_of(cfg, calibration.get("device_type", "cpu"))
    out = estimate(costs, budget_of(cfg), packing, population, calibration.get("packing"),
                   calibration.get("population"))
    return {"device": calibration.get("device"), "device_type": calibration.get("device_type"),
            "cells_estimated": len(costs), "cells_missing": missing, **out}


def manifest_estimate(cfg: DictConfig, cells: list[Cell]) -> dict:
    """The manifest's estimate columns: total device-hours (NaN without a calibration) and the estimate as
    JSON (per cell, with the calibration it came from, or why there is none)."""
    path = find_calibration(cfg)
    if path is None or not Path(path).is_file():
        why = f"no calibration found ({path or CALIBRATION_DIR}); run `bioplaus cells ... --estimate` first"
        return {"estimate_device_hours": float("nan"), "estimate_json": json.dumps({"status": why})}
    try:
        est = sweep_estimate(cfg, cells, load_calibration(path))
    except UsageError as e:
        return {"estimate_device_hours": float("nan"), "estimate_json": json.dumps({"status": str(e)})}
    keep = ("cell", "device_hours", "train_device_hours", "step_s", "packing_speedup", "population_speedup")
    est["cells"] = [{k: r[k] for k in keep} for r in est["cells"]]
    return {"estimate_device_hours": est["device_hours"],
            "estimate_json": json.dumps({"status": "ok", "calibration": str(path), **est})}
