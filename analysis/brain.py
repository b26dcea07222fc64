"""Brain similarity: how alike do a network's layers and primate IT cortex represent the same 92 images?

This module owns the brain step itself: its settings (``BrainConfig``), the ``brain`` table's schema
and rows, the writer (:func:`brain_table`, what ``bioplaus brain SWEEP_DIR`` and the sweep's brain step
run) and the command. The pieces it composes: ``brain_data`` (the 92-image set), ``brain_features``
(stimuli fed to a network, layer features, controls), ``brain_rsa`` (RDMs, comparisons, noise ceiling,
bootstrap), ``brain_pairs`` (inference over stimuli and subjects) and ``brain_figure`` (the report's
table and figure); their public names are importable from here too.

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
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from bioplaus.analysis import brain_pairs
from bioplaus.analysis.brain_data import (
    BRAIN_FILE,
    HUMAN_SUBJECT_TARGETS,
    MODELS_FILE,
    N_STIMULI,
    RSA92,
    STACK_TARGETS,
    STIMULI_FILE,
    TARGETS,
    default_rsa92_dir,
    load_rsa92,
    resolve_rsa92,
)
from bioplaus.analysis.brain_features import CONTROLS, layer_features, network_rdms, stimuli_tensor, untrained_network
from bioplaus.analysis.brain_figure import brain_summary, plot_brain
from bioplaus.analysis.brain_rsa import (
    METHODS,
    cka_from_rdms,
    compare_rdms,
    evaluate_rdms,
    features_rdm,
    linear_cka,
    noise_ceiling,
)
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.results import read_table

__all__ = [
    "BRAIN_FILE", "BRAIN_SCHEMA", "CONTROLS", "HUMAN_SUBJECT_TARGETS", "METHODS", "MODELS_FILE", "N_STIMULI", "RSA92",
    "STACK_TARGETS", "STIMULI_FILE", "TARGETS", "BrainConfig", "brain_summary", "brain_table", "cka_from_rdms",
    "compare_rdms", "default_rsa92_dir", "evaluate_rdms", "features_rdm", "layer_features", "linear_cka",
    "load_rsa92", "network_rdms", "noise_ceiling", "plot_brain", "read_brain", "resolve_rsa92", "rows_for",
    "run_command", "stimuli_tensor", "untrained_network",
]


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


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_config(cfg: BrainConfig) -> None:
    """UsageError naming the first bad setting of ``cfg``, before any network is loaded."""
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


@dataclass
class _Scored:
    """A network whose layer RDMs await comparison, and the brain file its rows go to."""

    path: Path
    part: dict[str, str]
    seed: int
    entries: list[dict[str, Any]]
    target: Path


def _partition(path: Path, meta: dict) -> dict[str, str]:
    """The network's rule/arch/dataset from its checkpoint, else from the file name."""
    conf = meta.get("config", {})
    rule, arch, dataset = conf.get("rule"), meta.get("arch") or conf.get("arch"), conf.get("dataset")
    if not (rule and arch and dataset):
        rule, arch, dataset = (path.name.split(".") + ["?", "?", "?"])[:3]
    return {"rule": rule, "arch": arch, "dataset": dataset}


def _pending_networks(ckpts: list[Path], sweep_dir: Path, data: RSA92, cfg: BrainConfig, device: str,
                      log: Callable[[str], None]) -> list[_Scored]:
    """Layer RDMs of every checkpoint whose brain file is missing or older (all of them with overwrite)."""
    from bioplaus.orchestrator.checkpoint import load_network
    from bioplaus.orchestrator.results import partition_dir

    pending = []
    for path in ckpts:
        net, meta = load_network(path, device=device)
        part = _partition(path, meta)
        target = partition_dir(sweep_dir, "brain", part) / f"{path.stem}.parquet"
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime and not cfg.overwrite:
            continue
        tick = time.time()
        entries = network_rdms(net, meta, data, cfg.rdm, cfg.controls)
        log(f"brain: {path.name}: {len(entries)} RDMs ({time.time() - tick:.1f}s)")
        pending.append(_Scored(path, part, int(meta.get("config", {}).get("seed", 0)), entries, target))
    return pending


