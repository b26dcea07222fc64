"""Learning-rate schedules over a whole run, built for every rule's optimiser by ``make_optimizer``.

``constant``: the optimiser's rate throughout. ``cosine``: cosine annealing to zero at the last step.
``onecycle`` (Smith & Topin 2019, torch's ``OneCycleLR`` shape): the rate rises from lr/25 to lr over the
first 30 % of the steps and falls to lr/25e4 over the rest, both along a half cosine; past the last step it
stays at its final value. Momentum is not cycled: it is a searched knob of its own, and cycling it would
override the value a trial asked for.
"""

from __future__ import annotations

import functools
import math

import torch

SCHEDULES = ("constant", "cosine", "onecycle")
ONECYCLE_WARMUP = 0.3
"""Fraction of the steps spent rising to the peak rate."""
ONECYCLE_START = 1 / 25
"""Initial rate as a fraction of the peak (torch's div_factor 25)."""
ONECYCLE_END = 1 / 25e4
"""Final rate as a fraction of the peak (torch's div_factor x final_div_factor)."""


def _half_cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def onecycle_factor(step: int, total_steps: int) -> float:
    """The one-cycle rate at ``step`` as a fraction of the peak rate."""
    warmup = max(1, int(ONECYCLE_WARMUP * total_steps))
    if step < warmup:
        return _half_cosine(ONECYCLE_START, 1.0, step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return _half_cosine(1.0, ONECYCLE_END, progress)


def build_schedule(opt: torch.optim.Optimizer, name: str, total_steps: int):
    """The per-step scheduler of schedule ``name`` over ``total_steps`` (None for constant)."""
    if name == "constant":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    if name == "onecycle":
        return torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(onecycle_factor,
                                                                        total_steps=max(1, total_steps)))
    raise ValueError(f"unknown schedule {name!r}; use {', '.join(SCHEDULES)}")
