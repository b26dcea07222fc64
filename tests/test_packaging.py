"""The built wheel, installed outside the checkout, is the whole product: it installs ``bioplaus`` alone
at top level, carries the search spaces, and runs the command line from any directory.

The wheel is built once per session from this checkout. Its environment is a new venv whose only
project code is the wheel; the third-party dependencies (torch, ray, ...) are borrowed from the running
interpreter's site-packages through a path entry, which does not run that folder's .pth files, so the
checkout's editable install stays invisible there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


BUILD_LEFTOVERS = ("build", "bioplaus.egg-info")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh venv holding only the wheel, the wheel's path, what the build left in the checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    before = {name for name in BUILD_LEFTOVERS if (REPO / name).exists()}
    # pip builds in the source tree; an extra setuptools config moves its build/ and egg-info folders here
    extra = base / "setup.cfg"
    extra.write_text(f"[build]\nbuild_base = {base / 'build'}\n[egg_info]\negg_base = {base}\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(base / "dist")], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "DIST_EXTRA_CONFIG": str(extra)})
    left = sorted(name for name in BUILD_LEFTOVERS if (REPO / name).exists() and name not in before)
    wheel = next((base / "dist").glob("bioplaus-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "borrowed_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, timeout=600)
    return venv / "bin", wheel, left


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BIOPLAUS_RULE_MODULES")}
    return subprocess.run(cmd, cwd=cwd, env={**env, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                          timeout=timeout)


def test_building_the_wheel_leaves_no_build_folders_in_the_checkout(installed):
    assert installed[2] == []


def test_the_wheel_installs_bioplaus_alone_with_its_search_spaces(installed):
    _, wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"bioplaus"}
    assert {"bioplaus/search_spaces/bp.yaml", "bioplaus/search_spaces/_optimiser.yaml"} <= set(names)
    assert not [n for n in names if n.startswith("bioplaus/tests/") or n.endswith((".sbatch", "Dockerfile"))]


def test_the_installed_cli_runs_from_an_empty_folder(installed, tmp_path):
    bindir, wheel, _ = installed
    version = wheel.name.split("-")[1]
    assert run([str(bindir / "bioplaus"), "--version"], tmp_path).stdout.strip() == f"bioplaus {version}"
    assert run([str(bindir / "python"), "-m", "bioplaus", "--version"], tmp_path).stdout.strip() == f"bioplaus {version}"
    rules = run([str(bindir / "bioplaus"), "rules", "--json"], tmp_path)
    assert rules.returncode == 0, rules.stderr
    assert "bp" in {r["name"] for r in json.loads(rules.stdout)}
    space = run([str(bindir / "bioplaus"), "space", "bp", "--json"], tmp_path)  # the shared fragment, as package data
    assert space.returncode == 0, space.stderr
    assert json.loads(space.stdout)["bp"]["schedule"]["source"] == "_optimiser.yaml"
    where = run([str(bindir / "python"), "-c", "import bioplaus; print(bioplaus.__file__)"], tmp_path)
    assert not where.stdout.strip().startswith(str(REPO)), where.stdout
    for old in ("algorithms", "orchestrator", "analysis", "cluster"):
        assert run([str(bindir / "python"), "-c", f"import {old}"], tmp_path).returncode != 0, old


def built_from() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_the_installed_package_knows_the_commit_it_was_built_from(installed, tmp_path):
    # Outside a checkout git_commit() falls back to the commit setuptools-scm wrote into _version.py at build time.
    bindir = installed[0]
    got = run([str(bindir / "python"), "-c", "from bioplaus.orchestrator.results import git_commit; print(git_commit())"],
              tmp_path)
    commit = got.stdout.strip()
    assert got.returncode == 0 and commit not in ("", "None"), got.stderr
    assert built_from().startswith(commit.removesuffix("-dirty"))


def test_the_installed_cli_runs_a_smoke_sweep(installed, tmp_path):
    bindir, _, _ = installed
    data = tmp_path / "data"  # the smoke preset's digits ship with scikit-learn
    sweep = run([str(bindir / "bioplaus"), "sweep", "preset=smoke", f"data.root={data}", f"root={tmp_path / 'sweeps'}"],
                tmp_path, timeout=900)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    manifest = json.loads(next((tmp_path / "sweeps").glob("*/manifest.json")).read_text())
    assert manifest["status"] == "complete"
    assert manifest["git_commit"] and built_from().startswith(manifest["git_commit"].removesuffix("-dirty"))
