"""The report's plausibility criteria: measured per rule x cell (the sweep's ``criteria`` table), declared beside.

:func:`criteria_table` reads ``SWEEP/criteria`` (written by the sweep's criteria step or ``bioplaus criteria
out=SWEEP``): per rule x cell x criterion the measured value, threshold, bp's value on the same network, the
verdict, the declared claim, whether they agree and how the verdict is established (the generic probe, or the
claim's own test where the probe cannot see it). A folder without that table (a sweep from before the step)
gives the declared claims alone, with a note. :func:`criteria_section` shows one row per rule x cell and flags
every disagreement.
"""

from __future__ import annotations

import math

import polars as pl

from bioplaus.analysis.load import SweepData, scan_table
from bioplaus.analysis.report_format import Cell, Section, short_test
from bioplaus.orchestrator.errors import one_line

SCHEMA = {"rule": pl.String, "arch": pl.String, "dataset": pl.String, "criterion": pl.String, "value": pl.Float64,
          "threshold": pl.Float64, "bp_value": pl.Float64, "holds": pl.Boolean, "declared": pl.Boolean,
          "agree": pl.Boolean, "established_by": pl.String, "method": pl.String, "why": pl.String,
          "criterion_text": pl.String, "summary": pl.String}
ORDER = ("C1", "C1_within", "C1_head", "C2", "C3", "C4", "C5")


def _declared_only(registry, rules: list[str]) -> pl.DataFrame:
    from bioplaus.algorithms.rule import CRITERIA

    rows = []
    for rule in rules:
        cls = registry.get(rule)
        for code, claim in sorted(cls.criteria.items()) if cls is not None else []:
            rows.append({"rule": rule, "criterion": code, "declared": bool(claim.holds), "why": claim.why,
                         "established_by": f"declared only (test {claim.test})", "criterion_text": CRITERIA.get(code),
                         "summary": cls.summary})
    return pl.DataFrame(rows, schema=SCHEMA)


def criteria_table(d: SweepData, rules: list[str]) -> tuple[pl.DataFrame, str | None]:
    """(the measured criteria of the sweep's rules, with their declared claims; a note line or None)."""
    try:
        from bioplaus.algorithms.registry import load_rules

        registry = load_rules()
    except Exception as e:  # noqa: BLE001  (a rule module being edited must not take the whole report down)
        registry, note = {}, f"rule registry could not be loaded: {one_line(e)}"
    else:
        note = None
    lf = scan_table(d.dir / "criteria")
    if lf is None:
        return _declared_only(registry, rules), note or (
            "this sweep folder has no criteria table: the criteria below are as declared, not measured (run "
            f"`bioplaus criteria out={d.dir}` to measure them at the rules' defaults)")
    summaries = pl.DataFrame({"rule": list(registry), "summary": [c.summary for c in registry.values()]},
                             schema={"rule": pl.String, "summary": pl.String})
    table = (lf.filter(pl.col("rule").is_in(rules)).collect().join(summaries, on="rule", how="left")
             .select([pl.col(c).cast(t) if c in SCHEMA else pl.col(c) for c, t in SCHEMA.items()]))
    return table, note


def _mark(holds) -> str:
    return "—" if holds is None else "✓" if holds else "✗"


def _value(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2g}"


def _cell(r: dict | None) -> Cell:
    if r is None:
        return Cell("—", "not measured for this cell and not declared")
    by_probe = r["established_by"] == "probe"
    if by_probe:
        text = f"{_mark(r['holds'])} {_value(r['value'])}".strip()
        if r["agree"] is False:
            text = f"**{text} ⚠ declared {_mark(r['declared'])}**"
    elif r["declared"] is not None:
        text = f"{_mark(r['declared'])} (test)"
    else:
        text = "—"
    tip = (f"measured {_value(r['value']) or 'n/a'} (threshold {_value(r['threshold']) or '—'}; bp "
           f"{_value(r['bp_value']) or 'n/a'}): {r['method'] or '—'}. Declared: {_mark(r['declared'])}"
           f"{' — ' + r['why'] if r['why'] else ''}. Established by: {r['established_by']}")
    return Cell(text, tip)


def criteria_section(crit: pl.DataFrame, rules: list[str], error: str | None) -> Section:
    codes = [c for c in ORDER if c in set(crit["criterion"].drop_nulls())] + sorted(
        set(crit["criterion"].drop_nulls()) - set(ORDER))
    lookup = {(r["rule"], r["arch"], r["dataset"], r["criterion"]): r for r in crit.iter_rows(named=True)}
    summaries = {r["rule"]: r["summary"] for r in crit.iter_rows(named=True)}
    declared = {}
    for r in crit.filter(pl.col("declared").is_not_null()).iter_rows(named=True):
        declared.setdefault(r["rule"], {})[r["criterion"]] = _mark(r["declared"])
    rows = []
    for rule in rules:
        cells = sorted({(a, x) for (ru, a, x, _) in lookup if ru == rule}, key=lambda c: (c[0] is None, c))
        claims = " ".join(f"{c}{m}" for c, m in sorted(declared.get(rule, {}).items())) or "—"
        for arch, dataset in cells or [(None, None)]:
            where = "declared only" if arch is None else f"{arch} · {dataset}"
            rows.append([Cell(rule, summaries.get(rule)), where,
                         *[_cell(lookup.get((rule, arch, dataset, code))) for code in codes], claims])
    texts = {r["criterion"]: r["criterion_text"] for r in crit.iter_rows(named=True)}
    wrong = crit.filter(pl.col("agree") == False)  # noqa: E712  (polars expression, not a Python comparison)
    notes = ["Measured on each cell's architecture at tiny widths, one batch of its dataset, at the settings its "
             "finals ran with (bioplaus.algorithms.criteria): ✓ holds, ✗ fails, with the measured value (C1*: the "
             "largest relative change of an update; C2: boundaries crossed; C3: passes; C4: label-dependent "
             "blocks); the rule's declared claims in the last column, ⚠ where they disagree with the measurement. "
             "\"(test)\": the probe cannot see this claim, so the rule's own test establishes the "
             "declared verdict. Hover a cell for the threshold, bp's value on the same network, the method and "
             "the declared reason; all of it is in tables/criteria.parquet.",
             *[f"{c}: {texts.get(c)}" for c in codes]]
    if wrong.height:
        notes.insert(0, f"**{wrong.height} declared claim(s) disagree with the measurement** (⚠ below): "
                        + "; ".join(f"{r['rule']} {r['criterion']} on {r['arch']}"
                                    for r in wrong.iter_rows(named=True)))
    if error:
        notes.insert(0, f"**{error}**")
    details = [("What each rule does", ["rule", "summary"], [[r, summaries.get(r) or "—"] for r in rules]),
               ("Every measurement", ["rule", "cell", "criterion", "value", "threshold", "bp", "holds", "declared",
                                      "established by"],
                [[r["rule"], f"{r['arch']} · {r['dataset']}", r["criterion"], _value(r["value"]),
                  _value(r["threshold"]), _value(r["bp_value"]), _mark(r["holds"]), _mark(r["declared"]),
                  short_test(r["established_by"]) if r["established_by"] != "probe" else "probe"]
                 for r in crit.iter_rows(named=True)])]
    return Section("Plausibility criteria", header=["rule", "cell", *codes, "declared"], rows=rows, notes=notes,
                   details=details, css_class="criteria")
