"""The functional core: :func:`embedding_bag` and :func:`renorm`.

Legend: ``V`` rows in the table, ``D`` features, ``N`` ids, ``B`` bags, ``L`` ids per bag (2-D form).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from jaxbag._src import bag_terms, cpu_kernel, explicit, fast_forward, segments, validation
from jaxbag._src.dtypes import acc_dtype, take_rows
from jaxbag._src.validation import Mode

__all__ = ["embedding_bag", "renorm"]


def _row_norms(rows: Array, norm_type: float) -> Array:
    """``[N]`` p-norms of ``rows [N, D]`` (``norm_type`` may be ``inf`` / ``-inf``: the largest /
    smallest magnitude; ``0`` counts the nonzero entries, as ``torch.norm(p=0)``)."""
    a = jnp.abs(rows)
    if norm_type == float("inf"):
        return jnp.max(a, axis=-1)
    if norm_type == float("-inf"):  # torch's p = -inf: the smallest magnitude
        return jnp.min(a, axis=-1)
    if norm_type == 0:
        return jnp.sum(a != 0, axis=-1).astype(rows.dtype)
    if norm_type == 2.0:
        return jnp.sqrt(jnp.sum(a * a, axis=-1))
    p = jnp.asarray(norm_type, rows.dtype)
    return jnp.sum(a**p, axis=-1) ** (1 / p)


def _renorm_scale(rows: Array, max_norm: float, norm_type: float) -> Array:
    """``[N]`` factors torch's ``embedding_renorm_`` applies: ``max_norm / (norm + 1e-7)`` if too big."""
    norms = _row_norms(rows, norm_type)
    max_norm_a = jnp.asarray(max_norm, rows.dtype)
    return jnp.where(
        norms > max_norm_a, max_norm_a / (norms + jnp.asarray(1e-7, rows.dtype)), jnp.ones_like(norms)
    )


@jax.custom_vjp
def _scale_grad(x: Array, scale: Array) -> Array:
    """Identity on ``x [N, D]``; its cotangent is multiplied by ``scale [N]``."""
    del scale
    return x


def _scale_grad_fwd(x, scale):
    return x, scale


def _scale_grad_bwd(scale, g):
    return g * scale[:, None].astype(g.dtype), jnp.zeros_like(scale)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def inverse_counts(
    ids: Array,
    valid: Array,
    sentinel: int,
    *,
    dtype: jnp.dtype,
    among: tuple[Array, Array] | None = None,
) -> Array:
    """``[N]`` 1 / (occurrences of ``ids[i]``) in ``dtype`` (the accumulation dtype: float64
    for a float64 table, whose gradient a float32 1/3 would leave float32-accurate); sort-based,
    no ``[V]`` array.

    Occurrences are counted among the valid positions of ``among = (all_ids, all_valid)`` (by
    default ``(ids, valid)`` itself); positions that are not valid get 1. ``sentinel`` is any id
    that no valid position holds (e.g. ``V``).
    """
    all_ids, all_valid = (ids, valid) if among is None else among
    keys = jnp.sort(jnp.where(all_valid, all_ids, sentinel))
    q = jnp.where(valid, ids, sentinel)
    counts = jnp.searchsorted(keys, q, side="right") - jnp.searchsorted(keys, q, side="left")
    counts = jnp.where(valid, counts, 1)
    return 1 / jnp.maximum(counts, 1).astype(dtype)


