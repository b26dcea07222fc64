"""RDMs and their comparison with the brain targets (rsatoolbox, plus debiased CKA computed here).

Owns the model RDMs of feature matrices, Spearman / Kendall tau_a / CKA comparisons, the human noise
ceiling and the seeded percentile bootstrap over stimuli (``evaluate_rdms``), whose resamples are the
same for every set of models, so differences between networks are paired.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np

from bioplaus.analysis.brain_data import N_STIMULI, RSA92, TARGETS, square_rdm
from bioplaus.orchestrator.errors import UsageError

# table method name -> rsatoolbox compare() method (cka is computed here, from the RDMs)
METHODS = {"spearman": "spearman", "kendall_tau_a": "tau-a", "cka": None}


def features_rdm(features: np.ndarray, method: str = "correlation") -> tuple[np.ndarray, int]:
    """(upper-triangle RDM vector, number of degenerate stimuli) of (N, D) features via rsatoolbox.

    A stimulus with a constant response (e.g. a dead ReLU layer) has no defined correlation distance:
    its dissimilarities are set to 1 (uncorrelated) and counted, so comparisons stay defined.
    """
    import rsatoolbox

    if method not in ("correlation", "euclidean"):
        raise UsageError(f"rdm={method!r}: use correlation or euclidean")
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        rdm = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(np.asarray(features, dtype=np.float64)), method=method)
    vec = rdm.get_vectors()[0].copy()
    degenerate = 0
    if method == "correlation":
        flat = np.ptp(features, axis=1) == 0
        degenerate = int(flat.sum())
        vec[~np.isfinite(vec)] = 1.0
    return vec, degenerate


def _rdms(x: np.ndarray):
    """rsatoolbox RDMs from (K, n, n) matrices or (K, n(n-1)/2) vectors."""
    from rsatoolbox.rdm import RDMs

    return RDMs(np.asarray(x, dtype=np.float64))


def _compare(models, targets, method: str, model_mats: np.ndarray | None = None,
             target_mats: np.ndarray | None = None) -> np.ndarray:
    """(M, T) similarities of rsatoolbox RDMs ``models`` with ``targets`` by a table method name."""
    if method == "cka":
        return cka_from_rdms(model_mats, target_mats)
    from rsatoolbox.rdm import compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(compare(models, targets, method=METHODS[method]), dtype=np.float64)


def compare_rdms(model_rdms: np.ndarray, target_rdms: np.ndarray, method: str = "spearman") -> np.ndarray:
    """(M, T) similarity of model RDMs with target RDMs (matrices or upper-triangle vectors)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    m, t = _as_mats(model_rdms), _as_mats(target_rdms)
    return _compare(_rdms(m), _rdms(t), method, m, t)


