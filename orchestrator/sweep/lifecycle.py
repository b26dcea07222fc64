"""What a sweep run holds while it runs and what it ends as: the folder lock, the stop signals, the status.

* :class:`SweepLock`: an OS-level lock (``fcntl.flock``) on ``<sweep>/.lock``, held by the driver for the
  whole run, so a second driver on the same folder is refused (naming the running one's pid and host)
  before it cleans up or starts anything. The OS drops the lock when the driver dies, however it dies.
* :class:`StopSignals`: SIGINT and SIGTERM handlers that only record the signal; the driver polls it,
  lets Tune stop its trials, never starts finals, and ends with :class:`SweepInterrupted`.
* :func:`sweep_status`: the manifest status and, per cell without finals, the reason.
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
