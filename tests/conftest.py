"""Shared fixtures: where the real data is, a loopback HTTP server, small rule builders, and the
fault-injection rule in a loopback Ray for the sweep, reliability and cluster tests."""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib
import os
import threading
from pathlib import Path

import pytest
import torch

from bioplaus.orchestrator.config import DataConfig
from bioplaus.orchestrator.data.datasets import data_root

REPO = Path(__file__).resolve().parent.parent


def _real_data_candidates() -> tuple[Path, ...]:
    """The data root the project itself would use (data.root's default: $BIOPLAUS_DATA, else the user cache),
    then the sandbox's mirror beside the checkout. Read when this module loads: every test then points
    BIOPLAUS_DATA at a folder of its own (``_isolated_env``)."""
    roots = (data_root(DataConfig()), REPO.parent / "shared" / "data")
    return tuple(dict.fromkeys(r.resolve() for r in roots))


REAL_DATA_CANDIDATES = _real_data_candidates()


# algorithms/faulty.py registers only where this is set: the test process and the Ray workers it starts.
FAULTY_ENV = {"BIOPLAUS_RULE_MODULES": "bioplaus.algorithms.faulty"}


@contextlib.contextmanager
def faulty_rule_everywhere():
    """The ``faulty`` rule registered here and in every Ray process started meanwhile (they inherit the env)."""
    saved = {k: os.environ.get(k) for k in FAULTY_ENV}
    os.environ.update(FAULTY_ENV)
    importlib.import_module("bioplaus.algorithms.faulty")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One loopback Ray (2 CPUs) per test module for in-process sweeps; its workers know the faulty rule."""
    from bioplaus.orchestrator import ray_local

    with faulty_rule_everywhere():
        started = ray_local.start(tmp_path_factory.mktemp("ray"), num_cpus=2, timeout_s=240)
        try:
            yield
        finally:
            ray_local.stop(started)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the user's data cache or writes results into the checkout."""
    monkeypatch.setenv("BIOPLAUS_DATA", str(tmp_path / "data-root"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: training many small ops, one thread is faster than two on
    a shared machine (two spin against each other and against the machine's other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def find_real_data(*needed: str) -> Path:
    """The first candidate data root holding every path in ``needed`` (relative to the root); where none
    does, the test skips, naming every place it looked."""
    for root in REAL_DATA_CANDIDATES:
        if all((root / n).exists() for n in needed):
            return root
    looked = ", ".join(str(r) for r in REAL_DATA_CANDIDATES)
    pytest.skip(f"real data ({', '.join(needed)}) not found in any data root: looked in {looked} "
                "(set BIOPLAUS_DATA to the data root that has it)")


def list_digests(root: Path) -> Path:
    """Write ``root/SHA256SUMS`` for every file under ``root``: a data root vouching for its own builds of
    dataset files (the small files tests write in the official formats are not the official ones)."""
    from bioplaus.orchestrator.data.download import write_sums

    return write_sums(root)


@pytest.fixture
def real_data() -> Path:
    """The real data mirror (read-only): a data root with the mirror's SHA256SUMS beside its datasets."""
    return find_real_data("SHA256SUMS")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_serve():
    """Start a loopback-only HTTP server for a folder: ``base_url = http_serve(folder)``."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def small_rule(name: str, arch: str = "mlp", input_shape=(1, 8, 8), num_classes: int = 10, seed: int = 0,
               hp: dict | None = None, model: dict | None = None, steps_per_epoch: int = 10, epochs: int = 1):
    """A freshly built rule on a small network, for unit tests of rules and probes."""
    from bioplaus.algorithms.arch import ARCHS
    from bioplaus.algorithms.registry import get_rule
    from bioplaus.algorithms.rule import RunInfo
    from bioplaus.orchestrator.config import typed

    torch.manual_seed(seed)
    spec = ARCHS[arch]
    small = {"mlp": {"widths": [16, 16]}, "cnn": {"channels": [4, 8]}, "deep_cnn": {"channels": [4, 4, 8, 8]},
             "resnet20": {"channels": [4, 8], "blocks_per_stage": 1},
             "resnet18": {"channels": [4, 8], "blocks_per_stage": 1}}[arch]
    rule_cls = get_rule(name)
    given = {**rule_cls.arch_defaults.get(arch, {}), **small, **(model or {})}
    net = spec.build(typed(spec.config, given, "model"), input_shape, num_classes)
    info = RunInfo(num_classes, tuple(input_shape), epochs, steps_per_epoch, torch.device("cpu"), seed)
    return rule_cls(net, typed(rule_cls.HParams, {**rule_cls.arch_hparams.get(arch, {}), **(hp or {})}, "hp"), info)


def batch(n: int = 32, input_shape=(1, 8, 8), num_classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *input_shape), generator=g), torch.randint(0, num_classes, (n,), generator=g)


def reverse_mode_use(rule, x, y, monkeypatch) -> dict[str, int]:
    """What one train step did with reverse-mode autograd: tensors saved for a backward pass, backward
    calls, parameters left holding a ``.grad``."""
    used = {"saved": 0, "backward": 0}

    def pack(t):
        used["saved"] += 1
        return t

    for fn in ("backward", "grad"):
        original = getattr(torch.autograd, fn)

        def counted(*args, _original=original, **kwargs):
            used["backward"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, fn, counted)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rule.train_step(x, y)
    used["grads_left"] = sum(p.grad is not None for p in rule.parameters())
    return used
