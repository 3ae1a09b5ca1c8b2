"""Sparse row updates for collections: bags of every feature plus a pullback to each group's rows.

Legend: ``B`` examples, ``F_g`` the features of group ``g``, ``D_f`` the width of feature ``f``'s
table, ``U_g`` the row slots of group ``g``.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbag._src import bag_terms, collection, sharding, validation
from jaxbag._src.collection import CollectionLayout
from jaxbag._src.jagged import JaggedFeatures, pack_features
from jaxbag._src.sparse import (
    RowGrads, SparseOptimizer, TableOptimizer, check_optimizer, check_slots, embedding_bag_rows,
)


_Pullback = Callable[[Any], dict[str, RowGrads]]


@overload
def embedding_bag_collection_rows(
    params: Mapping[str, Array], features: JaggedFeatures, *, layout: CollectionLayout,
    size: int | Mapping[str, int] | None = None, concat: Literal[False] = False, dtype: Any = None,
) -> tuple[dict[str, Array], _Pullback]: ...
@overload
def embedding_bag_collection_rows(
    params: Mapping[str, Array], features: JaggedFeatures, *, layout: CollectionLayout,
    size: int | Mapping[str, int] | None = None, concat: Literal[True], dtype: Any = None,
) -> tuple[Array, _Pullback]: ...
@overload
def embedding_bag_collection_rows(
    params: Mapping[str, Array], features: JaggedFeatures, *, layout: CollectionLayout,
    size: int | Mapping[str, int] | None = None, concat: bool, dtype: Any = None,
) -> tuple[dict[str, Array] | Array, _Pullback]: ...
def embedding_bag_collection_rows(
    params: Mapping[str, Array],
    features: JaggedFeatures,
    *,
    layout: CollectionLayout,
    size: int | Mapping[str, int] | None = None,
    concat: bool = False,
    dtype: Any = None,
) -> tuple[dict[str, Array] | Array, _Pullback]:
    """:func:`jaxbag.embedding_bag_collection` plus a pullback to the touched rows of each group.

    The collection form of :func:`jaxbag.embedding_bag_rows`: every group array (one table, or a
    stack of tables of equal width, dtype and mode) gets one :class:`jaxbag.RowGrads` holding the
    distinct rows its features read, so a sparse optimiser (:func:`jaxbag.sparse_adam`, ...)
    updates only those rows, and a table shared by several features gets one gradient per row.
    No ``[V, D]`` gradient is built.

    With a sharding plan (``collection_layout(..., plan=...)``) the work is data parallel over
    the plan's ``batch_axis``: each device looks up and backpropagates only its batch shard's
    ids, and the ids are gathered over ``batch_axis`` (ints) so every device finds the same
    distinct rows. A row-sharded group's ``RowGrads`` are split over the plan's ``axis_name``,
    each shard holding ``U_g`` slots of *local* row numbers of the rows it owns (as
    :func:`jaxbag.sharding.embedding_bag_rows`), so no ``[V, D]`` gradient is built and no row
    leaves its device; a group the plan replicates gets ordinary (global) ``RowGrads``, the same
    on every device. :func:`collection_optimizer` applies either kind. As the sharded ops, call
    it under ``jax.jit`` then (eagerly it works, but every call compiles its ``shard_map``
    bodies again: about 2 s for 4 groups on a 2-core CPU).

    Args:
      params: ``{group name: array}`` from :func:`jaxbag.init_collection` (placed as
        ``layout.param_shardings()`` with a plan).
      features: a :class:`jaxbag.JaggedFeatures` holding (at least) ``layout.feature_names``
        (with a plan, split as its ``batch_axis``: ``num_shards`` = that axis's size).
      layout: the :class:`jaxbag.CollectionLayout` (stacked or not, with or without a plan).
      size: ``U_g``, the static number of row slots: one int for every group, ``{group name:
        int}``, or ``None`` (per group ``min(N_g, V_g)``: its packed id count or its array's rows,
        whichever is smaller; always enough). Too small: as
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
      TypeError: ``layout`` that is not a :class:`jaxbag.CollectionLayout` (e.g. the tables).

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
      >>> [round(x, 4) for x in params["item"][:, 0].tolist()]
      [0.0, 1.9, 3.9, 5.8, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0]
    """
    collection.check_layout("embedding_bag_collection_rows", layout)
    validation.check_bool("concat", concat)
    collection.check_output_dtype(dtype)
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
    sizes = {
        g.name: size.get(g.name) if isinstance(size, Mapping) else size for g in layout.groups
    }
    for g in layout.groups:
        collection.check_no_max_weights(g, g.feature_names, features)
    b = features.batch_size
    if plan is not None:
        out, pullback = _planned_rows(layout, params, features, sizes)
    else:
        out, pullback = _plain_rows(layout, params, features, sizes)

    def cotangent_pullback(cotangent: Any) -> dict[str, RowGrads]:
        return pullback(_split_cotangent(layout, cotangent, b, concat))

    if concat:
        return collection.concat_features(layout, out, dtype), cotangent_pullback
    return out, cotangent_pullback


def _group_error(g: collection.GroupLayout, e: ValueError) -> ValueError:
    """``e`` (e.g. size too small) saying which group."""
    return ValueError(f"group {g.name!r} (features {list(g.feature_names)}): {e}")


def _plain_rows(layout, params, features, sizes):
    """No plan: each group's bags and pullback from :func:`jaxbag.embedding_bag_rows`."""
    b = features.batch_size
    out, pullbacks = {}, []
    for g in layout.groups:
        keys = g.feature_names
        ids, seg, w = pack_features(features, keys, collection.group_ids(g, layout, keys))
        try:
            bags, pb = embedding_bag_rows(
                params[g.name], ids, segment_ids=seg, num_bags=len(keys) * b, mode=g.mode,
                per_sample_weights=w, padding_idx=g.pad_row, size=sizes[g.name],
            )
        except ValueError as e:
            raise _group_error(g, e) from e
        out.update({f: bags[j * b : (j + 1) * b] for j, f in enumerate(keys)})
        pullbacks.append((g, pb))

    def pullback(cotangent: dict[str, Array]) -> dict[str, RowGrads]:
        return {
            g.name: pb(jnp.concatenate(
                [jnp.asarray(cotangent[f], g.dtype) for f in g.feature_names], axis=0))
            for g, pb in pullbacks
        }

    return {f: out[f] for f in layout.feature_names}, pullback


def _planned_rows(layout, params, features, sizes):
    """With a plan: the bags as :func:`jaxbag.embedding_bag_collection` computes them (each
    device its batch shard's ids, a row-sharded group's partial bags summed over the plan's
    ``axis_name``), and a pullback in one ``shard_map``: per device, its batch shard's bag
    gradients to the rows of one slot space for the whole batch (the ids gathered over
    ``batch_axis``, as ints), local rows of its own shard for a row-sharded group, global rows
    for a replicated one (:func:`jaxbag.sharding.local_row_grads`)."""
    plan = layout.plan
    if validation.is_concrete(features.values, features.lengths):  # eagerly: size too small
        for g in layout.groups:
            keys = g.feature_names
            ids, seg, _ = pack_features(features, keys, collection.group_ids(g, layout, keys))
            valid = bag_terms.valid_positions(ids, seg, g.num_rows, len(keys) * features.batch_size,
                                              g.pad_row)
            try:
                check_slots(ids, valid, sizes[g.name], g.num_rows)
            except ValueError as e:
                raise _group_error(g, e) from e
    out = collection.apply_sharded(layout, params, features)
    mesh, axis_name, batch_axis = plan.mesh, plan.axis_name, plan.batch_axis
    local_layout = dataclasses.replace(layout, plan=None)
    row = sharding.spec_entry(axis_name)
    batch = P(sharding.spec_entry(batch_axis), None)
    out_specs = {
        g.name: RowGrads._make((P(row), P(row, None))) if g.sharded  # specs shaped as RowGrads
        else RowGrads._make((P(), P(None, None)))
        for g in layout.groups
    }

    def local(params, jf, cotangent):
        jf = collection.one_shard(jf, batch_axis)
        grads = {}
        for g in layout.groups:
            keys = g.feature_names
            ids, seg, w = pack_features(jf, keys, collection.group_ids(g, local_layout, keys))
            num_bags = len(keys) * jf.batch_size
            ct = jnp.concatenate([cotangent[f].astype(g.dtype) for f in keys], axis=0)
            rows, row_grads = sharding.local_row_grads(
                params[g.name], ids, seg, w, ct,
                valid=bag_terms.valid_positions(ids, seg, g.num_rows, num_bags, g.pad_row),
                num_bags=num_bags, num_embeddings=g.num_rows, size=sizes[g.name], mode=g.mode,
                axis_name=axis_name if g.sharded else None, batch_axis=batch_axis,
            )
            grads[g.name] = RowGrads(rows=rows, grads=row_grads)
        return grads

    def pullback(cotangent: dict[str, Array]) -> dict[str, RowGrads]:
        in_specs = (layout.param_specs(), collection.feature_specs(features, batch_axis),
                    {f: batch for f in layout.feature_names})
        args = ({g.name: params[g.name] for g in layout.groups}, features,
                {f: cotangent[f] for f in layout.feature_names})
        args = sharding.place(args, mesh, in_specs)
        return sharding.shard_map_call(local, mesh, in_specs, out_specs, *args)

    return out, pullback


def _split_cotangent(layout: CollectionLayout, cotangent: Any, b: int, concat: bool) -> dict:
    """``{feature: [B, D_f]}`` from the pullback's cotangent, checked against the output."""
    widths = {f: layout.table_of(f).features for f in layout.feature_names}
    if concat:
        want = (b, layout.output_features)
        got = getattr(cotangent, "shape", None)
        if got is None or tuple(got) != want:
            raise ValueError(
                f"the cotangent must have the shape of the concatenated output {want} "
                f"(concat=True); got {type(cotangent).__name__ if got is None else tuple(got)}."
            )
        starts = [sum(list(widths.values())[:i]) for i in range(len(widths))]
        return {f: cotangent[:, s : s + widths[f]] for f, s in zip(widths, starts)}
    if not isinstance(cotangent, Mapping):
        raise TypeError(
            f"the cotangent must be a dict {{feature: [B, D_f]}} like the output (concat=False); "
            f"got {type(cotangent).__name__}."
        )
    if sorted(cotangent) != sorted(widths):
        raise ValueError(
            f"the cotangent must have one entry per output feature {list(widths)}; got "
            f"{sorted(cotangent)}."
        )
    for f, d in widths.items():
        got = tuple(np.shape(cotangent[f]))  # (nested lists too: they are arrays below)
        if got != (b, d):
            raise ValueError(f"cotangent[{f!r}] must have the output's shape {(b, d)}; got {got}.")
    return {f: jnp.asarray(cotangent[f]) for f in widths}


def collection_optimizer(
    optimizer: TableOptimizer, *, layout: CollectionLayout
) -> SparseOptimizer[Mapping[str, Array], Mapping[str, RowGrads]]:
    """Lifts a sparse optimiser to a collection's ``{group name: array}`` parameters.

    The returned :class:`jaxbag.SparseOptimizer` works on whole collections: ``init(params)``
    gives ``{group name: state}`` and ``update(params, state, row_grads)`` -- ``row_grads`` from
    :func:`embedding_bag_collection_rows`'s pullback -- updates only the touched rows of every
    group. With a sharding plan, a row-sharded group's state is row-sharded like its array
    (:func:`jaxbag.sharding.sparse_init`) and each shard updates its own rows
    (:func:`jaxbag.sharding.sparse_update`: no communication); a replicated group is updated as
    on one device. ``update`` checks that a row-sharded group's row gradients are split over the
    plan's axis (their shape; eagerly also their placement), so a plain layout's row gradients,
    whose global row numbers would update the wrong rows, are refused.

    Args:
      optimizer: :func:`jaxbag.sparse_sgd`, :func:`jaxbag.sparse_adagrad`,
        :func:`jaxbag.sparse_adam`, or your own :class:`jaxbag.SparseOptimizer`: a per-table
        one (one that ``collection_optimizer`` returned is a ``TypeError``).
      layout: the :class:`jaxbag.CollectionLayout` of the parameters.

    Returns:
      A ``SparseOptimizer`` whose ``init`` takes ``{group name: [V_g, D_g]}`` and whose
      ``update(params, state, row_grads) -> (params, state)`` takes ``{group name: RowGrads}``
      and the ``{group name: state}`` of ``init`` (one group's ``RowGrads`` or state alone is a
      ``TypeError``); donate ``params`` and ``state`` to ``jit`` to update in place.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag
      >>> layout = jaxbag.collection_layout([jaxbag.TableConfig("a", 4, 2, ("a",), mode="sum")])
      >>> opt = jaxbag.collection_optimizer(jaxbag.sparse_adam(0.1), layout=layout)
      >>> state = opt.init({"a": jnp.zeros((4, 2))})
      >>> type(state["a"]).__name__
      'LazyAdamState'
    """

    check_optimizer(optimizer)
    if optimizer.init in _COLLECTION_INITS:
        raise TypeError(
            "optimizer is already a collection optimizer (from jaxbag.collection_optimizer); pass "
            "the per-table one it was made from: jaxbag.collection_optimizer(jaxbag.sparse_adam("
            "1e-3), layout=layout)."
        )
    if not isinstance(layout, CollectionLayout):
        raise TypeError(
            f"layout must be a jaxbag.CollectionLayout (jaxbag.collection_layout(tables, ...)); "
            f"got {type(layout).__name__}."
        )
    sharded = {g.name for g in layout.groups if layout.plan is not None and g.sharded}

    def placement(name: str) -> dict[str, Any] | None:
        if name not in sharded:
            return None
        return dict(mesh=layout.plan.mesh, axis_name=layout.plan.axis_name)

    def init(params: Mapping[str, Array]) -> dict[str, Any]:
        collection.check_params(layout, params)
        state = {}
        for g in layout.groups:
            where = placement(g.name)
            if where is not None:  # row-sharded as the group (sparse_init: canonical specs)
                state[g.name] = sharding.sparse_init(optimizer, params[g.name], **where)
            elif layout.plan is not None:  # replicated, in the form a jitted update returns
                mesh = layout.plan.mesh
                state[g.name] = jax.tree.map(
                    lambda a: jax.device_put(
                        a, NamedSharding(mesh, sharding.canonical_spec(mesh, P(), a.ndim))),
                    optimizer.init(params[g.name]),
                )
            else:
                state[g.name] = optimizer.init(params[g.name])
        return state

    def update(
        params: Mapping[str, Array], state: Mapping[str, Any], row_grads: Mapping[str, RowGrads]
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        collection.check_params(layout, params)
        names = [g.name for g in layout.groups]
        for what, tree, entry, source in (
            ("state", state, "state", "opt.init(params)"),
            ("row_grads", row_grads, "RowGrads", "pullback(cotangent)"),
        ):
            if not isinstance(tree, Mapping):  # (sorted() of a NamedTuple sorts its arrays)
                raise TypeError(
                    f"{what} must be a dict {{group name: {entry}}} with one entry per group "
                    f"{names}; got {type(tree).__name__}. Pass the dict {source} returns, not "
                    f"one group's entry; wrap a single group's as {{{names[0]!r}: {what}}}."
                )
            if sorted(tree) != sorted(names):
                raise ValueError(
                    f"{what} must have one entry per group {names}; got {sorted(tree)}. Build it "
                    "with this optimiser's init / embedding_bag_collection_rows on the same layout."
                )
        for name in sharded:  # per-shard local rows, not a plain layout's global rows
            sharding.check_split_rows(
                row_grads[name], layout.plan.mesh, layout.plan.axis_name,
                what=f"row_grads[{name!r}]",
                source="embedding_bag_collection_rows for this planned layout")
        new_params, new_state = dict(params), {}
        for name in names:
            where = placement(name)
            args = (params[name], state[name], row_grads[name])
            if where is not None:
                new_params[name], new_state[name] = sharding.sparse_update(
                    optimizer, *args, **where)
                continue
            new_params[name], new_state[name] = optimizer.update(*args)
        return new_params, new_state

    _COLLECTION_INITS.add(init)
    return SparseOptimizer(init=init, update=update)


# The init functions of the optimisers collection_optimizer made (not per-table ones).
_COLLECTION_INITS: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


# -- optimizer states in a portable form (one state per table) ----------------------------------


def unpack_states(layout: CollectionLayout, state: Mapping[str, Any]) -> dict[str, Any]:
    """A collection optimizer's state, one state per table: the inverse of :func:`pack_states`.

    The counterpart of :func:`jaxbag.unpack_tables` for ``collection_optimizer(...).init``'s
    ``{group name: state}``: every leaf with rows (``[num_rows]``, ``[num_rows, D]``: Adagrad's
    ``sum_sq``, Adam's ``mu`` / ``nu``) is cut into the tables' ``[V_t]`` / ``[V_t, D]`` rows as
    the tables are, keeping its dtype; a scalar leaf (the step ``count``) is copied to each of
    the group's tables. With :func:`pack_states` this moves optimizer states between layouts:
    stacked and unstacked, or two sharding plans (another mesh shape, other placements).

    Args:
      layout: the :class:`jaxbag.CollectionLayout` the state belongs to.
      state: ``{group name: state}`` from ``collection_optimizer(opt, layout=layout).init``
        (or its ``update``).

    Returns:
      ``{table name: state}``: each a state of ``opt`` for that table alone (``[V_t, ...]``
      leaves), as ``opt.init(table)`` would structure it.

    Raises:
      KeyError / ValueError: a group missing from ``state``; a non-scalar leaf whose leading
        dimension is not the group's ``num_rows`` (names the group and the leaf).
      TypeError: ``layout`` that is not a :class:`jaxbag.CollectionLayout` (e.g. the tables), or
        ``state`` that is not a mapping.

    Examples:
      >>> import jax, jaxbag
      >>> tables = [jaxbag.TableConfig("a", 4, 2, ("a",)), jaxbag.TableConfig("b", 6, 2, ("b",))]
      >>> layout = jaxbag.collection_layout(tables)             # one group "a+b", 10 rows
      >>> opt = jaxbag.collection_optimizer(jaxbag.sparse_adagrad(0.1), layout=layout)
      >>> state = opt.init(jaxbag.init_collection(layout, jax.random.key(0)))
      >>> per_table = jaxbag.unpack_states(layout, state)
      >>> {name: s.sum_sq.shape for name, s in per_table.items()}
      {'a': (4,), 'b': (6,)}
    """
    collection.check_layout("unpack_states", layout)
    names = [g.name for g in layout.groups]
    if not isinstance(state, Mapping) or sorted(state) != sorted(names):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise (KeyError if isinstance(state, Mapping) else TypeError)(
            f"state must have one entry per group {names} (as collection_optimizer(opt, "
            f"layout=layout).init returns it); got {got}."
        )
    split: dict[str, tuple[Any, list[Any], list[int]]] = {}  # treedef, leaves, leaves with rows
    for g in layout.groups:
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(state[g.name])
        rows_at = []
        for i, (path, leaf) in enumerate(with_paths):
            shape = tuple(jnp.shape(leaf))
            if shape and shape[0] != g.num_rows:
                raise ValueError(
                    f"state[{g.name!r}]{jax.tree_util.keystr(path)} has shape {shape}; a leaf "
                    f"with rows must have the group's {g.num_rows} rows first (scalars are "
                    "copied to every table). Pass the state of collection_optimizer(opt, "
                    "layout=layout) for this layout."
                )
            if shape:
                rows_at.append(i)
        split[g.name] = (treedef, [leaf for _, leaf in with_paths], rows_at)
    rows = collection.unpack_rows(
        layout, {name: [leaves[i] for i in at] for name, (_, leaves, at) in split.items()})
    out = {}
    for g in layout.groups:
        treedef, leaves, rows_at = split[g.name]
        for slot in g.slots:
            mine = list(leaves)
            for i, arr in zip(rows_at, rows[slot.table.name]):
                mine[i] = arr
            out[slot.table.name] = jax.tree.unflatten(treedef, mine)
    return out


def pack_states(layout: CollectionLayout, table_states: Mapping[str, Any]) -> dict[str, Any]:
    """A collection optimizer's ``{group name: state}`` from one state per table.

    The counterpart of :func:`jaxbag.pack_tables`, and the inverse of :func:`unpack_states`:
    every leaf with rows (``[V_t]``, ``[V_t, D]``) is stacked into the group's ``[num_rows]`` /
    ``[num_rows, D]`` as the tables are (padding rows zeros), keeping the leaf's dtype (float32
    Adam moments of a bfloat16 table stay float32); a scalar leaf (the step ``count``) must be
    equal across a group's tables (checked when concrete; under ``jit`` the first table's is
    taken). Eagerly, with a sharding plan, the arrays are placed as
    ``collection_optimizer(opt, layout=layout).init`` places them (row-sharded groups' rows split
    over the plan's axis), so a step compiled for that state takes them without recompiling.

    Args:
      layout: the :class:`jaxbag.CollectionLayout` to pack for.
      table_states: ``{table name: state}`` for every table, e.g. :func:`unpack_states` of
        another layout of the same tables; the states of one group share their tree structure.

    Returns:
      ``{group name: state}`` for ``collection_optimizer(opt, layout=layout).update``.

    Raises:
      KeyError / ValueError: missing or unknown tables; states of one group with different
        structures, scalars or row dtypes; a leaf with rows whose shape does not fit its table.
      TypeError: ``layout`` that is not a :class:`jaxbag.CollectionLayout` (e.g. the tables).

    Examples:
      >>> import jax, jaxbag
      >>> tables = [jaxbag.TableConfig("a", 4, 2, ("a",)), jaxbag.TableConfig("b", 6, 2, ("b",))]
      >>> stacked = jaxbag.collection_layout(tables)
      >>> opt = jaxbag.collection_optimizer(jaxbag.sparse_adam(0.1), layout=stacked)
      >>> state = opt.init(jaxbag.init_collection(stacked, jax.random.key(0)))
      >>> unstacked = jaxbag.collection_layout(tables, stack=False)   # one group per table
      >>> moved = jaxbag.pack_states(unstacked, jaxbag.unpack_states(stacked, state))
      >>> {name: s.mu.shape for name, s in moved.items()}
      {'a': (4, 2), 'b': (6, 2)}
    """
    collection.check_layout("pack_states", layout)
    collection.check_table_keys(layout, table_states, "table_states", "optimizer state")
    out = {}
    for g in layout.groups:
        names = [s.table.name for s in g.slots]
        flat: list[tuple[list[Any], Any]] = [jax.tree.flatten(table_states[n]) for n in names]
        treedef = flat[0][1]
        for n, (_, td) in zip(names, flat):
            if td != treedef:
                raise ValueError(
                    f"the states of the tables {names} (packed into group {g.name!r}) must have "
                    f"one structure; {names[0]!r} has {treedef}, {n!r} has {td}."
                )
        leaves = []
        for i, first in enumerate(flat[0][0]):
            column = {n: f[0][i] for n, f in zip(names, flat)}
            if not jnp.shape(first):
                leaves.append(_common_scalar(g.name, column))
                continue
            dtypes = {n: jnp.dtype(jnp.result_type(a)) for n, a in column.items()}
            if len(set(dtypes.values())) > 1:
                raise ValueError(
                    f"leaf {i} of the states packed into group {g.name!r} must have one dtype; got "
                    f"{ {n: d.name for n, d in dtypes.items()} }."
                )
            # a leaf's rows are per-row scalars [V_t] or as wide as the group's rows [V_t, D]
            shapes = {n: tuple(jnp.shape(a))[1:] for n, a in column.items()}
            bad = [n for n in names if shapes[n] not in ((), (g.features,))]
            if not bad:  # (both allowed, mixed: the first table's decides)
                bad = [n for n in names if shapes[n] != shapes[names[0]]]
            if bad:
                raise ValueError(
                    f"leaf {i} of the optimizer state of table {bad[0]!r} must have rows of shape "
                    f"[V] or [V, D={g.features}] (the table's width), as the other tables of "
                    f"group {g.name!r}; got {list(jnp.shape(column[bad[0]]))}. Make the state "
                    f"with the optimizer's init(table) of table {bad[0]!r}."
                )
            row_shape = shapes[names[0]]
            leaves.append(collection.pack_group(
                g, column, row_shape=row_shape, dtype=dtypes[names[0]],
                what=f"leaf {i} of the optimizer state of table"))
        placed = [_place_state_leaf(layout, g, a) for a in leaves]
        out[g.name] = jax.tree.unflatten(treedef, placed)
    return out


def _common_scalar(group: str, column: Mapping[str, Any]) -> Any:
    """The one value of a scalar state leaf across a group's tables (checked when concrete)."""
    first_name, first = next(iter(column.items()))
    if validation.is_concrete(*column.values()):
        values = {n: jax.device_get(a) for n, a in column.items()}
        differ = [n for n, v in values.items() if not bool(jnp.array_equal(v, values[first_name]))]
        if differ:
            raise ValueError(
                f"the tables packed into group {group!r} must agree on their optimizer state's "
                f"scalars (the step count): got { {n: v.tolist() for n, v in values.items()} }. "
                "States from one collection_optimizer agree; start the others with opt.init."
            )
    return first


def _place_state_leaf(layout: CollectionLayout, g: collection.GroupLayout, leaf: Any) -> Any:
    """Eagerly, with a plan: where ``collection_optimizer(...).init`` puts this leaf."""
    if layout.plan is None or not validation.is_concrete(leaf):
        return leaf
    mesh, ndim = layout.plan.mesh, jnp.ndim(leaf)
    spec = P(sharding.spec_entry(layout.plan.axis_name)) if g.sharded and ndim else P()
    return jax.device_put(leaf, NamedSharding(mesh, sharding.canonical_spec(mesh, spec, ndim)))
