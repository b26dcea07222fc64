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

Reference: Williams 1992 / Fiete & Seung 2006 (g = (L+ - L-) / 2 sigma * xi). Deviations: antithetic
pairs, local readouts and groups (variance control, above) are the project's. Parity test:
tests/test_parity_stochastic.py::test_node_perturbation_parity (noise from torch's global generator,
``perturbations`` draws per block, block by block); the estimator's mean is checked in tests/test_perturbation.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bioplaus.algorithms.perturbation import PerturbationRule, StageUpdate
from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import Benchmark, Claim, OptimHParams

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


_RESIDUAL = ("not supported: the perturbation helpers perturb one weight layer and one norm per block, and a "
             "residual block has two or three convs and norms inside its preact; not implemented")
@register
class NodePerturbation(PerturbationRule):
    name = "node_perturbation"
    summary = ("node perturbation: antithetic noise in each block's activity, loss change x noise as the "
               "update (REINFORCE), local block losses; no backward pass")
    HParams = NodePerturbationHParams
    archs = {"mlp": None, "cnn": None, "deep_cnn": None, "resnet20": _RESIDUAL, "resnet18": _RESIDUAL}
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
                  "project target; 10,000 training images (the data mirror's MNIST)"),
        Benchmark("mlp", "fashion_mnist", 0.85, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "no project target: 2-3 points under this rule's measured accuracy (docs/benchmarks.md); lr and "
                  "schedule chosen on validation accuracy (docs/provenance.md)"),
        Benchmark("cnn", "fashion_mnist", 0.84, ("train.epochs=5", "hp.lr=4e-3", "hp.schedule=cosine"),
                  "no project target: 2-3 points under this rule's measured accuracy (docs/benchmarks.md); lr and "
                  "schedule chosen on validation accuracy (docs/provenance.md)"),
        Benchmark("cnn", "cifar10", 0.59, ("train.epochs=5", "hp.lr=2e-3", "hp.schedule=cosine"),
                  "no project target: 2-3 points under this rule's measured accuracy (docs/benchmarks.md); lr and "
                  "schedule chosen on validation accuracy (docs/provenance.md)"),
    )

    @torch.no_grad()
    def block_step(self, index: int, h_in: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Update stage ``index`` from its input and the labels; return its clean output."""
        step = StageUpdate(self, index, h_in, y)
        step.clean_pass()  # the clean activity, sent on to the next block
        z, norm, sigma = step.z, step.norm, self.hp.sigma
        g_z = torch.zeros_like(z)
        g_norm = {k: torch.zeros_like(p) for k, p in norm.items()}
        for _ in range(self.hp.perturbations):
            xi = torch.randn_like(z)
            xi_norm = {n: torch.randn_like(p) for n, p in norm.items()}
            change = step.loss_change(xi, xi_norm, sigma)  # [batch, group], along the noise
            g_z += change[:, step.unit_group.flatten()].view_as(z) * xi
            if norm:
                change_channel = step.per_channel(change)
                for n in norm:
                    g_norm[n] += (change_channel * xi_norm[n]).mean(0)
        step.set_layer_grads(g_z, self.hp.perturbations)
        step.finish(g_norm, self.hp.perturbations)
        return step.h
