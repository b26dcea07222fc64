"""The report's brain-similarity sections, from the sweep's ``brain`` and ``brain_pairs`` tables.

"Brain similarity": every rule's cross-validated score with its CI and the noise ceiling, the controls once
per cell, the in-sample best layer beside it (:mod:`bioplaus.analysis.brain_tables`), and the figures.
"Brain similarity: paired differences": whether the rule closest to IT is resolved from bp, from the
controls and from the other rules, in a sentence per cell and a table. A brain table of another shape gets
the generic best-layer view of :mod:`bioplaus.analysis.tables`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from bioplaus.analysis import brain_pairs, plots, tables
from bioplaus.analysis.brain_tables import PAIR_COLUMNS, PANEL, family_counts, network_table, shown_panels, \
    top_rule_table
from bioplaus.analysis.load import SweepData, scan_table
from bioplaus.analysis.report_format import Section, fmt, frame_rows
from bioplaus.orchestrator.errors import one_line

GENERIC_NOTE = ("Similarity of each network's most brain-like layer with the target's representational dissimilarity "
                "matrix (ci_low/ci_high: 95 % bootstrap CI over stimuli), chosen on the data it is scored on "
                "(selection-biased upwards); the noise ceiling bounds what any model could reach given the brain "
                "data's noise. Every layer's value is in the sweep's brain/ table; this summary is in "
                "tables/brain_best.parquet.")
CONTROLS_NOTE = ("Controls, once per cell: untrained = the same architecture at initialisation, built with each final "
                 "run's seed (the weights those runs started from, for rules that keep the architecture's "
                 "initialisation; the same network for a seed whichever rule trained it); pixels = the 92 images as fed to the network (resized, standardised). A control whose values "
                 "differ between rules gets a row per group of rules, named in brackets.")
IN_SAMPLE_NOTE = ("In-sample best layer: the layer of highest similarity on all 92 stimuli, chosen on the data it is "
                  "scored on, so optimistic (selection-biased upwards, more for networks with more layers; pixels "
                  "have one); shown to compare with the cross-validated score, not to rank networks. Noise ceiling: "
                  "lower – upper bound of what any model could reach given the subjects' disagreement.")


def _cell(r: dict) -> str:
    return plots.cell_label(r["arch"], r["dataset"]) + ("" if r["in_domain"] else " (out of domain)")


def _ci(low, high) -> str:
    return "—" if low is None else f"[{fmt(low)}, {fmt(high)}]"


def _ceiling(r: dict) -> str:
    return "—" if r["noise_ceiling_low"] is None else f"{fmt(r['noise_ceiling_low'])} – {fmt(r['noise_ceiling_high'])}"


def _network(r: dict, top: set) -> str:
    if r["control"] != "none":
        return f"control: {r['network']}"
    return f"**{r['network']}**" if (*(r[k] for k in PANEL), r["network"]) in top else r["network"]


def _cv_seeds(r: dict) -> str:
    """The seeds the CV score averages, and the in-sample best layer's when a seed has no CV score."""
    cv_seeds = r["cv_seeds"] or 0
    return str(r["seeds"]) if cv_seeds == r["seeds"] else f"{cv_seeds} of {r['seeds']}"


def _cv_rows(cv: pl.DataFrame) -> list[list[str]]:
    scored_rules = cv.filter((pl.col("control") == "none") & pl.col("cv_similarity").is_not_null())
    tops = {(*(r[k] for k in PANEL), r["network"])
            for r in scored_rules.group_by(*PANEL, maintain_order=True).first().iter_rows(named=True)}
    return [[r["target"], r["method"], _cell(r), _network(r, tops), _cv_seeds(r), fmt(r["cv_similarity"]),
             _ci(r["cv_ci_low"], r["cv_ci_high"]), r["cv_layer"] or "—", _ceiling(r),
             f"{fmt(r['best_layer_similarity'])} ({r['best_layer']})"] for r in cv.iter_rows(named=True)]


def _in_sample_rows(t: pl.DataFrame) -> list[list[str]]:
    return [[r["target"], r["method"], _cell(r), _network(r, set()), str(r["seeds"]), fmt(r["best_layer_similarity"]),
             _ci(r["best_layer_ci_low"], r["best_layer_ci_high"]), r["best_layer"], _ceiling(r)]
            for r in t.iter_rows(named=True)]


