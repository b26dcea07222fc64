"""The device-resident input path: the training set, the batches' gathers, the epoch order and the augmentation
draws all live on the training device, and on CPU it gives the very batches the host path always gave.

The digests below were taken from the host path (a CPU generator for the order and for the augmentation draws,
copied to the data's device per batch) before the random streams moved onto the device; any change to the order
of the draws, their shapes or their generator changes them.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.feed import TrainFeed
from bioplaus.orchestrator.training import FitPlan, epoch_order
from bioplaus.orchestrator.trial import load_splits

# sha256 (first 16 hex digits) of two epochs of batches of digits, seed 5 (order) and 6 (augmentation): the
# labels and the images rounded to 1e-4, so that a last-bit difference of a vectorised kernel cannot matter.
HOST_PATH_DIGESTS = {"none": "4005c8349eb0e213", "shift": "8fe7a7e83c4e02a5", "crop_flip": "88ff2890351ce12e",
                     "affine": "4c4ba0a3be6d0a51"}


@pytest.fixture(scope="module")
def digits():
    cfg = parse_overrides(["dataset=digits", "seed=5"])
    return cfg, load_splits(cfg)


def _digest(cfg, splits, augment: str) -> str:
    device = torch.device("cpu")
    plan = FitPlan.of(cfg.train, len(splits.train_y), device, 5)
    feed = TrainFeed(splits, augment, aug_seed=6)
    h = hashlib.sha256()
    for _ in range(2):
        perm = epoch_order(plan)
        for b in range(plan.steps):
            x, y = feed.batch(perm[b * plan.batch:(b + 1) * plan.batch])
            h.update((x * 1e4).round().to(torch.int64).numpy().tobytes())
            h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("augment", sorted(HOST_PATH_DIGESTS))
def test_device_path_on_cpu_gives_the_host_paths_batches(digits, augment):
    cfg, splits = digits
    assert _digest(cfg, splits, augment) == HOST_PATH_DIGESTS[augment]


def test_the_streams_live_on_the_training_sets_device_and_a_moved_feed_keeps_its_place(digits):
    cfg, splits = digits
    plan = FitPlan.of(cfg.train, len(splits.train_y), splits.train_x.device, 5)
    feed = TrainFeed(splits, "crop_flip", aug_seed=6)
    assert feed.aug_gen.device == splits.train_x.device == plan.order.device
    idx = epoch_order(plan)[:8]
    first, _ = feed.batch(idx)
    feed.to(torch.device("cpu"))  # after drawing: the stream goes on where it was, never restarted
    again, _ = feed.batch(idx)
    fresh = TrainFeed(splits, "crop_flip", aug_seed=6)
    assert torch.equal(fresh.batch(idx)[0], first)
    assert not torch.equal(again, first)
    assert torch.equal(fresh.batch(idx)[0], again)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("augment", ["crop_flip", "affine"])
def test_on_a_gpu_a_batch_costs_no_host_synchronisation(digits, augment):
    cfg, splits = digits
    device = torch.device("cuda")
    splits.to(device)
    plan = FitPlan.of(cfg.train, len(splits.train_y), device, 5)
    feed = TrainFeed(splits, augment, aug_seed=6)
    assert feed.aug_gen.device.type == plan.order.device.type == "cuda"
    torch.cuda.set_sync_debug_mode("error")  # a host copy or a device sync raises
    try:
        perm = epoch_order(plan)
        for b in range(3):
            feed.batch(perm[b * plan.batch:(b + 1) * plan.batch])
    finally:
        torch.cuda.set_sync_debug_mode("default")
        splits.to(torch.device("cpu"))
