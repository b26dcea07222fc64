"""Fault cases of the data and the cluster address: corrupt or hostile dataset files, a mirror that vouches for
what it should not, and a ``ray.address`` nobody listens on. Each must be refused by the sweep's pre-flight in
one line naming the file (or address) and the fix, exit 2, before Ray starts and with nothing written.

The files are small builds in the official formats (IDX, the CIFAR-10 binary archive) that the case writes
into a data root of its own, listed in that root's SHA256SUMS as a root holding its own builds lists them;
then the case damages them. The shared data is never touched."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import socket
import struct
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from bioplaus.orchestrator.data.download import write_sums
from bioplaus.orchestrator.faults import Outcome, fault
from bioplaus.orchestrator.faults.harness import Bench, Finished

_IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz")
_CIFAR = "cifar-10-binary.tar.gz"


def _pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that look like data and compress like it (no RNG needed, the same on every machine)."""
    out = bytearray()
    block = seed
    while len(out) < n:
        block += 1
        out += hashlib.sha256(block.to_bytes(8, "big")).digest()
    return bytes(out[:n])


def _write_mnist(folder: Path, n_train: int = 200, n_test: int = 50) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = bytes([0, 0, 8, 3]) + struct.pack(">III", n, 28, 28) + _pattern(n * 784, n)
        labels = bytes([0, 0, 8, 1]) + struct.pack(">I", n) + bytes(i % 10 for i in range(n))
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images, mtime=0))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels, mtime=0))


def _write_cifar10(folder: Path, extra: tarfile.TarInfo | None = None, records: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _CIFAR
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
            data = bytearray(_pattern(records * 3073, 1000 * i))
            data[::3073] = bytes(r % 10 for r in range(records))  # label bytes 0..9
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(bytes(data)))
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size) if extra.isfile() else None)
    return path


def _refused_before_ray(bench: Bench, dataset: str, root: Path, bad: Path, said: str,
                        *extra: str) -> tuple[Finished, dict[str, bool]]:
    """Run the sweep on ``dataset`` from ``root``: the checks of a pre-flight refusal naming ``bad``."""
    out = bench.sweep(bench.args(f"datasets=[{dataset}]", f"trial.data.root={root}", *extra), timeout_s=300)
    line = out.errors[0] if out.errors else ""
    return out, {"exit 2": out.code == 2, "one line": len(out.lines) == 1 and line == out.lines[0],
                 "names the file": str(bad).replace(str(bench.folder), "<tmp>") in line, f"says '{said}'": said in line,
                 "nothing written": not bench.dir().exists()}


def _said(bench: Bench, out: Finished) -> str:
    """The error line, short: no prefix, the case's folder as <tmp>, digests cut to 12 hex digits."""
    line = (out.errors or out.lines or [""])[0].removeprefix("bioplaus: error: ")
    line = line.replace(bench.folder.resolve().as_uri(), "file://<tmp>").replace(str(bench.folder), "<tmp>")
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1..", line)[:240]


def _outcome(bench: Bench, runs: list[tuple[str, Finished, dict[str, bool]]]) -> Outcome:
    failed = [f"{label}: {name}" for label, _, checks in runs for name, held in checks.items() if not held]
    said = "; ".join(f"{label}: exit {out.code}, {_said(bench, out)}" for label, out, _ in runs)
    return Outcome(said + ("" if not failed else "; NOT: " + ", ".join(failed)), not failed, None,
                   runs[-1][1].code)


def _mnist_images(root: Path) -> Path:
    _write_mnist(root / "mnist")
    return root / "mnist" / _IDX[0]


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _damaged_two_ways(bench: Bench, dataset: str, write: Callable[[Path], Path],
                      damage: Callable[[Path], None]) -> Outcome:
    """A good copy per way (``write`` returns the file to damage), damaged after its digests are listed: the
    pre-flight must refuse it by its digest ("digest") and, once the root lists the damaged file's digest too,
    by parsing it ("parse")."""
    runs = []
    for label, vouched, said in (("digest", False, "has sha256"), ("parse", True, "is corrupt or truncated")):
        root = bench.folder / f"data-{label}"
        bad = write(root)
        write_sums(root)
        damage(bad)
        if vouched:
            write_sums(root)
        runs.append((label, *_refused_before_ray(bench, dataset, root, bad, said)))
    return _outcome(bench, runs)


