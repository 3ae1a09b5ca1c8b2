"""Ragged batching: pack variable-length id sequences into static-shape batches.

Dimensions used below:

* ``B``: bags per batch (the fixed batch size, padding bags included).
* ``N``: real ids in the batch (sum of the bag lengths), varies per batch.
* ``N_pad``: the padded id capacity, chosen from a small ladder of bucket sizes.

A jitted function compiles once per distinct input shape. Feeding it batches whose
flat id array has a different length every time recompiles on every step. The
helpers here fix the batch size ``B`` and round ``N`` up to a bucket ``N_pad``
taken from a short geometric ladder (``128, 256, 512, ...`` by default), so a
whole training run sees only a handful of shapes. Padding positions carry the
segment id ``B`` (one past the last bag), which :func:`jaxbag.embedding_bag`
drops, and padding bags are empty (they pool to zeros) and are flagged ``False``
in ``bag_mask`` so callers can mask them out of losses and metrics.

Packing runs on the host with NumPy (it is data preparation, done before the
arrays are handed to a jitted step), so nothing here is traced.
"""

from __future__ import annotations

import fractions
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from jaxbag._src import validation

__all__ = [
    "PackedBags",
    "bucket_size",
    "fit_buckets",
    "geometric_buckets",
    "pack_bags",
]

DEFAULT_MIN_SIZE = 128
DEFAULT_GROWTH = 2.0
_INT32_MAX = np.iinfo(np.int32).max
_F32_MAX = float(np.finfo(np.float32).max)


class PackedBags(NamedTuple):
    """A batch of ``B`` bags flattened into static-shape arrays (a JAX pytree).

    Jagged layout (TorchRec style), for ``B = 4`` bag slots holding three real bags
    ``[5, 2, 7]``, ``[]``, ``[3, 3]`` and one padding bag, with ``N = 5`` real ids
    rounded up to the bucket ``N_pad = 8``::

        bag slot        0          1     2         3 (padding)
                     ┌─────────┬────┬──────┬─────┐
        lengths      │    3    │ 0  │  2   │  0  │            [B]
                     └─────────┴────┴──────┴─────┘
        offsets       0         3    3      5     5           [B + 1]
                     ┌──┬──┬──┬──┬──┬──┬──┬──┐
        indices      │5 │2 │7 │3 │3 │0 │0 │0 │                [N_pad]
        segment_ids  │0 │0 │0 │2 │2 │4 │4 │4 │                [N_pad]
                     └──┴──┴──┴──┴──┴──┴──┴──┘
                      real ids (N=5)  padding: segment id B=4, dropped
        bag_mask      T  T  T  F                              [B]

    Attributes:
        indices: int32 ``[N_pad]``. The ids of all bags, concatenated in bag order,
            then padding (id ``0``; it never contributes because its segment id is
            out of range).
        segment_ids: int32 ``[N_pad]``, sorted. The bag of each position; padding
            positions hold ``B`` so they are dropped by
            ``jaxbag.embedding_bag(..., segment_ids=..., num_bags=B)``.
        offsets: int32 ``[B + 1]``. Start of each bag in ``indices`` plus a final
            entry equal to ``N`` (CSR row pointers, ``include_last_offset`` style).
        lengths: int32 ``[B]``. Number of ids in each bag (0 for empty and padding bags).
        bag_mask: bool ``[B]``. ``True`` for the bags that came from the input,
            ``False`` for the padding bags that fill the last, partial batch.
        weights: float32 ``[N_pad]`` per-id weights (0 at padding) when
            :func:`pack_bags` was given ``weights``, else ``None``; pass them as
            ``per_sample_weights``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbag
        >>> batch = jaxbag.pack_bags([[5, 2, 7], [], [3, 3]], batch_size=4)
        >>> batch.indices.shape, batch.num_bags
        ((128,), 4)
        >>> weight = jnp.ones((10, 2), jnp.float32)
        >>> pooled = jaxbag.embedding_bag(
        ...     weight, batch.indices, segment_ids=batch.segment_ids,
        ...     num_bags=batch.num_bags, mode="sum")
        >>> pooled[:, 0].tolist()
        [3.0, 0.0, 2.0, 0.0]
    """

    indices: npt.NDArray[np.int32]
    segment_ids: npt.NDArray[np.int32]
    offsets: npt.NDArray[np.int32]
    lengths: npt.NDArray[np.int32]
    bag_mask: npt.NDArray[np.bool_]
    weights: npt.NDArray[np.float32] | None = None

    @property
    def num_bags(self) -> int:
        """``B``, the number of bag slots (static: read from a shape, safe under jit)."""
        return int(self.bag_mask.shape[0])

    @property
    def capacity(self) -> int:
        """``N_pad``, the padded number of id positions (static)."""
        return int(self.indices.shape[0])


