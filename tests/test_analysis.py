"""The analysis: tables, figures and the report of a sweep folder (``bioplaus report SWEEP_DIR``).

One tiny sweep folder is built per module with the real pieces and no Ray: cells and manifest through
``Sweep.write_manifest``, real ``run_trial`` smoke runs on digits written with ``write_run`` (tuning
trials into ``trials``, final runs into ``final_runs``) and ``write_finals``. It holds two rules x
(mlp, cnn): both mlp cells complete (ok, pruned and failed trials; 3 final seeds), bp/cnn tuned but
without finals, fa/cnn not started, plus one unsupported cell - every state a real sweep can be in - and
the Optuna journal the sweep keeps in step with those rows. The report of it is opened in headless
Chromium (selenium) where chromium and chromedriver are installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from bioplaus.analysis import tables
from bioplaus.analysis.load import load_sweep
from bioplaus.orchestrator import cli
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.results import write_run, write_table
from bioplaus.orchestrator.trial import load_splits, resolve, run_trial

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T_975_2DF = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (3 seeds)
FINAL_SEEDS = (1000, 1001, 1002)
FINAL_EPOCHS = 2


def _other_rule() -> str:
    """The second rule of the tiny sweep: fa if registered (it is in this repository), else any mlp rule."""
    from bioplaus.algorithms.registry import load_rules

    rules = load_rules()
    if "fa" in rules:
        return "fa"
    return next(n for n, c in rules.items() if n != "bp" and c.supports("mlp")[0] and c.supports("cnn")[0])


def _run(splits, cell: dict, seed: int, epochs: int, hp: dict | None = None, test: bool = False) -> dict:
    overrides = ["smoke=true", f"rule={cell['rule']}", f"arch={cell['arch']}", f"dataset={cell['dataset']}",
                 f"seed={seed}", f"train.epochs={epochs}", "out=null", "train.threads=1"]
    overrides += [f"hp.{k}={v}" for k, v in (hp or {}).items()]
    return run_trial(resolve(parse_overrides(overrides)), splits=splits, evaluate_test=test)


def _tune(root: Path, splits, cell: dict, number: int, planned: int, run_epochs: int, hp: dict | None = None):
    """A tuning trial as the sweep's TrialRecorder records it (fewer epochs than planned = pruned)."""
    record = _run(splits, cell, 0, run_epochs, hp)
    record.update(phase="tune", trial_number=number, epochs_planned=planned, test_acc=None, test_loss=None)
    if record["status"] == "ok" and run_epochs < planned:
        record["status"] = "pruned"
    key = ".".join(cell.values())
    write_run(root, record, run_id=f"{key}.t{number}", runs_table="trials")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from bioplaus.orchestrator.sweep import Sweep, best_configs, parse_sweep, write_finals

    root = tmp_path_factory.mktemp("sweeps")
    other = _other_rule()
    s = Sweep(parse_sweep(["preset=smoke", f"rules=[bp,{other}]", "archs=[mlp,cnn]", f"root={root}", "name=tiny",
                           f"budget.epochs={FINAL_EPOCHS}", f"budget.final_seeds={len(FINAL_SEEDS)}"]))
    s.write_manifest("complete", time.time())
    d = s.dir
    # An unsupported cell as a sweep records it (the rule's declared reason), written like the rest.
    cells = pl.read_parquet(d / "cells.parquet").with_columns(pl.col("reason").cast(pl.String))
    extra = pl.DataFrame({"rule": [other], "arch": ["deep_cnn"], "dataset": ["digits"], "supported": [False],
                          "reason": ["declared unsupported (test)"]})
    write_table(pl.concat([cells, extra]).to_arrow(), d / "cells.parquet")

    splits = load_splits(parse_overrides(["smoke=true"]))
    bp_mlp = {"rule": "bp", "arch": "mlp", "dataset": "digits"}
    other_mlp = {"rule": other, "arch": "mlp", "dataset": "digits"}
    # Tuning trials try points of the rule's search space, as the sweep's do (its first: the defaults, clipped).
    from bioplaus.algorithms.registry import load_rules
    from bioplaus.orchestrator.search_space import defaults_in_space

    first = {rule: defaults_in_space(load_rules()[rule], s.spaces[rule]) for rule in ("bp", other)}
    _tune(d, splits, bp_mlp, 0, FINAL_EPOCHS, FINAL_EPOCHS, first["bp"])
    _tune(d, splits, bp_mlp, 1, FINAL_EPOCHS, FINAL_EPOCHS, {**first["bp"], "lr": 0.01})
    _tune(d, splits, bp_mlp, 2, FINAL_EPOCHS, 1, {**first["bp"], "lr": 0.03})
    # A worker that died more often than retries allow: recorded as the sweep's finals() records it.
    write_run(d, {**bp_mlp, "phase": "tune", "trial_number": 3, "seed": 0, "status": "failed",
                  "error": "RuntimeError: worker died", "epochs_planned": FINAL_EPOCHS, "epochs": []},
              run_id="bp.mlp.digits.t3", runs_table="trials")
    _tune(d, splits, other_mlp, 0, FINAL_EPOCHS, FINAL_EPOCHS, first[other])
    _tune(d, splits, other_mlp, 1, FINAL_EPOCHS, 1, {**first[other], "lr": 0.01})
    _tune(d, splits, {"rule": "bp", "arch": "cnn", "dataset": "digits"}, 0, FINAL_EPOCHS, FINAL_EPOCHS, first["bp"])
    # The Optuna journal as the sweep keeps it in step with the tables (one study per cell, named by its key).
    from bioplaus.orchestrator.results import rows_by_cell
    from bioplaus.orchestrator.sweep.journal import reconciled_storage

    done = rows_by_cell(d, "trials")
    reconciled_storage(s.cfg, d, {c.key: (s.spaces[c.rule], done[c.key]) for c in s.cells if c.key in done},
                       lambda _: None)

    for key, best in best_configs(d).items():
        cell = dict(zip(("rule", "arch", "dataset"), key.split(".")))
        if cell["arch"] != "mlp":
            continue  # the cnn cells stop before their finals (an interrupted sweep)
        for seed in FINAL_SEEDS:
            record = _run(splits, cell, seed, FINAL_EPOCHS, json.loads(best["hp_json"]), test=True)
            record.update(phase="final", epochs_planned=FINAL_EPOCHS)
            write_run(d, record, run_id=f"{key}.final{seed}", runs_table="final_runs")
    write_finals(d, FINAL_EPOCHS)
    s.criteria(lambda _: None)  # the sweep's criteria step: every cell measured at its best configuration

    out = io.StringIO()
    tick = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = cli.main(["report", str(d)])
    return {"dir": d, "other": other, "code": code, "stdout": out.getvalue(),
            "report_seconds": time.perf_counter() - tick}


