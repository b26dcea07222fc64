"""Forward-forward: each block pushes its goodness up for positive data and down for negative data.

Hinton 2022, "The forward-forward algorithm: some preliminary investigations". The label is part of
the input: a *positive* sample is an image with its correct label embedded, a *negative* sample the
same image with a wrong label embedded (drawn uniformly among the other classes, so never the true
one). Every block sees its input normalised to unit root-mean-square (so a block cannot read the
previous block's goodness from the input's length, Hinton's layer normalisation) and maximises, by
gradient descent on its own weights only,

    log sigmoid(alpha * (G_pos - theta)) + log sigmoid(alpha * (theta - G_neg))     (loss=threshold)
    log sigmoid(alpha * (G_pos - G_neg))                                             (loss=symba)

where G is the block's goodness, the mean of its squared output (Hinton's sum of squares divided by
the number of units, so one threshold fits every width). ``loss=symba`` is the symmetric variant of
Lee & Song 2023 (SymBa). With ``negatives=k`` every sample has k negative copies with k distinct wrong
labels, and SymBa's two-way contrast becomes a softmax over the k+1 copies,

    log softmax_0(alpha * [G_pos, G_neg_1, ..., G_neg_k])                                (loss=symba)

which weights the wrong labels the block finds hardest (Hinton's "hard negatives", without a prediction
pass to pick them). On conv blocks ``goodness=position`` takes one goodness per spatial position (over
the channels there) and contrasts each position on its own.

The positive and negative copies of the batch travel through the network together (concatenated
along the batch), so each weight layer is evaluated once per step, on k+1 times the batch.

Prediction: ``readout=goodness`` embeds every label in turn and picks the one with the largest
goodness summed over all blocks (one pass per class); ``readout=linear`` trains the output block as
a softmax readout (cross-entropy on its detached input) on a third, *neutral* copy of the batch (every
label embedded at 1/C strength), and predicts in one pass. With ``readout=goodness`` the output
block is not used and not trained.

Label embedding: ``embed=pattern`` adds a fixed random image per class (seeded; works for conv
blocks, whose units each see only a patch of the image); ``embed=pixels`` overwrites the first C
input values with the one-hot label (Hinton's MNIST setup; on conv nets only the top-left corner
sees it).

On ``deep_cnn`` the rule runs ``loss=symba alpha=4 goodness=position`` (``arch_hparams``). With Hinton's
threshold loss, the blocks above the first reach the loss's non-discriminating optimum, every sample's goodness
at theta (block loss 2 ln 2), by emitting a near-constant map: measured on digits, four blocks of 16-16-32-32
channels, 3 epochs, the last block's between-class share of its activity falls from 2.6 % at initialisation to
0.07 %, and the linear read-out stays at chance (val 0.09; lr 3e-4 and 3e-3 the same). SymBa's loss depends
only on G_pos - G_neg, so no sample-independent output lowers it; one goodness per position lets each position
of a conv map, whose units all see the same patch, contrast its own input (val 0.64 on the same run).

Reference: Hinton 2022 (per-layer logistic loss on goodness, positive and negative data, layer-normalised
inputs). Conventions (a constant mapping, tested): goodness is the mean rather than the sum of squares (theta
rescales), inputs scaled to unit RMS rather than unit L2 norm, loss the sum of the positive and negative means.
Deviations, not options: all layers are trained on every batch, each on the previous layer's current output,
where Hinton's reference trains layer by layer (one layer to convergence, then the next); negative labels are
drawn uniformly, not from the network's own predictions; ``embed=pattern`` (default) and ``readout=linear``
(default) are the project's, Hinton's MNIST setup is ``embed=pixels readout=goodness``.
Parity: ``tests/test_parity.py::test_ff_parity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bioplaus.algorithms.arch import Network
from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import Benchmark, BlockLocalRule, Claim, OptimHParams, RunInfo, make_optimizer

_PROBE = "tests/test_criteria.py::test_claims_match_probes[ff]"
_OWN = "tests/test_local_rules.py"


@dataclass
class FFHParams(OptimHParams):
    """Forward-forward: the optimiser of every block (shared fields in OptimHParams) and the FF objective."""

    theta: float = 2.0
    """Goodness threshold (loss=threshold): positive goodness is pushed above it, negative below."""
    alpha: float = 1.0
    """Sharpness of the logistic on goodness differences (SymBa uses 4)."""
    loss: str = "threshold"
    """threshold (Hinton 2022) or symba (Lee & Song 2023: contrast G_pos - G_neg directly)."""
    readout: str = "linear"
    """linear (softmax readout on a neutral label, one pass) or goodness (one pass per class, output block unused;
    no train accuracy is reported then, since it would cost a pass per class)."""
    embed: str = "pattern"
    """Label embedding: pattern (add a fixed random image per class) or pixels (first C inputs = one-hot)."""
    label_scale: float = 1.0
    """Amplitude of the embedded label (pattern std, or the one-hot value) relative to the normalised image."""
    goodness: str = "layer"
    """What one goodness is taken over: layer (the whole block output, Hinton) or position (conv blocks: the
    channels at each spatial position, each position its own positive/negative contrast, the loss averaged
    over positions; on an mlp the two are the same)."""
    negatives: int = 1
    """Wrong labels per sample, each a negative copy of the batch (distinct labels, 1 to C-1). With k > 1,
    loss=symba becomes a softmax over the goodness of the positive and its k negatives (k = 1: SymBa itself)
    and loss=threshold averages the k negative terms. Costs k+1 (+1 neutral) copies per step."""

    def validate(self) -> None:
        if self.loss not in ("threshold", "symba"):
            raise ValueError(f"hp.loss={self.loss!r} is not one of threshold, symba")
        if self.readout not in ("goodness", "linear"):
            raise ValueError(f"hp.readout={self.readout!r} is not one of goodness, linear")
        if self.goodness not in ("layer", "position"):
            raise ValueError(f"hp.goodness={self.goodness!r} is not one of layer, position")
        if self.embed not in ("pattern", "pixels"):
            raise ValueError(f"hp.embed={self.embed!r} is not one of pattern, pixels")
        if not self.alpha > 0:
            raise ValueError(f"hp.alpha={self.alpha} must be > 0")
        if self.negatives < 1:
            raise ValueError(f"hp.negatives={self.negatives} must be >= 1 (wrong labels per sample)")


def rms_normalize(h: torch.Tensor) -> torch.Tensor:
    """Each sample scaled to unit root-mean-square over all its features (Hinton's layer normalisation)."""
    return h / h.pow(2).mean(dim=tuple(range(1, h.dim())), keepdim=True).add(1e-8).sqrt()


def goodness(h: torch.Tensor) -> torch.Tensor:
    """Mean squared activity of each sample's block output."""
    return h.pow(2).mean(dim=tuple(range(1, h.dim())))


@register
class ForwardForward(BlockLocalRule):
    name = "ff"
    summary = "forward-forward: per-block goodness up for positive, down for negative (wrong-label) data (Hinton 2022)"
    HParams = FFHParams
    archs = {"mlp": None, "cnn": None, "deep_cnn": None,
             "resnet20": "not supported: a block's goodness is a sum of squared activities, and the identity shortcut "
                         "hands the previous block's (normalised-away) goodness straight to the next (Hinton 2022 "
                         "normalises between layers for this reason); not implemented",
             "resnet18": "not supported: see resnet20"}
    # Every block input is already normalised per sample (Hinton's layer normalisation).
    arch_defaults = {"deep_cnn": {"norm": "none"}}
    # Threshold goodness fails on the deep conv stack (module docstring): SymBa's contrast with one goodness per
    # position, SymBa's sharpness 4, as the project's cnn CIFAR-10 case runs.
    arch_hparams = {"deep_cnn": {"loss": "symba", "alpha": 4.0, "goodness": "position"}}
    forbidden_norms = {"batch": "batch statistics would mix positive and negative samples, so a sample's goodness "
                                "would depend on the other samples of the batch"}
    criteria = {
        "C1": Claim(True, "each block's gradient is taken w.r.t. its own weights from its own goodness; no weight of "
                    "any other block is read", _PROBE),
        "C2": Claim(True, "the objective of a block is a function of that block's output alone; inputs are detached",
                    _PROBE),
        "C3": Claim(False, "every step also runs a negative-data pass (the batch with wrong labels) and each update "
                    "contrasts it with the positive pass; the two run concatenated in one forward evaluation, but by "
                    "the C3 wording a negative-data pass is a second phase",
                    f"{_OWN}::test_ff_negative_pass_is_a_second_phase"),
        "C4": Claim(False, "the label is embedded in the input: hidden blocks learn which label goes with the image",
                    _PROBE),
    }
    benchmarks = (
        Benchmark("mlp", "mnist", 0.975, ("train.epochs=60", "hp.loss=symba", "hp.alpha=128", "hp.negatives=9",
                                          "hp.readout=goodness", "hp.schedule=cosine", "data.augment=affine"),
                  "project target; the loss, alpha, negatives, readout, augmentation, schedule and epochs chosen on "
                  "validation accuracy (docs/provenance.md); Hinton 2022: 98.6% with 4x2000 units, 60k images"),
        Benchmark("mlp", "fashion_mnist", 0.85, ("train.epochs=20", "hp.loss=symba", "hp.alpha=4", "hp.readout=goodness"),
                  "bp target 0.88; the loss, SymBa's alpha and the readout chosen on validation accuracy "
                  "(docs/provenance.md)"),
        Benchmark("cnn", "cifar10", 0.55, ("model.channels=[128,256,512]", "hp.lr=5e-4", "train.epochs=16",
                                            "hp.loss=symba", "hp.alpha=4", "hp.goodness=position",
                                            "hp.schedule=cosine"),
                  "project target; 128-256-512 channels and one goodness per position, since the default 32-64-128 "
                  "net and layer-wide goodness fall well short; hours on CPU (docs/benchmarks.md)",
                  test_selected="channels, lr, epochs and goodness picked from a 12-configuration table with a test column (docs/provenance.md)"),
        Benchmark("deep_cnn", "fashion_mnist", 0.5, ("train.epochs=2", "data.train_limit=6000", "data.test_limit=2000", "model.channels=[8,8,16,16]"),
                  "CPU learning check of the norm-free deep_cnn (the rule's default here): well above chance"),
    )

    def __init__(self, net: Network, hp: FFHParams, info: RunInfo):
        super().__init__(net, hp, info)
        c, dev = info.num_classes, info.device
        if c < 2:
            raise ValueError("forward-forward needs at least two classes to build negative data")
        if hp.negatives > c - 1:
            raise ValueError(f"hp.negatives={hp.negatives}: only {c - 1} wrong labels exist with {c} classes")
        gen = torch.Generator().manual_seed(info.seed)
        self.register_buffer("patterns", hp.label_scale * torch.randn((c, *info.input_shape), generator=gen).to(dev))
        # The negative labels are the only random draw; they belong to stage 0 (its own RNG, seeded by the run).
        self.neg_gen = torch.Generator(device=dev).manual_seed(info.seed)
        total = info.epochs * info.steps_per_epoch
        n_trained = len(net.stages) if hp.readout == "linear" else len(net.blocks)
        self.opts = [make_optimizer(stage.parameters(), hp, total) for stage in net.stages[:n_trained]]
        self._metrics: dict[int, torch.Tensor] = {}
        self._correct: torch.Tensor | None = None

    # --- label embedding ------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The images with ``labels`` embedded; ``None`` embeds the neutral label (every class at 1/C)."""
        c = self.info.num_classes
        if self.hp.embed == "pattern":
            p = self.patterns.mean(0, keepdim=True) if labels is None else self.patterns[labels]
            return x + p
        flat = x.flatten(1).clone()
        onehot = (torch.full((len(x), c), 1.0 / c, device=x.device) if labels is None
                  else F.one_hot(labels, c).to(x.dtype))
        flat[:, :c] = self.hp.label_scale * onehot
        return flat.view_as(x)

    def negative_labels(self, y: torch.Tensor) -> torch.Tensor:
        """``hp.negatives`` wrong labels per sample, shape (k, n): distinct, uniform over the other C-1 classes
        (never the true one)."""
        c, k = self.info.num_classes, self.hp.negatives
        if k == 1:  # one draw per sample: the stream recorded one-negative runs were made with
            shift = torch.randint(1, c, (1, *y.shape), generator=self.neg_gen, device=y.device)
        else:  # k distinct shifts per sample: the first k of a random order of 1..C-1
            keys = torch.rand((len(y), c - 1), generator=self.neg_gen, device=y.device)
            shift = keys.argsort(1)[:, :k].T + 1
        return (y + shift) % c

    # --- training -------------------------------------------------------------------------------
    def ff_loss(self, h: torch.Tensor, n: int) -> torch.Tensor:
        k = self.hp.negatives
        h = h[:(k + 1) * n]
        if self.hp.goodness == "position" and h.dim() == 4:  # (copies x n, C, H, W): one goodness per position
            g = h.pow(2).mean(1).view(k + 1, n, -1)
        else:
            g = goodness(h).view(k + 1, n)  # row 0 positive, rows 1..k negatives
        a, theta = self.hp.alpha, self.hp.theta
        if self.hp.loss == "symba":  # -log softmax of the positive among its k+1 copies; for k = 1 that is SymBa's
            # softplus(-a (G+ - G-)), kept in that form so one-negative runs give the floats they always gave
            return torch.logsumexp(a * (g - g[0]), 0).mean() if k > 1 else F.softplus(-a * (g[0] - g[1])).mean()
        return (F.softplus(-a * (g[0] - theta)) + F.softplus(a * (g[1:] - theta)).mean(0)).mean()

    def block_step(self, index: int, h_in: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Stage ``index`` on its input; hidden stages take and return the stacked [positive; k negatives(; neutral)]
        copies of the batch (stage 0 builds them from the images), the output block reads the neutral copy."""
        n, k = len(y), self.hp.negatives
        if index == 0:
            copies = [self.embed(h_in, y), *(self.embed(h_in, neg) for neg in self.negative_labels(y))]
            if self.hp.readout == "linear":
                copies.append(self.embed(h_in, None))
            h_in = torch.cat(copies)
        h_in = h_in.detach()
        if index == len(self.net.blocks):  # output block
            if self.hp.readout != "linear":
                return h_in  # prediction by goodness: the output block takes no part
            logits = self.net.head(rms_normalize(h_in[(k + 1) * n:]))
            loss = F.cross_entropy(logits, y)
            self._correct = (logits.argmax(1) == y).sum()
            out = logits
        else:
            out = self.net.stages[index](rms_normalize(h_in))
            loss = self.ff_loss(out, n)
        self.opts[index].minimize(loss)
        self._metrics[index] = loss.detach()
        return out.detach()

    def block_loss(self, index: int) -> torch.Tensor | None:
        return self._metrics.get(index)

    def step_metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics = super().step_metrics(out, y)
        if self._correct is not None:  # readout=goodness trains no readout, so it has no train accuracy
            metrics["correct"] = self._correct
        return metrics

    # --- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.hp.readout == "linear":
            h = self.embed(x, None)
            for block in self.net.blocks:
                h = block(rms_normalize(h))
            return self.net.head(rms_normalize(h))
        scores = []
        for c in range(self.info.num_classes):  # one pass per label: memory of one batch at a time
            h = self.embed(x, torch.full((len(x),), c, device=x.device, dtype=torch.long))
            g = x.new_zeros(len(x))
            for block in self.net.blocks:
                h = block(rms_normalize(h))
                g = g + goodness(h)
            scores.append(g)
        return torch.stack(scores, 1)
