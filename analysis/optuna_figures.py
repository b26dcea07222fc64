"""Optuna's own views of each cell's study: optimisation history and parameter importances.

The sweep keeps one Optuna study per cell, named by the cell key ``rule.arch.dataset``, in
``SWEEP_DIR/optuna.journal`` (or the RDB URL its config names as ``storage``). The figures are
``optuna.visualization``'s, unchanged; importances use fANOVA with a fixed seed, so the same study gives
the same numbers. A cell is skipped, with a note saying why, when its study is missing, has fewer than
two complete trials, or its importances cannot be computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bioplaus.orchestrator.errors import one_line

JOURNAL = "optuna.journal"
MIN_COMPLETE = 2
IMPORTANCE_SEED = 0
FIG_PX = 360


@dataclass
class StudyViews:
    """One cell's figures: plotly figures, the importances as numbers, and why any are missing."""

    cell: str
    complete: int = 0
    history: object | None = None
    importances: object | None = None
    importance_values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def open_storage(sweep_dir: Path, config_json: str | None):
    """(the sweep's Optuna storage or None, why not): its journal file, else its configured RDB."""
    import optuna

    journal = sweep_dir / JOURNAL
    if journal.is_file():
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(journal))), None
    try:
        url = json.loads(config_json or "{}").get("storage")
    except ValueError:
        url = None
    if not url:
        return None, f"no Optuna study to show: {journal} does not exist"
    try:
        return optuna.storages.RDBStorage(url), None
    except Exception as e:  # noqa: BLE001  (a database this machine cannot reach: the rest of the report stands)
        return None, f"the sweep's Optuna storage {url} could not be opened: {one_line(e)}"


def study_views(storage, cell: str) -> StudyViews:
    """The two figures of one cell's study, or notes saying why they are missing."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState

    views = StudyViews(cell)
    try:
        study = optuna.load_study(study_name=cell, storage=storage)
    except KeyError:
        views.notes.append(f"{cell}: no Optuna study of this name in the storage")
        return views
    views.complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if views.complete < MIN_COMPLETE:
        views.notes.append(f"{cell}: {views.complete} complete trial(s); the history and importances need "
                           f"at least {MIN_COMPLETE}")
        return views
    views.history = optuna.visualization.plot_optimization_history(study, target_name="validation accuracy")
    views.history.update_layout(title=dict(text=f"{cell}: optimisation history", font=dict(size=13)), height=FIG_PX)
    try:
        views.importances = optuna.visualization.plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=IMPORTANCE_SEED), target_name="validation accuracy")
        views.importances.update_layout(title=dict(text=f"{cell}: parameter importances (fANOVA)",
                                                   font=dict(size=13)), height=FIG_PX)
        views.importance_values = _bar_values(views.importances)
    except Exception as e:  # noqa: BLE001  (e.g. no searched parameter varies: say so, keep the history)
        views.notes.append(f"{cell}: parameter importances could not be computed ({one_line(e)})")
    return views


def _bar_values(fig) -> dict[str, float]:
    """The importances the figure draws (one horizontal bar per parameter), read back rather than computed
    twice: fANOVA is the slow part of the report on a large sweep."""
    bars = [t for t in fig.data if t.type == "bar"]
    return {str(name): float(x) for name, x in zip(bars[0].y, bars[0].x)} if bars else {}


def all_study_views(sweep_dir: Path, config_json: str | None, cells: list[str]) -> tuple[list[StudyViews], list[str]]:
    """Every cell's views, in ``cells`` order, and the notes of a storage that could not be opened."""
    storage, why = open_storage(sweep_dir, config_json)
    if storage is None:
        return [], [why]
    return [study_views(storage, cell) for cell in cells], []
