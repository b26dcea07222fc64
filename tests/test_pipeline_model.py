"""The pipeline model's arithmetic on known stage times, and its measured inputs on a tiny network."""

from __future__ import annotations

import pytest

from bioplaus.orchestrator.pipeline_model import BlockProfile, Link, predict, predictions, profile_blocks

FREE = Link(bytes_per_s=float("inf"), message_s=0.0)


def test_equal_stages_and_a_free_link_lose_only_the_fill():
    profile = BlockProfile((0.01,) * 4, (1000,) * 4, 0.0, 100)
    row = predict(profile, 4, FREE, chunk=1, steps=100)
    # 100 micro-batches through 4 equal stages: 100 + 3 stage-times instead of 400
    assert row["speedup"] == pytest.approx(400 / 103)
    assert row["efficiency"] == pytest.approx(100 / 103)
    assert row["samples_per_s"] == pytest.approx(100 * 100 / (103 * 0.01))


def test_the_slowest_group_the_link_and_the_message_cost_pace_it():
    profile = BlockProfile((0.01, 0.03), (10_000, 100), 0.002, 10)
    link = Link(bytes_per_s=1e6, message_s=0.005)  # 10 ms per side for the 10 kB activation
    row = predict(profile, 2, link, chunk=4, steps=40)
    # group 0: feed 2 ms + 10 ms + 10 ms sending; group 1: 30 ms + 10 ms receiving; per message x4 + 5 ms
    tau0, tau1 = 4 * 0.022 + 0.005, 4 * 0.040 + 0.005
    assert row["group_seconds_per_batch"] == pytest.approx([0.022, 0.040])
    assert row["bottleneck_group"] == 1
    assert row["speedup"] == pytest.approx(40 * 0.042 / (tau0 + tau1 + 9 * tau1))


def test_contention_and_the_cut_by_multiply_accumulates():
    profile = BlockProfile((0.01, 0.01, 0.02), (1, 1, 1), 0.0, 1, macs=(1.0, 1.0, 1.0))
    row = predict(profile, 2, FREE, chunk=1, steps=1000, contention=1.25)
    assert row["groups"] == [[0], [1, 2]]  # what the pipeline cuts by, not the measured times
    assert row["speedup"] == pytest.approx(1000 * 0.04 / (0.0125 + 1000 * 0.0375), rel=1e-6)
    assert [r["k"] for r in predictions(profile, FREE, 1, 10)] == [1, 2, 3]


def test_profile_measures_every_block_of_a_block_local_trial():
    from bioplaus.orchestrator.calibrate import prepare
    from bioplaus.orchestrator.config import parse_overrides
    from bioplaus.orchestrator.spec import resolve

    trial = prepare(resolve(parse_overrides(["rule=local_losses", "smoke=true", "model.widths=[16,16]", "out=null",
                                             "train.threads=1"])))
    profile = profile_blocks(trial, reps=2, warmup=1)
    assert len(profile.compute_s) == len(profile.out_bytes) == len(profile.macs) == 3
    assert all(t > 0 for t in profile.compute_s) and profile.feed_s > 0
    assert profile.out_bytes == (64 * 16 * 4, 64 * 16 * 4, 64 * 10 * 4)  # batch 64, float32
