"""Search and scheduling: one Optuna study and one ASHA per cell, one Ray Tune run for all cells.

:class:`CellSearcher` is the Tune search algorithm: it holds one ``OptunaSearch`` per cell and hands
each new trial to the cell with the most budget left, so cells interleave and the workers stay busy.
:class:`CellASHA` is the Tune scheduler: one ASHA per cell, so a trial is only ever compared with trials
of its own cell; it also enforces the per-trial wall-clock limit. Every trial's Tune config is
``{"cell": key, "trial_number": n, "trial": <plain trial config>}``.
"""

from __future__ import annotations

from bioplaus.orchestrator import ray_local  # noqa: F401, I001  (sets Ray's loopback environment before ray is imported)

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import polars as pl
import ray
from omegaconf import DictConfig
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import Searcher

from bioplaus.orchestrator.search_space import Param

logger = logging.getLogger(__name__)

METRIC = "best_val_acc"
"""The objective every cell maximises: the best validation accuracy so far (the test set is never used)."""


# --- Optuna --------------------------------------------------------------------------------------------
def optuna_space(space: dict[str, Param]) -> dict:
    """A rule's search space as Optuna distributions."""
    import optuna.distributions as d

    out = {}
    for p in space.values():
        if p.type == "categorical":
            out[p.name] = d.CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            out[p.name] = d.IntDistribution(int(p.low), int(p.high), log=p.log, step=p.step or 1)
        else:
            out[p.name] = d.FloatDistribution(float(p.low), float(p.high), log=p.type == "loguniform")
    return out


def optuna_storage(cfg: DictConfig, sweep_dir: Path):
    """The sweep's one Optuna storage: ``cfg.storage`` (an RDB URL), else a journal file in the sweep folder."""
    import optuna

    if cfg.storage:
        return optuna.storages.RDBStorage(cfg.storage)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))


def cell_search(study_name: str, space: dict[str, Param], storage, seed: int, first_point: dict | None,
                startup_trials: int):
    """The ``OptunaSearch`` of one cell: a seeded TPE study in ``storage``, trying ``first_point`` first if given,
    then drawing at random until ``startup_trials`` trials have finished, then modelling them (TPE).

    A study resumed with trials in it seeds its sampler with ``seed`` and that count: with ``seed`` alone, a
    rerun would replay the draws of the run that started the study and repeat its configurations.
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    try:
        done = len(optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False))
    except KeyError:
        done = 0
    sampler_seed = seed if not done else (seed * 1_000_003 + done) % 2**32
    return OptunaSearch(space=optuna_space(space), metric=METRIC, mode="max", study_name=study_name, storage=storage,
                        sampler=optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=startup_trials),
                        points_to_evaluate=None if first_point is None else [first_point])


def close_stale_trials(storage, study_name: str, rows: pl.DataFrame) -> None:
    """Optuna trials a dead driver left RUNNING: tell the outcome the tables hold (pruned trials PRUNED,
    with the intermediate values reported before the crash), else mark them failed."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return
    recorded = {} if rows.is_empty() else {r["trial_number"]: r for r in rows.iter_rows(named=True)}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        row = recorded.get(t.number) or {}
        value = row.get("val_acc")
        if row.get("run_id"):
            for name, attr in run_attributes(row["run_id"], row.get("attempts") or 1).items():
                study._storage.set_trial_user_attr(t._trial_id, name, attr)
        if row.get("status") == "failed" or value is None or not math.isfinite(value):
            study.tell(t.number, state=TrialState.FAIL)
        elif row.get("status") == "pruned":
            if not t.intermediate_values and row.get("epochs_run"):
                study._storage.set_trial_intermediate_value(t._trial_id, int(row["epochs_run"]), float(value))
            study.tell(t.number, state=TrialState.PRUNED)
        else:
            study.tell(t.number, value, state=TrialState.COMPLETE)


def trial_outcome(result: dict | None, error: bool, planned_epochs: int):
    """The Optuna state and value of a finished tuning trial, as the trials table records it.

    Ray's OptunaSearch tells every trial with a result COMPLETE; a trial ASHA stopped early is PRUNED here
    (Optuna then takes its last intermediate value as its value, which is how TPE and the dashboard treat
    pruned trials), an error or a timeout is FAIL, and so is a trial with no finite objective.
    """
    from optuna.trial import TrialState

    value = (result or {}).get(METRIC)
    if error or value is None or not math.isfinite(value):
        return TrialState.FAIL, None
    if result.get("status") == "ok" and int(result.get("epoch") or 0) < planned_epochs:
        return TrialState.PRUNED, None
    return TrialState.COMPLETE, float(value)