def lookup_rows(
    weight: Array,
    ids: Array,
    take: Array,
    *,
    max_norm: float | None,
    norm_type: float,
    inverse_freq: Array | None,
) -> Array:
    """``[N, D]`` rows ``weight[ids]`` in the accumulation dtype (zeros where ``take`` is false).

    Applies torch's ``max_norm`` (forward value of the renormed row, gradient of the renormed
    table) and the ``scale_grad_by_freq`` gradient scale ``inverse_freq [N]``.
    """
    acc = acc_dtype(weight.dtype)
    safe_ids = jnp.where(take, ids, jnp.zeros((), ids.dtype))
    rows = take_rows(weight, safe_ids)
    # Exact zeros where not taken: the placeholder row 0 may hold inf or NaN (0 * inf is NaN).
    rows = jnp.where(take[:, None], rows, jnp.zeros((), acc))
    if max_norm is not None:
        scaled = rows * _renorm_scale(jax.lax.stop_gradient(rows), max_norm, norm_type)[:, None]
        rows = rows + jax.lax.stop_gradient(scaled - rows)  # torch's value, torch's gradient
    if inverse_freq is not None:
        rows = _scale_grad(rows, inverse_freq.astype(acc))
    return rows


def reduce_bags(
    rows: Array,
    seg: Array,
    num_bags: int,
    mode: Mode,
    *,
    valid: Array,
    weights: Array | None = None,
    held: Array | None = None,
    axes: tuple[str, ...] = (),
) -> Array:
    """Reduces ``rows [N, D]`` into ``[B, D]`` bags (accumulation dtype).

    Args:
      rows: ``[N, D]`` looked-up rows.
      seg: ``int [N]`` sorted bag of each position (outside ``[0, B)``: dropped).
      num_bags: static ``B``.
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      valid: ``bool [N]`` the positions that take part (they set the mean's count).
      weights: optional ``[N]`` per-sample weights.
      held: optional ``bool [N]`` the positions whose row is in ``rows`` here (a shard of a
        row-sharded table); defaults to ``valid``.
      axes: mesh axes to combine the partial bags over (inside ``shard_map``); ``()`` for one device.

    Max mode finds the max without gradient, then *gathers* the value at the first arg-max
    position per bag and feature, so the gradient reaches exactly that row (torch's tie rule;
    ``jax.ops.segment_max`` alone would split it between ties). Empty bags give zeros.
    """
    acc = rows.dtype
    n, d = rows.shape
    held = valid if held is None else held
    if mode == "max":
        vals = jnp.where(held[:, None], jax.lax.stop_gradient(rows), jnp.asarray(-jnp.inf, acc))
        best = segments.segment_reduce(jax.ops.segment_max, vals, seg, num_bags)
        if axes:  # XLA:CPU's all-reduce max drops NaN: carry it separately
            any_nan = jax.lax.pmax(jnp.isnan(best).astype(jnp.int32), axes) > 0
            best = jnp.where(any_nan, jnp.asarray(jnp.nan, acc), jax.lax.pmax(best, axes))
        hit = held[:, None] & bag_terms.max_hits(vals, best[jnp.clip(seg, 0, max(num_bags - 1, 0))])
        pos = jnp.where(hit, jnp.arange(n, dtype=jnp.int32)[:, None], jnp.int32(n))
        # (empty: n, the zero row)
        first = jnp.minimum(segments.segment_reduce(jax.ops.segment_min, pos, seg, num_bags), n)
        if axes:  # only the shard holding the first arg-max contributes
            first = jnp.where(first == jax.lax.pmin(first, axes), first, n)
        padded = jnp.concatenate([rows, jnp.zeros((1, d), acc)], axis=0)
        out = jnp.take_along_axis(padded, first, axis=0)
        return jax.lax.psum(out, axes) if axes else out

    zero = jnp.zeros((), acc)
    w = bag_terms.masked_weights(valid, weights, acc)
    w_held = w if held is valid else jnp.where(held, w, zero)
    sums = segments.segment_reduce(jax.ops.segment_sum, rows * w_held[:, None], seg, num_bags)
    if axes:
        sums = jax.lax.psum(sums, axes)
    denom = bag_terms.bag_denominators(w, seg, num_bags, mode)
    if denom is None:  # sum
        return sums
    nonzero = denom != 0
    safe = jnp.where(nonzero, denom, jnp.ones((), acc))
    return jnp.where(nonzero[:, None], _divide_bags(sums, safe), zero)


