"""A faster XLA formulation of the bag reduction on CPU: stream rows into the bag sums.

Legend: ``V`` table rows, ``D`` features, ``N`` ids, ``B`` bags, ``L`` ids in the longest bag.

The literal recipe ``segment_sum(take(weight, ids), segment_ids)`` materialises the gathered
``[N, D]`` rows: on XLA:CPU that buffer is allocated, written and read back on every call and the
gather is not fused into the reduction, which is what makes it several times slower than torch's
``embedding_bag`` (which streams each row into its bag's accumulator).

:func:`bag_reduce` instead walks the bags *position by position*: step ``l`` gathers the ``l``-th id
of every bag and adds its row into a ``[B, D]`` accumulator. With the sorted segment ids of the
flattened form the ``l``-th id of bag ``b`` is ``ids[start[b] + l]``, so each step is one fused
XLA loop (index gather, row gather, mask, multiply-add) and no ``[N, D]`` array exists. The loop
runs ``ceil(L / unroll)`` times with ``unroll`` positions per trip (a ``while_loop`` with a dynamic
trip count: ``L`` is a runtime value).

Its cost is ``B * L * D`` instead of ``N * D``. When the bags are badly skewed (one very long bag,
many short ones) that is wasteful, so a runtime ``lax.cond`` falls back to a chunked scan (gather
``chunk`` rows, scatter them into the bags) whenever ``B * L > skew_limit * N``.

Differentiation: :func:`bag_reduce` is a ``jax.custom_jvp`` whose tangent rule is the linear
gather+segment-sum formulation, so forward mode works and reverse mode is its transpose: the usual
scatter-add of the bag cotangents (the while loop itself is never differentiated). ``max`` records
the first arg-max position per bag and feature (torch's tie rule) and its tangent gathers there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array, lax

__all__ = ["bag_reduce"]

_MODES = ("sum", "mean", "max", "sqrtn")


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for narrow float tables (bf16, f16), the table's dtype otherwise (f32, f64).

    (Not ``jnp.promote_types``: it raises for bf16/f32 under strict dtype promotion.)"""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def _gather_rows(table: Array, idx: Array) -> Array:
    """``table[idx]`` for in-range ``idx`` (any shape ``S``) -> ``[*S, D]``, no bounds clamping."""
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(idx.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return lax.gather(
        table, idx[..., None], dnums, (1, table.shape[1]), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
    )


def _gather_1d(x: Array, idx: Array) -> Array:
    """``x[idx]`` for in-range ``idx`` ([B]) of a 1-D ``x``."""
    dnums = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))
    return lax.gather(x, idx[..., None], dnums, (1,), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


class _Prep:
    """Per-call quantities shared by the primal and the tangent rules (all cheap, ``[N]`` or ``[B]``)."""

    def __init__(self, weight, ids, seg, psw, num_bags, padding_idx, mode):
        v = weight.shape[0]
        acc = _acc_dtype(weight.dtype)
        valid = (ids >= 0) & (ids < v) & (seg >= 0) & (seg < num_bags)
        if padding_idx is not None:
            valid = valid & (ids != padding_idx)
        self.valid = valid
        self.safe_ids = jnp.where(valid, ids, jnp.zeros((), ids.dtype)).astype(jnp.int32)
        self.seg_c = jnp.clip(seg, 0, max(num_bags - 1, 0)).astype(jnp.int32)
        zero = jnp.zeros((), acc)
        if psw is None:
            self.w = valid.astype(acc)
        else:
            self.w = jnp.where(valid, psw.astype(acc), zero)
        if mode in ("sum", "max"):
            self.den = None
            self.inv_den = None
        else:
            ww = self.w if mode == "mean" else self.w * self.w
            den = jax.ops.segment_sum(ww, seg, num_segments=num_bags, indices_are_sorted=True)
            if mode == "sqrtn":
                den = jnp.sqrt(den)
            nonzero = den != 0
            self.den = den
            self.inv_den = jnp.where(nonzero, 1 / jnp.where(nonzero, den, jnp.ones((), acc)), zero)


def _stream(weight, ids, seg, w, valid, num_bags, mode, unroll):
    """The position-by-position loop. Returns (``[B, D]`` acc-dtype result, ``[B, D]`` int32 arg)."""
    n = ids.shape[0]
    v, d = weight.shape
    acc = _acc_dtype(weight.dtype)
    lengths = jax.ops.segment_sum(
        jnp.ones((n,), jnp.int32), seg, num_segments=num_bags, indices_are_sorted=True
    )
    first = jnp.sum((seg < 0).astype(jnp.int32))  # ids before bag 0 (sorted segments)
    starts = first + jnp.cumsum(lengths) - lengths
    max_len = jnp.max(lengths)
    ids32 = ids.astype(jnp.int32)
    is_max = mode == "max"

    def body(carry):
        l, total, arg = carry
        for u in range(unroll):
            pos = starts + (l + u)
            live = (l + u) < lengths
            p = jnp.minimum(pos, n - 1)
            ok = live & _gather_1d(valid, p)
            row_id = jnp.where(ok, _gather_1d(ids32, p), 0)
            row = _gather_rows(weight, jnp.clip(row_id, 0, v - 1)).astype(acc)
            if is_max:
                cand = jnp.where(ok[:, None], row, jnp.asarray(-jnp.inf, acc))
                better = cand > total
                total = jnp.where(better, cand, total)
                arg = jnp.where(better, p[:, None], arg)
            else:
                coef = jnp.where(ok, _gather_1d(w, p), jnp.zeros((), acc))
                total = total + row * coef[:, None]
        return l + unroll, total, arg

    init_total = jnp.full((num_bags, d), -jnp.inf if is_max else 0.0, acc)
    init_arg = jnp.full((num_bags, d) if is_max else (num_bags, 1), n, jnp.int32)
    _, total, arg = lax.while_loop(
        lambda c: c[0] < max_len, body, (jnp.int32(0), init_total, init_arg)
    )
    if is_max:
        total = jnp.where(arg < n, total, jnp.zeros((), acc))
    return total, arg


def _chunked(weight, prep: _Prep, seg, num_bags, mode, chunk):
    """Fallback for skewed bags: scan over chunks of ``chunk`` ids, gather ``[chunk, D]`` rows and
    scatter them into the ``[B, D]`` result (never more than ``[chunk, D]`` gathered rows at once).
    Same outputs as :func:`_stream`."""
    n = seg.shape[0]
    d = weight.shape[1]
    acc = _acc_dtype(weight.dtype)
    k = max(1, min(chunk, n))
    m = -(-n // k)
    pad = m * k - n

    def split(x, fill):
        return jnp.concatenate([x, jnp.full((pad,), fill, x.dtype)]).reshape(m, k)

    ids_c = split(prep.safe_ids, 0)
    seg_c = split(jnp.where(prep.valid, seg.astype(jnp.int32), num_bags), num_bags)
    pos_c = jnp.arange(m * k, dtype=jnp.int32).reshape(m, k)
    if mode != "max":
        w_c = split(prep.w, 0)

        def add(total, xs):
            i, s_, w_ = xs
            rows = _gather_rows(weight, i).astype(acc) * w_[:, None]
            return total.at[s_].add(rows, mode="drop", indices_are_sorted=True), None

        total, _ = lax.scan(add, jnp.zeros((num_bags, d), acc), (ids_c, seg_c, w_c))
        return total, jnp.full((num_bags, 1), n, jnp.int32)

    def best_of(total, xs):
        i, s_ = xs
        rows = _gather_rows(weight, i).astype(acc)
        return total.at[s_].max(rows, mode="drop", indices_are_sorted=True), None

    best, _ = lax.scan(best_of, jnp.full((num_bags, d), -jnp.inf, acc), (ids_c, seg_c))

    def first_of(arg, xs):
        i, s_, p_ = xs
        rows = _gather_rows(weight, i).astype(acc)
        hit = rows == best[jnp.minimum(s_, num_bags - 1)]
        cand = jnp.where(hit & (s_ < num_bags)[:, None], p_[:, None], jnp.int32(n))
        return arg.at[s_].min(cand, mode="drop", indices_are_sorted=True), None

    arg, _ = lax.scan(first_of, jnp.full((num_bags, d), n, jnp.int32), (ids_c, seg_c, pos_c))
    return jnp.where(arg < n, best, jnp.zeros((), acc)), arg


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _bag_reduce(weight, psw, ids, seg, num_bags, padding_idx, mode, unroll, skew_limit, chunk):
    out, _ = _bag_reduce_fwd(weight, psw, ids, seg, num_bags, padding_idx, mode, unroll, skew_limit, chunk)
    return out


def _bag_reduce_fwd(weight, psw, ids, seg, num_bags, padding_idx, mode, unroll, skew_limit, chunk):
    prep = _Prep(weight, ids, seg, psw, num_bags, padding_idx, mode)
    n = ids.shape[0]
    lengths = jax.ops.segment_sum(
        jnp.ones((n,), jnp.int32), seg, num_segments=num_bags, indices_are_sorted=True
    )
    # Work of the stream loop (B * L) against the id count, in float to avoid int32 overflow.
    stream_work = jnp.max(lengths).astype(jnp.float32) * float(num_bags)
    use_stream = stream_work <= float(skew_limit) * float(max(n, 1))
    total, arg = lax.cond(
        use_stream,
        lambda: _stream(weight, ids, seg, prep.w, prep.valid, num_bags, mode, unroll),
        lambda: _chunked(weight, prep, seg, num_bags, mode, chunk),
    )
    if prep.inv_den is not None:
        total = total * prep.inv_den[:, None]
    return total.astype(weight.dtype), (prep, arg)


def _bag_reduce_jvp(num_bags, padding_idx, mode, unroll, skew_limit, chunk, primals, tangents):
    weight, psw, ids, seg = primals
    d_weight, d_psw, _, _ = tangents
    out, (prep, arg) = _bag_reduce_fwd(
        weight, psw, ids, seg, num_bags, padding_idx, mode, unroll, skew_limit, chunk
    )
    acc = _acc_dtype(weight.dtype)
    n = ids.shape[0]
    t = jnp.zeros(out.shape, acc)
    if not isinstance(d_weight, jax.custom_derivatives.SymbolicZero):
        if mode == "max":
            ok = arg < n
            pos = jnp.minimum(arg, n - 1)
            rows = prep.safe_ids[pos]  # [B, D]
            cols = jnp.arange(weight.shape[1], dtype=jnp.int32)[None, :]
            picked = d_weight[rows, cols].astype(acc)
            t = t + jnp.where(ok, picked, jnp.zeros((), acc))
        else:
            coef = prep.w if prep.inv_den is None else prep.w * prep.inv_den[prep.seg_c]
            d_rows = jnp.take(d_weight, prep.safe_ids, axis=0).astype(acc) * coef[:, None]
            t = t + jax.ops.segment_sum(d_rows, seg, num_segments=num_bags, indices_are_sorted=True)
    if psw is not None and not isinstance(d_psw, jax.custom_derivatives.SymbolicZero):
        dw = jnp.where(prep.valid, d_psw.astype(acc), jnp.zeros((), acc))
        rows = jnp.take(weight, prep.safe_ids, axis=0).astype(acc)
        d_sum = jax.ops.segment_sum(rows * dw[:, None], seg, num_segments=num_bags, indices_are_sorted=True)
        if mode == "sum":
            t = t + d_sum
        else:
            if mode == "mean":
                d_den = jax.ops.segment_sum(dw, seg, num_segments=num_bags, indices_are_sorted=True)
            else:  # sqrtn: den = sqrt(sum w^2) -> d den = sum(w dw) / den
                d_den = jax.ops.segment_sum(
                    prep.w * dw, seg, num_segments=num_bags, indices_are_sorted=True
                ) * prep.inv_den
            t = t + (d_sum - out.astype(acc) * d_den[:, None]) * prep.inv_den[:, None]
    return out, t.astype(out.dtype)


_bag_reduce.defjvp(_bag_reduce_jvp, symbolic_zeros=True)


def bag_reduce(
    weight: Array,
    ids: Array,
    segment_ids: Array,
    num_bags: int,
    *,
    mode: str = "mean",
    per_sample_weights: Array | None = None,
    padding_idx: int | None = None,
    unroll: int = 4,
    skew_limit: float = 4.0,
    chunk: int = 1024,
) -> Array:
    """Bag reduction of the flattened form without materialising the gathered ``[N, D]`` rows.

    Same values and gradients as ``jaxbag.embedding_bag(weight, ids, segment_ids=segment_ids,
    num_bags=num_bags, mode=mode, per_sample_weights=..., padding_idx=...)`` (without ``max_norm``
    and ``scale_grad_by_freq``, which the caller handles): ids out of ``[0, V)``, ids equal to
    ``padding_idx`` and ids whose segment is outside ``[0, B)`` are skipped (not summed, not
    counted); empty bags give zeros.

    Args:
      weight: ``float [V, D]`` table.
      ids: ``int [N]`` ids.
      segment_ids: ``int [N]`` non-decreasing bag of each id.
      num_bags: static ``B``.
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      per_sample_weights: optional ``float [N]`` weights (not with ``"max"``).
      padding_idx: optional row in ``[0, V)`` to skip (already normalised).
      unroll: positions handled per loop trip (static).
      skew_limit: use the chunked fallback when ``B * L > skew_limit * N`` (runtime check).
      chunk: ids per step of the chunked fallback (static).

    Returns:
      ``[B, D]`` array of ``weight.dtype`` (accumulated in float32 for narrower tables).

    Examples:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1., 2.], [3., 4.], [5., 6.]])
      >>> bag_reduce(w, jnp.array([0, 2, 1]), jnp.array([0, 0, 1]), 2, mode="sum").tolist()
      [[6.0, 8.0], [3.0, 4.0]]
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got mode={mode!r}.")
    if mode == "max" and per_sample_weights is not None:
        raise ValueError("per_sample_weights is not allowed with mode='max'; pass mode='sum'.")
    weight = jnp.asarray(weight)
    ids = jnp.asarray(ids).reshape(-1)
    seg = jnp.asarray(segment_ids).reshape(-1)
    if ids.shape[0] == 0 or num_bags == 0:
        return jnp.zeros((num_bags, weight.shape[1]), weight.dtype)
    psw = None if per_sample_weights is None else jnp.asarray(per_sample_weights).reshape(-1)
    return _bag_reduce(
        weight, psw, ids, seg, int(num_bags), padding_idx, mode, int(unroll), float(skew_limit),
        int(chunk),
    )
