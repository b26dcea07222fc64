"""A multi-node Ray cluster on one box, on loopback: a head and N worker nodes, each with its own resources.

For tests of the cluster path (trials spread over nodes, a node lost mid-sweep) and for users trying
``ray.address=...`` before they have a real cluster. The nodes are ``ray.cluster_utils.Cluster`` nodes:
real raylets and object stores, one per node, all bound to 127.0.0.1, started by this process and
stopped (with their temp dir) when it leaves the ``with`` block or exits.

Why not ``ray start`` processes: a worker ``ray start`` insists on ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``,
and with that set Ray resolves "this node's IP" by routing towards a public address. Here every
process keeps the loopback environment of ``bioplaus.orchestrator.ray_local``.

    python -m bioplaus.cluster.local --workers 2 --cpus-per-worker 2     # prints the address, Ctrl-C stops it
    make sweep ARGS="ray.address=127.0.0.1:<port>"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bioplaus.orchestrator import ray_local


class LocalCluster:
    """Head + ``workers`` worker nodes on 127.0.0.1. The head has ``head_cpus`` CPUs (0: it only schedules,
    so every trial runs on a worker node, as on a cluster whose head is a small CPU box)."""

    def __init__(self, run_dir: Path | str, workers: int = 2, cpus_per_worker: float = 1, gpus_per_worker: int = 0,
                 head_cpus: float = 0, object_store_mb: int = 100, timeout_s: float = 120.0):
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        self.run_dir = Path(run_dir)
        self.workers, self.cpus_per_worker, self.gpus_per_worker = workers, cpus_per_worker, gpus_per_worker
        self.head_cpus, self.object_store = head_cpus, object_store_mb * 2**20
        self.timeout_s = timeout_s
        self.cluster = None
        self.nodes: list = []  # worker nodes, in the order they were added
        self.temp_dir: Path | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        from ray.cluster_utils import Cluster

        ray_local.set_cluster_mode(None)  # every node and this driver on 127.0.0.1, even if ray came first
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are short; a fresh folder (a stale one makes Ray hang).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="bpc-"))
        common = {"node_ip_address": "127.0.0.1", "object_store_memory": self.object_store,
                  "temp_dir": str(self.temp_dir)}
        (self.temp_dir / "ray").mkdir()
        try:
            # RAY_TMPDIR: the head writes its address file (ray_current_cluster) here, not in /tmp/ray where
            # a later `ray.init(address="auto")` of someone else would find it.
            with self._ray_env(RAY_TMPDIR=str(self.temp_dir)):
                self.cluster = ray_local.bounded(lambda: Cluster(
                    initialize_head=True, shutdown_at_exit=True,
                    head_node_args={**common, "num_cpus": self.head_cpus, "num_gpus": 0, "include_dashboard": False}),
                    self.timeout_s, "starting the local cluster's head")
            for _ in range(self.workers):
                self.add_worker()
        except BaseException:
            self.stop()
            raise
        return self

    @contextlib.contextmanager
    def _ray_env(self, **extra: str):
        """The environment Ray's processes are spawned with: a HOME holding ray_bootstrap_config.yaml = {}
        (so nothing probes cloud metadata) plus ``extra``; this process's own values come back afterwards."""
        changes = {"HOME": str(ray_local.ray_home(self.run_dir)), "RAY_BACKEND_LOG_LEVEL": "warning", **extra}
        saved = {k: os.environ.get(k) for k in changes}
        os.environ.update(changes)
        try:
            yield
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    def add_worker(self):
        """One more worker node (returned); it shows up in ``ray.nodes()`` before this returns."""
        with self._ray_env():
            node = ray_local.bounded(lambda: self.cluster.add_node(
                node_ip_address="127.0.0.1", temp_dir=str(self.temp_dir), object_store_memory=self.object_store,
                num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                resources={f"bioplaus_worker_{len(self.nodes)}": 1}), self.timeout_s, "adding a worker node")
        self.nodes.append(node)
        return node

    def kill_worker(self, index: int) -> str:
        """SIGKILL every process of worker node ``index`` (a machine lost, no goodbye); returns its node id."""
        node = self.nodes.pop(index)
        self.cluster.remove_node(node, allow_graceful=False)
        return node.node_id

    def stop(self) -> None:
        """Stop every node and remove the temp dir (safe to call twice)."""
        import ray

        if ray.is_initialized() and self.cluster is not None:
            with contextlib.suppress(Exception):
                ray_local.bounded(ray.shutdown, 60, "ray.shutdown")
        if self.cluster is not None:
            try:
                ray_local.bounded(self.cluster.shutdown, 60, "stopping the local cluster")
            finally:
                self.cluster = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what a driver needs ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The GCS address (127.0.0.1:port) to pass as ``ray.address=``."""
        return self.cluster.address

    def worker_node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bioplaus.cluster.local",
                                description="Run a loopback multi-node Ray cluster until Ctrl-C.")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs of each worker node (default 1)")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs of each worker node (default 0)")
    p.add_argument("--head-cpus", type=float, default=0, help="CPUs of the head node (default 0: schedules only)")
    p.add_argument("--dir", default="runs/local-cluster", help="folder for the nodes' HOME (default runs/local-cluster)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.cpus_per_worker <= 0 or args.head_cpus < 0:
        print("error: --workers must be >= 1, --cpus-per-worker > 0 and --head-cpus >= 0", file=sys.stderr)
        return 2
    stop = []
    with LocalCluster(args.dir, args.workers, args.cpus_per_worker, args.gpus_per_worker, args.head_cpus) as c:
        # After start-up: Ray's nodes install their own SIGTERM handler (exit 1); a stop request is routine here.
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        print(f"local cluster up: head + {args.workers} workers at {c.address}\n"
              f"  make sweep ARGS=\"ray.address={c.address}\"\n  Ctrl-C stops it.", flush=True)
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    print("local cluster stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
