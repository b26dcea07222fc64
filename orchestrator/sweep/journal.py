"""The Optuna study is rebuilt from the tables, never the other way round.

The Parquet tables are the sweep's record; the study is only what the sampler learns from. This module
owns keeping the two in step on start: :func:`check_journal` refuses a journal file corrupt in the middle
(before anything is written), :func:`repair_journal` cuts a torn last record back (a backup kept beside
it), and :func:`reconcile_study` adds the trials the tables hold but the study lacks, in trial-number
order, so trial numbers never repeat and TPE sees the whole history. Works for any Optuna storage.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
from omegaconf import DictConfig

from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.search_space import Param
from bioplaus.orchestrator.sweep.search import close_stale_trials, optuna_space, optuna_storage, run_attributes

JOURNAL = "optuna.journal"


def journal_path(cfg: DictConfig, sweep_dir: Path) -> Path | None:
    """The sweep's journal file, or None when the study lives in an RDB (``storage=``)."""
    return None if cfg.storage else Path(sweep_dir) / JOURNAL


def _scan(path: Path) -> int:
    """Byte length of the journal's complete records; UsageError if a complete record is not valid JSON."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            json.loads(line)
        except ValueError:
            raise UsageError(f"the Optuna journal {path} is corrupt at record {number}: move it away (e.g. "
                             f"`mv {path} {path}.bad`) and run again: the study is rebuilt from the tables") from None
    return end


def check_journal(path: Path | None) -> None:
    """Refuse a journal whose complete records are not all valid JSON (a torn last record is repaired later)."""
    if path is not None and path.is_file():
        _scan(path)


def repair_journal(path: Path | None, log: Callable[[str], None]) -> Path | None:
    """Cut a torn last record (a crash or full disk mid-append) back; returns the backup made, or None.

    The file is copied to ``optuna.journal.torn-<timestamp>`` beside it first, and one warning is logged.
    """
    if path is None or not path.is_file():
        return None
    end = _scan(path)
    size = path.stat().st_size
    if end == size:
        return None
    backup = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copy2(path, backup)
    with open(path, "r+b") as f:
        f.truncate(end)
    log(f"warning: the Optuna journal {path} ended in a torn record ({size - end} bytes); cut back to its last "
        f"complete record, the original is kept as {backup}")
    return backup


def _state_and_value(row: dict):
    """The Optuna state and value a trial's row stands for, as :func:`search.trial_outcome` tells them live."""
    from optuna.trial import TrialState

    value = row.get("val_acc")
    if row.get("status") == "failed" or value is None or not math.isfinite(value):
        return TrialState.FAIL, None
    return (TrialState.PRUNED if row.get("status") == "pruned" else TrialState.COMPLETE), value


def intermediate_values(row: dict, epochs: pl.DataFrame | None) -> dict[int, float]:
    """The objective after each epoch (best validation accuracy so far), as the trial reported it live.

    From the trial's epoch rows when given; else its last step alone (``epochs_run`` -> ``val_acc``), which
    is all TPE reads of a pruned trial.
    """
    if epochs is not None and not epochs.is_empty() and row.get("run_id") is not None:
        mine = epochs.filter(pl.col("run_id") == row["run_id"]).sort("epoch")
        if "phase" in mine.columns:
            mine = mine.filter(pl.col("phase") == "tune")
        best, out = 0.0, {}
        for epoch, acc in zip(mine["epoch"].to_list(), mine["val_acc"].to_list()):
            if acc is not None and math.isfinite(acc):
                best = max(best, acc)
            out[int(epoch)] = best
        if out:
            return out
    value, last = row.get("val_acc"), row.get("epochs_run")
    return {int(last): value} if last and value is not None and math.isfinite(value) else {}


def _frozen_trial(row: dict | None, distributions: dict, epochs: pl.DataFrame | None = None):
    """The study trial for one table row (None: a trial number with no row, added as failed)."""
    import optuna
    from optuna.trial import TrialState

    if row is None:
        return optuna.trial.create_trial(state=TrialState.FAIL)
    state, value = _state_and_value(row)
    hp = json.loads(row["hp_json"] or "{}")
    params = {k: hp[k] for k in distributions if k in hp}
    dists = {k: distributions[k] for k in params}
    attrs = run_attributes(row["run_id"], row.get("attempts") or 1) if row.get("run_id") else {}
    steps = intermediate_values(row, epochs) if state != TrialState.FAIL else {}
    try:
        return optuna.trial.create_trial(state=state, value=value, params=params, distributions=dists,
                                         user_attrs=attrs, intermediate_values=steps)
    except ValueError:  # the search space changed since this trial ran: keep its number, not its point
        return optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=attrs)


def reconcile_study(storage, study_name: str, space: dict[str, Param], rows: pl.DataFrame,
                    epochs: pl.DataFrame | None = None) -> int:
    """Add the trials ``rows`` (a cell's tuning rows) hold but the study lacks; returns how many were added.

    Trials are added in trial-number order, numbers without a row as failed trials, so the study's next
    trial number is past every number the tables use. Each gets the state the row records (pruned trials
    PRUNED), its intermediate values (from ``epochs``, the cell's epoch rows, when given) and the user
    attributes naming its row.
    """
    import optuna

    if rows.is_empty():
        return 0
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True)
    have = len(study.get_trials(deepcopy=False))
    by_number = {r["trial_number"]: r for r in rows.iter_rows(named=True) if r["trial_number"] is not None}
    last = max(by_number, default=-1)
    distributions = optuna_space(space)
    for number in range(have, last + 1):
        study.add_trial(_frozen_trial(by_number.get(number), distributions, epochs))
    return max(0, last + 1 - have)


def reconciled_storage(cfg: DictConfig, sweep_dir: Path, cells: dict[str, tuple],
                       log: Callable[[str], None]):
    """The sweep's Optuna storage, in step with the tables: journal repaired, stale trials closed, missing
    trials added. ``cells``: cell key -> (its search space, its tuning rows[, its epoch rows])."""
    repair_journal(journal_path(cfg, sweep_dir), log)
    storage = optuna_storage(cfg, sweep_dir)
    for key, (space, rows, *epochs) in cells.items():
        close_stale_trials(storage, key, rows)
        reconcile_study(storage, key, space, rows, epochs[0] if epochs else None)
    return storage
