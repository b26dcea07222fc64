"""The Optuna study is never a single point of failure: a torn, lost or corrupt study file never loses or
overwrites results (orchestrator/sweep/journal.py). The tables are the record; the study is rebuilt from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import polars as pl
import pytest

from bioplaus.orchestrator.cli import main
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.results import RunRecord, refuse_other_config, write_run
from bioplaus.orchestrator.search_space import Param
from bioplaus.orchestrator.sweep import Sweep, optuna_space, parse_sweep, read_table
from bioplaus.orchestrator.sweep.journal import check_journal, reconcile_study, repair_journal

CELL = "bp.mlp.digits"


def sweep(root: Path, *overrides: str, log=None) -> Sweep:
    s = Sweep(parse_sweep(["preset=smoke", f"root={root}", "name=s", "rules=[bp]", "budget.final_seeds=1", "budget.epochs=1",
                           *overrides]))
    s.run(log=log or (lambda m: None))
    return s


def trial_files(sweep_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (sweep_dir / "trials").rglob("*.parquet")}


def assert_extended(s: Sweep, before: dict[Path, bytes], trials: int) -> pl.DataFrame:
    """``trials`` rows with distinct trial numbers 0..trials-1, the earlier rows byte for byte unchanged."""
    t = read_table(s.dir, "trials")
    assert t.height == trials and sorted(t["trial_number"].to_list()) == list(range(trials))
    assert t["hp_json"].n_unique() == trials  # no configuration was run twice under two ids
    assert {p: p.read_bytes() for p in before} == before
    assert read_table(s.dir, "final_runs").height == 1
    return t


@pytest.mark.slow
def test_torn_journal_tail_is_cut_back_with_one_warning_and_the_sweep_resumes(ray_session, tmp_path):
    s = sweep(tmp_path, "budget.trials=2")
    journal = s.dir / "optuna.journal"
    intact = journal.read_bytes()
    journal.write_bytes(intact[:-37])  # a crash or a full disk in the middle of an append
    before = trial_files(s.dir)
    lines = []
    again = sweep(tmp_path, "budget.trials=3", log=lines.append)
    warnings = [m for m in lines if m.startswith("warning:")]
    assert len(warnings) == 1 and "torn" in warnings[0]
    backups = list(s.dir.glob("optuna.journal.torn-*"))
    assert len(backups) == 1 and str(backups[0]) in warnings[0] and backups[0].read_bytes() == intact[:-37]
    assert_extended(again, before, trials=3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_lost_study_is_rebuilt_from_the_tables_no_trial_number_repeats_no_row_replaced(ray_session, tmp_path, kind):
    db = tmp_path / "optuna.db"
    storage = [f"storage=sqlite:///{db}"] if kind == "sqlite" else []
    s = sweep(tmp_path, "budget.trials=2", *storage)
    study_file = db if kind == "sqlite" else s.dir / "optuna.journal"
    intact = tmp_path / f"intact.{kind}"
    shutil.copy(study_file, intact)
    study_file.unlink()  # deleted, or a new machine given only the tables
    before = trial_files(s.dir)
    again = sweep(tmp_path, "budget.trials=3", *storage)
    t = assert_extended(again, before, trials=3)
    # The rebuilt study holds what the tables hold: same numbers and values.
    study = optuna.load_study(study_name=CELL, storage=storage_at(study_file, kind))
    got = {tr.number: tr.value for tr in study.get_trials() if tr.state.is_finished()}
    assert got == dict(zip(t["trial_number"].to_list(), t["val_acc"].to_list()))
    # TPE (same seed) suggests the same next point from the rebuilt study as from the intact one.
    rebuilt = storage_at(tmp_path / f"rebuilt.{kind}", kind)
    reconcile_study(rebuilt, CELL, bp_space(), pl.concat([pl.read_parquet(p) for p in before], how="diagonal_relaxed"))
    assert next_point(rebuilt) == next_point(storage_at(intact, kind))


def storage_at(path: Path, kind: str):
    if kind == "sqlite":
        return optuna.storages.RDBStorage(f"sqlite:///{path}")
    return journal_storage(path)


def journal_storage(path: Path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def bp_space() -> dict[str, Param]:
    from bioplaus.algorithms.registry import load_rules
    from bioplaus.orchestrator.search_space import load_search_space

    return load_search_space(load_rules()["bp"])


def next_point(storage) -> dict:
    study = optuna.load_study(study_name=CELL, storage=storage, sampler=optuna.samplers.TPESampler(seed=7))
    return study.ask(fixed_distributions=optuna_space(bp_space())).params


def test_journal_corrupt_in_the_middle_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    d = tmp_path / "s"
    d.mkdir()
    journal = d / "optuna.journal"
    journal.write_bytes(b'{"op_code": 0, "worker_id": "w"}\n{"op_code": 4, "wor\n{"op_code": 5}\n')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = main(["sweep", "preset=smoke", "rules=[bp]", f"root={tmp_path}", "name=s"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "corrupt at record 2" in err[0] and "move it away" in err[0] and "rebuilt from the tables" in err[0]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_repair_and_check_on_files(tmp_path):
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    assert repair_journal(journal, pytest.fail) is None  # intact: untouched, no warning
    journal.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    check_journal(journal)  # a torn tail is not corruption
    lines = []
    backup = repair_journal(journal, lines.append)
    assert journal.read_bytes() == b'{"a": 1}\n{"b": 2}\n' and backup.read_bytes().endswith(b'{"c": ')
    assert len(lines) == 1 and str(backup) in lines[0]
    journal.write_bytes(b'{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(UsageError, match="corrupt at record 2"):
        check_journal(journal)


SPACE = {"lr": Param(name="lr", type="loguniform", low=1e-4, high=1.0),
         "width": Param(name="width", type="categorical", choices=[16, 32])}


def _rows(*rows) -> pl.DataFrame:
    return pl.DataFrame([{"trial_number": n, "status": st, "val_acc": v, "hp_json": json.dumps(hp)}
                         for n, st, v, hp in rows], schema={"trial_number": pl.Int64, "status": pl.String,
                                                            "val_acc": pl.Float64, "hp_json": pl.String})


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_reconcile_adds_missing_trials_in_number_order_filling_gaps(tmp_path, kind):
    if kind == "sqlite":
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    else:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j")))
    rows = _rows((0, "ok", 0.5, {"lr": 0.01, "width": 16, "pinned": 3}), (2, "pruned", 0.4, {"lr": 0.1, "width": 32}),
                 (3, "failed", None, {"lr": 0.2, "width": 16}), (4, "diverged", float("nan"), {"lr": 0.9, "width": 32}))
    assert reconcile_study(storage, CELL, SPACE, rows) == 5
    trials = optuna.load_study(study_name=CELL, storage=storage).get_trials()
    S = optuna.trial.TrialState
    assert [(t.number, t.state, t.value) for t in trials] == [
        (0, S.COMPLETE, 0.5), (1, S.FAIL, None), (2, S.PRUNED, 0.4), (3, S.FAIL, None), (4, S.FAIL, None)]
    assert trials[0].params == {"lr": 0.01, "width": 16}
    assert reconcile_study(storage, CELL, SPACE, rows) == 0  # already in step: nothing added twice
    nxt = optuna.load_study(study_name=CELL, storage=storage).ask(fixed_distributions=optuna_space(SPACE))
    assert nxt.number == 5


def test_a_tuning_row_is_never_overwritten_by_another_configuration(tmp_path):
    record = RunRecord(rule="bp", arch="mlp", dataset="digits", seed=0, status="ok", phase="tune", hp={"lr": 0.1})
    write_run(tmp_path, record, run_id=f"{CELL}.t0", runs_table="trials")
    refuse_other_config(tmp_path, record, f"{CELL}.t0", runs_table="trials")  # the same run again: allowed
    other = RunRecord(rule="bp", arch="mlp", dataset="digits", seed=0, status="ok", phase="tune", hp={"lr": 0.2})
    with pytest.raises(UsageError, match=r'bp.mlp.digits.t0 holds hp \{"lr": 0.1\}.*new run has hp \{"lr": 0.2\}'):
        refuse_other_config(tmp_path, other, f"{CELL}.t0", runs_table="trials")
