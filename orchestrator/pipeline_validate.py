"""The pipeline model (orchestrator/pipeline_model.py) against the measured pipeline, on this machine.

For each batch size, in one process and one after the other: the measured K=2 pipeline
(``bioplaus bench --pipeline``'s own measurement: sequential one-thread runs, pipelined runs, and K sequential
runs side by side for the machine's ceiling, interleaved over rounds), the blocks' measured compute times and
activation sizes, and the link through Ray's object store (per-message cost and bandwidth, fitted). The model
then predicts the K=2 efficiency with the ceiling's contention, and the table sets it beside the measurement.

``python -m bioplaus.orchestrator.pipeline_validate [overrides] [--batch 128 --batch 256] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bioplaus.orchestrator.bench import pipeline_efficiency
from bioplaus.orchestrator.calibrate import prepare
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.pipeline_model import Link, predict, profile_blocks, ray_link
from bioplaus.orchestrator.spec import resolve

BASE = ["rule=local_losses", "arch=mlp", "dataset=fashion_mnist", "train.epochs=1", "out=null"]


def validate_batch(overrides: list[str], batch: int, link: Link, rounds: int, chunk: int, staleness: int) -> dict:
    """One batch size: the measured K=2 pipeline and the model's prediction for it."""
    given = [*overrides, f"train.batch_size={batch}"]
    measured = pipeline_efficiency(given, stages=2, rounds=rounds, chunk=chunk, staleness=staleness)
    median = measured["median"]
    seq = median["sequential, 1 thread"]
    pipe = median[f"pipeline K=2, s={staleness}, chunk={chunk}"]
    trial = prepare(resolve(parse_overrides([*BASE, *given, "train.threads=1"])), "real")
    profile = profile_blocks(trial)
    contention = 1 / measured["machine_ceiling"]
    model = predict(profile, 2, link, chunk, trial.plan.steps, contention)
    ideal = predict(profile, 2, Link(float("inf"), 0.0), chunk, trial.plan.steps)
    return {"batch": batch, "chunk": chunk, "steps": trial.plan.steps, "measured_sequential": seq,
            "measured_pipeline": pipe, "measured_efficiency": pipe / seq / 2,
            "machine_ceiling": measured["machine_ceiling"], "model_sequential": model["sequential_samples_per_s"],
            "model_efficiency": model["efficiency"], "model_efficiency_free_link": ideal["efficiency"],
            "groups": model["groups"], "profile_ms": [t * 1e3 for t in profile.compute_s],
            "feed_ms": profile.feed_s * 1e3, "measured": measured}


def lines(rows: list[dict], link: Link) -> list[str]:
    out = [f"link through Ray's object store: {link.message_s * 1e3:.2f} ms per message + "
           f"{link.bytes_per_s / 1e9:.2f} GB/s per side (fitted)",
           "| batch | chunk | sequential samples/s: measured / model | pipeline K=2 samples/s | efficiency measured | "
           "model | model, free link | machine ceiling |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['batch']} | {r['chunk']} | {r['measured_sequential']:.0f} / {r['model_sequential']:.0f} | "
            f"{r['measured_pipeline']:.0f} | {r['measured_efficiency']:.2f} | {r['model_efficiency']:.2f} | "
            f"{r['model_efficiency_free_link']:.2f} | {r['machine_ceiling']:.2f} |" for r in rows]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bioplaus.orchestrator.pipeline_validate", description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", default=None,
                   help="trial overrides (default: model.widths=[1000,1000,1000,1000] data.train_limit=20000)")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 128 and 256)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--staleness", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    overrides = args.overrides or ["model.widths=[1000,1000,1000,1000]", "data.train_limit=20000"]
    tick = time.time()
    link = ray_link()
    rows = [validate_batch(overrides, b, link, args.rounds, args.chunk, args.staleness) for b in args.batch or (128, 256)]
    print("\n".join(lines(rows, link)))
    print(f"({time.time() - tick:.0f} s; overrides {' '.join(overrides)})", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"link": {"bytes_per_s": link.bytes_per_s, "message_s": link.message_s}, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
