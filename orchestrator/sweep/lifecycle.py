"""What a sweep run holds while it runs and what it ends as: the folder lock, the stop signals, the status.

* :class:`SweepLock`: an OS-level lock (``fcntl.flock``) on ``<sweep>/.lock``, held by the driver for the
  whole run, so a second driver on the same folder is refused (naming the running one's pid and host)
  before it cleans up or starts anything. The OS drops the lock when the driver dies, however it dies.
* :class:`StopSignals`: SIGINT and SIGTERM handlers that only record the signal; the driver polls it,
  lets Tune stop its trials, never starts finals, and ends with :class:`SweepInterrupted`.
* :func:`sweep_status`: the manifest status and, per cell without finals, the reason.
* :func:`check_resume`: a rerun into a folder is refused when its configuration differs from the one the
  folder's manifest recorded in anything that changes results (raising the trial or final-seed budget
  extends the sweep and is allowed).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import socket
from pathlib import Path

import polars as pl

from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.run_identity import PLACE_KEYS, flat

STATUSES = ("running", "interrupted", "failed", "partial", "complete")
"""Every manifest status: the sweep is running (or its driver died), was stopped by a signal, ended with no
cell's finals, ended with some cells' finals missing, or ended with every cell's finals."""

EXIT_CODES = {"complete": 0, "partial": 1, "failed": 1}
"""``bioplaus sweep``'s exit code per final status; an interrupted sweep exits 128 + the signal number."""


class SweepInterrupted(Exception):
    """The sweep was stopped by SIGINT or SIGTERM; its folder is consistent and the same command resumes it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"sweep stopped by {signal.Signals(signum).name}; rerun the same command to resume")


class SweepLock:
    """An exclusive, non-blocking ``flock`` on ``<sweep_dir>/.lock`` holding the holder's pid and host."""

    def __init__(self, sweep_dir: Path):
        self.path = Path(sweep_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot create the sweep lock {self.path}: {e.strerror or e}; "
                             "check the folder's permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"another sweep driver ({holder}) is running in {self.path.parent}; wait for it to end, "
                             "stop it, or use another name=") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


class StopSignals:
    """Records SIGINT/SIGTERM instead of dying (while installed); ``received`` is the first signal or None.

    Only the main thread can install handlers; elsewhere the process keeps its own (no-op here).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._saved: dict[int, object] = {}

    def __getstate__(self) -> dict:
        # Handlers are this process's; Tune pickles the searcher (and the driver its callables reach) into
        # its experiment state, and a saved handler may hold a lock (a local cluster's SIGTERM clean-up).
        return {"received": self.received, "_saved": {}}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> None:
        """Install the handlers; again after ``ray.init``, which sets its own SIGTERM handler (the handlers
        from before the first install are the ones :meth:`restore` puts back)."""
        for s in self.SIGNALS:
            try:
                previous = signal.signal(s, self._record)
            except ValueError:  # not the main thread
                return
            if previous != self._record:
                self._saved.setdefault(s, previous)

    def restore(self) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved = {}

    def check(self) -> None:
        """Raise :class:`SweepInterrupted` if a stop signal came."""
        if self.received is not None:
            raise SweepInterrupted(self.received)


def _finite(values) -> int:
    return sum(1 for v in values if v is not None and math.isfinite(v))


def cell_outcomes(cell_keys: list[str], trials: dict[str, pl.DataFrame], final_runs: dict[str, pl.DataFrame],
                  finals: dict[str, pl.DataFrame]) -> dict[str, str]:
    """Per cell without a finals row: why (from its trials and final runs); cells with finals are left out."""
    missing = {}
    for key in cell_keys:
        if key in finals and not finals[key].is_empty() and finals[key]["n_seeds"][0] > 0:
            continue
        t = trials.get(key, pl.DataFrame())
        if t.is_empty():
            missing[key] = "no tuning trial recorded"
        elif key not in final_runs or final_runs[key].is_empty():
            statuses = ", ".join(f"{n} {s}" for s, n in sorted(t["status"].value_counts().rows()))
            missing[key] = f"no tuning trial gave a finite validation accuracy ({statuses})"
        else:
            runs = final_runs[key]
            missing[key] = (f"every final run failed ({runs.height - _finite(runs['test_acc'].to_list())} of "
                            f"{runs.height})")
    return missing


def sweep_status(n_cells: int, missing: dict[str, str]) -> tuple[str, dict]:
    """(status, manifest extras) of a sweep that ran to its end; ``missing`` is :func:`cell_outcomes`'s."""
    status = "complete" if not missing else "failed" if len(missing) == n_cells else "partial"
    return status, {"cells_without_finals": len(missing), "cells_without_finals_json": json.dumps(missing)}