def _plain(x: object) -> object:
    """A NumPy scalar as the Python value it holds (``2.5``, not ``np.float64(2.5)``), for errors."""
    return x.item() if isinstance(x, np.generic) else x


def first_non_number(a: np.ndarray) -> tuple[str, object] | None:
    """``(position, value)`` of the first element of ``a`` that is not a Python bool, int or
    float as ``tolist()`` reads it (``("[1][0]", 'a')``: a str, None, a complex), or ``None``;
    for errors about arrays of a non-number dtype (str, object)."""
    for j, x in enumerate(a.reshape(-1).tolist()):
        if not isinstance(x, bool | int | float):
            return "".join(f"[{i}]" for i in np.unravel_index(j, a.shape)), _plain(a.reshape(-1)[j])
    return None


def host_rows(x: Any) -> Any:
    """A JAX array of bags (or of their weights) as a NumPy one, its rows then read on the host
    one bag each; anything else as it is. Shared by :func:`pack_bags` and the builders."""
    return np.asarray(x) if isinstance(x, jax.Array) else x


def bag_rows(x: Any, where: str, example: str, what: str = "id") -> Any:
    """:func:`host_rows` of ``x``, which must be a sequence of bags (a 2-D array: one per row);
    else a ``TypeError`` naming ``where`` and showing ``example``."""
    rows = host_rows(x)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (Sequence, np.ndarray)):
        raise TypeError(
            f"{where} must be a sequence of 1-D {what} sequences, got {type(rows).__name__}; "
            f"e.g. {example}."
        )
    return rows


def bag_ids(bag: object, where: str) -> np.ndarray:
    """One bag's ids as a 1-D NumPy array of an integer dtype, their own (never cast here, so a
    uint64 or int64 id is not wrapped; :func:`checked_ids` checks the range).

    Shared by :func:`pack_bags` and the ``JaggedFeatures`` builders.

    Args:
      bag: a list, tuple, NumPy or JAX array of ids (``[]`` is an empty bag).
      where: the bag as the caller passed it, for errors: ``"bags[3]"``, ``"features['a'][3]"``.

    Returns:
      ``int [n]`` (``int64 [0]`` for an empty bag).

    Raises:
      ValueError: a single id instead of a bag, or nested / ragged data.
      TypeError: ids that are not integers (float, bool, str), naming the first non-integer one.
    """
    try:
        a = np.asarray(bag)
    except ValueError:  # ragged nesting
        a = None
    if a is not None and a.ndim == 1 and a.dtype.kind in "iu":
        return a
    if a is not None and a.ndim == 0 and a.dtype.kind in "iu":
        raise ValueError(
            f"{where} = {a.item()!r} is a single id, not a bag: each bag is a list of ids, e.g. "
            "[[1], [2]] for two bags of one id each."
        )
    if a is None or a.ndim != 1:
        shape = "ragged" if a is None else f"shape {a.shape}"
        raise ValueError(
            f"{where} must be a flat list of ids; got {bag!r:.80} ({shape}). A bag is 1-D, e.g. "
            "[4, 1, 7]."
        )
    if a.size == 0:
        return np.zeros(0, np.int64)  # NumPy reads [] as float64
    values = a.tolist()
    if isinstance(bag, (list, tuple)) and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in bag):
        # NumPy integer scalars mixed with Python ints: NumPy reads [np.uint64(5), 7] as float64
        values = [int(x) for x in bag]
    if all(type(x) is int for x in values):  # (dtype object: Python ints, some past 64 bits)
        j = next((i for i, x in enumerate(values) if not 0 <= x <= _INT32_MAX), None)
        if j is None:  # (an object array of small ints)
            return np.asarray(values, np.int64)
        raise _id_range_error(f"{where}[{j}]", values[j])
    j = next((i for i, x in enumerate(values) if type(x) is not int), 0)
    hint = "ids are integers, e.g. [4, 1, 7]"
    if a.dtype.kind == "f":
        frac = ~np.isfinite(a) | (a != np.round(a))
        j = int(np.argmax(frac))  # 0 when every value is whole
        hint = (
            f"{_plain(a[j])!r} is not a whole number: map such values to integer ids first (a cast "
            "would truncate them silently)" if frac.any() else
            "they are whole numbers, so np.asarray(ids).astype(np.int64) converts them"
        )
    raise TypeError(
        f"{where} must hold integer ids; got dtype {a.dtype} ({where}[{j}] = {_plain(a[j])!r}): "
        f"{hint}."
    )