CV_HEADER = ["target", "method", "cell", "network", "seeds", "CV score", "95 % CI", "CV layer", "noise ceiling",
             "in-sample best layer (selection-biased)"]
IN_SAMPLE_HEADER = ["target", "method", "cell", "network", "seeds", "in-sample best layer (selection-biased)",
                    "95 % CI (stimuli)", "layer", "noise ceiling"]


def _model_rdm_rows(d: SweepData) -> list[list[str]]:
    """The 92-image model RDMs (animacy, HMAX, ...) the brain step scored on the same resamples (brain_scores)."""
    lf = scan_table(d.dir / "brain_scores")
    if lf is None:
        return []
    m = lf.filter(pl.col("kind") == "model").collect()
    if not m.height:
        return []
    m = m.sort("target", "method", "entity", "arch", "dataset").unique(["target", "method", "entity"], keep="first",
                                                                        maintain_order=True)
    return [[r["target"], r["method"], r["entity"].removeprefix("model:"), fmt(r["score"]), _ci(r["ci_low"], r["ci_high"])]
            for r in m.sort("target", "method", "score", "entity", descending=[False, False, True, False])
            .iter_rows(named=True)]


def network_section(d: SweepData, df: pl.DataFrame, networks: pl.DataFrame, figures: list) -> Section:
    # a target with CV scores keeps all its networks in the CV table, those without one included
    has_cv = pl.col("cv_similarity").is_not_null().any().over("target", "method")
    cv, in_sample = networks.filter(has_cv), networks.filter(~has_cv)
    resamples = sorted(set(df["n_boot_dual"].drop_nulls())) if "n_boot_dual" in df.columns else []
    notes = [("CV score: each network's layer chosen on half of the stimuli and scored on the other half (the "
              "brain step's cross-validated best layer, layer_cv), mean over the network's seeds (seeds k of n: only k "
              "of its n seeds have one); 95 % CI: "
              f"percentile interval of that mean over {'/'.join(map(str, resamples)) or 'the'} resamples of stimuli "
              "and subjects. Sorted by CV score; **bold** = the top rule of its cell."), CONTROLS_NOTE, IN_SAMPLE_NOTE,
             ("tables/brain_cv.parquet holds these rows (from_rules: the rules a control row stands for); "
              "tables/brain_best.parquet the in-sample best layer per rule and control; the sweep's brain/ table "
              "every layer.")]
    section = Section("Brain similarity", figures=figures)
    if cv.height:
        section.header, section.rows = CV_HEADER, _cv_rows(cv)
        if in_sample.height:
            section.details.append(("Targets without cross-validated scores: in-sample best layer only",
                                    IN_SAMPLE_HEADER, _in_sample_rows(in_sample)))
    else:
        notes.insert(0, "This brain table has no cross-validated scores (the brain step ran with n_boot_dual=0 or "
                        "before it computed them): in-sample best layers only, selection-biased.")
        section.header, section.rows = IN_SAMPLE_HEADER, _in_sample_rows(in_sample)
    model_rows = _model_rdm_rows(d)
    if model_rows:
        section.details.append(("Model RDMs of Kriegeskorte et al. 2008 (no network), cross-validated scores on the "
                                "same resamples (brain_scores/)", ["target", "method", "model RDM", "score", "95 % CI"],
                                model_rows))
    section.notes = notes
    return section


# --- paired differences -------------------------------------------------------------------------------------
def load_pairs(d: SweepData, df: pl.DataFrame) -> tuple[pl.DataFrame | None, str]:
    """The brain step's brain_pairs table, else pairs computed here from the brain table's cv rows; and
    where they came from, in words."""
    lf = scan_table(d.dir / "brain_pairs")
    pairs = lf.collect() if lf is not None else None
    if pairs is not None and pairs.height and set(PAIR_COLUMNS) <= set(pairs.columns):
        return pairs, "the brain step's brain_pairs/brain_pairs.parquet"
    if "cv_boot" in df.columns and df["layer_cv"].any():
        method = df.filter(pl.col("layer_cv"))["method"][0]
        pairs, _ = brain_pairs.pairs_tables(df, method=method)
        if pairs.height:
            return pairs, ("pairs computed by the report from the brain table (the sweep has no brain_pairs/ table; "
                           "`bioplaus brain SWEEP_DIR` writes it, with the model-RDM controls)")
    return None, ""


