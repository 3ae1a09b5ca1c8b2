"""Faster bag reductions on CPU: stream rows into the bag sums instead of gathering ``[N, D]``.

Legend: ``V`` table rows, ``D`` features, ``N`` ids, ``B`` bags, ``L`` ids in the longest bag.

The literal recipe ``segment_sum(take(weight, ids), segment_ids)`` materialises the gathered
``[N, D]`` rows: on XLA:CPU that buffer is allocated, written and read back on every call and the
gather is not fused into the reduction, which makes it several times slower than torch's
``embedding_bag`` (which streams each row into its bag's accumulator). Two faster primal
implementations live here, both behind one :func:`bag_reduce`:

* ``impl="kernel"``: a small C++ XLA FFI custom call for CPU (``cpu_kernel.cc``, compiled with
  the system C++ compiler on first use and cached by :mod:`jaxbag._src.cpu_kernel`; see
  :func:`~jaxbag._src.cpu_kernel.cpu_kernel_status`). It walks each bag,
  prefetches the next rows and accumulates in registers, split over XLA's intra-op thread pool.
  Used for float32 tables on the CPU backend.
* ``impl="stream"``: pure XLA. Step ``l`` of a ``while_loop`` gathers the ``l``-th id of every bag
  and adds its row into a ``[B, D]`` accumulator (one fused loop, no ``[N, D]`` array), ``unroll``
  positions per trip. Its cost is ``B * L * D``; for badly skewed bags (``B * L > skew_limit * N``)
  a runtime ``lax.cond`` switches to a chunked scan (gather ``chunk`` rows, scatter them into the
  bags).

``impl="auto"`` takes the kernel when it applies (float32 table, kernel built, CPU) and the plain
gather + segment reduction otherwise (the fast formulation on GPU/TPU). The stream loop is opt-in
(``impl="stream"``): on CPU it beats the gather formulation on many ids but not on few ids or some
row widths (README, "Sweeps"), so ``auto`` does not guess. Its loop counts trips with step 1: a
loop stepping ``unroll`` positions at a time met an XLA:CPU simplifier bug (a constant-bound
``while i < 1: i += k``, ``k > 1``, is removed as if it ran zero times), which returned zeros for
one bag of one id closed over under ``jit``.

``vmap``: the kernel (and, where it does not apply, the gather formulation) has a batching rule
(``jax.custom_batching.custom_vmap``): ``S`` rows of ``B`` bags are one call on ``S * (B + 1)``
bags of the rows' ids laid end to end (bag ``B`` of a row holds its ids outside its bags: before
its first offset, past its last one, or of an out-of-range segment id; it is dropped). JAX's
default rule for an FFI call is a loop of ``S`` calls, which also cannot run over a batch axis
split over an Explicit mesh axis. Flat positions past int32 fall back to that loop. (Unsorted
segment ids are grouped under ``vmap`` as in a loop: see the README, "The CPU kernel".)

Differentiation: :func:`bag_reduce` is a ``jax.custom_jvp`` whose tangent rule is the linear
gather+segment-sum formulation, so forward mode works and reverse mode is its transpose: the usual
scatter-add of the bag cotangents (the kernel and the while loop are never differentiated). ``max``
records the first arg-max position per bag and feature (torch's tie rule) and its tangent gathers
there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from jaxbag._src import bag_terms, cpu_kernel, explicit, segments, validation
from jaxbag._src.dtypes import acc_dtype, take_rows, take_tangent_rows
from jaxbag._src.validation import Mode

__all__ = ["Prep", "bag_reduce", "bag_reduce_with_arg"]

_MODE_CODE = {"sum": 0, "mean": 1, "max": 2, "sqrtn": 3}
_IMPLS = ("auto", "kernel", "stream")


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


class Prep:
    """Per-call quantities shared by the primal and the tangent rules (all cheap, ``[N]`` or ``[B]``)."""

    def __init__(self, weight, ids, seg, psw, num_bags, padding_idx, mode):
        acc = acc_dtype(weight.dtype)
        valid = bag_terms.valid_positions(ids, seg, weight.shape[0], num_bags, padding_idx)
        self.valid = valid
        self.safe_ids = jnp.where(valid, ids, jnp.zeros((), ids.dtype)).astype(jnp.int32)
        self.seg_c = jnp.clip(seg, 0, max(num_bags - 1, 0)).astype(jnp.int32)
        self.w = bag_terms.masked_weights(valid, psw, acc)
        self.den = bag_terms.bag_denominators(self.w, seg, num_bags, mode)
        self.inv_den = self.nonzero = None
        self.acc = acc
        if self.den is not None:
            self.nonzero = self.den != 0
            safe = jnp.where(self.nonzero, self.den, jnp.ones((), acc))
            self.inv_den = jnp.where(self.nonzero, 1 / safe, jnp.zeros((), acc))

    def divide(self, total: Array) -> Array:
        """``total [B, D]`` divided by the bags' divisors (mean, sqrtn; unchanged for sum), +0.0
        where a divisor is 0: a bag's zero scale times a negative sum would give -0.0, and the
        kernel and ``jaxbag._src.ops.embedding_bag_xla`` give +0.0 (an empty bag's zeros)."""
        if self.inv_den is None:
            return total
        return self.zero_where_no_divisor(total * self.inv_den[:, None])

    def zero_where_no_divisor(self, x: Array) -> Array:
        """``x [B, D]`` with the rows of bags whose divisor is 0 set to +0.0."""
        assert self.nonzero is not None  # (mean and sqrtn only)
        return jnp.where(self.nonzero[:, None], x, jnp.zeros((), x.dtype))

    def rows(self, table: Array) -> Array:
        """``[N, D]`` rows of ``table`` (the weight or its tangent) in the accumulation dtype at the
        valid positions, exact zeros elsewhere: the placeholder row read there may hold inf or
        NaN, and a zero weight would not cancel it (0 * inf is NaN)."""
        return self._masked(take_rows(table, self.safe_ids))

    def tangent_rows(self, d_table: Array) -> Array:
        """As :meth:`rows` for a tangent of the table: its transpose sums in the accumulation
        dtype (:func:`~jaxbag._src.dtypes.take_tangent_rows`)."""
        return self._masked(take_tangent_rows(d_table, self.safe_ids))

    def _masked(self, rows: Array) -> Array:
        return jnp.where(self.valid[:, None], rows, jnp.zeros((), self.acc))


def _stream(weight, ids, seg, w, valid, num_bags, mode, unroll):
    """The position-by-position loop. Returns (``[B, D]`` acc-dtype result, ``[B, D]`` int32 arg)."""
    n = ids.shape[0]
    v, d = weight.shape
    acc = acc_dtype(weight.dtype)
    ones = jnp.ones((n,), jnp.int32)
    lengths = segments.segment_reduce(jax.ops.segment_sum, ones, seg, num_bags)
    first = jnp.sum(seg < 0, dtype=jnp.int32)  # ids before bag 0 (sorted segments)
    starts = first + jnp.cumsum(lengths, dtype=jnp.int32) - lengths
    max_len = jnp.max(lengths)
    ids32 = ids.astype(jnp.int32)
    is_max = mode == "max"

    def body(carry):
        t, total, arg = carry
        l = t * unroll
        for u in range(unroll):
            pos = starts + (l + u)
            live = (l + u) < lengths
            p = jnp.minimum(pos, n - 1)
            ok = live & _gather_1d(valid, p)
            row_id = jnp.where(ok, _gather_1d(ids32, p), 0)
            row = _gather_rows(weight, jnp.clip(row_id, 0, v - 1)).astype(acc)
            if is_max:
                cand = jnp.where(ok[:, None], row, jnp.asarray(-jnp.inf, acc))
                # The first NaN wins and stays (NaN propagates, as in jnp.max); a bag's first
                # valid row is always taken (a row of -inf is the max of a bag of -inf rows).
                better = ((cand > total) | (jnp.isnan(cand) & ~jnp.isnan(total))
                          | (ok[:, None] & (arg == n)))
                total = jnp.where(better, cand, total)
                arg = jnp.where(better, p[:, None], arg)
            else:
                coef = jnp.where(ok, _gather_1d(w, p), jnp.zeros((), acc))
                # A select, not just the zero coefficient: the placeholder row may hold inf.
                total = total + jnp.where(ok[:, None], row * coef[:, None], jnp.zeros((), acc))
        return t + 1, total, arg

    init_total = jnp.full((num_bags, d), -jnp.inf if is_max else 0.0, acc)
    init_arg = jnp.full((num_bags, d) if is_max else (num_bags, 1), n, jnp.int32)
    # The loop counts trips (step 1), not positions (step `unroll`): with a constant bound
    # XLA:CPU (jaxlib 0.10.2) removes `while i < 1: i += k` for k > 1 as if it ran zero
    # times, so the positions loop returned zeros for one bag of one id closed over under jit.
    trips = (max_len + (unroll - 1)) // unroll
    _, total, arg = lax.while_loop(
        lambda c: c[0] < trips, body, (jnp.int32(0), init_total, init_arg)
    )
    if is_max:
        total = jnp.where(arg < n, total, jnp.zeros((), acc))
    return total, arg


def _chunked(weight, prep: Prep, seg, num_bags, mode, chunk):
    """Fallback for skewed bags: scan over chunks of ``chunk`` ids, gather ``[chunk, D]`` rows and
    scatter them into the ``[B, D]`` result (never more than ``[chunk, D]`` gathered rows at once).
    Same outputs as :func:`_stream`."""
    n = seg.shape[0]
    d = weight.shape[1]
    acc = acc_dtype(weight.dtype)
    k = max(1, min(chunk, n))
    m = -(-n // k)
    pad = m * k - n

    def split(x, fill):
        return jnp.concatenate([x, jnp.full((pad,), fill, x.dtype)]).reshape(m, k)

    ids_c = split(prep.safe_ids, 0)
    # Invalid positions (and the padding) go to a spare bag B, sliced off: an in-range index
    # (see segments.segment_reduce), and not sorted (an invalid id may sit inside a bag).
    seg_c = split(jnp.where(prep.valid, seg.astype(jnp.int32), num_bags), num_bags)
    pos_c = jnp.arange(m * k, dtype=jnp.int32).reshape(m, k)
    if mode != "max":
        w_c = split(prep.w, 0)

        def add(total, xs):
            i, s_, w_ = xs
            rows = _gather_rows(weight, i).astype(acc) * w_[:, None]
            return total.at[s_].add(rows), None

        total, _ = lax.scan(add, jnp.zeros((num_bags + 1, d), acc), (ids_c, seg_c, w_c))
        return total[:num_bags], jnp.full((num_bags, 1), n, jnp.int32)

    def best_of(total, xs):
        i, s_ = xs
        rows = _gather_rows(weight, i).astype(acc)
        return total.at[s_].max(rows), None

    best, _ = lax.scan(best_of, jnp.full((num_bags + 1, d), -jnp.inf, acc), (ids_c, seg_c))
    best = best[:num_bags]

    def first_of(arg, xs):
        i, s_, p_ = xs
        rows = _gather_rows(weight, i).astype(acc)
        hit = bag_terms.max_hits(rows, best[jnp.minimum(s_, num_bags - 1)])
        cand = jnp.where(hit & (s_ < num_bags)[:, None], p_[:, None], jnp.int32(n))
        return arg.at[s_].min(cand), None

    arg, _ = lax.scan(first_of, jnp.full((num_bags + 1, d), n, jnp.int32), (ids_c, seg_c, pos_c))
    arg = arg[:num_bags]
    return jnp.where(arg < n, best, jnp.zeros((), acc)), arg


# ---- the kernel call and its batching rule -------------------------------------------------------


@functools.cache
def _forward_fn(num_bags, padding_idx, mode, layout, use_kernel):
    """The kernel (CPU; the gather formulation elsewhere) for one static configuration, as a
    function ``(weight, ids, bounds, p)`` (``p``: ``[N]`` weights, or ``[0]`` for none) ->
    ``(out [B, D], arg)``, with a batching rule: ``vmap`` over it is one call on more bags
    (``S`` rows of ``B`` bags are ``S * (B + 1)`` bags of one flat id list), not a loop of ``S``
    kernel calls or a batched gather (both of which failed on a batch axis split over an
    Explicit mesh axis)."""

    def forward(weight, ids, bounds, p):
        n = ids.shape[0]
        psw = None if p.shape[0] == 0 else p

        def gather():
            seg = _segment_ids(bounds, n, layout)
            return _gather_primal(weight, psw, ids, seg, num_bags, padding_idx, mode)

        if not use_kernel:
            return gather()

        def kernel():
            v, d = weight.shape
            ids32 = validation.to_int32(ids, 0, v - 1, -1)
            if layout == 0:
                b32 = (bounds if bounds.dtype == jnp.int32
                       else segments.segment_ids_int32(bounds, num_bags))
            else:
                b32 = validation.to_int32(bounds, 0, n, -1)
            arg_shape = (num_bags, d) if mode == "max" else (num_bags, 1)
            return jax.ffi.ffi_call(
                cpu_kernel.BAG_FORWARD,
                (jax.ShapeDtypeStruct((num_bags, d), jnp.float32),
                 jax.ShapeDtypeStruct(arg_shape, jnp.int32)),
                vmap_method="sequential",
            )(
                weight, ids32, b32, p.astype(jnp.float32),
                mode=np.int64(_MODE_CODE[mode]),
                padding_idx=np.int64(-1 if padding_idx is None else padding_idx),
                layout=np.int64(layout),
            )

        return lax.platform_dependent(cpu=kernel, default=gather)

    def rule(axis_size, in_batched, *args):
        return _forward_flat(axis_size, in_batched, num_bags, padding_idx, mode, layout,
                             use_kernel, *args)

    # on a batch split over Explicit axes: one call, partitioned by the compiler as on an Auto
    # mesh; the bags come out split as that batched input was. (jit: called eagerly, the
    # platform_dependent cond traced new branch jaxprs each call, so each call compiled again
    # and JAX's eager cache kept every one: 30 ms and 1.5 MB a call. This jit is one per
    # static configuration, as _forward_fn is cached.)
    return explicit.batch_as_auto(jax.jit(forward), rule)


def _forward_flat(s, in_batched, num_bags, padding_idx, mode, layout, use_kernel,
                  weight, ids, bounds, p):
    """:func:`_forward_fn`'s batching rule: ``S`` rows of ``B`` bags as one call on
    ``S * (B + 1)`` bags: each row's bags, then one for its ids outside them (before its first
    offset, past its last one, or of an out-of-range segment id), over the rows' ids in order."""
    args = (weight, ids, bounds, p)
    w_b, i_b, b_b, p_b = in_batched
    n = ids.shape[-1]
    v, d = weight.shape[-2:]
    per_row = num_bags + 1
    dims = (s, n, per_row, v)
    # flat positions past int32: a loop (symbolic sizes, as jax.export's, cannot be compared)
    if (all(isinstance(x, int) for x in dims)
            and s * max(n, per_row, v if w_b else 0) >= 2**31 - 1):
        def row(xs):
            it = iter(xs)
            return _forward_fn(num_bags, padding_idx, mode, layout, use_kernel)(
                *(next(it) if b else a for a, b in zip(args, in_batched)))
        return lax.map(row, tuple(a for a, b in zip(args, in_batched) if b))
    base = jnp.arange(s, dtype=jnp.int32)[:, None]
    ids = validation.to_int32(ids if i_b else jnp.broadcast_to(ids, (s, n)), 0, v - 1, -1)
    if layout == 0:
        seg = bounds if b_b else jnp.broadcast_to(bounds, (s, n))
        seg = jnp.clip(seg, -1, num_bags).astype(jnp.int32)
        # a row's ids outside its bags go to its extra bag B (those before its first offset to
        # the previous row's; -1 for row 0): the flat segment ids are sorted where each row's are
        bounds = jnp.where(seg < 0, base * per_row - 1, base * per_row + seg)
    else:
        def starts(o):  # the row's B + 1 bag bounds: its offsets in [0, N], sorted, then N
            o = jnp.sort(jnp.where((o >= 0) & (o <= n), o, n).astype(jnp.int32))
            return jnp.concatenate([o, jnp.full((per_row,), n, jnp.int32)])[:per_row]

        # bag B of row s: from its end to row s + 1's first offset (no bag before row 0's)
        bounds = (jax.vmap(starts)(bounds) if b_b else starts(bounds)[None]) + base * n
    pad = padding_idx
    if w_b:  # S tables: the ids of row s index rows [s * V, (s + 1) * V) of the stacked tables
        keep = (ids >= 0) & (ids < v)
        if pad is not None:
            keep = keep & (ids != pad)
        ids = jnp.where(keep, ids + base * v, -1)
        weight = weight.reshape(s * v, d)
        pad = None
    if p.shape[-1] != 0:
        p = (p if p_b else jnp.broadcast_to(p, (s, n))).reshape(-1)
    out, arg = _forward_fn(s * per_row, pad, mode, layout, use_kernel)(
        weight, ids.reshape(-1), bounds.reshape(-1), p)
    out = out.reshape(s, per_row, d)[:, :num_bags]
    arg = arg.reshape(s, per_row, arg.shape[-1])[:, :num_bags]  # (-1 fails for S = 0)
    # flat arg-max positions back to positions in the row (N: none)
    return out, jnp.where(arg >= s * n, n, arg - base[:, :, None] * n)


# ---- dispatch and derivatives --------------------------------------------------------------------


def _segment_ids(bounds, n, layout):
    if layout == 0:
        return bounds
    return segments.offsets_to_segment_ids_unchecked(bounds, n)


def _xla_primal(weight, psw, ids, seg, num_bags, padding_idx, mode, unroll, skew_limit, chunk):
    """The pure-XLA primal: (``[B, D]`` result in weight.dtype, arg)."""
    prep = Prep(weight, ids, seg, psw, num_bags, padding_idx, mode)
    n = ids.shape[0]
    ones = jnp.ones((n,), jnp.int32)
    lengths = segments.segment_reduce(jax.ops.segment_sum, ones, seg, num_bags)
    # Work of the stream loop (B * L) against the id count, in float to avoid int32 overflow.
    stream_work = jnp.max(lengths).astype(jnp.float32) * float(num_bags)
    use_stream = stream_work <= float(skew_limit) * float(max(n, 1))
    total, arg = lax.cond(
        use_stream,
        lambda: _stream(weight, ids, seg, prep.w, prep.valid, num_bags, mode, unroll),
        lambda: _chunked(weight, prep, seg, num_bags, mode, chunk),
    )
    return prep.divide(total).astype(weight.dtype), arg


def _gather_primal(weight, psw, ids, seg, num_bags, padding_idx, mode):
    """The plain gather + segment-reduction formulation (materialises ``[N, D]``): what
    ``impl="auto"`` lowers on GPU/TPU, where that is the fast way. Same outputs as the others."""
    n = ids.shape[0]
    prep = Prep(weight, ids, seg, psw, num_bags, padding_idx, mode)
    acc = acc_dtype(weight.dtype)
    rows = prep.rows(weight)
    if mode == "max":
        vals = jnp.where(prep.valid[:, None], rows, jnp.asarray(-jnp.inf, acc))
        best = segments.segment_reduce(jax.ops.segment_max, vals, seg, num_bags)
        hit = prep.valid[:, None] & bag_terms.max_hits(vals, best[prep.seg_c])
        pos = jnp.where(hit, jnp.arange(n, dtype=jnp.int32)[:, None], jnp.int32(n))
        arg = jnp.minimum(
            segments.segment_reduce(jax.ops.segment_min, pos, seg, num_bags), n
        )
        return jnp.where(arg < n, best, jnp.zeros((), acc)).astype(weight.dtype), arg
    total = segments.segment_reduce(jax.ops.segment_sum, rows * prep.w[:, None], seg, num_bags)
    return prep.divide(total).astype(weight.dtype), jnp.full((num_bags, 1), n, jnp.int32)


def _primal(weight, psw, ids, bounds, cfg):
    (num_bags, padding_idx, mode, layout, include_last_offset, impl, unroll, skew_limit, chunk) = cfg
    if impl == "stream":
        seg = _segment_ids(bounds, ids.shape[0], layout)
        return _xla_primal(weight, psw, ids, seg, num_bags, padding_idx, mode, unroll,
                           skew_limit, chunk)
    use_kernel = cpu_kernel.kernel_ok(weight)
    if impl == "kernel" and not use_kernel:
        raise RuntimeError(
            "impl='kernel' needs a float32 table and the CPU kernel; cpu_kernel_status() says: "
            f"{cpu_kernel.cpu_kernel_status()[1]!r}. Use impl='auto' to fall back to XLA."
        )
    # auto: the kernel, or the gather formulation where it does not apply (the stream loop,
    # impl="stream", is opt-in: see the module docstring)
    p = jnp.zeros((0,), weight.dtype) if psw is None else psw
    return _forward_fn(num_bags, padding_idx, mode, layout, use_kernel)(weight, ids, bounds, p)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _bag_reduce(weight, psw, ids, bounds, cfg):
    """``(out [B, D], arg)``; ``arg`` (int32, first arg-max position for ``max``) has no tangent."""
    return _primal(weight, psw, ids, bounds, cfg)


def _bag_reduce_jvp(cfg, primals, tangents):
    weight, psw, ids, bounds = primals
    d_weight, d_psw, _, _ = tangents
    num_bags, padding_idx, mode, layout, include_last_offset = cfg[:5]
    # Calling the custom_jvp function (not _primal) keeps higher-order forward mode working.
    out, arg = _bag_reduce(weight, psw, ids, bounds, cfg)
    n = ids.shape[0]
    seg = _segment_ids(bounds, n, layout)
    prep = Prep(weight, ids, seg, psw, num_bags, padding_idx, mode)
    acc = acc_dtype(weight.dtype)
    t = jnp.zeros(out.shape, acc)
    if not isinstance(d_weight, jax.custom_derivatives.SymbolicZero):
        if mode == "max":
            ok = arg < n
            pos = jnp.minimum(arg, n - 1)
            rows = prep.safe_ids[pos]  # [B, D]
            cols = jnp.arange(weight.shape[1], dtype=jnp.int32)[None, :]
            # cast first: transposed, summed in acc
            picked = explicit.gather(d_weight.astype(acc), rows, cols)
            t = t + jnp.where(ok, picked, jnp.zeros((), acc))
        else:
            coef = prep.w if prep.inv_den is None else prep.w * prep.inv_den[prep.seg_c]
            d_rows = prep.tangent_rows(d_weight) * coef[:, None]
            t = t + segments.segment_reduce(jax.ops.segment_sum, d_rows, seg, num_bags)
    if psw is not None and not isinstance(d_psw, jax.custom_derivatives.SymbolicZero):
        dw = jnp.where(prep.valid, d_psw.astype(acc), jnp.zeros((), acc))
        rows = prep.rows(weight)
        d_sum = segments.segment_reduce(jax.ops.segment_sum, rows * dw[:, None], seg, num_bags)
        if mode == "sum":
            t = t + d_sum
        else:
            assert prep.inv_den is not None  # (mean and sqrtn divide)
            if out.dtype == acc:
                out_acc = out
            else:  # the output before its rounding to bf16 / f16: d out / d w_k = (x_k - out) / den
                out_acc = prep.divide(segments.segment_reduce(
                    jax.ops.segment_sum, rows * prep.w[:, None], seg, num_bags))
            if mode == "mean":
                d_den = segments.segment_reduce(jax.ops.segment_sum, dw, seg, num_bags)
            else:  # sqrtn: den = sqrt(sum w^2) -> d den = sum(w dw) / den
                d_den = segments.segment_reduce(
                    jax.ops.segment_sum, prep.w * dw, seg, num_bags) * prep.inv_den
            t = t + (d_sum - out_acc * d_den[:, None]) * prep.inv_den[:, None]
    if prep.nonzero is not None:  # a zero divisor's bag: +0.0 tangents, as its +0.0 output
        t = prep.zero_where_no_divisor(t)
    return (out, arg), (t.astype(out.dtype), np.zeros(arg.shape, jax.dtypes.float0))


_bag_reduce.defjvp(_bag_reduce_jvp, symbolic_zeros=True)


def bag_reduce(
    weight: Array,
    ids: Array,
    segment_ids: Array | None = None,
    num_bags: int | None = None,
    *,
    offsets: Array | None = None,
    include_last_offset: bool = False,
    mode: Mode = "mean",
    per_sample_weights: Array | None = None,
    padding_idx: int | None = None,
    impl: str = "auto",
    unroll: int = 4,
    skew_limit: float = 4.0,
    chunk: int = 1024,
) -> Array:
    """Bag reduction of the flattened form without materialising the gathered ``[N, D]`` rows.

    Same values and gradients as ``jaxbag.embedding_bag(weight, ids, offsets, segment_ids=...,
    num_bags=..., include_last_offset=..., mode=..., per_sample_weights=..., padding_idx=...)``
    (``max_norm`` and ``scale_grad_by_freq`` are the caller's business): ids out of ``[0, V)``,
    ids equal to ``padding_idx`` and ids whose bag is outside ``[0, B)`` are skipped (not summed,
    not counted); empty bags give zeros. Give either ``segment_ids`` + ``num_bags`` or ``offsets``
    (bag ``k`` starts at the ``k``-th smallest offset in ``[0, N]``, exactly as
    :func:`jaxbag.offsets_to_segment_ids` groups ids).

    Args:
      weight: ``float [V, D]`` table.
      ids: ``int [N]`` ids of a signed dtype of at least 32 bits (widen narrower or unsigned
        ones first, as :func:`jaxbag._src.validation.as_ids` does: ``V = 300`` wraps in uint8).
      segment_ids: ``int [N]`` non-decreasing bag of each id.
      num_bags: static ``B`` (with ``segment_ids``; with ``offsets`` it is ``len(offsets)``, minus
        one with ``include_last_offset``).
      offsets: ``int [B]`` (or ``[B + 1]``) bag starts, instead of ``segment_ids``.
      include_last_offset: ``offsets`` has a trailing end offset (torch's flag).
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      per_sample_weights: optional ``float [N]`` weights (not with ``"max"``).
      padding_idx: optional row in ``[0, V)`` to skip (already normalised).
      impl: ``"auto"`` (the CPU kernel when available, else the gather formulation), ``"kernel"`` (raise if
        unavailable) or ``"stream"`` (pure XLA).
      unroll: stream: positions handled per loop trip (static).
      skew_limit: stream: use the chunked fallback when ``B * L > skew_limit * N`` (runtime check).
      chunk: ids per step of the chunked fallback (static).

    Returns:
      ``[B, D]`` array of ``weight.dtype`` (accumulated in float32 for narrower tables).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxbag._src.fast_forward import bag_reduce
      >>> w = jnp.array([[1., 2.], [3., 4.], [5., 6.]])
      >>> bag_reduce(w, jnp.array([0, 2, 1]), jnp.array([0, 0, 1]), 2, mode="sum").tolist()
      [[6.0, 8.0], [3.0, 4.0]]
      >>> bag_reduce(w, jnp.array([0, 2, 1]), offsets=jnp.array([0, 2]), mode="max").tolist()
      [[5.0, 6.0], [3.0, 4.0]]
    """
    if mode not in validation.MODES:
        raise ValueError(f"mode must be one of {validation.MODES}; got mode={mode!r}.")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got impl={impl!r}.")
    if mode == "max" and per_sample_weights is not None:
        raise ValueError("per_sample_weights is not allowed with mode='max'; pass mode='sum'.")
    if (segment_ids is None) == (offsets is None):
        raise ValueError(
            "pass exactly one of segment_ids (with num_bags) or offsets; e.g. "
            "bag_reduce(w, ids, segment_ids, num_bags) or bag_reduce(w, ids, offsets=offsets)."
        )
    weight = jnp.asarray(weight)
    ids = jnp.asarray(ids).reshape(-1)
    if offsets is not None:
        bounds = jnp.asarray(offsets).reshape(-1)
        num_bags = bounds.shape[0] - (1 if include_last_offset else 0)
        layout = 1
    else:
        if num_bags is None:
            raise ValueError("num_bags (a static int) is required with segment_ids.")
        bounds = jnp.asarray(segment_ids).reshape(-1)
        layout = 0
    num_bags = int(num_bags)
    if ids.shape[0] == 0 or num_bags <= 0:
        return jnp.zeros((max(num_bags, 0), weight.shape[1]), weight.dtype)
    psw = None if per_sample_weights is None else jnp.asarray(per_sample_weights).reshape(-1)
    cfg = (num_bags, padding_idx, mode, layout, bool(include_last_offset), impl, int(unroll),
           float(skew_limit), int(chunk))
    return _bag_reduce(weight, psw, ids, bounds, cfg)[0]


# ---- for the sparse training path (jaxbag._src.sparse) -------------------------------------------


def bag_reduce_with_arg(weight, ids, bounds, psw, *, num_bags, padding_idx, mode, layout,
                        include_last_offset=False, impl="auto"):
    """:func:`bag_reduce` on prepared arguments, also returning the ``max`` arg-max positions.

    ``bounds`` is ``segment_ids [N]`` (``layout=0``) or offsets (``layout=1``). Differentiable
    in ``weight``/``psw`` as :func:`bag_reduce`. Returns ``(out [B, D], arg)`` with ``arg``
    ``int32 [B, D]`` (``max``; ``N`` for empty) or ``[B, 1]``.
    """
    cfg = (int(num_bags), padding_idx, mode, int(layout), bool(include_last_offset), impl, 4, 4.0, 1024)
    return _bag_reduce(weight, psw, ids, bounds, cfg)
