"""Brain similarity: how alike do a network's layers and primate IT cortex represent the same 92 images?

Data: Kriegeskorte et al. 2008 (Neuron), the 92 object images with human IT fMRI RDMs (4 subjects x 2
sessions, 1 - Pearson over voxels) and a monkey IT RDM (674 neurons), as distributed with rsatoolbox's
demo data (``<data root>/rsa92``, see :func:`load_rsa92`).

What is computed, for every saved network (``SWEEP_DIR/models/*.pt``, see orchestrator/checkpoint.py):

1. The 92 images are fed to the network as it was trained: centre-cropped to the input's aspect ratio,
   resized (bilinear, antialiased) to the input size, quantised to 8-bit like the training pixels,
   converted to grayscale (ITU-R 601 luma) for single-channel networks, and standardised with the
   training split's per-channel mean and std saved in the checkpoint.
2. Every stage's output (``net.activations``: hidden blocks then logits), flattened, gives one RDM per
   layer (rsatoolbox ``calc_rdm``; 1 - Pearson by default, ``rdm=euclidean`` also possible).
3. Each layer RDM is compared (rsatoolbox ``compare``) with each human subject's IT RDM (the subject's
   two sessions averaged), with the group-averaged human RDM and with monkey IT, by Spearman's rho and
   by Kendall's tau_a (the measure Kriegeskorte's toolbox recommends when a model predicts ties).
   ``human_it_mean`` is the mean over the 4 subjects of the per-subject similarity, which is the
   quantity rsatoolbox's noise ceiling bounds (``boot_noise_ceiling``: lower bound = each subject vs
   the pooled RDM of the other subjects, upper bound = each subject vs the pooled RDM of all subjects).
4. 95 % CIs: percentile bootstrap over stimuli (rsatoolbox ``subsample_pattern``, which drops the
   trivial zero dissimilarities between copies of a resampled image). The same resampled stimulus
   sets (seeded) serve every layer, network and target, so differences are paired.
5. Controls: the same architecture untrained (built with the run's own seed, i.e. the weights the run
   started from for rules that keep the architecture's initialisation), and raw pixels (the network's
   input as fed, i.e. resized and standardised).
6. Debiased linear CKA (``method=cka``; the unbiased HSIC estimator, because the plain one is biased
   upwards when units far outnumber the 92 stimuli), computed from RDMs, not from brain features (this
   data has only RDMs): U-centring ``-D/2`` gives the same kernel as the features' ``X X^T``, and a
   1 - Pearson RDM is a squared-Euclidean RDM of per-stimulus standardised patterns, so this is exactly
   debiased linear CKA between the model's and the brain's standardised patterns (with
   ``rdm=euclidean`` the model side is its raw centred features). :func:`linear_cka` is the feature
   version (debiased or plain).

Results go into the sweep's ``brain/`` table (hive-partitioned by rule/arch/dataset like the other
tables; one file per saved network, written atomically). Columns: see ``BRAIN_SCHEMA``.

Entry points: :func:`brain_table` (what ``bioplaus brain SWEEP_DIR`` and the sweep's brain step run),
:func:`plot_brain` and :func:`brain_summary` (the report's figure and table).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from bioplaus.analysis import brain_pairs
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.results import read_table

STIMULI_FILE = "Kriegeskorte_Neuron2008_supplementalData.mat"
BRAIN_FILE = "92_brainRDMs.mat"
MODELS_FILE = "92_modelRDMs.mat"
N_STIMULI = 92

# table method name -> rsatoolbox compare() method (cka is computed here, from the RDMs)
METHODS = {"spearman": "spearman", "kendall_tau_a": "tau-a", "cka": None}
CONTROLS = ("untrained", "pixels")


@dataclass
class BrainConfig:
    """Settings of the brain-similarity analysis (``bioplaus brain SWEEP_DIR key=value ...``)."""

    rsa92: str | None = None
    """Folder with the Kriegeskorte 2008 .mat files; None: ``<data root>/rsa92``, the data root being the
    sweep's ``trial.data.root`` (from its manifest), else env BIOPLAUS_DATA, else ~/.cache/bioplaus/data."""
    rdm: str = "correlation"
    """Dissimilarity of the model RDMs (rsatoolbox calc_rdm): correlation (1 - Pearson, as the brain
    RDMs) or euclidean (squared Euclidean distance per feature)."""
    methods: list[str] = field(default_factory=lambda: ["spearman", "kendall_tau_a", "cka"])
    """RDM comparisons to report: spearman, kendall_tau_a, cka."""
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    """Controls to add for every network: untrained (same architecture and seed, no training), pixels."""
    n_boot: int = 1000
    """Bootstrap resamples of the stimuli for the CIs of spearman and cka (0: no CIs)."""
    n_boot_kendall: int = 100
    """Bootstrap resamples for kendall_tau_a (rsatoolbox's tau_a is ~100x slower than Spearman); at most n_boot."""
    ci: float = 0.95
    """Coverage of the percentile bootstrap intervals."""
    seed: int = 0
    """Seeds the bootstrap resamples (the same resamples for every network, so differences are paired)."""
    models: str = "*.pt"
    """Glob of the checkpoints under SWEEP_DIR/models to analyse."""
    device: str = "cpu"
    """Device for the forward passes (92 images: the CPU is plenty): cpu, cuda, auto."""
    overwrite: bool = False
    """Recompute networks whose brain file already exists and is newer than the checkpoint."""
    domain: str = "auto"
    """Networks to score: auto (those trained on natural images, e.g. cifar10, when the sweep has any, else
    all), natural (only those), all (every network; digit/grey ones flagged in_domain=false)."""
    n_boot_dual: int = 500
    """Resamples of stimuli and subjects for the cross-validated best-layer scores, their CIs and the
    brain_pairs table (0: skip that inference)."""
    inference_method: str = "spearman"
    """RDM comparison of that inference: spearman or kendall_tau_a."""


