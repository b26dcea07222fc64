"""Perturbation learning: node_perturbation, weight_perturbation, forward_gradient.

Their updates are computed by hand from loss values or forward-mode derivatives, so the autograd probes
of tests/test_criteria.py cannot see them; these tests prove the criteria directly, each with ``bp`` as
the negative control on which the same check must detect the violation:

* C1/C2 - a block's update does not change when every later block's weights are replaced;
* C3    - each weight layer runs once per step and no reverse-mode autograd runs at all (nothing saved
          for a backward pass, no backward call, no ``.grad`` left behind).

Correctness: the estimators agree with the exact gradient of each block's local loss (computed here by
autograd, as a reference only), batch-norm running statistics see one pass per step, block_step equals
train_step, and every rule beats chance widely on ``digits`` in seconds.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F

from bioplaus.algorithms import probes
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.trial import resolve, run_trial
from conftest import batch, reverse_mode_use, small_rule

RULES = ["node_perturbation", "weight_perturbation", "forward_gradient"]
ARCHS = ["mlp", "cnn", "deep_cnn"]


def _params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _step(rule, x, y, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rule.train_step(x, y)


# --- C1 / C2 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,local", [(r, True) for r in RULES] + [("bp", False)])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_update_ignores_later_blocks(name, local, arch):
    """Replace every later block's weights: a local rule's update of block l is unchanged (no weight
    transport, no error chained through later weights); backprop's changes (negative control)."""
    x, y = batch()
    rule = small_rule(name, arch)
    for block in range(len(rule.net.blocks)):
        a, b = copy.deepcopy(rule), copy.deepcopy(rule)
        with torch.no_grad():
            for stage in b.net.stages[block + 1:]:
                for p in stage.parameters():
                    p.copy_(torch.randn_like(p))
        _step(a, x, y)
        _step(b, x, y)
        assert not torch.equal(_params(a.net.blocks[block]), _params(rule.net.blocks[block])), "block did not learn"
        same = torch.equal(_params(a.net.blocks[block]), _params(b.net.blocks[block]))
        assert same == local, f"{name}: block {block}'s update {'depends' if not same else 'does not depend'} on later weights"


# --- C3 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*RULES, "bp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_single_forward_no_backward(name, arch, monkeypatch):
    """Each weight layer is evaluated once per step and no reverse-mode autograd runs (no backward sweep);
    backprop evaluates each layer once too but then sweeps backwards (negative control)."""
    x, y = batch(16)
    assert probes.layer_calls(small_rule(name, arch), x, y) == [1] * len(small_rule(name, arch).net.stages)
    used = reverse_mode_use(small_rule(name, arch), x, y, monkeypatch)
    if name == "bp":
        assert used["saved"] > 0 and used["backward"] > 0 and used["grads_left"] > 0
    else:
        assert used == {"saved": 0, "backward": 0, "grads_left": 0}


# --- correctness of the estimators ----------------------------------------------------------------
def _local_loss_gradients(rule, x, y) -> list[torch.Tensor]:
    """Reference (autograd, test only): gradient of every stage's local loss w.r.t. its layer weight,
    each stage fed the clean output of the one below, as the rules do."""
    grads = []
    h = x
    for i, stage in enumerate(rule.net.stages):
        out = stage(h.detach())
        if i < len(rule.net.blocks):  # hidden: the readout of the block output (band-averaged for conv)
            rows, cols = getattr(rule, f"rows{i}"), getattr(rule, f"cols{i}")
            feats = out.flatten(1) if rows is None else torch.einsum("bchw,ph,qw->bcpq", out, rows, cols).flatten(1)
            logits = rule.readouts[i](feats)
        else:
            logits = out
        grads.append(torch.autograd.grad(F.cross_entropy(logits, y), stage.layer.weight)[0])
        h = out.detach()
    return grads


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_estimate_matches_local_loss_gradient(name, arch):
    """Averaged over many perturbations, each stage's estimated weight gradient points along the exact
    gradient of its local loss (SGD with lr 1: the weight change is minus the estimate)."""
    x, y = batch(512)  # the estimate averages over examples and perturbations
    hp = {"optimizer": "sgd", "momentum": 0.0, "lr": 1.0, "perturbations": 20, "group_size": 4 if arch == "mlp" else 2}
    if name == "weight_perturbation":  # the batch shares each direction: more directions, fewer examples
        x, y = x[:64], y[:64]
        hp.update(group_size=1, perturbations=400)
    rule = small_rule(name, arch, hp=hp)
    exact = _local_loss_gradients(rule, x, y)
    before = [s.layer.weight.detach().clone() for s in rule.net.stages]
    _step(rule, x, y)
    for i, stage in enumerate(rule.net.stages):
        estimate = (before[i] - stage.layer.weight.detach()).flatten()
        cos = F.cosine_similarity(estimate, exact[i].flatten(), dim=0)
        assert cos > 0.8, f"{name} stage {i}: cosine {cos:.2f} between estimate and local-loss gradient"


