"""The report's figures (matplotlib, Agg backend, PNG): one function per figure, each returning the path.

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


# --- accuracy heatmap -------------------------------------------------------------------------------
def accuracy_heatmap(main: pl.DataFrame, rules: list[str], cells: list[tuple[str, str]], path: Path) -> Path:
    """Rules x cells, coloured by final test accuracy (mean over seeds), annotated mean +- CI half-width."""
    lookup = {(r["rule"], r["arch"], r["dataset"]): r for r in main.iter_rows(named=True)}
    values = np.full((len(rules), len(cells)), np.nan)
    for i, rule in enumerate(rules):
        for j, (arch, dataset) in enumerate(cells):
            row = lookup.get((rule, arch, dataset))
            if row and row["test_acc_mean"] is not None:
                values[i, j] = row["test_acc_mean"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.55 * len(cells), 0.9 + 0.48 * len(rules)))
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.05, vmax + 0.05
    cmap = plt.get_cmap("viridis").with_extremes(bad=(0.93, 0.93, 0.93))
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for i, rule in enumerate(rules):
        for j, (arch, dataset) in enumerate(cells):
            row = lookup.get((rule, arch, dataset))
            status = row["status"] if row else "not in sweep"
            if status == "ok":
                shade = (values[i, j] - vmin) / (vmax - vmin)
                half = row["test_acc_ci95_half"]
                text = f"{values[i, j]:.3f}" + (f"\n±{half:.3f}" if half is not None and math.isfinite(half) else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=7.5, linespacing=0.95,
                        color="black" if shade > 0.55 else "white",
                        fontweight="bold" if row["best"] else "normal")
                if row["best"]:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="crimson"))
            else:
                label = {"unsupported": "n/a", "no finals": "no result"}.get(status, "")
                ax.text(j, i, label, ha="center", va="center", fontsize=7.5, color="0.45", style="italic")
    ax.set_xticks(range(len(cells)), [cell_label(a, d) for a, d in cells], rotation=25, ha="right", fontsize=8.5)
    ax.set_yticks(range(len(rules)), rules, fontsize=9)
    ax.set_xticks(np.arange(-0.5, len(cells)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rules)), minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label("test accuracy", fontsize=8)
    ax.set_title("Final test accuracy (mean ± 95 % CI half-width over seeds; red box = best of cell)", fontsize=9)
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


def accuracy_vs_cost(main: pl.DataFrame, cost: pl.DataFrame, cells: list[tuple[str, str]], colors: dict,
                     path: Path) -> Path:
    """Per cell: test accuracy (95 % CI) against training throughput; the Pareto front is drawn."""
    both = main.join(cost.select("rule", "arch", "dataset", "samples_per_second_mean"),
                     on=["rule", "arch", "dataset"], how="left")
    fig, axes = _grid(len(cells))
    for ax, (arch, dataset) in zip(axes, cells):
        rows = both.filter((pl.col("arch") == arch) & (pl.col("dataset") == dataset) & (pl.col("status") == "ok")
                           & pl.col("samples_per_second_mean").is_not_null())
        points = []
        for r in rows.iter_rows(named=True):
            half = r["test_acc_ci95_half"]
            ax.errorbar(r["samples_per_second_mean"], r["test_acc_mean"],
                        yerr=half if half is not None and math.isfinite(half) else None, fmt="o", ms=6,
                        color=colors.get(r["rule"]), capsize=3, zorder=3)
            ax.annotate(r["rule"], (r["samples_per_second_mean"], r["test_acc_mean"]), xytext=(5, 4),
                        textcoords="offset points", fontsize=7.5, color=colors.get(r["rule"]))
            points.append((r["samples_per_second_mean"], r["test_acc_mean"], r["rule"]))
        front = pareto_front(points)
        if front:
            xs, ys = [p[0] for p in front], [p[1] for p in front]
            ax.step(xs, ys, where="post", color="crimson", lw=1.2, ls="--", zorder=2, label="Pareto front")
            ax.scatter(xs, ys, s=110, facecolors="none", edgecolors="crimson", lw=1.3, zorder=4)
            ax.legend(fontsize=7, loc="lower left")
        else:
            ax.text(0.5, 0.5, "no final results", transform=ax.transAxes, ha="center", color="0.5")
        if points:
            ax.set_xscale("log")
            # Plain numbers at 1-2-5 steps: throughputs often span less than a decade, where the default
            # log axis labels every minor tick in scientific notation on top of each other.
            ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            lo, hi = min(p[0] for p in points), max(p[0] for p in points)
            ax.set_xlim(lo / 1.25, hi * 1.25)
        ax.set_title(cell_label(arch, dataset), fontsize=9)
        ax.set_xlabel("training samples / second (log)", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy vs cost: up and right is better; circled points are not dominated", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --- learning curves --------------------------------------------------------------------------------------
def learning_curves(epochs: pl.DataFrame | None, cells: list[tuple[str, str]], rules: list[str], colors: dict,
                    path: Path) -> Path:
    """Per cell: validation accuracy per epoch of the final runs, mean over seeds with the min-max band."""
    fig, axes = _grid(len(cells))
    curves = None
    if epochs is not None and epochs.height:
        curves = (epochs.filter((pl.col("phase") == "final") & pl.col("val_acc").is_not_null())
                  .group_by("rule", "arch", "dataset", "epoch")
                  .agg(mean=pl.col("val_acc").mean(), lo=pl.col("val_acc").min(), hi=pl.col("val_acc").max(),
                       n=pl.len()).sort("epoch"))
    for ax, (arch, dataset) in zip(axes, cells):
        drawn = False
        for rule in rules:
            if curves is None:
                break
            c = curves.filter((pl.col("rule") == rule) & (pl.col("arch") == arch) & (pl.col("dataset") == dataset))
            if not c.height:
                continue
            x = c["epoch"].to_numpy()
            ax.plot(x, c["mean"].to_numpy(), marker="o", ms=3, lw=1.5, color=colors.get(rule), label=rule)
            ax.fill_between(x, c["lo"].to_numpy(), c["hi"].to_numpy(), color=colors.get(rule), alpha=0.15, lw=0)
            drawn = True
        if drawn:
            ax.legend(fontsize=7, ncol=2)
        else:
            ax.text(0.5, 0.5, "no final runs", transform=ax.transAxes, ha="center", color="0.5")
        ax.set_title(cell_label(arch, dataset), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("validation accuracy", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
    fig.suptitle("Learning curves of the final runs (mean over seeds; band = min–max)", fontsize=10)
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