@pytest.fixture(scope="module")
def data(sweep):
    return load_sweep(sweep["dir"])


@pytest.fixture(scope="module")
def main_df(data):
    return tables.main_table(data)


def _final_acc(d: Path, rule: str, arch: str = "mlp") -> list[float]:
    runs = pl.read_parquet(d / "final_runs" / f"rule={rule}" / f"arch={arch}" / "dataset=digits")
    return runs.sort("seed")["test_acc"].to_list()


# --- tables ---------------------------------------------------------------------------------------------
def test_main_table_rows_states_and_no_nulls_where_known(sweep, main_df):
    other = sweep["other"]
    status = {(r["rule"], r["arch"]): r["status"] for r in main_df.iter_rows(named=True)}
    assert status == {("bp", "mlp"): "ok", (other, "mlp"): "ok", ("bp", "cnn"): "no finals",
                      (other, "cnn"): "no finals", (other, "deep_cnn"): "unsupported"}
    done = main_df.filter(pl.col("status") == "ok")
    known = ["n_seeds", "test_acc_mean", "test_acc_std", "test_acc_ci95_low", "test_acc_ci95_high",
             "test_acc_ci95_half", "val_acc_mean", "best", "rank", "chance", "normalized_acc"]
    assert {c: done[c].null_count() for c in known} == {c: 0 for c in known}
    assert done["n_seeds"].to_list() == [3, 3]
    assert main_df.filter(pl.col("status") == "unsupported")["reason"].to_list() == ["declared unsupported (test)"]
    # Only the non-reference rule has a gap to bp, and it has one with an interval.
    gap = done.filter(pl.col("rule") == other).row(0, named=True)
    assert None not in (gap["gap_to_bp"], gap["gap_ci95_low"], gap["gap_ci95_high"])
    assert done.filter(pl.col("rule") == "bp")["gap_to_bp"].to_list() == [None]
    # Cells without results have no accuracy, rank or best mark.
    assert main_df.filter(pl.col("status") != "ok")["test_acc_mean"].null_count() == 3
    assert not main_df.filter(pl.col("status") != "ok")["best"].any()


def test_confidence_intervals_by_hand(sweep, main_df):
    d, other = sweep["dir"], sweep["other"]
    stats = {}
    for rule in ("bp", other):
        acc = _final_acc(d, rule)
        n = len(acc)
        mean = sum(acc) / n
        sd = math.sqrt(sum((a - mean) ** 2 for a in acc) / (n - 1))
        stats[rule] = (mean, sd, n)
        row = main_df.filter((pl.col("rule") == rule) & (pl.col("arch") == "mlp")).row(0, named=True)
        half = T_975_2DF * sd / math.sqrt(n)
        assert row["test_acc_mean"] == pytest.approx(mean, abs=1e-9)
        assert row["test_acc_std"] == pytest.approx(sd, abs=1e-9)
        assert row["test_acc_ci95_low"] == pytest.approx(mean - half, abs=1e-9)
        assert row["test_acc_ci95_high"] == pytest.approx(mean + half, abs=1e-9)
        assert row["test_acc_ci95_half"] == pytest.approx(half, abs=1e-9)
    # Gap to bp with its Welch interval: df by Welch-Satterthwaite, t quantile from scipy.
    from scipy import stats as sps

    (m1, s1, n1), (m0, s0, n0) = stats[other], stats["bp"]
    v1, v0 = s1 ** 2 / n1, s0 ** 2 / n0
    row = main_df.filter((pl.col("rule") == other) & (pl.col("arch") == "mlp")).row(0, named=True)
    assert row["gap_to_bp"] == pytest.approx(m1 - m0, abs=1e-9)
    if v1 + v0 > 0:
        dof = (v1 + v0) ** 2 / (v1 ** 2 / (n1 - 1) + v0 ** 2 / (n0 - 1))
        half = sps.t.ppf(0.975, dof) * math.sqrt(v1 + v0)
    else:
        half = 0.0
    assert row["gap_ci95_low"] == pytest.approx(m1 - m0 - half, abs=1e-9)
    assert row["gap_ci95_high"] == pytest.approx(m1 - m0 + half, abs=1e-9)


