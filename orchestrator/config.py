"""Typed run configuration (OmegaConf structured configs) and command-line overrides.

``bioplaus train rule=bp arch=mlp dataset=fashion_mnist train.epochs=3 hp.lr=3e-4 model.widths=[256]``:
top-level fields pick the cell and seed; ``hp.*`` are the rule's hyperparameters (typed by the rule's
HParams dataclass) and ``model.*`` the architecture's (typed by its config dataclass), both checked
when the run is resolved. ``smoke=true`` shrinks everything for a seconds-long check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bioplaus.orchestrator.errors import UsageError


@dataclass
class DataConfig:
    """Where data comes from and how it is split."""

    root: Optional[str] = None
    """Data root folder (default: env BIOPLAUS_DATA, else ~/.cache/bioplaus/data)."""
    mirror: Optional[str] = None
    """Base URL laid out like the data root, used instead of the official URLs for downloads."""
    download: bool = True
    """Download missing files (False: fail with a message naming the missing file)."""
    val_fraction: float = 0.1
    """Fraction of the training set held out for validation (model selection), carved by the seed."""
    train_limit: Optional[int] = None
    """Use only this many training images (before the validation split); None for all."""
    test_limit: Optional[int] = None
    """Use only the first this many test images; None for all."""
    augment: str = "none"
    """Training-batch augmentation: none, shift (random shifts up to 2 pixels, for digits and
    characters), crop_flip (random 4-pixel-padded crop and horizontal flip, for natural images) or affine
    (random rotation up to 10 degrees, scaling up to 10 %, shift up to 2 pixels, bilinear, the border
    black: for digits and characters). shift and crop_flip pad with the standardised zero (the mean pixel)."""
    image_size: int = 32
    """imagefolder: images are resized to image_size x image_size."""
    imagefolder: Optional[str] = None
    """imagefolder: folder of class-named sub-folders (optionally under train/ and test/)."""


@dataclass
class TrainConfig:
    """How a trial trains and evaluates."""

    epochs: int = 5
    """Training epochs (passes over the training split)."""
    batch_size: int = 128
    """Training mini-batch size."""
    eval_batch_size: int = 1000
    """Batch size for validation and test evaluation."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    deterministic: bool = True
    """Use deterministic kernels (same seed -> same numbers); False may be faster on GPU."""
    select: str = "best_val"
    """Which epoch's weights give the final test numbers: best_val (highest val accuracy) or last."""
    threads: Optional[int] = None
    """torch intra-op threads on CPU (None: torch's default; in pipeline mode 1 per stage)."""
    mode: str = "sequential"
    """sequential (one process runs train_step) or pipeline (block-local rules only: the blocks are split
    into train.stages groups, each a Ray actor learning on arrival of each micro-batch; orchestrator/pipeline.py)."""
    stages: int = 2
    """pipeline mode: number of stage groups (Ray actors), from 1 to the network's blocks + 1."""
    staleness: int = 1
    """pipeline mode: how many messages a stage group may run ahead of the next (0: lock-step)."""
    chunk: int = 8
    """pipeline mode: micro-batches (training batches) per message between stage groups. Fewer, larger
    messages cost the driver and Ray's object store less per batch, which on few cores decides whether
    the pipeline beats sequential training at all; the weights learned are the same."""


@dataclass
class Config:
    """One trial: a (rule, arch, dataset) cell, its hyperparameters and a seed."""

    rule: str = "bp"
    """Learning rule name (see `bioplaus rules`)."""
    arch: str = "mlp"
    """Architecture name: mlp, cnn or deep_cnn."""
    dataset: str = "digits"
    """Dataset name: digits, mnist, fashion_mnist, kmnist, cifar10, cifar100, svhn, imagefolder."""
    seed: int = 0
    """Seeds weights, data order, validation split and every random draw of the rule."""
    hp: Dict[str, Any] = field(default_factory=dict)
    """Rule hyperparameters overriding the rule's defaults (keys of the rule's HParams)."""
    model: Dict[str, Any] = field(default_factory=dict)
    """Architecture settings overriding its defaults (keys of the architecture's config)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: Optional[str] = "runs/train"
    """Results folder for the Parquet tables (None: write nothing)."""
    smoke: bool = False
    """Shrink everything (1 epoch, a few hundred images, tiny widths) for a quick end-to-end check."""


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")

# What smoke=true does to every config (each applied only where the user did not set it).
SMOKE = {
    "train.epochs": 1, "data.train_limit": 400, "data.test_limit": 200, "train.batch_size": 64,
}
SMOKE_MODEL = {"mlp": {"widths": [32]}, "cnn": {"channels": [4, 8]}, "deep_cnn": {"channels": [4, 4, 8, 8]},
              "resnet20": {"channels": [4, 8], "blocks_per_stage": 1},
              "resnet18": {"channels": [4, 8], "blocks_per_stage": 1}}


def parse_overrides(overrides: list[str], base: DictConfig | None = None) -> DictConfig:
    """Merge ``key=value`` dotlist overrides into a structured config (default: a trial's Config).

    UsageError on malformed items, unknown keys or wrong types. A trial config with ``smoke=true``
    is shrunk (see :func:`apply_smoke`), except where an override set a value explicitly.
    """
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise UsageError(f"malformed override {item!r}; write key=value, e.g. rule=bp or train.epochs=3")
    cfg = base if base is not None else OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        OmegaConf.resolve(merged)  # a ${...} interpolation that cannot resolve fails here, not mid-run
    except OmegaConfBaseException as e:
        raise UsageError(_omegaconf_message(e)) from None
    except (yaml.YAMLError, TypeError, ValueError) as e:  # a value that is not valid YAML, or {..} for a list
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"malformed override {_culprit(cfg, overrides)!r} ({first}); write key=value with a "
                         "valid value, e.g. rules=[bp,fa] or train.epochs=3") from None
    if base is None:
        apply_smoke(merged, explicit={item.split("=", 1)[0] for item in overrides})
        smoke_model(merged)
    return merged


def _culprit(cfg: DictConfig, overrides: list[str]) -> str:
    """The first override that fails on its own (all of them if none does)."""
    for item in overrides:
        try:
            OmegaConf.resolve(OmegaConf.merge(cfg, OmegaConf.from_dotlist([item])))
        except Exception:  # any failure marks the culprit; the caller reports the original error
            return item
    return " ".join(overrides)


def apply_smoke(cfg: DictConfig, explicit: set[str]) -> DictConfig:
    """If ``cfg.smoke``: shrink epochs, data and batch size, leaving the ``explicit`` keys alone."""
    if cfg.smoke:
        for key, value in SMOKE.items():
            if key not in explicit:
                OmegaConf.update(cfg, key, value)
    return cfg


def smoke_model(cfg: DictConfig) -> DictConfig:
    """If ``cfg.smoke``: tiny widths for the config's architecture, where ``model`` does not set them."""
    if cfg.smoke:
        for key, value in SMOKE_MODEL.get(cfg.arch, {}).items():
            if key not in cfg.model:
                cfg.model[key] = value
    return cfg


def typed(schema: type, values: Dict[str, Any], prefix: str):
    """Instantiate dataclass ``schema`` from ``values`` with OmegaConf type checks; errors name ``prefix.key``."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as e:
        msg = _omegaconf_message(e)
        known = ", ".join(f.name for f in schema.__dataclass_fields__.values())
        raise UsageError(f"{prefix}: {msg}; valid keys: {known}") from None


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"bad config value for {key}: {first}" if key else f"bad config: {first}"


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
