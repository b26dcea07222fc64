"""Start and stop Ray safely: embedded local Ray stays on loopback from the very first ``ray.init``.

Ray's dashboard/agent processes probe cloud-metadata and DNS addresses when
``~/ray_bootstrap_config.yaml`` is missing, even with usage stats off. So the Ray processes get a
``HOME`` of their own holding ``ray_bootstrap_config.yaml`` = ``{}`` (the driver's own ``HOME`` is
restored right after start-up, so W&B credentials and the user's files are untouched), usage
reporting goes to a closed loopback port, and no dashboard is started. A stale temp dir from a killed
run can make ``ray.init`` hang, so each start uses a fresh session folder and is bounded in time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from bioplaus.orchestrator.errors import UsageError

# Ray reads these when it is imported (ray_constants), so they are set when this module is
# imported, before any ``import ray``: every Ray-using module of the project imports this one first.
LOOPBACK_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "RAY_DEDUP_LOGS": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
}
# What the user set themselves is theirs; the rest is ours to relax when the sweep joins a real cluster.
_SET_HERE = {k for k in LOOPBACK_ENV if k not in os.environ}
for _k, _v in LOOPBACK_ENV.items():
    os.environ.setdefault(_k, _v)
# Unix socket paths are limited to ~107 bytes; Ray appends ~70 characters to its temp dir.
_MAX_TEMP_DIR = 36


def is_loopback(address: str | None) -> bool:
    """True for the embedded local Ray and for a cluster whose head is on this box's loopback."""
    if address in (None, "", "local"):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


CONNECT_TIMEOUT_S = 5.0
"""How long the driver waits for a TCP connection to a cluster's head before refusing the address."""
_JOIN_FIX = ("start the cluster first (`ray start --head`, or `python -m bioplaus.cluster.local`) and pass its "
             "address as ray.address=HOST:PORT, or drop ray.address to run on a local Ray")


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"ray.address={address!r} is not HOST:PORT (or ray://HOST:PORT, or auto); {_JOIN_FIX}")
    return host.strip("[]"), int(port)


def _auto_address() -> str:
    """The running cluster ``auto`` means: $RAY_ADDRESS, else the last ``ray start`` on this box, else the one
    Ray process group running here. Several and none named: refused (Ray would pick one at random)."""
    from ray._private import services

    if os.environ.get("RAY_ADDRESS", "") not in ("", "auto"):
        return os.environ["RAY_ADDRESS"]
    found = services.find_bootstrap_address(None)
    if found:
        return found
    running = sorted(set(services.find_gcs_addresses()))
    if len(running) == 1:
        return running[0]
    if running:
        raise UsageError(f"ray.address=auto: {len(running)} Ray clusters run on this machine ({', '.join(running)}); "
                         "name the one to join as ray.address=HOST:PORT, or drop ray.address to run on a local Ray")
    raise UsageError(f"ray.address=auto: no running Ray cluster was found on this machine; {_JOIN_FIX}")