BRAIN_SCHEMA = pa.schema([
    ("model", pa.string()),               # checkpoint stem, e.g. bp.cnn.cifar10.final1000
    ("seed", pa.int64()),                 # the trained run's seed (the untrained control is built with it)
    ("control", pa.string()),             # none (the trained network) | untrained | pixels
    ("layer", pa.int64()),                # 0 = pixels (network input), 1..K = net.stages (K = the logits)
    ("layer_name", pa.string()),          # pixels | block1 ... | head
    ("layer_type", pa.string()),          # the stage's weight layer (Conv2d / Linear), input for pixels
    ("n_features", pa.int64()),           # flattened width of the layer's output
    ("target", pa.string()),              # human_it_mean | human_it_subj1..4 | human_it_avg_rdm | monkey_it
    ("method", pa.string()),              # spearman | kendall_tau_a | cka
    ("similarity", pa.float64()),         # on all 92 stimuli
    ("ci_low", pa.float64()),             # percentile bootstrap over stimuli (null when n_boot = 0)
    ("ci_high", pa.float64()),
    ("noise_ceiling_low", pa.float64()),  # human targets only (null for human_it_avg_rdm and monkey_it)
    ("noise_ceiling_high", pa.float64()),
    ("best_layer", pa.bool_()),           # highest similarity among this network's layers for (control, target, method)
    ("rdm", pa.string()),                 # model RDM dissimilarity: correlation | euclidean
    ("n_boot", pa.int64()),               # resamples behind the CI
    ("n_degenerate", pa.int64()),         # constant-response stimuli (correlation undefined, set to 1)
    ("model_path", pa.string()),
    ("created_at", pa.timestamp("ms", tz="UTC")),
    ("git_commit", pa.string()),
    # inference over stimuli and subjects (analysis/brain_pairs.py); values on inference_method x human_it_mean rows
    ("in_domain", pa.bool_()),            # trained on natural colour images (cifar10, ...), like the 92 photographs
    ("layer_cv", pa.bool_()),             # the layer chosen most often by cross-validation over stimulus halves
    ("dual_ci_low", pa.float64()),        # this layer's CI, bootstrap over stimuli and subjects
    ("dual_ci_high", pa.float64()),
    ("noise_ceiling_low_ci", pa.float64()),   # lower end of the lower ceiling's CI, same resamples
    ("noise_ceiling_high_ci", pa.float64()),  # upper end of the upper ceiling's CI
    ("cv_similarity", pa.float64()),      # layer_cv rows: the network's cross-validated best-layer score
    ("cv_ci_low", pa.float64()),
    ("cv_ci_high", pa.float64()),
    ("cv_boot", pa.list_(pa.float64())),  # its value on every resample (for paired differences)
    ("boot_seed", pa.int64()),
    ("n_boot_dual", pa.int64()),
])