def test_best_rank_and_normalised_accuracy(sweep, main_df):
    done = main_df.filter(pl.col("status") == "ok")
    top = done["test_acc_mean"].max()
    assert done.filter(pl.col("best"))["test_acc_mean"].to_list() == [top] * done["best"].sum()
    assert sorted(done["rank"].to_list()) in ([1.0, 2.0], [1.5, 1.5])
    bp = done.filter(pl.col("rule") == "bp").row(0, named=True)
    other = done.filter(pl.col("rule") == sweep["other"]).row(0, named=True)
    assert bp["chance"] == pytest.approx(0.1)  # digits: 10 classes
    if bp["test_acc_mean"] > 0.1:
        assert bp["normalized_acc"] == pytest.approx(1.0)
        assert other["normalized_acc"] == pytest.approx((other["test_acc_mean"] - 0.1) / (bp["test_acc_mean"] - 0.1))
    ranks = tables.rank_table(main_df)
    assert set(ranks["rule"]) == {"bp", sweep["other"]}
    for r in ranks.iter_rows(named=True):
        mine = done.filter(pl.col("rule") == r["rule"])
        assert r["n_cells"] == 1 and r["cells_in_sweep"] == 1
        assert r["mean_rank"] == pytest.approx(mine["rank"].mean())
        assert r["wins"] == int(mine["best"].sum())


def test_cost_table(sweep, data, main_df):
    cost = tables.cost_table(data, main_df)
    assert sorted(zip(cost["rule"], cost["arch"])) == sorted([("bp", "mlp"), (sweep["other"], "mlp")])
    cols = ["samples_per_second_mean", "cost_ratio_vs_bp", "train_seconds_mean", "epochs_to_95_mean",
            "peak_mem_mb_max", "mem_ratio_vs_bp", "n_params", "n_rule_params", "epochs"]
    assert all(cost[c].null_count() == 0 for c in cols), cost
    bp = cost.filter(pl.col("rule") == "bp").row(0, named=True)
    other = cost.filter(pl.col("rule") == sweep["other"]).row(0, named=True)
    assert bp["cost_ratio_vs_bp"] == pytest.approx(1.0)
    ratio = bp["samples_per_second_mean"] / other["samples_per_second_mean"]
    assert other["cost_ratio_vs_bp"] == pytest.approx(ratio)
    assert bp["epochs"] == FINAL_EPOCHS and 1 <= bp["epochs_to_95_max"] <= FINAL_EPOCHS
    # Epochs to 95 % by hand from the epochs table: first epoch reaching 95 % of the run's best val acc.
    ep = pl.read_parquet(sweep["dir"] / "epochs" / "rule=bp" / "arch=mlp" / "dataset=digits")
    firsts = []
    for seed in FINAL_SEEDS:
        rows = ep.filter((pl.col("phase") == "final") & (pl.col("seed") == seed)).sort("epoch")
        best = max(rows["val_acc"])
        firsts.append(next(e for e, v in zip(rows["epoch"], rows["val_acc"]) if v >= 0.95 * best))
    assert bp["epochs_to_95_mean"] == pytest.approx(sum(firsts) / len(firsts))


