"""Reading a sweep folder lazily: every table as a Polars LazyFrame, nothing collected until asked.

A sweep folder (see ``orchestrator/sweep/``) holds hive-partitioned tables ``trials/``, ``epochs/``,
``final_runs/``, ``finals/`` (``rule=R/arch=A/dataset=D/*.parquet``), plus ``cells.parquet`` and
``manifest.parquet``, and, once the brain-similarity step has run, ``brain/``.

The tables are read with the results layer's reader (:func:`bioplaus.orchestrator.results.scan_table`),
which scans each file on its own so that files disagreeing on a column's type or on which columns
exist still read as one table, with the partition values as strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.results import PARTITIONS, hive_values, parquet_files, scan_table

__all__ = ["HIVE_TABLES", "PARTITIONS", "SweepData", "hive_values", "load_sweep", "parquet_files", "scan_file",
           "scan_table"]

HIVE_TABLES = ("trials", "epochs", "final_runs", "finals", "brain")


def scan_file(path: Path) -> pl.LazyFrame | None:
    return pl.scan_parquet(path) if path.is_file() else None


@dataclass
class SweepData:
    """A sweep folder's tables, lazily. Absent tables are None (a sweep still tuning has no finals)."""

    dir: Path
    trials: pl.LazyFrame | None
    epochs: pl.LazyFrame | None
    final_runs: pl.LazyFrame | None
    finals: pl.LazyFrame | None
    brain: pl.LazyFrame | None
    cells: pl.LazyFrame | None
    manifest: pl.LazyFrame | None

    @property
    def name(self) -> str:
        return self.dir.name


def load_sweep(sweep_dir: str | Path) -> SweepData:
    """Open a sweep folder; UsageError (one line, naming the fix) when it is not one."""
    d = Path(sweep_dir).expanduser()
    if not d.is_dir():
        raise UsageError(f"sweep folder {str(d)!r} does not exist; run `bioplaus sweep` first or pass the folder "
                         f"that `bioplaus sweep` printed (e.g. runs/sweeps/local)")
    tables = {name: scan_table(d / name) for name in HIVE_TABLES}
    data = SweepData(d, **tables, cells=scan_file(d / "cells.parquet"), manifest=scan_file(d / "manifest.parquet"))
    if data.trials is None and data.final_runs is None and data.finals is None:
        raise UsageError(f"{str(d)!r} holds no sweep tables (trials/, final_runs/, finals/); is it a sweep folder? "
                         f"sweep folders are under runs/sweeps/")
    return data