@jax.custom_jvp
def _divide_bags(sums: Array, den: Array) -> Array:
    """``sums [B, D] / den [B]``, with the tangent ``(d_sums - out * d_den) / den``: autodiff's
    ``-sums / den**2`` overflows for a small divisor (weights of 1e-30 gave -inf weight
    gradients where the true ones are about 3e29)."""
    return sums / den[:, None]


@_divide_bags.defjvp
def _divide_bags_jvp(primals, tangents):
    sums, den = primals
    d_sums, d_den = tangents
    out = sums / den[:, None]
    return out, (d_sums - out * d_den[:, None]) / den[:, None]


class BagOptions(TypedDict, total=False):
    """The keyword options of :func:`embedding_bag` that :func:`jaxbag.embedding_bag_rows` passes
    on (its ``**kwargs``, typed for type checkers; the same names and types as here)."""

    mode: Mode
    per_sample_weights: ArrayLike | None
    include_last_offset: bool
    max_norm: float | None
    norm_type: float
    scale_grad_by_freq: bool
    segment_ids: ArrayLike | None
    num_bags: int | None


def embedding_bag(
    weight: ArrayLike,
    indices: ArrayLike,
    offsets: ArrayLike | None = None,
    *,
    mode: Mode = "mean",
    per_sample_weights: ArrayLike | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    segment_ids: ArrayLike | None = None,
    num_bags: int | None = None,
) -> Array:
    """Looks up rows of ``weight`` and reduces each bag of ids, like ``torch.nn.functional.embedding_bag``.

    Legend: ``V`` table rows, ``D`` features, ``N`` ids, ``B`` bags, ``L`` ids per bag (2-D input).

    Three input forms (a TorchRec-style picture of the same batch of ``B = 3`` bags)::

        bags                    [ 4 1 ]  [ ]  [ 2 2 7 ]
        1. offsets:     indices [ 4 1 2 2 7 ]  offsets [ 0 2 2 ]      (or [0 2 2 5] with
                                                                       include_last_offset=True)
        2. 2-D:         indices [[4 1 p], [p p p], [2 2 7]]  with padding_idx=p, rows are bags
        3. segment ids: indices [ 4 1 2 2 7 0 0 ]  segment_ids [ 0 0 2 2 2 3 3 ]  num_bags=3
                        (ids whose segment is >= num_bags are padding: dropped; static shapes)

    Args:
      weight: ``float [V, D]`` table (float32, bfloat16, float16, float8 or float64).
      indices: ``int [N]`` ids (with ``offsets`` or ``segment_ids``) or ``int [B, L]`` (each row is
        a bag). Any integer dtype (narrow and unsigned ones are widened).
      offsets: ``int [B]`` start of each bag in ``indices`` (``int [B+1]`` with
        ``include_last_offset``); must start at 0 and be non-decreasing, equal offsets give empty bags.
      mode: ``"sum"``, ``"mean"`` (sum / count), ``"max"`` (per feature), or ``"sqrtn"``
        (TensorFlow's: sum / sqrt(count)).
      per_sample_weights: optional ``float`` weights of ``indices``' shape. ``sum``: sum(w * x) as
        torch; ``mean``: sum(w * x) / sum(w) and ``sqrtn``: sum(w * x) / sqrt(sum(w**2)), as
        TensorFlow's ``embedding_lookup_sparse``; not allowed with ``max``. A zero divisor
        (weights summing to 0, all weights 0) gives +0.0 zeros, as an empty bag.
      padding_idx: optional row in ``[-V, V)`` (negative counts from the end) whose ids are skipped:
        not summed, not counted in the mean, not a max candidate; that row gets no gradient.
      include_last_offset: ``offsets`` has ``B + 1`` entries, the last one the end of the last bag.
        No effect with 2-D ``indices`` (as torch). Ids at or past the last offset are ignored in
        every mode (torch 2.13 CPU ignores them in ``sum``, counts them in ``mean``'s divisor
        without adding their rows, and takes them into the last bag's ``max``; jaxbag follows
        the documented rule).
      max_norm: if set, every looked-up row with a ``norm_type``-norm above ``max_norm`` is scaled
        by ``max_norm / (norm + 1e-7)`` before reduction, as torch's forward does. The table itself
        is not changed (JAX is functional; :func:`jaxbag.renorm` returns the renormed table), and the
        gradient is torch's: that of the renormed rows (torch renorms the weight in place first),
        passed to the table unscaled. Every autodiff mode (``grad``, ``jvp``, ``hessian``) sees
        it so: the rescaling is not differentiated, and a finite-difference check fails by design.
      norm_type: the p of the p-norm for ``max_norm`` (``float('inf')`` allowed).
      scale_grad_by_freq: divide each row's gradient by its number of occurrences in the batch (as
        ``torch.nn.Embedding``; torch 2.13's CPU ``embedding_bag`` uses a wrong count, see README).
        Not allowed with ``max``. It changes the gradient only, not the function, so it is
        defined for reverse mode (``grad``, ``vjp``); ``jvp`` raises.
      segment_ids: ``int [N]`` sorted bag of each id (the JAX-native form, with ``num_bags``).
      num_bags: static ``B`` for ``segment_ids``.

    Returns:
      ``[B, D]`` array of ``weight.dtype`` (accumulated in float32 for narrower tables; their
      gradients too, rounded to ``weight.dtype`` once).
      Empty bags (and bags of only padding or dropped ids) give zeros in every mode, with zero
      gradient.

    Raises:
      TypeError, ValueError, IndexError: on bad input, before any work is done, naming the argument
        and the first offending position. Ids at padding positions (segment id outside ``[0, B)``,
        at or past the last offset, any id when ``offsets`` is empty) are never read, so their
        values are not checked. Value checks (ids in range, offsets well formed, segment ids
        sorted) need concrete values: under ``jit``/``vmap`` an out-of-range id is skipped as
        ``padding_idx`` is (it reads no row, is not counted in a mean, is no max candidate),
        ill-formed offsets only regroup ids (each in at most one bag; which one, and the
        gradient, are unspecified), and unsorted segment ids are grouped as
        ``jax.ops.segment_sum`` groups them on the CPU (each id in the bag its segment id names;
        unspecified on other backends); use :func:`jaxbag.validate` with
        :mod:`jax.experimental.checkify` to check them there.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> w = jnp.array([[1., 2.], [3., 4.], [5., 6.]])
      >>> jaxbag.embedding_bag(w, jnp.array([0, 2, 1]), jnp.array([0, 2]), mode="sum").tolist()
      [[6.0, 8.0], [3.0, 4.0]]
      >>> jaxbag.embedding_bag(w, jnp.array([[0, 1], [2, 2]]), mode="max").tolist()
      [[3.0, 4.0], [5.0, 6.0]]
    """
    return _embedding_bag(
        weight,
        indices,
        offsets,
        mode=mode,
        per_sample_weights=per_sample_weights,
        padding_idx=padding_idx,
        include_last_offset=include_last_offset,
        max_norm=max_norm,
        norm_type=norm_type,
        scale_grad_by_freq=scale_grad_by_freq,
        segment_ids=segment_ids,
        num_bags=num_bags,
        fast=True,
    )


