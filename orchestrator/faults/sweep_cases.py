"""Fault cases of the sweep driver: stop signals, kills, a second driver, failing trials, the Optuna journal,
stale finals and a resume with another configuration. Each runs real ``bioplaus sweep`` processes of the
faulty rule (algorithms/faulty.py) on digits with the smoke preset, in its own folder."""

from __future__ import annotations

import json
import signal

from bioplaus.orchestrator.faults import Outcome, fault
from bioplaus.orchestrator.faults.harness import Bench, Finished


def _verdict(checks: dict[str, bool]) -> tuple[bool, str]:
    """(all held, the ones that did not, named) for an Outcome."""
    failed = [name for name, held in checks.items() if not held]
    return not failed, ("" if not failed else "; NOT: " + ", ".join(failed))


def _held(bench: Bench, *extra: str, trials: int = 4, skip: int = 1) -> tuple[str, ...]:
    """One run at a time; the first ``skip`` runs go on and the next one hangs at its first step (it creates
    ``<folder>/hung``), so a signal or a second driver always finds the sweep at that point, however fast or
    slow the machine. The same command run again finds the marker: nothing hangs."""
    return (f"budget.trials={trials}", "resources.max_concurrent=1", "trial.hp.hang_at_step=1",
            f"trial.hp.hang_once_marker={bench.folder / 'hung'}", f"trial.hp.hang_skip={skip}", *extra)


def _hung(bench: Bench):
    return (bench.folder / "hung").exists


def _stopped_then_resumed(bench: Bench, sig: int, args: list[str], until, phase: str, trials_n: int) -> Outcome:
    stopped = bench.interrupt(args, until, sig=sig)
    m = bench.manifest()
    before = bench.snapshot()
    no_finals = bench.table("finals").is_empty()
    again = bench.sweep(args)
    c = bench.counts(before)
    trials = bench.table("trials")
    ok, why = _verdict({
        f"exit {128 + sig}": stopped.code == 128 + sig, "status interrupted": m.get("status") == "interrupted",
        "no finals table": no_finals, "resume exit 0": again.code == 0,
        "resumed complete": bench.manifest().get("status") == "complete",
        "every trial once": trials.height == trials_n and trials["trial_number"].n_unique() == trials_n,
        "every final once": bench.table("final_runs").height == 1})
    return Outcome(f"{signal.Signals(sig).name} in {phase}: exit {stopped.code}, status {m.get('status')}; "
                   f"the same command resumed: exit {again.code}, {bench.manifest().get('status')}, "
                   f"{trials.height} trials, {bench.table('final_runs').height} final{why}",
                   ok, m.get("status"), stopped.code, c.lost, c.duplicated, c.rerun)


def _during_tuning(sig: int):
    def case(bench: Bench) -> Outcome:
        # The first trial is committed and the second hangs.
        one, hung = bench.has_rows("trials"), _hung(bench)
        return _stopped_then_resumed(bench, sig, bench.args(*_held(bench)), lambda lines: one(lines) and hung(),
                                     "tuning", 4)
    return case


def _during_finals(sig: int):
    def case(bench: Bench) -> Outcome:
        # Both tuning trials go on and the final run hangs: the signal lands while it runs.
        hung = _hung(bench)
        started = lambda lines: hung() and any(line.startswith("finals:") for line in lines)  # noqa: E731
        return _stopped_then_resumed(bench, sig, bench.args(*_held(bench, trials=2, skip=2)), started, "finals", 2)
    return case


for _sig in (signal.SIGINT, signal.SIGTERM):
    _name = signal.Signals(_sig).name
    fault(f"{_name} to the driver during tuning",
          f"exit {128 + _sig}, status interrupted, no finals; the same command resumes and completes"
          )(_during_tuning(_sig))
    fault(f"{_name} to the driver during finals",
          f"exit {128 + _sig}, status interrupted, pending finals cancelled, no finals table; the same command "
          "resumes and completes")(_during_finals(_sig))


@fault("driver SIGKILLed mid-tuning (whole session)",
       "rerun of the same command resumes: committed trials kept, only the rest runs, complete")
def driver_killed(bench: Bench) -> Outcome:
    # The second trial hangs at its first step (it creates the marker): the kill lands during a trial, after
    # exactly one committed trial, however fast the machine. On the rerun the marker exists: nothing hangs.
    hung = bench.folder / "hung"
    args = bench.args("budget.trials=4", "trial.hp.hang_at_step=1", f"trial.hp.hang_once_marker={hung}",
                      "trial.hp.hang_skip=1", "resources.max_concurrent=1")
    has_one = bench.has_rows("trials")
    killed = bench.interrupt(args, lambda lines: hung.exists() and has_one(lines), sig=signal.SIGKILL, group=True)
    before = bench.snapshot()
    again = bench.sweep(args)
    c = bench.counts(before)
    trials = bench.table("trials")
    ok, why = _verdict({"killed mid-tuning": len(before) == 1, "resume exit 0": again.code == 0,
                        "every trial once": trials.height == 4 and trials["trial_number"].n_unique() == 4,
                        "complete": bench.manifest().get("status") == "complete"})
    return Outcome(f"killed with {len(before)} trial committed; rerun exit {again.code}, {trials.height} trials, "
                   f"{bench.manifest().get('status')}{why}", ok, bench.manifest().get("status"), killed.code,
                   c.lost, c.duplicated, c.rerun)


