"""Inference for RSA scores: a bootstrap over stimuli and subjects, cross-validated layer selection,
Nili et al. (2014) noise ceilings and paired differences, all on one seeded set of resamples.

Built from rsatoolbox's pieces (``RDMs.subsample`` / ``subsample_pattern`` as in its ``bootstrap_sample``,
``compare``, ``boot_noise_ceiling``), with the resampled indices drawn from a seeded generator up front, so
resample b is the same for any set of model RDMs: scores computed in separate calls stay paired.

A score is the mean over subjects of the model-vs-subject similarity (what the noise ceiling bounds).
Layer selection is cross-validated over stimuli: in every resample (and in ``n_splits`` splits of the full
data) the unique stimuli are split in two halves; the layer chosen on one half is scored on the other and
the two directions are averaged, so the chosen layer's score is not inflated by the choice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class Resamples:
    """Seeded bootstrap resamples and stimulus splits (indices into subjects and stimuli)."""

    subjects: np.ndarray
    """(B, S) resampled subject indices (with replacement)."""
    stimuli: np.ndarray
    """(B, n) resampled stimulus indices (with replacement)."""
    halves: np.ndarray
    """(B, n) bool: stimulus i is in the first half of resample b's split (for layer cross-validation)."""
    full_halves: np.ndarray
    """(n_splits, n) bool: splits of the full stimulus set for the point estimate of the cv score."""
    seed: int

    @property
    def n_boot(self) -> int:
        return len(self.stimuli)


