"""What the perturbation rules (node_perturbation, weight_perturbation, forward_gradient) share.

Each of them updates a block from an estimate of its local loss's gradient and never runs autograd
through the network. This module owns the base class that gives them their local readouts and the
rule contract, the view of one stage's update (:class:`StageUpdate`: the single evaluation of its
weight layer, its local-loss layout, the readout's delta rule and the optimiser step), and the two
functional helpers the estimators are built from (:func:`post`, :func:`weight_grad`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bioplaus.algorithms.arch import Block, Network
from bioplaus.algorithms.forward_reads import forward_weight
from bioplaus.algorithms.local_readout import attach_local_readouts
from bioplaus.algorithms.rule import (BlockLocalRule, RunInfo, output_error, set_delta_rule_grads,
                                      validate_hparams)


def post(block: Block, u: torch.Tensor, norm_params: dict[str, torch.Tensor],
         keep_stats: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``block.post(u)`` with the norm's parameters passed in; returns (output, updated running stats).

    The running statistics are updated on clones and copied into the block only if ``keep_stats``:
    the perturbed copies must not move them, and the transforms of torch.func refuse in-place updates
    of captured buffers anyway (a caller inside ``jvp`` keeps them itself, outside it).
    """
    stats = {k: b.clone() for k, b in block.norm.named_buffers()}
    n = functional_call(block.norm, {**norm_params, **stats}, (u,))
    if keep_stats:
        for name, buf in block.norm.named_buffers():
            buf.copy_(stats[name])
    return block.pool(block.act(n)), stats


