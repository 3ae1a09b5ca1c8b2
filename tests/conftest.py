"""Test-wide JAX settings: strict dtype and rank promotion, as in the style guide."""

import os

# Multi-device tests run in a subprocess with their own XLA_FLAGS; keep this one small.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# On a GPU, XLA's scatter-adds use atomics whose order varies between runs and compilations;
# the tests that compare two computations bit for bit (resume vs uninterrupted, module vs
# functional core) hold there with deterministic ops, as the training entry points set them.
from experiments.textcls.runtime import request_deterministic_ops  # noqa: E402

request_deterministic_ops()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# Property tests draw the same examples on every CI run (a failure there is reproducible, and a
# mutant is caught or not by the tests, not by the draw); local runs keep drawing new ones.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")


import contextlib  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def _count_compiles(fun=None):
    """Counts XLA compilations of ``jax.jit(fun)`` (of anything: ``fun=None``) in this thread
    while the block runs.

    ``PjitFunction._cache_size()`` is not a compile count: the C++ cache is an LRU over all
    jitted functions (8192), so in a long-lived test process a function's entry can be evicted
    while its first call traces (it then reported 0 after 3 calls)."""
    name, tid, counts = None if fun is None else f"jit({fun.__name__})", threading.get_ident(), []

    def listener(event, duration, **kw):
        if (event == _BACKEND_COMPILE and name in (None, kw.get("fun_name"))
                and threading.get_ident() == tid):
            counts.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def count_compiles():
    """``with count_compiles(f) as n: ...``: ``len(n)`` XLA compilations of ``jax.jit(f)``
    (``count_compiles()``: of anything; ``n`` holds the compiled functions' names)."""
    return _count_compiles


#: The CPU kernel runs only when JAX's default backend is the CPU (a GPU process lowers the XLA
#: path on every device): on a GPU machine its tests are skipped; CI runs on the CPU.
ON_CPU = jax.default_backend() == "cpu"
CPU_KERNEL_ONLY = pytest.mark.skipif(
    not ON_CPU, reason=f"tests the CPU kernel; JAX's default backend is {jax.default_backend()}")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cpu_kernel`` tests are skipped where JAX's default backend is not the CPU."""
    for item in items:
        if item.get_closest_marker("cpu_kernel") is not None:
            item.add_marker(CPU_KERNEL_ONLY)


def _set_kernel(monkeypatch, on: bool) -> None:
    from jaxbag._src import cpu_kernel

    if on and not ON_CPU:
        pytest.skip(f"tests the CPU kernel; JAX's default backend is {jax.default_backend()}")
    ok, why = cpu_kernel.cpu_kernel_status()  # (loads it, so the state below exists)
    if on:
        assert ok, why
    else:  # the state every kernel_ok call reads (not a function a module may have bound)
        monkeypatch.setitem(cpu_kernel._kernel_state, "ok", False)


@pytest.fixture
def set_kernel(monkeypatch):
    """``set_kernel(True)`` asserts that the CPU kernel is built and used; ``set_kernel(False)``
    switches it off for the rest of the test, so the op lowers its pure-XLA formulation (the
    one other platforms get). ``set_kernel(on, mp)`` patches through another ``MonkeyPatch``."""
    return lambda on, mp=monkeypatch: _set_kernel(mp, on)
