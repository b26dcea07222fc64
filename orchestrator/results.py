"""Results: the typed run record, the one writer and the one reader of a results (or sweep) folder.

Parquet tables with one stable schema, hive-partitioned by rule/arch/dataset. Layout::

    runs/rule=bp/arch=mlp/dataset=digits/<run_id>.parquet     one row per trial
    epochs/rule=bp/arch=mlp/dataset=digits/<run_id>.parquet   one row per trial and epoch

(a sweep folder names its run tables ``trials`` and ``final_runs``). The partition columns live in the
paths only (hive style), so ``pl.scan_parquet(folder/"runs")`` gives them back as columns.

* **Record**: :class:`RunRecord` is a run's row, typed; ``RUN_SCHEMA``/``EPOCH_SCHEMA`` are the tables'
  schemas, so column types never depend on the values.
* **Writing**: every file is written to a temporary name in its final folder and renamed into place
  (:func:`atomic_write`), so a reader never sees a half-written file and a crash leaves no partial
  table: at most a hidden ``.<name>.*.tmp`` file, which :func:`remove_interrupted_writes` clears (a
  sweep does at start-up). A table write that fails (disk full, read-only folder) leaves the files
  already written as they were and raises a UsageError naming the file and the fix.
* **Reading**: each Parquet file is scanned on its own and the scans are concatenated with
  ``diagonal_relaxed``: files written at different times may disagree on a column's type (a column
  that was all null in one file is typed ``null`` there) or on which columns exist (a table gaining a
  column in a later version), and a single directory scan would refuse both. The partition values are
  taken from the path and always typed as strings, so a dataset called ``10`` stays ``"10"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import json
import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.run_identity import config_differences, config_hash

PARTITIONS = ("rule", "arch", "dataset")

RUN_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("phase", pa.string()),           # train (bioplaus train) | tune (a sweep's search) | final (a sweep's finals)
    ("trial_number", pa.int64()),     # the Optuna trial number within its cell (tune), else null
    ("node_id", pa.string()),         # the Ray node that ran it (sweeps), else null
    ("attempts", pa.int64()),         # 1 + times a sweep retried it after its worker or node died; else null
    ("seed", pa.int64()),
    ("status", pa.string()),          # ok | pruned | diverged | failed | timeout
    ("error", pa.string()),
    ("epochs_planned", pa.int64()),
    ("epochs_run", pa.int64()),
    ("best_epoch", pa.int64()),
    ("val_acc", pa.float64()),
    ("val_loss", pa.float64()),
    ("test_acc", pa.float64()),
    ("test_loss", pa.float64()),
    ("train_seconds", pa.float64()),
    ("samples_per_second", pa.float64()),
    ("peak_mem_mb", pa.float64()),
    ("mem_kind", pa.string()),        # cuda_allocated | cpu_peak_rss
    ("n_params", pa.int64()),
    ("n_rule_params", pa.int64()),    # extra state the rule owns (feedback weights, heads, buffers)
    ("n_train", pa.int64()),
    ("n_val", pa.int64()),
    ("n_test", pa.int64()),
    ("device", pa.string()),
    ("hp_json", pa.string()),
    ("config_json", pa.string()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("bioplaus_version", pa.string()),
    ("git_commit", pa.string()),
    # A sweep's training budget (orchestrator/sweep/budget.py): its kind (epochs | compute), the run's counted
    # training FLOPs per sample and bp's on the same cell (where counted), and the compute the run was given in
    # bp-epochs (epochs_planned x its FLOPs / bp's).
    ("budget_kind", pa.string()),
    ("train_flops_per_sample", pa.float64()),
    ("bp_train_flops_per_sample", pa.float64()),
    ("budget_bp_epochs", pa.float64()),
])

EPOCH_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("phase", pa.string()),
    ("seed", pa.int64()),
    ("epoch", pa.int64()),
    ("train_loss", pa.float64()),
    ("train_acc", pa.float64()),
    ("val_acc", pa.float64()),
    ("val_loss", pa.float64()),
    ("epoch_seconds", pa.float64()),
    ("samples_per_second", pa.float64()),
    ("extra_json", pa.string()),      # the rule's own per-step metrics, epoch means (e.g. inference_steps)
])

# Run-table columns the writer fills in, not the run: its id, the code that wrote it, and the JSON texts of
# the record's ``hp`` and ``config``.
WRITER_COLUMNS = ("run_id", "hp_json", "config_json", "bioplaus_version", "git_commit")


@dataclass(kw_only=True)
class RunRecord:
    """A run's row of the run table, typed; every ``RUN_SCHEMA`` column not in ``WRITER_COLUMNS`` is a field.

    ``rule``/``arch``/``dataset`` are the partition columns (stored in the path), ``hp`` and ``config``
    are stored as ``hp_json``/``config_json``, ``started_at``/``finished_at`` are Unix seconds (stored as
    UTC timestamps), and ``epochs`` holds the epoch rows (``EPOCH_SCHEMA`` keys, ``extra`` as a dict).
    """

    rule: str
    arch: str
    dataset: str
    seed: int
    status: str
    phase: str = "train"
    trial_number: int | None = None
    node_id: str | None = None
    attempts: int | None = None
    error: str | None = None
    epochs_planned: int | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    val_acc: float | None = None
    val_loss: float | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    train_seconds: float | None = None
    samples_per_second: float | None = None
    peak_mem_mb: float | None = None
    mem_kind: str | None = None
    n_params: int | None = None
    n_rule_params: int | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    device: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    budget_kind: str | None = None
    train_flops_per_sample: float | None = None
    bp_train_flops_per_sample: float | None = None
    budget_bp_epochs: float | None = None
    hp: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_trial(cls, record: Mapping[str, Any]) -> RunRecord:
        """From ``run_trial``'s dict (or any dict with these keys); keys that are not fields are left out."""
        return cls(**{k: record[k] for k in _FIELDS if k in record})

    @property
    def cell(self) -> dict[str, str]:
        """The partition values: ``{"rule": ..., "arch": ..., "dataset": ...}``."""
        return {k: getattr(self, k) for k in PARTITIONS}

    def run_row(self, run_id: str, bioplaus_version: str | None, git_commit: str | None) -> dict[str, Any]:
        """The run-table row (``RUN_SCHEMA`` columns, in order)."""
        own = {name: getattr(self, name) for name in RUN_SCHEMA.names if name in _FIELDS}
        return {**{name: own.get(name) for name in RUN_SCHEMA.names},
                "run_id": run_id, "hp_json": json.dumps(self.hp, sort_keys=True, default=str),
                "config_json": json.dumps(self.config, sort_keys=True, default=str),
                "started_at": _utc(self.started_at), "finished_at": _utc(self.finished_at),
                "bioplaus_version": bioplaus_version, "git_commit": git_commit}

    def epoch_rows(self, run_id: str) -> list[dict[str, Any]]:
        """The epoch-table rows (``EPOCH_SCHEMA`` columns, in order)."""
        return [{**{n: e.get(n) for n in EPOCH_SCHEMA.names}, "run_id": run_id, "seed": self.seed,
                 "phase": self.phase, "extra_json": json.dumps(e.get("extra") or {}, sort_keys=True)}
                for e in self.epochs]


