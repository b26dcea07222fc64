"""The report's brain-similarity tables: one row per network and control, and the paired differences.

The brain step (:mod:`bioplaus.analysis.brain`) writes every layer of every network and control; the report
shows, per target, method and cell:

* ``brain_cv``: each rule's cross-validated score (the layer chosen on one half of the stimuli, scored on
  the other; mean over seeds) with the 95 % percentile interval of that mean over the stimulus-and-subject
  resamples (shared by every network, so the seeds' resamples line up), the noise ceiling, and, beside
  it, the in-sample best layer (max over layers on the data it is scored on: selection-biased upwards).
  The controls (the untrained network, pixels) are computed once per network, but for the same seed they
  are the same network and the same input whichever rule trained it: rows of a control with the same
  values are one row, naming the rules they stand for when not all.
* ``brain_pairs_summary``: per family of paired differences (rules, controls) the number of pairs and
  how many are resolved after Holm's correction, from the brain step's ``brain_pairs`` table.
* ``brain_top_rule``: the top rule's differences to bp, its untrained network, pixels, the best model RDM
  and the next rule.
"""

from __future__ import annotations

import polars as pl

from bioplaus.analysis import brain_pairs
from bioplaus.analysis.rsa_stats import percentile_ci

CI = 0.95
PANEL = ("target", "method", "arch", "dataset")
FIGURE_TARGETS = ("human_it_mean", "monkey_it")
VALUES = ("cv_similarity", "cv_ci_low", "cv_ci_high", "best_layer_similarity", "best_layer_ci_low",
          "best_layer_ci_high")
CV_SCHEMA = {"target": pl.String, "method": pl.String, "arch": pl.String, "dataset": pl.String,
             "rule": pl.String, "control": pl.String, "cv_seeds": pl.Int64, "cv_similarity": pl.Float64,
             "cv_ci_low": pl.Float64, "cv_ci_high": pl.Float64, "cv_layer": pl.String}


def shown_panels(df: pl.DataFrame) -> list[tuple[str, str]]:
    """(target, method) pairs to show: those with cross-validated scores first, then the figure's targets
    (human IT, monkey IT) by Spearman (or the table's first method), in-sample only."""
    cv = df.filter(pl.col("layer_cv") & pl.col("cv_similarity").is_not_null()) if "cv_similarity" in df.columns \
        else df.head(0)
    shown = sorted(set(cv.select("target", "method").iter_rows()))
    methods = sorted(set(df["method"].drop_nulls())) if "method" in df.columns else []
    method = "spearman" if "spearman" in methods or not methods else methods[0]
    present = set(df["target"].drop_nulls())
    targets = [t for t in FIGURE_TARGETS if t in present] or sorted(present)[:2]
    return shown + [(t, method) for t in targets if (t, method) not in shown]


def cv_scores(df: pl.DataFrame, ci: float = CI) -> pl.DataFrame:
    """Per panel, rule and control: seeds, the mean over seeds of the cross-validated score, the percentile
    interval of that mean over the resamples, and the layer cross-validation chose most often."""
    if "cv_boot" not in df.columns:
        return pl.DataFrame(schema=CV_SCHEMA)
    cv = (df.filter(pl.col("layer_cv") & pl.col("cv_similarity").is_not_null() & pl.col("cv_boot").is_not_null())
          .sort(*PANEL, "rule", "control", "seed"))
    rows = []
    for key, g in cv.group_by(*PANEL, "rule", "control", maintain_order=True):
        score, boot = brain_pairs.seed_mean(g)
        low, high = percentile_ci(boot, ci)
        layers = g["layer_name"].value_counts().sort("count", "layer_name", descending=[True, False])
        rows.append(dict(zip((*PANEL, "rule", "control"), key)) | {
            "cv_seeds": g.height, "cv_similarity": score, "cv_ci_low": float(low), "cv_ci_high": float(high),
            "cv_layer": layers["layer_name"][0]})
    return pl.DataFrame(rows, schema=CV_SCHEMA)


def _collapse_controls(table: pl.DataFrame) -> pl.DataFrame:
    """Rule rows as they are; rows of one control with the same seeds and values (to 1e-9) as one row,
    named after the control, with the rules it stands for when not all of the panel's."""
    rules_of = {k: set(g["rule"]) for k, g in table.group_by(*PANEL)}
    out, groups = [], {}
    for r in table.sort(*PANEL, "control", "rule").iter_rows(named=True):
        if r["control"] == "none":
            out.append(r | {"network": r["rule"], "from_rules": r["rule"]})
            continue
        sig = (*(r[k] for k in PANEL), r["control"], r["seeds"],
               *(None if r[v] is None else round(r[v], 9) for v in VALUES))
        groups.setdefault(sig, []).append(r)
    for members in groups.values():
        first, rules = members[0], [m["rule"] for m in members]
        everyone = set(rules) == rules_of[tuple(first[k] for k in PANEL)]
        out.append(first | {"network": first["control"] if everyone else f"{first['control']} ({', '.join(rules)})",
                            "from_rules": ",".join(rules)})
    return pl.DataFrame(out)


