"""jaxbag: EmbeddingBag for JAX and Flax.

The public API; implementations live in ``jaxbag._src``.
"""

from jaxbag import nnx as nnx
from jaxbag._src.batching import PackedBags as PackedBags
from jaxbag._src.batching import bucket_size as bucket_size
from jaxbag._src.batching import geometric_buckets as geometric_buckets
from jaxbag._src.batching import pack_bags as pack_bags
from jaxbag._src.linen import EmbeddingBag as EmbeddingBag
from jaxbag._src.ops import embedding_bag as embedding_bag
from jaxbag._src.ops import renorm as renorm
from jaxbag._src.segments import lengths_to_segment_ids as lengths_to_segment_ids
from jaxbag._src.segments import offsets_to_segment_ids as offsets_to_segment_ids
from jaxbag._src.validation import MODES as MODES
from jaxbag._src.validation import validate as validate

__version__ = "0.1.0"

__all__ = [
    "EmbeddingBag",
    "MODES",
    "PackedBags",
    "bucket_size",
    "embedding_bag",
    "geometric_buckets",
    "lengths_to_segment_ids",
    "nnx",
    "offsets_to_segment_ids",
    "pack_bags",
    "renorm",
    "validate",
]
