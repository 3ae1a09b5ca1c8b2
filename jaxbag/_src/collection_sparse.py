"""Sparse row updates for collections: bags of every feature plus a pullback to each group's rows.

Legend: ``B`` examples, ``F_g`` the features of group ``g``, ``D_f`` the width of feature ``f``'s
table, ``U_g`` the row slots of group ``g``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from jax import Array

from jaxbag._src import collection
from jaxbag._src.collection import CollectionLayout
from jaxbag._src.jagged import JaggedFeatures, pack_features
from jaxbag._src.sparse import RowGrads, embedding_bag_rows


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

    Args:
      params: ``{group name: array}`` from :func:`jaxbag.init_collection` (a layout without a
        sharding plan).
      features: a :class:`jaxbag.JaggedFeatures` holding (at least) ``layout.feature_names``.
      layout: the :class:`jaxbag.CollectionLayout` (stacked or not; not one with a plan: for
        sharded tables use :func:`jaxbag.sharding.embedding_bag_rows` per table).
      size: ``U_g``, the static number of row slots: one int for every group, ``{group name:
        int}``, or ``None`` (each group's packed id count: always enough). Too small: as
        :func:`jaxbag.embedding_bag_rows` (an error eagerly; under ``jit`` the rows past the
        first ``U_g`` distinct ones get no gradient).
      concat: return one ``[B, sum D_f]`` array (``feature_names`` order); the pullback then
        takes a cotangent of that shape.
      dtype: dtype of the concatenated output (see :func:`jaxbag.concat_features`).

    Returns:
      ``(out, pullback)``: ``out`` equal to ``embedding_bag_collection(params, features,
      layout=layout, concat=concat, dtype=dtype)``; ``pullback(g)`` maps the cotangent (``{feature:
      [B, D_f]}``, or ``[B, sum D_f]`` with ``concat``) to ``{group name: RowGrads}`` (rows of
      the group array, ``[U_g]`` and ``[U_g, D]``).

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
      >>> opt = jaxbag.sparse_sgd(0.1)
      >>> table, state = opt.update(params["item"], opt.init(params["item"]), g)
    """
    collection.check_features(layout, features)
    collection.check_params(layout, params)
    if layout.plan is not None:
        raise ValueError(
            "embedding_bag_collection_rows takes a layout without a sharding plan; for sharded "
            "tables use jaxbag.sharding.embedding_bag_rows per row-sharded table (README: 'Sparse "
            "row updates on sharded tables')."
        )
    if isinstance(size, Mapping):
        unknown = sorted(set(size) - {g.name for g in layout.groups})
        if unknown:
            raise ValueError(
                f"size names unknown groups {unknown}; the groups are "
                f"{[g.name for g in layout.groups]}."
            )
    b = features.batch_size
    out: dict[str, Array] = {}
    pullbacks = []
    for g in layout.groups:
        keys = g.feature_names
        collection.check_no_max_weights(g, keys, features)
        ids, seg, w = pack_features(features, keys, collection.group_ids(g, layout, keys))
        bags, pb = embedding_bag_rows(
            params[g.name],
            ids,
            segment_ids=seg,
            num_bags=len(keys) * b,
            mode=g.mode,
            per_sample_weights=w,
            padding_idx=g.pad_row,
            size=size.get(g.name) if isinstance(size, Mapping) else size,
        )
        out.update({f: bags[j * b : (j + 1) * b] for j, f in enumerate(keys)})
        pullbacks.append((g, keys, pb))
    out = {f: out[f] for f in layout.feature_names}

    def pullback(cotangent: Any) -> dict[str, RowGrads]:
        if concat:
            widths = [layout.table_of(f).features for f in layout.feature_names]
            starts = [sum(widths[:i]) for i in range(len(widths))]
            cotangent = {
                f: cotangent[:, s : s + d] for f, s, d in zip(layout.feature_names, starts, widths)
            }
        return {
            g.name: pb(jnp.concatenate([jnp.asarray(cotangent[f], g.dtype) for f in keys], axis=0))
            for g, keys, pb in pullbacks
        }

    if concat:
        return collection.concat_features(layout, out, dtype), pullback
    return out, pullback
