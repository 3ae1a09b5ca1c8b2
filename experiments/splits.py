r"""Test accuracy over many seeded train/test splits: how much one split says.

    python -m experiments.splits --config configs/bbc_news_splits.py --workdir runs/splits

One 444-article test split measures accuracy to about +-0.5-0.7 points (one SD; one article
is 0.23), so a single number cannot tell apart models that differ by less. This trains each
model of ``config.models`` (overrides of ``config.base``, as in ``experiments/select.py``) on
the splits of ``config.seed = 0 .. config.num_splits - 1``, optionally scores TF-IDF + LinearSVC
on the very same splits, and prints per model the mean test accuracy, its spread, how many
splits reach ``config.threshold``, and the paired difference to ``config.reference`` (same
split, so the split's difficulty cancels). It measures; it never feeds back into a config.

Every model, and the SVM, is tested on the same splits, those of ``config.base.data``: a model
may not override ``data.*`` or ``seed`` (the study sets the seed of each split itself).

The workdir gets one sub-workdir per (model, split) (a finished one is not run again, so a
killed study resumes), ``splits.json`` and ``splits.md`` (an earlier run's are removed when the
training starts, so a run that fails leaves none behind).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from experiments.select import remove_reports, run_or_reuse, study_main, variants
from experiments.textcls import artifacts, config_check

TFIDF_SVC = "tfidf_svc"
REPORTS = ("splits.json", "splits.md")
#: Why a model may not override ``data.*`` or ``seed``.
SAME_SPLITS = (
    "every model and the TF-IDF + LinearSVC reference are tested on the same splits, those of "
    "config.base.data with split k drawn by seed k (the study sets config.seed itself), so that "
    "the rows pair up. Drop the override; to study another dataset or test fraction, change "
    "config.base.data for the whole study (e.g. --config.base.data.test_fraction=0.1)."
)


def split_config(model: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """``model`` trained and tested on the split of ``seed`` (quietly, no plot)."""
    config = ml_collections.ConfigDict(model.to_dict())
    config.seed = seed
    config.data.split_seed = -1  # the split follows config.seed
    config.train.progress_bar = False
    config.train.plot = False
    return config


def summarize(accuracies: list[float], reference: list[float], threshold: float) -> dict[str, Any]:
    """Statistics of one model's per-split accuracies, paired with the reference's.

    Returns ``mean``, ``sd`` (sample), ``min``, ``max``, ``at_threshold`` (splits with
    accuracy >= ``threshold``), ``diff`` (mean of the per-split differences to
    ``reference``), ``diff_se`` (its standard error) and ``better`` / ``worse`` (splits).
    """
    diffs = [a - b for a, b in zip(accuracies, reference, strict=True)]
    n = len(accuracies)
    return {
        "mean": statistics.fmean(accuracies),
        "sd": statistics.stdev(accuracies) if n > 1 else 0.0,
        "min": min(accuracies),
        "max": max(accuracies),
        "at_threshold": sum(a >= threshold - 1e-12 for a in accuracies),
        "diff": statistics.fmean(diffs),
        "diff_se": statistics.stdev(diffs) / n**0.5 if n > 1 else 0.0,
        "better": sum(d > 1e-12 for d in diffs),
        "worse": sum(d < -1e-12 for d in diffs),
    }


def run_splits(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains every model on every split; returns ``{"rows": [...], "accuracies": {...}}``."""
    config = ml_collections.FrozenConfigDict(config)
    workdir = Path(workdir).resolve()
    config_check.require_int(config.num_splits, "num_splits", 1, "N (splits of seeds 0..N-1)")
    config_check.require_fraction(config.threshold, "threshold", "0.98")
    models = variants(config.base, config.models, config.reference, "config.models",
                      fixed=("data", "seed"), why=SAME_SPLITS)
    if config.base.data.split_seed != -1:
        raise ValueError(
            f"config.base sets data.split_seed={config.base.data.split_seed}, but this study draws "
            "split k from seed k for every model and the SVM alike (split_seed=-1); drop the "
            "override (to study one split, use experiments.train with --config.seed)."
        )
    remove_reports(workdir, REPORTS)  # (an earlier config's: not this run's)
    names = list(models)
    seeds = range(config.num_splits)
    accs: dict[str, list[float]] = {}
    for name in names:
        accs[name] = [run_or_reuse(split_config(models[name], s), workdir / name / f"split{s}")
                      ["test_accuracy"] for s in seeds]
        logging.info("%s: mean test accuracy %.2f%%", name, 100 * statistics.fmean(accs[name]))
    if config.tfidf_svc:
        from experiments.textcls.tfidf_baseline import split_accuracy

        accs[TFIDF_SVC] = [split_accuracy(split_config(config.base, s).data, s) for s in seeds]
    rows = [{"name": name, "overrides": config.models.get(name, "(scikit-learn)"),
             **summarize(a, accs[config.reference], config.threshold)}
            for name, a in accs.items()]
    result = {"num_splits": config.num_splits, "threshold": config.threshold,
              "reference": config.reference, "rows": rows, "accuracies": accs}
    artifacts.write_json(workdir / "splits.json", result)
    table = format_table(rows, config.reference, config.num_splits, config.threshold)
    artifacts.write_text(workdir / "splits.md", table + "\n")
    print(table)
    return result


def format_table(rows: list[dict[str, Any]], reference: str, num_splits: int,
                 threshold: float) -> str:
    lines = [
        f"| model | mean test accuracy ({num_splits} splits) | SD | min - max | "
        f"splits >= {100 * threshold:.1f}% | vs {reference} (+-SE; splits better/worse) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {100 * r['mean']:.2f}% | {100 * r['sd']:.2f} | "
            f"{100 * r['min']:.2f} - {100 * r['max']:.2f} | {r['at_threshold']}/{num_splits} | "
            f"{100 * r['diff']:+.2f} +- {100 * r['diff_se']:.2f} ({r['better']}/{r['worse']}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    study_main(run_splits, "--config configs/bbc_news_splits.py --workdir runs/splits")
