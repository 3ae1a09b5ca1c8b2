"""The flax.nnx modules of jaxbag: ``jaxbag.nnx.EmbeddingBag``."""

from jaxbag._src.nnx import EmbeddingBag as EmbeddingBag
from jaxbag._src.nnx import FrozenEmbedding as FrozenEmbedding

__all__ = ["EmbeddingBag", "FrozenEmbedding"]
