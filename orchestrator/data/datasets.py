"""Dataset registry and loading: files -> uint8 tensors -> train/val/test splits.

Every dataset is loaded whole into memory once (uint8, N x C x H x W) and moved to the training
device once; batches are normalised on the device. The validation split is carved from the training
set by the run's seed; the test set is the official one and is only used for the final numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bioplaus.orchestrator.data.download import (RemoteFile, fetch, mirror_checksums, root_checksums, tar_members,
                                                 verify_file)
from bioplaus.orchestrator.data.formats import parse_cifar_records, read_idx_pair, read_image_folder, read_svhn_mat
from bioplaus.orchestrator.errors import DataError, UsageError

DIGIT_NAMES = [str(i) for i in range(10)]


@dataclass(frozen=True)
class DatasetSpec:
    """Registry entry: where a dataset's files live and how to read them."""

    name: str
    dirname: str
    """Folder under the data root (and under a mirror's base URL)."""
    files: tuple[RemoteFile, ...]
    read: Callable[[Path, "object"], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]]
    """(folder, DataConfig) -> train_x, train_y, test_x, test_y, class names."""
    summary: str


def _idx_files(base_url: str, sums: dict[str, str]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(n, base_url + n, s) for n, s in sums.items())


_IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _read_idx_dataset(classes: list[str]):
    def read(folder: Path, _cfg):
        tx, ty = read_idx_pair(folder / _IDX_NAMES[0], folder / _IDX_NAMES[1])
        ex, ey = read_idx_pair(folder / _IDX_NAMES[2], folder / _IDX_NAMES[3])
        return tx, ty, ex, ey, classes
    return read


def _read_cifar(archive: str, prefix: str, train: list[str], test: list[str], label_bytes: int,
                names_file: str, fallback: list[str] | None):
    def read(folder: Path, _cfg):
        path = folder / archive
        members = tar_members(path)
        def records(names):
            missing = [n for n in names if f"{prefix}/{n}" not in members]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)}; it is not the official binary version")
            parts = [parse_cifar_records(members[f"{prefix}/{n}"], f"{path}:{n}", label_bytes, label_bytes - 1)
                     for n in names]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        tx, ty = records(train)
        ex, ey = records(test)
        text = members.get(f"{prefix}/{names_file}", b"").decode("utf-8", "replace").split()
        classes = text or fallback or [str(i) for i in range(int(ty.max()) + 1)]
        return tx, ty, ex, ey, classes
    return read


def _read_svhn(folder: Path, _cfg):
    tx, ty = read_svhn_mat(folder / "train_32x32.mat")
    ex, ey = read_svhn_mat(folder / "test_32x32.mat")
    return tx, ty, ex, ey, DIGIT_NAMES


def _read_digits(_folder: Path, _cfg):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255, injective
    y = d.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(y))  # a fixed test split, the same for every seed
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test], DIGIT_NAMES


def _read_imagefolder(_folder: Path, cfg):
    if not cfg.imagefolder:
        raise UsageError("dataset=imagefolder needs data.imagefolder=PATH (a folder of class-named sub-folders, "
                         "optionally split into train/ and test/)")
    root = Path(cfg.imagefolder).expanduser()
    if not root.is_dir():
        raise DataError(f"data.imagefolder={root} is not a folder")
    if (root / "train").is_dir():
        tx, ty, classes = read_image_folder(root / "train", cfg.image_size)
        if not (root / "test").is_dir():
            raise DataError(f"{root} has train/ but no test/; add test/<class>/ images or drop the train/ level")
        ex, ey, _ = read_image_folder(root / "test", cfg.image_size, classes)
        return tx, ty, ex, ey, classes
    x, y, classes = read_image_folder(root, cfg.image_size)
    order = np.random.RandomState(0).permutation(len(y))  # fixed 20 % test split when none is given
    n_test = max(1, len(y) // 5)
    return x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]], classes


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_KMNIST_URL = "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"

