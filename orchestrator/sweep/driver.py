"""The sweep driver: one sweep folder, planned, resumed from what its tables hold, and run to the end.

:class:`Sweep` validates everything before Ray starts (cells, search spaces, every trial config, the
data), then tunes every cell in one Ray Tune run, re-runs each cell's best configuration as finals
(Ray tasks), writes the ``finals`` table and the manifest. It is the only writer of its folder.
"""

from __future__ import annotations

from bioplaus.orchestrator import ray_local  # noqa: I001  (sets Ray's loopback environment before ray is imported)

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import ray
import torch
from omegaconf import DictConfig
from ray import tune

from bioplaus.algorithms.registry import load_rules
from bioplaus.orchestrator.checkpoint import write_network_file
from bioplaus.orchestrator.config import to_plain
from bioplaus.orchestrator.criteria import measure_cells
from bioplaus.orchestrator.data.datasets import check_dataset
from bioplaus.orchestrator.errors import UsageError, one_line
from bioplaus.orchestrator.pipeline import final_options, trial_resources
from bioplaus.orchestrator.progress import runs_bar
from bioplaus.orchestrator.run_identity import config_hash
from bioplaus.orchestrator.results import (RunRecord, git_commit, read_table, refuse_other_config,
                                           remove_interrupted_writes, rows_by_cell, unwritable, version, write_run,
                                           write_table)
from bioplaus.orchestrator.search_space import defaults_in_space, load_search_space, searched_space
from bioplaus.orchestrator.sweep.budget import COMPUTE_TIME_ATTR, ComputeBudgets, RunBudget
from bioplaus.orchestrator.sweep.cells import Cell, plan_cells, sampler_seed, trial_config, trial_spec
from bioplaus.orchestrator.sweep.config import check_local_resources
from bioplaus.orchestrator.sweep.estimate import manifest_estimate
from bioplaus.orchestrator.sweep.finals import (SUPERSEDED, best_configs, final_run_id, row_hash, supersede_finals,
                                                write_finals)
from bioplaus.orchestrator.sweep.journal import check_journal, journal_path, reconciled_storage
from bioplaus.orchestrator.sweep.lifecycle import (StopSignals, SweepInterrupted, SweepLock, cell_outcomes,
                                                   check_resume, sweep_status)
from bioplaus.orchestrator.sweep.population import PopulationPlan
from bioplaus.orchestrator.sweep.recording import TrialRecorder, WandbLogger, WriteFailureStopper
from bioplaus.orchestrator.sweep.search import CellASHA, CellSearcher, cell_search
from bioplaus.orchestrator.sweep.workers import final_task, tune_trainable

