"""STDP on a spiking network: the kernels, the rule's criteria and learning on digits.

* kernels (algorithms/spiking.py): the STDP window on two neurons (pre shortly before post potentiates,
  after it depresses, and less so the further apart), LIF leak, threshold, refractoriness and
  winner-take-all, Poisson and latency coding;
* the rule: block steps == train step, homeostasis and weight normalisation do what they say;
* the criteria, proved here because the rule computes its updates by hand (the autograd probes cannot
  see them), each with bp (on the same architecture) as the negative control on which the same instrument detects
  the violation:
  - C1/C2: no hidden update changes when every later stage's weights are re-drawn;
  - C3: every weight layer evaluated exactly once per step and nothing from later stages;
  - C4: hidden updates identical under other labels, need no label at all, and no autograd graph is built
    (no backward pass is possible);
  - C5: every block receives and emits binary spike trains;
* convolutional STDP (``cnn``): the kernel STDP is the fully connected rule on every patch, competition acts
  across the maps at each position, pooled spike trains stay binary, kernels keep their normalised sum, and
  the criteria tests above run on the cnn as well;
* beats chance by a wide margin on ``digits`` within seconds, with either readout, fully connected or conv.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from bioplaus.algorithms import probes
from bioplaus.algorithms.rule import Rule
from bioplaus.algorithms.spiking import (conv_stdp_update, from_per_position, latency_encode, lif_run, per_position,
                                         poisson_encode, stdp_update, to_intensity)
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.trial import load_splits, resolve, run_trial
from conftest import batch, small_rule

READOUTS = ["label", "delta"]
ARCH_READOUTS = [("mlp", "label"), ("mlp", "delta"), ("cnn", "label"), ("cnn", "delta")]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these nets are tiny and two threads crawl on a loaded 2-core machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield "train.threads=1"
    torch.set_num_threads(threads)


# --- kernels ----------------------------------------------------------------------------------------
def _train(steps: int, *times: int) -> torch.Tensor:
    """A (steps, 1, 1) spike train of one neuron with spikes at the given steps."""
    s = torch.zeros(steps, 1, 1)
    for t in times:
        s[t] = 1.0
    return s


def _dw(t_pre: int, t_post: int, **kw) -> float:
    rates = {"tau_pre": 4.0, "tau_post": 4.0, "eta_post": 0.01, "eta_pre": 0.01} | kw
    return stdp_update(_train(30, t_pre), _train(30, t_post), **rates).item()


def test_stdp_window_on_two_neurons():
    """Pre shortly before post potentiates, pre shortly after post depresses, and the effect fades with the gap."""
    assert _dw(10, 12) > 0 and _dw(10, 10) > 0  # causal (a pre spike in the post's step counts as causal)
    assert _dw(12, 10) < 0
    assert _dw(10, 11) > _dw(10, 13) > _dw(10, 20) > 0  # potentiation window decays with the delay
    assert _dw(11, 10) < _dw(13, 10) < _dw(20, 10) < 0  # so does depression
    assert _dw(10, 12, eta_pre=0.0) == pytest.approx(0.01 * torch.exp(torch.tensor(-0.5)).item())
    assert _dw(10, 12, eta_post=0.0) == 0.0  # no pre spike after the post spike: nothing to depress
    # Pair STDP adds over pairs and over the batch: two independent pairs in a batch of two = twice one.
    pre = torch.cat([_train(30, 10), _train(30, 10)], dim=1)
    post = torch.cat([_train(30, 12), _train(30, 12)], dim=1)
    two = stdp_update(pre, post, tau_pre=4.0, tau_post=4.0, eta_post=0.01, eta_pre=0.01)
    assert two.item() == pytest.approx(2 * _dw(10, 12))


def test_stdp_window_through_a_simulated_synapse():
    """Two LIF-connected neurons: a pre spike that drives the post neuron over threshold potentiates the synapse;
    the same pre spike arriving after a post spike caused by another input depresses it."""
    thr = torch.tensor([1.0])
    drive = torch.zeros(30, 1, 2)  # inputs: 0 = the studied pre neuron, 1 = another input
    drive[10, 0, 0] = 1.0
    w = torch.tensor([[1.5, 1.5]])  # the post neuron (one), both synapses strong enough to fire it
    post = lif_run((drive.flatten(0, 1) @ w.t()).view(30, 1, 1), thr, tau_mem=5.0, refractory=2)
    assert post[10].item() == 1.0
    dw = stdp_update(drive, post, tau_pre=4.0, tau_post=4.0, eta_post=0.01, eta_pre=0.01)
    assert dw[0, 0] > 0 and dw[0, 1] == 0
    drive2 = torch.zeros(30, 1, 2)
    drive2[8, 0, 1] = 1.0  # the other input fires the post neuron at step 8 ...
    drive2[10, 0, 0] = 1.0  # ... and the studied pre neuron spikes 2 steps later
    post2 = lif_run((drive2.flatten(0, 1) @ torch.tensor([[0.5, 1.5]]).t()).view(30, 1, 1), thr, tau_mem=5.0,
                    refractory=4)
    assert post2[8].item() == 1.0 and post2[10].item() == 0.0  # refractory: the weak late input cannot fire it
    dw2 = stdp_update(drive2, post2, tau_pre=4.0, tau_post=4.0, eta_post=0.01, eta_pre=0.01)
    assert dw2[0, 0] < 0 and dw2[0, 1] > 0


def test_lif_leak_threshold_refractoriness_and_wta():
    steps = 50
    thr = torch.tensor([1.0, 1.0, 1.0])
    # Neuron 0: constant 0.5 per step (fires); neuron 1: below the leak's fixed point thr * (1 - decay) (never);
    # neuron 2: constant 2 (fires every step it is allowed to).
    current = torch.tensor([0.5, 0.05, 2.0]).expand(steps, 1, 3).clone()
    s = lif_run(current, thr, tau_mem=5.0, refractory=3, wta=False)
    assert s[:, 0, 0].sum() > 0 and s[:, 0, 1].sum() == 0
    fire_times = s[:, 0, 2].nonzero().flatten()
    assert (fire_times.diff() == 4).all()  # one spike, then 3 refractory steps
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    # Winner-take-all: at most one spike per sample and step, the strongest overshoot wins.
    many = torch.rand(steps, 8, 20, generator=torch.Generator().manual_seed(0)) * 3
    w = lif_run(many, torch.ones(20), tau_mem=5.0, refractory=0, wta=True)
    assert w.sum(2).max() == 1 and w.sum() > 0
    assert lif_run(many, torch.ones(20), tau_mem=5.0, refractory=0, wta=False).sum(2).max() > 1
    # Lateral inhibition reduces the other neurons' firing.
    inhibited = lif_run(many, torch.ones(20), tau_mem=5.0, refractory=0, wta=False, inhibition=0.5)
    assert inhibited.sum() < lif_run(many, torch.ones(20), tau_mem=5.0, refractory=0, wta=False).sum()


def test_poisson_and_latency_coding():
    x = torch.linspace(-1, 3, 10).view(1, 10).repeat(2, 1) * torch.tensor([[1.0], [2.0]])
    intensity = to_intensity(x)
    assert intensity.min() == 0 and intensity.max() == 1 and torch.allclose(intensity[0], intensity[1])
    torch.manual_seed(0)
    spikes = poisson_encode(intensity[:1].expand(4000, 10), steps=5, max_rate=0.5)
    rate = spikes.mean((0, 1))
    assert torch.allclose(rate, 0.5 * intensity[0], atol=0.01) and set(spikes.unique().tolist()) == {0.0, 1.0}
    torch.manual_seed(0)
    assert torch.equal(spikes, poisson_encode(intensity[:1].expand(4000, 10), steps=5, max_rate=0.5))  # torch RNG
    lat = latency_encode(intensity[:1], steps=20)
    assert lat.sum(0).tolist()[0] == [0.0] + [1.0] * 9  # one spike per input above the cutoff
    first = lat[:, 0].argmax(0)[1:]
    assert (first.diff() <= 0).all() and first[-1] == 0  # brighter -> earlier; full intensity at step 0


# --- the rule ------------------------------------------------------------------------------------------
def _state(rule: Rule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rule.state_dict().items()}


def _step(rule: Rule, x, y, seed: int = 0) -> Rule:
    """One train step on a copy, from a fixed RNG state (the Poisson spikes), leaving the global RNG alone."""
    clone = copy.deepcopy(rule)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clone.train_step(x, y)
    return clone


@pytest.mark.parametrize("arch,readout", ARCH_READOUTS)
def test_block_steps_equal_train_step(arch, readout):
    """Driving block_step over net.stages (as the layer-parallel pipeline will) == train_step, for two steps;
    block steps pass binary spike trains batch-first and change only their own stage."""
    rule = small_rule("stdp", arch, hp={"readout": readout})
    whole, staged = copy.deepcopy(rule), copy.deepcopy(rule)
    for step in range(2):
        x, y = batch(seed=step)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step)
            whole.train_step(x, y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step)
            h = x
            for index in range(len(staged.net.stages)):
                before = _state(staged)
                h = staged.block_step(index, h, y)
                changed = {k for k, v in _state(staged).items() if not torch.equal(v, before[k])}
                own = ("net.head.", "class_") if index == len(staged.net.blocks) else (f"net.blocks.{index}.",
                                                                                        f"threshold{index}")
                assert changed and all(k.startswith(own) for k in changed), (index, changed)
                if index < len(staged.net.blocks):
                    assert h.shape[0] == len(y) and set(h.unique().tolist()) <= {0.0, 1.0}
    a, b = _state(whole), _state(staged)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between train_step and the staged block steps"


def test_homeostasis_and_weight_normalisation():
    rule = small_rule("stdp", hp={"target_spikes": 4.0})
    x, y = batch()
    rule.train_step(x, y)  # first batch: thresholds initialised
    thr = rule.threshold0.clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        spikes = rule.spike_trains(x)[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        rule.train_step(x, y)
    rate = spikes.sum((0, 1)) / len(y)
    target = 4.0 / 16
    assert (rule.threshold0[rate > target] > thr[rate > target]).all()
    assert (rule.threshold0[rate < target] < thr[rate < target]).all()
    for block in rule.net.blocks:
        w = block.layer.weight
        assert w.min() >= 0 and w.max() <= rule.hp.w_max
        assert torch.allclose(w.sum(1), torch.full((w.shape[0],), rule.hp.w_mean * w.shape[1]), rtol=1e-4)
        assert not w.requires_grad and torch.equal(block.layer.bias, torch.zeros_like(block.layer.bias))


def test_plastic_epochs_freeze_the_hidden_layers_not_the_readout():
    """hp.plastic_epochs=0.5 of 4 steps per epoch: STDP and homeostasis for 2 presentations, then only the readout."""
    rule = small_rule("stdp", hp={"readout": "delta", "plastic_epochs": 0.5}, steps_per_epoch=4)
    hidden, head = [], []
    for step in range(4):
        rule.train_step(*batch(seed=step))
        hidden.append([t.clone() for t in _hidden(rule)])
        head.append(rule.net.head.layer.weight.clone())
    changed = [any(not torch.equal(a, b) for a, b in zip(hidden[i], hidden[i + 1])) for i in range(3)]
    assert changed == [True, False, False]  # step 2 still plastic; steps 3 and 4 frozen
    assert all(not torch.equal(head[i], head[i + 1]) for i in range(3))
    assert rule.plastic.counts == [2, 2]


# --- convolutional STDP -------------------------------------------------------------------------------
def _patches(pre: torch.Tensor, k: int, padding: int) -> torch.Tensor:
    """(T, B, C, H, W) -> (T, B*L, C*k*k): every position's k x k input patch as one presynaptic layer."""
    steps, n_batch = pre.shape[:2]
    cols = torch.nn.functional.unfold(pre.flatten(0, 1), k, padding=padding)  # (T*B, C*k*k, L)
    return cols.view(steps, n_batch, cols.shape[1], -1).permute(0, 1, 3, 2).reshape(steps, -1, cols.shape[1])


