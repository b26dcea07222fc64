"""Sweeps: Optuna-tuned, ASHA-pruned trials of every rule x arch x dataset cell on Ray, then finals.

Data flows one way: sweep config -> cells -> tuning trials (Ray Tune) -> finals (Ray tasks) -> Parquet.

* **Cells** are rules x archs x datasets minus what a rule declares unsupported (kept, with the reason,
  in ``cells.parquet``). Everything is validated (names, search spaces, trial configs) before Ray starts.
* **Tuning**: one Optuna study per cell (TPE, seeded), all in one persistent storage (a journal file in
  the sweep folder, or an RDB URL), each wrapped in Ray Tune's ``OptunaSearch``. One Tuner runs every
  cell: :class:`CellSearcher` hands out the next trial of the cell with the most budget left, so cells
  interleave and the workers stay busy; :class:`CellASHA` prunes with one ASHA per cell, so trials are
  only compared with trials of their own cell. Every cell gets the same trial and epoch budget.
  Objective: the best validation accuracy so far (``best_val_acc``); the test set is not touched.
* **Finals**: each cell's best configuration is re-run with ``budget.final_seeds`` seeds and evaluated
  on the test set; ``finals`` holds mean, std and a 95 % t-interval per cell.
* **Results** are written by the driver only, atomically, keyed by deterministic ids (cell + Optuna
  trial number, cell + final seed), so a rerun after a crash neither repeats nor duplicates anything:
  completed work is read back from the Parquet tables, Optuna trials left RUNNING by a dead driver
  are closed, and only the missing trials and finals run.
"""

from __future__ import annotations

from bioplaus.orchestrator import ray_local  # noqa: I001  (sets Ray's loopback environment before ray is imported)

import contextlib
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import polars as pl
import pyarrow as pa
from omegaconf import DictConfig, ListConfig, OmegaConf
from ray.tune import Callback
from ray.tune.stopper import Stopper

from bioplaus.algorithms.arch import ARCHS
from bioplaus.algorithms.registry import load_rules
from bioplaus.orchestrator.checkpoint import write_network_file
from bioplaus.orchestrator.config import Config, apply_smoke, parse_overrides, smoke_model, to_plain
from bioplaus.orchestrator.data import DATASETS
from bioplaus.orchestrator.data.datasets import data_root, ensure_files
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.pipeline import final_options, trial_resources
from bioplaus.orchestrator.results import (git_commit, partition_dir, remove_interrupted_writes, unwritable, version,
                                  write_run, write_table)
from bioplaus.orchestrator.search_space import Param, defaults_in_space, load_search_space
from bioplaus.orchestrator.trial import resolve, run_trial

METRIC = "best_val_acc"


# --- configuration -------------------------------------------------------------------------------
@dataclass
class BudgetConfig:
    """The budget every cell gets (the same for every rule: fairness is the point)."""

    trials: int = 6
    """Optuna trials per cell."""
    epochs: int = 3
    """Maximum epochs of a tuning trial (ASHA's max_t)."""
    grace_epochs: int = 1
    """ASHA grace period: epochs before a trial can be stopped."""
    reduction_factor: int = 3
    """ASHA reduction factor."""
    final_seeds: int = 3
    """Seeds the best configuration of each cell is re-run with (test set evaluated)."""
    final_epochs: Optional[int] = None
    """Epochs of a final run (None: budget.epochs)."""
    trial_timeout_s: Optional[float] = None
    """Wall-clock limit of one tuning trial attempt, from the moment it starts running (None: no limit).
    A trial still running then is stopped and recorded as failed with a "timeout:" error (not
    retried); the sweep goes on. For hung trials: it is checked by the driver, so it works even when
    a step never returns."""


@dataclass
class ResourcesConfig:
    """What one trial asks Ray for."""

    cpus_per_trial: float = 1.0
    """CPUs per trial (and per final run)."""
    gpus_per_trial: float = 0.0
    """GPUs per trial; fractional values pack several trials on one GPU. With trial.train.mode=pipeline the
    CPU and GPU requests are per stage (one GPU per stage on a cluster; 1/K each lets K stages share one)."""
    max_concurrent: Optional[int] = None
    """Cap on trials running at once (None: as many as the resources allow)."""


@dataclass
class RayConfig:
    """Where the sweep runs."""

    address: Optional[str] = None
    """None: embedded local Ray on loopback; "auto" or host:port: a running cluster."""
    num_cpus: Optional[int] = None
    """CPUs of the embedded local Ray (None: all)."""
    num_gpus: Optional[int] = None
    """GPUs of the embedded local Ray (None: all visible)."""
    timeout_s: float = 180.0
    """Give up if ray.init does not return within this many seconds."""
    storage_path: Optional[str] = None
    """Where Ray Tune keeps its experiment state: None for <sweep folder>/ray_results, or any path or URL Ray
    accepts (a shared file system path, s3://bucket/prefix, gs://...) so that every node of a cluster reaches it."""