def _write_networks(pending: list[_Scored], result: dict[str, dict[str, np.ndarray]], inferred,
                    cfg: BrainConfig) -> None:
    """One brain file per network: its rows of the evaluated stack, with the inference columns."""
    import datetime as dt

    from bioplaus.orchestrator.results import git_commit, write_table

    now = dt.datetime.now(dt.timezone.utc)
    offset = 0
    for n, p in enumerate(pending):
        rows = rows_for(p.entries, result, offset, {"model": p.path.stem, "seed": p.seed, "rdm": cfg.rdm,
                                                    "model_path": str(p.path), "created_at": now,
                                                    "git_commit": git_commit()})
        brain_pairs.annotate_rows(rows, n, offset, p.entries, inferred, cfg.inference_method, cfg.ci,
                                  {"in_domain": brain_pairs.in_domain(p.part["dataset"]), "boot_seed": cfg.seed,
                                   "n_boot_dual": cfg.n_boot_dual})
        offset += len(p.entries)
        write_table(pa.Table.from_pylist([{k: r.get(k) for k in BRAIN_SCHEMA.names} for r in rows],
                                         schema=BRAIN_SCHEMA), p.target)


def _check_kept_resamples(table, rescored: set[str], cfg: BrainConfig, out_root: Path) -> None:
    """UsageError when networks this run keeps were scored on other stimulus resamples: a paired difference
    (brain_pairs) needs both networks on the same seeded resamples, so new rows must use the kept ones'."""
    import polars as pl

    if not cfg.n_boot_dual or table.is_empty() or "boot_seed" not in table.columns:
        return
    kept = table.filter(~pl.col("model").is_in(list(rescored)), pl.col("n_boot_dual") > 0)
    other = kept.filter((pl.col("boot_seed") != cfg.seed) | (pl.col("n_boot_dual") != cfg.n_boot_dual))
    if other.height:
        first = other.row(0, named=True)
        raise UsageError(f"{out_root}: {other['model'].n_unique()} networks were scored with seed={first['boot_seed']}, "
                         f"n_boot_dual={first['n_boot_dual']}; pass those to score new networks on the same resamples, or "
                         "overwrite=true to rescore every network")


def _write_pairs(sweep_dir: Path, data: RSA92, cfg: BrainConfig, log: Callable[[str], None]) -> None:
    if cfg.n_boot_dual:
        brain_pairs.write_pairs(sweep_dir, read_brain(sweep_dir), data, cfg.inference_method, cfg.ci, log)


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
    cfg = cfg or BrainConfig()
    sweep_dir = Path(sweep_dir)
    out_root = sweep_dir / "brain"
    check_config(cfg)
    ckpts = sorted((sweep_dir / "models").glob(cfg.models))
    if not ckpts:
        log(f"brain: no saved networks matching {sweep_dir / 'models' / cfg.models}; nothing to do")
        return out_root
    ckpts, note = brain_pairs.select_checkpoints(ckpts, cfg.domain)
    if note:
        log(f"brain: {note}")
    data = load_rsa92(resolve_rsa92(sweep_dir, rsa92_dir or cfg.rsa92))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device

    pending = _pending_networks(ckpts, sweep_dir, data, cfg, device, log)
    if not pending:
        log(f"brain: all {len(ckpts)} networks already in {out_root} (overwrite=true recomputes)")
        _write_pairs(sweep_dir, data, cfg, log)
        return out_root
    _check_kept_resamples(read_brain(sweep_dir), {p.path.stem for p in pending}, cfg, out_root)
    stack = np.stack([e["rdm"] for p in pending for e in p.entries])
    log(f"brain: comparing {len(stack)} RDMs of {len(pending)} networks with human/monkey IT "
        f"({', '.join(cfg.methods)}; {cfg.n_boot} bootstrap resamples)")
    result = evaluate_rdms(stack, data, cfg.methods, cfg.n_boot, cfg.n_boot_kendall, cfg.ci, cfg.seed, log)
    inferred = brain_pairs.infer(stack, [p.entries for p in pending], data, cfg.inference_method, cfg.n_boot_dual,
                                 cfg.seed, log) if cfg.n_boot_dual else None
    _write_networks(pending, result, inferred, cfg)
    log(f"brain: {len(pending)} networks written to {out_root}")
    _write_pairs(sweep_dir, data, cfg, log)
    return out_root


def read_brain(sweep_dir: str | Path):
    """The ``brain`` table as a polars DataFrame (empty if absent)."""
    return read_table(sweep_dir, "brain")


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
