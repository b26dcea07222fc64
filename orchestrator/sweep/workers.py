"""What runs on the Ray workers: a tuning trial (a Tune function trainable) and a final run (a Ray task)."""

from __future__ import annotations

from bioplaus.orchestrator import ray_local  # noqa: F401, I001  (sets Ray's loopback environment before ray is imported)

import tempfile
from pathlib import Path

import ray
from ray import tune

from bioplaus.orchestrator.results import RunRecord
from bioplaus.orchestrator.sweep.budget import compute_spent
from bioplaus.orchestrator.sweep.cells import trial_spec
from bioplaus.orchestrator.trial import run_trial


def tune_trainable(config: dict) -> None:
    """Ray Tune function trainable: one tuning trial, reporting every epoch (never touches the test set)."""
    node = ray.get_runtime_context().get_node_id()
    spent = compute_spent(config)  # budget.kind=compute: what ASHA's rungs count
    record = run_trial(trial_spec(config["trial"]),
                       report=lambda row: tune.report({**row, "node_id": node, **spent(row)}), evaluate_test=False)
    if record["status"] == "failed":  # let Tune retry it, then record it as failed
        raise RuntimeError(record["error"])


def final_task(plain: dict, model_name: str | None = None) -> tuple[RunRecord, bytes | None]:
    """One final run (test set evaluated): its record, and the selected network's file as bytes (or None).

    On a cluster this worker's disk is not the driver's, so the driver writes the network file.
    """
    with tempfile.TemporaryDirectory(prefix="bioplaus-final-") as tmp:
        path = Path(tmp) / (model_name or "model.pt")
        record = run_trial(trial_spec(plain), evaluate_test=True, save_model=str(path) if model_name else None)
        model = path.read_bytes() if model_name and path.is_file() else None
    run = RunRecord.from_trial(record)
    run.node_id = ray.get_runtime_context().get_node_id()
    return run, model
