"""Timing and memory measurement for jax (jit, compile separately) and torch callables."""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass
class Timing:
    """One measured callable.

    Attributes:
      compile_s: lower + compile time (jax; 0 for torch).
      first_call_s: the first (warm-up) call after compiling.
      median_ms / p10_ms / p90_ms / min_ms: over ``repeats`` timed calls, each ended by
        ``block_until_ready`` (jax), a return (torch on the CPU, synchronous) or
        ``torch.cuda.synchronize`` (torch on a CUDA device).
      repeats: the number of timed calls.
      temp_bytes: jax: ``compiled.memory_analysis().temp_size_in_bytes``; torch: peak RSS growth
        during the timed calls (VmHWM after a reset, minus VmRSS before), or on CUDA the growth
        of torch's peak allocated device memory; None if unknown.
      out_bytes: jax: output bytes not aliased to an input; torch: None.
      times_ms: every timed call, in order.
    """

    compile_s: float
    first_call_s: float
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    repeats: int
    temp_bytes: int | None
    out_bytes: int | None
    times_ms: list[float]


def merge(timings: list[Timing]) -> Timing:
    """One ``Timing`` over the timed calls of several rounds of the same callable: quantiles of
    all of them; compile and first-call times of the first round (the cold ones); the largest
    memory seen."""
    times = [t for x in timings for t in x.times_ms]
    med, p10, p90, mn = _quantiles([t / 1e3 for t in times])
    temps = [x.temp_bytes for x in timings if x.temp_bytes is not None]
    first = timings[0]
    return Timing(first.compile_s, first.first_call_s, med, p10, p90, mn, len(times),
                  max(temps) if temps else None, first.out_bytes, times)


def settle(seconds: float) -> None:
    """Sleeps ``seconds`` before a measurement, so that the worker threads of what ran before
    (torch's OpenMP pool, XLA's Eigen pool: they spin a while after their work) are idle."""
    if seconds > 0:
        time.sleep(seconds)


def load_average() -> list[float]:
    """The machine's 1, 5 and 15-minute load averages (``os.getloadavg``): recorded at the start
    and end of a benchmark, as a measure of what else ran."""
    return list(os.getloadavg())


def _ms(ts: list[float]) -> list[float]:
    return [t * 1e3 for t in ts]


def _quantiles(ts: list[float]) -> tuple[float, float, float, float]:
    a = np.asarray(ts) * 1e3
    return float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90)), float(a.min())


def time_jax(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    repeats: int,
    warmup: int,
    donate_argnums: tuple[int, ...] = (),
    carry: Callable[[Any, tuple[Any, ...]], tuple[Any, ...]] | None = None,
    settle_s: float = 0.0,
) -> tuple[Timing, Any]:
    """Jit-compiles ``fn`` (timed apart), warms it up, then times ``repeats`` calls.

    Args:
      fn: the function to jit.
      args: its arguments (device arrays).
      repeats: timed calls.
      warmup: untimed calls after the first one.
      donate_argnums: passed to ``jax.jit``; with donation, ``carry(out, args)`` must return the
        arguments of the next call (e.g. the updated table and optimiser state).
      carry: see ``donate_argnums``.
      settle_s: sleep before the first call, so that the other framework's spinning worker threads
        (OpenMP, Eigen) are idle again.

    Returns:
      (Timing, the output of the last call).
    """
    jitted = jax.jit(fn, donate_argnums=donate_argnums)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = None if mem is None else int(mem.temp_size_in_bytes)
    out_b = None if mem is None else int(mem.output_size_in_bytes - mem.alias_size_in_bytes)

    settle(settle_s)
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    if carry is not None:
        args = carry(out, args)
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
        if carry is not None:
            args = carry(out, args)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        ts.append(time.perf_counter() - t0)
        if carry is not None:
            args = carry(out, args)
    med, p10, p90, mn = _quantiles(ts)
    return Timing(compile_s, first, med, p10, p90, mn, repeats, temp, out_b, _ms(ts)), out


def _read_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_torch(
    fn: Callable[[], Any], *, repeats: int, warmup: int, settle_s: float = 0.0, device: str = "cpu"
) -> tuple[Timing, Any]:
    """Times a torch callable (already bound to its inputs on ``device``).

    On the CPU torch runs synchronously and memory is the peak-RSS growth. On a CUDA device each
    call is ended by ``torch.cuda.synchronize`` (so a time covers the queued kernels, as
    ``block_until_ready`` does for JAX) and memory is the growth of torch's peak allocated CUDA
    memory during the timed calls. On both, the previous call's output is alive while the next
    one runs, so torch's figure includes one output (JAX's ``temp_bytes`` excludes outputs)."""
    if device == "cpu":
        def sync() -> None:
            pass

        def mem_start() -> int | None:
            rss0 = _read_status_kb("VmRSS")
            return rss0 if _reset_peak_rss() else None

        def mem_growth(start: int) -> int | None:
            hwm = _read_status_kb("VmHWM")
            return None if hwm is None else max(hwm - start, 0) * 1024
    else:
        import torch

        from experiments.bench.torch_impls import synchronize

        def sync() -> None:
            synchronize(device)

        def mem_start() -> int | None:
            torch.cuda.reset_peak_memory_stats(device)
            return int(torch.cuda.memory_allocated(device))

        def mem_growth(start: int) -> int | None:
            return max(int(torch.cuda.max_memory_allocated(device)) - start, 0)

    settle(settle_s)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        out = fn()
    sync()
    start = mem_start()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t0)
    temp = None if start is None else mem_growth(start)
    med, p10, p90, mn = _quantiles(ts)
    return Timing(0.0, first, med, p10, p90, mn, repeats, temp, None, _ms(ts)), out


def memcpy_bandwidth(megabytes: int, repeats: int = 5) -> float:
    """GB/s of ``np.copyto`` between two preallocated buffers (bytes copied / time, one way)."""
    n = max(megabytes, 1) * (1 << 20) // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    return src.nbytes / statistics.median(ts) / 1e9


def thread_count() -> int:
    """The cores this process may run on: what XLA:CPU sizes its intra-op thread pool to."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (non-Linux)
        return os.cpu_count() or 1


def max_rss_bytes() -> int:
    """Peak RSS of the process so far."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
