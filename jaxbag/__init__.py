"""jaxbag: EmbeddingBag for JAX and Flax.

The public API; implementations live in ``jaxbag._src``. Namespaces: ``jaxbag.nnx`` (flax.nnx
modules) and ``jaxbag.sharding`` (row-sharded ops on a ``jax.sharding`` mesh).
"""

from jaxbag import nnx as nnx
from jaxbag import sharding as sharding
from jaxbag._src.batching import PackedBags as PackedBags
from jaxbag._src.batching import bucket_size as bucket_size
from jaxbag._src.batching import fit_buckets as fit_buckets
from jaxbag._src.batching import geometric_buckets as geometric_buckets
from jaxbag._src.batching import pack_bags as pack_bags
from jaxbag._src.collection import CollectionLayout as CollectionLayout
from jaxbag._src.collection import TableConfig as TableConfig
from jaxbag._src.collection import collection_layout as collection_layout
from jaxbag._src.collection import concat_features as concat_features
from jaxbag._src.collection import embedding_bag_collection as embedding_bag_collection
from jaxbag._src.collection import init_collection as init_collection
from jaxbag._src.collection import pack_tables as pack_tables
from jaxbag._src.collection import unpack_tables as unpack_tables
from jaxbag._src.collection_sparse import collection_optimizer as collection_optimizer
from jaxbag._src.collection_sparse import pack_states as pack_states
from jaxbag._src.collection_sparse import unpack_states as unpack_states
from jaxbag._src.collection_sparse import (
    embedding_bag_collection_rows as embedding_bag_collection_rows,
)
from jaxbag._src.collection_linen import (
    EmbeddingBagCollection as EmbeddingBagCollection,
)
from jaxbag._src.cpu_kernel import cpu_kernel_status as cpu_kernel_status
from jaxbag._src.jagged import JaggedFeatures as JaggedFeatures
from jaxbag._src.linen import EmbeddingBag as EmbeddingBag
from jaxbag._src.ops import embedding_bag as embedding_bag
from jaxbag._src.ops import renorm as renorm
from jaxbag._src.segments import lengths_to_segment_ids as lengths_to_segment_ids
from jaxbag._src.segments import offsets_to_segment_ids as offsets_to_segment_ids
from jaxbag._src.sparse import LazyAdamState as LazyAdamState
from jaxbag._src.sparse import RowGrads as RowGrads
from jaxbag._src.sparse import RowwiseAdagradState as RowwiseAdagradState
from jaxbag._src.sparse import SgdState as SgdState
from jaxbag._src.sparse import SparseOptimizer as SparseOptimizer
from jaxbag._src.sparse import embedding_bag_rows as embedding_bag_rows
from jaxbag._src.sparse import sparse_adagrad as sparse_adagrad
from jaxbag._src.sparse import sparse_adam as sparse_adam
from jaxbag._src.sparse import sparse_sgd as sparse_sgd
from jaxbag._src.sparse import unique_rows as unique_rows
from jaxbag._src.validation import MODES as MODES
from jaxbag._src.validation import Mode as Mode
from jaxbag._src.validation import validate as validate

__version__ = "0.1.0"

__all__ = [
    "CollectionLayout",
    "EmbeddingBag",
    "EmbeddingBagCollection",
    "JaggedFeatures",
    "LazyAdamState",
    "MODES",
    "Mode",
    "PackedBags",
    "RowGrads",
    "RowwiseAdagradState",
    "SgdState",
    "SparseOptimizer",
    "TableConfig",
    "bucket_size",
    "collection_layout",
    "collection_optimizer",
    "concat_features",
    "cpu_kernel_status",
    "embedding_bag",
    "embedding_bag_collection",
    "embedding_bag_collection_rows",
    "embedding_bag_rows",
    "fit_buckets",
    "geometric_buckets",
    "init_collection",
    "lengths_to_segment_ids",
    "nnx",
    "offsets_to_segment_ids",
    "pack_bags",
    "pack_states",
    "pack_tables",
    "renorm",
    "sharding",
    "sparse_adagrad",
    "sparse_adam",
    "sparse_sgd",
    "unique_rows",
    "unpack_states",
    "unpack_tables",
    "validate",
]
