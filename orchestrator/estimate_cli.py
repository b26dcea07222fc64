"""``bioplaus cells [preset=...] --estimate``: what a sweep will cost on this machine's device, before launch.

Calibrates the sweep's runnable cells here (or reads a stored calibration, calibrating only the cells it
lacks) and prints, per cell and in total, the device-hours of the preset's budget (orchestrator/cost_model.py,
orchestrator/sweep/estimate.py). Light to import: the command line builds its parser from here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def add_estimate_arguments(parser) -> None:
    """The ``--estimate`` flags of ``bioplaus cells``; with ``--estimate`` the command estimates (cmd_estimate)
    instead of listing (the parser's ``func`` so far, which must be set before this is called)."""
    listing = parser.get_default("func")
    parser.set_defaults(func=lambda args: cmd_estimate(args) if args.estimate else listing(args))
    parser.add_argument("--estimate", action="store_true",
                        help="calibrate the cells on this device (a few steps each) and print the sweep's device-hours")
    parser.add_argument("--calibration", metavar="FILE",
                        help="with --estimate: read this calibration (cells it lacks are calibrated and added) "
                             "instead of calibrating every cell; default runs/calibration/<device>.json, written")
    parser.add_argument("--calibrate-steps", type=int, default=5, metavar="N",
                        help="with --estimate: timed training steps per cell, at least (default 5)")
    parser.add_argument("--calibrate-seconds", type=float, default=0.5, metavar="S",
                        help="with --estimate: timed seconds per cell, at least (default 0.5)")
    parser.add_argument("--calibrate-data", choices=("synthetic", "real"), default="synthetic",
                        help="with --estimate: time on shape-exact random images (default) or the real data")


def cmd_estimate(args) -> int:
    from bioplaus.orchestrator.errors import UsageError
    from bioplaus.orchestrator.sweep import parse_sweep, plan_cells
    from bioplaus.orchestrator.sweep.estimate import (calibrate, calibration_file, estimate_lines, load_calibration,
                                                      save_calibration, sweep_estimate)

    if args.calibrate_steps < 1 or args.calibrate_seconds < 0:
        raise UsageError("--calibrate-steps must be >= 1 and --calibrate-seconds >= 0")
    cfg = parse_sweep(args.overrides)
    cells, _ = plan_cells(cfg)
    path = Path(args.calibration) if args.calibration else None
    stored = load_calibration(path) if path is not None and path.is_file() else {"cells": {}}
    todo = [c for c in cells if c.key not in stored["cells"]]
    if todo:
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        fresh = calibrate(cfg, todo, data=args.calibrate_data, min_steps=args.calibrate_steps,
                          min_seconds=args.calibrate_seconds, log=log)
        path = save_calibration(fresh, path or calibration_file(fresh))
        stored = load_calibration(path)
        print(f"calibration of {len(todo)} cell(s) on {fresh['device']} saved to {path}", file=sys.stderr)
    est = sweep_estimate(cfg, cells, stored)
    est["calibration"] = str(path) if path else None
    if args.json:
        print(json.dumps(_finite(est), indent=1))
    else:
        print("\n".join(estimate_lines(est)))
    return 0


def _finite(value):
    """JSON has no NaN: None in its place, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
