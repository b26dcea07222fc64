"""The cost estimate's arithmetic: known step times give known device-hours; ASHA's pruning as Ray Tune does it."""

from __future__ import annotations

import random

import pytest

from bioplaus.orchestrator.cost_model import (Budget, CellCost, asha_epochs_run, asha_expected_epochs, asha_rungs,
                                              curve_for, estimate, speedup)

COST = CellCost(step_s=0.01, steps_per_epoch=100, n_val=1000, n_test=500, eval_s_per_sample=0.001, setup_s=2.0)


def test_known_times_give_known_hours():
    # one trial: ASHA never prunes the first, so it runs all 3 epochs of 1 s training + 1 s validation each
    budget = Budget(trials=1, epochs=3, grace_epochs=1, reduction_factor=3, final_seeds=2, final_epochs=4)
    out = estimate({"bp.mlp.digits": COST}, budget)
    row = out["cells"][0]
    assert row["tuning_s"] == pytest.approx(2 + 3 * 2)
    assert row["finals_s"] == pytest.approx(2 * (2 + 4 * 2 + 0.5))
    assert out["device_hours"] == pytest.approx(29 / 3600)
    assert out["work_hours_alone"] == pytest.approx(29 / 3600)


def test_packing_and_populations_divide_by_the_larger_measured_gain():
    budget = Budget(trials=1, epochs=3, grace_epochs=1, reduction_factor=3, final_seeds=2, final_epochs=4)
    packing = {"bp.mlp.mnist": {"1": 100.0, "2": 180.0, "4": 300.0}}
    out = estimate({"bp.mlp.digits": COST}, budget, packing=4, packing_curves=packing)
    assert out["cells"][0]["packing_speedup"] == pytest.approx(3.0)
    assert out["device_hours"] == pytest.approx(29 / 3 / 3600)
    population = {"bp.mlp.digits": {"1": 10.0, "16": 120.0}}
    out = estimate({"bp.mlp.digits": COST}, budget, packing=4, population=16, packing_curves=packing,
                   population_curves=population)
    assert out["cells"][0]["population_speedup"] == pytest.approx(12.0)
    assert out["device_hours"] == pytest.approx(29 / 12 / 3600)
    # no curve for the cell's arch: no gain is assumed
    assert estimate({"bp.cnn.digits": COST}, budget, packing=4, packing_curves=packing)["device_hours"] == \
        pytest.approx(29 / 3600)


def test_speedup_interpolates_and_saturates():
    curve = {"1": 100.0, "2": 180.0, "4": 300.0}
    assert speedup(curve, 1) == 1.0
    assert speedup(curve, 3) == pytest.approx(2.4)
    assert speedup(curve, 16) == pytest.approx(3.0)
    assert speedup(None, 8) == 1.0
    assert speedup({"2": 50.0}, 2) == 1.0  # no single-trial point to compare with


def test_curve_lookup_prefers_the_cell_then_rule_and_arch_then_arch():
    curves = {"bp.mlp.mnist": {"1": 1}, "pc.mlp.mnist": {"1": 2}, "bp.cnn.cifar10": {"1": 3}}
    assert curve_for(curves, "pc.mlp.mnist") == {"1": 2}
    assert curve_for(curves, "bp.mlp.fashion_mnist") == {"1": 1}
    assert curve_for(curves, "fa.cnn.mnist") == {"1": 3}
    assert curve_for(curves, "fa.resnet20.cifar10") is None


def test_asha_rungs_are_ray_tunes():
    assert asha_rungs(30, 3, 3) == [3, 9, 27]
    assert asha_rungs(5, 1, 3) == [1, 3]
    assert asha_rungs(3, 3, 3) == []


@pytest.mark.parametrize("budget", [(30, 3, 3), (5, 1, 3), (12, 1, 2)])
def test_asha_simulation_stops_trials_where_ray_tunes_bracket_does(budget):
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    class Trial:
        def __init__(self, i):
            self.trial_id = str(i)

    max_t, grace, rf = budget
    rng = random.Random(1)
    qualities = [rng.random() for _ in range(20)]
    bracket = _Bracket(grace, max_t, rf, 0)
    ray_epochs = []
    for i, q in enumerate(qualities):
        trial, ran = Trial(i), max_t
        for epoch in range(1, max_t + 1):
            if bracket.on_result(trial, epoch, q) == TrialScheduler.STOP and epoch < max_t:
                ran = epoch
                break
        ray_epochs.append(ran)
    assert asha_epochs_run(qualities, max_t, grace, rf) == ray_epochs


def test_asha_expected_epochs_is_seeded_and_prunes_more_with_more_trials():
    assert asha_expected_epochs(1, 30, 3, 3) == 30
    few, many = asha_expected_epochs(4, 30, 3, 3), asha_expected_epochs(64, 30, 3, 3)
    assert 3 < many < few < 30
    # each rung keeping a third is the floor: 3 + 6/3 + 18/9 + 3/27 epochs
    assert many > 3 + 2 + 2 + 3 / 27
    assert asha_expected_epochs(32, 30, 3, 3) == asha_expected_epochs(32, 30, 3, 3)
