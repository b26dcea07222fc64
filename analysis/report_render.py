"""Drawing the report's sections: one self-contained HTML page and a Markdown file.

The HTML page inlines its CSS, any PNG figure as a data URI, and plotly.js (once, so the interactive figures
work offline) with the figures' data, both gzip-compressed (:mod:`bioplaus.analysis.report_embed`). Once
every figure has drawn, a script marks the page with how many did and shows a banner naming any that did
not: a reader sees a broken report at once, and the browser test reads the marks.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from bioplaus.analysis.report_embed import figure_div, page_scripts
from bioplaus.analysis.report_format import Section, html_table, html_text, md_table

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.86rem;max-width:100%}
th,td{border:1px solid #d6d6d6;padding:.25rem .5rem;vertical-align:top;text-align:left}
td{overflow-wrap:anywhere}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
td[title]{cursor:help}strong{color:#8b0000}
.meta td:first-child{font-weight:600;white-space:nowrap}
.note{color:#555;font-size:.84rem;margin:.25rem 0}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
.figure{width:100%;margin:.6rem 0;border:1px solid #eee}
.pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:.6rem}
.pair .figure{margin:0;min-width:0}
.warning{background:#fff3cd;border:1px solid #e0c060;padding:.5rem .8rem}
#broken-figures{display:none;background:#f8d7da;border:1px solid #d08080;padding:.5rem .8rem}
table.criteria td{font-size:.8rem}
details{margin:.5rem 0}summary{cursor:pointer;color:#333}
"""

def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _image(alt: str, png: Path, out: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f"<div class='figure' data-figure='image' title='{html.escape(alt)}'>"
            f"<a href='{html.escape(png.relative_to(out).as_posix())}'><img alt='{html.escape(alt)}' "
            f"src='data:image/png;base64,{data}'></a></div>")


def _plots_html(s: Section, figure_lines: list[str]) -> list[str]:
    """The section's figure boxes; each figure's JSON goes onto ``figure_lines``, packed at the page's end
    (its position there numbers its box)."""
    divs = []
    for f in s.plots:
        box, line = figure_div(f.plot, f"figure-{len(figure_lines)}")
        figure_lines.append(line)
        divs.append(f"<div class='figure' data-figure='plotly' title='{html.escape(f.title)}'>{box}</div>")
    return [f"<div class='pair'>{''.join(divs)}</div>"] if len(divs) > 1 and s.side_by_side else divs


def _section_html(s: Section, out: Path, figure_lines: list[str]) -> list[str]:
    parts = [f"<h2 id='{slug(s.title)}'>{html.escape(s.title)}</h2>"]
    if s.intro:
        parts.append(f"<p>{html_text(s.intro)}</p>")
    if s.header:
        parts.append(html_table(s.header, s.rows, s.css_class) if s.rows else "<p class='note'>(no rows)</p>")
    parts += [f"<p class='note'>{html_text(n)}</p>" for n in s.notes]
    for summary, header, rows in s.details:
        if rows:
            parts.append(f"<details><summary>{html.escape(summary)}</summary>{html_table(header, rows)}</details>")
    parts += _plots_html(s, figure_lines)
    parts += [_image(alt, png, out) for alt, png in s.figures]
    return parts


def render_html(title: str, meta: list[tuple[str, str]], notes: list[str], sections: list[Section], out: Path) -> str:
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
              f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
              f"<style>{_CSS}</style></head><body>"),
             f"<h1>{html.escape(title)}</h1>", "<div id='broken-figures'></div>",
             "<table class='meta'>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                              for k, v in meta) + "</table>"]
    parts += [f"<p class='warning'>{html_text(n)}</p>" for n in notes]
    parts.append("<p>" + " · ".join(f"<a href='#{slug(s.title)}'>{html.escape(s.title)}</a>" for s in sections)
                 + "</p>")
    figure_lines: list[str] = []
    for s in sections:
        parts += _section_html(s, out, figure_lines)
    parts.append(f"{page_scripts(figure_lines)}</body></html>")
    return "\n".join(parts)


def render_markdown(title: str, meta: list[tuple[str, str]], notes: list[str], sections: list[Section],
                    out: Path) -> str:
    parts = [f"# {title}", "", *(f"- **{k}**: {v}" for k, v in meta), ""]
    parts += [f"> {n}\n" for n in notes]
    for s in sections:
        parts += [f"## {s.title}", ""]
        if s.intro:
            parts += [s.intro, ""]
        if s.header:
            parts += [md_table(s.header, s.rows) if s.rows else "(no rows)", ""]
        parts += [*(f"{n}\n" for n in s.notes)]
        for summary, header, rows in s.details:
            if rows:
                parts += [f"<details><summary>{summary}</summary>", "", md_table(header, rows), "", "</details>", ""]
        parts += [f"![{f.title}]({f.png.relative_to(out).as_posix()})\n" for f in s.plots if f.png is not None]
        html_only = [f.title for f in s.plots if f.png is None]
        if html_only:
            parts.append(f"({len(html_only)} interactive figure(s) in index.html: {'; '.join(html_only)})\n")
        parts += [f"![{alt}]({png.relative_to(out).as_posix()})\n" for alt, png in s.figures]
    return "\n".join(parts)