_FIELDS = frozenset(f.name for f in dataclasses.fields(RunRecord))


def partition_dir(root: Path, table: str, cell: Mapping[str, Any]) -> Path:
    """``root/table/rule=R/arch=A/dataset=D``: where a row of ``cell`` goes."""
    return root.joinpath(table, *(f"{k}={cell[k]}" for k in PARTITIONS))


def _utc(ts: float | None) -> dt.datetime | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)


# --- provenance: the code that wrote a row -------------------------------------------------------------
def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("bioplaus")
    except Exception:
        return "unknown"


_COMMIT: list[str | None] = []


def git_commit() -> str | None:
    """The source tree's git commit (with ``-dirty`` when modified); outside a checkout (an installed wheel,
    a cluster image), the commit the package was built from, as its version records it; else None."""
    if not _COMMIT:
        here = Path(__file__).resolve().parent.parent
        sha, dirty = "", ""
        try:
            head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=here, capture_output=True,
                                  text=True, timeout=5)
            sha = head.stdout.strip() if head.returncode == 0 and (here / ".git").exists() else ""
            if sha:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                       capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        _COMMIT.append(f"{sha}-dirty" if sha and dirty else (sha or built_commit()))
    return _COMMIT[0]


def built_commit() -> str | None:
    """The commit the installed package was built from (setuptools-scm writes it at build time), with
    ``-dirty`` when the tree it was built from had uncommitted changes; None when unknown."""
    try:
        from bioplaus._version import __commit_id__, __version__
    except ImportError:
        return None
    if not __commit_id__:
        return None
    sha = __commit_id__[1:] if __commit_id__.startswith("g") else __commit_id__
    return f"{sha}-dirty" if re.search(r"\.d\d{8}$", __version__) else sha


# --- writing ---------------------------------------------------------------------------------------------
TMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temp file in the same folder, which is then renamed.

    The folder is created if needed. An OSError propagates as raised; the temp file is removed either way.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # already gone after the rename, or the folder turned read-only
                os.unlink(tmp)
    return path


