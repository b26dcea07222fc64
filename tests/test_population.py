"""Populations (algorithms/population.py, orchestrator/population.py): every member of a population ends with the
numbers its configuration gets when trained alone through ``run_trial``.

Tolerance: per-epoch training and validation losses within 1e-5 (absolute; measured differences are below 1e-6,
float32 rounding of batched against single matrix products) and accuracies (train, validation per epoch; final
validation and test) within one sample of the split; the selected epoch is the same. The batched optimiser
equals torch.optim bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from bioplaus.algorithms.population import MemberOptimizer, stack_key
from bioplaus.algorithms.registry import load_rules
from bioplaus.algorithms.rule import OptimHParams, make_optimizer
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.population import check_population, population_support, run_population
from bioplaus.orchestrator.spec import resolve
from bioplaus.orchestrator.trial import load_splits, run_trial

LOSS_TOL = 1e-5
BASE = ["smoke=true", "train.epochs=2", "train.threads=1", "out=null", "dataset=digits"]
# Per rule: members differing in the optimiser, schedule and the rule's own searched knobs (local_losses' aux and
# loss split its members into three stacks of different structure; two members share one).
MEMBERS = {
    "bp": [["hp.lr=3e-3"], ["hp.optimizer=sgd", "hp.lr=3e-2", "hp.momentum=0.8", "hp.schedule=cosine"],
           ["hp.optimizer=adamw", "hp.weight_decay=1e-2", "hp.schedule=onecycle"]],
    "fa": [["hp.feedback_scale=0.5"], ["hp.optimizer=sgd", "hp.lr=3e-2", "hp.schedule=cosine"],
           ["hp.feedback_scale=2.0", "hp.weight_decay=1e-4"]],
    "dfa": [["hp.feedback_scale=0.5"], ["hp.optimizer=sgd", "hp.lr=3e-2", "hp.schedule=onecycle"],
            ["hp.feedback_scale=2.0", "hp.weight_decay=1e-4", "hp.lr=3e-3"]],
    "sign_symmetry": [["hp.batch_manhattan=true", "hp.lr=1e-4"], ["hp.feedback_scale=3.0", "hp.optimizer=sgd",
                                                                   "hp.lr=1e-2"], ["hp.feedback_scale=0.3"]],
    "local_losses": [["hp.beta=0.9"], ["hp.loss=pred", "hp.optimizer=sgd", "hp.lr=1e-2"],
                     ["hp.beta=0.6", "hp.aux=dgl"], ["hp.beta=0.99", "hp.schedule=cosine"]],
}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``train.threads=1`` sets torch's process-wide thread count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def specs(rule: str, members: list[list[str]], *extra: str):
    return [resolve(parse_overrides([*BASE, f"rule={rule}", *extra, *hp])) for hp in members]


def assert_same_run(alone: dict, member: dict) -> None:
    assert member["status"] == alone["status"] == "ok", member.get("traceback")
    assert member["hp"] == alone["hp"] and member["best_epoch"] == alone["best_epoch"]
    assert len(member["epochs"]) == len(alone["epochs"])
    n_train, n_val = alone["n_train"], alone["n_val"]
    for a, m in zip(alone["epochs"], member["epochs"]):
        assert abs(a["train_loss"] - m["train_loss"]) <= LOSS_TOL and abs(a["val_loss"] - m["val_loss"]) <= LOSS_TOL
        assert abs(a["train_acc"] - m["train_acc"]) <= 1 / n_train + 1e-12
        assert abs(a["val_acc"] - m["val_acc"]) <= 1 / n_val + 1e-12
        assert a["extra"].keys() == m["extra"].keys()
        assert all(abs(a["extra"][k] - m["extra"][k]) <= LOSS_TOL for k in a["extra"])
    assert abs(alone["val_acc"] - member["val_acc"]) <= 1 / n_val + 1e-12
    assert abs(alone["test_acc"] - member["test_acc"]) <= 1 / alone["n_test"] + 1e-12


@pytest.mark.parametrize("rule", sorted(MEMBERS))
def test_each_member_equals_its_configuration_trained_alone(rule):
    population = specs(rule, MEMBERS[rule])
    stacks = {stack_key(s.rule_cls, s.hp) for s in population}  # one stack; local_losses: one per aux and loss
    assert len(stacks) == (3 if rule == "local_losses" else 1)
    splits = load_splits(population[0].cfg)
    alone = [run_trial(s, splits=splits) for s in specs(rule, MEMBERS[rule])]
    for a, m in zip(alone, run_population(population, splits=splits)):
        assert_same_run(a, m)


def test_conv_members_equal_their_runs_alone():
    members = MEMBERS["fa"][:2]
    splits = load_splits(specs("fa", members, "arch=cnn")[0].cfg)
    alone = [run_trial(s, splits=splits) for s in specs("fa", members, "arch=cnn")]
    for a, m in zip(alone, run_population(specs("fa", members, "arch=cnn"), splits=splits)):
        assert_same_run(a, m)


def test_a_member_is_not_disturbed_by_the_others_or_by_pruning():
    """The first member's numbers are the same beside other hyperparameters, and when its neighbour is stopped."""
    first, *others = MEMBERS["bp"]
    splits = load_splits(specs("bp", [first])[0].cfg)
    alone = run_trial(specs("bp", [first])[0], splits=splits)
    stopped = []

    def prune_second(epoch, rows):
        assert set(rows) == ({0, 1} if epoch == 1 else {0})  # a stopped member reports no further epoch
        stopped.append(epoch)
        return {1} if epoch == 1 else set()

    pruned = run_population(specs("bp", [first, others[0]]), on_epoch=prune_second, splits=splits)
    assert stopped == [1, 2] and pruned[1]["epochs_run"] == 1 and pruned[1]["status"] == "ok"
    assert_same_run(alone, pruned[0])
    assert_same_run(alone, run_population(specs("bp", [first, others[1]]), splits=splits)[0])


