"""Population tuning (``resources.population=P``): one Ray Tune trial trains P Optuna trials of a cell at once.

With ``resources.population`` above 1, every cell whose rule can train as a population (``Rule.member_loss``;
orchestrator/population.py) runs its tuning trials P at a time: :class:`PopulationSearcher` asks the cell's study
for P trials and hands them to one Tune trial, whose worker (:func:`population_trainable`) trains them as one
batched computation. Everything else stays per study trial, as with one trial per Tune trial:

* **Optuna**: each member is its own study trial (asked under the id ``<tune id>/<k>``), gets its own intermediate
  value per epoch and is told its own end (COMPLETE, PRUNED or FAIL) as soon as it ends, with the attributes naming
  its row.
* **ASHA**: pruning is decided per member, within its cell, by the same successive-halving rules Tune's
  scheduler applies to single trials (Ray's ``AsyncHyperBandScheduler``, one per cell, with the sweep's
  ``budget.*``), kept in :class:`RungBook`, a Ray actor the workers ask after every epoch (a Tune scheduler
  can only stop a whole Tune trial). A pruned member is dropped from its population; the others train on.
* **Tables**: :class:`PopulationRecorder` writes each member's ordinary rows (``trials``, ``epochs``) under the
  run id ``<cell>.t<n>`` when it ends: pruned, diverged, finished, or failed with its population. Resume, the
  journal's reconciliation, the finals and the report read those rows as they read any trial's.

A population that fails (a raising step fails every member still training) is retried as a whole, the members
already recorded left out; a timed-out one (``budget.trial_timeout_s`` times its members) fails its unrecorded
members. Cells whose rule cannot train as a population run one trial per Tune trial, as with P = 1, and the sweep
says so. ``resources.cpus_per_trial`` and ``resources.gpus_per_trial`` are what one population asks for.
"""

from __future__ import annotations

from bioplaus.orchestrator import ray_local  # noqa: F401, I001  (sets Ray's loopback environment before ray is imported)

import contextlib
import json
import math
import uuid
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import ray
from omegaconf import DictConfig
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from bioplaus.orchestrator.population import population_support, run_population
from bioplaus.orchestrator.search_space import defaults_in_space
from bioplaus.orchestrator.sweep.cells import Cell, trial_config, trial_spec
from bioplaus.orchestrator.sweep.recording import TrialRecorder
from bioplaus.orchestrator.sweep.search import METRIC, CellASHA, CellSearcher
from bioplaus.orchestrator.sweep.workers import tune_trainable


def member_id(tune_id: str, k: int) -> str:
    """The id under which member ``k`` of Tune trial ``tune_id`` is known to its study and the recorder."""
    return f"{tune_id}/{k}"


def is_population(trial) -> bool:
    return "members" in trial.config


def member_rows(result: dict | None) -> list[dict]:
    """The members' rows of a population's epoch report (each what ``run_trial`` reports, with its ``id``, ``node_id``
    and ``done``: whether it is the member's last)."""
    return json.loads((result or {}).get("members_json") or "[]")


# --- the plan -------------------------------------------------------------------------------------------------
class PopulationPlan:
    """Which cells tune as populations (``sizes``: cell key -> P, 1 where the rule cannot) and the rung book
    (:data:`RungBook`, started here, on the driver's Ray)."""

    def __init__(self, cfg: DictConfig, cells: list[Cell], rules: dict, spaces: dict, log: Callable[[str], None]):
        self.sizes: dict[str, int] = {}
        for cell in cells:
            point = defaults_in_space(rules[cell.rule], spaces[cell.rule], cell.arch)
            why = population_support(trial_spec(trial_config(cfg, cell, point, cfg.seed, cfg.budget.epochs)))
            self.sizes[cell.key] = 1 if why else int(cfg.resources.population)
            if why:
                log(f"population: {cell.key} tunes one trial at a time ({why})")
        self.name = f"bioplaus-rungs-{uuid.uuid4().hex[:12]}"
        budget = cfg.budget
        self.book = RungBook.options(name=self.name).remote(budget.epochs, budget.grace_epochs,
                                                            budget.reduction_factor, budget.pruning)

    def tune_trials(self, remaining: dict[str, int]) -> int:
        """How many Tune trials carry the ``remaining`` study trials of every cell."""
        return sum(math.ceil(n / self.sizes.get(key, 1)) for key, n in remaining.items())

    def parts(self) -> tuple:
        """(scheduler class, recorder class, searcher class, trainable) of a population sweep."""
        return (PopulationASHA, partial(PopulationRecorder, book=self.book),
                partial(PopulationSearcher, sizes=self.sizes, book=self.name), population_trainable)

    def close(self) -> None:
        ray.kill(self.book, no_restart=True)


