"""The 92-image set of Kriegeskorte et al. 2008: where it lives and how it is read.

Owns the files' names, the stimuli and their category labels, the human (4 subjects x 2 sessions) and
monkey IT RDMs, the target order the comparisons use (``STACK_TARGETS``, ``TARGETS``) and how a sweep
folder names its data root (``resolve_rsa92``). Bad or missing files: a one-line UsageError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bioplaus.orchestrator.errors import UsageError

STIMULI_FILE = "Kriegeskorte_Neuron2008_supplementalData.mat"
BRAIN_FILE = "92_brainRDMs.mat"
MODELS_FILE = "92_modelRDMs.mat"
N_STIMULI = 92

HUMAN_SUBJECT_TARGETS = [f"human_it_subj{i + 1}" for i in range(4)]
# The columns of the target stack compared in one go; human_it_mean is derived from the subject columns.
STACK_TARGETS = [*HUMAN_SUBJECT_TARGETS, "human_it_avg_rdm", "monkey_it"]
TARGETS = ["human_it_mean", *STACK_TARGETS]


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


def square_rdm(rdm: np.ndarray) -> np.ndarray:
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
    fig1 = {r.name: square_rdm(r.RDM) for r in np.atleast_1d(sup["RDMs_mIT_hIT_fig1"])}
    monkey = next((v for k, v in fig1.items() if k.lower().startswith("mit")), None)
    raw = np.asarray(_loadmat(folder / BRAIN_FILE)["RDMs"])
    if raw.ndim != 2:
        raise UsageError(f"{folder / BRAIN_FILE}: expected a subjects x sessions array of RDMs, got shape {raw.shape}")
    human = np.stack([[square_rdm(raw[s, k].RDM) for k in range(raw.shape[1])] for s in range(raw.shape[0])])
    subjects = [str(raw[s, 0].name).split("|")[1].strip() if "|" in str(raw[s, 0].name) else f"S{s + 1}"
                for s in range(raw.shape[0])]
    models = {str(m.name): square_rdm(m.RDM) for m in np.atleast_1d(_loadmat(folder / MODELS_FILE)["Models"])}
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