def checked_ids(arrays: Sequence[np.ndarray], where: Callable[[int], str]) -> np.ndarray:
    """The bags of :func:`bag_ids` concatenated into ``int32``, every id checked to lie in
    ``[0, int32 max]`` (as :func:`pack_bags` and the ``JaggedFeatures`` builders require).

    Args:
      arrays: ``B`` 1-D integer arrays, any integer dtypes.
      where: bag number -> the bag as the caller passed it (``lambda i: f"bags[{i}]"``).

    Returns:
      ``int32 [sum of the bags' sizes]``.

    Raises:
      ValueError: naming the first id out of range as ``where(bag)[position] = value``, the value
        as given (read from the bag itself, never a wrapped or clipped copy).
    """
    if not arrays:
        return np.zeros(0, np.int32)
    # (int64 and uint64 bags concatenate to float64: exact to 2**53, and larger is out of range
    # anyway; the error reads the value from the bag itself)
    flat = np.concatenate(arrays)
    if flat.size and (flat.min() < 0 or flat.max() > _INT32_MAX):
        j = int(np.argmax((flat < 0) | (flat > _INT32_MAX)))
        ends = np.cumsum([a.size for a in arrays])
        bag = int(np.searchsorted(ends, j, side="right"))
        pos = j - (int(ends[bag - 1]) if bag else 0)
        raise _id_range_error(f"{where(bag)}[{pos}]", arrays[bag][pos])
    return flat.astype(np.int32)


def _id_range_error(position: str, value: int) -> ValueError:
    return ValueError(
        f"{position} = {value}{' does not fit in int32' if value > 0 else ''}: ids must lie in "
        f"[0, {_INT32_MAX}] (non-negative int32); map or hash your ids into the embedding table's "
        "range first."
    )


