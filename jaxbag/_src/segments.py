"""Segment ids from offsets or lengths: how a flat list of ids is cut into bags.

Legend: ``N`` ids, ``B`` bags.

A ragged batch of ``B = 3`` bags, TorchRec style::

    bags        [ a b ] [ ] [ c d e ]
    indices     [ a b c d e ]             N = 5
    offsets     [ 0 2 2 ]                 B = 3   (or [0 2 2 5] with include_last_offset)
    lengths     [ 2 0 3 ]
    segment_ids [ 0 0 2 2 2 ]

Segment ids are always non-decreasing, whatever the offsets (so the segment reductions may assume
sorted ids). Positions before ``offsets[0]`` get ``-1`` and, with ``include_last_offset``, positions at
or past the last offset get ``B``: both are outside ``[0, B)`` and so dropped by the reductions.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.core import Tracer
from jax.typing import ArrayLike

from jaxbag._src import validation
from jaxbag._src.explicit import unsplit

__all__ = ["lengths_to_segment_ids", "offsets_to_segment_ids"]


def offsets_to_segment_ids(
    offsets: ArrayLike, num_indices: int, *, include_last_offset: bool = False
) -> Array:
    """Converts bag start offsets into one segment id per id.

    Args:
      offsets: ``int [B]`` start of each bag in the flat id list (``int [B+1]`` with
        ``include_last_offset``, the last entry being the end of the last bag). Must start at 0,
        be non-decreasing and at most ``N``; equal consecutive offsets make empty bags.
      num_indices: ``N``, the length of the flat id list (static).
      include_last_offset: whether ``offsets`` has a trailing end offset (torch's flag).

    Returns:
      ``int32 [N]`` non-decreasing segment ids. Positions at or past the last offset get ``B`` when
      ``include_last_offset`` is set (so they are ignored).

    Raises:
      TypeError / ValueError: non-integer or non-1-D ``offsets``, a negative ``num_indices``;
        eagerly (concrete values) also ``offsets`` not starting at 0, decreasing or past ``N``,
        naming the first offending position (a host int64 / uint64 offset past int32 by its
        real value, not the clipped one). Under ``jit`` such offsets are not checked (use
        :func:`jaxbag.validate`): offsets outside ``[0, N]`` then mark nothing.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> jaxbag.offsets_to_segment_ids(jnp.array([0, 2, 2]), 5).tolist()
      [0, 0, 2, 2, 2]
      >>> jaxbag.offsets_to_segment_ids(jnp.array([0, 2, 4]), 5, include_last_offset=True).tolist()
      [0, 0, 1, 1, 2]
    """
    validation.check_bool("include_last_offset", include_last_offset)
    raw, offsets = offsets, _checked_1d("offsets", offsets)
    n = _checked_num_indices(num_indices)
    _check_not_clipped("offsets", raw, offsets, n)
    if include_last_offset and offsets.shape[0] == 0:
        raise ValueError(
            "include_last_offset=True needs at least one offset (the end of the last bag); got "
            "empty offsets. For zero bags pass offsets=[0]."
        )
    if validation.is_concrete(offsets) and offsets.shape[0] > 0:
        validation.raise_value_problems(
            0, np.broadcast_to(np.int32(0), (n,)), offsets, None,
            num_bags=offsets.shape[0] - int(include_last_offset),
            include_last_offset=include_last_offset, check_ids=False,
        )
    return offsets_to_segment_ids_unchecked(offsets, n)


def offsets_to_segment_ids_unchecked(offsets: Array, num_indices: int) -> Array:
    """:func:`offsets_to_segment_ids` without argument checks (for callers that checked them)."""
    # Mark each bag start, then a running count gives the bag of every position. Out-of-range
    # offsets are sent to position N, which is never read (an in-range index: see
    # `segment_reduce` for why no index is left for the scatter to drop). (The last offset,
    # with include_last_offset, starts the ignored segment B either way.)
    offsets = unsplit(offsets)
    starts = jnp.where((offsets >= 0) & (offsets <= num_indices), offsets, num_indices)
    marks = jnp.zeros(num_indices + 1, jnp.int32).at[starts].add(1)
    return jnp.cumsum(marks[:num_indices], dtype=jnp.int32) - 1


def lengths_to_segment_ids(lengths: ArrayLike, num_indices: int) -> Array:
    """Converts bag lengths into one segment id per id.

    Args:
      lengths: ``int [B]`` number of ids in each bag (0 for an empty bag), at least 0, summing to
        at most ``N``.
      num_indices: ``N``, the length of the flat id list (static); may exceed ``sum(lengths)``.

    Returns:
      ``int32 [N]`` non-decreasing segment ids; positions past ``sum(lengths)`` get ``B`` (padding,
      ignored by :func:`jaxbag.embedding_bag` with ``num_bags=B``).

    Raises:
      TypeError / ValueError: non-integer or non-1-D ``lengths``, a negative ``num_indices``;
        eagerly also a negative length or lengths summing past ``N``, naming the position (a
        host int64 / uint64 length past int32 by its real value). Under ``jit`` (not checked)
        a negative length counts as 0 and the bags are cut at ``N``.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> jaxbag.lengths_to_segment_ids(jnp.array([2, 0, 1]), 5).tolist()
      [0, 0, 2, 3, 3]
    """
    raw, lengths = lengths, _checked_1d("lengths", lengths)
    n = _checked_num_indices(num_indices)
    _check_not_clipped("lengths", raw, lengths, n)
    if validation.is_concrete(lengths) and lengths.shape[0] > 0:
        with jax.ensure_compile_time_eval():
            a = np.asarray(lengths).astype(np.int64)
            bad = np.flatnonzero(a < 0)
            if bad.size:
                raise ValueError(
                    f"lengths[{bad[0]}] = {a[bad[0]]} is negative: lengths must be >= 0 "
                    "(0 for an empty bag)."
                )
            big = np.flatnonzero(a > n)  # (first: the running sum of int64 lengths could wrap)
            if big.size:
                raise ValueError(
                    f"lengths[{big[0]}] = {a[big[0]]} > num_indices = {n}: lengths must sum to at "
                    "most num_indices; pass num_indices >= sum(lengths)."
                )
            ends = np.cumsum(a)
            if ends[-1] > n:
                j = int(np.argmax(ends > n))
                raise ValueError(
                    f"lengths sum to {ends[-1]} > num_indices = {n} (the bags up to lengths[{j}] "
                    f"already need {ends[j]} ids): pass num_indices >= sum(lengths)."
                )
    return lengths_to_segment_ids_unchecked(lengths, n)


def lengths_to_segment_ids_unchecked(lengths: Array, num_indices: int) -> Array:
    """:func:`lengths_to_segment_ids` without argument checks: a negative length counts as 0 and
    the bags are cut at ``N`` (each length clipped to ``[0, N]``, then summed saturating at
    ``N``, so neither an int64 length nor the running sum wraps int32)."""
    ends = capped_ends(unsplit(lengths), num_indices)  # in [0, N]
    # Position p lies in bag #{ends <= p} (bags start at 0 and at each end). Counting the ends
    # alone, with no leading 0 concatenated in front of them: XLA's SPMD partitioner miscounts
    # a scatter-add at concatenate([replicated 0], ends split over one axis of a 2-D mesh).
    marks = jnp.zeros(num_indices + 1, jnp.int32).at[ends].add(1, mode="drop")
    return jnp.cumsum(marks[:num_indices], dtype=jnp.int32)


def spare_bag_ids(seg: Array, num_bags: int) -> Array:
    """``int32 [N]`` ids for a reduction into ``B + 2`` segments: ``seg < 0`` -> 0, ``seg`` in
    ``[0, B)`` -> ``seg + 1``, ``seg >= B`` -> ``B + 1``. Non-decreasing ``seg`` stay so."""
    return segment_ids_int32(seg, num_bags) + 1


def segment_reduce(op: Callable[..., Array], data: Array, seg: Array, num_bags: int) -> Array:
    """``op(data, seg, num_segments=B)`` for ``op`` one of ``jax.ops.segment_sum`` /
    ``segment_max`` / ``segment_min`` and sorted ``seg [N]``, positions outside ``[0, B)``
    dropped: ``[B, ...]``.

    They are reduced into two spare segments, which are sliced off, instead of being given to
    the scatter as out-of-range indices: XLA's deterministic GPU scatter rewrite
    (``--xla_gpu_deterministic_ops``) flattens the indices of a vmapped scatter before it drops
    out-of-range ones, so row ``r``'s segment ``B`` landed on row ``r + 1``'s bag 0."""
    out = op(data, spare_bag_ids(seg, num_bags), num_segments=num_bags + 2,
             indices_are_sorted=True)
    return out[1 : num_bags + 1]


DROPPED_ROW = int(np.iinfo(np.int32).max)


def dropped_rows(rows: Array, num_rows: int) -> Array:
    """``rows`` with every entry outside ``[0, V)`` (``V = num_rows``) set to ``2**31 - 1``, an
    index the table scatters drop (``mode="drop"``).

    Not ``V``: XLA's deterministic GPU scatter rewrite flattens a vmapped scatter's (table, row)
    indices to ``t * V + row`` before it drops out-of-range ones, so ``V`` would land on row 0
    of the next table. ``t * V + 2**31 - 1`` is past every table (``T * V < 2**31``), or wraps
    negative in int32."""
    return jnp.where((rows >= 0) & (rows < num_rows), rows, DROPPED_ROW)


def capped_ends(lengths: Array, cap: ArrayLike, axis: int = -1) -> Array:
    """``int32`` running sums of ``lengths`` along ``axis``, each length clipped to
    ``[0, cap]`` in its own dtype, widened to 32 bits (an int64 ``2**32`` must not wrap to 0, nor
    a capacity of 256 to a uint8 0) and the sum saturating
    at ``cap`` (a plain int32 cumsum of huge lengths wraps). ``cap``: an int or an int array
    broadcasting against ``lengths``."""
    cap = jnp.asarray(cap, jnp.int32)
    if jnp.iinfo(lengths.dtype).bits < 32:  # cap.astype(uint8) would wrap 256 to 0
        lengths = lengths.astype(jnp.int32)
    lengths = jnp.clip(lengths, 0, cap.astype(lengths.dtype)).astype(jnp.int32)
    return jax.lax.associative_scan(lambda x, y: jnp.minimum(x, cap - y) + y, lengths, axis=axis)


def segment_ids_int32(segment_ids: Array, num_bags: int) -> Array:
    """``int32`` segment ids, clipped to ``[-1, B]`` in their own dtype first, so padding stays
    padding (an int64 ``2**32`` would wrap to bag 0) and sorted ids stay sorted (the segment
    reductions are told they are). Any integer dtype, unsigned ones too."""
    # (compared, not clipped, in their dtype: an unsigned dtype has no -1 to clip to)
    out = jnp.where(segment_ids >= num_bags, jnp.int32(num_bags), segment_ids.astype(jnp.int32))
    return jnp.where(segment_ids < 0, jnp.int32(-1), out)


def _checked_1d(name: str, x: ArrayLike) -> Array:
    x = validation.as_ids(x)
    validation.require_int(name, x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D [B]; got shape {x.shape}. Flatten it: {name}.reshape(-1).")
    return x


_RULES = {
    "offsets": "offsets must start at 0, be non-decreasing and at most num_indices.",
    "lengths": "lengths must be >= 0 and sum to at most num_indices.",
}


def _check_not_clipped(name: str, raw: ArrayLike, x: Array, n: int) -> None:
    """Raises, naming the real value, where :func:`validation.as_ids` clipped an int64 or unsigned
    entry of ``raw`` to ``x``'s range (int32 without x64): such an offset or length is past any
    ``N``, and the later checks would show the clipped ``2147483647`` instead. Concrete host
    values only (a traced or signed JAX ``raw`` is never clipped)."""
    if isinstance(raw, Tracer) or (isinstance(raw, jax.Array) and raw.dtype.kind == "i"):
        return
    try:
        a = np.asarray(raw)
    except jax.errors.TracerArrayConversionError:  # a list holding traced values
        return
    info = np.iinfo(x.dtype)
    if a.dtype.kind not in "iu" or (np.iinfo(a.dtype).min >= info.min and
                                    np.iinfo(a.dtype).max <= info.max):
        return  # (nothing was clipped)
    if a.size and (a.min() < info.min or a.max() > info.max):
        j = int(np.argmax((a < info.min) | (a > info.max)))
        raise ValueError(
            f"{name}[{j}] = {a[j]} is past {x.dtype}'s range, so outside [0, num_indices = {n}]: "
            + _RULES[name]
        )


def _checked_num_indices(num_indices: int) -> int:
    try:  # anything with __index__ (a NumPy 0-d int array too); a tracer is not static
        n = -1 if isinstance(num_indices, (bool, np.bool_)) else operator.index(num_indices)
    except TypeError:
        n = -1
    if n < 0:
        raise ValueError(
            f"num_indices must be a static int >= 0 (N, the number of ids); got {num_indices!r}."
        )
    return n


def row_segment_ids(num_rows: int, length: int) -> Array:
    """``int32 [num_rows * length]``: the bag of each position of flattened ``[num_rows, length]``
    ids, each row a bag (``0, 0, .., 1, 1, ..``; ``length`` may be a symbolic dimension)."""
    rows = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
    return jnp.broadcast_to(rows, (num_rows, length)).reshape(-1)


def bag_of_positions(indices: Array, offsets: Array | None, segment_ids: Array | None) -> Array:
    """``int [N]``: the bag of each position of the (flattened) ``indices``, whichever form.

    ``[B, L]`` indices: row ``b``'s positions are bag ``b``; with ``offsets``,
    :func:`offsets_to_segment_ids` (the last offset, with ``include_last_offset``, starts the
    ignored segment ``B`` either way); else ``segment_ids`` itself.
    """
    if indices.ndim == 2:
        return row_segment_ids(*indices.shape)
    if offsets is not None:
        return offsets_to_segment_ids_unchecked(offsets.reshape(-1), indices.size)
    assert segment_ids is not None
    return segment_ids.reshape(-1)
