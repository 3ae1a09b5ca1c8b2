"""The on-demand build of the C++ CPU kernel (jaxbag._src.fast_forward): damaged caches, hung
or failing compilers, and builders killed mid-way. Values on either path are covered elsewhere
(every conformance test runs on the kernel and on the XLA path)."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from jaxbag._src import fast_forward


def _built_kernel() -> Path:
    ok, why = fast_forward.cpu_kernel_status()
    if not ok:
        pytest.fail(f"the CPU kernel should build here: {why}")
    return Path(why.removeprefix("loaded "))


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_a_damaged_cached_kernel_is_rebuilt(tmp_path, monkeypatch):
    """A truncated .so at the cache name was trusted: dlopen died with a bus error (no fallback,
    in every later process), and an unreadable one was never rebuilt."""
    good = _built_kernel()
    monkeypatch.setenv("JAXBAG_CACHE_DIR", str(tmp_path))
    lib = fast_forward._build_kernel()  # a fresh build in the empty cache
    assert lib.parent == tmp_path and fast_forward._cached_ok(lib)
    # builds are reproducible (no build-directory name in the binary): concurrent builders write
    # the same bytes, so the sidecar of one matches the .so of another
    assert lib.read_bytes() == good.read_bytes()
    size = lib.stat().st_size
    with open(lib, "r+b") as f:  # as a crash or an interrupted cache restore leaves it
        f.truncate(size // 2)
    assert not fast_forward._cached_ok(lib)
    again = fast_forward._build_kernel()
    assert again == lib and lib.stat().st_size == size and fast_forward._cached_ok(lib)
    (tmp_path / (lib.name + ".sha256")).unlink()  # a build from before the sidecar existed
    assert not fast_forward._cached_ok(lib)


def test_a_hung_compiler_is_killed_with_its_children(tmp_path, monkeypatch):
    """A compiler that never returned blocked the first call for 2 x 300 s, and on timeout
    only the driver was killed (cc1plus ran on)."""
    pid_file = tmp_path / "child.pid"
    hang = _script(tmp_path / "hang.sh", f"sleep 300 & echo $! > {pid_file}; wait")
    monkeypatch.setenv("JAXBAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(hang))
    monkeypatch.setattr(fast_forward, "_COMPILE_TIMEOUT_S", 2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not finish in 2 s"):
        fast_forward._build_kernel()
    assert time.monotonic() - t0 < 60  # one attempt, not two
    child = int(pid_file.read_text())
    for _ in range(50):  # the killed child is reaped by init shortly after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the compiler's child {child} survived the timeout")


def test_a_failing_compiler_with_arguments_is_reported(tmp_path, monkeypatch):
    """CXX="ccache g++"-style values were run as one program name; a compiler failing without
    output gave the reason 'compiling the jaxbag CPU kernel failed:' and nothing else."""
    args_file = tmp_path / "args"
    fake = _script(tmp_path / "fake cxx.sh", f'echo "$@" > "{args_file}"; exit 3')
    monkeypatch.setenv("JAXBAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", f"'{fake}' --wrapped")
    with pytest.raises(RuntimeError, match=r"exited with 3: \(no output\)"):
        fast_forward._build_kernel()
    assert args_file.read_text().startswith("--wrapped -O3")


def test_build_directories_of_killed_builders_are_removed(tmp_path):
    old, new = tmp_path / "tmpold", tmp_path / "tmpnew"
    for d in (old, new):
        (d / "sub").mkdir(parents=True)
        (d / "bag.cc").write_text("x")
    past = time.time() - 2 * fast_forward._STALE_BUILD_S
    os.utime(old, (past, past))
    keep = tmp_path / "jaxbag_cpu_0.so"
    keep.write_bytes(b"")
    fast_forward._remove_stale_builds(tmp_path)
    assert not old.exists() and new.is_dir() and keep.exists()
    shutil.rmtree(new)


@pytest.mark.parametrize(
    "jaxbag_cache, xdg, expected",
    [
        ("/srv/jb", "/xdg", "/srv/jb"),  # JAXBAG_CACHE_DIR wins
        (None, "/xdg", "/xdg/jaxbag"),
        (None, None, "HOME/.cache/jaxbag"),
        # an empty XDG_CACHE_HOME put the kernel in ./jaxbag (inside a source checkout: the
        # package folder); the XDG spec says to ignore empty and relative values
        (None, "", "HOME/.cache/jaxbag"),
        (None, "rel/cache", "HOME/.cache/jaxbag"),
    ],
)
def test_cache_dir_follows_the_xdg_rules(monkeypatch, tmp_path, jaxbag_cache, xdg, expected):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, value in (("JAXBAG_CACHE_DIR", jaxbag_cache), ("XDG_CACHE_HOME", xdg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert fast_forward._cache_dir() == Path(expected.replace("HOME", str(tmp_path)))
