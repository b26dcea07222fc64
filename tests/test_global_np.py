"""Global-reward node perturbation: what its update is made of, how often the network runs, that the
estimate follows the gradient of the global loss, and that it learns.

The update is computed by hand (no autograd), so the criteria are proved here: C1/C2 by showing each
block's update is exactly the per-example scalar reward change times the block's own noise and input
(nothing else from the rest of the network reaches a block); C3 by counting passes (two per step with the
clean baseline, one with the running baseline), with backprop as the negative control for reverse mode.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F

from bioplaus.algorithms import probes
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.trial import resolve, run_trial
from conftest import batch, reverse_mode_use, small_rule

NAME = "global_node_perturbation"
SGD = {"optimizer": "sgd", "momentum": 0.0, "lr": 1.0}


def _spy_update(rule) -> dict:
    seen = {}
    original = rule._update

    def spy(inputs, noises, change):
        seen.update(inputs=[t.clone() for t in inputs], noises=[t.clone() for t in noises], change=change.clone())
        original(inputs, noises, change)

    rule._update = spy
    return seen


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_update_is_scalar_reward_change_times_noise_times_input(arch):
    """C1, C2: every block's weight change is -(L_perturbed - L_clean) / sigma x its noise x its input, with L
    the output cross-entropy of one example: one scalar per example is all a block gets from the network."""
    x, y = batch(16)
    rule = small_rule(NAME, arch, hp={**SGD, "perturbations": 3, "sigma": 0.05})
    before = copy.deepcopy(rule.net)
    seen = _spy_update(rule)
    rule.train_step(x, y)
    change, sigma, rows = seen["change"], 0.05, 3 * 16
    assert change.shape == (rows,)  # one scalar per example and draw
    with torch.no_grad():  # the reward change, recomputed from the network's output alone
        h = x.repeat(3, *((1,) * (x.dim() - 1)))
        for stage, xi in zip(before.stages, seen["noises"]):
            h = stage.post(stage.layer(stage.pre(h)) + sigma * xi)
        expected = F.cross_entropy(h, y.repeat(3), reduction="none") - F.cross_entropy(before(x), y, reduction="none").repeat(3)
    torch.testing.assert_close(change, expected)
    for old, new, inp, xi in zip(before.stages, rule.net.stages, seen["inputs"], seen["noises"]):
        post = (change / sigma).view(-1, *((1,) * (xi.dim() - 1))) * xi
        w = old.layer.weight.detach().clone().requires_grad_(True)  # autograd as the reference only
        z = F.linear(inp, w) if arch == "mlp" or w.dim() == 2 else F.conv2d(inp, w, padding=old.layer.padding)
        reference = torch.autograd.grad((z * post).sum(), w)[0] / rows
        torch.testing.assert_close(old.layer.weight - new.layer.weight, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_passes_per_step(arch, monkeypatch):
    """C3: the clean baseline runs the network twice per step (unperturbed, then perturbed: not single-phase),
    the running baseline once; neither uses reverse-mode autograd, which bp does (negative control)."""
    x, y = batch(16)
    stages = len(small_rule(NAME, arch).net.stages)
    assert probes.layer_calls(small_rule(NAME, arch), x, y) == [2] * stages
    assert probes.layer_calls(small_rule(NAME, arch, hp={"baseline": "running", "perturbations": 4}), x, y) == [1] * stages
    assert reverse_mode_use(small_rule(NAME, arch), x, y, monkeypatch) == {"saved": 0, "backward": 0, "grads_left": 0}
    used = reverse_mode_use(small_rule("bp", arch), x, y, monkeypatch)
    assert used["saved"] > 0 and used["backward"] > 0 and used["grads_left"] > 0


def test_estimate_follows_the_gradient_of_the_global_loss():
    """Averaged over many draws, each layer's update points along minus the exact gradient of the output
    cross-entropy (autograd reference, test only)."""
    x, y = batch(32)
    rule = small_rule(NAME, hp={**SGD, "perturbations": 4000, "sigma": 1e-2})
    net = copy.deepcopy(rule.net)
    loss = F.cross_entropy(net(x), y)
    exact = torch.autograd.grad(loss, [s.layer.weight for s in net.stages])
    before = [s.layer.weight.detach().clone() for s in rule.net.stages]
    rule.train_step(x, y)
    for i, stage in enumerate(rule.net.stages):
        cos = F.cosine_similarity((before[i] - stage.layer.weight.detach()).flatten(), exact[i].flatten(), dim=0)
        assert cos > 0.8, f"stage {i}: cosine {cos:.2f} between the update and minus the gradient"


def test_running_baseline_starts_at_the_first_loss_and_tracks_it():
    x, y = batch(16)
    rule = small_rule(NAME, hp={"baseline": "running", "baseline_decay": 0.5})
    assert torch.isnan(rule.running_loss)
    seen = _spy_update(rule)
    rule.train_step(x, y)
    assert abs(float(seen["change"].mean())) < 1e-6  # the first batch is its own baseline
    assert torch.isfinite(rule.running_loss) and "running_loss" in rule.state_dict()


@pytest.mark.parametrize("baseline", ["clean", "running"])
def test_learns_digits_above_chance_in_a_few_epochs(baseline):
    """Well above chance (10 %) on held-out digits after a few epochs (seconds of training)."""
    cpu = time.process_time()
    record = run_trial(resolve(parse_overrides([
        f"rule={NAME}", "arch=mlp", "dataset=digits", "model.widths=[64]", "train.epochs=6", "train.batch_size=64",
        "data.train_limit=1000", "data.test_limit=500", "hp.lr=3e-3", "hp.perturbations=4", f"hp.baseline={baseline}",
        # the running baseline's reward change carries the examples' loss spread: it needs larger noise
        f"hp.sigma={0.01 if baseline == 'clean' else 0.3}"])))
    cpu = time.process_time() - cpu
    assert record["status"] == "ok"
    assert cpu < 60  # CPU seconds (all threads), not wall: processes beside this one stretch wall time only
    assert record["test_acc"] > (0.7 if baseline == "clean" else 0.4), record["test_acc"]


@pytest.mark.parametrize("override", ["hp.sigma=0", "hp.perturbations=0", "hp.baseline=mean", "hp.baseline_decay=1"])
def test_bad_hyperparameters_are_refused_before_training(override):
    with pytest.raises(UsageError, match=override.split("=")[0]):
        resolve(parse_overrides([f"rule={NAME}", override]))


def test_normalisation_layers_are_refused():
    with pytest.raises(ValueError, match="model.norm=none"):
        small_rule(NAME, model={"norm": "layer"})
    with pytest.raises(UsageError, match="deep_cnn"):
        resolve(parse_overrides([f"rule={NAME}", "arch=deep_cnn"]))
