"""The brain step's report helpers: the best-layer summary table and the figure (used by the report
and by ``bioplaus brain --plot``); they only read the ``brain`` table.
"""

from __future__ import annotations

from pathlib import Path

from bioplaus.analysis import brain_pairs
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.results import read_table


def brain_summary(df, target: str = "human_it_mean", method: str = "spearman"):
    """Per rule x arch x dataset x control: the best layer's similarity (mean over seeds), its bootstrap
    CI (mean over seeds of the per-seed bounds), the layer chosen most often and the noise ceiling.

    The best layer is picked on the same data it is scored on (max over layers), which favours
    networks with more layers slightly; the untrained control gets the same advantage. Ties (two
    layers chosen equally often, equal similarities) break by name, so the same table gives the same rows.
    """
    import polars as pl

    if df.is_empty():
        return pl.DataFrame()
    best = df.filter((pl.col("target") == target) & (pl.col("method") == method) & pl.col("best_layer"))
    return (best.group_by("rule", "arch", "dataset", "control")
            .agg(pl.len().alias("seeds"), pl.col("similarity").mean(), pl.col("similarity").std().alias("similarity_std"),
                 pl.col("ci_low").mean(), pl.col("ci_high").mean(), pl.col("layer_name").mode().sort().first().alias("best_layer"),
                 pl.col("noise_ceiling_low").first(), pl.col("noise_ceiling_high").first())
            .sort("arch", "dataset", "control", "similarity", "rule", descending=[False, False, False, True, False]))


def plot_brain(df_or_dir, path: str | Path, target: str = "human_it_mean", method: str = "spearman") -> Path:
    """The report's figure: per rule, best-layer similarity with its bootstrap CI (one point per seed),
    the untrained control (hollow grey), raw pixels (dotted line) and the noise-ceiling band (grey),
    one panel per arch x dataset. ``df_or_dir``: the brain DataFrame or a sweep folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    df = read_table(df_or_dir, "brain") if isinstance(df_or_dir, (str, Path)) else df_or_dir
    if df.is_empty():
        raise UsageError("no brain results to plot (run `bioplaus brain SWEEP_DIR` first)")
    sel, cv = brain_pairs.figure_rows(df, target, method)
    panels = sel.select("arch", "dataset").unique().sort("arch", "dataset").rows()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 1.1 * sel["rule"].n_unique() + 2) * len(panels), 4),
                             squeeze=False)
    for ax, (arch, dataset) in zip(axes[0], panels):
        p = sel.filter((pl.col("arch") == arch) & (pl.col("dataset") == dataset))
        trained = p.filter(pl.col("control") == "none")
        order = (trained.group_by("rule").agg(pl.col("similarity").mean()).sort("similarity", descending=True)["rule"]
                 .to_list()) or sorted(p["rule"].unique().to_list())
        nc = p.filter(pl.col("noise_ceiling_low").is_not_null())
        if not nc.is_empty():
            ax.axhspan(nc["noise_ceiling_low"][0], nc["noise_ceiling_high"][0], color="0.85", zorder=0,
                       label="noise ceiling")
        pix = p.filter(pl.col("control") == "pixels")
        if not pix.is_empty():
            ax.axhline(pix["similarity"].mean(), color="0.4", ls=":", label="pixels")
        for x, rule in enumerate(order):
            for control, style, dx in (("none", {"fmt": "o", "color": "C0"}, -0.1),
                                       ("untrained", {"fmt": "o", "color": "0.5", "mfc": "white"}, 0.1)):
                r = p.filter((pl.col("rule") == rule) & (pl.col("control") == control)).sort("seed")
                for j, row in enumerate(r.iter_rows(named=True)):
                    lo = row["ci_low"] if row["ci_low"] is not None else row["similarity"]
                    hi = row["ci_high"] if row["ci_high"] is not None else row["similarity"]
                    ax.errorbar(x + dx + 0.04 * (j - (r.height - 1) / 2), row["similarity"],
                                yerr=[[row["similarity"] - lo], [hi - row["similarity"]]], capsize=2, ms=5,
                                label=("trained" if control == "none" else "untrained") if x == 0 and j == 0 else None,
                                **style)
        brain_pairs.mark_unresolved(ax, df, arch, dataset, order) if cv else None
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{arch} / {dataset}" + ("" if brain_pairs.in_domain(dataset) else " (out of domain)"))
        ax.set_ylabel(f"{'cross-validated ' if cv else ''}best-layer {method} vs {target}")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
