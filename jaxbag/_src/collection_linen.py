"""``jaxbag.EmbeddingBagCollection``: the flax.linen module over the collection core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import jax
from flax import linen as nn
from jax import Array

from jaxbag._src import collection, sharding
from jaxbag._src.collection import CollectionLayout, TableConfig
from jaxbag._src.jagged import JaggedFeatures
from jaxbag._src.planner import ShardingPlan

__all__ = ["EmbeddingBagCollection"]


def _check_explicit_mesh_context(mesh: Any) -> None:
    """linen's partitioning constraint refers to mesh axes, which for Explicit axes needs a
    ``jax.set_mesh`` context: say so, instead of a ``with_sharding_constraint`` error."""
    explicit = sharding.is_explicit(mesh)
    if explicit and jax.sharding.get_abstract_mesh().empty:
        raise ValueError(
            "the plan's mesh has Explicit axes (jax.make_mesh's default), which the linen module "
            "can only use inside `with jax.set_mesh(mesh):` (around init and apply); or build the "
            "mesh with axis_types=(jax.sharding.AxisType.Auto,) * mesh.ndim."
        )


class EmbeddingBagCollection(nn.Module):
    """Several embedding-bag tables looked up by several features (flax.linen).

    Legend: ``B`` examples, ``D_f`` the width of feature ``f``'s table.

    Parameters: one array per group of stacked tables (see :func:`jaxbag.collection_layout`),
    named after its tables (``"user+item"``); :func:`jaxbag.unpack_tables` splits them per table.
    With a ``plan`` each parameter carries its ``PartitionSpec`` (``nn.Partitioned``), so
    ``nn.get_sharding(jax.eval_shape(model.init, ...), mesh)`` gives the ``out_shardings`` to
    initialise it sharded, and the lookup runs row/table-wise sharded (see
    :mod:`jaxbag.sharding`).

    Attributes:
      tables: the :class:`jaxbag.TableConfig` s.
      stack: stack tables of equal width, dtype and mode (one gather per group).
      plan: optional :class:`jaxbag.sharding.ShardingPlan`.
      dtype: dtype of the concatenated output (``None``: the tables' common dtype or float32).

    Examples:
      >>> import jax, jaxbag
      >>> model = jaxbag.EmbeddingBagCollection(tables=(
      ...     jaxbag.TableConfig("words", 100, 8, ("title", "body")),
      ...     jaxbag.TableConfig("tags", 10, 4, ("tags",), mode="sum")))
      >>> jf = jaxbag.JaggedFeatures.from_lists(
      ...     {"title": [[1, 2], [3]], "body": [[4, 5, 6], []], "tags": [[1], [2, 3]]})
      >>> variables = model.init(jax.random.key(0), jf)
      >>> {k: v.shape for k, v in variables["params"].items()}
      {'words': (100, 8), 'tags': (10, 4)}
      >>> model.apply(variables, jf, concat=True).shape
      (2, 20)
    """

    tables: Sequence[TableConfig]
    stack: bool = True
    plan: ShardingPlan | None = None
    dtype: Any = None

    def __post_init__(self) -> None:
        # a list (as written in examples) made the module unhashable: jax.jit(static_argnums=...)
        # and flax's own module hashing need every field hashable
        object.__setattr__(self, "tables", collection.check_tables(self.tables))
        collection.check_output_dtype(self.dtype)
        _ = self.layout  # stack and plan are checked when the module is built, not at init
        super().__post_init__()

    @property
    def layout(self) -> CollectionLayout:
        """The static :class:`jaxbag.CollectionLayout` of this module."""
        return collection.collection_layout(self.tables, stack=self.stack, plan=self.plan)

    def setup(self) -> None:
        layout = self.layout
        specs = layout.param_specs()
        if self.plan is not None:
            _check_explicit_mesh_context(self.plan.mesh)
        params = {}
        # One key for the whole collection (not flax's per-parameter key, which depends on the
        # group's name): each table then starts the same whether stacked, unstacked or sharded,
        # as with init_collection and the NNX module.
        base = self.make_rng("params") if self.is_initializing() else None
        for g in layout.groups:

            def init(key, g=g):
                value = collection.init_group(layout, g, key if base is None else base)
                if self.plan is None:
                    return value
                # On an Explicit-axes mesh the partitioning constraint only asserts: create the
                # value in its sharding.
                return sharding.place(value, self.plan.mesh, specs[g.name])

            if self.plan is not None:
                init = nn.with_partitioning(init, tuple(specs[g.name]), mesh=self.plan.mesh)
            params[g.name] = self.param(g.name, init)
        self.embeddings = params

    @overload
    def __call__(
        self, features: JaggedFeatures, *, concat: Literal[False] = False
    ) -> dict[str, Array]: ...
    @overload
    def __call__(self, features: JaggedFeatures, *, concat: Literal[True]) -> Array: ...
    @overload
    def __call__(self, features: JaggedFeatures, *, concat: bool) -> dict[str, Array] | Array: ...
    def __call__(
        self, features: JaggedFeatures, *, concat: bool = False
    ) -> dict[str, Array] | Array:
        """Looks up every feature; see :func:`jaxbag.embedding_bag_collection`.

        Args:
          features: a :class:`jaxbag.JaggedFeatures` with the tables' features.
          concat: return ``[B, sum D_f]`` instead of ``{feature: [B, D_f]}``.

        Returns:
          The pooled features.
        """
        return collection.embedding_bag_collection(
            dict(self.embeddings), features, layout=self.layout, concat=concat, dtype=self.dtype
        )


