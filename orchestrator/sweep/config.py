"""The sweep's configuration: what ``bioplaus sweep key=value ...`` accepts, its presets, and every check
that can be made on it before anything runs (values, names, the storage URL, local resources)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from bioplaus.orchestrator.config import Config, apply_smoke, parse_overrides
from bioplaus.orchestrator.errors import UsageError, one_line


@dataclass
class BudgetConfig:
    """The budget every cell gets (the same for every rule: fairness is the point)."""

    kind: str = "epochs"
    """What every run of a cell gets the same of. ``epochs``: budget.epochs epochs. ``compute``: budget.epochs
    bp-epochs of training compute, the floating-point operations one epoch of bp costs on the same cell,
    counted per configuration (orchestrator/flops.py: a count is the same on every machine, so the epochs a
    run gets follow from its config); a run costing 3x bp per sample gets a third of the epochs, whole
    epochs, at least 1 (its rows then say it went over), at most budget.max_epochs_factor x budget.epochs.
    ASHA's rungs and the finals' budget are in the same unit. orchestrator/sweep/budget.py has the details."""
    trials: int = 6
    """Optuna trials per cell."""
    startup_trials: int = 10
    """Trials of a cell drawn at random (seeded) before TPE models its results (Optuna's default). The first
    trial is the rule's defaults; with budget.trials at or below this, a cell's search is that point and
    seeded random draws, and the draws do not depend on which trials finish first."""
    epochs: int = 3
    """Maximum epochs of a tuning trial (ASHA's max_t); with kind=compute, bp-epochs of training compute."""
    grace_epochs: int = 1
    """ASHA grace period: epochs (kind=compute: bp-epochs of compute) before a trial can be stopped."""
    reduction_factor: int = 3
    """ASHA reduction factor."""
    final_seeds: int = 3
    """Seeds the best configuration of each cell is re-run with (test set evaluated)."""
    final_epochs: Optional[int] = None
    """Epochs of a final run (None: budget.epochs); with kind=compute, bp-epochs of training compute."""
    max_epochs_factor: float = 4.0
    """kind=compute: the most epochs a run cheaper than bp gets, as a multiple of its budget. A rule whose
    work is mostly element-wise counts few FLOPs; this bounds its epochs (and the sweep's time)."""
    pruning: bool = True
    """ASHA stops unpromising tuning trials early; false: every trial runs its whole budget (what the ASHA
    fairness check, `bioplaus bench --asha-fairness`, compares pruning with)."""
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
    population: int = 1
    """Tuning trials of a cell trained together in one worker as one batched computation (orchestrator/sweep/
    population.py): each still its own Optuna trial, ASHA decision and rows; only the speed changes. 1: one trial
    per worker. Rules that cannot train as a population (``Rule.member_loss``) keep one. The CPU and GPU requests
    above are then per population."""


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
    exclude: List[str] = field(default_factory=list)
    """Cells left out of this sweep although their rule supports them, each ``PATTERN`` or ``PATTERN: why``
    (shell-style on the cell key ``rule.arch.dataset``, e.g. ``"stdp.cnn.*: 100 CPU-hours at this size"``):
    listed in the cells table with the pattern and the reason, like unsupported cells, never dropped silently."""
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
    arch_model: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Model settings per architecture, merged over ``trial.model`` in that architecture's cells only, for a sweep
    over several architectures whose configs have different keys: ``arch_model.mlp.widths=[256,256]
    arch_model.cnn.channels=[16,32,64]`` (``trial.model.widths`` would be refused by the cnn cells)."""
    progress: bool = True
    """Live progress view on stderr."""
    brain: bool = False
    """After the finals, compare every final network's layers with human and monkey IT (analysis/brain.py).
    The sweep does not run analysis itself: whoever composes it passes the step (``bioplaus sweep`` does)."""
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
    # The published comparison on the 2-core sandbox (docs/results/): every rule on mlp and cnn over MNIST,
    # Fashion-MNIST and CIFAR-10 slices, sized with `bioplaus cells preset=study --estimate`: 2.70 device-hours of
    # work for this preset and 1.66 for its equal-compute view (budget.kind=compute name=study-compute). Measured
    # on the shared 2-core sandbox, two trials at once: 3.2 h and 1.75 h of wall time (docs/results/). Left out for cost, with
    # the calibration's CPU-hours: conv STDP (3.6 h for its CIFAR-10 cell alone) and conv EP on the grey-scale
    # datasets (its CIFAR-10 cell stays, for the brain scores). W&B off: its per-run start blocks the driver.
    "study": ["archs=[mlp,cnn]", "datasets=[mnist,fashion_mnist,cifar10]", "budget.trials=8", "budget.epochs=3",
              "budget.final_seeds=3", "trial.data.train_limit=3000", "trial.data.test_limit=5000",
              "arch_model.mlp.widths=[256,256]", "arch_model.cnn.channels=[16,32,64]", "trial.train.threads=1",
              "exclude=['stdp.cnn.*: 3.6 CPU-hours for the CIFAR-10 cell alone at this size (run it on a GPU)',"
              "'ep.cnn.mnist: 0.5 CPU-hours a cell at this size; its CIFAR-10 cell is kept for the brain scores',"
              "'ep.cnn.fashion_mnist: 0.5 CPU-hours a cell at this size; its CIFAR-10 cell is kept for the brain scores']",
              "brain=true", "wandb.mode=disabled"],
    # Seconds-long end-to-end check (tests, CI).
    "smoke": ["archs=[mlp]", "datasets=[digits]", "budget.trials=2", "budget.epochs=2", "budget.final_seeds=2",
              "trial.smoke=true", "wandb.mode=disabled", "progress=false"],
}

# The tuning trials are seeded with the sweep seed itself, and numpy takes seeds below 2**32.
_MAX_SEED = 2**32 - 1


def parse_sweep(overrides: list[str]) -> DictConfig:
    """Sweep config = defaults <- preset <- command line; UsageError on bad input."""
    preset = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("preset=")), "local")
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    base = OmegaConf.structured(SweepConfig)
    # The data root is what a user names most often, and `bioplaus train` calls it data.root: the same
    # spelling works here (it is the base trial config's data.root).
    overrides = [f"trial.{o}" if o.startswith("data.") else o for o in overrides]
    given = [*PRESETS[preset], *overrides]
    cfg = parse_overrides(given, base=base)
    apply_smoke(cfg.trial, explicit={o.split("=", 1)[0][len("trial."):] for o in given if o.startswith("trial.")})
    if cfg.name is None:
        cfg.name = preset
    for ok, msg in _value_checks(cfg):
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


def _value_checks(cfg: DictConfig) -> list[tuple[bool, str]]:
    """(holds, the one-line error when it does not) for every value constraint, in the order they are reported."""
    return [
        (cfg.budget.trials >= 1, f"budget.trials={cfg.budget.trials} must be >= 1"),
        (cfg.budget.epochs >= 1, f"budget.epochs={cfg.budget.epochs} must be >= 1"),
        (cfg.budget.startup_trials >= 1, f"budget.startup_trials={cfg.budget.startup_trials} must be >= 1"),
        (1 <= cfg.budget.grace_epochs <= cfg.budget.epochs,
         f"budget.grace_epochs={cfg.budget.grace_epochs} must be in 1..budget.epochs={cfg.budget.epochs}"),
        (cfg.budget.kind in ("epochs", "compute"), f"budget.kind={cfg.budget.kind!r} must be epochs or compute"),
        (cfg.budget.max_epochs_factor >= 1,
         f"budget.max_epochs_factor={cfg.budget.max_epochs_factor} must be >= 1"),
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
        (cfg.resources.population >= 1, f"resources.population={cfg.resources.population} must be >= 1"),
        (cfg.resources.population == 1 or cfg.budget.kind == "epochs",
         f"resources.population={cfg.resources.population} trains members for equal epochs; with budget.kind="
         f"{cfg.budget.kind} each member's epochs follow its own cost: use resources.population=1"),
        (cfg.resources.max_concurrent is None or cfg.resources.max_concurrent >= 1,
         f"resources.max_concurrent={cfg.resources.max_concurrent} must be >= 1 (or null for no cap)"),
        (cfg.ray.num_cpus is None or cfg.ray.num_cpus >= 1, f"ray.num_cpus={cfg.ray.num_cpus} must be >= 1"),
        (cfg.ray.num_gpus is None or cfg.ray.num_gpus >= 0, f"ray.num_gpus={cfg.ray.num_gpus} must be >= 0"),
        (cfg.ray.timeout_s > 0, f"ray.timeout_s={cfg.ray.timeout_s} must be > 0"),
        (cfg.ray.address is None
         or re.fullmatch(r"auto|local|(ray://)?[A-Za-z0-9.\-\[\]:]+:\d+", cfg.ray.address) is not None,
         f"ray.address={cfg.ray.address!r} must be auto, local or host:port (ray://host:port for Ray Client)"),
    ]


def _check_storage_url(url: str) -> None:
    """An Optuna RDB URL that SQLAlchemy can parse and has a driver for (no connection is made)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as e:
        raise UsageError(f"storage={url!r} is not a usable database URL ({one_line(e)}); use null for a "
                         "journal file in the sweep folder, or e.g. sqlite:///optuna.db or postgresql://host/db"
                         ) from None


def check_local_resources(cfg: DictConfig) -> None:
    """On an embedded local Ray, a trial asking for more CPUs or GPUs than it has would wait forever."""
    if cfg.ray.address not in (None, "", "local"):
        return
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
