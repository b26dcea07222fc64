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

Reference: Jabri & Flower 1992 (d = (L+ - L-) / 2 sigma, update d * D). Deviations: Flipout directions,
local readouts and groups (variance control, above) are the project's. Parity test:
tests/test_parity_stochastic.py::test_weight_perturbation_parity (per block and pair, drawn from torch's global
generator in the order D, s, r, D_bias); the estimator's mean is checked in tests/test_perturbation.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bioplaus.algorithms.perturbation import PerturbationRule, StageUpdate
from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import Benchmark, Claim, OptimHParams

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
class WeightPerturbation(PerturbationRule):
    name = "weight_perturbation"
    summary = ("weight perturbation: antithetic random weight directions (Flipout per example), loss "
               "difference x direction as the update, local block losses; no backward pass")
    HParams = WeightPerturbationHParams
    archs = {"mlp": None, "cnn": None, "deep_cnn": None, "resnet20": _RESIDUAL, "resnet18": _RESIDUAL}
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
        Benchmark("mlp", "mnist", 0.90, ("train.epochs=60", "hp.lr=1e-3", "hp.schedule=constant"),
                  "project target; 10,000 training images (the data mirror's MNIST); lr, schedule and epochs chosen "
                  "on validation accuracy (docs/provenance.md)"),
        Benchmark("mlp", "fashion_mnist", 0.79, ("train.epochs=5", "hp.lr=5e-4", "hp.schedule=constant"),
                  "no project target: 2-3 points under this rule's measured accuracy (docs/benchmarks.md); lr and "
                  "schedule chosen on validation accuracy (docs/provenance.md)"),
        Benchmark("cnn", "fashion_mnist", 0.78, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "no project target: 2-3 points under this rule's measured accuracy (docs/benchmarks.md); lr and "
                  "schedule chosen on validation accuracy (docs/provenance.md)"),
        Benchmark("cnn", "cifar10", 0.40, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "no project target: 2-3 points under this rule's measured accuracy (docs/benchmarks.md); lr and "
                  "schedule chosen on validation accuracy (docs/provenance.md)"),
    )

    @torch.no_grad()
    def block_step(self, index: int, h_in: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Update stage ``index`` from its input and the labels; return its clean output."""
        step = StageUpdate(self, index, h_in, y)
        step.clean_pass()  # the clean activity, sent on to the next block
        x, z, norm, sigma, batch = step.x, step.z, step.norm, self.hp.sigma, step.batch
        layer = step.stage.layer
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
            change = step.per_channel(step.loss_change(noise, xi_norm, sigma))  # [batch, channel]
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
        step.finish(g_norm, self.hp.perturbations)
        return step.h
