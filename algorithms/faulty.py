"""``faulty``: backprop with injectable faults, for the orchestrator's fault-injection tests.

Not a learning rule of the comparison: it lives outside ``algorithms/rules/`` and is registered only
when ``BIOPLAUS_RULE_MODULES=bioplaus.algorithms.faulty`` is set (the tests set it for their Ray workers).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rules.bp import Backprop, BPHParams

# How long wait_for_started waits for the other runs: a guard against a test that can never fill the barrier.
WAIT_LIMIT_S = 300.0


@dataclass
class FaultyHParams(BPHParams):
    """Backprop's hyperparameters plus the faults to inject."""

    nan_at_step: int = -1
    """Return a NaN loss from this training step on (-1: never)."""
    raise_at_step: int = -1
    """Raise RuntimeError at this training step (-1: never)."""
    die_once_marker: str = ""
    """If set and this file does not exist: create it and kill the worker process (os._exit) at step 2."""
    sleep_per_step_s: float = 0.0
    """Sleep this long in every step (a slow trial)."""
    hang_at_step: int = -1
    """Block for good at this training step, never returning (a hung trial; -1: never)."""
    hang_once_marker: str = ""
    """With hang_at_step: only the run that creates this file (the first to get there) hangs."""
    hang_skip: int = 0
    """With hang_once_marker: the first this many runs to get there go on (each creates ``<marker>.skip<i>``)
    and the next one hangs, so a test can hold a sweep at a known point (after that many runs)."""
    hang_released_by: str = ""
    """With hang_at_step: the hang ends once this file exists (a test holds a run at a known point, then lets it
    go on)."""
    hang_on_node: str = ""
    """With hang_at_step: only runs on the Ray node with this id hang (that node is then busy when it dies)."""
    started_dir: str = ""
    """If set: at its first step a run writes a file named after its Ray node and process into this folder
    (so a test knows which nodes are busy before it injects a fault)."""
    wait_for_started: int = 0
    """With started_dir: at its first step a run waits until this many runs have written their file there
    (raising after ``WAIT_LIMIT_S``), so that many are under way at once: on nodes that each fit one run,
    on that many nodes, whatever order the scheduler starts them in."""
    say: str = ""
    """If set: at its first step a run prints this line to its stderr (as a library's warning would), so a test
    sees what the driver makes of a worker's output."""
    frozen_while: str = ""
    """If set and this file exists: the weights are set to zero and never updated (every input gets class 0, so
    accuracy is that class's share); removing the file between two runs of a sweep makes a later trial the best."""


@register
class Faulty(Backprop):
    name = "faulty"
    summary = ("backprop with injectable faults (NaN, exception, worker death, slowness, hang) and a barrier "
               "between runs; tests only")
    HParams = FaultyHParams
    benchmarks = ()

    def __init__(self, net, hp, info):
        super().__init__(net, hp, info)
        self.steps = 0

    def train_step(self, x, y):
        self.steps += 1
        hp = self.hp
        if hp.say and self.steps == 1:
            print(hp.say, file=sys.stderr, flush=True)
        if hp.started_dir and self.steps == 1:
            Path(hp.started_dir, f"{_node_id()}-{os.getpid()}").write_text(str(time.time()))
            if hp.wait_for_started:
                _wait_for_files(Path(hp.started_dir), hp.wait_for_started)
        if hp.sleep_per_step_s:
            time.sleep(hp.sleep_per_step_s)
        if self.steps == hp.hang_at_step and self._hangs_here():
            # a hung step: only a timeout (budget.trial_timeout_s), a kill or the release file ends it
            while not (hp.hang_released_by and Path(hp.hang_released_by).exists()):
                time.sleep(0.2)
        if self.steps == hp.raise_at_step:
            raise RuntimeError(f"injected failure at step {self.steps}")
        if hp.die_once_marker and self.steps == 2 and not Path(hp.die_once_marker).exists():
            Path(hp.die_once_marker).write_text(str(os.getpid()))
            os._exit(17)
        if hp.frozen_while and Path(hp.frozen_while).exists():
            with torch.no_grad():
                for p in self.net.parameters():
                    p.zero_()
                logits = self.net(x)
            return {"loss": torch.nn.functional.cross_entropy(logits, y), "correct": (logits.argmax(1) == y).sum()}
        metrics = super().train_step(x, y)
        if 0 <= hp.nan_at_step <= self.steps:
            metrics["loss"] = torch.tensor(float("nan"))
        return metrics

    def _hangs_here(self) -> bool:
        hp = self.hp
        if hp.hang_on_node and _node_id() != hp.hang_on_node:
            return False
        if not hp.hang_once_marker:
            return True
        if any(_claim(f"{hp.hang_once_marker}.skip{i}") for i in range(hp.hang_skip)):
            return False
        return _claim(hp.hang_once_marker)


def _wait_for_files(folder: Path, count: int) -> None:
    """Block until ``folder`` holds ``count`` files (a barrier between runs); RuntimeError after WAIT_LIMIT_S."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while (found := len(list(folder.iterdir()))) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {found} of {count} runs started within {WAIT_LIMIT_S:.0f}s ({folder})")
        time.sleep(0.05)


def _claim(marker: str) -> bool:
    """Create ``marker`` unless it exists (atomically: of concurrent runs, exactly one gets True)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # outside Ray
        return "local"
