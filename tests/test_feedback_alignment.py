"""Feedback-alignment family: fa, dfa, sign_symmetry.

Correctness: FA with B = W is backprop bit for bit (mlp, cnn, deep_cnn with batch norm); with random
B the FA update comes to within 90 degrees of backprop's during training (the alignment effect);
DFA's hidden update is the output error through its fixed matrix; batch-manhattan steps by the sign.
Criteria: each claim's test measures the behaviour on the rule and on ``bp`` (the negative control:
the same measurement must detect the violation there). C1 and C2 are measured from the resulting
weights alone (implementation-independent), C3 with the autograd/module probes.
Learning: each rule beats chance widely on ``digits`` in seconds, on mlp and cnn.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bioplaus.algorithms import probes
from bioplaus.algorithms.registry import get_rule
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.trial import resolve, run_trial
from conftest import batch, small_rule

FAMILY = ["fa", "dfa", "sign_symmetry"]
SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "deep_cnn": (3, 8, 8)}


def _set_feedback_to_forward_weights(rule):
    with torch.no_grad():
        for i, stage in enumerate(rule.net.stages[1:], start=1):
            rule.feedback(i).copy_(stage.layer.weight)


# --- FA = BP when B = W ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn", "deep_cnn"])
def test_fa_with_feedback_equal_to_forward_weights_is_backprop(arch):
    shape = SHAPES[arch]
    x, y = batch(input_shape=shape)
    bp = small_rule("bp", arch, input_shape=shape)
    fa = small_rule("fa", arch, input_shape=shape)
    random_fa = small_rule("fa", arch, input_shape=shape)
    for _ in range(3):  # B follows W as W learns, so every step is bp's step
        _set_feedback_to_forward_weights(fa)
        for rule in (bp, fa, random_fa):
            rule.train_step(x, y)
    for (name, a), b in zip(bp.net.state_dict().items(), fa.net.state_dict().values()):
        assert torch.equal(a, b), f"{arch}: {name} differs from backprop's"
    # Control: the comparison can fail — random feedback gives different hidden weights.
    hidden = [k for k in bp.net.state_dict() if k.startswith("blocks.")]
    assert any(not torch.equal(bp.net.state_dict()[k], random_fa.net.state_dict()[k]) for k in hidden)


# --- alignment ------------------------------------------------------------------------------------
def _digits(n=1024, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(d.target), generator=g)[:n]
    x = torch.tensor(d.images, dtype=torch.float32)[idx].unsqueeze(1) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(d.target)[idx]


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).clamp(-1, 1)
    return math.degrees(math.acos(cos.item()))


def _fa_bp_angle(rule, x, y, layer: int) -> float:
    """Angle between FA's update and backprop's true gradient for one hidden layer, same weights and batch."""
    net = copy.deepcopy(rule.net)
    F.cross_entropy(net(x), y).backward()
    rule.gradients(x, y)
    return _angle(rule.net.blocks[layer].layer.weight.grad, net.blocks[layer].layer.weight.grad)


def test_fa_updates_align_with_backprop_during_training():
    x, y = _digits()
    rule = small_rule("fa", model={"widths": [64, 64]}, hp={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
                      steps_per_epoch=10 ** 4)
    probe_x, probe_y = x[:256], y[:256]
    start = [_fa_bp_angle(rule, probe_x, probe_y, layer) for layer in (0, 1)]
    for epoch in range(3):
        for i in range(0, len(y), 32):
            rule.train_step(x[i:i + 32], y[i:i + 32])
    end = [_fa_bp_angle(rule, probe_x, probe_y, layer) for layer in (0, 1)]
    # Random feedback starts out (nearly) orthogonal to the true gradient; training aligns them.
    assert all(a > 80 for a in start), start
    assert all(a < 75 for a in end), (start, end)
    # Control: with B = W the FA update is bp's gradient (angle 0, up to float32 acos resolution).
    _set_feedback_to_forward_weights(rule)
    assert _fa_bp_angle(rule, probe_x, probe_y, 0) < 0.1


# --- DFA and sign-symmetry mechanics ---------------------------------------------------------------
def test_dfa_hidden_update_is_output_error_through_fixed_matrix():
    rule = small_rule("dfa")
    x, y = batch()
    rule.gradients(x, y)
    net = rule.net
    with torch.no_grad():
        h0 = net.blocks[0](x)
        u1 = net.blocks[1].preact(h0)
        h1 = net.blocks[1].post(u1)
        logits = net.head(h1)
        error = (logits.softmax(1) - F.one_hot(y, 10).float()) / len(y)  # dL/dlogits of the batch-mean CE
        delta1 = (error @ rule.feedback(1)) * (u1 > 0)  # ReLU derivative of block 1's own units
    torch.testing.assert_close(net.blocks[1].layer.weight.grad, delta1.t() @ h0)
    torch.testing.assert_close(net.blocks[1].layer.bias.grad, delta1.sum(0))
    torch.testing.assert_close(net.head.layer.weight.grad, error.t() @ h1)


def test_dfa_with_one_hidden_block_is_fa_with_the_same_matrix():
    """Cross-check of DFA's error delivery: with one hidden block, e B_0 is exactly FA's e B_1."""
    x, y = batch()
    dfa = small_rule("dfa", model={"widths": [16]})
    fa = small_rule("fa", model={"widths": [16]})
    with torch.no_grad():
        dfa.feedback(0).copy_(fa.feedback(1))
    for _ in range(3):
        dfa.train_step(x, y)
        fa.train_step(x, y)
    for a, b in zip(dfa.net.parameters(), fa.net.parameters()):
        torch.testing.assert_close(a, b)


def test_sign_symmetry_feedback_is_the_sign_of_w_and_batch_manhattan_steps_by_the_sign():
    rule = small_rule("sign_symmetry")
    w = rule.net.stages[1].layer.weight
    assert torch.equal(rule.feedback(1) != 0, w != 0)
    assert torch.equal(torch.sign(rule.feedback(1)), torch.sign(w))
    assert torch.allclose(rule.feedback(1).abs(), torch.full_like(w, 1 / math.sqrt(3 * 16)))
    bm = small_rule("sign_symmetry", hp={"batch_manhattan": True, "optimizer": "sgd", "momentum": 0.0, "lr": 0.01})
    x, y = batch()
    before = [p.detach().clone() for p in bm.net.parameters()]
    bm.train_step(x, y)
    steps = torch.cat([(p.detach() - b).flatten() for p, b in zip(bm.net.parameters(), before)]).abs()
    moved = steps[steps > 0]
    assert len(moved) > 0.5 * len(steps) and torch.allclose(moved, torch.full_like(moved, 0.01))


# --- criteria --------------------------------------------------------------------------------------
def _tiny(name: str):
    """A rule on a 64-32-32-10 MLP in float64, plain SGD (so an update is proportional to the gradient)."""
    rule = small_rule(name, model={"widths": [32, 32]}, hp={"optimizer": "sgd", "momentum": 0.0, "lr": 0.1})
    rule.double()
    x, y = batch(n=8)  # fewer samples than units: each layer input has a null space to move W in
    return rule, x.double(), y


def _hidden_updates(rule, x, y) -> list[torch.Tensor]:
    rule = copy.deepcopy(rule)
    before = [torch.cat([p.detach().flatten() for p in b.parameters()]) for b in rule.net.blocks]
    rule.train_step(x, y)
    return [torch.cat([p.detach().flatten() for p in b.parameters()]) - w for b, w in zip(rule.net.blocks, before)]


def _perturb_later_forward_weights(rule, x, after: int) -> None:
    """Change the forward weights of every stage after block ``after`` without changing any activity.

    Each stage j's weight moves only within the null space of its batch inputs (W += A P, P the
    projection orthogonal to the inputs), so every block's output and the output error are as
    before, while W itself (its transpose, its signs) is very different.
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        acts = rule.net.activations(x)
        for j in range(after + 1, len(rule.net.stages)):
            w = rule.net.stages[j].layer.weight
            h = acts[j - 1].flatten(1)
            proj = torch.eye(h.shape[1], dtype=h.dtype) - torch.linalg.pinv(h) @ h
            w += 3 * w.std() * torch.randn(w.shape, generator=g, dtype=w.dtype) @ proj
        torch.testing.assert_close(rule.net(x), acts[-1])  # the instrument's premise: activity unchanged


