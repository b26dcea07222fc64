"""STDP: unsupervised spike-timing-dependent plasticity in a spiking network, in the spirit of Diehl & Cook 2015.

Diehl & Cook 2015, "Unsupervised learning of digit recognition using spike-timing-dependent plasticity"
(Front. Comput. Neurosci. 9:99). Every hidden block of the ``mlp`` is a layer of leaky integrate-and-fire
neurons simulated for ``hp.steps`` discrete time steps (kernels in ``algorithms/spiking.py``):

* input: each image (back to [0, 1] intensities, see ``to_intensity``) becomes Poisson spike trains with
  per-step probability ``max_rate * intensity`` (rate coding), or one spike per pixel (latency coding);
* a block's input current is its weight layer applied to the incoming spike train (one matrix product over
  all T steps; the bias is held at zero), its output is its own spike train: blocks exchange binary spike
  trains only, the readout sees spike counts;
* competition: a hard winner-take-all (at most one spike per sample and step, the largest overshoot), plus
  lateral inhibition of the other neurons after a spike (Diehl & Cook's inhibitory population, reduced);
* homeostasis: each neuron's threshold rises when it fires above the layer's target rate and relaxes when
  it fires below it (multiplicatively, so it needs no knowledge of the input's scale): the adaptive threshold
  that stops a few neurons from winning everything. Thresholds start, on the first training batch, at the
  mean peak of the free (non-spiking) membrane, and are frozen at evaluation;
* plasticity: pair STDP from nearest-spike traces (``stdp_update``), potentiation at a post spike by the
  presynaptic trace, depression at a pre spike by the postsynaptic trace; weights are excitatory, clipped
  to [0, w_max], and each neuron's incoming weights are renormalised to a fixed sum after every update
  (Diehl & Cook's weight normalisation). Updates are summed over the batch and applied once per batch
  after the presentation (Diehl & Cook apply them online within the presentation; with learning rates
  this small the difference is second order, and it lets a batch run as matrix products).

On the ``cnn`` every block is a convolutional layer of LIF neurons (Kheradpisheh et al. 2018, "STDP-based
spiking deep convolutional neural networks for object recognition", Neural Networks 99:56-67): the neurons of
a feature map share one kernel and one threshold, and

* competition is per position: the winner-take-all and the lateral inhibition act across the feature maps at
  each location (every sample x position is one competing group: Kheradpisheh's local inhibition, so the maps
  come to code different features of the same patch); homeostasis holds each map near ``target_spikes / maps``
  spikes per sample and position;
* STDP adds every position's pre/post pairs into the shared kernel (``conv_stdp_update``, exactly the fully
  connected rule on each k x k patch), and each kernel is renormalised to the fixed sum;
* pooling of spike trains: the block's max pooling by 2 applied to the binary trains at every step, so a
  pooled unit spikes whenever one of its window does and stays binary (Kheradpisheh pool the first spike of
  a window: the same OR for neurons that fire once).

Kheradpisheh's net differs where this project's spiking kernels are shared with the fully connected rule:
their IF neurons fire at most once on DoG-filtered latency-coded input and only the earliest winner of each
map updates its kernel; here LIF neurons, rate or latency coding of the raw intensities, and every spike's
pairs count. Their readout is an SVM on the last layer's pooled potentials; here it is this rule's own
readout on the last pooled layer's spike counts (every map x position a readout input).

Nothing a hidden block does reads a label, an error or another block's weights. The readout (the
architecture's output block, on the last spiking layer's spike counts) is declared by ``hp.readout``:

* ``label`` (Diehl & Cook): each neuron is labelled with the class it responded to most (spike counts per
  class, averaged over a sliding window of ``label_window`` training samples); a class's score is the mean
  count of its neurons. The labelling is written into the output block's weights (1/n_c for the n_c neurons
  of class c), so the network's own head computes it;
* ``delta``: a linear softmax classifier on the per-sample standardised spike counts, trained by the delta
  rule ΔW = -(softmax(Wz + b) - onehot(y)) z^T with the shared optimiser settings (``hp.lr`` ...).

No autograd anywhere: the criteria are proved by this rule's own tests (``tests/test_stdp.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bioplaus.algorithms.arch import Network
from bioplaus.algorithms.registry import register
from bioplaus.algorithms.rule import (Benchmark, BlockLocalRule, Claim, OptimHParams, PlasticWindow, RunInfo,
                                      make_optimizer, output_error, set_delta_rule_grads)
from bioplaus.algorithms.spiking import (conv_stdp_update, from_per_position, latency_encode, lif_run, per_position,
                                         poisson_encode, stdp_update, to_intensity)

_OWN = "tests/test_stdp.py"
_NO_NORM = ("a normalisation layer would turn the binary spike trains between blocks into real values; spiking "
            "layers keep their rates with homeostasis instead")


@dataclass
class STDPHParams(OptimHParams):
    """STDP: simulation, neuron, plasticity and readout settings; the shared optimiser fields drive the delta
    readout only (``readout=delta``)."""

    steps: int = 40
    """Simulation time steps T per presented sample (training and evaluation)."""
    encoding: str = "poisson"
    """Input coding: poisson (rate coding) or latency (one spike per pixel, earlier when brighter)."""
    max_rate: float = 0.25
    """Poisson coding: spike probability per step of a pixel at full intensity."""
    tau_mem: float = 10.0
    """Membrane time constant of the LIF neurons, in steps."""
    refractory: int = 2
    """Refractory period after a spike, in steps."""
    wta: bool = True
    """Hard winner-take-all: at most one neuron of a layer spikes per sample and step."""
    inhibition: float = 0.5
    """Lateral inhibition: each spike lowers every other neuron's membrane by this fraction of its threshold."""
    target_spikes: float = 10.0
    """Homeostasis: target number of spikes per sample of a whole layer (each neuron aims at target/width); in a
    conv layer per sample and position, across its maps (each map aims at target/maps there)."""
    homeostasis_rate: float = 0.05
    """Homeostasis: per-batch step of log-threshold towards the target rate (0 freezes thresholds)."""
    tau_pre: float = 4.0
    """STDP: presynaptic trace time constant, in steps (the potentiation window)."""
    tau_post: float = 4.0
    """STDP: postsynaptic trace time constant, in steps (the depression window)."""
    eta_post: float = 0.02
    """STDP: potentiation rate (per post spike, times the presynaptic trace)."""
    eta_pre: float = 5e-3
    """STDP: depression rate (per pre spike, times the postsynaptic trace)."""
    x_tar: float = 0.0
    """STDP: presynaptic trace target subtracted at potentiation (Diehl & Cook's offset; >0 depresses inputs
    silent before a post spike)."""
    w_max: float = 1.0
    """Upper bound of a weight (weights are excitatory: lower bound 0)."""
    w_mean: float = 0.1
    """Weight normalisation: each neuron's (conv: each kernel's) incoming weights sum to w_mean * fan_in (Diehl &
    Cook: 78/784)."""
    readout: str = "label"
    """label (Diehl & Cook neuron labelling by class response) or delta (linear delta-rule readout)."""
    label_window: float = 5000.0
    """Label readout: class responses are averaged over roughly this many recent training samples."""
    plastic_epochs: float = 0.0
    """Hidden plasticity (STDP and homeostasis) only during the first this many epochs, then frozen while the
    readout keeps learning (Diehl & Cook label a frozen network); 0: plastic throughout."""

    def validate(self) -> None:
        if self.encoding not in ("poisson", "latency"):
            raise ValueError(f"hp.encoding={self.encoding!r} is not one of poisson, latency")
        if self.readout not in ("label", "delta"):
            raise ValueError(f"hp.readout={self.readout!r} is not one of label, delta")
        if self.steps < 1 or self.refractory < 0:
            raise ValueError("hp.steps must be >= 1 and hp.refractory >= 0")
        if not (0 < self.max_rate <= 1) or not self.tau_mem > 0 or not self.target_spikes > 0:
            raise ValueError("hp.max_rate must be in (0, 1], hp.tau_mem and hp.target_spikes > 0")
        if not (0 < self.w_mean < self.w_max) or self.label_window <= 0:
            raise ValueError("need 0 < hp.w_mean < hp.w_max and hp.label_window > 0")
        if min(self.inhibition, self.homeostasis_rate, self.eta_post, self.eta_pre, self.tau_pre, self.tau_post,
               self.plastic_epochs) < 0:
            raise ValueError("hp.inhibition, homeostasis_rate, eta_post, eta_pre, tau_pre, tau_post, plastic_epochs "
                             "must be >= 0")