def run_attributes(run_id: str, attempts: int) -> dict[str, Any]:
    """The user attributes of a study trial that point at its Parquet rows (``trials``/``epochs`` tables)."""
    return {"run_id": run_id, "attempts": int(attempts), "table": "trials"}


# --- the Tune search algorithm ---------------------------------------------------------------------------
class CellSearcher(Searcher):
    """Multiplexes one OptunaSearch per cell; the next trial goes to the cell with most budget left.

    ``searchers``: cell key -> OptunaSearch; ``remaining``: cell key -> trials still to run;
    ``configs``: cell key -> function from a hyperparameter point to the plain trial config;
    ``timed_out``: the scheduler's record of trials it stopped for running too long (shared, filled later);
    ``retried``: Tune trial id -> times it was retried (the recorder's, shared): the study trial's ``attempts``;
    ``stopping()``: whether the sweep is being stopped (a stop signal, a failed write): trials ending then
    are not recorded (a resume runs them again), so the study marks them FAIL rather than learn from them;
    ``budgets``: trial config -> its budget for the Tune config's ``budget`` key (None: no such key).
    """

    def __init__(self, searchers: dict[str, Any], remaining: dict[str, int],
                 configs: dict[str, Callable[[dict], dict]], timed_out: dict[str, float],
                 retried: dict[str, int] | None = None, stopping: Callable[[], bool] = lambda: False,
                 budgets: Callable[[dict], dict | None] | None = None):
        super().__init__(metric=METRIC, mode="max")
        self.budgets = budgets  # trial config -> what its Tune config says of its budget (budget.kind=compute)
        self.searchers, self.remaining, self.configs = searchers, dict(remaining), configs
        self.timed_out = timed_out
        self.retried = {} if retried is None else retried
        self.stopping = stopping
        self.order = list(searchers)
        self.owner: dict[str, str] = {}  # Tune trial id -> cell key
        self.planned: dict[str, int] = {}  # Tune trial id -> epochs it was planned to run

    def set_search_properties(self, metric, mode, config, **spec):
        """Tune hook: metric and mode are fixed here (METRIC, max); accept whatever Tune passes."""
        return True

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles the searcher into its experiment state. The callables it was given are this process's
        (trial-config builders, the stop check, the budgets: they reach the sweep driver, its signal handlers
        and its W&B logger), and a resume rebuilds them from the tables, so a pickled copy leaves them out."""
        state = self.__dict__.copy()
        state.update(configs={}, stopping=None, budgets=None)
        return state

    def save(self, checkpoint_path: str):
        """Tune hook: nothing to save; resume state lives in Optuna's storage and the tables."""

    def restore(self, checkpoint_path: str):
        """Tune hook: nothing to restore (see :meth:`save`)."""

    def suggest(self, trial_id: str):
        """Tune hook: the next trial's config, from the cell with the most budget left (ties: the first cell)."""
        key = self.next_cell()
        if key is None:
            return Searcher.FINISHED
        self.remaining[key] -= 1
        number, plain = self.ask(key, trial_id)
        budget = self.budgets(plain) if self.budgets else None
        return {"cell": key, "trial_number": number, "trial": plain, **({"budget": budget} if budget else {})}

    def next_cell(self) -> str | None:
        """The cell with the most budget left (ties: the first cell); None when every cell is done."""
        open_cells = [k for k in self.order if self.remaining[k] > 0]
        return max(open_cells, key=lambda k: (self.remaining[k], -self.order.index(k))) if open_cells else None

    def ask(self, key: str, trial_id: str) -> tuple[int, dict]:
        """A new study trial of cell ``key``, known here as ``trial_id``: its number and its trial config."""
        searcher = self.searchers[key]
        hp = searcher.suggest(trial_id)
        self.owner[trial_id] = key
        # The Optuna trial number: the trial's stable id within its cell (run ids and resume are keyed on it).
        number = searcher._ot_trials[trial_id].number
        plain = self.configs[key](hp)
        self.planned[trial_id] = int(plain["train"]["epochs"])
        return number, plain

    def on_trial_result(self, trial_id: str, result: dict):
        """Tune hook: an epoch's report, the study trial's intermediate value at that epoch."""
        self._report(self.searchers[self.owner[trial_id]], trial_id, result)

    @staticmethod
    def _report(searcher, trial_id: str, result: dict | None) -> None:
        """``result``'s objective as the intermediate value at its epoch (Optuna's step), once per epoch: a
        retry's reports of epochs already reported are left out, as Optuna would ignore them with a warning."""
        if not result or result.get(METRIC) is None or result.get("epoch") is None:
            return
        ot_trial, epoch = searcher._ot_trials[trial_id], int(result["epoch"])
        if epoch not in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(float(result[METRIC]), epoch)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        """Tune hook: the trial's end, told to its cell's study with the state the trials table records
        (see :func:`trial_outcome`; a trial stopped for time is a failure) and attributes naming its row."""
        key = self.owner.get(trial_id)
        if key is None:
            return
        if trial_id in self.timed_out or self.stopping():
            result, error = None, True
        self.tell(key, trial_id, result, error, self.retried.get(trial_id, 0) + 1)

    def tell(self, key: str, trial_id: str, result: dict | None, error: bool, attempts: int) -> None:
        """Tell study trial ``trial_id`` of cell ``key`` its end (once): its last value, state and row attributes."""
        searcher = self.searchers[key]
        if trial_id in searcher._completed_trials:
            return
        # Tune hands the searcher no on_trial_result for the report that ends a trial (ASHA's stop, the last
        # epoch): that epoch's value arrives here.
        self._report(searcher, trial_id, result)
        ot_trial = searcher._ot_trials[trial_id]
        for name, value in run_attributes(f"{key}.t{ot_trial.number}", attempts).items():
            ot_trial.set_user_attr(name, value)
        state, value = trial_outcome(result, error, self.planned.get(trial_id, 0))
        try:
            searcher._ot_study.tell(ot_trial, value, state=state)
        except Exception as e:  # the study is what TPE learns from, never the record: the tables are
            logger.warning("could not tell Optuna the end of %s: %s", trial_id, e)
        searcher._completed_trials.add(trial_id)


