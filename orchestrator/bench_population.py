"""``bioplaus bench --population``: a population against the same configurations trained one after another.

For each population size P (``--population 1,4,16``, the default) the first P of a fixed list of configurations of
one cell (default bp, mlp, digits; one thread, the sweep's seed 0, 3 epochs; any trial override applies) run twice
in this process, side by side: one by one through ``run_trial`` as a sweep worker runs a tuning trial (it loads its
data, trains, validates, never touches the test set), then as one population (orchestrator/population.py, the
data loaded once). One population of P=1 and one trial run first as a warm-up, uncounted. Reported per P:
training samples/s per member (the population's throughput shared evenly) and alone (the mean over the runs),
their ratio; whole-run wall time of the P runs alone and of the population, their ratio; and the largest
difference between a member's validation accuracy and its run alone (the parity check, in the same run).

The configurations spread the learning rate over the sweep's own range (1e-4..1e-2, log-spaced), alternating
adam and sgd and the three schedules; nothing in them is chosen by accuracy.
"""

from __future__ import annotations

import json
import math
import sys
import time

from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.population import check_population, run_population
from bioplaus.orchestrator.spec import resolve
from bioplaus.orchestrator.trial import run_trial

BASE = ["rule=bp", "arch=mlp", "dataset=digits", "seed=0", "train.threads=1", "train.epochs=3", "out=null"]


def member_overrides(count: int) -> list[list[str]]:
    """``count`` hyperparameter settings: lr log-spaced over 1e-4..1e-2, adam/sgd and the schedules in turn."""
    out = []
    for k in range(count):
        lr = 1e-4 * 100 ** (k / max(1, count - 1))
        out.append([f"hp.lr={lr:.6g}", f"hp.optimizer={('adam', 'sgd')[k % 2]}",
                    f"hp.schedule={('constant', 'cosine', 'onecycle')[k % 3]}"])
    return out


def population_throughput(overrides: list[str], sizes: list[int]) -> dict:
    """Measure every size in ``sizes`` (see the module docstring); the result as one JSON-able dict."""
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--population {sizes} must list population sizes >= 1, e.g. --population 1,4,16")
    members = member_overrides(max(sizes))

    def specs(count: int) -> list:
        return [resolve(parse_overrides([*BASE, *overrides, *hp])) for hp in members[:count]]

    check_population(specs(len(members)))  # a config that cannot be a population is refused before any run
    run_trial(specs(1)[0], evaluate_test=False)  # warm-up: first-call costs (allocator, kernels) in neither side
    run_population(specs(1), evaluate_test=False)
    rows = []
    for size in sizes:
        print(f"== P={size}: {size} trials alone, then one population", file=sys.stderr, flush=True)
        tick = time.perf_counter()
        alone = [run_trial(spec, evaluate_test=False) for spec in specs(size)]
        alone_wall = time.perf_counter() - tick
        tick = time.perf_counter()
        population = run_population(specs(size), evaluate_test=False)
        rows.append(_row(size, alone, population, alone_wall, time.perf_counter() - tick))
        print(f"   {_line(rows[-1])}", file=sys.stderr, flush=True)
    return {"overrides": [*BASE, *overrides], "members": [" ".join(m) for m in members], "rows": rows}


def _row(size: int, alone: list[dict], population: list[dict], alone_wall: float, population_wall: float) -> dict:
    trained = [r for r in population if r["epochs_run"]]
    alone_speed = sum(r["samples_per_second"] for r in alone) / size
    # per member: the population's training throughput shared evenly (each member's epoch time is its share)
    member_speed = sum(r["samples_per_second"] for r in trained) / max(1, len(trained))
    parity = max((abs(a["val_acc"] - p["val_acc"]) for a, p in zip(alone, population)
                  if math.isfinite(a["val_acc"]) and math.isfinite(p["val_acc"])), default=0.0)
    return {"members": size, "alone_samples_per_second": alone_speed,
            "population_samples_per_second_per_member": member_speed, "throughput_ratio": member_speed / alone_speed,
            "alone_wall_s": alone_wall, "population_wall_s": population_wall,
            "wall_ratio": alone_wall / population_wall, "max_val_acc_difference": parity}


def _line(row: dict) -> str:
    return (f"P={row['members']}: {row['population_samples_per_second_per_member']:.0f} samples/s per member vs "
            f"{row['alone_samples_per_second']:.0f} alone ({row['throughput_ratio']:.2f}x); wall "
            f"{row['alone_wall_s']:.1f}s alone vs {row['population_wall_s']:.1f}s ({row['wall_ratio']:.2f}x); "
            f"largest val_acc difference {row['max_val_acc_difference']:.4f}")


def markdown_lines(result: dict) -> list[str]:
    """The result as a markdown table."""
    lines = ["| P | samples/s per member, population | samples/s, alone (mean) | ratio | wall alone / population | "
             "max val_acc diff |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['members']} | {r['population_samples_per_second_per_member']:.0f} | "
              f"{r['alone_samples_per_second']:.0f} | {r['throughput_ratio']:.2f} | "
              f"{r['alone_wall_s']:.1f} s / {r['population_wall_s']:.1f} s = {r['wall_ratio']:.2f} | "
              f"{r['max_val_acc_difference']:.4f} |" for r in result["rows"]]
    return lines


def run(overrides: list[str], sizes: str, markdown: str | None) -> int:
    """The ``bioplaus bench --population SIZES`` command: JSON on stdout, the table on stderr (and appended to
    ``markdown``)."""
    try:
        counts = [int(n) for n in sizes.split(",") if n.strip()]
    except ValueError:
        raise UsageError(f"--population {sizes!r} must be comma-separated sizes, e.g. --population 1,4,16") from None
    result = population_throughput(overrides, counts)
    lines = markdown_lines(result)
    print("\n".join(lines), file=sys.stderr)
    if markdown:
        with open(markdown, "a") as f:
            f.write(f"\n`bioplaus bench --population {sizes} {' '.join(overrides)}` on "
                    f"{time.strftime('%Y-%m-%d %H:%M')}:\n\n" + "\n".join(lines) + "\n")
    print(json.dumps(result))
    return 0