@fault("two drivers on one sweep folder",
       "the second is refused in one line naming the first's pid and host (exit 2); the first completes")
def two_drivers(bench: Bench) -> Outcome:
    # The first driver is held at its second trial until the second driver (a new process) has been answered.
    release = bench.folder / "release"
    args = bench.args(*_held(bench, f"trial.hp.hang_released_by={release}", trials=6))
    one, hung = bench.has_rows("trials"), _hung(bench)
    second: list[tuple[Finished, int]] = []

    def second_driver(proc) -> None:
        second.append((bench.sweep(args), proc.pid))
        release.write_text("")

    # signal 0: none sent, the first driver runs on to its end
    first = bench.interrupt(args, lambda lines: one(lines) and hung(), sig=0, meanwhile=second_driver)
    refused, pid = second[0]
    m = bench.manifest()
    trials = bench.table("trials")
    ok, why = _verdict({"second exit 2": refused.code == 2, "one line": len(refused.lines) == 1,
                        "names the first's pid": f"pid {pid} " in " ".join(refused.lines),
                        "first exit 0": first.code == 0, "first complete": m.get("status") == "complete",
                        "every trial once": trials.height == 6 and trials["trial_number"].n_unique() == 6})
    line = refused.lines[0] if refused.lines else ""
    return Outcome(f"second: exit {refused.code}, {line[:120]}; first: exit {first.code}, {m.get('status')}{why}",
                   ok, m.get("status"), refused.code, 0, bench.duplicates(), 0)


@fault("every trial fails (raises at its first step)",
       "no finals, status failed with the reason per cell, exit 1")
def every_trial_fails(bench: Bench) -> Outcome:
    out = bench.sweep(bench.args("budget.trials=2", "trial.hp.raise_at_step=1", "retries=0"))
    m = bench.manifest()
    ok, why = _verdict({"exit 1": out.code == 1, "status failed": m.get("status") == "failed",
                        "reason per cell": "faulty.mlp.digits" in (m.get("cells_without_finals_json") or ""),
                        "no final runs": bench.table("final_runs").is_empty()})
    return Outcome(f"exit {out.code}, status {m.get('status')}, cells without finals "
                   f"{m.get('cells_without_finals')}{why}", ok, m.get("status"), out.code, 0, bench.duplicates(), 0)


@fault("a trial fails every attempt (retries=1)",
       "recorded failed with attempts = 2 (the first try and its retry)")
def attempts(bench: Bench) -> Outcome:
    out = bench.sweep(bench.args("budget.trials=1", "trial.hp.raise_at_step=2", "retries=1"))
    trials = bench.table("trials")
    row = trials.row(0, named=True) if trials.height else {}
    ok, why = _verdict({"one row": trials.height == 1, "failed": row.get("status") == "failed",
                        "attempts 2": row.get("attempts") == 2})
    return Outcome(f"trial {row.get('status')} with attempts={row.get('attempts')}{why}", ok,
                   bench.manifest().get("status"), out.code, 0, bench.duplicates(), 0)


def _journal_rerun(bench: Bench, damage, expect_warning: bool) -> Outcome:
    first = bench.sweep(bench.args("budget.trials=2"))
    journal = bench.dir() / "optuna.journal"
    damage(journal)
    before = bench.snapshot()
    again = bench.sweep(bench.args("budget.trials=3"))
    c = bench.counts(before)
    trials = bench.table("trials")
    warnings = [line for line in again.lines if line.startswith("warning:")]
    ok, why = _verdict({"first exit 0": first.code == 0, "rerun exit 0": again.code == 0,
                        "3 trials, numbers 0..2": sorted(trials["trial_number"].to_list()) == [0, 1, 2],
                        "no hp twice": trials["hp_json"].n_unique() == trials.height,
                        "one warning" if expect_warning else "no warning": len(warnings) == int(expect_warning),
                        "complete": bench.manifest().get("status") == "complete"})
    said = f"; said: {warnings[0][:100]}" if warnings else ""
    return Outcome(f"rerun with 3 trials: exit {again.code}, trial numbers {sorted(trials['trial_number'].to_list())}"
                   f"{said}{why}", ok, bench.manifest().get("status"), again.code, c.lost, c.duplicated, c.rerun)


@fault("Optuna journal's last record torn (cut 37 bytes short), rerun with more trials",
       "one warning naming the backup; journal cut back, study caught up from the tables; resumes, complete")
def torn_journal(bench: Bench) -> Outcome:
    return _journal_rerun(bench, lambda j: j.write_bytes(j.read_bytes()[:-37]), expect_warning=True)


@fault("Optuna journal lost (deleted), rerun with more trials",
       "study rebuilt from the tables: budget.trials trials, no trial number repeated, no row replaced")
