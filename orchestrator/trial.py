"""A trial: train and evaluate one (rule, arch, dataset, hyperparameters, seed) configuration.

``resolve`` (orchestrator/spec.py) checks everything a user can get wrong before any expensive work.
``run_trial`` then loads the data once onto the device, builds the rule (orchestrator/build.py), picks
the trainer for ``train.mode`` (sequential here, layer-parallel in orchestrator/pipeline.py), trains
epoch by epoch (orchestrator/training.py), reporting each epoch's metrics through a callback (Ray Tune's
``report`` in a sweep), selects the model on the validation split, evaluates the test set once at the
end and returns the run record.
"""

from __future__ import annotations

import resource
import time
import traceback
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from bioplaus.algorithms.rule import Rule
from bioplaus.orchestrator.build import build_rule, pick_device, seed_everything, start_trial
from bioplaus.orchestrator.checkpoint import save_network
from bioplaus.orchestrator.config import to_plain
from bioplaus.orchestrator.data import DataSplits, load_raw, make_splits
from bioplaus.orchestrator.feed import AUGMENTS, TrainFeed, affine_batch, augment_batch
from bioplaus.orchestrator.pipeline import Pipeline
from bioplaus.orchestrator.progress import epoch_bar
from bioplaus.orchestrator.spec import TrialSpec, resolve
from bioplaus.orchestrator.training import (
    FitPlan,
    History,
    NoProgress,
    SequentialTrainer,
    Trainer,
    evaluate,
)

Report = Callable[[dict[str, Any]], None]

# Importable from here as before the training layer was split into modules.
__all__ = ["AUGMENTS", "Report", "TrainFeed", "TrialSpec", "affine_batch", "augment_batch", "evaluate",
           "load_splits", "pick_device", "resolve", "run_trial", "seed_everything"]


def load_splits(cfg: DictConfig) -> DataSplits:
    """The trial's train/val/test splits (downloading missing files); DataError names a bad file."""
    return make_splits(load_raw(cfg.dataset, cfg.data), cfg.data, int(cfg.seed))


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


