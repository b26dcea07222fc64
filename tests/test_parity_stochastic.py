"""Parity of the rules whose step draws noise (dtp, forward_gradient, node_perturbation, weight_perturbation,
global_node_perturbation) with the update written here from their papers' equations, in the style of
tests/test_parity.py: tiny float64 relu mlp, fixed weights and inputs, relative error <= 1e-10.

The noise is fixed by seeding torch's global generator just before the rule's step and drawing the same
numbers here in the rule's documented order (stated in each test); nothing else of the rule's code is used.
Every rule trains with SGD(lr=1, momentum=0), so a parameter's change is minus the gradient the rule used.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import small_rule
from test_parity import SGD, assert_parity, double_batch, onehot, sgd_update

SEED = 1234


def double_rule(name: str, **hp):
    rule = small_rule(name, "mlp", hp={**SGD, **hp}).double()
    return rule, {k: v.detach().clone() for k, v in rule.named_parameters()}


def noisy_step(rule, x, y) -> dict[str, torch.Tensor]:
    """One train_step under a fixed seed; the reference then restarts the generator from the same seed."""
    torch.manual_seed(SEED)
    upd = sgd_update(rule, x, y)
    torch.manual_seed(SEED)
    return upd


def stage_names(p: dict) -> list[str]:
    return sorted({k.rsplit(".layer.", 1)[0] for k in p if k.startswith("net.")}, key=lambda s: (s == "net.head", s))


def drelu(u):
    return (u > 0).double()


# --- difference target propagation (Lee et al. 2015; simplified DTP, Bartunov et al. 2018) ---------------
def adam_first_step(param, grad, lr):
    """Kingma & Ba's first step from zero moments: the bias-corrected m/sqrt(v) is g/|g| (eps 1e-8)."""
    return param - lr * grad / (grad.abs() + 1e-8)


@pytest.mark.parametrize("top_target", ["inverse", "gradient"])
def test_dtp_parity(top_target):
    """Lee et al. 2015 on a relu mlp h_l = f_l(h_{l-1}), inverses g_l(h) = relu(V_l h + c_l) from stage l's output
    to its input. (1) eq. 14: each used g_l takes one Adam step (lr feedback_lr) on
    1/2 mean_n ||g_l(f_l(h_{l-1} + e_l)) - (h_{l-1} + e_l)||^2, e_l = noise * N(0, 1) drawn for l = 1, 2, ... in
    order; (2) targets through the updated inverses: t_out = o - target_lr (softmax(o) - onehot) (inverse: the
    head's inverse carries it down) or Lee et al.'s t_top = h_top - target_lr dCE_sum/dh_top = h - target_lr
    (softmax - onehot) W_o (gradient), then the difference correction t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)
    (Lee et al.'s Algorithm 1); (3) each hidden block: dW_l = ((h_l - t_l) f'(u_l))^T h_{l-1} / N, the head: the CE gradient."""
    rule, p = double_rule("dtp", top_target=top_target)
    hp = rule.hp
    x, y = double_batch()
    upd = noisy_step(rule, x, y)
    names = stage_names(p)
    W = [(p[f"{s}.layer.weight"], p[f"{s}.layer.bias"]) for s in names]
    hs, us, h = [], [], x.flatten(1)
    for i, (w, b) in enumerate(W):
        us.append(h @ w.t() + b)
        h = us[-1].relu() if i < len(W) - 1 else us[-1]
        hs.append(h)
    used = range(1, len(W)) if top_target == "inverse" else range(1, len(W) - 1)
    V = {}
    for l in used:  # (1) noisy reconstruction training of g_l, l = 1.. (inverses.{l-1})
        v, c = p[f"inverses.{l - 1}.layer.weight"], p[f"inverses.{l - 1}.layer.bias"]
        corrupted = hs[l - 1] + hp.noise * torch.randn(hs[l - 1].shape, dtype=torch.float64)
        fz = corrupted @ W[l][0].t() + W[l][1]
        out = fz.relu() if l < len(W) - 1 else fz
        a = out @ v.t() + c
        delta = (a.relu() - corrupted) * drelu(a) / len(y)
        V[l] = (adam_first_step(v, delta.t() @ out, hp.feedback_lr), adam_first_step(c, delta.sum(0), hp.feedback_lr))
        assert_parity(p[f"inverses.{l - 1}.layer.weight"] - upd[f"inverses.{l - 1}.layer.weight"], V[l][0],
                      f"dtp inverse {l} weight (eq. 14, Adam)")
        assert_parity(p[f"inverses.{l - 1}.layer.bias"] - upd[f"inverses.{l - 1}.layer.bias"], V[l][1],
                      f"dtp inverse {l} bias")
    err = hs[-1].softmax(1) - onehot(y)
    targets = {}
    if top_target == "inverse":
        t, top = hs[-1] - hp.target_lr * err, len(W) - 1
    else:
        t, top = hs[-2] - hp.target_lr * err @ W[-1][0], len(W) - 2
        targets[top] = t
    for l in range(top, 0, -1):  # (2) difference correction through the updated g_l
        g = lambda h, l=l: (h @ V[l][0].t() + V[l][1]).relu()  # noqa: E731
        t = hs[l - 1] + g(t) - g(hs[l])
        targets[l - 1] = t
    inputs = [x.flatten(1), *hs[:-1]]
    for l in range(len(W) - 1):  # (3) local regression of every hidden block onto its target
        delta = (hs[l] - targets[l]) * drelu(us[l]) / len(y)
        assert_parity(upd[f"{names[l]}.layer.weight"], delta.t() @ inputs[l], f"dtp block {l} weight")
        assert_parity(upd[f"{names[l]}.layer.bias"], delta.sum(0), f"dtp block {l} bias")
    assert_parity(upd["net.head.layer.weight"], err.t() @ hs[-2] / len(y), "dtp head weight")
    assert_parity(upd["net.head.layer.bias"], err.mean(0), "dtp head bias")