def host_weights(
    w: object, where: str, length: int | None = None, of: str = ""
) -> np.ndarray:
    """Per-id weights as ``float32``, shared by :func:`pack_bags` and the ``JaggedFeatures``
    builders: numbers only (bool, int, float, and the narrow floats of ``ml_dtypes`` that JAX
    uses: bfloat16, float8_*), and no finite value that float32 cannot hold (it would become
    ``inf`` silently).

    Args:
      w: a list, tuple, NumPy or JAX array of weights.
      where: ``w`` as the caller passed it, for errors: ``"weights[3]"``.
      length: if given, ``w`` must be 1-D of this length, that of the ids ``of`` names.
      of: the ids ``w`` goes with, for errors: ``"bags[3]"``.

    Returns:
      ``float32`` weights of ``w``'s shape.

    Raises:
      ValueError: ragged data, a shape other than ``[length]``, or a value float32 overflows.
      TypeError: weights that are not numbers (str, object).
    """
    try:
        src = np.asarray(w)
    except ValueError:  # ragged nesting
        src = None
    if src is None or (length is not None and (src.ndim != 1 or src.shape[0] != length)):
        shape = "ragged data" if src is None else f"shape {src.shape}"
        must = "a flat list of weights" if length is None else f"1-D with the length of {of} ({length})"
        raise ValueError(f"{where} must be {must}; got {shape}.")
    if src.size == 0:
        return np.zeros(src.shape, np.float32)
    # (bfloat16 and float8_* are NumPy dtypes of kind 'V': floats all the same, within float32)
    if src.dtype.kind not in "biuf" and not jnp.issubdtype(src.dtype, jnp.floating):
        at, value = first_non_number(src) or ("[0]" * src.ndim, _plain(src.reshape(-1)[0]))
        raise TypeError(
            f"{where} must hold numbers (per-id weights); got {where}{at} = {value!r} (dtype "
            f"{src.dtype}). For example weights=[[0.5, 1.0], [2.0]]."
        )
    if src.dtype.itemsize <= 4 or src.dtype.kind != "f" or (np.abs(src) <= _F32_MAX).all():
        return src.astype(np.float32)  # (no int64 is past float32's range)
    with np.errstate(over="ignore"):
        out = src.astype(np.float32)
    over = np.flatnonzero(np.isinf(out) & np.isfinite(src))
    if over.size:
        j = int(over[0])
        at = "".join(f"[{i}]" for i in np.unravel_index(j, src.shape))
        raise ValueError(
            f"{where}{at} = {float(src.reshape(-1)[j])!r} overflows float32 (the packed weights' "
            f"dtype, max {_F32_MAX:.4g}); rescale the weights."
        )
    return out


def _check_ladder_args(min_size: int, growth: float) -> None:
    if not validation.is_static_int(min_size, 1):
        raise ValueError(
            f"min_size must be a positive int, got {min_size!r}; "
            "e.g. jaxbag.bucket_size(n, min_size=128)." + validation.static_int_hint(min_size)
        )
    if not isinstance(growth, (int, float, np.integer, np.floating)) or not 1.0 < growth < math.inf:
        raise ValueError(
            f"growth must be a finite number > 1, got {growth!r}; "
            "e.g. jaxbag.bucket_size(n, growth=2.0) for powers of two."
        )


def _next_rung(size: int, growth: float) -> int:
    """``ceil(size * growth)`` (at least ``size + 1``), where a product within 4 units in the
    last place of a whole number is that number (its rounding noise): ``100 * 1.1`` is
    ``110.00000000000001`` in floating point, and its rung is 110, not 111. (A relative 1e-12
    took real fractions for noise past 1e11: ``100000000007 * 1.3`` gave 130000000009.)"""
    x = size * growth
    if not math.isfinite(x):  # growth=1e308: past float's range, so in exact arithmetic
        return math.ceil(fractions.Fraction(growth) * size)
    whole = round(x)
    return max(size + 1, whole if abs(x - whole) <= 4 * math.ulp(x) else math.ceil(x))


def geometric_buckets(
    max_size: int, *, min_size: int = DEFAULT_MIN_SIZE, growth: float = DEFAULT_GROWTH
) -> tuple[int, ...]:
    """The geometric ladder of bucket sizes ``min_size, ceil(min_size*growth), ...``.

    The ladder stops at the first rung ``>= max_size``; with the defaults it is the
    powers of two from 128.

    Args:
        max_size: int. The largest number of ids a batch can hold; the last rung is
            the first one at or above it.
        min_size: int >= 1. The first rung (the floor: every batch pads to at least this).
        growth: float > 1. Ratio between consecutive rungs.

    Returns:
        A tuple of increasing Python ints, to pass as ``bucket_sizes=`` to
        :func:`pack_bags` or :func:`bucket_size`.

    Examples:
        >>> import jaxbag
        >>> jaxbag.geometric_buckets(1000, min_size=128)
        (128, 256, 512, 1024)
        >>> jaxbag.geometric_buckets(300, min_size=100, growth=1.5)
        (100, 150, 225, 338)
    """
    _check_ladder_args(min_size, growth)
    if not validation.is_static_int(max_size, 0):
        raise ValueError(
            f"max_size must be a non-negative int, got {max_size!r}; "
            "e.g. jaxbag.geometric_buckets(4096)." + validation.static_int_hint(max_size)
        )
    sizes = [int(min_size)]
    while sizes[-1] < max_size:
        sizes.append(_next_rung(sizes[-1], float(growth)))
    return tuple(sizes)


