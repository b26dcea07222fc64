"""A trial: train and evaluate one (rule, arch, dataset, hyperparameters, seed) configuration.

``resolve`` checks everything a user can get wrong before any expensive work (names, cell support,
hyperparameter keys and types). ``run_trial`` then loads the data once onto the device, trains
epoch by epoch, reports each epoch's metrics through a callback (Ray Tune's ``report`` in a sweep),
selects the model on the validation split and evaluates the test set once, at the end.
"""

from __future__ import annotations

import copy
import math
import os
import random
import resource
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from bioplaus.algorithms.arch import ARCHS, NORMS, ArchSpec
from bioplaus.algorithms.registry import load_rules
from bioplaus.algorithms.rule import Rule, RunInfo, validate_hparams
from bioplaus.orchestrator.config import to_plain, typed
from bioplaus.orchestrator.data import DATASETS, DataSplits, load_raw, make_splits
from bioplaus.orchestrator.data.datasets import standardize
from bioplaus.orchestrator.errors import UsageError

Report = Callable[[dict[str, Any]], None]


@dataclass
class TrialSpec:
    """A config checked and typed: the rule class, its hyperparameters, the architecture's config."""

    cfg: DictConfig
    rule_cls: type[Rule]
    hp: Any
    arch: ArchSpec
    model_cfg: Any


