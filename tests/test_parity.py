"""Parity with the published references: each rule's update on a tiny float64 network, fixed weights and
inputs, against the update written here from the paper's equations (plain torch, none of the rule's code).

These tests are the contract refactors keep: relative error <= 1e-10, or the convention stated in the test.
Rules driven by a torch optimiser train with SGD(lr=1, momentum=0), so their update is minus the gradient;
rules that expose their gradient (``gradients``/``compute_grads``) are read from ``.grad``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import batch, small_rule

SGD = {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0}
TOL = 1e-10


def assert_parity(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.norm()
    assert scale > 0, f"{what}: the reference update is zero, the comparison would prove nothing"
    err = ((got - want).norm() / scale).item()
    assert err <= TOL, f"{what}: relative error {err:.3e} > {TOL:g}"


def double_rule(name: str, arch: str = "mlp", **kw):
    rule = small_rule(name, arch, **kw).double()
    return rule, [(s.layer.weight.detach().clone(), None if s.layer.bias is None else s.layer.bias.detach().clone())
                  for s in rule.net.stages]


def double_batch(n: int = 16, input_shape=(1, 8, 8)):
    x, y = batch(n, input_shape=input_shape)
    return x.double(), y


def sgd_update(rule, x, y) -> dict[str, torch.Tensor]:
    """One train_step with SGD(lr=1): every parameter's change, as minus the step (= the gradient used)."""
    before = {k: v.detach().clone() for k, v in rule.named_parameters()}
    rule.train_step(x, y)
    return {k: before[k] - v.detach() for k, v in rule.named_parameters()}


def onehot(y, c=10):
    return F.one_hot(y, c).double()


