"""Accuracy targets of the reference rule (``make bench``): long runs that are not tests.

Each case is a full training run through the same entry point as ``bioplaus train``; the table at
the end gives accuracy, target, epochs and minutes. Exit code 1 if any case misses its target.
"""

from __future__ import annotations

import sys
import time

from orchestrator.config import parse_overrides
from orchestrator.results import write_run
from orchestrator.trial import resolve, run_trial

# name -> (overrides, minimum test accuracy)
CASES: dict[str, tuple[list[str], float]] = {
    "bp-mlp-fashion": (["rule=bp", "arch=mlp", "dataset=fashion_mnist", "train.epochs=5"], 0.88),
    "bp-cnn-fashion": (["rule=bp", "arch=cnn", "dataset=fashion_mnist", "train.epochs=5"], 0.90),
    "bp-mlp-mnist": (["rule=bp", "arch=mlp", "dataset=mnist", "train.epochs=5"], 0.965),
    "bp-deep_cnn-cifar10": (["rule=bp", "arch=deep_cnn", "dataset=cifar10", "train.epochs=15", "data.augment=true",
                             "hp.lr=2e-3", "hp.schedule=cosine", "hp.weight_decay=5e-4", "hp.optimizer=adamw"],
                            0.75),
}


def run_bench(only: list[str] | None, overrides: list[str]) -> int:
    unknown = set(only or []) - set(CASES)
    if unknown:
        from orchestrator.errors import UsageError

        raise UsageError(f"unknown bench case(s) {sorted(unknown)}; known: {', '.join(CASES)}")
    names = only or list(CASES)
    specs = {n: resolve(parse_overrides([*CASES[n][0], "out=runs/bench", *overrides])) for n in names}
    rows, failed = [], 0
    for name in names:
        tick = time.time()
        print(f"== {name}: {' '.join(CASES[name][0] + overrides)}", file=sys.stderr, flush=True)
        record = run_trial(specs[name], progress=True)
        write_run(specs[name].cfg.out, record)
        ok = record["status"] == "ok" and record["test_acc"] >= CASES[name][1]
        failed += not ok
        rows.append((name, record["test_acc"], CASES[name][1], record["epochs_run"], (time.time() - tick) / 60,
                     "PASS" if ok else "FAIL"))
    print(f"{'case':<22} {'test_acc':>8} {'target':>7} {'epochs':>6} {'minutes':>7}  result")
    for r in rows:
        print(f"{r[0]:<22} {r[1]:>8.4f} {r[2]:>7.3f} {r[3]:>6} {r[4]:>7.1f}  {r[5]}")
    return 1 if failed else 0