Log = Callable[[str], None]
AfterFinals = Callable[[Path, Log], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Sweep:
    """One sweep folder: plans cells, resumes from what its tables hold, runs the rest.

    ``after_finals(sweep_dir, log)``: a step run once the finals are written, before the manifest says
    ``complete``. ``brain=true`` needs it (``bioplaus sweep`` passes the brain step of analysis/brain.py):
    the sweep sits below analysis and never imports it.
    """

    def __init__(self, cfg: DictConfig, after_finals: AfterFinals | None = None):
        self.cfg = cfg
        self.dir = Path(cfg.root).expanduser() / cfg.name
        check_resume(self.dir, to_plain(cfg))  # a folder made with other settings is refused before anything else
        self.cells, self.skipped = plan_cells(cfg)
        check_local_resources(cfg)
        if cfg.brain and after_finals is None:
            raise UsageError("brain=true needs the brain step, which `bioplaus sweep` adds; from Python pass "
                             "Sweep(cfg, after_finals=...), or set brain=false and run `bioplaus brain SWEEP_DIR`")
        self.after_finals = after_finals
        self.signals = StopSignals()
        self.status: str | None = None  # the status the last run() ended with (None while running)
        self.rules = load_rules()
        # A hyperparameter set on the command line (trial.hp.lr=...) is pinned: taken out of every search
        # space, so the value given is the value every trial and final run uses.
        self.pinned = dict(to_plain(cfg.trial.hp))
        self.spaces = {c.rule: searched_space(self.rules[c.rule], self.pinned) for c in self.cells}
        self._check_spaces_not_empty()
        self.final_epochs = cfg.budget.final_epochs or cfg.budget.epochs
        # budget.kind=compute: each run's epochs follow from its counted training FLOPs (orchestrator/sweep/budget.py)
        self.budgets = ComputeBudgets(cfg) if cfg.budget.kind == "compute" else None
        # Every trial config a sweep will build is checked now, before Ray starts (and, with budget.kind=compute,
        # every cell's costs are counted: a rule that cannot be counted is refused here).
        for cell in self.cells:
            point = defaults_in_space(self.rules[cell.rule], self.spaces[cell.rule], cell.arch)
            trial_spec(self.run_config(cell, point, cfg.seed, cfg.budget.epochs))
        # From a stored calibration and, with budget.kind=compute, the counts just made: arithmetic only.
        self.estimate = manifest_estimate(cfg, self.cells, self.budgets)
        # Data too, once, here and not in every worker: missing files are downloaded, every file is hashed
        # where its digest is known and parsed whole, so a corrupt or hostile file is refused before Ray starts.
        for name in sorted({c.dataset for c in self.cells}):
            check_dataset(name, cfg.trial.data)
        check_journal(journal_path(cfg, self.dir))  # a corrupt study file is refused before anything is written
        ray_local.check_address(cfg.ray.address)  # a cluster that cannot be joined is refused in seconds

    def run_config(self, cell: Cell, hp: dict, seed: int, budget: int) -> dict:
        """The trial config of a run of ``cell``: ``budget`` epochs, or with budget.kind=compute ``budget``
        bp-epochs of training compute turned into the run's own whole epochs."""
        if self.budgets is None:
            return trial_config(self.cfg, cell, hp, seed, budget)
        return self.budgets.plan(cell, hp, seed, budget)[0]

    def run_budget(self, plain: dict) -> RunBudget:
        """What the run of trial config ``plain`` is given, as its rows record it (costs counted with compute)."""
        epochs = int(plain["train"]["epochs"])
        if self.budgets is None:
            return RunBudget("epochs", epochs)
        return RunBudget("compute", epochs, *self.budgets.costs(plain))

    def _check_spaces_not_empty(self) -> None:
        empty = sorted({c.rule for c in self.cells if not self.spaces[c.rule]})
        unsearched = [r for r in empty if not load_search_space(self.rules[r])]
        if unsearched:
            raise UsageError(f"the search space of {', '.join(unsearched)} has no parameters; add one to its "
                             "search_spaces/<rule>.yaml, or use `bioplaus train` for a single run")
        if empty:
            raise UsageError(f"trial.hp pins every searched hyperparameter of {', '.join(empty)}; "
                             "leave at least one to search, or use `bioplaus train` for a single run")

    def wandb_logger(self, log: Log) -> WandbLogger:
        """The sweep's one W&B logger (tuning and finals share it, so a W&B failure is reported once)."""
        if getattr(self, "_wandb", None) is None:
            self._wandb = WandbLogger(self.cfg, self.dir, log)
        return self._wandb

    # tables ---------------------------------------------------------------------------------------
    def table(self, name: str) -> pl.DataFrame:
        return read_table(self.dir, name)

    def _done(self, table: str) -> dict[str, pl.DataFrame]:
        return rows_by_cell(self.dir, table)

    def write_manifest(self, status: str, started: float, extra: dict | None = None) -> None:
        import optuna  # the driver's alone: the workers, which import this package too, never need it

        row = {"sweep": self.cfg.name, "status": status, "config_json": json.dumps(to_plain(self.cfg), default=str),
               "started_at": started, "updated_at": time.time(), "bioplaus_version": version(),
               "git_commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
               "ray": ray.__version__, "optuna": optuna.__version__, "polars": pl.__version__,
               "cells": len(self.cells), "skipped_cells": len(self.skipped), **self.estimate, **(extra or {})}
        write_table(pa.Table.from_pylist([row]), self.dir / "manifest.parquet")
        try:
            (self.dir / "manifest.json").write_text(json.dumps(row, indent=2, default=str) + "\n")
        except OSError as e:
            raise unwritable(self.dir / "manifest.json", e) from None
        cells = [{**c.record(), "supported": True, "reason": None} for c in self.cells]
        cells += [{**c.record(), "supported": False, "reason": why} for c, why in self.skipped]
        write_table(pa.Table.from_pylist(cells), self.dir / "cells.parquet")

    # tuning ----------------------------------------------------------------------------------------
    def _searchers(self, log: Log = _stderr) -> tuple[dict, dict[str, int], dict]:
        """Per cell with trials left: its OptunaSearch, trials remaining, and its trial-config builder."""
        cfg = self.cfg
        done, epochs = self._done("trials"), self._done("epochs")
        storage = reconciled_storage(cfg, self.dir, {c.key: (self.spaces[c.rule], done.get(c.key, pl.DataFrame()),
                                                             epochs.get(c.key)) for c in self.cells}, log)
        searchers, remaining, configs = {}, {}, {}
        for cell in self.cells:
            rows = done.get(cell.key, pl.DataFrame())
            remaining[cell.key] = max(0, cfg.budget.trials - len(rows))
            if not remaining[cell.key]:
                continue
            space = self.spaces[cell.rule]
            # The rule's defaults are the first point tried in a fresh study.
            first = None if len(rows) else defaults_in_space(self.rules[cell.rule], space, cell.arch)
            searchers[cell.key] = cell_search(cell.key, space, storage, seed=sampler_seed(cfg.seed, cell),
                                              first_point=first, startup_trials=cfg.budget.startup_trials)
            configs[cell.key] = (lambda hp, cell=cell: self.run_config(cell, hp, cfg.seed, cfg.budget.epochs))
        return searchers, remaining, configs

    def tune(self, log: Log) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        cfg = self.cfg
        searchers, remaining, configs = self._searchers(log)
        total = sum(remaining.values())
        log(f"tuning: {len(self.cells)} cells x {cfg.budget.trials} trials, {total} to run "
            f"({cfg.budget.trials * len(self.cells) - total} already done)"
            + (f"; pinned, not searched: {self.pinned}" if self.pinned else ""))
        if not total:
            return
        # resources.population > 1: P study trials per Tune trial, trained as one batched computation
        pop = PopulationPlan(cfg, self.cells, self.rules, self.spaces, log) if cfg.resources.population > 1 else None
        Scheduler, Recorder, Searcher, train = pop.parts() if pop else (CellASHA, TrialRecorder, CellSearcher,
                                                                         tune_trainable)
        scheduler = Scheduler(cfg.budget.epochs, cfg.budget.grace_epochs, cfg.budget.reduction_factor,
                              cfg.budget.trial_timeout_s, pruning=cfg.budget.pruning,
                              time_attr=COMPUTE_TIME_ATTR if self.budgets else "training_iteration")
        recorder = Recorder(self.dir, cfg, self.wandb_logger(log), total, timed_out=scheduler.timed_out,
                            interrupted=lambda: self.signals.received is not None)
        # train.mode=pipeline: a placement group with one bundle per stage group (orchestrator/pipeline.py)
        trainable = tune.with_resources(train, trial_resources(
            cfg.trial.train, cfg.resources.cpus_per_trial, cfg.resources.gpus_per_trial))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=Searcher(searchers, remaining, configs, scheduler.timed_out, recorder.retried,
                                    stopping=WriteFailureStopper(recorder).stop_all,
                                    budgets=(lambda p: self.run_budget(p).tune_config()) if self.budgets else None),
                scheduler=scheduler, num_samples=pop.tune_trials(remaining) if pop else total,
                max_concurrent_trials=cfg.resources.max_concurrent, reuse_actors=True,
                trial_dirname_creator=lambda t: f"{t.config['cell']}.t{t.config['trial_number']}-{t.trial_id}"),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=cfg.ray.storage_path or str((self.dir / "ray_results").resolve()),
                failure_config=tune.FailureConfig(max_failures=cfg.retries), callbacks=[recorder],
                stop=WriteFailureStopper(recorder), verbose=0),
        )
        # The driver's own handlers record SIGINT/SIGTERM and WriteFailureStopper ends the Tune run; Tune's
        # SIGINT handler would end fit() as if the run had finished.
        saved = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        try:
            tuner.fit()
        finally:
            recorder.close()
            if pop:
                pop.close()
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER") if saved is None else os.environ.update(
                TUNE_DISABLE_SIGINT_HANDLER=saved)
        if recorder.write_error is not None:
            raise recorder.write_error
        self.signals.check()

    # finals ----------------------------------------------------------------------------------------
    def _final_configs(self) -> dict[str, tuple[Cell, str, dict[int, dict]]]:
        """Per cell with a best trial: (cell, its configuration hash, seed -> the final run's trial config)."""
        best = best_configs(self.dir)
        seeds = [1000 + k for k in range(self.cfg.budget.final_seeds)]
        out = {}
        for cell in self.cells:
            if cell.key in best:
                hp = json.loads(best[cell.key]["hp_json"])
                plain = {seed: self.run_config(cell, hp, seed, self.final_epochs) for seed in seeds}
                out[cell.key] = (cell, config_hash(plain[seeds[0]]), plain)
        return out

    def _final_todo(self, configs: dict[str, tuple[Cell, str, dict[int, dict]]]) -> list[tuple[Cell, int, dict]]:
        """(cell, seed, plain trial config) of every final run of each cell's best configuration not yet done."""
        done = self._done("final_runs")
        todo = []
        for key, (cell, digest, plain) in configs.items():
            rows = done.get(key, pl.DataFrame())
            have = {r["seed"] for r in rows.iter_rows(named=True) if row_hash(r) == digest}
            todo += [(cell, seed, p) for seed, p in plain.items() if seed not in have]
        return todo

    def _record_final(self, ref, cell: Cell, seed: int, plain: dict, models: Path) -> RunRecord:
        """Write one finished final run: its network file first (a final_runs row always has it), then its rows."""
        try:
            record, model = ray.get(ref)
        except Exception as e:  # worker died more often than retries allow
            record, model = RunRecord(**cell.record(), seed=seed, status="failed", error=one_line(e)), None
        record.phase, record.epochs_planned = "final", int(plain["train"]["epochs"])
        for name, value in self.run_budget(plain).columns().items():
            setattr(record, name, value)
        record.rule, record.arch, record.dataset = cell.rule, cell.arch, cell.dataset
        record.config = plain  # the configuration the run id's hash names
        run_id = final_run_id(cell.key, seed, plain)
        refuse_other_config(self.dir, record, run_id, runs_table="final_runs")
        if model:
            write_network_file(models / f"{run_id}.pt", model)
        write_run(self.dir, record, run_id=run_id, runs_table="final_runs")
        return record

    def finals(self, log: Log) -> None:
        cfg = self.cfg
        configs = self._final_configs()
        current = {key: digest for key, (_, digest, _) in configs.items()}
        for key, n in supersede_finals(self.dir, current).items():
            log(f"finals: {key}'s best configuration changed (now {current[key]}); its {n} earlier final run(s) "
                f"moved to {self.dir / SUPERSEDED}, kept but not in the finals table")
        todo = self._final_todo(configs)
        log(f"finals: {len(todo)} runs to do ({cfg.budget.final_seeds} seeds per cell)")
        remote = ray.remote(final_task).options(**final_options(cfg.trial.train, cfg.resources.cpus_per_trial,
                                                              cfg.resources.gpus_per_trial), max_retries=cfg.retries)
        models = (self.dir / "models").resolve()
        pending = {remote.remote(plain, f"{final_run_id(cell.key, seed, plain)}.pt"): (cell, seed, plain)
                   for cell, seed, plain in todo}
        bar = runs_bar(cfg.progress, "finals", len(pending))
        wandb = self.wandb_logger(log)
        try:
            while pending:
                self.signals.check()  # a stop signal: cancel the rest (finally), record nothing more
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                if not ready:
                    continue
                cell, seed, plain = pending.pop(ready[0])
                record = self._record_final(ready[0], cell, seed, plain, models)
                wandb.log_run(final_run_id(cell.key, seed, plain), cell, "final", record)
                test = record.test_acc if record.test_acc is not None else float("nan")
                bar.update(advance=1, info=f"{cell.key} seed {seed}: test {test:.4f}"[-90:])
        finally:
            for ref in pending:  # left when a write failed or a stop signal came: do not compute what is not recorded
                ray.cancel(ref, force=True)
            bar.close()
            wandb.close()
        write_finals(self.dir, self.final_epochs, current)

    def criteria(self, log: Log) -> None:
        """The ``criteria`` table: every cell's criteria measured at the settings its finals ran with (its best trial's;
        the rule's defaults for a cell without one), seconds per cell on this process's CPU."""
        best = best_configs(self.dir)
        specs = []
        for cell in self.cells:
            hp = (json.loads(best[cell.key]["hp_json"]) if cell.key in best
                  else defaults_in_space(self.rules[cell.rule], self.spaces[cell.rule], cell.arch))
            specs.append(trial_spec(trial_config(self.cfg, cell, hp, self.cfg.seed, self.final_epochs)))
        log(f"criteria: measuring {len(specs)} cells (tables in {self.dir / 'criteria'})")
        measure_cells(specs, self.dir, log, keep_going=True)

    # whole sweep -------------------------------------------------------------------------------------
    def run(self, log: Log = _stderr) -> Path:
        """Tune, finals, manifest; the status it ends with is in ``self.status`` (see lifecycle.STATUSES).

        Holds the folder's lock throughout (a second driver is refused) and records SIGINT/SIGTERM: a stop
        signal ends the run with status ``interrupted`` and :class:`SweepInterrupted`, never with finals.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise unwritable(self.dir, e) from None
        lock = SweepLock(self.dir)
        lock.acquire()
        self.signals.install()
        try:
            return self._run_locked(log)
        finally:
            self.signals.restore()
            lock.release()

    def _run_locked(self, log: Log) -> Path:
        cfg = self.cfg
        self.status = None
        # A driver killed mid-write leaves a temp file (table scans choke on it) or an uncommitted epochs file.
        removed = remove_interrupted_writes(self.dir, runs_tables=("trials", "final_runs"), epochs_table="epochs",
                                            other_tables=("finals",))
        if removed:
            log(f"removed {len(removed)} file(s) an interrupted run left half-written")
        started = time.time()
        self.write_manifest("running", started)
        for c, why in self.skipped:
            log(f"skipped cell {c.key}: {why}")
        ray_started = ray_local.start(self.dir, address=cfg.ray.address, num_cpus=cfg.ray.num_cpus,
                                      num_gpus=cfg.ray.num_gpus, timeout_s=cfg.ray.timeout_s)
        self.signals.install()  # ray.init replaced the SIGTERM handler
        try:
            self.tune(log)
            self.finals(log)
        except SweepInterrupted as stop:
            self.status = "interrupted"
            self.write_manifest("interrupted", started, {"finished_at": time.time(), "signal": stop.signum})
            log(f"{stop}")
            raise
        finally:
            ray_local.stop(ray_started)
        self.criteria(log)
        missing = cell_outcomes([c.key for c in self.cells], self._done("trials"), self._done("final_runs"),
                                self._done("finals"))
        status, extra = sweep_status(len(self.cells), missing)
        if self.after_finals is not None and status != "failed":
            self.after_finals(self.dir, log)
        for key, why in missing.items():
            log(f"cell {key} has no finals: {why}")
        self.status = status
        self.write_manifest(status, started, {"finished_at": time.time(), **extra})
        return self.dir

    def summary(self) -> pl.DataFrame:
        """Best validation accuracy (tuning) and final test accuracy per cell."""
        trials = self.table("trials")
        finals = self.table("finals")
        if trials.is_empty():
            return pl.DataFrame()
        tuned = trials.group_by("rule", "arch", "dataset").agg(
            pl.len().alias("trials"), (pl.col("status") == "pruned").sum().alias("pruned"),
            pl.col("status").is_in(["failed", "diverged"]).sum().alias("failed"),
            pl.col("val_acc").filter(pl.col("val_acc").is_finite()).max().alias("best_val_acc"))
        if finals.is_empty():
            return tuned.sort("rule", "arch", "dataset")
        return tuned.join(finals.select("rule", "arch", "dataset", "test_acc_mean", "test_acc_ci95_low",
                                        "test_acc_ci95_high", "n_seeds"), on=["rule", "arch", "dataset"],
                          how="left").sort("dataset", "arch", pl.col("test_acc_mean").fill_nan(-1), descending=[False, False, True])
