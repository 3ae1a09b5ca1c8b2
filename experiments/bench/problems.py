"""Benchmark problems: a table and a batch of bags in every layout the implementations need.

Legend: ``V`` table rows, ``D`` features, ``B`` bags, ``N`` ids, ``L`` longest bag.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Problem:
    """One shape, with numpy inputs (converted to jax / torch by the implementations).

    Attributes:
      name: label of the shape in the report.
      weight: ``float32 [V, D]`` table.
      ids: ``int32 [N]`` ids.
      offsets: ``int32 [B]`` bag starts.
      lengths: ``int32 [B]`` bag lengths.
      segment_ids: ``int32 [N]`` sorted bag of each id.
      padded: ``int32 [B, L]`` ids padded with ``-1``.
      cotangent: ``float32 [B, D]`` fixed output cotangent (forward+backward phase).
      targets: ``float32 [B, D]`` regression targets of the train step.
    """

    name: str
    weight: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    segment_ids: np.ndarray
    padded: np.ndarray
    cotangent: np.ndarray
    targets: np.ndarray

    @property
    def num_embeddings(self) -> int:
        return int(self.weight.shape[0])

    @property
    def features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def num_bags(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def num_ids(self) -> int:
        return int(self.ids.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.padded.shape[1])

    def describe(self) -> dict[str, Any]:
        return {
            "shape": self.name,
            "V": self.num_embeddings,
            "D": self.features,
            "B": self.num_bags,
            "N": self.num_ids,
            "L_max": self.max_len,
        }


def _lengths(rng: np.random.Generator, num_bags: int, num_ids: int, kind: str) -> np.ndarray:
    """``B`` positive lengths summing to ``N``: all equal (``fixed``) or uniform in ``[1, 2N/B)``."""
    if num_ids < num_bags:
        raise ValueError(f"need N >= B for non-empty bags; got N={num_ids}, B={num_bags}")
    if kind == "fixed":
        base = np.full(num_bags, num_ids // num_bags, np.int64)
        base[: num_ids - base.sum()] += 1
        return base.astype(np.int32)
    if kind != "uniform":
        raise ValueError(f"lengths must be 'fixed' or 'uniform'; got {kind!r}")
    mean = num_ids / num_bags
    raw = rng.uniform(0.0, 2.0 * mean, num_bags) + 1e-9
    lengths = np.maximum(1, np.floor(raw * (num_ids / raw.sum()))).astype(np.int64)
    # Fix the rounding so that the lengths sum to exactly N.
    diff = num_ids - int(lengths.sum())
    order = rng.permutation(num_bags)
    i = 0
    while diff != 0:
        j = order[i % num_bags]
        if diff > 0:
            lengths[j] += 1
            diff -= 1
        elif lengths[j] > 1:
            lengths[j] -= 1
            diff += 1
        i += 1
    return lengths.astype(np.int32)


def _ids(rng: np.random.Generator, num_embeddings: int, num_ids: int, kind: str, alpha: float) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, num_embeddings, num_ids, dtype=np.int64).astype(np.int32)
    if kind != "zipf":
        raise ValueError(f"ids must be 'uniform' or 'zipf'; got {kind!r}")
    ranks = np.arange(1, num_embeddings + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-alpha)
    cdf /= cdf[-1]
    picks = np.searchsorted(cdf, rng.random(num_ids))
    perm = rng.permutation(num_embeddings)  # hot rows scattered over the table
    return perm[np.minimum(picks, num_embeddings - 1)].astype(np.int32)


def make_problem(
    name: str,
    num_embeddings: int,
    features: int,
    num_bags: int,
    num_ids: int,
    *,
    lengths: str = "uniform",
    ids: str = "uniform",
    zipf_alpha: float = 1.05,
    seed: int = 0,
) -> Problem:
    """Builds a :class:`Problem` (random normal table, random ids, positive bag lengths)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((num_embeddings, features), dtype=np.float32)
    lens = _lengths(rng, num_bags, num_ids, lengths)
    flat = _ids(rng, num_embeddings, num_ids, ids, zipf_alpha)
    offsets = (np.cumsum(lens) - lens).astype(np.int32)
    seg = np.repeat(np.arange(num_bags, dtype=np.int32), lens)
    max_len = int(lens.max())
    padded = np.full((num_bags, max_len), -1, np.int32)
    pos = np.arange(num_ids) - np.repeat(offsets, lens)
    padded[seg, pos] = flat
    cot = rng.standard_normal((num_bags, features), dtype=np.float32)
    targets = rng.standard_normal((num_bags, features), dtype=np.float32)
    return Problem(name, weight, flat, offsets, lens, seg, padded, cot, targets)


def reference_output(p: Problem, mode: str) -> np.ndarray:
    """float64 numpy bag reduction (the correctness check of every implementation)."""
    rows = p.weight[p.ids].astype(np.float64)
    assert (p.lengths > 0).all(), "benchmark problems have no empty bags"
    if mode == "max":
        return np.maximum.reduceat(rows, p.offsets, axis=0)
    out = np.add.reduceat(rows, p.offsets, axis=0)
    if mode == "mean":
        out /= p.lengths[:, None]
    return out
