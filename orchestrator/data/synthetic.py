"""Shape-exact stand-ins for the datasets, for timing only: random uint8 images of a dataset's official
size, channels and class count. Throughput measurements (the cost estimate's calibration, the packed-trial
curve, the GPU bench) use them where the real files are not at hand (CIFAR-10 is larger than a device call
may carry); a learning rule's step takes the same time on them, since no rule's work depends on the pixels.
Never used for an accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bioplaus.orchestrator.data.datasets import DataSplits


@dataclass(frozen=True)
class DatasetShape:
    """What a dataset looks like to a network: one image's shape, the classes, the official split sizes."""

    input_shape: tuple[int, int, int]
    num_classes: int
    n_train: int
    """Official training images (before the validation split)."""
    n_test: int


# The official distributions (digits: scikit-learn's 1,797 images, of which the loader keeps 360 for testing).
SHAPES: dict[str, DatasetShape] = {
    "digits": DatasetShape((1, 8, 8), 10, 1437, 360),
    "mnist": DatasetShape((1, 28, 28), 10, 60000, 10000),
    "fashion_mnist": DatasetShape((1, 28, 28), 10, 60000, 10000),
    "kmnist": DatasetShape((1, 28, 28), 10, 60000, 10000),
    "cifar10": DatasetShape((3, 32, 32), 10, 50000, 10000),
    "cifar100": DatasetShape((3, 32, 32), 100, 50000, 10000),
    "svhn": DatasetShape((3, 32, 32), 10, 73257, 26032),
}


def split_sizes(dataset: str, data_cfg) -> dict[str, int]:
    """The train/val/test sizes a trial of ``dataset`` gets under ``data_cfg`` (its limits and validation
    fraction), computed as ``make_splits`` would from the official sizes."""
    shape = SHAPES[dataset]
    n = min(data_cfg.train_limit or shape.n_train, shape.n_train)
    n_val = int(round(n * data_cfg.val_fraction))
    return {"train": n - n_val, "val": n_val, "test": min(data_cfg.test_limit or shape.n_test, shape.n_test)}


def synthetic_splits(dataset: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> DataSplits:
    """Random uint8 images and labels shaped like ``dataset`` (a key of :data:`SHAPES`), drawn from ``seed``."""
    shape = SHAPES[dataset]
    gen = torch.Generator().manual_seed(seed)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, *shape.input_shape), generator=gen, dtype=torch.uint8)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, shape.num_classes, (n,), generator=gen)

    channels = shape.input_shape[0]
    splits = DataSplits(f"{dataset} (synthetic)", [str(i) for i in range(shape.num_classes)], images(n_train),
                        labels(n_train), images(n_val), labels(n_val), images(n_test), labels(n_test),
                        torch.full((channels,), 0.5), torch.full((channels,), 0.29))
    splits.sizes = {"train": n_train, "val": n_val, "test": n_test}
    return splits
