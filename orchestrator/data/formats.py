"""Parsers for the official dataset file formats. Each returns uint8 images as (N, C, H, W) numpy
arrays and int64 labels, and raises DataError naming the file when it is truncated or corrupt.
No pickle anywhere: CIFAR is read from its binary version, SVHN from MATLAB files via scipy."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from bioplaus.orchestrator.data.download import MAX_MEMBER_BYTES
from bioplaus.orchestrator.errors import DataError

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _gunzip_capped(path: Path) -> bytes:
    """A gzip file's content, refused once it exceeds MAX_MEMBER_BYTES (a hostile file cannot fill memory)."""
    with gzip.open(path, "rb") as f:
        raw = f.read(MAX_MEMBER_BYTES + 1)
    if len(raw) > MAX_MEMBER_BYTES:
        raise DataError(f"{path} decompresses to more than {MAX_MEMBER_BYTES} bytes, more than any official IDX "
                        "file; delete it to download it again")
    return raw


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): magic 0x0000TTDD, DD big-endian dimension sizes, then data."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        raw = _gunzip_capped(path) if gzipped else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
                        "delete it to download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic {raw[:4].hex()}); delete it to download it again")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its IDX header; delete it to download it again")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes) but the file holds {len(raw)} bytes; "
                        "it is truncated or corrupt, delete it to download it again")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1:
        raise DataError(f"{images}/{labels.name}: expected images (N,H,W) and labels (N,), got {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return x[:, None, :, :].astype(np.uint8), y.astype(np.int64)


def parse_cifar_records(blob: bytes, name: str, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR binary records: ``label_bytes`` label bytes then 3072 pixel bytes (R, G, B planes, 32x32)."""
    size = label_bytes + 3072
    if len(blob) == 0 or len(blob) % size:
        raise DataError(f"{name}: {len(blob)} bytes is not a whole number of {size}-byte CIFAR records; "
                        "the archive is truncated or corrupt, delete it to download it again")
    rec = np.frombuffer(blob, dtype=np.uint8).reshape(-1, size)
    return rec[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), rec[:, label_index].astype(np.int64)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits ``*_32x32.mat``: X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning digit 0."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises several types for bad files
        raise DataError(f"{path} is not a readable SVHN .mat file ({type(e).__name__}: {e}); "
                        "delete it to download it again") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} lacks the SVHN variables X and y")
    x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{path}: X has shape {x.shape}, y {len(y)} labels; expected (32, 32, 3, N) and N")
    y[y == 10] = 0
    if y.min() < 0 or y.max() > 9:
        raise DataError(f"{path}: labels outside 1..10")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), y


def read_image_folder(root: Path, size: int, classes: list[str] | None = None):
    """Class-named sub-folders of images -> (uint8 (N, C, size, size), labels, class names).

    Images are resized to ``size`` x ``size``; the set is grayscale if every image is, else RGB.
    """
    from PIL import Image, UnidentifiedImageError

    if classes is None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; lay images out as {root}/<class>/<image>")
    files = [(p, c) for c, name in enumerate(classes) if (root / name).is_dir()
             for p in sorted((root / name).rglob("*")) if p.suffix.lower() in _IMAGE_EXTS]
    if not files:
        raise DataError(f"{root} holds no images (extensions {', '.join(sorted(_IMAGE_EXTS))})")
    images = []
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.convert("L" if im.mode in ("1", "L", "I;16", "I") else "RGB")
                              .resize((size, size), Image.BILINEAR))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise DataError(f"{p} is not a readable image ({e})") from None
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"
    arr = np.stack([np.asarray(im.convert(mode)) for im in images])
    arr = arr[:, None] if mode == "L" else arr.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(arr, dtype=np.uint8), np.array([c for _, c in files], dtype=np.int64), classes


__all__ = ["read_idx", "read_idx_pair", "parse_cifar_records", "read_svhn_mat", "read_image_folder"]