def stale_pairs(networks: pl.DataFrame, pairs: pl.DataFrame) -> str | None:
    """A note when the pairs' scores are not the brain table's (the brain table rescored after the pairs,
    with other values or with no cross-validated score at all)."""
    sides = pl.concat([pairs.select(*PANEL, network=pl.col(n), score=pl.col(f"score_{n}")) for n in ("a", "b")])
    both = sides.join(networks.select(*PANEL, "network", "cv_similarity"), on=[*PANEL, "network"])
    gap = (both["score"] - both["cv_similarity"]).abs()
    if both.height and (gap.null_count() or gap.max() > 1e-9):
        return ("brain_pairs does not match the brain table's cross-validated scores (rescored since?): rerun "
                "`bioplaus brain SWEEP_DIR` to rewrite it")
    return None


def _said(r: dict) -> str:
    other = {"untrained": "its untrained network",
             "best model RDM": f"the {r['other'].removeprefix('model:')} model RDM"}.get(r["versus"], r["other"])
    return (f"{other} ({fmt(r['diff'], signed=True)} {_ci(r['ci_low'], r['ci_high'])}, "
            f"Holm p {fmt(r['p_holm'])})")


def _listed(items: list[str], word: str) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


def floor_warning(counts: pl.DataFrame) -> str:
    """What "not resolved" means when a family's Holm-corrected p cannot reach 0.05 at this resample count."""
    blocked = counts.filter(pl.col("p_holm_floor") >= 0.05)
    if not blocked.height:
        return ""
    floors = ", ".join(f"{fmt(r['p_holm_floor'])} ({r['family']}, {r['tested']} pairs tested)" for r in blocked.iter_rows(named=True))
    return (f" With {blocked['n_boot'].max()} resamples the smallest Holm-corrected p these families can reach is "
            f"{floors}: no pair of them can be resolved whatever the data, so \"not resolved\" here says the "
            "resamples are too few, not that the networks score alike; `bioplaus brain SWEEP_DIR overwrite=true "
            f"n_boot_dual=N` with N of at least {40 * blocked['tested'].max()} lifts that floor below 0.05.")


def verdict(top: pl.DataFrame, counts: pl.DataFrame) -> str:
    """One plain sentence for one cell: is its top rule resolved from bp, its untrained network, pixels and
    the other rules? ``counts``: the cell's family counts (floor_warning)."""
    first = top.row(0, named=True)
    said = [r for r in top.iter_rows(named=True) if r["versus"] != "next rule"]
    yes = [_said(r) for r in said if r["resolved"]]
    no = [_said(r) for r in said if not r["resolved"]]
    head = (f"{_cell(first)}, {first['target']} ({first['method']}): the top rule is {first['top_rule']}"
            f"{' (the backprop reference itself)' if first['top_rule'] == 'bp' else ''} "
            f"(CV score {fmt(first['top_score'])} {_ci(first['top_ci_low'], first['top_ci_high'])})")
    if yes and no:
        head += f"; it is **resolved** from {_listed(yes, 'and')} but **not resolved** from {_listed(no, 'or')}"
    elif yes:
        head += f"; it is **resolved** from {_listed(yes, 'and')}"
    elif no:
        head += f"; it is **not resolved** from {_listed(no, 'or')}"
    return head + (f"; it is resolved from {first['rules_resolved_from']} of the {first['other_rules']} other rules "
                   "(Holm-corrected p < 0.05).") + floor_warning(counts)


def _tally(counts: pl.DataFrame) -> str:
    parts: dict[str, list[str]] = {}
    for r in counts.iter_rows(named=True):
        cell = f"{plots.cell_label(r['arch'], r['dataset'])} ({r['target']}, {r['method']})"
        parts.setdefault(cell, []).append(f"{r['family']} {r['resolved']} of {r['pairs']}")
    return "; ".join(f"{cell}: {', '.join(found)}" for cell, found in parts.items())


def _versus(r: dict) -> str:
    return {"untrained": "its untrained network", "next rule": f"{r['other']} (next rule)"}.get(r["versus"], r["other"])


TOP_HEADER = ["target", "method", "cell", "top rule", "versus", "score of the other", "difference (top − other)",
              "95 % CI", "p", "p (Holm)", "resolved"]


