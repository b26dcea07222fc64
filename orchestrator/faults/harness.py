"""What a fault case works with: real ``bioplaus sweep`` processes in a folder of its own, and counts.

:class:`Bench` runs the command line in a subprocess (the faulty rule registered there and in its Ray
workers), signals or kills it at a point the case names, and compares the sweep's tables before and after:
a committed row missing is *lost*, a row whose file changed is a completed training *re-run*, two rows of
one trial (or one final seed of one configuration) are *duplicated*.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from bioplaus.orchestrator.results import read_table

# algorithms/faulty.py registers only where this is set: the sweep processes and the Ray workers they start.
FAULTY_ENV = {"BIOPLAUS_RULE_MODULES": "bioplaus.algorithms.faulty"}
RUN_TABLES = ("trials", "final_runs", "superseded/final_runs")
WAIT_LIMIT_S = 600.0  # a guard against a sweep that never reaches the point a case waits for


@dataclass
class Finished:
    """A sweep process that ended: its exit code and its stderr lines."""

    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("bioplaus: error:")]


@dataclass(frozen=True)
class Counts:
    lost: int
    duplicated: int
    rerun: int


class Bench:
    """One case's folder (``folder``), its sweep commands and the counts of what they did to the tables."""

    def __init__(self, folder: Path, log: Callable[[str], None] = lambda m: None):
        self.folder = Path(folder)
        self.log = log

    def args(self, *overrides: str, name: str = "s") -> list[str]:
        """A smoke sweep of the faulty rule on digits, 2 local CPUs, one final seed (overrides win)."""
        return ["preset=smoke", "rules=[faulty]", f"root={self.folder}", f"name={name}", "ray.num_cpus=2",
                "budget.final_seeds=1", *overrides]

    def dir(self, name: str = "s") -> Path:
        return self.folder / name

    def _popen(self, args: list[str]) -> subprocess.Popen:
        env = {**os.environ, **FAULTY_ENV, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        return subprocess.Popen([sys.executable, "-m", "bioplaus", "sweep", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def sweep(self, args: list[str], timeout_s: float = WAIT_LIMIT_S) -> Finished:
        """Run ``bioplaus sweep ARGS`` to its end."""
        proc = self._popen(args)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        finally:
            _kill_group(proc)
        return Finished(proc.returncode, self._quiet(err.splitlines()))

    def interrupt(self, args: list[str], until: Callable[[list[str]], bool], sig: int = signal.SIGTERM,
                  group: bool = False, meanwhile: Callable[[subprocess.Popen], None] | None = None) -> Finished:
        """Start the sweep, wait until ``until(stderr lines so far)`` (or a table file the predicate looks
        for), run ``meanwhile(proc)``, then send ``sig`` to the driver (``group``: its whole session)."""
        proc = self._popen(args)
        lines: list[str] = []
        reader = threading.Thread(target=_read_lines, args=(proc, lines), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + WAIT_LIMIT_S
            while not until(lines):
                if proc.poll() is not None:
                    raise RuntimeError(f"the sweep ended (exit {proc.returncode}) before the fault could be injected: "
                                       + " / ".join(s.strip() for s in lines[-3:]))
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sweep did not reach the fault's point within {WAIT_LIMIT_S:.0f}s")
                time.sleep(0.2)
            if meanwhile is not None:
                meanwhile(proc)
            os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
            proc.wait(timeout=WAIT_LIMIT_S)
            reader.join(timeout=30)
        finally:
            _kill_group(proc)
        return Finished(proc.returncode, self._quiet(s.rstrip("\n") for s in lines))

    def _quiet(self, lines) -> list[str]:
        """The lines with this case's temporary folder written as ``<tmp>`` (it says nothing, and is long)."""
        return [line.replace(str(self.folder), "<tmp>") for line in lines]

    def has_rows(self, table: str, n: int = 1, name: str = "s") -> Callable[[list[str]], bool]:
        """A predicate for :meth:`interrupt`: ``table`` of the sweep holds at least ``n`` committed rows."""
        folder = self.dir(name) / table
        return lambda lines: folder.is_dir() and len(_committed(folder)) >= n

    # counts --------------------------------------------------------------------------------------------
    def snapshot(self, name: str = "s") -> dict[str, str]:
        """run id -> digest of its committed row file, over the run tables (superseded finals included)."""
        out = {}
        for table in RUN_TABLES:
            for p in _committed(self.dir(name) / table):
                out[p.stem] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def files(self, name: str = "s") -> dict[str, str]:
        """Every file of the sweep folder -> digest (for "nothing written")."""
        d = self.dir(name)
        return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*")) if p.is_file()}

    def counts(self, before: dict[str, str], name: str = "s") -> Counts:
        after = self.snapshot(name)
        lost = sum(1 for k in before if k not in after)
        rerun = sum(1 for k, v in before.items() if k in after and after[k] != v)
        return Counts(lost, self.duplicates(name), rerun)

    def duplicates(self, name: str = "s") -> int:
        """Rows beyond the first of one tuning trial (cell, trial number) or one final seed of one configuration."""
        d = self.dir(name)
        dup = 0
        trials = read_table(d, "trials")
        if not trials.is_empty():
            dup += trials.height - trials.select("rule", "arch", "dataset", "trial_number").n_unique()
        finals = read_table(d, "final_runs")
        if not finals.is_empty():
            dup += finals.height - finals.select("rule", "arch", "dataset", "seed", "config_json").n_unique()
        return dup

    def table(self, table: str, name: str = "s") -> pl.DataFrame:
        return read_table(self.dir(name), table)

    def manifest(self, name: str = "s") -> dict:
        path = self.dir(name) / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def _read_lines(proc: subprocess.Popen, lines: list[str]) -> None:
    for line in iter(proc.stderr.readline, ""):
        lines.append(line)


def _committed(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []


def _kill_group(proc: subprocess.Popen) -> None:
    """What the sweep started (its Ray) must not outlive a case."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # a Ray child left behind in the driver's session
