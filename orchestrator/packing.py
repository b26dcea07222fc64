"""Packed trials: the aggregate training throughput of N trials sharing one device, and how busy it is.

A sweep with ``resources.gpus_per_trial`` = 1/N runs N trials on each GPU, each in its own worker process.
This measures what that buys without Ray: N worker processes, each preparing one trial exactly as a trial does
(orchestrator/calibrate.py: the rule, the feed, its data on the device) and warming it up, then all training
during the same wall-clock window; the aggregate samples/s is the sum of theirs. The workers are started once
for the largest N and reused for the smaller ones. Meanwhile the device's utilisation is sampled (NVML through
``torch.cuda.utilization``, else ``nvidia-smi``; on a CPU, the workers' CPU time over the window and cores).

``python -m bioplaus.orchestrator.packing --case bp-mlp-mnist --counts 1,2,4,8,16 [--json] [--calibration F]``
(``--calibration`` adds the curve to a calibration file, where the cost estimate reads it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

import torch

# The measured cases: a cheap and a convolutional backprop cell, and an expensive rule (20 settling steps).
CASES: dict[str, list[str]] = {
    "bp-mlp-mnist": ["rule=bp", "arch=mlp", "dataset=mnist"],
    "bp-cnn-cifar10": ["rule=bp", "arch=cnn", "dataset=cifar10"],
    "pc-mlp-mnist": ["rule=pc", "arch=mlp", "dataset=mnist"],
}


def case_key(overrides: list[str]) -> str:
    """The cell key ("rule.arch.dataset") of a case's overrides, as the calibration files it."""
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    return ".".join(values.get(k, d) for k, d in (("rule", "bp"), ("arch", "mlp"), ("dataset", "digits")))


def _worker(overrides: list[str], data: str, threads: int, warmup: int, commands, results) -> None:
    """One packed trial: prepare and warm up, then train through each window the parent sends."""
    try:
        torch.set_num_threads(threads)
        from bioplaus.orchestrator.calibrate import prepare, run_steps, sync
        from bioplaus.orchestrator.config import parse_overrides
        from bioplaus.orchestrator.spec import resolve

        trial = prepare(resolve(parse_overrides([*overrides, "out=null"])), data)
        batches = trial.batches()
        run_steps(trial, batches, warmup)
        sync(trial.device)
        results.put({"ready": os.getpid(), "device": str(trial.device)})
        while (command := commands.get()) is not None:
            start_at, window = command
            time.sleep(max(0.0, start_at - time.time()))
            cpu0, tick, steps = time.process_time(), time.perf_counter(), 0
            while time.perf_counter() - tick < window:
                run_steps(trial, batches, 1)
                steps += 1
            sync(trial.device)  # the queued steps count in the window they were issued in
            seconds = time.perf_counter() - tick
            results.put({"steps": steps, "seconds": seconds, "samples_per_s": steps * trial.plan.batch / seconds,
                         "cpu_s": time.process_time() - cpu0})
    except Exception as e:  # reported to the parent, which names the case
        results.put({"error": f"{type(e).__name__}: {e}"})


class UtilisationSampler:
    """The GPU's utilisation (per cent of time a kernel ran) and memory in use, sampled every ``period_s``."""

    def __init__(self, period_s: float = 0.2):
        self.period_s = period_s
        self.kind = self._kind()

    @staticmethod
    def _kind() -> str | None:
        if not torch.cuda.is_available():
            return None
        try:
            torch.cuda.utilization()
            return "nvml"
        except Exception:  # no NVML bindings (pynvml): the command-line tool, if there is one
            return "nvidia-smi" if shutil.which("nvidia-smi") else None

    def read(self) -> tuple[float, float] | None:
        """(utilisation %, memory used MiB) now, or None."""
        if self.kind == "nvml":
            try:
                memory = torch.cuda.device_memory_used() / 2**20
            except (AttributeError, RuntimeError):  # an older torch: no NVML memory reading
                memory = float("nan")
            return float(torch.cuda.utilization()), memory
        if self.kind == "nvidia-smi":
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,"
                                  "nounits", "-i", "0"], capture_output=True, text=True, timeout=10).stdout
            util, mem = out.strip().split(",")[:2]
            return float(util), float(mem)
        return None

    def during(self, start_at: float, seconds: float) -> dict:
        """Sample from ``start_at`` (a ``time.time()``) for ``seconds``; mean and max utilisation, max memory."""
        time.sleep(max(0.0, start_at - time.time()))
        samples = []
        while time.time() < start_at + seconds and self.kind:
            self._sample(samples)
        return self.summary(samples)

    def _sample(self, samples: list) -> None:
        reading = self.read()
        if reading is not None:
            samples.append(reading)
        time.sleep(self.period_s)

    def summary(self, samples: list[tuple[float, float]]) -> dict:
        if not samples:
            return {"gpu_util_source": self.kind}
        utils = [s[0] for s in samples]
        return {"gpu_util_mean": sum(utils) / len(utils), "gpu_util_max": max(utils),
                "gpu_mem_used_mib_max": max(s[1] for s in samples), "gpu_util_samples": len(samples),
                "gpu_util_source": self.kind}

    def around(self, work):
        """Run ``work()`` while a thread samples; (its result, the summary of the samples)."""
        samples: list = []
        done = threading.Event()

        def loop():
            while not done.is_set() and self.kind:
                self._sample(samples)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            result = work()
        finally:
            done.set()
            thread.join(timeout=30)
        return result, self.summary(samples)


