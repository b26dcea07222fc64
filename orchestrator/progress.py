"""Live progress on stderr: one rich progress bar with named text fields, or nothing when disabled.

:class:`ProgressBar` is the one helper; :func:`runs_bar` is the sweep's view (runs done / running, the
latest result, elapsed and ETA) and :func:`epoch_bar` a training run's (steps of the current epoch).
A disabled bar (or one with nothing to count) accepts every call and draws nothing.
"""

from __future__ import annotations

from typing import Any


class ProgressBar:
    """One rich task on stderr. ``columns``: rich columns (``{task.fields[name]}`` shows a field's value);
    ``fields``: the fields' initial values; ``transient``: the bar disappears when closed."""

    def __init__(self, enabled: bool, description: str, total: int, columns: list[Any],
                 transient: bool = False, **fields: Any):
        self.enabled = enabled and total > 0
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(*columns, console=Console(stderr=True), transient=transient)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, **fields)

    def update(self, **fields: Any) -> None:
        """Set fields (and rich's own ``completed=``, ``advance=``) of the bar."""
        if self.enabled:
            self.progress.update(self.task, **fields)

    def reset(self, total: int, **fields: Any) -> None:
        """Start the bar over at 0 of ``total``."""
        if self.enabled:
            self.progress.reset(self.task, total=total, **fields)

    def print(self, text: str) -> None:
        """A line above the bar (it stays when the bar is gone)."""
        if self.enabled:
            self.progress.console.print(text)

    def close(self) -> None:
        if self.enabled:
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
    return ProgressBar(enabled, "train", steps, columns, transient=True, epoch=1, info="")