def weight_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Batch-summed weight gradient of a Linear/Conv2d from its input and an output gradient (local)."""
    if isinstance(layer, nn.Linear):
        return g.t() @ x
    if isinstance(layer, nn.Conv2d):
        return torch.nn.grad.conv2d_weight(x, layer.weight.shape, g, layer.stride, layer.padding,
                                           layer.dilation, layer.groups)
    raise TypeError(f"perturbation rules support Linear and Conv2d layers, not {type(layer).__name__}")


class StageUpdate:
    """One step's update of stage ``i`` of a :class:`PerturbationRule` from its input ``h_in`` and labels ``y``.

    Construction evaluates the weight layer, the only time this step: ``x`` (its input) and ``z`` (its
    output). The estimator then fills ``h`` (the clean output, sent on), ``feats`` (the local readout's
    input) and ``logits`` (the local loss's logits), sets the layer's gradients and calls :meth:`finish`.
    """

    def __init__(self, rule: PerturbationRule, i: int, h_in: torch.Tensor, y: torch.Tensor):
        self.y = y
        self.stage = stage = rule.net.stages[i]
        self.is_head = i == len(rule.net.stages) - 1
        self.unit_group = getattr(rule, f"unit_group{i}")
        self.feature_group = getattr(rule, f"feature_group{i}")
        self.channel_group = getattr(rule, f"channel_group{i}")
        self.rows, self.cols = getattr(rule, f"rows{i}"), getattr(rule, f"cols{i}")
        self.n_groups, self.cells = rule._n_groups[i], rule._cells[i]
        self.opt = rule.opts[i]
        self.x = stage.pre(h_in)
        self.z = stage.layer(self.x)  # the only evaluation of the weight layer this step
        self.batch = self.z.shape[0]
        self.norm = {k: p.detach() for k, p in stage.norm.named_parameters()}
        self.readout = None if self.is_head else rule.readouts[i]
        # The readout's weights as its forward evaluations read them (the output block's readout: identity).
        self.weight = rule.eye if self.is_head else forward_weight(self.readout.weight)
        self.one_per_group = rule._one_per_group[i]
        self.h: torch.Tensor | None = None
        self.feats: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.probs: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The local readout's input: the output itself (dense blocks) or its band averages (conv blocks)."""
        if self.rows is None:
            return h.flatten(1)
        return torch.einsum("bchw,ph,qw->bcpq", h, self.rows, self.cols).flatten(1)

    def clean_pass(self) -> None:
        """The clean output (running statistics kept: one pass per step), its features, local logits and
        their softmax (what every group's copy of the local loss is measured from)."""
        self.h, _ = post(self.stage, self.z, self.norm, keep_stats=True)
        self.feats = self.features(self.h)
        self.logits = self.feats if self.is_head else self.readout(self.feats)
        self.probs = self.logits.softmax(1)

    def group_loss_changes(self, u: torch.Tensor, norm_params: dict[str, torch.Tensor]) -> torch.Tensor:
        """[batch, group]: for weight-layer output ``u``, each group's copy of the local cross-entropy minus the
        clean one, where a copy sees only its own features' change from the clean ones (after :meth:`clean_pass`).

        With ``s`` a copy's logit shift and ``p`` the clean softmax, CE(l + s) - CE(l) = log sum_c p_c e^(s_c) - s_y:
        computed from the shifts alone, laid out [batch, class, group] so the sums over the few classes run
        across the many groups at once (a cross-entropy per row of 10 logits is the slow case of the kernel),
        and without subtracting two losses of order log(classes) whose difference is of order sigma."""
        change = self.features(post(self.stage, u, norm_params)[0]) - self.feats
        # [batch, class, feature] products, then [batch, class, group] shifts, in buffers reused across the step's
        # evaluations (fresh allocations of this size cost more than the arithmetic on them).
        contrib = self._buffer("contrib", (self.batch, self.weight.shape[0], change.shape[1]), change)
        torch.mul(change.unsqueeze(1), self.weight.unsqueeze(0), out=contrib)
        shift = contrib
        if not self.one_per_group:
            shift = self._buffer("shift", (self.batch, self.weight.shape[0], self.n_groups), change).zero_()
            shift.index_add_(2, self.feature_group, contrib)
        label = self.y.view(-1, 1, 1).expand(-1, 1, self.n_groups)
        at_label = shift.gather(1, label).squeeze(1)
        top = shift.amax(1, keepdim=True)  # no overflow in exp, however large a shift
        mixed = shift.sub_(top).exp_().mul_(self.probs.unsqueeze(2)).sum(1).log_().add_(top.squeeze(1))
        return mixed - at_label

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A scratch tensor of ``shape``, allocated on first use and reused by this step's later evaluations."""
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = like.new_empty(shape)
        return buf

    def loss_change(self, dz: torch.Tensor, d_norm: dict[str, torch.Tensor], sigma: float) -> torch.Tensor:
        """[batch, group]: each group's loss change along (``dz`` in the weight layer's output, ``d_norm`` in
        the norm's parameters), ``(L+ - L-) / (2 sigma)`` from the antithetic pair ``+-sigma``."""
        norm = self.norm
        plus = self.group_loss_changes(self.z + sigma * dz, {n: p + sigma * d_norm[n] for n, p in norm.items()})
        minus = self.group_loss_changes(self.z - sigma * dz, {n: p - sigma * d_norm[n] for n, p in norm.items()})
        return (plus - minus) / (2 * sigma)

    def per_channel(self, change: torch.Tensor) -> torch.Tensor:
        """[batch, group] -> [batch, channel]: a channel's parameters move its features in every cell, so
        its change is the sum of those cells' groups."""
        return change.view(self.batch, -1, self.cells).sum(2)[:, self.channel_group]

    def set_layer_grads(self, g_z: torch.Tensor, perturbations: int) -> None:
        """The weight layer's gradients from ``g_z``, the sum over ``perturbations`` estimates of dL/dz."""
        layer = self.stage.layer
        scale = 1.0 / (perturbations * self.batch)
        layer.weight.grad = weight_grad(layer, self.x, g_z) * scale
        if layer.bias is not None:
            not_channel = [dim for dim in range(self.z.dim()) if dim != 1]
            layer.bias.grad = g_z.sum(not_channel) * scale

    def finish(self, g_norm: dict[str, torch.Tensor], perturbations: int,
               err: torch.Tensor | None = None) -> None:
        """The norm's gradients (``g_norm``: sums over ``perturbations`` estimates), the readout's delta rule
        on the clean features (``err``: :func:`output_error` of the local logits, computed here if not
        given), then the optimiser step."""
        if err is None:
            err = output_error(self.logits, self.y)
        for n, p in self.stage.norm.named_parameters():
            p.grad = g_norm[n] / perturbations
        if self.readout is not None:
            set_delta_rule_grads(self.readout, self.feats, err)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class PerturbationRule(BlockLocalRule):
    """Base of the perturbation rules: local readouts and one optimiser per stage
    (:func:`~bioplaus.algorithms.local_readout.attach_local_readouts`); subclasses implement
    :meth:`block_step` with a :class:`StageUpdate`, returning the stage's clean output."""

    def __init__(self, net: Network, hp: Any, info: RunInfo):
        super().__init__(net, hp, info)
        validate_hparams(type(self), hp)
        hp.validate()
        attach_local_readouts(self, hp, info)

    def local_heads(self) -> dict[int, list[nn.Module]]:
        return {i: [readout] for i, readout in enumerate(self.readouts)}

    def step_metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        # The output block's clean output is its local loss's logits (its readout is the identity).
        return {"loss": F.cross_entropy(out, y), "correct": (out.argmax(1) == y).sum()}