def measure_packing(overrides: list[str], counts: list[int], window_s: float = 5.0, data: str = "synthetic",
                    threads: int = 1, warmup: int = 5, start_timeout_s: float = 300.0) -> dict:
    """Aggregate samples/s of N = each of ``counts`` trials training at once (processes); one point per N."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    n_max = max(counts)
    workers = []
    for _ in range(n_max):
        commands = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(overrides, data, threads, warmup, commands, results), daemon=True)
        proc.start()
        workers.append((proc, commands))
    try:
        ready = [_get(results, start_timeout_s, overrides) for _ in workers]
        sampler = UtilisationSampler()
        points = [_window(workers[:n], results, sampler, window_s, overrides) for n in sorted(set(counts))]
    finally:
        _stop(workers)
    single = points[0]["samples_per_s"] if points[0]["n"] == 1 else None
    for p in points:
        p["speedup_vs_one"] = p["samples_per_s"] / single if single else None
    return {"case": case_key(overrides), "overrides": overrides, "device": ready[0]["device"], "data": data,
            "window_s": window_s, "threads_per_trial": threads, "points": points}


def _window(workers, results, sampler: UtilisationSampler, window_s: float, overrides: list[str]) -> dict:
    """One point of the curve: the first ``len(workers)`` workers train during the same window."""
    start_at = time.time() + 0.5
    for _, commands in workers:
        commands.put((start_at, window_s))
    util = sampler.during(start_at, window_s)
    rows = [_get(results, window_s + 600, overrides) for _ in workers]
    point = {"n": len(workers), "samples_per_s": sum(r["samples_per_s"] for r in rows),
             "per_trial": [r["samples_per_s"] for r in rows], **util}
    if sampler.kind is None:  # a CPU device: how much of the machine the trials kept busy
        point["cpu_util"] = sum(r["cpu_s"] for r in rows) / (max(r["seconds"] for r in rows) * (os.cpu_count() or 1))
    return point


def _get(results, timeout_s: float, overrides: list[str]) -> dict:
    try:
        row = results.get(timeout=timeout_s)
    except queue.Empty:
        raise RuntimeError(f"a packed trial of {' '.join(overrides)} gave no answer within {timeout_s:.0f}s") from None
    if "error" in row:
        raise RuntimeError(f"a packed trial of {' '.join(overrides)} failed: {row['error']}")
    return row


def _stop(workers) -> None:
    for proc, commands in workers:
        if proc.is_alive():
            commands.put(None)
    for proc, _ in workers:
        proc.join(timeout=30)
        if proc.is_alive():  # did not stop when asked: it is ours, end it
            proc.terminate()
            proc.join(timeout=10)


def saturation(points: list[dict], fraction: float = 0.9) -> int:
    """The smallest N whose aggregate throughput reaches ``fraction`` of the best measured: where packing more
    trials on the device stops paying."""
    best = max(p["samples_per_s"] for p in points)
    return min(p["n"] for p in points if p["samples_per_s"] >= fraction * best)


def curve_lines(result: dict) -> list[str]:
    """The curve as a Markdown table."""
    lines = [f"{result['case']} on {result['device']} ({result['data']} data, {result['window_s']:.0f} s windows):",
             "| trials N | samples/s (sum) | x one trial | per trial | util % (mean: GPU; on a CPU its cores) "
             "| GPU MiB (max) |",
             "|---|---|---|---|---|---|"]
    for p in result["points"]:
        util = p.get("gpu_util_mean", p.get("cpu_util", float("nan")) * 100)
        lines.append(f"| {p['n']} | {p['samples_per_s']:.0f} | {p['speedup_vs_one'] or float('nan'):.2f} | "
                     f"{p['samples_per_s'] / p['n']:.0f} | {util:.0f} | {p.get('gpu_mem_used_mib_max', float('nan')):.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bioplaus.orchestrator.packing", description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=sorted(CASES), action="append", help="repeatable; default every case")
    p.add_argument("--counts", default="1,2,4,8,16", help="comma-separated trial counts (default 1,2,4,8,16)")
    p.add_argument("--window", type=float, default=5.0, help="seconds every point trains (default 5)")
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--calibration", help="add the curves to this calibration file (the cost estimate reads them)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    out = [measure_packing(CASES[c], counts, args.window, args.data) for c in (args.case or sorted(CASES))]
    if args.calibration:
        from bioplaus.orchestrator.sweep.estimate import add_curves

        add_curves(args.calibration, "packing", out)
    print(json.dumps(out) if args.json else "\n\n".join("\n".join(curve_lines(r)) for r in out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