HUMAN_SUBJECT_TARGETS = [f"human_it_subj{i + 1}" for i in range(4)]
# The columns of the target stack compared in one go; human_it_mean is derived from the subject columns.
STACK_TARGETS = [*HUMAN_SUBJECT_TARGETS, "human_it_avg_rdm", "monkey_it"]
TARGETS = ["human_it_mean", *STACK_TARGETS]


# --- the data ---------------------------------------------------------------------------------------
@dataclass
class RSA92:
    """The 92-image set: stimuli, category labels, brain RDMs (92 x 92 matrices) and model RDMs."""

    folder: Path
    images: np.ndarray
    """(92, 175, 175, 3) uint8 RGB, objects on a grey background."""
    categories: list[str]
    """Per-stimulus category (human bodypart, human face, ..., artificial inanimate)."""
    category_labels: list[str]
    """The 12 names of ``category_vectors``' columns (animate, inanim, human, ...)."""
    category_vectors: np.ndarray
    """(92, 12) bool membership of each stimulus in each category."""
    human: np.ndarray
    """(4, 2, 92, 92) human IT RDMs, subjects x sessions (1 - Pearson over 316 IT voxels)."""
    subjects: list[str]
    """Subject codes in ``human``'s order (BE, KO, SN, TI)."""
    monkey: np.ndarray
    """(92, 92) monkey IT RDM (674 neurons)."""
    models: dict[str, np.ndarray]
    """The 92_modelRDMs.mat model RDMs by name (animacy, HMAX, V1, ...), 92 x 92."""

    @property
    def human_subjects(self) -> np.ndarray:
        """(4, 92, 92): each subject's two sessions averaged."""
        return self.human.mean(1)

    @property
    def human_avg(self) -> np.ndarray:
        """(92, 92): all 8 subject-sessions averaged (equals the paper's fig. 1 hIT RDM)."""
        return self.human.mean((0, 1))

    def targets(self) -> np.ndarray:
        """(6, 92, 92) in ``STACK_TARGETS`` order: subjects 1-4, the averaged human RDM, monkey IT."""
        return np.concatenate([self.human_subjects, self.human_avg[None], self.monkey[None]])


def default_rsa92_dir(data_root: str | Path | None = None) -> Path:
    """``<data root>/rsa92``; the data root defaults like the trials' (env BIOPLAUS_DATA, else the cache)."""
    from bioplaus.orchestrator.data.datasets import default_data_root

    return (Path(data_root).expanduser() if data_root else default_data_root()) / "rsa92"


def _loadmat(path: Path) -> dict:
    import scipy.io as sio

    return sio.loadmat(str(path), struct_as_record=False, squeeze_me=True)


