"""Downloads as a user sees them, over loopback HTTP only: progress (a bar on a terminal, plain lines
otherwise), file modes, what a failure leaves behind and what its error says."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import select
import sys

import pytest

from bioplaus.orchestrator.data import DATASETS, download, load_raw
from bioplaus.orchestrator.errors import DataError
from test_data import data_cfg, write_idx_dataset

ESC = "\x1b["


@pytest.fixture
def unofficial(monkeypatch):
    """Make ``name`` a dataset without official digests, so a mirror's ``SHA256SUMS`` may vouch for its files
    (a mirror can never replace an official digest; these tests are about the download, not about trust)."""
    def make(name: str) -> None:
        spec = DATASETS[name]
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(
            spec, files=tuple(dataclasses.replace(f, sha256=None) for f in spec.files)))
    return make


def vouch(mirror, dirname: str) -> None:
    """A SHA256SUMS at the mirror's base vouching for every file it serves under ``dirname``."""
    (mirror / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {dirname}/{p.name}\n"
                                               for p in sorted((mirror / dirname).iterdir())))


def test_download_off_a_terminal_prints_plain_periodic_lines_and_files_are_0644(real_data, http_serve, tmp_path,
                                                                                 capfd, monkeypatch, unofficial):
    unofficial("mnist")  # the mirror's MNIST is a 10,000-image subset, not the official file
    monkeypatch.setenv("BIOPLAUS_PROGRESS_EVERY_S", "0")  # a line per chunk
    monkeypatch.setattr(download, "_CHUNK", 1 << 18)
    root = tmp_path / "dl"
    load_raw("mnist", data_cfg(f"data.root={root}", f"data.mirror={http_serve(real_data)}"))
    err = capfd.readouterr().err
    assert ESC not in err and "\r" not in err
    name = "train-images-idx3-ubyte.gz"
    size = (real_data / "mnist" / name).stat().st_size
    lines = [line for line in err.splitlines() if name in line]
    assert lines[0].startswith(f"downloading {name} from http://127.0.0.1:") and f"({size / 1e6:.1f} MB)" in lines[0]
    assert len([line for line in lines if line.endswith("%)")]) >= size // (1 << 18)  # the periodic lines
    assert lines[-1] == f"downloaded {name}: {size / 1e6:.1f} MB, sha256 checked"
    for path in (root / "mnist").iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_download_on_a_terminal_draws_a_bar(http_serve, tmp_path, monkeypatch, unofficial):
    unofficial("kmnist")
    mirror = tmp_path / "mirror"
    write_idx_dataset(mirror / "kmnist")
    vouch(mirror, "kmnist")
    leader, follower = os.openpty()
    terminal = os.fdopen(follower, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("TERM", "xterm")
    try:
        load_raw("kmnist", data_cfg(f"data.root={tmp_path / 'dl'}", f"data.mirror={http_serve(mirror)}"))
        terminal.flush()
        drawn = b""
        while select.select([leader], [], [], 0.5)[0]:
            drawn += os.read(leader, 1 << 16)
    finally:
        terminal.close()
        os.close(leader)
    assert ESC.encode() in drawn  # rich's live bar (cursor control) on a terminal
    assert b"downloaded train-images-idx3-ubyte.gz" in drawn


def test_checksum_mismatch_names_the_file_and_both_digests_and_leaves_nothing(http_serve, tmp_path, unofficial):
    unofficial("kmnist")  # the mirror's digest counts only for a file without an official one
    mirror = tmp_path / "mirror"
    write_idx_dataset(mirror / "kmnist")
    name = "train-images-idx3-ubyte.gz"
    wrong = hashlib.sha256(b"something else").hexdigest()
    actual = hashlib.sha256((mirror / "kmnist" / name).read_bytes()).hexdigest()
    (mirror / "SHA256SUMS").write_text(f"{wrong}  kmnist/{name}\n")
    root = tmp_path / "dl"
    with pytest.raises(DataError) as e:
        load_raw("kmnist", data_cfg(f"data.root={root}", f"data.mirror={http_serve(mirror)}"))
    assert f"checksum mismatch for {name}" in str(e.value)
    assert f"expected {wrong}, got {actual}" in str(e.value)
    assert not root.exists()  # the data root and dataset folder this download created are gone, no .part left


def test_unreachable_server_leaves_no_empty_folder_but_keeps_existing_ones(tmp_path):
    root = tmp_path / "dl"
    with pytest.raises(DataError, match="cannot download"):
        load_raw("mnist", data_cfg(f"data.root={root}", "data.mirror=http://127.0.0.1:9"))
    assert not root.exists()
    (root / "mnist").mkdir(parents=True)  # a folder that was there before is the user's: kept
    with pytest.raises(DataError, match="cannot download"):
        load_raw("mnist", data_cfg(f"data.root={root}", "data.mirror=http://127.0.0.1:9"))
    assert (root / "mnist").is_dir() and not list((root / "mnist").iterdir())


def test_a_later_file_failing_keeps_the_verified_earlier_ones(http_serve, tmp_path, unofficial):
    unofficial("kmnist")
    mirror = tmp_path / "mirror"
    write_idx_dataset(mirror / "kmnist")
    vouch(mirror, "kmnist")
    (mirror / "kmnist" / "t10k-images-idx3-ubyte.gz").unlink()  # the mirror lacks the third file
    root = tmp_path / "dl"
    with pytest.raises(DataError, match="cannot download t10k-images-idx3-ubyte.gz"):
        load_raw("kmnist", data_cfg(f"data.root={root}", f"data.mirror={http_serve(mirror)}"))
    assert sorted(p.name for p in (root / "kmnist").iterdir()) == ["train-images-idx3-ubyte.gz",
                                                                  "train-labels-idx1-ubyte.gz"]
