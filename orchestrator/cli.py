"""The ``bioplaus`` command line.

Every user-fixable problem (bad names, unsupported cells, malformed overrides, missing data) is a
UsageError: one line on stderr naming the problem and the fix, exit code 2, and it is raised before
any training starts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from bioplaus.orchestrator.bench_fairness import add_fairness_argument
from bioplaus.orchestrator.cli_listing import cmd_archs, cmd_config, cmd_datasets, cmd_rules, cmd_space
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.estimate_cli import add_estimate_arguments

JSON_KEYS = ("rule", "arch", "dataset", "seed", "status", "epochs", "val_acc", "test_acc", "train_seconds",
             "samples_per_second", "best_epoch", "test_loss", "val_loss", "peak_mem_mb", "mem_kind", "n_params",
             "device", "run_id", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the usage block too)
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def summary(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: record.get(k) for k in JSON_KEYS}
    out["epochs"] = record.get("epochs_run")
    return {k: _clean(v) for k, v in out.items()}


def cmd_train(args) -> int:
    from bioplaus.orchestrator.config import parse_overrides
    from bioplaus.orchestrator.results import write_run
    from bioplaus.orchestrator.trial import load_splits, resolve, run_trial

    spec = resolve(parse_overrides(args.overrides))
    cfg = spec.cfg
    splits = load_splits(cfg)  # missing or corrupt data fails here, before any training
    quiet = args.quiet or args.json
    if not quiet:
        print(f"training rule={cfg.rule} arch={cfg.arch} dataset={cfg.dataset} seed={cfg.seed} "
              f"epochs={cfg.train.epochs} on {splits.sizes}", file=sys.stderr)
    record = run_trial(spec, progress=not quiet, splits=splits)
    if cfg.out:
        record["run_id"] = write_run(cfg.out, record)
    result = summary(record)
    if record["status"] == "failed":
        print(record.get("traceback", ""), file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['status']}: test_acc={record['test_acc']:.4f} val_acc={record['val_acc']:.4f} "
              f"(best epoch {record['best_epoch']}/{record['epochs_run']}) train {record['train_seconds']:.1f}s "
              f"{record['samples_per_second']:.0f} samples/s" + (f"; results in {cfg.out}" if cfg.out else ""))
    return 1 if record["status"] == "failed" else 0


def brain_step(cfg):
    """The sweep's last step with ``brain=true`` (None otherwise): brain similarity of every final network.

    Composed here because the sweep sits below analysis and never imports it.
    """
    if not cfg.brain:
        return None
    from bioplaus.analysis.brain import brain_table

    return lambda sweep_dir, log: brain_table(sweep_dir, cfg.rsa92, log=log)


def cmd_sweep(args) -> int:
    from bioplaus.orchestrator.sweep import EXIT_CODES, Sweep, SweepInterrupted, parse_sweep

    import polars as pl

    cfg = parse_sweep(args.overrides)
    sweep = Sweep(cfg, after_finals=brain_step(cfg))  # everything is validated here, before Ray starts
    tick = time.time()
    try:
        folder = sweep.run()
    except SweepInterrupted as stop:
        print(f"bioplaus: {stop}", file=sys.stderr)
        return stop.exit_code
    table = sweep.summary()
    if args.json:
        print(json.dumps({"sweep": sweep.cfg.name, "status": sweep.status, "folder": str(folder),
                          "cells": [{k: _clean(v) for k, v in row.items()} for row in table.to_dicts()]}))
    else:
        with pl.Config(tbl_rows=200, tbl_cols=20, tbl_width_chars=160, float_precision=4):
            print(table)
        print(f"sweep {sweep.cfg.name}: {len(sweep.cells)} cells in {(time.time() - tick) / 60:.1f} min; results in "
              f"{folder} (pl.scan_parquet('{folder}/finals'), '{folder}/trials', '{folder}/final_runs', "
              f"'{folder}/epochs')")
    if sweep.status != "complete":
        print(f"bioplaus: sweep {sweep.cfg.name} is {sweep.status}: some cells have no finals (reasons above and "
              f"in {folder}/manifest.json)", file=sys.stderr)
    return EXIT_CODES[sweep.status]


def cmd_cells(args) -> int:
    from bioplaus.orchestrator.sweep import parse_sweep, plan_cells

    cells, skipped = plan_cells(parse_sweep(args.overrides))
    if args.json:
        rows = [{"rule": c.rule, "arch": c.arch, "dataset": c.dataset, "supported": True, "reason": None} for c in cells]
        rows += [{"rule": c.rule, "arch": c.arch, "dataset": c.dataset, "supported": False, "reason": why}
                 for c, why in skipped]
        print(json.dumps(rows, indent=1))
        return 0
    for c in cells:
        print(f"{c.rule:<20} {c.arch:<10} {c.dataset}")
    for c, why in skipped:
        print(f"{c.rule:<20} {c.arch:<10} {c.dataset:<15} skipped: {why}")
    print(f"{len(cells)} cells, {len(skipped)} unsupported", file=sys.stderr)
    return 0


def cmd_faults(args) -> int:
    """``bioplaus bench --faults``: every fault case on a small sweep; exit 1 if any row is not OK."""
    from bioplaus.orchestrator.faults import json_rows, markdown_table, run_faults, select, write_docs

    if args.overrides:
        raise UsageError(f"bench --faults takes no overrides (got {' '.join(args.overrides)}); pick cases with "
                         "--fault WORD")
    docs = Path(args.write_docs) if args.write_docs else None
    if docs is not None and not docs.is_file():
        raise UsageError(f"--write-docs {docs}: no such file; pass docs/reliability.md")
    select(args.fault)  # an unknown case name is refused before the first sweep starts
    tick = time.monotonic()
    rows = run_faults(args.fault, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.monotonic() - tick
    print(json_rows(rows) if args.json else markdown_table(rows))
    print(f"{sum(r.ok for r in rows)} of {len(rows)} fault cases OK in {wall:.0f} s", file=sys.stderr)
    if docs is not None:
        write_docs(rows, docs, "bioplaus bench --faults" + "".join(f" --fault '{w}'" for w in args.fault or []), wall)
    return 0 if all(r.ok for r in rows) else 1


def cmd_bench(args) -> int:
    if args.faults:
        return cmd_faults(args)
    if args.orchestrator:
        from bioplaus.orchestrator.efficiency import measure

        result = measure()
        print(json.dumps(result))
        print(f"orchestrator busy fraction {result['busy_fraction']:.3f} ({result['trials']} trials x "
              f"{result['work_s']:.0f}s CPU work, {result['concurrency']} concurrent, wall {result['wall_s']:.1f}s)",
              file=sys.stderr)
        return 0
    if args.pipeline:
        from bioplaus.orchestrator.bench import pipeline_efficiency

        result = pipeline_efficiency(args.overrides, stages=args.stages, rounds=args.rounds, chunk=args.chunk,
                                     staleness=args.staleness, markdown=args.markdown)
        print(json.dumps(result))
        return 0
    if args.population:  # measured against as many separate trials, side by side
        from bioplaus.orchestrator.bench_population import run
        return run(args.overrides, args.population, args.markdown)
    from bioplaus.orchestrator.bench import run_bench
    return run_bench(args.rule, args.only, args.overrides, args.markdown, as_json=args.json)


def cmd_brain(args) -> int:
    from bioplaus.analysis.brain import run_command
    return run_command(args.sweep_dir, args.overrides, rsa92=args.rsa92, plot=args.plot)


def cmd_report(args) -> int:
    from bioplaus.analysis.report import build_report
    report = build_report(args.sweep_dir, out=args.out, compare=args.compare)
    if not args.quiet:
        print(report.summary)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"report written to {report.html} in {report.seconds:.1f}s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bioplaus import __version__

    p = _Parser(prog="bioplaus", description="Compare biologically plausible learning rules against backprop.")
    p.add_argument("--version", action="version", version=f"bioplaus {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_commands(sub)
    _add_bench_command(sub)
    _add_analysis_commands(sub)
    from bioplaus.orchestrator.criteria import add_command as add_criteria_command
    add_criteria_command(sub)
    return p


def _add_run_commands(sub) -> None:
    """train, the listings (rules, datasets, archs), sweep and what a sweep would run (cells, space)."""
    t = sub.add_parser("train", help="train and evaluate one configuration (key=value overrides)")
    t.add_argument("overrides", nargs="*", help="e.g. rule=bp arch=mlp dataset=fashion_mnist train.epochs=3 seed=1")
    t.add_argument("--json", action="store_true", help="print the final metrics as one JSON line on stdout")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("rules", help="list learning rules, their criteria and architectures")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_rules)
    d = sub.add_parser("datasets", help="list datasets")
    d.add_argument("--json", action="store_true", help="one JSON list: name, summary, folder, files")
    d.set_defaults(func=cmd_datasets)
    a = sub.add_parser("archs", help="list architectures")
    a.add_argument("--json", action="store_true", help="one JSON list: name, summary, default model config")
    a.set_defaults(func=cmd_archs)

    s = sub.add_parser("sweep", help="tune and compare every rule x arch x dataset cell (preset=local|paper|smoke)")
    s.add_argument("overrides", nargs="*", help="e.g. preset=local rules=[bp,fa] budget.trials=8 ray.address=auto")
    s.add_argument("--json", action="store_true", help="print the summary (per cell) as one JSON object on stdout")
    s.set_defaults(func=cmd_sweep)

    cf = sub.add_parser("config", help="print the fully resolved sweep config (preset=... and overrides) as YAML")
    cf.add_argument("overrides", nargs="*", help="e.g. preset=paper budget.trials=8 (with --train: rule=bp ...)")
    cf.add_argument("--train", action="store_true", help="resolve a `bioplaus train` config instead of a sweep's")
    cf.add_argument("--json", action="store_true", help="JSON instead of YAML")
    cf.set_defaults(func=cmd_config)

    c = sub.add_parser("cells", help="list the cells a sweep would run, and the unsupported ones with the reason")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--json", action="store_true", help="one JSON list of every cell: rule, arch, dataset, supported, reason")
    c.set_defaults(func=cmd_cells)
    add_estimate_arguments(c)

    sp = sub.add_parser("space", help="the effective search space of each rule (shared knobs and its own, with "
                                      "the file each range comes from)")
    sp.add_argument("rules", nargs="*", help="rule names (default: every rule)")
    sp.add_argument("--json", action="store_true", help="one JSON object: rule -> knob -> range and source")
    sp.set_defaults(func=cmd_space)


def _add_bench_command(sub) -> None:
    b = sub.add_parser("bench", help="accuracy targets the rules declare (long; not part of make test)")
    b.add_argument("overrides", nargs="*", help="overrides applied to every bench run, e.g. data.root=DIR")
    b.add_argument("--rule", action="append", help="only this rule's cases (repeatable)")
    b.add_argument("--only", action="append", help="only the named case, e.g. bp-mlp-mnist (repeatable)")
    b.add_argument("--markdown", help="append the result table to this markdown file")
    b.add_argument("--json", action="store_true", help="results as JSON on stdout (the measurements always are; "
                                                       "with --faults: the table as JSON rows)")
    b.add_argument("--orchestrator", action="store_true",
                   help="measure the orchestrator's busy fraction (fixed 5 s CPU trials, 2 concurrent) instead")
    b.add_argument("--pipeline", action="store_true",
                   help="measure layer-parallel speed-up instead: local_losses on fashion_mnist, sequential vs "
                        "pipelined on --stages one-thread stages vs sequential on --stages threads")
    b.add_argument("--faults", action="store_true",
                   help="fault injection instead: each fault (signals, kills, a second driver, failing trials, the "
                        "Optuna journal, stale finals, a changed config) on a small sweep in a temporary folder; "
                        "prints the table (exit 1 if a row is not OK)")
    b.add_argument("--fault", action="append", help="with --faults: only the cases whose name contains this "
                                                    "(case-insensitive, repeatable)")
    b.add_argument("--write-docs", metavar="FILE", help="with --faults: rewrite the table section of FILE "
                                                        "(docs/reliability.md) from this run")
    b.add_argument("--population", nargs="?", const="1,4,16", metavar="SIZES", help="populations of SIZES members "
                   "(default 1,4,16) of one cell (default bp mlp digits) vs as many trials alone: speed per member")
    b.add_argument("--stages", type=int, default=2, help="pipeline stages for --pipeline (default 2)")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --pipeline (default 3)")
    b.add_argument("--staleness", type=int, default=1, help="staleness bound of --pipeline's pipelined modes (default 1)")
    b.add_argument("--chunk", type=int, default=8, help="micro-batches per message of --pipeline's chunked mode (default 8)")
    add_fairness_argument(b, cmd_bench)  # sets the command's function: cmd_bench, or the fairness measurement


def _add_analysis_commands(sub) -> None:
    """brain and report: they read a sweep folder."""
    br = sub.add_parser("brain", help="RSA of every saved network's layers with human and monkey IT (92 images)")
    br.add_argument("sweep_dir", help="folder with models/*.pt (a sweep folder); results go to its brain/ table")
    br.add_argument("overrides", nargs="*", help="BrainConfig keys (analysis/brain.py), e.g. n_boot=200 rdm=euclidean")
    br.add_argument("--rsa92", help="folder with the Kriegeskorte 2008 .mat files (default: <data root>/rsa92)")
    br.add_argument("--plot", help="also write the best-layer figure (png/pdf) to this path")
    br.set_defaults(func=cmd_brain)

    rp = sub.add_parser("report", help="tables, figures and an HTML/Markdown report of a sweep folder")
    rp.add_argument("sweep_dir", help="a sweep folder, e.g. runs/sweeps/local")
    rp.add_argument("--out", help="where to write the report (default: SWEEP_DIR/report)")
    rp.add_argument("--compare", metavar="OTHER_SWEEP_DIR", help="a sweep of the other budget.kind, same cells")
    rp.add_argument("--quiet", action="store_true", help="do not print the summary tables")
    rp.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        flags = [e for e in extra if e.startswith("-")]
        if extra and (flags or not hasattr(args, "overrides")):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:
            args.overrides = [*args.overrides, *extra]  # overrides after a flag: `train --json rule=bp seed=1`
        return args.func(args)
    except UsageError as e:
        print(f"bioplaus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bioplaus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
