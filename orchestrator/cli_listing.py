"""The listing commands of the ``bioplaus`` command line: rules, datasets, architectures, search spaces and the
resolved config (each prints a table, or JSON alone with ``--json``)."""

from __future__ import annotations

import json

from bioplaus.orchestrator.errors import UsageError


def cmd_rules(args) -> int:
    from bioplaus.algorithms.registry import load_rules

    described = [cls.describe() for cls in load_rules().values()]
    if args.json:
        print(json.dumps(described))
        return 0
    for d in described:
        crit = " ".join(f"{c}{'+' if v['holds'] else '-'}" for c, v in sorted(d["criteria"].items()))
        archs = ", ".join(a for a, why in d["archs"].items() if why is None)
        print(f"{d['name']:<20} {crit:<24} archs: {archs}{'  [block-local]' if d['block_local'] else ''}")
        print(f"{'':<20} {d['summary']}")
    return 0


def cmd_datasets(args) -> int:
    from bioplaus.orchestrator.data import DATASETS

    if args.json:
        print(json.dumps([{"name": s.name, "summary": s.summary, "folder": s.dirname,
                           "files": [f.name for f in s.files]} for s in DATASETS.values()]))
        return 0
    for spec in DATASETS.values():
        print(f"{spec.name:<15} {spec.summary}")
    return 0


def cmd_archs(args) -> int:
    import dataclasses

    from bioplaus.algorithms.arch import ARCHS

    if args.json:
        print(json.dumps([{"name": s.name, "summary": s.summary, "model": dataclasses.asdict(s.config())}
                          for s in ARCHS.values()], default=str))
        return 0
    for spec in ARCHS.values():
        print(f"{spec.name:<10} {spec.summary}")
    return 0


def cmd_config(args) -> int:
    """The fully resolved config (defaults <- preset <- overrides) as YAML, or JSON with ``--json``."""
    import dataclasses

    import yaml

    from bioplaus.orchestrator.config import parse_overrides, to_plain

    if args.train:
        from bioplaus.orchestrator.spec import resolve

        spec = resolve(parse_overrides(args.overrides))
        plain = {**to_plain(spec.cfg), "hp": dataclasses.asdict(spec.hp)}  # every hyperparameter, defaults included
    else:
        from bioplaus.orchestrator.sweep import parse_sweep

        plain = to_plain(parse_sweep(args.overrides))
    print(json.dumps(plain, indent=1) if args.json else yaml.safe_dump(plain, sort_keys=False), end="\n" if args.json else "")
    return 0


def _range(p: dict) -> str:
    if p["type"] == "categorical":
        return "{" + ", ".join(map(str, p["choices"])) + "}"
    extra = (" log" if p.get("log") else "") + (f" step {p['step']}" if p.get("step") else "")
    return f"[{p['low']:g}, {p['high']:g}]{extra}"


def cmd_space(args) -> int:
    from bioplaus.algorithms.registry import load_rules
    from bioplaus.orchestrator.search_space import load_search_space

    rules = load_rules()
    unknown = [r for r in args.rules if r not in rules]
    if unknown:
        raise UsageError(f"unknown rule {unknown[0]!r}; known rules: {', '.join(rules)}")
    spaces = {name: {k: p.describe() for k, p in load_search_space(rules[name]).items()}
              for name in (args.rules or rules)}
    if args.json:
        print(json.dumps(spaces))
        return 0
    for name, space in spaces.items():
        print(name)
        for knob, p in space.items():
            print(f"  {knob:<18} {p['type']:<12} {_range(p):<36} {p['source']}")
    return 0