# --- the block-local perturbation rules: one local loss per block, split into groups ---------------------
class LocalLoss:
    """Block l's local loss (Ren et al. 2023): CE of its readout R h + c (the head: its logits, R = I), one copy per
    group of units in which only that group's features leave their clean value."""

    def __init__(self, p: dict, l: int, n_stages: int, units: int, group_size: int, y):
        self.head = l == n_stages - 1
        self.R = torch.eye(units, dtype=torch.float64) if self.head else p[f"readouts.{l}.weight"]
        self.c = torch.zeros(units, dtype=torch.float64) if self.head else p[f"readouts.{l}.bias"]
        self.groups = torch.arange(units) // (1 if self.head else min(group_size, units))
        self.y = y

    def act(self, z):
        return z if self.head else z.relu()

    def per_group(self, h_clean, h_new):
        """[batch, group] losses of the groups' copies at features ``h_new``."""
        cols = [F.cross_entropy(torch.where(self.groups == g, h_new, h_clean) @ self.R.t() + self.c, self.y,
                                reduction="none") for g in self.groups.unique()]
        return torch.stack(cols, 1)

    def dz(self, z):
        """dL/dz of the (uncopied) local loss at the clean activity: (softmax - onehot) R f'(z)."""
        err = (self.act(z) @ self.R.t() + self.c).softmax(1) - onehot(self.y, self.R.shape[0])
        return err @ self.R * (1.0 if self.head else drelu(z))


def check_block_local(rule, p, upd, x, y, estimate):
    """Walk the blocks on clean inputs; ``estimate(l, x_l, z_l, loss)`` returns the rule's (dW, db) per the paper.
    Also checks each hidden readout's delta rule, dR = (softmax - onehot)^T h / N on the clean features."""
    names = stage_names(p)
    h = x.flatten(1)
    for l, s in enumerate(names):
        w, b = p[f"{s}.layer.weight"], p[f"{s}.layer.bias"]
        z = h @ w.t() + b
        loss = LocalLoss(p, l, len(names), z.shape[1], rule.hp.group_size, y)
        gw, gb = estimate(l, h, z, loss)
        assert_parity(upd[f"{s}.layer.weight"], gw, f"{rule.name} stage {l} weight")
        assert_parity(upd[f"{s}.layer.bias"], gb, f"{rule.name} stage {l} bias")
        h = loss.act(z)
        if not loss.head:
            err = (h @ loss.R.t() + loss.c).softmax(1) - onehot(y)
            assert_parity(upd[f"readouts.{l}.weight"], err.t() @ h / len(y), f"{rule.name} readout {l} delta rule")
            assert_parity(upd[f"readouts.{l}.bias"], err.mean(0), f"{rule.name} readout {l} bias")


def test_forward_gradient_parity():
    """Baydin et al. 2022's forward gradient (grad . v) v, taken per group of units (Ren et al. 2023's FG-A with
    local losses): v ~ N(0, I) in the block's activity z, d_bg = sum_{u in g} dL_b/dz_u v_u, estimate d_{b,g(u)} v_u,
    averaged over K tangents; dW = mean over b and K of estimate x^T. Tangents: K per block, block by block."""
    rule, p = double_rule("forward_gradient")
    x, y = double_batch()
    upd = noisy_step(rule, x, y)
    K, N = rule.hp.perturbations, len(y)

    def estimate(l, h, z, loss):
        g = torch.zeros_like(z)
        for _ in range(K):
            v = torch.randn(z.shape, dtype=torch.float64)
            d = torch.stack([(loss.dz(z) * v)[:, loss.groups == k].sum(1) for k in loss.groups.unique()], 1)
            g += d[:, loss.groups] * v
        return g.t() @ h / (K * N), g.sum(0) / (K * N)

    check_block_local(rule, p, upd, x, y, estimate)


