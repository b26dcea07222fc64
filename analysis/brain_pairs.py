"""Brain-score inference for the sweep: which networks are in domain, the stimulus-and-subject bootstrap
columns of the ``brain`` table (cross-validated best layer, its CI and resamples), and the ``brain_pairs``
/ ``brain_scores`` tables: paired differences between rules and against the controls (the untrained
network, pixels, the 92-image model RDMs such as animacy), all on the same seeded resamples, with
Holm-corrected p-values. The statistics themselves are in :mod:`bioplaus.analysis.rsa_stats`.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from bioplaus.analysis.rsa_stats import DualResult, draw_resamples, dual_bootstrap, holm, paired_test, percentile_ci
from bioplaus.orchestrator.errors import UsageError

# Datasets of natural colour photographs: networks trained on them see the 92 photographs in domain.
NATURAL_DATASETS = ("cifar10", "cifar100", "svhn", "imagefolder")
DOMAINS = ("auto", "natural", "all")
# 92_modelRDMs.mat entries that are brain data, not models
NOT_CONTROLS = ("monkeyIT",)
RSA_METHOD = {"spearman": "spearman", "kendall_tau_a": "tau-a"}
INFERENCE_TARGET = "human_it_mean"


def in_domain(dataset: str | None) -> bool:
    return str(dataset) in NATURAL_DATASETS


def checkpoint_dataset(path: Path) -> str:
    """The dataset field of a ``<rule>.<arch>.<dataset>.final<seed>.pt`` name ('' when it has none)."""
    parts = path.name.split(".")
    return parts[2] if len(parts) >= 4 else ""


def select_checkpoints(paths: list[Path], domain: str) -> tuple[list[Path], str | None]:
    """Networks to score: ``auto`` = the natural-image ones when any, else all (flagged out of domain);
    ``natural`` = natural-image ones only (UsageError when none); ``all`` = every one. Returns (paths, note)."""
    if domain not in DOMAINS:
        raise UsageError(f"domain={domain!r}: use {', '.join(DOMAINS)}")
    natural = [p for p in paths if in_domain(checkpoint_dataset(p))]
    if domain == "all":
        return paths, None
    if domain == "natural" and not natural:
        raise UsageError(f"domain=natural: no network trained on {', '.join(NATURAL_DATASETS)} among {len(paths)} "
                         "saved networks; train cnn on cifar10, or pass domain=all")
    if natural:
        left = len(paths) - len(natural)
        return natural, (f"scoring the {len(natural)} natural-image networks; {left} digit/grey networks skipped "
                         "(domain=all scores them, flagged in_domain=false)") if left else None
    return paths, "no natural-image network in this sweep: scoring all, flagged in_domain=false"


# --- the brain table's inference columns ---------------------------------------------------------------
def network_groups(pending_entries: list[list[dict[str, Any]]]) -> tuple[list[np.ndarray], list[tuple[int, str]]]:
    """Stack rows of each (network, control): the layers among which the best is chosen by cross-validation."""
    groups, keys, offset = [], [], 0
    for n, entries in enumerate(pending_entries):
        by_control: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            by_control.setdefault(e["control"], []).append(offset + i)
        for control, idx in by_control.items():
            groups.append(np.array(idx))
            keys.append((n, control))
        offset += len(entries)
    return groups, keys


def infer(stack: np.ndarray, pending_entries: list[list[dict[str, Any]]], data, method: str, n_boot: int,
          seed: int, log=None) -> tuple[DualResult, list[np.ndarray], list[tuple[int, str]]]:
    """The stimulus-and-subject bootstrap of every RDM of ``stack`` against the human subjects."""
    groups, keys = network_groups(pending_entries)
    res = dual_bootstrap(stack, data.human_subjects, draw_resamples(len(data.human_subjects), stack.shape[-1] if
                         stack.ndim == 3 else data.images.shape[0], n_boot, seed), RSA_METHOD[method], groups)
    if log:
        log(f"brain: stimulus x subject bootstrap ({n_boot} resamples, cross-validated layer choice) done")
    return res, groups, keys


def annotate_rows(rows: list[dict[str, Any]], network: int, offset: int, entries: list[dict[str, Any]],
                  inferred: tuple[DualResult, list[np.ndarray], list[tuple[int, str]]] | None, method: str,
                  ci: float, common: dict[str, Any]) -> None:
    """Add the inference columns to one network's rows (in place); only rows of ``method`` vs human IT
    (mean of subjects) carry the bootstrap values, every row carries in_domain, boot_seed and n_boot_dual."""
    for r in rows:
        r.update(common, layer_cv=False)
    if inferred is None:
        return
    res, groups, keys = inferred
    pos = {(e["control"], e["layer"]): offset + i for i, e in enumerate(entries)}
    lo, hi = percentile_ci(res.boot, ci)
    cv_lo, cv_hi = percentile_ci(res.cv_boot, ci)
    cv_of = {keys[g][1]: g for g in range(len(keys)) if keys[g][0] == network}
    for r in rows:
        if r["method"] != method or r["target"] != INFERENCE_TARGET:
            continue
        i = pos[(r["control"], r["layer"])]
        g = cv_of[r["control"]]
        r.update(dual_ci_low=_f(lo[i]), dual_ci_high=_f(hi[i]), noise_ceiling_low_ci=_f(np.nanquantile(
            res.ceiling_boot[:, 0], (1 - ci) / 2)), noise_ceiling_high_ci=_f(np.nanquantile(res.ceiling_boot[:, 1],
                                                                                              1 - (1 - ci) / 2)))
        if res.cv_layer[g] >= 0 and groups[g][res.cv_layer[g]] == i:
            r.update(layer_cv=True, cv_similarity=_f(res.cv_score[g]), cv_ci_low=_f(cv_lo[g]),
                     cv_ci_high=_f(cv_hi[g]), cv_boot=[float(v) for v in res.cv_boot[:, g]])


def _f(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


# --- paired comparisons ----------------------------------------------------------------------------------
def seed_mean(rows) -> tuple[float, np.ndarray]:
    """One network's cv rows (a row per seed) as one: the mean cross-validated score and, per resample, the
    mean over seeds (the seeds share the resamples, so resample b stays paired with every other network's)."""
    return float(rows["cv_similarity"].mean()), np.mean(np.stack(rows["cv_boot"].to_list()), 0)


def _entities(df) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """Per (arch, dataset): entity name -> {kind, score, boot (B,), seeds, in_domain} from the cv rows."""
    import polars as pl

    cv = df.filter(pl.col("layer_cv") & pl.col("cv_boot").is_not_null()) if "layer_cv" in df.columns else df.head(0)
    out: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for (arch, dataset), g in cv.group_by("arch", "dataset", maintain_order=True):
        ents: dict[str, dict[str, Any]] = {}
        for (rule, control), h in g.group_by("rule", "control", maintain_order=True):
            name = rule if control == "none" else "pixels" if control == "pixels" else f"{rule}/untrained"
            if name in ents:  # pixels: the same input for every network of the panel
                continue
            score, boot = seed_mean(h)
            ents[name] = {"kind": "rule" if control == "none" else control, "rule": rule, "score": score,
                          "boot": boot, "seeds": h.height, "in_domain": bool(h["in_domain"].all())}
        out[(arch, dataset)] = ents
    return out


def model_controls(data, method: str, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """The 92-image model RDMs (animacy, category, HMAX, V1, ...) on the brain table's resamples."""
    names = [k for k in data.models if k not in NOT_CONTROLS]
    res = dual_bootstrap(np.stack([data.models[k] for k in names]), data.human_subjects,
                         draw_resamples(len(data.human_subjects), data.images.shape[0], n_boot, seed),
                         RSA_METHOD[method], ceiling=False)
    return {f"model:{k}": {"kind": "model", "rule": None, "score": float(res.cv_score[i]), "boot": res.cv_boot[:, i],
                           "seeds": 1, "in_domain": True} for i, k in enumerate(names)}


def _pair_rows(ents: dict[str, dict[str, Any]], ci: float, alpha: float) -> list[dict[str, Any]]:
    rules = sorted(n for n, e in ents.items() if e["kind"] == "rule")
    pairs = [("rules", a, b) for a, b in combinations(rules, 2)]
    controls = [n for n, e in ents.items() if e["kind"] in ("pixels", "model")]
    for r in rules:
        pairs += [("controls", r, c) for c in ([f"{r}/untrained"] if f"{r}/untrained" in ents else []) + controls]
    rows = []
    for family, a, b in pairs:
        t = paired_test(ents[a]["boot"], ents[b]["boot"], ci)
        rows.append({"family": family, "a": a, "b": b, "score_a": ents[a]["score"], "score_b": ents[b]["score"],
                     "diff": ents[a]["score"] - ents[b]["score"], "ci_low": t["ci_low"], "ci_high": t["ci_high"],
                     "p": t["p"], "n_boot": t["n"], "seeds_a": ents[a]["seeds"], "seeds_b": ents[b]["seeds"]})
    for family in ("rules", "controls"):
        idx = [i for i, r in enumerate(rows) if r["family"] == family]
        for i, q in zip(idx, holm(np.array([rows[i]["p"] for i in idx]))):
            rows[i]["p_holm"] = float(q)
            rows[i]["resolved"] = bool(q < alpha)
    return rows


def pairs_tables(df, data=None, method: str = "spearman", ci: float = 0.95, alpha: float = 0.05):
    """(brain_pairs, brain_scores) DataFrames from the brain table's cv rows; ``data`` (the RSA92 set) adds
    the model-RDM controls, scored on the same resamples (the table's boot_seed and n_boot_dual)."""
    import polars as pl

    pairs, scores = [], []
    for (arch, dataset), ents in _entities(df).items():
        if data is not None:
            sub = df.filter((pl.col("arch") == arch) & (pl.col("dataset") == dataset) & pl.col("layer_cv"))
            seeds, boots = sub["boot_seed"].unique().to_list(), sub["n_boot_dual"].unique().to_list()
            if len(seeds) != 1 or len(boots) != 1:
                raise UsageError(f"brain table {arch}/{dataset}: networks scored with different bootstrap settings "
                                 f"(seeds {seeds}, resamples {boots}); rerun `bioplaus brain SWEEP overwrite=true`")
            ents = {**ents, **model_controls(data, method, int(boots[0]), int(seeds[0]))}
        key = {"arch": arch, "dataset": dataset, "in_domain": in_domain(dataset), "method": method,
               "target": INFERENCE_TARGET}
        pairs += [{**key, **r} for r in _pair_rows(ents, ci, alpha)]
        for name, e in ents.items():
            lo, hi = percentile_ci(e["boot"], ci)
            scores.append({**key, "entity": name, "kind": e["kind"], "seeds": e["seeds"], "score": e["score"],
                           "ci_low": float(lo), "ci_high": float(hi)})
    return pl.DataFrame(pairs), pl.DataFrame(scores)


def write_pairs(sweep_dir: Path, df, data, method: str, ci: float, log) -> None:
    """``brain_pairs/brain_pairs.parquet`` and ``brain_scores/brain_scores.parquet`` in the sweep folder."""
    from bioplaus.orchestrator.results import write_table

    pairs, scores = pairs_tables(df, data, method, ci)
    for name, table in (("brain_pairs", pairs), ("brain_scores", scores)):
        if table.height:
            write_table(table.to_arrow(), sweep_dir / name / f"{name}.parquet")
    if pairs.height:
        log(f"brain: {pairs.height} paired comparisons ({int(pairs['resolved'].sum())} resolved after Holm) "
            f"in {sweep_dir / 'brain_pairs'}")


# --- the report's figure ------------------------------------------------------------------------------------
def figure_rows(df, target: str, method: str):
    """(rows to plot, whether they are the cross-validated scores): per network and control, the layer_cv row
    with similarity / ci_low / ci_high replaced by the cv score and its stimulus x subject CI when the table
    has them for this target and method, else the in-sample best layer with its stimulus-only CI."""
    import polars as pl

    sel = df.filter((pl.col("target") == target) & (pl.col("method") == method))
    if "cv_similarity" in df.columns:
        cv = sel.filter(pl.col("layer_cv") & pl.col("cv_similarity").is_not_null())
        if cv.height:
            return cv.with_columns(similarity=pl.col("cv_similarity"), ci_low=pl.col("cv_ci_low"),
                                   ci_high=pl.col("cv_ci_high")), True
    return sel.filter(pl.col("best_layer")), False


def mark_unresolved(ax, df, arch: str, dataset: str, order: list[str], alpha: float = 0.05) -> None:
    """Bracket each pair of neighbouring rules (in plotted order) whose paired difference is not resolved
    (Holm-corrected p >= alpha): 'n.s.' above them."""
    import polars as pl

    sub = df.filter((pl.col("arch") == arch) & (pl.col("dataset") == dataset))
    pairs, _ = pairs_tables(sub, alpha=alpha)
    if not pairs.height:
        return
    resolved = {frozenset((r["a"], r["b"])): r["resolved"] for r in pairs.filter(pl.col("family") == "rules")
                .iter_rows(named=True)}
    top = ax.get_ylim()[1]
    for x in range(len(order) - 1):
        if not resolved.get(frozenset(order[x:x + 2]), True):
            y = top * (0.97 if x % 2 else 0.92)
            ax.plot([x, x, x + 1, x + 1], [y - 0.01, y, y, y - 0.01], color="0.3", lw=0.8)
            ax.text(x + 0.5, y, "n.s.", ha="center", va="bottom", fontsize=7, color="0.3")
