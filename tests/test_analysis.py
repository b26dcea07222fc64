"""The analysis: tables, figures and the report of a sweep folder (``bioplaus report SWEEP_DIR``).

One tiny sweep folder is built per module with the real pieces and no Ray: cells and manifest through
``Sweep.write_manifest``, real ``run_trial`` smoke runs on digits written with ``write_run`` (tuning
trials into ``trials``, final runs into ``final_runs``) and ``write_finals``. It holds two rules x
(mlp, cnn): both mlp cells complete (ok, pruned and failed trials; 3 final seeds), bp/cnn tuned but
without finals, fa/cnn not started, plus one unsupported cell - every state a real sweep can be in.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
import shutil
import subprocess
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
    _tune(d, splits, bp_mlp, 0, FINAL_EPOCHS, FINAL_EPOCHS)
    _tune(d, splits, bp_mlp, 1, FINAL_EPOCHS, FINAL_EPOCHS, {"lr": 0.01})
    _tune(d, splits, bp_mlp, 2, FINAL_EPOCHS, 1, {"lr": 0.03})
    # A worker that died more often than retries allow: recorded as the sweep's finals() records it.
    write_run(d, {**bp_mlp, "phase": "tune", "trial_number": 3, "seed": 0, "status": "failed",
                  "error": "RuntimeError: worker died", "epochs_planned": FINAL_EPOCHS, "epochs": []},
              run_id="bp.mlp.digits.t3", runs_table="trials")
    _tune(d, splits, other_mlp, 0, FINAL_EPOCHS, FINAL_EPOCHS)
    _tune(d, splits, other_mlp, 1, FINAL_EPOCHS, 1, {"lr": 0.01})
    _tune(d, splits, {"rule": "bp", "arch": "cnn", "dataset": "digits"}, 0, FINAL_EPOCHS, FINAL_EPOCHS)

    for key, best in best_configs(d).items():
        cell = dict(zip(("rule", "arch", "dataset"), key.split(".")))
        if cell["arch"] != "mlp":
            continue  # the cnn cells stop before their finals (an interrupted sweep)
        for seed in FINAL_SEEDS:
            record = _run(splits, cell, seed, FINAL_EPOCHS, json.loads(best["hp_json"]), test=True)
            record.update(phase="final", epochs_planned=FINAL_EPOCHS)
            write_run(d, record, run_id=f"{key}.final{seed}", runs_table="final_runs")
    write_finals(d, FINAL_EPOCHS)

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


def test_criteria_table_matches_the_registry(sweep):
    from bioplaus.algorithms.registry import load_rules

    rules = ["bp", sweep["other"], "no_such_rule"]
    crit, error = tables.criteria_table(rules)
    assert error is None
    registry = load_rules()
    for rule in rules[:2]:
        mine = crit.filter(pl.col("rule") == rule).sort("criterion")
        declared = registry[rule].criteria
        assert mine["criterion"].to_list() == sorted(declared)
        assert mine["holds"].to_list() == [declared[c].holds for c in sorted(declared)]
        assert mine["test"].to_list() == [declared[c].test for c in sorted(declared)]
        assert mine["criterion_text"].null_count() == 0
    assert crit.filter(pl.col("rule") == "no_such_rule")["registered"].to_list() == [False]
    assert not crit.filter(pl.col("rule") == "bp")["holds"].any()  # the reference violates every criterion


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


def test_report_files_tables_and_images(sweep, main_df):
    d = sweep["dir"] / "report"
    assert sweep["code"] == 0
    assert "digits / mlp" in sweep["stdout"] and "ranking across cells" in sweep["stdout"]
    html = (d / "index.html").read_text()
    md = (d / "report.md").read_text()
    for title in ("Main table", "Ranking", "Cost", "Plausibility criteria", "Tuning", "Learning curves"):
        assert title in html and title in md
    assert "Brain similarity" not in html  # no brain/ table in this sweep
    assert "declared unsupported (test)" in html and "no result" in html
    # Every image is an embedded, decodable PNG whose file is linked and present.
    srcs = _images(html)
    links = re.findall(r"<a href='([^']+)'><img", html)
    assert len(srcs) == 3 and len(links) == 3
    import matplotlib.image as mpimg

    for src, link in zip(srcs, links):
        raw = base64.b64decode(src.split(",", 1)[1])
        assert raw.startswith(PNG_MAGIC) and raw == (d / link).read_bytes()
        h, w = mpimg.imread(io.BytesIO(raw)).shape[:2]
        assert w > 300 and h > 200
    for ref in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (d / ref).is_file()
    # Each table saved as Parquet, equal to what the tables module computes.
    saved = pl.read_parquet(d / "tables" / "main.parquet")
    assert saved.sort("rule", "arch").equals(main_df.sort("rule", "arch"))
    for name in ("cells", "ranks", "cost", "criteria", "tuning"):
        assert pl.read_parquet(d / "tables" / f"{name}.parquet").height > 0


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
    assert len(_images(report.html.read_text())) == 3


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
    assert len(_images(html)) == 3 + len(brain_imgs)
    assert any("generic" in n for n in report.notes) == (helpers == "generic")


# --- the report in a real browser ------------------------------------------------------------------------------
def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _images_in_browser(browser: str, page: Path) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              "--no-first-run",
                              f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                              page.resolve().as_uri()], check=False, capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", out.stdout)
    assert body, f"no DOM from {browser}: {out.stderr[-500:]}"
    marks = dict(re.findall(r'data-images-(ok|broken)="(\d+)"', body.group(1)))
    assert marks, f"the report's load script did not run: {body.group(0)}"
    return {k: int(v) for k, v in marks.items()}


def test_report_opens_in_headless_chromium_without_missing_images(sweep, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y --no-install-recommends chromium; "
                    ".ci/run installs it)")
    page = sweep["dir"] / "report" / "index.html"
    n = len(_images(page.read_text()))
    assert _images_in_browser(browser, page) == {"ok": n, "broken": 0}
    # Negative control: the same page with one corrupted image must be caught.
    html = page.read_text()
    src = _images(html)[0]
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace(src, "data:image/png;base64," + base64.b64encode(b"not a png").decode()))
    assert _images_in_browser(browser, broken) == {"ok": n - 1, "broken": 1}