def test_node_perturbation_parity():
    """Williams 1992 / Fiete & Seung 2006 per group, antithetic: xi ~ N(0, I) in z, each group's loss change
    c_bg = (L_bg(f(z + sigma xi)) - L_bg(f(z - sigma xi))) / (2 sigma), estimate c_{b,g(u)} xi_u, K pairs averaged.
    Noise: K draws per block, block by block."""
    rule, p = double_rule("node_perturbation")
    x, y = double_batch()
    upd = noisy_step(rule, x, y)
    K, N, sigma = rule.hp.perturbations, len(y), rule.hp.sigma

    def estimate(l, h, z, loss):
        g = torch.zeros_like(z)
        for _ in range(K):
            xi = torch.randn(z.shape, dtype=torch.float64)
            clean = loss.act(z)
            change = (loss.per_group(clean, loss.act(z + sigma * xi))
                      - loss.per_group(clean, loss.act(z - sigma * xi))) / (2 * sigma)
            g += change[:, loss.groups] * xi
        return g.t() @ h / (K * N), g.sum(0) / (K * N)

    check_block_local(rule, p, upd, x, y, estimate)


def test_weight_perturbation_parity():
    """Jabri & Flower 1992, antithetic, with Flipout's per-example directions (Wen et al. 2018): example b's weights
    W +- sigma D o (s_b r_b^T), bias b +- sigma d o s_b (D, d ~ N(0, 1); s, r random signs); each output unit's
    loss change c_bo = (L+ - L-) / (2 sigma) (groups of one unit); dW = mean over b and K of c_bo D o (s_b r_b^T).
    Draw order per block and pair: D, s (batch x out), r (batch x in), d."""
    rule, p = double_rule("weight_perturbation")
    x, y = double_batch()
    upd = noisy_step(rule, x, y)
    K, N, sigma = rule.hp.perturbations, len(y), rule.hp.sigma
    assert rule.hp.group_size == 1

    def signs(rows, cols):
        return torch.randint(0, 2, (rows, cols)).double() * 2 - 1

    def estimate(l, h, z, loss):
        w, b = p[f"{stage_names(p)[l]}.layer.weight"], p[f"{stage_names(p)[l]}.layer.bias"]
        gw, gb = torch.zeros_like(w), torch.zeros_like(b)
        for _ in range(K):
            D = torch.randn(w.shape, dtype=torch.float64)
            s, r = signs(N, w.shape[0]), signs(N, w.shape[1])
            d = torch.randn(b.shape, dtype=torch.float64)
            Db = D * s[:, :, None] * r[:, None, :]  # [batch, out, in]: each example's own direction
            z_plus = torch.einsum("boi,bi->bo", w + sigma * Db, h) + b + sigma * d * s
            z_minus = torch.einsum("boi,bi->bo", w - sigma * Db, h) + b - sigma * d * s
            clean = loss.act(z)
            change = (loss.per_group(clean, loss.act(z_plus)) - loss.per_group(clean, loss.act(z_minus))) / (2 * sigma)
            gw += (change[:, :, None] * Db).sum(0)
            gb += (change * d * s).sum(0)
        return gw / (K * N), gb / (K * N)

    check_block_local(rule, p, upd, x, y, estimate)


# --- global-reward node perturbation (Williams 1992; Werfel et al. 2005; Fiete & Seung 2006) --------------
@pytest.mark.parametrize("baseline", ["clean", "running"])
def test_global_node_perturbation_parity(baseline):
    """One scalar reward per example, every unit perturbed at once: z_l = W_l a_l + b_l + sigma xi_l with a_l the
    perturbed pass's presynaptic activity; dW_l = mean over examples and K draws of (L - L0) / sigma xi_l a_l^T,
    L0 the clean network's loss on the example (Werfel et al.) or, on the first step of the running average, the
    perturbed batch's mean loss (Fiete & Seung's R-bar). Noise: the batch repeated K times, one draw per stage."""
    rule, p = double_rule("global_node_perturbation", baseline=baseline)
    x, y = double_batch()
    upd = noisy_step(rule, x, y)
    K, sigma = rule.hp.perturbations, rule.hp.sigma
    names = stage_names(p)
    W = [(p[f"{s}.layer.weight"], p[f"{s}.layer.bias"]) for s in names]
    a, clean = x.flatten(1).repeat(K, 1), x.flatten(1)
    inputs, noises = [], []
    for i, (w, b) in enumerate(W):
        xi = torch.randn((len(a), w.shape[0]), dtype=torch.float64)
        inputs.append(a)
        noises.append(xi)
        u, uc = a @ w.t() + b + sigma * xi, clean @ w.t() + b
        a, clean = (u.relu(), uc.relu()) if i < len(W) - 1 else (u, uc)
    loss = F.cross_entropy(a, y.repeat(K), reduction="none")
    base = F.cross_entropy(clean, y, reduction="none").repeat(K) if baseline == "clean" else loss.mean()
    reward_change = (loss - base) / sigma
    for s, a_l, xi in zip(names, inputs, noises):
        e = reward_change[:, None] * xi
        assert_parity(upd[f"{s}.layer.weight"], e.t() @ a_l / len(a_l), f"global_np {s} weight")
        assert_parity(upd[f"{s}.layer.bias"], e.mean(0), f"global_np {s} bias")
