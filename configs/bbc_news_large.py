"""BBC News with a 2M-bucket table: unigrams + bigrams hashed into 2**21 buckets, D = 64, trained
with sparse row updates (only the rows a batch touches: lazy Adam, as torch's SparseAdam).

Run: ``python -m experiments.train --config configs/bbc_news_large.py --workdir runs/bbc_news_large``

The table is 2**21 x 64 float32 (512 MiB); a dense optimiser would read and write it (and two Adam
moments) on every step. With ``optim.sparse_embedding`` the step costs about what the default
config's per id (see ``summary.json``'s ``epoch_time_s``). The table's row-wise optimiser follows
``optim.name`` (adamw/adam -> lazy Adam as torch's SparseAdam, adagrad -> fbgemm's row-wise Adagrad,
sgd -> SGD; see experiments/textcls/optim.py); the dense parameters (the head) keep optax.
"""

import ml_collections

from configs.bbc_news import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.tokenizer.ngrams = 2  # unigrams (vocabulary) + hashed bigrams
    config.tokenizer.num_buckets = 2**21
    config.model.features = 64
    config.optim.sparse_embedding = True
    return config
