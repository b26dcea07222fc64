"""Population trials: P configurations of one cell trained in one process as one batched computation.

``run_population(specs)`` takes trial configs that differ only in their hyperparameters (same rule,
architecture, dataset, model, data, training settings and seed) and returns one run record per member, each
what ``run_trial`` returns for that configuration alone, up to float rounding: the same data (the split, the
batch order and the augmentation are the seed's, so members share one batch stream, gathered and standardised
once), the same initial weights (each member's rule is built exactly as its trial builds it), the same update
(the rule's own ``member_loss``, see algorithms/population.py), validation-based selection and test evaluation
per member. Members are independent: one member's hyperparameters never enter another's numbers.

Members with different seeds would need their own splits, normalisation and batch orders; they are refused
(UsageError) and belong in separate populations (a sweep's tuning trials all use the sweep seed).

Each epoch every member gets the row ``run_trial`` would report for it; ``on_epoch(epoch, rows)`` receives
them all and returns the members to stop (a scheduler's pruning decisions): those, and members whose loss
became non-finite (``diverged``), are dropped from the stacks and the others train on. A member's
``epoch_seconds`` is its share of the population's epoch (the epoch's wall time over the members training in
it), so summed over members the time is the time spent, and ``samples_per_second`` is per member.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bioplaus.algorithms.population import MemberStack, stack_key
from bioplaus.orchestrator.build import build_rule
from bioplaus.orchestrator.config import to_plain
from bioplaus.orchestrator.data import DataSplits
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.feed import TrainFeed
from bioplaus.orchestrator.spec import TrialSpec
from bioplaus.orchestrator.training import FitPlan, History, epoch_order
from bioplaus.orchestrator.trial import _finish_record, _new_record, _peak_memory_mb, prepare_trial

OnEpoch = Callable[[int, dict[int, dict[str, Any]]], set[int]]
"""(epoch, member -> its report row) -> the members to stop now."""

SIZES = ("n_params", "n_rule_params", "n_train", "n_val", "n_test")


def population_support(spec: TrialSpec) -> str | None:
    """Why a configuration cannot be a population member (None: it can)."""
    if spec.cfg.train.mode != "sequential":
        return f"train.mode={spec.cfg.train.mode} (populations train sequentially, in one process)"
    return spec.rule_cls.population_support(spec.model_cfg)


def check_population(specs: Sequence[TrialSpec]) -> None:
    """UsageError unless ``specs`` can train as one population: supported, and alike except ``hp``."""
    if not specs:
        raise UsageError("a population needs at least one member")
    why = population_support(specs[0])
    if why:
        raise UsageError(f"rule {specs[0].cfg.rule} cannot train as a population: {why}; run its trials alone")
    base = {k: v for k, v in to_plain(specs[0].cfg).items() if k != "hp"}
    for spec in specs[1:]:
        other = {k: v for k, v in to_plain(spec.cfg).items() if k != "hp"}
        differ = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
        if differ:
            raise UsageError(f"population members may differ only in hp, these differ in {', '.join(differ)}; "
                             "run them as separate populations")


def run_population(specs: Sequence[TrialSpec], on_epoch: OnEpoch | None = None, splits: DataSplits | None = None,
                   evaluate_test: bool = True) -> list[dict[str, Any]]:
    """Train every member (see the module docstring); their run records, in the order of ``specs``."""
    check_population(specs)
    cfg = specs[0].cfg
    device, started, splits, plan = prepare_trial(specs[0], splits)
    rules = [build_rule(spec, splits.input_shape, splits.num_classes, plan.steps, device) for spec in specs]
    records = [_new_record(spec, rule, splits, device, started) for spec, rule in zip(specs, rules)]
    trainer = PopulationTrainer(specs, rules, splits, plan, TrainFeed(splits, cfg.data.augment,
                                                                     aug_seed=int(cfg.seed) + 1))
    trainer.fit(records, on_epoch)
    for spec, rule, record, history in zip(specs, rules, records, trainer.histories):
        _finish_record(record, spec, rule, splits, history, device, evaluate_test, None)
    return records


class PopulationTrainer:
    """The epoch loop of ``Trainer.fit`` (orchestrator/training.py) for all members at once: one stack per
    group of structurally equal members, every stack trained on the same batches."""

    def __init__(self, specs: Sequence[TrialSpec], rules: Sequence, splits: DataSplits, plan: FitPlan,
                 feed: TrainFeed):
        self.splits, self.plan, self.feed = splits, plan, feed
        groups: dict[tuple, list[int]] = {}
        for i, spec in enumerate(specs):
            groups.setdefault(stack_key(spec.rule_cls, spec.hp), []).append(i)
        total = plan.epochs * plan.steps
        self.stacks = [MemberStack([rules[i] for i in ids], ids, total) for ids in groups.values()]
        self.histories = [History() for _ in specs]
        self.best: list[dict[str, torch.Tensor] | None] = [None] * len(self.stacks)
        self.done: set[int] = set()

    def fit(self, records: list[dict[str, Any]], on_epoch: OnEpoch | None) -> None:
        """Run the epochs into the histories; a crash is recorded in every member still training."""
        try:
            for epoch in range(1, self.plan.epochs + 1):
                rows = self._epoch(epoch)
                reports = {i: self._report_row(i, row, records[i]) for i, row in rows.items()}
                stop = set(on_epoch(epoch, reports) if on_epoch else ()) & set(rows)
                finished = {i for i, row in rows.items() if not math.isfinite(row["train_loss"])} | stop
                self._finish(set(rows) if epoch == self.plan.epochs else finished)
                if not any(stack.ids for stack in self.stacks):
                    break
        except Exception as e:  # a rule crashing is a result to record, not a reason to lose the runs
            for i in set(range(len(records))) - self.done:
                records[i].update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            self.done = set(range(len(records)))

    def _report_row(self, i: int, row: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """What ``run_trial`` reports for member ``i`` after this epoch (its record's status updated)."""
        h = self.histories[i]
        record["status"] = h.status
        return {**row, "status": h.status, "best_epoch": h.best_epoch, "best_val_acc": max(h.best_acc, 0.0),
                "train_seconds": h.train_seconds, **{k: record[k] for k in SIZES},
                "peak_mem_mb": _peak_memory_mb(self.plan.device)[0]}

    def _epoch(self, epoch: int) -> dict[int, dict[str, Any]]:
        """Train one epoch, validate, select: each training member's epoch row (as ``Trainer.fit`` makes it)."""
        rows = self._train_epoch(epoch)
        for s, stack in enumerate(self.stacks):
            if not stack.ids:
                continue
            acc, loss = self._evaluate(stack)
            improved = []
            for position, i in enumerate(stack.ids):
                row, h = rows[i], self.histories[i]
                h.train_seconds += row["epoch_seconds"]
                if not math.isfinite(row["train_loss"]):
                    h.status = "diverged"
                    row.update(val_acc=float("nan"), val_loss=float("nan"))
                    improved.append(False)
                    continue
                row["val_acc"], row["val_loss"] = acc[position], loss[position]
                better = self.plan.select == "last" or row["val_acc"] > h.best_acc
                if better:
                    h.best_acc, h.best_epoch = row["val_acc"], epoch
                improved.append(better)
            self._keep_best(s, improved)
            for i in stack.ids:
                self.histories[i].epochs.append(rows[i])
        return rows

    def _train_epoch(self, epoch: int) -> dict[int, dict[str, Any]]:
        """One epoch of every stack on the shared batches: each member's training row."""
        plan, device = self.plan, self.plan.device
        perm = epoch_order(plan)
        sums: list[dict[str, torch.Tensor]] = [{} for _ in self.stacks]
        live = [(stack, total) for stack, total in zip(self.stacks, sums) if stack.ids]
        for stack, _ in live:
            stack.template.train()
        tick = time.perf_counter()
        for b in range(plan.steps):
            x, y = self.feed.batch(perm[b * plan.batch:(b + 1) * plan.batch])
            for stack, total in live:
                for key, value in stack.step(x, y).items():
                    total[key] = total.get(key, 0) + value.detach().float() * (plan.batch if key == "loss" else 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tick
        share = seconds / max(1, sum(len(stack.ids) for stack, _ in live))
        seen = plan.steps * plan.batch
        rows = {}
        for stack, total in live:
            values = {k: v.tolist() for k, v in total.items()}
            for position, i in enumerate(stack.ids):
                rows[i] = {"epoch": epoch, "train_loss": values["loss"][position] / seen,
                           "train_acc": values["correct"][position] / seen if "correct" in values else float("nan"),
                           "epoch_seconds": share, "samples_per_second": seen / share if share > 0 else float("nan"),
                           "extra": {k: v[position] / plan.steps for k, v in values.items()
                                     if k not in ("loss", "correct")}}
        return rows

    @torch.no_grad()
    def _evaluate(self, stack: MemberStack) -> tuple[list[float], list[float]]:
        """Every member's validation (accuracy, mean cross-entropy), as ``training.evaluate`` computes them."""
        splits, size = self.splits, self.plan.eval_batch_size
        x, y = splits.val_x, splits.val_y
        members = len(stack.ids)
        correct = torch.zeros(members, device=x.device)
        loss = torch.zeros(members, device=x.device)
        for i in range(0, len(y), size):
            scores = stack.predict(splits.normalize(x[i:i + size])).float()
            yb = y[i:i + size]
            correct += (scores.argmax(2) == yb).sum(1)
            loss += F.cross_entropy(scores.flatten(0, 1), yb.repeat(members), reduction="none").view(members, -1).sum(1)
        n = max(1, len(y))
        return [c / n for c in correct.tolist()], [v / n for v in loss.tolist()]

    def _keep_best(self, s: int, improved: list[bool]) -> None:
        """Copy the weights of the members whose validation accuracy improved into stack ``s``'s best weights."""
        state = self.stacks[s].state()
        if self.best[s] is None:
            self.best[s] = {k: v.clone() for k, v in state.items()}
            return
        mask = torch.tensor(improved, device=next(iter(state.values())).device)
        for k, v in state.items():
            self.best[s][k] = torch.where(mask.view(-1, *([1] * (v.dim() - 1))), v, self.best[s][k])

    def _finish(self, members: set[int]) -> None:
        """Hand ``members`` their weights (last, and best for selection) in their own rules; drop them."""
        for s, stack in enumerate(self.stacks):
            leaving = [p for p, i in enumerate(stack.ids) if i in members]
            if not leaving:
                continue
            for position in leaving:
                rule = stack.load_member(position, stack.state())
                if self.best[s] is not None and self.histories[stack.ids[position]].best_epoch:
                    names = rule.state_dict().keys()
                    self.histories[stack.ids[position]].best_state = {k: self.best[s][k][position].clone()
                                                                      for k in names}
            self.done |= {stack.ids[p] for p in leaving}
            keep = [p for p in range(len(stack.ids)) if p not in leaving]
            stack.keep(keep)
            if self.best[s] is not None:
                self.best[s] = {k: v.index_select(0, torch.tensor(keep, dtype=torch.long, device=v.device))
                                for k, v in self.best[s].items()}
