"""What the tools researchers use around a sweep see: W&B's offline runs and Optuna's study.

The W&B runs are read back from the ``.wandb`` files an offline run writes (wandb's own record format:
a LevelDB-style log of protobuf ``Record`` messages; this wandb writes no ``wandb-history`` or
``config.yaml`` file offline, so the records are the only place the history and config live). The
Optuna study is read with ``optuna.load_study`` on the sweep's ``optuna.journal``, as optuna-dashboard does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import optuna
import polars as pl
import pytest

from bioplaus.orchestrator.sweep import Sweep, parse_sweep
from bioplaus.orchestrator.sweep.search import trial_outcome

CELL = "bp.mlp.digits"
STATES = {"ok": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
          "failed": optuna.trial.TrialState.FAIL}
# Trials one at a time and a reduction factor of 2: from the second trial on, ASHA stops every trial
# below the median of the earlier ones at epoch 1 or 2, so a seeded sweep of six trials prunes some.
PRUNING = ["budget.trials=6", "budget.epochs=3", "budget.grace_epochs=1", "budget.reduction_factor=2",
           "resources.max_concurrent=1", "budget.final_seeds=1"]


def sweep(root: Path, *overrides: str) -> Sweep:
    s = Sweep(parse_sweep(["preset=smoke", f"root={root}", "name=s", *overrides]))
    s.run(log=lambda m: None)
    return s


def wandb_records(path: Path):
    """The protobuf records of one ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(wandb_dir: Path) -> dict[str, dict]:
    """Every offline run under ``wandb_dir``: display name -> group, tags, config, history rows."""
    runs = {}
    for folder in wandb_dir.glob("offline-run-*"):
        run = {"history": [], "config": {}}
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, group=record.run.run_group, tags=list(record.run.tags))
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
        runs[run["name"]] = run
    return runs


@pytest.mark.slow
def test_smoke_sweep_logs_per_epoch_wandb_runs_with_the_full_config_and_a_study_with_pruned_trials(
        ray_session, tmp_path):
    s = sweep(tmp_path, "rules=[bp]", "wandb.mode=offline", *PRUNING)
    trials = s.table("trials").sort("trial_number")
    assert "pruned" in trials["status"].to_list() and "ok" in trials["status"].to_list()

    # W&B: one run per trial and per final run, one history row per epoch as reported, the whole config
    runs = offline_runs(s.dir / "wandb")
    final_id = s.table("final_runs")["run_id"].item()  # <cell>.final<seed>.<config hash>
    assert final_id.startswith(f"{CELL}.final1000.")
    assert set(runs) == {f"{CELL}.t{n}" for n in range(6)} | {final_id}
    for t in trials.iter_rows(named=True):
        run = runs[t["run_id"]]
        assert run["group"] == f"s/{CELL}" and run["tags"] == ["bp", "mlp", "digits", "tune"]
        assert [row["epoch"] for row in run["history"]] == list(range(1, t["epochs_run"] + 1))
        assert [row["val_acc"] for row in run["history"]][-1] <= t["val_acc"]
        c = run["config"]
        assert (c["sweep"], c["phase"], c["rule"], c["arch"], c["dataset"], c["seed"]) == ("s", "tune", "bp", "mlp",
                                                                                            "digits", 0)
        assert c["budget"]["trials"] == 6 and c["budget"]["epochs"] == 3 and c["git_commit"]
        assert c["hp"] == json.loads(t["hp_json"]) and c["trial"]["train"]["epochs"] == 3
    assert max(len(runs[r]["history"]) for r in trials["run_id"]) >= 2
    final = runs[final_id]
    assert final["config"]["phase"] == "final" and len(final["history"]) == 3

    # Optuna: the study says what the table says, pruned trials PRUNED with their intermediate values
    expected = study_view(trials)
    assert optuna_view(s.dir / "optuna.journal") == expected

    # Rebuilt from the tables alone (the journal lost), the study is the same, epoch by epoch.
    (s.dir / "optuna.journal").unlink()
    sweep(tmp_path, "rules=[bp]", "wandb.mode=disabled", *PRUNING)
    assert optuna_view(s.dir / "optuna.journal") == expected


def study_view(trials: pl.DataFrame) -> dict[int, tuple]:
    """What each study trial should be, from the trials table: state, value, epochs reported, attributes."""
    return {t["trial_number"]: (STATES[t["status"]], t["val_acc"], t["epochs_run"],
                                {"run_id": t["run_id"], "attempts": t["attempts"], "table": "trials"})
            for t in trials.iter_rows(named=True)}


def optuna_view(journal: Path) -> dict[int, tuple]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=CELL, storage=storage)
    out = {}
    for t in study.get_trials():
        steps = t.intermediate_values
        assert list(steps) == list(range(1, len(steps) + 1)), steps  # one value per epoch, in order
        assert all(a <= b for a, b in zip(list(steps.values()), list(steps.values())[1:]))  # best so far
        assert t.value == steps[max(steps)]
        out[t.number] = (t.state, t.value, len(steps), t.user_attrs)
    return out


def test_failed_trial_is_a_failed_study_trial_with_its_attempts(failing_trial_sweep):
    s = failing_trial_sweep  # faulty, 1 trial raising at step 2, retries=1, 1 final seed
    row = s.table("trials").row(0, named=True)
    assert row["status"] == "failed" and row["attempts"] == 2
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(s.dir / "optuna.journal")))
    (trial,) = optuna.load_study(study_name="faulty.mlp.digits", storage=storage).get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL and trial.value is None
    assert trial.user_attrs == {"run_id": "faulty.mlp.digits.t0", "attempts": 2, "table": "trials"}


