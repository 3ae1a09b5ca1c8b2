r"""Sparse optimiser step time by table and state dtype: the CPU kernel against the XLA path.

    python -m experiments.bench_sparse_update [--num_embeddings 1000000] [--features 64] \
        [--rows 512,4096] [--rounds 5] [--repeats 5]

Times one donated, jitted ``update(table, state, RowGrads(rows, grads))`` of
``jaxbag.sparse_sgd`` / ``sparse_adagrad`` / ``sparse_adam`` on a ``[V, D]`` table, for a
float32 table, a bfloat16 table (float32 state, its default) and bfloat16 moments on a float32
table, each on the C++ CPU kernel and on the XLA path (the kernel switched off, as on other
backends). XLA:CPU scatters into a bfloat16 array by converting all of it to float32 and back,
so there a bf16 step costs O(V D) whatever the rows; the kernel touches the rows only. The
variants take turns round by round (a busy machine slows them alike); the medians of all rounds
are printed, with each XLA step's ratio to the kernel's and each kernel step's to the float32
kernel's. Before timing, both paths' tables after one step are compared (they must agree within
one bfloat16 rounding). Bad flag values (``--rounds 0``, ``--rows`` above ``--num_embeddings``)
and stray arguments are refused before any work, in one ``error:`` line.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import jaxbag
from experiments.bench.flag_values import int_list
from experiments.textcls import logs
from jaxbag._src import cpu_kernel

_V = flags.DEFINE_integer("num_embeddings", 1_000_000, "Table rows V.")
_D = flags.DEFINE_integer("features", 64, "Table columns D.")
_ROWS = flags.DEFINE_list("rows", ["512", "4096"], "Distinct rows per step (one problem each).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds; every variant is timed once per round.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant and round.")

OPTIMIZERS = {"sgd": jaxbag.sparse_sgd, "adagrad": jaxbag.sparse_adagrad, "adam": jaxbag.sparse_adam}
# (table dtype, state dtype); None: the optimiser's own (float32 for these tables)
DTYPES = (("float32", None), ("bfloat16", None), ("float32", "bfloat16"))


def dtypes(name: str) -> tuple[tuple[str, str | None], ...]:
    """The dtype pairs timed for optimiser ``name`` (SGD has no state to cast)."""
    return DTYPES[:2] if name == "sgd" else DTYPES


@contextlib.contextmanager
def kernel_off() -> Iterator[None]:
    """Traces made inside lower the XLA path (as on a GPU/TPU) instead of the CPU kernel."""
    cpu_kernel.cpu_kernel_status()  # (loads it, so the state below exists)
    saved = cpu_kernel._kernel_state["ok"]
    cpu_kernel._kernel_state["ok"] = False
    try:
        yield
    finally:
        cpu_kernel._kernel_state["ok"] = saved


class Variant:
    """One optimiser, dtype pair and path: a compiled donated step and its own table and state."""

    def __init__(self, name: str, table_dtype: str, state_dtype: str | None, kernel: bool,
                 v: int, d: int) -> None:
        self.key = (name, table_dtype, state_dtype or "default", "kernel" if kernel else "xla")
        self.opt = OPTIMIZERS[name](1e-3)
        self.table = jnp.zeros((v, d), table_dtype)
        state = self.opt.init(self.table)
        if state_dtype is not None:
            state = jax.tree.map(lambda x: x.astype(state_dtype) if x.ndim else x, state)
        self.state = state
        self.kernel = kernel
        self.step: Any = None

    def compile(self, rows: jax.Array, grads: jax.Array) -> None:
        """Compiles the step for these rows' shapes (on this variant's path)."""
        opt = self.opt
        with contextlib.nullcontext() if self.kernel else kernel_off():
            self.step = jax.jit(lambda w, s, r, g: opt.update(w, s, jaxbag.RowGrads(r, g)),
                                donate_argnums=(0, 1)).lower(self.table, self.state, rows,
                                                             grads).compile()

    def run(self, rows: jax.Array, grads: jax.Array) -> None:
        self.table, self.state = jax.block_until_ready(self.step(self.table, self.state, rows, grads))


def _problem(v: int, d: int, n: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(v, n, replace=False)).astype(np.int32)
    return jnp.asarray(rows), jnp.asarray(rng.standard_normal((n, d)), jnp.float32)


def check_paths_agree(v: int, d: int) -> None:
    """One step of every optimiser and dtype pair on both paths gives the same table (within one
    bfloat16 rounding) and moves the given rows only."""
    rows, grads = _problem(v, d, min(v, 64), seed=1)
    for name in OPTIMIZERS:
        for table_dtype, state_dtype in dtypes(name):
            tables = []
            for kernel in (True, False):
                var = Variant(name, table_dtype, state_dtype, kernel, v, d)
                var.compile(rows, grads)
                var.run(rows, grads)
                tables.append(np.asarray(var.table, np.float32))
            what = f"{name}, {table_dtype} table, {state_dtype or 'default'} state"
            np.testing.assert_allclose(tables[0], tables[1], rtol=2**-7, atol=1e-6, err_msg=what)
            moved = set(np.flatnonzero(np.any(tables[0] != 0, axis=1)).tolist())
            assert moved and moved <= set(np.asarray(rows).tolist()), what


def measure(name: str, v: int, d: int, n: int, rounds: int, repeats: int) -> dict[tuple, float]:
    """Median step time (seconds) of optimiser ``name``'s variants, for ``n`` distinct rows
    (one optimiser at a time: Adam's six tables and states hold ~4 GB at V = 1M, D = 64)."""
    rows, grads = _problem(v, d, n)
    variants = [Variant(name, t, s, kernel, v, d) for t, s in dtypes(name) for kernel in (True, False)]
    for var in variants:
        var.compile(rows, grads)
        var.run(rows, grads)  # warm-up
    times: dict[tuple, list[float]] = {var.key: [] for var in variants}
    for _ in range(rounds):
        for var in variants:
            for _ in range(repeats):
                t0 = time.perf_counter()
                var.run(rows, grads)
                times[var.key].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def report(medians: dict[tuple, float], n: int, v: int, d: int) -> str:
    lines = [f"V={v} D={d} rows={n}: median ms per step (ratio)",
             f"{'optimizer':10}{'table/state':22}{'kernel':>10}{'xla':>10}{'xla/kernel':>12}"
             f"{'kernel/f32':>12}"]
    for name in OPTIMIZERS:
        f32 = medians[(name, "float32", "default", "kernel")]
        for t, s in dtypes(name):
            k = medians[(name, t, s or "default", "kernel")]
            x = medians[(name, t, s or "default", "xla")]
            lines.append(f"{name:10}{t + '/' + (s or 'default'):22}{k * 1e3:10.3f}{x * 1e3:10.3f}"
                         f"{x / k:12.1f}{k / f32:12.2f}")
    return "\n".join(lines)


def check_args(v: int, d: int, rows: list[str], rounds: int, repeats: int) -> list[int]:
    """Checks the flags before any work; returns ``--rows`` as ints.

    Raises:
        ValueError: naming the flag, the value, what is allowed and an example.
    """
    for flag, value, example in (("num_embeddings", v, "1000000"), ("features", d, "64"),
                                 ("rounds", rounds, "5"), ("repeats", repeats, "5")):
        if value < 1:
            raise ValueError(f"--{flag} must be an int >= 1; got {value}. Pass e.g. "
                             f"--{flag} {example}.")
    out = int_list("rows", rows, ok=lambda n: 1 <= n <= v, example=f"{min(512, v)},{min(4096, v)}",
                   allowed=f"ints in [1, --num_embeddings={v}] (distinct rows per step)")
    if not out:
        raise ValueError("--rows is empty: nothing to time. Pass e.g. --rows 512,4096.")
    return out


def run(v: int, d: int, rows: list[str], rounds: int, repeats: int) -> None:
    """Checks the flags, checks that both paths agree, then times and prints the tables."""
    counts = check_args(v, d, rows, rounds, repeats)
    ok, why = cpu_kernel.cpu_kernel_status()
    if jax.default_backend() != "cpu" or not ok:
        raise ValueError(f"needs JAX on the CPU with jaxbag's CPU kernel ({why})")
    check_paths_agree(min(v, 1000), d)
    for n in counts:
        medians = {}
        for name in OPTIMIZERS:
            medians.update(measure(name, v, d, n, rounds, repeats))
        print(report(medians, n, v, d), flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:  # (absl passes what is not a flag through)
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.exit_on_user_error(run, _V.value, _D.value, list(_ROWS.value), _ROUNDS.value,
                            _REPEATS.value)


if __name__ == "__main__":
    app.run(main)
