"""The implementations being compared, for the forward, forward+backward and train-step phases.

Legend: ``V`` table rows, ``D`` features, ``B`` bags, ``N`` ids, ``L`` longest bag, ``U`` row slots.

Every jax forward has the signature ``f(weight [V, D], batch) -> [B, D]`` where ``batch`` is a dict
of device arrays (``ids [N]``, ``offsets [B]``, ``seg [N]``, ``padded [B, L]``); the problem's
static sizes are closed over. ``FORWARDS`` maps a name to a builder
``(problem, mode, options) -> forward | None`` (None: not applicable, e.g. one-hot for a large V).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxbag
from experiments.bench.problems import Problem
from jaxbag._src import fast_forward, ops, sparse

Forward = Callable[[jax.Array, dict[str, jax.Array]], jax.Array]

FORWARD_DOC = {
    "jaxbag": "jaxbag.embedding_bag(weight, ids, offsets, mode=...) (the library's dispatch: "
              "on CPU with a float32 table, the kernel)",
    "xla": "jaxbag._src.ops.embedding_bag_xla: the library's XLA reference path (gather + segment ops)",
    "kernel": "fast_forward.bag_reduce(impl='kernel'): the C++ XLA FFI CPU kernel (offsets)",
    "stream": "fast_forward.bag_reduce(impl='stream'): XLA while loop over bag positions",
    "naive": "jit(segment_sum(take(weight, ids), segment_ids)) (the literal recipe)",
    "sorted_pib": "naive with promise_in_bounds gather and indices_are_sorted segment ops",
    "padded_dense": "padded [B, L] ids: take -> [B, L, D] -> masked reduce over L",
    "unrolled_2d": "padded [B, L]: sum of L gathers of [B, D] (one fused loop, L <= unroll_max)",
    "chunked_map": "padded [B, L]: lax.map over chunks of bags, gather+reduce per chunk",
    "onehot": "bag-count matrix [B, V] @ weight (sum/mean, small B*V only)",
}


def device_batch(p: Problem) -> dict[str, jax.Array]:
    return {
        "ids": jnp.asarray(p.ids),
        "offsets": jnp.asarray(p.offsets),
        "seg": jnp.asarray(p.segment_ids),
        "padded": jnp.asarray(p.padded),
    }


def _gather_rows(w: jax.Array, idx: jax.Array) -> jax.Array:
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(idx.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return lax.gather(
        w, idx[..., None], dnums, (1, w.shape[1]), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
    )


def _finish(total: jax.Array, count: jax.Array, mode: jaxbag.Mode) -> jax.Array:
    """Mean division / empty-bag zeroing of a ``[B, D]`` sum or max and its ``[B]`` counts."""
    if mode == "mean":
        return total / jnp.maximum(count, 1.0)[:, None]
    if mode == "max":
        return jnp.where((count > 0)[:, None], total, 0.0)
    return total


def _jaxbag(p: Problem, mode: jaxbag.Mode, opts: Any) -> Forward:
    def f(w, b):
        return jaxbag.embedding_bag(w, b["ids"], b["offsets"], mode=mode)

    return f


def _xla(p: Problem, mode: jaxbag.Mode, opts: Any) -> Forward:
    def f(w, b):
        return ops.embedding_bag_xla(w, b["ids"], b["offsets"], mode=mode)

    return f


def _stream(p: Problem, mode: jaxbag.Mode, opts: Any) -> Forward:
    nb = p.num_bags

    def f(w, b):
        return fast_forward.bag_reduce(
            w, b["ids"], b["seg"], nb, mode=mode, impl="stream", unroll=int(opts.unroll)
        )

    return f


def _kernel(p: Problem, mode: jaxbag.Mode, opts: Any) -> Forward | None:
    # (not applicable off the CPU backend: the kernel is used only there, and impl='kernel'
    # raises on a GPU process)
    if jax.default_backend() != "cpu" or not jaxbag.cpu_kernel_status()[0]:
        return None

    def f(w, b):
        return fast_forward.bag_reduce(w, b["ids"], offsets=b["offsets"], mode=mode, impl="kernel")

    return f


def _naive(p: Problem, mode: jaxbag.Mode, opts: Any, *, hints: bool = False) -> Forward:
    nb = p.num_bags

    def f(w, b):
        if hints:
            rows = w.at[b["ids"]].get(mode="promise_in_bounds")
        else:
            rows = jnp.take(w, b["ids"], axis=0)
        seg = b["seg"]
        count = jax.ops.segment_sum(
            jnp.ones(seg.shape, w.dtype), seg, nb, indices_are_sorted=hints
        )
        if mode == "max":
            total = jax.ops.segment_max(rows, seg, nb, indices_are_sorted=hints)
        else:
            total = jax.ops.segment_sum(rows, seg, nb, indices_are_sorted=hints)
        return _finish(total, count, mode)

    return f


def _padded_dense(p: Problem, mode: jaxbag.Mode, opts: Any) -> Forward:
    def f(w, b):
        idx = b["padded"]
        mask = idx >= 0
        rows = _gather_rows(w, jnp.maximum(idx, 0))  # [B, L, D]
        count = jnp.sum(mask.astype(w.dtype), axis=1)
        if mode == "max":
            total = jnp.max(jnp.where(mask[..., None], rows, -jnp.inf), axis=1)
        else:
            total = jnp.sum(jnp.where(mask[..., None], rows, 0.0), axis=1)
        return _finish(total, count, mode)

    return f


def _unrolled_2d(p: Problem, mode: jaxbag.Mode, opts: Any) -> Forward | None:
    if p.max_len > int(opts.unroll_max):
        return None

    def f(w, b):
        idx = b["padded"]
        mask = idx >= 0
        safe = jnp.maximum(idx, 0)
        total = None
        for j in range(idx.shape[1]):
            row = _gather_rows(w, safe[:, j])
            m = mask[:, j, None]
            if mode == "max":
                row = jnp.where(m, row, -jnp.inf)
                total = row if total is None else jnp.maximum(total, row)
            else:
                row = jnp.where(m, row, 0.0)
                total = row if total is None else total + row
        assert total is not None  # idx has at least one column
        count = jnp.sum(mask.astype(w.dtype), axis=1)
        return _finish(total, count, mode)

    return f


def _chunked_map(p: Problem, mode: jaxbag.Mode, opts: Any) -> Forward:
    chunk = max(1, min(int(opts.chunk_bags), p.num_bags))
    nb = p.num_bags
    n_chunks = -(-nb // chunk)

    def f(w, b):
        idx = b["padded"]
        pad = n_chunks * chunk - nb
        idx = jnp.pad(idx, ((0, pad), (0, 0)), constant_values=-1)
        idx = idx.reshape(n_chunks, chunk, idx.shape[1])

        def one(ic):
            mask = ic >= 0
            rows = _gather_rows(w, jnp.maximum(ic, 0))
            if mode == "max":
                return jnp.max(jnp.where(mask[..., None], rows, -jnp.inf), axis=1)
            return jnp.sum(jnp.where(mask[..., None], rows, 0.0), axis=1)

        total = lax.map(one, idx).reshape(n_chunks * chunk, w.shape[1])[:nb]
        count = jnp.sum((b["padded"] >= 0).astype(w.dtype), axis=1)
        return _finish(total, count, mode)

    return f


def _onehot(p: Problem, mode: jaxbag.Mode, opts: Any) -> Forward | None:
    if mode == "max" or p.num_bags * p.num_embeddings > int(opts.onehot_max_elements):
        return None
    nb, v = p.num_bags, p.num_embeddings

    def f(w, b):
        counts = jnp.zeros((nb, v), w.dtype).at[b["seg"], b["ids"]].add(1.0)
        total = counts @ w
        return _finish(total, jnp.sum(counts, axis=1), mode)

    return f


FORWARDS: dict[str, Callable[[Problem, jaxbag.Mode, Any], Forward | None]] = {
    "jaxbag": _jaxbag,
    "xla": _xla,
    "kernel": _kernel,
    "stream": _stream,
    "naive": _naive,
    "sorted_pib": functools.partial(_naive, hints=True),
    "padded_dense": _padded_dense,
    "unrolled_2d": _unrolled_2d,
    "chunked_map": _chunked_map,
    "onehot": _onehot,
}


def register_forward(
    name: str, builder: Callable[[Problem, jaxbag.Mode, Any], Forward | None], doc: str
) -> None:
    """Adds an implementation (e.g. a compiled custom call) to the comparison."""
    FORWARDS[name] = builder
    FORWARD_DOC[name] = doc


# ---- forward + backward -------------------------------------------------------------------------


def dense_fwd_bwd(fwd: Forward, cot: jax.Array) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``(weight, batch) -> (bags, d sum(bags * cot) / d weight)``, a dense ``[V, D]`` gradient.

    The bags are returned as torch's ``fwd_bwd`` computes them: with the gradient alone, XLA
    dropped the forward of the linear modes (sum, mean), whose gradient does not read it."""

    def f(w, b):
        bags, pullback = jax.vjp(lambda w_: fwd(w_, b), w)
        (grad,) = pullback(cot.astype(bags.dtype))
        return bags, grad

    return f


