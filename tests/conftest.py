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
    """The ``faulty`` rule registered here and in every Ray process started meanwhile (they inherit the env),
    and here only meanwhile: a test that lists every registered rule must not find it because another test,
    earlier in the same process (an order pytest-xdist changes), used it."""
    from bioplaus.algorithms import registry

    was_registered = "faulty" in registry.load_rules()  # asked before the environment names its module
    saved = {k: os.environ.get(k) for k in FAULTY_ENV}
    os.environ.update(FAULTY_ENV)
    registry.register(importlib.import_module("bioplaus.algorithms.faulty").Faulty)  # a no-op if it is
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        if not was_registered:
            registry._RULES.pop("faulty", None)


# Ray starts its workers at nice 15 so that its own services stay responsive. On a busy machine (a shared CI
# runner, `make test-load`) that leaves the trials every sweep test waits on a few percent of a core, and
# healthy sweeps crawl towards the hang guards. The tests' Ray workers, and those of the sweeps the tests start
# as commands (they inherit this), compete for the CPU on equal terms instead. Nothing a test checks depends
# on it; only how long a sweep takes beside other work does.
os.environ.setdefault("RAY_worker_niceness", "0")
_SESSION_DATA_ROOT = os.environ.get("BIOPLAUS_DATA")


class SharedRay:
    """One loopback Ray (2 CPUs) for the in-process sweeps of the whole session, its workers knowing the
    faulty rule: starting Ray costs seconds of CPU, and no test needs a fresh one. It starts when a test first
    asks for it (``ray_session``); a test or module that starts or joins a Ray of its own in this process (a
    cluster, a session with other resources) stops it first (``shared_ray.down()``), and the next test that
    asks for it starts it again."""

    def __init__(self, folder: Path):
        self.folder, self.started, self.starts = folder, None, 0

    def up(self) -> None:
        import ray

        from bioplaus.orchestrator import ray_local

        if self.started is not None and ray.is_initialized():
            return
        assert not ray.is_initialized(), "another Ray session is up in this process (stop it before this test)"
        self.starts += 1
        run_dir = self.folder / f"ray{self.starts}"
        run_dir.mkdir(parents=True)
        # Ray's processes keep the environment and working folder they start in: the session's, not those
        # of the test that happens to start them (``_isolated_env``).
        with faulty_rule_everywhere(), _session_env(run_dir):
            self.started = ray_local.start(run_dir, num_cpus=2, timeout_s=240)

    def down(self) -> None:
        from bioplaus.orchestrator import ray_local

        if self.started is not None:
            started, self.started = self.started, None
            ray_local.stop(started)


@contextlib.contextmanager
def _session_env(cwd: Path):
    saved_data, saved_cwd = os.environ.get("BIOPLAUS_DATA"), os.getcwd()
    _set_env("BIOPLAUS_DATA", _SESSION_DATA_ROOT)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        _set_env("BIOPLAUS_DATA", saved_data)


def _set_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


@pytest.fixture(scope="session")
def shared_ray(tmp_path_factory):
    """The session's :class:`SharedRay` (not started until a test asks for ``ray_session``)."""
    shared = SharedRay(tmp_path_factory.mktemp("shared-ray"))
    yield shared
    shared.down()


@pytest.fixture
def ray_session(shared_ray):
    """The shared loopback Ray (2 CPUs) is up in this process for an in-process sweep, and the faulty rule is
    registered for the test."""
    shared_ray.up()
    with faulty_rule_everywhere():
        yield


@pytest.fixture(scope="session")
def failing_trial_sweep(shared_ray, tmp_path_factory):
    """A finished smoke sweep (on the shared Ray) whose one faulty trial raises at its second step on each of its
    two attempts (retries=1). Several tests read what it recorded (the trials row, the Optuna study, the
    manifest); none changes it."""
    from bioplaus.orchestrator.sweep import Sweep, parse_sweep

    shared_ray.up()
    root = tmp_path_factory.mktemp("failing-trial")
    with pytest.MonkeyPatch.context() as patch, faulty_rule_everywhere():  # as _isolated_env does for a test
        patch.setenv("BIOPLAUS_DATA", str(root / "data-root"))
        patch.chdir(root)
        s = Sweep(parse_sweep(["preset=smoke", f"root={root}", "name=s", "rules=[faulty]", "budget.trials=1",
                               "budget.final_seeds=1", "trial.hp.raise_at_step=2", "retries=1"]))
        s.run(log=lambda m: None)
    return s


# With pytest-xdist (`make test`: two workers on two cores) each worker computes on one thread: two workers
# of two threads each would oversubscribe the cores, and torch's threads spin while they wait for each other.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads())


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the user's data cache or writes results into the checkout."""
    monkeypatch.setenv("BIOPLAUS_DATA", str(tmp_path / "data-root"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(_THREADS)


# --- sharing the suite between pytest-xdist workers (`make test`: -n 2 --dist loadfile) -----------------------
# A module runs whole on one worker, so its module-scoped fixtures are built once; each worker keeps its own
# shared Ray. The modules with the most real sweeps (tests on the shared Ray, or marked slow) are handed out
# first, then the rest in file order: the longest work first keeps both workers busy to the end. (xdist's
# loadgroup would put every sweep on one worker, but it cannot rename the tests of pytest 9.2, whose node ids
# are structured.)
def _runs_sweeps(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None or "ray_session" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    sweeps: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        sweeps[module] = sweeps.get(module, 0) + _runs_sweeps(item)
    items.sort(key=lambda item: -sweeps[item.nodeid.split("::")[0]])  # stable: file order otherwise


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