def fit_buckets(sizes: Sequence[int] | npt.ArrayLike, max_buckets: int) -> tuple[int, ...]:
    """The at most ``max_buckets`` bucket sizes that pad ``sizes`` the least.

    When the batches a run will see are known up front (a dataset in memory, epoch orders
    from a seed), fit the ladder to them: a step jitted over :func:`pack_bags` batches then
    compiles at most ``max_buckets`` times, whatever the spread of the sizes (a geometric
    ladder needs ``log(max / min) / log(growth)`` rungs), and the total padding
    ``sum(bucket_size(n) - n)`` over ``sizes`` is the least that any ladder of that many
    rungs gives. Exact: a dynamic program over the ``U`` distinct sizes, in
    ``O(max_buckets * U log U)`` (the optimal split points are monotone).

    Every rung is one of ``sizes`` and the last is ``max(sizes)`` (a size of 0 counts as 1,
    the smallest bucket). 100k distinct sizes take about 2 s on one CPU core for
    ``max_buckets=3`` and 7 s for ``max_buckets=8`` (the time grows with ``max_buckets``).

    Args:
        sizes: ints in ``[0, 2**31)``, ``[M]``, e.g. the id count ``N`` of every batch of a
            run; repeats count (a size seen often weighs more).
        max_buckets: int >= 1. The most rungs to return (fewer when ``sizes`` has fewer
            distinct values).

    Returns:
        A tuple of increasing Python ints, to pass as ``bucket_sizes=`` to
        :func:`pack_bags` or :func:`bucket_size`.

    Raises:
        ValueError: ``sizes`` is empty, not 1-D, or holds a non-integer value or one outside
            ``[0, 2**31)``, or ``max_buckets`` is not a positive int.

    Examples:
        >>> import jaxbag
        >>> jaxbag.fit_buckets([10, 12, 100, 101, 900], max_buckets=3)
        (12, 101, 900)
        >>> jaxbag.fit_buckets([3000, 40, 5, 5, 600], max_buckets=2)
        (600, 3000)
    """
    if not validation.is_static_int(max_buckets, 1):
        raise ValueError(
            f"max_buckets must be a positive int, got {max_buckets!r}; e.g. "
            "jaxbag.fit_buckets(sizes, max_buckets=8)." + validation.static_int_hint(max_buckets)
        )
    arr = np.asarray(sizes)
    # Python ints past int64 make an object array: ints all the same, checked for range below
    python_ints = arr.dtype == object and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in arr.reshape(-1))
    if arr.ndim != 1 or arr.size == 0 or not (python_ints or (
        np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_)
    )):
        raise ValueError(
            f"sizes must be a non-empty 1-D sequence of ints (one id count per batch), got "
            f"{_short(sizes)} (shape {arr.shape}, dtype {arr.dtype}); e.g. "
            "jaxbag.fit_buckets([len(ids) for ids in batches], max_buckets=8)."
        )
    bad = np.asarray([not 0 <= x <= _INT32_MAX for x in arr]) if python_ints else (
        (arr < 0) | (arr > _INT32_MAX))
    if np.any(bad):
        pos = int(np.argmax(bad))
        raise ValueError(
            f"sizes[{pos}] = {int(arr[pos])} is not an id count in [0, 2**31 - 1] (a batch of "
            "more ids cannot be packed: pack_bags indexes them with int32)."
        )
    # (values <= 2**31 - 1 and fewer than 2**32 sizes: every cost below fits int64)
    values, counts = np.unique(np.maximum(arr.astype(np.int64), 1), return_counts=True)
    u = len(values)
    if max_buckets >= u:  # a rung per distinct size: no padding
        return tuple(int(v) for v in values)
    cum = np.concatenate([[0], np.cumsum(counts)])  # cum[q]: how many sizes are <= values[q-1]
    # best[q]: least padded total of the q smallest distinct sizes; cut[k][q]: where the last of
    # k rungs (values[q - 1]) starts covering. cost(p, q) = values[q-1] * (cum[q] - cum[p]) is
    # Monge (larger rungs cost more per size), so each level's argmin p(q) is monotone in q:
    # divide and conquer.
    best = values * cum[1:]  # one rung: q = 1..u
    best = np.concatenate([[0], best])
    cuts = []
    for _ in range(1, int(max_buckets)):  # (max_buckets < u here)
        prev, new, cut = best, best.copy(), np.zeros(u + 1, np.int64)
        stack = [(1, u, 0, u - 1)]
        while stack:
            lo, hi, plo, phi = stack.pop()
            if lo > hi:
                continue
            mid = (lo + hi) // 2
            p = np.arange(plo, min(mid - 1, phi) + 1)
            cand = prev[p] + values[mid - 1] * (cum[mid] - cum[p])
            k = int(np.argmin(cand))
            new[mid], cut[mid] = cand[k], p[k]
            stack.append((lo, mid - 1, plo, p[k]))
            stack.append((mid + 1, hi, p[k], phi))
        best = new
        cuts.append(cut)
    rungs, q = [], u
    for cut in reversed(cuts):
        rungs.append(int(values[q - 1]))
        q = int(cut[q])
        if q == 0:
            break
    else:
        rungs.append(int(values[q - 1]))
    return tuple(sorted(rungs))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bucket_size(
    n: int,
    *,
    bucket_sizes: Sequence[int] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    growth: float = DEFAULT_GROWTH,
) -> int:
    """The smallest bucket that holds ``n`` ids.

    Args:
        n: int >= 0. The number of real ids in a batch (``N``).
        bucket_sizes: optional explicit, increasing sizes. When given, ``min_size``
            and ``growth`` are ignored and ``n`` above the largest size is an error.
        min_size: int >= 1. First rung of the default geometric ladder.
        growth: finite float > 1. Ratio of the default geometric ladder (unbounded).

    Returns:
        ``N_pad``, a Python int ``>= n``.

    Raises:
        ValueError: ``n`` is negative or larger than every explicit bucket, or the
            ladder arguments are invalid.

    Examples:
        >>> import jaxbag
        >>> jaxbag.bucket_size(5), jaxbag.bucket_size(129), jaxbag.bucket_size(4096)
        (128, 256, 4096)
        >>> jaxbag.bucket_size(700, bucket_sizes=(512, 1024, 2048))
        1024
    """
    if not validation.is_static_int(n, 0):
        raise ValueError(
            f"n must be a non-negative int (the number of ids), got {n!r}; "
            "e.g. jaxbag.bucket_size(1000)." + validation.static_int_hint(n)
        )
    if bucket_sizes is not None:
        sizes = _check_bucket_sizes(bucket_sizes)
        for size in sizes:
            if size >= n:
                return size
        raise ValueError(
            f"n={int(n)} ids do not fit in the largest bucket {sizes[-1]} of "
            f"bucket_sizes={sizes}; add a larger bucket, e.g. "
            f"bucket_sizes=jaxbag.geometric_buckets({int(n)}), or split the batch."
        )
    _check_ladder_args(min_size, growth)
    size = int(min_size)
    while size < n:
        size = _next_rung(size, float(growth))
    return size


