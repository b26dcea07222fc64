"""The ``criteria`` table: each cell's plausibility criteria measured on its own network and settings.

For a cell (rule, arch, dataset, with the hyperparameters it runs with), :func:`cell_rows` builds the cell's
architecture at tiny widths (the same blocks, norms, kernels and depth pattern; widths scaled to at most 16),
takes one batch of 8 of the dataset's training images, measures every generic criterion
(:mod:`bioplaus.algorithms.criteria`) for the rule and for bp on the same network (the negative control), and
sets each beside the rule's declared claim. :func:`write_cell` stores a cell's rows as
``FOLDER/criteria/rule=R/arch=A/dataset=D/criteria.parquet`` (``pl.scan_parquet(FOLDER / "criteria")`` reads
them all). ``bioplaus criteria`` and every sweep (one step after the finals, at each cell's chosen settings)
write it; a cell takes seconds on one CPU thread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bioplaus.orchestrator.errors import UsageError, one_line

if TYPE_CHECKING:
    from bioplaus.orchestrator.spec import TrialSpec

# Torch, the rules and the data load inside the functions: the CLI builds this command's parser on every start.

PROBE_BATCH = 8
"""Images per probe batch: fewer than a tiny dense layer's inputs, so the batch leaves a null space."""
PROBE_WIDTH = 16
"""The widest block of a probe network."""
COLUMNS = ("rule", "arch", "dataset", "criterion", "value", "threshold", "bp_value", "holds", "declared", "agree",
           "established_by", "method", "why", "criterion_text", "hp_json", "model_json", "seed")
FLOATS, BOOLS = ("value", "threshold", "bp_value"), ("holds", "declared", "agree")


def tiny_model(model_cfg):
    """The architecture config with its widths scaled down (largest PROBE_WIDTH) and one block per ResNet stage."""
    changes = {}
    for name in ("widths", "channels"):
        sizes = getattr(model_cfg, name, None)
        if sizes:
            changes[name] = [max(2, math.ceil(s * PROBE_WIDTH / max(sizes))) for s in sizes]
    if getattr(model_cfg, "blocks_per_stage", None):
        changes["blocks_per_stage"] = 1
    return dataclasses.replace(model_cfg, **changes)


def probe_batch(spec: TrialSpec) -> tuple:
    """(images, labels, classes): the dataset's first PROBE_BATCH training images, each channel standardised over
    the batch, in float64."""
    import numpy as np
    import torch

    from bioplaus.orchestrator.data import load_raw

    raw = load_raw(spec.cfg.dataset, spec.cfg.data)
    x = torch.from_numpy(np.ascontiguousarray(raw.train_x[:PROBE_BATCH])).double().div_(255.0)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True).clamp_min(1e-3)
    y = torch.from_numpy(np.asarray(raw.train_y[:PROBE_BATCH], dtype=np.int64))
    return (x - mean) / std, y, len(raw.classes)


def _measure(rule_cls, hp, spec: TrialSpec, model_cfg, batch) -> list:
    from bioplaus.algorithms import criteria

    x, y, classes = batch
    build = criteria.builder(rule_cls, hp, spec.arch, model_cfg, tuple(x.shape[1:]), classes, int(spec.cfg.seed))
    return criteria.measure(build, x, y, int(spec.cfg.seed))


def cell_rows(spec: TrialSpec, batch=None, bp_cache: dict | None = None) -> list[dict]:
    """The criteria rows of one cell (``spec``: its rule, architecture, dataset and settings)."""
    from bioplaus.algorithms import criteria
    from bioplaus.algorithms.registry import load_rules
    from bioplaus.orchestrator.config import typed

    model = tiny_model(spec.model_cfg)
    batch = batch if batch is not None else probe_batch(spec)
    measured = criteria.compare(spec.rule_cls, _measure(spec.rule_cls, spec.hp, spec, model, batch))
    key = (spec.cfg.arch, spec.cfg.dataset, repr(model))
    cache = bp_cache if bp_cache is not None else {}
    if key not in cache:
        bp = load_rules()["bp"]
        cache[key] = {m.criterion: m.value for m in _measure(bp, typed(bp.HParams, {}, "hp"), spec, model, batch)}
    cell = {"rule": spec.cfg.rule, "arch": spec.cfg.arch, "dataset": spec.cfg.dataset, "seed": int(spec.cfg.seed),
            "hp_json": json.dumps(dataclasses.asdict(spec.hp), sort_keys=True),
            "model_json": json.dumps(dataclasses.asdict(model), sort_keys=True)}
    return [{**cell, **row, "bp_value": cache[key].get(row["criterion"], math.nan)} for row in measured]


def write_cell(folder: Path, rows: list[dict]) -> Path:
    """Write one cell's rows (replacing what the cell had) into ``folder/criteria``; the path written."""
    import pyarrow as pa

    from bioplaus.orchestrator.results import partition_dir, write_table

    cell = rows[0]
    kept = [c for c in COLUMNS if c not in ("rule", "arch", "dataset")]  # the partition path names the cell
    schema = pa.schema([(c, pa.float64() if c in FLOATS else pa.bool_() if c in BOOLS else
                         pa.int64() if c == "seed" else pa.string()) for c in kept])
    table = pa.Table.from_pylist([{c: r.get(c) for c in kept} for r in rows], schema=schema)
    return write_table(table, partition_dir(Path(folder), "criteria", cell) / "criteria.parquet")