def test_criteria_table_is_measured_with_the_declared_claims_beside(sweep, data):
    from types import SimpleNamespace

    from bioplaus.algorithms.registry import load_rules
    from bioplaus.analysis.criteria_report import criteria_section, criteria_table

    rules = ["bp", sweep["other"], "no_such_rule"]
    crit, note = criteria_table(data, rules)
    assert note is None
    registry = load_rules()
    for rule in rules[:2]:
        mine = crit.filter(pl.col("rule") == rule)
        assert set(mine.select("arch", "dataset").unique().rows()) == {("mlp", "digits"), ("cnn", "digits")}
        for r in mine.filter(pl.col("criterion").is_in(["C1", "C2", "C3", "C4"])).iter_rows(named=True):
            assert r["declared"] == registry[rule].criteria[r["criterion"]].holds and r["agree"] is True, r
            assert math.isfinite(r["bp_value"]) and r["criterion_text"]
    bp = crit.filter((pl.col("rule") == "bp") & pl.col("criterion").is_in(["C1", "C2", "C3", "C4"]))
    assert not bp["holds"].any() and (bp["bp_value"] > bp["threshold"]).all()  # the reference violates every criterion
    assert crit.filter(pl.col("rule") == "no_such_rule").is_empty()
    # A disagreement is flagged at the top of the section; a folder without the table falls back to declarations.
    flipped = crit.with_columns(agree=pl.when((pl.col("rule") == "bp") & (pl.col("criterion") == "C1"))
                                .then(False).otherwise(pl.col("agree")))
    section = criteria_section(flipped, rules[:2], None)
    assert "disagree with the measurement" in section.notes[0] and "bp C1 on" in section.notes[0]
    declared, note = criteria_table(SimpleNamespace(dir=sweep["dir"] / "no_such_folder"), ["bp"])
    assert "no criteria table" in note and declared["holds"].null_count() == declared.height
    assert declared["declared"].to_list() == [registry["bp"].criteria[c].holds for c in declared["criterion"]]


def test_tuning_table_counts_and_selection(sweep, data):
    from bioplaus.orchestrator.sweep import best_configs

    tuning = tables.tuning_table(data, tables.cells_table(data))
    got = {(r["rule"], r["arch"]): (r["trials"], r["ok"], r["pruned"], r["failed"], r["diverged"])
           for r in tuning.iter_rows(named=True)}
    other = sweep["other"]
    assert got == {("bp", "mlp"): (4, 2, 1, 1, 0), (other, "mlp"): (2, 1, 1, 0, 0), ("bp", "cnn"): (1, 1, 0, 0, 0),
                   (other, "cnn"): (0, 0, 0, 0, 0)}
    assert tuning.filter((pl.col("rule") == "bp") & (pl.col("arch") == "mlp"))["first_error"].to_list() == \
        ["RuntimeError: worker died"]
    # The selected trial is the orchestrator's (and the finals table's) selection.
    best = best_configs(sweep["dir"])
    finals = pl.read_parquet(sweep["dir"] / "finals" / "rule=bp" / "arch=mlp" / "dataset=digits")
    for r in tuning.filter(pl.col("trials") > 0).iter_rows(named=True):
        b = best[f"{r['rule']}.{r['arch']}.{r['dataset']}"]
        assert (r["best_trial_number"], r["best_hp_json"], r["best_val_acc"]) == \
            (b["trial_number"], b["hp_json"], b["val_acc"])
    row = tuning.filter((pl.col("rule") == "bp") & (pl.col("arch") == "mlp")).row(0, named=True)
    assert row["best_trial_number"] == finals["best_trial_number"][0]


# --- the report -------------------------------------------------------------------------------------------
def _images(html: str) -> list[str]:
    return re.findall(r"<img [^>]*src='([^']+)'", html)


def _figures(html: str) -> dict[str, list[str]]:
    """The page's figure containers by kind (plotly, image), each by its title."""
    found = re.findall(r"<div class='figure' data-figure='(\w+)' title='([^']*)'>", html)
    return {kind: [t for k, t in found if k == kind] for kind in ("plotly", "image")}


def test_report_files_tables_and_figures(sweep, main_df):
    d = sweep["dir"] / "report"
    assert sweep["code"] == 0
    assert "digits / mlp" in sweep["stdout"] and "ranking across cells" in sweep["stdout"]
    html = (d / "index.html").read_text()
    md = (d / "report.md").read_text()
    for title in ("Main table", "Data used", "Ranking", "Cost", "Equal epochs and equal compute", "Rank test across cells",
                  "Plausibility criteria", "Tuning", "Learning curves", "Optuna studies"):
        assert title in html and title in md
    assert "Brain similarity" not in html  # no brain/ table in this sweep
    assert "declared unsupported (test)" in html and "no result" in html
    # One self-contained page (plotly.js packed into it: test_report_packs_plotly_js_and_figures), nothing
    # fetched from elsewhere.
    assert not re.search(r"<script[^>]*\ssrc=|(src|href)=[\"']?(https?:)?//", html)
    figs = _figures(html)
    assert {"accuracy heatmap", "accuracy vs cost", "accuracy vs compute (Pareto front)",
            "learning curves"} <= set(figs["plotly"])
    assert "bp.mlp.digits: optimisation history" in figs["plotly"] and figs["image"] == []
    # The Markdown report links the static twins: decodable PNGs of a readable size.
    import matplotlib.image as mpimg

    refs = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert sorted(Path(r).name for r in refs) == ["accuracy_heatmap.png", "accuracy_vs_compute.png",
                                                   "accuracy_vs_cost.png", "learning_curves.png"]
    for ref in refs:
        raw = (d / ref).read_bytes()
        h, w = mpimg.imread(io.BytesIO(raw)).shape[:2]
        assert raw.startswith(PNG_MAGIC) and w > 300 and h > 200
    # Each table saved as Parquet, equal to what the tables module computes.
    saved = pl.read_parquet(d / "tables" / "main.parquet")
    assert saved.sort("rule", "arch").equals(main_df.sort("rule", "arch"))
    for name in ("cells", "ranks", "cost", "criteria", "tuning", "data"):
        assert pl.read_parquet(d / "tables" / f"{name}.parquet").height > 0


