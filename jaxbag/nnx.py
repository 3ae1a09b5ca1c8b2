"""The flax.nnx modules of jaxbag: ``EmbeddingBag`` and ``EmbeddingBagCollection``, and
``FrozenEmbedding``, the variable type of a frozen table (``from_pretrained(..., freeze=True)``:
not an ``nnx.Param``, so optimisers leave it alone)."""

from jaxbag._src.collection_nnx import EmbeddingBagCollection as EmbeddingBagCollection
from jaxbag._src.nnx import EmbeddingBag as EmbeddingBag
from jaxbag._src.nnx import FrozenEmbedding as FrozenEmbedding

__all__ = ["EmbeddingBag", "EmbeddingBagCollection", "FrozenEmbedding"]