def network_table(df: pl.DataFrame, best: pl.DataFrame, panels: list[tuple[str, str]]) -> pl.DataFrame:
    """The ``brain_cv`` table: per panel one row per rule and one per distinct control, sorted by the
    cross-validated score (in-sample best layer where there is none). ``seeds`` counts the seeds of the
    in-sample best layer, ``cv_seeds`` those of the cross-validated score (fewer where a seed has none).
    ``best``: brain_summary's tables of the ``panels`` (target, method), with target and method columns."""
    best = best.rename({"similarity": "best_layer_similarity", "ci_low": "best_layer_ci_low",
                        "ci_high": "best_layer_ci_high"})
    table = best.join(cv_scores(df), on=[*PANEL, "rule", "control"], how="left")
    table = _collapse_controls(table)
    order = pl.DataFrame({"target": [t for t, _ in panels], "method": [m for _, m in panels],
                          "panel_order": list(range(len(panels)))})
    table = table.join(order, on=["target", "method"], how="left").with_columns(
        in_domain=pl.col("dataset").is_in(list(brain_pairs.NATURAL_DATASETS)))
    table = table.sort("panel_order", "arch", "dataset", "cv_similarity", "best_layer_similarity", "network",
                       descending=[False, False, False, True, True, False], nulls_last=True)
    return table.select(*PANEL, "in_domain", "network", "control", "from_rules", "seeds", "cv_seeds",
                        "cv_similarity", "cv_ci_low", "cv_ci_high", "cv_layer", "best_layer_similarity",
                        "best_layer_ci_low", "best_layer_ci_high", "best_layer", "noise_ceiling_low",
                        "noise_ceiling_high")


# --- paired differences ---------------------------------------------------------------------------------
PAIR_COLUMNS = ("arch", "dataset", "target", "method", "family", "a", "b", "score_a", "score_b", "diff", "ci_low",
                "ci_high", "p", "n_boot", "p_holm", "resolved")


def family_counts(pairs: pl.DataFrame) -> pl.DataFrame:
    """The ``brain_pairs_summary`` table: pairs, pairs tested (with a p-value: Holm counts only those) and
    pairs resolved after Holm per panel and family, and p_holm_floor, the smallest Holm-corrected p the
    family can reach: a bootstrap p is at least 2 / (resamples + 1), and Holm multiplies the smallest by the
    number of pairs tested. At or above 0.05 no pair of the family can be resolved, whatever the data, until
    the brain step draws more resamples."""
    return (pairs.group_by(*PANEL, "family")
            .agg(pl.len().alias("pairs"), pl.col("p").is_finite().sum().alias("tested"),
                 pl.col("resolved").sum().alias("resolved"), pl.col("n_boot").max())
            .with_columns(p_holm_floor=(pl.col("tested") * 2 / (pl.col("n_boot") + 1)).clip(upper_bound=1.0))
            .sort(*PANEL, "family"))


def _oriented(pairs: dict[tuple[str, str], dict], top: str, other: str) -> dict | None:
    """The pair (top, other) as top - other, whichever way round the table holds it."""
    if (top, other) in pairs:
        return pairs[(top, other)]
    r = pairs.get((other, top))
    return None if r is None else r | {"diff": -r["diff"], "ci_low": -r["ci_high"], "ci_high": -r["ci_low"]}


def top_rule_table(networks: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """The ``brain_top_rule`` table: per panel with pairs, the rule of highest cross-validated score
    against bp, its untrained network, pixels, the best model RDM (when the pairs hold them) and the next
    rule, plus how many other rules it is resolved from."""
    rows = []
    for key, sub in pairs.sort(*PANEL).group_by(*PANEL, maintain_order=True):
        rules = networks.filter(*(pl.col(k) == v for k, v in zip(PANEL, key)), pl.col("control") == "none",
                                pl.col("cv_similarity").is_not_null())
        if not rules.height:
            continue
        top, nxt = rules.row(0, named=True), rules["network"][1] if rules.height > 1 else None
        by = {(r["a"], r["b"]): r for r in sub.iter_rows(named=True)}
        vs_rules = sub.filter((pl.col("family") == "rules") & ((pl.col("a") == top["network"])
                                                               | (pl.col("b") == top["network"])))
        models = sub.filter((pl.col("a") == top["network"]) & pl.col("b").str.starts_with("model:"))
        best_model = models.sort("score_b", "b", descending=[True, False])["b"][0] if models.height else None
        for versus, name in (("bp", "bp"), ("untrained", f"{top['network']}/untrained"), ("pixels", "pixels"),
                             ("best model RDM", best_model), ("next rule", nxt)):
            skip = not name or name == top["network"] or (versus == "next rule" and name == "bp")
            r = None if skip else _oriented(by, top["network"], name)
            if r is not None:
                rows.append(dict(zip(PANEL, key)) | {
                    "in_domain": top["in_domain"], "top_rule": top["network"], "top_score": top["cv_similarity"], "top_ci_low": top["cv_ci_low"],
                    "top_ci_high": top["cv_ci_high"], "versus": versus, "other": name, "other_score": r["score_b"]
                    if r["a"] == top["network"] else r["score_a"], "diff": r["diff"], "ci_low": r["ci_low"],
                    "ci_high": r["ci_high"], "p": r["p"], "p_holm": r["p_holm"], "resolved": r["resolved"],
                    "rules_resolved_from": int(vs_rules["resolved"].sum()), "other_rules": vs_rules.height})
    return pl.DataFrame(rows)
