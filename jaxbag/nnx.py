"""The flax.nnx modules of jaxbag: ``EmbeddingBag`` and ``EmbeddingBagCollection``."""

from jaxbag._src.collection_nnx import EmbeddingBagCollection as EmbeddingBagCollection
from jaxbag._src.nnx import EmbeddingBag as EmbeddingBag
from jaxbag._src.nnx import FrozenEmbedding as FrozenEmbedding

__all__ = ["EmbeddingBag", "EmbeddingBagCollection", "FrozenEmbedding"]
