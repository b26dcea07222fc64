"""Reading a sweep folder lazily: every table as a Polars LazyFrame, nothing collected until asked.

A sweep folder (see ``orchestrator/sweep.py``) holds hive-partitioned tables ``trials/``, ``epochs/``,
``final_runs/``, ``finals/`` (``rule=R/arch=A/dataset=D/*.parquet``), plus ``cells.parquet`` and
``manifest.parquet``, and, once the brain-similarity step has run, ``brain/``.

Each Parquet file is scanned on its own and the scans are concatenated with ``diagonal_relaxed``:
files written at different times may disagree on a column's type (a column that was all null in one
file is typed ``null`` there) or on which columns exist (a table gaining a column in a later version),
and a single directory scan would refuse both. The partition values are taken from the path and always
typed as strings, so a dataset called ``10`` stays ``"10"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from bioplaus.orchestrator.errors import UsageError

PARTITIONS = ("rule", "arch", "dataset")
HIVE_TABLES = ("trials", "epochs", "final_runs", "finals", "brain")


def parquet_files(folder: Path) -> list[Path]:
    """The table's Parquet files in a stable order (temp files of an in-progress write are skipped)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith("."))


def hive_values(file: Path, table_root: Path) -> dict[str, str]:
    """``{"rule": "bp", ...}`` from the ``key=value`` folders between the table root and the file."""
    out = {}
    for part in file.relative_to(table_root).parts[:-1]:
        if "=" in part:
            key, value = part.split("=", 1)
            out[key] = value
    return out


def scan_table(folder: Path) -> pl.LazyFrame | None:
    """A hive-partitioned table as one LazyFrame, or None when the folder holds no Parquet file."""
    files = parquet_files(folder)
    if not files:
        return None
    frames = []
    for f in files:
        lf = pl.scan_parquet(f)
        parts = hive_values(f, folder)
        names = lf.collect_schema().names()
        # Path values win over columns of the same name written into the file (hive semantics).
        lf = lf.drop([k for k in parts if k in names]).with_columns(
            [pl.lit(v, dtype=pl.String).alias(k) for k, v in parts.items()])
        frames.append(lf)
    return pl.concat(frames, how="diagonal_relaxed")


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