def _as_mats(x: np.ndarray) -> np.ndarray:
    """(K, n, n) matrices from one matrix, one upper-triangle vector, K vectors or K matrices."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:
        return x
    if x.ndim == 2 and x.shape[0] == x.shape[1]:
        return x[None]
    return np.stack([square_rdm(v) for v in np.atleast_2d(x)])


def _u_centred(mats: np.ndarray, same: np.ndarray | None = None) -> np.ndarray:
    """U-centred kernels of RDMs (K, n, n), flattened (K, n*n), for the unbiased HSIC estimator.

    The kernel is -D/2; U-centring (Szekely & Rizzo 2014) removes additive row and column terms, so
    -D/2 and the features' linear kernel X X^T give the same result. ``same`` (n, n) marks pairs that
    are the same stimulus (the diagonal, plus copies in a bootstrap resample): they are excluded from
    the sum, as rsatoolbox excludes the zero dissimilarities between copies.
    """
    k = -0.5 * np.asarray(mats, dtype=np.float64)
    n = k.shape[1]
    k = k.copy()
    k[:, np.arange(n), np.arange(n)] = 0.0
    rows = k.sum(2) / (n - 2)
    total = k.sum((1, 2)) / ((n - 1) * (n - 2))
    u = k - rows[:, :, None] - rows[:, None, :] + total[:, None, None]
    u[:, same if same is not None else np.eye(n, dtype=bool)] = 0.0
    return u.reshape(len(u), -1)


def cka_from_rdms(a: np.ndarray, b: np.ndarray, same: np.ndarray | None = None) -> np.ndarray:
    """(M, T) debiased linear CKA between the patterns behind RDMs ``a`` (M, n, n) and ``b`` (T, n, n).

    Debiased = CKA from the unbiased HSIC estimator (Song et al. 2012; Kornblith et al. 2019, app.;
    Murphy et al. 2024): the plain estimator is strongly biased upwards when features far outnumber
    stimuli (92 images vs thousands of units), e.g. it rates the V1 model RDM 0.54 against human IT
    where the debiased value is 0.19. For squared-Euclidean RDMs ``-D/2`` U-centres to the features'
    linear kernel; a 1 - Pearson RDM is a squared-Euclidean RDM of per-stimulus standardised patterns
    (scaled by 1/2D), and CKA is scale-invariant. ``same``: see :func:`_u_centred`.
    """
    ka, kb = _u_centred(a, same), _u_centred(b, same)
    num = ka @ kb.T
    den = np.sqrt(np.clip(np.einsum("ij,ij->i", ka, ka), 0, None)[:, None]
                  * np.clip(np.einsum("ij,ij->i", kb, kb), 0, None)[None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = True) -> float:
    """Linear CKA of two feature matrices with the same rows (stimuli); debiased by default (the
    unbiased HSIC estimator, as ``method=cka`` in the table), else Kornblith et al.'s plain estimator."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    if debiased:
        kx, ky = _u_centred(-2 * (x @ x.T)[None]), _u_centred(-2 * (y @ y.T)[None])  # -D/2 <-> X X^T
        return float((kx @ ky.T)[0, 0] / np.sqrt((kx @ kx.T)[0, 0] * (ky @ ky.T)[0, 0]))
    hsic = np.linalg.norm(x.T @ y) ** 2
    return float(hsic / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def noise_ceiling(subject_rdms: np.ndarray, method: str = "spearman") -> dict[str, np.ndarray | float]:
    """Human-IT noise ceiling from the subjects' RDMs (S, n, n) for a table method name.

    rsatoolbox's leave-one-subject-out construction (``boot_noise_ceiling``): per subject s, lower =
    similarity of s with the pooled RDM of the other subjects, upper = with the pooled RDM of all
    subjects; the bounds on ``human_it_mean`` are their means. Pooling follows the method
    (rsatoolbox's ``pool_rdm``: averaged ranks for spearman/tau_a); for cka, plain averaging.
    Returns {low, high} (means) and {low_per_subject, high_per_subject} (S,).
    """
    mats = _as_mats(subject_rdms)
    n_subj = len(mats)
    if method == "cka":
        low = np.array([cka_from_rdms(mats[[j for j in range(n_subj) if j != s]].mean(0)[None], mats[s:s + 1])[0, 0]
                        for s in range(n_subj)])
        high = cka_from_rdms(mats.mean(0)[None], mats)[0]
        return {"low": float(low.mean()), "high": float(high.mean()), "low_per_subject": low,
                "high_per_subject": high}
    from rsatoolbox.inference import boot_noise_ceiling
    from rsatoolbox.rdm import compare
    from rsatoolbox.util.inference_util import pool_rdm

    m = METHODS[method]
    rdms = _rdms(mats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Noise ceiling for tau based on averaged ranks!" is the documented choice
        lo, hi = boot_noise_ceiling(rdms, method=m)
        pooled_all = pool_rdm(rdms, method=m)
        low = np.array([compare(pool_rdm(rdms.subset("index", [j for j in range(n_subj) if j != s]), method=m),
                                rdms.subset("index", [s]), method=m)[0, 0] for s in range(n_subj)])
        high = np.asarray(compare(pooled_all, rdms, method=m))[0]
    return {"low": float(lo), "high": float(hi), "low_per_subject": low, "high_per_subject": high}


def _with_mean(sim: np.ndarray) -> np.ndarray:
    """(..., 6 STACK_TARGETS) -> (..., 7 TARGETS): prepend the mean over the 4 subjects."""
    return np.concatenate([sim[..., :4].mean(-1, keepdims=True), sim], axis=-1)


def evaluate_rdms(model_rdms: np.ndarray, data: RSA92, methods=("spearman", "kendall_tau_a", "cka"),
                  n_boot: int = 1000, n_boot_kendall: int = 100, ci: float = 0.95, seed: int = 0,
                  log: Callable[[str], None] | None = None, keep_boot: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Compare model RDMs (M, 4186 vectors or M x 92 x 92) with every brain target.

    Returns per method {similarity, ci_low, ci_high, n_boot} arrays of shape (M, len(TARGETS)) plus
    {noise_ceiling_low, noise_ceiling_high} of shape (len(TARGETS),) (NaN where none applies).
    Bootstrap: ``n_boot`` resamples of the 92 stimuli with replacement (seeded; the first
    ``n_boot_kendall`` of them for kendall_tau_a), percentile intervals. ``keep_boot``: also return the
    resampled similarities ({boot}: (n_boot, M, len(TARGETS))), e.g. for paired differences between models.
    """
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}; use one of {', '.join(METHODS)}")
    model_mats = _as_mats(model_rdms)
    target_mats = data.targets()
    models, targets = _rdms(model_mats), _rdms(target_mats)
    out = {m: _point_estimates(models, targets, model_mats, target_mats, data, m) for m in methods}
    counts = {m: (min(n_boot_kendall, n_boot) if m == "kendall_tau_a" else n_boot) for m in methods}
    boots = _bootstrap(models, targets, model_mats, target_mats, counts, n_boot, seed, log)
    alpha = (1 - ci) / 2
    for m in methods:
        k = counts[m]
        if k:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[m]["ci_low"] = np.nanquantile(boots[m], alpha, axis=0)
                out[m]["ci_high"] = np.nanquantile(boots[m], 1 - alpha, axis=0)
        else:
            out[m]["ci_low"] = out[m]["ci_high"] = np.full_like(out[m]["similarity"], np.nan)
        out[m]["n_boot"] = k
        if keep_boot:
            out[m]["boot"] = boots[m]
    return out


def _point_estimates(models, targets, model_mats: np.ndarray, target_mats: np.ndarray, data: RSA92,
                     method: str) -> dict[str, np.ndarray]:
    """{similarity (M, len(TARGETS)), noise_ceiling_low/high (len(TARGETS),)} on all 92 stimuli."""
    sim = _with_mean(_compare(models, targets, method, model_mats, target_mats))
    nc = noise_ceiling(data.human_subjects, method)
    nc_low = np.full(len(TARGETS), np.nan)
    nc_high = np.full(len(TARGETS), np.nan)
    nc_low[0], nc_high[0] = nc["low"], nc["high"]
    nc_low[1:5], nc_high[1:5] = nc["low_per_subject"], nc["high_per_subject"]
    return {"similarity": sim, "noise_ceiling_low": nc_low, "noise_ceiling_high": nc_high}


def _bootstrap(models, targets, model_mats: np.ndarray, target_mats: np.ndarray, counts: dict[str, int],
               n_boot: int, seed: int, log: Callable[[str], None] | None) -> dict[str, np.ndarray]:
    """Per method (counts[m], M, len(TARGETS)) similarities on resamples of the stimuli (the first
    counts[m] of ``n_boot``)."""
    methods = list(counts)
    rng = np.random.default_rng(seed)
    # Drawn all at once, so resample b is the same for any set of models (paired across calls too).
    samples = rng.integers(0, N_STIMULI, size=(n_boot, N_STIMULI))
    boots = {m: np.full((counts[m], len(model_mats), len(TARGETS)), np.nan) for m in methods}
    tick = time.time()
    for b in range(n_boot):
        idx = samples[b]
        need = [m for m in methods if b < counts[m]]
        if not need:
            break
        if any(m != "cka" for m in need):
            mb, tb = models.subsample_pattern("index", idx), targets.subsample_pattern("index", idx)
        else:
            mb = tb = None
        for m in need:
            if m == "cka":
                sim = cka_from_rdms(model_mats[:, idx][:, :, idx], target_mats[:, idx][:, :, idx],
                                    same=idx[:, None] == idx[None, :])
            else:
                sim = _compare(mb, tb, m)
            boots[m][b] = _with_mean(sim)
        if log and (b + 1) % max(1, n_boot // 10) == 0:
            log(f"  bootstrap {b + 1}/{n_boot} ({time.time() - tick:.0f}s)")
    return boots
