"""Fetching and trusting dataset files: official URLs or a mirror, SHA-256 checked, written atomically.

A mirror (``data.mirror``) is a base URL laid out like the data root (``<mirror>/<dataset dir>/<file>``).
It may publish a ``SHA256SUMS`` file at its base (``<hash>  <dataset dir>/<file>`` per line). The mirror
is not trusted beyond the official list: its digests count only for files that have no official
SHA-256; a file that has one is checked against it, whatever the mirror says.

The data root is the user's own: its ``SHA256SUMS`` (same format) says what its files are, so a root
holding its own builds of a file (a subset, a recompression) lists them there. A file already in the
root is accepted when it matches its official digest or the digest its root lists.

A download shows its progress on stderr: a live bar on a terminal, otherwise a plain line at the start,
every ``BIOPLAUS_PROGRESS_EVERY_S`` seconds (default 30) and at the end. Files are written 0644 (mkstemp's
0600 would hide a shared data root from other users); a failed download leaves neither its partial file
nor a folder it created and left empty.

Written here rather than with pooch: pooch's registry is one digest per file, while here a file is
accepted by its official digest or by the data root's own ``SHA256SUMS``, and a mirror's list only adds
digests for files that have no official one; pooch also keeps its own cache layout (the data root is the mirror's layout, possibly read-only,
its archives read in place), needs tqdm for progress, and would be one more dependency for about fifty lines.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bioplaus.orchestrator.errors import DataError

TIMEOUT_S = 60
_CHUNK = 1 << 20
SUMS_FILE = "SHA256SUMS"
MAX_MEMBER_BYTES = 512 << 20
"""The largest archive member (or decompressed file) read into memory; the official ones are below 160 MB."""
MAX_ARCHIVE_BYTES = 1 << 30
"""The most bytes read out of one archive, all members together."""
# (path, size, mtime_ns, inode) -> sha256: hashing a large archive once per process, not once per read.
_DIGESTS: dict[tuple, str] = {}
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


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def sha256_of(path: Path) -> str:
    """The file's SHA-256, remembered for the process while its size, mtime and inode stay the same."""
    key = _stat_key(path)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def parse_sums(text: str) -> dict[str, str]:
    """``sha256sum`` output (``<hash>  <relative path>`` per line) as {relative path: sha256}."""
    sums = {}
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].lstrip("*").removeprefix("./")] = parts[0].lower()
    return sums


def write_sums(root: Path) -> Path:
    """Write ``root/SHA256SUMS`` listing every file under ``root`` (``sha256sum``'s format, :func:`parse_sums`'s
    input): a data root or a mirror vouching for its own builds of dataset files."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != SUMS_FILE)
    (root / SUMS_FILE).write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  "
                                          f"{p.relative_to(root).as_posix()}\n" for p in files))
    return root / SUMS_FILE


def root_checksums(root: Path) -> dict[str, str]:
    """The data root's own ``SHA256SUMS`` as {relative path: sha256}; empty if it has none."""
    try:
        with open(Path(root) / SUMS_FILE, "rb") as f:
            return parse_sums(f.read(1 << 20).decode("utf-8", "replace"))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise DataError(f"cannot read {Path(root) / SUMS_FILE} ({e}); fix its permissions or remove it") from None


def verify_file(path: Path, official: str | None, listed: str | None, root: Path) -> None:
    """Refuse ``path`` unless it matches its ``official`` digest or the one its root ``listed`` (none known: accepted)."""
    trusted = {d.lower() for d in (official, listed) if d}
    if not trusted:
        return
    try:
        got = sha256_of(path)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e}); fix its permissions or delete it to download it again") from None
    if got in trusted:
        return
    said = " or ".join(filter(None, (official and f"{official} (official)",
                                     listed and f"{listed} (listed in {Path(root) / SUMS_FILE})")))
    raise DataError(f"{path} has sha256 {got}, expected {said}; the file is corrupt, truncated or not the one "
                    f"named: delete it to download it again (or, if you built it yourself, list its digest in "
                    f"{Path(root) / SUMS_FILE})")


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
    return parse_sums(text)


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