def resolve(cfg: DictConfig) -> TrialSpec:
    """Validate a config without touching data or devices; UsageError names the problem and the fix."""
    rules = load_rules()
    if cfg.rule not in rules:
        raise UsageError(f"unknown rule {cfg.rule!r}; known rules: {', '.join(rules)} (see `bioplaus rules`)")
    if cfg.arch not in ARCHS:
        raise UsageError(f"unknown arch {cfg.arch!r}; known architectures: {', '.join(ARCHS)}")
    if cfg.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {cfg.dataset!r}; known datasets: {', '.join(DATASETS)}")
    rule_cls = rules[cfg.rule]
    ok, why = rule_cls.supports(cfg.arch)
    if not ok:
        supported = [a for a, r in rule_cls.archs.items() if r is None]
        raise UsageError(f"unsupported cell: rule {cfg.rule!r} on arch {cfg.arch!r} ({why}); "
                         f"use arch={' or arch='.join(supported)}")
    hp = typed(rule_cls.HParams, cfg.hp, "hp")
    try:
        validate_hparams(rule_cls, hp)
        if hasattr(hp, "validate"):
            hp.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    arch = ARCHS[cfg.arch]
    apply_arch_defaults(cfg, rule_cls)
    model_cfg = typed(arch.config, cfg.model, "model")
    norm = getattr(model_cfg, "norm", None)
    if norm in rule_cls.forbidden_norms:
        raise UsageError(f"rule {cfg.rule!r} cannot use model.norm={norm} ({rule_cls.forbidden_norms[norm]}); "
                         f"use model.norm={' or model.norm='.join(n for n in NORMS if n not in rule_cls.forbidden_norms)}")
    t, d = cfg.train, cfg.data
    checks = [
        (0 <= cfg.seed < 2**32, f"seed={cfg.seed} must be in 0..{2**32 - 1}"),
        *_model_size_checks(model_cfg, cfg.arch),
        (t.epochs >= 1, f"train.epochs={t.epochs} must be >= 1"),
        (t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1"),
        (t.eval_batch_size >= 1, f"train.eval_batch_size={t.eval_batch_size} must be >= 1"),
        (t.select in ("best_val", "last"), f"train.select={t.select!r} must be best_val or last"),
        (t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
         f"train.device={t.device!r} must be auto, cpu, cuda or cuda:N"),
        (0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)"),
        (d.train_limit is None or d.train_limit >= 2, f"data.train_limit={d.train_limit} must be >= 2"),
        (d.test_limit is None or d.test_limit >= 1, f"data.test_limit={d.test_limit} must be >= 1"),
        (d.image_size >= 4, f"data.image_size={d.image_size} must be >= 4"),
        (d.augment in AUGMENTS, f"data.augment={d.augment!r} must be one of {', '.join(AUGMENTS)}"),
        (t.mode in ("sequential", "pipeline"), f"train.mode={t.mode!r} must be sequential or pipeline"),
        (t.chunk >= 1, f"train.chunk={t.chunk} must be >= 1 (micro-batches per pipeline message)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    if t.mode == "pipeline":
        from bioplaus.orchestrator.pipeline import check

        check(rule_cls, cfg.rule, model_cfg, t.stages, t.staleness)
    if t.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device={t.device} but CUDA is not available here; use train.device=auto or cpu")
    return TrialSpec(cfg, rule_cls, hp, arch, model_cfg)


def apply_arch_defaults(cfg: DictConfig, rule_cls: type[Rule]) -> None:
    """Fill ``cfg.model`` with the rule's settings for this architecture (``Rule.arch_defaults``) where the run
    sets none, so the recorded config (and every network rebuilt from it) says what was trained."""
    for key, value in rule_cls.arch_defaults.get(cfg.arch, {}).items():
        if key not in cfg.model:
            cfg.model[key] = value


def _model_size_checks(model_cfg: Any, arch: str) -> list[tuple[bool, str]]:
    """Every integer setting of an architecture config is a size or a count (widths, channels, kernel,
    pool_every): each must be >= 1, or the network cannot be built or learns nothing. Named parts
    (activation, norm, pool) must be ones the architecture knows: a typo is refused here, before a sweep
    sends the config to its workers, not when a worker builds the network."""
    from bioplaus.algorithms.arch import ACTIVATIONS, NORMS, POOLS

    out = []
    for name, known in (("activation", ACTIVATIONS), ("norm", NORMS), ("pool", POOLS)):
        value = getattr(model_cfg, name, None)
        if value is not None and value not in known:
            out.append((False, f"model.{name}={value!r} is not one of {', '.join(known)}"))
    for name, value in vars(model_cfg).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values):
            out.append((False, f"model.{name}={value} must be >= 1 (a size of the {arch} network)"))
    return out


def load_splits(cfg: DictConfig) -> DataSplits:
    """The trial's train/val/test splits (downloading missing files); DataError names a bad file."""
    return make_splits(load_raw(cfg.dataset, cfg.data), cfg.data, int(cfg.seed))


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


# name -> (pad, flip) of augment_batch, or "affine" (affine_batch)
AUGMENTS = {"none": None, "shift": (2, False), "crop_flip": (4, True), "affine": "affine"}


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding (a random shift of up to ``pad`` pixels), and optionally a random
    horizontal flip, for a whole batch at once (no per-sample Python)."""
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(x.device)
    flips = (torch.rand(n, generator=gen) < (0.5 if flip else 0.0)).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(flips[:, None, None, None], out.flip(3), out)


def affine_batch(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor, degrees: float = 10.0,
                 scale: float = 0.1, shift: float = 2.0) -> torch.Tensor:
    """Random affine distortion of a whole batch: rotation by up to ``degrees``, scaling by up to ``scale``
    (a fraction), translation by up to ``shift`` pixels, each drawn uniformly per sample; bilinear sampling.
    The pixels brought in from outside the image take ``fill`` (per channel: a raw black pixel after
    standardisation, the background of digits and characters), not the standardised zero (the mean pixel)."""
    n, c, h, w = x.shape
    u = torch.rand(4, n, generator=gen, dtype=torch.float32).to(x.device) * 2 - 1  # uniform in [-1, 1]
    angle = u[0] * math.radians(degrees)
    zoom = 1 + u[1] * scale  # > 1 enlarges the digit: the sampling grid shrinks by 1 / zoom
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid's coordinates run over [-1, 1]: one pixel is 2 / size of them
    theta = torch.stack([torch.stack([cos, -sin, u[2] * shift * 2 / w], 1),
                         torch.stack([sin, cos, u[3] * shift * 2 / h], 1)], 1)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    fill = fill.view(1, -1, 1, 1).to(x.dtype)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


class TrainFeed:
    """Training batches from indices: the same uint8 gather, standardisation and augmentation wherever it runs
    (the trial's own loop, or a pipeline's first stage, which reads the training set itself so that the
    driver sends only indices). The augmentation stream is consumed batch by batch in data order, so two
    feeds seeded alike produce the same batches."""

    def __init__(self, splits: DataSplits, augment: str, aug_seed: int):
        self.train_x, self.train_y = splits.train_x, splits.train_y
        self.mean, self.std = splits.mean, splits.std
        self.augment = AUGMENTS[augment]
        self.aug_gen = torch.Generator().manual_seed(aug_seed)

    def to(self, device: torch.device) -> "TrainFeed":
        for k in ("train_x", "train_y", "mean", "std"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.train_x.device)
        x = standardize(self.train_x[idx], self.mean, self.std)
        if self.augment == "affine":  # the border takes a raw black pixel, standardised
            x = affine_batch(x, self.aug_gen, fill=-self.mean / self.std)
        elif self.augment:
            x = augment_batch(x, self.aug_gen, *self.augment)
        return x, self.train_y[idx]


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
    t, seed = cfg.train, int(cfg.seed)
    device = pick_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(seed, t.deterministic)
    started = time.time()
    if splits is None:
        splits = load_splits(cfg)
    splits.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    torch.manual_seed(seed)
    try:
        net = spec.arch.build(spec.model_cfg, splits.input_shape, splits.num_classes)
    except (ValueError, RuntimeError) as e:  # a config the builder rejects, or a shape torch cannot make
        raise UsageError(f"arch={cfg.arch} on dataset={cfg.dataset}: {e}") from None
    n_train = len(splits.train_y)
    batch = min(t.batch_size, n_train)
    steps = n_train // batch  # full batches only: fixed shapes, no 1-sample batch-norm batches
    info = RunInfo(splits.num_classes, splits.input_shape, t.epochs, steps, device, seed)
    rule = spec.rule_cls(net.to(device), spec.hp, info).to(device)
    n_params = sum(p.numel() for p in net.parameters())
    in_net = {id(t) for t in (*net.parameters(), *net.buffers())}  # the rule's own state: feedback weights, heads
    n_rule_params = sum(t.numel() for t in (*rule.parameters(), *rule.buffers()) if id(t) not in in_net)

    order_gen = torch.Generator().manual_seed(seed)
    feed = TrainFeed(splits, cfg.data.augment, aug_seed=seed + 1)
    record: dict[str, Any] = {
        "rule": cfg.rule, "arch": cfg.arch, "dataset": cfg.dataset, "seed": seed, "status": "ok", "error": None,
        "device": str(device), "n_params": n_params, "n_rule_params": n_rule_params,
        "n_train": n_train, "n_val": len(splits.val_y), "n_test": len(splits.test_y),
        "config": to_plain(cfg), "hp": dict(vars(spec.hp)), "started_at": started, "mode": t.mode,
    }
    epochs: list[dict[str, Any]] = []
    best_acc, best_state, best_epoch = -1.0, None, 0
    train_seconds = 0.0
    bar = _progress(progress, t.epochs, steps)
    pipe = None
    try:
        if t.mode == "pipeline":  # the blocks learn on Ray actors, layer-parallel (orchestrator/pipeline.py)
            from bioplaus.orchestrator.pipeline import Pipeline

            pipe = Pipeline(rule, to_plain(cfg), splits.input_shape, splits.num_classes, steps, feed)
        for epoch in range(1, t.epochs + 1):
            rule.train()
            perm = torch.randperm(n_train, generator=order_gen).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            has_correct = False
            extra: dict[str, torch.Tensor] = {}  # the rule's own metrics (inference steps, ...), epoch means
            tick = time.perf_counter()

            batch_indices = (perm[b * batch:(b + 1) * batch] for b in range(steps))  # consumed within this epoch
            steps_metrics = ((rule.train_step(*feed.batch(idx)) for idx in batch_indices) if pipe is None
                             else pipe.train_epoch(batch_indices))  # its first stage builds the batches
            for b, metrics in enumerate(steps_metrics):
                loss_sum += torch.as_tensor(metrics["loss"], device=device).detach().float() * batch
                for key, value in metrics.items():
                    if key == "correct":
                        has_correct = True
                        correct += torch.as_tensor(value, device=device)
                    elif key != "loss":
                        extra[key] = extra.get(key, 0) + torch.as_tensor(value, device=device).detach().float()
                bar.step(epoch, b + 1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - tick
            train_seconds += seconds
            if pipe is not None:  # evaluation reads the stages' weights, gathered into this copy of the rule
                pipe.gather(rule)
            seen = steps * batch
            train_loss = loss_sum.item() / seen
            row = {"epoch": epoch, "train_loss": train_loss,
                   "train_acc": correct.item() / seen if has_correct else float("nan"),
                   "epoch_seconds": seconds, "samples_per_second": seen / seconds if seconds > 0 else float("nan"),
                   "extra": {k: v.item() / steps for k, v in extra.items()}}
            diverged = not math.isfinite(train_loss)
            if diverged:
                record["status"] = "diverged"
                row.update(val_acc=float("nan"), val_loss=float("nan"))
            else:
                row["val_acc"], row["val_loss"] = evaluate(rule, splits, splits.val_x, splits.val_y,
                                                           t.eval_batch_size)
                if t.select == "last" or row["val_acc"] > best_acc:
                    best_acc, best_epoch = row["val_acc"], epoch
                    best_state = copy.deepcopy(rule.state_dict())
                bar.epoch_done(epoch, row)
            epochs.append(row)
            if report:
                report({**row, "status": record["status"], "best_epoch": best_epoch,
                        "best_val_acc": max(best_acc, 0.0), "train_seconds": train_seconds,
                        "n_params": n_params, "peak_mem_mb": _peak_memory_mb(device)[0]})
            if diverged:
                break
    except Exception as e:  # a rule crashing is a result to record, not a reason to lose the run
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
    finally:
        bar.close()
        if pipe is not None:
            record["pipeline"] = pipe.summary()
            pipe.close()

    if best_state is not None:
        rule.load_state_dict(best_state)
    if record["status"] != "failed" and evaluate_test:
        test_acc, test_loss = evaluate(rule, splits, splits.test_x, splits.test_y, t.eval_batch_size)
    else:
        test_acc = test_loss = float("nan")
    if save_model and record["status"] != "failed":
        from bioplaus.orchestrator.checkpoint import save_network

        save_network(save_model, rule.net, to_plain(cfg), splits.mean, splits.std, splits.classes)
        record["model_path"] = str(save_model)
    best_row = epochs[best_epoch - 1] if best_epoch else {}
    peak, kind = _peak_memory_mb(device)
    record.update(
        epochs_run=len(epochs), best_epoch=best_epoch, val_acc=best_row.get("val_acc", float("nan")),
        val_loss=best_row.get("val_loss", float("nan")), test_acc=test_acc, test_loss=test_loss,
        train_seconds=train_seconds, samples_per_second=(sum(r["epoch_seconds"] * r["samples_per_second"]
                                                              for r in epochs) / train_seconds
                                                          if train_seconds > 0 else float("nan")),
        peak_mem_mb=peak, mem_kind=kind, finished_at=time.time(), epochs=epochs,
    )
    record["epochs_planned"] = t.epochs
    return record


class _NoBar:
    def step(self, epoch, b): pass
    def epoch_done(self, epoch, row): pass
    def close(self): pass


class _Bar(_NoBar):
    """Epoch progress bar (rich) on stderr, with loss and accuracy as they come."""

    def __init__(self, epochs: int, steps: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}/" + str(epochs)), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(stderr=True), transient=True)
        self.steps, self.epochs = steps, epochs
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, epoch=1, info="")

    def step(self, epoch, b):
        if b % 10 == 0 or b == self.steps:
            self.progress.update(self.task, completed=b, epoch=epoch)

    def epoch_done(self, epoch, row):
        info = f"loss {row['train_loss']:.4f}  val_acc {row['val_acc']:.4f}"
        self.progress.update(self.task, completed=self.steps, info=info)
        self.progress.console.print(f"epoch {epoch}: {info}  ({row['samples_per_second']:.0f} samples/s)")
        if epoch < self.epochs:
            self.progress.reset(self.task, total=self.steps, epoch=epoch + 1, info=info)

    def close(self):
        self.progress.stop()


def _progress(enabled: bool, epochs: int, steps: int):
    return _Bar(epochs, steps) if enabled else _NoBar()
