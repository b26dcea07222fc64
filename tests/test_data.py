"""Datasets: real files from the data mirror (found by conftest.find_real_data), downloads over loopback
HTTP, and small files in the official formats (CIFAR-100, SVHN, KMNIST, image folders) that the tests write
themselves."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.data import DATASETS, load_raw, make_splits
from bioplaus.orchestrator.data.datasets import data_root, ensure_files
from bioplaus.orchestrator.data.formats import read_idx
from bioplaus.orchestrator.errors import DataError, UsageError
from conftest import find_real_data, list_digests


def data_cfg(*overrides: str):
    return parse_overrides(list(overrides)).data


def load_own(name: str, root: Path):
    """load_raw from a data root that vouches (SHA256SUMS) for the small files a test wrote there, so that
    what is tested is their parsing, not their digest."""
    list_digests(root)
    return load_raw(name, data_cfg(f"data.root={root}"))


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_idx_dataset(folder: Path, n_train=20, n_test=10, size=28, classes=10, seed=0):
    rng = np.random.RandomState(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.randint(0, 256, (n, size, size)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % classes)


def real_files_of(*datasets: str) -> Path:
    """A data root holding every file of ``datasets`` (the mirror or a data root that downloaded them)."""
    return find_real_data(*(f"{DATASETS[d].dirname}/{f.name}" for d in datasets for f in DATASETS[d].files))


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --- real files ---------------------------------------------------------------------------------
def test_mnist_subset_is_read_with_the_count_from_its_header(real_data):
    raw = load_raw("mnist", data_cfg(f"data.root={real_data}"))
    assert raw.train_x.shape == (10000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert raw.train_x.dtype == np.uint8 and set(np.unique(raw.test_y)) == set(range(10))
    assert np.bincount(raw.test_y).tolist()[:3] == [980, 1135, 1032]  # the canonical MNIST test set


def test_fashion_mnist_and_cifar10_load_whole():
    root = real_files_of("fashion_mnist", "cifar10")
    fm = load_raw("fashion_mnist", data_cfg(f"data.root={root}"))
    assert fm.train_x.shape == (60000, 1, 28, 28) and fm.classes[9] == "Ankle boot"
    cifar = load_raw("cifar10", data_cfg(f"data.root={root}"))
    assert cifar.train_x.shape == (50000, 3, 32, 32) and cifar.test_x.shape == (10000, 3, 32, 32)
    assert np.bincount(cifar.test_y).tolist() == [1000] * 10
    assert cifar.classes[0] == "airplane" and cifar.classes[9] == "truck"


# --- downloads over loopback ----------------------------------------------------------------------
def test_rebuilt_file_from_a_mirror_is_refused_whatever_its_sha256sums_says(real_data, http_serve, tmp_path):
    # The shared mirror's MNIST is a 10,000-image rebuild, listed in its SHA256SUMS: not the official file.
    root = tmp_path / "dl"
    with pytest.raises(DataError, match="expected 440fcabf.* cannot replace an official digest"):
        load_raw("mnist", data_cfg(f"data.root={root}", f"data.mirror={http_serve(real_data)}"))
    assert not list((root / "mnist").glob("*"))  # neither the file nor a temp file is kept


def test_mirror_digests_count_for_files_without_an_official_one(real_data, http_serve, tmp_path):
    spec = dataclasses.replace(DATASETS["mnist"], files=tuple(dataclasses.replace(f, sha256=None)
                                                             for f in DATASETS["mnist"].files))
    root = tmp_path / "dl"
    ensure_files(spec, data_cfg(f"data.root={root}", f"data.mirror={http_serve(real_data)}"))
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert (root / "mnist" / name).read_bytes() == (real_data / "mnist" / name).read_bytes()
    assert not list((root / "mnist").glob(".*part"))  # no temp files left behind
    bad = tmp_path / "bad-mirror"
    (bad / "mnist").mkdir(parents=True)
    for f in spec.files:
        (bad / "mnist" / f.name).symlink_to(real_data / "mnist" / f.name)
    (bad / "SHA256SUMS").write_text("0" * 64 + "  mnist/train-images-idx3-ubyte.gz\n")
    with pytest.raises(DataError, match="checksum mismatch for train-images-idx3-ubyte.gz"):
        ensure_files(spec, data_cfg(f"data.root={tmp_path / 'dl2'}", f"data.mirror={http_serve(bad)}"))


def test_download_with_wrong_checksum_is_refused_and_not_kept(http_serve, tmp_path):
    mirror = tmp_path / "mirror"
    write_idx_dataset(mirror / "kmnist")
    digest = hashlib.sha256(b"something else").hexdigest()
    (mirror / "SHA256SUMS").write_text(f"{digest}  kmnist/train-images-idx3-ubyte.gz\n")
    root = tmp_path / "dl"
    with pytest.raises(DataError, match="checksum mismatch for train-images-idx3-ubyte.gz"):
        load_raw("kmnist", data_cfg(f"data.root={root}", f"data.mirror={http_serve(mirror)}"))
    assert not (root / "kmnist" / "train-images-idx3-ubyte.gz").exists()


def test_file_not_listed_by_the_mirror_is_checked_against_the_official_sha256(http_serve, tmp_path):
    mirror = tmp_path / "mirror"
    write_idx_dataset(mirror / "kmnist")  # our small files are not the official ones
    with pytest.raises(DataError, match="expected 51467d22"):
        load_raw("kmnist", data_cfg(f"data.root={tmp_path / 'dl'}", f"data.mirror={http_serve(mirror)}"))


def test_mirror_vouching_for_its_own_build_cannot_override_the_official_digest(http_serve, tmp_path):
    mirror = tmp_path / "mirror"
    write_idx_dataset(mirror / "kmnist", n_train=30, n_test=12)
    list_digests(mirror)  # a malicious mirror can list anything
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz .*expected 51467d22.* cannot replace an official"):
        load_raw("kmnist", data_cfg(f"data.root={tmp_path / 'dl'}", f"data.mirror={http_serve(mirror)}"))
    assert not (tmp_path / "dl" / "kmnist" / "train-images-idx3-ubyte.gz").exists()


def test_small_kmnist_in_a_root_that_lists_its_digests_parses(tmp_path):
    write_idx_dataset(tmp_path / "kmnist", n_train=30, n_test=12)
    raw = load_own("kmnist", tmp_path)
    assert raw.train_x.shape == (30, 1, 28, 28) and raw.test_x.shape == (12, 1, 28, 28) and raw.classes[0] == "o"


def test_unreachable_mirror_gives_an_error_naming_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"cannot download train-images-idx3-ubyte.gz .*data.root"):
        load_raw("mnist", data_cfg(f"data.root={tmp_path}", "data.mirror=http://127.0.0.1:9"))


def test_missing_file_with_download_disabled(tmp_path):
    with pytest.raises(DataError, match="missing and data.download=false"):
        load_raw("mnist", data_cfg(f"data.root={tmp_path}", "data.download=false"))


def test_data_root_comes_from_config_then_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BIOPLAUS_DATA", str(tmp_path / "env"))
    assert data_root(data_cfg()) == tmp_path / "env"
    assert data_root(data_cfg(f"data.root={tmp_path / 'cfg'}")) == tmp_path / "cfg"
    monkeypatch.delenv("BIOPLAUS_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root(data_cfg()) == tmp_path / "cache" / "bioplaus" / "data"


# --- corrupt files ------------------------------------------------------------------------------
def test_truncated_idx_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "mnist"
    write_idx_dataset(folder)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: IDX header says \(20, 28, 28\)"):
        load_own("mnist", tmp_path)


def test_corrupt_gzip_and_bad_magic_are_refused(tmp_path):
    bad = tmp_path / "x-idx3-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError, match="x-idx3-ubyte.gz is corrupt"):
        read_idx(bad)
    bad.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + b"\0" * 16))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)


def test_mismatched_image_and_label_counts(tmp_path):
    folder = tmp_path / "mnist"
    write_idx_dataset(folder)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(7))
    with pytest.raises(DataError, match="holds 20 images but .* holds 7 labels"):
        load_own("mnist", tmp_path)


# --- CIFAR-100 and SVHN in their official formats, written by the test ------------------------------
def write_cifar100(folder: Path, n_train=50, n_test=20, extra_members=()):
    rng = np.random.RandomState(1)
    def records(n):
        rec = np.zeros((n, 3074), np.uint8)
        rec[:, 0] = np.arange(n) % 20          # coarse label
        rec[:, 1] = np.arange(n) % 100         # fine label
        rec[:, 2:] = rng.randint(0, 256, (n, 3072))
        return rec
    train, test = records(n_train), records(n_test)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "cifar-100-binary.tar.gz", "w:gz") as tar:
        add_tar_member(tar, "cifar-100-binary/train.bin", train.tobytes())
        add_tar_member(tar, "cifar-100-binary/test.bin", test.tobytes())
        add_tar_member(tar, "cifar-100-binary/fine_label_names.txt",
                       "\n".join(f"class{i}" for i in range(100)).encode())
        for member in extra_members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return train, test


def test_cifar100_binary_records_are_parsed_exactly(tmp_path):
    train, test = write_cifar100(tmp_path / "cifar-100")
    raw = load_own("cifar100", tmp_path)
    assert raw.train_x.shape == (50, 3, 32, 32) and len(raw.classes) == 100
    np.testing.assert_array_equal(raw.train_y, train[:, 1])  # fine labels
    np.testing.assert_array_equal(raw.test_x[3].reshape(-1), test[3, 2:])  # R, G, B planes in order


@pytest.mark.parametrize("member", ["../escape.bin", "/abs/path.bin", "link"])
def test_archive_with_escaping_member_or_link_is_refused(tmp_path, member):
    info = tarfile.TarInfo(member)
    if member == "link":
        info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    else:
        info.size = 1
    write_cifar100(tmp_path / "cifar-100", extra_members=[info])
    with pytest.raises(DataError, match="cifar-100-binary.tar.gz: member .* refusing the archive"):
        load_own("cifar100", tmp_path)


def test_truncated_cifar_archive_is_refused(tmp_path):
    write_cifar100(tmp_path / "cifar-100")
    path = tmp_path / "cifar-100" / "cifar-100-binary.tar.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="cifar-100-binary.tar.gz is corrupt or truncated"):
        load_own("cifar100", tmp_path)


def test_svhn_mat_files_map_label_10_to_digit_0(tmp_path):
    import scipy.io

    rng = np.random.RandomState(0)
    folder = tmp_path / "svhn"
    folder.mkdir()
    for name, n in (("train", 30), ("test", 10)):
        x = rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 1..10, 10 is digit 0
        scipy.io.savemat(folder / f"{name}_32x32.mat", {"X": x, "y": y})
        if name == "train":
            first = x[:, :, :, 9]
    raw = load_own("svhn", tmp_path)
    assert raw.train_x.shape == (30, 3, 32, 32) and raw.train_y[9] == 0 and raw.train_y[0] == 1
    np.testing.assert_array_equal(raw.train_x[9], first.transpose(2, 0, 1))
    (folder / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="test_32x32.mat is not a readable SVHN"):
        load_own("svhn", tmp_path)


def test_imagefolder_reads_class_subfolders_with_train_and_test(tmp_path):
    from PIL import Image

    for split, n in (("train", 4), ("test", 2)):
        for c, color in (("cat", 30), ("dog", 200)):
            d = tmp_path / "imgs" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 16), (color, i, 0)).save(d / f"{i}.png")
    raw = load_raw("imagefolder", data_cfg(f"data.imagefolder={tmp_path / 'imgs'}", "data.image_size=12"))
    assert raw.classes == ["cat", "dog"] and raw.train_x.shape == (8, 3, 12, 12) and raw.test_x.shape == (4, 3, 12, 12)
    assert raw.train_y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and raw.train_x[5, 0, 0, 0] == 200
    with pytest.raises(UsageError, match="needs data.imagefolder=PATH"):
        load_raw("imagefolder", data_cfg())


# --- splits ---------------------------------------------------------------------------------------
def test_validation_split_is_carved_from_train_by_seed_and_disjoint():
    cfg = data_cfg()
    raw = load_raw("digits", cfg)
    a, b, c = make_splits(raw, cfg, 0), make_splits(raw, cfg, 0), make_splits(raw, cfg, 1)
    assert torch.equal(a.val_x, b.val_x) and not torch.equal(a.val_x, c.val_x)
    assert torch.equal(a.test_x, c.test_x)  # the test set never depends on the seed
    assert a.sizes == {"train": 1293, "val": 144, "test": 360}
    train_rows = {bytes(r) for r in a.train_x.reshape(len(a.train_x), -1).numpy()}
    val_rows = [bytes(r) for r in a.val_x.reshape(len(a.val_x), -1).numpy()]
    # digits has a few exact duplicate images; nearly all validation images are absent from train
    assert sum(r in train_rows for r in val_rows) <= 3
    x = a.normalize(a.train_x)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


def test_every_registered_dataset_has_official_sha256_or_no_files():
    for spec in DATASETS.values():
        for f in spec.files:
            assert f.sha256 and len(f.sha256) == 64 and f.url.startswith("http"), (spec.name, f.name)


def test_affine_augmentation_moves_digits_and_fills_the_border_with_black():
    """data.augment=affine: reproducible from its generator, the identity when every range is 0, a different
    distortion per sample, and what enters from outside the image is the standardised black pixel (``fill``),
    not the standardised zero (the mean pixel) that shift's padding uses."""
    from bioplaus.orchestrator.trial import affine_batch

    fill = torch.tensor([-0.42])  # MNIST: (0 - mean) / std
    x = torch.full((64, 1, 28, 28), -0.42)
    x[:, :, 8:20, 12:16] = 2.0  # a bar on a black background
    a = affine_batch(x, torch.Generator().manual_seed(3), fill)
    b = affine_batch(x, torch.Generator().manual_seed(3), fill)
    assert torch.equal(a, b)
    assert not torch.equal(a, affine_batch(x, torch.Generator().manual_seed(4), fill))
    assert len({tuple(s.flatten().round(decimals=3).tolist()) for s in a}) == 64  # one distortion per sample
    # a black background stays black everywhere: no grey strip comes in at the border
    assert torch.allclose(a[:, :, :2, :], fill.view(1, -1, 1, 1).expand(64, 1, 2, 28), atol=1e-5)
    assert a.min() >= -0.42 - 1e-5 and a.max() <= 2.0 + 1e-5  # bilinear: never outside the input's range
    ident = affine_batch(x, torch.Generator().manual_seed(3), fill, degrees=0, scale=0, shift=0)
    assert torch.allclose(ident, x, atol=1e-5)
    # on a bright constant image the border pulls towards black, the centre does not move
    c = affine_batch(torch.ones(64, 1, 28, 28), torch.Generator().manual_seed(5), fill)
    assert torch.allclose(c[:, :, 14, 14], torch.ones(64, 1), atol=1e-5)
    assert (c[:, 0, [0, -1]].amin(dim=(1, 2)) < 0.99).float().mean() > 0.9