def fetch(remote: RemoteFile, dest: Path, *, url: str | None = None, mirror_sha256: str | None = None) -> Path:
    """Download ``remote`` (or ``url``) to ``dest`` atomically, verifying its official SHA-256; the mirror's
    ``mirror_sha256`` is used only for a file without an official digest, never instead of one.

    On any failure the partial file is removed, and so is every folder this call created that is left empty.
    """
    url = url or remote.url
    expected = (remote.sha256 or mirror_sha256 or "").lower() or None
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
            overruled = (remote.sha256 and mirror_sha256 and mirror_sha256.lower() != remote.sha256.lower())
            raise DataError(f"checksum mismatch for {dest.name} from {url}: expected {expected}, got {got} (sha256"
                            + ("; official: the mirror's SHA256SUMS cannot replace an official digest" if overruled
                               else "") + "); the download is corrupt or the mirror serves a different file: "
                            "use a mirror that serves the official file, or put your own build in the data root "
                            f"and list its digest in the root's {SUMS_FILE}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        _DIGESTS[_stat_key(dest)] = got
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


def _check_member(archive: Path, m: tarfile.TarInfo) -> None:
    name = m.name
    if name.startswith(("/", "\\")) or ".." in Path(name).parts or Path(name).is_absolute():
        raise DataError(f"{archive}: member {name!r} escapes the archive folder; refusing the archive "
                        "(it is not an official artifact: delete it to download it again)")
    if m.issym() or m.islnk() or m.isdev() or m.isfifo():
        raise DataError(f"{archive}: member {name!r} is a link or special file; refusing the archive "
                        "(it is not an official artifact: delete it to download it again)")
    if m.size > MAX_MEMBER_BYTES:
        raise DataError(f"{archive}: member {name!r} says it holds {m.size} bytes, over the {MAX_MEMBER_BYTES}-byte "
                        "cap for one member; refusing the archive (delete it to download it again)")


def tar_members(archive: Path) -> dict[str, bytes]:
    """Regular files of a tar archive as {member name: bytes}, read in place (nothing is extracted).

    Reading in place works on read-only data roots and leaves no extracted copy to go stale. An
    archive holding a member that would escape its folder if extracted (absolute path, ``..``) or a
    link is refused as a whole: such an archive is not an official artifact. Members are read with a
    cap (``MAX_MEMBER_BYTES`` each, ``MAX_ARCHIVE_BYTES`` together), so a hostile archive cannot fill memory.
    """
    out, total = {}, 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                _check_member(archive, m)
                if not m.isfile():
                    continue
                f = tar.extractfile(m)
                data = f.read(MAX_MEMBER_BYTES + 1) if f else b""
                total += len(data)
                if len(data) > MAX_MEMBER_BYTES or total > MAX_ARCHIVE_BYTES:
                    raise DataError(f"{archive}: members hold more than the cap ({MAX_MEMBER_BYTES} bytes each, "
                                    f"{MAX_ARCHIVE_BYTES} in all); refusing the archive (delete it to download it again)")
                out[m.name] = data
            # Read to the end of the compressed stream: only there does gzip check its CRC, so a flipped
            # byte that still decompresses is caught even where no digest is known.
            tail = 0
            while chunk := tar.fileobj.read(_CHUNK):
                tail += len(chunk)
                if tail > MAX_MEMBER_BYTES:
                    raise DataError(f"{archive} holds more than {MAX_MEMBER_BYTES} bytes after its last member; "
                                    "refusing the archive (delete it to download it again)")
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise DataError(f"{archive} is corrupt or truncated ({type(e).__name__}: {e}); "
                        "delete it to download it again") from None
    return out