class Rungs:
    """Per cell, the rung records of successive halving over population members (Ray's own ASHA bookkeeping),
    and which members the driver has recorded (a retried population leaves them out)."""

    def __init__(self, max_t: int, grace: int, reduction_factor: int, pruning: bool = True):
        self.pruning = pruning  # False: the rungs are still kept, but no member is stopped early
        self.kwargs = dict(time_attr="training_iteration", metric=METRIC, mode="max", max_t=max_t,
                           grace_period=grace, reduction_factor=reduction_factor)
        self.by_cell: dict[str, AsyncHyperBandScheduler] = {}
        self.recorded: set[str] = set()

    def decide(self, cell: str, reports: list[tuple[str, int, float, bool]]) -> list[str]:
        """The members to stop, of ``reports`` (member id, epoch, best validation accuracy so far, ended by
        itself), each decided as Tune's scheduler decides a trial's report, in the order given."""
        asha = self.by_cell.setdefault(cell, AsyncHyperBandScheduler(**self.kwargs))
        stop = []
        for mid, epoch, value, ended in reports:
            trial = SimpleNamespace(trial_id=mid)
            if mid not in asha._trial_info:
                asha.on_trial_add(None, trial)
            result = {"training_iteration": epoch, METRIC: value}
            decision = asha.on_trial_result(None, trial, result)
            if (decision == TrialScheduler.STOP and self.pruning) or ended:  # Tune then completes the trial with its last result
                asha.on_trial_complete(None, trial, result)
                stop += [] if ended else [mid]
        return stop

    def record(self, ids: list[str]) -> None:
        self.recorded.update(ids)

    def unrecorded(self, ids: list[str]) -> list[str]:
        return [i for i in ids if i not in self.recorded]


RungBook = ray.remote(num_cpus=0)(Rungs)
"""The driver's :class:`Rungs` as a Ray actor, named so that the workers find it."""


# --- the worker -------------------------------------------------------------------------------------------------
def population_trainable(config: dict) -> None:
    """Ray Tune function trainable of a population sweep: a population's members (a single trial as usual)."""
    if "members" not in config:
        return tune_trainable(config)
    node = ray.get_runtime_context().get_node_id()
    book = ray.get_actor(config["rungs"])
    todo = [m for m in config["members"] if m["id"] in set(ray.get(
        book.unrecorded.remote([m["id"] for m in config["members"]]), timeout=120))]
    if not todo:
        return None

    def on_epoch(epoch: int, rows: dict[int, dict]) -> set[int]:
        ended = {i: row["status"] != "ok" or epoch >= todo[i]["trial"]["train"]["epochs"] for i, row in rows.items()}
        stop = set(ray.get(book.decide.remote(config["cell"], [(todo[i]["id"], epoch, row[METRIC], ended[i])
                                                               for i, row in rows.items()]), timeout=120))
        members = [{**row, "id": todo[i]["id"], "node_id": node, "done": ended[i] or todo[i]["id"] in stop}
                   for i, row in rows.items()]
        # as JSON: Tune's result loggers neither flatten nor choke on it
        tune.report({"epoch": epoch, METRIC: max(r[METRIC] for r in members), "members_json": json.dumps(members)})
        return {i for i in rows if todo[i]["id"] in stop}

    records = run_population([trial_spec(m["trial"]) for m in todo], on_epoch=on_epoch, evaluate_test=False)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:  # let Tune retry the population, then record its unrecorded members as failed
        raise RuntimeError(failed[0]["error"])
    return None


