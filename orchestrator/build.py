"""Building what a trial trains, from its checked config: the device, the seeded network, the rule.

One place, so that every copy of a trial's rule is the same rule: the trial's own, each pipeline stage's
copy (built on its worker, then given the trial's initial weights) and the untrained control of brain
similarity (the architecture as the trial initialised it).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from bioplaus.algorithms.arch import ArchSpec, Network
from bioplaus.algorithms.rule import Rule, RunInfo
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.spec import TrialSpec


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def start_trial(cfg: Any) -> torch.device:
    """What a trial does first in its process: pick its device, set torch's threads (``train.threads``), seed
    every random number generator with the run seed. Returns the device."""
    t = cfg.train
    device = pick_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(int(cfg.seed), t.deterministic)
    return device


def build_network(arch: ArchSpec, model_cfg: Any, input_shape: tuple[int, ...], num_classes: int,
                  seed: int) -> Network:
    """The architecture initialised from torch's global RNG seeded with the run seed (a trial's initial
    weights depend on nothing drawn before them)."""
    torch.manual_seed(seed)
    return arch.build(model_cfg, tuple(input_shape), num_classes)


def build_rule(spec: TrialSpec, input_shape: tuple[int, ...], num_classes: int, steps: int,
               device: torch.device) -> Rule:
    """The trial's network (see :func:`build_network`) wrapped in its rule, both on ``device``; ``steps``:
    training batches per epoch. UsageError when the architecture refuses the config or the data's shape."""
    cfg = spec.cfg
    seed = int(cfg.seed)
    try:
        net = build_network(spec.arch, spec.model_cfg, input_shape, num_classes, seed)
    except (ValueError, RuntimeError) as e:  # a config the builder rejects, or a shape torch cannot make
        raise UsageError(f"arch={cfg.arch} on dataset={cfg.dataset}: {e}") from None
    info = RunInfo(num_classes, tuple(input_shape), cfg.train.epochs, steps, device, seed)
    return spec.rule_cls(net.to(device), spec.hp, info).to(device)
