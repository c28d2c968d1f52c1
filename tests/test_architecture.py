"""The layers import one way (docs/architecture.md): the import-linter contracts in pyproject.toml hold, no module
imports another that imports it back (directly or through others); test_cli.py checks that the CLI starts without heavy libraries."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built_package(tmp_path_factory) -> Path:
    """The package as installed (the folders mapped into one `arq_deploy` tree), for tools that walk a package's
    folder (grimp, import-linter): the editable install maps folders that such tools cannot see."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    src = build / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", ".aarch64", "runs", "demo-out", "build",
                                                             "*.egg-info", "__pycache__", "benchmarks", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(src)], check=True, capture_output=True, text=True)
    return target


def _in_built(site: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=site,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})


def test_import_contracts_are_kept(built_package):
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], capture_output=True, text=True,
                         cwd=built_package, env={"PYTHONPATH": str(built_package), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout and "KEPT" in res.stdout


def test_no_module_is_in_an_import_cycle(built_package):
    code = """
import grimp
g = grimp.build_graph("arq_deploy")
mods = sorted(g.modules)
edges = {m: set(g.find_modules_directly_imported_by(m)) for m in mods}
index, low, stack, on, cycles, n = {}, {}, [], set(), [], [0]
import sys
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: cycles.append(sorted(comp))
for m in mods:
    if m not in index: visit(m)
print(len(mods), len(cycles), cycles)
"""
    res = _in_built(built_package, code)
    assert res.returncode == 0, res.stderr
    count, cycles, rest = res.stdout.split(" ", 2)
    assert int(count) > 60  # the whole package was seen
    assert int(cycles) == 0, rest


def test_the_contract_catches_an_upward_import(built_package, tmp_path):
    """The check has power: a core module that imports the CLI breaks the layers contract."""
    site = tmp_path / "site"
    shutil.copytree(built_package, site)
    errors = site / "arq_deploy" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom arq_deploy.app import stages  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], capture_output=True, text=True,
                         cwd=site, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert res.returncode != 0
    assert "arq_deploy.core.errors -> arq_deploy.app.stages" in res.stdout

