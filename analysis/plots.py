"""The report's static figures (matplotlib, Agg backend, PNG) for the Markdown report, one function per figure
each returning the path, and the helpers the interactive figures (:mod:`bioplaus.analysis.figures`) share.

Every rule keeps one colour across all figures (``bp`` is black: the reference), and cells are laid
out in the sweep's (dataset, arch) order, so figures can be read side by side.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report is built on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib import ticker

from bioplaus.analysis.tables import REFERENCE

DPI = 110


def rule_colors(rules: list[str]) -> dict[str, tuple]:
    palette = [c for name in ("tab10", "Dark2", "Set1") for c in plt.get_cmap(name).colors]
    others = [r for r in rules if r != REFERENCE]
    colors = {r: palette[i % len(palette)] for i, r in enumerate(others)}
    colors[REFERENCE] = (0.0, 0.0, 0.0)
    return colors


def _grid(n: int, width: float = 4.6, height: float = 3.4, ncols: int = 3):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def cell_label(arch: str, dataset: str) -> str:
    return f"{dataset} / {arch}"


# --- shared by these figures and the interactive ones (bioplaus.analysis.figures) ----------------------------
def spread(values: list[float], gap: float, lo: float, hi: float) -> list[float]:
    """Label positions for points at ``values``: each as near its point as possible, any two at least
    ``gap`` apart (less only where ``hi - lo`` cannot hold them all), all within [lo, hi]; input order."""
    if not values:
        return []
    order = sorted(range(len(values)), key=lambda i: values[i])
    gap = min(gap, (hi - lo) / max(1, len(values) - 1))
    pos = [min(max(values[i], lo), hi) for i in order]
    for k in range(1, len(pos)):  # push up past the label below
        pos[k] = max(pos[k], pos[k - 1] + gap)
    pos[-1] = min(pos[-1], hi)
    for k in range(len(pos) - 2, -1, -1):  # then back down under the ceiling
        pos[k] = min(pos[k], pos[k + 1] - gap)
    out = [0.0] * len(values)
    for k, i in enumerate(order):
        out[i] = pos[k]
    return out


def label_positions(points: list[dict], lo: float, hi: float, gap: float = 0.09) -> list[float]:
    """Heights of the points' labels in an accuracy panel spanning [lo, hi]: spread apart (``gap``: a
    fraction of the panel), kept off its top and bottom edges."""
    inset = 0.04 * (hi - lo)
    return spread([p["acc"] for p in points], gap * (hi - lo), lo + inset, hi - inset)


def colour_range(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    return (lo - 0.05, hi + 0.05) if hi - lo < 1e-6 else (lo, hi)


def heatmap_cell(row: dict | None) -> tuple[float | None, str, str]:
    """(value for the colour, label, tooltip) of one rule x cell of the heatmap."""
    status = row["status"] if row else "not in sweep"
    if status != "ok":
        label = {"unsupported": "n/a", "no finals": "no result"}.get(status, "")
        return None, label, (row or {}).get("reason") or status
    half = row["test_acc_ci95_half"]
    has_half = half is not None and math.isfinite(half)
    label = f"{row['test_acc_mean']:.3f}" + (f" ±{half:.3f}" if has_half else "")
    return row["test_acc_mean"], label, f"{label} over {row['n_seeds']} seed(s); rank {row['rank']:.1f}"


def cost_points(main: pl.DataFrame, cost: pl.DataFrame, arch: str, dataset: str) -> list[dict]:
    """The cell's rules with results: speed, accuracy and its 95 % CI clipped to [0, 1] (accuracy's range)."""
    both = main.join(cost.select("rule", "arch", "dataset", "samples_per_second_mean"),
                     on=["rule", "arch", "dataset"], how="left")
    rows = both.filter((pl.col("arch") == arch) & (pl.col("dataset") == dataset) & (pl.col("status") == "ok")
                       & pl.col("samples_per_second_mean").is_not_null() & (pl.col("samples_per_second_mean") > 0))
    points = []
    for r in rows.iter_rows(named=True):
        acc, half = r["test_acc_mean"], r["test_acc_ci95_half"]
        half = half if half is not None and math.isfinite(half) else 0.0
        points.append({"rule": r["rule"], "speed": r["samples_per_second_mean"], "acc": acc,
                       "ci_low": max(0.0, acc - half), "ci_high": min(1.0, acc + half)})
    return points


def accuracy_range(points: list[dict]) -> tuple[float, float]:
    """The y range of an accuracy panel: the CIs with a margin, never beyond [0, 1]."""
    lo, hi = min(p["ci_low"] for p in points), max(p["ci_high"] for p in points)
    pad = max(0.05, 0.12 * (hi - lo))
    return max(0.0, lo - pad), min(1.0, hi + pad)


def curve_table(epochs: pl.DataFrame | None, trials: pl.DataFrame | None, tuning: pl.DataFrame) -> pl.DataFrame:
    """Validation accuracy per epoch, per rule x cell: ``kind`` "final" (mean, min, max over the final
    runs' seeds) and "best trial" (the tuning trial the finals re-ran: the tuning table's selection)."""
    schema = {"rule": pl.String, "arch": pl.String, "dataset": pl.String, "kind": pl.String, "epoch": pl.Int64,
              "mean": pl.Float64, "lo": pl.Float64, "hi": pl.Float64, "n": pl.UInt32}
    if epochs is None or not epochs.height:
        return pl.DataFrame(schema=schema)
    keys = ["rule", "arch", "dataset"]
    ep = epochs.filter(pl.col("val_acc").is_not_null() & pl.col("val_acc").is_finite())
    parts = [ep.filter(pl.col("phase") == "final").with_columns(kind=pl.lit("final"))]
    if trials is not None and trials.height and "best_trial_number" in tuning.columns:
        chosen = (tuning.select(*keys, trial_number=pl.col("best_trial_number")).drop_nulls()
                  .join(trials.select(*keys, "trial_number", "run_id"), on=[*keys, "trial_number"]))
        parts.append(ep.filter(pl.col("phase") == "tune").join(chosen.select(*keys, "run_id"), on=[*keys, "run_id"])
                     .with_columns(kind=pl.lit("best trial")))
    rows = pl.concat([p.select(*keys, "kind", "epoch", "val_acc") for p in parts], how="vertical_relaxed")
    out = rows.group_by(*keys, "kind", "epoch").agg(mean=pl.col("val_acc").mean(), lo=pl.col("val_acc").min(),
                                                    hi=pl.col("val_acc").max(), n=pl.len())
    return out.select(list(schema)).cast(schema).sort(*keys, "kind", "epoch")


# --- accuracy heatmap -------------------------------------------------------------------------------
def accuracy_heatmap(main: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]], path: Path) -> Path:
    """Rules x cells, coloured by final test accuracy within each dataset (its own min-max), annotated."""
    lookup = {(r["rule"], r["arch"], r["dataset"]): r for r in main.iter_rows(named=True)}
    info = [[heatmap_cell(lookup.get((rule, a, d))) for a, d in cells] for rule in rules]
    shade = np.full((len(rules), len(cells)), np.nan)
    for dataset in dict.fromkeys(d for _, d in cells):
        cols = [j for j, (_, d) in enumerate(cells) if d == dataset]
        lo, hi = colour_range([info[i][j][0] for i in range(len(rules)) for j in cols])
        for i in range(len(rules)):
            for j in cols:
                if info[i][j][0] is not None:
                    shade[i, j] = (info[i][j][0] - lo) / (hi - lo)
    fig, ax = plt.subplots(figsize=(1.6 + 1.55 * len(cells), 0.9 + 0.48 * len(rules)))
    cmap = plt.get_cmap("viridis").with_extremes(bad=(0.93, 0.93, 0.93))
    ax.imshow(np.ma.masked_invalid(shade), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, rule in enumerate(rules):
        for j, (arch, dataset) in enumerate(cells):
            value, label, _ = info[i][j]
            row = lookup.get((rule, arch, dataset))
            if value is None:
                ax.text(j, i, label, ha="center", va="center", fontsize=7.5, color="0.45", style="italic")
                continue
            ax.text(j, i, label.replace(" ±", "\n±"), ha="center", va="center", fontsize=7.5, linespacing=0.95,
                    color="black" if shade[i, j] > 0.55 else "white", fontweight="bold" if row["best"] else "normal")
            if row["best"]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="crimson"))
    ax.set_xticks(range(len(cells)), [cell_label(a, d) for a, d in cells], rotation=25, ha="right", fontsize=8.5)
    ax.set_yticks(range(len(rules)), rules, fontsize=9)
    ax.set_xticks(np.arange(-0.5, len(cells)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rules)), minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title("Final test accuracy (mean ± 95 % CI half-width; red box = best of cell;\n"
                 "colour scaled within each dataset, from its lowest to its highest value)", fontsize=9)
    return _save(fig, path)


# --- accuracy vs cost -----------------------------------------------------------------------------------
def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (speed, accuracy, name) not dominated by another that is at least as fast and as accurate."""
    front, best_acc = [], -math.inf
    for speed, acc, name in sorted(points, key=lambda p: (-p[0], -p[1])):
        if acc > best_acc:
            front.append((speed, acc, name))
            best_acc = acc
    return front


