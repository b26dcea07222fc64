"""Fault injection as a command (``bioplaus bench --faults``): each fault on a small sweep, one table row.

A **fault case** is one function registered with :func:`fault`: it gets a :class:`~.harness.Bench` (a
temporary folder of its own, and helpers that run real ``bioplaus sweep`` processes, signal them and
compare their tables before and after) and returns an :class:`Outcome`. The runner runs every case (or the
named ones), turns an exception inside a case into a FAIL row, and prints the table: fault, expected,
observed, rows lost, duplicated, completed trainings re-run, status, exit code, OK/FAIL.

Cases live in the modules of this package whose name ends in ``_cases`` (found by :func:`load_cases`):
adding a fault is adding a function to one of them, or a new ``<topic>_cases.py`` module.
docs/reliability.md holds the table between two markers; ``--write-docs`` rewrites it from a run.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bioplaus.orchestrator.errors import UsageError, one_line


@dataclass
class Outcome:
    """What a fault case observed; ``ok`` is the case's own verdict (its expectation held)."""

    observed: str
    ok: bool
    status: str | None = None
    exit_code: int | None = None
    lost: int = 0
    duplicated: int = 0
    rerun: int = 0


@dataclass(frozen=True)
class FaultCase:
    name: str
    expected: str
    run: Callable[..., Outcome]


@dataclass
class Row:
    """One line of the table: a case, what it expected and what it observed, and how long it took."""

    fault: str
    expected: str
    observed: str
    lost: int
    duplicated: int
    rerun: int
    status: str | None
    exit_code: int | None
    ok: bool
    seconds: float


FAULTS: dict[str, FaultCase] = {}


def fault(name: str, expected: str) -> Callable[[Callable[..., Outcome]], Callable[..., Outcome]]:
    """Register ``fn(bench) -> Outcome`` as the fault case ``name`` (unique), expecting ``expected``."""

    def register(fn: Callable[..., Outcome]) -> Callable[..., Outcome]:
        if name in FAULTS:
            raise ValueError(f"fault case {name!r} is registered twice")
        FAULTS[name] = FaultCase(name, expected, fn)
        return fn

    return register


def load_cases() -> dict[str, FaultCase]:
    """Import every ``*_cases`` module of this package (each registers its cases); returns the registry."""
    for info in pkgutil.iter_modules(__path__):
        if info.name.endswith("_cases"):
            importlib.import_module(f"{__name__}.{info.name}")
    return FAULTS


def select(only: list[str] | None) -> list[FaultCase]:
    """The cases whose name contains one of ``only`` (case-insensitive; every case when empty)."""
    cases = load_cases()
    words = [w.lower() for w in only or []]
    unknown = [w for w in words if not any(w in name.lower() for name in cases)]
    if unknown:
        raise UsageError(f"no fault case matches {unknown}; the cases: {'; '.join(cases)}")
    return [c for name, c in cases.items() if not words or any(w in name.lower() for w in words)]


def run_case(case: FaultCase, work: Path, log: Callable[[str], None]) -> Row:
    """Run one case in its own folder under ``work``; an exception inside it is a FAIL row naming it."""
    from bioplaus.orchestrator.faults.harness import Bench

    tick = time.monotonic()
    folder = work / re.sub(r"[^A-Za-z0-9_.-]+", "-", case.name)
    folder.mkdir(parents=True)
    try:
        out = case.run(Bench(folder, log))
    except Exception as e:  # the case itself broke: a FAIL row, the other cases still run
        out = Outcome(observed=f"the check itself failed: {one_line(e)}", ok=False)
    observed = out.observed.replace(str(folder), "<tmp>")  # the temporary folder says nothing
    row = Row(case.name, case.expected, observed, out.lost, out.duplicated, out.rerun, out.status,
              out.exit_code, bool(out.ok and out.lost == 0 and out.duplicated == 0 and out.rerun == 0),
              time.monotonic() - tick)
    log(f"{'OK  ' if row.ok else 'FAIL'} {case.name} ({row.seconds:.0f}s): {observed}")
    return row


def run_faults(only: list[str] | None = None, log: Callable[[str], None] = lambda m: None,
               work: Path | None = None) -> list[Row]:
    """Run the selected cases (every one by default), each in a fresh temporary folder."""
    cases = select(only)
    with tempfile.TemporaryDirectory(prefix="bioplaus-faults-") as tmp:
        root = Path(work) if work is not None else Path(tmp)
        return [run_case(c, root, log) for c in cases]


def _cell(value) -> str:
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| Fault | Expected | Observed | Lost | Duplicated | Re-run | Status | Exit | Result |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {_cell(r.fault)} | {_cell(r.expected)} | {_cell(r.observed)} | {r.lost} | {r.duplicated} | "
              f"{r.rerun} | {_cell(r.status)} | {_cell(r.exit_code)} | {'OK' if r.ok else 'FAIL'} |" for r in rows]
    return "\n".join(lines)


def json_rows(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1)


DOCS_BEGIN = "<!-- bioplaus bench --faults: begin -->"
DOCS_END = "<!-- bioplaus bench --faults: end -->"


def write_docs(rows: list[Row], path: Path, command: str, wall_s: float) -> None:
    """Replace the table between the markers of ``path`` (docs/reliability.md) with this run's."""
    text = path.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise UsageError(f"{path} has no {DOCS_BEGIN} ... {DOCS_END} section to rewrite; add the two markers")
    ok = sum(r.ok for r in rows)
    body = (f"`{command}` on {time.strftime('%Y-%m-%d')}: {ok} of {len(rows)} OK, rows lost "
            f"{sum(r.lost for r in rows)}, duplicated {sum(r.duplicated for r in rows)}, completed trainings re-run "
            f"{sum(r.rerun for r in rows)}; {wall_s:.0f} s wall.\n\n{markdown_table(rows)}\n")
    head, rest = text.split(DOCS_BEGIN, 1)
    path.write_text(f"{head}{DOCS_BEGIN}\n{body}{DOCS_END}{rest.split(DOCS_END, 1)[1]}")
