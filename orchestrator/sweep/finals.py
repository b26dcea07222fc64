"""What the sweep derives from its own tables: each cell's best tuning trial (the configuration its
finals re-run) and the ``finals`` table (per cell: mean, std and 95 % t-interval of the final runs)."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pyarrow as pa
from scipy import stats

from bioplaus.orchestrator.results import PARTITIONS, partition_dir, rows_by_cell, write_table


def best_configs(sweep_dir: Path) -> dict[str, dict]:
    """Per cell: the tuning trial with the best validation accuracy (fully trained trials first)."""
    best = {}
    for key, rows in rows_by_cell(sweep_dir, "trials").items():
        ok = rows.filter(pl.col("status").is_in(["ok", "pruned"]) & pl.col("val_acc").is_finite())
        if ok.is_empty():
            continue
        full = ok.filter(pl.col("status") == "ok")
        best[key] = (full if not full.is_empty() else ok).sort(["val_acc", "trial_number"],
                                                               descending=[True, False]).row(0, named=True)
    return best


def write_finals(sweep_dir: Path, final_epochs: int) -> None:
    """The finals table: per cell, mean/std/95 % t-interval of the final runs' test accuracy."""
    best = best_configs(sweep_dir)
    for key, rows in rows_by_cell(sweep_dir, "final_runs").items():
        acc = [a for a in rows.filter(pl.col("status") != "failed")["test_acc"].to_list()
               if a is not None and math.isfinite(a)]
        n = len(acc)
        mean = sum(acc) / n if n else float("nan")
        std = (sum((a - mean) ** 2 for a in acc) / (n - 1)) ** 0.5 if n > 1 else float("nan")
        half = stats.t.ppf(0.975, n - 1) * std / n ** 0.5 if n > 1 else float("nan")
        first = rows.row(0, named=True)
        b = best.get(key, {})
        row = {"n_seeds": n, "n_failed": rows.height - n, "test_acc_mean": mean, "test_acc_std": std,
               "test_acc_ci95_low": mean - half, "test_acc_ci95_high": mean + half,
               "val_acc_mean": rows["val_acc"].mean(), "train_seconds_mean": rows["train_seconds"].mean(),
               "samples_per_second_mean": rows["samples_per_second"].mean(),
               "peak_mem_mb_max": rows["peak_mem_mb"].max(), "n_params": first["n_params"],
               "best_trial_number": b.get("trial_number"), "best_trial_val_acc": b.get("val_acc"),
               "hp_json": b.get("hp_json"), "epochs": final_epochs}
        cell = dict(zip(PARTITIONS, key.split(".")))
        write_table(pa.Table.from_pylist([row]), partition_dir(Path(sweep_dir), "finals", cell) / "finals.parquet")
