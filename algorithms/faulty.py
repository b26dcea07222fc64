"""``faulty``: backprop with injectable faults, for the orchestrator's fault-injection tests.

Not a learning rule of the comparison: it lives outside ``algorithms/rules/`` and is registered only
when ``BIOPLAUS_RULE_MODULES=bioplaus.algorithms.faulty`` is set (the tests set it for their Ray workers).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rules.bp import Backprop, BPHParams


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
    started_dir: str = ""
    """If set: at its first step a run writes a file named after its Ray node and process into this folder
    (so a test knows which nodes are busy before it injects a fault)."""


@register
class Faulty(Backprop):
    name = "faulty"
    summary = "backprop with injectable faults (NaN, exception, worker death, slowness, hang); tests only"
    HParams = FaultyHParams
    benchmarks = ()

    def __init__(self, net, hp, info):
        super().__init__(net, hp, info)
        self.steps = 0

    def train_step(self, x, y):
        self.steps += 1
        hp = self.hp
        if hp.started_dir and self.steps == 1:
            Path(hp.started_dir, f"{_node_id()}-{os.getpid()}").write_text(str(time.time()))
        if hp.sleep_per_step_s:
            time.sleep(hp.sleep_per_step_s)
        if self.steps == hp.hang_at_step and (not hp.hang_once_marker or _claim(hp.hang_once_marker)):
            while True:  # a hung step: only a timeout (budget.trial_timeout_s) or a kill ends it
                time.sleep(1.0)
        if self.steps == hp.raise_at_step:
            raise RuntimeError(f"injected failure at step {self.steps}")
        if hp.die_once_marker and self.steps == 2 and not Path(hp.die_once_marker).exists():
            Path(hp.die_once_marker).write_text(str(os.getpid()))
            os._exit(17)
        metrics = super().train_step(x, y)
        if 0 <= hp.nan_at_step <= self.steps:
            metrics["loss"] = torch.tensor(float("nan"))
        return metrics


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