def measure_cells(specs: list[TrialSpec], folder: Path | None, log: Callable[[str], None],
                  keep_going: bool = False) -> list[dict]:
    """Rows of every cell in ``specs`` (each written to ``folder`` as it is measured, when given). ``keep_going``:
    a cell that cannot be measured is logged and left out instead of raising (the sweep's step)."""
    batches: dict[str, tuple] = {}
    bp_cache: dict = {}
    out = []
    for spec in specs:
        dataset = spec.cfg.dataset
        try:
            if dataset not in batches:
                batches[dataset] = probe_batch(spec)
            rows = cell_rows(spec, batches[dataset], bp_cache)
        except Exception as e:  # noqa: BLE001  (a probe failing on one cell must not lose a finished sweep)
            if not keep_going:
                raise
            log(f"criteria {spec.cfg.rule}.{spec.cfg.arch}.{dataset}: not measured ({one_line(e)})")
            continue
        wrong = [r["criterion"] for r in rows if r["agree"] is False]
        log(f"criteria {spec.cfg.rule}.{spec.cfg.arch}.{dataset}: " + " ".join(
            f"{r['criterion']}{'+' if r['holds'] else '-' if r['holds'] is False else '?'}" for r in rows)
            + (f"  DISAGREES with the declared {', '.join(wrong)}" if wrong else ""))
        if folder is not None:
            write_cell(folder, rows)
        out += rows
    return out


# --- the command -------------------------------------------------------------------------------------------
_OWN_KEYS = ("rules", "archs", "datasets", "out")


def command_specs(overrides: list[str]) -> tuple[list[TrialSpec], list[str], str | None]:
    """(the specs of every supported cell, the skipped cells with reasons, out) from ``bioplaus criteria``'s
    overrides: rules=[..] archs=[..] datasets=[..] (default: every rule and architecture, digits) out=DIR; any other
    key=value (hp.top_target=gradient, model.norm=group, seed=1) applies to every cell's trial config."""
    from omegaconf import OmegaConf

    from bioplaus.algorithms.arch import ARCHS
    from bioplaus.algorithms.registry import load_rules
    from bioplaus.orchestrator.config import parse_overrides
    from bioplaus.orchestrator.spec import resolve

    own = [o for o in overrides if o.split("=", 1)[0] in _OWN_KEYS]
    rest = [o for o in overrides if o not in own]
    try:
        chosen = OmegaConf.to_container(OmegaConf.from_dotlist(own))
    except Exception as e:  # noqa: BLE001  (a malformed list, e.g. rules=[bp)
        raise UsageError(f"malformed option in {' '.join(own)} ({e}); write e.g. rules=[bp,fa] archs=[mlp]") from None
    listed = {k: ([v] if isinstance(v, str) else list(v or [])) for k, v in chosen.items() if k != "out"}
    rules = listed.get("rules") or [n for n, c in load_rules().items()
                                    if c.__module__.startswith("bioplaus.algorithms.rules.")]
    archs, datasets = listed.get("archs") or list(ARCHS), listed.get("datasets") or ["digits"]
    unknown = [r for r in rules if r not in load_rules()] + [a for a in archs if a not in ARCHS]
    if unknown:
        raise UsageError(f"unknown rule or arch {unknown[0]!r}; see `bioplaus rules` and `bioplaus archs`")
    specs, skipped = [], []
    for rule in rules:
        for arch in archs:
            ok, why = load_rules()[rule].supports(arch)
            if not ok:
                skipped += [f"{rule}.{arch}: {why}"]
                continue
            for dataset in datasets:
                specs.append(resolve(parse_overrides([f"rule={rule}", f"arch={arch}", f"dataset={dataset}", *rest])))
    return specs, skipped, chosen.get("out")


def run_command(overrides: list[str], as_json: bool) -> int:
    """``bioplaus criteria``: measure, print (a table, or JSON rows), write ``out/criteria`` if out is set; exit 1
    if a declared claim disagrees with its measurement."""
    specs, skipped, out = command_specs(overrides)
    log = (lambda m: None) if as_json else (lambda m: print(m, file=sys.stderr, flush=True))
    for line in skipped:
        log(f"skipped {line}")
    rows = measure_cells(specs, Path(out) if out else None, log)
    if as_json:
        print(json.dumps([{c: (None if isinstance(r.get(c), float) and not math.isfinite(r[c]) else r.get(c))
                           for c in COLUMNS} for r in rows]))
    else:
        for r in rows:
            verdict = {True: "holds", False: "fails", None: "n/a"}[r["holds"]]
            print(f"{r['rule']:<24} {r['arch']:<9} {r['dataset']:<8} {r['criterion']:<9} {r['value']:>9.3g} "
                  f"(bp {r['bp_value']:.3g}) {verdict:<5} declared {r['declared']!s:<5} {r['established_by'][:60]}")
        if out:
            print(f"criteria of {len(specs)} cells in {Path(out) / 'criteria'} "
                  f"(pl.scan_parquet('{Path(out) / 'criteria'}'))", file=sys.stderr)
    return 1 if any(r["agree"] is False for r in rows) else 0


def add_command(sub) -> None:
    """The ``criteria`` subcommand's parser."""
    c = sub.add_parser("criteria", help="measure every rule x arch cell's plausibility criteria on a tiny network "
                                        "and one batch; compare with the declared claims (exit 1 on a disagreement)")
    c.add_argument("overrides", nargs="*", help="rules=[bp,fa] archs=[mlp,cnn] datasets=[digits] out=DIR, and any "
                                                "trial key applied to every cell, e.g. hp.top_target=gradient")
    c.add_argument("--json", action="store_true", help="one JSON list of rows on stdout")
    c.set_defaults(func=lambda args: run_command(args.overrides, args.json))


__all__ = ["COLUMNS", "add_command", "cell_rows", "measure_cells", "run_command", "tiny_model", "write_cell"]
