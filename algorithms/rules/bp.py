"""Backpropagation: the reference every other rule is compared with.

Cross-entropy on the output block, exact gradients for every weight by reverse-mode autograd
(Rumelhart, Hinton & Williams 1986), one optimiser over all parameters.

Reference: Rumelhart, Hinton & Williams 1986 (the delta rule generalised: delta_l = (delta_{l+1} W_{l+1}) * f'(u_l),
dW_l = delta_l h_{l-1}^T). Deviations: none (``label_smoothing`` defaults to 0). Parity: ``tests/test_parity.py::test_bp_parity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import Benchmark, Claim, OptimHParams, Rule, RunInfo, make_optimizer
from bioplaus.algorithms.arch import Network

_PROOF = "tests/test_criteria.py::test_claims_match_probes[bp]"


@dataclass
class BPHParams(OptimHParams):
    """Backprop: optimiser settings only (shared fields documented in OptimHParams)."""

    label_smoothing: float = 0.0
    """Cross-entropy label smoothing in [0, 1)."""


@register
class Backprop(Rule):
    name = "bp"
    summary = "backpropagation of the output cross-entropy by reverse-mode autograd (reference)"
    HParams = BPHParams
    archs = {"mlp": None, "cnn": None, "deep_cnn": None, "resnet20": None, "resnet18": None}
    criteria = {
        "C1": Claim(False, "the backward pass sends errors through the transpose of the forward weights",
                    _PROOF),
        "C2": Claim(False, "a hidden block's error is the output error chained through all later blocks",
                    _PROOF),
        "C3": Claim(False, "a backward sweep through the blocks follows the forward pass before any update",
                    _PROOF),
        "C4": Claim(False, "hidden blocks learn from the label-derived output error", _PROOF),
    }

    benchmarks = (
        Benchmark("mlp", "fashion_mnist", 0.88, ("train.epochs=5", "hp.schedule=cosine"),
                  "schedule chosen on validation accuracy among constant, cosine and onecycle (docs/provenance.md)"),
        Benchmark("cnn", "fashion_mnist", 0.90, ("train.epochs=5",)),
        Benchmark("mlp", "mnist", 0.965, ("train.epochs=40", "data.augment=shift", "hp.schedule=cosine"),
                  "9,000 training images (the mirror's first 10,000 minus validation); schedule, lr (the default), "
                  "epochs and augmentation chosen on validation accuracy (docs/provenance.md)"),
        Benchmark("cnn", "cifar10", 0.65, ("train.epochs=10", "data.augment=crop_flip", "hp.schedule=cosine"),
                  "the reference of FA's and DFA's cnn cifar10 cases (the same settings); no project target"),
        Benchmark("deep_cnn", "cifar10", 0.75, ("train.epochs=15", "data.augment=crop_flip", "hp.optimizer=adamw",
                                               "hp.lr=2e-3", "hp.schedule=cosine", "hp.weight_decay=5e-4")),
        Benchmark("resnet20", "cifar10", 0.91, ("train.epochs=60", "data.augment=crop_flip", "hp.optimizer=sgd", "hp.lr=0.1", "hp.momentum=0.9", "hp.weight_decay=5e-4", "hp.schedule=cosine"),
                  "GPU case (60 epochs fit one GPU hour): He et al. 2016 report 91.25 % (164 epochs, step schedule)"),
        Benchmark("resnet20", "fashion_mnist", 0.75, ("train.epochs=2", "data.train_limit=6000", "data.test_limit=2000", "model.channels=[8,16,32]", "model.blocks_per_stage=1"),
                  "CPU learning check at small widths: well above chance in 2 epochs on a subset"),
        Benchmark("resnet18", "cifar10", 0.93, ("train.epochs=40", "data.augment=crop_flip", "hp.optimizer=sgd", "hp.lr=0.1",
                                           "hp.momentum=0.9", "hp.weight_decay=5e-4", "hp.schedule=cosine"),
                  "GPU case; ResNet-18 on CIFAR-10 with this recipe is commonly reported at 93-95 %"),
    )

    def __init__(self, net: Network, hp: BPHParams, info: RunInfo):
        super().__init__(net, hp, info)
        self.opt = make_optimizer(net.parameters(), hp, info.epochs * info.steps_per_epoch)

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The output cross-entropy and the step's metrics."""
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hp.label_smoothing)
        return loss, {"loss": loss.detach(), "correct": (logits.argmax(1) == y).sum()}

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        loss, metrics = self.objective(x, y)
        self.opt.minimize(loss)
        return metrics

    def member_loss(self, hp, x, y):
        return self.objective(x, y)