def _square(rdm: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import squareform

    rdm = np.asarray(rdm, dtype=np.float64)
    return squareform(rdm, checks=False) if rdm.ndim == 1 else rdm


def load_rsa92(folder: str | Path) -> RSA92:
    """Read the 92-image set from ``folder``; UsageError naming the missing file and the fix."""
    folder = Path(folder).expanduser()
    for name in (STIMULI_FILE, BRAIN_FILE, MODELS_FILE):
        if not (folder / name).is_file():
            raise UsageError(f"brain data missing: {folder / name} not found; pass --rsa92 DIR (or rsa92=DIR) "
                             "naming the folder with the Kriegeskorte 2008 .mat files, or put them under "
                             "<data root>/rsa92")
    sup = _loadmat(folder / STIMULI_FILE)
    stimuli = list(np.atleast_1d(sup["stimuli_92objs"]))
    images = np.stack([np.asarray(s.image, dtype=np.uint8) for s in stimuli])
    fig1 = {r.name: _square(r.RDM) for r in np.atleast_1d(sup["RDMs_mIT_hIT_fig1"])}
    monkey = next((v for k, v in fig1.items() if k.lower().startswith("mit")), None)
    raw = np.asarray(_loadmat(folder / BRAIN_FILE)["RDMs"])
    if raw.ndim != 2:
        raise UsageError(f"{folder / BRAIN_FILE}: expected a subjects x sessions array of RDMs, got shape {raw.shape}")
    human = np.stack([[_square(raw[s, k].RDM) for k in range(raw.shape[1])] for s in range(raw.shape[0])])
    subjects = [str(raw[s, 0].name).split("|")[1].strip() if "|" in str(raw[s, 0].name) else f"S{s + 1}"
                for s in range(raw.shape[0])]
    models = {str(m.name): _square(m.RDM) for m in np.atleast_1d(_loadmat(folder / MODELS_FILE)["Models"])}
    data = RSA92(folder, images, [str(s.category) for s in stimuli], [str(c) for c in sup["categoryLabels"]],
                 np.asarray(sup["categoryVectors"]).astype(bool), human, subjects, monkey, models)
    n = N_STIMULI
    checks = [(images.shape[0] == n and images.ndim == 4 and images.shape[3] == 3, f"stimuli shape {images.shape}"),
              (monkey is not None and monkey.shape == (n, n), f"monkey IT RDM missing or mis-shaped in {STIMULI_FILE}"),
              (human.shape[0] == 4 and human.shape[2:] == (n, n), f"human RDMs shape {human.shape}"),
              (data.category_vectors.shape == (n, len(data.category_labels)), "category vectors / labels mismatch")]
    for ok, what in checks:
        if not ok:
            raise UsageError(f"{folder}: unexpected rsa92 content ({what}); is this the rsatoolbox 92-image demo data?")
    return data


# --- feeding the stimuli -----------------------------------------------------------------------------
def stimuli_tensor(images: np.ndarray, input_shape, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, C, h, w) float, as the network saw its training images.

    Centre-crop to the input's aspect ratio, bilinear antialiased resize, 8-bit quantisation (training
    pixels are uint8), grayscale (ITU-R 601 luma) when the network has one input channel, then the
    training split's per-channel standardisation.
    """
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ValueError(f"brain similarity needs an image network with 1 or 3 input channels; input {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
    H, W = x.shape[2:]
    if H * w != W * h:  # crop the longer side so the aspect ratio matches, no distortion
        ch, cw = (H, round(H * w / h)) if W * h > H * w else (round(W * h / w), W)
        top, left = (H - ch) // 2, (W - cw) // 2
        x = x[:, :, top:top + ch, left:left + cw]
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp(0, 1).mul(255).round().div(255)
    if c == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    mean, std = torch.as_tensor(mean).float().cpu(), torch.as_tensor(std).float().cpu()
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


@torch.no_grad()
def layer_features(net, x: torch.Tensor) -> list[dict[str, Any]]:
    """Every stage's output for the stimuli, flattened: [{layer, layer_name, layer_type, features}]."""
    param = next(net.parameters())
    was_training = net.training
    net.eval()
    outs = net.activations(x.to(param.device, param.dtype))
    net.train(was_training)
    stages = net.stages
    return [{"layer": i + 1, "layer_name": "head" if i == len(stages) - 1 else f"block{i + 1}",
             "layer_type": type(stages[i].layer).__name__,
             "features": out.flatten(1).double().cpu().numpy()} for i, out in enumerate(outs)]


# --- RDMs and comparisons (rsatoolbox) ---------------------------------------------------------------
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
    return np.stack([_square(v) for v in np.atleast_2d(x)])


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
    out: dict[str, dict[str, np.ndarray]] = {}
    for m in methods:
        sim = _with_mean(_compare(models, targets, m, model_mats, target_mats))
        nc = noise_ceiling(data.human_subjects, m)
        nc_low = np.full(len(TARGETS), np.nan)
        nc_high = np.full(len(TARGETS), np.nan)
        nc_low[0], nc_high[0] = nc["low"], nc["high"]
        nc_low[1:5], nc_high[1:5] = nc["low_per_subject"], nc["high_per_subject"]
        out[m] = {"similarity": sim, "noise_ceiling_low": nc_low, "noise_ceiling_high": nc_high}

    rng = np.random.default_rng(seed)
    # Drawn all at once, so resample b is the same for any set of models (paired across calls too).
    samples = rng.integers(0, N_STIMULI, size=(n_boot, N_STIMULI))
    counts = {m: (min(n_boot_kendall, n_boot) if m == "kendall_tau_a" else n_boot) for m in methods}
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


