"""Optional speed-ups for backprop-style rules, measured, never on by default: bf16 autocast of the training step
and ``torch.compile`` of the network's forward pass (its backward follows through AOTAutograd).

Both change arithmetic (bf16 rounds activations to 8 bits of mantissa; a compiled graph may fuse and reorder
float operations), so each comes with a parity check against fp32 eager: the same trial trained both ways from
the same initial weights and batches, compared on validation accuracy (:func:`fit_accuracy`, digits in the test
suite) and on the training loss over the first steps (:func:`time_modes`, on the GPU bench). They apply to rules
whose ``train_step`` is one forward pass and autograd (bp here); a rule with hand-written updates would need
its own review before either is switched on for it.
"""

from __future__ import annotations

import time

import torch

from bioplaus.orchestrator.calibrate import PreparedTrial, prepare, run_steps, sync
from bioplaus.orchestrator.spec import TrialSpec
from bioplaus.orchestrator.training import History, SequentialTrainer

MODES = ("fp32", "bf16", "compile", "compile+bf16")


def apply_mode(trial: PreparedTrial, mode: str, backend: str = "inductor") -> None:
    """Switch a prepared trial's rule to ``mode`` (one of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    rule = trial.rule
    if "compile" in mode:
        rule.net = torch.compile(rule.net, backend=backend)  # the same parameters: the optimiser still holds them
    if "bf16" in mode:
        step, device_type = rule.train_step, trial.device.type

        def train_step(x, y):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return step(x, y)

        rule.train_step = train_step


def fit_accuracy(spec: TrialSpec, mode: str, backend: str = "inductor", data: str = "real") -> float:
    """The best validation accuracy of ``spec`` trained in ``mode`` (the trial's own epochs, batches, seed)."""
    trial = prepare(spec, data)
    apply_mode(trial, mode, backend)
    history = SequentialTrainer(trial.rule, trial.feed).fit(trial.rule, trial.splits, trial.plan, History())
    return history.best_acc


def losses(trial: PreparedTrial, steps: int) -> list[float]:
    """The training loss of each of the next ``steps`` steps (one synchronisation, at the end)."""
    batches = trial.batches()
    trainer = SequentialTrainer(trial.rule, trial.feed)
    out = [m["loss"].detach().float() for m in trainer.train_epoch(next(batches) for _ in range(steps))]
    return torch.stack(out).tolist()


def time_modes(spec: TrialSpec, steps: int, backend: str = "inductor", parity_steps: int = 20,
               modes: tuple[str, ...] = MODES) -> list[dict]:
    """Per mode, from the same initial weights and batches: the loss over ``parity_steps`` first steps against
    fp32 eager's (mean relative difference), the first steps' seconds (compilation), then samples/s over
    ``steps`` more."""
    rows, reference = [], None
    for mode in ("fp32", *(m for m in modes if m != "fp32")):  # fp32 first: the reference
        trial = prepare(spec, "synthetic")
        apply_mode(trial, mode, backend)
        tick = time.perf_counter()
        first = losses(trial, parity_steps)
        warm_s = time.perf_counter() - tick
        reference = reference or first
        batches = trial.batches()
        sync(trial.device)
        tick = time.perf_counter()
        run_steps(trial, batches, steps)
        sync(trial.device)
        seconds = time.perf_counter() - tick
        diff = sum(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(first, reference)) / len(reference)
        rows.append({"mode": mode, "samples_per_s": steps * trial.plan.batch / seconds, "first_steps_s": warm_s,
                     "loss_rel_diff_vs_fp32": diff, "final_loss": first[-1]})
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base
    return rows