def _later_feedback(rule, name: str, block: int) -> list[torch.Tensor]:
    """The rule's stored feedback weights whose signal ends on a block after ``block``.

    fa: B_j carries stage j's error to block j-1. dfa: B_j delivers the output error to block j.
    sign_symmetry derives its feedback from W (covered by the forward-weight perturbation); bp has none.
    """
    stages = len(rule.net.stages)
    if name == "fa":
        return [rule.feedback(j) for j in range(block + 2, stages)]
    if name == "dfa":
        return [rule.feedback(j) for j in range(block + 1, stages - 1)]
    return []


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).norm() > 1e-6 * a.norm())


def weight_transport(name: str) -> bool:
    """C1 measured: does any hidden update change when later forward weights change but no activity does?"""
    rule, x, y = _tiny(name)
    base = _hidden_updates(rule, x, y)
    _perturb_later_forward_weights(rule, x, after=0)
    return any(_changed(a, b) for a, b in zip(base, _hidden_updates(rule, x, y)))


def chained_error(name: str) -> bool:
    """C2 measured: does block 0's update change when later blocks change (their forward weights, the
    feedback ending on them) in a way that leaves block 0's activity and the output error unchanged?"""
    rule, x, y = _tiny(name)
    base = _hidden_updates(rule, x, y)[0]
    _perturb_later_forward_weights(rule, x, after=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for b in _later_feedback(rule, name, block=0):
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * b.std())
    return _changed(base, _hidden_updates(rule, x, y)[0])


