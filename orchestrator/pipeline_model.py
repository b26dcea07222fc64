"""A calibrated model of the layer-parallel pipeline (orchestrator/pipeline.py): its throughput and parallel
efficiency for K = 1..8 stage groups, from measured per-block compute times, activation sizes and a link.

The pipeline sends messages of ``chunk`` micro-batches through K groups of consecutive blocks. A group spends,
per micro-batch, its blocks' ``block_step`` times (slowed by ``contention``: what K busy workers cost each
other on one machine, 1 where each has its own device), plus, on group 0, building the batch (the feed), plus
receiving its input and sending its output activation over the link (``bytes / link_bytes_per_s`` each side);
and per message a fixed ``message_s`` (the call, its scheduling, the object store's bookkeeping). With
``tau_g`` a message's time on group g and M messages per epoch, an epoch takes ``sum(tau) + (M - 1) max(tau)``
(fill, then the slowest group paces the rest); sequential training takes M x chunk x (feed + all blocks).
Efficiency = speed-up over sequential / K.

:func:`profile_blocks` measures the inputs on this machine's device; ``python -m
bioplaus.orchestrator.pipeline_model`` prints the predictions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from bioplaus.orchestrator.pipeline_plan import split_stages


@dataclass(frozen=True)
class BlockProfile:
    """Measured per micro-batch: each block's ``block_step`` seconds and output bytes, and the feed's seconds."""

    compute_s: tuple[float, ...]
    out_bytes: tuple[int, ...]
    feed_s: float
    batch: int
    device: str = "cpu"
    macs: tuple[float, ...] = ()
    """Multiply-accumulates per sample of each block: the pipeline cuts the network by these."""


@dataclass(frozen=True)
class Link:
    """How activations travel between groups: bytes per second on each side, plus a fixed cost per message."""

    bytes_per_s: float
    message_s: float = 0.0


def predict(profile: BlockProfile, k: int, link: Link, chunk: int, steps: int, contention: float = 1.0,
            groups: list[list[int]] | None = None) -> dict:
    """Throughput and efficiency of ``k`` groups for an epoch of ``steps`` micro-batches; ``groups``: the cut
    (default: the pipeline's own, balanced by multiply-accumulates, or by measured time without them)."""
    groups = groups or split_stages(list(profile.macs or profile.compute_s), k)
    per_batch = []
    for g, blocks in enumerate(groups):
        work = sum(profile.compute_s[i] for i in blocks) * contention + (profile.feed_s if g == 0 else 0.0)
        if g > 0:
            work += profile.out_bytes[groups[g - 1][-1]] / link.bytes_per_s
        if g < len(groups) - 1:
            work += profile.out_bytes[blocks[-1]] / link.bytes_per_s
        per_batch.append(work)
    messages = math.ceil(steps / chunk)
    tau = [chunk * w + link.message_s for w in per_batch]
    pipelined = sum(tau) + (messages - 1) * max(tau)
    sequential = messages * chunk * (profile.feed_s + sum(profile.compute_s))
    speedup = sequential / pipelined
    return {"k": len(groups), "groups": groups, "samples_per_s": messages * chunk * profile.batch / pipelined,
            "sequential_samples_per_s": messages * chunk * profile.batch / sequential, "speedup": speedup,
            "efficiency": speedup / len(groups), "bottleneck_group": max(range(len(tau)), key=tau.__getitem__),
            "group_seconds_per_batch": per_batch}


def predictions(profile: BlockProfile, link: Link, chunk: int, steps: int, contention: float = 1.0,
                ks: range | None = None) -> list[dict]:
    """:func:`predict` for every K the network can be cut into (at most 8)."""
    ks = ks or range(1, min(8, len(profile.compute_s)) + 1)
    return [predict(profile, k, link, chunk, steps, contention) for k in ks]


def profile_blocks(trial, reps: int = 20, warmup: int = 3) -> BlockProfile:
    """Each block's ``block_step`` time on its own (``reps`` back to back on one input, after ``warmup``), its
    output's bytes, and the feed's time per batch, for a prepared block-local trial (orchestrator/calibrate.py)."""
    from bioplaus.orchestrator.calibrate import sync
    from bioplaus.orchestrator.pipeline_plan import stage_costs

    rule, device = trial.rule, trial.device
    idx = next(trial.batches())
    times, sizes = [], []
    h, y = trial.feed.batch(idx)
    for i in range(len(rule.net.stages)):
        for _ in range(warmup):
            out = rule.block_step(i, h, y)
        sync(device)
        tick = time.perf_counter()
        for _ in range(reps):
            out = rule.block_step(i, h, y)
        sync(device)
        times.append((time.perf_counter() - tick) / reps)
        sizes.append(out.numel() * out.element_size())
        h = out
    sync(device)
    tick = time.perf_counter()
    for _ in range(reps):
        trial.feed.batch(idx)
    sync(device)
    return BlockProfile(tuple(times), tuple(sizes), (time.perf_counter() - tick) / reps, trial.plan.batch,
                        str(device), tuple(stage_costs(rule.net, trial.splits.input_shape)))


def host_link(device: torch.device, nbytes: int = 8 << 20, reps: int = 10) -> Link:
    """The link of a pipeline whose stages sit on separate devices of this kind and pass activations through
    the host, as orchestrator/pipeline.py does: a device-to-host copy on one side, host-to-device on the other
    (pageable memory). On a CPU, a memory copy. ``message_s`` is not measured here (0)."""
    x = torch.ones(nbytes // 4, device=device)
    # on a CPU .cpu() would return the tensor itself: a copy each side is what moving it between processes costs
    there_and_back = (lambda: x.cpu().to(device)) if device.type != "cpu" else (lambda: x.clone().clone())
    for _ in range(2):
        there_and_back()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tick = time.perf_counter()
    for _ in range(reps):
        there_and_back()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_side = (time.perf_counter() - tick) / reps / 2
    return Link(nbytes / per_side, 0.0)


def ray_link(sizes: tuple[int, ...] = (1 << 12, 1 << 21, 1 << 23), reps: int = 40) -> Link:
    """The link of the pipeline on this machine's Ray: two one-CPU actors, one returning a tensor of each size,
    the other taking it (the object store between them), ``reps`` messages in flight at once; the per-message
    time against the bytes, fitted by least squares: ``message_s`` + bytes / ``bytes_per_s``."""
    import tempfile
    from pathlib import Path

    from bioplaus.orchestrator import ray_local

    started = ray_local.start(Path(tempfile.mkdtemp(prefix="bp-link-")), num_cpus=2, timeout_s=180)
    try:
        import ray

        send, recv = ray.remote(num_cpus=1)(_Sender).remote(), ray.remote(num_cpus=1)(_Receiver).remote()
        points = []
        for n in sizes:
            ray.get([recv.take.remote(send.make.remote(n)) for _ in range(3)], timeout=300)
            tick = time.perf_counter()
            ray.get([recv.take.remote(send.make.remote(n)) for _ in range(reps)], timeout=600)
            points.append((n, (time.perf_counter() - tick) / reps))
    finally:
        ray_local.stop(started)
    mean_n = sum(n for n, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in points) / sum((n - mean_n) ** 2 for n, _ in points)
    return Link(1 / max(slope, 1e-15), max(0.0, mean_t - slope * mean_n))


class _Sender:
    def make(self, nbytes: int) -> torch.Tensor:
        return torch.ones(nbytes // 4)


class _Receiver:
    def take(self, x: torch.Tensor) -> int:
        return x.numel()


def prediction_lines(profile: BlockProfile, rows: list[dict]) -> list[str]:
    lines = [f"blocks (ms per micro-batch of {profile.batch} on {profile.device}): "
             + ", ".join(f"{t * 1e3:.3f}" for t in profile.compute_s) + f"; feed {profile.feed_s * 1e3:.3f} ms; "
             f"activations (KB): " + ", ".join(f"{b / 1024:.0f}" for b in profile.out_bytes),
             "| K | groups | samples/s | speed-up | efficiency | bottleneck group |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['groups']} | {r['samples_per_s']:.0f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} | "
              f"{r['bottleneck_group']} |" for r in rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bioplaus.orchestrator.pipeline_model",
                                description="predict the layer-parallel pipeline's efficiency for K = 1..8 stages")
    p.add_argument("overrides", nargs="*", help="the trial (default: rule=local_losses arch=mlp "
                                                "dataset=fashion_mnist model.widths=[1000,1000,1000,1000])")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--steps", type=int, default=210, help="micro-batches per epoch (default 210)")
    p.add_argument("--link-gbps", type=float, help="link bandwidth, GB/s per side (default: measured host copy)")
    p.add_argument("--ray-link", action="store_true", help="measure the link (and the per-message cost) through "
                                                           "this machine's Ray object store instead")
    p.add_argument("--message-ms", type=float, default=0.0, help="fixed cost per message, ms (default 0)")
    p.add_argument("--contention", type=float, default=1.0, help="slow-down of K busy workers (1: none)")
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--blocks-ms", help="use these per-block times (ms per micro-batch, comma-separated) instead "
                                       "of measuring them; activation sizes and the cut still come from the network")
    p.add_argument("--feed-ms", type=float, help="with --blocks-ms: the feed's time per batch, ms")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from bioplaus.orchestrator.calibrate import prepare
    from bioplaus.orchestrator.config import parse_overrides
    from bioplaus.orchestrator.spec import resolve

    base = ["rule=local_losses", "arch=mlp", "dataset=fashion_mnist", "model.widths=[1000,1000,1000,1000]", "out=null"]
    trial = prepare(resolve(parse_overrides([*base, *args.overrides])), args.data)
    profile = profile_blocks(trial, reps=2 if args.blocks_ms else 20)
    if args.blocks_ms:
        given = tuple(float(t) / 1e3 for t in args.blocks_ms.split(","))
        if len(given) != len(profile.compute_s):
            raise SystemExit(f"--blocks-ms gives {len(given)} times; the network has {len(profile.compute_s)} blocks")
        profile = replace(profile, compute_s=given, feed_s=(args.feed_ms or 0.0) / 1e3)
    if args.ray_link:
        link = ray_link()
    elif args.link_gbps:
        link = Link(args.link_gbps * 1e9, args.message_ms / 1e3)
    else:
        link = Link(host_link(trial.device).bytes_per_s, args.message_ms / 1e3)
    rows = predictions(profile, link, args.chunk, args.steps, args.contention)
    if args.json:
        print(json.dumps({"profile": asdict(profile), "link": asdict(link), "predictions": rows}))
    else:
        print("\n".join(prediction_lines(profile, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
