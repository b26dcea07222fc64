"""Name -> rule class registry. Rules register themselves on import; ``load_rules`` imports every
module in ``algorithms/rules/`` so that dropping a file there is all it takes to add a rule.

Rules living elsewhere (your own package, or the fault-injection rule of the tests) are loaded from
the modules named in ``BIOPLAUS_RULE_MODULES`` (comma-separated); Ray workers inherit it."""

from __future__ import annotations

import importlib
import os
import pkgutil

from bioplaus.algorithms.rule import CRITERIA, Rule

_RULES: dict[str, type[Rule]] = {}
_loaded = False


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: validate a rule's declaration and register it under ``cls.name``."""
    for attr in ("name", "summary"):
        if not getattr(cls, attr, None):
            raise TypeError(f"rule {cls.__qualname__} must set {attr!r}")
    if cls.name in _RULES and _RULES[cls.name] is not cls:
        raise TypeError(f"rule name {cls.name!r} is registered twice ({_RULES[cls.name].__module__}, {cls.__module__})")
    unknown = set(cls.criteria) - set(CRITERIA)
    if unknown:
        raise TypeError(f"rule {cls.name!r} declares unknown criteria {sorted(unknown)}; known: {sorted(CRITERIA)}")
    for code in ("C1", "C2", "C3"):
        if code not in cls.criteria:
            raise TypeError(f"rule {cls.name!r} must declare criterion {code}")
    if not cls.archs:
        raise TypeError(f"rule {cls.name!r} must declare the architectures it supports")
    _RULES[cls.name] = cls
    return cls


def load_rules() -> dict[str, type[Rule]]:
    """Import every module in bioplaus.algorithms.rules (once) and return the registry."""
    global _loaded
    if not _loaded:
        import bioplaus.algorithms.rules as pkg

        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{mod.name}")
        for name in filter(None, (m.strip() for m in os.environ.get("BIOPLAUS_RULE_MODULES", "").split(","))):
            importlib.import_module(name)
        _loaded = True
    return dict(sorted(_RULES.items()))


def get_rule(name: str) -> type[Rule]:
    """The rule class registered as ``name`` (KeyError listing the known names otherwise)."""
    rules = load_rules()
    if name not in rules:
        raise KeyError(f"unknown rule {name!r}; known rules: {', '.join(rules)}")
    return rules[name]
