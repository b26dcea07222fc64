"""The report's building blocks: a table cell, a section, number formatting, and tables as Markdown and HTML.

A :class:`Section` is what both renderers (:mod:`bioplaus.analysis.report_render`) draw: a title, a table,
notes, folded detail tables, static figures (PNG, for the Markdown report and for figures only drawn as
images) and interactive figures (plotly, for the HTML report).
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Cell:
    """A table cell: its text (``**x**`` = emphasis) and an optional tooltip (HTML only)."""

    text: str
    title: str | None = None


@dataclass
class Figure:
    """One interactive figure: its title, the plotly figure, and the PNG drawn for the Markdown report
    (None: the Markdown report says the figure is in the HTML report only)."""

    title: str
    plot: object
    png: Path | None = None


@dataclass
class Section:
    title: str
    intro: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (alt, PNG): drawn as images in both reports
    plots: list[Figure] = field(default_factory=list)  # interactive in HTML, their PNG (if any) in Markdown
    details: list[tuple[str, list[str], list[list]]] = field(default_factory=list)  # (summary, header, rows), folded
    css_class: str = ""
    side_by_side: bool = False  # interactive figures two to a row (HTML)


# --- formatting ---------------------------------------------------------------------------------------
def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt(x, digits: int = 3, signed: bool = False) -> str:
    if _missing(x):
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_big(x) -> str:
    return "—" if _missing(x) else f"{x:,.0f}"


def fmt_hp(hp_json: str | None) -> str:
    if not hp_json:
        return "—"
    try:
        hp = json.loads(hp_json)
    except ValueError:
        return hp_json
    items = (f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(hp.items()))
    return ", ".join(items) or "defaults"


def short_test(node_id: str | None) -> str:
    return (node_id or "—").split("::")[-1]


def text_of(v) -> str:
    return v.text if isinstance(v, Cell) else str(v)


def frame_rows(df) -> list[list[str]]:
    """Any Polars table as display strings (floats to 3 decimals)."""
    return [[fmt(v) if isinstance(v, float) else "—" if v is None else str(v) for v in row] for row in df.iter_rows()]


# --- tables -----------------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    body = [[esc(text_of(v)) for v in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def html_text(s: str, breaks: bool = False) -> str:
    """``s`` as HTML: ``**x**`` bold, newlines kept; ``breaks``: long identifiers may wrap after _ and ["""
    out = html.escape(s)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    if breaks:
        out = re.sub(r"([_[])", r"\1<wbr>", out)
    return out.replace("\n", "<br>")


def html_table(header: list[str], rows: list[list], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r in rows:
        tds = []
        for v in r:
            title = f' title="{html.escape(v.title)}"' if isinstance(v, Cell) and v.title else ""
            tds.append(f"<td{title}>{html_text(text_of(v), breaks=True)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    cls = f' class="{css_class}"' if css_class else ""
    return f'<table{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
