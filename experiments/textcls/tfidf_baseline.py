r"""Reference numbers: TF-IDF + LinearSVC (scikit-learn) on the same BBC News splits.

    python -m experiments.textcls.tfidf_baseline [--seeds 0,1,2,3,4] [--test_fraction 0.2]
    python -m experiments.textcls.tfidf_baseline --cv      # + cross-validation, as select.py
    python -m experiments.textcls.tfidf_baseline --seeds 0 --show_errors  # the articles it gets wrong

The split of seed ``k`` is exactly the one ``experiments.train --config.seed=k`` uses
(:func:`experiments.textcls.data.load_splits`), and ``--cv`` scores the baseline on the
very folds ``experiments/select.py`` scores its candidates on (3 x 5-fold CV on the
training split of seed 0), so the two are compared fold for fold without the test split.
scikit-learn is a declared dependency of the experiments (``jaxbag[experiments]``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags

from configs import bbc_news
from experiments.textcls.data import TextDataset, load_splits, with_validation_fold
from experiments.textcls.metrics import format_misclassified, misclassified

_SEEDS: Any = None
_TEST_FRACTION: Any = None
_CV: Any = None
_SHOW_ERRORS: Any = None


def tfidf_svc_predictions(train: TextDataset, evaluation: TextDataset) -> np.ndarray:
    """Labels ``[len(evaluation)]`` predicted by ``TfidfVectorizer(sublinear_tf=True)`` +
    ``LinearSVC(random_state=0)`` fitted on ``train`` (its dual solver draws coordinates at
    random: unseeded, fits of the same split under other NumPy global seeds differed by up to
    5e-6 in the weights)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    vectorizer = TfidfVectorizer(sublinear_tf=True)
    x_train = vectorizer.fit_transform(list(train.texts))
    clf = LinearSVC(random_state=0).fit(x_train, train.labels)
    return np.asarray(clf.predict(vectorizer.transform(list(evaluation.texts))))


def split_accuracy(data_config: Mapping[str, Any], seed: int, *, show_errors: bool = False) -> float:
    """Test accuracy on the split ``experiments.train`` uses with ``config.seed=seed``;
    ``show_errors`` prints the misclassified articles as ``experiments.train`` does."""
    train, test, _ = load_splits(data_config, seed)
    predicted = tfidf_svc_predictions(train, test)
    if show_errors:
        errors = misclassified(test.sources, test.texts, test.labels, predicted, test.class_names)
        print(format_misclassified(errors, limit=len(errors)))
    return float((predicted == test.labels).mean())


def cv_accuracies(data_config: Mapping[str, Any], seed: int, *, folds: int = 5,
                  repeats: int = 3) -> list[float]:
    """Per-fold accuracies over the ``repeats`` x ``folds`` partitions of the training split
    (``config.data.validation_folds`` / ``validation_fold`` / ``validation_repeat``, in
    ``experiments.select``'s order)."""
    return [split_accuracy(with_validation_fold(data_config, folds, fold, repeat), seed)
            for repeat in range(repeats) for fold in range(folds)]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _SEEDS.value:
        raise app.UsageError("--seeds is empty; give split seeds, e.g. --seeds 0,1,2")
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
        raise app.UsageError(f"--seeds must be ints (split seeds), e.g. --seeds 0,1,2; got "
                             f"{','.join(_SEEDS.value)}") from None
    if not 0 < _TEST_FRACTION.value < 1:
        raise app.UsageError(f"--test_fraction must be in (0, 1), e.g. 0.2; got "
                             f"{_TEST_FRACTION.value}")
    data_config = bbc_news.get_config().data
    data_config.test_fraction = _TEST_FRACTION.value
    accs = []
    for seed in seeds:
        accs.append(split_accuracy(data_config, seed, show_errors=_SHOW_ERRORS.value))
        print(f"seed {seed}: TF-IDF + LinearSVC test accuracy {100 * accs[-1]:.2f}%")
    print(f"mean over {len(accs)} splits: {100 * statistics.mean(accs):.2f}%")
    if _CV.value:
        cv = cv_accuracies(data_config, seed=0)
        print(f"3 x 5-fold CV on the training split of seed 0 (experiments.select's folds): "
              f"{100 * statistics.mean(cv):.2f}%")


def define_flags() -> None:
    global _SEEDS, _TEST_FRACTION, _CV, _SHOW_ERRORS
    _SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Split seeds (config.seed).")
    _TEST_FRACTION = flags.DEFINE_float("test_fraction", 0.2, "Held-out fraction per class.")
    _CV = flags.DEFINE_bool("cv", False, "Also cross-validate on the training split of seed 0.")
    _SHOW_ERRORS = flags.DEFINE_bool("show_errors", False, "List the misclassified test articles.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
