"""Search spaces: one YAML per rule in ``search_spaces/<rule>.yaml``, validated on load, plus shared
fragments (``search_spaces/_<name>.yaml``) that a rule's file includes.

Format (OmegaConf YAML)::

    rule: bp
    include: _optimiser.yaml     # optional: a fragment (or a list of them) in the same folder
    params:                      # keys are fields of the rule's HParams (hp.<key>)
      lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      steps: {type: int, low: 1, high: 8}            # optional: log: true, step: N

A fragment holds ``params`` and ``per_rule`` (the knobs a rule's file may set itself, e.g. the lr range);
any other knob of a fragment is the same for every rule that includes it, so a rule's file that sets
one is refused. Fragment names start with ``_``: they are never a rule's space. The effective space is
the fragments' knobs first, then the rule's own; each :class:`Param` says which file it came from.
Errors name the file and the key.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bioplaus.algorithms.rule import OptimHParams
from bioplaus.orchestrator.errors import UsageError

# Package data, so an installed wheel finds them wherever it runs (not only inside a checkout).
SEARCH_SPACES = Path(str(importlib.resources.files("bioplaus.search_spaces")))
OPTIMISER_FRAGMENT = "_optimiser.yaml"
"""The fragment every rule with an optimiser (HParams derived from OptimHParams) includes."""
KINDS = {"loguniform": ("low", "high"), "uniform": ("low", "high"), "int": ("low", "high"),
         "categorical": ("choices",)}
_FRAGMENT_NAME = re.compile(r"_[A-Za-z0-9_]+\.yaml")


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    log: bool = False
    step: int | None = None
    source: str = ""
    """File name the range comes from (the rule's own file or a shared fragment)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able: the range (only the keys its type uses) and its source."""
        keys = {"categorical": ("choices",), "int": ("low", "high", "log", "step")}.get(self.type, ("low", "high"))
        out = {"type": self.type, **{k: getattr(self, k) for k in keys}, "source": self.source}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
        return out


def _read(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: not valid YAML ({first})") from None


def _param(name: str, spec: Any, where: str, fields: dict, rule_name: str, source: str) -> Param:
    if name not in fields:
        raise UsageError(f"{where} is not a hyperparameter of {rule_name!r}; valid: {', '.join(fields)}")
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise UsageError(f"{where}: needs type one of {', '.join(KINDS)}")
    extra = set(spec) - {"type", "log", "step", *KINDS[spec["type"]]}
    missing = [k for k in KINDS[spec["type"]] if k not in spec]
    if extra or missing:
        raise UsageError(f"{where}: {'unknown keys ' + str(sorted(extra)) if extra else 'missing ' + str(missing)}")
    if spec["type"] == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UsageError(f"{where}: choices must be a non-empty list")
        return Param(name, "categorical", choices=tuple(choices), source=source)
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise UsageError(f"{where}: low and high must be numbers with low < high (got {low!r}, {high!r})")
    if spec["type"] == "loguniform" and low <= 0:
        raise UsageError(f"{where}: loguniform needs low > 0")
    if spec["type"] == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise UsageError(f"{where}: int bounds must be integers")
    return Param(name, spec["type"], low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"),
                 source=source)


def _includes(path: Path, raw: dict) -> list[Path]:
    include = raw.get("include", [])
    names = [include] if isinstance(include, str) else include
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{path}: include must be a fragment's file name or a list of them")
    for name in names:
        if not _FRAGMENT_NAME.fullmatch(name):
            raise UsageError(f"{path}: include: {name!r} is not a fragment name (_<name>.yaml, in the same folder)")
        if not (path.parent / name).is_file():
            raise UsageError(f"{path}: include: no fragment {name!r} in {path.parent}")
    return [path.parent / n for n in names]


def load_fragment(path: Path) -> tuple[dict[str, Any], set[str]]:
    """A fragment's raw ``params`` and its ``per_rule`` knobs (checked against a rule when included)."""
    raw = _read(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or set(raw) - {"params", "per_rule"}:
        raise UsageError(f"{path}: a fragment holds a 'params' mapping and optionally 'per_rule' (a list), nothing else")
    per_rule = raw.get("per_rule", [])
    if not isinstance(per_rule, list) or set(per_rule) - set(raw["params"]):
        raise UsageError(f"{path}: per_rule must list knobs of its own params (got {per_rule!r})")
    return raw["params"], set(per_rule)


def load_search_space(rule_cls, path: Path | None = None) -> dict[str, Param]:
    """The rule's effective search space (included fragments first), checked against its HParams;
    UsageError names file and key."""
    path = path or SEARCH_SPACES / f"{rule_cls.name}.yaml"
    if not path.is_file():
        raise UsageError(f"no search space for rule {rule_cls.name!r}: create {path}")
    raw = _read(path)
    if not isinstance(raw, dict) or raw.get("rule") != rule_cls.name or not isinstance(raw.get("params"), dict):
        raise UsageError(f"{path}: must hold 'rule: {rule_cls.name}' and a 'params' mapping")
    if set(raw) - {"rule", "include", "params"}:
        raise UsageError(f"{path}: unknown top-level keys {sorted(set(raw) - {'rule', 'include', 'params'})}; "
                         "valid: rule, include, params")
    fields = {f.name: f for f in dataclasses.fields(rule_cls.HParams)}
    params: dict[str, Param] = {}
    shared: dict[str, Path] = {}  # knob -> the fragment that fixes it for every rule
    for fragment in _includes(path, raw):
        specs, per_rule = load_fragment(fragment)
        for name, spec in specs.items():
            if name in params:
                raise UsageError(f"{fragment}: params.{name} is also set by {params[name].source}; "
                                 "a knob may come from one fragment only")
            params[name] = _param(name, spec, f"{fragment}: params.{name} (included by {path})", fields,
                                  rule_cls.name, fragment.name)
            if name not in per_rule:
                shared[name] = fragment
    for name, spec in raw["params"].items():
        where = f"{path}: params.{name}"
        if name in shared:
            raise UsageError(f"{where} is shared by every rule through {shared[name].name}; remove it here "
                             f"(a rule may set only {', '.join(sorted(set(params) - set(shared))) or 'nothing'})")
        params[name] = _param(name, spec, where, fields, rule_cls.name, path.name)
    return params


def searched_space(rule_cls, pinned) -> dict[str, Param]:
    """What a sweep searches of the rule's space: every parameter but the ones pinned on the command line
    (``trial.hp.<name>=...``, ``pinned`` their names)."""
    return {k: p for k, p in load_search_space(rule_cls).items() if k not in pinned}


def missing_shared_knobs(rule_cls, space: dict[str, Param], spaces_dir: Path | None = None) -> list[str]:
    """For a rule with an optimiser: the optimiser fragment's knobs its space lacks or sets differently
    (empty for a rule without one, and for a rule whose space includes the fragment)."""
    if not issubclass(rule_cls.HParams, OptimHParams):
        return []
    specs, per_rule = load_fragment((spaces_dir or SEARCH_SPACES) / OPTIMISER_FRAGMENT)
    out = []
    for name in specs:
        p = space.get(name)
        if p is None or (name not in per_rule and p.source != OPTIMISER_FRAGMENT):
            out.append(name)
    return out


def defaults_in_space(rule_cls, space: dict[str, Param], arch: str | None = None) -> dict[str, Any]:
    """The rule's defaults (on ``arch``: with its ``arch_hparams``) as a point of the space (a sweep's first
    trial): numbers clipped to [low, high], a categorical default that is not a choice replaced by the first."""
    hp = rule_cls.HParams(**rule_cls.arch_hparams.get(arch, {}))
    point = {}
    for name, p in space.items():
        value = getattr(hp, name)
        if p.type == "categorical":
            point[name] = value if value in p.choices else p.choices[0]
        else:
            value = min(max(value, p.low), p.high)
            point[name] = int(round(value)) if p.type == "int" else float(value)
    return point
