"""Forward gradient with activity perturbation and local losses (Ren, Kornblith, Liao & Hinton 2023,
"Scaling forward gradient with local losses", ICLR; forward gradient: Baydin et al. 2022).

Per block, per step:

1. The weight layer runs once: ``z = W x`` (the block's activity).
2. A random tangent ``v`` (one Gaussian vector per example) is pushed forward through the rest of the
   block and its local readout with forward-mode AD (``torch.func.jvp``): the directional derivative
   ``d = dL/dz . v`` arrives together with the clean activity, in the same single forward pass.
3. ``d * v`` is an unbiased estimate of ``dL/dz`` ("FG-A", activity perturbation). The weight gradient
   follows from it exactly and locally, as the outer product with the block's input
   (``sum_b g_b x_b^T``); no reverse-mode autograd ever runs through the network.

Variance control, without which a forward gradient does not learn beyond toy sizes (the variance of
``d v`` grows with the number of perturbed units feeding one loss):

* local losses: every hidden block has its own linear readout to the classes (rule state, not part
  of the network), trained by the delta rule on the block's pooled output; the estimate for a block
  therefore covers that block only, never the whole network;
* groups: a block's units are split into groups (``group_size`` units, or channels times one of the
  readout's ``readout_pool`` x ``readout_pool`` spatial cells in conv blocks); each group has its own copy
  of the local loss in which only its own features are live (the other groups' features enter at their
  clean value, Ren et al.'s "feature aggregation"). The losses' value is unchanged and their live
  gradients sum to the full local gradient, but the noise of one group no longer enters another
  group's estimate: the variance scales with the group size instead of the block size;
* the output block's cross-entropy is split the same way, one group per logit;
* ``perturbations`` tangents per step are averaged.

Normalisation parameters (gain and bias of batch/layer norm) receive their own tangents in the same
``jvp`` (weight perturbation; they are few). With batch norm, each example's estimate keeps only that
example's own path (the batch-statistics coupling between examples is dropped from the estimator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from bioplaus.algorithms.arch import Block, Network
from bioplaus.algorithms.local_readout import attach_local_readouts
from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import Benchmark, Claim, OptimHParams, Rule, RunInfo, validate_hparams

_TESTS = "tests/test_perturbation.py"


@dataclass
class ForwardGradientHParams(OptimHParams):
    """Forward gradient (activity perturbation, local losses); optimiser fields as in OptimHParams."""

    perturbations: int = 2
    """Random tangents per block and step; their estimates are averaged (variance falls as 1/K)."""
    group_size: int = 8
    """Units (dense blocks) or channels (conv blocks, per spatial cell) per local-loss group."""
    readout_pool: int = 4
    """Conv blocks: the local readout sees the block output averaged over this many cells per side
    (at most the output size), and each cell is a separate local-loss group."""

    def validate(self) -> None:
        """Raise ValueError naming the field if a value is out of range."""
        for name in ("perturbations", "group_size", "readout_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"hp.{name}={getattr(self, name)} must be >= 1")


def _post(block: Block, u: torch.Tensor, norm_params: dict[str, torch.Tensor]):
    """``block.post(u)`` with the norm's parameters passed in; returns (output, updated running stats).

    The running statistics are updated on clones, so a caller decides whether to keep them (the
    transforms of torch.func refuse in-place updates of captured buffers anyway).
    """
    stats = {k: b.clone() for k, b in block.norm.named_buffers()}
    n = functional_call(block.norm, {**norm_params, **stats}, (u,))
    return block.pool(block.act(n)), stats


def _weight_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Batch-summed weight gradient of a Linear/Conv2d from its input and an output gradient (local)."""
    if isinstance(layer, nn.Linear):
        return g.t() @ x
    if isinstance(layer, nn.Conv2d):
        return torch.nn.grad.conv2d_weight(x, layer.weight.shape, g, layer.stride, layer.padding,
                                           layer.dilation, layer.groups)
    raise TypeError(f"forward_gradient supports Linear and Conv2d layers, not {type(layer).__name__}")


_RESIDUAL = ("not supported: the perturbation helpers perturb one weight layer and one norm per block, and a "
             "residual block has two or three convs and norms inside its preact; not implemented")


