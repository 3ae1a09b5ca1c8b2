"""Sparse row gradients and row-wise optimisers: train a big table without a ``[V, D]`` gradient.

Legend: ``V`` table rows, ``D`` features, ``N`` ids, ``B`` bags, ``U`` row slots (static, ``<= N``).

A batch touches at most ``N`` of the ``V`` rows, yet ``jax.grad`` of a loss with respect to the
table returns a dense ``[V, D]`` array, and a dense optimiser then reads and writes every row
(plus its moments): at ``V = 1M, D = 128`` that is hundreds of MB per step. The sparse path is the
JAX counterpart of ``torch.nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SparseAdam`` and of
fbgemm's fused backward-optimiser:

1. :func:`unique_rows` finds the distinct ids of the batch, padded to a static ``U`` slots (sort
   based; unused slots hold the out-of-range row ``V``);
2. :func:`embedding_bag_rows` runs :func:`jaxbag.embedding_bag` on the ``[U, D]`` *gathered* rows
   and returns the bags plus a pullback that maps the bag cotangent ``[B, D]`` to
   :class:`RowGrads` (``rows [U]``, ``grads [U, D]``): the gradient with respect to those rows only;
3. a :class:`SparseOptimizer` (:func:`sparse_sgd`, :func:`sparse_adagrad`, :func:`sparse_adam`)
   updates only those rows of the table and of its state with ``.at[rows]`` scatters
   (``mode="drop"`` skips the fill slots). Donate the table and the state to ``jit`` so the update
   happens in place.

Dense parameters of the model keep using optax as usual; only the table goes through this path.

Example (a training step)::

    opt = jaxbag.sparse_adam(1e-3)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(table, state, ids, offsets, targets):
        bags, pullback = jaxbag.embedding_bag_rows(table, ids, offsets, mode="sum")
        loss, g_bags = jax.value_and_grad(lambda b: jnp.mean((b - targets) ** 2))(bags)
        table, state = opt.update(table, state, pullback(g_bags))
        return table, state, loss
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar, Unpack, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.core import Tracer
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxbag._src import (
    bag_terms, explicit, fast_forward, ops, segments, sparse_kernels, validation,
)
from jaxbag._src.dtypes import acc_dtype
from jaxbag._src.validation import Mode

__all__ = [
    "LazyAdamState",
    "RowGrads",
    "RowwiseAdagradState",
    "SgdState",
    "SparseOptimizer",
    "embedding_bag_rows",
    "sparse_adagrad",
    "sparse_adam",
    "sparse_sgd",
    "unique_rows",
]

ScalarOrSchedule = float | Callable[[Array], ArrayLike]


class RowGrads(NamedTuple):
    """The gradient of a loss with respect to the rows a batch touched.

    Attributes:
      rows: ``int32 [U]`` distinct row ids in increasing order; unused slots hold ``V`` (out of
        range, skipped by the optimisers' ``mode="drop"`` scatters).
      grads: ``float [U, D]`` gradient of each row (zeros in unused slots), in the accumulation
        dtype (float32 for bf16/f16 tables).

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> g = jaxbag.RowGrads(rows=jnp.array([2, 5]), grads=jnp.ones((2, 3)))  # by hand, V = 5
      >>> opt = jaxbag.sparse_sgd(0.1)
      >>> new, _ = opt.update(jnp.zeros((5, 3)), opt.init(jnp.zeros((5, 3))), g)  # row 5: skipped
      >>> [round(x, 4) for x in new[:, 0].tolist()]
      [0.0, 0.0, -0.1, 0.0, 0.0]
    """

    rows: Array
    grads: Array


Params = TypeVar("Params")
Grads = TypeVar("Grads")


class SparseOptimizer(NamedTuple, Generic[Params, Grads]):
    """A row-wise optimiser for an embedding table (the sparse analogue of an optax transformation).

    Typed ``SparseOptimizer[Params, Grads]``: ``SparseOptimizer[Array, RowGrads]`` for one table
    (:func:`sparse_sgd`, :func:`sparse_adagrad`, :func:`sparse_adam`), ``SparseOptimizer[
    Mapping[str, Array], Mapping[str, RowGrads]]`` for a collection's groups
    (:func:`jaxbag.collection_optimizer`).

    Attributes:
      init: ``init(table [V, D]) -> state``, a pytree (a NamedTuple of arrays).
      update: ``update(table [V, D], state, row_grads: RowGrads) -> (table, state)``: updates only
        the rows in ``row_grads.rows`` (``rows`` must be distinct, as :func:`unique_rows` returns
        them: a repeated row is an error eagerly, and under ``jit`` whether its gradients are
        summed or one of them wins depends on the path; rows outside ``[0, V)`` are skipped).

    jaxbag's own optimisers also take a table, state and row gradients split over Explicit mesh
    axes (their update runs as on an Auto mesh inside; the table and state keep their split),
    and ``init`` splits the per-row state as the table.

    The sharded and collection helpers (:func:`jaxbag.sharding.sparse_init` /
    ``sparse_update``, :func:`jaxbag.collection_optimizer`, :func:`jaxbag.unpack_states`) assume
    the state of your own pair is made of scalars (kept whole: a step count) and per-row arrays
    (``[V, ...]``: split, cut and stacked by rows as the table); a state with other leaves (a
    ``[D]`` vector) needs its own handling there.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> opt = jaxbag.sparse_adagrad(0.1)   # or sparse_sgd, sparse_adam, or your own pair
      >>> table = jnp.zeros((4, 2))
      >>> state = opt.init(table)
      >>> type(state).__name__, state.sum_sq.shape
      ('RowwiseAdagradState', (4,))
      >>> table, state = opt.update(table, state, jaxbag.RowGrads(jnp.array([1]), jnp.ones((1, 2))))
      >>> [round(x, 4) for x in table[:, 0].tolist()]
      [0.0, -0.1, 0.0, 0.0]
    """

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Grads], tuple[Params, Any]]


#: The optimiser of one ``[V, D]`` table (what :func:`sparse_adam` and the others return).
TableOptimizer = SparseOptimizer[Array, RowGrads]


class SgdState(NamedTuple):
    """State of :func:`sparse_sgd`: ``count`` int32 scalar, the number of updates done."""

    count: Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do


class RowwiseAdagradState(NamedTuple):
    """State of :func:`sparse_adagrad`.

    Attributes:
      count: int32 scalar, the number of updates done.
      sum_sq: ``float [V]`` (float64 for float64 tables, float32 otherwise), per row the running
        sum of mean-over-``D`` squared gradients.
    """

    count: Array  # type: ignore[assignment]  # shadows tuple.count
    sum_sq: Array


class LazyAdamState(NamedTuple):
    """State of :func:`sparse_adam`.

    Attributes:
      count: int32 scalar, the global step (every update, as torch's ``SparseAdam``).
      mu: ``float [V, D]`` first moments (only touched rows ever change); float64 for float64
        tables, float32 otherwise.
      nu: ``float [V, D]`` second moments, same dtype.
    """

    count: Array  # type: ignore[assignment]  # shadows tuple.count
    mu: Array
    nu: Array


def default_slots(num_indices: int, num_embeddings: int) -> int:
    """``U`` for ``size=None``: ``min(N, V)``, always enough (a batch has at most that many
    distinct rows) and no more (a ``[U, D]`` gradient larger than the table is never needed)."""
    return min(num_indices, num_embeddings)


def _check_size(size: int, num_indices: int, num_embeddings: int) -> int:
    if not validation.is_static_int(size, 1):
        raise ValueError(
            f"size must be a positive int (the number of row slots U); got size={size!r}. "
            f"size=None uses min(N, V)={default_slots(num_indices, num_embeddings)}, always "
            "enough."
        )
    return int(size)


# The keyword arguments embedding_bag_rows passes on to embedding_bag (from its signature, so
# the two cannot drift apart).
_BAG_KWARGS = tuple(
    name for name, p in inspect.signature(ops.embedding_bag).parameters.items()
    if p.kind == inspect.Parameter.KEYWORD_ONLY and name != "padding_idx"
)


def check_slots(indices: Array, valid: Array, size: int | None, num_embeddings: int) -> None:
    """Raises when ``size`` slots cannot hold the distinct ``indices`` at ``valid`` positions (only
    when their values are known: under ``jit`` the rows past the first ``size`` get no slot)."""
    if size is None or not validation.is_concrete(indices, valid):
        return
    distinct = np.unique(np.asarray(indices).reshape(-1)[np.asarray(valid).reshape(-1)]).size
    if distinct > _check_size(size, indices.size, num_embeddings):
        raise ValueError(
            f"size={size} row slots are too few: this batch has {distinct} distinct ids, and the "
            f"rows beyond the first {size} would get no gradient. Pass size >= {distinct} (the "
            "most distinct ids a batch can have), or size=None (min(N, V) slots, always enough)."
        )


def unique_rows(
    indices: ArrayLike,
    num_embeddings: int,
    *,
    size: int | None = None,
    valid: ArrayLike | None = None,
) -> tuple[Array, Array]:
    """Distinct ids of a batch in ``U`` static slots, and the slot of every id.

    No ``[V]`` array: a hash table and a radix sort of the distinct ids (CPU kernel), or one sort
    of the ``N`` ids and a binary search (XLA, other backends). Same result either way.

    Args:
      indices: ``int [...]`` ids (any shape, ``N`` of them in all).
      num_embeddings: ``V``; ids outside ``[0, V)`` are skipped.
      size: ``U``, the number of slots (static). ``None`` means ``min(N, V)``, always enough.
        With a smaller ``U``, the ids beyond the first ``U`` distinct ones (in increasing order)
        are treated as skipped: make sure a batch never has more than ``U`` distinct ids.
      valid: optional ``bool`` mask of ``indices``' shape; ``False`` positions are skipped (e.g.
        padding).

    Returns:
      ``(rows, inverse)``: ``rows`` ``int32 [U]`` the distinct ids in increasing order, unused slots
      set to ``V``; ``inverse`` ``int32`` of ``indices``' shape, the slot of each id, ``U`` for a
      skipped one.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> rows, inv = jaxbag.unique_rows(jnp.array([7, 3, 7, 9]), 10, size=4)
      >>> rows.tolist(), inv.tolist()
      ([3, 7, 9, 10], [1, 0, 1, 2])
    """
    indices = validation.as_ids(indices)
    validation.require_int("indices", indices)
    if not validation.is_static_int(num_embeddings, 1):
        raise ValueError(
            f"num_embeddings must be a positive Python int (V, the table's rows); got "
            f"num_embeddings={num_embeddings!r}. For a table: unique_rows(ids, table.shape[0])."
        )
    num_embeddings = int(num_embeddings)
    if valid is not None:
        valid = jnp.asarray(valid)
        if valid.shape != indices.shape or valid.dtype != jnp.bool_:
            raise ValueError(
                f"valid must be a bool mask of indices' shape {indices.shape}; got {valid.dtype} "
                f"of shape {valid.shape}. For example: valid=segment_ids < num_bags."
            )
    mesh = explicit.split_mesh(indices, valid)
    if mesh is not None:  # (ids split over Explicit mesh axes: the sort is a sharding type error)
        return explicit.run_as_auto(
            lambda i, v: unique_rows(i, num_embeddings, size=size, valid=v), mesh,
            (NamedSharding(mesh, PartitionSpec()), explicit.kept_sharding(mesh, indices)),
            indices, valid)
    shape = indices.shape
    flat = indices.reshape(-1)
    ok = (flat >= 0) & (flat < num_embeddings)  # before the int32 cast, which would wrap int64 ids
    ids = flat.astype(jnp.int32)
    n = ids.shape[0]
    u = default_slots(n, num_embeddings) if size is None else _check_size(size, n, num_embeddings)
    if n == 0:
        return jnp.full((u,), num_embeddings, jnp.int32), ids.reshape(shape)
    if valid is not None:
        ok = ok & valid.reshape(-1)
    keys = jnp.where(ok, ids, jnp.int32(num_embeddings))
    rows, inverse = sparse_kernels.unique_rows_kernel(
        keys, num_embeddings, u, lambda k: _unique_sorted(k, num_embeddings, u)
    )
    return rows, inverse.reshape(shape)


def _unique_sorted(keys: Array, num_embeddings: int, u: int) -> tuple[Array, Array]:
    """XLA path of :func:`unique_rows`: one sort of the keys and a binary search."""
    ok = keys < num_embeddings
    srt = jnp.sort(keys)
    is_new = jnp.concatenate([jnp.ones((1,), jnp.bool_), srt[1:] != srt[:-1]])
    slot = jnp.cumsum(is_new, dtype=jnp.int32) - 1
    # slots past u go to a sink slot (an in-range index: see segments.segment_reduce)
    rows = jnp.full((u + 1,), num_embeddings, jnp.int32).at[jnp.minimum(slot, u)].set(srt)[:u]
    inverse = jnp.searchsorted(rows, keys, side="left", method="scan_unrolled").astype(jnp.int32)
    # (rows holds the u smallest distinct keys, so a key past them searches to u itself)
    keep = ok & (inverse < u)
    inverse = jnp.where(keep, inverse, jnp.int32(u))
    return rows, inverse


def embedding_bag_rows(
    weight: ArrayLike,
    indices: ArrayLike,
    offsets: ArrayLike | None = None,
    *,
    size: int | None = None,
    padding_idx: int | None = None,
    **kwargs: Unpack[ops.BagOptions],
) -> tuple[Array, Callable[[Array], RowGrads]]:
    """:func:`jaxbag.embedding_bag` plus a pullback to the gradient of the touched rows only.

    The bags are computed from the table as by :func:`jaxbag.embedding_bag` (the CPU kernel when it
    applies); the pullback scatters the bag cotangent straight into the ``U`` row slots
    (``[U, D]``), so no ``[V, D]`` gradient is ever built. With ``max_norm`` or
    ``scale_grad_by_freq`` the bag op runs on the ``[U + 1, D]`` gathered distinct rows instead and
    the pullback is its vjp (same result, more memory traffic).

    The batch's rows are the distinct ids that take part in a bag: ids equal to ``padding_idx``
    and ids at positions outside every bag (segment id ``>= B``, entries past the last offset with
    ``include_last_offset``: the padding :func:`jaxbag.pack_bags` writes) are not among them, so a
    lazy optimiser such as :func:`sparse_adam` leaves their rows alone, as torch's ``SparseAdam``
    does.

    Inputs split over Explicit mesh axes (a data-parallel batch, a column- or row-split table)
    run as on an Auto mesh inside (the pullback recomputes the forward pass there): the bags
    are split as :func:`jaxbag.embedding_bag`'s, the row gradients over ``D`` as the table's
    columns.

    Args:
      weight: ``float [V, D]`` table.
      indices: ``int [N]`` or ``int [B, L]`` ids, as for :func:`jaxbag.embedding_bag`. Ids outside
        ``[0, V)`` are skipped (as under ``jit``), also eagerly; offsets and segment ids are checked
        eagerly as :func:`jaxbag.embedding_bag` checks them.
      offsets: optional ``int [B]`` offsets, as for :func:`jaxbag.embedding_bag`.
      size: ``U``, static number of row slots (``None``: ``min(N, V)``, always enough); see
        :func:`unique_rows`. Too small for a batch: eagerly a ``ValueError``; under ``jit`` the
        bags are still right, but the rows past the first ``U`` distinct ones (in increasing
        order) get no gradient.
      padding_idx: optional row to skip, as for :func:`jaxbag.embedding_bag`.
      **kwargs: the other keyword arguments of :func:`jaxbag.embedding_bag` (``mode``,
        ``per_sample_weights``, ``include_last_offset``, ``segment_ids``, ``num_bags``,
        ``max_norm``, ``norm_type``, ``scale_grad_by_freq``), typed as there for type checkers
        (``Unpack`` of a ``TypedDict``); another name is a ``TypeError``.

    Returns:
      ``(bags, pullback)``: ``bags`` ``[B, D]`` equal to ``embedding_bag(weight, indices, offsets,
      padding_idx=padding_idx, **kwargs)``; ``pullback(g)`` maps the cotangent ``g [B, D]`` to
      :class:`RowGrads` (``rows [U]``, ``grads [U, D]``). The gradient with respect to
      ``per_sample_weights`` is not returned (the pullback is for the table).

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> w = jnp.arange(8.0).reshape(4, 2)
      >>> bags, pullback = jaxbag.embedding_bag_rows(w, jnp.array([3, 1, 3]), jnp.array([0, 2]), mode="sum")
      >>> bags.tolist()
      [[8.0, 10.0], [6.0, 7.0]]
      >>> g = pullback(jnp.ones((2, 2)))
      >>> g.rows.tolist(), g.grads.tolist()
      ([1, 3, 4], [[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    """
    unknown = sorted(set(kwargs) - set(_BAG_KWARGS))
    if unknown:
        raise TypeError(
            f"embedding_bag_rows() got an unexpected keyword argument {unknown[0]!r}; it takes "
            f"size, padding_idx and the keyword arguments of jaxbag.embedding_bag: "
            f"{', '.join(_BAG_KWARGS)}."
        )
    weight = jnp.asarray(weight)
    indices = validation.as_ids(indices)
    validation.check_table(weight)
    validation.require_int("indices", indices)
    num_embeddings = weight.shape[0]
    pad = validation.normalize_padding_idx(padding_idx, num_embeddings)
    offsets = validation.as_ids(offsets)
    segment_ids = validation.as_ids(kwargs.get("segment_ids"))
    if segment_ids is not None:
        kwargs["segment_ids"] = segment_ids
    psw = kwargs.get("per_sample_weights")
    layout = validation.check_arguments(  # as embedding_bag, but out-of-range ids are skipped
        num_embeddings=num_embeddings, indices=indices, offsets=offsets,
        per_sample_weights=None if psw is None else jnp.asarray(psw), segment_ids=segment_ids,
        num_bags=kwargs.get("num_bags"), include_last_offset=kwargs.get("include_last_offset", False),
        mode=kwargs.get("mode", "mean"), scale_grad_by_freq=kwargs.get("scale_grad_by_freq", False),
        check_ids=False,
    )
    mesh = explicit.split_mesh(weight, indices, offsets, segment_ids, psw)
    if mesh is not None:
        return _checked(*_rows_explicit(mesh, weight, indices, offsets, size=size,
                                        padding_idx=padding_idx, **kwargs))
    seg = segments.bag_of_positions(indices, offsets, segment_ids)
    # The batch's rows are the ids that take part in a bag: not padding_idx, and not at a position
    # outside every bag (segment id >= B, past the last offset): such an id is padding, and a lazy
    # optimiser must not count its row as touched (torch's sparse gradient leaves it out too).
    valid = bag_terms.valid_positions(indices.reshape(-1), seg, num_embeddings, layout.num_bags, pad)
    check_slots(indices, valid, size, num_embeddings)
    rows, inverse = unique_rows(indices, num_embeddings, size=size, valid=valid.reshape(indices.shape))
    if kwargs.get("max_norm") is None and not kwargs.get("scale_grad_by_freq", False):
        # (the options that only the general path uses, at their defaults here, change nothing)
        return _checked(*_rows_direct(
            weight, indices, offsets, pad, rows, inverse, seg, layout,
            mode=kwargs.get("mode", "mean"), per_sample_weights=kwargs.get("per_sample_weights"),
            include_last_offset=kwargs.get("include_last_offset", False),
            segment_ids=kwargs.get("segment_ids")))
    overflow = None
    if size is not None and size < indices.size:  # valid ids past the U slots: no slot
        overflow = valid.reshape(indices.shape) & (inverse == size)
    return _checked(*_rows_local(weight, indices, offsets, rows, inverse, overflow, **kwargs))


def _checked(
    bags: Array, pullback: Callable[[Array], RowGrads]
) -> tuple[Array, Callable[[Array], RowGrads]]:
    """``pullback`` that first checks its cotangent: a float ``[B, D]``, the bags' shape (the
    kernel and XLA paths would otherwise read a wrong-sized one differently, without a word)."""

    def checked(g: Array) -> RowGrads:
        g = jnp.asarray(g)
        if g.shape != bags.shape or not jnp.issubdtype(g.dtype, jnp.floating):
            raise ValueError(
                f"g must be the cotangent of the bags: float {list(bags.shape)} (the bags' "
                f"[B, D]); got {g.dtype} {list(g.shape)}. Call pullback(g) with g = the "
                "gradient of the loss with respect to the bags, e.g. jax.grad(loss)(bags)."
            )
        return pullback(g)

    return bags, checked


def _rows_explicit(
    mesh: Any, weight: Array, indices: Array, offsets: Array | None, **kwargs: Any
) -> tuple[Array, Callable[[Array], RowGrads]]:
    """:func:`embedding_bag_rows` of inputs split over Explicit mesh axes.

    The bags, then the pullback, each run as on an Auto mesh (``auto_axes``: the sort, the
    gathers and the kernels are sharding type errors on split inputs), partitioned by the
    compiler. The bags come out split as :func:`jaxbag.embedding_bag`'s, the row gradients
    ``[U, D]`` over ``D`` as the table's columns, the rows whole. The pullback runs the forward
    pass again inside (only what the gradients need of it: the slots, and ``max``'s arg-max).
    """
    seg_ids, psw = kwargs.pop("segment_ids", None), kwargs.pop("per_sample_weights", None)
    args = (weight, indices, offsets, seg_ids, psw)

    def rows_of(w, i, o, s, p):
        return embedding_bag_rows(w, i, o, segment_ids=s, per_sample_weights=p, **kwargs)

    bags_sharding = ops._explicit_out_sharding(weight, indices, (offsets, seg_ids, psw))
    bags = explicit.run_as_auto(lambda *a: rows_of(*a)[0], mesh, bags_sharding, *args)
    assert bags_sharding is not None  # (an input is split over Explicit axes: we are here)
    grads_sharding = RowGrads._make((  # a tree of shardings shaped as RowGrads
        NamedSharding(mesh, PartitionSpec()),
        NamedSharding(mesh, PartitionSpec(None, bags_sharding.spec[1]))))

    def pullback(g: Array) -> RowGrads:
        return explicit.run_as_auto(lambda g, *a: rows_of(*a)[1](g), mesh, grads_sharding,
                                    jnp.asarray(g), *args)

    return bags, pullback


def _per_row(table: Array, ndim: int) -> dict[str, NamedSharding]:
    """Where an ``ndim``-dimensional per-row state of a table split over Explicit mesh axes
    goes: split as the table's first ``ndim`` dimensions, as keyword arguments of ``jnp.zeros``
    / ``jnp.full`` (none elsewhere, and under ``jit`` outside ``jax.set_mesh``: JAX's default
    placement)."""
    mesh = explicit.explicit_mesh(table)
    if mesh is None:
        return {}
    spec = (tuple(jax.typeof(table).sharding.spec) + (None,) * ndim)[:ndim]
    if isinstance(table, Tracer):  # (under jit: only within jax.set_mesh, as JAX asks)
        if jax.sharding.get_abstract_mesh().empty:
            return {}
        return {"out_sharding": NamedSharding(mesh, PartitionSpec(*spec))}
    # (eagerly: on the table's devices, also outside jax.set_mesh)
    sharding = cast(NamedSharding, table.sharding)
    return {"device": NamedSharding(sharding.mesh, PartitionSpec(*spec))}


def _explicit_update(
    update: Callable[[Array, Any, RowGrads], tuple[Array, Any]],
) -> Callable[[Array, Any, RowGrads], tuple[Array, Any]]:
    """``update`` that also takes a table, state or row gradients split over Explicit mesh
    axes: it then runs as on an Auto mesh (``auto_axes``; its gathers, scatters and kernel are
    sharding type errors there), and the table and state come out split as they came in."""

    @functools.wraps(update)
    def wrapped(table: Array, state: Any, row_grads: RowGrads) -> tuple[Array, Any]:
        mesh = explicit.split_mesh(table, *jax.tree.leaves(state), *jax.tree.leaves(row_grads))
        if mesh is None:
            return update(table, state, row_grads)
        out_sharding = jax.tree.map(functools.partial(explicit.kept_sharding, mesh), (table, state))
        return explicit.run_as_auto(update, mesh, out_sharding, table, state, row_grads)

    return wrapped


def _rows_direct(
    weight: Array,
    indices: Array,
    offsets: Array | None,
    pad: int | None,
    rows: Array,
    inverse: Array,
    seg: Array,
    layout: validation.Layout,
    *,
    mode: Mode,
    per_sample_weights: ArrayLike | None,
    include_last_offset: bool,
    segment_ids: ArrayLike | None,
) -> tuple[Array, Callable[[Array], RowGrads]]:
    """The common case: bags straight from the table, pullback by a direct scatter of the bag
    cotangents into the row slots (no ``[U, D]`` gathered copy of the rows, no vjp machinery).
    ``seg`` is the bag of each position (``segments.bag_of_positions``), ``layout`` the checked form."""
    psw = None if per_sample_weights is None else jnp.asarray(per_sample_weights)
    features = weight.shape[1]
    b = layout.num_bags
    ids = indices.reshape(-1)
    n = ids.shape[0]
    u = rows.shape[0]
    acc = acc_dtype(weight.dtype)
    if b == 0 or n == 0:
        bags = jnp.zeros((b, features), weight.dtype)
        return bags, lambda g: RowGrads(rows=rows, grads=jnp.zeros((u, features), acc))
    if layout.two_d:
        bounds, lay = jnp.arange(0, n, indices.shape[1], dtype=jnp.int32), 1
    elif offsets is not None:
        bounds, lay = offsets.reshape(-1), 1
    else:
        bounds, lay = jnp.asarray(segment_ids).reshape(-1), 0
    psw_flat = None if psw is None else psw.reshape(-1)
    bags, arg = fast_forward.bag_reduce_with_arg(
        weight, ids, bounds, psw_flat, num_bags=b, padding_idx=pad, mode=mode, layout=lay,
        include_last_offset=include_last_offset,
    )
    slot = inverse.reshape(-1)

    def pullback(g: Array) -> RowGrads:
        prep = fast_forward.Prep(weight, ids, seg, psw_flat, b, pad, mode)
        coef = prep.w if prep.inv_den is None else prep.w * prep.inv_den[prep.seg_c]
        ct = jnp.asarray(g).astype(acc)
        grads = sparse_kernels.rows_grad(ct, slot, prep.seg_c, coef.astype(acc), arg, u, mode)
        return RowGrads(rows=rows, grads=grads)

    return bags, pullback


def _rows_local(
    weight: Array, indices: Array, offsets: ArrayLike | None, rows: Array, inverse: Array,
    overflow: Array | None, **kwargs: Any,
) -> tuple[Array, Callable[[Array], RowGrads]]:
    """General case (``max_norm``, ``scale_grad_by_freq``): the bag op on the gathered rows.

    ``local`` is ``[U + 1, D]``: the slots' rows, then a zero row for skipped ids (the op's
    padding row). With ``overflow`` (``bool`` of indices' shape: valid ids without a slot, when
    ``size`` is too small), each such position gets its own row after those, outside the
    gradient: it still counts in its bag (value, mean's count) as in ``embedding_bag``.
    ``local`` is in the accumulation dtype, so the vjp sums a row's gradient in float32 for
    bf16/f16 tables, as the direct path does (the op's values are the same: it accumulates in
    that dtype anyway).
    """
    u = rows.shape[0]
    acc = acc_dtype(weight.dtype)
    local = jnp.take(weight, rows, axis=0, mode="fill", fill_value=0).astype(acc)
    local = jnp.concatenate([local, jnp.zeros((1, weight.shape[1]), acc)], axis=0)
    extra = None
    if overflow is not None:
        own = jnp.arange(u + 1, u + 1 + indices.size, dtype=inverse.dtype).reshape(indices.shape)
        inverse = jnp.where(overflow, own, inverse)
        extra = jax.lax.stop_gradient(jnp.take(weight, indices.reshape(-1), axis=0, mode="fill",
                                               fill_value=0).astype(acc))

    def bag(table: Array) -> Array:
        if extra is not None:
            table = jnp.concatenate([table, extra], axis=0)
        return ops.embedding_bag(table, inverse, offsets, padding_idx=u, **kwargs)

    # The bags from a direct call, not jax.vjp's primal output: differentiated from outside,
    # that output is the custom rules' forward code, so scale_grad_by_freq's 1/count was lost
    # (jax.grad through the bags gave row gradients as if it were off). Under jit, XLA shares
    # the two forward computations.
    bags = bag(local)
    _, vjp = jax.vjp(bag, jax.lax.stop_gradient(local))

    def pullback(g: Array) -> RowGrads:
        (g_local,) = vjp(jnp.asarray(g).astype(acc))
        return RowGrads(rows=rows, grads=g_local[:u])

    return bags.astype(weight.dtype), pullback


def _log(b: float) -> float:
    """``log(b)`` in double, ``-inf`` for ``b = 0`` (then ``1 - b ** t`` is 1)."""
    return math.log(b) if b > 0 else -math.inf


def _lr_fn(learning_rate: ScalarOrSchedule) -> Callable[[Array, jnp.dtype], Array]:
    """``lr(count, dtype)``: the learning rate at step ``count`` as a scalar of ``dtype``."""
    if callable(learning_rate):
        return lambda count, dtype: jnp.asarray(learning_rate(count)).astype(dtype)
    lr = validation.check_nonnegative("learning_rate", learning_rate, "0.01")
    return lambda count, dtype: jnp.asarray(lr, dtype)


def _check_chunk(chunk: object) -> int:
    if not validation.is_static_int(chunk, 1):
        raise ValueError(
            f"chunk must be an int >= 1 (rows per step of the update loop); got {chunk!r}, e.g. "
            "chunk=1024."
        )
    return int(chunk)


def check_optimizer(optimizer: object) -> None:
    """Raises unless ``optimizer`` is a :class:`SparseOptimizer` (an optax transformation has an
    ``init`` and an ``update`` too, but takes dense gradients: its state would not be per-row)."""
    if not isinstance(optimizer, SparseOptimizer):
        raise TypeError(
            f"optimizer must be a jaxbag.SparseOptimizer, e.g. jaxbag.sparse_adam(1e-3) (called); "
            f"got {optimizer!r}."
        )


@functools.lru_cache(maxsize=64)
def state_spec(init: Callable[[Array], Any], shape: tuple[int, ...], dtype: jnp.dtype) -> Any:
    """The shapes and dtypes of ``init``'s state for a table (cached: an eager update checks it
    on every call)."""
    return jax.eval_shape(init, jax.ShapeDtypeStruct(shape, dtype))


def _check_table(table: Array, state: Any, init: Callable[[Array], Any], maker: str,
                 row_grads: RowGrads) -> None:
    """Static checks of an update: the state is what ``init(table)`` makes for this table (its
    type, and every leaf's shape: the fused CPU kernel reads and writes the moments at the
    table's row offsets, so a state made for a smaller table must never reach it)."""
    validation.check_table(table, "table")
    want = state_spec(init, table.shape, jnp.dtype(table.dtype))
    if not isinstance(state, type(want)):
        raise TypeError(
            f"state must be the {type(want).__name__} that jaxbag.{maker}(...).init(table) "
            f"returns; got {type(state).__name__}. Each sparse optimiser takes its own init's "
            "state (after switching optimisers, init a new state)."
        )
    for name in want._fields:  # (moments kept in another float dtype are fine)
        got, w = getattr(state, name), getattr(want, name)
        if jnp.shape(got) != w.shape:
            raise ValueError(
                f"state.{name} has shape {jnp.shape(got)}; for a table of shape {table.shape} it "
                f"must be {w.shape}. The state belongs to another table: make this table's with "
                f"jaxbag.{maker}(...).init(table)."
            )
        got_dtype = jnp.result_type(got)
        if jnp.issubdtype(w.dtype, jnp.floating) and not jnp.issubdtype(got_dtype, jnp.floating):
            # (an int moment rounded every step to 0: Adam stood still with no error)
            raise TypeError(
                f"state.{name} has dtype {got_dtype}; it must be a float dtype ({w.dtype} as "
                f"jaxbag.{maker}(...).init(table) makes it, or e.g. bfloat16 to save memory). "
                f"Cast it back, e.g. state._replace({name}=state.{name}.astype(jnp.float32))."
            )
    rows, grads = row_grads
    if not jnp.issubdtype(rows.dtype, jnp.integer) or not jnp.issubdtype(grads.dtype,
                                                                         jnp.floating):
        raise TypeError(
            f"row_grads must hold integer rows and float grads; got rows {rows.dtype} and "
            f"grads {grads.dtype}. Build it with embedding_bag_rows(...)'s pullback, or "
            "jaxbag.RowGrads(rows.astype(jnp.int32), grads)."
        )
    if rows.ndim != 1 or grads.ndim != 2 or grads.shape != (rows.shape[0], table.shape[1]):
        raise ValueError(
            f"row_grads must hold rows [U] and grads [U, D={table.shape[1]}]; got rows "
            f"{rows.shape} and grads {grads.shape}. Build it with embedding_bag_rows(...)'s pullback."
        )
    if validation.is_concrete(rows):  # (under jit: the caller's promise, as documented)
        given = np.asarray(rows)
        uniq, counts = np.unique(given[(given >= 0) & (given < table.shape[0])],
                                 return_counts=True)
        if counts.size and counts.max() > 1:
            row = int(uniq[np.argmax(counts > 1)])
            at = np.flatnonzero(given == row).tolist()
            raise ValueError(
                f"row_grads.rows must be distinct; row {row} is at positions {at[:4]}"
                f"{' ...' if len(at) > 4 else ''} (its gradients would not be summed on every "
                "path). Look the ids up in one embedding_bag_rows call (its pullback gives each "
                "row once), or sum the gradients of equal rows first."
            )


def _gather(x: Array, rows: Array) -> Array:
    """``x[rows]`` with out-of-range rows (fill slots) reading zeros."""
    return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)


def _scatter_set(x: Array, rows: Array, values: Array) -> Array:
    return x.at[rows].set(values.astype(x.dtype), mode="drop", unique_indices=True)


def _update_rows(
    arrays: tuple[Array, ...],
    rows: Array,
    grads: Array,
    hyper: tuple[Array, ...],
    *,
    fn: Callable[[tuple[Array, ...], Array, tuple[Array, ...]], tuple[Array, ...]],
    chunk: int,
) -> tuple[Array, ...]:
    """``arrays[i][rows] = fn(tuple(a[rows] for a in arrays), grads, hyper)[i]``, ``chunk`` rows
    at a time.

    A ``while_loop`` over chunks of rows: each step gathers ``[chunk, ...]`` rows of every array,
    applies ``fn`` and scatters them back into the loop-carried (in place, when donated) arrays.
    Done in one piece, XLA:CPU would allocate several ``[U, D]`` temporaries per step; chunks keep
    them small and in cache (measured ~3-4x faster at ``U = 40960, D = 128``). The loop stops after
    the last chunk holding a real row, so the fill slots at the end cost nothing.
    """
    rows, grads = jnp.asarray(rows), jnp.asarray(grads)  # (NumPy: indexed by the loop counter)
    u = rows.shape[0]
    if u == 0:  # a batch without ids: nothing to update
        return tuple(arrays)
    num = arrays[0].shape[0]
    fill = segments.DROPPED_ROW  # the padding slots' row, dropped by the scatters
    rows = segments.dropped_rows(rows, num)  # (a negative row would wrap)
    k = max(1, min(int(chunk), u))
    m = -(-u // k)
    pad = m * k - u
    if pad:
        rows = jnp.concatenate([rows, jnp.full((pad,), fill, rows.dtype)])
        grads = jnp.concatenate([grads, jnp.zeros((pad, *grads.shape[1:]), grads.dtype)])
    rows_c = rows.reshape(m, k)
    grads_c = grads.reshape(m, k, *grads.shape[1:])
    real = (rows >= 0) & (rows < num)
    last = jnp.max(jnp.where(real, jnp.arange(1, m * k + 1, dtype=jnp.int32), 0))
    n_chunks = (last + (k - 1)) // k

    def body(carry):
        c, arrs = carry
        r, g = rows_c[c], grads_c[c]
        new = fn(tuple(_gather(a, r) for a in arrs), g, hyper)
        return c + 1, tuple(_scatter_set(a, r, x) for a, x in zip(arrs, new))

    _, out = lax.while_loop(lambda cr: cr[0] < n_chunks, body, (jnp.int32(0), tuple(arrays)))
    return out


def sparse_sgd(learning_rate: ScalarOrSchedule, *, chunk: int = 1024) -> TableOptimizer:
    """Plain SGD on the touched rows: ``table[r] -= lr * g[r]``.

    Equal to dense SGD (``jax.grad`` + ``optax.sgd``), whose gradient is zero on the other rows.

    Args:
      learning_rate: a float, or a schedule ``count -> lr`` (e.g. an ``optax`` schedule).
      chunk: rows updated per step of the internal ``lax.while_loop`` (static; a speed knob only).

    Returns:
      A :class:`SparseOptimizer` with :class:`SgdState`.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> opt = jaxbag.sparse_sgd(0.5)
      >>> table, state = opt.update(jnp.ones((3, 2)), opt.init(jnp.ones((3, 2))),
      ...                           jaxbag.RowGrads(jnp.array([1, 3]), jnp.ones((2, 2))))
      >>> table.tolist()
      [[1.0, 1.0], [0.5, 0.5], [1.0, 1.0]]
    """
    lr_fn = _lr_fn(learning_rate)
    chunk = _check_chunk(chunk)

    def init(table: Array) -> SgdState:
        del table
        return SgdState(count=jnp.zeros((), jnp.int32))

    def update(table: Array, state: SgdState, row_grads: RowGrads) -> tuple[Array, SgdState]:
        _check_table(table, state, init, "sparse_sgd", row_grads)
        rows, grads = row_grads
        c = acc_dtype(table.dtype)
        lr = lr_fn(state.count, c)

        def fn(old, g, hyper):
            (w,), (lr,) = old, hyper
            return (w.astype(c) - lr * g.astype(c),)

        (table,) = sparse_kernels.fused_row_update(
            "sgd", (table,), rows, grads, (lr,),
            functools.partial(_update_rows, fn=fn, chunk=chunk))
        return table, SgdState(count=state.count + 1)

    return SparseOptimizer(init=init, update=_explicit_update(update))


def sparse_adagrad(
    learning_rate: ScalarOrSchedule = 0.01,
    eps: float = 1e-8,
    initial_accumulator_value: float = 0.0,
    *,
    chunk: int = 1024,
) -> TableOptimizer:
    """Row-wise Adagrad, as fbgemm's ``EXACT_ROWWISE_ADAGRAD``: one accumulator per row.

    For each touched row ``r`` with gradient ``g [D]``::

        sum_sq[r] += mean(g ** 2)
        table[r]  -= lr * g / (sqrt(sum_sq[r]) + eps)

    The state is ``[V]`` floats (not ``[V, D]``), the main reason fbgemm uses it for big tables.

    Args:
      learning_rate: a float or a schedule ``count -> lr``.
      eps: added to the root of the accumulator.
      initial_accumulator_value: starting value of every row's accumulator.
      chunk: rows updated per step of the internal ``lax.while_loop`` (static; a speed knob only).

    Returns:
      A :class:`SparseOptimizer` with :class:`RowwiseAdagradState`.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> opt = jaxbag.sparse_adagrad(1.0, eps=0.0)
      >>> table, state = opt.update(jnp.zeros((2, 2)), opt.init(jnp.zeros((2, 2))),
      ...                           jaxbag.RowGrads(jnp.array([0]), jnp.array([[3.0, 4.0]])))
      >>> (table * 1000).round().tolist(), state.sum_sq.tolist()
      ([[-849.0, -1131.0], [0.0, 0.0]], [12.5, 0.0])
    """
    lr_fn = _lr_fn(learning_rate)
    chunk = _check_chunk(chunk)
    eps = validation.check_nonnegative("eps", eps, "1e-8")
    initial_accumulator_value = validation.check_nonnegative(
        "initial_accumulator_value", initial_accumulator_value, "0.0")

    def init(table: Array) -> RowwiseAdagradState:
        return RowwiseAdagradState(
            count=jnp.zeros((), jnp.int32),
            sum_sq=jnp.full((table.shape[0],), initial_accumulator_value, acc_dtype(table.dtype),
                            **_per_row(table, 1)),
        )

    def update(
        table: Array, state: RowwiseAdagradState, row_grads: RowGrads
    ) -> tuple[Array, RowwiseAdagradState]:
        _check_table(table, state, init, "sparse_adagrad", row_grads)
        rows, grads = row_grads
        c = acc_dtype(table.dtype)
        lr = lr_fn(state.count, c)

        def fn(old, g, hyper):
            (w, acc), lr = old, hyper[0]
            g = g.astype(c)
            new_sum = acc.astype(c) + jnp.mean(g * g, axis=1)
            scale = lr / (jnp.sqrt(new_sum) + jnp.asarray(eps, c))
            return w.astype(c) - scale[:, None] * g, new_sum

        hyper = (lr, jnp.asarray(eps, c))
        table, sum_sq = sparse_kernels.fused_row_update(
            "adagrad", (table, state.sum_sq), rows, grads, hyper,
            functools.partial(_update_rows, fn=fn, chunk=chunk))
        return table, RowwiseAdagradState(count=state.count + 1, sum_sq=sum_sq)

    return SparseOptimizer(init=init, update=_explicit_update(update))


def sparse_adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    chunk: int = 1024,
) -> TableOptimizer:
    """Lazy Adam, as ``torch.optim.SparseAdam``: moments move only for the touched rows.

    With the global step ``t`` (counted on every update, touched or not, as torch does)::

        mu[r] = b1 * mu[r] + (1 - b1) * g          nu[r] = b2 * nu[r] + (1 - b2) * g ** 2
        table[r] -= lr * sqrt(1 - b2 ** t) / (1 - b1 ** t) * mu[r] / (sqrt(nu[r]) + eps)

    Rows not in the batch keep their moments (no decay), unlike dense Adam.

    Args:
      learning_rate: a float or a schedule ``count -> lr``.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to ``sqrt(nu)`` (outside the bias correction, as torch).
      chunk: rows updated per step of the internal ``lax.while_loop`` (static; a speed knob only).

    Returns:
      A :class:`SparseOptimizer` with :class:`LazyAdamState` (two ``[V, D]`` moments: float32,
      float64 for float64 tables).

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> opt = jaxbag.sparse_adam(0.1)
      >>> table, state = opt.update(jnp.zeros((2, 2)), opt.init(jnp.zeros((2, 2))),
      ...                           jaxbag.RowGrads(jnp.array([1]), jnp.array([[1.0, -2.0]])))
      >>> (table * 1000).round().tolist()
      [[0.0, 0.0], [-100.0, 100.0]]
    """
    lr_fn = _lr_fn(learning_rate)
    chunk = _check_chunk(chunk)
    eps = validation.check_nonnegative("eps", eps, "1e-8")
    b1f, b2f = float(b1), float(b2)
    c1, c2 = 1.0 - b1f, 1.0 - b2f  # in double, then one rounding (as torch's alpha=1 - beta)
    for name, b in (("b1", b1f), ("b2", b2f)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1) (as torch's betas); got {name}={b!r}.")

    def init(table: Array) -> LazyAdamState:
        shape = table.shape
        return LazyAdamState(
            count=jnp.zeros((), jnp.int32),
            mu=jnp.zeros(shape, acc_dtype(table.dtype), **_per_row(table, 2)),
            nu=jnp.zeros(shape, acc_dtype(table.dtype), **_per_row(table, 2)),
        )

    def update(
        table: Array, state: LazyAdamState, row_grads: RowGrads
    ) -> tuple[Array, LazyAdamState]:
        _check_table(table, state, init, "sparse_adam", row_grads)
        rows, grads = row_grads
        count = state.count + 1
        c = acc_dtype(table.dtype)
        t = count.astype(c)
        # 1 - b ** t as -expm1(t * log(b)) with log(b) from double: float32 b ** t rounds b
        # (0.999f is 1.3e-5 off 0.999 in 1 - b), torch's bias corrections are Python doubles.
        bc1, bc2 = (-jnp.expm1(t * jnp.asarray(_log(b), c)) for b in (b1f, b2f))
        step_size = lr_fn(state.count, c) * jnp.sqrt(bc2) / bc1

        def fn(old, g, hyper):
            (w, mu, nu), step_size = old, hyper[0]
            g = g.astype(c)
            mu = mu.astype(c) * b1f + c1 * g
            nu = nu.astype(c) * b2f + c2 * (g * g)
            return w.astype(c) - step_size * (mu / (jnp.sqrt(nu) + jnp.asarray(eps, c))), mu, nu

        hyper = (step_size, *(jnp.asarray(x, c) for x in (b1f, c1, b2f, c2, eps)))
        table, mu, nu = sparse_kernels.fused_row_update(
            "adam", (table, state.mu, state.nu), rows, grads, hyper,
            functools.partial(_update_rows, fn=fn, chunk=chunk))
        return table, LazyAdamState(count=count, mu=mu, nu=nu)

    return SparseOptimizer(init=init, update=_explicit_update(update))