# Official SHA-256 digests (tensorflow/datasets url_checksums, cross-checked with torchvision).
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("digits", "", (), _read_digits, "scikit-learn 8x8 digits, 1,797 images, always offline"),
    DatasetSpec("mnist", "mnist", _idx_files(_MNIST_URL, {
        _IDX_NAMES[0]: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        _IDX_NAMES[1]: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        _IDX_NAMES[2]: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        _IDX_NAMES[3]: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"}),
        _read_idx_dataset(DIGIT_NAMES), "MNIST handwritten digits, 28x28 grayscale (IDX)"),
    DatasetSpec("fashion_mnist", "fashion-mnist", _idx_files(_FASHION_URL, {
        _IDX_NAMES[0]: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        _IDX_NAMES[1]: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        _IDX_NAMES[2]: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        _IDX_NAMES[3]: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"}),
        _read_idx_dataset(["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                           "Sneaker", "Bag", "Ankle boot"]), "Zalando Fashion-MNIST, 28x28 grayscale (IDX)"),
    DatasetSpec("kmnist", "kmnist", _idx_files(_KMNIST_URL, {
        _IDX_NAMES[0]: "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
        _IDX_NAMES[1]: "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
        _IDX_NAMES[2]: "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
        _IDX_NAMES[3]: "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c"}),
        _read_idx_dataset(["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
        "Kuzushiji-MNIST cursive Japanese characters, 28x28 grayscale (IDX)"),
    DatasetSpec("cifar10", "cifar-10", (RemoteFile(
        "cifar-10-binary.tar.gz", _CIFAR_URL + "cifar-10-binary.tar.gz",
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),),
        _read_cifar("cifar-10-binary.tar.gz", "cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)],
                    ["test_batch.bin"], 1, "batches.meta.txt", None), "CIFAR-10, 32x32 RGB (binary version)"),
    DatasetSpec("cifar100", "cifar-100", (RemoteFile(
        "cifar-100-binary.tar.gz", _CIFAR_URL + "cifar-100-binary.tar.gz",
        "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),),
        _read_cifar("cifar-100-binary.tar.gz", "cifar-100-binary", ["train.bin"], ["test.bin"], 2,
                    "fine_label_names.txt", None), "CIFAR-100 fine labels, 32x32 RGB (binary version)"),
    DatasetSpec("svhn", "svhn", (
        RemoteFile("train_32x32.mat", _SVHN_URL + "train_32x32.mat",
                   "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8"),
        RemoteFile("test_32x32.mat", _SVHN_URL + "test_32x32.mat",
                   "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b")),
        _read_svhn, "Street View House Numbers, cropped 32x32 RGB (.mat)"),
    DatasetSpec("imagefolder", "", (), _read_imagefolder,
                "your own images: data.imagefolder=PATH with class-named sub-folders"),
]}


def default_data_root() -> Path:
    """``$BIOPLAUS_DATA`` if set, else the user cache dir (``$XDG_CACHE_HOME/bioplaus/data``)."""
    if os.environ.get("BIOPLAUS_DATA"):
        return Path(os.environ["BIOPLAUS_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "bioplaus" / "data"


def data_root(cfg) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else default_data_root()


def ensure_files(spec: DatasetSpec, cfg) -> Path:
    """Make sure every file of ``spec`` is under the data root and is what it claims to be: missing files
    are downloaded (checked against their official digest), files already there are hashed against their
    official digest or the one the root's SHA256SUMS lists (see download.py for who is trusted)."""
    root = data_root(cfg)
    folder = root / spec.dirname
    missing = [f for f in spec.files if not (folder / f.name).is_file()]
    if missing and not cfg.download:
        raise DataError(f"{folder / missing[0].name} is missing and data.download=false; put the file there, "
                        "or set data.root=DIR (env BIOPLAUS_DATA) to a folder that has it")
    sums = mirror_checksums(cfg.mirror) if (missing and cfg.mirror) else {}
    for f in missing:
        rel = f"{spec.dirname}/{f.name}"
        url = f"{cfg.mirror.rstrip('/')}/{rel}" if cfg.mirror else f.url
        fetch(f, folder / f.name, url=url, mirror_sha256=sums.get(rel))
    listed = root_checksums(root) if spec.files else {}
    for f in spec.files:
        if f not in missing:
            verify_file(folder / f.name, f.sha256, listed.get(f"{spec.dirname}/{f.name}"), root)
    return folder


@dataclass
class RawDataset:
    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def load_raw(name: str, cfg) -> RawDataset:
    """Read a dataset's official train and test sets (downloading if needed)."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    folder = ensure_files(spec, cfg)
    tx, ty, ex, ey, classes = spec.read(folder, cfg)
    return RawDataset(name, tx, ty, ex, ey, list(classes))


# Datasets this process has opened and parsed whole, by their files' (path, size, mtime): checked once.
_CHECKED: set[tuple] = set()


def check_dataset(name: str, cfg) -> None:
    """Open and validate a dataset once, as a sweep does before Ray starts: its files are downloaded if
    missing, hashed where a digest is known, and parsed whole; DataError names a bad file and the fix."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    folder = ensure_files(spec, cfg)
    stats = tuple((str(folder / f.name), (folder / f.name).stat().st_size, (folder / f.name).stat().st_mtime_ns)
                  for f in spec.files)
    key = (name, stats)
    if spec.files and key in _CHECKED:
        return
    raw = load_raw(name, cfg)
    if len(raw.train_y) == 0 or len(raw.test_y) == 0:
        raise DataError(f"{name} in {folder} has {len(raw.train_y)} training and {len(raw.test_y)} test images; "
                        "both must be non-empty: replace its files")
    _CHECKED.add(key)


@dataclass
class DataSplits:
    """Train/val/test tensors (uint8 images, int64 labels) plus the train split's normalisation."""

    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    """Per-channel mean of the training split, in [0, 1] pixel units."""
    std: torch.Tensor
    """Per-channel standard deviation of the training split, in [0, 1] pixel units."""
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device) -> "DataSplits":
        for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "mean", "std"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float32, standardised with the training split's statistics."""
        return standardize(x, self.mean, self.std)


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> float32 in [0, 1], minus the per-channel ``mean``, over the per-channel ``std``."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x.float().div_(255.0) - mean.view(shape)) / std.view(shape)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of uint8 images in [0, 1] pixel units, from exact integer sums: the
    same float32 values whatever the thread count or vector width (a float32 reduction's rounding depends on
    how the work is split, and every standardised pixel of a run inherits it)."""
    pixels = x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.int64)
    n = pixels.shape[1]
    total, squares = pixels.sum(1).double(), pixels.pow(2).sum(1).double()
    mean = total / n
    var = (squares - total * mean) / max(n - 1, 1)
    return (mean / 255.0).float(), (var.clamp_min(0).sqrt() / 255.0).float().clamp_min(1e-3)


def make_splits(raw: RawDataset, cfg, seed: int) -> DataSplits:
    """Carve the validation split from the training set (by ``seed``) and apply size limits."""
    gen = np.random.RandomState(seed)
    order = gen.permutation(len(raw.train_y))
    if cfg.train_limit:
        order = order[: cfg.train_limit]
    n_val = int(round(len(order) * cfg.val_fraction))
    if n_val < 1 or n_val >= len(order):
        raise UsageError(f"data.val_fraction={cfg.val_fraction} leaves {n_val} of {len(order)} training images "
                         "for validation; use a fraction in (0, 1) that leaves both splits non-empty")
    val, train = order[:n_val], order[n_val:]
    n_test = min(cfg.test_limit or len(raw.test_y), len(raw.test_y))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    train_x = t(raw.train_x[train])
    mean, std = channel_stats(train_x)
    splits = DataSplits(raw.name, raw.classes, train_x, t(raw.train_y[train]), t(raw.train_x[val]),
                        t(raw.train_y[val]), t(raw.test_x[:n_test]), t(raw.test_y[:n_test]), mean, std)
    splits.sizes = {"train": len(train), "val": n_val, "test": n_test}
    n_classes = len(raw.classes)
    if int(raw.train_y.max()) >= n_classes or int(raw.test_y.max()) >= n_classes:
        raise DataError(f"{raw.name}: labels exceed the {n_classes} class names")
    return splits
