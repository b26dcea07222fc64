"""The comparison tables, computed with Polars from a sweep folder (see :mod:`bioplaus.analysis.load`).

Every table is one tidy DataFrame (one row per rule x cell, or per rule), saved as Parquet by the
report so it can be queried further; the report formats them for reading. Definitions:

* **main**: per rule x cell (arch, dataset): the final runs' test accuracy, mean, std and 95 % t-interval
  over seeds (from ``finals``), whether it is the best mean of the cell, the gap to ``bp`` on the same
  cell with a Welch 95 % interval of that difference, the rank within the cell (1 = best, ties averaged)
  and the accuracy normalised per cell, ``(acc - chance) / (acc_bp - chance)`` (0 = chance, 1 = bp).
  Unsupported cells are rows with ``status = "unsupported"`` and the rule's reason; a supported cell
  without finals (sweep still running, every final run failed) has ``status = "no finals"``.
* **ranks**: per rule, the mean rank and mean normalised accuracy over the cells it has results on.
* **cost**: per rule x cell: training throughput, its ratio to ``bp`` (``bp`` samples/s over the rule's:
  2.0 = twice as slow), epochs for the final runs' validation accuracy to first reach 95 % of its best,
  peak memory and parameter counts.
* **criteria** (``analysis/criteria_report.py``): each rule's plausibility criteria as measured on each cell,
  with the declared claims beside them.
* **tuning**: per cell: tuning trials run, ok, pruned, failed, diverged, and the selected trial (the
  orchestrator's rule: fully trained trials first, then best validation accuracy, then lowest number)
  with its hyperparameters.
* **data**: per dataset and phase (tune, final): the train/validation/test image counts the runs used, the
  limits that set them (``train_limit``, ``test_limit``, ``val_fraction``), and the dataset's published
  split sizes, so subsampling (a limit, or data files holding fewer images than the published set) shows.
* **brain** (when the sweep folder has a ``brain/`` table): per model and target, the layer with the
  highest similarity, with its CI and the noise ceiling.
"""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl

from bioplaus.analysis.load import SweepData

CELL = ["arch", "dataset"]
KEYS = ["rule", "arch", "dataset"]
REFERENCE = "bp"

# Class counts of the registered datasets (chance = 1 / classes). A dataset not listed here (e.g. an
# imagefolder) gets its count from a saved final model when there is one, else no normalised accuracy.
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "kmnist": 10, "cifar10": 10, "svhn": 10,
               "cifar100": 100}


def _floats_nan_to_null(lf: pl.LazyFrame) -> pl.LazyFrame:
    """NaN means "no value" in these tables (an empty mean); null makes Polars skip it in aggregates."""
    schema = lf.collect_schema()
    return lf.with_columns([pl.col(c).fill_nan(None) for c, t in schema.items() if t in (pl.Float32, pl.Float64)])


def _empty(schema: dict) -> pl.LazyFrame:
    return pl.DataFrame(schema=schema).lazy()


# --- cells -----------------------------------------------------------------------------------------
def cells_table(d: SweepData) -> pl.DataFrame:
    """Every cell of the sweep, supported or not (``cells.parquet``, plus any cell the tables hold)."""
    schema = {"rule": pl.String, "arch": pl.String, "dataset": pl.String, "supported": pl.Boolean,
              "reason": pl.String}
    planned = (d.cells.select(pl.col(c).cast(t) for c, t in schema.items()) if d.cells is not None
               else _empty(schema))
    seen = [lf.select(KEYS) for lf in (d.trials, d.final_runs, d.finals) if lf is not None]
    extra = (pl.concat(seen, how="vertical_relaxed").unique().with_columns(
        supported=pl.lit(True), reason=pl.lit(None, dtype=pl.String)) if seen else _empty(schema))
    both = pl.concat([planned, extra.join(planned.select(KEYS), on=KEYS, how="anti")], how="vertical_relaxed")
    return both.unique(KEYS, keep="first").collect()


def sweep_order(d: SweepData, cells: pl.DataFrame) -> tuple[list[str], list[str]]:
    """(arch order, dataset order): as the sweep config lists them, then any others alphabetically."""
    archs, datasets = [], []
    if d.manifest is not None:
        try:
            cfg = json.loads(d.manifest.select("config_json").collect().item(0, 0))
            archs = list(cfg.get("archs", []))
            datasets = [*cfg.get("datasets", []), *cfg.get("optional_datasets", [])]
        except (ValueError, TypeError, KeyError, pl.exceptions.PolarsError):
            archs, datasets = [], []  # an unreadable manifest only costs the ordering
    archs += sorted(set(cells["arch"]) - set(archs))
    datasets += sorted(set(cells["dataset"]) - set(datasets))
    return [a for a in archs if a in set(cells["arch"])], [x for x in datasets if x in set(cells["dataset"])]


