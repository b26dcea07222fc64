"""Driver-side recording of tuning trials: Parquet rows, W&B runs and the live progress view.

:class:`TrialRecorder` is a Ray Tune callback on the driver: it collects each trial's epoch reports and
writes the trial's rows when it ends (results are written by the driver only). :class:`WriteFailureStopper`
ends the Tune run once a write failed. :class:`WandbLogger` is best effort: results never depend on it.
"""

from __future__ import annotations

from bioplaus.orchestrator import ray_local  # noqa: F401, I001  (sets Ray's loopback environment before ray is imported)

import contextlib
import hashlib
import math
import netrc
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig
from ray.tune import Callback
from ray.tune.stopper import Stopper

from bioplaus.orchestrator.errors import UsageError, last_line, one_line
from bioplaus.orchestrator.progress import runs_bar
from bioplaus.orchestrator.config import to_plain
from bioplaus.orchestrator.results import RunRecord, git_commit, refuse_other_config, version, write_run
from bioplaus.orchestrator.sweep.budget import RunBudget
from bioplaus.orchestrator.sweep.cells import Cell
from bioplaus.orchestrator.sweep.search import METRIC


# --- W&B --------------------------------------------------------------------------------------------------
class WandbLogger:
    """One W&B run per trial and per final run (never merged), live from the driver.

    Group ``<sweep name>/<cell>``, tags rule/arch/dataset/phase, config the whole resolved run (sweep,
    phase, rule, arch, dataset, seed, budget, commit, hyperparameters and the full trial config). A tuning
    trial's epochs are logged as Tune hands the driver each report (a dashboard follows a trial while it
    trains); a final run, a Ray task, logs its epochs when it returns. Run ids are derived from the sweep
    name and run id, so a resumed sweep continues the same W&B runs.

    Ray Tune's ``WandbLoggerCallback`` is not used: it takes one group for all trials (not sweep/cell),
    names runs by Tune's random trial id (a resume would start new runs), and sees Tune trials only, not
    the finals; this class keeps its behaviour (live per-epoch logging, one run per trial) without those gaps.

    Results never depend on W&B: online mode with no API key or an unreachable server logs offline
    instead, and any W&B error turns W&B off for the rest of the sweep; each says so in one warning line.
    """

    def __init__(self, cfg: DictConfig, sweep_dir: Path, log=None):
        self.mode = cfg.wandb.mode
        self.cfg = cfg
        self.dir = sweep_dir
        self.runs: dict[str, Any] = {}
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        if self.mode == "online":
            problem = wandb_online_problem()
            if problem:
                self.log(f"warning: W&B online logging is not possible ({problem}); logging offline to "
                         f"{self.dir / 'wandb'} instead (`wandb sync` uploads it later)")
                self.mode = "offline"

    def _failed(self, e: BaseException) -> None:
        self.log(f"warning: W&B logging failed ({one_line(e)}); W&B is off for the rest of this sweep, results "
                 "are still written (check wandb.mode / wandb.project / wandb.entity)")
        self.mode = "disabled"
        runs, self.runs = list(self.runs.values()), {}
        for run in runs:
            with contextlib.suppress(Exception):
                run.finish()

    def run_config(self, cell: Cell, phase: str, plain: dict) -> dict:
        """The W&B config of one run: what identifies it in the sweep and the trial config it ran."""
        return {"sweep": self.cfg.name, "phase": phase, **cell.record(), "seed": plain.get("seed"),
                "budget": to_plain(self.cfg.budget), "git_commit": git_commit(), "bioplaus_version": version(),
                "hp": plain.get("hp", {}), "trial": plain}

    def _start(self, run_id: str, cell: Cell, phase: str, plain: dict):
        if self.mode == "disabled":
            return None
        if run_id not in self.runs:
            import wandb

            self.runs[run_id] = wandb.init(
                project=self.cfg.wandb.project, entity=self.cfg.wandb.entity, mode=self.mode, dir=str(self.dir),
                group=f"{self.cfg.name}/{cell.key}", name=run_id, id=_wandb_id(self.cfg.name, run_id),
                job_type=phase, tags=[cell.rule, cell.arch, cell.dataset, phase],
                config=self.run_config(cell, phase, plain), reinit="create_new", resume="allow",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        return self.runs[run_id]

    def log_epoch(self, run_id: str, cell: Cell, phase: str, plain: dict, row: dict) -> None:
        """One epoch's report of a running trial; ``plain``: its trial config (the run's config if it starts here)."""
        try:
            run = self._start(run_id, cell, phase, plain)
            if run is not None:
                run.log(_numbers(row), step=int(row.get("epoch", 0)))
        except Exception as e:  # W&B is best effort: never let it stop a sweep
            self._failed(e)

    def log_run(self, run_id: str, cell: Cell, phase: str, record: RunRecord) -> None:
        """A run's end: its summary (and, for a final run, its epochs), then the W&B run is finished."""
        try:
            run = self._start(run_id, cell, phase, record.config or {"hp": record.hp, "seed": record.seed})
            if run is None:
                return
            for row in record.epochs if phase == "final" else []:
                run.log(_numbers(row), step=int(row["epoch"]))
            summary = {k: getattr(record, k) for k in ("status", "val_acc", "test_acc", "train_seconds",
                                                       "samples_per_second", "epochs_run", "attempts")}
            run.summary.update({k: v for k, v in summary.items() if v is not None})
            run.finish()
            self.runs.pop(run_id, None)
        except Exception as e:
            self._failed(e)

    def close(self) -> None:
        try:
            for run in self.runs.values():
                run.finish()
            self.runs.clear()
        except Exception as e:
            self._failed(e)


def wandb_online_problem(timeout_s: float = 3.0) -> str | None:
    """Why W&B online logging cannot work from here (no API key, server not answering), or None.

    Checked before any ``wandb.init``: without a key W&B would prompt (and wait) or fail once per run,
    and an unreachable server makes every run retry for minutes.
    """
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    url = urlsplit(base if "://" in base else f"https://{base}")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"server {base} does not answer: {e.strerror or e}"
    if not os.environ.get("WANDB_API_KEY"):
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
        if not has_key:
            return "no API key: set WANDB_API_KEY or run `wandb login`"
    return None


def _numbers(row: dict) -> dict:
    """An epoch row's numeric values, the rule's extra metrics flattened in."""
    out = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    out.update({f"extra/{k}": v for k, v in (row.get("extra") or {}).items()})
    return out


def _wandb_id(sweep: str, run_id: str) -> str:
    return hashlib.sha1(f"{sweep}/{run_id}".encode()).hexdigest()[:16]


# --- Tune callbacks -----------------------------------------------------------------------------------------
class WriteFailureStopper(Stopper):
    """Ends the Tune run as soon as a results write failed (disk full, read-only folder): trials that
    cannot be recorded are wasted work. Sweep.tune then raises the write's one-line error. Also ends it
    when the driver got a stop signal (the recorder's ``interrupted``): Tune polls this at every step."""

    def __init__(self, recorder: TrialRecorder):
        self.recorder = recorder

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.recorder.write_error is not None or self.recorder.interrupted()


class TrialRecorder(Callback):
    """Tune callback on the driver: collects each trial's epoch reports and writes its rows on completion.

    ``timed_out`` is the scheduler's record of trials it stopped for running over ``budget.trial_timeout_s``
    (CellASHA fills it); such a trial is recorded as failed with a "timeout:" error. ``interrupted()``
    tells whether the driver got a stop signal: trials ending after it were cut short by the stop and are
    not recorded (a resume runs them again).
    """

    def __init__(self, sweep_dir: Path, cfg: DictConfig, wandb: WandbLogger, total: int,
                 timed_out: dict[str, float] | None = None, interrupted: Callable[[], bool] = lambda: False):
        self.dir, self.cfg = sweep_dir, cfg
        self.epochs: dict[str, dict[int, dict]] = {}
        self.last: dict[str, dict] = {}
        self.best: dict[str, float] = {}
        self.timed_out = {} if timed_out is None else timed_out
        self.retried: dict[str, int] = {}  # Tune trial id -> retries so far (the searcher's study attempts)
        self.write_error: UsageError | None = None  # a results write failed (disk full, read-only): the sweep stops
        self.interrupted = interrupted
        self.wandb = wandb
        self.bar = runs_bar(cfg.progress, "tuning", total)

    def __getstate__(self):
        # Tune pickles its callbacks into tuner.pkl (for its own restore, which sweeps do not use: they
        # resume from their tables). The live progress view and W&B runs hold locks; leave them out.
        return {k: v for k, v in self.__dict__.items() if k not in ("bar", "wandb", "interrupted")}

    @staticmethod
    def _ids(trial) -> tuple[str, Cell]:
        key = trial.config["cell"]
        return f"{key}.t{trial.config['trial_number']}", Cell.from_key(key)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.epochs[trial.trial_id] = {}
        self.bar.update(running=sum(t.status == "RUNNING" for t in trials))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.epochs[trial.trial_id] = {}  # a retry starts from scratch; its reports replace these
        self.retried[trial.trial_id] = self.retried.get(trial.trial_id, 0) + 1

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = {k: result.get(k) for k in ("epoch", "train_loss", "train_acc", "val_acc", "val_loss",
                                           "epoch_seconds", "samples_per_second", "extra")}
        if row["extra"] is None:  # Tune may hand results over flattened ("extra/<name>")
            row["extra"] = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("extra/")}
        self.epochs.setdefault(trial.trial_id, {})[int(result["epoch"])] = row
        self.last[trial.trial_id] = result
        run_id, cell = self._ids(trial)
        self.wandb.log_epoch(run_id, cell, "tune", trial.config["trial"], row)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, trials, error=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trial, trials, error=self.error_message(trial), errored=True)

    @staticmethod
    def error_message(trial) -> str:
        """The last line of the error a trial ended with (what its row records)."""
        message = "worker failed"
        if trial.error_file and Path(trial.error_file).is_file():
            message = last_line(Path(trial.error_file).read_text()) or message
        return message

    def _record(self, trial, error: str | None, errored: bool = False) -> RunRecord:
        """The trial's run record, from its config and its reports (the last report carries the totals).

        ``errored``: the trial ended in an error after its last allowed attempt; Tune has then counted
        that attempt's failure too, so ``num_failures`` is the number of attempts.
        """
        last = self.last.get(trial.trial_id, {})
        plain = trial.config["trial"]
        reported = self.epochs.get(trial.trial_id, {})
        epochs = [reported[e] for e in sorted(reported)]
        ran = self.timed_out.get(trial.trial_id)
        if ran is not None:
            error = (f"timeout: stopped after {ran:.0f}s, over budget.trial_timeout_s="
                     f"{self.cfg.budget.trial_timeout_s}; raise it if trials are just slow")
        status = "failed" if error else last.get("status", "failed")
        if status == "ok" and len(epochs) < plain["train"]["epochs"]:
            status = "pruned"
        budget = RunBudget.from_tune_config(trial.config.get("budget"), self.cfg.budget.kind, plain["train"]["epochs"])
        return RunRecord(**budget.columns(),
            **Cell.from_key(trial.config["cell"]).record(), phase="tune", seed=plain["seed"], status=status,
            error=error, trial_number=trial.config["trial_number"], node_id=last.get("node_id"),
            attempts=max(1, trial.num_failures) if errored else trial.num_failures + 1, epochs_planned=plain["train"]["epochs"], epochs_run=len(epochs),
            best_epoch=last.get("best_epoch"), val_acc=last.get(METRIC) if epochs else None,
            train_seconds=last.get("train_seconds"),
            **{k: last.get(k) for k in ("n_params", "n_rule_params", "n_train", "n_val", "n_test")},
            peak_mem_mb=last.get("peak_mem_mb"), hp=plain["hp"], config=plain, epochs=epochs,
            samples_per_second=(sum(e["samples_per_second"] * e["epoch_seconds"] for e in epochs)
                                / sum(e["epoch_seconds"] for e in epochs)) if epochs else None)

    def _write(self, trial, trials, error: str | None, errored: bool = False) -> None:
        run_id, cell = self._ids(trial)
        record = self._record(trial, error, errored)
        if self.write_error is not None or self.interrupted():
            return  # cannot be written, or cut short by a stop signal: Tune is being stopped (WriteFailureStopper)
        try:
            refuse_other_config(self.dir, record, run_id, runs_table="trials")
            write_run(self.dir, record, run_id=run_id, runs_table="trials")
        except UsageError as e:  # not raised here: Tune would log it as a traceback and carry on
            self.write_error = e
            return
        self.wandb.log_run(run_id, cell, "tune", record)
        val = record.val_acc if record.val_acc is not None else float("nan")
        if math.isfinite(val) and val > self.best.get(cell.key, -1):
            self.best[cell.key] = val
        self.bar.update(running=sum(t.status == "RUNNING" for t in trials if t is not trial))
        best = max(self.best.values(), default=float("nan"))
        self.bar.update(advance=1, info=f"{run_id} {record.status} val {val:.4f}; best so far {best:.4f}"[-90:])

    def close(self) -> None:
        self.wandb.close()
        self.bar.close()
