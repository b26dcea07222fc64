"""Planning a layer-parallel pipeline, without Ray: which configs can be pipelined, how the stages are cut
into groups of about equal cost, and what resources the groups ask for.

``resolve`` (orchestrator/spec.py) runs :func:`check` before any work; the pipeline trainer
(orchestrator/pipeline.py) cuts the network with :func:`stage_costs` and :func:`split_stages`; a sweep asks
Ray Tune for :func:`trial_resources` and its final runs for :func:`final_options`.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from bioplaus.orchestrator.errors import UsageError


def count_stages(model_cfg: Any) -> int:
    """Number of stages (hidden blocks + output block) of an architecture config, without building it."""
    if hasattr(model_cfg, "blocks_per_stage"):  # residual networks: a stem, the residual blocks, the head
        return 1 + len(model_cfg.channels) * model_cfg.blocks_per_stage + 1
    for name in ("widths", "channels"):
        if hasattr(model_cfg, name):
            return len(getattr(model_cfg, name)) + 1
    raise UsageError(f"train.mode=pipeline: cannot count the blocks of {type(model_cfg).__name__}")


def check(rule_cls: type, rule_name: str, model_cfg: Any, stages: int, staleness: int) -> None:
    """``resolve``'s checks of a pipeline config; UsageError (one line) naming the problem."""
    if not getattr(rule_cls, "block_local", False):
        raise UsageError(f"train.mode=pipeline needs a block-local rule (one whose block updates need nothing from "
                         f"later blocks); {rule_name!r} is not: use train.mode=sequential")
    n = count_stages(model_cfg)
    if not 1 <= stages <= n:
        raise UsageError(f"train.stages={stages} must be between 1 and the network's {n} stages "
                         f"(hidden blocks + output block)")
    if staleness < 0:
        raise UsageError(f"train.staleness={staleness} must be >= 0")


def stage_costs(net: nn.Module, input_shape: tuple[int, ...]) -> list[float]:
    """Multiply-accumulates of one forward pass of one sample through each stage (a balancing proxy)."""
    costs: list[float] = []
    h = torch.zeros((1, *input_shape), device=next(net.parameters()).device)
    was = net.training
    net.eval()
    with torch.no_grad():
        for stage in net.stages:
            macs = [0.0]

            def hook(mod, inp, out, macs=macs):
                if isinstance(mod, nn.Linear):
                    macs[0] += mod.in_features * mod.out_features
                elif isinstance(mod, nn.Conv2d):
                    macs[0] += out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] / mod.groups

            handles = [m.register_forward_hook(hook) for m in stage.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            h = stage(h)
            for handle in handles:
                handle.remove()
            costs.append(max(macs[0], 1.0))
    net.train(was)
    return costs


def split_stages(costs: list[float], k: int) -> list[list[int]]:
    """Cut stages 0..n-1 into k contiguous non-empty groups minimising the costliest group (exhaustive)."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} stages into {k} groups")
    best, best_cuts = float("inf"), ()
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        if worst < best:
            best, best_cuts = worst, cuts
    bounds = (0, *best_cuts, n)
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]


def trial_resources(train_cfg: Any, cpus: float, gpus: float):
    """What a sweep's tuning trial asks Ray Tune for: the usual dict, or for a pipelined trial a placement
    group of a small bundle for the trial's driver (it only feeds batches) plus one bundle per stage group."""
    if getattr(train_cfg, "mode", "sequential") != "pipeline":
        return {"cpu": cpus, "gpu": gpus}
    from ray import tune

    return tune.PlacementGroupFactory([{"CPU": 0.01}] + [_bundle(cpus, gpus)] * int(train_cfg.stages))


def final_options(train_cfg: Any, cpus: float, gpus: float) -> dict:
    """Ray task options of a sweep's final run: a pipelined run's driver asks for almost nothing and reserves
    its stage bundles itself (a placement group is reserved all at once, so waiting finals cannot deadlock)."""
    if getattr(train_cfg, "mode", "sequential") != "pipeline":
        return {"num_cpus": cpus, "num_gpus": gpus}
    return {"num_cpus": 0.01, "num_gpus": 0}


def stage_bundles(k: int, cluster_gpus: float, device: str) -> list[dict]:
    """One placement-group bundle per stage group when the pipeline reserves its own: one CPU each, plus a GPU
    each when the cluster has ``k`` of them, or an equal share of fewer (``k`` stages on a one-GPU machine
    share it, 1/k each: a whole GPU per stage could never be granted there and the start would time out)."""
    if device == "cpu" or cluster_gpus <= 0:
        return [_bundle(1, 0)] * k
    return [_bundle(1, min(1.0, cluster_gpus / k))] * k


def _bundle(cpus: float, gpus: float) -> dict:
    return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
