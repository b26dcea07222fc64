"""The epoch loop both trainers share: what a ``Trainer`` is, and how its epochs become a history.

A ``Trainer`` turns one epoch's batch indices into per-batch metrics: ``SequentialTrainer`` runs
``Rule.train_step`` in this process; the layer-parallel pipeline (orchestrator/pipeline.py) sends the
indices through its stage actors. :meth:`Trainer.fit` is the rest, the same for both: the data order,
the epoch's training metrics, validation, model selection and per-epoch reporting, into a ``History``
that the caller owns (so a trainer that raises mid-run leaves the epochs it finished).
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from bioplaus.algorithms.rule import Rule
from bioplaus.orchestrator.data import DataSplits
from bioplaus.orchestrator.feed import TrainFeed

Metrics = dict[str, Any]


class EpochProgress(Protocol):
    """What the epoch loop tells a progress display: a batch done, an epoch's row, the end."""

    def step(self, epoch: int, b: int) -> None: ...
    def epoch_done(self, epoch: int, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def step(self, epoch: int, b: int) -> None: pass
    def epoch_done(self, epoch: int, row: dict[str, Any]) -> None: pass
    def close(self) -> None: pass


@dataclass
class FitPlan:
    """How a trial's epochs run: full batches only (fixed shapes, no 1-sample batch-norm batches), in an
    order drawn from ``order`` (seeded with the run seed, its own stream, on the training device: see
    :func:`epoch_order`)."""

    epochs: int
    batch: int
    steps: int
    n_train: int
    eval_batch_size: int
    select: str
    device: torch.device
    order: torch.Generator

    @classmethod
    def of(cls, train_cfg: Any, n_train: int, device: torch.device, seed: int) -> "FitPlan":
        batch = min(train_cfg.batch_size, n_train)
        return cls(train_cfg.epochs, batch, n_train // batch, n_train, train_cfg.eval_batch_size,
                   train_cfg.select, device, torch.Generator(device=device).manual_seed(seed))


def epoch_order(plan: FitPlan) -> torch.Tensor:
    """The next epoch's permutation of the training set, drawn where the plan's generator lives (the
    training device: no host copy on a GPU; on CPU the stream it always was)."""
    return torch.randperm(plan.n_train, generator=plan.order, device=plan.order.device).to(plan.device)


@dataclass
class History:
    """The epochs run so far (one row each), the selected epoch and its weights, the training time."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"  # "diverged" once the training loss is not finite
    best_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    train_seconds: float = 0.0


@torch.no_grad()
def evaluate(rule: Rule, splits: DataSplits, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy of the rule's class scores) on a split."""
    was_training = rule.training
    rule.eval()
    correct = torch.zeros((), device=x.device)
    loss = torch.zeros((), device=x.device)
    for i in range(0, len(y), batch_size):
        scores = rule.predict(splits.normalize(x[i:i + batch_size])).float()
        yb = y[i:i + batch_size]
        correct += (scores.argmax(1) == yb).sum()
        loss += F.cross_entropy(scores, yb, reduction="sum")
    rule.train(was_training)
    n = max(1, len(y))
    return correct.item() / n, loss.item() / n


class Trainer(ABC):
    """Trains a rule epoch by epoch; subclasses say how one epoch's batches are trained."""

    @abstractmethod
    def train_epoch(self, batch_indices: Iterator[torch.Tensor]) -> Iterable[Metrics]:
        """Train on the batches (their training-set indices, in order); each batch's metrics, in order:
        ``loss`` (required), ``correct`` (optional) and the rule's own."""

    def sync(self, rule: Rule) -> None:
        """Bring the trained weights into ``rule`` (the one evaluated) at the end of an epoch."""

    def summary(self) -> dict[str, Any] | None:
        """What the run record keeps about this trainer (None: nothing)."""
        return None

    def close(self) -> None:
        """Release what the trainer holds (workers, reservations)."""

    def fit(self, rule: Rule, splits: DataSplits, plan: FitPlan, history: History,
            progress: EpochProgress | None = None,
            on_epoch: Callable[[dict[str, Any], History], None] | None = None) -> History:
        """Run ``plan.epochs`` epochs (fewer if training diverges) into ``history``: each epoch's row of
        training metrics, validation accuracy and loss; ``rule`` is evaluated and selected on the
        validation split (``plan.select``); ``on_epoch(row, history)`` after each row."""
        progress = progress or NoProgress()
        for epoch in range(1, plan.epochs + 1):
            rule.train()
            perm = epoch_order(plan)
            batch_indices = (perm[b * plan.batch:(b + 1) * plan.batch] for b in range(plan.steps))
            row = self._train_one_epoch(batch_indices, plan, epoch, progress)
            history.train_seconds += row["epoch_seconds"]
            self.sync(rule)  # evaluation reads the trained weights from the rule
            diverged = not math.isfinite(row["train_loss"])
            if diverged:
                history.status = "diverged"
                row.update(val_acc=float("nan"), val_loss=float("nan"))
            else:
                row["val_acc"], row["val_loss"] = evaluate(rule, splits, splits.val_x, splits.val_y,
                                                           plan.eval_batch_size)
                if plan.select == "last" or row["val_acc"] > history.best_acc:
                    history.best_acc, history.best_epoch = row["val_acc"], epoch
                    history.best_state = copy.deepcopy(rule.state_dict())
                progress.epoch_done(epoch, row)
            history.epochs.append(row)
            if on_epoch:
                on_epoch(row, history)
            if diverged:
                break
        return history

    def _train_one_epoch(self, batch_indices: Iterator[torch.Tensor], plan: FitPlan, epoch: int,
                         progress: EpochProgress) -> dict[str, Any]:
        """One epoch's training row: mean loss and accuracy over the samples seen, throughput, the rule's
        own metrics as epoch means. Sums stay on the device (no sync per batch)."""
        device = plan.device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        has_correct = False
        extra: dict[str, torch.Tensor] = {}  # the rule's own metrics (inference steps, ...), epoch means
        tick = time.perf_counter()
        for b, metrics in enumerate(self.train_epoch(batch_indices)):
            loss_sum += torch.as_tensor(metrics["loss"], device=device).detach().float() * plan.batch
            for key, value in metrics.items():
                if key == "correct":
                    has_correct = True
                    correct += torch.as_tensor(value, device=device)
                elif key != "loss":
                    extra[key] = extra.get(key, 0) + torch.as_tensor(value, device=device).detach().float()
            progress.step(epoch, b + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tick
        seen = plan.steps * plan.batch
        return {"epoch": epoch, "train_loss": loss_sum.item() / seen,
                "train_acc": correct.item() / seen if has_correct else float("nan"),
                "epoch_seconds": seconds, "samples_per_second": seen / seconds if seconds > 0 else float("nan"),
                "extra": {k: v.item() / plan.steps for k, v in extra.items()}}


class SequentialTrainer(Trainer):
    """``Rule.train_step`` in this process, batch after batch, on batches built by the trial's feed."""

    def __init__(self, rule: Rule, feed: TrainFeed):
        self.rule, self.feed = rule, feed

    def train_epoch(self, batch_indices: Iterator[torch.Tensor]) -> Iterator[Metrics]:
        return (self.rule.train_step(*self.feed.batch(idx)) for idx in batch_indices)