@dataclass
class WandbConfig:
    """Weights & Biases logging: one run per trial, grouped by cell."""

    mode: str = "offline"
    """online, offline (no account needed; `wandb sync` uploads later) or disabled."""
    project: str = "bioplaus"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); None for the default."""


@dataclass
class SweepConfig:
    """A sweep: which cells, what budget, where it runs and where results go."""

    preset: str = "local"
    """Named defaults applied before the command line: local, paper or smoke."""
    name: Optional[str] = None
    """Sweep folder name under root (None: the preset name)."""
    root: str = "runs/sweeps"
    """Folder holding sweep folders."""
    rules: List[str] = field(default_factory=list)
    """Rules to compare (empty: every registered rule)."""
    archs: List[str] = field(default_factory=lambda: ["mlp"])
    """Architectures."""
    datasets: List[str] = field(default_factory=lambda: ["digits"])
    """Datasets."""
    optional_datasets: List[str] = field(default_factory=list)
    """Datasets included only when their files are already in the data root (no download)."""
    seed: int = 0
    """Seed of the samplers and of the tuning trials; finals use seeds 1000, 1001, ..."""
    storage: Optional[str] = None
    """Optuna storage: None for a journal file in the sweep folder, or an RDB URL (sqlite:///..., postgresql://...)."""
    retries: int = 1
    """Times a trial whose worker raised or died is retried before it is recorded as failed."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    trial: Config = field(default_factory=lambda: Config(out=None))
    """Base trial config (data root, batch size, model settings...); cells set rule/arch/dataset/hp/seed."""
    progress: bool = True
    """Live progress view on stderr."""
    brain: bool = False
    """After the finals, compare every final network's layers with human and monkey IT (analysis/brain.py)."""
    rsa92: Optional[str] = None
    """Folder of the Kriegeskorte 2008 92-image data for the brain step (None: <data root>/rsa92)."""


PRESETS: dict[str, list[str]] = {
    # A complete comparison on a laptop in minutes: every rule x mlp x digits + a Fashion-MNIST slice.
    "local": ["archs=[mlp]", "datasets=[digits,fashion_mnist]", "budget.trials=6", "budget.epochs=5",
              "budget.final_seeds=3", "trial.data.train_limit=6000", "trial.data.test_limit=2000",
              "trial.model.widths=[256,256]"],
    # The paper's comparison, meant for a GPU cluster (ray.address=auto).
    "paper": ["archs=[mlp,cnn,deep_cnn,resnet20,resnet18]", "datasets=[mnist,fashion_mnist,cifar10]",
              "optional_datasets=[cifar100,svhn]", "budget.trials=32", "budget.epochs=30", "budget.grace_epochs=3",
              "budget.final_seeds=5", "resources.gpus_per_trial=0.25", "wandb.mode=online", "brain=true"],
    # Seconds-long end-to-end check (tests, CI).
    "smoke": ["archs=[mlp]", "datasets=[digits]", "budget.trials=2", "budget.epochs=2", "budget.final_seeds=2",
              "trial.smoke=true", "wandb.mode=disabled", "progress=false"],
}


def parse_sweep(overrides: list[str]) -> DictConfig:
    """Sweep config = defaults <- preset <- command line; UsageError on bad input."""
    preset = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("preset=")), "local")
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    base = OmegaConf.structured(SweepConfig)
    given = [*PRESETS[preset], *overrides]
    cfg = parse_overrides(given, base=base)
    apply_smoke(cfg.trial, explicit={o.split("=", 1)[0][len("trial."):] for o in given if o.startswith("trial.")})
    if cfg.name is None:
        cfg.name = preset
    checks = [
        (cfg.budget.trials >= 1, f"budget.trials={cfg.budget.trials} must be >= 1"),
        (cfg.budget.epochs >= 1, f"budget.epochs={cfg.budget.epochs} must be >= 1"),
        (1 <= cfg.budget.grace_epochs <= cfg.budget.epochs,
         f"budget.grace_epochs={cfg.budget.grace_epochs} must be in 1..budget.epochs={cfg.budget.epochs}"),
        (cfg.budget.reduction_factor >= 2, f"budget.reduction_factor={cfg.budget.reduction_factor} must be >= 2"),
        (cfg.budget.final_seeds >= 1, f"budget.final_seeds={cfg.budget.final_seeds} must be >= 1"),
        (cfg.retries >= 0, f"retries={cfg.retries} must be >= 0"),
        (cfg.resources.cpus_per_trial > 0, f"resources.cpus_per_trial={cfg.resources.cpus_per_trial} must be > 0"),
        (cfg.resources.gpus_per_trial >= 0, f"resources.gpus_per_trial={cfg.resources.gpus_per_trial} must be >= 0"),
        (cfg.wandb.mode in ("online", "offline", "disabled"),
         f"wandb.mode={cfg.wandb.mode!r} must be online, offline or disabled"),
        (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", cfg.name) is not None,
         f"name={cfg.name!r} must be a plain folder name (letters, digits, '.', '_', '+', '-')"),
        ("\0" not in cfg.root, "root= must not contain a NUL character"),
        (0 <= cfg.seed <= _MAX_SEED, f"seed={cfg.seed} must be in 0..{_MAX_SEED}"),
        (cfg.budget.final_epochs is None or cfg.budget.final_epochs >= 1,
         f"budget.final_epochs={cfg.budget.final_epochs} must be >= 1 (or null for budget.epochs)"),
        (cfg.budget.trial_timeout_s is None or cfg.budget.trial_timeout_s > 0,
         f"budget.trial_timeout_s={cfg.budget.trial_timeout_s} must be > 0 (or null for no limit)"),
        (cfg.resources.max_concurrent is None or cfg.resources.max_concurrent >= 1,
         f"resources.max_concurrent={cfg.resources.max_concurrent} must be >= 1 (or null for no cap)"),
        (cfg.ray.num_cpus is None or cfg.ray.num_cpus >= 1, f"ray.num_cpus={cfg.ray.num_cpus} must be >= 1"),
        (cfg.ray.num_gpus is None or cfg.ray.num_gpus >= 0, f"ray.num_gpus={cfg.ray.num_gpus} must be >= 0"),
        (cfg.ray.timeout_s > 0, f"ray.timeout_s={cfg.ray.timeout_s} must be > 0"),
        (cfg.ray.address is None
         or re.fullmatch(r"auto|local|(ray://)?[A-Za-z0-9.\-\[\]:]+:\d+", cfg.ray.address) is not None,
         f"ray.address={cfg.ray.address!r} must be auto, local or host:port (ray://host:port for Ray Client)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    for key in ("rules", "archs", "datasets", "optional_datasets"):
        names = [str(n) for n in cfg[key]]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UsageError(f"{key}= lists {', '.join(twice)} more than once; name each once")
    if cfg.storage is not None:
        _check_storage_url(cfg.storage)
    return cfg


# The samplers' seeds are derived from the sweep seed (seed * 7919 + cell index) and must stay below 2**32.
_MAX_SEED = (2**32 - 1) // 7919 - 1000


def _check_storage_url(url: str) -> None:
    """An Optuna RDB URL that SQLAlchemy can parse and has a driver for (no connection is made)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as e:
        raise UsageError(f"storage={url!r} is not a usable database URL ({_one_line(e)}); use null for a "
                         "journal file in the sweep folder, or e.g. sqlite:///optuna.db or postgresql://host/db"
                         ) from None


def check_local_resources(cfg: DictConfig) -> None:
    """On an embedded local Ray, a trial asking for more CPUs or GPUs than it has would wait forever."""
    if cfg.ray.address not in (None, "", "local"):
        return
    import os

    import torch

    groups = int(cfg.trial.train.stages) if cfg.trial.train.mode == "pipeline" else 1
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    gpus = cfg.ray.num_gpus if cfg.ray.num_gpus is not None else torch.cuda.device_count()
    per = f" x train.stages={groups}" if groups > 1 else ""
    res = cfg.resources
    if res.cpus_per_trial * groups > cpus:
        raise UsageError(f"a trial asks for resources.cpus_per_trial={res.cpus_per_trial}{per} CPUs but the local "
                         f"Ray has {cpus}; lower resources.cpus_per_trial or raise ray.num_cpus")
    if res.gpus_per_trial * groups > gpus:
        # In pipeline mode the request is per stage (one GPU per stage on a cluster); K stages can share fewer.
        share = f"resources.gpus_per_trial={gpus / groups:g} (the stages share the GPUs), " if groups > 1 and gpus else ""
        raise UsageError(f"a trial asks for resources.gpus_per_trial={res.gpus_per_trial}{per} GPUs but the local "
                         f"Ray has {gpus}; set {share}resources.gpus_per_trial=0, or ray.address=auto for a GPU "
                         "cluster")


# --- cells ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    rule: str
    arch: str
    dataset: str

    @property
    def key(self) -> str:
        return f"{self.rule}.{self.arch}.{self.dataset}"

    def record(self) -> dict[str, str]:
        return {"rule": self.rule, "arch": self.arch, "dataset": self.dataset}


def plan_cells(cfg: DictConfig) -> tuple[list[Cell], list[tuple[Cell, str]]]:
    """(runnable cells, [(unsupported cell, reason)]); UsageError for unknown names or no cell at all."""
    registry = load_rules()
    rules = list(cfg.rules) or list(registry)
    for kind, names, known in (("rule", rules, registry), ("arch", cfg.archs, ARCHS),
                               ("dataset", [*cfg.datasets, *cfg.optional_datasets], DATASETS)):
        bad = [n if isinstance(n, str) else to_plain(n) if isinstance(n, (DictConfig, ListConfig)) else n
               for n in names if not isinstance(n, str) or n not in known]
        if bad:
            raise UsageError(f"unknown {kind}(s) {bad} in the sweep config; known: {', '.join(known)}")
    root = data_root(cfg.trial.data)
    datasets = list(cfg.datasets) + [d for d in cfg.optional_datasets if d not in cfg.datasets and all(
        (root / DATASETS[d].dirname / f.name).is_file() for f in DATASETS[d].files)]
    cells, skipped = [], []
    for rule in rules:
        for arch in cfg.archs:
            ok, why = registry[rule].supports(arch)
            for dataset in datasets:
                (cells.append(Cell(rule, arch, dataset)) if ok else skipped.append((Cell(rule, arch, dataset), why)))
    if not cells:
        raise UsageError("the sweep has no runnable cell (check rules=, archs=, datasets=; `bioplaus cells` lists them)")
    return cells, skipped


def trial_config(cfg: DictConfig, cell: Cell, hp: dict, seed: int, epochs: int) -> dict:
    """The plain-dict trial config of one run of a cell (what a Ray worker receives)."""
    trial = OmegaConf.merge(cfg.trial, {"rule": cell.rule, "arch": cell.arch, "dataset": cell.dataset,
                                        "seed": seed, "hp": hp, "out": None})
    smoke_model(trial)
    trial.train.epochs = epochs  # the sweep's budget decides, smoke or not
    return to_plain(trial)


def _trial_spec(plain: dict):
    return resolve(OmegaConf.merge(OmegaConf.structured(Config), plain))


# --- what runs on the workers ---------------------------------------------------------------------
def tune_trainable(config: dict) -> None:
    """Ray Tune function trainable: one tuning trial, reporting every epoch (never touches the test set)."""
    import ray
    from ray import tune

    node = ray.get_runtime_context().get_node_id()
    record = run_trial(_trial_spec(config["trial"]), report=lambda row: tune.report({**row, "node_id": node}),
                       evaluate_test=False)
    if record["status"] == "failed":  # let Tune retry it, then record it as failed
        raise RuntimeError(record["error"])


def final_task(plain: dict, model_name: str | None = None) -> dict:
    """One final run (test set evaluated); returns the run record with the selected network's file as
    ``model_bytes``: on a cluster this worker's disk is not the driver's, so the driver writes the file."""
    import tempfile

    import ray

    with tempfile.TemporaryDirectory(prefix="bioplaus-final-") as tmp:
        path = Path(tmp) / (model_name or "model.pt")
        record = run_trial(_trial_spec(plain), evaluate_test=True, save_model=str(path) if model_name else None)
        record["model_bytes"] = path.read_bytes() if model_name and path.is_file() else None
    record["node_id"] = ray.get_runtime_context().get_node_id()
    record.pop("traceback", None)
    record.pop("model_path", None)
    return record


# --- search and scheduling: one Optuna study and one ASHA per cell, one Tuner for all -----------------
def optuna_space(space: dict[str, Param]) -> dict:
    import optuna.distributions as d

    out = {}
    for p in space.values():
        if p.type == "categorical":
            out[p.name] = d.CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            out[p.name] = d.IntDistribution(int(p.low), int(p.high), log=p.log, step=p.step or 1)
        else:
            out[p.name] = d.FloatDistribution(float(p.low), float(p.high), log=p.type == "loguniform")
    return out


def optuna_storage(cfg: DictConfig, sweep_dir: Path):
    import optuna

    if cfg.storage:
        return optuna.storages.RDBStorage(cfg.storage)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))


def _make_searcher_classes():
    import ray
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
    from ray.tune.search import Searcher

    class CellSearcher(Searcher):
        """Multiplexes one OptunaSearch per cell; the next trial goes to the cell with most budget left."""

        def __init__(self, searchers: dict[str, Any], remaining: dict[str, int], configs: dict[str, Any],
                     timed_out: dict[str, float]):
            super().__init__(metric=METRIC, mode="max")
            self.searchers, self.remaining, self.configs = searchers, dict(remaining), configs
            self.timed_out = timed_out
            self.order = list(searchers)
            self.owner: dict[str, str] = {}

        def set_search_properties(self, metric, mode, config, **spec):
            return True

        def save(self, checkpoint_path: str):  # resume state lives in Optuna's storage and the tables
            pass

        def restore(self, checkpoint_path: str):
            pass

        def suggest(self, trial_id: str):
            open_cells = [k for k in self.order if self.remaining[k] > 0]
            if not open_cells:
                return Searcher.FINISHED
            key = max(open_cells, key=lambda k: (self.remaining[k], -self.order.index(k)))
            self.remaining[key] -= 1
            searcher = self.searchers[key]
            hp = searcher.suggest(trial_id)
            self.owner[trial_id] = key
            number = searcher._ot_trials[trial_id].number
            return {"cell": key, "trial_number": number, "trial": self.configs[key](hp)}

        def on_trial_result(self, trial_id: str, result: dict):
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
            if trial_id in self.owner:
                if trial_id in self.timed_out:  # stopped by budget.trial_timeout_s: a failure, not a result
                    result, error = None, True
                self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    class CellASHA(FIFOScheduler):
        """ASHA per cell: a trial is only ever compared with trials of its own cell.

        Also enforces ``budget.trial_timeout_s``: Tune asks the scheduler which trial to run next at every
        step of its loop, so that is where running trials are timed (a hung trial sends no result that a
        result-based stopper could act on). A trial over the limit is stopped and noted in ``timed_out``.
        """

        def __init__(self, max_t: int, grace: int, reduction_factor: int, trial_timeout_s: float | None = None):
            super().__init__()
            self.kwargs = dict(time_attr="training_iteration", metric=METRIC, mode="max", max_t=max_t,
                               grace_period=grace, reduction_factor=reduction_factor)
            self.by_cell: dict[str, AsyncHyperBandScheduler] = {}
            self.trial_timeout_s = trial_timeout_s
            self.running_since: dict[str, float] = {}
            self.timed_out: dict[str, float] = {}  # trial id -> seconds it had run when stopped

        def choose_trial_to_run(self, tune_controller):
            if self.trial_timeout_s:
                now = time.monotonic()
                for trial in list(tune_controller.get_live_trials()):
                    if trial.status != "RUNNING":
                        self.running_since.pop(trial.trial_id, None)  # a retry gets the whole limit again
                        continue
                    ran = now - self.running_since.setdefault(trial.trial_id, now)
                    if ran > self.trial_timeout_s and trial.trial_id not in self.timed_out:
                        self.timed_out[trial.trial_id] = ran
                        # A hung step never returns, so the actor would never run Tune's polite stop and keep
                        # its CPUs until Tune's final clean-up: kill its process once Tune has let go of it.
                        actor = trial.temporary_state.ray_actor
                        tune_controller.stop_trial(trial)
                        if actor is not None:
                            ray.kill(actor, no_restart=True)
            return super().choose_trial_to_run(tune_controller)

        def _of(self, trial):
            key = trial.config["cell"]
            if key not in self.by_cell:
                self.by_cell[key] = AsyncHyperBandScheduler(**self.kwargs)
            return self.by_cell[key]

        def on_trial_add(self, tune_controller, trial):
            self._of(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._of(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self._of(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self._of(trial).on_trial_remove(tune_controller, trial)

    return CellSearcher, CellASHA


# --- reading a sweep folder back (also what the analysis reads) ----------------------------------------
def read_table(sweep_dir: Path, name: str) -> pl.DataFrame:
    """One of a sweep's hive-partitioned tables (trials, epochs, final_runs, finals); empty if absent."""
    path = Path(sweep_dir) / name
    if not path.exists() or not any(path.rglob("*.parquet")):
        return pl.DataFrame()
    # The glob skips the hidden temp files of a write that was interrupted (a bare folder scan fails on them).
    return pl.scan_parquet(path / "**" / "*.parquet", hive_partitioning=True).collect()


def rows_by_cell(sweep_dir: Path, table: str) -> dict[str, pl.DataFrame]:
    """A table's rows grouped by cell key ("rule.arch.dataset")."""
    df = read_table(sweep_dir, table)
    if df.is_empty():
        return {}
    df = df.with_columns(pl.concat_str(["rule", "arch", "dataset"], separator=".").alias("cell"))
    return {k[0]: g for k, g in df.group_by("cell")}


def best_configs(sweep_dir: Path) -> dict[str, dict]:
    """Per cell: the tuning trial with the best validation accuracy (fully trained trials first)."""
    best = {}
    for key, rows in rows_by_cell(sweep_dir, "trials").items():
        ok = rows.filter(pl.col("status").is_in(["ok", "pruned"]) & pl.col("val_acc").is_finite())
        if ok.is_empty():
            continue
        full = ok.filter(pl.col("status") == "ok")
        best[key] = (full if not full.is_empty() else ok).sort(["val_acc", "trial_number"],
                                                               descending=[True, False]).row(0, named=True)
    return best


def write_finals(sweep_dir: Path, final_epochs: int) -> None:
    """The finals table: per cell, mean/std/95 % t-interval of the final runs' test accuracy."""
    from scipy import stats

    best = best_configs(sweep_dir)
    for key, rows in rows_by_cell(sweep_dir, "final_runs").items():
        acc = [a for a in rows.filter(pl.col("status") != "failed")["test_acc"].to_list()
               if a is not None and math.isfinite(a)]
        n = len(acc)
        mean = sum(acc) / n if n else float("nan")
        std = (sum((a - mean) ** 2 for a in acc) / (n - 1)) ** 0.5 if n > 1 else float("nan")
        half = stats.t.ppf(0.975, n - 1) * std / n ** 0.5 if n > 1 else float("nan")
        first = rows.row(0, named=True)
        b = best.get(key, {})
        row = {"n_seeds": n, "n_failed": rows.height - n, "test_acc_mean": mean, "test_acc_std": std,
               "test_acc_ci95_low": mean - half, "test_acc_ci95_high": mean + half,
               "val_acc_mean": rows["val_acc"].mean(), "train_seconds_mean": rows["train_seconds"].mean(),
               "samples_per_second_mean": rows["samples_per_second"].mean(),
               "peak_mem_mb_max": rows["peak_mem_mb"].max(), "n_params": first["n_params"],
               "best_trial_number": b.get("trial_number"), "best_trial_val_acc": b.get("val_acc"),
               "hp_json": b.get("hp_json"), "epochs": final_epochs}
        cell = dict(zip(("rule", "arch", "dataset"), key.split(".")))
        write_table(pa.Table.from_pylist([row]), partition_dir(Path(sweep_dir), "finals", cell) / "finals.parquet")


# --- the driver -------------------------------------------------------------------------------------
class Sweep:
    """One sweep folder: plans cells, resumes from what its tables hold, runs the rest."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.dir = Path(cfg.root).expanduser() / cfg.name
        self.cells, self.skipped = plan_cells(cfg)
        check_local_resources(cfg)
        self.rules = load_rules()
        # A hyperparameter set on the command line (trial.hp.lr=...) is pinned: taken out of every search
        # space, so the value given is the value every trial and final run uses.
        self.pinned = dict(to_plain(cfg.trial.hp))
        self.spaces = {c.rule: {k: p for k, p in load_search_space(self.rules[c.rule]).items() if k not in self.pinned}
                       for c in self.cells}
        empty = sorted({c.rule for c in self.cells if not self.spaces[c.rule]})
        if empty:
            raise UsageError(f"trial.hp pins every searched hyperparameter of {', '.join(empty)}; "
                             "leave at least one to search, or use `bioplaus train` for a single run")
        self.final_epochs = cfg.budget.final_epochs or cfg.budget.epochs
        # Every trial config a sweep will build is checked now, before Ray starts.
        for cell in self.cells:
            point = defaults_in_space(self.rules[cell.rule], self.spaces[cell.rule])
            _trial_spec(trial_config(cfg, cell, point, cfg.seed, cfg.budget.epochs))
        # Data too: missing files are downloaded (or refused, naming the fix) here, not in every worker.
        for name in sorted({c.dataset for c in self.cells}):
            ensure_files(DATASETS[name], cfg.trial.data)

    def wandb_logger(self, log) -> "WandbLogger":
        """The sweep's one W&B logger (tuning and finals share it, so a W&B failure is reported once)."""
        if getattr(self, "_wandb", None) is None:
            self._wandb = WandbLogger(self.cfg, self.dir, log)
        return self._wandb

    # tables ---------------------------------------------------------------------------------------
    def table(self, name: str) -> pl.DataFrame:
        return read_table(self.dir, name)

    def _done(self, table: str) -> dict[str, pl.DataFrame]:
        return rows_by_cell(self.dir, table)

    def write_manifest(self, status: str, started: float, extra: dict | None = None) -> None:
        import optuna
        import ray
        import torch

        row = {"sweep": self.cfg.name, "status": status, "config_json": json.dumps(to_plain(self.cfg), default=str),
               "started_at": started, "updated_at": time.time(), "bioplaus_version": version(),
               "git_commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
               "ray": ray.__version__, "optuna": optuna.__version__, "polars": pl.__version__,
               "cells": len(self.cells), "skipped_cells": len(self.skipped), **(extra or {})}
        write_table(pa.Table.from_pylist([row]), self.dir / "manifest.parquet")
        try:
            (self.dir / "manifest.json").write_text(json.dumps(row, indent=2, default=str) + "\n")
        except OSError as e:
            raise unwritable(self.dir / "manifest.json", e) from None
        cells = [{**c.record(), "supported": True, "reason": None} for c in self.cells]
        cells += [{**c.record(), "supported": False, "reason": why} for c, why in self.skipped]
        write_table(pa.Table.from_pylist(cells), self.dir / "cells.parquet")

    # tuning ----------------------------------------------------------------------------------------
    def tune(self, log) -> None:
        import optuna
        from ray import tune
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        cfg = self.cfg
        done = self._done("trials")
        storage = optuna_storage(cfg, self.dir)
        searchers, remaining, configs = {}, {}, {}
        for i, cell in enumerate(self.cells):
            rows = done.get(cell.key, pl.DataFrame())
            self._close_stale_optuna_trials(storage, cell, rows)
            remaining[cell.key] = max(0, cfg.budget.trials - len(rows))
            if not remaining[cell.key]:
                continue
            rule_cls = self.rules[cell.rule]
            space = self.spaces[cell.rule]
            searchers[cell.key] = OptunaSearch(
                space=optuna_space(space), metric=METRIC, mode="max", study_name=cell.key, storage=storage,
                sampler=optuna.samplers.TPESampler(seed=cfg.seed * 7919 + i),
                # The rule's defaults are the first point tried in a fresh study.
                points_to_evaluate=None if len(rows) else [defaults_in_space(rule_cls, space)])
            configs[cell.key] = (lambda hp, cell=cell: trial_config(cfg, cell, hp, cfg.seed, cfg.budget.epochs))
        total = sum(remaining.values())
        log(f"tuning: {len(self.cells)} cells x {cfg.budget.trials} trials, {total} to run "
            f"({cfg.budget.trials * len(self.cells) - total} already done)"
            + (f"; pinned, not searched: {self.pinned}" if self.pinned else ""))
        if not total:
            return
        CellSearcher, CellASHA = _make_searcher_classes()
        scheduler = CellASHA(cfg.budget.epochs, cfg.budget.grace_epochs, cfg.budget.reduction_factor,
                             cfg.budget.trial_timeout_s)
        recorder = TrialRecorder(self, total, log, timed_out=scheduler.timed_out)
        # train.mode=pipeline: a placement group with one bundle per stage group (orchestrator/pipeline.py)
        trainable = tune.with_resources(tune_trainable, trial_resources(
            cfg.trial.train, cfg.resources.cpus_per_trial, cfg.resources.gpus_per_trial))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=CellSearcher({k: searchers[k] for k in searchers}, remaining, configs,
                                        scheduler.timed_out),
                scheduler=scheduler,
                num_samples=total, max_concurrent_trials=cfg.resources.max_concurrent, reuse_actors=True,
                trial_dirname_creator=lambda t: f"{t.config['cell']}.t{t.config['trial_number']}-{t.trial_id}"),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=cfg.ray.storage_path or str((self.dir / "ray_results").resolve()),
                failure_config=tune.FailureConfig(max_failures=cfg.retries), callbacks=[recorder],
                stop=WriteFailureStopper(recorder), verbose=0),
        )
        try:
            tuner.fit()
        finally:
            recorder.close()
        if recorder.write_error is not None:
            raise recorder.write_error

    def _close_stale_optuna_trials(self, storage, cell: Cell, rows: pl.DataFrame) -> None:
        """Optuna trials a dead driver left RUNNING: tell the result the tables hold, else mark them failed."""
        import optuna
        from optuna.trial import TrialState

        try:
            study = optuna.load_study(study_name=cell.key, storage=storage)
        except KeyError:
            return
        recorded = {} if rows.is_empty() else dict(zip(rows["trial_number"].to_list(), rows["val_acc"].to_list()))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            value = recorded.get(t.number)
            if value is not None and math.isfinite(value):
                study.tell(t.number, value, state=TrialState.COMPLETE)
            else:
                study.tell(t.number, state=TrialState.FAIL)

    # finals ----------------------------------------------------------------------------------------
    def finals(self, log) -> None:
        import ray

        cfg = self.cfg
        best = best_configs(self.dir)
        done = self._done("final_runs")
        seeds = [1000 + k for k in range(cfg.budget.final_seeds)]
        todo = []
        for cell in self.cells:
            if cell.key not in best:
                continue
            have = set() if cell.key not in done else set(done[cell.key]["seed"].to_list())
            hp = json.loads(best[cell.key]["hp_json"])
            todo += [(cell, seed, trial_config(cfg, cell, hp, seed, self.final_epochs)) for seed in seeds
                     if seed not in have]
        log(f"finals: {len(todo)} runs to do ({cfg.budget.final_seeds} seeds per cell)")
        remote = ray.remote(final_task).options(**final_options(cfg.trial.train, cfg.resources.cpus_per_trial,
                                                              cfg.resources.gpus_per_trial), max_retries=cfg.retries)
        models = (self.dir / "models").resolve()
        pending = {remote.remote(plain, f"{cell.key}.final{seed}.pt"): (cell, seed) for cell, seed, plain in todo}
        bar = _Progress(cfg.progress, "finals", len(pending))
        wandb = self.wandb_logger(log)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                cell, seed = pending.pop(ready[0])
                try:
                    record = ray.get(ready[0])
                except Exception as e:  # worker died more often than retries allow
                    record = {**cell.record(), "seed": seed, "status": "failed", "error": _one_line(e),
                              "epochs": []}
                record.update(phase="final", epochs_planned=self.final_epochs, **cell.record())
                model = record.pop("model_bytes", None)
                if model:  # the network first: a final_runs row always has its model file
                    record["model_path"] = str(write_network_file(models / f"{cell.key}.final{seed}.pt", model))
                write_run(self.dir, record, run_id=f"{cell.key}.final{seed}", runs_table="final_runs")
                wandb.log_run(f"{cell.key}.final{seed}", cell, "final", record)
                bar.advance(f"{cell.key} seed {seed}: test {record.get('test_acc', float('nan')):.4f}")
        finally:
            for ref in pending:  # left only when a write failed: do not keep computing what cannot be recorded
                ray.cancel(ref, force=True)
            bar.close()
            wandb.close()
        write_finals(self.dir, self.final_epochs)

    # whole sweep -------------------------------------------------------------------------------------
    def run(self, log=lambda m: print(m, file=sys.stderr, flush=True)) -> Path:
        cfg = self.cfg
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise unwritable(self.dir, e) from None
        # A driver killed mid-write leaves a temp file (table scans choke on it) or an uncommitted epochs file.
        removed = remove_interrupted_writes(self.dir, runs_tables=("trials", "final_runs"), epochs_table="epochs",
                                            other_tables=("finals",))
        if removed:
            log(f"removed {len(removed)} file(s) an interrupted run left half-written")
        started = time.time()
        self.write_manifest("running", started)
        for c, why in self.skipped:
            log(f"skipped cell {c.key}: {why}")
        ray_started = ray_local.start(self.dir, address=cfg.ray.address, num_cpus=cfg.ray.num_cpus,
                                      num_gpus=cfg.ray.num_gpus, timeout_s=cfg.ray.timeout_s)
        try:
            self.tune(log)
            self.finals(log)
        finally:
            ray_local.stop(ray_started)
        if cfg.brain:
            from bioplaus.analysis.brain import brain_table

            brain_table(self.dir, cfg.rsa92, log=log)
        self.write_manifest("complete", started, {"finished_at": time.time()})
        return self.dir

    def summary(self) -> pl.DataFrame:
        """Best validation accuracy (tuning) and final test accuracy per cell."""
        trials = self.table("trials")
        finals = self.table("finals")
        if trials.is_empty():
            return pl.DataFrame()
        tuned = trials.group_by("rule", "arch", "dataset").agg(
            pl.len().alias("trials"), (pl.col("status") == "pruned").sum().alias("pruned"),
            pl.col("status").is_in(["failed", "diverged"]).sum().alias("failed"),
            pl.col("val_acc").filter(pl.col("val_acc").is_finite()).max().alias("best_val_acc"))
        if finals.is_empty():
            return tuned.sort("rule", "arch", "dataset")
        return tuned.join(finals.select("rule", "arch", "dataset", "test_acc_mean", "test_acc_ci95_low",
                                        "test_acc_ci95_high", "n_seeds"), on=["rule", "arch", "dataset"],
                          how="left").sort("dataset", "arch", pl.col("test_acc_mean").fill_nan(-1), descending=[False, False, True])


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:500]


