"""A trial's config checked and typed (``resolve`` -> ``TrialSpec``), before any data or device is touched.

``resolve`` checks everything a user can get wrong (names, cell support, hyperparameter keys and types,
sizes, training and pipeline settings) and raises a one-line UsageError naming the problem and the fix,
so a bad config fails before a sweep sends it to its workers or a trial loads its data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from bioplaus.algorithms.arch import ACTIVATIONS, ARCHS, NORMS, POOLS, ArchSpec
from bioplaus.algorithms.registry import load_rules
from bioplaus.algorithms.rule import Rule, validate_hparams
from bioplaus.orchestrator.config import typed
from bioplaus.orchestrator.data import DATASETS
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.feed import AUGMENTS
from bioplaus.orchestrator.pipeline_plan import check as check_pipeline


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
    apply_arch_defaults(cfg, rule_cls)
    hp = typed(rule_cls.HParams, cfg.hp, "hp")
    try:
        validate_hparams(rule_cls, hp)
        if hasattr(hp, "validate"):
            hp.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    arch = ARCHS[cfg.arch]
    model_cfg = typed(arch.config, cfg.model, "model")
    for key, known, forbidden in (("norm", NORMS, rule_cls.forbidden_norms), ("pool", POOLS, rule_cls.forbidden_pools)):
        value = getattr(model_cfg, key, None)
        if value in forbidden:
            allowed = " or ".join(f"model.{key}={n}" for n in known if n not in forbidden)
            raise UsageError(f"rule {cfg.rule!r} cannot use model.{key}={value} ({forbidden[value]}); use {allowed}")
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
        check_pipeline(rule_cls, cfg.rule, model_cfg, t.stages, t.staleness)
    if t.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device={t.device} but CUDA is not available here; use train.device=auto or cpu")
    return TrialSpec(cfg, rule_cls, hp, arch, model_cfg)


def apply_arch_defaults(cfg: DictConfig, rule_cls: type[Rule]) -> None:
    """Fill ``cfg.model`` and ``cfg.hp`` with the rule's settings for this architecture (``Rule.arch_defaults``,
    ``Rule.arch_hparams``) where the run sets none, so the recorded config (and every network and rule rebuilt
    from it) says what was trained."""
    for section, defaults in (("model", rule_cls.arch_defaults), ("hp", rule_cls.arch_hparams)):
        for key, value in defaults.get(cfg.arch, {}).items():
            if key not in cfg[section]:
                cfg[section][key] = value


def _model_size_checks(model_cfg: Any, arch: str) -> list[tuple[bool, str]]:
    """Every integer setting of an architecture config is a size or a count (widths, channels, kernel,
    pool_every): each must be >= 1, or the network cannot be built or learns nothing. Named parts
    (activation, norm, pool) must be ones the architecture knows: a typo is refused here, before a sweep
    sends the config to its workers, not when a worker builds the network."""
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