def embedding_bag_xla(weight: ArrayLike, indices: ArrayLike, offsets: ArrayLike | None = None,
                      **kwargs: Any) -> Array:
    """:func:`embedding_bag` through its reference formulation only (gather + segment ops).

    The oracle the fast forward (:mod:`jaxbag._src.fast_forward`) is tested against; the same
    arguments and results as :func:`embedding_bag`.
    """
    return _embedding_bag(weight, indices, offsets, fast=False, **kwargs)


def _embedding_bag(
    weight: ArrayLike,
    indices: ArrayLike,
    offsets: ArrayLike | None = None,
    *,
    mode: Mode = "mean",
    per_sample_weights: ArrayLike | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    segment_ids: ArrayLike | None = None,
    num_bags: int | None = None,
    fast: bool,
) -> Array:
    weight = jnp.asarray(weight)
    indices = validation.as_ids(indices)
    offsets, segment_ids = validation.as_ids(offsets), validation.as_ids(segment_ids)
    per_sample_weights = None if per_sample_weights is None else jnp.asarray(per_sample_weights)
    validation.check_table(weight)
    validation.check_norm(max_norm, norm_type)
    num_embeddings, features = weight.shape
    pad = validation.normalize_padding_idx(padding_idx, num_embeddings)
    layout = validation.check_arguments(
        num_embeddings=num_embeddings,
        indices=indices,
        offsets=offsets,
        per_sample_weights=per_sample_weights,
        segment_ids=segment_ids,
        num_bags=num_bags,
        include_last_offset=include_last_offset,
        mode=mode,
        scale_grad_by_freq=scale_grad_by_freq,
    )

    out_sharding = _explicit_out_sharding(
        weight, indices, (offsets, segment_ids, per_sample_weights))
    if out_sharding is not None:
        # An input split over Explicit mesh axes (jax.make_mesh's default): the gather and the
        # segment reductions below need sharding rules JAX does not infer for them (a batch-split
        # 2-D id array, or a column-split table, failed to trace). Inside auto_axes the compiler
        # partitions the computation as on an Auto mesh; the bags come out split as their ids'
        # rows and the table's columns.
        def whole(w, i, o, s, p):
            return _embedding_bag(
                w, i, o, mode=mode, per_sample_weights=p, padding_idx=padding_idx,
                include_last_offset=include_last_offset, max_norm=max_norm, norm_type=norm_type,
                scale_grad_by_freq=scale_grad_by_freq, segment_ids=s, num_bags=num_bags,
                fast=fast)

        # (only the Explicit axes: the Manual ones of an enclosing shard_map stay Manual)
        axes = explicit.explicit_axes(out_sharding.mesh)
        # (typed here: type checkers read auto_axes' return as its decorator form's too)
        auto: Callable[..., Any] = jax.sharding.auto_axes(
            whole, axes=axes, out_sharding=out_sharding)
        return auto(weight, indices, offsets, segment_ids, per_sample_weights)

    b = layout.num_bags
    # shape polymorphism (jax.export with symbolic dimensions)
    if scale_grad_by_freq and not isinstance(indices.size, int):
        raise ValueError(
            f"scale_grad_by_freq needs a static number of ids (its counts search the batch's "
            f"sorted ids); got indices of shape {indices.shape}. Export with a fixed number of "
            "ids (pad them with padding_idx, or pack_bags(..., bucket_sizes=...)), or without "
            "scale_grad_by_freq."
        )
    if not isinstance(b, int):  # a symbolic bag count
        if not layout.two_d:
            raise ValueError(
                f"A symbolic number of bags ({b}) is supported for 2-D indices [B, L] only; got "
                + (f"offsets of shape {offsets.shape}" if offsets is not None else
                   f"num_bags={num_bags!r}")
                + ". Export with a fixed bag count (pad the batch with empty bags, e.g. "
                "jaxbag.pack_bags(..., batch_size=B)) or pass the ids as [B, L] rows."
            )
        # each row is a bag: the op on one [1, L] row, batched (its batching rule keeps the
        # batch size symbolic)
        def one(row: Array, p: Array | None) -> Array:
            return _embedding_bag(
                weight, row[None], mode=mode, per_sample_weights=None if p is None else p[None],
                padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type, fast=fast)[0]

        return jax.vmap(one)(indices, per_sample_weights)
    ids = indices.reshape(-1)
    n = ids.shape[0]
    if b == 0 or n == 0:
        return jnp.zeros((b, features), weight.dtype)
    weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
    fast = fast and max_norm is None and not scale_grad_by_freq
    if fast and not cpu_kernel.in_shard_map(weight, ids, offsets, segment_ids, weights):
        # Streams rows into the bags without the [N, D] gather (CPU kernel or XLA loop; plain
        # gather + segment ops elsewhere); same values and gradients as the code below.
        kw: dict[str, Any] = dict(mode=mode, per_sample_weights=weights, padding_idx=pad)
        if layout.two_d:
            starts = jnp.arange(b, dtype=jnp.int32) * indices.shape[1]
            return fast_forward.bag_reduce(weight, ids, offsets=starts, **kw)
        if offsets is not None:
            return fast_forward.bag_reduce(
                weight, ids, offsets=offsets, include_last_offset=include_last_offset, **kw
            )
        return fast_forward.bag_reduce(weight, ids, segment_ids, b, **kw)
    seg = segments.bag_of_positions(indices, offsets, segment_ids)

    valid = bag_terms.valid_positions(ids, seg, num_embeddings, b, pad)
    inverse_freq = (
        inverse_counts(ids, valid, num_embeddings, dtype=acc_dtype(weight.dtype))
        if scale_grad_by_freq else None
    )
    rows = lookup_rows(
        weight, ids, valid, max_norm=max_norm, norm_type=norm_type, inverse_freq=inverse_freq
    )
    out = reduce_bags(rows, seg, b, mode, valid=valid, weights=weights)
    return out.astype(weight.dtype)