def _log_speed_axis(ax, speeds: list[float]) -> None:
    ax.set_xscale("log")
    # Plain numbers at 1-2-5 steps: throughputs often span less than a decade, where the default
    # log axis labels every minor tick in scientific notation on top of each other.
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlim(min(speeds) / 1.25, max(speeds) * 2.2)  # room on the right for the labels


def _cost_panel(ax, points: list[dict], colors: dict) -> None:
    lo, hi = accuracy_range(points)
    for p, label_y in zip(points, label_positions(points, lo, hi)):
        c = colors.get(p["rule"])
        ax.errorbar(p["speed"], p["acc"], yerr=[[p["acc"] - p["ci_low"]], [p["ci_high"] - p["acc"]]], fmt="o",
                    ms=6, color=c, capsize=3, zorder=3)
        ax.annotate(p["rule"], (p["speed"], p["acc"]), xytext=(12, label_y), textcoords=("offset points", "data"),
                    fontsize=7.5, color=c, va="center", arrowprops=dict(arrowstyle="-", color=c, lw=0.6))
    front = pareto_front([(p["speed"], p["acc"], p["rule"]) for p in points])
    xs, ys = [f[0] for f in front], [f[1] for f in front]
    ax.step(xs, ys, where="post", color="crimson", lw=1.2, ls="--", zorder=2, label="Pareto front")
    ax.scatter(xs, ys, s=110, facecolors="none", edgecolors="crimson", lw=1.3, zorder=4)
    ax.legend(fontsize=7, loc="lower left")
    _log_speed_axis(ax, [p["speed"] for p in points])
    ax.set_ylim(lo, hi)


