"""The HTML report's interactive figures (plotly): accuracy heatmap, accuracy vs cost, learning curves.

Each function returns a ``plotly.graph_objects.Figure``; the report embeds them in one self-contained
HTML file with plotly.js inlined once (compressed: :mod:`bioplaus.analysis.report_embed`), so it opens
offline. The static PNGs of the Markdown report
(:mod:`bioplaus.analysis.plots`) draw the same data with the same choices: CIs clipped to [0, 1],
labels spread so they do not collide, colour scaled per dataset.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import polars as pl
from matplotlib.colors import to_hex
from plotly.subplots import make_subplots

from bioplaus.analysis import plots
from bioplaus.analysis.plots import cell_label

PANEL_PX = 300  # height of one panel row
LABEL_GAP = 0.09  # minimum vertical distance of two point labels, as a fraction of the panel height


def _empty_note(fig, row: int, col: int, text: str) -> None:
    """A note in the middle of a panel with nothing to draw (placed on the page: an empty axis has no range)."""
    sub = fig.get_subplot(row, col)
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=sum(sub.xaxis.domain) / 2,
                       y=sum(sub.yaxis.domain) / 2, font=dict(color="#888"))


def _panel_height_px(fig, row: int, col: int) -> float:
    """Height of a panel's plotting area in pixels: label offsets are given in pixels."""
    domain = fig.get_subplot(row, col).yaxis.domain
    return (fig.layout.height - fig.layout.margin.t - fig.layout.margin.b) * (domain[1] - domain[0])


def _hex(colors: dict, rule: str) -> str:
    return to_hex(colors.get(rule, (0.5, 0.5, 0.5)))