# Sweep keys that say where a sweep runs, how it logs or what it does after the finals: never what it computes.
NOT_RESULT_KEYS = ("name", "root", "preset", "storage", "retries", "progress", "brain", "rsa92", "optional_datasets")
NOT_RESULT_PREFIXES = ("ray.", "resources.", "wandb.")
# Budgets a rerun may raise: the sweep is extended (more trials, more final seeds), nothing done is invalid.
EXTENDABLE = ("budget.trials", "budget.final_seeds")
# Open mappings: a key given on one side only is a difference (elsewhere it is a setting a new version added).
OPEN = ("trial.hp.", "trial.model.", "arch_model.")
# Lists whose order does not matter (a cell's tuning does not depend on the other cells).
SETS = ("rules", "archs", "datasets", "exclude")
# Result-changing settings added after sweeps were already recorded without them: a manifest that lacks one
# was made with this value (a folder from before budget.kind existed trained every run for budget.epochs epochs).
RECORDED_BEFORE = {"budget.kind": "epochs", "budget.pruning": True, "budget.startup_trials": 10}


def _result_keys(config: dict) -> dict:
    out = {}
    for k, v in flat(config).items():
        if k in NOT_RESULT_KEYS or k.startswith(NOT_RESULT_PREFIXES):
            continue
        if k.startswith("trial.") and k[len("trial."):] in PLACE_KEYS:
            continue
        out[k] = sorted(map(str, v)) if k in SETS and isinstance(v, list) else v
    return out


def resume_differences(old: dict, new: dict) -> list[str]:
    """``key old -> new`` for each setting of the sweep config ``new`` that changes results relative to the
    folder's ``old`` one (raising an :data:`EXTENDABLE` budget is not a change)."""
    a, b = {**RECORDED_BEFORE, **_result_keys(old)}, {**RECORDED_BEFORE, **_result_keys(new)}
    differ = []
    for k in sorted({*(set(a) & set(b)), *(k for k in set(a) ^ set(b) if k.startswith(OPEN))}):
        if a.get(k) == b.get(k) or (k in EXTENDABLE and isinstance(a.get(k), int) and isinstance(b.get(k), int)
                                    and b[k] > a[k]):
            continue
        differ.append(f"{k} {json.dumps(a.get(k), default=str)} -> {json.dumps(b.get(k), default=str)}")
    return differ


def check_resume(sweep_dir: Path, config: dict) -> None:
    """UsageError (one line, naming the keys and the fix) when ``sweep_dir`` holds a sweep whose recorded
    configuration (its manifest's) differs from ``config`` in anything that changes results."""
    path = Path(sweep_dir) / "manifest.json"
    try:
        old = json.loads(json.loads(path.read_text())["config_json"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a new folder, or one without a readable manifest: nothing recorded to compare with
    differ = resume_differences(old, config)
    if differ:
        raise UsageError(f"{sweep_dir} holds a sweep made with other settings ({'; '.join(differ)}): its results "
                         "were computed with those; use a new name= for the new settings, or rerun with the folder's "
                         "values (only budget.trials and budget.final_seeds may grow, to extend it)")
