"""Layer-parallel pipelined training of block-local rules: every group of blocks learns on its own worker.

A block-local rule (``Rule.block_local``: local losses, forward-forward, SoftHebb) updates block ``i``
from block ``i``'s input alone (:meth:`Rule.block_step`), so no backward synchronisation ties the
blocks together: as soon as block ``i`` has produced its output for micro-batch ``b`` it can move on
to ``b + 1`` while block ``i + 1`` learns on ``b``. ``train.mode=pipeline train.stages=K`` runs a
trial that way (``Pipeline`` is the ``Trainer`` of orchestrator/training.py for that mode; planning
without Ray, which configs and how the stages are cut, is orchestrator/pipeline_plan.py):

* The rule's stages (hidden blocks then the output block, ``net.stages``) are cut into K contiguous
  groups of about equal cost (multiply-accumulates of one forward pass). Each group is a **Ray actor**
  holding a copy of the whole rule built exactly as the trial builds it (same seed, then loaded with
  the trial's initial weights) and using and updating only its own stages: their weights, the rule's
  state for them (auxiliary heads, ...) and their optimisers. Group 0 continues the trial's torch RNG
  stream; group k > 0 gets its own stream, seeded from the run seed and k.
* **Data-local first stage**: the driver sends only each micro-batch's training-set indices (inline in the
  call, small). Group 0 holds the training set (uint8, sent once) and builds the batches itself with the
  trial's own code (``TrainFeed``: gather, standardise, augment, continuing the trial's augmentation
  stream), on its own device; the other groups hold the labels. So images never pass through the driver
  or the object store, and the driver's per-message work is a few index slices and K calls.
* Each group applies ``block_step`` to its stages on arrival and hands the detached output (a fixed-shape
  CPU tensor, through Ray's object store) to the next group. Ray runs an actor's calls in submission
  order, so every group sees the micro-batches in data order. Micro-batches travel ``train.chunk`` to a
  message (one actor call): per-message costs (submitting the call, the driver's and the object store's
  bookkeeping) are paid once per chunk rather than once per micro-batch: on few cores they can eat the
  whole speed-up (docs/benchmarks.md). Within a message a group still updates its blocks micro-batch by
  micro-batch.
* **Staleness bound** ``train.staleness = s``: group k may start message ``b`` only once group
  k + 1 has finished ``b - s - 1`` (passed as a dependency of the call), i.e. a group runs at most s
  messages ahead of the next. s = 0 is lock-step (no overlap); the metrics record the bound and
  the observed lag (``staleness_bound``, ``staleness``: mean lag per step; ``pipeline.staleness_max``).
* **Backpressure**: the driver keeps at most ``(K - 1) * s + 2`` messages in flight (the most
  the staleness bound lets the pipeline hold, plus one queued at the entrance) and waits for the
  oldest to leave before feeding another, so the object store holds a bounded number of batches.
* **Evaluation** gathers the stages: at the end of every epoch each actor sends back the tensors its
  stages changed, the driver loads them into its own copy of the rule, and the trial evaluates,
  selects and checkpoints that rule exactly as in sequential mode (a rule's ``predict`` may combine
  all blocks, e.g. forward-forward's goodness readout, so evaluation uses the rule, not a chain).
* **Placement**: one placement-group bundle per group: one CPU each, and one GPU each when the cluster
  has K GPUs and ``train.device`` is not cpu (an equal share each when it has fewer: K stages on one
  GPU). Inside a Ray Tune trial (the sweep asks for ``trial_resources``) the trial's
  own placement group holds the bundles; elsewhere the pipeline reserves its own (starting a
  loopback-only local Ray first if none is running).

Exactness: in a block-local rule the output block ``i`` sends for micro-batch ``b`` is computed with
the weights block ``i`` has after ``b`` updates, whenever that computation happens, and each group
consumes its inputs in order; so, with a rule that draws no randomness from torch's global RNG
during training (local losses, forward-forward and SoftHebb use none or their own generators), the
pipeline computes *the same weights as sequential training* for every staleness bound, not only for
s = 0 (``tests/test_pipeline.py`` checks both). The bound trades overlap (speed) for the activations
a group must hold.

Which rules: exactly the block-local ones. Rules whose block update needs a signal from later blocks
(backprop, feedback alignment, DFA, target propagation, predictive coding, equilibrium propagation,
perturbation methods) are refused with a UsageError: they would need the later signal sent back
(a delayed broadcast for DFA), which this trainer does not implement.

Training metrics: a group reports, per micro-batch, the loss of each of its stages as the rule left
it after ``block_step`` (``Rule.block_loss``), so ``train_loss`` is the same sum the rule's
``train_step`` returns; ``correct`` is counted from the output stage's class scores.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import shutil
import tempfile
import time
import uuid
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from bioplaus.orchestrator import ray_local  # before any ray import: Ray's loopback environment
from bioplaus.orchestrator.build import build_rule, seed_everything
from bioplaus.orchestrator.config import Config
from bioplaus.orchestrator.errors import one_line
from bioplaus.orchestrator.pipeline_plan import (  # noqa: F401  (the planning names, importable from here too)
    check,
    count_stages,
    final_options,
    split_stages,
    stage_bundles,
    stage_costs,
    trial_resources,
)
from bioplaus.orchestrator.spec import resolve
from bioplaus.orchestrator.training import Trainer


class PipelineError(RuntimeError):
    """A pipeline stage failed (crashed, raised, or stopped answering); the message names the stage."""


# --- the stage worker (a Ray actor) --------------------------------------------------------------------
class StageWorker:
    """One group of consecutive stages: a full copy of the rule, of which it uses and updates its stages."""

    def __init__(self, group: int, indices: list[int], plain_cfg: dict, input_shape: tuple[int, ...],
                 num_classes: int, steps: int, init_state: dict, threads: int, use_gpu: bool, feed: Any):
        spec = resolve(OmegaConf.merge(OmegaConf.structured(Config), plain_cfg))
        seed = int(spec.cfg.seed)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        torch.set_num_threads(threads)
        seed_everything(seed, spec.cfg.train.deterministic)
        # Built as the trial builds its rule, then given the trial's initial weights (whatever device drew them).
        self.rule = build_rule(spec, input_shape, num_classes, steps, self.device)
        self.rule.load_state_dict(init_state)
        self.rule.train()
        if group > 0:  # group 0 continues the trial's own stream; the others get theirs
            torch.manual_seed(seed + 1_000_003 * group)
        self.group, self.indices = group, list(indices)
        # Group 0 builds the batches from indices (gather, standardise, augment: a TrainFeed) on its own device;
        # the others only look up labels (_Labels). Either way a message carries indices, not images.
        self.feed = feed.to(self.device)
        self.last = len(self.rule.net.stages) - 1
        self.initial = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}

    def ready(self) -> str:
        return str(self.device)

    def step(self, b: int, idxs: list[torch.Tensor], hs: list[torch.Tensor] | None, after: Any = None
             ) -> tuple[list[torch.Tensor], dict]:
        """``block_step`` of this group's stages on the micro-batches of message ``b`` (their training-set
        indices ``idxs``; ``hs``: the previous group's outputs, None for group 0, which builds the inputs), in
        order; ``after`` (ignored) is the token of the next group's message ``b - s - 1``, which Ray resolves
        first: that enforces the staleness bound."""
        # busy wall minus process CPU time = time descheduled; process minus this thread's CPU time = what the
        # actor's other threads burned while this stage computed (Ray's; also torch's intra-op pool if threads > 1)
        t0, cpu0, thread0 = time.time(), time.process_time(), time.thread_time()
        rule = self.rule
        outs, losses, correct = [], [], []  # per micro-batch; losses per stage, summed by the driver in stage
        for m, idx in enumerate(idxs):      # order: the same float32 sum as train_step's
            if hs is None:
                h, y = self.feed.batch(idx)
            else:
                h, y = hs[m].to(self.device), self.feed.labels(idx)
            mine, right = [], None
            for i in self.indices:
                h = rule.block_step(i, h, y)
                loss = rule.block_loss(i)
                if loss is not None:
                    mine.append(loss.detach().cpu())
                if i == self.last and h.dim() == 2 and h.shape == (len(y), rule.info.num_classes):
                    right = int((h.argmax(1) == y).sum().item())
            outs.append(h.detach().cpu())
            losses.append(mine)
            correct.append(right)
        return outs, {"b": b, "losses": losses, "correct": correct, "t0": t0, "t1": time.time(),
                      "cpu": time.process_time() - cpu0, "thread_cpu": time.thread_time() - thread0}

    def changed(self) -> dict[str, torch.Tensor]:
        """The state tensors this group has changed since the start (CPU copies)."""
        return {k: v.detach().cpu().clone() for k, v in self.rule.state_dict().items()
                if not torch.equal(v, self.initial[k])}


class _Labels:
    """What a group after the first needs of the training set: its labels."""

    def __init__(self, train_y: torch.Tensor):
        self.train_y = train_y

    def to(self, device: torch.device) -> "_Labels":
        return _Labels(self.train_y.to(device))

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.train_y[idx.to(self.train_y.device)]


# --- the driver side ------------------------------------------------------------------------------------
class Pipeline(Trainer):
    """K stage actors fed by the trial's driver; ``train_epoch`` yields each micro-batch's metrics in order."""

    def __init__(self, rule, plain_cfg: dict, input_shape: tuple[int, ...], num_classes: int, steps: int,
                 feed: Any, start_timeout_s: float = 180.0, step_timeout_s: float = 600.0,
                 grant_timeout_s: float = 3600.0):
        import ray
        from ray.util.placement_group import remove_placement_group

        t = plain_cfg["train"]
        self.k, self.s = int(t["stages"]), int(t["staleness"])
        self.chunk = int(t.get("chunk") or 1)
        self.max_in_flight = (self.k - 1) * self.s + 2
        self.step_timeout_s = step_timeout_s
        self.groups = split_stages(stage_costs(rule.net, input_shape), self.k)
        self._remove_pg = remove_placement_group
        self._tmp: str | None = None
        self._started: dict | None = None
        self._own_pg = None
        self.actors: list = []
        if not ray.is_initialized():  # a plain `bioplaus train`: a loopback-only Ray of our own, one CPU per group
            self._tmp = tempfile.mkdtemp(prefix="bp-pipe-")
            self._started = ray_local.start(Path(self._tmp), num_cpus=self.k, timeout_s=start_timeout_s)
        try:
            pg, first, specs = self._reserve(t["device"], start_timeout_s, grant_timeout_s)
            self._start_actors(pg, first, specs, rule, plain_cfg, tuple(input_shape), num_classes, steps, feed)
            self.devices = self._get([a.ready.remote() for a in self.actors], start_timeout_s, "start")
        except BaseException:
            self.close()
            raise
        self.lags: list[int] = []
        self.busy = [0.0] * self.k
        self.cpu = [0.0] * self.k
        self.thread_cpu = [0.0] * self.k
        self.epoch_wall = 0.0

    def _reserve(self, device: str, start_timeout_s: float, grant_timeout_s: float) -> tuple[Any, int, list]:
        """(placement group, index of its first stage bundle, the stage bundles): a Tune trial's own group, or
        one reserved here and granted within the timeout."""
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group

        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) >= self.k + 1:  # a Tune trial's group
            return current, 1, current.bundle_specs[1:self.k + 1]
        specs = stage_bundles(self.k, ray.cluster_resources().get("GPU", 0), device)
        pg = self._own_pg = placement_group(specs, strategy="PACK")
        # Our own Ray has the resources at once; in a shared one (a sweep's finals) others may hold them.
        wait_s = start_timeout_s if self._started is not None else grant_timeout_s
        ready, _ = ray.wait([pg.ready()], timeout=wait_s)
        if not ready:
            raise PipelineError(f"the pipeline's {self.k} stage bundles {specs[0]} were not granted within "
                                f"{wait_s:.0f}s; free resources or lower train.stages")
        return pg, 0, specs

    def _start_actors(self, pg: Any, first: int, specs: list, rule, plain_cfg: dict, input_shape: tuple[int, ...],
                      num_classes: int, steps: int, feed: Any) -> None:
        """One StageWorker per group in its bundle (``specs[g]`` at index ``first + g`` of ``pg``), each given
        the rule's initial weights and its feed."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        init = ray.put({k: v.detach().cpu() for k, v in rule.state_dict().items()})
        # The training set goes to group 0 once (uint8, through the object store), the labels to the others;
        # group 0 continues the trial's augmentation stream, which the driver then never draws from.
        feeds = [ray.put(copy.copy(feed).to(torch.device("cpu")))]
        feeds += [ray.put(_Labels(feed.train_y.cpu()))] * (self.k - 1)
        threads = int(plain_cfg["train"].get("threads") or 1)  # one thread per stage unless told otherwise
        worker = ray.remote(StageWorker)
        tag = uuid.uuid4().hex[:8]
        self.names = [f"bioplaus-pipeline-{tag}-stage{g}" for g in range(self.k)]
        for g, indices in enumerate(self.groups):
            spec = specs[g]
            self.actors.append(worker.options(
                name=self.names[g], num_cpus=spec.get("CPU", 0), num_gpus=spec.get("GPU", 0), max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first + g),
            ).remote(g, indices, plain_cfg, input_shape, num_classes, steps, init, threads,
                     bool(spec.get("GPU", 0)), feeds[g]))

    def _describe(self, g: int) -> str:
        blocks = ", ".join(map(str, self.groups[g]))
        return f"pipeline stage {g} (stages {blocks} of the network, actor {self.names[g]})"

    def _get(self, refs: list, timeout_s: float, what: str) -> list:
        """``ray.get`` of one ref per group, bounded in time; a failure names the first stage that failed."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        out = []
        deadline = time.monotonic() + timeout_s
        for g, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except GetTimeoutError:
                raise PipelineError(f"{self._describe(g)} did not finish its {what} within {timeout_s:.0f}s") from None
            except RayActorError as e:
                raise PipelineError(f"{self._describe(g)} died during its {what}: {one_line(e, 300)}") from None
            except RayError as e:
                raise PipelineError(f"{self._describe(g)} failed during its {what}: {one_line(e, 300)}") from None
        return out

    def train_epoch(self, batch_indices: Iterable[torch.Tensor]) -> Iterator[dict[str, Any]]:
        """Send the batches' training-set indices through the stages (group 0 builds the batches); yield each
        micro-batch's metrics (``loss``, ``correct``, ``staleness``, ``staleness_bound``) in batch order, as
        they leave the last stage."""

        k, s = self.k, self.s
        pending: deque = deque()
        tokens: dict[tuple[int, int], Any] = {}
        ends: list[list[float]] = [[] for _ in range(k)]  # completion times of each group, in message order
        tick = time.time()
        batch_indices = iter(batch_indices)
        for b in itertools.count():  # message b carries micro-batches b*chunk ... b*chunk + chunk - 1
            idxs = [idx.cpu() for idx in itertools.islice(batch_indices, self.chunk)]  # small: sent inline
            if not idxs:
                break
            while len(pending) >= self.max_in_flight:  # backpressure: wait for the oldest message to leave
                yield from self._finish(pending.popleft(), ends)
            h, refs = None, []
            for g, actor in enumerate(self.actors):
                after = tokens.pop((g + 1, b - s - 1), None)  # the next group has finished b - s - 1
                h, token = actor.step.options(num_returns=2).remote(b, idxs, h, after)
                tokens[(g, b)] = token
                refs.append(token)
            tokens.pop((0, b - s - 1), None)  # group 0's tokens are nobody's dependency
            pending.append(refs)
        while pending:
            yield from self._finish(pending.popleft(), ends)
        self.epoch_wall += time.time() - tick

    def _finish(self, refs: list, ends: list[list[float]]) -> Iterator[dict[str, Any]]:
        """The metrics of each micro-batch of one message, once every group has processed it."""
        tokens = self._get(refs, self.step_timeout_s, "micro-batch")
        b = tokens[0]["b"]
        lag = 0
        for g, tok in enumerate(tokens):
            ends[g].append(tok["t1"])
            self.busy[g] += tok["t1"] - tok["t0"]
            self.cpu[g] += tok["cpu"]
            self.thread_cpu[g] += tok["thread_cpu"]
            if g + 1 < len(tokens):  # how many micro-batches group g+1 had not finished when g started b
                lag = max(lag, b - bisect_right(ends[g + 1], tok["t0"]))
        self.lags.append(lag)
        for m in range(len(tokens[0]["losses"])):
            out = {"loss": sum(v for tok in tokens for v in tok["losses"][m]), "staleness": float(lag),
                   "staleness_bound": float(self.s)}
            if tokens[-1]["correct"][m] is not None:
                out["correct"] = tokens[-1]["correct"][m]
            yield out

    def sync(self, rule) -> None:
        """Gather the stages: load every group's changed tensors into ``rule`` (the driver's copy); a tensor
        changed by two groups means the rule's stages share state, which a pipeline cannot split."""
        changed = self._get([a.changed.remote() for a in self.actors], self.step_timeout_s, "state gathering")
        state = rule.state_dict()
        owner: dict[str, int] = {}
        for g, tensors in enumerate(changed):
            for key, value in tensors.items():
                if key in owner:
                    raise PipelineError(f"state {key!r} was changed by pipeline stages {owner[key]} and {g}: rule "
                                        f"{type(rule).__name__} shares state across stages and cannot be pipelined")
                owner[key] = g
                state[key] = value.to(state[key].device)
        rule.load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        return {"stages": self.k, "groups": self.groups, "devices": list(self.devices),
                "staleness_bound": self.s, "chunk": self.chunk, "max_in_flight": self.max_in_flight,
                "staleness_max": max(self.lags, default=0),
                "staleness_mean": sum(self.lags) / len(self.lags) if self.lags else 0.0,
                "stage_busy_seconds": self.busy, "stage_cpu_seconds": self.cpu,
                "stage_thread_cpu_seconds": self.thread_cpu, "wall_seconds": self.epoch_wall,
                "stage_utilisation": [b / self.epoch_wall if self.epoch_wall > 0 else float("nan") for b in self.busy]}

    def close(self) -> None:
        """Kill the actors, release the placement group, stop Ray if this pipeline started it."""
        import ray

        if ray.is_initialized():
            for actor in self.actors:
                with contextlib.suppress(Exception):  # already dead: nothing to release
                    ray.kill(actor, no_restart=True)
            if self._own_pg is not None:
                with contextlib.suppress(Exception):
                    self._remove_pg(self._own_pg)
        self.actors = []
        self._own_pg = None
        if self._started is not None:
            ray_local.stop(self._started)
            self._started = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