def test_a_diverging_member_is_recorded_and_dropped_alone():
    splits = load_splits(specs("bp", [[]])[0].cfg)
    members = [["hp.optimizer=sgd", "hp.lr=1e6", "hp.momentum=0.9"], ["hp.lr=3e-3"]]
    out = run_population(specs("bp", members), splits=splits)
    diverged = run_trial(specs("bp", [members[0]])[0], splits=splits)
    assert out[0]["status"] == diverged["status"] == "diverged"
    assert out[0]["epochs_run"] == diverged["epochs_run"] and math.isnan(out[0]["epochs"][-1]["val_acc"])
    assert_same_run(run_trial(specs("bp", [members[1]])[0], splits=splits), out[1])


@pytest.mark.parametrize("optimizer,schedule,momentum,weight_decay", [
    ("adam", "constant", 0.9, 0.0), ("adam", "cosine", 0.9, 1e-3), ("adamw", "onecycle", 0.9, 1e-2),
    ("sgd", "cosine", 0.9, 1e-3), ("sgd", "onecycle", 0.0, 0.0)])
def test_the_batched_optimiser_is_torch_optim_bit_for_bit(optimizer, schedule, momentum, weight_decay):
    torch.manual_seed(0)
    steps = 12
    hps = [OptimHParams(lr=1e-2, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule),
           OptimHParams(lr=3e-3, optimizer=optimizer, momentum=0.5, weight_decay=weight_decay * 3, schedule="constant")]
    weights, grads = torch.randn(2, 4, 3), torch.randn(steps, 2, 4, 3)
    stacked = {"w": weights.clone()}
    batched = MemberOptimizer(hps, stacked, steps)
    for k in range(steps):
        batched.step(stacked, {"w": grads[k].clone()})  # the step may overwrite the gradients it is given
    for i, hp in enumerate(hps):
        p = torch.nn.Parameter(weights[i].clone())
        opt = make_optimizer([p], hp, steps)
        for k in range(steps):
            p.grad = grads[k, i].clone()
            opt.step()
        assert torch.equal(stacked["w"][i], p.detach()), (i, hp)


def test_populations_refuse_what_they_cannot_train():
    with pytest.raises(UsageError, match="differ only in hp.*seed"):
        check_population([*specs("bp", [[]]), *specs("bp", [[]], "seed=1")])
    with pytest.raises(UsageError, match="differ only in hp.*model"):
        check_population([*specs("bp", [[]]), *specs("bp", [[]], "model.widths=[16]")])
    assert "batch norm" in population_support(specs("bp", [[]], "model.norm=batch")[0])
    unsupported = [name for name, cls in load_rules().items() if cls.population_support(None)]
    assert not {"bp", "fa", "dfa", "sign_symmetry", "local_losses"} & set(unsupported)
    if unsupported:
        with pytest.raises(UsageError, match="cannot train as a population"):
            check_population(specs(unsupported[0], [[]]))
