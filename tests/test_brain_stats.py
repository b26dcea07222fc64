"""Inference on RSA scores (analysis/rsa_stats.py, analysis/brain_pairs.py) on synthetic RDMs.

Synthetic world: stimuli have latent features; each subject's RDM is of the features plus subject noise;
a "rule" is a model whose features are the latent ones plus nuisance features (more nuisance: less
brain-like). Everything is drawn fresh per draw, so stimulus and subject sampling are both real.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.spatial.distance import pdist

from bioplaus.analysis.brain_pairs import pairs_tables, select_checkpoints
from bioplaus.analysis.rsa_stats import draw_resamples, dual_bootstrap, holm, paired_test
from bioplaus.orchestrator.errors import UsageError


def _world(rng, n=24, d=6, nuisance=(1.0, 1.0), layers=1):
    x = rng.normal(size=(n, d))
    subjects = np.stack([pdist(x + rng.normal(size=x.shape), "correlation") for _ in range(4)])
    models = [pdist(np.hstack([x, s * rng.normal(size=(n, 2 * d))]), "correlation")
              for s in nuisance for _ in range(layers)]
    return np.stack(models), subjects


def test_planted_difference_is_recovered():
    rng = np.random.default_rng(0)
    models, subjects = _world(rng, n=40, nuisance=(0.5, 3.0))
    res = dual_bootstrap(models, subjects, draw_resamples(4, 40, 100, seed=1))
    t = paired_test(res.boot[:, 0], res.boot[:, 1])
    assert res.score[0] > res.score[1] and t["ci_low"] > 0 and t["p"] < 0.05
    lo, hi = res.ceiling
    assert 0 < lo < hi <= 1 and np.nanmean(res.ceiling_boot[:, 0]) < np.nanmean(res.ceiling_boot[:, 1])


def test_null_false_positive_rate():
    rng = np.random.default_rng(1)
    resamples = draw_resamples(4, 16, 50, seed=2)  # smallest p: 2 / 51, below alpha
    p = []
    for _ in range(100):
        models, subjects = _world(rng, n=16)
        res = dual_bootstrap(models, subjects, resamples, cv=False, ceiling=False)
        p.append(paired_test(res.boot[:, 0], res.boot[:, 1])["p"])
    assert np.mean(np.array(p) < 0.05) <= 0.12


def test_resamples_are_paired_across_calls():
    rng = np.random.default_rng(2)
    models, subjects = _world(rng, nuisance=(0.5, 1.0, 2.0))
    r = draw_resamples(4, 24, 30, seed=3)
    both = dual_bootstrap(models, subjects, r, ceiling=False)
    alone = dual_bootstrap(models[2:], subjects, r, ceiling=False)
    assert np.allclose(both.boot[:, 2], alone.boot[:, 0], equal_nan=True)
    assert np.allclose(both.cv_boot[:, 2], alone.cv_boot[:, 0], equal_nan=True)


def test_cross_validated_layer_choice_is_not_inflated():
    """Among many equally good layers, the in-sample max is biased upwards; the cross-validated score is not."""
    rng = np.random.default_rng(4)
    models, subjects = _world(rng, n=30, nuisance=(2.0,), layers=8)
    res = dual_bootstrap(models, subjects, draw_resamples(4, 30, 40, seed=5), groups=[np.arange(8)], ceiling=False)
    assert res.cv_score[0] < res.score.max()
    assert 0 <= res.cv_layer[0] < 8


def test_holm():
    assert np.allclose(holm(np.array([0.01, 0.04, 0.03])), [0.03, 0.06, 0.06])
    assert np.isnan(holm(np.array([np.nan, 0.01])))[0]


def test_select_checkpoints(tmp_path):
    from pathlib import Path

    digits, cifar = Path("bp.cnn.digits.final0.pt"), Path("bp.cnn.cifar10.final0.pt")
    assert select_checkpoints([digits, cifar], "auto")[0] == [cifar]
    assert select_checkpoints([digits], "auto")[0] == [digits]
    assert select_checkpoints([digits, cifar], "all")[0] == [digits, cifar]
    with pytest.raises(UsageError):
        select_checkpoints([digits], "natural")


def test_pairs_table_from_brain_rows():
    rng = np.random.default_rng(6)
    models, subjects = _world(rng, n=40, nuisance=(0.5, 0.5, 3.0))
    res = dual_bootstrap(models, subjects, draw_resamples(4, 40, 300, seed=7), ceiling=False)
    rows = [{"rule": rule, "arch": "cnn", "dataset": "cifar10", "control": "none", "layer_cv": True,
             "in_domain": True, "cv_similarity": float(res.cv_score[i]), "cv_boot": res.cv_boot[:, i].tolist()}
            for i, rule in enumerate(["a", "b", "c"])]
    pairs, scores = pairs_tables(pl.DataFrame(rows))
    assert pairs.height == 3 and set(scores["entity"]) == {"a", "b", "c"}
    by = {(r["a"], r["b"]): r for r in pairs.iter_rows(named=True)}
    assert by[("a", "c")]["resolved"] and by[("b", "c")]["resolved"] and not by[("a", "b")]["resolved"]
    assert all(r["p_holm"] >= r["p"] for r in by.values())
