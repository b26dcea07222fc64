"""Training batches: gather by index, standardise, augment (the same code wherever training runs).

``TrainFeed`` is what both trainers use: the sequential loop calls it in the trial's process, a
pipeline's first stage calls it on its own worker, so the driver only ever sends indices.
``AUGMENTS`` names the augmentations ``data.augment`` may select.

Everything lives on the training device: the training set (moved there once), the gathers, the
standardisation, the augmentation and the random numbers it draws (a generator on that device), so a batch
on a GPU costs no host copy. A generator on the CPU is the same Mersenne Twister stream as always, so on CPU
the batches are what they always were; a CUDA generator is another stream (Philox): the same seed gives other,
equally seeded, batches there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bioplaus.orchestrator.data import DataSplits
from bioplaus.orchestrator.data.datasets import standardize

# name -> (pad, flip) of augment_batch, or "affine" (affine_batch)
AUGMENTS = {"none": None, "shift": (2, False), "crop_flip": (4, True), "affine": "affine"}


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding (a random shift of up to ``pad`` pixels), and optionally a random
    horizontal flip, for a whole batch at once (no per-sample Python)."""
    n, c, h, w = x.shape  # drawn on the generator's device: no host copy when it is the batch's
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen, device=gen.device).to(x.device)
    flips = (torch.rand(n, generator=gen, device=gen.device) < (0.5 if flip else 0.0)).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(flips[:, None, None, None], out.flip(3), out)


def affine_batch(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor, degrees: float = 10.0,
                 scale: float = 0.1, shift: float = 2.0) -> torch.Tensor:
    """Random affine distortion of a whole batch: rotation by up to ``degrees``, scaling by up to ``scale``
    (a fraction), translation by up to ``shift`` pixels, each drawn uniformly per sample; bilinear sampling.
    The pixels brought in from outside the image take ``fill`` (per channel: a raw black pixel after
    standardisation, the background of digits and characters), not the standardised zero (the mean pixel)."""
    n, c, h, w = x.shape
    u = torch.rand(4, n, generator=gen, dtype=torch.float32, device=gen.device).to(x.device) * 2 - 1  # in [-1, 1]
    angle = u[0] * math.radians(degrees)
    zoom = 1 + u[1] * scale  # > 1 enlarges the digit: the sampling grid shrinks by 1 / zoom
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid's coordinates run over [-1, 1]: one pixel is 2 / size of them
    theta = torch.stack([torch.stack([cos, -sin, u[2] * shift * 2 / w], 1),
                         torch.stack([sin, cos, u[3] * shift * 2 / h], 1)], 1)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    fill = fill.view(1, -1, 1, 1).to(x.dtype)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


class TrainFeed:
    """Training batches from indices: the same uint8 gather, standardisation and augmentation wherever it runs
    (the trial's own loop, or a pipeline's first stage, which reads the training set itself so that the
    driver sends only indices). The augmentation stream is consumed batch by batch in data order, so two
    feeds seeded alike on the same kind of device produce the same batches. Its generator lives on the
    training set's device; a feed moved before it has drawn takes its stream along (re-seeded there), one
    moved after keeps drawing from where it was (and copies the draws), so a stream is never restarted."""

    def __init__(self, splits: DataSplits, augment: str, aug_seed: int):
        self.train_x, self.train_y = splits.train_x, splits.train_y
        self.mean, self.std = splits.mean, splits.std
        self.augment = AUGMENTS[augment]
        self.aug_seed = aug_seed
        self.aug_gen = torch.Generator(device=self.train_x.device).manual_seed(aug_seed)
        self.drawn = False

    def to(self, device: torch.device) -> "TrainFeed":
        for k in ("train_x", "train_y", "mean", "std"):
            setattr(self, k, getattr(self, k).to(device))
        if not self.drawn and self.aug_gen.device != self.train_x.device:
            self.aug_gen = torch.Generator(device=self.train_x.device).manual_seed(self.aug_seed)
        return self

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.train_x.device)
        x = standardize(self.train_x[idx], self.mean, self.std)
        self.drawn = self.drawn or self.augment is not None
        if self.augment == "affine":  # the border takes a raw black pixel, standardised
            x = affine_batch(x, self.aug_gen, fill=-self.mean / self.std)
        elif self.augment:
            x = augment_batch(x, self.aug_gen, *self.augment)
        return x, self.train_y[idx]
