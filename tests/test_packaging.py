"""What ``pip install jaxbag`` gets: the wheel and the sdist built from this tree (PEP 517, the
build backend of ``pyproject.toml``, no network), and the dependencies the library declares."""

from __future__ import annotations

import ast
import email
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a release is built from (a checkout may also hold venvs, runs, caches: not copied)
_SOURCE = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile", ".ci", "configs",
           "experiments", "jaxbag", "tests")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel, sdist)`` built from a copy of the source tree."""
    tmp = tmp_path_factory.mktemp("pkg")
    src, out = tmp / "src", tmp / "out"
    src.mkdir()
    for name in _SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out.mkdir()
    code = (
        "from setuptools import build_meta as b; "
        f"b.build_wheel({str(out)!r}); b.build_sdist({str(out)!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return wheel, sdist


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = (n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_string(z.read(name).decode())


def _library_files() -> set[str]:
    """Every file of jaxbag/ (the modules, py.typed, the C++ kernel's source), as in an archive."""
    return {f"jaxbag/{p.relative_to(ROOT / 'jaxbag').as_posix()}" for p in (ROOT / "jaxbag").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_the_wheel_is_the_typed_library_and_its_license(built):
    """No py.typed: type checkers skipped jaxbag ("missing library stubs or py.typed marker") and
    every result was Any; pyproject named a license file that did not exist. The kernel's C++
    source is package data (the library reads it to build the kernel on first use)."""
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"jaxbag/py.typed", "jaxbag/_src/cpu_kernel.cc"} <= names
    assert _library_files() <= names, sorted(_library_files() - names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"jaxbag"}, tops  # no tests/experiments


def test_the_installed_wheel_reads_the_kernel_source(built, tmp_path):
    """Unpacked as pip installs it (no source tree on the path), the library finds the C++
    source it compiles on first use (it was a string inside a module; now a package-data file)."""
    wheel, _ = built
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import jaxbag; from jaxbag._src import cpu_kernel; "
        "print(jaxbag.__file__); print(cpu_kernel._source().splitlines()[0])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path),
                               "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, first = proc.stdout.splitlines()[-2:]
    assert Path(where).is_relative_to(tmp_path), where
    assert first.startswith("// jaxbag CPU kernel (XLA FFI)"), first


def test_the_sdist_carries_what_the_tests_import(built):
    """setuptools put tests/test_*.py in the sdist without conftest.py, reference.py, configs/ and
    experiments/, so the tests of an unpacked sdist could not even be collected."""
    _, sdist = built
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for path in ("LICENSE", "Makefile", ".ci/run", "pyproject.toml", "README.md",
                 "tests/conftest.py", "tests/reference.py", "tests/_devices.py",
                 "configs/bbc_news.py", "configs/bbc_news_selection_base.json",
                 "experiments/train.py"):
        assert path in names, path
    tests_here = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    assert tests_here <= names, sorted(tests_here - names)
    assert _library_files() <= names, sorted(_library_files() - names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def _third_party_imports() -> set[str]:
    found = set()
    for path in (ROOT / "jaxbag").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "jaxbag"}


def test_declared_dependencies_are_what_the_library_imports(built):
    """Every package jaxbag/ imports (torch only inside to_torch, with an install hint) is a
    declared dependency, and nothing is declared that it never imports (optax was)."""
    wheel, _ = built
    meta = _wheel_metadata(wheel)
    required = {
        r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for r in meta.get_all("Requires-Dist") if "extra ==" not in r
    }
    dists = importlib.metadata.packages_distributions()
    imported = {dists[m][0].lower() for m in _third_party_imports() - {"torch"}}
    assert imported == required, (imported, required)
    assert "flax>=0.12.1" in meta.get_all("Requires-Dist")  # 0.12.0 does not import with jax 0.10
