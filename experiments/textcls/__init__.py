"""fastText-style text classification with jaxbag: data, features, model, training pieces.

One idea per module:

* :mod:`.data`: BBC News / AG_NEWS CSV / JSON-lines loaders and the stratified split.
* :mod:`.tokenizer`: regex tokenizer, vocabulary, hashed n-grams, term weights (the featurizer).
* :mod:`.batches`: epoch order from (seed, epoch) and static-shape batches via ``jaxbag.pack_bags``.
* :mod:`.model`: the NNX fastText model on ``jaxbag.nnx.EmbeddingBag``.
* :mod:`.optim`: optax optimiser and schedule from the config; the table's sparse optimiser.
* :mod:`.steps`: the jitted train/eval steps (dense or sparse table updates), compile counters.
* :mod:`.metrics`: metrics as a pytree of sums and counts; confusion matrix.
* :mod:`.checkpoint`: orbax CheckpointManager save / resume / load params.
* :mod:`.artifacts`: the JSON files of a workdir (config, vocab, split, metrics, summary).
* :mod:`.plots`: loss / accuracy curves as a PNG.
* :mod:`.config_check`: unknown ``--config.*`` override keys, reported with the valid keys.
* :mod:`.logs`: quieter absl logging for the entry points.
* :mod:`.tfidf_baseline`: TF-IDF + LinearSVC reference accuracy on the same splits.
"""