def lost_journal(bench: Bench) -> Outcome:
    return _journal_rerun(bench, lambda j: j.unlink(), expect_warning=False)


@fault("Optuna journal corrupt in the middle",
       "refused in one line naming the record and the fix (exit 2); nothing written")
def corrupt_journal(bench: Bench) -> Outcome:
    first = bench.sweep(bench.args("budget.trials=2"))
    journal = bench.dir() / "optuna.journal"
    records = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join([records[0], records[1][: len(records[1]) // 2], *records[2:]]))
    before, files = bench.snapshot(), bench.files()
    again = bench.sweep(bench.args("budget.trials=3"))
    c = bench.counts(before)
    ok, why = _verdict({"first exit 0": first.code == 0, "exit 2": again.code == 2, "one line": len(again.lines) == 1,
                        "names the fix": "move it away" in " ".join(again.lines),
                        "nothing written": bench.files() == files})
    return Outcome(f"exit {again.code}: {' '.join(again.lines)[:140]}{why}", ok, bench.manifest().get("status"),
                   again.code, c.lost, c.duplicated, c.rerun)


@fault("stale finals: rerun with more trials finds a better configuration",
       "the new best's finals run; the old ones are kept under superseded/, never in finals; finals hp and "
       "accuracy come from the same runs")
def stale_finals(bench: Bench) -> Outcome:
    # While the marker exists every run learns nothing (zero weights: class-0 share); removing it before the
    # rerun makes its new trial the best one, deterministically.
    marker = bench.folder / "frozen"
    marker.write_text("")
    args = lambda n: bench.args(f"budget.trials={n}", "budget.grace_epochs=2",  # noqa: E731
                                f"trial.hp.frozen_while={marker}")
    first = bench.sweep(args(2))
    old = bench.table("finals").row(0, named=True) if bench.table("finals").height else {}
    marker.unlink()
    before = bench.snapshot()
    again = bench.sweep(args(3))
    c = bench.counts(before)
    new = bench.table("finals").row(0, named=True) if bench.table("finals").height else {}
    runs, trials = bench.table("final_runs"), bench.table("trials")
    best = trials.sort("val_acc", descending=True).row(0, named=True) if trials.height else {}
    superseded = bench.table("superseded/final_runs")
    acc = runs["test_acc"].to_list() if runs.height else []
    ok, why = _verdict({
        "both exit 0": first.code == 0 and again.code == 0, "the new trial is best": best.get("trial_number") == 2,
        "finals name the new best": new.get("best_trial_number") == 2 and new.get("hp_json") == best.get("hp_json"),
        "new configuration": bool(old) and new.get("config_hash") != old.get("config_hash"),
        "finals runs are the new best's": runs.height == 1 and _hp_of(runs) == [_json(best.get("hp_json"))],
        "finals accuracy from those runs": bool(acc) and abs(new.get("test_acc_mean", -1) - sum(acc) / len(acc)) < 1e-12,
        "old final kept as superseded": superseded.height == 1 and _hp_of(superseded) == [_json(old.get("hp_json"))]})
    return Outcome(f"best trial {old.get('best_trial_number')} -> {new.get('best_trial_number')}, finals config "
                   f"{old.get('config_hash')} -> {new.get('config_hash')}, {superseded.height} final superseded, "
                   f"{runs.height} new; test {old.get('test_acc_mean', float('nan')):.3f} -> "
                   f"{new.get('test_acc_mean', float('nan')):.3f}{why}", ok, bench.manifest().get("status"),
                   again.code, c.lost, c.duplicated, c.rerun)


def _json(text: str | None):
    return json.loads(text) if text else None


def _hp_of(runs) -> list:
    """The hyperparameters each final run was given (its trial config's), as the best trial recorded them."""
    return [json.loads(c)["hp"] for c in runs["config_json"]] if runs.height else []


@fault("resume with another configuration (budget.epochs 2 -> 5, trial.model.widths [32] -> [64])",
       "refused in one line naming both keys and the fix (exit 2), nothing written; more trials only is allowed")
def changed_config(bench: Bench) -> Outcome:
    first = bench.sweep(bench.args("budget.trials=1"))
    files, before = bench.files(), bench.snapshot()
    changed = bench.sweep(bench.args("budget.trials=1", "budget.epochs=5", "trial.model.widths=[64]"))
    line = " ".join(changed.lines)
    unchanged = bench.files() == files
    extended = bench.sweep(bench.args("budget.trials=2"))
    c = bench.counts(before)
    ok, why = _verdict({"first exit 0": first.code == 0, "exit 2": changed.code == 2, "one line": len(changed.lines) == 1,
                        "names both keys": "budget.epochs" in line and "trial.model.widths" in line,
                        "names the fix": "name=" in line, "nothing written": unchanged,
                        "more trials allowed": extended.code == 0 and bench.table("trials").height == 2})
    said = line[line.find("("):][:200] if "(" in line else line[:200]  # the keys named, not the folder
    return Outcome(f"exit {changed.code}: {said}; then budget.trials=2: exit {extended.code}{why}", ok,
                   bench.manifest().get("status"), changed.code, c.lost, c.duplicated, c.rerun)
