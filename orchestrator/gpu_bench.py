"""The one-step GPU bench (``make bench-gpu OUT=DIR``): everything the paper grid needs measured on a GPU,
in well under ten minutes, without Ray, into ``DIR/gpu_bench.json`` and ``DIR/gpu_bench.md``.

Steps, each timed and recorded whatever the others do (a failing step is recorded with its error):

1. ``environment``: the device, and the input path: the epoch order and augmentation streams on the device,
   the host synchronisations a batch costs (CUDA's sync debug mode; 0 expected);
2. ``single_trial``: one bp mlp MNIST trial through ``run_trial`` (real data when the data root has it),
   its samples/s, accuracy and the GPU's utilisation meanwhile;
3. ``packing``: the packed-trial curve (orchestrator/packing.py) of bp mlp MNIST, bp cnn CIFAR-10 and pc mlp
   MNIST for N = 1, 2, 4, 8, 16 processes, with utilisation; its curves go into the calibration;
4. ``population``: a P-member population of bp mlp MNIST against P = 1, where the population trainer exists;
5. ``pipeline_model``: per-block times of local_losses on an 8-stage mlp, the host link, the model's K = 1..8;
6. ``estimate``: the paper preset calibrated on this device and its device-hours for 1 to 16 trials per GPU
   (the preset's own ``resources.gpus_per_trial`` marked), the calibration kept as ``DIR/calibration.json``;
7. ``speedups``: bf16 autocast and ``torch.compile`` for bp, each with its parity against fp32 eager.

``--cpu-smoke`` runs every step with tiny sizes on the CPU (the test suite's dry run of this script).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bioplaus.orchestrator.gpu_bench_steps import (environment, estimate_step, packing_step, pipeline_step,
                                                   population_step, single_trial_step, speedups_step)

# In order of what the paper grid needs first; a run cut short by its time limit keeps the steps it finished.
STEPS = {"environment": environment, "single_trial": single_trial_step, "packing": packing_step,
         "population": population_step, "pipeline_model": pipeline_step, "estimate": estimate_step,
         "speedups": speedups_step}


@dataclass(frozen=True)
class BenchSizes:
    """How big each step is: the full bench on a GPU, or the CPU smoke run."""

    device: str = "cuda"
    trial: tuple[str, ...] = ("rule=bp", "arch=mlp", "dataset=mnist", "train.epochs=3")
    packing_cases: tuple[str, ...] = ("bp-mlp-mnist", "bp-cnn-cifar10", "pc-mlp-mnist")
    packing_counts: tuple[int, ...] = (1, 2, 4, 8, 16)
    packing_window_s: float = 3.0
    packing_extra: tuple[str, ...] = ()
    population_sizes: tuple[int, ...] = (1, 16)
    population_trial: tuple[str, ...] = ("rule=bp", "arch=mlp", "dataset=mnist", "train.epochs=2")
    preset: tuple[str, ...] = ("preset=paper",)
    calibrate_steps: int = 3
    calibrate_seconds: float = 0.1
    calibrate_warmup: int = 1
    packings: tuple[int, ...] = (1, 2, 4, 8, 16)
    pipeline: tuple[str, ...] = ("rule=local_losses", "arch=mlp", "dataset=fashion_mnist",
                                 "model.widths=[1000,1000,1000,1000,1000,1000,1000]")
    pipeline_batches: tuple[int, ...] = (128, 256)
    message_ms: float = 2.2
    """The pipeline model's cost per message: Ray's, fitted on the CPU sandbox (docs/benchmarks.md, "Pipeline
    model"); the device machine has no Ray to measure it with."""
    speed_cases: tuple[tuple[str, ...], ...] = (("rule=bp", "arch=mlp", "dataset=mnist"),
                                                ("rule=bp", "arch=cnn", "dataset=cifar10"))
    speed_steps: int = 200
    speed_modes: tuple[str, ...] = ("fp32", "bf16", "compile")  # each compilation costs a minute on the bench's clock
    compile_backend: str = "inductor"
    extra: tuple[str, ...] = field(default_factory=tuple)
    """Overrides added to every trial the bench builds."""


FULL = BenchSizes()
SMOKE = replace(FULL, device="cpu", trial=("rule=bp", "arch=mlp", "dataset=digits", "smoke=true"),
                packing_cases=("bp-mlp-mnist",), packing_counts=(1, 2), packing_window_s=0.5,
                packing_extra=("smoke=true",), population_sizes=(1, 2),
                population_trial=("rule=bp", "arch=mlp", "dataset=digits", "smoke=true"),
                preset=("preset=smoke", "rules=[bp,pc]"), calibrate_steps=1, calibrate_seconds=0.0, packings=(1, 2),
                pipeline=("rule=local_losses", "arch=mlp", "dataset=fashion_mnist", "smoke=true",
                          "model.widths=[16,16,16]"), pipeline_batches=(64,),
                speed_cases=(("rule=bp", "arch=mlp", "dataset=mnist", "smoke=true"),), speed_steps=4,
                compile_backend="eager", extra=("train.device=cpu", "train.threads=1"))


def run_bench(out: Path, sizes: BenchSizes, only: list[str] | None = None, log=print) -> dict:
    """Every step (or ``only`` those) in order, the results rewritten to ``out`` after each."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"started_at": time.time(), "sizes": _plain(sizes), "steps": {}}
    context: dict = {"out": out}
    for name, step in STEPS.items():
        if only and name not in only:
            continue
        log(f"== {name}")
        tick = time.perf_counter()
        try:
            result = step(sizes, context, log)
            row = {"status": result.pop("status", "ok"), **result}
        except Exception as e:  # recorded; the next steps still run
            row = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log(f"   {name} failed: {row['error']}")
        row["seconds"] = time.perf_counter() - tick
        results["steps"][name] = row
        write_results(out, results)
    return results


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return _plain(vars(value))
    return value


def write_results(out: Path, results: dict) -> None:
    (out / "gpu_bench.json").write_text(json.dumps(_plain(results), indent=1) + "\n")
    lines = ["# GPU bench", ""]
    for name, row in results["steps"].items():
        lines.append(f"## {name} ({row['status']}, {row['seconds']:.0f} s)")
        lines += row.get("lines") or [row.get("error") or row.get("reason") or ""]
        lines.append("")
    (out / "gpu_bench.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bioplaus.orchestrator.gpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_bench.json, gpu_bench.md and calibration.json")
    p.add_argument("--cpu-smoke", action="store_true", help="every step with tiny sizes on the CPU (a dry run)")
    p.add_argument("--only", action="append", choices=list(STEPS), help="only this step (repeatable)")
    p.add_argument("--message-ms", type=float, help="the pipeline model's cost per message, ms")
    args = p.parse_args(argv)
    sizes = SMOKE if args.cpu_smoke else FULL
    if args.message_ms is not None:
        sizes = replace(sizes, message_ms=args.message_ms)
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; run it on a GPU machine, or --cpu-smoke for a dry run", file=sys.stderr)
        return 2
    tick = time.time()
    results = run_bench(Path(args.out), sizes, args.only, log=lambda m: print(m, flush=True))
    failed = [n for n, r in results["steps"].items() if r["status"] == "error"]
    print((Path(args.out) / "gpu_bench.md").read_text())
    print(f"gpu_bench: {len(results['steps'])} steps in {time.time() - tick:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