def _packed(html: str, element_id: str) -> str:
    """The text of the page's packed (gzip + base64) script element ``element_id``, unpacked."""
    from bioplaus.analysis.report_embed import unpack

    found = re.findall(rf"<script type='application/octet-stream' id='{element_id}'>([A-Za-z0-9+/=]+)</script>", html)
    assert len(found) == 1, f"{len(found)} packed elements with id {element_id}"
    return unpack(found[0])


def test_report_packs_plotly_js_and_figures(sweep):
    """plotly.js and the figures' data travel gzip-compressed: no plotly.js in the clear, the packed copy is
    the installed plotly.js byte for byte, one line of figure JSON per figure box (in order), and the loader
    that unpacks them in the browser comes after them. The packing is deterministic (gzip mtime 0)."""
    import base64

    from plotly.offline import get_plotlyjs

    from bioplaus.analysis.report_embed import FIGURES_ID, PLOTLY_JS_ID, pack

    html = (sweep["dir"] / "report" / "index.html").read_text()
    js = get_plotlyjs()
    assert all(js[k:k + 500] not in html for k in range(0, len(js), len(js) // 20))
    assert _packed(html, PLOTLY_JS_ID) == js
    figures = [json.loads(line) for line in _packed(html, FIGURES_ID).split("\n")]
    boxes = re.findall(r"<div id='(figure-\d+)' class='plotly-graph-div'", html)
    assert [f["id"] for f in figures] == boxes == [f"figure-{k}" for k in range(len(_figures(html)["plotly"]))]
    assert all(f["data"] and f["layout"] for f in figures) and "Plotly.newPlot(\"figure-" not in html
    loader = html.index("new DecompressionStream('gzip')")
    assert html.index(PLOTLY_JS_ID) < html.index(FIGURES_ID) < loader < html.rindex("checkFigures(why)")
    assert pack("x" * 100) == pack("x" * 100) and base64.b64decode(pack("x"))[4:8] == bytes(4)  # mtime 0


def test_data_used_counts_limits_and_subsampling(sweep, data):
    """The smoke trials train on 400 of digits' 1,437 training images (train_limit) and test on 200 of 360."""
    table = tables.data_table(data)
    final = table.filter(pl.col("phase") == "final").row(0, named=True)
    runs = pl.read_parquet(sweep["dir"] / "final_runs" / "rule=bp" / "arch=mlp" / "dataset=digits")
    assert (final["n_train"], final["n_val"], final["n_test"]) == (runs["n_train"][0], runs["n_val"][0],
                                                                    runs["n_test"][0])
    assert final["n_train"] + final["n_val"] == 400 and final["n_test"] == 200
    assert (final["train_limit"], final["test_limit"], final["published_train"]) == ("400", "200", 1437)
    assert final["subsampled"] == "train_limit=400; test_limit=200"
    assert set(table["phase"]) == {"tune", "final"} and set(table["dataset"]) == {"digits"}
    html = (sweep["dir"] / "report" / "index.html").read_text().replace("<wbr>", "")
    assert "<strong>train_limit=400; test_limit=200</strong>" in html


def test_subsampling_names_a_partial_mirror_and_full_data():
    """Data files smaller than the published set (a 10,000-image MNIST mirror) are named without any limit."""
    row = {"n_train": 9000, "n_val": 1000, "n_test": 10000, "train_limit": None, "test_limit": None,
           "published_train": 60000, "published_test": 10000}
    assert tables._subsampling(row) == ("the data files hold 10,000 of the 60,000 published training images "
                                        "(a subset mirror)")
    assert tables._subsampling({**row, "n_train": 54000, "n_val": 6000}) is None
    assert tables._subsampling({**row, "n_train": None, "n_val": None, "n_test": None}) is None  # not recorded


def test_cost_points_clip_intervals_to_accuracy_range():
    """A wide CI (3 seeds, t = 4.3) must not push the accuracy axis below 0 or above 1."""
    from bioplaus.analysis import figures, plots

    main = pl.DataFrame({"rule": ["bp", "fa", "dfa"], "arch": ["mlp"] * 3, "dataset": ["digits"] * 3,
                         "status": ["ok"] * 3, "test_acc_mean": [0.95, 0.2, 0.21],
                         "test_acc_ci95_half": [0.4, 1.1, None], "best": [True, False, False],
                         "rank": [1.0, 3.0, 2.0], "n_seeds": [3, 3, 1]})
    cost = pl.DataFrame({"rule": ["bp", "fa", "dfa"], "arch": ["mlp"] * 3, "dataset": ["digits"] * 3,
                         "samples_per_second_mean": [1000.0, 800.0, 810.0]})
    points = plots.cost_points(main, cost, "mlp", "digits")
    assert [(p["ci_low"], p["ci_high"]) for p in points] == [(pytest.approx(0.55), 1.0), (0.0, 1.0),
                                                              (0.21, 0.21)]
    lo, hi = plots.accuracy_range(points)
    assert (lo, hi) == (0.0, 1.0)
    fig = figures.accuracy_vs_cost(main, cost, [("mlp", "digits")], plots.rule_colors(["bp", "fa", "dfa"]))
    assert tuple(fig.layout.yaxis.range) == (0.0, 1.0)
    for trace in fig.data:
        if trace.error_y.array is not None:
            top, bottom = trace.y[0] + trace.error_y.array[0], trace.y[0] - trace.error_y.arrayminus[0]
            assert 0.0 <= bottom <= top <= 1.0


@pytest.mark.parametrize("values", [[0.5, 0.5, 0.5, 0.5], [0.0, 0.01, 0.99, 1.0], [0.3], [0.9, 0.1, 0.92, 0.11, 0.5]])
def test_labels_spread_apart_within_the_panel(values):
    from bioplaus.analysis.plots import spread

    pos = spread(values, 0.1, 0.0, 1.0)
    assert len(pos) == len(values) and all(0.0 <= p <= 1.0 for p in pos)
    ordered = sorted(pos)
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(ordered, ordered[1:]))
    assert sorted(range(len(values)), key=lambda i: pos[i]) == sorted(range(len(values)), key=lambda i: values[i])
    if len(values) == 1:
        assert pos == values  # a lone label sits at its point


def test_heatmap_scales_colour_per_dataset():
    from bioplaus.analysis import figures

    main = pl.DataFrame({"rule": ["bp", "fa"] * 2, "arch": ["mlp"] * 4,
                         "dataset": ["digits", "digits", "cifar10", "cifar10"], "status": ["ok"] * 4,
                         "test_acc_mean": [0.97, 0.9, 0.5, 0.3], "test_acc_ci95_half": [0.01] * 4,
                         "best": [True, False, True, False], "rank": [1.0, 2.0, 1.0, 2.0], "n_seeds": [3] * 4,
                         "reason": [None] * 4})
    fig = figures.accuracy_heatmap(main, ["bp", "fa"], [("mlp", "digits"), ("mlp", "cifar10")])
    ranges = [(t.zmin, t.zmax) for t in fig.data]
    assert ranges == [(0.9, 0.97), (0.3, 0.5)]


def test_learning_curves_include_each_cells_selected_trial(sweep, data):
    from bioplaus.analysis import plots

    tuning = tables.tuning_table(data, tables.cells_table(data))
    curves = plots.curve_table(data.epochs.collect(), data.trials.collect(), tuning)
    best = tuning.filter((pl.col("rule") == "bp") & (pl.col("arch") == "mlp")).row(0, named=True)
    run_id = f"bp.mlp.digits.t{best['best_trial_number']}"
    expected = data.epochs.filter(pl.col("run_id") == run_id).collect().sort("epoch")
    got = curves.filter((pl.col("rule") == "bp") & (pl.col("arch") == "mlp") & (pl.col("kind") == "best trial"))
    assert got["epoch"].to_list() == expected["epoch"].to_list()
    assert got["mean"].to_list() == pytest.approx(expected["val_acc"].to_list())
    # bp/cnn was tuned but has no finals: its selected trial's curve is still drawn.
    assert set(curves.filter(pl.col("arch") == "cnn")["kind"]) == {"best trial"}
    final = curves.filter((pl.col("arch") == "mlp") & (pl.col("kind") == "final"))
    assert set(final["n"]) == {len(FINAL_SEEDS)}


def test_optuna_views_per_cell_and_skips_with_a_note(sweep, tmp_path):
    import optuna

    from bioplaus.analysis import optuna_figures

    views, notes = optuna_figures.all_study_views(sweep["dir"], None, ["bp.mlp.digits", "bp.cnn.digits", "x.y.z"])
    assert notes == []
    bp_mlp, bp_cnn, missing = views
    assert bp_mlp.complete >= 2 and bp_mlp.history is not None
    assert bp_mlp.importances is not None or any("importances could not" in n for n in bp_mlp.notes)
    assert bp_cnn.history is None and bp_cnn.notes == [
        "bp.cnn.digits: 1 complete trial(s); the history and importances need at least 2"]
    assert missing.notes == ["x.y.z: no Optuna study of this name in the storage"]
    # Importances: numbers where the objective varies (the same every time: seeded), a note where it cannot.
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j")))
    for name, values in (("varies", [0.1, 0.5, 0.2, 0.8, 0.3, 0.6]), ("flat", [0.5] * 6)):
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        for i, v in enumerate(values):
            study.add_trial(optuna.trial.create_trial(
                value=v, params={"lr": 10.0 ** -(i % 4), "width": 8 * (i % 3 + 1)},
                distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1, log=True),
                               "width": optuna.distributions.IntDistribution(8, 24)}))
    varies, again, flat = (optuna_figures.study_views(storage, n) for n in ("varies", "varies", "flat"))
    assert set(varies.importance_values) == {"lr", "width"} and varies.importance_values == again.importance_values
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    direct = get_param_importances(optuna.load_study(study_name="varies", storage=storage),
                                   evaluator=FanovaImportanceEvaluator(seed=optuna_figures.IMPORTANCE_SEED))
    assert varies.importance_values == pytest.approx(dict(direct))  # the bars draw the same numbers
    assert flat.history is not None and flat.importances is None and "importances could not" in flat.notes[0]
    none, why = optuna_figures.all_study_views(tmp_path / "nowhere", None, ["a.b.c"])
    assert none == [] and "optuna.journal does not exist" in why[0]


