"""Sign-symmetry (Liao, Leibo & Poggio 2016, "How Important Is Weight Symmetry in Backpropagation?",
AAAI; Moskovitz, Litwin-Kumar & Abbott 2018), optionally with batch-manhattan updates.

Backprop whose backward pass uses, in place of each forward weight W_l, a feedback weight that
shares only its sign: B_l = sign(W_l) * s_l ("uniform sign-concordant feedback", uSF). The constant
s_l is the standard deviation of the layer's default init, U(+-1/sqrt(fan_in)), so B_l has the
norm W_l had at init; it is fixed and never reads W's magnitudes. B follows W's signs as W learns
(recomputed every step). Batch-manhattan (BM, Liao et al.) replaces every gradient by its sign
before the optimiser step.

Honest about C1: the feedback reads the sign of every forward weight of the later block, one bit
per synapse: that is (reduced) weight transport, not its absence.

As in ``fa``, everything inside a block (normalisation, nonlinearity, pooling) is differentiated
exactly; batch norm in deep_cnn uses the block's own batch statistics and gain (Liao et al. found
batch norm important for asymmetric feedback), so it mixes the error across the batch, never across
blocks.

Reference: Liao, Leibo & Poggio 2016 (uSF: B = sign(W) times a constant; BM: sign of the gradient),
biotorch's ``usf`` mode. Deviations: none by default (the constant is the default init's std; BM off as in
uSF). Parity: ``tests/test_parity.py::test_sign_symmetry_parity``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bioplaus.algorithms.arch import Network
from bioplaus.algorithms.feedback import fan_in, feedback_forward, feedback_slots
from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import Benchmark, Claim, OptimHParams, Rule, RunInfo, make_optimizer

_TESTS = "tests/test_feedback_alignment.py"


@dataclass
class SignSymmetryHParams(OptimHParams):
    """Sign-symmetry: optimiser settings (see OptimHParams), batch-manhattan and the feedback scale."""

    batch_manhattan: bool = False
    """Replace each parameter's gradient by its elementwise sign before the optimiser step (BM)."""
    feedback_scale: float = 1.0
    """B_l = sign(W_l) * feedback_scale * std of the layer's default init (1/sqrt(3 fan_in))."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing in [0, 1)."""


@register
class SignSymmetry(Rule):
    name = "sign_symmetry"
    summary = "sign-symmetric feedback: errors travel down through sign(W) times a constant, optional batch-manhattan (Liao 2016)"
    HParams = SignSymmetryHParams
    population_hparams = ("batch_manhattan", "feedback_scale")
    archs = {"mlp": None, "cnn": None, "deep_cnn": None, "resnet20": None, "resnet18": None}
    criteria = {
        "C1": Claim(False, "the feedback is sign(W) of the later block: one bit of each forward weight is "
                    "transported, so a hidden update changes when later forward weights change sign",
                    f"{_TESTS}::test_c1_no_weight_transport[sign_symmetry]"),
        "C2": Claim(False, "a hidden block's error is the output error chained down through every later "
                    "block's feedback and derivative", f"{_TESTS}::test_c2_local_error[sign_symmetry]"),
        "C3": Claim(False, "a backward sweep (through sign(W)) follows the forward pass before any update",
                    f"{_TESTS}::test_c3_single_phase[sign_symmetry]"),
        "C4": Claim(False, "hidden blocks learn from the label-derived output error",
                    "tests/test_criteria.py::test_claims_match_probes[sign_symmetry]"),
    }
    benchmarks = (
        Benchmark("mlp", "fashion_mnist", 0.87, ("train.epochs=5",), "bp's target in the same budget is 0.88"),
        Benchmark("cnn", "fashion_mnist", 0.895, ("train.epochs=5",), "project target (biotorch LeNet uSF figure)"),
        Benchmark("cnn", "cifar10", 0.70, ("train.epochs=20", "data.augment=crop_flip", "model.norm=batch",
                                           "hp.schedule=cosine"),
                  "project target (biotorch LeNet uSF figure); batch norm as in Liao et al."),
        Benchmark("resnet20", "cifar10", 0.894, ("train.epochs=60", "data.augment=crop_flip", "hp.optimizer=sgd", "hp.lr=0.1", "hp.momentum=0.9", "hp.weight_decay=5e-4", "hp.schedule=cosine"),
                  "GPU case: BioTorch (Sanfiz & Akrout 2021) uSF ResNet-20 CIFAR-10 89.44 %"),
        Benchmark("resnet20", "fashion_mnist", 0.70, ("train.epochs=2", "data.train_limit=6000", "data.test_limit=2000", "model.channels=[8,16,32]", "model.blocks_per_stage=1"),
                  "CPU learning check at small widths"),
    )

    def __init__(self, net: Network, hp: SignSymmetryHParams, info: RunInfo):
        super().__init__(net, hp, info)
        if not 0 <= hp.label_smoothing < 1:
            raise ValueError(f"hp.label_smoothing={hp.label_smoothing} must be in [0, 1)")
        # One constant per layer, from its shape only (never from W's values).
        self.scales = [[hp.feedback_scale / math.sqrt(3 * fan_in(layer.weight)) for layer, _ in s.weight_layers()]
                       for s in net.stages]
        self.opt = make_optimizer(net.parameters(), hp, info.epochs * info.steps_per_epoch)

    @torch.no_grad()
    def feedback(self, i: int) -> torch.Tensor | None:
        """sign(W_i) * s_i: sends stage ``i``'s error to stage ``i - 1`` (None for the first stage)."""
        return self.feedbacks(i)[0]

    @torch.no_grad()
    def feedbacks(self, i: int, feedback_scale: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """sign(W) * s of each of stage ``i``'s weight layers (a residual block's projection included); None
        where the layer's input needs no error. ``feedback_scale``: a population member's own (a 0-d tensor)
        in place of ``hp.feedback_scale``."""
        stage = self.net.stages[i]
        scales = self.scales[i] if feedback_scale is None else [
            (feedback_scale / math.sqrt(3 * fan_in(layer.weight))).float() for layer, _ in stage.weight_layers()]
        return [torch.sign(layer.weight) * scale if needed else None for (layer, _), scale, needed
                in zip(stage.weight_layers(), scales, feedback_slots(i, stage))]

    def objective(self, x: torch.Tensor, y: torch.Tensor,
                  feedback_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of a forward pass whose backward sends errors down through sign(W) * s."""
        h = x
        for i, stage in enumerate(self.net.stages):
            h = feedback_forward(stage, h, self.feedbacks(i, feedback_scale))
        return F.cross_entropy(h, y, label_smoothing=self.hp.label_smoothing), h

    def member_loss(self, hp, x, y):
        loss, logits = self.objective(x, y, hp["feedback_scale"])
        return loss, {"loss": loss.detach(), "correct": (logits.argmax(1) == y).sum()}

    def member_update(self, grads, hp):
        """Batch-manhattan where the member asks for it: each gradient replaced by its sign."""
        return {k: torch.where(hp["batch_manhattan"] > 0, g.sign(), g) for k, g in grads.items()}

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward pass, then the sign-feedback backward sweep into every ``.grad``; (loss, logits)."""
        loss, h = self.objective(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.hp.batch_manhattan:
            for p in self.net.parameters():
                if p.grad is not None:
                    p.grad.sign_()
        return loss.detach(), h.detach()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        loss, logits = self.gradients(x, y)
        self.opt.step()
        return {"loss": loss, "correct": (logits.argmax(1) == y).sum()}
