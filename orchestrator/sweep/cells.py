"""The sweep's cells (rule x arch x dataset minus what a rule declares unsupported) and the trial config
of one run of a cell: what a Ray worker receives."""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from bioplaus.algorithms.arch import ARCHS
from bioplaus.algorithms.registry import load_rules
from bioplaus.orchestrator.config import Config, smoke_model, to_plain
from bioplaus.orchestrator.data import DATASETS
from bioplaus.orchestrator.data.datasets import data_root
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.trial import TrialSpec, resolve


@dataclass(frozen=True)
class Cell:
    """One comparison cell; ``key`` ("rule.arch.dataset") names its Optuna study, runs and files."""

    rule: str
    arch: str
    dataset: str

    @property
    def key(self) -> str:
        return f"{self.rule}.{self.arch}.{self.dataset}"

    @classmethod
    def from_key(cls, key: str) -> Cell:
        return cls(*key.split("."))

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
    exclude = exclude_entries(cfg.get("exclude") or [])
    for rule in rules:
        for arch in cfg.archs:
            ok, why = registry[rule].supports(arch)
            for dataset in datasets:
                cell = Cell(rule, arch, dataset)
                excluded = excluded_by(cell, exclude) if ok else None
                (cells.append(cell) if ok and not excluded else skipped.append((cell, excluded or why)))
    every = [c for c, _ in skipped] + cells
    for pattern, _ in exclude:
        if not any(fnmatch.fnmatchcase(c.key, pattern) for c in every):
            raise UsageError(f"exclude={pattern} matches no cell of this sweep (cells are named rule.arch.dataset, "
                             "e.g. stdp.cnn.*); correct the pattern or drop it")
    if not cells and skipped:
        reasons = "; ".join(sorted({f"{c.rule} x {c.arch}: {why}" for c, why in skipped}))
        raise UsageError(f"the sweep has no runnable cell: {reasons} (choose another rules= or archs=; "
                         "`bioplaus cells` lists the supported cells)")
    if not cells:
        raise UsageError("the sweep has no runnable cell (check rules=, archs=, datasets=; `bioplaus cells` lists them)")
    return cells, skipped


def exclude_entries(entries) -> list[tuple[str, str]]:
    """The sweep's ``exclude`` entries (``PATTERN`` or ``PATTERN: why``) as (pattern, why) pairs."""
    return [(pattern.strip(), why.strip()) for pattern, _, why in (str(e).partition(":") for e in entries)]


def excluded_by(cell: Cell, exclude: list[tuple[str, str]]) -> str | None:
    """The reason ``cell`` is left out by the sweep's ``exclude`` (:func:`exclude_entries`), or None."""
    for pattern, why in exclude:
        if fnmatch.fnmatchcase(cell.key, pattern):
            return f"excluded by the sweep's exclude={pattern}" + (f": {why}" if why else "")
    return None


def sampler_seed(sweep_seed: int, cell: Cell) -> int:
    """The seed of a cell's Optuna sampler: from the sweep seed and the cell's key only (below 2**32), so a
    cell's tuning does not change when other cells are added to or removed from the sweep."""
    digest = hashlib.sha256(f"{sweep_seed}/{cell.key}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def trial_config(cfg: DictConfig, cell: Cell, hp: dict, seed: int, epochs: int) -> dict:
    """The plain-dict trial config of one run of a cell (what a Ray worker receives)."""
    trial = OmegaConf.merge(cfg.trial, {"rule": cell.rule, "arch": cell.arch, "dataset": cell.dataset,
                                        "seed": seed, "hp": hp, "out": None,
                                        "model": (cfg.get("arch_model") or {}).get(cell.arch) or {}})
    smoke_model(trial)
    trial.train.epochs = epochs  # the sweep's budget decides, smoke or not
    return to_plain(trial)



def trial_spec(plain: dict) -> TrialSpec:
    """A plain trial config (``trial_config``'s) checked and typed, as ``run_trial`` takes it."""
    return resolve(OmegaConf.merge(OmegaConf.structured(Config), plain))