def rows_fwd_bwd(p: Problem, mode: jaxbag.Mode, cot: jax.Array
                 ) -> Callable[..., tuple[jax.Array, sparse.RowGrads]]:
    """``(weight, batch) -> (bags, RowGrads)`` via :func:`jaxbag.embedding_bag_rows` (no
    ``[V, D]``), the bags returned as in :func:`dense_fwd_bwd`."""

    def f(w, b):
        bags, pullback = sparse.embedding_bag_rows(w, b["ids"], b["offsets"], mode=mode)
        return bags, pullback(cot.astype(bags.dtype))

    return f


# ---- train step ---------------------------------------------------------------------------------


def _mse(bags: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean((bags - targets) ** 2)


def dense_train_step(fwd: Forward, targets: jax.Array, lr: float):
    """``(weight, opt_state, batch) -> (weight, opt_state, loss)`` with ``optax.adam`` (dense)."""
    opt = optax.adam(lr)

    def step(w, state, b):
        loss, g = jax.value_and_grad(lambda w_: _mse(fwd(w_, b), targets))(w)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion clean
            updates, state = opt.update(g, state, w)
            return optax.apply_updates(w, updates), state, loss

    return opt.init, step


def sparse_train_step(p: Problem, mode: jaxbag.Mode, targets: jax.Array, lr: float):
    """``(weight, state, batch) -> (weight, state, loss)`` with ``jaxbag.sparse_adam`` (lazy)."""
    opt = sparse.sparse_adam(lr)

    def step(w, state, b):
        bags, pullback = sparse.embedding_bag_rows(w, b["ids"], b["offsets"], mode=mode)
        loss, g = jax.value_and_grad(_mse)(bags, targets)
        w, state = opt.update(w, state, pullback(g))
        return w, state, loss

    return opt.init, step


def rowgrads_to_dense_at(rg: sparse.RowGrads, num_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """(valid rows, their gradients) as numpy, for checking against a dense gradient."""
    rows = np.asarray(rg.rows)
    keep = rows < num_embeddings
    return rows[keep], np.asarray(rg.grads)[keep]