def num_classes(d: SweepData, dataset: str) -> int | None:
    if dataset in NUM_CLASSES:
        return NUM_CLASSES[dataset]
    for model in sorted((d.dir / "models").glob(f"*.{dataset}.final*.pt")):
        try:
            import torch

            return int(torch.load(model, map_location="cpu", weights_only=True, mmap=True)["num_classes"])
        except Exception:  # noqa: BLE001, S112  (an unreadable checkpoint: try the next one)
            continue
    return None


# --- main table --------------------------------------------------------------------------------------
def _welch_halfwidth(s1, n1, s2, n2) -> np.ndarray:
    """Half-width of the 95 % Welch interval of a difference of two means (NaN where undefined)."""
    from scipy import stats

    s1, n1, s2, n2 = (np.asarray(a, dtype=float) for a in (s1, n1, s2, n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        v1, v2 = s1 ** 2 / n1, s2 ** 2 / n2
        se = np.sqrt(v1 + v2)
        dof = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
        half = stats.t.ppf(0.975, dof) * se
    half = np.where((se == 0) & (n1 > 1) & (n2 > 1), 0.0, half)  # both seeds sets constant: no spread
    return np.where((n1 > 1) & (n2 > 1), half, np.nan)


def main_table(d: SweepData, cells: pl.DataFrame | None = None) -> pl.DataFrame:
    cells = cells_table(d) if cells is None else cells
    fin_schema = {"n_seeds": pl.Int64, "n_failed": pl.Int64, "test_acc_mean": pl.Float64,
                  "test_acc_std": pl.Float64, "test_acc_ci95_low": pl.Float64, "test_acc_ci95_high": pl.Float64,
                  "val_acc_mean": pl.Float64}
    finals = (_floats_nan_to_null(d.finals).select(*KEYS, *(pl.col(c).cast(t) for c, t in fin_schema.items()))
              if d.finals is not None else _empty({**{k: pl.String for k in KEYS}, **fin_schema}))
    chance = pl.DataFrame({"dataset": sorted(set(cells["dataset"]))}).with_columns(
        chance=pl.col("dataset").map_elements(lambda x: (1 / n) if (n := num_classes(d, x)) else None,
                                              return_dtype=pl.Float64))
    m = (cells.lazy().join(finals, on=KEYS, how="left")
         .with_columns(status=pl.when(~pl.col("supported")).then(pl.lit("unsupported"))
                       .when(pl.col("test_acc_mean").is_null()).then(pl.lit("no finals"))
                       .otherwise(pl.lit("ok")),
                       test_acc_ci95_half=(pl.col("test_acc_ci95_high") - pl.col("test_acc_ci95_low")) / 2)
         .with_columns(best=(pl.col("test_acc_mean") == pl.col("test_acc_mean").max().over(CELL))
                       .fill_null(False),
                       rank=pl.col("test_acc_mean").rank("average", descending=True).over(CELL)))
    bp = finals.filter(pl.col("rule") == REFERENCE).select(
        *CELL, bp_mean=pl.col("test_acc_mean"), bp_std=pl.col("test_acc_std"), bp_n=pl.col("n_seeds"))
    m = (m.join(bp, on=CELL, how="left").join(chance.lazy(), on="dataset", how="left")
         .with_columns(gap_to_bp=pl.col("test_acc_mean") - pl.col("bp_mean"),
                       normalized_acc=pl.when(pl.col("bp_mean") > pl.col("chance"))
                       .then((pl.col("test_acc_mean") - pl.col("chance")) / (pl.col("bp_mean") - pl.col("chance"))))
         .collect())
    half = _welch_halfwidth(m["test_acc_std"].fill_null(np.nan), m["n_seeds"].fill_null(0),
                            m["bp_std"].fill_null(np.nan), m["bp_n"].fill_null(0))
    m = m.with_columns(gap_half=pl.Series(half).fill_nan(None)).with_columns(
        gap_ci95_low=pl.col("gap_to_bp") - pl.col("gap_half"), gap_ci95_high=pl.col("gap_to_bp") + pl.col("gap_half"))
    m = m.with_columns(pl.when(pl.col("rule") == REFERENCE).then(None).otherwise(pl.col(c)).alias(c)
                       for c in ("gap_to_bp", "gap_ci95_low", "gap_ci95_high"))
    cols = [*KEYS, "status", "reason", "n_seeds", "n_failed", "test_acc_mean", "test_acc_std", "test_acc_ci95_low",
            "test_acc_ci95_high", "test_acc_ci95_half", "val_acc_mean", "best", "rank", "gap_to_bp",
            "gap_ci95_low", "gap_ci95_high", "chance", "normalized_acc"]
    return m.select(cols).sort(KEYS)


def rule_order(main: pl.DataFrame) -> list[str]:
    """bp first (the reference), then by mean rank over the cells each rule has results on, then name."""
    ranked = main.group_by("rule").agg(pl.col("rank").mean().alias("r"))
    ranked = ranked.with_columns(pl.col("r").fill_null(float("inf")), ref=pl.col("rule") != REFERENCE)
    return ranked.sort("ref", "r", "rule")["rule"].to_list()


# --- ranks --------------------------------------------------------------------------------------------
def rank_table(main: pl.DataFrame) -> pl.DataFrame:
    has = main.filter(pl.col("status") == "ok")
    n_cells = has.select(pl.struct(CELL).n_unique()).item() if has.height else 0
    return (has.lazy().group_by("rule").agg(
        n_cells=pl.len(), mean_rank=pl.col("rank").mean(), wins=pl.col("best").sum(),
        mean_normalized_acc=pl.col("normalized_acc").mean(), min_normalized_acc=pl.col("normalized_acc").min(),
        max_normalized_acc=pl.col("normalized_acc").max(), n_cells_normalized=pl.col("normalized_acc").count(),
        mean_test_acc=pl.col("test_acc_mean").mean())
        .with_columns(cells_in_sweep=pl.lit(n_cells, dtype=pl.UInt32))
        .sort("mean_rank", pl.col("mean_normalized_acc").fill_null(-math.inf), "rule",
              descending=[False, True, False]).collect())


# --- cost --------------------------------------------------------------------------------------------
def epochs_to_fraction(d: SweepData, fraction: float = 0.95) -> pl.LazyFrame:
    """Per final run: the first epoch whose validation accuracy reaches ``fraction`` of the run's best."""
    if d.epochs is None:
        return _empty({**{k: pl.String for k in KEYS}, "run_id": pl.String, "epochs_to_95": pl.Int64})
    ep = _floats_nan_to_null(d.epochs).filter((pl.col("phase") == "final") & pl.col("val_acc").is_not_null())
    return ep.group_by(*KEYS, "run_id").agg(
        epochs_to_95=pl.col("epoch").filter(pl.col("val_acc") >= fraction * pl.col("val_acc").max()).min())


def cost_table(d: SweepData, main: pl.DataFrame) -> pl.DataFrame:
    ok = main.filter(pl.col("status") == "ok").select(KEYS).lazy()
    fin_cols = {"samples_per_second_mean": pl.Float64, "train_seconds_mean": pl.Float64,
                "peak_mem_mb_max": pl.Float64, "n_params": pl.Int64, "epochs": pl.Int64}
    finals = (_floats_nan_to_null(d.finals).select(*KEYS, *(pl.col(c).cast(t) for c, t in fin_cols.items()))
              if d.finals is not None else _empty({**{k: pl.String for k in KEYS}, **fin_cols}))
    runs = (d.final_runs.group_by(KEYS).agg(n_rule_params=pl.col("n_rule_params").max(),
                                            mem_kind=pl.col("mem_kind").drop_nulls().first())
            if d.final_runs is not None else _empty({**{k: pl.String for k in KEYS}, "n_rule_params": pl.Int64,
                                                     "mem_kind": pl.String}))
    e95 = epochs_to_fraction(d).group_by(KEYS).agg(epochs_to_95_mean=pl.col("epochs_to_95").cast(pl.Float64).mean(),
                                                   epochs_to_95_max=pl.col("epochs_to_95").max())
    t = ok.join(finals, on=KEYS, how="left").join(runs, on=KEYS, how="left").join(e95, on=KEYS, how="left")
    bp = t.filter(pl.col("rule") == REFERENCE).select(*CELL, bp_sps=pl.col("samples_per_second_mean"),
                                                      bp_mem=pl.col("peak_mem_mb_max"))
    t = t.join(bp, on=CELL, how="left").with_columns(
        cost_ratio_vs_bp=pl.col("bp_sps") / pl.col("samples_per_second_mean"),
        mem_ratio_vs_bp=pl.col("peak_mem_mb_max") / pl.col("bp_mem"))
    return t.select(*KEYS, "samples_per_second_mean", "cost_ratio_vs_bp", "train_seconds_mean", "epochs",
                    "epochs_to_95_mean", "epochs_to_95_max", "peak_mem_mb_max", "mem_ratio_vs_bp", "mem_kind",
                    "n_params", "n_rule_params").sort(KEYS).collect()


# --- tuning --------------------------------------------------------------------------------------------
def tuning_table(d: SweepData, cells: pl.DataFrame) -> pl.DataFrame:
    supported = cells.filter(pl.col("supported")).select(KEYS).lazy()
    zero = ["trials", "ok", "pruned", "failed", "diverged"]
    if d.trials is None:
        return supported.with_columns(pl.lit(0, dtype=pl.UInt32).alias(c) for c in zero).sort(KEYS).collect()
    tr = _floats_nan_to_null(d.trials)
    counts = tr.group_by(KEYS).agg(
        trials=pl.len(), ok=(pl.col("status") == "ok").sum(), pruned=(pl.col("status") == "pruned").sum(),
        failed=(pl.col("status") == "failed").sum(), diverged=(pl.col("status") == "diverged").sum(),
        epochs_run=pl.col("epochs_run").sum(), tuning_seconds=pl.col("train_seconds").sum(),
        max_val_acc=pl.col("val_acc").max(), first_error=pl.col("error").drop_nulls().first())
    # The orchestrator's selection (bioplaus.orchestrator.sweep.finals.best_configs): ok trials before pruned ones,
    # then the best validation accuracy, then the lowest trial number.
    best = (tr.filter(pl.col("status").is_in(["ok", "pruned"]) & pl.col("val_acc").is_not_null())
            .sort(pl.col("status") != "ok", pl.col("val_acc"), pl.col("trial_number"),
                  descending=[False, True, False])
            .group_by(KEYS, maintain_order=True)
            .agg(best_trial_number=pl.col("trial_number").first(), best_val_acc=pl.col("val_acc").first(),
                 best_status=pl.col("status").first(), best_hp_json=pl.col("hp_json").first()))
    t = supported.join(counts, on=KEYS, how="left").join(best, on=KEYS, how="left")
    return t.with_columns(pl.col(zero).fill_null(0)).sort(KEYS).collect()


# --- data used ----------------------------------------------------------------------------------------
# Published (train, test) split sizes: a run using fewer training images than these (train + validation)
# was subsampled, by a limit or by data files holding fewer images (e.g. a 10,000-image MNIST mirror).
PUBLISHED_SIZES = {"digits": (1437, 360), "mnist": (60000, 10000), "fashion_mnist": (60000, 10000),
                   "kmnist": (60000, 10000), "cifar10": (50000, 10000), "cifar100": (50000, 10000),
                   "svhn": (73257, 26032)}


def _data_setting(key: str) -> pl.Expr:
    return pl.col("config_json").str.json_path_match(f"$.data.{key}")


def data_table(d: SweepData) -> pl.DataFrame:
    """Per dataset and phase: image counts used, the limits that set them, and the published sizes."""
    runs = [lf.select("dataset", "phase", "n_train", "n_val", "n_test", "config_json")
            for lf in (d.trials, d.final_runs) if lf is not None]
    schema = {"dataset": pl.String, "phase": pl.String, "runs": pl.UInt32, "n_train": pl.Int64, "n_val": pl.Int64,
              "n_test": pl.Int64, "counts_vary": pl.Boolean, "train_limit": pl.String, "test_limit": pl.String,
              "val_fraction": pl.String, "published_train": pl.Int64, "published_test": pl.Int64,
              "subsampled": pl.String}
    if not runs:
        return pl.DataFrame(schema=schema)
    rows = (pl.concat(runs, how="vertical_relaxed").filter(pl.col("config_json").is_not_null())
            .with_columns(train_limit=_data_setting("train_limit"), test_limit=_data_setting("test_limit"),
                          val_fraction=_data_setting("val_fraction"))
            .group_by("dataset", "phase")
            .agg(runs=pl.len(), n_train=pl.col("n_train").max(), n_val=pl.col("n_val").max(),
                 n_test=pl.col("n_test").max(),
                 counts_vary=(pl.col("n_train").drop_nulls().n_unique() > 1)
                 | (pl.col("n_test").drop_nulls().n_unique() > 1),
                 train_limit=pl.col("train_limit").drop_nulls().unique().sort().str.join(", "),
                 test_limit=pl.col("test_limit").drop_nulls().unique().sort().str.join(", "),
                 val_fraction=pl.col("val_fraction").drop_nulls().unique().sort().str.join(", "))
            .collect())
    published = pl.DataFrame([(k, *v) for k, v in PUBLISHED_SIZES.items()], orient="row",
                             schema={"dataset": pl.String, "published_train": pl.Int64, "published_test": pl.Int64})
    out = rows.join(published, on="dataset", how="left").with_columns(
        pl.col(c).replace("", None) for c in ("train_limit", "test_limit", "val_fraction"))
    out = out.with_columns(subsampled=pl.Series([_subsampling(r) for r in out.iter_rows(named=True)],
                                                dtype=pl.String))
    phase_order = pl.col("phase").replace_strict({"tune": 0, "final": 1}, default=2, return_dtype=pl.Int8)
    return out.sort("dataset", phase_order).select(list(schema))


def _subsampling(r: dict) -> str | None:
    """Why a dataset's runs saw fewer images than the published splits, in words (None: they did not)."""
    why = []
    counted = r["n_train"] is not None and r["n_test"] is not None
    used_train = (r["n_train"] or 0) + (r["n_val"] or 0)
    if r["train_limit"]:
        why.append(f"train_limit={r['train_limit']}")
    elif counted and r["published_train"] and used_train < r["published_train"]:
        why.append(f"the data files hold {used_train:,} of the {r['published_train']:,} published training "
                   f"images (a subset mirror)")
    if r["test_limit"] and r["published_test"] and (r["n_test"] or 0) < r["published_test"]:
        why.append(f"test_limit={r['test_limit']}")
    elif counted and r["published_test"] and r["n_test"] < r["published_test"]:
        why.append(f"the data files hold {r['n_test']:,} of the {r['published_test']:,} published test images")
    return "; ".join(why) or None


# --- brain similarity (written by the brain step, analysis/brain.py) ---------------------------------------
BRAIN_VALUE = ("similarity", "ci_low", "ci_high")


def brain_columns(df: pl.DataFrame) -> dict:
    """Column roles in a ``brain`` table: identifying keys, the noise-ceiling columns."""
    ceiling = [c for c in df.columns if "ceiling" in c.lower()]
    low = next((c for c in ceiling if "low" in c.lower()), None)
    high = next((c for c in ceiling if "up" in c.lower() or "high" in c.lower()), None)
    if low is None and high is None and ceiling:
        low = high = ceiling[0]
    text = {pl.String, pl.Categorical, pl.Boolean}
    keys = [c for c in df.columns if c not in (*BRAIN_VALUE, *ceiling) and not c.startswith("layer")
            and (df.schema[c] in text or c == "seed") and not c.endswith(("_path", "_json", "_layer"))
            and c != "git_commit"]
    return {"keys": keys, "ceiling_low": low, "ceiling_high": high}


def brain_table(d: SweepData) -> tuple[pl.DataFrame | None, str | None]:
    """Best layer per model and target (None, note) when there is no brain table or it lacks columns."""
    if d.brain is None:
        return None, None
    df = _floats_nan_to_null(d.brain).collect()
    missing = [c for c in ("rule", "layer", "similarity", "target") if c not in df.columns]
    if missing:
        return None, f"brain table lacks column(s) {missing}; brain section skipped"
    roles = brain_columns(df)
    keep = [c for c in ("ci_low", "ci_high") if c in df.columns]
    ceil = [c for c in dict.fromkeys((roles["ceiling_low"], roles["ceiling_high"])) if c]
    best = (df.lazy().filter(pl.col("similarity").is_not_null())
            .sort("similarity", descending=True).group_by(roles["keys"], maintain_order=True)
            .agg(pl.col("layer").first().cast(pl.String).alias("best_layer"), pl.col("similarity").first(),
                 *(pl.col(c).first() for c in keep), *(pl.col(c).first() for c in ceil),
                 pl.col("layer").n_unique().alias("n_layers"))
            .sort(roles["keys"]).collect())
    return best, None