def test_partial_sweep_reports_without_finals(sweep, tmp_path):
    """A sweep still tuning (no final_runs/finals yet) gets a report with its tuning table."""
    part = tmp_path / "partial"
    part.mkdir()
    for name in ("trials", "epochs"):
        shutil.copytree(sweep["dir"] / name, part / name)
    for name in ("cells.parquet", "manifest.parquet"):
        shutil.copy(sweep["dir"] / name, part / name)
    from bioplaus.analysis.report import build_report

    report = build_report(part)
    main = pl.read_parquet(report.tables["main"])
    assert set(main["status"]) == {"no finals", "unsupported"}
    assert pl.read_parquet(report.tables["tuning"])["trials"].sum() == 7
    assert pl.read_parquet(report.tables["cost"]).height == 0
    html = report.html.read_text()
    assert len(_figures(html)["plotly"]) == 4 and "optuna.journal does not exist" in html


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "no sweep tables" in capsys.readouterr().err


def _brain_rows(rules: list[str]) -> list[dict]:
    """A brain table shaped like the brain step's (analysis/brain.py BRAIN_SCHEMA), made-up similarities."""
    rows = []
    for i, rule in enumerate(rules):
        for control in ("none", "untrained", "pixels"):
            for target, ceiling in (("human_it_mean", (0.25, 0.4)), ("monkey_it", (None, None))):
                for layer in range(3):
                    sim = 0.05 * (layer + 1) + 0.02 * i - (0.05 if control != "none" else 0.0)
                    rows.append({"rule": rule, "arch": "mlp", "dataset": "digits",
                                 "model": f"{rule}.mlp.digits.final1000",
                                 "seed": 1000, "control": control, "layer": layer, "layer_name": f"block{layer}",
                                 "target": target, "method": "spearman", "similarity": sim, "ci_low": sim - 0.03,
                                 "ci_high": sim + 0.03, "noise_ceiling_low": ceiling[0],
                                 "noise_ceiling_high": ceiling[1], "best_layer": layer == 2})
    return rows


