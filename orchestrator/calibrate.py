"""How long one training step and one evaluated sample of a trial take on this machine's device: what the
cost estimate (orchestrator/cost_model.py) is calibrated with, and what the packed-trial and GPU benches time.

A trial is prepared exactly as ``run_trial`` prepares it (the rule built from its checked config, the feed
with its augmentation, the data on the device), on its real data or on shape-exact synthetic data
(orchestrator/data/synthetic.py); then a few warm-up steps (kernel selection, lazy initialisation) and timed
steps through the sequential trainer's own loop, until both a step count and a duration are reached.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bioplaus.algorithms.rule import Rule
from bioplaus.orchestrator.build import build_rule, start_trial
from bioplaus.orchestrator.data import DataSplits
from bioplaus.orchestrator.data.synthetic import SHAPES, synthetic_splits
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.feed import TrainFeed
from bioplaus.orchestrator.spec import TrialSpec
from bioplaus.orchestrator.training import FitPlan, SequentialTrainer, epoch_order, evaluate
from bioplaus.orchestrator.trial import load_splits


@dataclass
class PreparedTrial:
    """A trial ready to step: its rule, feed and plan on its device, and what preparing it cost."""

    spec: TrialSpec
    rule: Rule
    feed: TrainFeed
    splits: DataSplits
    plan: FitPlan
    device: torch.device
    setup_s: float
    data: str  # "real" or "synthetic"

    def batches(self):
        """Training batches' indices, epoch after epoch, for as long as they are asked for."""
        while True:
            perm = epoch_order(self.plan)
            for b in range(self.plan.steps):
                yield perm[b * self.plan.batch:(b + 1) * self.plan.batch]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings read the host clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(spec: TrialSpec, data: str = "synthetic", pool: int | None = None) -> PreparedTrial:
    """Build ``spec``'s trial as ``run_trial`` does; ``data="synthetic"`` uses random images shaped like the
    dataset (``pool`` training images: enough for several full batches), ``"real"`` its real splits."""
    cfg = spec.cfg
    t, seed = cfg.train, int(cfg.seed)
    device = start_trial(cfg)
    tick = time.perf_counter()
    if data == "real":
        splits = load_splits(cfg)
    elif data == "synthetic":
        if cfg.dataset not in SHAPES:
            raise UsageError(f"dataset={cfg.dataset} has no synthetic stand-in; time it on its real data")
        n = pool or max(4 * int(t.batch_size), 2048)
        splits = synthetic_splits(cfg.dataset, n, max(n // 4, 64), 64, seed)
    else:
        raise UsageError(f"data={data!r} must be real or synthetic")
    splits.to(device)
    plan = FitPlan.of(t, len(splits.train_y), device, seed)
    rule = build_rule(spec, splits.input_shape, splits.num_classes, plan.steps, device)
    feed = TrainFeed(splits, cfg.data.augment, aug_seed=seed + 1)
    rule.train()
    sync(device)
    return PreparedTrial(spec, rule, feed, splits, plan, device, time.perf_counter() - tick, data)


def run_steps(trial: PreparedTrial, batches, n: int) -> None:
    """``n`` training steps through the sequential trainer's loop (the feed builds each batch)."""
    trainer = SequentialTrainer(trial.rule, trial.feed)
    for _ in trainer.train_epoch(next(batches) for _ in range(n)):
        pass


def time_steps(trial: PreparedTrial, warmup: int = 2, min_steps: int = 5, min_seconds: float = 0.0,
               max_steps: int = 10_000) -> tuple[float, int]:
    """(seconds per training step, steps timed): ``warmup`` untimed steps, then rounds of doubling length
    until at least ``min_steps`` steps and ``min_seconds`` are timed (at most ``max_steps``)."""
    batches = trial.batches()
    run_steps(trial, batches, warmup)
    sync(trial.device)
    done, seconds, n = 0, 0.0, max(1, min_steps)
    while True:
        tick = time.perf_counter()
        run_steps(trial, batches, n)
        sync(trial.device)
        seconds += time.perf_counter() - tick
        done += n
        if (done >= min_steps and seconds >= min_seconds) or done >= max_steps:
            return seconds / done, done
        n = min(2 * n, max_steps - done)


def time_eval(trial: PreparedTrial, samples: int | None = None) -> float:
    """Seconds per evaluated sample (the validation pass of every epoch, the final test pass)."""
    splits = trial.splits
    n = min(samples or len(splits.val_y), len(splits.val_y))
    x, y = splits.val_x[:n], splits.val_y[:n]
    evaluate(trial.rule, splits, x, y, trial.plan.eval_batch_size)  # warm-up
    sync(trial.device)
    tick = time.perf_counter()
    evaluate(trial.rule, splits, x, y, trial.plan.eval_batch_size)
    sync(trial.device)
    return (time.perf_counter() - tick) / max(1, n)


def time_cell(spec: TrialSpec, data: str = "synthetic", warmup: int = 2, min_steps: int = 5,
              min_seconds: float = 0.0) -> dict:
    """One cell's calibration row: seconds per step (at its batch size), per evaluated sample, to set up."""
    trial = prepare(spec, data)
    step_s, steps = time_steps(trial, warmup, min_steps, min_seconds)
    row = {"step_s": step_s, "steps_timed": steps, "batch": trial.plan.batch,
           "eval_s_per_sample": time_eval(trial), "setup_s": trial.setup_s, "data": trial.data,
           "device": str(trial.device)}
    del trial
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def device_name(device: torch.device) -> str:
    """A readable name of the device the calibration ran on (the GPU's model, or the CPU and its threads)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} thread(s)"
