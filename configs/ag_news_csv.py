"""AG_NEWS-format CSVs you supply: ``"class index","title","description"``, classes 1..4.

Run: ``python -m experiments.train --config configs/ag_news_csv.py --workdir runs/ag
--config.data.train_path=train.csv --config.data.test_path=test.csv``.
"""

import ml_collections

from configs import bbc_news


def get_config() -> ml_collections.ConfigDict:
    config = bbc_news.get_config()
    config.data.name = "ag_news_csv"
    config.data.train_path = "data/ag_news/train.csv"
    config.data.test_path = "data/ag_news/test.csv"
    config.data.num_classes = 4
    config.data.class_names = ("World", "Sports", "Business", "Sci/Tech")
    config.tokenizer.ngrams = 2  # words + hashed bigrams
    config.tokenizer.num_buckets = 2**18  # 120k short texts: more distinct bigrams
    config.tokenizer.min_freq = 2
    config.train.num_epochs = 5
    config.train.batch_size = 128
    config.train.eval_batch_size = 1024
    return config
