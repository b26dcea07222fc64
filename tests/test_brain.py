"""Brain similarity (analysis/brain.py): the 92-image loader, RSA against rsatoolbox, CKA, controls, the table.

Tests on the real data look for ``rsa92/`` in every candidate data root (conftest.find_real_data) and skip,
naming where they looked, when none has it.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bioplaus.analysis import brain
from bioplaus.analysis.brain import (
    STIMULI_FILE,
    TARGETS,
    BrainConfig,
    compare_rdms,
    evaluate_rdms,
    features_rdm,
    linear_cka,
    load_rsa92,
    noise_ceiling,
    stimuli_tensor,
)
from bioplaus.orchestrator.errors import UsageError
from conftest import find_real_data


@functools.lru_cache(maxsize=1)
def _load(folder: str):
    return load_rsa92(folder)


@pytest.fixture
def rsa92_dir() -> Path:
    """The Kriegeskorte 2008 .mat files, ``<data root>/rsa92``."""
    return find_real_data(f"rsa92/{STIMULI_FILE}") / "rsa92"


@pytest.fixture
def rsa92(rsa92_dir):
    return _load(str(rsa92_dir))


def _t(name: str) -> int:
    return TARGETS.index(name)


# --- loader ----------------------------------------------------------------------------------------
def test_loader_shapes(rsa92):
    assert rsa92.images.shape == (92, 175, 175, 3) and rsa92.images.dtype == np.uint8
    assert len(rsa92.categories) == 92 and rsa92.categories[0] == "human bodypart"
    assert rsa92.category_vectors.shape == (92, 12) and len(rsa92.category_labels) == 12
    assert rsa92.category_vectors[:, rsa92.category_labels.index("animate")].sum() == 48
    assert rsa92.human.shape == (4, 2, 92, 92) and rsa92.subjects == ["BE", "KO", "SN", "TI"]
    assert rsa92.monkey.shape == (92, 92) and rsa92.targets().shape == (6, 92, 92)
    for rdm in [*rsa92.human.reshape(-1, 92, 92), rsa92.monkey, *rsa92.models.values()]:
        assert np.allclose(rdm, rdm.T) and np.allclose(np.diag(rdm), 0)
    assert {"animacy", "HMAX", "V1"} <= set(rsa92.models)
    # the monkey RDM of the supplementary file is the one shipped as a model RDM too
    assert np.allclose(rsa92.models["monkeyIT"], rsa92.monkey)


def test_missing_data_names_the_folder(tmp_path):
    with pytest.raises(UsageError, match=str(tmp_path / "nowhere")):
        load_rsa92(tmp_path / "nowhere")


def test_human_average_vs_monkey_it(rsa92):
    """Kriegeskorte et al. 2008: human and monkey IT RDMs correlate (Spearman ~0.44 on this data)."""
    rho = compare_rdms(rsa92.human_avg, rsa92.monkey, "spearman")[0, 0]
    assert 0.40 < rho < 0.48


# --- comparisons reproduce rsatoolbox's model evaluation -----------------------------------------------
@pytest.mark.filterwarnings("ignore:Noise ceiling for tau")  # rsatoolbox's note on its tau_a ceiling
def test_model_rdm_matches_rsatoolbox(rsa92):
    from rsatoolbox.inference import eval_bootstrap_pattern, eval_fixed
    from rsatoolbox.model import ModelFixed
    from rsatoolbox.rdm import RDMs
    from scipy.spatial.distance import squareform
    from scipy.stats import spearmanr

    animacy = rsa92.models["animacy"]
    subjects = RDMs(rsa92.human_subjects)
    res = evaluate_rdms(animacy[None], rsa92, methods=("spearman", "kendall_tau_a"), n_boot=200, n_boot_kendall=0,
                        seed=1)
    for ours, theirs in (("spearman", "spearman"), ("kendall_tau_a", "tau-a")):
        ref = eval_fixed(ModelFixed("animacy", RDMs(animacy[None])), subjects, method=theirs)
        assert res[ours]["similarity"][0, _t("human_it_mean")] == pytest.approx(ref.evaluations.mean(), abs=1e-9)
        per_subject = res[ours]["similarity"][0, [_t(f"human_it_subj{i}") for i in (1, 2, 3, 4)]]
        assert np.allclose(per_subject, ref.evaluations[0, 0])
        assert res[ours]["noise_ceiling_low"][_t("human_it_mean")] == pytest.approx(ref.noise_ceiling[0], abs=1e-9)
        assert res[ours]["noise_ceiling_high"][_t("human_it_mean")] == pytest.approx(ref.noise_ceiling[1], abs=1e-9)
    # independently of rsatoolbox: scipy's Spearman of the vectors against the group-averaged RDM
    rho = spearmanr(squareform(animacy, checks=False), squareform(rsa92.human_avg, checks=False))[0]
    assert res["spearman"]["similarity"][0, _t("human_it_avg_rdm")] == pytest.approx(rho, abs=1e-9)
    assert res["spearman"]["similarity"][0, _t("human_it_mean")] > 0.3  # animacy is strongly in human IT
    # per-subject ceilings average to rsatoolbox's boot_noise_ceiling
    nc = noise_ceiling(rsa92.human_subjects, "spearman")
    assert nc["low_per_subject"].mean() == pytest.approx(nc["low"]) and nc["high_per_subject"].mean() == pytest.approx(nc["high"])
    assert 0 < nc["low"] < nc["high"] < 1
    # the stimulus bootstrap has the spread of rsatoolbox's own pattern bootstrap
    np.random.seed(0)
    ref = eval_bootstrap_pattern(ModelFixed("animacy", RDMs(animacy[None])), subjects, method="spearman", N=200,
                                 boot_noise_ceil=False)
    ref_width = np.subtract(*np.nanquantile(ref.evaluations[:, 0], [0.975, 0.025]))
    ours_width = res["spearman"]["ci_high"][0, 0] - res["spearman"]["ci_low"][0, 0]
    assert 0.7 < ours_width / ref_width < 1.4
    assert res["spearman"]["ci_low"][0, 0] < res["spearman"]["similarity"][0, 0] < res["spearman"]["ci_high"][0, 0]


def test_random_rdm_scores_zero(rsa92):
    rng = np.random.default_rng(3)
    rdm = rng.random(92 * 91 // 2)
    res = evaluate_rdms(rdm[None], rsa92, methods=("spearman", "cka"), n_boot=300, seed=2)
    for method in ("spearman", "cka"):
        for target in ("human_it_mean", "monkey_it"):
            sim, lo, hi = (res[method][k][0, _t(target)] for k in ("similarity", "ci_low", "ci_high"))
            assert abs(sim) < 0.06, (method, target, sim)
            assert lo < 0 < hi, (method, target, lo, hi)


def test_bootstrap_is_seeded_and_paired(rsa92):
    rdms = np.stack([rsa92.models["animacy"], rsa92.models["HMAX"]])
    a = evaluate_rdms(rdms, rsa92, methods=("spearman",), n_boot=50, seed=5)
    b = evaluate_rdms(rdms[1:], rsa92, methods=("spearman",), n_boot=50, seed=5)
    # the same resamples whatever else is in the batch
    assert np.array_equal(a["spearman"]["ci_low"][1], b["spearman"]["ci_low"][0])
    c = evaluate_rdms(rdms[1:], rsa92, methods=("spearman",), n_boot=50, seed=6)
    assert not np.array_equal(b["spearman"]["ci_low"], c["spearman"]["ci_low"])


# --- CKA -----------------------------------------------------------------------------------------
def test_cka_from_rdms_is_cka_on_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 120))
    y = x[:, :20] @ rng.normal(size=(20, 80)) + rng.normal(size=(40, 80))
    z = lambda a: (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)
    rx, _ = features_rdm(x, "correlation")
    ry, _ = features_rdm(y, "correlation")
    assert compare_rdms(rx, ry, "cka")[0, 0] == pytest.approx(linear_cka(z(x), z(y)), abs=1e-10)
    ex, _ = features_rdm(x, "euclidean")
    ey, _ = features_rdm(y, "euclidean")
    assert compare_rdms(ex, ey, "cka")[0, 0] == pytest.approx(linear_cka(x, y), abs=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(120, 120)))
    for debiased in (True, False):  # invariant to rotations and isotropic scaling; identity -> 1
        assert linear_cka(x, 3 * x @ q, debiased) == pytest.approx(1.0)
    # the plain estimator sees structure in independent wide features; the debiased one does not
    a, b = rng.normal(size=(40, 2000)), rng.normal(size=(40, 2000))
    assert linear_cka(a, b, debiased=False) > 0.5
    assert abs(linear_cka(a, b)) < 0.1


def test_cka_bootstrap_is_centred_on_the_estimate(rsa92):
    """Copies of a resampled stimulus must not count as agreeing pairs (they inflate CKA otherwise)."""
    res = evaluate_rdms(np.stack([rsa92.models["HMAX"], rsa92.models["V1"]]), rsa92, methods=("cka",), n_boot=150)
    r = res["cka"]
    assert np.all(r["ci_low"] < r["similarity"]) and np.all(r["similarity"] < r["ci_high"])


# --- feeding the stimuli ---------------------------------------------------------------------------------
def test_stimuli_tensor_shapes_and_normalisation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 175, 175, 3), dtype=np.uint8)
    x = stimuli_tensor(images, (3, 32, 32), torch.zeros(3), torch.ones(3))
    assert x.shape == (5, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-4)  # 8-bit, like the training pixels
    g = stimuli_tensor(images, (1, 28, 28), torch.tensor([0.5]), torch.tensor([0.25]))
    assert g.shape == (5, 1, 28, 28)
    flat = np.full((1, 175, 175, 3), [255, 0, 0], dtype=np.uint8)  # pure red -> luma 0.299
    assert stimuli_tensor(flat, (1, 8, 8), torch.zeros(1), torch.ones(1)).mean().item() == pytest.approx(0.299, abs=3e-3)
    assert stimuli_tensor(images, (3, 16, 32), torch.zeros(3), torch.ones(3)).shape == (5, 3, 16, 32)  # cropped
    with pytest.raises(ValueError):
        stimuli_tensor(images, (64,), torch.zeros(1), torch.ones(1))


# --- end to end: a trained network vs its untrained self, through the CLI ----------------------------------
@pytest.mark.slow
def test_trained_and_untrained_profiles_differ(rsa92_dir, tmp_path):
    import polars as pl

    from bioplaus.orchestrator.checkpoint import load_network
    from bioplaus.orchestrator.cli import main
    from bioplaus.orchestrator.config import parse_overrides
    from bioplaus.orchestrator.trial import resolve, run_trial

    model = tmp_path / "sweep" / "models" / "bp.cnn.digits.final7.pt"
    cfg = parse_overrides(["rule=bp", "arch=cnn", "dataset=digits", "seed=7", "train.epochs=4", "model.channels=[8,16]",
                           "out=null"])
    record = run_trial(resolve(cfg), save_model=str(model))
    assert record["status"] == "ok" and record["test_acc"] > 0.5

    # small bootstraps (the defaults are 1000/100/500): this checks the step end to end, not the intervals' width
    small = {"n_boot": 20, "n_boot_kendall": 5, "n_boot_dual": 20}
    rc = main(["brain", str(tmp_path / "sweep"), "--rsa92", str(rsa92_dir), *(f"{k}={v}" for k, v in small.items()),
               "--plot", str(tmp_path / "fig.png")])
    assert rc == 0 and (tmp_path / "fig.png").stat().st_size > 0
    files = list((tmp_path / "sweep" / "brain" / "rule=bp" / "arch=cnn" / "dataset=digits").glob("*.parquet"))
    assert [f.name for f in files] == ["bp.cnn.digits.final7.parquet"]
    df = brain.read_brain(tmp_path / "sweep")
    assert set(df["target"]) == set(TARGETS) and set(df["method"]) == {"spearman", "kendall_tau_a", "cka"}
    assert set(df["control"]) == {"none", "untrained", "pixels"} and set(df["seed"]) == {7}
    assert {"rule", "arch", "dataset", "layer", "layer_name", "similarity", "ci_low", "ci_high",
            "noise_ceiling_low", "noise_ceiling_high", "best_layer"} <= set(df.columns)
    net, _ = load_network(model)
    assert df.filter(pl.col("control") == "none")["layer"].n_unique() == len(net.stages) == 3
    assert df.filter(pl.col("control") == "pixels")["layer_name"].unique().to_list() == ["pixels"]
    # one best layer per (control, target, method)
    assert df.group_by("control", "target", "method").agg(pl.col("best_layer").sum())["best_layer"].to_list() == \
        [1] * df.select("control", "target", "method").unique().height
    nc = df.filter(pl.col("target") == "human_it_mean")
    assert nc["noise_ceiling_low"].null_count() == 0
    assert df.filter(pl.col("target") == "monkey_it")["noise_ceiling_low"].null_count() == df.filter(
        pl.col("target") == "monkey_it").height

    def profile(control: str) -> np.ndarray:
        p = df.filter((pl.col("control") == control) & (pl.col("target") == "human_it_mean")
                      & (pl.col("method") == "spearman")).sort("layer")
        return p["similarity"].to_numpy()

    trained, untrained = profile("none"), profile("untrained")
    assert len(trained) == len(untrained) == 3 and np.all(np.isfinite(trained))
    assert np.ptp(trained) > 0.005  # not a constant profile
    assert np.max(np.abs(trained - untrained)) > 0.02

    # already done -> skipped; overwrite -> recomputed (same numbers: seeded bootstrap)
    mtime = files[0].stat().st_mtime_ns
    brain.brain_table(tmp_path / "sweep", rsa92_dir, BrainConfig(**small), log=lambda m: None)
    assert files[0].stat().st_mtime_ns == mtime
    brain.brain_table(tmp_path / "sweep", rsa92_dir, BrainConfig(**small, overwrite=True), log=lambda m: None)
    again = brain.read_brain(tmp_path / "sweep")
    key = ["control", "layer", "target", "method"]
    assert again.sort(key)["ci_low"].to_list() == df.sort(key)["ci_low"].to_list()
    summary = brain.brain_summary(df)
    assert set(summary["control"]) == {"none", "untrained", "pixels"}

    # a network added later must be scored on the kept networks' resamples (paired differences), else refused
    shutil.copy(model, model.with_name("bp.cnn.digits.final8.pt"))
    with pytest.raises(UsageError, match="seed=0, n_boot_dual=20; pass those"):
        brain.brain_table(tmp_path / "sweep", rsa92_dir, BrainConfig(**small, seed=1), log=lambda m: None)
    assert len(list(files[0].parent.glob("*.parquet"))) == 1  # refused before anything was written


def test_untrained_control_is_the_runs_initial_network(rsa92_dir, tmp_path):
    """The untrained control is the architecture built with the run's seed, as run_trial builds it."""
    from bioplaus.algorithms.arch import ARCHS
    from bioplaus.orchestrator.checkpoint import save_network
    from bioplaus.orchestrator.config import typed

    spec = ARCHS["cnn"]
    torch.manual_seed(11)
    net = spec.build(typed(spec.config, {"channels": [4, 8]}, "model"), (1, 8, 8), 10)
    path = save_network(tmp_path / "m.pt", net, {"model": {"channels": [4, 8]}, "seed": 11}, torch.zeros(1),
                        torch.ones(1), [str(i) for i in range(10)])
    meta = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "state_dict"}
    state = torch.get_rng_state()
    fresh = brain.untrained_network(meta, 11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for a, b in zip(fresh.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_errors(tmp_path):
    from bioplaus.orchestrator.cli import main

    assert main(["brain", str(tmp_path / "absent")]) == 2
    (tmp_path / "sweep" / "models").mkdir(parents=True)
    assert main(["brain", str(tmp_path / "sweep")]) == 2  # no saved networks
    assert main(["brain", str(tmp_path / "sweep"), "n_boot=abc"]) == 2
    (tmp_path / "sweep" / "models" / "x.pt").write_bytes(b"")
    assert main(["brain", str(tmp_path / "sweep"), "rdm=cosine"]) == 2


def test_brain_summary_breaks_ties_by_name_so_the_same_table_gives_the_same_rows():
    import polars as pl

    from bioplaus.analysis.brain_figure import brain_summary

    n = 4
    df = pl.DataFrame({"rule": ["b", "b", "a", "a"], "arch": ["mlp"] * n, "dataset": ["digits"] * n,
                       "control": ["none"] * n, "target": ["human_it_mean"] * n, "method": ["spearman"] * n,
                       "best_layer": [True] * n, "similarity": [0.2] * n, "ci_low": [0.0] * n, "ci_high": [0.4] * n,
                       "layer_name": ["l2", "l1", "l2", "l1"], "noise_ceiling_low": [0.3] * n,
                       "noise_ceiling_high": [0.6] * n})
    for shuffle in range(5):
        rows = brain_summary(df.sample(fraction=1.0, shuffle=True, seed=shuffle)).select("rule", "best_layer").rows()
        assert rows == [("a", "l1"), ("b", "l1")]