def renorm(
    weight: ArrayLike, indices: ArrayLike, max_norm: float, norm_type: float = 2.0
) -> Array:
    """Returns ``weight`` with the rows ``indices`` touches rescaled to norm <= ``max_norm``.

    The pure counterpart of torch's in-place ``embedding_renorm_`` (what ``nn.EmbeddingBag`` with
    ``max_norm`` does to its weight during a forward pass).

    Args:
      weight: ``float [V, D]`` table.
      indices: ``int`` ids of any shape; out-of-range ids are ignored.
      max_norm: the largest allowed norm.
      norm_type: the p of the p-norm (``float('inf')`` allowed).

    Returns:
      ``[V, D]`` array like ``weight``: touched rows with norm above ``max_norm`` are multiplied by
      ``max_norm / (norm + 1e-7)``; other rows unchanged.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> new = jaxbag.renorm(jnp.array([[3., 4.], [3., 4.]]), jnp.array([1]), max_norm=1.0)
      >>> new[0].tolist(), [round(float(x), 4) for x in new[1]]
      ([3.0, 4.0], [0.6, 0.8])
    """
    weight = jnp.asarray(weight)
    validation.check_table(weight)
    validation.check_norm(max_norm, norm_type)
    ids = validation.as_ids(indices)
    validation.require_int("indices", ids)
    ids = ids.reshape(-1)
    num_embeddings = weight.shape[0]
    ok = (ids >= 0) & (ids < num_embeddings)
    safe_ids = jnp.where(ok, ids, 0)
    rows = jnp.take(weight, safe_ids, axis=0).astype(acc_dtype(weight.dtype))
    new_rows = rows * _renorm_scale(rows, max_norm, norm_type)[:, None]
    target = segments.dropped_rows(ids, num_embeddings)
    return weight.at[target].set(new_rows.astype(weight.dtype), mode="drop")


def _explicit_out_sharding(
    weight: Array, indices: Array, others: tuple[Array | None, ...]
) -> jax.sharding.NamedSharding | None:
    """The bags' sharding when an input is split over Explicit mesh axes, else ``None``.

    ``[B, D]`` bags are split over ``B`` as 2-D ``indices`` are over their rows (1-D ids: ``B``
    whole) and over ``D`` as ``weight``'s columns; an axis used by both stays on ``D``.
    """
    mesh = explicit.split_mesh(weight, indices, *others)
    if mesh is None:
        return None
    features = explicit.spec_entry(weight, 1)
    bags = explicit.spec_entry(indices, 0) if indices.ndim == 2 else None
    if explicit.shares_axes(bags, features):
        bags = None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(bags, features))
