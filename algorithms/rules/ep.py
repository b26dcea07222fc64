"""Equilibrium propagation (Scellier & Bengio 2017) in the discrete-time form of Laborieux et al. (2021).

The network is an energy-based (Hopfield-like) recurrent network, not the feed-forward pass of the
Block list: each block's weight layer is a *symmetric coupling* between the state of that block and
the state below it. The network's primitive function (minus its energy) is

    Phi(x, s) = sum_l  s_l . pool_l(layer_l(pre_l(s_{l-1})))           s_{-1} = x,

so block l+1's weights act upward on s_{l+1} and, transposed, downward on s_l. The states settle by
the synchronous fixed-point iteration s <- sigma(dPhi/ds) — every layer of the whole batch at once per
step — where sigma is the rule's bounded activation (``activation``; the blocks' own ``act`` and
``norm`` are not used: an energy needs bounded states and no batch statistics).

Output (``loss``):
* ``ce`` (default, Laborieux et al. 2021): the head block is a softmax read-out of the last hidden
  state, outside the energy; the nudged phase adds -beta * cross-entropy to Phi.
* ``mse`` (Scellier & Bengio 2017): the head's state is part of the energy (its layer is one more
  coupling) and the nudge pulls it towards the one-hot target with -beta * 1/2 ||s_out - y||^2.

One training step:
  1. free phase: ``free_steps`` iterations from s = 0 (beta = 0) to the free equilibrium s0;
  2. nudged phase: ``nudged_steps`` iterations from s0 with the output weakly clamped (+beta) -> s+;
     with ``symmetric`` also with -beta -> s- (Laborieux et al. 2021: for a smooth activation, e.g.
     ``activation=sigmoid``, this cancels the O(beta) bias of the one-sided estimate; with the default hard
     sigmoid, whose kinks the nudged states cross, it does not, and at beta between 1e-3 and 0.1 it was found
     further from backprop through the free phase than the one-sided estimate);
  3. update from the difference of local correlations, dW_l ~ (s+_l s+_{l-1}^T - s0_l s0_{l-1}^T)/beta
     (or (s+ - s-) / 2 beta), computed as dPhi/dtheta at the two equilibria.
As beta -> 0 this equals the gradient of the loss at the free equilibrium (recurrent backprop/BPTT of
the free dynamics) — tested.

``predict`` runs the free phase (no target) and returns the read-out of the free equilibrium.

Reference: Scellier & Bengio 2017 in the discrete-time, symmetric-nudge form of Laborieux et al.
2021 (s <- sigma(dPhi/ds), update (dPhi/dtheta(s+) - dPhi/dtheta(s-)) / 2 beta, cross-entropy read-out).
Deviations: the optimiser is the project's (Laborieux et al. use SGD per layer); ``loss=mse`` and
``symmetric=false`` are Scellier & Bengio's original options. Parity: ``tests/test_parity.py::test_ep_parity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bioplaus.algorithms.arch import Network
from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import Benchmark, Claim, OptimHParams, Rule, RunInfo, make_optimizer

_PROBE = "tests/test_criteria.py::test_claims_match_probes[ep]"

ACTIVATIONS = {
    # Laborieux et al. (2021): hard sigmoid clamp(x, 0, 1) for conv nets, a steep sigmoid for MLPs.
    "hard_sigmoid": lambda u: u.clamp(0.0, 1.0),
    "sigmoid": lambda u: torch.sigmoid(4.0 * (u - 0.5)),
}


@dataclass
class EPHParams(OptimHParams):
    """Equilibrium propagation: phases, nudging and the optimiser applied to the EP gradient estimate."""

    free_steps: int = 30
    """Fixed-point iterations of the free phase (from zero states), in training and in predict."""
    nudged_steps: int = 10
    """Fixed-point iterations of each nudged phase (from the free equilibrium)."""
    beta: float = 0.5
    """Nudging strength: weight of the output loss subtracted from Phi in the nudged phase."""
    symmetric: bool = True
    """Nudge with +beta and -beta and difference the two (Laborieux et al. 2021; removes the O(beta) bias only for a
    smooth activation, not for hard_sigmoid); False: +beta vs free (Scellier & Bengio 2017)."""
    activation: str = "hard_sigmoid"
    """Bounded state nonlinearity: hard_sigmoid (clamp to [0, 1]) or sigmoid (1/(1+exp(-4(u-1/2))))."""
    loss: str = "ce"
    """ce: softmax read-out by the head outside the energy; mse: the head's state inside the energy."""

    def validate(self) -> None:
        if self.free_steps < 1 or self.nudged_steps < 1:
            raise ValueError(f"hp.free_steps={self.free_steps} and hp.nudged_steps={self.nudged_steps} must be >= 1")
        if not self.beta > 0:
            raise ValueError(f"hp.beta={self.beta} must be > 0")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"hp.activation={self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.loss not in ("ce", "mse"):
            raise ValueError(f"hp.loss={self.loss!r} is not one of ce, mse")


