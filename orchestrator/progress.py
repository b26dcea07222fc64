"""Progress on stderr: a live rich bar on a terminal, plain periodic lines elsewhere, or nothing when disabled.

:class:`ProgressBar` is the one helper; :func:`runs_bar` is the sweep's view (runs done / running, the
latest result, elapsed and ETA) and :func:`epoch_bar` a training run's (steps of the current epoch).
A disabled bar (or one with nothing to count) accepts every call and draws nothing.

When stderr is not a terminal (CI, SLURM, nohup, a pipe) a live bar's cursor movements garble the log,
so the bar becomes :class:`PlainLines`: one plain line (no terminal control sequences) at most every
``BIOPLAUS_PROGRESS_EVERY_S`` seconds (default 30) and when the count is complete.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

DEFAULT_EVERY_S = 30.0


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get("BIOPLAUS_PROGRESS_EVERY_S", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


class PlainLines:
    """The bar as plain lines on stderr: ``<label> <done>/<total> <field value ...> elapsed H:MM:SS``.

    ``transient``: no line forced at the end of a count (a training run prints its own line per epoch).
    """

    def __init__(self, label: str, total: int, transient: bool = False, **fields: Any):
        self.label, self.total, self.fields, self.transient = label, total, dict(fields), transient
        self.completed = 0
        self.started = time.monotonic()
        self.last_line = -float("inf")
        self.every_s = _every_s()

    def _line(self) -> str:
        shown = " ".join(f"{k} {v}" for k, v in self.fields.items() if v not in ("", None))
        return f"{self.label} {self.completed}/{self.total} {shown} elapsed {_clock(time.monotonic() - self.started)}"

    def emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_line >= self.every_s:
            self.last_line = now
            print(" ".join(self._line().split()), file=sys.stderr, flush=True)

    def update(self, completed: int | None = None, advance: int = 0, total: int | None = None, **fields: Any) -> None:
        before = self.completed
        self.total = self.total if total is None else total
        self.completed = (self.completed if completed is None else completed) + advance
        self.fields.update(fields)
        if self.completed != before:
            self.emit(force=self.completed >= self.total and not self.transient)

    def reset(self, total: int, **fields: Any) -> None:
        self.total, self.completed = total, 0
        self.fields.update(fields)

    def print(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.transient:
            self.emit(force=self.completed < self.total)  # where it stopped, if short of the end


def live_terminal() -> bool:
    """Whether stderr is a terminal a live bar can redraw (not a pipe, file or ``TERM=dumb``)."""
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class ProgressBar:
    """One rich task on stderr (plain lines when stderr is not a terminal). ``columns``: rich columns
    (``{task.fields[name]}`` shows a field's value); ``fields``: the fields' initial values;
    ``transient``: the bar disappears when closed."""

    def __init__(self, enabled: bool, description: str, total: int, columns: list[Any],
                 transient: bool = False, **fields: Any):
        self.enabled = enabled and total > 0
        self.plain: PlainLines | None = None
        if not self.enabled:
            return
        if not live_terminal():
            self.plain = PlainLines(description, total, transient, **fields)
            return
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(*columns, console=Console(stderr=True), transient=transient)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, **fields)

    def update(self, **fields: Any) -> None:
        """Set fields (and rich's own ``completed=``, ``advance=``) of the bar."""
        if self.plain is not None:
            self.plain.update(**fields)
        elif self.enabled:
            self.progress.update(self.task, **fields)

    def reset(self, total: int, **fields: Any) -> None:
        """Start the bar over at 0 of ``total``."""
        if self.plain is not None:
            self.plain.reset(total, **fields)
        elif self.enabled:
            self.progress.reset(self.task, total=total, **fields)

    def print(self, text: str) -> None:
        """A line above the bar (it stays when the bar is gone)."""
        if self.plain is not None:
            self.plain.print(text)
        elif self.enabled:
            self.progress.console.print(text)

    def close(self) -> None:
        if self.plain is not None:
            self.plain.close()
        elif self.enabled:
            self.progress.stop()


def runs_bar(enabled: bool, label: str, total: int) -> ProgressBar:
    """Runs done of ``total`` / running now (field ``running``), elapsed, ETA and the latest result (``info``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("running {task.fields[running]}"), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    return ProgressBar(enabled, label, total, columns, running=0, info="")


def epoch_bar(enabled: bool, epochs: int, steps: int) -> ProgressBar:
    """Steps of the current epoch (field ``epoch``, of ``epochs``), ETA and the latest metrics (``info``);
    transient: the bar goes when the run ends, the lines printed above it stay."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]epoch {task.fields[epoch]}/" + str(epochs)), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    return ProgressBar(enabled, "train steps", steps, columns, transient=True, epoch=1, info="")