@register
class STDP(BlockLocalRule):
    name = "stdp"
    summary = ("LIF spiking layers with trace STDP, winner-take-all, adaptive thresholds and weight "
               "normalisation; class-labelling or delta-rule readout (Diehl & Cook 2015)")
    HParams = STDPHParams
    archs = {
        "mlp": None,
        "cnn": None,
        "deep_cnn": "not supported: the conv STDP layers are trained all at once, and already a second STDP conv "
                    "layer on the cnn learns little (digits val 0.58 with channels [16,32] against 0.88 with [16]); "
                    "Kheradpisheh et al. 2018 train a deep stack one layer at a time, each after the one below has "
                    "converged, a layer-wise schedule this rule does not have",
        "resnet20": "not supported: a residual sum of two spike trains is not a spike train (coinciding spikes add "
                    "to 2), and a spiking residual block would need its own neuron model (e.g. Fang et al. 2021's "
                    "SEW ResNet)",
        "resnet18": "not supported: see resnet20",
    }
    forbidden_norms = dict.fromkeys(("batch", "group", "layer"), _NO_NORM)
    forbidden_pools = {"avg": "an average of binary spike trains is not a spike train; spike-train pooling is the "
                              "max (a pooled unit spikes when any unit of its window does)"}
    criteria = {
        "C1": Claim(True, "a hidden update reads only its own layer's pre/post spike trains; the readout's update "
                    "reads only its own input and output", f"{_OWN}::test_updates_depend_on_nothing_later"),
        "C2": Claim(True, "no error reaches a hidden layer; the readout forms its own from its output and the label",
                    f"{_OWN}::test_updates_depend_on_nothing_later"),
        "C3": Claim(True, "each layer is simulated once per batch and updated from that single presentation",
                    f"{_OWN}::test_single_phase", probe_cannot_see="a presentation is hp.steps time steps of the "
                    "spiking simulation, each evaluating the weight layer, which the pass-counting probe counts as passes"),
        "C4": Claim(True, "hidden plasticity is STDP on pre/post spike traces: no label, no error, no backward pass",
                    f"{_OWN}::test_hidden_updates_use_no_label_and_no_error"),
        "C5": Claim(True, "each block receives and emits binary spike trains (pooled by max, still binary); the "
                    "readout sees spike counts",
                    f"{_OWN}::test_blocks_exchange_binary_spike_trains"),
    }
    benchmarks = (
        Benchmark("mlp", "mnist", 0.90, ("train.epochs=8", "model.widths=[6400]", "hp.readout=delta", "hp.lr=3e-3",
                                          "hp.schedule=constant", "hp.plastic_epochs=1"),
                  "project target; anchors ~90% spikingjelly FC STDP, 95% Diehl & Cook (6,400 neurons, 60k images); "
                  "10,000 training images here; STDP for 1 epoch, then the readout alone, which beats plastic "
                  "throughout; readout lr and schedule, plastic epochs, width and epochs chosen on validation "
                  "accuracy (docs/provenance.md)"),
        Benchmark("mlp", "fashion_mnist", 0.75, ("train.epochs=4", "model.widths=[6400]", "hp.readout=delta",
                                                  "hp.lr=3e-3", "hp.schedule=cosine", "hp.plastic_epochs=1"),
                  "project target; STDP for 1 epoch, then the readout on the frozen layer (with STDP throughout, "
                  "validation is best at epoch 1 and 9 pt lower); readout lr and schedule, plastic epochs, width and "
                  "epochs chosen on validation accuracy (docs/provenance.md)"),
        Benchmark("cnn", "mnist", 0.80, ("train.epochs=2", "data.train_limit=1000", "data.test_limit=500",
                                          "model.channels=[16]", "model.kernel=5", "train.batch_size=32", "hp.steps=20",
                                          "hp.readout=delta", "hp.lr=3e-3", "hp.plastic_epochs=1", "hp.x_tar=0.3"),
                  "CPU learning check of convolutional STDP on 900 images (Kheradpisheh et al. 2018: 98.4% with three "
                  "conv STDP layers and an SVM on 60,000); x_tar 0.3 chosen on digits validation (docs/benchmarks.md)"),
    )

    def __init__(self, net: Network, hp: STDPHParams, info: RunInfo):
        super().__init__(net, hp, info)
        with torch.no_grad():
            for block in net.blocks:
                w = block.layer.weight
                if isinstance(block.layer, nn.Conv2d) and (block.layer.stride != (1, 1) or block.layer.groups != 1):
                    raise ValueError("stdp: conv layers must have stride 1 and one group (conv_stdp_update)")
                w.uniform_(0.0, 0.3 * hp.w_max)  # Diehl & Cook's initial range, then normalised
                self._normalise(w)
                if block.layer.bias is not None:
                    block.layer.bias.zero_()  # the input current is W s: no bias, it stays zero
            for p in (p for block in net.blocks for p in block.parameters()):
                p.requires_grad_(False)  # no gradient ever reaches a spiking layer
        for i, block in enumerate(net.blocks):
            # Per-neuron firing threshold (0 = not yet initialised; set from the first training batch).
            self.register_buffer(f"threshold{i}", torch.zeros(block.layer.weight.shape[0]))
        self.plastic = PlasticWindow(hp.plastic_epochs, info.steps_per_epoch, len(net.blocks))
        width = net.head.layer.in_features
        self.register_buffer("class_response", torch.zeros(info.num_classes, width))  # label readout statistics
        self.register_buffer("class_seen", torch.zeros(info.num_classes))
        if hp.readout == "label":
            with torch.no_grad():
                net.head.layer.weight.zero_()
                if net.head.layer.bias is not None:
                    net.head.layer.bias.zero_()
            net.head.requires_grad_(False)
            self.head_opt = None
        else:
            self.head_opt = make_optimizer(net.head.parameters(), hp, info.epochs * info.steps_per_epoch)
        self.conv = bool(net.blocks) and isinstance(net.blocks[0].layer, nn.Conv2d)
        self._ready = [False] * len(net.blocks)  # thresholds known to be initialised (Python-side cache)
        self._loss = torch.zeros(())
        self._correct = torch.zeros(())

    def _normalise(self, w: torch.Tensor) -> None:
        """Clip to [0, w_max] and rescale every neuron's (conv: kernel's) incoming weights to sum to
        w_mean * fan_in."""
        w.clamp_(0.0, self.hp.w_max)
        sums = w.flatten(1).sum(1).view(-1, *[1] * (w.dim() - 1))
        w.mul_(self.hp.w_mean * w[0].numel() / sums.clamp_min(1e-12))
        w.clamp_(max=self.hp.w_max)

    # --- the spiking layers ----------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> input spike trains (T, B, pixels), or (T, B, C, H, W) for conv layers."""
        intensity = to_intensity(x) if self.conv else to_intensity(x).flatten(1)
        if self.hp.encoding == "latency":
            return latency_encode(intensity, self.hp.steps)
        return poisson_encode(intensity, self.hp.steps, self.hp.max_rate)

    def layer_run(self, index: int, spikes_in: torch.Tensor, learn: bool) -> torch.Tensor:
        """Simulate spiking layer ``index`` on its input spike trains (T, B, M) or (T, B, C, H, W); if ``learn``,
        apply STDP and homeostasis from the same presentation. Returns its (pooled) spike trains."""
        hp = self.hp
        block = self.net.blocks[index]
        w = block.layer.weight
        steps, n_batch = spikes_in.shape[:2]
        current = block.layer(spikes_in.flatten(0, 1))  # one product / convolution for all T steps (bias 0)
        current = current.view(steps, n_batch, *current.shape[1:])
        rows = per_position(current) if self.conv else current  # the groups that compete: (T, groups, neurons)
        thr = getattr(self, f"threshold{index}")
        if not self._ready[index] and not bool((thr > 0).all()):
            thr.copy_(self._initial_threshold(rows).expand_as(thr))
        self._ready[index] = True  # checked once (a device sync), never again per step
        spike_rows = lif_run(rows, thr, tau_mem=hp.tau_mem, refractory=hp.refractory, wta=hp.wta,
                             inhibition=hp.inhibition)
        spikes = (from_per_position(spike_rows, n_batch, *current.shape[3:]).contiguous() if self.conv
                  else spike_rows)
        if learn:
            rates = dict(tau_pre=hp.tau_pre, tau_post=hp.tau_post, eta_post=hp.eta_post, eta_pre=hp.eta_pre,
                         x_tar=hp.x_tar)
            if self.conv:
                dw = conv_stdp_update(spikes_in, spikes, tuple(w.shape), padding=block.layer.padding[0], **rates)
            else:
                dw = stdp_update(spikes_in, spikes, **rates)
            w.add_(dw)
            self._normalise(w)
            # Homeostasis: log-threshold moves with the neuron's rate (per sample, and per position in a conv
            # layer) relative to its target, clipped so one batch where a neuron wins everything cannot throw
            # its threshold out of range.
            rate = spike_rows.sum((0, 1)) / spike_rows.shape[1]
            target = hp.target_spikes / w.shape[0]
            thr.mul_(torch.exp(hp.homeostasis_rate * (rate / target - 1.0).clamp(-1.0, 4.0)))
        if self.conv:  # spike-train pooling: max pooling of binary trains, step by step (still binary)
            pooled = block.pool(spikes.flatten(0, 1))
            spikes = pooled.view(steps, n_batch, *pooled.shape[1:])
        return spikes

    def _initial_threshold(self, rows: torch.Tensor) -> torch.Tensor:
        """First training batch: the mean peak of the free (non-spiking) membrane over all neurons, in a conv
        layer over the positions that receive any input (blank background would otherwise pull it to zero)."""
        decay = math.exp(-1.0 / self.hp.tau_mem)
        free, peak = torch.zeros_like(rows[0]), torch.zeros_like(rows[0])
        for t in range(rows.shape[0]):
            free = free * decay + rows[t]
            peak = torch.maximum(peak, free)
        if self.conv:
            peak = peak[peak.amax(1) > 0]
        return peak.mean().nan_to_num(0.0).clamp_min(1e-6)

    # --- the readout -------------------------------------------------------------------------------
    def features(self, spikes: torch.Tensor) -> torch.Tensor:
        """Readout input: per-sample spike counts (label) or their per-sample standardisation (delta)."""
        counts = spikes.sum(0).flatten(1)
        return counts if self.hp.readout == "label" else F.layer_norm(counts, counts.shape[1:])

    def _relabel(self) -> None:
        """Label readout: each neuron that ever spiked is assigned the class with its highest mean response;
        the head's row c averages the counts of class c's neurons."""
        rate = self.class_response / self.class_seen.clamp_min(1e-12).unsqueeze(1)
        label = rate.argmax(0)
        active = self.class_response.sum(0) > 0
        assign = F.one_hot(label, rate.shape[0]).t().to(rate.dtype) * active.to(rate.dtype)
        self.net.head.layer.weight.copy_(assign / assign.sum(1, keepdim=True).clamp_min(1.0))

    def readout_step(self, spikes: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.features(spikes)
        head = self.net.head.layer
        logits = head(z)
        self._loss = F.cross_entropy(logits, y)
        self._correct = (logits.argmax(1) == y).sum()
        if self.hp.readout == "label":
            onehot = F.one_hot(y, logits.shape[1]).to(z.dtype)
            keep = math.exp(-len(y) / self.hp.label_window)  # sliding window of recent samples
            self.class_response.mul_(keep).add_(onehot.t() @ z)
            self.class_seen.mul_(keep).add_(onehot.sum(0))
            self._relabel()
        else:  # delta rule: output error times presynaptic activity
            set_delta_rule_grads(head, z, output_error(logits, y))
            opt = self.head_opt
            opt.step()
            opt.zero_grad(set_to_none=True)
        return logits

    # --- the contract ------------------------------------------------------------------------------
    def block_step(self, index: int, h_in: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Stage ``index``. Spike trains travel between stages batch-first, (B, T, N); stage 0 gets the images."""
        with torch.no_grad():
            if index < len(self.net.blocks):  # unsupervised: y is not read
                spikes_in = self.encode(h_in) if index == 0 else h_in.transpose(0, 1)
                return self.layer_run(index, spikes_in, learn=self.plastic.step(index)).transpose(0, 1)
            spikes = self.encode(h_in) if index == 0 else h_in.transpose(0, 1)  # no hidden block: read the input
            return self.readout_step(spikes, y)

    def block_loss(self, index: int) -> torch.Tensor | None:
        return self._loss if index == len(self.net.stages) - 1 else None  # hidden layers learn without a loss

    def step_metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self._loss, "correct": self._correct}

    @torch.no_grad()
    def spike_trains(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Spike trains (T, B, N) of the input encoding and of every spiking layer, without learning."""
        trains = [self.encode(x)]
        for index in range(len(self.net.blocks)):
            trains.append(self.layer_run(index, trains[-1], learn=False))
        return trains

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head.layer(self.features(self.spike_trains(x)[-1]))
