"""``JaggedFeatures``: a batch of several ragged id features, with static shapes (a pytree).

Legend: ``K`` features (keys), ``B`` examples in the batch, ``S`` batch shards (``num_shards``),
``C_k`` the id capacity of feature ``k`` per shard, ``T = sum_k C_k`` the capacity of one shard.

The TorchRec ``KeyedJaggedTensor`` idea, padded to static sizes so that ``jit`` compiles once.
A batch of ``B = 3`` examples with two features::

    example                 0          1        2
    "words"              [ 4 1 ]     [ ]    [ 2 2 7 ]
    "tags"               [ 9 ]       [ 3 ]  [ ]

    keys     ("words", "tags")                      static (aux data)
    lengths  [[2 0 3],                               int32 [K, B]
              [1 1 0]]
    values   [ 4 1 2 2 7 p p p | 9 3 p p ]           int32 [S * T], here capacities (8, 4)
              '---- "words" ----' '-"tags"-'         each feature a fixed region: its ids in
                                                     example order, then padding p (dropped)

With ``num_shards = S > 1`` the batch is cut into ``S`` equal blocks of ``B / S`` examples and
``values`` holds one such ``[T]`` block per shard, so it can be split over a data-parallel mesh
axis (``values`` with ``P(batch_axis)``, ``lengths`` with ``P(None, batch_axis)``): each device then
holds a complete ``JaggedFeatures`` of its own examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from jaxbag._src import batching, explicit, segments, validation

__all__ = ["JaggedFeatures"]


def _check_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """``keys`` as a tuple: a non-empty sequence of distinct str. A str itself is refused, not
    read as one name (``tuple("user")`` is four one-letter features, and the number of keys
    decides how ``lengths [K * B]`` is read)."""
    if isinstance(keys, str):
        raise TypeError(
            f"keys must be a sequence of feature names, not a str; got keys={keys!r}. For one "
            f"feature pass a list: keys=[{keys!r}]."
        )
    if keys is None or not np.iterable(keys):
        raise TypeError(
            f"keys must be a non-empty sequence of str; got keys={keys!r}. For example "
            "keys=['words', 'tags']."
        )
    keys = tuple(keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"keys must be a non-empty sequence of str; got keys={keys!r}.")
    if len(set(keys)) != len(keys):
        raise ValueError(f"keys must be distinct; got keys={keys!r}.")
    return keys


def _check_numbers(name: str, x: object, want: str, example: str) -> None:
    """A leaf given to the constructor: not None, and numbers (checked before ``as_ids`` /
    ``jnp.asarray``, whose errors name neither the argument nor what it should hold)."""
    if x is None:
        raise TypeError(f"{name} must be {want}; got None. For example {name}={example}.")
    if isinstance(x, jax.Array):  # (tracers too)
        return
    try:
        a = np.asarray(x)
    except (ValueError, jax.errors.TracerArrayConversionError):  # ragged; traced values in a list
        return  # (left to the conversion, and the shape checks)
    bad = batching.first_non_number(a) if a.dtype.kind in "USO" else None
    if bad is not None:
        raise TypeError(
            f"{name} must be {want}; got {name}{bad[0]} = {bad[1]!r} (dtype {a.dtype}). For "
            f"example {name}={example}."
        )


def _check_num_shards(num_shards: int, b: int | None = None) -> None:
    """``num_shards``: a static int >= 1, dividing the batch size ``b`` when given."""
    if not validation.is_static_int(num_shards, 1):
        raise ValueError(
            f"num_shards must be an int >= 1 (the size of the data-parallel mesh axis); got "
            f"num_shards={num_shards!r}. For example num_shards=2."
            + validation.static_int_hint(num_shards)
        )
    if b is not None and b % num_shards:
        raise ValueError(
            f"num_shards={num_shards} must divide the batch size B={b}; pad the batch with empty "
            "examples ([]) to a multiple of num_shards."
        )


#: ``capacity`` of the ``from_*`` constructors: one int, ``{key: int}``, a rule
#: ``ids -> capacity`` (``jaxbag.bucket_size``: a geometric ladder), or None (rounded up).
Capacity = int | Mapping[str, int] | Callable[[int], int] | None


def _capacity_for(name: str, count: int, capacity: Capacity, round_to: int) -> int:
    """The static capacity of one feature (per shard): the given one, the rule's for ``count``,
    or ``count`` rounded up."""
    if callable(capacity):
        cap = capacity(count)
        if not validation.is_static_int(cap, count):
            raise ValueError(
                f"capacity={getattr(capacity, '__name__', capacity)!r} gave {cap!r} for feature "
                f"{name!r} with {count} ids in one batch shard: a capacity rule must return an int "
                f">= its argument, e.g. capacity=jaxbag.bucket_size."
            )
        return int(cap)
    if capacity is None:
        if not validation.is_static_int(round_to, 1):
            raise ValueError(
                f"round_to must be an int >= 1 (the automatic capacity is rounded up to a multiple of "
                f"it); got round_to={round_to!r}. For example round_to=8, or round_to=1 for none."
            )
        return max(round_to, -(-count // round_to) * round_to)
    if isinstance(capacity, Mapping) and name not in capacity:
        raise ValueError(
            f"capacity has no entry for feature {name!r} (it has {sorted(capacity)}); give every "
            f"feature one, e.g. capacity={{..., {name!r}: {max(count, 1)}}}, or capacity=None."
        )
    cap = capacity[name] if isinstance(capacity, Mapping) else capacity
    if not validation.is_static_int(cap, 0):
        raise ValueError(f"capacity for feature {name!r} must be an int >= 0; got {cap!r}.")
    if count > cap:
        raise ValueError(
            f"feature {name!r} has {count} ids in one batch shard but capacity={int(cap)}; "
            f"pass a larger capacity, e.g. capacity={{{name!r}: {count}}} (or capacity=None to "
            "size it from the data)."
        )
    return int(cap)


# A dataclass only in name (no generated __init__, __eq__ or __repr__: the constructor's checks,
# identity equality and hashing, and the repr below stay as they are): its fields are the leaves,
# so Flax's tabulate (which renders a dataclass by its fields) can show them.
@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(init=False, eq=False, repr=False)
class JaggedFeatures:
    """A batch of ``B`` examples with ``K`` ragged id features, padded to static shapes.

    Legend: ``K`` features, ``B`` examples, ``S`` batch shards, ``C_k`` the capacity (ids per
    shard) of feature ``k``, ``T = sum(capacities)``.

    A pytree: ``values``, ``lengths`` and ``weights`` are its leaves; ``keys``, ``capacities`` and
    ``num_shards`` are static (changing them recompiles a jitted function, changing the ids does
    not). Build it on the host with :meth:`from_lists`, :meth:`from_lengths` or
    :meth:`from_offsets`; pass it to jitted functions as any other argument. Its key paths name
    the leaves (``.values``), and it is a dataclass whose fields are the leaves (only for tools
    that render dataclasses by their fields, as Flax's ``tabulate``; ``__init__``, equality by
    identity and the repr are its own, and ``dataclasses.replace`` does not apply: use
    :meth:`with_values` or ``jax.tree.map``).

    Attributes:
      keys: ``K`` feature names (static).
      values: ``int32 [S * T]`` ids; shard ``s`` occupies ``[s * T, (s + 1) * T)``, in which
        feature ``k`` occupies ``C_k`` positions from ``sum(capacities[:k])``: the ids of the
        shard's examples in order, then padding (never read).
      lengths: ``int32 [K, B]`` ids per feature and example (0 for an empty bag).
      weights: optional ``float [S * T]`` per-id weights, laid out as ``values``.
      capacities: ``C_k`` per feature (static).
      num_shards: ``S`` (static); example ``b`` lives in shard ``b // (B // S)``.

    Examples:
      >>> import jaxbag
      >>> jf = jaxbag.JaggedFeatures.from_lists(
      ...     {"words": [[4, 1], [], [2, 2, 7]], "tags": [[9], [3], []]}, capacity={"words": 8, "tags": 4})
      >>> jf.keys, jf.batch_size, jf.capacities
      (('words', 'tags'), 3, (8, 4))
      >>> jf.lengths.tolist()
      [[2, 0, 3], [1, 1, 0]]
      >>> jf.values.tolist()
      [4, 1, 2, 2, 7, 0, 0, 0, 9, 3, 0, 0]
      >>> jf.to_lists()["words"]
      [[4, 1], [], [2, 2, 7]]
    """

    values: Array
    lengths: Array
    weights: Array | None

    def __init__(
        self,
        keys: Sequence[str],
        values: ArrayLike,
        lengths: ArrayLike,
        weights: ArrayLike | None = None,
        *,
        capacities: Sequence[int],
        num_shards: int = 1,
    ) -> None:
        """Wraps arrays already in the padded layout (see the class docstring); checks shapes.

        Args:
          keys: ``K`` distinct feature names, a list or tuple of str (a single str is a
            ``TypeError``, not one name as in ``TableConfig``'s ``feature_names``: pass
            ``keys=["user"]``).
          values: ``int [S * T]`` ids in the padded layout.
          lengths: ``int [K, B]`` bag lengths.
          weights: optional ``float [S * T]`` (a floating-point dtype).
          capacities: ``K`` ints (Python or NumPy, static), the per-shard capacity of each feature.
          num_shards: ``S``, an int dividing ``B``.

        Raises:
          TypeError / ValueError: ``keys`` that is a str, non-int ``capacities`` or
            ``num_shards``, ``None`` or non-integer ``values`` or ``lengths``, non-float
            ``weights`` (a non-number named with its position), shapes that do not match; with
            concrete ``lengths`` also a negative length or a feature overflowing its capacity in
            a shard.
            Values are not checked (they may be traced).
        """
        self._keys = _check_keys(keys)
        k = len(self._keys)
        caps = tuple(capacities) if np.iterable(capacities) else (capacities,)
        if len(caps) != k or not all(validation.is_static_int(c, 0) for c in caps):
            bad = next((c for c in caps if not validation.is_static_int(c, 0)), None)
            raise ValueError(
                f"capacities must hold one int >= 0 per key ({k}); got "
                f"capacities={capacities!r}. "
                f"For example capacities={(8,) * k}." + validation.static_int_hint(bad)
            )
        _check_num_shards(num_shards)
        self._capacities = tuple(int(c) for c in caps)
        self._num_shards = int(num_shards)
        _check_numbers("values", values, "integer ids, int [S * T]", "np.array([4, 1, 0, 0])")
        _check_numbers("lengths", lengths, "integer counts, int [K, B]", "np.array([[2, 0]])")
        if weights is not None:
            _check_numbers("weights", weights, "floating-point per-id weights, float [S * T], or "
                           "None", "np.array([0.5, 2.0, 0.0, 0.0], np.float32)")
        # as the ops: narrow and unsigned ints widened, NumPy int64 clipped (not wrapped) to int32
        self.values = validation.as_ids(values)
        self.lengths = validation.as_ids(lengths)
        self.weights = None if weights is None else jnp.asarray(weights)
        t, s = sum(self._capacities), self._num_shards
        if self.weights is not None and not jnp.issubdtype(self.weights.dtype, jnp.floating):
            raise TypeError(
                f"weights must be floating-point per-id weights; got dtype {self.weights.dtype}. "
                "Cast them first: weights.astype(jnp.float32) (from_lists / from_lengths do)."
            )
        if self.lengths.ndim != 2 or self.lengths.shape[0] != k:
            raise ValueError(
                f"lengths must have shape [K, B] = [{k}, B]; got {self.lengths.shape}."
            )
        if self.batch_size % s:
            raise ValueError(
                f"the batch size B={self.batch_size} must be divisible by "
                f"num_shards={s}; pad the batch with empty examples."
            )
        if self.values.shape != (s * t,):
            raise ValueError(
                f"values must have shape [num_shards * sum(capacities)] = [{s * t}]; "
                f"got {self.values.shape}."
            )
        if not jnp.issubdtype(self.values.dtype, jnp.integer):
            raise TypeError(f"values must be integer ids; got dtype {self.values.dtype}.")
        if not jnp.issubdtype(self.lengths.dtype, jnp.integer):
            raise TypeError(f"lengths must be integer counts; got dtype {self.lengths.dtype}.")
        if validation.is_concrete(self.lengths):
            self._check_lengths_fit(lengths)  # (as passed: as_ids clips NumPy int64 to int32)
        if self.weights is not None and self.weights.shape != self.values.shape:
            raise ValueError(
                f"weights must have the shape of values {self.values.shape}; "
                f"got {self.weights.shape}."
            )

    def _check_lengths_fit(self, lengths: ArrayLike) -> None:
        """Each length >= 0, and each feature's ids of a shard within its capacity (else they
        would run into the next feature's region). ``lengths``: ``[K, B]`` as the caller passed
        them, so that an error shows the value given, not ``as_ids``' int32 clip of it."""
        with jax.ensure_compile_time_eval():
            lengths = np.asarray(lengths).reshape(self.lengths.shape)
        if (lengths < 0).any():
            i, j = np.argwhere(lengths < 0)[0]
            raise ValueError(
                f"lengths must be >= 0; got lengths[{i}, {j}] = {int(lengths[i, j])} (feature "
                f"{self._keys[i]!r}, example {j})."
            )
        s = self._num_shards
        bs = lengths.shape[1] // s
        for i, (key, cap) in enumerate(zip(self._keys, self._capacities)):
            row = lengths[i]
            if (row <= cap).all():  # (each length small: int64 sums cannot wrap)
                sums = [int(n) for n in row.astype(np.int64).reshape(s, bs).sum(axis=1)]
            else:  # exact sums of lengths of any size and dtype (one of them is an error)
                sums = [sum(int(v) for v in row[sh * bs : (sh + 1) * bs]) for sh in range(s)]
            for sh, n in enumerate(sums):
                if n > cap:
                    raise ValueError(
                        f"feature {key!r} has {n} ids in shard {sh} but capacity {cap}: its "
                        "lengths must sum to at most its capacity in every shard. Build it with "
                        "JaggedFeatures.from_lists / from_lengths, which size the capacities."
                    )

    # -- pytree ---------------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.values, self.lengths, self.weights), (
            self._keys,
            self._capacities,
            self._num_shards,
        )

    def tree_flatten_with_keys(self):
        # the leaves by name (jf.values, ...) in key paths, error messages and nnx.tabulate
        leaves, aux = self.tree_flatten()
        names = ("values", "lengths", "weights")
        return tuple(zip(map(jax.tree_util.GetAttrKey, names), leaves)), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj._keys, obj._capacities, obj._num_shards = aux
        obj.values, obj.lengths, obj.weights = children
        return obj

    # -- static facts ---------------------------------------------------------------------------
    @property
    def keys(self) -> tuple[str, ...]:
        """The ``K`` feature names, in layout order."""
        return self._keys

    @property
    def capacities(self) -> tuple[int, ...]:
        """``C_k``: the ids each feature may hold per shard (static)."""
        return self._capacities

    @property
    def num_shards(self) -> int:
        """``S``: the number of batch blocks in ``values``."""
        return self._num_shards

    @property
    def batch_size(self) -> int:
        """``B``: the number of examples (a static int: a symbolic ``B`` is a ``ValueError``)."""
        b = self.lengths.shape[1]
        if not isinstance(b, (int, np.integer)):  # jax.export's symbolic shapes
            raise ValueError(
                f"JaggedFeatures needs a static batch size B; got lengths of shape "
                f"{tuple(self.lengths.shape)}, a symbolic B={b}. Its layout (and so every "
                "collection op) is compiled for one B: export with a fixed B, e.g. lengths "
                f"jax.ShapeDtypeStruct(({len(self._keys)}, 64), jnp.int32), and pad each batch "
                "with empty examples ([]) to that B."
            )
        return int(b)

    @property
    def shard_capacity(self) -> int:
        """``T = sum(capacities)``: the length of one shard's block of ``values``."""
        return sum(self._capacities)

    def key_offset(self, key: str) -> int:
        """Where feature ``key``'s region starts inside each shard block."""
        i = self.index(key)
        return sum(self._capacities[:i])

    def index(self, key: str) -> int:
        """The position of ``key`` in :attr:`keys`."""
        try:
            return self._keys.index(key)
        except ValueError:
            raise KeyError(
                f"feature {key!r} is not in this JaggedFeatures; its keys are {self._keys}."
            ) from None

    def __repr__(self) -> str:
        return (
            f"JaggedFeatures(keys={self._keys}, batch_size={_batch_size_or_none(self)}, "
            f"capacities={self._capacities}, num_shards={self._num_shards}, "
            f"weighted={self.weights is not None})"
        )

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        features: Mapping[str, Sequence[Sequence[int]]],
        *,
        weights: Mapping[str, Sequence[Sequence[float]]] | None = None,
        capacity: Capacity = None,
        num_shards: int = 1,
        round_to: int = 8,
    ) -> JaggedFeatures:
        """Builds the padded layout from Python lists (or NumPy / JAX arrays), one per feature.

        Args:
          features: ``{key: bags}`` where ``bags`` holds ``B`` id lists (one per example; every
            feature the same ``B``). Key order is layout order.
          weights: optional ``{key: bags}`` of per-id weights, shaped as ``features`` (every key).
          capacity: ids per feature per shard: one int for all, a ``{key: int}`` mapping, a
            rule ``ids -> capacity`` applied to each feature's largest count over shards
            (``capacity=jaxbag.bucket_size``: a geometric ladder, so a run sees a few shapes
            and compiles a few times), or ``None`` (that count rounded up to ``round_to``: a new
            shape, so a new compilation, whenever it changes). Fix it to keep shapes the same
            from batch to batch.
          num_shards: ``S``, batch blocks (the size of the data-parallel mesh axis); divides ``B``.
          round_to: rounding of the automatic capacity.

        Returns:
          A :class:`JaggedFeatures` with int32 ``values`` (float32 ``weights``).

        Raises:
          ValueError: features of different batch sizes, a capacity too small, bad ``num_shards``,
            a bag that is not a flat list, a negative id or one past int32, weights not shaped as
            the ids or overflowing float32; each names the position as passed, e.g.
            ``features['b'][1][0] = -2``.
          TypeError: non-integer ids or non-number weights.

        Examples:
          >>> import jaxbag
          >>> jf = jaxbag.JaggedFeatures.from_lists({"words": [[1, 2], [], [3]], "tags": [[7], [8], []]},
          ...                                       capacity=4)
          >>> jf.keys, jf.batch_size, jf.lengths.tolist()
          (('words', 'tags'), 3, [[2, 0, 1], [1, 1, 0]])
        """
        example = "jaxbag.JaggedFeatures.from_lists({'words': [[1, 2], [], [3]]})"
        if not isinstance(features, Mapping):
            raise TypeError(
                f"features must be a mapping {{key: bags}}, got {type(features).__name__}; e.g. "
                f"{example}."
            )
        keys = _check_keys(list(features))
        _check_num_shards(num_shards)
        rows = {k: batching.bag_rows(features[k], f"features[{k!r}]", example) for k in keys}
        bags = {k: [batching.bag_ids(x, f"features[{k!r}][{j}]") for j, x in enumerate(rows[k])]
                for k in keys}
        sizes = {k: len(v) for k, v in bags.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every feature needs the same number of examples; got {sizes}.")
        b = sizes[keys[0]]
        _check_num_shards(num_shards, b)
        flat_w = None
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(
                    f"weights must be a mapping {{key: weight lists}} with the keys of features "
                    f"{keys}; got {type(weights).__name__}."
                )
            if set(weights) != set(keys):
                raise ValueError(
                    f"weights must have exactly the keys of features {keys}; got {tuple(weights)}."
                )
            w_example = ("jaxbag.JaggedFeatures.from_lists({'words': [[1, 2], [3]]}, "
                         "weights={'words': [[0.5, 2.0], [1.0]]})")
            w_rows = {k: batching.bag_rows(weights[k], f"weights[{k!r}]", w_example, "weight")
                      for k in keys}
            for k in keys:
                if len(w_rows[k]) != b:
                    raise ValueError(
                        f"weights[{k!r}] has {len(w_rows[k])} bags but features[{k!r}] has {b}: "
                        "give one list of weights per example, shaped as its ids."
                    )
            flat_w = np.concatenate([np.zeros(0, np.float32)] + [
                batching.host_weights(w, f"weights[{k!r}][{j}]", len(bags[k][j]),
                                      f"features[{k!r}][{j}]")
                for k in keys for j, w in enumerate(w_rows[k])
            ])
        lengths = np.array([[len(x) for x in bags[k]] for k in keys], np.int64).reshape(len(keys), b)
        flat = batching.checked_ids(
            [x for k in keys for x in bags[k]], lambda i: f"features[{keys[i // b]!r}][{i % b}]"
        )
        return cls._from_flat(
            keys, flat, lengths, flat_w, capacity=capacity, num_shards=num_shards, round_to=round_to
        )

    @classmethod
    def from_lengths(
        cls,
        keys: Sequence[str],
        values: ArrayLike | Sequence[int],
        lengths: ArrayLike | Sequence[int],
        *,
        weights: ArrayLike | Sequence[float] | None = None,
        capacity: Capacity = None,
        num_shards: int = 1,
        round_to: int = 8,
    ) -> JaggedFeatures:
        """Builds the padded layout from TorchRec's flat (unpadded) ``KeyedJaggedTensor`` arrays.

        Args:
          keys: ``K`` feature names, a list or tuple of str (a single str is a ``TypeError``;
            for one feature pass ``keys=["user"]``).
          values: ``int [sum(lengths)]`` ids in ``[0, 2**31)``, key-major then example-major,
            no padding.
          lengths: ``int [K * B]`` (or ``[K, B]``) ids per feature and example.
          weights: optional ``float [sum(lengths)]``.
          capacity, num_shards, round_to: as :meth:`from_lists`.

        Returns:
          A :class:`JaggedFeatures`.

        Raises:
          TypeError / ValueError: ``keys`` that is a str, non-integer values or lengths,
            ``lengths`` of another shape (a scalar too),
            a negative length or lengths not summing to ``len(values)``, an id negative or past
            int32, weights not of ``values``' shape or overflowing float32 (each naming the
            position, e.g. ``values[3] = -1``), and bad ``num_shards``.

        Examples:
          >>> import jaxbag
          >>> jf = jaxbag.JaggedFeatures.from_lengths(["a", "b"], [1, 2, 3, 4], [2, 0, 1, 1], capacity=2)
          >>> jf.values.tolist(), jf.to_lists()
          ([1, 2, 3, 4], {'a': [[1, 2], []], 'b': [[3], [4]]})
        """
        keys = _check_keys(keys)
        _check_num_shards(num_shards)
        lengths = np.asarray(lengths)
        if lengths.size and (lengths.dtype == np.bool_ or not np.issubdtype(lengths.dtype, np.integer)):
            raise TypeError(f"lengths must be integer counts; got dtype {lengths.dtype}.")
        if lengths.size % len(keys) or lengths.ndim not in (1, 2) or (
            lengths.ndim == 2 and lengths.shape[0] != len(keys)
        ):
            raise ValueError(
                f"lengths must be [K * B] or [K, B] with K={len(keys)} keys (key-major); got shape "
                f"{lengths.shape}."
            )
        flat_in = lengths.ndim == 1  # (errors name a position as the caller passed it)
        lengths = lengths.reshape(len(keys), -1)
        values = batching.bag_ids(values, "values")
        n = values.shape[0]
        bad = (lengths < 0) | (lengths > n)  # (compared in their own dtype: a uint64 never wraps)
        if bad.any():
            i, b = (int(x[0]) for x in np.nonzero(bad))
            v = lengths[i, b]
            rule = ("is negative: lengths must be >= 0 (0 for an empty bag)" if v < 0 else
                    f"is more than the {n} ids of values: lengths must sum to len(values)")
            at = f"{i * lengths.shape[1] + b}" if flat_in else f"{i}, {b}"
            raise ValueError(f"lengths[{at}] = {v} (feature {keys[i]!r}, example {b}) {rule}.")
        lengths = lengths.astype(np.int64)
        if lengths.sum() != n:
            raise ValueError(f"values must hold sum(lengths)={int(lengths.sum())} ids; got {n}.")
        w = None if weights is None else batching.host_weights(weights, "weights", n, "values")
        _check_num_shards(num_shards, lengths.shape[1])
        flat = batching.checked_ids([values], lambda _: "values")
        return cls._from_flat(
            keys, flat, lengths, w, capacity=capacity, num_shards=num_shards, round_to=round_to
        )

    @classmethod
    def from_offsets(
        cls,
        keys: Sequence[str],
        values: ArrayLike | Sequence[int],
        offsets: ArrayLike | Sequence[int],
        *,
        weights: ArrayLike | Sequence[float] | None = None,
        capacity: Capacity = None,
        num_shards: int = 1,
        round_to: int = 8,
    ) -> JaggedFeatures:
        """As :meth:`from_lengths`, with TorchRec's ``offsets [K * B + 1]`` instead of lengths.

        Args:
          keys: ``K`` feature names, as :meth:`from_lengths`.
          values: ``int [offsets[-1]]`` flat ids, key-major.
          offsets: ``int [K * B + 1]`` non-decreasing, starting at 0.
          weights, capacity, num_shards, round_to: as :meth:`from_lengths`.

        Returns:
          A :class:`JaggedFeatures`.

        Raises:
          TypeError / ValueError: non-integer offsets, offsets not 1-D, not starting at 0 or
            decreasing (naming the position), not ``K * B + 1`` of them,
            ``offsets[-1] != len(values)``,
            and the errors of :meth:`from_lengths` about ``values`` and ``weights``.

        Examples:
          >>> import jaxbag
          >>> jf = jaxbag.JaggedFeatures.from_offsets(["words", "tags"], [1, 2, 3, 7, 8], [0, 2, 3, 4, 5])
          >>> jf.to_lists()
          {'words': [[1, 2], [3]], 'tags': [[7], [8]]}
        """
        offsets = np.asarray(offsets)
        if offsets.size and (offsets.dtype == np.bool_ or not np.issubdtype(offsets.dtype, np.integer)):
            raise TypeError(
                f"offsets must be integer positions; got dtype {offsets.dtype}. Cast them first: "
                "np.asarray(offsets, np.int64)."
            )
        keys = _check_keys(keys)
        if offsets.ndim != 1:  # (a [K, B + 1] array is not K * B + 1 positions: not flattened)
            raise ValueError(
                f"offsets must be 1-D: TorchRec's [K * B + 1] offsets, key-major; got shape "
                f"{offsets.shape}. For example offsets=[0, 2, 3] for one feature and two examples."
            )
        # (offsets are compared in their own dtype: a uint64 never wraps)
        if offsets.size < 1 or offsets[0] != 0:
            first = offsets.tolist()[:1]
            raise ValueError(
                f"offsets must start at 0 (TorchRec's [K * B + 1] offsets); got offsets[0] = "
                f"{first[0] if first else '(none: empty offsets)'}."
            )
        if (offsets[1:] < offsets[:-1]).any():
            j = int(np.argmax(offsets[1:] < offsets[:-1])) + 1
            raise ValueError(
                f"offsets[{j}] = {offsets[j]} is smaller than offsets[{j - 1}] = {offsets[j - 1]}: "
                "offsets must be non-decreasing (equal offsets make empty bags)."
            )
        k, values = len(keys), batching.bag_ids(values, "values")
        if (offsets.size - 1) % k:
            raise ValueError(
                f"offsets must have K * B + 1 entries with K={k} keys (a start per feature and "
                f"example, key-major, then the end of the last bag); got {offsets.size} entries, "
                f"{offsets.size - 1} starts, not a multiple of {k}."
            )
        if offsets[-1] != values.shape[0]:
            raise ValueError(
                f"offsets[-1] = {offsets[-1]} must equal len(values) = {values.shape[0]}: the last "
                f"offset is the end of the last bag. For example offsets={[0, values.shape[0]]} "
                "for one feature and one example."
            )
        return cls.from_lengths(
            keys, values, np.diff(offsets.astype(np.int64)),
            weights=weights, capacity=capacity, num_shards=num_shards, round_to=round_to,
        )

    @classmethod
    def _from_flat(cls, keys, flat, lengths, flat_w, *, capacity: Capacity, num_shards, round_to):
        """The padded layout of checked ``int32`` ids ``flat`` (key-major), ``int64 [K, B]``
        lengths and optional ``float32`` weights ``flat_w`` of ``flat``'s shape."""
        if isinstance(capacity, Mapping) and set(capacity) - set(keys):
            raise ValueError(  # a misspelt key was ignored when the real ones were there too
                f"capacity has keys that are not features: {sorted(set(capacity) - set(keys))}; "
                f"the features are {list(keys)}."
            )
        k, b = lengths.shape
        bs = b // num_shards
        starts = np.concatenate([[0], np.cumsum(lengths.reshape(-1))])  # key-major bag starts
        # ids of feature i in shard s: one contiguous run of the flat key-major values.
        runs = {}
        for i in range(k):
            for s in range(num_shards):
                lo = starts[i * b + s * bs]
                hi = starts[i * b + (s + 1) * bs]
                runs[i, s] = (int(lo), int(hi))
        most = [max(runs[i, s][1] - runs[i, s][0] for s in range(num_shards)) for i in range(k)]
        caps = tuple(_capacity_for(keys[i], most[i], capacity, round_to) for i in range(k))
        t = sum(caps)
        values = np.zeros(num_shards * t, np.int32)
        weights = None if flat_w is None else np.zeros(num_shards * t, np.float32)
        for s in range(num_shards):
            pos = s * t
            for i in range(k):
                lo, hi = runs[i, s]
                values[pos : pos + hi - lo] = flat[lo:hi]
                if weights is not None and flat_w is not None:
                    weights[pos : pos + hi - lo] = flat_w[lo:hi]
                pos += caps[i]
        return cls(
            keys,
            values,
            lengths.astype(np.int32),
            weights,
            capacities=caps,
            num_shards=num_shards,
        )

    # -- views ----------------------------------------------------------------------------------
    def to_lists(self) -> dict[str, list[list[int]]]:
        """The ids back as ``{key: [ids of example 0, ...]}`` (host; for checks and debugging)."""
        values = np.asarray(self.values)
        lengths = np.asarray(self.lengths)
        k, b = lengths.shape
        bs, t = b // self._num_shards, self.shard_capacity
        out: dict[str, list[list[int]]] = {}
        for i, key in enumerate(self._keys):
            bags = []
            for s in range(self._num_shards):
                pos = s * t + sum(self._capacities[:i])
                for j in range(s * bs, (s + 1) * bs):
                    n = int(lengths[i, j])
                    bags.append(values[pos : pos + n].tolist())
                    pos += n
            out[key] = bags
        return out

    def feature(self, key: str) -> tuple[Array, Array, Array | None]:
        """One feature in the segment-id form of :func:`jaxbag.embedding_bag` (jit-friendly).

        Args:
          key: a feature name.

        Returns:
          ``(indices [S * C_k], segment_ids [S * C_k], weights [S * C_k] or None)``: sorted
          segment ids in ``[0, B]``, padding positions get ``B`` (pass ``num_bags=B``).

        Examples:
          >>> import jax.numpy as jnp, jaxbag
          >>> jf = jaxbag.JaggedFeatures.from_lists({"a": [[1, 2], [], [3]]}, capacity=4)
          >>> ids, seg, _ = jf.feature("a")
          >>> ids.tolist(), seg.tolist()
          ([1, 2, 3, 0], [0, 0, 2, 3])
          >>> w = jnp.eye(4)
          >>> jaxbag.embedding_bag(w, ids, segment_ids=seg, num_bags=3, mode="sum")[:, :4].tolist()
          [[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
        """
        return pack_features(self, [key])

    def with_values(self, values: Array) -> JaggedFeatures:
        """A copy with other ``values`` of the same shape (e.g. remapped ids); not checked."""
        leaves, aux = self.tree_flatten()
        return self.tree_unflatten(aux, (values,) + tuple(leaves[1:]))


def _batch_size_or_none(jf: JaggedFeatures) -> int | None:
    """``B``, or ``None`` where the leaves are not arrays (``feature_specs``' PartitionSpecs,
    ``jax.tree.map`` results)."""
    shape = getattr(jf.lengths, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) == 2 else None


def _fitted_lengths(jf: JaggedFeatures) -> Array:
    """``int32 [K, B]`` lengths, clamped at 0 and so that each feature's ids of a shard fit its
    capacity. A no-op for a valid batch (``JaggedFeatures`` checks that eagerly); for lengths
    built under ``jit`` that overflow, the overflowing bags are cut short, so an id is never
    read as another feature's."""
    k, b, s = len(jf.keys), jf.batch_size, jf.num_shards
    caps = jnp.asarray(jf.capacities, jnp.int32).reshape(k, 1, 1)
    lengths = jnp.asarray(jf.lengths).reshape(k, s, b // s)
    ends = segments.capped_ends(lengths, caps, axis=2)
    # (a pad, not a concatenate with a replicated zero block: on an Explicit mesh that is a
    # sharding type error for lengths split over the batch)
    starts = jnp.pad(ends[:, :, :-1], ((0, 0), (0, 0), (1, 0)))
    return (ends - starts).reshape(k, b)


def pack_features(
    jf: JaggedFeatures,
    keys: Sequence[str],
    transform: Callable[[int, Array], Array] | None = None,
) -> tuple[Array, Array, Array | None]:
    """Concatenates features into one segment-id batch with sorted segment ids (jit-friendly).

    Slot ``j`` (feature ``keys[j]``) owns bags ``[j * B, (j + 1) * B)``: example ``b`` of slot
    ``j`` is bag ``j * B + b``. The real ids come first in bag order, then all padding, whose
    segment id is ``len(keys) * B`` (dropped by ``num_bags=len(keys) * B``). The permutation that
    moves padding behind is computed from ``lengths`` alone (O(ids), no sort).

    Args:
      jf: the batch.
      keys: the features to pack, in slot order (each at most once).
      transform: optional ``(slot j, ids [C]) -> ids [C]`` applied to a region's ids before packing
        (e.g. to offset them into a stacked table).

    Returns:
      ``(ids [M], segment_ids int32 [M], weights [M] or None)`` with ``M = S * sum(C_k)`` over
      ``keys``.
    """
    jf = jax.tree.map(explicit.unsplit, jf)
    b, s_count, t = jf.batch_size, jf.num_shards, jf.shard_capacity
    bs = b // s_count
    regions = []  # (slot, shard, start, capacity, key index), in bag order
    for j, key in enumerate(keys):
        i = jf.index(key)
        off = jf.key_offset(key)
        for s in range(s_count):
            regions.append((j, s, s * t + off, jf.capacities[i], i))
    total = sum(r[3] for r in regions)
    lengths = _fitted_lengths(jf)
    # Real ids per region; exclusive cumulative sums give where each region's real ids and
    # padding go in the packed order (the regions are in bag order).
    counts = jnp.stack(
        [jnp.sum(lengths[i, s * bs : (s + 1) * bs], dtype=jnp.int32) for (_, s, _, _, i) in regions]
    ) if regions else jnp.zeros((0,), jnp.int32)
    caps = jnp.asarray([r[3] for r in regions], jnp.int32)
    real_total = jnp.sum(counts, dtype=jnp.int32)  # int32 under x64 too
    real_start = jnp.cumsum(counts, dtype=jnp.int32) - counts
    pad_start = jnp.cumsum(caps - counts, dtype=jnp.int32) - (caps - counts)
    ids_parts, tgt_parts, w_parts = [], [], []
    for r, (j, s, start, cap, i) in enumerate(regions):
        if cap == 0:
            continue
        ids = jf.values[start : start + cap]
        if transform is not None:
            ids = transform(j, ids)
        p = jnp.arange(cap, dtype=jnp.int32)
        tgt = jnp.where(p < counts[r], real_start[r] + p, real_total + pad_start[r] + p - counts[r])
        ids_parts.append(ids)
        tgt_parts.append(tgt)
        if jf.weights is not None:
            w_parts.append(jf.weights[start : start + cap])
    num_bags = len(keys) * b
    # Bag lengths in packed order (slot-major, then example) -> sorted segment ids.
    packed_lengths = lengths[jnp.asarray([jf.index(k) for k in keys], jnp.int32)].reshape(-1)
    seg = segments.lengths_to_segment_ids_unchecked(packed_lengths, total)
    if total == 0:
        empty_w = None if jf.weights is None else jnp.zeros((0,), jf.weights.dtype)
        return jnp.zeros((0,), jf.values.dtype), seg, empty_w
    tgt = jnp.concatenate(tgt_parts)
    ids = jnp.zeros((total,), ids_parts[0].dtype).at[tgt].set(
        jnp.concatenate(ids_parts), unique_indices=True
    )
    weights = None
    if jf.weights is not None:
        weights = jnp.zeros((total,), jf.weights.dtype).at[tgt].set(
            jnp.concatenate(w_parts), unique_indices=True
        )
    del num_bags
    return ids, seg, weights
