"""The on-demand build of the C++ CPU kernel (jaxbag._src.cpu_kernel): damaged caches, hung
or failing compilers, and builders killed mid-way. Values on either path are covered elsewhere
(every conformance test runs on the kernel and on the XLA path)."""

from __future__ import annotations

import os
import stat
import time
import warnings
from pathlib import Path

import pytest

import jaxbag
from jaxbag._src import cpu_kernel, fast_forward


def _built_kernel() -> Path:
    ok, why = cpu_kernel.cpu_kernel_status()
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
    lib = cpu_kernel._build_kernel()  # a fresh build in the empty cache
    assert lib.parent == tmp_path and cpu_kernel._cached_ok(lib)
    # builds are reproducible (no build-directory name in the binary): concurrent builders write
    # the same bytes, so the sidecar of one matches the .so of another
    assert lib.read_bytes() == good.read_bytes()
    size = lib.stat().st_size
    with open(lib, "r+b") as f:  # as a crash or an interrupted cache restore leaves it
        f.truncate(size // 2)
    assert not cpu_kernel._cached_ok(lib)
    again = cpu_kernel._build_kernel()
    assert again == lib and lib.stat().st_size == size and cpu_kernel._cached_ok(lib)
    (tmp_path / (lib.name + ".sha256")).unlink()  # a build from before the sidecar existed
    assert not cpu_kernel._cached_ok(lib)


def test_a_hung_compiler_is_killed_with_its_children(tmp_path, monkeypatch):
    """A compiler that never returned blocked the first call for 2 x 300 s, and on timeout
    only the driver was killed (cc1plus ran on)."""
    pid_file = tmp_path / "child.pid"
    hang = _script(tmp_path / "hang.sh", f"sleep 300 & echo $! > {pid_file}; wait")
    monkeypatch.setenv("JAXBAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(hang))
    monkeypatch.setattr(cpu_kernel, "_COMPILE_TIMEOUT_S", 2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not finish in 2 s"):
        cpu_kernel._build_kernel()
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
        cpu_kernel._build_kernel()
    assert args_file.read_text().startswith("--wrapped -O3")


def test_a_failed_build_is_remembered_until_the_compiler_changes(tmp_path, monkeypatch):
    """A failed build was tried again in every process: each import of a program (each pytest
    worker, each training run) spent two compiler runs on the same error."""
    runs = tmp_path / "runs"
    fake = _script(tmp_path / "cxx.sh", f'echo run >> "{runs}"; echo "bad flag" >&2; exit 1')
    monkeypatch.setenv("JAXBAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(RuntimeError, match=r"(?s)^compiling the jaxbag CPU kernel failed:.*bad flag"):
        cpu_kernel._build_kernel()
    assert runs.read_text().count("run") == 2  # -march=native, then without it
    (failed,) = (tmp_path / "cache").glob("jaxbag_cpu_*.so.failed")
    with pytest.raises(RuntimeError, match=r"(?s)an earlier build with the same compiler failed "
                                           r"\(remembered in .*\.failed: delete it to try again\).*bad flag"):
        cpu_kernel._build_kernel()  # as a new process would: nothing but the file is kept
    assert runs.read_text().count("run") == 2  # not compiled again
    failed.unlink()  # deleted: tried again
    with pytest.raises(RuntimeError, match="^compiling"):
        cpu_kernel._build_kernel()
    assert runs.read_text().count("run") == 4
    _script(fake, f'echo run >> "{runs}"; exit 2')  # an updated compiler is tried again too
    os.utime(fake, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(RuntimeError, match="(?s)^compiling.*exited with 2"):
        cpu_kernel._build_kernel()
    assert runs.read_text().count("run") == 6
    monkeypatch.setenv("CXX", f"{fake} -DX")  # so is the same compiler with other arguments
    with pytest.raises(RuntimeError, match="^compiling"):
        cpu_kernel._build_kernel()
    assert runs.read_text().count("run") == 8


def test_a_timed_out_build_is_not_remembered(tmp_path, monkeypatch):
    """A compiler that timed out (a loaded machine) or could not be started may pass next time."""
    monkeypatch.setenv("JAXBAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernel, "_COMPILE_TIMEOUT_S", 1)
    monkeypatch.setenv("CXX", str(_script(tmp_path / "slow.sh", "sleep 30")))
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"did not finish in 1 s"):
            cpu_kernel._build_kernel()
    monkeypatch.setenv("CXX", str(tmp_path / "not-executable.txt"))
    (tmp_path / "not-executable.txt").write_text("")
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"could not be run"):
            cpu_kernel._build_kernel()
    assert not list((tmp_path / "cache").glob("*.failed"))


def test_build_directories_of_killed_builders_are_removed(tmp_path):
    """Only jaxbag's own: every old tmp* folder was removed, so with a shared cache directory
    (JAXBAG_CACHE_DIR=/tmp) other programs' tempfile folders went too."""
    prefix = cpu_kernel._BUILD_PREFIX
    old, new, theirs = tmp_path / f"{prefix}old", tmp_path / f"{prefix}new", tmp_path / "tmpk2j3"
    for d in (old, new, theirs):
        (d / "sub").mkdir(parents=True)
        (d / "bag.cc").write_text("x")
    past = time.time() - 2 * cpu_kernel._STALE_BUILD_S
    for d in (old, theirs):
        os.utime(d, (past, past))
    keep = tmp_path / "jaxbag_cpu_0.so"
    keep.write_bytes(b"")
    cpu_kernel._remove_stale_builds(tmp_path)
    assert not old.exists() and new.is_dir() and keep.exists()
    assert (theirs / "bag.cc").read_text() == "x"


def test_a_cached_kernel_that_does_not_load_is_rebuilt(tmp_path, monkeypatch):
    """A .so whose sidecar matched but which did not load (damaged after its sidecar was written,
    or built for another system) sent every process to the XLA path for good."""
    good = _built_kernel()
    monkeypatch.setenv("JAXBAG_CACHE_DIR", str(tmp_path))
    lib = cpu_kernel._build_kernel()
    lib.write_bytes(b"not a shared object")
    (tmp_path / (lib.name + ".sha256")).write_text(cpu_kernel._sha256(lib))
    assert cpu_kernel._cached_ok(lib)  # the sidecar matches: only loading can tell
    cpu_kernel._load_library(lib)
    assert lib.read_bytes() == good.read_bytes() and cpu_kernel._cached_ok(lib)


def test_an_unavailable_kernel_is_announced_once(tmp_path, monkeypatch):
    """Only a logging.info said why: every call quietly took the (slower) XLA path."""
    monkeypatch.setattr(cpu_kernel, "_kernel_state", {})
    monkeypatch.setenv("JAXBAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(_script(tmp_path / "fail.sh", "exit 1")))
    with pytest.warns(RuntimeWarning, match=r"(?s)C\+\+ CPU kernel is unavailable .*exited with 1.*"
                                            r"JAXBAG_DISABLE_CPU_KERNEL=1"):
        assert not cpu_kernel._load_kernel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_kernel._load_kernel()  # remembered: no second warning, no second build


@pytest.mark.cpu_kernel
def test_with_warnings_as_errors_an_unavailable_kernel_raises_once(tmp_path, monkeypatch):
    """The state was recorded after the warning: with warnings as errors (pytest -W error) every
    call raised and tried the build again, instead of falling back to the XLA path."""
    import jax.numpy as jnp

    import jaxbag

    monkeypatch.setattr(cpu_kernel, "_kernel_state", {})
    monkeypatch.setenv("JAXBAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(_script(tmp_path / "fail.sh", "exit 1")))
    w, ids, offsets = jnp.ones((4, 2)), jnp.array([0, 1, 2]), jnp.array([0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="kernel is unavailable"):
            jaxbag.embedding_bag(w, ids, offsets, mode="sum")
        out = jaxbag.embedding_bag(w, ids, offsets, mode="sum")  # the XLA path, no second build
    assert out.tolist() == [[2.0, 2.0], [1.0, 1.0]]


@pytest.mark.parametrize("value, disabled", [
    ("", False), ("0", False), ("false", False), ("No", False), ("off", False),
    ("1", True), ("true", True), ("YES", True), ("on", True)])
def test_disable_variable_values(monkeypatch, value, disabled):
    """'false', 'no' and 'off' switched the kernel off (anything but '' and '0' did)."""
    monkeypatch.setenv("JAXBAG_DISABLE_CPU_KERNEL", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernel._disabled_by_env() == (disabled, None)


def test_an_unknown_disable_value_warns_once_and_disables(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_kernel_state", {})
    monkeypatch.setenv("JAXBAG_DISABLE_CPU_KERNEL", "maybe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the state is recorded first: the error is raised once
        with pytest.raises(UserWarning, match=r"JAXBAG_DISABLE_CPU_KERNEL='maybe' is not one of"):
            cpu_kernel._load_kernel()
        assert not cpu_kernel._load_kernel()


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
    assert cpu_kernel._cache_dir() == Path(expected.replace("HOME", str(tmp_path)))


def test_the_kernel_is_not_built_for_another_backend(monkeypatch):
    """On a GPU/TPU process the first float32 call compiled C++ (seconds) and wrote a .so to the
    cache, for calls that lower to the XLA path there."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(cpu_kernel, "_load_kernel", lambda: pytest.fail("the kernel was built"))
    assert not cpu_kernel.kernel_ok(jnp.ones((2, 2), jnp.float32))
    # nor by the status, which said (True, "loaded ...") there, for a kernel no call would use
    ok, why = jaxbag.cpu_kernel_status()
    assert not ok and why.startswith("JAX's default backend is gpu: jaxbag runs XLA ops there")


def test_the_kernel_says_no_arg_max_outside_max_mode():
    """Sum / mean / sqrtn left the [B, 1] arg output uninitialised (random ints); it holds N
    ("none"), as the stream loop's does."""
    import jax.numpy as jnp
    import numpy as np

    _built_kernel()
    w, ids, seg = jnp.ones((5, 3)), jnp.array([0, 1, 2, 3], jnp.int32), jnp.array([0, 0, 1, 1], jnp.int32)
    for mode in ("sum", "mean", "sqrtn"):
        for impl in ("auto", "stream"):
            _, arg = fast_forward.bag_reduce_with_arg(
                w, ids, seg, None, num_bags=2, padding_idx=None, mode=mode, layout=0, impl=impl)
            np.testing.assert_array_equal(arg, np.full((2, 1), 4, np.int32))


def test_the_cache_key_covers_the_source(monkeypatch):
    """The source is a file of its own (cpu_kernel.cc): an edited one must build a new library,
    never load the cached build of the old text."""
    lib = _built_kernel()
    seen = []
    real = cpu_kernel._library_name
    monkeypatch.setattr(cpu_kernel, "_library_name",
                        lambda src, cxx: seen.append((src, cxx)) or real(src, cxx))
    assert cpu_kernel._build_kernel() == lib  # (cached: nothing compiled)
    ((src, cxx),) = seen
    assert src == cpu_kernel._source() and lib.name == real(src, cxx)
    assert real(src + "\n// edited\n", cxx) != lib.name


def _lowered(fn, *args) -> str:
    import jax

    return jax.jit(fn).lower(*args).as_text()


def test_set_kernel_false_lowers_no_kernel_call(set_kernel):
    """The tests' XLA path (set_kernel(False)) must really lower no jaxbag FFI call, for the
    forward, its gradient, the sparse pullback, unique_rows and the fused optimiser update,
    and set_kernel(True) lowers each one's kernel: the switch is the kernel state every call
    reads, so a module that bound the check at import could not escape it."""
    import jax
    import jax.numpy as jnp

    import jaxbag

    w = jnp.ones((6, 3))
    ids, offsets = jnp.array([0, 5, 2, 2], jnp.int32), jnp.array([0, 2], jnp.int32)
    opt = jaxbag.sparse_adam(0.1)

    def programs():  # fresh functions: a cached trace would not see the switch
        def rows(w, ids, offsets):
            bags, pullback = jaxbag.embedding_bag_rows(w, ids, offsets, mode="sum")
            return pullback(bags)

        def step(w, state, ids, offsets):
            return opt.update(w, state, rows(w, ids, offsets))

        return {
            "jaxbag_bag_fwd_f32": _lowered(lambda w: jaxbag.embedding_bag(w, ids, offsets), w),
            "jaxbag_rows_grad_f32": _lowered(rows, w, ids, offsets),
            "jaxbag_unique_rows": _lowered(lambda i: jaxbag.unique_rows(i, 6), ids),
            "jaxbag_sparse_adam_f32_f32": _lowered(step, w, opt.init(w), ids, offsets),
            "jaxbag_sparse_adam_bf16_f32": _lowered(step, w.astype(jnp.bfloat16),
                                                opt.init(w.astype(jnp.bfloat16)), ids, offsets),
            "grad": _lowered(jax.grad(lambda w: jaxbag.embedding_bag(w, ids, offsets).sum()), w),
        }

    set_kernel(True)
    for target, text in programs().items():
        if target != "grad":
            assert target in text, f"set_kernel(True): no {target} call"
    set_kernel(False)
    for target, text in programs().items():
        assert "jaxbag_" not in text, f"set_kernel(False): {target}'s program calls a kernel"
