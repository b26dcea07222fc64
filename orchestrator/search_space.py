"""Search spaces: one YAML per rule in ``search_spaces/<rule>.yaml``, validated on load.

Format (OmegaConf YAML)::

    rule: bp
    params:                      # keys are fields of the rule's HParams (hp.<key>)
      lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      optimizer: {type: categorical, choices: [adam, sgd]}
      momentum: {type: uniform, low: 0.5, high: 0.99}
      steps: {type: int, low: 1, high: 8}            # optional: log: true, step: N

Errors name the file and the key.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bioplaus.orchestrator.errors import UsageError

# Package data, so an installed wheel finds them wherever it runs (not only inside a checkout).
SEARCH_SPACES = Path(str(importlib.resources.files("bioplaus.search_spaces")))
KINDS = {"loguniform": ("low", "high"), "uniform": ("low", "high"), "int": ("low", "high"),
         "categorical": ("choices",)}


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


def load_search_space(rule_cls, path: Path | None = None) -> dict[str, Param]:
    """The rule's search space, checked against its HParams; UsageError names file and key."""
    path = path or SEARCH_SPACES / f"{rule_cls.name}.yaml"
    if not path.is_file():
        raise UsageError(f"no search space for rule {rule_cls.name!r}: create {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(raw, dict) or raw.get("rule") != rule_cls.name or not isinstance(raw.get("params"), dict):
        raise UsageError(f"{path}: must hold 'rule: {rule_cls.name}' and a 'params' mapping")
    fields = {f.name: f for f in dataclasses.fields(rule_cls.HParams)}
    params = {}
    for name, spec in raw["params"].items():
        where = f"{path}: params.{name}"
        if name not in fields:
            raise UsageError(f"{where} is not a hyperparameter of {rule_cls.name!r}; valid: {', '.join(fields)}")
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
            params[name] = Param(name, "categorical", choices=tuple(choices))
            continue
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise UsageError(f"{where}: low and high must be numbers with low < high (got {low!r}, {high!r})")
        if spec["type"] == "loguniform" and low <= 0:
            raise UsageError(f"{where}: loguniform needs low > 0")
        if spec["type"] == "int" and not (isinstance(low, int) and isinstance(high, int)):
            raise UsageError(f"{where}: int bounds must be integers")
        params[name] = Param(name, spec["type"], low=low, high=high, log=bool(spec.get("log", False)),
                             step=spec.get("step"))
    return params


def defaults_in_space(rule_cls, space: dict[str, Param]) -> dict[str, Any]:
    """The rule's defaults as a point of the space (a sweep's first trial): numbers clipped to
    [low, high], a categorical default that is not a choice replaced by the first choice."""
    hp = rule_cls.HParams()
    point = {}
    for name, p in space.items():
        value = getattr(hp, name)
        if p.type == "categorical":
            point[name] = value if value in p.choices else p.choices[0]
        else:
            value = min(max(value, p.low), p.high)
            point[name] = int(round(value)) if p.type == "int" else float(value)
    return point
