"""Node perturbation (Williams 1992 REINFORCE; Fiete & Seung 2006; Werfel, Xie & Seung 2005), with
antithetic noise and local losses for variance control.

Per block, per step:

1. The weight layer runs once: ``z = W x`` (the block's activity, its units' input currents).
2. Gaussian noise ``sigma * xi`` is injected into the activity, once with ``+xi`` and once with ``-xi``
   (an antithetic pair: the pair's mean loss is the baseline, so no extra clean-loss estimate is needed and
   the even-order terms of the loss change cancel). The noisy activity runs through the rest of the block
   and the block's local readout; only loss values come back, no derivative of anything.
3. REINFORCE: the loss change correlates with the noise, ``g = (L+ - L-) / (2 sigma) * xi``, an estimate of
   ``dL/dz``. The weight update is that estimate times the block's input (a three-factor rule:
   presynaptic activity x postsynaptic noise x a scalar loss change). No backward pass, no autograd.

Variance control (the variance of ``g`` grows with the number of noisy units one loss sums over):

* local losses: every hidden block has its own linear readout to the classes (rule state, not part of
  the network), trained by the delta rule on the block's (pooled) output, so noise in one block is
  judged by that block's loss only;
* groups: a block's units are split into groups (``group_size`` units, or channels times one of the
  readout's ``readout_pool`` x ``readout_pool`` spatial cells in conv blocks), each with its own copy of
  the local loss in which only that group's features carry their noise (the other groups' features
  enter at their clean value): one group's noise no longer muddies another group's loss change, and
  the variance scales with the group size instead of the block size;
* the output block's cross-entropy is split the same way, one group per logit;
* ``perturbations`` antithetic pairs per step are averaged.

Normalisation gains and biases (few) are perturbed alongside the activity and updated from the same
loss changes. With batch norm the noisy copies are normalised with their own batch statistics, which
are not kept (only the clean pass updates the running statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bioplaus.algorithms.arch import Block, Network
from bioplaus.algorithms.local_readout import attach_local_readouts
from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import Benchmark, Claim, OptimHParams, Rule, RunInfo, validate_hparams

_TESTS = "tests/test_perturbation.py"


@dataclass
class NodePerturbationHParams(OptimHParams):
    """Node perturbation (antithetic, local losses); optimiser fields as in OptimHParams."""

    sigma: float = 0.05
    """Standard deviation of the noise injected into a block's activity (its weight layer's output)."""
    perturbations: int = 2
    """Antithetic noise pairs per block and step; their estimates are averaged (variance falls as 1/K)."""
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
        if not self.sigma > 0:
            raise ValueError(f"hp.sigma={self.sigma} must be > 0")


def _post(block: Block, u: torch.Tensor, norm_params: dict[str, torch.Tensor], keep_stats: bool) -> torch.Tensor:
    """``block.post(u)`` with the norm's parameters passed in; running statistics kept only if asked."""
    stats = {k: b.clone() for k, b in block.norm.named_buffers()}
    n = functional_call(block.norm, {**norm_params, **stats}, (u,))
    if keep_stats:
        for name, buf in block.norm.named_buffers():
            buf.copy_(stats[name])
    return block.pool(block.act(n))