def _check_bucket_sizes(bucket_sizes: Sequence[int]) -> tuple[int, ...]:
    try:
        raw = tuple(bucket_sizes)  # once: a generator is used up by the first pass
    except TypeError:
        raw = bucket_sizes
    sizes: tuple[int, ...] = ()
    try:
        sizes = tuple(int(s) for s in raw)
        ok = len(sizes) > 0 and all(
            not isinstance(s, bool) and isinstance(s, (int, np.integer)) for s in raw
        )
    except (TypeError, ValueError):
        ok = False
    if not ok or any(s < 1 for s in sizes) or any(a >= b for a, b in itertools.pairwise(sizes)):
        raise ValueError(
            f"bucket_sizes must be a non-empty, strictly increasing sequence of positive "
            f"ints, got {raw!r}; e.g. bucket_sizes=(256, 512, 1024) or "
            "bucket_sizes=jaxbag.geometric_buckets(1024)."
        )
    return sizes


def pack_bags(
    bags: Sequence[Sequence[int] | npt.ArrayLike],
    *,
    batch_size: int | None = None,
    bucket_sizes: Sequence[int] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    growth: float = DEFAULT_GROWTH,
    weights: Sequence[Sequence[float] | npt.ArrayLike] | npt.ArrayLike | None = None,
) -> PackedBags:
    """Packs variable-length id sequences into one static-shape, padded batch.

    The flat length is rounded up to a bucket (see :func:`bucket_size`) and the
    number of bags is padded up to ``batch_size`` with empty, masked-out bags. With a fixed
    ``batch_size`` a jitted consumer sees at most ``len(bucket ladder)`` distinct shapes;
    without one, ``B`` is each call's ``len(bags)``, so every new bag count is a new shape
    (pass ``batch_size`` for a last, partial batch too). See :class:`PackedBags` for the
    layout.

    Args:
        bags: a sequence of ``b <= B`` bags, each a 1-D sequence or array of
            non-negative integer ids in int32's range (lists, tuples, NumPy or JAX
            arrays; may be empty), or a 2-D array with one bag per row.
        batch_size: ``B``, the fixed number of bag slots; defaults to ``len(bags)``.
            Must be ``>= len(bags)`` and below ``2**31 - 1`` (the padding's segment id ``B``
            is an int32).
        bucket_sizes: optional explicit increasing capacities to choose ``N_pad`` from.
        min_size: first rung of the default geometric ladder (the floor of ``N_pad``).
        growth: ratio of the default geometric ladder.
        weights: optional per-id weights (numbers float32 can hold; bfloat16 and float8
            arrays too, all cast to float32), one 1-D sequence
            per bag with the bag's length, or a 2-D array with one row per bag, as for
            ``bags`` (e.g. word counts of a bag of unique ids, for ``mode="mean"`` or
            ``"sum"`` with ``per_sample_weights``).

    Returns:
        A :class:`PackedBags` of NumPy arrays: indices/segment_ids int32 ``[N_pad]``,
        offsets int32 ``[B + 1]``, lengths int32 ``[B]``, bag_mask bool ``[B]``,
        and weights float32 ``[N_pad]`` (``None`` without ``weights``).

    Raises:
        TypeError: ``bags`` is not a sequence (a list, tuple or array of bags), a bag
            holds non-integer ids or ``weights`` non-numbers.
        ValueError: a bag is not 1-D, an id is negative or does not fit in int32,
            ``batch_size`` is smaller than ``len(bags)``, ``N`` exceeds every explicit
            bucket, or ``weights`` does not match ``bags`` or overflows float32. Each
            names the first offending position, e.g. ``bags[2][1] = -4``.

    Examples:
        >>> import jaxbag
        >>> batch = jaxbag.pack_bags([[5, 2, 7], [], [3, 3]], batch_size=4,
        ...                          bucket_sizes=(8, 16))
        >>> batch.indices.tolist()
        [5, 2, 7, 3, 3, 0, 0, 0]
        >>> batch.segment_ids.tolist()
        [0, 0, 0, 2, 2, 4, 4, 4]
        >>> batch.offsets.tolist(), batch.bag_mask.tolist()
        ([0, 3, 3, 5, 5], [True, True, True, False])

        A bag of unique ids with counts pools like the bag it summarises:

        >>> counted = jaxbag.pack_bags([[2, 5]], weights=[[3.0, 1.0]], bucket_sizes=(4,))
        >>> counted.weights.tolist()
        [3.0, 1.0, 0.0, 0.0]
    """
    bags = bag_rows(bags, "bags", "jaxbag.pack_bags([[1, 2], [3]], batch_size=4)")
    num_real = len(bags)
    if batch_size is None:
        if num_real == 0:
            raise ValueError(
                "bags is empty and batch_size is not given, so the batch would have no bag; pass "
                "batch_size for a batch of empty padding bags, e.g. jaxbag.pack_bags([], batch_size=32)."
            )
        batch_size = num_real
    if not validation.is_static_int(batch_size, 1) or batch_size >= _INT32_MAX:
        raise ValueError(  # (the padding's segment id B must fit in int32)
            f"batch_size must be a positive int below 2**31 - 1, got {batch_size!r}; "
            "e.g. jaxbag.pack_bags(bags, batch_size=32)." + validation.static_int_hint(batch_size)
        )
    if num_real > batch_size:
        raise ValueError(
            f"got {num_real} bags but batch_size={int(batch_size)}; pass at most "
            "batch_size bags per call (split the data into batches first)."
        )

    arrays = [bag_ids(bag, f"bags[{i}]") for i, bag in enumerate(bags)]
    lengths = np.zeros(batch_size, dtype=np.int32)
    lengths[:num_real] = [a.size for a in arrays]
    total = int(lengths.sum(dtype=np.int64))
    flat = checked_ids(arrays, lambda i: f"bags[{i}]")  # the ids' errors first
    n_pad = bucket_size(total, bucket_sizes=bucket_sizes, min_size=min_size, growth=growth)
    if n_pad > _INT32_MAX:
        shown = n_pad if n_pad < 10**12 else f"~1e{len(str(n_pad)) - 1}"
        raise ValueError(
            f"the bucket for N={total} ids is N_pad={shown}, past the int32 positions the "
            f"packed arrays index; choose a smaller bucket, e.g. growth=2.0 or "
            f"bucket_sizes=jaxbag.geometric_buckets({max(total, 1)})."
        )
    packed_weights = None if weights is None else _pack_weights(weights, lengths, num_real, n_pad)

    indices = np.zeros(n_pad, dtype=np.int32)
    indices[:total] = flat
    segment_ids = np.full(n_pad, batch_size, dtype=np.int32)
    segment_ids[:total] = np.repeat(np.arange(batch_size, dtype=np.int32), lengths)
    offsets = np.zeros(batch_size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    bag_mask = np.arange(batch_size) < num_real
    return PackedBags(
        indices=indices,
        segment_ids=segment_ids,
        offsets=offsets,
        lengths=lengths,
        bag_mask=bag_mask,
        weights=packed_weights,
    )


def _pack_weights(
    weights: Sequence[Sequence[float] | npt.ArrayLike] | npt.ArrayLike,
    lengths: np.ndarray,
    num_real: int,
    n_pad: int,
) -> np.ndarray:
    rows = host_rows(weights)
    is_seq = isinstance(rows, (Sequence, np.ndarray)) and not isinstance(rows, (str, bytes))
    if not is_seq or len(rows) != num_real:  # (a 2-D array is one row per bag, as for bags)
        got = len(rows) if is_seq else type(rows).__name__
        raise ValueError(
            f"weights must be a sequence with one 1-D weight sequence per bag ({num_real}), "
            f"got {got}; e.g. jaxbag.pack_bags([[1, 2]], weights=[[0.5, 0.5]])."
        )
    parts = [host_weights(w, f"weights[{i}]", int(lengths[i]), f"bags[{i}]")
             for i, w in enumerate(rows)]
    out = np.zeros(n_pad, dtype=np.float32)
    total = int(lengths.sum(dtype=np.int64))
    if total:
        out[:total] = np.concatenate(parts)
    return out