@register
class EquilibriumPropagation(Rule):
    name = "ep"
    summary = "equilibrium propagation: free and beta-nudged relaxation of an energy network, contrastive update"
    HParams = EPHParams
    archs = {"mlp": None, "cnn": None, "deep_cnn": None,
             "resnet20": "not supported: an energy function couples each layer with the next through one symmetric "
                         "weight; a shortcut couples states two layers apart and its batch norm has no place in the "
                         "energy (convolutional EP, Laborieux et al. 2021, is a plain conv stack); not implemented",
             "resnet18": "not supported: see resnet20 (no energy function of a residual block)"}
    # Convolutional EP (Laborieux et al. 2021) has no normalisation: the energy has no term for one.
    arch_defaults = {"deep_cnn": {"norm": "none"}}
    forbidden_norms = {n: "an energy function has no place for normalisation layers" for n in ("batch", "group", "layer")}
    criteria = {
        "C1": Claim(False, "couplings are symmetric: the state below receives the state above through the "
                    "transpose of the same forward weights", _PROBE),
        "C2": Claim(False, "the error is not represented at a block: it is the difference of activities between "
                    "the free and nudged phases, spread through all later blocks' couplings", _PROBE),
        "C3": Claim(False, "two (three when symmetric) relaxation phases of many sweeps each; the weights change "
                    "only after the nudged phase", _PROBE),
        "C4": Claim(False, "the label nudges the output and, through the couplings, every hidden state", _PROBE),
    }
    benchmarks = (
        Benchmark("mlp", "mnist", 0.97, ("train.epochs=30", "data.augment=affine", "hp.schedule=cosine",
                                          "hp.activation=sigmoid"),
                  "project target; two recurrently coupled hidden layers (with one, the ce read-out makes the free "
                  "phase trivial); Laborieux et al.'s MLP sigmoid, small random rotations/scalings/shifts "
                  "(data.augment=affine), cosine schedule; activation, batch size, augmentation, schedule and epochs "
                  "chosen on validation accuracy (docs/provenance.md)"),
        Benchmark("deep_cnn", "fashion_mnist", 0.5, ("train.epochs=2", "data.train_limit=6000", "data.test_limit=2000", "model.channels=[8,8,16,16]"),
                  "CPU learning check of the norm-free deep_cnn (the rule's default here): well above chance"),
    )

    def __init__(self, net: Network, hp: EPHParams, info: RunInfo):
        super().__init__(net, hp, info)
        if any(not isinstance(stage.norm, nn.Identity) for stage in net.stages):
            raise ValueError("ep: an energy function has no place for normalisation layers; use model.norm=none")
        self.coupled = list(net.stages if hp.loss == "mse" else net.blocks)
        if not self.coupled:
            raise ValueError("ep with loss=ce needs at least one hidden block")
        self.state_shapes = net.shapes()[:len(self.coupled)]
        self.sigma = ACTIVATIONS[hp.activation]
        self.opt = make_optimizer(net.parameters(), hp, info.epochs * info.steps_per_epoch)

    # --- the energy ------------------------------------------------------------------------------
    def scores(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Class scores of a state: the head's read-out (ce) or the output state itself (mse)."""
        return self.net.head(states[-1]) if self.hp.loss == "ce" else states[-1]

    def cost(self, states: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """The output loss summed over the batch (summed: each sample's dynamics ignore the batch size)."""
        if self.hp.loss == "ce":
            return F.cross_entropy(self.scores(states), y, reduction="sum")
        return 0.5 * (states[-1] - F.one_hot(y, states[-1].shape[1]).to(states[-1].dtype)).pow(2).sum()

    def phi(self, x: torch.Tensor, states: list[torch.Tensor], beta: float, y: torch.Tensor) -> torch.Tensor:
        """Phi(x, s) - beta * cost(s, y), summed over the batch."""
        total = x.new_zeros(())
        below = x
        for stage, s in zip(self.coupled, states):
            total = total + (s * stage.pool(stage.preact(below))).sum()
            below = s
        if beta != 0:
            total = total - beta * self.cost(states, y)
        return total

    def settle(self, x: torch.Tensor, y: torch.Tensor, beta: float, steps: int,
               start: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``steps`` synchronous iterations s <- sigma(dPhi_beta/ds), all layers and samples at once."""
        if start is None:
            start = [x.new_zeros((len(x), *shape)) for shape in self.state_shapes]
        states = [s.detach().requires_grad_(True) for s in start]
        with torch.enable_grad():
            for _ in range(steps):
                grads = torch.autograd.grad(self.phi(x, states, beta, y), states)
                states = [self.sigma(g).detach().requires_grad_(True) for g in grads]
        return [s.detach() for s in states]

    # --- learning --------------------------------------------------------------------------------
    def compute_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Free and nudged phases; set every weight's .grad to minus the EP estimate; return free scores."""
        hp = self.hp
        free = self.settle(x, y, 0.0, hp.free_steps)
        plus = self.settle(x, y, hp.beta, hp.nudged_steps, free)
        if hp.symmetric:
            minus = self.settle(x, y, -hp.beta, hp.nudged_steps, free)
            contrast = (self.phi(x, plus, hp.beta, y) - self.phi(x, minus, -hp.beta, y)) / (2 * hp.beta)
        else:
            contrast = (self.phi(x, plus, hp.beta, y) - self.phi(x, free, 0.0, y)) / hp.beta
        # States are constants here: dPhi/dW_l = s_l s_{l-1}^T, a local correlation at each equilibrium.
        self.opt.zero_grad(set_to_none=True)
        (-contrast / len(y)).backward()
        with torch.no_grad():
            return self.scores(free)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.compute_grads(x, y)
        self.opt.step()
        steps = self.hp.free_steps + self.hp.nudged_steps * (2 if self.hp.symmetric else 1)
        loss = (F.cross_entropy(scores, y) if self.hp.loss == "ce"
                else 0.5 * (scores - F.one_hot(y, scores.shape[1]).to(scores.dtype)).pow(2).sum(1).mean())
        return {"loss": loss, "correct": (scores.argmax(1) == y).sum(), "inference_steps": float(steps)}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Free-phase relaxation (no target), then the read-out of the free equilibrium."""
        y = torch.zeros(len(x), dtype=torch.long, device=x.device)  # unused at beta = 0
        return self.scores(self.settle(x, y, 0.0, self.hp.free_steps))
