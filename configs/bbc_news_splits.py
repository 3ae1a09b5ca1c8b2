"""Test accuracy over many seeded train/test splits (``experiments/splits.py``).

Run: ``python -m experiments.splits --config configs/bbc_news_splits.py --workdir runs/splits``.
Every model starts from ``config.base`` (``configs/bbc_news.py``) and overrides a few fields,
as the candidates of ``configs/bbc_news_selection.py``; each is trained on the splits of
``config.seed = 0 .. config.num_splits - 1`` (the seed picks the split, the initialisation
and the batch order; seed 0 is the default split). This measures, it does not choose: the
default was chosen by cross-validation on the training split.
"""

import ml_collections

from configs import bbc_news

# PyTorch's text-classification tutorial: EmbeddingBag(mean, 64) + Linear, every token in
# order (unknown words included), dense Adam at a constant 0.01, batches of 64, no smoothing.
TUTORIAL_RECIPE = (
    "tokenizer.term_weights=none; tokenizer.idf=false; model.mode=mean; "
    "model.ignore_unknown=false; train.label_smoothing=0.0; optim.name=adam; "
    "optim.schedule=constant; optim.sparse_embedding=false; train.batch_size=64"
)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.base = bbc_news.get_config()
    config.num_splits = 20
    config.models = ml_collections.ConfigDict({
        "default": "",
        # configs/bbc_news_selection.py's "start": the default before the selection
        "previous_default": "tokenizer.term_weights=count; tokenizer.idf=false; "
                            "model.mode=mean; train.label_smoothing=0.1",
        "tutorial_recipe": TUTORIAL_RECIPE,
    })
    config.reference = "default"  # the others are compared with it split by split
    config.tfidf_svc = True  # also TF-IDF + LinearSVC (scikit-learn) on every split
    config.threshold = 0.98  # counts the splits at or above this accuracy
    return config