# --- networks -----------------------------------------------------------------------------------------
def untrained_network(meta: dict, seed: int):
    """The checkpoint's architecture freshly initialised with ``seed`` (torch's global RNG untouched)."""
    from omegaconf import OmegaConf

    from bioplaus.algorithms.arch import ARCHS
    from bioplaus.orchestrator.build import build_network
    from bioplaus.orchestrator.config import typed

    spec = ARCHS[meta["arch"]]
    model_cfg = typed(spec.config, OmegaConf.create(meta["config"].get("model", {})), "model")
    with torch.random.fork_rng(devices=[]):  # seeded as the trial's network is
        net = build_network(spec, model_cfg, tuple(meta["input_shape"]), meta["num_classes"], seed)
    return net.eval()


def network_rdms(net, meta: dict, data: RSA92, rdm: str = "correlation",
                 controls=CONTROLS, seed: int | None = None) -> list[dict[str, Any]]:
    """Layer RDMs of a network and its controls: [{control, layer, layer_name, layer_type, n_features,
    n_degenerate, rdm (vector)}]. ``meta`` as from ``load_network`` (input_shape, mean, std, config)."""
    seed = int(meta.get("config", {}).get("seed", 0) if seed is None else seed)
    x = stimuli_tensor(data.images, meta["input_shape"], meta["mean"], meta["std"])
    nets = [("none", net)]
    if "untrained" in controls:
        nets.append(("untrained", untrained_network(meta, seed).to(next(net.parameters()).device)))
    entries = []
    for control, n in nets:
        for f in layer_features(n, x):
            vec, bad = features_rdm(f["features"], rdm)
            entries.append({"control": control, **{k: f[k] for k in ("layer", "layer_name", "layer_type")},
                            "n_features": f["features"].shape[1], "n_degenerate": bad, "rdm": vec})
    if "pixels" in controls:
        feats = x.flatten(1).double().numpy()
        vec, bad = features_rdm(feats, rdm)
        entries.append({"control": "pixels", "layer": 0, "layer_name": "pixels", "layer_type": "input",
                        "n_features": feats.shape[1], "n_degenerate": bad, "rdm": vec})
    return entries


def _mark_best(rows: list[dict[str, Any]]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["control"], r["target"], r["method"]), []).append(r)
    for g in groups.values():
        finite = [r for r in g if r["similarity"] is not None and math.isfinite(r["similarity"])]
        best = max(finite, key=lambda r: (r["similarity"], -r["layer"])) if finite else None
        for r in g:
            r["best_layer"] = r is best


