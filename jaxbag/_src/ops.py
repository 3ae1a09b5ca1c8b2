"""The functional core: :func:`embedding_bag` and :func:`renorm`.

Legend: ``V`` rows in the table, ``D`` features, ``N`` ids, ``B`` bags, ``L`` ids per bag (2-D form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from jaxbag._src import segments, validation

__all__ = ["embedding_bag", "renorm"]


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for narrow float tables (bf16, f16), the table's dtype otherwise (f32, f64)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _row_norms(rows: Array, norm_type: float) -> Array:
    """``[N]`` p-norms of ``rows [N, D]`` (``norm_type`` may be ``inf``)."""
    a = jnp.abs(rows)
    if norm_type == float("inf"):
        return jnp.max(a, axis=-1)
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


def _inverse_counts(ids: Array, valid: Array, sentinel: int) -> Array:
    """``[N]`` 1 / (occurrences of ``ids[i]`` among valid positions); sort-based, no ``[V]`` array."""
    keys = jnp.where(valid, ids, sentinel)
    srt = jnp.sort(keys)
    counts = jnp.searchsorted(srt, keys, side="right") - jnp.searchsorted(srt, keys, side="left")
    return 1.0 / jnp.maximum(counts, 1).astype(jnp.float32)


def _first_argmax_rows(rows: Array, valid: Array, seg: Array, num_bags: int) -> Array:
    """Per bag and feature, the value at the first arg-max position (0 for empty bags).

    The max is found without gradient; the result is then *gathered* from ``rows`` so the gradient
    flows to exactly one position per bag and feature: the first occurrence of the maximum, as
    torch does (``jax.ops.segment_max`` alone would split it between ties).
    """
    n = rows.shape[0]
    neg = jnp.asarray(-jnp.inf, rows.dtype)
    vals = jnp.where(valid[:, None], jax.lax.stop_gradient(rows), neg)
    best = jax.ops.segment_max(vals, seg, num_segments=num_bags, indices_are_sorted=True)
    seg_c = jnp.clip(seg, 0, max(num_bags - 1, 0))
    hit = valid[:, None] & (vals == best[seg_c])
    pos = jnp.where(hit, jnp.arange(n, dtype=jnp.int32)[:, None], jnp.int32(n))
    first = jax.ops.segment_min(pos, seg, num_segments=num_bags, indices_are_sorted=True)
    first = jnp.minimum(first, n)  # empty bags: segment_min's identity -> n, the zero row below
    padded = jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), rows.dtype)], axis=0)
    return jnp.take_along_axis(padded, first, axis=0)


def embedding_bag(
    weight: ArrayLike,
    indices: ArrayLike,
    offsets: ArrayLike | None = None,
    *,
    mode: str = "mean",
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
      weight: ``float [V, D]`` table (float32, bfloat16, float16 or float64).
      indices: ``int [N]`` ids (with ``offsets`` or ``segment_ids``) or ``int [B, L]`` (each row is
        a bag). int32 or int64.
      offsets: ``int [B]`` start of each bag in ``indices`` (``int [B+1]`` with
        ``include_last_offset``); must start at 0 and be non-decreasing, equal offsets give empty bags.
      mode: ``"sum"``, ``"mean"`` (sum / count), ``"max"`` (per feature), or ``"sqrtn"``
        (TensorFlow's: sum / sqrt(count)).
      per_sample_weights: optional ``float`` weights of ``indices``' shape. ``sum``: sum(w * x) as
        torch; ``mean``: sum(w * x) / sum(w) and ``sqrtn``: sum(w * x) / sqrt(sum(w**2)), as
        TensorFlow's ``embedding_lookup_sparse``; not allowed with ``max``.
      padding_idx: optional row in ``[-V, V)`` (negative counts from the end) whose ids are skipped:
        not summed, not counted in the mean, not a max candidate; that row gets no gradient.
      include_last_offset: ``offsets`` has ``B + 1`` entries, the last one the end of the last bag.
        Ids at or past the last offset are ignored in every mode (torch 2.13 CPU adds them to the
        last bag in ``mean``/``max`` mode but not in ``sum``; jaxbag follows the documented rule).
      max_norm: if set, every looked-up row with a ``norm_type``-norm above ``max_norm`` is scaled
        by ``max_norm / (norm + 1e-7)`` before reduction, as torch's forward does. The table itself
        is not changed (JAX is functional; :func:`jaxbag.renorm` returns the renormed table), and the
        gradient is torch's: that of the renormed rows (torch renorms the weight in place first).
      norm_type: the p of the p-norm for ``max_norm`` (``float('inf')`` allowed).
      scale_grad_by_freq: divide each row's gradient by its number of occurrences in the batch (as
        ``torch.nn.Embedding``; torch 2.13's CPU ``embedding_bag`` uses a wrong count, see README).
        Not allowed with ``max``.
      segment_ids: ``int [N]`` sorted bag of each id (the JAX-native form, with ``num_bags``).
      num_bags: static ``B`` for ``segment_ids``.

    Returns:
      ``[B, D]`` array of ``weight.dtype`` (accumulated in float32 for narrower tables).
      Empty bags (and bags of only padding or dropped ids) give zeros in every mode, with zero
      gradient.

    Raises:
      TypeError, ValueError, IndexError: on bad input, before any work is done, naming the argument
        and the first offending position. Value checks (ids in range, offsets well formed, segment
        ids sorted) need concrete values: under ``jit``/``vmap`` an out-of-range id contributes zeros
        (never another row) and ill-formed offsets only regroup ids; use :func:`jaxbag.validate`
        with :mod:`jax.experimental.checkify` to check them there.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> w = jnp.array([[1., 2.], [3., 4.], [5., 6.]])
      >>> jaxbag.embedding_bag(w, jnp.array([0, 2, 1]), jnp.array([0, 2]), mode="sum").tolist()
      [[6.0, 8.0], [3.0, 4.0]]
      >>> jaxbag.embedding_bag(w, jnp.array([[0, 1], [2, 2]]), mode="max").tolist()
      [[3.0, 4.0], [5.0, 6.0]]
    """
    weight = jnp.asarray(weight)
    indices = jnp.asarray(indices)
    offsets = None if offsets is None else jnp.asarray(offsets)
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    per_sample_weights = None if per_sample_weights is None else jnp.asarray(per_sample_weights)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [V, D]; got shape {weight.shape}.")
    if not jnp.issubdtype(weight.dtype, jnp.floating):
        raise TypeError(f"weight must be a floating-point table; got dtype {weight.dtype}.")
    num_embeddings, features = weight.shape
    pad = validation.normalize_padding_idx(padding_idx, num_embeddings)
    layout = validation.check_static(
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
    if validation.is_concrete(indices, offsets, segment_ids):
        validation.raise_value_problems(num_embeddings, indices, offsets, segment_ids)

    b = layout.num_bags
    ids = indices.reshape(-1)
    n = ids.shape[0]
    if layout.two_d:
        seg = jnp.repeat(jnp.arange(b, dtype=jnp.int32), indices.shape[1], total_repeat_length=n)
    elif offsets is not None:
        seg = segments.offsets_to_segment_ids(offsets, n, include_last_offset=include_last_offset)
    else:
        seg = segment_ids
    acc = _acc_dtype(weight.dtype)
    out_shape = (b, features)
    if b == 0 or n == 0:
        return jnp.zeros(out_shape, weight.dtype)

    valid = (ids >= 0) & (ids < num_embeddings) & (seg >= 0) & (seg < b)
    if pad is not None:
        valid = valid & (ids != pad)
    safe_ids = jnp.where(valid, ids, 0)
    rows = jnp.take(weight, safe_ids, axis=0, mode="clip").astype(acc)
    if max_norm is not None:
        scaled = rows * _renorm_scale(jax.lax.stop_gradient(rows), max_norm, norm_type)[:, None]
        rows = rows + jax.lax.stop_gradient(scaled - rows)  # torch's value, torch's gradient
    if scale_grad_by_freq:
        rows = _scale_grad(rows, _inverse_counts(ids, valid, num_embeddings).astype(acc))

    if mode == "max":
        out = _first_argmax_rows(rows, valid, seg, b)
        return out.astype(weight.dtype)

    if per_sample_weights is None:
        w = valid.astype(acc)
    else:
        w = jnp.where(valid, per_sample_weights.reshape(-1).astype(acc), jnp.zeros((), acc))
    sums = jax.ops.segment_sum(rows * w[:, None], seg, num_segments=b, indices_are_sorted=True)
    if mode == "sum":
        return sums.astype(weight.dtype)
    if mode == "mean":
        denom = jax.ops.segment_sum(w, seg, num_segments=b, indices_are_sorted=True)
    else:  # sqrtn
        denom = jnp.sqrt(jax.ops.segment_sum(w * w, seg, num_segments=b, indices_are_sorted=True))
    nonzero = denom != 0
    safe = jnp.where(nonzero, denom, jnp.ones((), acc))
    out = jnp.where(nonzero[:, None], sums / safe[:, None], jnp.zeros((), acc))
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
    ids = jnp.asarray(indices).reshape(-1)
    num_embeddings = weight.shape[0]
    ok = (ids >= 0) & (ids < num_embeddings)
    safe_ids = jnp.where(ok, ids, 0)
    rows = jnp.take(weight, safe_ids, axis=0).astype(_acc_dtype(weight.dtype))
    new_rows = rows * _renorm_scale(rows, max_norm, norm_type)[:, None]
    target = jnp.where(ok, ids, num_embeddings)  # dropped by the scatter
    return weight.at[target].set(new_rows.astype(weight.dtype), mode="drop")
