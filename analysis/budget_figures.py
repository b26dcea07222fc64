"""The accuracy-vs-compute Pareto figure, static (matplotlib PNG, for report.md) and interactive (plotly).

Per cell: each rule's final test accuracy with its 95 % t-interval over the final seeds (clipped to [0, 1])
against the training compute of one final run in bp-epochs (log axis; :mod:`bioplaus.analysis.budget_views`),
circles for an equal-epochs sweep and triangles for an equal-compute one, and the Pareto front over every
point drawn (up and left is better). Points from fewer than three seeds are drawn hollow.
"""

from __future__ import annotations

import math
from pathlib import Path

import plotly.graph_objects as go
from matplotlib import ticker
from matplotlib.colors import to_hex
from plotly.subplots import make_subplots

from bioplaus.analysis import plots
from bioplaus.analysis.budget_views import BudgetView, compute_front, pareto_points

MARKERS = {"epochs": ("o", "circle"), "compute": ("^", "triangle-up")}
MIN_SEEDS = 3
TITLE = ("Accuracy vs training compute (bp-epochs; bars: 95 % CI over the final seeds; hollow: < 3 seeds):\n"
         "up and left is better; the dashed line is the Pareto front")


def _static_panel(ax, points: list[dict], colors: dict) -> None:
    lo, hi = plots.accuracy_range(points)
    for p, label_y in zip(points, plots.label_positions(points, lo, hi)):
        c = colors.get(p["rule"], (0.5, 0.5, 0.5))
        full = p["n_seeds"] is not None and p["n_seeds"] >= MIN_SEEDS
        ax.errorbar(p["compute"], p["acc"], yerr=[[p["acc"] - p["ci_low"]], [p["ci_high"] - p["acc"]]],
                    fmt=MARKERS.get(p["kind"], ("o",))[0], ms=6, color=c, mfc=c if full else "white", capsize=3,
                    zorder=3)
        ax.annotate(p["rule"], (p["compute"], p["acc"]), xytext=(12, label_y), textcoords=("offset points", "data"),
                    fontsize=7.5, color=c, va="center", arrowprops=dict(arrowstyle="-", color=c, lw=0.6))
    front = compute_front(points)
    ax.step([f["compute"] for f in front], [f["acc"] for f in front], where="post", color="crimson", lw=1.2,
            ls="--", zorder=2, label="Pareto front")
    ax.set_xscale("log")
    # Plain numbers at 1-2-5 steps: costs often span less than a decade, where the default log axis labels
    # minor ticks in scientific notation.
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    xs = [p["compute"] for p in points]
    ax.set_xlim(min(xs) / 1.5, max(xs) * 3)
    ax.set_ylim(lo, hi)
    kinds = sorted({p["kind"] for p in points})
    for kind in kinds:
        ax.plot([], [], MARKERS.get(kind, ("o",))[0], color="0.4", label=f"equal {kind}")
    ax.legend(fontsize=7, loc="lower right")


def pareto_png(views: list[BudgetView], cells: list[tuple[str, str]], colors: dict, path: Path) -> Path:
    fig, axes = plots._grid(len(cells))
    for ax, (arch, dataset) in zip(axes, cells):
        points = pareto_points(views, arch, dataset)
        if points:
            _static_panel(ax, points, colors)
        else:
            ax.text(0.5, 0.5, "no final results with a counted cost", transform=ax.transAxes, ha="center",
                    color="0.5")
        ax.set_title(plots.cell_label(arch, dataset), fontsize=9)
        ax.set_xlabel("training compute of a final run (bp-epochs, log)", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
    fig.suptitle(TITLE, fontsize=9)
    fig.tight_layout()
    return plots._save(fig, path)


def _trace(p: dict, colors: dict, shown: set) -> go.Scatter:
    c = to_hex(colors.get(p["rule"], (0.5, 0.5, 0.5)))
    full = p["n_seeds"] is not None and p["n_seeds"] >= MIN_SEEDS
    return go.Scatter(
        x=[p["compute"]], y=[p["acc"]], mode="markers", name=p["rule"], legendgroup=p["rule"],
        showlegend=p["rule"] not in shown,
        marker=dict(size=10, symbol=MARKERS.get(p["kind"], ("o", "circle"))[1] + ("" if full else "-open"), color=c),
        error_y=dict(type="data", symmetric=False, array=[p["ci_high"] - p["acc"]], arrayminus=[p["acc"] - p["ci_low"]],
                     color=c),
        hovertemplate=(f"{p['rule']} (equal {p['kind']}): %{{y:.4f}} (95 % CI {p['ci_low']:.4f}–{p['ci_high']:.4f}, "
                       f"{p['n_seeds']} seeds)<br>{p['epochs']} epochs = %{{x:.3g}} bp-epochs<extra></extra>"))


def pareto_plotly(views: list[BudgetView], cells: list[tuple[str, str]], colors: dict) -> go.Figure:
    ncols = max(1, min(3, len(cells)))
    nrows = max(1, math.ceil(len(cells) / ncols))
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[plots.cell_label(a, d) for a, d in cells])
    fig.update_layout(height=110 + 320 * nrows, margin=dict(l=50, r=20, t=80, b=40),
                      title=dict(text=TITLE.replace("\n", "<br>"), font=dict(size=12)))
    shown: set[str] = set()
    for i, (arch, dataset) in enumerate(cells):
        row, col = i // ncols + 1, i % ncols + 1
        points = pareto_points(views, arch, dataset)
        for p in points:
            fig.add_trace(_trace(p, colors, shown), row=row, col=col)
            shown.add(p["rule"])
        front = compute_front(points)
        if front:
            fig.add_trace(go.Scatter(x=[f["compute"] for f in front], y=[f["acc"] for f in front], mode="lines",
                                     line=dict(color="crimson", dash="dash", shape="hv", width=1.2),
                                     name="Pareto front", legendgroup="front", showlegend="front" not in shown,
                                     hoverinfo="skip"), row=row, col=col)
            shown.add("front")
        fig.update_xaxes(type="log", title_text="training compute (bp-epochs, log)", row=row, col=col)
        fig.update_yaxes(title_text="test accuracy", row=row, col=col)
    return fig