def _weight_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Batch-summed weight gradient of a Linear/Conv2d from its input and an output gradient (local)."""
    if isinstance(layer, nn.Linear):
        return g.t() @ x
    if isinstance(layer, nn.Conv2d):
        return torch.nn.grad.conv2d_weight(x, layer.weight.shape, g, layer.stride, layer.padding,
                                           layer.dilation, layer.groups)
    raise TypeError(f"node_perturbation supports Linear and Conv2d layers, not {type(layer).__name__}")


_RESIDUAL = ("not supported: the perturbation helpers perturb one weight layer and one norm per block, and a "
             "residual block has two or three convs and norms inside its preact; not implemented")


@register
class NodePerturbation(Rule):
    name = "node_perturbation"
    summary = ("node perturbation: antithetic noise in each block's activity, loss change x noise as the "
               "update (REINFORCE), local block losses; no backward pass")
    HParams = NodePerturbationHParams
    archs = {"mlp": None, "cnn": None, "deep_cnn": None, "resnet20": _RESIDUAL, "resnet18": _RESIDUAL}
    block_local = True
    criteria = {
        "C1": Claim(True, "a block's update is built from loss values of its own readout and its own noise; no "
                    "weights of a later block are read", f"{_TESTS}::test_update_ignores_later_blocks"),
        "C2": Claim(True, "each block learns from its input, its noise and a scalar change of its own local loss; "
                    "nothing is chained through later blocks", f"{_TESTS}::test_update_ignores_later_blocks"),
        "C3": Claim(True, "each weight layer runs once; the noisy copies of a block's activity are evaluated side "
                    "by side inside the block, with no backward sweep or second pass through the network",
                    f"{_TESTS}::test_single_forward_no_backward"),
        "C4": Claim(False, "hidden blocks' local losses are the label cross-entropy of their readouts",
                    "tests/test_criteria.py::test_claims_match_probes[node_perturbation]"),
    }
    benchmarks = (
        Benchmark("mlp", "mnist", 0.90, ("train.epochs=10", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 target; 10,000 training images in ../shared/data"),
        Benchmark("mlp", "fashion_mnist", 0.85, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 table, no issue target: 2-3 points under the measured 0.8724"),
        Benchmark("cnn", "fashion_mnist", 0.84, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 table, no issue target: 2-3 points under the measured 0.8652"),
        Benchmark("cnn", "cifar10", 0.59, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 table, no issue target: 2-3 points under the measured 0.6223"),
    )

    def __init__(self, net: Network, hp: NodePerturbationHParams, info: RunInfo):
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
        n_groups, sigma = self._n_groups[i], self.hp.sigma
        x = stage.pre(h_in)
        z = stage.layer(x)  # the only evaluation of the weight layer this step
        norm = {k: p.detach() for k, p in stage.norm.named_parameters()}
        readout = None if is_head else self.readouts[i]
        weight = self.eye if is_head else readout.weight  # the output block's readout is the identity

        def features(h):
            return h.flatten(1) if rows is None else torch.einsum("bchw,ph,qw->bcpq", h, rows, cols).flatten(1)

        h = _post(stage, z, norm, keep_stats=True)  # the clean activity, sent on to the next block
        feats = features(h)
        logits = feats if is_head else readout(feats)
        batch, n_classes = logits.shape
        labels = y.repeat_interleave(n_groups)

        def group_losses(u, p):
            # Each group's copy of the local loss sees only its own features' change from the clean ones.
            change = features(_post(stage, u, p, keep_stats=False)) - feats
            shift = torch.zeros(batch, n_groups, n_classes, device=z.device, dtype=z.dtype)
            shift.index_add_(1, feature_group, change.unsqueeze(2) * weight.t().unsqueeze(0))
            noisy = (logits.unsqueeze(1) + shift).flatten(0, 1)
            return F.cross_entropy(noisy, labels, reduction="none").view(batch, n_groups)

        g_z = torch.zeros_like(z)
        g_norm = {k: torch.zeros_like(p) for k, p in norm.items()}
        for _ in range(self.hp.perturbations):
            xi = torch.randn_like(z)
            xi_norm = {n: torch.randn_like(p) for n, p in norm.items()}
            plus = group_losses(z + sigma * xi, {n: p + sigma * xi_norm[n] for n, p in norm.items()})
            minus = group_losses(z - sigma * xi, {n: p - sigma * xi_norm[n] for n, p in norm.items()})
            change = (plus - minus) / (2 * sigma)  # [batch, group]: each group's loss change along the noise
            g_z += change[:, unit_group.flatten()].view_as(z) * xi
            if norm:  # a channel's gain/bias moves its features in every cell: sum those groups' changes
                change_channel = change.view(batch, -1, self._cells[i]).sum(2)[:, channel_group]
                for n in norm:
                    g_norm[n] += (change_channel * xi_norm[n]).mean(0)
        scale = 1.0 / (self.hp.perturbations * batch)
        stage.layer.weight.grad = _weight_grad(stage.layer, x, g_z) * scale
        if stage.layer.bias is not None:
            not_channel = [dim for dim in range(z.dim()) if dim != 1]
            stage.layer.bias.grad = g_z.sum(not_channel) * scale
        for n, p in stage.norm.named_parameters():
            p.grad = g_norm[n] / self.hp.perturbations
        if not is_head:  # the readout learns by the delta rule on the clean features
            err = logits.softmax(1) - F.one_hot(y, n_classes).to(logits.dtype)
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
