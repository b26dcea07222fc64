"""Accuracy targets (``make bench``): long runs on real data that are not tests.

Every rule declares its targets (``Rule.benchmarks``) beside its code. Each case is a full training
run through the same entry point as ``bioplaus train``; its cost is compared with backprop on the
same cell *in the same bench run* (one epoch of bp with the case's data, train and model settings),
as train seconds per sample, rule / bp. Exit code 1 if any case misses its target.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

from bioplaus.algorithms.registry import load_rules
from bioplaus.orchestrator import ray_local  # before any ray import: Ray's loopback environment
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.results import write_run
from bioplaus.orchestrator.trial import resolve, run_trial


def cases(rules: list[str] | None, only: list[str] | None):
    """(case name, rule, Benchmark) for the selected rules and case names."""
    registry = load_rules()
    unknown = set(rules or []) - set(registry)
    if unknown:
        raise UsageError(f"unknown rule(s) {sorted(unknown)} for bench; known: {', '.join(registry)}")
    out = [(f"{name}-{b.name}", name, b) for name, cls in registry.items() if not rules or name in rules
           for b in cls.benchmarks]
    missing = set(only or []) - {c[0] for c in out}
    if missing:
        raise UsageError(f"unknown bench case(s) {sorted(missing)}; known: {', '.join(c[0] for c in out)}")
    return [c for c in out if not only or c[0] in only]


def verdict(passed: bool, case) -> str:
    """PASS or FAIL; a PASS of a case whose settings were chosen by reading test accuracy says so, since reaching
    a target on the data the settings were tuned on is not evidence that the rule reaches it."""
    if not passed:
        return "FAIL"
    return "PASS (settings chosen on test)" if case.test_selected else "PASS"


def run_bench(rules: list[str] | None, only: list[str] | None, overrides: list[str], markdown: str | None,
              as_json: bool = False) -> int:
    """Run the selected cases; the result table on stdout (a JSON list with ``as_json``); 1 if any missed."""
    selected = cases(rules, only)
    specs = {}
    for name, rule, b in selected:  # every config is checked before the first long run starts
        args = [f"rule={rule}", f"arch={b.arch}", f"dataset={b.dataset}", *b.overrides, "out=runs/bench", *overrides]
        specs[name] = resolve(parse_overrides(args))
    bp_speed: dict[tuple, float] = {}
    rows, failed = [], 0
    for name, rule, b in selected:
        spec = specs[name]
        print(f"== {name}: {' '.join(b.overrides + tuple(overrides))}", file=sys.stderr, flush=True)
        tick = time.time()
        record = run_trial(spec, progress=True)
        write_run(spec.cfg.out, record)
        minutes = (time.time() - tick) / 60
        shared = tuple(o for o in (*b.overrides, *overrides) if not o.startswith(("hp.", "train.epochs=")))
        key = (b.arch, b.dataset, shared)
        if rule == "bp":
            bp_speed.setdefault(key, record["samples_per_second"])
        if key not in bp_speed:
            ref = run_trial(resolve(parse_overrides(
                ["rule=bp", f"arch={b.arch}", f"dataset={b.dataset}", *shared, "train.epochs=1", "out=null"])))
            bp_speed[key] = ref["samples_per_second"]
        ratio = bp_speed[key] / record["samples_per_second"] if record["samples_per_second"] else float("nan")
        ok = record["status"] == "ok" and record["test_acc"] >= b.min_test_acc
        failed += not ok
        rows.append((name, record["test_acc"], b.min_test_acc, record["epochs_run"], minutes, ratio, verdict(ok, b)))
        print(f"   {name}: test_acc {record['test_acc']:.4f} (target {b.min_test_acc}) in {minutes:.1f} min, "
              f"cost x{ratio:.2f} of bp", file=sys.stderr, flush=True)
    lines = ["| case | test acc | target | epochs | minutes | cost vs bp | result |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.4f} | {r[2]:.3f} | {r[3]} | {r[4]:.1f} | {r[5]:.2f} | {r[6]} |" for r in rows]
    if as_json:
        keys = ("case", "test_acc", "target", "epochs", "minutes", "cost_vs_bp", "result")
        finite = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in r] for r in rows]
        print(json.dumps([dict(zip(keys, r)) for r in finite]))
    else:
        print("\n".join(lines))
    if markdown:
        with open(markdown, "a") as f:
            f.write(f"\n`bioplaus bench {' '.join(sys.argv[2:])}` on {time.strftime('%Y-%m-%d')}:\n\n")
            f.write("\n".join(lines) + "\n")
    return 1 if failed else 0


def pipeline_efficiency(overrides: list[str], stages: int = 2, rounds: int = 3, chunk: int = 8,
                        markdown: str | None = None, staleness: int = 1) -> dict:
    """Layer-parallel speed-up (``make bench ARGS=--pipeline``): the same training run sequentially on one
    thread, pipelined on ``stages`` one-thread stage actors (staleness bound ``staleness``) with one micro-batch per message
    and with ``chunk``, and sequentially on ``stages`` threads, interleaved ``rounds`` times so that
    drifting machine load hits every mode alike; medians of the training throughput. Parallel efficiency =
    (best pipelined / sequential 1-thread) / stages; the machine ceiling beside it is what ``stages`` copies of
    the sequential run reach side by side, each on its own core."""
    base = ["rule=local_losses", "arch=mlp", "dataset=fashion_mnist", "train.epochs=1", "out=null", *overrides]
    modes, together = _pipeline_modes(stages, staleness, chunk)
    specs = {m: resolve(parse_overrides([*base, *extra])) for m, extra in modes.items()}  # all checked first
    runs = _PipelineRuns(modes)
    # one Ray for all runs (start leaves a caller's running Ray alone, e.g. a test's, and stop then too)
    started = ray_local.start(Path("runs/bench-pipeline"), num_cpus=stages, timeout_s=180)
    try:
        for r in range(rounds):
            for mode, spec in specs.items():
                label = f"round {r + 1}/{rounds} {mode}"
                if mode == together:
                    runs.add_together(mode, _run_at_once([*base, *modes[mode]], stages), label)
                else:
                    runs.add(mode, run_trial(spec), label)
    finally:
        ray_local.stop(started)
    result = runs.result(stages, rounds, together, base)
    lines = _efficiency_lines(result, list(modes), rounds)
    print("\n".join(lines))
    if markdown:
        with open(markdown, "a") as f:
            f.write(f"\n`bioplaus bench --pipeline --stages {stages} --rounds {rounds} --chunk {chunk} --staleness "
                    f"{staleness} {' '.join(overrides)}` on {time.strftime('%Y-%m-%d %H:%M')}:\n\n")
            f.write("\n".join(lines) + "\n")
    return result


def _pipeline_modes(stages: int, staleness: int, chunk: int) -> tuple[dict[str, list[str]], str]:
    """The measured modes (name -> overrides), in run order, and the name of the machine-ceiling mode."""
    pipelined = ["train.threads=1", "train.mode=pipeline", f"train.stages={stages}", f"train.staleness={staleness}"]
    modes = {"sequential, 1 thread": ["train.threads=1"],
             **{f"pipeline K={stages}, s={staleness}, chunk={c}": [*pipelined, f"train.chunk={c}"] for c in (1, chunk)},
             f"sequential, {stages} threads": [f"train.threads={stages}"]}
    # The machine's own ceiling for K one-thread workers: K copies of the sequential run at once, each on its
    # own core and sharing nothing. Their summed throughput / (K x one alone) is the most any K-way
    # parallel scheme can reach here (memory bandwidth, shared caches, a hypervisor's vCPUs).
    together = f"{stages} sequential runs at once, 1 thread each (summed)"
    modes[together] = modes["sequential, 1 thread"]
    return modes, together


class _PipelineRuns:
    """Per mode, every round's throughput and the test accuracy; per pipelined mode, where a shortfall from
    the ideal speed-up comes from."""

    def __init__(self, modes: dict[str, list[str]]):
        self.speed: dict[str, list[float]] = {m: [] for m in modes}
        self.accuracy: dict[str, float] = {}
        # The stages' summed compute time over the sequential run's training time (1: the stages do the
        # sequential work and nothing more; 2: each stage computes at half speed) ...
        self.inflation: dict[str, list[float]] = {m: [] for m in modes if m.startswith("pipeline")}
        # ... how much of the stages' busy time they spent descheduled (waiting for a core, not computing)
        self.descheduled: dict[str, list[float]] = {m: [] for m in self.inflation}
        # ... and how much of their CPU time went to the actors' other threads (Ray's), not the stage's own thread
        self.other_threads: dict[str, list[float]] = {m: [] for m in self.inflation}
        self.seq_seconds = None

    def add(self, mode: str, record: dict, label: str) -> None:
        self.speed[mode].append(record["samples_per_second"])
        self.accuracy[mode] = record["test_acc"]
        if mode.startswith("sequential, 1"):
            self.seq_seconds = record["train_seconds"]
        elif mode.startswith("pipeline") and self.seq_seconds:
            info = record["pipeline"]
            self.inflation[mode].append(sum(info["stage_busy_seconds"]) / self.seq_seconds)
            self.descheduled[mode].append(1 - sum(info["stage_cpu_seconds"]) / sum(info["stage_busy_seconds"]))
            self.other_threads[mode].append(1 - sum(info["stage_thread_cpu_seconds"])
                                            / sum(info["stage_cpu_seconds"]))
        print(f"   {label}: {record['samples_per_second']:.0f} samples/s, "
              f"test {record['test_acc']:.4f}", file=sys.stderr, flush=True)

    def add_together(self, mode: str, records: list[dict], label: str) -> None:
        self.speed[mode].append(sum(rec["samples_per_second"] for rec in records))
        self.accuracy[mode] = records[0]["test_acc"]
        print(f"   {label}: {self.speed[mode][-1]:.0f} samples/s "
              f"({', '.join(format(x['samples_per_second'], '.0f') for x in records)})", file=sys.stderr, flush=True)

    def result(self, stages: int, rounds: int, together: str, base: list[str]) -> dict:
        median = {m: statistics.median(v) for m, v in self.speed.items()}
        seq1, seqk = median["sequential, 1 thread"], median[f"sequential, {stages} threads"]
        pipe = max(v for m, v in median.items() if m.startswith("pipeline"))
        ceiling = median[together] / seq1 / stages
        return {"stages": stages, "rounds": rounds, "samples_per_second": self.speed, "median": median,
                "speedup_vs_1_thread": pipe / seq1, "efficiency": pipe / seq1 / stages,
                "machine_ceiling": ceiling, "efficiency_of_ceiling": pipe / seq1 / stages / ceiling,
                "speedup_vs_k_threads": pipe / seqk, "test_acc": self.accuracy, "overrides": base,
                "stage_compute_inflation": self.inflation, "stage_descheduled_fraction": self.descheduled,
                "stage_other_threads_fraction": self.other_threads}


def _efficiency_lines(result: dict, modes: list[str], rounds: int) -> list[str]:
    """The markdown table of every mode's throughput, and the summary line."""
    median, speed, accuracy, stages = result["median"], result["samples_per_second"], result["test_acc"], \
        result["stages"]
    lines = [f"| mode | samples/s (median of {rounds}) | all rounds | test acc |", "|---|---|---|---|"]
    lines += [f"| {m} | {median[m]:.0f} | {', '.join(f'{v:.0f}' for v in speed[m])} | {accuracy[m]:.4f} |"
              for m in modes]
    lines.append(f"\nspeed-up vs 1 thread {result['speedup_vs_1_thread']:.2f}x, parallel efficiency "
                 f"{result['efficiency']:.2f} (goal >= 0.8); machine ceiling ({stages} independent runs at once) "
                 f"{result['machine_ceiling']:.2f}, so the pipeline reaches {result['efficiency_of_ceiling']:.2f} of "
                 f"what this machine allows; vs {stages} threads {result['speedup_vs_k_threads']:.2f}x; "
                 f"stage compute / sequential compute: {_per_mode(result['stage_compute_inflation'])}; fraction of "
                 f"it descheduled: {_per_mode(result['stage_descheduled_fraction'])}; fraction of their CPU time on "
                 f"other threads than the stage's: {_per_mode(result['stage_other_threads_fraction'])}")
    return lines


