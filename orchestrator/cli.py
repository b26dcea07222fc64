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
from typing import Any

from orchestrator.errors import UsageError

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
    from orchestrator.config import parse_overrides
    from orchestrator.results import write_run
    from orchestrator.trial import load_splits, resolve, run_trial

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


def cmd_rules(args) -> int:
    from algorithms.registry import load_rules

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
    from orchestrator.data import DATASETS

    for spec in DATASETS.values():
        print(f"{spec.name:<15} {spec.summary}")
    return 0


def cmd_archs(args) -> int:
    from algorithms.arch import ARCHS

    for spec in ARCHS.values():
        print(f"{spec.name:<10} {spec.summary}")
    return 0


def cmd_sweep(args) -> int:
    # Until the orchestrator lands, `make sweep` runs one small backprop trial and says so.
    print("bioplaus sweep: the Ray/Optuna orchestrator is not built yet; running ONE backprop trial instead: "
          "rule=bp arch=mlp dataset=digits train.epochs=3 " + " ".join(args.overrides), file=sys.stderr)
    args.overrides = ["rule=bp", "arch=mlp", "dataset=digits", "train.epochs=3", "out=runs/sweep", *args.overrides]
    return cmd_train(args)


def cmd_bench(args) -> int:
    from orchestrator.bench import run_bench

    return run_bench(args.rule, args.only, args.overrides, args.markdown)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bioplaus", description="Compare biologically plausible learning rules against backprop.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train and evaluate one configuration (key=value overrides)")
    t.add_argument("overrides", nargs="*", help="e.g. rule=bp arch=mlp dataset=fashion_mnist train.epochs=3 seed=1")
    t.add_argument("--json", action="store_true", help="print the final metrics as one JSON line on stdout")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("rules", help="list learning rules, their criteria and architectures")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_rules)
    sub.add_parser("datasets", help="list datasets").set_defaults(func=cmd_datasets)
    sub.add_parser("archs", help="list architectures").set_defaults(func=cmd_archs)

    s = sub.add_parser("sweep", help="run the sweep (for now: one small backprop trial, said so)")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sweep)

    b = sub.add_parser("bench", help="accuracy targets the rules declare (long; not part of make test)")
    b.add_argument("overrides", nargs="*", help="overrides applied to every bench run, e.g. data.root=DIR")
    b.add_argument("--rule", action="append", help="only this rule's cases (repeatable)")
    b.add_argument("--only", action="append", help="only the named case, e.g. bp-mlp-mnist (repeatable)")
    b.add_argument("--markdown", help="append the result table to this markdown file")
    b.set_defaults(func=cmd_bench)
    return p


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