@pytest.mark.parametrize("padding,x_tar", [(1, 0.0), (0, 0.0), (0, 0.2)])
def test_conv_stdp_is_the_fully_connected_rule_on_every_patch(padding, x_tar):
    """The shared kernel's change is the sum over positions of pair STDP between each k x k input patch and the
    maps at that position (the FC kernel applied per patch), with depression and potentiation both present."""
    g = torch.Generator().manual_seed(0)
    pre = (torch.rand(8, 2, 3, 6, 6, generator=g) < 0.3).float()
    side = 6 + 2 * padding - 2
    post = (torch.rand(8, 2, 4, side, side, generator=g) < 0.2).float()
    rates = {"tau_pre": 3.0, "tau_post": 2.0, "eta_post": 0.1, "eta_pre": 0.05, "x_tar": x_tar}
    conv = conv_stdp_update(pre, post, (4, 3, 3, 3), padding=padding, **rates)
    dense = stdp_update(_patches(pre, 3, padding), per_position(post), **rates).view(4, 3, 3, 3)
    assert torch.allclose(conv, dense, atol=1e-5)
    ltp_only = conv_stdp_update(pre, post, (4, 3, 3, 3), padding=padding, **(rates | {"eta_pre": 0.0}))
    assert (ltp_only > conv).any() and not torch.equal(conv, torch.zeros_like(conv))