def accuracy_vs_cost(main: pl.DataFrame, cost: pl.DataFrame, cells: list[tuple[str, str]], colors: dict,
                     path: Path) -> Path:
    """Per cell: test accuracy (95 % CI, clipped to [0, 1]) against training throughput; the Pareto front."""
    most = max((main.filter((pl.col("arch") == a) & (pl.col("dataset") == x)).height for a, x in cells), default=0)
    fig, axes = _grid(len(cells), height=max(3.4, 0.3 * most))  # taller panels where many labels must fit
    for ax, (arch, dataset) in zip(axes, cells):
        points = cost_points(main, cost, arch, dataset)
        if points:
            _cost_panel(ax, points, colors)
        else:
            ax.text(0.5, 0.5, "no final results", transform=ax.transAxes, ha="center", color="0.5")
        ax.set_title(cell_label(arch, dataset), fontsize=9)
        ax.set_xlabel("training samples / second (log)", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy vs cost: up and right is better; circled points are not dominated", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --- learning curves --------------------------------------------------------------------------------------
def learning_curves(curves: pl.DataFrame, cells: list[tuple[str, str]], rules: list[str], colors: dict,
                    path: Path) -> Path:
    """Per cell: validation accuracy per epoch, final runs (mean, min-max band) and the selected trial (dashed)."""
    fig, axes = _grid(len(cells))
    for ax, (arch, dataset) in zip(axes, cells):
        mine = curves.filter((pl.col("arch") == arch) & (pl.col("dataset") == dataset))
        for rule in rules:
            for kind, ls in (("final", "-"), ("best trial", "--")):
                c = mine.filter((pl.col("rule") == rule) & (pl.col("kind") == kind)).sort("epoch")
                if not c.height:
                    continue
                x = c["epoch"].to_numpy()
                ax.plot(x, c["mean"].to_numpy(), marker="o", ms=3, lw=1.3, ls=ls, color=colors.get(rule),
                        label=rule if kind == "final" or not mine.filter(pl.col("rule") == rule).filter(
                            pl.col("kind") == "final").height else None)
                if kind == "final":
                    ax.fill_between(x, c["lo"].to_numpy(), c["hi"].to_numpy(), color=colors.get(rule), alpha=0.15,
                                    lw=0)
        if mine.height:
            ax.legend(fontsize=7, ncol=2)
        else:
            ax.text(0.5, 0.5, "no epochs recorded", transform=ax.transAxes, ha="center", color="0.5")
        ax.set_title(cell_label(arch, dataset), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("validation accuracy", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
    fig.suptitle("Learning curves: final runs (solid; band = min–max over seeds) and the selected tuning trial "
                 "(dashed)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --- brain similarity ---------------------------------------------------------------------------------------
def brain_figure(best: pl.DataFrame, roles: dict, colors: dict, path: Path, max_panels: int = 12) -> Path:
    """Per target (and any other key such as metric): best-layer similarity per model, CI bars, noise ceiling."""
    # Panels: what the similarity is measured against and how; bars: the networks (and controls).
    facet_keys = [k for k in roles["keys"] if k in ("target", "method", "metric", "rdm", "subject")]
    model_keys = [k for k in roles["keys"] if k not in facet_keys]
    facets = best.select(facet_keys).unique(maintain_order=True).sort(facet_keys).head(max_panels) \
        if facet_keys else pl.DataFrame({"_": [0]})
    n_bars = best.select(model_keys).unique().height if model_keys else 1
    fig, axes = _grid(facets.height, width=max(4.6, 0.45 * n_bars + 1.5), height=3.6, ncols=2)
    vary = [k for k in model_keys if best[k].n_unique() > 1 and k not in ("rule", "model")]
    for ax, facet in zip(axes, facets.iter_rows(named=True)):
        rows = best
        for k in facet_keys:
            rows = rows.filter(pl.col(k) == facet[k])
        rows = rows.sort(model_keys)
        labels = [r["rule"] + "".join(f"\n{r[k]}" for k in vary) for r in rows.iter_rows(named=True)]
        x = np.arange(rows.height)
        sim = rows["similarity"].to_numpy()
        err = None
        if "ci_low" in rows.columns and "ci_high" in rows.columns:
            lo = np.nan_to_num(sim - rows["ci_low"].fill_null(np.nan).to_numpy(), nan=0.0)
            hi = np.nan_to_num(rows["ci_high"].fill_null(np.nan).to_numpy() - sim, nan=0.0)
            err = np.clip(np.vstack([lo, hi]), 0, None)
        ax.bar(x, sim, color=[colors.get(r, (0.5, 0.5, 0.5)) for r in rows["rule"]], alpha=0.85)
        if err is not None:
            ax.errorbar(x, sim, yerr=err, fmt="none", ecolor="0.2", capsize=3)
        low, high = roles["ceiling_low"], roles["ceiling_high"]
        if low and rows[low].drop_nulls().len():
            lo_v = float(rows[low].drop_nulls()[0])
            hi_v = float(rows[high].drop_nulls()[0]) if high and rows[high].drop_nulls().len() else lo_v
            ax.axhspan(lo_v, hi_v if hi_v > lo_v else lo_v + 1e-3, color="0.6", alpha=0.35, lw=0,
                       label="noise ceiling")
            ax.legend(fontsize=7, loc="upper right")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(x, labels, fontsize=7.5)
        ax.set_ylabel("similarity (best layer)", fontsize=8)
        ax.set_title(", ".join(f"{facet[k]}" for k in facet_keys) or "brain similarity", fontsize=9)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Brain similarity: best layer per model (bars: 95 % CI; band: noise ceiling)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
