"""Layer-parallel pipeline (orchestrator/pipeline.py) on the real Ray, loopback-only, one session for the module.

The pipeline must compute exactly what sequential block-local training computes on the same data
order (weights, per-epoch losses and accuracies), and a stage actor that dies must end the trial as
``failed`` with an error naming the stage, quickly, not hang it.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from bioplaus.orchestrator import ray_local  # before any ray import: Ray's loopback environment
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.pipeline import split_stages, stage_bundles, trial_resources
from bioplaus.orchestrator.trial import resolve, run_trial

BASE = ["dataset=digits", "arch=mlp", "model.widths=[32,24]", "train.batch_size=64", "train.threads=1",
        "train.select=last", "out=null"]


@pytest.fixture(scope="module")
def pipeline_ray(tmp_path_factory, shared_ray):
    """A Ray of this module's own (4 CPUs: a stage per CPU); the session's shared one is stopped first."""
    shared_ray.down()
    started = ray_local.start(tmp_path_factory.mktemp("ray"), num_cpus=4, timeout_s=240)
    yield
    ray_local.stop(started)


def _net_weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


# chunk 3: messages of 3 micro-batches, and the epoch's 22 batches leave a last message of one;
# augment: the first stage builds the batches itself and must draw the same random shifts as the trial's loop
@pytest.mark.parametrize("rule,stages,staleness,chunk,augment", [
    ("local_losses", 2, 0, 1, "none"), ("ff", 3, 0, 8, "none"), ("local_losses", 3, 2, 1, "none"),
    ("local_losses", 2, 1, 3, "shift")])
def test_pipeline_equals_sequential_block_local_training(pipeline_ray, tmp_path, rule, stages, staleness, chunk,
                                                         augment):
    over = [f"rule={rule}", *BASE, "train.epochs=2", f"data.augment={augment}"]
    seq = run_trial(parse_overrides(over), save_model=str(tmp_path / "seq.pt"))
    pipe = run_trial(parse_overrides([*over, "train.mode=pipeline", f"train.stages={stages}",
                                      f"train.staleness={staleness}", f"train.chunk={chunk}"]),
                     save_model=str(tmp_path / "pipe.pt"))
    assert seq["status"] == "ok" and pipe["status"] == "ok", pipe.get("traceback")
    assert seq["mode"] == "sequential" and pipe["mode"] == "pipeline"
    assert pipe["config"]["train"]["mode"] == "pipeline"
    a, b = _net_weights(tmp_path / "seq.pt"), _net_weights(tmp_path / "pipe.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit, not approximately
    for e_seq, e_pipe in zip(seq["epochs"], pipe["epochs"], strict=True):
        for k in ("train_loss", "train_acc", "val_acc", "val_loss"):
            assert e_seq[k] == e_pipe[k], k
        assert e_pipe["extra"]["staleness_bound"] == staleness
        assert 0 <= e_pipe["extra"]["staleness"] <= staleness
    assert seq["test_acc"] == pipe["test_acc"]
    info = pipe["pipeline"]
    assert info["stages"] == stages and len(info["groups"]) == stages
    assert sorted(i for g in info["groups"] for i in g) == [0, 1, 2]
    assert info["staleness_bound"] == staleness and 0 <= info["staleness_max"] <= staleness
    assert info["chunk"] == chunk
    # it learned (the equality above is not between two untouched networks)
    assert pipe["epochs"][1]["train_loss"] < pipe["epochs"][0]["train_loss"]


def test_stage_actor_crash_is_a_failed_trial_not_a_hang(pipeline_ray):
    import ray

    killed: list[str] = []
    killed_at: list[float] = []

    def kill_stage_1():  # a real process death of the second stage's actor, mid-training
        deadline = time.monotonic() + 300  # a guard: the trial's 200 epochs outlast any start-up
        while time.monotonic() < deadline:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("bioplaus-pipeline-") and a["name"].endswith("-stage1")]
            if names:
                actor = ray.get_actor(names[0], namespace=next(
                    a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == names[0]))
                # No call on the actor to see it is up: a busy machine can keep such a call queued behind
                # its training steps for minutes. Dying during its start or its training both must surface.
                time.sleep(2.0)
                ray.kill(actor, no_restart=True)
                killed_at.append(time.monotonic())
                killed.append(names[0])
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_stage_1, daemon=True)
    killer.start()
    record = run_trial(parse_overrides(["rule=local_losses", *BASE, "train.batch_size=16", "train.epochs=200",
                                        "train.mode=pipeline", "train.stages=2"]))
    killer.join(timeout=60)
    assert killed, "the stage actor was never found"
    assert record["status"] == "failed"
    assert "pipeline stage 1" in record["error"] and "died" in record["error"], record["error"]
    assert record["epochs_run"] < 200
    # surfaced, not hung on the dead actor until the pipeline's 600-s step timeout: timed from the death, so a
    # slow start-up does not count, and with half that timeout as the margin a busy machine does not either
    assert time.monotonic() - killed_at[0] < 300
    # the surviving actor and the placement group were released: nothing named is left
    left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] in killed]
    assert not left


def test_resolve_refuses_what_cannot_be_pipelined():
    with pytest.raises(UsageError, match="block-local"):
        resolve(parse_overrides(["rule=bp", "train.mode=pipeline"]))
    with pytest.raises(UsageError, match="between 1 and the network's 3 stages"):
        resolve(parse_overrides(["rule=local_losses", "model.widths=[8,8]", "train.mode=pipeline", "train.stages=4"]))
    with pytest.raises(UsageError, match="staleness"):
        resolve(parse_overrides(["rule=ff", "train.mode=pipeline", "train.staleness=-1"]))
    with pytest.raises(UsageError, match="train.mode"):
        resolve(parse_overrides(["rule=ff", "train.mode=parallel"]))
    resolve(parse_overrides(["rule=softhebb", "train.mode=pipeline", "train.stages=3", "model.widths=[8,8]"]))


def test_stage_split_balances_cost_and_sweeps_ask_one_bundle_per_stage():
    assert split_stages([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    assert split_stages([8, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]
    assert split_stages([1, 2, 3], 3) == [[0], [1], [2]]
    assert split_stages([5, 5], 1) == [[0, 1]]
    train = parse_overrides(["rule=ff", "train.mode=pipeline", "train.stages=3"]).train
    pgf = trial_resources(train, 1.0, 0.0)
    assert pgf.bundles[1:] == [{"CPU": 1.0}] * 3 and pgf.bundles[0]["CPU"] < 1
    assert trial_resources(parse_overrides([]).train, 1.0, 0.5) == {"cpu": 1.0, "gpu": 0.5}
    # a pipeline's own reservation: whole GPUs when there are enough, equal shares of fewer, none on cpu
    assert stage_bundles(2, 4, "auto") == [{"CPU": 1, "GPU": 1.0}] * 2
    assert stage_bundles(4, 1, "cuda") == [{"CPU": 1, "GPU": 0.25}] * 4
    assert stage_bundles(3, 1, "cpu") == stage_bundles(3, 0, "auto") == [{"CPU": 1}] * 3


@pytest.mark.slow
def test_pipeline_bench_reports_efficiency_against_the_machine_ceiling(pipeline_ray, tmp_path):
    """``bench --pipeline`` end to end on digits: every mode measured, the pipelined runs learn exactly what the
    sequential one learns, and the machine ceiling (K independent runs at once) is reported beside the efficiency."""
    from bioplaus.orchestrator.bench import pipeline_efficiency

    md = tmp_path / "pipe.md"
    result = pipeline_efficiency(["dataset=digits", "model.widths=[32,24]", "train.batch_size=64"], stages=2,
                                 rounds=1, chunk=4, markdown=str(md), staleness=2)
    assert len(result["samples_per_second"]) == 5
    assert all(len(v) == 1 and v[0] > 0 for v in result["samples_per_second"].values())
    acc = result["test_acc"]
    seq = acc["sequential, 1 thread"]
    assert acc["pipeline K=2, s=2, chunk=1"] == acc["pipeline K=2, s=2, chunk=4"] == seq
    assert acc["2 sequential runs at once, 1 thread each (summed)"] == seq  # the same run, twice, side by side
    assert result["machine_ceiling"] > 0
    assert result["efficiency_of_ceiling"] == pytest.approx(result["efficiency"] / result["machine_ceiling"])
    assert "machine ceiling" in md.read_text()
    assert "--stages 2 --rounds 1 --chunk 4 --staleness 2 dataset=digits" in md.read_text()  # the whole command
    # the stages computed (CPU time > 0) and, with one compute thread each, not much longer than their busy wall
    # time (process CPU time also counts Ray's own threads in the actor, hence the slack below 0)
    fractions = [f for fs in result["stage_descheduled_fraction"].values() for f in fs]
    assert len(fractions) == 2 and all(-0.25 <= f < 1 for f in fractions), fractions
    # the share of that CPU time on the actors' other threads: a fraction (thread CPU <= process CPU)
    others = [f for fs in result["stage_other_threads_fraction"].values() for f in fs]
    assert len(others) == 2 and all(-0.01 <= f <= 1 for f in others), others
