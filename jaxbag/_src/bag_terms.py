"""What every bag reduction shares: which positions count, their weights, the denominators.

Legend: ``V`` rows in the table, ``N`` ids, ``B`` bags.

Used by the gather + segment formulation (:func:`jaxbag._src.ops.reduce_bags`), the streaming
forward and its tangent rule (``fast_forward``) and the row-sharded op (``sharding``), so the
three agree on empty bags, padding and out-of-range ids by construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from jaxbag._src import segments

__all__ = ["bag_denominators", "masked_weights", "max_hits", "valid_positions"]


def valid_positions(
    ids: Array, seg: Array, num_embeddings: int, num_bags: int, padding_idx: int | None
) -> Array:
    """``bool [N]``: the positions that take part in a bag.

    A position counts when its id is in ``[0, V)`` and is not ``padding_idx``, and its
    segment id is in ``[0, B)``; every other position contributes nothing (not even to a
    mean's count).
    """
    valid = (ids >= 0) & (ids < num_embeddings) & (seg >= 0) & (seg < num_bags)
    if padding_idx is not None:
        valid = valid & (ids != padding_idx)
    return valid


def masked_weights(valid: Array, weights: Array | None, dtype: jnp.dtype) -> Array:
    """``[N]`` weights in ``dtype``: ``weights`` (1 without them) where ``valid``, else 0."""
    if weights is None:
        return valid.astype(dtype)
    return jnp.where(valid, weights.astype(dtype), jnp.zeros((), dtype))


def bag_denominators(w: Array, seg: Array, num_bags: int, mode: str) -> Array | None:
    """``[B]`` what a bag's weighted sum is divided by, or None (``"sum"``, ``"max"``).

    ``"mean"``: the sum of the bag's weights ``w [N]`` (its id count when unweighted);
    ``"sqrtn"``: the L2 norm of its weights. An empty bag gets 0 (its output is 0).
    """
    if mode == "mean":
        return segments.segment_reduce(jax.ops.segment_sum, w, seg, num_bags)
    if mode == "sqrtn":
        sq = segments.segment_reduce(jax.ops.segment_sum, w * w, seg, num_bags)
        # sqrt's derivative is infinite at 0: a bag whose weights' squares sum to 0 (all zero,
        # or underflowing) would get NaN weight gradients instead of the zero-divisor rule's 0
        some = sq > 0
        return jnp.where(some, jnp.sqrt(jnp.where(some, sq, jnp.ones((), sq.dtype))), sq)
    return None


def max_hits(vals: Array, best: Array) -> Array:
    """``bool``: where ``vals`` equals its bag's max ``best`` (both ``[N, D]``, ``best`` gathered
    per position). A NaN propagates through the max (as ``jnp.max``), so a NaN value hits a NaN
    max: the first NaN is then the arg-max, on every path."""
    return (vals == best) | (jnp.isnan(vals) & jnp.isnan(best))
