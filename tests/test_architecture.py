"""The package's shape: one ``bioplaus`` namespace, layers that point one way, and modules and functions
small enough to read (at most 400 and 60 lines, outside tests; exceptions listed with their reason).

The layer contract itself lives in pyproject.toml (``[tool.importlinter]``) and is checked with
import-linter; docs/architecture.md explains it. A back-edge planted into a copy of the source must
break it, so the contract is known to bite."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
OLD_TOP_LEVEL = {"algorithms", "orchestrator", "analysis", "cluster", "search_spaces"}


def project_sources() -> list[Path]:
    skip = {".venv", ".git", "build", "dist", "runs", ".shim"}
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts))


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_no_code_imports_the_folders_as_top_level_packages():
    found = []
    for path in project_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in OLD_TOP_LEVEL]
    assert not found, "import through bioplaus.<folder> instead:\n" + "\n".join(found)


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason=f"import-linter not installed beside {sys.executable}")
def test_the_layer_contract_holds():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason=f"import-linter not installed beside {sys.executable}")
def test_a_planted_back_edge_breaks_the_contract(tmp_path):
    copy = tmp_path / "src" / "bioplaus"
    for path in project_sources():
        rel = path.relative_to(REPO)
        if rel.parts[0] != "tests":
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy / rel)
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint_imports(tmp_path, tmp_path / "src").returncode == 0  # the copy alone keeps the contract
    rule = copy / "algorithms" / "rule.py"
    rule.write_text(rule.read_text() + "\nfrom bioplaus.orchestrator import results  # noqa: E402,F401\n")
    result = lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode != 0
    assert "bioplaus.algorithms.rule -> bioplaus.orchestrator.results" in result.stdout, result.stdout


def test_every_module_has_a_place_in_the_layers():
    import tomllib

    layers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    placed = {m.strip() for line in layers for m in line.split("|")}
    modules = {f"bioplaus.orchestrator.{p.stem}" for p in (REPO / "orchestrator").glob("*.py") if p.stem != "__init__"}
    modules |= {f"bioplaus.orchestrator.{p.parent.name}" for p in (REPO / "orchestrator").glob("*/__init__.py")}
    modules |= {"bioplaus.algorithms", "bioplaus.analysis", "bioplaus.cluster"}
    assert modules <= placed, f"add to [tool.importlinter] layers: {sorted(modules - placed)}"


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Allowed to stay oversize, each with the reason; an entry that fits again fails the test until removed.
OVERSIZE: dict[str, str] = {}


def oversize(root: Path) -> dict[str, int]:
    """``{module path: lines}`` over MAX_MODULE_LINES and ``{path:function: lines}`` over MAX_FUNCTION_LINES
    among the package's sources under ``root`` (tests excluded)."""
    skip = {".venv", ".git", "build", "dist", "runs", ".shim", "tests"}
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found[rel.as_posix()] = len(text.splitlines())
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found[f"{rel.as_posix()}:{node.name}"] = length
    return found


def test_modules_and_functions_stay_small():
    found = oversize(REPO)
    new = {k: v for k, v in found.items() if k not in OVERSIZE}
    assert not new, (f"split these by responsibility (modules <= {MAX_MODULE_LINES} lines, functions <= "
                     f"{MAX_FUNCTION_LINES}): {new}")
    fits = sorted(set(OVERSIZE) - set(found))
    assert not fits, f"these fit now; remove them from OVERSIZE: {fits}"


def test_an_oversize_function_or_module_is_found(tmp_path):
    def function(name: str, lines: int) -> str:
        return f"def {name}():\n" + "".join(f"    x{i} = {i}\n" for i in range(lines - 1))

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "long.py").write_text(function("long_one", MAX_FUNCTION_LINES + 1) + function("short", 2))
    (tmp_path / "pkg" / "big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    at_limit = function("at_limit", MAX_FUNCTION_LINES)
    (tmp_path / "pkg" / "fits.py").write_text(at_limit + "x = 1\n" * (MAX_MODULE_LINES - MAX_FUNCTION_LINES))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_long.py").write_text(function("test_long", MAX_FUNCTION_LINES + 1))
    assert oversize(tmp_path) == {"pkg/long.py:long_one": MAX_FUNCTION_LINES + 1, "pkg/big.py": MAX_MODULE_LINES + 1}