def _grid(cells: list[tuple[str, str]], n_rules: int, ncols: int = 3):
    ncols = max(1, min(ncols, len(cells)))
    nrows = max(1, math.ceil(len(cells) / ncols))
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[cell_label(a, d) for a, d in cells],
                        vertical_spacing=min(0.3 / nrows, 0.12), horizontal_spacing=0.07)
    # The legend beside the panels, not above them: a row of many rules would run over the titles.
    panel = max(PANEL_PX, 26 * n_rules // nrows)  # room for one legend line per rule
    fig.update_layout(height=110 + panel * nrows, margin=dict(l=50, r=20, t=80, b=40),
                      legend=dict(font=dict(size=11), tracegroupgap=0))
    return fig, [(i // ncols + 1, i % ncols + 1) for i in range(len(cells))]


# --- accuracy heatmap -------------------------------------------------------------------------------
def accuracy_heatmap(main: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]]) -> go.Figure:
    """Rules x cells, one panel per dataset with its own colour scale (datasets differ in difficulty)."""
    lookup = {(r["rule"], r["arch"], r["dataset"]): r for r in main.iter_rows(named=True)}
    datasets = list(dict.fromkeys(d for _, d in cells))
    widths = [sum(1 for _, d in cells if d == x) for x in datasets]
    fig = make_subplots(rows=1, cols=len(datasets), subplot_titles=datasets, shared_yaxes=True,
                        column_widths=widths, horizontal_spacing=0.03)
    for col, dataset in enumerate(datasets, start=1):
        archs = [a for a, d in cells if d == dataset]
        z, text, hover = [], [], []
        for rule in rules:
            zr, tr, hr = [], [], []
            for arch in archs:
                r = lookup.get((rule, arch, dataset))
                value, label, tip = plots.heatmap_cell(r)
                zr.append(value)
                tr.append(f"<b>{label}</b>" if r and r["best"] else label)
                hr.append(tip)
            z.append(zr), text.append(tr), hover.append(hr)
        finite = [v for row in z for v in row if v is not None]
        lo, hi = plots.colour_range(finite)
        fig.add_trace(go.Heatmap(z=z, x=archs, y=rules, text=text, texttemplate="%{text}", zmin=lo, zmax=hi,
                                 colorscale="Viridis", showscale=False, customdata=hover,
                                 hovertemplate="%{y} on " + dataset + " / %{x}<br>%{customdata}<extra></extra>",
                                 xgap=2, ygap=2), row=1, col=col)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_layout(height=140 + 38 * len(rules), margin=dict(l=90, r=20, t=60, b=40),
                      title=dict(text="Final test accuracy (mean ± 95 % CI half-width; bold = best of cell; "
                                      "colour scaled within each dataset)", font=dict(size=13)))
    return fig


# --- accuracy vs cost -----------------------------------------------------------------------------------
def accuracy_vs_cost(main: pl.DataFrame, cost: pl.DataFrame, cells: list[tuple[str, str]],
                     colors: dict) -> go.Figure:
    """Per cell: test accuracy with its 95 % CI (clipped to [0, 1]) against throughput; the Pareto front."""
    fig, where = _grid(cells, main["rule"].n_unique() + 1)
    shown: set[str] = set()
    for (arch, dataset), (row, col) in zip(cells, where):
        points = plots.cost_points(main, cost, arch, dataset)
        if not points:
            _empty_note(fig, row, col, "no final results")
            continue
        lo, hi = plots.accuracy_range(points)
        panel_px = _panel_height_px(fig, row, col)
        for p, label_y in zip(points, plots.label_positions(points, lo, hi, LABEL_GAP)):
            c = _hex(colors, p["rule"])
            fig.add_trace(go.Scatter(
                x=[p["speed"]], y=[p["acc"]], mode="markers", marker=dict(size=9, color=c), name=p["rule"],
                legendgroup=p["rule"], showlegend=p["rule"] not in shown,
                error_y=dict(type="data", symmetric=False, array=[p["ci_high"] - p["acc"]],
                             arrayminus=[p["acc"] - p["ci_low"]], color=c),
                hovertemplate=(f"{p['rule']}: %{{y:.4f}} (95 % CI {p['ci_low']:.4f}–{p['ci_high']:.4f})<br>"
                               "%{x:,.0f} samples/s<extra></extra>")), row=row, col=col)
            shown.add(p["rule"])
            fig.add_annotation(x=math.log10(p["speed"]), y=p["acc"], text=p["rule"], font=dict(size=10, color=c),
                               ax=24, ay=-(label_y - p["acc"]) / (hi - lo) * panel_px,
                               xanchor="left", arrowwidth=0.7, arrowcolor=c, row=row, col=col)
        front = plots.pareto_front([(p["speed"], p["acc"], p["rule"]) for p in points])
        fig.add_trace(go.Scatter(x=[f[0] for f in front], y=[f[1] for f in front], mode="lines+markers",
                                 line=dict(color="crimson", dash="dash", shape="hv", width=1.2),
                                 marker=dict(size=15, color="rgba(0,0,0,0)", line=dict(color="crimson", width=1.3)),
                                 name="Pareto front", legendgroup="front", showlegend="front" not in shown,
                                 hoverinfo="skip"), row=row, col=col)
        shown.add("front")
        fig.update_yaxes(range=[lo, hi], title_text="test accuracy", row=row, col=col)
        speeds = [p["speed"] for p in points]
        fig.update_xaxes(type="log", range=[math.log10(min(speeds) / 1.4), math.log10(max(speeds) * 2.2)],
                         dtick="D2", title_text="training samples / s (log)", row=row, col=col)
    fig.update_layout(title=dict(text="Accuracy vs cost: up and right is better; circled points are not dominated",
                                 font=dict(size=13)))
    return fig


# --- learning curves --------------------------------------------------------------------------------------
def learning_curves(curves: pl.DataFrame, cells: list[tuple[str, str]], rules: list[str],
                    colors: dict) -> go.Figure:
    """Per cell: validation accuracy per epoch, the final runs' mean (band: min–max over seeds) and the
    selected tuning trial (dashed). ``curves`` is :func:`bioplaus.analysis.plots.curve_table`'s."""
    fig, where = _grid(cells, len(rules))
    shown: set[str] = set()
    for (arch, dataset), (row, col) in zip(cells, where):
        mine = curves.filter((pl.col("arch") == arch) & (pl.col("dataset") == dataset))
        if not mine.height:
            _empty_note(fig, row, col, "no epochs recorded")
        for rule in rules:
            c = _hex(colors, rule)
            for kind, dash in (("final", "solid"), ("best trial", "dash")):
                k = mine.filter((pl.col("rule") == rule) & (pl.col("kind") == kind)).sort("epoch")
                if not k.height:
                    continue
                x = k["epoch"].to_list()
                if kind == "final" and k["n"].max() > 1:
                    fig.add_trace(go.Scatter(x=x + x[::-1], y=k["hi"].to_list() + k["lo"].to_list()[::-1],
                                             fill="toself", fillcolor=c, opacity=0.15, line=dict(width=0),
                                             hoverinfo="skip", showlegend=False, legendgroup=rule),
                                  row=row, col=col)
                fig.add_trace(go.Scatter(x=x, y=k["mean"].to_list(), mode="lines+markers", name=rule,
                                         line=dict(color=c, dash=dash), marker=dict(size=5), legendgroup=rule,
                                         showlegend=rule not in shown,
                                         hovertemplate=f"{rule} ({kind}) epoch %{{x}}: %{{y:.4f}}<extra></extra>"),
                              row=row, col=col)
                shown.add(rule)
        fig.update_xaxes(title_text="epoch", dtick=1, row=row, col=col)
        fig.update_yaxes(title_text="validation accuracy", row=row, col=col)
    fig.update_layout(title=dict(text="Learning curves: final runs (solid, band = min–max over seeds) and each "
                                      "cell's selected tuning trial (dashed)", font=dict(size=13)))
    return fig