@pytest.mark.parametrize("helpers", ["brain_step", "generic"])
def test_report_includes_brain_section_when_present(sweep, tmp_path, monkeypatch, helpers):
    import sys

    from bioplaus.analysis.report import build_report

    if helpers == "generic":
        monkeypatch.setitem(sys.modules, "bioplaus.analysis.brain", None)  # the brain step's helpers unavailable
    copy = tmp_path / "with_brain"
    shutil.copytree(sweep["dir"], copy, ignore=shutil.ignore_patterns("report"))
    rows = _brain_rows(["bp", sweep["other"]])
    for rule in ("bp", sweep["other"]):
        mine = [{k: v for k, v in r.items() if k not in ("rule", "arch", "dataset")}  # hive columns: in the path
                for r in rows if r["rule"] == rule]
        write_table(pa.Table.from_pylist(mine), copy / "brain" / f"rule={rule}" / "arch=mlp" / "dataset=digits" /
                    f"{rule}.mlp.digits.final1000.parquet")
    report = build_report(copy)
    html = report.html.read_text()
    assert "Brain similarity" in html
    brain = pl.read_parquet(report.tables["brain_best"])
    assert set(brain["rule"]) == {"bp", sweep["other"]} and brain["similarity"].null_count() == 0
    # The best layer (layer 2) of the trained network against human IT.
    best = brain.filter((pl.col("rule") == "bp") & (pl.col("target") == "human_it_mean")
                        & (pl.col("control") == "none"))
    assert best["similarity"].to_list() == [pytest.approx(0.15)]
    brain_imgs = [p for k, p in report.figures.items() if k.startswith("brain")]
    assert brain_imgs and all(p.read_bytes().startswith(PNG_MAGIC) for p in brain_imgs)
    assert len(_images(html)) == len(brain_imgs) == len(_figures(html)["image"])
    assert any("generic" in n for n in report.notes) == (helpers == "generic")
    # The brain step's view also saves one row per network (no cross-validated scores here: in-sample only).
    assert ("brain_cv" in report.tables) == (helpers == "brain_step")
    assert report.markdown.read_text().count("## Brain similarity\n") == 1


# --- the report in a real browser ------------------------------------------------------------------------------
WINDOW = (1280, 900)

