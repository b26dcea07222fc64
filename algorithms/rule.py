"""The rule contract: what every learning rule declares and does.

A rule is one file in ``algorithms/rules/`` holding one subclass of :class:`Rule`, registered by
name with :func:`bioplaus.algorithms.registry.register`. The orchestrator only ever talks to this base
class, so adding a rule touches nothing else.

A rule is an ``nn.Module`` that owns the network plus whatever extra state the rule needs
(feedback matrices, auxiliary heads, optimizers): ``state_dict()`` therefore captures everything
needed to reproduce its predictions, and ``.to(device)`` moves all of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bioplaus.algorithms.arch import Network
from bioplaus.algorithms.schedules import SCHEDULES, build_schedule

# The plausibility criteria. Each rule states, for every criterion, whether it holds and which
# test proves the statement (see algorithms/probes.py for the measuring instruments).
CRITERIA: dict[str, str] = {
    "C1": "asymmetric forward/backward weights: no weight transport; the learning signal never reads "
    "the transpose (or any copy) of a later block's forward weights",
    "C2": "local error representation: each block learns from quantities present at that block (its "
    "input, its output, a signal delivered to it); no error is chained through later blocks' weights",
    "C3": "single-phase training: each block is evaluated once per step and no second pass sweeps "
    "the network (no backward sweep, clamped/nudged relaxation or negative-data pass) before updating",
    "C4": "unsupervised hidden blocks: hidden blocks learn without labels or any label-derived error",
    "C5": "spiking communication: blocks exchange binary spike trains, not real-valued activations",
}


@dataclass(frozen=True)
class Claim:
    """One criterion as a rule declares it, with the test that proves the declaration."""

    holds: bool
    """True if the rule satisfies the criterion."""
    why: str
    """One sentence: the mechanism that makes it hold or fail."""
    test: str
    """pytest node id of the test that proves this claim (and fails for a rule where it is false)."""
    probe_cannot_see: str = ""
    """Why the generic probes (``bioplaus.algorithms.criteria``) cannot judge this claim, which ``test`` then
    establishes alone; empty: the probes measure it on every supported architecture and must agree."""


@dataclass(frozen=True)
class Benchmark:
    """An accuracy target a rule declares, run by ``bioplaus bench`` (long; never part of the tests)."""

    arch: str
    dataset: str
    min_test_acc: float
    """The test accuracy the run must reach."""
    overrides: tuple[str, ...] = ()
    """Config overrides of the run (epochs, hyperparameters, ...), e.g. ("train.epochs=5", "hp.lr=1e-3")."""
    note: str = ""
    """Where the target comes from (paper, library figure)."""
    test_selected: str = ""
    """Empty when the settings were declared before any run or chosen on validation accuracy; otherwise how they
    were chosen by reading test accuracy (docs/provenance.md). Such a case still runs, but ``bioplaus bench``
    marks its PASS as not clean evidence until the settings are re-derived on validation."""

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.dataset}"


@dataclass
class OptimHParams:
    """Optimiser hyperparameters shared by rules that update weights with a torch optimiser."""

    lr: float = 1e-3
    """Learning rate."""
    optimizer: str = "adam"
    """One of adam, adamw, sgd."""
    momentum: float = 0.9
    """SGD momentum (ignored by adam/adamw)."""
    weight_decay: float = 0.0
    """L2 weight decay (decoupled for adamw)."""
    schedule: str = "constant"
    """Learning-rate schedule over the whole run: constant, cosine (to zero at the last step) or onecycle
    (warm-up then annealing; see algorithms/schedules.py)."""


@dataclass
class RunInfo:
    """What a rule may know about the run it is trained in (sizes, budget, device, seed)."""

    num_classes: int
    input_shape: tuple[int, ...]
    epochs: int
    steps_per_epoch: int
    device: torch.device
    seed: int


class Rule(nn.Module):
    """Base class of all learning rules.

    Subclasses set the class attributes below and implement :meth:`train_step`. Rules whose block
    update needs nothing from later blocks subclass :class:`BlockLocalRule` instead and implement
    :meth:`block_step`; the layer-parallel pipeline drives them block by block.
    """

    name: ClassVar[str]
    """Registry name, e.g. "bp"."""
    summary: ClassVar[str]
    """One line: what the rule is, with its reference."""
    HParams: ClassVar[type] = OptimHParams
    """Dataclass of the rule's hyperparameters; every field has a default and a docstring."""
    archs: ClassVar[dict[str, str | None]] = {}
    """Architecture name -> None if supported, else the reason it is not."""
    arch_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    """Architecture name -> model settings the rule runs with unless the run sets them (e.g. a per-sample
    norm on deep_cnn, whose own default is batch norm, for a rule whose math forbids batch statistics)."""
    arch_hparams: ClassVar[dict[str, dict[str, Any]]] = {}
    """Architecture name -> hyperparameters the rule runs with there unless the run sets them (where the defaults
    that work on the other networks fail on that one; the rule's docstring says why)."""
    forbidden_norms: ClassVar[dict[str, str]] = {}
    """``model.norm`` value -> why the rule's math cannot use it (refused before training, on any architecture)."""
    forbidden_pools: ClassVar[dict[str, str]] = {}
    """``model.pool`` value -> why the rule's math cannot use it (refused before training, on any architecture)."""
    criteria: ClassVar[dict[str, Claim]] = {}
    """Criterion code (see CRITERIA) -> the rule's claim about it."""
    block_local: ClassVar[bool] = False
    """True if :meth:`block_step` is implemented (the update of a block needs nothing from later blocks)."""
    benchmarks: ClassVar[tuple[Benchmark, ...]] = ()
    """Accuracy targets on real data, run by ``bioplaus bench`` with the cost ratio against bp."""

    def __init__(self, net: Network, hp: Any, info: RunInfo):
        super().__init__()
        self.net = net
        self.hp = hp
        self.info = info

    # --- training -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Update the weights on one batch; return scalar metrics.

        Values are floats or 0-d tensors (tensors avoid a device sync per step). ``loss`` (the batch
        mean of the rule's training objective) is required; ``correct`` (how many of the batch the
        rule classified right while training) is optional and gives the train accuracy.
        """
        raise NotImplementedError

    def block_step(self, index: int, h_in: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Block-local rules: update block ``index`` from its input alone, return its (detached) output.

        ``index`` runs over ``range(len(self.net.stages))``: the hidden blocks, then the head.
        Calling it for every index in order must be equivalent to :meth:`train_step`.
        """
        raise NotImplementedError(f"rule {self.name!r} is not block-local")

    def block_loss(self, index: int) -> torch.Tensor | None:
        """Block-local rules: the training loss of block ``index``'s last :meth:`block_step` (0-d tensor), or
        None if that block has no loss of its own. Summed over blocks it is the ``loss`` that
        :meth:`train_step` returns; the pipeline trainer reports it stage by stage."""
        return None

    def local_heads(self) -> dict[int, list[nn.Module]]:
        """Hidden block index -> the modules of that block's own local head (auxiliary classifiers, local readouts):
        rule state that reads the block's output to form the block's learning signal. The weight-transport probe
        reports transport inside a block's own head apart from transport of other blocks' weights."""
        return {}

    # --- populations (algorithms/population.py) -------------------------------------------------
    population_hparams: ClassVar[tuple[str, ...]] = ()
    """HParams fields, beyond the optimiser's (each member has its own lr, optimizer, momentum, weight decay and
    schedule), that may differ between the members of one stack of a population: :meth:`member_loss` and
    :meth:`member_update` read them from their ``hp`` argument (0-d float64 tensors), never from ``self.hp``, or
    they only shape the rule's buffers when it is built (each member's buffers are its own). Members differing in
    any other field train as separate stacks of the population."""

    def member_loss(self, hp: dict[str, torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Population training: one member's objective, whose gradient with respect to the rule's parameters is the
        update :meth:`train_step` hands its optimiser, and the step's metrics as :meth:`train_step` returns them.

        Runs under torch.func (``functional_call`` with the member's weights, ``grad``, ``vmap`` over the members):
        no ``.backward()``, no optimiser, no in-place change of parameters or buffers, no ``.item()``. A rule that
        does not implement it trains alone (a population of one).
        """
        raise NotImplementedError(f"rule {self.name!r} has no member_loss")

    def member_update(self, grads: dict[str, torch.Tensor], hp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Population training: the gradients the optimiser receives, from :meth:`member_loss`'s (default: as they are)."""
        return grads

    @classmethod
    def population_support(cls, model_cfg: Any) -> str | None:
        """Why this rule cannot train as a population with this architecture config (None: it can)."""
        if cls.member_loss is Rule.member_loss:
            return f"rule {cls.name!r} has no functional member update (Rule.member_loss)"
        step_owner = next(c for c in cls.__mro__ if "train_step" in vars(c))
        loss_owner = next(c for c in cls.__mro__ if "member_loss" in vars(c))
        if step_owner is not loss_owner and issubclass(step_owner, loss_owner):
            return f"rule {cls.name!r} changes train_step but not the member_loss it inherits"
        if not issubclass(cls.HParams, OptimHParams):
            return f"rule {cls.name!r} has no optimiser settings for the batched optimiser"
        if getattr(model_cfg, "norm", "none") == "batch":
            return "batch norm updates its running statistics in place, which a batched member step cannot"
        return None

    # --- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (logits or any monotone score) for a batch."""
        return self.net(x)

    # --- helpers for subclasses ----------------------------------------------------------------
    @classmethod
    def supports(cls, arch: str) -> tuple[bool, str | None]:
        """(supported, reason-if-not) for an architecture name."""
        if arch not in cls.archs:
            return False, f"rule {cls.name!r} does not declare architecture {arch!r}"
        reason = cls.archs[arch]
        return reason is None, reason

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """JSON-able declaration: criteria, architectures, hyperparameters with defaults."""
        return {
            "name": cls.name,
            "summary": cls.summary,
            "block_local": cls.block_local,
            "archs": dict(cls.archs),
            "arch_hparams": {a: dict(v) for a, v in cls.arch_hparams.items()},
            "criteria": {k: dataclasses.asdict(v) for k, v in cls.criteria.items()},
            "hparams": {f.name: _default_of(f) for f in dataclasses.fields(cls.HParams)},
        }


class BlockLocalRule(Rule):
    """Base of the rules whose block update needs nothing from later blocks.

    Subclasses implement :meth:`block_step` (and :meth:`block_loss` where a block has a loss);
    :meth:`train_step` is the loop of :meth:`block_step` over the stages, so a sequential step and the
    layer-parallel pipeline's stage-by-stage step are the same computation by construction.
    """

    block_local = True

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        h = x
        for index in range(len(self.net.stages)):
            h = self.block_step(index, h, y)
        return self.step_metrics(h, y)

    def step_metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """The metrics of the block steps just run (``out``: what the output stage returned), as
        :meth:`train_step` returns them. Default: ``loss``, the stages' :meth:`block_loss` summed in stage
        order (the order the pipeline trainer sums them in)."""
        losses = (self.block_loss(index) for index in range(len(self.net.stages)))
        return {"loss": sum(loss for loss in losses if loss is not None)}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


class ScheduledOptimizer:
    """A torch optimiser and its per-step learning-rate schedule: ``step()`` advances both, so a rule's
    update reads ``opt.zero_grad(); ...; opt.step()`` whatever the schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None):
        self.optimizer, self.scheduler = optimizer, scheduler

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def minimize(self, loss: torch.Tensor) -> None:
        """One gradient step on ``loss``: zero the gradients, backpropagate, step (and the schedule)."""
        self.zero_grad()
        loss.backward()
        self.step()

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups


class PlasticWindow:
    """Which hidden blocks still learn when plasticity is limited to the first ``epochs`` epochs (unsupervised
    rules: learn the features, then freeze them and train only the readout). Each block counts its own
    plastic presentations, a Python int, so a pipeline stage running only some blocks keeps its own count and
    deciding whether a block learns reads no tensor (no device sync per step). ``epochs`` <= 0: always plastic."""

    def __init__(self, epochs: float, steps_per_epoch: int, n_blocks: int):
        self.limit = round(epochs * steps_per_epoch) if epochs > 0 else None
        self.counts = [0] * n_blocks

    def step(self, index: int) -> bool:
        """Whether block ``index`` learns on this presentation (and count it if so)."""
        learn = self.limit is None or self.counts[index] < self.limit
        self.counts[index] += learn
        return learn


def output_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """softmax(logits) - onehot(y): the cross-entropy's gradient with respect to the logits."""
    return logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)


def set_delta_rule_grads(layer: nn.Module, x: torch.Tensor, err: torch.Tensor) -> None:
    """The delta rule of a linear readout as its gradients, for its optimiser to apply: output error ``err``
    times presynaptic activity ``x``, batch-averaged (the layer's own cross-entropy gradient, no autograd)."""
    layer.weight.grad = err.t() @ x / len(x)
    if layer.bias is not None:
        layer.bias.grad = err.mean(0)


def make_optimizer(params, hp: OptimHParams, total_steps: int) -> ScheduledOptimizer:
    """The optimiser and per-step LR schedule :class:`OptimHParams` asks for (over ``total_steps``)."""
    params = [p for p in params if p.requires_grad]
    if hp.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    elif hp.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    elif hp.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {hp.optimizer!r}; use adam, adamw or sgd")
    return ScheduledOptimizer(opt, build_schedule(opt, hp.schedule, total_steps))


def validate_hparams(rule_cls: type[Rule], hp: Any) -> None:
    """Checks shared by all rules' hyperparameters (raise ValueError naming the field)."""
    if isinstance(hp, OptimHParams):
        if hp.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"hp.optimizer={hp.optimizer!r} is not one of adam, adamw, sgd")
        if hp.schedule not in SCHEDULES:
            raise ValueError(f"hp.schedule={hp.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not hp.lr > 0:
            raise ValueError(f"hp.lr={hp.lr} must be > 0")


__all__ = ["CRITERIA", "Benchmark", "BlockLocalRule", "Claim", "OptimHParams", "PlasticWindow", "RunInfo", "Rule",
           "ScheduledOptimizer", "make_optimizer", "output_error", "set_delta_rule_grads", "validate_hparams"]