def test_competition_is_across_maps_at_each_position():
    """per_position rows: lif_run's winner-take-all lets at most one map spike per (sample, position, step), while
    different positions spike in the same step; the reshaping is exactly invertible."""
    maps = torch.rand(20, 3, 5, 4, 4, generator=torch.Generator().manual_seed(1)) * 2
    assert torch.equal(from_per_position(per_position(maps), 3, 4, 4), maps)
    spikes = from_per_position(lif_run(per_position(maps), torch.ones(5), tau_mem=5.0, refractory=0, wta=True), 3, 4, 4)
    assert spikes.sum(2).max() == 1  # one winner among the maps at a position
    assert spikes.sum((2, 3, 4)).max() > 1  # but many positions fire at once
    free = from_per_position(lif_run(per_position(maps), torch.ones(5), tau_mem=5.0, refractory=0, wta=False), 3, 4, 4)
    assert free.sum(2).max() > 1  # the control: without competition several maps fire together


def test_conv_layer_pools_spike_trains_and_keeps_its_kernels_normalised():
    """A conv block hands on its max-pooled spike trains (binary, half the side, the OR of each 2x2 window);
    thresholds are per map; every kernel is excitatory and sums to w_mean * fan_in after each update."""
    rule = small_rule("stdp", "cnn", hp={"readout": "delta"})
    x, y = batch()
    rule.train_step(x, y)
    layer = rule.net.blocks[0].layer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        trains = rule.spike_trains(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        spikes_in = rule.encode(x)
        current = layer(spikes_in.flatten(0, 1)).view(rule.hp.steps, len(y), 4, 8, 8)
        raw = from_per_position(lif_run(per_position(current), rule.threshold0, tau_mem=rule.hp.tau_mem,
                                        refractory=rule.hp.refractory, inhibition=rule.hp.inhibition), len(y), 8, 8)
    assert trains[1].shape == (rule.hp.steps, len(y), 4, 4, 4) and _binary(trains[1]) and trains[1].sum() > 0
    window_or = raw.unflatten(3, (4, 2)).unflatten(5, (4, 2)).amax((4, 6))
    assert torch.equal(trains[1], window_or)
    assert rule.threshold0.shape == (4,) and (rule.threshold0 > 0).all()
    for block in rule.net.blocks:
        w = block.layer.weight
        assert w.min() >= 0 and w.max() <= rule.hp.w_max and not w.requires_grad
        assert torch.allclose(w.flatten(1).sum(1), torch.full((w.shape[0],), rule.hp.w_mean * w[0].numel()),
                              rtol=1e-4)


def test_cnn_refuses_what_has_no_spiking_meaning():
    """Normalisation layers and average pooling would make the trains between blocks real-valued: refused
    before training, naming what to use instead."""
    with pytest.raises(UsageError, match="cannot use model.norm=batch.*model.norm=none"):
        resolve(parse_overrides(["rule=stdp", "arch=cnn", "model.norm=batch"]))
    with pytest.raises(UsageError, match="cannot use model.pool=avg.*model.pool=max"):
        resolve(parse_overrides(["rule=stdp", "arch=cnn", "model.pool=avg"]))
    assert resolve(parse_overrides(["rule=stdp", "arch=cnn"])).model_cfg.norm == "none"


# --- criteria: instruments --------------------------------------------------------------------------
def _hidden(rule: Rule) -> list[torch.Tensor]:
    """Everything a hidden block learns: its parameters and, for stdp, its thresholds."""
    out = []
    for i, block in enumerate(rule.net.blocks):
        parts = [p.detach().flatten() for p in block.parameters()]
        if hasattr(rule, f"threshold{i}"):
            parts.append(getattr(rule, f"threshold{i}").flatten())
        out.append(torch.cat(parts))
    return out


def _later_dependent_blocks(rule: Rule, x, y) -> set[int]:
    """Hidden blocks whose one-step update changes when the weights of every later stage are re-drawn."""
    dependent = set()
    for i in range(len(rule.net.blocks)):
        redrawn = copy.deepcopy(rule)
        with torch.no_grad():
            for stage in redrawn.net.stages[i + 1:]:
                w = stage.layer.weight
                w.copy_(torch.rand(w.shape, generator=torch.Generator().manual_seed(9)) * w.abs().max().clamp_min(0.1))
        if not torch.equal(_hidden(_step(rule, x, y))[i], _hidden(_step(redrawn, x, y))[i]):
            dependent.add(i)
    return dependent


def _layer_inputs(rule: Rule, x, y) -> list[list[torch.Tensor]]:
    """Every input each stage's weight layer received during one train step."""
    seen: list[list[torch.Tensor]] = [[] for _ in rule.net.stages]
    handles = [stage.layer.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
               for i, stage in enumerate(rule.net.stages)]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            rule.train_step(x, y)
    finally:
        for h in handles:
            h.remove()
    return seen


def _binary(t: torch.Tensor) -> bool:
    return set(t.unique().tolist()) <= {0.0, 1.0}


# --- criteria: proofs -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,readout", ARCH_READOUTS)
def test_updates_depend_on_nothing_later(arch, readout):
    """C1 and C2: no hidden update uses any later stage's weights (no transport of them, no error chained
    through them). Negative control: the same instrument sees bp's hidden updates depend on later weights."""
    x, y = batch()
    assert _later_dependent_blocks(small_rule("bp", arch), x, y) == {0, 1}
    assert _later_dependent_blocks(small_rule("stdp", arch, hp={"readout": readout}), x, y) == set()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_single_phase(arch):
    """C3: each weight layer is evaluated exactly once per step (hidden layers once on all T steps of the batch's
    spike trains: T*B rows), and no block's update depends on later blocks (no backward sweep). Negative
    control: bp evaluates each layer once too, but its hidden updates need the later blocks (backward sweep)."""
    x, y = batch()
    rule = small_rule("stdp", arch)
    inputs = _layer_inputs(copy.deepcopy(rule), x, y)
    assert [len(i) for i in inputs] == [1, 1, 1]
    assert [i[0].shape[0] for i in inputs] == [rule.hp.steps * len(y)] * 2 + [len(y)]
    assert _later_dependent_blocks(rule, x, y) == set()
    assert [len(i) for i in _layer_inputs(small_rule("bp", arch), x, y)] == [1, 1, 1]
    assert _later_dependent_blocks(small_rule("bp", arch), x, y) == {0, 1}


@pytest.mark.parametrize("arch,readout", ARCH_READOUTS)
def test_hidden_updates_use_no_label_and_no_error(arch, readout):
    """C4: hidden updates (weights and thresholds) are identical with shifted or random labels, a hidden block
    step runs with no label at all, and a training step builds no autograd graph (nothing is saved for a
    backward pass, so none can run). Negative control: bp's hidden updates change with the labels and its
    step saves tensors for backward."""
    x, y = batch()
    assert probes.label_dependent_blocks(small_rule("bp", arch), x, y) == {0, 1}
    rule = small_rule("stdp", arch, hp={"readout": readout})
    assert probes.label_dependent_blocks(rule, x, y) == set()
    random_labels = torch.randint(0, 10, y.shape, generator=torch.Generator().manual_seed(7))
    a, b = _step(rule, x, y), _step(rule, x, random_labels)
    for ha, hb in zip(_hidden(a), _hidden(b)):
        assert torch.equal(ha, hb)
    assert not torch.equal(a.net.head.layer.weight, b.net.head.layer.weight)  # the readout does use labels
    h = x
    for i in range(len(rule.net.blocks)):
        h = rule.block_step(i, h, None)  # no label given: the hidden step cannot be using one

    def saved(r: Rule) -> int:
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            r.train_step(x, y)
        return count[0]

    assert saved(small_rule("bp", arch)) > 0
    assert saved(small_rule("stdp", arch, hp={"readout": readout})) == 0


@pytest.mark.parametrize("arch,readout", ARCH_READOUTS)
def test_blocks_exchange_binary_spike_trains(arch, readout):
    """C5: every hidden weight layer receives binary spike trains (the encoded image, then the layer below's
    spikes), and what each block hands the next stage is a binary spike train; the readout integrates spike
    counts. Negative control: the same instrument sees real-valued activations entering bp's blocks."""
    x, y = batch()
    bp_inputs = _layer_inputs(small_rule("bp", arch), x, y)
    assert not all(_binary(t) for stage in bp_inputs[1:] for t in stage)
    rule = small_rule("stdp", arch, hp={"readout": readout})
    inputs = _layer_inputs(copy.deepcopy(rule), x, y)
    assert all(_binary(t) for stage in inputs[:-1] for t in stage)
    assert all(t.sum() > 0 for stage in inputs[:-1] for t in stage)  # not vacuous: spikes do flow
    h = x
    for i in range(len(rule.net.blocks)):
        h = rule.block_step(i, h, y)
        assert _binary(h) and h.shape[:2] == (len(y), rule.hp.steps)
    trains = rule.spike_trains(x)
    assert all(_binary(t) for t in trains)
    if readout == "label":  # the label readout's input is the spike counts themselves
        assert torch.equal(inputs[-1][0], inputs[-1][0].round())


# --- learning on digits -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_splits(parse_overrides(["dataset=digits"]))


LEARN = [  # (case, floor, overrides): small nets, a few seconds
    ("label", 0.60, ["arch=mlp", "model.widths=[100]", "train.epochs=3", "train.batch_size=32", "hp.readout=label"]),
    ("delta", 0.70, ["arch=mlp", "model.widths=[100]", "train.epochs=3", "train.batch_size=32", "hp.readout=delta",
                     "hp.lr=3e-3"]),
    ("two-layer", 0.55, ["arch=mlp", "model.widths=[100,50]", "train.epochs=3", "train.batch_size=32",
                         "hp.readout=delta", "hp.lr=3e-3"]),
    ("cnn-delta", 0.70, ["arch=cnn", "model.channels=[16]", "train.epochs=3", "train.batch_size=32",
                         "hp.readout=delta", "hp.lr=3e-3"]),
]


@pytest.mark.parametrize("case,floor,overrides", LEARN, ids=[c[0] for c in LEARN])
def test_beats_chance_on_digits(digits, one_thread, case, floor, overrides):
    """Chance is 0.10; the rule must reach ``floor`` on the test split within seconds of training."""
    cfg = parse_overrides(["rule=stdp", "dataset=digits", "out=null", one_thread, *overrides])
    cpu = time.process_time()
    record = run_trial(resolve(cfg), splits=digits)
    cpu = time.process_time() - cpu
    assert record["status"] == "ok", record.get("traceback")
    assert record["test_acc"] > floor and record["val_acc"] > floor, record["test_acc"]
    assert cpu < 60  # CPU seconds, not wall: processes beside this one stretch the wall time, not the work
