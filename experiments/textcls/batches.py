"""Epoch order from (seed, epoch) and static-shape batches built with ``jaxbag.pack_bags``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

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


def plan_buckets(
    bags: Sequence[np.ndarray],
    orders: Sequence[np.ndarray],
    *,
    batch_size: int,
    min_size: int,
    growth: float,
    max_buckets: int,
) -> tuple[int, ...] | None:
    """The padded id counts of every batch the ``orders`` make (one order per epoch).

    None (the geometric ladder from ``min_size`` by ``growth``) when those batches reach at
    most ``max_buckets`` of its rungs; else the ``max_buckets`` sizes that pad them least
    (``jaxbag.fit_buckets``). Either way a step jitted over the batches compiles at most
    ``max_buckets`` times, and a resumed run gets the same sizes (the orders are seeded).
    """
    lengths = np.array([len(b) for b in bags], np.int64)
    sizes = [int(lengths[order[s : s + batch_size]].sum())
             for order in orders for s in range(0, len(order), batch_size)]
    rungs = {jaxbag.bucket_size(n, min_size=min_size, growth=growth) for n in sizes}
    if len(rungs) <= max_buckets:
        return None
    return jaxbag.fit_buckets(sizes, max_buckets)


def plan_epochs(
    bags: Sequence[np.ndarray], train_config: Any, *, seed: int, epochs: Sequence[int]
) -> tuple[list[np.ndarray], tuple[int, ...] | None]:
    """The example order of each of ``epochs`` (:func:`epoch_order`) and the padded id counts of
    their batches (:func:`plan_buckets` with ``config.train``'s batch size, ladder and
    ``max_buckets``): how ``experiments.train`` batches a run (epochs ``1..num_epochs``), and so
    the JAX loop of ``experiments.bench_train_torch``.

    Returns:
        ``(orders, bucket_sizes)``: one order per epoch, in ``epochs``' order; the sizes to pass
        to :func:`iterate_batches` (None: the geometric ladder).
    """
    tc = train_config
    orders = [epoch_order(len(bags), seed=seed, epoch=e) for e in epochs]
    sizes = plan_buckets(bags, orders, batch_size=tc.batch_size, min_size=tc.bucket_min_size,
                         growth=tc.bucket_growth, max_buckets=tc.max_buckets)
    return orders, sizes


def iterate_batches(
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    order: np.ndarray,
    *,
    batch_size: int,
    min_size: int,
    growth: float,
    weights: Sequence[np.ndarray] | None = None,
    bucket_sizes: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Batches of ``batch_size`` documents in ``order``; the last one is padded with
    empty, masked bags, and every id array is padded to a bucket size: one of
    ``bucket_sizes`` (see :func:`plan_buckets`), or of the geometric ladder from
    ``min_size`` by ``growth`` when it is None. ``weights`` (one array per document, or
    None) are packed alongside the ids."""
    labels = np.asarray(labels, np.int32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        packed = jaxbag.pack_bags(
            [bags[i] for i in idx], batch_size=batch_size, bucket_sizes=bucket_sizes,
            min_size=min_size, growth=growth,
            weights=None if weights is None else [weights[i] for i in idx],
        )
        y = np.zeros(batch_size, np.int32)
        y[: len(idx)] = labels[idx]
        yield Batch(packed, y)