def _per_mode(series: dict[str, list[float]]) -> str:
    """``mode: v1, v2, ...; mode: ...`` with two decimals: one counter's value per round for each mode."""
    return "; ".join(f"{m}: {', '.join(f'{v:.2f}' for v in vs)}" for m, vs in series.items())


def _run_at_once(args: list[str], n: int) -> list[dict]:
    """``n`` copies of the same sequential training run as simultaneous one-CPU Ray tasks; their records."""
    import ray

    @ray.remote(num_cpus=1, max_retries=0)
    def train(plain: list[str]) -> dict:
        record = run_trial(resolve(parse_overrides(plain)))
        return {k: record[k] for k in ("samples_per_second", "test_acc")}

    return ray.get([train.remote(args) for _ in range(n)], timeout=3600)


def step_cost(overrides: list[str], rounds: int = 5, steps: int = 5) -> dict:
    """A rule's training cost per step against bp's, side by side in one process: both built from the same trial
    config (bp with its default hyperparameters), stepped alternately (``rounds`` x ``steps`` batches each, the
    first round's order swapped every round) on the same training batches, on the CPU with the config's
    ``train.threads``. The medians of the per-step times and of the per-round ratios; a ratio measured this way
    sees the same machine load for both rules, which one-epoch runs one after the other do not."""
    import torch

    from bioplaus.orchestrator.build import build_rule
    from bioplaus.orchestrator.feed import TrainFeed
    from bioplaus.orchestrator.trial import load_splits

    spec = resolve(parse_overrides(overrides))
    bp_spec = resolve(parse_overrides(["rule=bp", *(o for o in overrides if not o.startswith(("rule=", "hp.")))]))
    cfg = spec.cfg
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    splits = load_splits(cfg)
    feed, size = TrainFeed(splits, "none", int(cfg.seed)), int(cfg.train.batch_size)
    order = torch.randperm(len(splits.train_y), generator=torch.Generator().manual_seed(int(cfg.seed)))
    batches = [feed.batch(order[i * size:(i + 1) * size]) for i in range(steps + 1)]
    per_epoch = math.ceil(len(splits.train_y) / size)
    device = torch.device("cpu")
    models = {name: build_rule(s, tuple(splits.train_x.shape[1:]), len(splits.classes), per_epoch, device)
              for name, s in ((cfg.rule, spec), ("bp", bp_spec))}
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        model.train_step(*batches[-1])  # warm-up, outside the timing
    for r in range(rounds):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            tick = time.perf_counter()
            for x, y in batches[:steps]:
                models[name].train_step(x, y)
            times[name].append((time.perf_counter() - tick) / steps)
    ratios = [a / b for a, b in zip(times[cfg.rule], times["bp"])]
    return {"rule": cfg.rule, "arch": cfg.arch, "dataset": cfg.dataset, "batch_size": size,
            "threads": torch.get_num_threads(), "rounds": rounds, "steps_per_round": steps,
            "rule_ms_per_step": 1000 * statistics.median(times[cfg.rule]),
            "bp_ms_per_step": 1000 * statistics.median(times["bp"]), "cost_vs_bp": statistics.median(ratios),
            "cost_vs_bp_per_round": ratios}


if __name__ == "__main__":  # python -m bioplaus.orchestrator.bench step-cost rule=R arch=A dataset=D [key=value ...]
    if sys.argv[1:2] != ["step-cost"]:
        sys.exit("usage: python -m bioplaus.orchestrator.bench step-cost rule=R arch=A dataset=D [rounds=N] [key=value]")
    chosen = [a for a in sys.argv[2:] if a.startswith("rounds=")]
    result = step_cost([a for a in sys.argv[2:] if a not in chosen],
                       rounds=int(chosen[0].split("=", 1)[1]) if chosen else 5)
    print(json.dumps(result))