@fault("MNIST training images cut to half their size",
       "refused by the pre-flight before Ray: one line naming the file (exit 2), nothing written; by its digest, "
       "and by the parser where the root lists the cut file's digest")
def truncated_mnist(bench: Bench) -> Outcome:
    return _damaged_two_ways(bench, "mnist", _mnist_images, _cut_in_half)


@fault("a flipped byte in the CIFAR-10 archive",
       "refused by the pre-flight before Ray: one line naming the archive (exit 2), nothing written; by its digest, "
       "and by the gzip check where the root lists the damaged archive's digest")
def flipped_cifar_byte(bench: Bench) -> Outcome:
    return _damaged_two_ways(bench, "cifar10", lambda root: _write_cifar10(root / "cifar-10"), _flip_middle_byte)


def _hostile_member(bench: Bench, member: tarfile.TarInfo, said: str) -> Outcome:
    root = bench.folder / "data"
    bad = _write_cifar10(root / "cifar-10", extra=member)
    write_sums(root)  # the root vouches for the archive: what must refuse it is the member check
    out, checks = _refused_before_ray(bench, "cifar10", root, bad, said)
    checks["nothing extracted"] = sorted(p.name for p in bench.folder.rglob("*")) == sorted(
        ["data", "SHA256SUMS", "cifar-10", _CIFAR])
    return _outcome(bench, [("member", out, checks)])


@fault("tar member ../../x in the CIFAR-10 archive",
       "refused by the pre-flight before Ray: one line naming the archive (exit 2), nothing written or extracted")
def traversal_member(bench: Bench) -> Outcome:
    info = tarfile.TarInfo("../../x")
    info.size = 1
    return _hostile_member(bench, info, "escapes the archive folder")


@fault("symlink member in the CIFAR-10 archive",
       "refused by the pre-flight before Ray: one line naming the archive (exit 2), nothing written or extracted")
def symlink_member(bench: Bench) -> Outcome:
    info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_6.bin")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return _hostile_member(bench, info, "is a link or special file")


@fault("a mirror's SHA256SUMS vouching for its own build of a file with an official digest",
       "the download is refused against the official digest (one line, exit 2), nothing kept in the data root "
       "and no sweep folder")
def mirror_overrides_official(bench: Bench) -> Outcome:
    mirror = bench.folder / "mirror"
    _write_mnist(mirror / "kmnist")  # KMNIST has official digests; these small files are not the official ones
    write_sums(mirror)
    root = bench.folder / "data"
    out = bench.sweep(bench.args("datasets=[kmnist]", f"trial.data.root={root}",
                                 f"trial.data.mirror={mirror.resolve().as_uri()}"), timeout_s=300)
    line = out.errors[0] if out.errors else ""
    kept = [p.name for p in root.rglob("*") if p.is_file()] if root.exists() else []
    # Besides the error, stderr may carry the download's own progress lines ("downloading <file> ..."), never more.
    others = [x for x in out.lines if x not in out.errors and not x.startswith("downloading ")]
    checks = {"exit 2": out.code == 2, "one error line": len(out.errors) == 1 and not others,
              "official digest kept": "cannot replace an official digest" in line, "nothing kept": not kept,
              "nothing written": not bench.dir().exists()}
    return _outcome(bench, [("download", out, checks)])


@fault("ray.address that cannot be joined (a closed loopback port)",
       "refused in seconds by a bounded connect, before anything is written: one line naming the fix, exit 2")
def unjoinable_ray_address(bench: Bench) -> Outcome:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there now
    tick = time.monotonic()
    out = bench.sweep(bench.args(f"ray.address={address}"), timeout_s=300)
    seconds = time.monotonic() - tick
    line = out.errors[0] if out.errors else ""
    checks = {"exit 2": out.code == 2, "one line": len(out.lines) == 1,
              "names the address and the fix": f"cannot connect to a Ray head at {address}" in line
              and "ray.address=HOST:PORT" in line,
              "before ray.timeout_s (180 s)": seconds < 120, "nothing written": not bench.dir().exists()}
    return _outcome(bench, [(f"after {seconds:.0f}s", out, checks)])
