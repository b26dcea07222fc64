"""Fetching dataset files: official URLs or a mirror, SHA-256 checked, written atomically.

A mirror (``data.mirror``) is a base URL laid out like the data root (``<mirror>/<dataset dir>/<file>``).
It may publish a ``SHA256SUMS`` file at its base (``<hash>  <dataset dir>/<file>`` per line): a
mirror carrying its own builds of a file (a subset, a recompression) vouches for them there;
files it does not list are checked against the official SHA-256.

A download shows its progress on stderr: a live bar on a terminal, otherwise a plain line at the start,
every ``BIOPLAUS_PROGRESS_EVERY_S`` seconds (default 30) and at the end. Files are written 0644 (mkstemp's
0600 would hide a shared data root from other users); a failed download leaves neither its partial file
nor a folder it created and left empty.

Written here rather than with pooch: pooch's registry is one digest per file, while a mirror here may
vouch for its own builds in its ``SHA256SUMS`` and fall back to the official digest for the files it does
not list; pooch also keeps its own cache layout (the data root is the mirror's layout, possibly read-only,
its archives read in place), needs tqdm for progress, and would be one more dependency for about fifty lines.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bioplaus.orchestrator.errors import DataError

TIMEOUT_S = 60
_CHUNK = 1 << 20
_ALLOWED_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset as officially distributed."""

    name: str
    """File name inside the dataset's folder (same as the official artifact's name)."""
    url: str
    """Official download URL."""
    sha256: str | None
    """Official SHA-256 of the file (None where no official digest is known)."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _open(url: str):
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in _ALLOWED_SCHEMES:
        raise DataError(f"refusing to download {url!r}: scheme {scheme!r} is not http, https or file")
    return urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 (scheme checked above)


def mirror_checksums(mirror: str) -> dict[str, str]:
    """The mirror's ``SHA256SUMS`` as {relative path: sha256}; empty if it publishes none."""
    try:
        with _open(mirror.rstrip("/") + "/SHA256SUMS") as resp:
            text = resp.read(1 << 20).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    sums = {}
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].lstrip("*").removeprefix("./")] = parts[0].lower()
    return sums


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get("BIOPLAUS_PROGRESS_EVERY_S", 30.0)))
    except ValueError:
        return 30.0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class _DownloadProgress:
    """Bytes received of one file on stderr: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, name: str, url: str, total: int | None):
        self.name, self.total, self.done = name, total, 0
        self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self.bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(name, total=total)
        print(f"downloading {name} from {url}" + (f" ({_mb(total)})" if total else ""), file=sys.stderr, flush=True)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif time.monotonic() - self.last >= _every_s():
            self.last = time.monotonic()
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            print(f"downloading {self.name}: {_mb(self.done)}" + (f" of {_mb(self.total)}" if self.total else "")
                  + share, file=sys.stderr, flush=True)

    def close(self, ok: bool) -> None:
        if self.bar is not None:
            self.bar.stop()
        if ok:
            print(f"downloaded {self.name}: {_mb(self.done)}, sha256 checked", file=sys.stderr, flush=True)


def _chunks(resp) -> Iterator[bytes]:
    return iter(lambda: resp.read(_CHUNK), b"")


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; the folders created, deepest first (to remove if left empty)."""
    created = []
    at = folder
    while not at.exists():
        created.append(at)
        at = at.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first: a parent is empty only once its child is gone
        try:
            folder.rmdir()
        except OSError:  # not empty (another file arrived) or already gone: keep it
            return


def fetch(remote: RemoteFile, dest: Path, *, url: str | None = None, sha256: str | None = None) -> Path:
    """Download ``remote`` (or ``url``) to ``dest`` atomically, verifying ``sha256`` (default: official).

    On any failure the partial file is removed, and so is every folder this call created that is left empty.
    """
    url = url or remote.url
    expected = (sha256 or remote.sha256 or "").lower() or None
    try:
        created = _make_folder(dest.parent)
    except OSError as e:
        raise DataError(f"cannot create {dest.parent} for {dest.name} ({e.strerror or e}); set data.root=DIR "
                        "(env BIOPLAUS_DATA) to a writable folder") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    ok, progress = False, None
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open(url) as resp:
            length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
            progress = _DownloadProgress(dest.name, url, int(length) if length and length.isdigit() else None)
            for chunk in _chunks(resp):
                h.update(chunk)
                out.write(chunk)
                progress.advance(len(chunk))
        got = h.hexdigest()
        if expected and got != expected:
            raise DataError(f"checksum mismatch for {dest.name} from {url}: expected {expected}, got {got} "
                            "(sha256); the download is corrupt or the mirror serves a different file")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        ok = True
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot download {dest.name} from {url} ({reason}); put the file at {dest}, "
                        "or set data.mirror=URL, or data.root=DIR (env BIOPLAUS_DATA) to a folder that has it") from None
    finally:
        if progress is not None:
            progress.close(ok)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not ok:
            _remove_empty(created)
    return dest


def tar_members(archive: Path) -> dict[str, bytes]:
    """Regular files of a tar archive as {member name: bytes}, read in place (nothing is extracted).

    Reading in place works on read-only data roots and leaves no extracted copy to go stale. An
    archive holding a member that would escape its folder if extracted (absolute path, ``..``) or a
    link is refused as a whole: such an archive is not an official artifact.
    """
    out = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                name = m.name
                parts = Path(name).parts
                if name.startswith(("/", "\\")) or ".." in parts or Path(name).is_absolute():
                    raise DataError(f"{archive}: member {name!r} escapes the archive folder; refusing the archive")
                if m.issym() or m.islnk() or m.isdev() or m.isfifo():
                    raise DataError(f"{archive}: member {name!r} is a link or special file; refusing the archive")
                if m.isfile():
                    f = tar.extractfile(m)
                    out[name] = f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive} is corrupt or truncated ({e}); delete it to download it again") from None
    return out