# --- BP, FA, sign-symmetry, DFA: one backward recursion, four choices of the matrix that carries the error ---
def chained_deltas(weights, x, y, carriers):
    """Rumelhart et al. 1986 for a ReLU mlp: delta_o = (softmax - onehot)/N, delta_l = (delta_{l+1} M_{l+1}) * f'(u_l)
    with M = W (bp), B (fa, Lillicrap et al.), sign(W) s (Liao et al.); returns dW, db of every stage."""
    hs, us = [x.flatten(1)], []
    for i, (w, b) in enumerate(weights):
        us.append(hs[-1] @ w.t() + b)
        hs.append(us[-1].relu() if i < len(weights) - 1 else us[-1])
    delta = (hs[-1].softmax(1) - onehot(y)) / len(y)
    grads = [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        grads[i] = (delta.t() @ hs[i], delta.sum(0))
        if i > 0:
            delta = (delta @ carriers[i]) * (us[i - 1] > 0)
    return grads


def check_stagewise(rule, grads):
    for i, (stage, (gw, gb)) in enumerate(zip(rule.net.stages, grads)):
        assert_parity(stage.layer.weight.grad, gw, f"{rule.name} stage {i} weight")
        assert_parity(stage.layer.bias.grad, gb, f"{rule.name} stage {i} bias")


def test_bp_parity():
    rule, weights = double_rule("bp", hp=SGD)
    x, y = double_batch()
    upd = sgd_update(rule, x, y)
    for i, (gw, gb) in enumerate(chained_deltas(weights, x, y, [w for w, _ in weights])):
        name = f"blocks.{i}" if i < len(weights) - 1 else "head"
        assert_parity(upd[f"net.{name}.layer.weight"], gw, f"bp stage {i} weight")
        assert_parity(upd[f"net.{name}.layer.bias"], gb, f"bp stage {i} bias")


def test_fa_parity():
    rule, weights = double_rule("fa")
    x, y = double_batch()
    rule.gradients(x, y)
    carriers = [None, *(rule.feedback(i).clone() for i in range(1, len(weights)))]
    check_stagewise(rule, chained_deltas(weights, x, y, carriers))


def test_sign_symmetry_parity():
    """Liao et al.'s uSF: B = sign(W) times the std of the default init, 1/sqrt(3 fan_in)."""
    rule, weights = double_rule("sign_symmetry")
    x, y = double_batch()
    rule.gradients(x, y)
    carriers = [None, *(torch.sign(w) / (3 * w.shape[1]) ** 0.5 for w, _ in weights[1:])]
    check_stagewise(rule, chained_deltas(weights, x, y, carriers))


def test_dfa_parity():
    """Nøkland 2016: delta_l = (e B_l) * f'(a_l) for every hidden block, e = dL/dlogits; the head as in bp."""
    rule, weights = double_rule("dfa")
    x, y = double_batch()
    rule.gradients(x, y)
    hs, us = [x.flatten(1)], []
    for w, b in weights:
        us.append(hs[-1] @ w.t() + b)
        hs.append(us[-1].relu())
    e = ((us[-1].softmax(1)) - onehot(y)) / len(y)
    grads = [((e @ rule.feedback(i) * (us[i] > 0)).t() @ hs[i], (e @ rule.feedback(i) * (us[i] > 0)).sum(0))
             for i in range(len(weights) - 1)]
    grads.append((e.t() @ hs[-2], e.sum(0)))
    check_stagewise(rule, grads)


# --- local losses (Nøkland & Eidnes 2019) ------------------------------------------------------------
def ne_similarity(x):
    """N&E eq. 2 as their train.py computes it: centre each row, divide by (1e-8 + its L2 norm), X~ X~^T in [-1, 1]."""
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        x = x.reshape(x.shape[0], x.shape[1], -1).std(dim=2)  # conv: each channel's std over positions
    x = x.reshape(len(x), -1)
    xc = x - x.mean(1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(1, keepdim=True).sqrt())
    return (xn @ xn.t()).clamp(-1, 1)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("classifier_init", ["zero", "default"])
def test_local_losses_parity(arch, classifier_init):
    """predsim on the first block: (1-beta) CE(W_pred h) + beta ||S(W_sim h) - S(Y)||^2 / N^2, h the block
    output; the head's CE scaled by (1-beta). The reference's per-block loss is differentiated by autograd here."""
    shape = (1, 8, 8)
    rule = small_rule("local_losses", arch, input_shape=shape, hp={**SGD, "classifier_init": classifier_init}).double()
    x, y = double_batch(input_shape=shape)
    beta = 0.99
    params = {k: v.detach().clone().requires_grad_(True) for k, v in rule.named_parameters()}
    p = lambda k: params[k]  # noqa: E731
    if arch == "mlp":
        h = (x.flatten(1) @ p("net.blocks.0.layer.weight").t() + p("net.blocks.0.layer.bias")).relu()
        logits_aux = h @ p("aux.0.pred.weight").t() + p("aux.0.pred.bias")
        sim_in = h @ p("aux.0.sim.weight").t()
    else:
        u = F.conv2d(x, p("net.blocks.0.layer.weight"), p("net.blocks.0.layer.bias"), padding=1)
        h = F.max_pool2d(u.relu(), 2)
        side = h.shape[-1]  # 4x4x4 = 64 <= aux_features: the classifier reads the whole map
        logits_aux = h.flatten(1) @ p("aux.0.pred.2.weight").t() + p("aux.0.pred.2.bias")
        sim_in = F.conv2d(h, p("aux.0.sim.weight"), None, padding=1)
        assert side == 4
    local = (1 - beta) * F.cross_entropy(logits_aux, y) + beta * (ne_similarity(sim_in) - ne_similarity(onehot(y))).pow(2).mean()
    keys = [k for k in params if k.startswith(("net.blocks.0.", "aux.0."))]
    want = dict(zip(keys, torch.autograd.grad(local, [params[k] for k in keys])))
    if classifier_init == "zero":  # the reference zero-initialises the output and aux classifiers' weights
        assert rule.net.head.layer.weight.abs().max() == 0
    h = x
    for i in range(len(rule.net.blocks)):  # the head reads the blocks' outputs under their old weights
        w, b = p(f"net.blocks.{i}.layer.weight"), p(f"net.blocks.{i}.layer.bias")
        h = (h.flatten(1) @ w.t() + b).relu() if arch == "mlp" else F.max_pool2d(F.conv2d(h, w, b, padding=1).relu(), 2)
    head = [p("net.head.layer.weight"), p("net.head.layer.bias")]
    want_head = torch.autograd.grad((1 - beta) * F.cross_entropy(h.flatten(1).detach() @ head[0].t() + head[1], y), head)
    upd = sgd_update(rule, x, y)
    for k in keys:
        if want[k].norm() > 0:  # the zero-initialised aux classifier sends no pred gradient into the block yet
            assert_parity(upd[k], want[k], f"local_losses {arch} {k}")
    assert_parity(upd["net.head.layer.weight"], want_head[0], f"local_losses {arch} head weight")
    assert_parity(upd["net.head.layer.bias"], want_head[1], f"local_losses {arch} head bias")


# --- forward-forward (Hinton 2022) -------------------------------------------------------------------
def test_ff_parity():
    """Hinton 2022's per-layer objective on pixel-embedded labels, input normalised to unit length per sample.
    Conventions (stated in ff's docstring): goodness is the *mean* of squares (Hinton: the sum; theta rescales),
    normalisation to unit RMS (Hinton: unit L2, a constant factor sqrt(D)), and the loss is the *sum* of the
    positive and negative means (the common PyTorch reference takes one mean over both, half of it)."""
    hp = {**SGD, "embed": "pixels", "readout": "goodness"}
    rule, weights = double_rule("ff", hp=hp)
    x, y = double_batch()
    state = rule.neg_gen.get_state()
    upd = sgd_update(rule, x, y)
    gen = torch.Generator().set_state(state)
    y_neg = (y + torch.randint(1, 10, (1, len(y)), generator=gen)[0]) % 10
    theta = rule.hp.theta

    def embed(labels):
        flat = x.flatten(1).clone()
        flat[:, :10] = onehot(labels)
        return flat

    h = torch.cat([embed(y), embed(y_neg)])
    for i, (w, b) in enumerate(weights[:-1]):
        w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        z = h / h.pow(2).mean(1, keepdim=True).add(1e-8).sqrt()
        out = (z @ w.t() + b).relu()
        g = out.pow(2).mean(1)
        g_pos, g_neg = g[:len(y)], g[len(y):]
        loss = F.softplus(-(g_pos - theta)).mean() + F.softplus(g_neg - theta).mean()
        gw, gb = torch.autograd.grad(loss, [w, b])
        assert_parity(upd[f"net.blocks.{i}.layer.weight"], gw, f"ff block {i} weight")
        assert_parity(upd[f"net.blocks.{i}.layer.bias"], gb, f"ff block {i} bias")
        h = out.detach()


# --- SoftHebb (Journé et al. 2023) -------------------------------------------------------------------
def test_softhebb_parity():
    """Journé et al. 2023: y = softmax(t u) with the winner +y, the others -y; dW_k = sum_n y_k (x - u_k w_k),
    scaled to max |dW| = 1, rate hebb_lr |‖w_k‖ - 1|^p. Convention: the input standardised per sample
    (layer norm, eps 1e-5) where the reference uses an affine-free batch norm (softhebb's docstring).
    The readout: the delta rule (softmax - onehot) z^T / N on its standardised input."""
    rule, weights = double_rule("softhebb", hp=SGD)
    x, y = double_batch()
    hp = rule.hp
    before = {k: v.detach().clone() for k, v in rule.net.named_parameters()}
    rule.train_step(x, y)
    h = x.flatten(1)
    for i, (w, _) in enumerate(weights[:-1]):
        z = (h - h.mean(1, keepdim=True)) / (h.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        u = z @ w.t()
        ysoft = (hp.t_invert * u).softmax(1)
        win = F.one_hot(u.argmax(1), u.shape[1]).bool()
        ypost = torch.where(win, ysoft, -ysoft)
        delta = ypost.t() @ z - (ypost * u).sum(0)[:, None] * w
        delta = delta / delta.abs().max()
        lr = hp.hebb_lr * (w.norm(dim=1) - 1).abs() ** hp.lr_power
        want = lr[:, None] * delta
        got = rule.net.blocks[i].layer.weight.detach() - before[f"blocks.{i}.layer.weight"]
        assert_parity(got, want, f"softhebb block {i} Hebbian update")
        a = u  # triangle activation, power 1: relu(u - mean over units)
        h = (a - a.mean(1, keepdim=True)).relu()
    z = (h - h.mean(1, keepdim=True)) / (h.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    w, b = weights[-1]
    err = (z @ w.t() + b).softmax(1) - onehot(y)
    got = before["head.layer.weight"] - rule.net.head.layer.weight.detach()
    assert_parity(got, err.t() @ z / len(y), "softhebb readout delta rule")


# --- predictive coding (Whittington & Bogacz 2017) ------------------------------------------------------
def test_pc_parity():
    """W&B 2017 for a ReLU mlp with a cross-entropy output energy weighted by beta: errors
    eps_l = v_l - f(W_l v_{l-1} + b_l); inference dv_l = -lr (eps_l - W_{l+1}^T (eps_{l+1} f'(u_{l+1}))), the top
    hidden node also receiving -lr beta W_o^T (softmax - onehot); then dW_l = -(eps_l f'(u_l)) v_{l-1}^T / N."""
    rule, weights = double_rule("pc")
    x, y = double_batch()
    hp = rule.hp
    rule.compute_grads(x, y)
    n_hidden = len(weights) - 1
    inp = x.flatten(1)
    v, h = [], inp
    for w, b in weights[:-1]:
        h = (h @ weights[len(v)][0].t() + weights[len(v)][1]).relu()
        v.append(h.clone())

    def errors(v):
        below = [inp, *v]
        us = [below[i] @ weights[i][0].t() + weights[i][1] for i in range(n_hidden + 1)]
        eps = [v[i] - us[i].relu() for i in range(n_hidden)]
        out_err = hp.beta * (us[-1].softmax(1) - onehot(y))
        return us, eps, out_err

    for _ in range(hp.inference_steps):
        us, eps, out_err = errors(v)
        new = []
        for i in range(n_hidden):
            above = out_err @ weights[-1][0] if i == n_hidden - 1 else \
                -(eps[i + 1] * (us[i + 1] > 0)) @ weights[i + 1][0]
            new.append(v[i] - hp.inference_lr * (eps[i] + above))
        v = new
    us, eps, out_err = errors(v)
    below = [inp, *v]
    for i in range(n_hidden):
        d = -(eps[i] * (us[i] > 0))
        assert_parity(rule.net.blocks[i].layer.weight.grad, d.t() @ below[i] / len(y), f"pc block {i} weight")
        assert_parity(rule.net.blocks[i].layer.bias.grad, d.sum(0) / len(y), f"pc block {i} bias")
    assert_parity(rule.net.head.layer.weight.grad, out_err.t() @ v[-1] / len(y), "pc head weight")


# --- equilibrium propagation (Scellier & Bengio 2017; Laborieux et al. 2021) ------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_ep_parity(symmetric):
    """Laborieux et al. 2021: s_l <- sigma(W_l s_{l-1} + b_l + W_{l+1}^T s_{l+1}), hard sigmoid, the top hidden state
    nudged by -beta W_o^T (softmax(W_o s + b_o) - onehot); the update (dPhi/dtheta(s+) - dPhi/dtheta(s-)) / 2 beta
    (symmetric) or (dPhi/dtheta(s+) - dPhi/dtheta(s0)) / beta, with dPhi/dW_l = s_l s_{l-1}^T."""
    rule, weights = double_rule("ep", hp={"symmetric": symmetric})
    x, y = double_batch()
    hp = rule.hp
    rule.compute_grads(x, y)
    inp, n = x.flatten(1), len(weights) - 1
    wo, bo = weights[-1]

    def settle(s, beta, steps):
        for _ in range(steps):
            below = [inp, *s]
            drive = [below[i] @ weights[i][0].t() + weights[i][1] for i in range(n)]
            for i in range(n - 1):
                drive[i] = drive[i] + s[i + 1] @ weights[i + 1][0]
            drive[-1] = drive[-1] - beta * (s[-1] @ wo.t() + bo).softmax(1).sub(onehot(y)) @ wo
            s = [d.clamp(0, 1) for d in drive]
        return s

    free = settle([inp.new_zeros(len(y), w.shape[0]) for w, _ in weights[:-1]], 0.0, hp.free_steps)
    plus = settle(free, hp.beta, hp.nudged_steps)
    other, b_other = (settle(free, -hp.beta, hp.nudged_steps), -hp.beta) if symmetric else (free, 0.0)
    span = hp.beta - b_other
    for i in range(n):
        below_p, below_o = [inp, *plus][i], [inp, *other][i]
        gw = -(plus[i].t() @ below_p - other[i].t() @ below_o) / span / len(y)
        gb = -(plus[i] - other[i]).sum(0) / span / len(y)
        assert_parity(rule.net.blocks[i].layer.weight.grad, gw, f"ep block {i} weight")
        assert_parity(rule.net.blocks[i].layer.bias.grad, gb, f"ep block {i} bias")

    def dce_dwo(s):  # d/dW_o of the summed cross-entropy at state s
        return ((s[-1] @ wo.t() + bo).softmax(1) - onehot(y)).t() @ s[-1]

    want = (hp.beta * dce_dwo(plus) - b_other * dce_dwo(other)) / span / len(y)
    assert_parity(rule.net.head.layer.weight.grad, want, "ep head weight")
