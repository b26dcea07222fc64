"""Local readouts of perturbation-trained blocks: which units share a local loss.

Shared by the perturbation rules (node_perturbation, weight_perturbation, forward_gradient): each
block's units are split into groups (Ren et al. 2023), each group with its own copy of the block's
local classifier loss, which keeps the variance of the gradient estimates low.
"""

from __future__ import annotations

import torch
from torch import nn

from bioplaus.algorithms.arch import Network
from bioplaus.algorithms.rule import Rule, RunInfo, make_optimizer


def _cells(size: int, cells: int) -> torch.Tensor:
    """Which of ``cells`` equal, non-overlapping bands each of ``size`` rows falls into."""
    return torch.arange(size) * cells // size


def local_layout(net: Network, group_size: int, readout_pool: int) -> list[dict]:
    """Per stage, how its activity maps onto local-loss groups and readout features.

    ``unit_group`` (shape of the layer output z): the group of each unit; ``feature_group``: the group of
    each readout feature; ``channel_group``: the channel group of each channel, whose groups are numbered
    ``channel_group * cells + cell``; ``rows``/``cols``: band-averaging matrices of conv readouts (None for
    dense blocks). The output block: one group per logit, its logits as features.
    """
    param = next(net.parameters())
    was_training = net.training
    net.eval()
    layout = []
    with torch.no_grad():
        h = torch.zeros((1, *net.input_shape), device=param.device, dtype=param.dtype)
        for i, stage in enumerate(net.stages):
            z = stage.preact(h)
            h = stage.post(z)
            channels = z.shape[1]
            if i == len(net.stages) - 1:
                unit = torch.arange(channels)
                layout.append({"unit_group": unit, "feature_group": unit, "channel_group": unit,
                               "n_groups": channels, "cells": 1, "rows": None, "cols": None})
                continue
            channel_group = torch.arange(channels) // min(group_size, channels)
            n_channel_groups = int(channel_group[-1]) + 1
            if z.dim() == 2:
                layout.append({"unit_group": channel_group, "feature_group": channel_group,
                               "channel_group": channel_group, "n_groups": n_channel_groups, "cells": 1,
                               "rows": None, "cols": None})
                continue
            (hz, wz), (hh, wh) = z.shape[2:], h.shape[2:]
            pool = min(readout_pool, hh, wh)
            rows = (_cells(hh, pool)[None, :] == torch.arange(pool)[:, None]).float()
            cols = (_cells(wh, pool)[None, :] == torch.arange(pool)[:, None]).float()
            rows, cols = rows / rows.sum(1, keepdim=True), cols / cols.sum(1, keepdim=True)
            # A unit of z lies in the output cell its pooled position falls into (rows cut off by the
            # block's pooling affect nothing and are given the last cell).
            zy = _cells(hh, pool)[(torch.arange(hz) // (hz // hh)).clamp(max=hh - 1)]
            zx = _cells(wh, pool)[(torch.arange(wz) // (wz // wh)).clamp(max=wh - 1)]
            cell = zy[:, None] * pool + zx[None, :]
            unit = channel_group[:, None, None] * pool * pool + cell[None]
            feature = (channel_group[:, None] * pool * pool + torch.arange(pool * pool)[None]).flatten()
            layout.append({"unit_group": unit, "feature_group": feature, "channel_group": channel_group,
                           "n_groups": n_channel_groups * pool * pool, "cells": pool * pool,
                           "rows": rows.to(param.dtype), "cols": cols.to(param.dtype)})
    net.train(was_training)
    return layout


def attach_local_readouts(rule: Rule, hp, info: RunInfo) -> None:
    """Give a perturbation rule its local losses: the group layout (``_n_groups``, ``_cells``, ``_one_per_group``, the
    per-stage buffers ``unit_group<i>``, ``feature_group<i>``, ``channel_group<i>``, ``rows<i>``,
    ``cols<i>``), ``eye``, one linear readout per hidden block (``readouts``) and one optimiser per
    stage (``opts``: a block's update is self-contained, Adam state included)."""
    net = rule.net
    layout = local_layout(net, hp.group_size, hp.readout_pool)
    rule._n_groups = [stage["n_groups"] for stage in layout]
    rule._cells = [stage["cells"] for stage in layout]
    # Groups of one feature each, in order (dense blocks with group_size 1, the output block): nothing to sum.
    rule._one_per_group = [torch.equal(stage["feature_group"], torch.arange(stage["n_groups"])) for stage in layout]
    # Layout tensors as non-persistent buffers: they follow .to(device) and are rebuilt from the config.
    for i, stage in enumerate(layout):
        for key in ("unit_group", "feature_group", "channel_group", "rows", "cols"):
            rule.register_buffer(f"{key}{i}", stage[key], persistent=False)
    rule.register_buffer("eye", torch.eye(info.num_classes), persistent=False)
    # Local readouts of the hidden blocks (the output block's "readout" is the identity).
    rule.readouts = nn.ModuleList(nn.Linear(len(stage["feature_group"]), info.num_classes)
                                  for stage in layout[:-1])
    total = info.epochs * info.steps_per_epoch
    rule.opts = []
    for i, stage in enumerate(net.stages):
        params = list(stage.parameters()) + (list(rule.readouts[i].parameters()) if i < len(layout) - 1 else [])
        rule.opts.append(make_optimizer(params, hp, total))
