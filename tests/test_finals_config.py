"""Finals tied to the configuration they ran, a resume that checks what it resumes, rows never overwritten by
another run, and the fault cases of ``bioplaus bench --faults`` that are not covered elsewhere.

* A final run's id holds the hash of its trial config (hp, model, data, epochs; not the seed, not where
  files are); when a rerun moves a cell's best trial, the new best's finals run and the old ones move
  under ``superseded/``: the ``finals`` row's hp and accuracy come from the same runs.
* A rerun into a folder made with other settings is one line, exit 2, nothing written; more trials is allowed.
* SIGINT / SIGTERM during the finals, and a sweep with some cells without finals (``partial``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bioplaus.orchestrator.cli import main
from bioplaus.orchestrator.config import to_plain
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.faults import load_cases, run_case
from bioplaus.orchestrator.results import RunRecord, refuse_other_config, write_run
from bioplaus.orchestrator.run_identity import config_hash
from bioplaus.orchestrator.sweep import Sweep, parse_sweep, read_table
from bioplaus.orchestrator.sweep import driver as sweep_driver
from bioplaus.orchestrator.sweep.cells import Cell, trial_config
from bioplaus.orchestrator.sweep.lifecycle import resume_differences


def plain(*overrides: str, hp: dict | None = None, seed: int = 1000) -> dict:
    cfg = parse_sweep(["preset=smoke", "rules=[bp]", *overrides])
    return trial_config(cfg, Cell("bp", "mlp", "digits"), hp or {"lr": 0.01}, seed, cfg.budget.epochs)


def test_config_hash_names_what_decides_the_numbers_not_the_seed_or_where_files_are():
    base = config_hash(plain())
    assert config_hash(plain(seed=1001)) == base  # the seed is in the run id beside the hash
    assert config_hash(plain("trial.data.root=/elsewhere", "trial.train.threads=3")) == base
    for changed in (plain(hp={"lr": 0.02}), plain("trial.model.widths=[64]"), plain("budget.epochs=5"),
                    plain("trial.data.train_limit=300"), plain("trial.train.batch_size=32")):
        assert config_hash(changed) != base


def sweep_config(*overrides: str) -> dict:
    return to_plain(parse_sweep(["preset=smoke", "rules=[bp,fa]", *overrides]))


def test_resume_differences_name_changed_settings_and_allow_more_trials_only():
    old = sweep_config()
    assert resume_differences(old, sweep_config("budget.trials=5", "budget.final_seeds=4")) == []
    assert resume_differences(old, sweep_config("rules=[fa,bp]", "ray.num_cpus=1", "wandb.mode=offline",
                                                "progress=true", "trial.data.root=/x", "retries=3")) == []
    differ = resume_differences(old, sweep_config("budget.epochs=5", "trial.model.widths=[64]"))
    assert [d.split()[0] for d in differ] == ["budget.epochs", "trial.model.widths"]
    assert differ[0] == "budget.epochs 2 -> 5"
    assert [d.split()[0] for d in resume_differences(old, sweep_config("budget.trials=1"))] == ["budget.trials"]
    assert [d.split()[0] for d in resume_differences(old, sweep_config("trial.hp.lr=0.1"))] == ["trial.hp.lr"]


def test_rerun_with_other_settings_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    d = tmp_path / "s"
    d.mkdir()
    made = to_plain(parse_sweep(["preset=smoke", "rules=[bp]", f"root={tmp_path}", "name=s"]))
    (d / "manifest.json").write_text(json.dumps({"status": "complete", "config_json": json.dumps(made)}))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = main(["sweep", "preset=smoke", "rules=[bp]", f"root={tmp_path}", "name=s", "budget.epochs=5",
                 "trial.model.widths=[64]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "budget.epochs 2 -> 5" in err[0] and "trial.model.widths null -> [64]" in err[0] and "name=" in err[0]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_final_row_is_never_overwritten_by_another_configuration(tmp_path):
    config = plain()
    record = RunRecord(rule="bp", arch="mlp", dataset="digits", seed=1000, status="ok", phase="final",
                       hp={"lr": 0.01}, config=config)
    write_run(tmp_path, record, run_id="x", runs_table="final_runs")
    refuse_other_config(tmp_path, record, "x", runs_table="final_runs")  # the same run again: allowed
    other = RunRecord(rule="bp", arch="mlp", dataset="digits", seed=1000, status="ok", phase="final",
                      hp={"lr": 0.01}, config=plain("budget.epochs=5"))
    with pytest.raises(UsageError, match=rf"row x ran configuration {config_hash(config)}, the new run "
                                         rf"{config_hash(other.config)} \(train.epochs 2 -> 5\)"):
        refuse_other_config(tmp_path, other, "x", runs_table="final_runs")


@pytest.mark.slow
def test_rerun_that_moves_the_best_trial_reruns_the_finals_and_supersedes_the_old(ray_session, tmp_path):
    # While the marker exists the faulty rule learns nothing (zero weights); without it the third trial learns,
    # so it becomes the best one.
    marker = tmp_path / "frozen"
    marker.write_text("")

    def run(trials: int) -> Sweep:
        s = Sweep(parse_sweep(["preset=smoke", f"root={tmp_path}", "name=s", "rules=[faulty]", f"budget.trials={trials}",
                               "budget.final_seeds=2", "budget.grace_epochs=2", f"trial.hp.frozen_while={marker}"]))
        s.run(log=lambda m: None)
        return s

    first = run(2)
    old = first.table("finals").row(0, named=True)
    old_runs = first.table("final_runs")
    assert old["best_trial_number"] == 0 and all(r.endswith(old["config_hash"]) for r in old_runs["run_id"])
    marker.unlink()
    again = run(3)
    trials, runs = again.table("trials"), again.table("final_runs")
    best = trials.sort("val_acc", descending=True).row(0, named=True)
    new = again.table("finals").row(0, named=True)
    assert best["trial_number"] == 2 and new["best_trial_number"] == 2 and new["hp_json"] == best["hp_json"]
    assert new["config_hash"] != old["config_hash"] and again.status == "complete"
    # finals hp and accuracy come from the same runs: the new best's, both seeds
    assert sorted(runs["seed"].to_list()) == [1000, 1001]
    assert [json.loads(c)["hp"] for c in runs["config_json"]] == [json.loads(best["hp_json"])] * 2
    assert all(r.endswith(new["config_hash"]) for r in runs["run_id"])
    assert json.loads(new["final_run_ids_json"]) == sorted(runs["run_id"].to_list())
    assert new["test_acc_mean"] == pytest.approx(sum(runs["test_acc"]) / 2, rel=1e-12)
    # the old ones are kept, with their epoch rows and networks, under superseded/, and nowhere else
    kept = read_table(again.dir, "superseded/final_runs")
    assert sorted(kept["run_id"]) == sorted(old_runs["run_id"])
    assert read_table(again.dir, "superseded/finals")["config_hash"].to_list() == [old["config_hash"]]
    assert sorted(p.stem for p in (again.dir / "superseded" / "models").glob("*.pt")) == sorted(old_runs["run_id"])
    assert sorted(p.stem for p in (again.dir / "models").glob("*.pt")) == sorted(runs["run_id"])
    final_epochs = again.table("epochs").filter(phase="final")
    assert set(final_epochs["run_id"]) == set(runs["run_id"])
    assert set(read_table(again.dir, "superseded/epochs")["run_id"]) == set(old_runs["run_id"])


def test_cells_without_finals_make_the_sweep_partial_with_the_reason_per_cell(ray_session, tmp_path, monkeypatch):
    original = sweep_driver.trial_config

    def cnn_trials_raise(cfg, cell, hp, seed, epochs):  # every trial of one cell fails, the other cell's do not
        return original(cfg, cell, {**hp, "raise_at_step": 1} if cell.arch == "cnn" else hp, seed, epochs)

    monkeypatch.setattr(sweep_driver, "trial_config", cnn_trials_raise)
    s = Sweep(parse_sweep(["preset=smoke", f"root={tmp_path}", "name=s", "rules=[faulty]", "archs=[mlp,cnn]",
                           "budget.trials=1", "budget.final_seeds=1", "retries=0"]))
    s.run(log=lambda m: None)
    m = json.loads((s.dir / "manifest.json").read_text())
    reasons = json.loads(m["cells_without_finals_json"])
    assert s.status == "partial" and m["status"] == "partial" and m["cells_without_finals"] == 1
    assert list(reasons) == ["faulty.cnn.digits"] and "1 failed" in reasons["faulty.cnn.digits"]
    assert s.table("finals")["arch"].to_list() == ["mlp"]


SIGNALS_IN_FINALS = ["SIGINT to the driver during finals", "SIGTERM to the driver during finals"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SIGNALS_IN_FINALS, ids=["SIGINT", "SIGTERM"])
def test_stop_signal_during_finals_exits_128_plus_signal_and_the_same_command_resumes(name, tmp_path):
    row = run_case(load_cases()[name], tmp_path, log=lambda m: None)
    assert row.ok, row.observed
    assert row.status == "interrupted" and row.exit_code == (130 if "SIGINT" in name else 143)


def test_every_fault_case_has_a_name_an_expectation_and_a_function():
    cases = load_cases()
    assert len(cases) >= 13 and all(c.expected and callable(c.run) for c in cases.values())
    for needed in ("during tuning", "during finals", "SIGKILL", "two drivers", "every trial fails", "attempt",
                   "torn", "lost", "corrupt", "stale finals", "another configuration"):
        assert any(needed in name for name in cases), needed


def test_a_fault_case_that_breaks_is_a_fail_row_not_a_crash(tmp_path):
    from bioplaus.orchestrator.faults import FaultCase, markdown_table

    def broken(bench):
        raise RuntimeError("boom")

    row = run_case(FaultCase("broken case", "nothing", broken), tmp_path, log=lambda m: None)
    assert not row.ok and "boom" in row.observed
    assert markdown_table([row]).splitlines()[-1].endswith("| FAIL |")


def test_write_docs_replaces_only_the_marked_section(tmp_path):
    from bioplaus.orchestrator.faults import DOCS_BEGIN, DOCS_END, Row, write_docs

    doc = tmp_path / "r.md"
    doc.write_text(f"head\n{DOCS_BEGIN}\nold table\n{DOCS_END}\ntail\n")
    row = Row("f", "e", "o", 0, 0, 0, "complete", 0, True, 1.0)
    write_docs([row], doc, "bioplaus bench --faults", 12.0)
    text = doc.read_text()
    assert text.startswith("head\n") and text.endswith(f"{DOCS_END}\ntail\n") and "old table" not in text
    assert "1 of 1 OK" in text and "| f | e | o | 0 | 0 | 0 | complete | 0 | OK |" in text
    assert Path(doc).read_text().count(DOCS_BEGIN) == 1