# --- the driver's side ------------------------------------------------------------------------------------------
class PopulationSearcher(CellSearcher):
    """:class:`CellSearcher` handing out up to ``sizes[cell]`` study trials per Tune trial (see the module
    docstring); ``book``: the rung book's actor name, which the workers look up."""

    def __init__(self, *args, sizes: dict[str, int], book: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.sizes, self.book = sizes, book
        self.members: dict[str, list[str]] = {}  # Tune trial id -> its members' ids

    def suggest(self, trial_id: str):
        """Tune hook: the next Tune trial's config: a population of the cell with the most budget left."""
        key = self.next_cell()
        if key is None or self.sizes.get(key, 1) == 1:
            return super().suggest(trial_id)
        count = min(self.sizes[key], self.remaining[key])
        self.remaining[key] -= count
        members = []
        for k in range(count):
            number, plain = self.ask(key, member_id(trial_id, k))
            members.append({"id": member_id(trial_id, k), "trial_number": number, "trial": plain})
        self.owner[trial_id], self.members[trial_id] = key, [m["id"] for m in members]
        return {"cell": key, "trial_number": members[0]["trial_number"], "trial": members[0]["trial"],
                "members": members, "rungs": self.book}

    def on_trial_result(self, trial_id: str, result: dict):
        """Tune hook: each member's epoch, its study trial's intermediate value; a member that ended is told."""
        if trial_id not in self.members:
            return super().on_trial_result(trial_id, result)
        key = self.owner[trial_id]
        for row in member_rows(result):
            self._report(self.searchers[key], row["id"], row)
            if row.get("done"):
                self.tell(key, row["id"], None if self.stopping() else row, self.stopping(), self._attempts(trial_id))
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        """Tune hook: the population's end: every member not yet told ends with its last report (or fails)."""
        if trial_id not in self.members:
            return super().on_trial_complete(trial_id, result, error)
        key, last = self.owner[trial_id], {row["id"]: row for row in member_rows(result)}
        failed = error or trial_id in self.timed_out or self.stopping()
        for mid in self.members[trial_id]:
            row = None if failed else last.get(mid)
            self.tell(key, mid, row, failed or row is None, self._attempts(trial_id))
        return None

    def _attempts(self, trial_id: str) -> int:
        return self.retried.get(trial_id, 0) + 1


class PopulationASHA(CellASHA):
    """:class:`CellASHA` for single trials; a population is never stopped by Tune's ASHA (its members are pruned
    one by one through the rung book) and may run ``budget.trial_timeout_s`` times its members."""

    def time_limit(self, trial) -> float:
        return self.trial_timeout_s * len(trial.config.get("members") or [None])

    def on_trial_add(self, tune_controller, trial):
        if not is_population(trial):
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return TrialScheduler.CONTINUE if is_population(trial) else super().on_trial_result(tune_controller, trial,
                                                                                             result)

    def on_trial_complete(self, tune_controller, trial, result):
        if not is_population(trial):
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        if not is_population(trial):
            super().on_trial_remove(tune_controller, trial)


class PopulationRecorder(TrialRecorder):
    """:class:`TrialRecorder` writing each member of a population as its own trial, as soon as it ends."""

    def __init__(self, *args, book, **kwargs):
        super().__init__(*args, **kwargs)
        self.book = book
        self.written: set[str] = set()

    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if k != "book"}

    @staticmethod
    def _members(trial) -> list[SimpleNamespace]:
        """Each member as a trial of its own: its id, config (cell, number, trial config) and the attempts so far."""
        return [SimpleNamespace(trial_id=m["id"], num_failures=trial.num_failures, error_file=trial.error_file,
                                config={"cell": trial.config["cell"], "trial_number": m["trial_number"],
                                        "trial": m["trial"]}) for m in trial.config["members"]]

    def on_trial_recover(self, iteration, trials, trial, **info):
        super().on_trial_recover(iteration, trials, trial, **info)
        if is_population(trial):
            for member in self._members(trial):
                self.epochs[member.trial_id] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not is_population(trial):
            return super().on_trial_result(iteration, trials, trial, result, **info)
        members = {m.trial_id: m for m in self._members(trial)}
        for row in member_rows(result):
            if row["id"] not in self.written:
                super().on_trial_result(iteration, trials, members[row["id"]], row, **info)
                if row.get("done"):
                    self._write_member(members[row["id"]], trials, None)
        return None

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not is_population(trial):
            return super().on_trial_complete(iteration, trials, trial, **info)
        for member in self._members(trial):
            if trial.trial_id in self.timed_out:
                self.timed_out[member.trial_id] = self.timed_out[trial.trial_id]
            self._write_member(member, trials, None)
        return None

    def on_trial_error(self, iteration, trials, trial, **info):
        if not is_population(trial):
            return super().on_trial_error(iteration, trials, trial, **info)
        for member in self._members(trial):
            self._write_member(member, trials, self.error_message(trial), errored=True)
        return None

    def _write_member(self, member, trials, error: str | None, errored: bool = False) -> None:
        if member.trial_id in self.written or self.write_error is not None or self.interrupted():
            return
        self._write(member, trials, error=error, errored=errored)
        if self.write_error is None:
            self.written.add(member.trial_id)
            with contextlib.suppress(Exception):  # only a retry reads it; without it a retry re-trains the member, unrecorded
                ray.get(self.book.record.remote([member.trial_id]), timeout=60)