@pytest.mark.parametrize("name", RULES)
def test_batch_norm_statistics_see_one_pass_per_step(name):
    """Noisy or tangent copies of a block never update the running statistics; the clean pass does, once."""
    rule = small_rule(name, "deep_cnn")
    x, y = batch(16)
    rule.train_step(x, y)
    norms = [s.norm for s in rule.net.blocks]
    assert norms and all(int(n.num_batches_tracked) == 1 for n in norms)
    plain = copy.deepcopy(norms[0]).train()
    plain.reset_running_stats()
    plain(small_rule(name, "deep_cnn").net.blocks[0].preact(x))  # the same clean pass, by the module itself
    assert torch.allclose(plain.running_mean, norms[0].running_mean, atol=1e-6)


@pytest.mark.parametrize("name", RULES)
def test_block_step_is_train_step(name):
    x, y = batch()
    a, b = small_rule(name, "cnn"), small_rule(name, "cnn")
    _step(a, x, y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        h = x
        for i in range(len(b.net.stages)):
            h = b.block_step(i, h, y)
    assert torch.equal(_params(a), _params(b))


@pytest.mark.parametrize("name", RULES)
def test_learns_digits_within_seconds(name):
    """Well above chance (10 %) on held-out digits after a few seconds of training."""
    cpu = time.process_time()
    record = run_trial(resolve(parse_overrides([
        f"rule={name}", "arch=mlp", "dataset=digits", "model.widths=[64]", "train.epochs=6", "train.batch_size=64",
        "data.train_limit=1000", "data.test_limit=500", "hp.lr=3e-3"])))
    cpu = time.process_time() - cpu
    assert record["status"] == "ok", record.get("traceback")
    assert cpu < 60  # CPU seconds (both threads), not wall: processes beside this one stretch wall time only
    assert record["test_acc"] > 0.75, record["test_acc"]


@pytest.mark.parametrize("name,override", [("node_perturbation", "hp.sigma=0"), ("weight_perturbation", "hp.group_size=0"),
                                           ("forward_gradient", "hp.perturbations=0")])
def test_bad_hyperparameters_are_refused_before_training(name, override):
    from bioplaus.orchestrator.errors import UsageError

    with pytest.raises(UsageError, match=override.split("=")[0]):
        resolve(parse_overrides([f"rule={name}", override]))


def test_step_cost_times_the_rule_and_bp_side_by_side():
    """``python -m bioplaus.orchestrator.bench step-cost``: both rules stepped in alternating rounds on the same
    batches; a ratio per round and their median (the docs' weight_perturbation overhead comes from it)."""
    import math

    from bioplaus.orchestrator.bench import step_cost

    out = step_cost(["rule=weight_perturbation", "arch=mlp", "dataset=digits", "model.widths=[16]",
                     "train.batch_size=16", "train.threads=1"], rounds=2, steps=1)
    assert (out["rule"], out["threads"], out["batch_size"], out["rounds"]) == ("weight_perturbation", 1, 16, 2)
    assert len(out["cost_vs_bp_per_round"]) == 2 and all(math.isfinite(r) and r > 0 for r in out["cost_vs_bp_per_round"])
    assert out["rule_ms_per_step"] > 0 and out["bp_ms_per_step"] > 0