# --- the Tune scheduler ----------------------------------------------------------------------------------
class CellASHA(FIFOScheduler):
    """ASHA per cell: a trial is only ever compared with trials of its own cell.

    ``time_attr``: the result key ASHA's rungs count (epochs, or bp-epochs of compute spent with
    budget.kind=compute); ``pruning=False``: no trial is stopped early (every one runs its whole budget).
    Also enforces ``budget.trial_timeout_s``: Tune asks the scheduler which trial to run next at every
    step of its loop, so that is where running trials are timed (a hung trial sends no result that a
    result-based stopper could act on). A trial over the limit is stopped and noted in ``timed_out``.
    """

    def __init__(self, max_t: int, grace: int, reduction_factor: int, trial_timeout_s: float | None = None,
                 time_attr: str = "training_iteration", pruning: bool = True):
        super().__init__()
        self.kwargs = dict(time_attr=time_attr, metric=METRIC, mode="max", max_t=max_t,
                           grace_period=grace, reduction_factor=reduction_factor)
        self.pruning = pruning
        self.by_cell: dict[str, AsyncHyperBandScheduler] = {}
        self.trial_timeout_s = trial_timeout_s
        self.running_since: dict[str, float] = {}
        self.timed_out: dict[str, float] = {}  # trial id -> seconds it had run when stopped

    def choose_trial_to_run(self, tune_controller):
        """Tune hook, called at every step of Tune's loop: first stop running trials over the time limit."""
        if self.trial_timeout_s:
            self._stop_overdue(tune_controller)
        return super().choose_trial_to_run(tune_controller)

    def _stop_overdue(self, tune_controller) -> None:
        now = time.monotonic()
        for trial in list(tune_controller.get_live_trials()):
            if trial.status != "RUNNING":
                self.running_since.pop(trial.trial_id, None)  # a retry gets the whole limit again
                continue
            ran = now - self.running_since.setdefault(trial.trial_id, now)
            if ran > self.time_limit(trial) and trial.trial_id not in self.timed_out:
                self.timed_out[trial.trial_id] = ran
                # A hung step never returns, so the actor would never run Tune's polite stop and keep
                # its CPUs until Tune's final clean-up: kill its process once Tune has let go of it.
                actor = trial.temporary_state.ray_actor
                tune_controller.stop_trial(trial)
                if actor is not None:
                    ray.kill(actor, no_restart=True)

    def time_limit(self, trial) -> float:
        """Seconds ``trial`` may run: ``budget.trial_timeout_s``."""
        return self.trial_timeout_s

    def _of(self, trial) -> AsyncHyperBandScheduler:
        key = trial.config["cell"]
        if key not in self.by_cell:
            self.by_cell[key] = AsyncHyperBandScheduler(**self.kwargs)
        return self.by_cell[key]

    def on_trial_add(self, tune_controller, trial):
        """Tune hook: a new trial, handed to its cell's ASHA."""
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        """Tune hook: an epoch's report; the cell's ASHA decides whether the trial continues."""
        if not self.pruning:
            return FIFOScheduler.CONTINUE
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        """Tune hook: a finished trial, handed to its cell's ASHA."""
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        """Tune hook: a trial removed (stopped or failed), handed to its cell's ASHA."""
        self._of(trial).on_trial_remove(tune_controller, trial)