def test_affine_augmentation_trains_through_the_trial_and_is_refused_when_misspelt():
    from bioplaus.orchestrator.trial import resolve, run_trial

    over = ["rule=bp", "arch=mlp", "dataset=digits", "train.epochs=1", "out=null"]
    record = run_trial(resolve(parse_overrides([*over, "data.augment=affine"])))
    assert record["status"] == "ok" and record["test_acc"] > 0.5
    assert record["test_acc"] != run_trial(resolve(parse_overrides(over)))["test_acc"]
    with pytest.raises(UsageError, match="data.augment='afine' must be one of none, shift, crop_flip, affine"):
        resolve(parse_overrides([*over, "data.augment=afine"]))


def test_channel_stats_are_exact_whatever_the_thread_count():
    """Standardisation statistics come from exact integer sums: the same float32 values with 1 or 2 threads, and
    equal to a float64 computation rounded once."""
    import torch

    from bioplaus.orchestrator.data.datasets import channel_stats

    x = torch.randint(0, 256, (3000, 3, 17, 19), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = channel_stats(x)
        torch.set_num_threads(2)
        two = channel_stats(x)
    finally:
        torch.set_num_threads(threads)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one[0], ref.mean(1).float()) and torch.allclose(one[1], ref.std(1).float(), rtol=1e-6)
