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

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

__all__ = ["lengths_to_segment_ids", "offsets_to_segment_ids"]


def offsets_to_segment_ids(
    offsets: ArrayLike, num_indices: int, *, include_last_offset: bool = False
) -> Array:
    """Converts bag start offsets into one segment id per id.

    Args:
      offsets: ``int [B]`` start of each bag in the flat id list (``int [B+1]`` with
        ``include_last_offset``, the last entry being the end of the last bag). Must start at 0 and
        be non-decreasing; equal consecutive offsets make empty bags.
      num_indices: ``N``, the length of the flat id list (static).
      include_last_offset: whether ``offsets`` has a trailing end offset (torch's flag).

    Returns:
      ``int32 [N]`` non-decreasing segment ids. Positions at or past the last offset get ``B`` when
      ``include_last_offset`` is set (so they are ignored); offsets outside ``[0, N]`` mark nothing.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> jaxbag.offsets_to_segment_ids(jnp.array([0, 2, 2]), 5).tolist()
      [0, 0, 2, 2, 2]
      >>> jaxbag.offsets_to_segment_ids(jnp.array([0, 2, 4]), 5, include_last_offset=True).tolist()
      [0, 0, 1, 1, 2]
    """
    del include_last_offset  # the last offset marks the start of the "ignored" segment B either way
    offsets = jnp.asarray(offsets)
    # Mark each bag start, then a running count gives the bag of every position. Out-of-range
    # offsets are sent to position N + 1, which the scatter drops.
    starts = jnp.where((offsets >= 0) & (offsets <= num_indices), offsets, num_indices + 1)
    marks = jnp.zeros(num_indices + 1, jnp.int32).at[starts].add(1, mode="drop")
    return jnp.cumsum(marks[:num_indices], dtype=jnp.int32) - 1


def lengths_to_segment_ids(lengths: ArrayLike, num_indices: int) -> Array:
    """Converts bag lengths into one segment id per id.

    Args:
      lengths: ``int [B]`` number of ids in each bag (0 for an empty bag).
      num_indices: ``N``, the length of the flat id list (static); may exceed ``sum(lengths)``.

    Returns:
      ``int32 [N]`` non-decreasing segment ids; positions past ``sum(lengths)`` get ``B`` (padding,
      ignored by :func:`jaxbag.embedding_bag` with ``num_bags=B``).

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> jaxbag.lengths_to_segment_ids(jnp.array([2, 0, 1]), 5).tolist()
      [0, 0, 2, 3, 3]
    """
    lengths = jnp.asarray(lengths)
    ends = jnp.cumsum(lengths, dtype=jnp.int32)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    return offsets_to_segment_ids(offsets, num_indices, include_last_offset=True)


def bag_of_positions(indices: Array, offsets: Array | None, segment_ids: Array | None) -> Array:
    """``int [N]``: the bag of each position of the (flattened) ``indices``, whichever form.

    ``[B, L]`` indices: row ``b``'s positions are bag ``b``; with ``offsets``,
    :func:`offsets_to_segment_ids` (the last offset, with ``include_last_offset``, starts the
    ignored segment ``B`` either way); else ``segment_ids`` itself.
    """
    n = indices.size
    if indices.ndim == 2:
        b, length = indices.shape
        return jnp.repeat(jnp.arange(b, dtype=jnp.int32), length, total_repeat_length=n)
    if offsets is not None:
        return offsets_to_segment_ids(offsets.reshape(-1), n)
    assert segment_ids is not None
    return segment_ids.reshape(-1)
