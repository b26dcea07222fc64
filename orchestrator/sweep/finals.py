"""What the sweep derives from its own tables: each cell's best tuning trial (the configuration its
finals re-run), which final runs belong to it, and the ``finals`` table (per cell: mean, std and 95 %
t-interval of the final runs of that configuration).

A final run's id is ``<cell>.final<seed>.<config hash>`` (:func:`final_run_id`): the hash of the trial
config it ran (hp, model, data, epochs; results.config_hash). When a cell's best configuration changes
(a rerun with more trials found a better one), its earlier final runs no longer belong to it: they are
moved, with their epoch rows, network files, brain rows and the cell's finals row, under ``superseded/`` (same layout),
kept on disk and never mixed into ``finals``; the new configuration's finals run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
from scipy import stats

from bioplaus.orchestrator.results import PARTITIONS, partition_dir, rows_by_cell, write_table
from bioplaus.orchestrator.run_identity import config_hash

SUPERSEDED = "superseded"


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


def final_run_id(cell_key: str, seed: int, plain: dict) -> str:
    """The id of a cell's final run with ``seed`` of the trial config ``plain``."""
    return f"{cell_key}.final{seed}.{config_hash(plain)}"


def row_hash(row: dict) -> str:
    """The configuration hash of a run-table row (from the trial config it recorded)."""
    return config_hash(json.loads(row.get("config_json") or "{}"))


def _cell(key: str) -> dict[str, str]:
    return dict(zip(PARTITIONS, key.split(".")))


def _move(src: Path, dst: Path) -> None:
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def supersede_finals(sweep_dir: Path, current: dict[str, str]) -> dict[str, int]:
    """Move the final runs of each cell in ``current`` (cell key -> its best configuration's hash) that ran
    another configuration under ``superseded/``; returns per cell how many were moved.

    Per run the epoch rows and the network file move first and the run row last (it is the commit point),
    so a driver killed in between leaves a row that the next start moves again.
    """
    d = Path(sweep_dir)
    moved = {}
    for key, rows in rows_by_cell(d, "final_runs").items():
        stale = [r for r in rows.iter_rows(named=True) if key in current and row_hash(r) != current[key]]
        if not stale:
            continue
        cell, old = _cell(key), d / SUPERSEDED
        for r in stale:
            name = f"{r['run_id']}.parquet"
            _move(partition_dir(d, "epochs", cell) / name, partition_dir(old, "epochs", cell) / name)
            _move(d / "models" / f"{r['run_id']}.pt", old / "models" / f"{r['run_id']}.pt")
            _move(partition_dir(d, "brain", cell) / name, partition_dir(old, "brain", cell) / name)  # brain=true's rows
            _move(partition_dir(d, "final_runs", cell) / name, partition_dir(old, "final_runs", cell) / name)
        _move(partition_dir(d, "finals", cell) / "finals.parquet",
              partition_dir(old, "finals", cell) / f"finals.{row_hash(stale[0])}.parquet")
        moved[key] = len(stale)
    return moved


def write_finals(sweep_dir: Path, final_epochs: int, current: dict[str, str] | None = None) -> None:
    """The finals table: per cell, mean/std/95 % t-interval of the test accuracy of the final runs of its
    best configuration (``current``: cell key -> that configuration's hash); other runs are left out.
    ``current=None``: every final run of a cell counts (tables written by hand, one configuration per cell)."""
    best = best_configs(sweep_dir)
    for key, every in rows_by_cell(sweep_dir, "final_runs").items():
        hashes = [row_hash(r) for r in every.iter_rows(named=True)]
        digest = current.get(key) if current is not None else (hashes[0] if len(set(hashes)) == 1 else None)
        if current is not None and digest is None:
            continue
        rows = every if current is None else every.filter(pl.Series([h == digest for h in hashes]))
        if rows.is_empty():
            continue
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
               "hp_json": b.get("hp_json"), "epochs": _planned(rows, final_epochs), "config_hash": digest,
               "final_run_ids_json": json.dumps(sorted(rows["run_id"].to_list())), **_budget(first)}
        write_table(pa.Table.from_pylist([row]), partition_dir(Path(sweep_dir), "finals", _cell(key)) / "finals.parquet")


BUDGET_COLUMNS = ("budget_kind", "train_flops_per_sample", "bp_train_flops_per_sample", "budget_bp_epochs")


def _planned(rows: pl.DataFrame, default: int) -> int:
    """The epochs the cell's final runs were given (their own with budget.kind=compute), else ``default``."""
    planned = rows["epochs_planned"].drop_nulls() if "epochs_planned" in rows.columns else pl.Series([], dtype=pl.Int64)
    return int(planned.max()) if len(planned) else default


def _budget(first: dict) -> dict:
    """The budget the cell's final runs had (one configuration: the same for every seed); None where not recorded."""
    return {k: first.get(k) for k in BUDGET_COLUMNS}
