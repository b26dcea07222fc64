"""Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016, Nature Communications 7:13276).

Backprop with the transpose of each forward weight W_l replaced, in the backward pass only, by a
fixed random matrix B_l of the same shape: the error reaching block l-1 is e_l B_l instead of
e_l W_l. The forward weights then learn to *align* with B (the update of W_l is driven by B-carried
errors, which makes W_l^T e point roughly where B_l^T e points), so the random feedback becomes
useful. Works for Linear and Conv2d layers (B_l a random kernel of W_l's shape).

Within a block, the rest of the block (normalisation, nonlinearity, pooling) is differentiated
exactly by autograd: those operations are local to the block's own units. Batch norm (deep_cnn)
is treated the same way: its backward uses the block's own per-channel batch statistics and its own
gain gamma, so it mixes the error across the batch but never across blocks; gamma and beta learn
from the feedback-delivered error like the weights. What FA changes is only what crosses from one
block to the one below: e B instead of e W.

Reference: Lillicrap et al. 2016 (delta_l = (delta_{l+1} B_{l+1}) * f'(u_l)); biotorch's ``fa`` mode. Deviations:
none by default (B drawn from the layer's default init; ``feedback_scale`` and ``label_smoothing`` are options).
Parity: ``tests/test_parity.py::test_fa_parity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bioplaus.algorithms.arch import Network
from bioplaus.algorithms.feedback import default_init_like, feedback_forward, feedback_slots
from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import Benchmark, Claim, OptimHParams, Rule, RunInfo, make_optimizer

_TESTS = "tests/test_feedback_alignment.py"


@dataclass
class FAHParams(OptimHParams):
    """Feedback alignment: optimiser settings (see OptimHParams) and the feedback matrices' scale."""

    feedback_scale: float = 1.0
    """Each B_l is drawn from the forward weight's default init, U(+-1/sqrt(fan_in)), times this."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing in [0, 1)."""


def _name(stage: int, layer: int) -> str:
    return f"feedback_{stage}" if layer == 0 else f"feedback_{stage}_{layer}"


@register
class FeedbackAlignment(Rule):
    name = "fa"
    summary = "feedback alignment: errors travel down through fixed random matrices B instead of W^T (Lillicrap 2016)"
    HParams = FAHParams
    population_hparams = ("feedback_scale",)  # it only scales the feedback buffers, stacked per member
    archs = {"mlp": None, "cnn": None, "deep_cnn": None, "resnet20": None, "resnet18": None}
    criteria = {
        "C1": Claim(True, "the error goes down through fixed random B_l; the forward weights are not even "
                    "saved for the backward pass, and a hidden update ignores later forward weights",
                    f"{_TESTS}::test_c1_no_weight_transport[fa]"),
        "C2": Claim(False, "a hidden block's error is the output error chained down through every later "
                    "block's feedback matrix and derivative", f"{_TESTS}::test_c2_local_error[fa]"),
        "C3": Claim(False, "a backward sweep (through B) follows the forward pass before any update",
                    f"{_TESTS}::test_c3_single_phase[fa]"),
        "C4": Claim(False, "hidden blocks learn from the label-derived output error",
                    "tests/test_criteria.py::test_claims_match_probes[fa]"),
    }
    benchmarks = (
        Benchmark("mlp", "fashion_mnist", 0.85, ("train.epochs=5", "hp.lr=3e-4"),
                  "bp's target in the same budget is 0.88; lr 3e-4 since at 1e-3 FA's train loss rises after epoch 2"),
        Benchmark("cnn", "fashion_mnist", 0.87, ("train.epochs=20", "hp.lr=3e-4", "hp.schedule=cosine"),
                  "project target (biotorch LeNet FA figure); lr 3e-4 since at 1e-3 the train loss rises; 20 cosine "
                  "epochs: the best of 10, 15 and 20 on validation (docs/provenance.md)"),
        Benchmark("cnn", "cifar10", 0.50, ("train.epochs=10", "data.augment=crop_flip", "hp.schedule=cosine"),
                  "project target (biotorch LeNet FA figure)"),
        Benchmark("resnet20", "cifar10", 0.65, ("train.epochs=60", "data.augment=crop_flip", "hp.optimizer=sgd", "hp.lr=0.01", "hp.momentum=0.9", "hp.weight_decay=5e-4", "hp.schedule=cosine"),
                  "GPU case; target provisional, below BioTorch's FA ResNet-20 CIFAR-10 figure (check its table): FA is far behind bp on deep residual nets"),
        Benchmark("resnet20", "fashion_mnist", 0.60, ("train.epochs=2", "data.train_limit=6000", "data.test_limit=2000", "model.channels=[8,16,32]", "model.blocks_per_stage=1"),
                  "CPU learning check at small widths"),
    )

    def __init__(self, net: Network, hp: FAHParams, info: RunInfo):
        super().__init__(net, hp, info)
        if not 0 <= hp.label_smoothing < 1:
            raise ValueError(f"hp.label_smoothing={hp.label_smoothing} must be in [0, 1)")
        # B_l carries the error from stage l down to stage l-1; the first stage's input needs none. A residual
        # block's inner conv and shortcut projection get their own B (feedback_{l}_{j}), as in BioTorch.
        for i, stage in enumerate(net.stages):
            for j, ((layer, _), needed) in enumerate(zip(stage.weight_layers(), feedback_slots(i, stage))):
                if needed:
                    self.register_buffer(_name(i, j), default_init_like(layer.weight, hp.feedback_scale))
        self.opt = make_optimizer(net.parameters(), hp, info.epochs * info.steps_per_epoch)

    def feedback(self, i: int) -> torch.Tensor | None:
        """The fixed matrix that sends stage ``i``'s error to stage ``i - 1`` (None for the first stage)."""
        return getattr(self, f"feedback_{i}") if i > 0 else None

    def feedbacks(self, i: int) -> list[torch.Tensor | None]:
        """The fixed matrix of each of stage ``i``'s weight layers (None where its input needs no error)."""
        return [getattr(self, _name(i, j), None) for j in range(len(self.net.stages[i].weight_layers()))]

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of a forward pass whose backward is the FA sweep (errors down through B)."""
        h = x
        for i, stage in enumerate(self.net.stages):
            h = feedback_forward(stage, h, self.feedbacks(i))
        return F.cross_entropy(h, y, label_smoothing=self.hp.label_smoothing), h

    def member_loss(self, hp, x, y):
        loss, logits = self.objective(x, y)
        return loss, {"loss": loss.detach(), "correct": (logits.argmax(1) == y).sum()}

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward pass, then the FA backward sweep into every parameter's ``.grad``; (loss, logits)."""
        loss, h = self.objective(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), h.detach()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        loss, logits = self.gradients(x, y)
        self.opt.step()
        return {"loss": loss, "correct": (logits.argmax(1) == y).sum()}