def pairs_section(networks: pl.DataFrame, pairs: pl.DataFrame, source: str) -> tuple[Section, pl.DataFrame,
                                                                                     pl.DataFrame]:
    """The section, the family counts (brain_pairs_summary) and the top rule's differences (brain_top_rule)."""
    counts = family_counts(pairs)
    top = top_rule_table(networks, pairs)
    sentences = [verdict(g, counts.join(g.select(PANEL).unique(), on=list(PANEL)))
                 for _, g in top.group_by(*PANEL, maintain_order=True)] if top.height else []
    rows = [[r["target"], r["method"], _cell(r), f"{r['top_rule']} {fmt(r['top_score'])}", _versus(r),
             fmt(r["other_score"]), fmt(r["diff"], signed=True), _ci(r["ci_low"], r["ci_high"]), fmt(r["p"]),
             fmt(r["p_holm"]), "yes" if r["resolved"] else "no"] for r in top.iter_rows(named=True)]
    notes = [f"Pairs resolved after Holm's correction, of those compared, per cell and family: {_tally(counts)}.",
             ("Differences of cross-validated scores on the same resamples of stimuli and subjects (from "
              f"{source}); 95 % CI: percentile; p: two-sided bootstrap; Holm's correction within each family (rules: "
              "every pair of rules; controls: each rule against its untrained network, pixels and, in the brain step's "
              "table, the model RDMs); "
              "resolved = Holm-corrected p < 0.05. Tables: tables/brain_pairs_summary.parquet (the counts), "
              "tables/brain_top_rule.parquet (these rows); every pair in the sweep's brain_pairs/ table.")]
    section = Section("Brain similarity: paired differences", intro="\n\n".join(sentences), header=TOP_HEADER,
                      rows=rows, notes=notes)
    return section, counts, top


# --- the report's entry point ---------------------------------------------------------------------------------
def _figures(df: pl.DataFrame, out: Path, panels: list[tuple[str, str]]) -> list[tuple[str, Path]]:
    """One figure per target, by the first method shown for it."""
    from bioplaus.analysis.brain import plot_brain  # the brain step's figure (absent helpers: the generic view)

    method_of: dict[str, str] = {}
    for t, m in panels:
        method_of.setdefault(t, m)
    return [(f"brain similarity vs {t}", plot_brain(df, out / "plots" / f"brain_{t}.png", target=t, method=m))
            for t, m in method_of.items()]


def brain_part(d: SweepData, out: Path, colors: dict) -> tuple[list[Section], dict[str, pl.DataFrame], list[str]]:
    """The brain sections, the tables to save and notes for the top of the report: the brain step's view
    when its helpers run on this table, else a generic best-layer view of whatever the table holds."""
    if d.brain is None:
        return [], {}, []
    df = d.brain.collect()
    try:
        from bioplaus.analysis.brain import brain_summary

        panels = shown_panels(df)
        best = pl.concat([brain_summary(df, target=t, method=m).with_columns(target=pl.lit(t), method=pl.lit(m))
                          for t, m in panels], how="diagonal_relaxed")
        if not best.height:
            raise ValueError("the summary is empty")
        networks = network_table(df, best, panels)
        figures = _figures(df, out, panels)
    except (ImportError, KeyError, ValueError, pl.exceptions.PolarsError) as e:  # helpers missing, or not this table's
        return _generic_part(d, df, out, colors, e)
    saved = {"brain_best": best.select("target", "method", pl.exclude("target", "method")), "brain_cv": networks}
    sections, notes = [network_section(d, df, networks, figures)], []
    pairs, source = load_pairs(d, df)
    if pairs is not None:
        section, counts, top = pairs_section(networks, pairs, source)
        sections.append(section)
        saved |= {"brain_pairs_summary": counts, "brain_top_rule": top}
        notes += [n for n in (stale_pairs(networks, pairs),) if n]
    return sections, saved, notes


def _generic_part(d: SweepData, df: pl.DataFrame, out: Path, colors: dict, e: Exception):
    table, why = tables.brain_table(d)
    if table is None:
        return [], {}, [why] if why else []
    png = plots.brain_figure(table, tables.brain_columns(df), colors, out / "plots" / "brain_similarity.png")
    section = Section("Brain similarity", header=list(table.columns), rows=frame_rows(table), notes=[GENERIC_NOTE],
                      figures=[("brain similarity", png)])
    return [section], {"brain_best": table}, [f"brain section: generic best-layer view ({one_line(e)})"]
