"""How full does the orchestrator keep the workers? (``bioplaus bench --orchestrator``)

N trials of a trainable doing a fixed amount of CPU work (default 5 s of process CPU time, one
report) run through Ray Tune on the embedded local Ray with ``concurrency`` trials at once, the same
Tuner set-up the sweeps use (actor reuse, per-trial resources). Busy fraction = sum of the trials'
work time / (wall time of ``Tuner.fit`` x concurrency); 1.0 means no scheduling overhead at all.
"""

from __future__ import annotations

from bioplaus.orchestrator import ray_local  # noqa: I001  (Ray's loopback environment first)

import tempfile
import time
from pathlib import Path


def busy_work(config: dict) -> None:
    from ray import tune

    start = time.perf_counter()
    cpu0 = time.process_time()
    x = 0
    while time.process_time() - cpu0 < config["work_s"]:
        for _ in range(10_000):
            x += 1
    tune.report({"work_seconds": time.perf_counter() - start, "x": x % 7})


def measure(trials: int = 20, concurrency: int = 2, work_s: float = 5.0, run_dir: str | None = None) -> dict:
    from ray import tune

    folder = Path(run_dir or tempfile.mkdtemp(prefix="bioplaus-eff-"))
    started = ray_local.start(folder, num_cpus=concurrency)
    try:
        tuner = tune.Tuner(
            tune.with_resources(busy_work, {"cpu": 1}),
            param_space={"work_s": work_s},
            tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str((folder / "ray_results").resolve()), verbose=0),
        )
        tick = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - tick
    finally:
        ray_local.stop(started)
    work = sum(r.metrics["work_seconds"] for r in grid)
    return {"trials": trials, "concurrency": concurrency, "work_s": work_s, "wall_s": wall,
            "sum_trial_s": work, "busy_fraction": work / (wall * concurrency)}