def _f(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def rows_for(entries: list[dict[str, Any]], result: dict[str, dict[str, np.ndarray]], offset: int,
             common: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows for ``entries`` whose RDMs sit at ``offset`` onwards in the evaluated stack."""
    rows = []
    for i, e in enumerate(entries):
        for method, res in result.items():
            for t, target in enumerate(TARGETS):
                rows.append({**common, **{k: e[k] for k in ("control", "layer", "layer_name", "layer_type",
                                                             "n_features", "n_degenerate")},
                             "target": target, "method": method,
                             "similarity": _f(res["similarity"][offset + i, t]),
                             "ci_low": _f(res["ci_low"][offset + i, t]), "ci_high": _f(res["ci_high"][offset + i, t]),
                             "noise_ceiling_low": _f(res["noise_ceiling_low"][t]),
                             "noise_ceiling_high": _f(res["noise_ceiling_high"][t]), "n_boot": int(res["n_boot"])})
    _mark_best(rows)
    return rows


# --- the sweep's brain table --------------------------------------------------------------------------
def _sweep_data_root(sweep_dir: Path) -> str | None:
    manifest = sweep_dir / "manifest.json"
    if manifest.is_file():
        try:
            cfg = json.loads(json.loads(manifest.read_text()).get("config_json") or "{}")
            return ((cfg.get("trial") or {}).get("data") or {}).get("root")
        except (ValueError, AttributeError):
            return None
    return None


def resolve_rsa92(sweep_dir: str | Path, rsa92_dir: str | Path | None = None) -> Path:
    """The rsa92 folder: given, else ``<the sweep's data root>/rsa92`` (see BrainConfig.rsa92)."""
    if rsa92_dir:
        return Path(rsa92_dir).expanduser()
    return default_rsa92_dir(_sweep_data_root(Path(sweep_dir)))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def brain_table(sweep_dir: str | Path, rsa92_dir: str | Path | None = None, cfg: BrainConfig | None = None,
                log: Callable[[str], None] = _stderr) -> Path:
    """Brain similarity of every saved network in ``SWEEP_DIR/models`` -> ``SWEEP_DIR/brain`` (returned).

    ``brain_table(sweep_dir, rsa92_dir=None, cfg=None, log=print-to-stderr) -> Path``

    - ``sweep_dir``: a sweep folder (or any folder) with ``models/<rule>.<arch>.<dataset>.final<seed>.pt``
      checkpoints (orchestrator/checkpoint.py; ``run_trial(save_model=...)`` writes them too).
    - ``rsa92_dir``: the Kriegeskorte 2008 folder; None: ``cfg.rsa92``, else ``<data root>/rsa92`` with
      the sweep manifest's ``trial.data.root`` as data root (else env BIOPLAUS_DATA, else the cache).
    - ``cfg``: :class:`BrainConfig` (RDM measure, methods, controls, bootstrap counts, seed, glob).

    Writes one Parquet file per network, ``brain/rule=R/arch=A/dataset=D/<checkpoint stem>.parquet``
    (atomically; ``BRAIN_SCHEMA`` plus the rule/arch/dataset partition columns), skipping networks whose
    file is newer than the checkpoint unless ``cfg.overwrite``. All pending networks share one bootstrap
    (the same stimulus resamples). No checkpoints: logs it and returns the (possibly absent) folder.
    Missing brain data: UsageError naming the folder.
    """
    import datetime as dt

    from bioplaus.orchestrator.checkpoint import load_network
    from bioplaus.orchestrator.results import git_commit, partition_dir, write_table

    cfg = cfg or BrainConfig()
    sweep_dir = Path(sweep_dir)
    out_root = sweep_dir / "brain"
    for m in cfg.methods:
        if m not in METHODS:
            raise UsageError(f"methods: unknown {m!r}; use {', '.join(METHODS)}")
    for c in cfg.controls:
        if c not in CONTROLS:
            raise UsageError(f"controls: unknown {c!r}; use {', '.join(CONTROLS)}")
    if cfg.rdm not in ("correlation", "euclidean"):
        raise UsageError(f"rdm={cfg.rdm!r}: use correlation or euclidean")
    if cfg.n_boot < 0 or cfg.n_boot_kendall < 0 or not 0 < cfg.ci < 1:
        raise UsageError("n_boot and n_boot_kendall must be >= 0 and ci in (0, 1)")
    if cfg.inference_method not in brain_pairs.RSA_METHOD or cfg.n_boot_dual < 0:
        raise UsageError(f"inference_method={cfg.inference_method!r}, n_boot_dual={cfg.n_boot_dual}: use "
                         f"{' or '.join(brain_pairs.RSA_METHOD)} and n_boot_dual >= 0")
    ckpts = sorted((sweep_dir / "models").glob(cfg.models))
    if not ckpts:
        log(f"brain: no saved networks matching {sweep_dir / 'models' / cfg.models}; nothing to do")
        return out_root
    ckpts, note = brain_pairs.select_checkpoints(ckpts, cfg.domain)
    if note:
        log(f"brain: {note}")
    data = load_rsa92(resolve_rsa92(sweep_dir, rsa92_dir or cfg.rsa92))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device

    pending = []
    for path in ckpts:
        net, meta = load_network(path, device=device)
        conf = meta.get("config", {})
        rule, arch, dataset = conf.get("rule"), meta.get("arch") or conf.get("arch"), conf.get("dataset")
        if not (rule and arch and dataset):
            rule, arch, dataset = (path.name.split(".") + ["?", "?", "?"])[:3]
        part = {"rule": rule, "arch": arch, "dataset": dataset}
        target = partition_dir(sweep_dir, "brain", part) / f"{path.stem}.parquet"
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime and not cfg.overwrite:
            continue
        tick = time.time()
        entries = network_rdms(net, meta, data, cfg.rdm, cfg.controls)
        log(f"brain: {path.name}: {len(entries)} RDMs ({time.time() - tick:.1f}s)")
        pending.append((path, part, int(conf.get("seed", 0)), entries, target))
    if not pending:
        log(f"brain: all {len(ckpts)} networks already in {out_root} (overwrite=true recomputes)")
        if cfg.n_boot_dual:
            brain_pairs.write_pairs(sweep_dir, read_brain(sweep_dir), data, cfg.inference_method, cfg.ci, log)
        return out_root

    stack = np.stack([e["rdm"] for _, _, _, entries, _ in pending for e in entries])
    log(f"brain: comparing {len(stack)} RDMs of {len(pending)} networks with human/monkey IT "
        f"({', '.join(cfg.methods)}; {cfg.n_boot} bootstrap resamples)")
    result = evaluate_rdms(stack, data, cfg.methods, cfg.n_boot, cfg.n_boot_kendall, cfg.ci, cfg.seed, log)
    inferred = brain_pairs.infer(stack, [p[3] for p in pending], data, cfg.inference_method, cfg.n_boot_dual,
                                 cfg.seed, log) if cfg.n_boot_dual else None
    now = dt.datetime.now(dt.timezone.utc)
    offset = 0
    for n, (path, part, seed, entries, target) in enumerate(pending):
        rows = rows_for(entries, result, offset, {"model": path.stem, "seed": seed, "rdm": cfg.rdm,
                                                  "model_path": str(path), "created_at": now,
                                                  "git_commit": git_commit()})
        brain_pairs.annotate_rows(rows, n, offset, entries, inferred, cfg.inference_method, cfg.ci,
                                  {"in_domain": brain_pairs.in_domain(part["dataset"]), "boot_seed": cfg.seed,
                                   "n_boot_dual": cfg.n_boot_dual})
        offset += len(entries)
        write_table(pa.Table.from_pylist([{k: r.get(k) for k in BRAIN_SCHEMA.names} for r in rows],
                                         schema=BRAIN_SCHEMA), target)
    log(f"brain: {len(pending)} networks written to {out_root}")
    if cfg.n_boot_dual:
        brain_pairs.write_pairs(sweep_dir, read_brain(sweep_dir), data, cfg.inference_method, cfg.ci, log)
    return out_root


def read_brain(sweep_dir: str | Path):
    """The ``brain`` table as a polars DataFrame (empty if absent)."""
    return read_table(sweep_dir, "brain")


# --- report helpers -----------------------------------------------------------------------------------
def brain_summary(df, target: str = "human_it_mean", method: str = "spearman"):
    """Per rule x arch x dataset x control: the best layer's similarity (mean over seeds), its bootstrap
    CI (mean over seeds of the per-seed bounds), the layer chosen most often and the noise ceiling.

    The best layer is picked on the same data it is scored on (max over layers), which favours
    networks with more layers slightly; the untrained control gets the same advantage.
    """
    import polars as pl

    if df.is_empty():
        return pl.DataFrame()
    best = df.filter((pl.col("target") == target) & (pl.col("method") == method) & pl.col("best_layer"))
    return (best.group_by("rule", "arch", "dataset", "control")
            .agg(pl.len().alias("seeds"), pl.col("similarity").mean(), pl.col("similarity").std().alias("similarity_std"),
                 pl.col("ci_low").mean(), pl.col("ci_high").mean(), pl.col("layer_name").mode().first().alias("best_layer"),
                 pl.col("noise_ceiling_low").first(), pl.col("noise_ceiling_high").first())
            .sort("arch", "dataset", "control", "similarity", descending=[False, False, False, True]))


def plot_brain(df_or_dir, path: str | Path, target: str = "human_it_mean", method: str = "spearman") -> Path:
    """The report's figure: per rule, best-layer similarity with its bootstrap CI (one point per seed),
    the untrained control (hollow grey), raw pixels (dotted line) and the noise-ceiling band (grey),
    one panel per arch x dataset. ``df_or_dir``: the brain DataFrame or a sweep folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    df = read_brain(df_or_dir) if isinstance(df_or_dir, (str, Path)) else df_or_dir
    if df.is_empty():
        raise UsageError("no brain results to plot (run `bioplaus brain SWEEP_DIR` first)")
    sel, cv = brain_pairs.figure_rows(df, target, method)
    panels = sel.select("arch", "dataset").unique().sort("arch", "dataset").rows()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 1.1 * sel["rule"].n_unique() + 2) * len(panels), 4),
                             squeeze=False)
    for ax, (arch, dataset) in zip(axes[0], panels):
        p = sel.filter((pl.col("arch") == arch) & (pl.col("dataset") == dataset))
        trained = p.filter(pl.col("control") == "none")
        order = (trained.group_by("rule").agg(pl.col("similarity").mean()).sort("similarity", descending=True)["rule"]
                 .to_list()) or sorted(p["rule"].unique().to_list())
        nc = p.filter(pl.col("noise_ceiling_low").is_not_null())
        if not nc.is_empty():
            ax.axhspan(nc["noise_ceiling_low"][0], nc["noise_ceiling_high"][0], color="0.85", zorder=0,
                       label="noise ceiling")
        pix = p.filter(pl.col("control") == "pixels")
        if not pix.is_empty():
            ax.axhline(pix["similarity"].mean(), color="0.4", ls=":", label="pixels")
        for x, rule in enumerate(order):
            for control, style, dx in (("none", {"fmt": "o", "color": "C0"}, -0.1),
                                       ("untrained", {"fmt": "o", "color": "0.5", "mfc": "white"}, 0.1)):
                r = p.filter((pl.col("rule") == rule) & (pl.col("control") == control)).sort("seed")
                for j, row in enumerate(r.iter_rows(named=True)):
                    lo = row["ci_low"] if row["ci_low"] is not None else row["similarity"]
                    hi = row["ci_high"] if row["ci_high"] is not None else row["similarity"]
                    ax.errorbar(x + dx + 0.04 * (j - (r.height - 1) / 2), row["similarity"],
                                yerr=[[row["similarity"] - lo], [hi - row["similarity"]]], capsize=2, ms=5,
                                label=("trained" if control == "none" else "untrained") if x == 0 and j == 0 else None,
                                **style)
        brain_pairs.mark_unresolved(ax, df, arch, dataset, order) if cv else None
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{arch} / {dataset}" + ("" if brain_pairs.in_domain(dataset) else " (out of domain)"))
        ax.set_ylabel(f"{'cross-validated ' if cv else ''}best-layer {method} vs {target}")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def run_command(sweep_dir: str, overrides: list[str], rsa92: str | None = None, plot: str | None = None) -> int:
    """``bioplaus brain SWEEP_DIR [--rsa92 DIR] [--plot FILE] [key=value ...]`` (keys of BrainConfig)."""
    import polars as pl
    from omegaconf import OmegaConf

    from bioplaus.orchestrator.config import parse_overrides

    if not Path(sweep_dir).is_dir():
        raise UsageError(f"{sweep_dir} is not a folder; pass a sweep folder holding models/*.pt")
    cfg: BrainConfig = OmegaConf.to_object(parse_overrides(overrides, base=OmegaConf.structured(BrainConfig)))
    if not sorted((Path(sweep_dir) / "models").glob(cfg.models)):
        raise UsageError(f"no saved networks in {Path(sweep_dir) / 'models'} matching {cfg.models!r}; sweep finals "
                         "save them, or train with run_trial(save_model=...)")
    out = brain_table(sweep_dir, rsa92, cfg)
    summary = brain_summary(read_brain(sweep_dir))
    with pl.Config(tbl_rows=100, tbl_cols=12, tbl_width_chars=160, float_precision=3):
        print(summary)
    if plot:
        print(f"figure: {plot_brain(read_brain(sweep_dir), plot)}", file=sys.stderr)
    print(f"brain similarity in {out} (pl.scan_parquet('{out}'))", file=sys.stderr)
    return 0
