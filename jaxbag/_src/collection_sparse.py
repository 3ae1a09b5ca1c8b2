"""Sparse row updates for collections: bags of every feature plus a pullback to each group's rows.

Legend: ``B`` examples, ``F_g`` the features of group ``g``, ``D_f`` the width of feature ``f``'s
table, ``U_g`` the row slots of group ``g``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbag._src import collection, sharding
from jaxbag._src.collection import CollectionLayout
from jaxbag._src.jagged import JaggedFeatures, pack_features
from jaxbag._src.sparse import RowGrads, SparseOptimizer, embedding_bag_rows


def embedding_bag_collection_rows(
    params: Mapping[str, Array],
    features: JaggedFeatures,
    *,
    layout: CollectionLayout,
    size: int | Mapping[str, int] | None = None,
    concat: bool = False,
    dtype: Any = None,
) -> tuple[dict[str, Array] | Array, Callable[[Any], dict[str, RowGrads]]]:
    """:func:`jaxbag.embedding_bag_collection` plus a pullback to the touched rows of each group.

    The collection form of :func:`jaxbag.embedding_bag_rows`: every group array (one table, or a
    stack of tables of equal width, dtype and mode) gets one :class:`jaxbag.RowGrads` holding the
    distinct rows its features read, so a sparse optimiser (:func:`jaxbag.sparse_adam`, ...)
    updates only those rows, and a table shared by several features gets one gradient per row.
    No ``[V, D]`` gradient is built.

    With a sharding plan (``collection_layout(..., plan=...)``) a row-sharded group's bags and
    row gradients come from :func:`jaxbag.sharding.embedding_bag_rows`: its ``RowGrads`` are
    split over the plan's ``axis_name``, each shard holding ``U_g`` slots of *local* row numbers
    of the rows it owns, so no ``[V, D]`` gradient is built and no row leaves its device; a group
    the plan replicates gets ordinary (global) ``RowGrads``. :func:`collection_optimizer` applies
    either kind. As the sharded ops, call it under ``jax.jit`` then (eagerly it works, but
    every call compiles its ``shard_map`` bodies again: about 2 s for 4 groups on a 2-core CPU).

    Args:
      params: ``{group name: array}`` from :func:`jaxbag.init_collection` (placed as
        ``layout.param_shardings()`` with a plan).
      features: a :class:`jaxbag.JaggedFeatures` holding (at least) ``layout.feature_names``
        (with a plan, split as its ``batch_axis``: ``num_shards`` = that axis's size).
      layout: the :class:`jaxbag.CollectionLayout` (stacked or not, with or without a plan).
      size: ``U_g``, the static number of row slots: one int for every group, ``{group name:
        int}``, or ``None`` (each group's packed id count: always enough). Too small: as
        :func:`jaxbag.embedding_bag_rows` (an error eagerly; under ``jit`` the rows past the
        first ``U_g`` distinct ones get no gradient).
      concat: return one ``[B, sum D_f]`` array (``feature_names`` order); the pullback then
        takes a cotangent of that shape.
      dtype: dtype of the concatenated output (see :func:`jaxbag.concat_features`).

    Returns:
      ``(out, pullback)``: ``out`` equal to ``embedding_bag_collection(params, features,
      layout=layout, concat=concat, dtype=dtype)`` (with a plan: up to float summation order);
      ``pullback(g)`` maps the cotangent (``{feature: [B, D_f]}``, or ``[B, sum D_f]`` with
      ``concat``) to ``{group name: RowGrads}`` (rows of the group array, ``[U_g]`` and ``[U_g,
      D]``; ``[n * U_g]`` and ``[n * U_g, D]`` split over ``n`` shards for a row-sharded group).

    Raises:
      IndexError / ValueError: as :func:`jaxbag.embedding_bag_collection` (eagerly, an id outside
        its table; under ``jit`` such an id is skipped and touches no row).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag
      >>> layout = jaxbag.collection_layout([
      ...     jaxbag.TableConfig("item", 10, 2, ("item", "last_item"), mode="sum")])
      >>> params = {"item": jnp.arange(20.0).reshape(10, 2)}
      >>> jf = jaxbag.JaggedFeatures.from_lists({"item": [[1, 2], [3]], "last_item": [[3], []]})
      >>> out, pullback = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout, size=4)
      >>> out["item"].tolist(), out["last_item"].tolist()
      ([[6.0, 8.0], [6.0, 7.0]], [[6.0, 7.0], [0.0, 0.0]])
      >>> g = pullback({"item": jnp.ones((2, 2)), "last_item": jnp.ones((2, 2))})["item"]
      >>> g.rows.tolist(), g.grads[:, 0].tolist()   # row 3 read twice; slot 4 unused (row V)
      ([1, 2, 3, 10], [1.0, 1.0, 2.0, 0.0])
      >>> opt = jaxbag.collection_optimizer(jaxbag.sparse_sgd(0.1), layout=layout)
      >>> params, state = opt.update(params, opt.init(params), pullback(
      ...     {"item": jnp.ones((2, 2)), "last_item": jnp.ones((2, 2))}))
      >>> params["item"][:, 0].tolist()
      [0.0, 1.9, 3.9, 5.8, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0]
    """
    collection.check_features(layout, features)
    collection.check_params(layout, params)
    plan = layout.plan
    if plan is not None:
        collection.check_batch_shards(plan, features)
    if isinstance(size, Mapping):
        unknown = sorted(set(size) - {g.name for g in layout.groups})
        if unknown:
            raise ValueError(
                f"size names unknown groups {unknown}; the groups are "
                f"{[g.name for g in layout.groups]}."
            )
    b = features.batch_size
    # With a plan, number the bags batch shard first: the [F * B, D] bags split over batch_axis
    # then keep each example on its batch shard (no bag traffic between batch shards).
    n_split = features.num_shards if plan is not None else 1

    def batch_split(x: Array, shape: tuple[int, ...]) -> Array:
        """``x.reshape(shape)``; with a plan, the leading axis split over its batch_axis."""
        if plan is None:
            return x.reshape(shape)
        spec = P(sharding.spec_entry(plan.batch_axis), *[None] * (len(shape) - 1))
        if sharding.is_explicit(plan.mesh):  # (a reshape of a split axis needs its sharding)
            return jnp.reshape(x, shape, out_sharding=NamedSharding(plan.mesh, spec))
        return sharding.constrain(x.reshape(shape), plan.mesh, spec)

    out: dict[str, Array] = {}
    pullbacks = []
    for g in layout.groups:
        keys = g.feature_names
        collection.check_no_max_weights(g, keys, features)
        ids, seg, w = pack_features(features, keys, collection.group_ids(g, layout, keys),
                                    shard_major=n_split > 1)
        kwargs = dict(
            segment_ids=seg,
            num_bags=len(keys) * b,
            mode=g.mode,
            per_sample_weights=w,
            padding_idx=g.pad_row,
            size=size.get(g.name) if isinstance(size, Mapping) else size,
        )
        if plan is not None and g.sharded:  # row grads per shard, local rows (see the docstring)
            bags, pb = sharding.embedding_bag_rows(
                params[g.name],
                ids,
                mesh=plan.mesh,
                axis_name=plan.axis_name,
                batch_axis=plan.batch_axis,
                **kwargs,
            )
        else:  # a plain group, or one replicated by the plan
            bags, pb = embedding_bag_rows(params[g.name], ids, **kwargs)
        blocks = batch_split(bags, (n_split, len(keys), b // n_split, g.features))
        out.update({f: batch_split(blocks[:, j], (b, g.features)) for j, f in enumerate(keys)})
        pullbacks.append((g, keys, pb))
    out = {f: out[f] for f in layout.feature_names}  # (with a plan, split over the batch)

    def pullback(cotangent: Any) -> dict[str, RowGrads]:
        if concat:
            widths = [layout.table_of(f).features for f in layout.feature_names]
            starts = [sum(widths[:i]) for i in range(len(widths))]
            cotangent = {
                f: cotangent[:, s : s + d] for f, s, d in zip(layout.feature_names, starts, widths)
            }
        grads = {}
        for g, keys, pb in pullbacks:  # the cotangents in the bags' order (above)
            parts = [batch_split(jnp.asarray(cotangent[f], g.dtype), (n_split, b // n_split,
                                                                      g.features))
                     for f in keys]
            ct = batch_split(jnp.stack(parts, axis=1), (len(keys) * b, g.features))
            if plan is not None and not g.sharded:  # a replicated group's bags are computed whole
                ct = sharding.constrain(ct, plan.mesh, P())
            grads[g.name] = pb(ct)
        return grads

    if concat:
        return collection.concat_features(layout, out, dtype), pullback
    return out, pullback


def collection_optimizer(optimizer: SparseOptimizer, *, layout: CollectionLayout) -> SparseOptimizer:
    """Lifts a sparse optimiser to a collection's ``{group name: array}`` parameters.

    The returned :class:`jaxbag.SparseOptimizer` works on whole collections: ``init(params)``
    gives ``{group name: state}`` and ``update(params, state, row_grads)`` -- ``row_grads`` from
    :func:`embedding_bag_collection_rows`'s pullback -- updates only the touched rows of every
    group. With a sharding plan, a row-sharded group's state is row-sharded like its array
    (:func:`jaxbag.sharding.sparse_init`) and each shard updates its own rows
    (:func:`jaxbag.sharding.sparse_update`: no communication); a replicated group is updated as
    on one device.

    Args:
      optimizer: :func:`jaxbag.sparse_sgd`, :func:`jaxbag.sparse_adagrad`,
        :func:`jaxbag.sparse_adam`, or your own :class:`jaxbag.SparseOptimizer`.
      layout: the :class:`jaxbag.CollectionLayout` of the parameters.

    Returns:
      A ``SparseOptimizer`` whose ``init`` takes ``{group name: [V_g, D_g]}`` and whose
      ``update(params, state, row_grads) -> (params, state)`` takes ``{group name: RowGrads}``;
      donate ``params`` and ``state`` to ``jit`` to update in place.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag
      >>> layout = jaxbag.collection_layout([jaxbag.TableConfig("a", 4, 2, ("a",), mode="sum")])
      >>> opt = jaxbag.collection_optimizer(jaxbag.sparse_adam(0.1), layout=layout)
      >>> state = opt.init({"a": jnp.zeros((4, 2))})
      >>> type(state["a"]).__name__
      'LazyAdamState'
    """

    sharded = {g.name for g in layout.groups if layout.plan is not None and g.sharded}

    def _state_spec(a: Array, where: dict[str, Any] | None) -> P:
        spec = P() if where is None or a.ndim == 0 else P(sharding.spec_entry(where["axis_name"]))
        return sharding.canonical_spec(layout.plan.mesh, spec, a.ndim)

    def placement(name: str) -> dict[str, Any] | None:
        if name not in sharded:
            return None
        return dict(mesh=layout.plan.mesh, axis_name=layout.plan.axis_name)

    def init(params: Mapping[str, Array]) -> dict[str, Any]:
        collection.check_params(layout, params)
        state = {}
        for g in layout.groups:
            where = placement(g.name)
            if layout.plan is None:
                state[g.name] = optimizer.init(params[g.name])
                continue
            if where is not None:
                s = sharding.sparse_init(optimizer, params[g.name], **where)
            else:
                s = optimizer.init(params[g.name])
            # placed as a jitted update returns it (row-sharded as the group, or replicated;
            # sharding.canonical_spec), so a training step compiles once
            mesh = layout.plan.mesh
            state[g.name] = jax.tree.map(
                lambda a: jax.device_put(a, NamedSharding(mesh, _state_spec(a, where))), s
            )
        return state

    def update(
        params: Mapping[str, Array], state: Mapping[str, Any], row_grads: Mapping[str, RowGrads]
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        collection.check_params(layout, params)
        names = [g.name for g in layout.groups]
        for what, tree in (("state", state), ("row_grads", row_grads)):
            if sorted(tree) != sorted(names):
                raise ValueError(
                    f"{what} must have one entry per group {names}; got {sorted(tree)}. Build it "
                    "with this optimiser's init / embedding_bag_collection_rows on the same layout."
                )
        new_params, new_state = dict(params), {}
        for name in names:
            where = placement(name)
            args = (params[name], state[name], row_grads[name])
            if where is not None:
                new_params[name], new_state[name] = sharding.sparse_update(optimizer, *args, **where)
                continue
            new_params[name], new_state[name] = optimizer.update(*args)
            if layout.plan is not None:  # replicated: returned as init_collection / init place it
                mesh = layout.plan.mesh
                new_params[name] = sharding.constrain(new_params[name], mesh, P())
                new_state[name] = jax.tree.map(
                    lambda a: sharding.constrain(a, mesh, P()), new_state[name])
        return new_params, new_state

    return SparseOptimizer(init=init, update=update)
