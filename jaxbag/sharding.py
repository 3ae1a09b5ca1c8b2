"""Sharded embedding bags and collections on a ``jax.sharding`` mesh.

Row-sharded :func:`embedding_bag` (the table split over a mesh axis, the batch replicated or split
over another one), the in-``shard_map`` building block :func:`embedding_bag_in_shard_map`, the
planner for collections (:func:`plan_sharding`, :class:`ShardingPlan`: table-wise, row-wise or
replicated tables), sparse row updates of sharded tables (:func:`embedding_bag_rows`,
:func:`sparse_init`, :func:`sparse_update`: each device updates its own rows) and placement
helpers. Implementations live in ``jaxbag._src``.
"""

from jaxbag._src.collection import feature_specs as feature_specs
from jaxbag._src.planner import PLACEMENTS as PLACEMENTS
from jaxbag._src.planner import ShardingPlan as ShardingPlan
from jaxbag._src.planner import plan_sharding as plan_sharding
from jaxbag._src.sharding import axis_size as axis_size
from jaxbag._src.sharding import embedding_bag as embedding_bag
from jaxbag._src.sharding import (
    embedding_bag_in_shard_map as embedding_bag_in_shard_map,
)
from jaxbag._src.sharding import embedding_bag_rows as embedding_bag_rows
from jaxbag._src.sharding import pad_rows as pad_rows
from jaxbag._src.sharding import shard_table as shard_table
from jaxbag._src.sharding import sparse_init as sparse_init
from jaxbag._src.sharding import sparse_update as sparse_update
from jaxbag._src.sharding import table_shardings as table_shardings

__all__ = [
    "PLACEMENTS",
    "ShardingPlan",
    "axis_size",
    "embedding_bag",
    "embedding_bag_in_shard_map",
    "embedding_bag_rows",
    "feature_specs",
    "pad_rows",
    "plan_sharding",
    "shard_table",
    "sparse_init",
    "sparse_update",
    "table_shardings",
]