@pytest.mark.parametrize("name", FAMILY)
def test_c1_no_weight_transport(name):
    assert weight_transport("bp"), "negative control: bp's hidden updates read later forward weights"
    holds = get_rule(name).criteria["C1"].holds
    assert weight_transport(name) == (not holds)
    if holds:  # the autograd probe agrees on every architecture: no backward pass read a forward weight
        for arch, shape in SHAPES.items():
            x, y = batch(input_shape=shape)
            assert probes.weight_reads(small_rule("bp", arch, input_shape=shape), x, y), f"control on {arch}"
            assert probes.weight_reads(small_rule(name, arch, input_shape=shape), x, y) == set(), arch


@pytest.mark.parametrize("name", FAMILY)
def test_c2_local_error(name):
    assert chained_error("bp"), "negative control: bp chains the error through later blocks"
    assert chained_error(name) == (not get_rule(name).criteria["C2"].holds)


@pytest.mark.parametrize("name", FAMILY)
def test_c3_single_phase(name):
    """Each weight layer evaluated once and no gradient crossing a block boundary (no backward sweep),
    on every architecture; bp, the negative control, sweeps back across every boundary."""
    holds = get_rule(name).criteria["C3"].holds
    for arch, shape in SHAPES.items():
        x, y = batch(input_shape=shape)
        bp = small_rule("bp", arch, input_shape=shape)
        n = len(bp.net.stages)
        assert probes.gradient_crossings(bp, x, y) == set(range(1, n)), f"negative control on {arch}"
        # The probes see this rule's layers (module hooks fire once each), so their silence means something.
        assert probes.layer_calls(small_rule(name, arch, input_shape=shape), x, y) == [1] * n
        crossed = probes.gradient_crossings(small_rule(name, arch, input_shape=shape), x, y)
        assert crossed == (set() if holds else set(range(1, n))), f"{name} on {arch}: crossings {crossed}"


# --- learning ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("name", FAMILY)
def test_learns_digits(name, arch):
    model, lr = ("model.widths=[64,64]", "3e-3") if arch == "mlp" else ("model.channels=[8,16]", "1e-2")
    record = run_trial(resolve(parse_overrides([
        f"rule={name}", f"arch={arch}", "dataset=digits", model, f"hp.lr={lr}", "train.epochs=5",
        "train.batch_size=32", "data.train_limit=1000", "data.test_limit=300"])))
    assert record["status"] == "ok", record.get("traceback")
    assert record["test_acc"] > 0.8, record["test_acc"]  # chance is 0.1
