"""Epoch order from (seed, epoch) and static-shape batches built with ``jaxbag.pack_bags``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

import jaxbag


class Batch(NamedTuple):
    """A padded batch (a pytree of NumPy arrays).

    Attributes:
        bags: the packed ids (``indices``/``segment_ids`` ``[N_pad]``, ``bag_mask`` ``[B]``).
        labels: int32 ``[B]``; padding bags have label 0 and are masked out.
    """

    bags: jaxbag.PackedBags
    labels: np.ndarray


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of ``epoch``: a permutation that depends only on (seed, epoch).

    That makes a resumed run see exactly the batches an uninterrupted one would.
    """
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def num_batches(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def iterate_batches(
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    order: np.ndarray,
    *,
    batch_size: int,
    min_size: int,
    growth: float,
    weights: Sequence[np.ndarray] | None = None,
) -> Iterator[Batch]:
    """Batches of ``batch_size`` documents in ``order``; the last one is padded with
    empty, masked bags, and every id array is padded to a geometric bucket size.
    ``weights`` (one array per document, or None) are packed alongside the ids."""
    labels = np.asarray(labels, np.int32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        packed = jaxbag.pack_bags(
            [bags[i] for i in idx], batch_size=batch_size, min_size=min_size, growth=growth,
            weights=None if weights is None else [weights[i] for i in idx],
        )
        y = np.zeros(batch_size, np.int32)
        y[: len(idx)] = labels[idx]
        yield Batch(packed, y)