def draw_resamples(n_subjects: int, n_stimuli: int, n_boot: int, seed: int = 0, n_splits: int = 20) -> Resamples:
    """All resamples at once from ``np.random.default_rng(seed)`` (the global numpy RNG is left alone)."""
    rng = np.random.default_rng(seed)
    subjects = rng.integers(0, n_subjects, size=(n_boot, n_subjects))
    stimuli = rng.integers(0, n_stimuli, size=(n_boot, n_stimuli))

    def split(k: int) -> np.ndarray:
        order = np.argsort(rng.random((k, n_stimuli)), axis=1)
        halves = np.zeros((k, n_stimuli), dtype=bool)
        np.put_along_axis(halves, order[:, : n_stimuli // 2], True, axis=1)
        return halves

    return Resamples(subjects, stimuli, split(n_boot), split(n_splits), seed)


def _compare(models, targets, method: str) -> np.ndarray:
    from rsatoolbox.rdm import compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(compare(models, targets, method=method), dtype=np.float64)


def _ceiling(targets, method: str) -> tuple[float, float]:
    """Nili et al. 2014 bounds by rsatoolbox's leave-one-subject-out; copies of a subject left out together."""
    from rsatoolbox.inference import boot_noise_ceiling

    if len(np.unique(targets.rdm_descriptors["index"])) < 2:
        return np.nan, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lo, hi = boot_noise_ceiling(targets, method=method, rdm_descriptor="index")
    return float(lo), float(hi)


def _cv_scores(sim_a: np.ndarray, sim_b: np.ndarray, groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per group of layer RDMs: (score of the layer chosen on half a, scored on b, and vice versa,
    averaged; the two chosen layers' positions within the group)."""
    scores = np.full(len(groups), np.nan)
    chosen = np.full((len(groups), 2), -1)
    for g, idx in enumerate(groups):
        a, b = sim_a[idx], sim_b[idx]
        if np.all(np.isnan(a)) or np.all(np.isnan(b)):
            continue
        ia, ib = int(np.nanargmax(a)), int(np.nanargmax(b))
        scores[g] = 0.5 * (b[ia] + a[ib])
        chosen[g] = ia, ib
    return scores, chosen


@dataclass
class DualResult:
    """Scores of model RDMs against subjects, full data and per resample."""

    score: np.ndarray
    """(M,) mean over subjects of each model RDM's similarity, all stimuli."""
    boot: np.ndarray
    """(B, M) the same on every resample of stimuli and subjects."""
    ceiling: tuple[float, float]
    """(lower, upper) noise ceiling on the full data."""
    ceiling_boot: np.ndarray
    """(B, 2) the ceiling on every resample."""
    cv_score: np.ndarray
    """(G,) per group (a network's layers): cross-validated best-layer score, mean over the full-data splits."""
    cv_boot: np.ndarray
    """(B, G) the cross-validated score on every resample."""
    cv_layer: np.ndarray
    """(G,) position within the group of the layer chosen most often on the full-data splits."""


def dual_bootstrap(model_rdms: np.ndarray, subject_rdms: np.ndarray, resamples: Resamples,
                   method: str = "spearman", groups: list[np.ndarray] | None = None,
                   cv: bool = True, ceiling: bool = True) -> DualResult:
    """Score ``model_rdms`` (M, n, n or vectors) against ``subject_rdms`` (S, n, n) on ``resamples``.

    ``method`` is an rsatoolbox compare method (spearman, tau-a, corr, ...). ``groups``: lists of
    row indices of ``model_rdms`` among which a best layer is chosen by cross-validation (default:
    each model alone, so the cv score is the plain score on half-splits). ``cv`` / ``ceiling`` False:
    skip the cross-validation / the per-resample ceiling (their fields stay NaN), for speed.
    """
    from rsatoolbox.rdm import RDMs

    models, targets = RDMs(np.asarray(model_rdms, np.float64)), RDMs(np.asarray(subject_rdms, np.float64))
    groups = [np.asarray(g) for g in groups] if groups is not None else [np.array([i]) for i in range(models.n_rdm)]
    score = _compare(models, targets, method).mean(1)
    n_boot = resamples.n_boot
    boot = np.full((n_boot, models.n_rdm), np.nan)
    cv_boot = np.full((n_boot, len(groups)), np.nan)
    ceiling_boot = np.full((n_boot, 2), np.nan)
    for b in range(n_boot):
        stim = resamples.stimuli[b]
        tb = targets.subsample("index", resamples.subjects[b])
        boot[b] = _compare(models.subsample_pattern("index", stim), tb.subsample_pattern("index", stim), method).mean(1)
        if ceiling:
            ceiling_boot[b] = _ceiling(tb.subsample_pattern("index", stim), method)
        if not cv:
            continue
        first = resamples.halves[b][stim]
        half_a, half_b = stim[first], stim[~first]
        sim = [_compare(models.subsample_pattern("index", h), tb.subsample_pattern("index", h), method).mean(1)
               for h in (half_a, half_b)]
        cv_boot[b] = _cv_scores(sim[0], sim[1], groups)[0]
    splits, picks = [], []
    for halves in resamples.full_halves if cv else []:
        sim = [_compare(models.subset_pattern("index", np.flatnonzero(h)),
                        targets.subset_pattern("index", np.flatnonzero(h)), method).mean(1) for h in (halves, ~halves)]
        s, c = _cv_scores(sim[0], sim[1], groups)
        splits.append(s)
        picks.append(c)
    picks = np.concatenate(picks, axis=1) if picks else np.full((len(groups), 0), -1)  # (G, 2 * n_splits)
    cv_layer = np.array([np.bincount(p[p >= 0], minlength=len(g)).argmax() if np.any(p >= 0) else -1
                         for p, g in zip(picks, groups)])
    return DualResult(score, boot, _ceiling(targets, method) if ceiling else (np.nan, np.nan), ceiling_boot,
                      np.nanmean(np.array(splits), 0) if splits else np.full(len(groups), np.nan), cv_boot, cv_layer)


def percentile_ci(boot: np.ndarray, ci: float = 0.95, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval (NaN resamples ignored)."""
    alpha = (1 - ci) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(boot, alpha, axis=axis), np.nanquantile(boot, 1 - alpha, axis=axis)


def paired_test(boot_a: np.ndarray, boot_b: np.ndarray, ci: float = 0.95) -> dict[str, float]:
    """Difference a - b on the same resamples: its percentile CI and the two-sided bootstrap p-value
    (twice the smaller tail of the difference's distribution beyond 0, with the +1 correction)."""
    d = np.asarray(boot_a, np.float64) - np.asarray(boot_b, np.float64)
    d = d[np.isfinite(d)]
    if not len(d):
        return {"ci_low": np.nan, "ci_high": np.nan, "p": np.nan, "n": 0}
    lo, hi = percentile_ci(d, ci)
    tail = min((d <= 0).sum(), (d >= 0).sum())
    return {"ci_low": float(lo), "ci_high": float(hi), "p": float(min(1.0, 2 * (tail + 1) / (len(d) + 1))),
            "n": int(len(d))}


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(p, np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok])]
    m = len(order)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out