# Per figure container: did it draw (an image that decoded; plotly's SVG with marks in it, of non-zero width)?
_DREW_JS = """
return Array.prototype.map.call(document.querySelectorAll('.figure'), function (f) {
  if (f.dataset.figure === 'image') {
    var i = f.querySelector('img');
    return [f.title, !!(i && i.complete && i.naturalWidth > 0)];
  }
  var svg = f.querySelector('.js-plotly-plot svg.main-svg');
  var marks = svg ? f.querySelectorAll('svg.main-svg path, svg.main-svg text').length : 0;
  return [f.title, !!(svg && svg.getBoundingClientRect().width > 0 && marks > 0)];
});
"""

# Elements reaching past the right edge of the page (plotly parks a measuring SVG far off to the left:
# an element entirely left of the page is not in the reader's way, so only the right edge counts).
_WIDE_JS = """
var w = document.documentElement.clientWidth, out = [];
document.querySelectorAll('body *').forEach(function (e) {
  var r = e.getBoundingClientRect();
  if (r.width > 0 && r.right > 0 && r.right > w + 1) out.push(e.tagName.toLowerCase() + ' right=' + Math.round(r.right));
});
return [w, document.documentElement.scrollWidth, out.slice(0, 10), out.length];
"""


def _browser_tools() -> tuple[str, str] | str:
    """(chromium, chromedriver), or why the browser test cannot run here."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[dev]')"
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",
                                                               "/usr/lib/chromium/chromedriver") if Path(p).is_file()),
                                                  None)
    if browser is None or driver is None:
        return ("chromium and chromedriver not installed (Debian: apt-get install -y --no-install-recommends "
                "chromium chromium-driver; .ci/run installs them)")
    return browser, driver


@contextlib.contextmanager
def _chrome(tools: tuple[str, str]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = tools[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(tools[1]), options=options)
        try:
            driver.set_page_load_timeout(300)  # a hang guard for a loaded machine, not a timing assertion
            yield driver
        finally:
            driver.quit()


def _open_report(driver, page: Path) -> dict:
    """What the browser saw: console errors, each figure drawn or not, the page's marks, over-wide elements."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(*WINDOW)
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 300).until(lambda d: d.execute_script("return document.body.dataset.figuresOk"))
    width, scroll_width, wide, n_wide = driver.execute_script(_WIDE_JS)
    return {"errors": [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"],
            "drew": dict(driver.execute_script(_DREW_JS)),
            "marks": (int(driver.execute_script("return document.body.dataset.figuresOk")),
                      int(driver.execute_script("return document.body.dataset.figuresBroken"))),
            "width": width, "scroll_width": scroll_width, "wide": wide, "n_wide": n_wide}


def _screenshot(driver, path: Path) -> Path:
    """The whole page, at the test's window width."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WINDOW[0], min(int(height) + 100, 20000))
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path)), f"chromium wrote no screenshot to {path}"
    return path


def test_report_draws_every_figure_in_headless_chromium(sweep, tmp_path_factory):
    """The report in a real browser: no console error, every figure drew (plotly SVG with marks, images
    decoded), nothing reaches past the page's width; the screenshot's path is printed. Negative controls:
    a figure whose data is broken, and an element wider than the page, must each be caught."""
    tools = _browser_tools()
    if isinstance(tools, str):
        pytest.skip(tools)
    page = sweep["dir"] / "report" / "index.html"
    html = page.read_text()
    titles = [t for kind in _figures(html).values() for t in kind]
    shot = Path(os.environ.get("BIOPLAUS_REPORT_SCREENSHOT") or tmp_path_factory.mktemp("browser") /
                "report-screenshot.png")
    with _chrome(tools) as driver:
        seen = _open_report(driver, page)
        assert seen["errors"] == []
        assert seen["drew"] == {t: True for t in titles} and len(titles) >= 4
        assert seen["marks"] == (len(titles), 0)
        assert seen["wide"] == [] and seen["scroll_width"] <= seen["width"], seen
        _screenshot(driver, shot)
        from PIL import Image

        with Image.open(shot) as im:
            assert im.size[0] == WINDOW[0] and im.size[1] > WINDOW[1]
        print(f"report screenshot: {shot}")

        # The first figure's packed JSON broken: it alone fails, and says so in the console.
        from bioplaus.analysis.report_embed import FIGURES_ID, pack

        lines = _packed(html, FIGURES_ID).split("\n")
        assert lines[0].startswith('{"id":"figure-0","data":[')
        lines[0] = lines[0].replace('"data":[', '"data":[{]', 1)
        packed = re.search(rf"id='{FIGURES_ID}'>([^<]+)<", html).group(1)
        broken = tmp_path_factory.mktemp("controls") / "broken.html"
        broken.write_text(html.replace(packed, pack("\n".join(lines))) + "<div style='width:3000px'>wide</div>")
        bad = _open_report(driver, broken)
        assert any("figure-0 failed to draw" in e for e in bad["errors"]), bad["errors"]
        assert bad["drew"]["accuracy heatmap"] is False and bad["marks"] == (len(titles) - 1, 1)
        assert bad["n_wide"] >= 1 and bad["scroll_width"] > bad["width"]