def write_table(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` as Parquet, atomically.

    UsageError (naming the file and the fix) when the folder cannot be written; files already
    there are left as they were.
    """
    try:
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    except OSError as e:
        raise unwritable(path, e) from None


def unwritable(path: Path, e: OSError) -> UsageError:
    """The one-line error for a results file that could not be written (disk full, read-only, ...)."""
    code = errno.errorcode.get(e.errno or 0, type(e).__name__)
    return UsageError(f"cannot write {path}: {e.strerror or e} ({code}); free disk space or make "
                      f"{path.parent} writable, then run the same command again (results already written are kept)")


def remove_interrupted_writes(root: Path, runs_tables: tuple[str, ...] = ("runs",), epochs_table: str = "epochs",
                              other_tables: tuple[str, ...] = ()) -> list[Path]:
    """Clear what a writer killed mid-write left under ``root``; returns the removed files.

    That is the hidden temp files of :func:`write_table` (a table scan would choke on them) and
    epoch files whose run row, the commit point of :func:`write_run`, was never written. Call it only
    while nothing else writes to ``root`` (a sweep's driver does, at start-up).
    """
    root = Path(root)
    pattern = f".*.parquet.*{TMP_SUFFIX}"
    removed = list(root.glob(pattern))
    for table in (*runs_tables, epochs_table, *other_tables):
        removed += (root / table).rglob(pattern)
    committed = {p.stem for table in runs_tables for p in (root / table).rglob("*.parquet")}
    removed += [p for p in (root / epochs_table).rglob("*.parquet") if p.stem not in committed]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def write_run(root: str | Path, record: RunRecord | Mapping[str, Any], run_id: str | None = None,
              runs_table: str = "runs", epochs_table: str = "epochs") -> str:
    """Write a run's row and its epoch rows; returns the run id.

    ``record``: a :class:`RunRecord`, or ``run_trial``'s dict (read with :meth:`RunRecord.from_trial`).
    """
    root = Path(root)
    run = record if isinstance(record, RunRecord) else RunRecord.from_trial(record)
    run_id = run_id or new_run_id()
    row = run.run_row(run_id, bioplaus_version=version(), git_commit=git_commit())
    # Epochs first: a run row is the commit point that says the trial's tables are complete.
    epochs_path = write_table(pa.Table.from_pylist(run.epoch_rows(run_id), schema=EPOCH_SCHEMA),
                              partition_dir(root, epochs_table, run.cell) / f"{run_id}.parquet")
    try:
        write_table(pa.Table.from_pylist([row], schema=RUN_SCHEMA),
                    partition_dir(root, runs_table, run.cell) / f"{run_id}.parquet")
    except UsageError:  # not committed: take its epochs back (remove_interrupted_writes does it after a kill)
        with contextlib.suppress(OSError):
            epochs_path.unlink()
        raise
    return run_id


def refuse_other_config(root: str | Path, record: RunRecord, run_id: str, runs_table: str = "runs") -> None:
    """UsageError when ``run_id`` already has a row in ``runs_table`` with other hyperparameters or another
    configuration than ``record``: a row is never overwritten by a different run (the same run again is allowed)."""
    path = partition_dir(Path(root), runs_table, record.cell) / f"{run_id}.parquet"
    if not path.is_file():
        return
    old = pq.read_table(path, columns=["hp_json", "config_json"]).to_pylist()[0]
    new = json.dumps(record.hp, sort_keys=True, default=str)
    if old["hp_json"] != new:
        raise UsageError(f"refusing to overwrite {path}: row {run_id} holds hp {old['hp_json']}, the new run has hp "
                         f"{new}; the Optuna study and the tables disagree: move the study away (the sweep's "
                         "optuna.journal, or storage=) and run again, the study is rebuilt from the tables")
    differ = config_differences(json.loads(old["config_json"] or "{}"), record.config)
    if differ:
        raise UsageError(f"refusing to overwrite {path}: row {run_id} ran configuration "
                         f"{config_hash(json.loads(old['config_json'] or '{}'))}, the new run "
                         f"{config_hash(record.config)} ({'; '.join(differ[:6])}); a sweep folder holds one "
                         "configuration: use a new name= for the new one")


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


# --- reading ---------------------------------------------------------------------------------------------
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


def read_table(results_dir: str | Path, name: str) -> pl.DataFrame:
    """One table of a results folder (trials, epochs, final_runs, finals, brain, ...); empty if absent."""
    lf = scan_table(Path(results_dir) / name)
    return pl.DataFrame() if lf is None else lf.collect()


def rows_by_cell(results_dir: str | Path, table: str) -> dict[str, pl.DataFrame]:
    """A table's rows grouped by cell key ("rule.arch.dataset")."""
    df = read_table(results_dir, table)
    if df.is_empty():
        return {}
    df = df.with_columns(pl.concat_str(list(PARTITIONS), separator=".").alias("cell"))
    return {k[0]: g for k, g in df.group_by("cell")}
