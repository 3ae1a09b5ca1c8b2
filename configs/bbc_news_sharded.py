"""BBC News classifier trained data-parallel x row-sharded on a (2, 4) mesh (8 devices).

The embedding table is split by rows over ``model`` (4 devices), the batch over ``data``
(2 devices); everything else is ``configs/bbc_news.py``, so accuracy matches single-device
training (same initialisation, same batches; only float summation order differs). Run::

    python -m experiments.textcls.sharded --config configs/bbc_news_sharded.py \
        --workdir runs/bbc_news_sharded

(it simulates 8 CPU devices itself; on real accelerators set ``mesh_shape`` to the devices).
"""

import ml_collections

from configs import bbc_news


def get_config() -> ml_collections.ConfigDict:
    config = bbc_news.get_config()
    config.sharding = ml_collections.ConfigDict()
    config.sharding.mesh_shape = (2, 4)  # (data, model) devices
    config.sharding.axis_names = ("data", "model")
    config.sharding.row_axis = "model"  # the table's rows are split over this axis
    config.sharding.batch_axis = "data"  # the batch over this one ("" for a replicated batch)
    config.optim.sparse_embedding = False  # the row-sharded table takes dense (sharded) updates
    config.train.progress_bar = False
    return config
