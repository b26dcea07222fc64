"""Weight perturbation (Jabri & Flower 1992; Alspector et al. 1993; Cauwenberghs 1993), with
antithetic pairs, per-example decorrelated perturbations and local losses for variance control.

Per block, per step:

1. The weight layer runs once: ``z = W x``.
2. A random direction ``D`` in weight space (Gaussian, the shape of ``W``; bias likewise) perturbs the
   weights, ``W + sigma D`` and ``W - sigma D`` (an antithetic pair). By linearity the perturbed layer's
   output is ``z +- sigma (D x)``, so ``W`` is still read once; the noise synapses ``D`` run beside it.
3. The loss difference over the pair gives the directional derivative ``d = (L+ - L-) / (2 sigma)`` and
   ``d * D`` is an estimate of ``dL/dW``. Only loss values are used: no derivative of anything, no autograd.

Variance control (the variance of ``d D`` grows with the number of perturbed weights one loss sees, here
hundreds of thousands, which is why plain weight perturbation does not learn beyond toy networks):

* per-example directions (Flipout, Wen et al. 2018): example ``b`` sees ``D * (s_b r_b^T)`` with random
  signs ``s_b`` on the outputs and ``r_b`` on the inputs (per channel for convolutions). The perturbed
  output costs one extra matrix product, ``s_b * (D (r_b * x_b))``, yet the examples' estimates are
  nearly independent, so the batch averages them out instead of sharing one direction;
* local losses: every hidden block has its own linear readout to the classes (rule state, not part of
  the network), trained by the delta rule on the block's (pooled) output;
* groups: a block's output units (channels) are split into groups of ``group_size``, each with its own
  copy of the local loss in which only that group's features change; a group's loss difference then
  estimates only the weights into that group's units (by default one group per unit or channel:
  ``fan_in`` weights per estimate);
* the output block's cross-entropy is split the same way, one group per logit;
* ``perturbations`` antithetic pairs per step are averaged.

Normalisation gains and biases are perturbed along with the weights (shared across the batch).
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
class WeightPerturbationHParams(OptimHParams):
    """Weight perturbation (antithetic, Flipout, local losses); optimiser fields as in OptimHParams."""

    sigma: float = 1e-3
    """Standard deviation of the weight perturbation (times a unit Gaussian direction per weight)."""
    perturbations: int = 2
    """Antithetic weight-direction pairs per block and step; their estimates are averaged."""
    group_size: int = 1
    """Output units (dense blocks) or channels (conv blocks) per local-loss group."""
    readout_pool: int = 4
    """Conv blocks: the local readout sees the block output averaged over this many cells per side
    (at most the output size)."""

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


def _noise_output(layer: nn.Module, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The layer's operation with weights ``direction`` instead of its own (no bias)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, direction)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, direction, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    raise TypeError(f"weight_perturbation supports Linear and Conv2d layers, not {type(layer).__name__}")


def _signs(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Random +-1 matrix (Rademacher) on the device and dtype of ``like``."""
    return torch.randint(0, 2, (rows, cols), device=like.device).to(like.dtype) * 2 - 1


_RESIDUAL = ("not supported: the perturbation helpers perturb one weight layer and one norm per block, and a "
             "residual block has two or three convs and norms inside its preact; not implemented")


@register
class WeightPerturbation(Rule):
    name = "weight_perturbation"
    summary = ("weight perturbation: antithetic random weight directions (Flipout per example), loss "
               "difference x direction as the update, local block losses; no backward pass")
    HParams = WeightPerturbationHParams
    archs = {"mlp": None, "cnn": None, "deep_cnn": None, "resnet20": _RESIDUAL, "resnet18": _RESIDUAL}
    block_local = True
    criteria = {
        "C1": Claim(True, "a block's update is built from loss values of its own readout and its own weight "
                    "perturbation; no weights of a later block are read", f"{_TESTS}::test_update_ignores_later_blocks"),
        "C2": Claim(True, "each block learns from its input, its perturbation and a scalar change of its own local "
                    "loss; nothing is chained through later blocks", f"{_TESTS}::test_update_ignores_later_blocks"),
        "C3": Claim(True, "each weight layer runs once (the perturbation adds D x beside it); the perturbed copies are "
                    "evaluated side by side inside the block, with no backward sweep or second pass through the "
                    "network", f"{_TESTS}::test_single_forward_no_backward"),
        "C4": Claim(False, "hidden blocks' local losses are the label cross-entropy of their readouts",
                    "tests/test_criteria.py::test_claims_match_probes[weight_perturbation]"),
    }
    benchmarks = (
        Benchmark("mlp", "mnist", 0.90, ("train.epochs=10", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 target; 10,000 training images in ../shared/data"),
        Benchmark("mlp", "fashion_mnist", 0.79, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 table, no issue target: 2-3 points under the measured 0.8095"),
        Benchmark("cnn", "fashion_mnist", 0.78, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 table, no issue target: 2-3 points under the measured 0.8004"),
        Benchmark("cnn", "cifar10", 0.40, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "issue 3 table, no issue target: 2-3 points under the measured 0.4269"),
    )

    def __init__(self, net: Network, hp: WeightPerturbationHParams, info: RunInfo):
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
        feature_group = getattr(self, f"feature_group{i}")
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

        layer = stage.layer
        spatial = (1,) * (z.dim() - 2)  # signs are per channel, shared over positions
        g_w = torch.zeros_like(layer.weight)
        g_b = None if layer.bias is None else torch.zeros_like(layer.bias)
        g_norm = {k: torch.zeros_like(p) for k, p in norm.items()}
        for _ in range(self.hp.perturbations):
            direction = torch.randn_like(layer.weight)
            s = _signs(batch, z.shape[1], z)  # per example and output channel
            r = _signs(batch, x.shape[1], x)  # per example and input channel
            # Example b's perturbed layer output: (W + sigma D * s_b r_b^T) x_b + (b + sigma D_bias * s_b).
            noise = _noise_output(layer, x * r.view(batch, -1, *((1,) * (x.dim() - 2))), direction)
            if g_b is not None:
                direction_bias = torch.randn_like(layer.bias)
                noise = noise + direction_bias.view(1, -1, *spatial)
            noise = noise * s.view(batch, -1, *spatial)
            xi_norm = {n: torch.randn_like(p) for n, p in norm.items()}
            plus = group_losses(z + sigma * noise, {n: p + sigma * xi_norm[n] for n, p in norm.items()})
            minus = group_losses(z - sigma * noise, {n: p - sigma * xi_norm[n] for n, p in norm.items()})
            change = (plus - minus) / (2 * sigma)  # [batch, group]: each group's loss change along the direction
            # A channel's weights move its features in every cell: sum those groups' changes.
            change = change.view(batch, -1, self._cells[i]).sum(2)[:, channel_group]  # [batch, channel]
            # sum_b change_b * (D * s_b r_b^T): the direction times the sign-weighted loss changes.
            signed = (change * s).t() @ r  # [out, in]
            g_w += direction * signed.view(*signed.shape, *((1,) * (layer.weight.dim() - 2)))
            if g_b is not None:
                g_b += direction_bias * (change * s).sum(0)
            for n in norm:
                g_norm[n] += (change * xi_norm[n]).mean(0)
        layer.weight.grad = g_w / (self.hp.perturbations * batch)
        if g_b is not None:
            layer.bias.grad = g_b / (self.hp.perturbations * batch)
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
