"""K pipeline stages on a machine with fewer GPUs than K share them (its own Ray session, with one GPU declared).

Ray schedules by declared resources, so a CPU-only machine that declares ``num_gpus=1`` exercises the real
reservation path: before stages shared a GPU, K = 2 asked for two whole GPUs here and the start timed out.
"""

from __future__ import annotations

import pytest

from bioplaus.orchestrator import ray_local  # before any ray import: Ray's loopback environment
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.trial import run_trial


@pytest.fixture(scope="module")
def ray_with_one_gpu(tmp_path_factory, shared_ray):
    shared_ray.down()  # the session's shared Ray declares no GPU
    started = ray_local.start(tmp_path_factory.mktemp("ray"), num_cpus=2, num_gpus=1, timeout_s=240)
    yield
    ray_local.stop(started)


def test_two_stages_share_the_one_gpu(ray_with_one_gpu):
    import ray

    assert ray.cluster_resources().get("GPU") == 1
    record = run_trial(parse_overrides(["rule=local_losses", "dataset=digits", "arch=mlp", "model.widths=[32,24]",
                                        "train.epochs=1", "train.threads=1", "out=null", "train.mode=pipeline",
                                        "train.stages=2"]))
    assert record["status"] == "ok", record.get("traceback")
    assert record["pipeline"]["stages"] == 2