@pytest.mark.parametrize("result, error, state", [
    ({"best_val_acc": 0.5, "epoch": 3, "status": "ok"}, False, "COMPLETE"),
    ({"best_val_acc": 0.5, "epoch": 1, "status": "ok"}, False, "PRUNED"),  # stopped by ASHA before epoch 3
    ({"best_val_acc": 0.2, "epoch": 1, "status": "diverged"}, False, "COMPLETE"),  # its best before the NaN
    ({"best_val_acc": 0.5, "epoch": 3, "status": "ok"}, True, "FAIL"),
    (None, False, "FAIL"),  # removed before it reported (a stop signal)
    ({"best_val_acc": float("nan"), "epoch": 3, "status": "ok"}, False, "FAIL"),
])
def test_trial_outcome_is_the_state_the_trials_table_records(result, error, state):
    got, value = trial_outcome(result, error, planned_epochs=3)
    assert got.name == state
    assert value == (result["best_val_acc"] if state == "COMPLETE" else None)


def test_arch_model_settings_reach_only_their_architectures_cells_and_a_resume_sees_them():
    from bioplaus.orchestrator.sweep.cells import Cell, trial_config, trial_spec
    from bioplaus.orchestrator.sweep.lifecycle import resume_differences

    cfg = parse_sweep(["preset=smoke", "archs=[mlp,cnn]", "arch_model.mlp.widths=[24]",
                       "arch_model.cnn.channels=[4,8]"])
    mlp = trial_config(cfg, Cell("bp", "mlp", "digits"), {}, 0, 1)
    cnn = trial_config(cfg, Cell("bp", "cnn", "digits"), {}, 0, 1)
    assert mlp["model"]["widths"] == [24] and "channels" not in mlp["model"]
    assert cnn["model"]["channels"] == [4, 8] and "widths" not in cnn["model"]
    trial_spec(mlp), trial_spec(cnn)  # both resolve: no key of one architecture reaches the other
    from bioplaus.orchestrator.config import to_plain

    other = parse_sweep(["preset=smoke", "archs=[mlp,cnn]", "arch_model.mlp.widths=[32]",
                         "arch_model.cnn.channels=[4,8]"])
    assert resume_differences(to_plain(cfg), to_plain(other)) == ["arch_model.mlp.widths [24] -> [32]"]


def test_excluded_cells_are_listed_with_the_pattern_and_reason_and_a_pattern_matching_nothing_is_refused():
    from bioplaus.orchestrator.errors import UsageError
    from bioplaus.orchestrator.sweep.cells import plan_cells

    cfg = parse_sweep(["preset=smoke", "rules=[bp,fa,ep]", "archs=[mlp,cnn]", "exclude=['ep.cnn.*: too slow here', fa.mlp.*]"])
    cells, skipped = plan_cells(cfg)
    assert {c.key for c in cells} == {"bp.mlp.digits", "bp.cnn.digits", "fa.cnn.digits", "ep.mlp.digits"}
    reasons = {c.key: why for c, why in skipped}
    assert reasons == {"ep.cnn.digits": "excluded by the sweep's exclude=ep.cnn.*: too slow here",
                       "fa.mlp.digits": "excluded by the sweep's exclude=fa.mlp.*"}
    with pytest.raises(UsageError, match="exclude=epp.\\* matches no cell"):
        plan_cells(parse_sweep(["preset=smoke", "exclude=[epp.*]"]))


def test_stop_signals_pickle_without_the_handlers_they_saved():
    # Tune pickles the searcher and what its callables reach, the driver's StopSignals among them; a saved
    # handler can close over a lock (a local cluster's SIGTERM clean-up), which cannot be pickled.
    import pickle
    import signal
    import threading

    from bioplaus.orchestrator.sweep.lifecycle import StopSignals

    lock = threading.Lock()
    previous = signal.signal(signal.SIGTERM, lambda *a: lock.locked())
    try:
        signals = StopSignals()
        signals.install()
        signals.received = signal.SIGINT
        copy = pickle.loads(pickle.dumps(signals))
        signals.restore()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert copy.received == signal.SIGINT and copy._saved == {}


def test_a_pickled_searcher_leaves_the_sweeps_callables_behind():
    # Tune pickles the searcher into its experiment state; what its callables close over (the driver, its
    # recorder, locks, loggers) belongs to this process and may not pickle at all.
    import pickle
    import threading

    from bioplaus.orchestrator.sweep.search import CellSearcher

    lock = threading.Lock()
    searcher = CellSearcher({}, {"bp.mlp.digits": 2}, {"bp.mlp.digits": lambda hp: {"lock": lock, **hp}},
                            timed_out={"t1": 3.0}, retried={"t1": 1}, stopping=lambda: lock.locked(),
                            budgets=lambda plain: {"lock": lock})
    copy = pickle.loads(pickle.dumps(searcher))
    assert copy.remaining == {"bp.mlp.digits": 2} and copy.timed_out == {"t1": 3.0} and copy.retried == {"t1": 1}
    assert copy.configs == {} and copy.stopping is None and copy.budgets is None
    assert searcher.configs["bp.mlp.digits"]({"lr": 1}) == {"lock": lock, "lr": 1}  # the original keeps them
