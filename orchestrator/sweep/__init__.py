"""Sweeps: Optuna-tuned, ASHA-pruned trials of every rule x arch x dataset cell on Ray, then finals.

Data flows one way: sweep config -> cells -> tuning trials (Ray Tune) -> finals (Ray tasks) -> Parquet.

* **Cells** are rules x archs x datasets minus what a rule declares unsupported (kept, with the reason,
  in ``cells.parquet``). Everything is validated (names, search spaces, trial configs) before Ray starts.
* **Tuning**: one Optuna study per cell (TPE, seeded), all in one persistent storage (a journal file in
  the sweep folder, or an RDB URL), each wrapped in Ray Tune's ``OptunaSearch``. One Tuner runs every
  cell: :class:`CellSearcher` hands out the next trial of the cell with the most budget left, so cells
  interleave and the workers stay busy; :class:`CellASHA` prunes with one ASHA per cell, so trials are
  only compared with trials of their own cell. Every cell gets the same trial and epoch budget.
  Objective: the best validation accuracy so far (``best_val_acc``); the test set is not touched.
* **Finals**: each cell's best configuration is re-run with ``budget.final_seeds`` seeds and evaluated
  on the test set; ``finals`` holds mean, std and a 95 % t-interval per cell, from the final runs of that
  configuration only (their ids hold its hash; runs of an earlier best are moved under ``superseded/``). With ``brain=true``,
  ``bioplaus sweep`` then runs the brain-similarity step (analysis/brain.py) on the final networks.
* **Results** are written by the driver only, atomically, keyed by deterministic ids (cell + Optuna
  trial number, cell + final seed + configuration hash), so a rerun after a crash neither repeats nor duplicates anything:
  completed work is read back from the Parquet tables, Optuna trials left RUNNING by a dead driver
  are closed, and only the missing trials and finals run. The tables are the record: a lost or torn
  study is rebuilt from them (``journal``), and a row is never overwritten by another configuration. A
  rerun into a folder made with other settings is refused (``lifecycle.check_resume``); raising
  ``budget.trials`` or ``budget.final_seeds`` extends the sweep.

Modules: ``config`` (SweepConfig, presets, ``parse_sweep`` and its checks), ``cells`` (Cell, ``plan_cells``,
``trial_config``), ``search`` (the Optuna/ASHA adapters), ``workers`` (what runs on Ray workers),
``journal`` (the study kept in step with the tables),
``recording`` (the Tune callback writing trials, W&B), ``lifecycle`` (the folder lock, stop signals, the
manifest status), ``finals`` (best configurations, the finals table),
``driver`` (:class:`Sweep`). Reading a sweep folder back is :mod:`bioplaus.orchestrator.results`'s.
"""

from bioplaus.orchestrator import ray_local  # noqa: F401, I001  (sets Ray's loopback environment before ray is imported)

import importlib

from bioplaus.orchestrator.sweep.cells import Cell, plan_cells, trial_config, trial_spec
from bioplaus.orchestrator.sweep.config import (PRESETS, BudgetConfig, RayConfig, ResourcesConfig, SweepConfig,
                                                WandbConfig, check_local_resources, parse_sweep)

# Imported on first use: these need Ray, Optuna or Polars, and planning a sweep (its config, its cells, their
# cost estimate) must work where they are not installed, e.g. on a GPU machine that only times trials.
_LAZY = {
    "results": ("read_table", "rows_by_cell"),
    "sweep.driver": ("Sweep",),
    "sweep.finals": ("best_configs", "final_run_id", "supersede_finals", "write_finals"),
    "sweep.lifecycle": ("EXIT_CODES", "STATUSES", "StopSignals", "SweepInterrupted", "SweepLock", "check_resume"),
    "sweep.recording": ("TrialRecorder", "WandbLogger", "WriteFailureStopper", "wandb_online_problem"),
    "sweep.search": ("METRIC", "CellASHA", "CellSearcher", "cell_search", "close_stale_trials", "optuna_space",
                     "optuna_storage"),
    "sweep.workers": ("final_task", "tune_trainable"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"bioplaus.orchestrator.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EXIT_CODES", "METRIC", "PRESETS", "STATUSES", "StopSignals", "SweepInterrupted", "SweepLock", "BudgetConfig", "Cell", "CellASHA", "CellSearcher", "RayConfig", "ResourcesConfig", "Sweep",
    "SweepConfig", "TrialRecorder", "WandbConfig", "WandbLogger", "WriteFailureStopper", "best_configs",
    "cell_search", "check_local_resources", "check_resume", "final_run_id", "supersede_finals", "close_stale_trials", "final_task", "optuna_space", "optuna_storage",
    "parse_sweep", "plan_cells", "read_table", "rows_by_cell", "trial_config", "trial_spec", "tune_trainable",
    "wandb_online_problem", "write_finals",
]