def check_address(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """The cluster address a sweep will join (None: embedded local Ray), checked to accept a connection
    within ``timeout_s``: an address nobody listens on is refused in seconds, not after Ray's retries."""
    if address in (None, "", "local"):
        return None
    resolved = _auto_address() if address == "auto" else address
    host, port = _host_port(resolved)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        shown = f"ray.address={address} (found {resolved})" if address != resolved else f"ray.address={address}"
        raise UsageError(f"{shown}: cannot connect to a Ray head at {host}:{port} within {timeout_s:g}s "
                         f"({e.strerror or e}); {_JOIN_FIX}") from None
    return resolved


def set_cluster_mode(address: str | None) -> None:
    """Ray's node-IP rule for this driver. On loopback (embedded Ray, a local test cluster) every address is
    127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); on a real cluster the driver must find its node's own
    IP, as Ray does by default, or it cannot join its node's raylet. Ray reads the variable when imported,
    so its module constant is set too (ray may have been imported before this module)."""
    from ray._private import ray_constants

    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    if key not in _SET_HERE:  # the user chose; Ray has read it already
        return
    loopback = is_loopback(address)
    if loopback:
        os.environ[key] = "0"
    else:
        os.environ.pop(key, None)
    ray_constants.ENABLE_RAY_CLUSTER = False if loopback else not ray_constants.IS_WINDOWS_OR_OSX


def ray_home(base: Path) -> Path:
    """A HOME for Ray's processes whose ray_bootstrap_config.yaml holds ``{}``."""
    home = base / "ray-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    return home


def temp_dir_for(run_dir: Path) -> Path:
    """Ray's temp dir inside the run's folder, or a short per-run folder when that path is too long."""
    wanted = run_dir.resolve() / "ray"
    if len(str(wanted)) <= _MAX_TEMP_DIR:
        return wanted
    digest = hashlib.sha1(str(wanted).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"bioplaus-ray-{digest}"


def apply_run_env(run_dir: Path) -> None:
    """Point W&B's and TorchInductor's files into the run's folder (unless the user set them)."""
    os.environ.setdefault("WANDB_DIR", str(run_dir / "wandb"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(run_dir / "inductor"))
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)


def plain_worker_log_prefixes() -> None:
    """Ray colours the ``(pid=...)`` prefix of every line a worker prints, terminal or not; through a pipe or
    into a log file those colours are control sequences in the text. Plain prefixes there (unless the user
    set RAY_COLOR_PREFIX); Ray reads it whenever it prints a worker's line."""
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def start(run_dir: Path, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
          timeout_s: float = 120.0) -> dict:
    """``ray.init`` for a sweep: embedded local (loopback-only) when ``address`` is None, else connect.

    Returns ``{"address", "temp_dir", "local"}``. Raises UsageError when Ray does not come up in time.
    """
    import ray

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    apply_run_env(run_dir)
    plain_worker_log_prefixes()
    if ray.is_initialized():  # someone else (a test fixture, a notebook) owns this Ray session
        return {"address": None, "temp_dir": None, "local": False, "owned": False}
    local = address in (None, "", "local")
    # "auto" is resolved here (and checked to connect), so a loopback cluster found by it stays on loopback.
    address = check_address(address)
    set_cluster_mode(address)
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    temp_dir = None
    if local:
        temp_dir = temp_dir_for(run_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)  # a stale session dir makes ray.init hang
        temp_dir.mkdir(parents=True, exist_ok=True)
        kwargs.update(address="local", _temp_dir=str(temp_dir), num_cpus=num_cpus, num_gpus=num_gpus)
    else:
        kwargs.update(address=address)
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(ray_home(run_dir))
    try:
        info = bounded(lambda: ray.init(**kwargs), timeout_s, f"ray.init(address={address or 'local'})",
                       None if local else f"check that {address} is a Ray head's address (its GCS port), or raise "
                       "ray.timeout_s")
    finally:
        if home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = home
    return {"address": getattr(info, "address_info", {}).get("gcs_address"), "temp_dir": temp_dir, "local": local,
            "owned": True}


def stop(started: dict | None = None, timeout_s: float = 60.0) -> None:
    """``ray.shutdown`` (bounded) and remove the local temp dir, if ``start`` started Ray."""
    import ray

    if started is not None and not started.get("owned"):
        return
    if ray.is_initialized():
        with contextlib.suppress(Exception):
            bounded(ray.shutdown, timeout_s, "ray.shutdown")
    if started and started.get("local") and started.get("temp_dir"):
        shutil.rmtree(started["temp_dir"], ignore_errors=True)


def bounded(fn, timeout_s: float, what: str, fix: str | None = None):
    """Run ``fn`` with a wall-clock bound (SIGALRM in the main thread; Ray wants its main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return fn()

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return fn()
    except TimeoutError:
        raise UsageError(f"{what} did not finish within {timeout_s:.0f}s; " + (fix or "look for stale Ray processes "
                         "(`ray stop`) or raise ray.timeout_s")) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