@register
class ForwardGradient(Rule):
    name = "forward_gradient"
    summary = ("forward-mode directional derivatives (jvp) of local block losses along random activity "
               "perturbations (Ren et al. 2023); no reverse-mode pass")
    HParams = ForwardGradientHParams
    archs = {"mlp": None, "cnn": None, "deep_cnn": None, "resnet20": _RESIDUAL, "resnet18": _RESIDUAL}
    block_local = True
    criteria = {
        "C1": Claim(True, "tangents only flow forward through a block's own post and readout; a block's update "
                    "never reads a later block's weights", f"{_TESTS}::test_update_ignores_later_blocks"),
        "C2": Claim(True, "each block learns from its own local loss: its input, its activity, its readout's "
                    "error; nothing is chained through later blocks", f"{_TESTS}::test_update_ignores_later_blocks"),
        "C3": Claim(True, "each weight layer runs once; forward mode carries the tangents along through the block's "
                    "own post and readout, with no backward sweep or second pass through the network",
                    f"{_TESTS}::test_single_forward_no_backward"),
        "C4": Claim(False, "hidden blocks' local losses are the label cross-entropy of their readouts",
                    "tests/test_criteria.py::test_claims_match_probes[forward_gradient]"),
    }
    benchmarks = (
        Benchmark("mlp", "mnist", 0.95, ("train.epochs=15", "hp.lr=2e-3", "hp.schedule=cosine", "hp.group_size=4"),
                  "issue 3 target; 10,000 training images in ../shared/data"),
        Benchmark("mlp", "fashion_mnist", 0.85, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 table, no issue target: 2-3 points under the measured 0.8708"),
        Benchmark("cnn", "fashion_mnist", 0.84, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 table, no issue target: 2-3 points under the measured 0.8616"),
        Benchmark("cnn", "cifar10", 0.59, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 table, no issue target: 2-3 points under the measured 0.6170"),
    )

    def __init__(self, net: Network, hp: ForwardGradientHParams, info: RunInfo):
        super().__init__(net, hp, info)
        validate_hparams(type(self), hp)
        hp.validate()
        attach_local_readouts(self, hp, info)

    # --- one block -------------------------------------------------------------------------------
    @torch.no_grad()
    def _update(self, i: int, h_in: torch.Tensor, y: torch.Tensor):
        """Update stage ``i`` from its input and the labels; return (its clean output, its local loss logits)."""
        stage = self.net.stages[i]
        is_head = i == len(self.net.stages) - 1
        unit_group, feature_group = getattr(self, f"unit_group{i}"), getattr(self, f"feature_group{i}")
        channel_group = getattr(self, f"channel_group{i}")
        rows, cols = getattr(self, f"rows{i}"), getattr(self, f"cols{i}")
        n_groups = self._n_groups[i]
        x = stage.pre(h_in)
        z = stage.layer(x)  # the only evaluation of the weight layer this step
        norm = {k: p.detach() for k, p in stage.norm.named_parameters()}
        readout = None if is_head else self.readouts[i]
        weight = self.eye if is_head else readout.weight  # the output block's readout is the identity

        def block_and_features(u, p):
            h, stats = _post(stage, u, p)
            feats = h.flatten(1) if rows is None else torch.einsum("bchw,ph,qw->bcpq", h, rows, cols).flatten(1)
            return (h, feats), stats

        batch = z.shape[0]
        g_z = torch.zeros_like(z)
        g_norm = {k: torch.zeros_like(p) for k, p in norm.items()}
        for k in range(self.hp.perturbations):
            v = torch.randn_like(z)
            v_norm = {n: torch.randn_like(p) for n, p in norm.items()}
            (h_k, a), (_, a_dot), stats = jvp(block_and_features, (z, norm), (v, v_norm), has_aux=True)
            if k == 0:  # the clean pass of this step: keep its output and its running statistics
                h, feats = h_k, a
                for name, buf in stage.norm.named_buffers():
                    buf.copy_(stats[name])
                logits = feats if is_head else readout(feats)
                err = logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
            # Tangent of every group's logits (only that group's features live), then the directional
            # derivative of its cross-entropy: d[b, g] = dCE/dlogits . tangent = err . tangent.
            tangent = torch.zeros(batch, n_groups, weight.shape[0], device=a.device, dtype=a.dtype)
            tangent.index_add_(1, feature_group, a_dot.unsqueeze(2) * weight.t().unsqueeze(0))
            d = torch.einsum("bgc,bc->bg", tangent, err)
            g_z += d[:, unit_group.flatten()].view_as(z) * v
            if norm:  # a channel's gain/bias moves its features in every cell: sum those groups' derivatives
                d_channel = d.view(batch, -1, self._cells[i]).sum(2)[:, channel_group]
                for n in norm:
                    g_norm[n] += (d_channel * v_norm[n]).mean(0)
        scale = 1.0 / (self.hp.perturbations * batch)
        stage.layer.weight.grad = _weight_grad(stage.layer, x, g_z) * scale
        if stage.layer.bias is not None:
            not_channel = [dim for dim in range(z.dim()) if dim != 1]
            stage.layer.bias.grad = g_z.sum(not_channel) * scale
        for n, p in stage.norm.named_parameters():
            p.grad = g_norm[n] / self.hp.perturbations
        if not is_head:  # the readout learns by the delta rule on the clean features
            readout.weight.grad = err.t() @ feats / batch
            readout.bias.grad = err.mean(0)
        opt = self.opts[i]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return h, logits

    # --- the rule contract -----------------------------------------------------------------------
    def block_step(self, index: int, h_in: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._update(index, h_in, y)[0]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = x
        for i in range(len(self.net.stages)):
            h, logits = self._update(i, h, y)
        return {"loss": F.cross_entropy(logits, y), "correct": (logits.argmax(1) == y).sum()}
