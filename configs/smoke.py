"""Tiny config for tests: 40 BBC articles per class, small model, 3 epochs; seconds on CPU."""

import ml_collections

from configs import bbc_news


def get_config() -> ml_collections.ConfigDict:
    config = bbc_news.get_config()
    config.data.max_per_class = 40
    config.tokenizer.ngrams = 2  # exercise the hashed-bigram path
    config.tokenizer.num_buckets = 2**12
    config.tokenizer.max_tokens = 200
    config.model.features = 16
    config.optim.learning_rate = 0.05
    config.train.num_epochs = 3
    config.train.batch_size = 16
    config.train.eval_batch_size = 64
    config.train.bucket_min_size = 256
    config.train.progress_bar = False
    return config
