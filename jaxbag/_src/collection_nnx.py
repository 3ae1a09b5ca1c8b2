"""``jaxbag.nnx.EmbeddingBagCollection``: the flax.nnx module over the collection core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

from flax import nnx
from jax import Array

from jaxbag._src import collection
from jaxbag._src.collection import CollectionLayout, TableConfig
from jaxbag._src.jagged import JaggedFeatures
from jaxbag._src.module_common import check_rngs
from jaxbag._src.planner import ShardingPlan

__all__ = ["EmbeddingBagCollection"]


class EmbeddingBagCollection(nnx.Module):
    """Several embedding-bag tables looked up by several features (flax.nnx).

    Legend: ``B`` examples, ``D_f`` the width of feature ``f``'s table.

    ``self.embeddings`` holds one :class:`flax.nnx.Param` per group of stacked tables (see
    :func:`jaxbag.collection_layout`), keyed by the group name (``"user+item"``). With a ``plan``
    the parameters are created in their sharding and carry it as ``out_sharding`` metadata.
    ``self.layout`` is the static :class:`jaxbag.CollectionLayout` (for
    :func:`jaxbag.unpack_tables`, :func:`jaxbag.embedding_bag_collection_rows`, ...).

    Args:
      tables: the :class:`jaxbag.TableConfig` s.
      stack: stack tables of equal width, dtype and mode (one gather per group).
      plan: optional :class:`jaxbag.sharding.ShardingPlan`.
      dtype: dtype of the concatenated output (``None``: the tables' common dtype or float32).
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Examples:
      >>> import jaxbag
      >>> from flax import nnx
      >>> model = jaxbag.nnx.EmbeddingBagCollection(
      ...     [jaxbag.TableConfig("words", 100, 8, ("title", "body"))], rngs=nnx.Rngs(0))
      >>> jf = jaxbag.JaggedFeatures.from_lists({"title": [[1, 2], [3]], "body": [[4], []]})
      >>> model(jf)["body"].shape, model(jf, concat=True).shape
      ((2, 8), (2, 16))
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        *,
        stack: bool = True,
        plan: ShardingPlan | None = None,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        collection.check_output_dtype(dtype)
        check_rngs(rngs, "jaxbag.nnx.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0))")
        self.layout: CollectionLayout = collection.collection_layout(
            tables, stack=stack, plan=plan
        )
        self.dtype = dtype
        params = collection.init_collection(self.layout, rngs.params())
        specs = self.layout.param_specs()
        self.embeddings = nnx.Dict(
            {
                name: (
                    # (a spec with the plan's mesh: a NamedSharding must share the mesh of a
                    # jax.set_mesh context, which is abstract)
                    nnx.Param(value, out_sharding=specs[name], mesh=plan.mesh)
                    if plan is not None
                    else nnx.Param(value)
                )
                for name, value in params.items()
            }
        )

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
        # Read by the layout's static group names, not self.embeddings.items(): nnx.tabulate
        # wraps an nnx.Dict's methods, and iterating it there recursed (RecursionError).
        params = {g.name: self.embeddings[g.name][...] for g in self.layout.groups}
        return collection.embedding_bag_collection(
            params, features, layout=self.layout, concat=concat, dtype=self.dtype
        )
