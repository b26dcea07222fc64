"""The training cost of a run's configuration, counted in floating-point operations per training sample.

A count is a property of the configuration alone: the same on every machine, device and load, so a budget
set in it (``budget.kind=compute``, orchestrator/sweep/budget.py) follows from the config and the seed, and
the report can put runs of different sweeps and machines on one cost axis. Counted with torch's own FLOP
registry (matrix products, convolutions, attention: forward, backward, forward-mode and hand-written updates
alike) on the run's real first training steps, built exactly as the run builds it, on the CPU. Left out:
element-wise work, random draws and per-operation overhead (measured wall time is the other view).

The unit the comparison uses is the **bp-epoch**: the FLOPs one epoch of ``bp`` costs on the same cell (same
architecture, data, batch size and model settings, bp's own hyperparameters): :func:`reference_config`.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from bioplaus.orchestrator.build import build_rule
from bioplaus.orchestrator.config import Config
from bioplaus.orchestrator.data import DataSplits, load_raw, make_splits
from bioplaus.orchestrator.feed import TrainFeed
from bioplaus.orchestrator.spec import resolve

REFERENCE_RULE = "bp"
COUNTED_STEPS = 2
"""Training steps whose FLOPs are counted (their mean per sample is the configuration's cost)."""


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of every operation torch's FLOP registry knows, of whatever runs inside it.

    torch's ``FlopCounterMode`` also tracks modules with hooks that ``torch.autograd.grad`` inside a
    training step refuses (energy-based rules settle with it); the count here is the same registry's.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += int(count(*args, **kwargs, out_val=out))
        return out


def train_flops_per_sample(rule, feed: TrainFeed, batch_size: int, steps: int = COUNTED_STEPS) -> float:
    """The mean FLOPs per training sample of ``rule``'s first ``steps`` training steps on ``feed``'s first
    batches (the rule is trained by them: pass a copy)."""
    n = len(feed.train_y)
    with FlopCount() as counter:
        for s in range(steps):
            idx = torch.arange(s * batch_size, (s + 1) * batch_size) % n
            rule.train_step(*feed.batch(idx))
    return counter.total / (steps * batch_size)


class KeptRandomState:
    """Leaves the caller's random streams (torch, numpy, random) as they were: counting builds and trains a
    copy of a run, which draws from them."""

    def __enter__(self):
        self.saved = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
        return self

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.saved[0])
        np.random.set_state(self.saved[1])
        random.setstate(self.saved[2])


def reference_config(plain: dict) -> dict:
    """The bp run the cost of ``plain`` (a plain trial config) is compared with: the same cell, data, batch
    size and model settings, bp's own hyperparameters."""
    return {**plain, "rule": REFERENCE_RULE, "hp": {}}


class FlopCounter:
    """Counts configurations' training FLOPs per sample, each once; the data of each dataset and data
    setting is loaded once (with ``seed``'s validation split: a count does not depend on it)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._counts: dict[str, float] = {}
        self._splits: dict[str, DataSplits] = {}

    @staticmethod
    def key(plain: dict) -> str:
        """What a count depends on: the configuration without its seed, epochs and device."""
        train = {k: v for k, v in plain.get("train", {}).items() if k not in ("epochs", "device", "threads")}
        return json.dumps({**{k: v for k, v in plain.items() if k not in ("seed", "out")}, "train": train},
                          sort_keys=True, default=str)

    def per_sample(self, plain: dict) -> float:
        """Training FLOPs per sample of the run ``plain``; errors of the rule propagate."""
        key = self.key(plain)
        if key not in self._counts:
            self._counts[key] = self._count(plain)
        return self._counts[key]

    def _data(self, plain: dict, cfg) -> DataSplits:
        key = json.dumps([plain["dataset"], plain.get("data")], sort_keys=True, default=str)
        if key not in self._splits:
            self._splits[key] = make_splits(load_raw(cfg.dataset, cfg.data), cfg.data, self.seed)
        return self._splits[key]

    def _count(self, plain: dict) -> float:
        fixed = {**plain, "seed": self.seed, "out": None, "train": {**plain["train"], "device": "cpu"}}
        spec = resolve(OmegaConf.merge(OmegaConf.structured(Config), fixed))
        with KeptRandomState():
            splits = self._data(plain, spec.cfg)
            batch = min(int(spec.cfg.train.batch_size), len(splits.train_y))
            rule = build_rule(spec, splits.input_shape, splits.num_classes, len(splits.train_y) // batch,
                              torch.device("cpu"))
            feed = TrainFeed(splits, spec.cfg.data.augment, aug_seed=self.seed + 1)
            return train_flops_per_sample(rule, feed, batch)

    def with_reference(self, plain: dict) -> tuple[float, float]:
        """(FLOPs per sample of ``plain``, of its bp reference)."""
        return self.per_sample(plain), self.per_sample(reference_config(plain))


def counts_of(configs: list[dict[str, Any]], seed: int = 0) -> list[tuple[float | None, float | None, str | None]]:
    """(FLOPs per sample, bp's, the error if counting failed) of each plain trial config, for readers of
    finished runs (the report): a failure is a value, never an exception."""
    counter, out = FlopCounter(seed), []
    for plain in configs:
        try:
            out.append((*counter.with_reference(plain), None))
        except Exception as e:  # noqa: BLE001  (data not here, a rule that changed: the count is just unknown)
            out.append((None, None, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
    return out