# --- driver-side recording: Parquet, W&B, progress ------------------------------------------------------
class WandbLogger:
    """One W&B run per trial (never merged), grouped by cell, tagged by rule/arch/dataset; driver-side.

    Results never depend on W&B: online mode with no API key or an unreachable server logs offline
    instead, and any W&B error turns W&B off for the rest of the sweep; each says so in one warning line.
    """

    def __init__(self, cfg: DictConfig, sweep_dir: Path, log=None):
        self.mode = cfg.wandb.mode
        self.cfg = cfg
        self.dir = sweep_dir
        self.runs: dict[str, Any] = {}
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        if self.mode == "online":
            problem = wandb_online_problem()
            if problem:
                self.log(f"warning: W&B online logging is not possible ({problem}); logging offline to "
                         f"{self.dir / 'wandb'} instead (`wandb sync` uploads it later)")
                self.mode = "offline"

    def _failed(self, e: BaseException) -> None:
        self.log(f"warning: W&B logging failed ({_one_line(e)}); W&B is off for the rest of this sweep, results "
                 "are still written (check wandb.mode / wandb.project / wandb.entity)")
        self.mode = "disabled"
        runs, self.runs = list(self.runs.values()), {}
        for run in runs:
            with contextlib.suppress(Exception):
                run.finish()

    def _start(self, run_id: str, cell: Cell, phase: str, config: dict):
        if self.mode == "disabled":
            return None
        if run_id not in self.runs:
            import wandb

            self.runs[run_id] = wandb.init(
                project=self.cfg.wandb.project, entity=self.cfg.wandb.entity, mode=self.mode, dir=str(self.dir),
                group=cell.key, name=run_id, id=_wandb_id(self.cfg.name, run_id), job_type=phase,
                tags=[cell.rule, cell.arch, cell.dataset, phase], config=config, reinit="create_new",
                resume="allow", settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        return self.runs[run_id]

    def log_epoch(self, run_id: str, cell: Cell, phase: str, config: dict, row: dict) -> None:
        try:
            run = self._start(run_id, cell, phase, config)
            if run is not None:
                run.log(_numbers(row), step=int(row.get("epoch", 0)))
        except Exception as e:  # W&B is best effort: never let it stop a sweep
            self._failed(e)

    def log_run(self, run_id: str, cell: Cell, phase: str, record: dict) -> None:
        try:
            run = self._start(run_id, cell, phase, {"hp": record.get("hp", {}), "seed": record.get("seed")})
            if run is None:
                return
            for row in record.get("epochs", []) if phase == "final" else []:
                run.log(_numbers(row), step=int(row["epoch"]))
            run.summary.update({k: record.get(k) for k in ("status", "val_acc", "test_acc", "train_seconds",
                                                             "samples_per_second", "epochs_run") if k in record})
            run.finish()
            self.runs.pop(run_id, None)
        except Exception as e:
            self._failed(e)

    def close(self) -> None:
        try:
            for run in self.runs.values():
                run.finish()
            self.runs.clear()
        except Exception as e:
            self._failed(e)


def wandb_online_problem(timeout_s: float = 3.0) -> str | None:
    """Why W&B online logging cannot work from here (no API key, server not answering), or None.

    Checked before any ``wandb.init``: without a key W&B would prompt (and wait) or fail once per run,
    and an unreachable server makes every run retry for minutes.
    """
    import netrc
    import os
    import socket
    from urllib.parse import urlsplit

    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    url = urlsplit(base if "://" in base else f"https://{base}")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"server {base} does not answer: {e.strerror or e}"
    if not os.environ.get("WANDB_API_KEY"):
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
        if not has_key:
            return "no API key: set WANDB_API_KEY or run `wandb login`"
    return None


def _numbers(row: dict) -> dict:
    """An epoch row's numeric values, the rule's extra metrics flattened in."""
    out = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    out.update({f"extra/{k}": v for k, v in (row.get("extra") or {}).items()})
    return out


def _wandb_id(sweep: str, run_id: str) -> str:
    import hashlib

    return hashlib.sha1(f"{sweep}/{run_id}".encode()).hexdigest()[:16]


class WriteFailureStopper(Stopper):
    """Ends the Tune run as soon as a results write failed (disk full, read-only folder): trials that
    cannot be recorded are wasted work. Sweep.tune then raises the write's one-line error."""

    def __init__(self, recorder: TrialRecorder):
        self.recorder = recorder

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.recorder.write_error is not None


class TrialRecorder(Callback):
    """Tune callback on the driver: collects each trial's epoch reports and writes its rows on completion."""

    def __init__(self, sweep: Sweep, total: int, log, timed_out: dict[str, float] | None = None):
        self.sweep, self.log = sweep, log
        self.epochs: dict[str, dict[int, dict]] = {}
        self.last: dict[str, dict] = {}
        self.best: dict[str, float] = {}
        self.timed_out = {} if timed_out is None else timed_out  # filled by CellASHA (budget.trial_timeout_s)
        self.write_error: UsageError | None = None  # a results write failed (disk full, read-only): the sweep stops
        self.wandb = sweep.wandb_logger(log)
        self.bar = _Progress(sweep.cfg.progress, "tuning", total)

    def __getstate__(self):
        # Tune pickles its callbacks into tuner.pkl (for its own restore, which sweeps do not use: they
        # resume from their tables). The live progress view and W&B runs hold locks; leave them out.
        return {k: v for k, v in self.__dict__.items() if k not in ("bar", "wandb")}

    @staticmethod
    def _ids(trial) -> tuple[str, Cell]:
        key = trial.config["cell"]
        return f"{key}.t{trial.config['trial_number']}", Cell(*key.split("."))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.epochs[trial.trial_id] = {}
        self.bar.running(sum(t.status == "RUNNING" for t in trials))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.epochs[trial.trial_id] = {}  # a retry starts from scratch; its reports replace these

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = {k: result.get(k) for k in ("epoch", "train_loss", "train_acc", "val_acc", "val_loss",
                                           "epoch_seconds", "samples_per_second", "extra")}
        if row["extra"] is None:  # Tune may hand results over flattened ("extra/<name>")
            row["extra"] = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("extra/")}
        self.epochs.setdefault(trial.trial_id, {})[int(result["epoch"])] = row
        self.last[trial.trial_id] = result
        run_id, cell = self._ids(trial)
        self.wandb.log_epoch(run_id, cell, "tune", {"hp": trial.config["trial"]["hp"]}, row)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, trials, error=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        message = "worker failed"
        if trial.error_file and Path(trial.error_file).is_file():
            lines = [ln for ln in Path(trial.error_file).read_text().strip().splitlines() if ln.strip()]
            message = lines[-1][:500] if lines else message
        self._write(trial, trials, error=message)

    def _write(self, trial, trials, error: str | None) -> None:
        run_id, cell = self._ids(trial)
        last = self.last.get(trial.trial_id, {})
        plain = trial.config["trial"]
        epochs = [self.epochs.get(trial.trial_id, {})[e] for e in sorted(self.epochs.get(trial.trial_id, {}))]
        ran = self.timed_out.get(trial.trial_id)
        if ran is not None:
            error = (f"timeout: stopped after {ran:.0f}s, over budget.trial_timeout_s="
                     f"{self.sweep.cfg.budget.trial_timeout_s}; raise it if trials are just slow")
        status = "failed" if error else last.get("status", "failed")
        if status == "ok" and len(epochs) < plain["train"]["epochs"]:
            status = "pruned"
        record = {**cell.record(), "phase": "tune", "seed": plain["seed"], "status": status, "error": error,
                  "trial_number": trial.config["trial_number"], "node_id": last.get("node_id"),
                  "attempts": trial.num_failures + 1,
                  "epochs_planned": plain["train"]["epochs"], "epochs_run": len(epochs),
                  "best_epoch": last.get("best_epoch"), "val_acc": last.get(METRIC) if epochs else None,
                  "train_seconds": last.get("train_seconds"), "n_params": last.get("n_params"),
                  "peak_mem_mb": last.get("peak_mem_mb"), "hp": plain["hp"], "config": plain, "epochs": epochs,
                  "samples_per_second": (sum(e["samples_per_second"] * e["epoch_seconds"] for e in epochs)
                                         / sum(e["epoch_seconds"] for e in epochs)) if epochs else None}
        if self.write_error is not None:
            return  # the results folder cannot be written: Tune is being stopped (WriteFailureStopper)
        try:
            write_run(self.sweep.dir, record, run_id=run_id, runs_table="trials")
        except UsageError as e:  # not raised here: Tune would log it as a traceback and carry on
            self.write_error = e
            return
        self.wandb.log_run(run_id, cell, "tune", record)
        val = record["val_acc"] if record["val_acc"] is not None else float("nan")
        if math.isfinite(val) and val > self.best.get(cell.key, -1):
            self.best[cell.key] = val
        self.bar.running(sum(t.status == "RUNNING" for t in trials if t is not trial))
        self.bar.advance(f"{run_id} {status} val {val:.4f}; best so far {max(self.best.values(), default=float('nan')):.4f}")

    def close(self) -> None:
        self.wandb.close()
        self.bar.close()


class _Progress:
    """Live view: runs done / running, the latest result and best so far, with an ETA (rich, stderr)."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled = enabled and total > 0
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("running {task.fields[running]}"), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(stderr=True))
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, running=0, info="")

    def running(self, n: int) -> None:
        if self.enabled:
            self.progress.update(self.task, running=n)

    def advance(self, info: str) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1, info=info[-90:])

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
