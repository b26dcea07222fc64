"""Results as Parquet tables with one stable schema, hive-partitioned by rule/arch/dataset.

Layout under a results folder::

    runs/rule=bp/arch=mlp/dataset=digits/<run_id>.parquet     one row per trial
    epochs/rule=bp/arch=mlp/dataset=digits/<run_id>.parquet   one row per trial and epoch

The partition columns live in the paths only (hive style), so ``pl.scan_parquet(folder/"runs")``
gives them back as columns. Every file is written to a temporary name in its final folder and
renamed into place, so a reader never sees a half-written file and a crash leaves no partial table:
at most a hidden ``.<name>.*.tmp`` file, which :func:`remove_interrupted_writes` clears (a sweep does
at start-up). A write that fails (disk full, read-only folder) leaves the files already written as
they were and raises a UsageError naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bioplaus.orchestrator.errors import UsageError

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


TMP_SUFFIX = ".tmp"


def write_table(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` atomically (temp file in the same folder, then rename).

    UsageError (naming the file and the fix) when the folder cannot be written; files already
    there are left as they were.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise unwritable(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # already gone after the rename, or the folder turned read-only
                os.unlink(tmp)
    return path


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


def partition_dir(root: Path, table: str, record: dict[str, Any]) -> Path:
    return root.joinpath(table, *(f"{k}={record[k]}" for k in PARTITIONS))


def write_run(root: str | Path, record: dict[str, Any], run_id: str | None = None, runs_table: str = "runs",
              epochs_table: str = "epochs") -> str:
    """Write a trial's run row and its epoch rows; returns the run id."""
    root = Path(root)
    run_id = run_id or new_run_id()
    row = {name: record.get(name) for name in RUN_SCHEMA.names}
    row.update(run_id=run_id, phase=record.get("phase", "train"), hp_json=json.dumps(record.get("hp", {}), sort_keys=True, default=str),
               config_json=json.dumps(record.get("config", {}), sort_keys=True, default=str),
               started_at=_ms(record.get("started_at")), finished_at=_ms(record.get("finished_at")),
               bioplaus_version=version(), git_commit=git_commit())
    epochs = [{**{n: e.get(n) for n in EPOCH_SCHEMA.names}, "run_id": run_id, "seed": record["seed"],
               "phase": row["phase"], "extra_json": json.dumps(e.get("extra") or {}, sort_keys=True)}
              for e in record.get("epochs", [])]
    # Epochs first: a run row is the commit point that says the trial's tables are complete.
    epochs_path = write_table(pa.Table.from_pylist(epochs, schema=EPOCH_SCHEMA),
                              partition_dir(root, epochs_table, record) / f"{run_id}.parquet")
    try:
        write_table(pa.Table.from_pylist([row], schema=RUN_SCHEMA),
                    partition_dir(root, runs_table, record) / f"{run_id}.parquet")
    except UsageError:  # not committed: take its epochs back (remove_interrupted_writes does it after a kill)
        with contextlib.suppress(OSError):
            epochs_path.unlink()
        raise
    return run_id


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def _ms(ts: float | None):
    import datetime as dt

    return None if ts is None else dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)


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
