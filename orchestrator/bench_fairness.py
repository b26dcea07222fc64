"""Is ASHA fair to the rules? (``bioplaus bench --asha-fairness [overrides]``)

The same sweep twice, in two folders: once pruned by ASHA (``budget.pruning=true``) and once not
(``budget.pruning=false``: every trial runs its whole budget), with the same cells, seed, search spaces and
number of trials. In each cell (arch x dataset) the rules are ordered by the validation accuracy of the
configuration each sweep selected (the one its finals re-run; tuning never reads the test set), and Kendall's
tau-b (``scipy.stats.kendalltau``) compares the order with pruning to the order without: 1 = ASHA changed no
rank, and the rules whose place moved are listed. The order by the finals' test accuracy is compared the same
way, after the fact, and only reported.

Light to import (the command line builds its parser from here): the sweep, Polars and SciPy load when it runs.
Default size (:data:`CUT`): the local preset cut to digits on a 64-64 mlp, 6 trials of at most 5 epochs per
cell, one final seed, one CPU, one thread; overrides apply on top (``budget.kind=compute``, ``rules=[...]``,
``root=DIR`` keeps the two sweep folders there; by default they go to a temporary folder, removed at the end).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bioplaus.orchestrator.errors import UsageError

if TYPE_CHECKING:
    import polars as pl

CUT = ["preset=local", "datasets=[digits]", "trial.model.widths=[64,64]", "budget.trials=6", "budget.epochs=5",
       "budget.final_seeds=1", "trial.train.threads=1", "ray.num_cpus=1", "wandb.mode=disabled", "progress=false"]
ARMS = {"asha": "budget.pruning=true", "no_pruning": "budget.pruning=false"}


def selected_results(sweep_dir: Path) -> pl.DataFrame:
    """Per rule x cell: the validation accuracy of the selected tuning trial and the finals' test accuracy."""
    import polars as pl

    from bioplaus.orchestrator.results import read_table
    from bioplaus.orchestrator.sweep import best_configs

    rows = [{"rule": k.split(".")[0], "arch": k.split(".")[1], "dataset": k.split(".")[2], "val_acc": r["val_acc"]}
            for k, r in best_configs(sweep_dir).items()]
    selected = pl.DataFrame(rows, schema={"rule": pl.String, "arch": pl.String, "dataset": pl.String,
                                          "val_acc": pl.Float64})
    finals = read_table(sweep_dir, "finals")
    if finals.is_empty():
        return selected.with_columns(test_acc=pl.lit(None, dtype=pl.Float64))
    return selected.join(finals.select("rule", "arch", "dataset", test_acc="test_acc_mean"),
                         on=["rule", "arch", "dataset"], how="left")


def rank_agreement(with_asha: pl.DataFrame, without: pl.DataFrame, metric: str = "val_acc") -> list[dict]:
    """Per cell: Kendall's tau-b between the rules' order by ``metric`` with and without pruning (the rules
    both have), its p-value, and the rules whose rank moved (rank 1 = best)."""
    import polars as pl
    from scipy import stats

    both = with_asha.join(without, on=["rule", "arch", "dataset"], suffix="_no_pruning").drop_nulls(
        [metric, f"{metric}_no_pruning"])
    out = []
    for (arch, dataset), cell in sorted(both.group_by("arch", "dataset"), key=lambda g: g[0]):
        cell = cell.sort("rule").with_columns(
            rank_asha=pl.col(metric).rank("average", descending=True),
            rank_no_pruning=pl.col(f"{metric}_no_pruning").rank("average", descending=True))
        tau, p = (stats.kendalltau(cell[metric], cell[f"{metric}_no_pruning"]) if cell.height >= 2
                  else (float("nan"), float("nan")))
        moved = cell.filter(pl.col("rank_asha") != pl.col("rank_no_pruning"))
        out.append({"arch": arch, "dataset": dataset, "metric": metric, "rules": cell.height, "tau": float(tau),
                    "p_value": float(p), "moved": {r["rule"]: [r["rank_no_pruning"], r["rank_asha"]]
                                                   for r in moved.iter_rows(named=True)}})
    return out


def run(overrides: list[str], log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Both sweeps, then the agreement of their rule orders; the result as a dict (JSON-ready)."""
    for o in overrides:
        if o.split("=", 1)[0] in ("budget.pruning", "name"):
            raise UsageError(f"bench --asha-fairness sets {o.split('=', 1)[0]} itself; leave out {o!r}")
    kept = next((o.split("=", 1)[1] for o in overrides if o.startswith("root=")), None)
    root = kept or tempfile.mkdtemp(prefix="bioplaus-asha-")
    try:
        return _measure(overrides, root, log) | ({"folders": root} if kept else {})
    finally:
        if not kept:
            shutil.rmtree(root, ignore_errors=True)


def _measure(overrides: list[str], root: str, log) -> dict:
    from bioplaus.orchestrator.results import read_table
    from bioplaus.orchestrator.sweep import Sweep, parse_sweep

    sweeps = {arm: Sweep(parse_sweep([*CUT, *overrides, setting, f"root={root}", f"name=fairness-{arm}"]))
              for arm, setting in ARMS.items()}  # every config checked before the first sweep runs
    seconds = {}
    for arm, sweep in sweeps.items():
        tick = time.monotonic()
        log(f"asha-fairness: sweep {arm} ({ARMS[arm]}) in {sweep.dir}")
        sweep.run(log)
        seconds[arm] = time.monotonic() - tick
    results = {arm: selected_results(s.dir) for arm, s in sweeps.items()}
    cfg = sweeps["asha"].cfg
    pruned = {arm: int((read_table(s.dir, "trials")["status"] == "pruned").sum()) for arm, s in sweeps.items()}
    return {"cells": [*rank_agreement(results["asha"], results["no_pruning"], "val_acc"),
                      *rank_agreement(results["asha"], results["no_pruning"], "test_acc")],
            "trials_per_cell": cfg.budget.trials, "budget_kind": cfg.budget.kind, "epochs": cfg.budget.epochs,
            "pruned_trials": pruned, "seconds": seconds, "overrides": [*CUT, *overrides]}


def summary_lines(result: dict) -> list[str]:
    """One line per cell and metric, for the terminal and docs/benchmarks.md."""
    lines = []
    for c in result["cells"]:
        moved = ", ".join(f"{r} {a:g}->{b:g}" for r, (a, b) in c["moved"].items()) or "none"
        lines.append(f"{c['dataset']}/{c['arch']} by {c['metric']}: Kendall tau {c['tau']:.3f} (p {c['p_value']:.2g}) "
                     f"over {c['rules']} rules; rank without pruning -> with ASHA moved: {moved}")
    return lines


def command(args) -> int:
    """``bioplaus bench --asha-fairness``: the result as JSON on stdout, a summary on stderr."""
    result = run(args.overrides)
    print(json.dumps(result))
    for line in summary_lines(result):
        print(line, file=sys.stderr)
    return 0


def add_fairness_argument(parser, bench) -> None:
    """The ``--asha-fairness`` flag of ``bioplaus bench``, and the command's function: :func:`command` with the
    flag, else ``bench``."""
    parser.set_defaults(func=lambda args: command(args) if args.asha_fairness else bench(args))
    parser.add_argument("--asha-fairness", action="store_true",
                        help="the rules' rank order with ASHA against without pruning, Kendall's tau (a few sweeps: "
                             "minutes; overrides apply to both, e.g. budget.kind=compute)")
