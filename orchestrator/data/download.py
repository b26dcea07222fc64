"""Fetching dataset files: official URLs or a mirror, SHA-256 checked, written atomically.

A mirror (``data.mirror``) is a base URL laid out like the data root (``<mirror>/<dataset dir>/<file>``).
It may publish a ``SHA256SUMS`` file at its base (``<hash>  <dataset dir>/<file>`` per line): a
mirror carrying its own builds of a file (a subset, a recompression) vouches for them there;
files it does not list are checked against the official SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
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


def fetch(remote: RemoteFile, dest: Path, *, url: str | None = None, sha256: str | None = None) -> Path:
    """Download ``remote`` (or ``url``) to ``dest`` atomically, verifying ``sha256`` (default: official)."""
    url = url or remote.url
    expected = (sha256 or remote.sha256 or "").lower() or None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open(url) as resp:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
        got = h.hexdigest()
        if expected and got != expected:
            raise DataError(f"checksum mismatch for {dest.name} from {url}: sha256 {got}, expected {expected}; "
                            "the download is corrupt or the mirror serves a different file")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot download {dest.name} from {url} ({reason}); put the file at {dest}, "
                        "or set data.mirror=URL, or data.root=DIR (env BIOPLAUS_DATA) to a folder that has it") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