def run_trial(cfg: DictConfig | TrialSpec, report: Report | None = None, progress: bool = False,
              splits: DataSplits | None = None, evaluate_test: bool = True,
              save_model: str | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration. Returns the run record with an ``epochs`` list.

    ``report`` receives each epoch's row plus the running totals a scheduler or logger needs
    (``status``, ``best_val_acc``, ``best_epoch``, ``train_seconds``, ...), so a trial stopped early
    by a scheduler is still fully described by its last report. ``evaluate_test=False`` (tuning
    trials) never touches the test set. ``save_model`` writes the selected network (see
    orchestrator/checkpoint.py) for later analysis, e.g. brain similarity.
    """
    spec = cfg if isinstance(cfg, TrialSpec) else resolve(cfg)
    cfg = spec.cfg
    device, started, splits, plan = prepare_trial(spec, splits)
    rule = build_rule(spec, splits.input_shape, splits.num_classes, plan.steps, device)
    feed = TrainFeed(splits, cfg.data.augment, aug_seed=int(cfg.seed) + 1)
    record = _new_record(spec, rule, splits, device, started)
    history = _train(spec, rule, splits, plan, feed, record, report, progress)
    _finish_record(record, spec, rule, splits, history, device, evaluate_test, save_model)
    return record


def prepare_trial(spec: TrialSpec, splits: DataSplits | None) -> tuple[torch.device, float, DataSplits, FitPlan]:
    """What every trial starts with: the device, threads and seeds set, the start time, the data on the device
    (loaded unless given) and the epoch plan."""
    t, seed = spec.cfg.train, int(spec.cfg.seed)
    device = start_trial(spec.cfg)
    started = time.time()
    if splits is None:
        splits = load_splits(spec.cfg)
    splits.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return device, started, splits, FitPlan.of(t, len(splits.train_y), device, seed)


def _new_record(spec: TrialSpec, rule: Rule, splits: DataSplits, device: torch.device,
                started: float) -> dict[str, Any]:
    """The run record's identity and sizes, before training."""
    cfg, net = spec.cfg, rule.net
    n_params = sum(p.numel() for p in net.parameters())
    in_net = {id(t) for t in (*net.parameters(), *net.buffers())}  # the rule's own state: feedback weights, heads
    n_rule_params = sum(t.numel() for t in (*rule.parameters(), *rule.buffers()) if id(t) not in in_net)
    return {
        "rule": cfg.rule, "arch": cfg.arch, "dataset": cfg.dataset, "seed": int(cfg.seed), "status": "ok",
        "error": None, "device": str(device), "n_params": n_params, "n_rule_params": n_rule_params,
        "n_train": len(splits.train_y), "n_val": len(splits.val_y), "n_test": len(splits.test_y),
        "config": to_plain(cfg), "hp": dict(vars(spec.hp)), "started_at": started, "mode": cfg.train.mode,
    }


def _trainer(spec: TrialSpec, rule: Rule, splits: DataSplits, steps: int, feed: TrainFeed) -> Trainer:
    """The trainer ``train.mode`` selects: this process, or the blocks on Ray actors, layer-parallel."""
    if spec.cfg.train.mode == "pipeline":  # its first stage builds the batches from the feed
        return Pipeline(rule, to_plain(spec.cfg), splits.input_shape, splits.num_classes, steps, feed)
    return SequentialTrainer(rule, feed)


def _train(spec: TrialSpec, rule: Rule, splits: DataSplits, plan: FitPlan, feed: TrainFeed,
           record: dict[str, Any], report: Report | None, progress: bool) -> History:
    """Fit the rule, recording a crash as the run's result (status failed, error, traceback) rather than
    losing the run; the epochs finished before it stay in the history."""
    history = History()
    sizes = {k: record[k] for k in ("n_params", "n_rule_params", "n_train", "n_val", "n_test")}

    def on_epoch(row: dict[str, Any], h: History) -> None:
        record["status"] = h.status
        if report:
            report({**row, "status": record["status"], "best_epoch": h.best_epoch,
                    "best_val_acc": max(h.best_acc, 0.0), "train_seconds": h.train_seconds,
                    **sizes, "peak_mem_mb": _peak_memory_mb(plan.device)[0]})

    bar = EpochBar(plan.epochs, plan.steps) if progress else NoProgress()
    trainer = None
    try:
        trainer = _trainer(spec, rule, splits, plan.steps, feed)
        trainer.fit(rule, splits, plan, history, bar, on_epoch)
    except Exception as e:  # a rule crashing is a result to record, not a reason to lose the run
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
    finally:
        bar.close()
        if trainer is not None:
            summary = trainer.summary()
            if summary is not None:
                record["pipeline"] = summary
            trainer.close()
    return history


def _finish_record(record: dict[str, Any], spec: TrialSpec, rule: Rule, splits: DataSplits, history: History,
                   device: torch.device, evaluate_test: bool, save_model: str | None) -> None:
    """Load the selected epoch's weights, evaluate the test set once, save the network, add the totals."""
    cfg = spec.cfg
    t, epochs = cfg.train, history.epochs
    if history.best_state is not None:
        rule.load_state_dict(history.best_state)
    if record["status"] != "failed" and evaluate_test:
        test_acc, test_loss = evaluate(rule, splits, splits.test_x, splits.test_y, t.eval_batch_size)
    else:
        test_acc = test_loss = float("nan")
    if save_model and record["status"] != "failed":
        save_network(save_model, rule.net, to_plain(cfg), splits.mean, splits.std, splits.classes)
        record["model_path"] = str(save_model)
    best_row = epochs[history.best_epoch - 1] if history.best_epoch else {}
    train_seconds = history.train_seconds
    peak, kind = _peak_memory_mb(device)
    record.update(
        epochs_run=len(epochs), best_epoch=history.best_epoch, val_acc=best_row.get("val_acc", float("nan")),
        val_loss=best_row.get("val_loss", float("nan")), test_acc=test_acc, test_loss=test_loss,
        train_seconds=train_seconds, samples_per_second=(sum(r["epoch_seconds"] * r["samples_per_second"]
                                                              for r in epochs) / train_seconds
                                                          if train_seconds > 0 else float("nan")),
        peak_mem_mb=peak, mem_kind=kind, finished_at=time.time(), epochs=epochs,
    )
    record["epochs_planned"] = t.epochs


class EpochBar:
    """Epoch progress on stderr (orchestrator/progress.py: a live bar on a terminal, plain lines elsewhere),
    with loss and accuracy as they come; an ``EpochProgress``."""

    def __init__(self, epochs: int, steps: int):
        self.bar = epoch_bar(True, epochs, steps)
        self.steps, self.epochs = steps, epochs

    def step(self, epoch, b):
        if b % 10 == 0 or b == self.steps:
            self.bar.update(completed=b, epoch=epoch)

    def epoch_done(self, epoch, row):
        info = f"loss {row['train_loss']:.4f}  val_acc {row['val_acc']:.4f}"
        self.bar.update(completed=self.steps, info=info)
        self.bar.print(f"epoch {epoch}: {info}  ({row['samples_per_second']:.0f} samples/s)")
        if epoch < self.epochs:
            self.bar.reset(total=self.steps, epoch=epoch + 1, info=info)

    def close(self):
        self.bar.close()
