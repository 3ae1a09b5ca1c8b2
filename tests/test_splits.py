"""Test accuracy over many seeded splits (experiments/splits.py)."""

import json
import re

import ml_collections
import pytest

from configs import bbc_news_selection, bbc_news_splits, smoke
from experiments import select, splits
from experiments.textcls import artifacts
from experiments.textcls.tfidf_baseline import split_accuracy


def test_summarize_by_hand():
    s = splits.summarize([0.98, 0.97, 0.99], [0.97, 0.97, 1.0], threshold=0.98)
    assert s["mean"] == pytest.approx(0.98)
    assert s["sd"] == pytest.approx(0.01)  # sample SD of 0.98, 0.97, 0.99
    assert (s["min"], s["max"], s["at_threshold"]) == (0.97, 0.99, 2)
    # per-split differences +0.01, 0, -0.01: mean 0, SD 0.01, SE 0.01 / sqrt(3)
    assert s["diff"] == pytest.approx(0.0, abs=1e-12)
    assert s["diff_se"] == pytest.approx(0.01 / 3**0.5)
    assert (s["better"], s["worse"]) == (1, 1)
    with pytest.raises(ValueError):  # unpaired lists
        splits.summarize([0.9, 0.8], [0.9], threshold=0.5)


def test_split_config_sets_the_seed_and_keeps_the_model():
    base = smoke.get_config()
    base.data.split_seed = 3
    c = splits.split_config(base, 7)
    assert (c.seed, c.data.split_seed, c.train.plot) == (7, -1, False)
    assert c.model.to_dict() == base.model.to_dict()
    assert base.seed == 0 and base.data.split_seed == 3  # not changed


def test_every_model_of_the_shipped_config_is_valid():
    config = bbc_news_splits.get_config()
    assert config.reference in config.models
    for overrides in config.models.values():
        select.apply_overrides(config.base, overrides)  # raises on an unknown key
    # "previous_default" is the selection's starting point
    previous = select.apply_overrides(config.base, config.models.previous_default)
    assert previous.to_dict() == bbc_news_selection.get_config().base.to_dict()


def test_bad_study_configs_fail_before_training(tmp_path):
    config = bbc_news_splits.get_config()
    config.reference = "tutorial"
    with pytest.raises(ValueError, match="config.reference='tutorial' is not in config.models"):
        splits.run_splits(config, tmp_path)
    config.reference = "default"
    config.models.tutorial_recipe = "optim.lr=0.1"
    with pytest.raises(ValueError, match="no 'lr' under 'config.optim'"):
        splits.run_splits(config, tmp_path)
    del config.models["tutorial_recipe"]
    # a fixed split would be dropped for the models but kept for the SVM (unpaired rows)
    config.base.data.split_seed = 0
    with pytest.raises(ValueError, match=r"config.base sets data.split_seed=0"):
        splits.run_splits(config, tmp_path)
    config.base.data.split_seed = -1
    config.models.fixed = "data.split_seed=3"
    with pytest.raises(ValueError, match=r"config.models\['fixed'\] = 'data.split_seed=3' "
                       r"overrides data.split_seed: every model and the TF-IDF"):
        splits.run_splits(config, tmp_path)
    del config.models["fixed"]
    # num_splits=0 trained nothing and died in statistics.fmean (StatisticsError)
    config.num_splits = 0
    with pytest.raises(ValueError, match=r"config\.num_splits must be a positive int; got 0\. "
                       r"Pass --config\.num_splits=N "):
        splits.run_splits(config, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing ran


_SELECT_DATA = (r"every candidate is cross-validated on the same training split and folds, "
                r"those of config\.base\.data .* Drop the override")
_SPLITS_DATA = (r"every model and the TF-IDF \+ LinearSVC reference are tested on the same "
                r"splits, those of config\.base\.data .* Drop the override")


@pytest.mark.parametrize("study, overrides", [
    *[("select", o) for o in ("data.test_fraction=0.1", "seed=1; data.split_seed=1",
                              "data.validation_folds=3")],
    *[("splits", o) for o in ("data.test_fraction=0.1", "data.max_per_class=100",
                              "model.features=8; seed=3")],
])
@pytest.mark.parametrize("reference", [False, True])  # the reference too
def test_a_study_variant_may_not_change_the_data(tmp_path, monkeypatch, study, overrides,
                                                 reference):
    """select: a candidate's data.* (seed=1 alone is allowed: it keeps the base's split).
    splits: only data.split_seed was refused; a model with data.test_fraction=0.1 was tested on
    other test articles than the others and the SVM (config.base.data), and still paired with
    them; a seed override was silently replaced by the split's."""
    if study == "select":
        module, run, where, why = select, select.select, "candidates", _SELECT_DATA
        config = bbc_news_selection.get_config()
        config.folds, config.repeats = 2, 1
        config.candidates = ml_collections.ConfigDict({"default": "", "other": "model.features=8"})
        config.reference = "default"
        name = "default" if reference else "other"
        getattr(config, where)[name] = overrides
    else:
        module, run, where, why = splits, splits.run_splits, "models", _SPLITS_DATA
        config = bbc_news_splits.get_config()
        name = config.reference if reference else "tutorial_recipe"
        config.models[name] = overrides
    monkeypatch.setattr(module, "run_or_reuse", lambda *a: pytest.fail("a variant ran"))
    key = overrides.rpartition(";")[2].split("=")[0].strip()
    with pytest.raises(ValueError, match=(
            rf"config\.{where}\['{name}'\] = '{re.escape(overrides)}' overrides {key}: {why}")):
        run(config, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("threshold", [98, -0.1, float("nan")])
def test_the_threshold_is_a_fraction(tmp_path, monkeypatch, threshold):
    """--config.threshold=98 (a percentage) counted no split and printed 'splits >= 9800.0%'."""
    monkeypatch.setattr(splits, "run_or_reuse", lambda *a: pytest.fail("a model ran"))
    config = bbc_news_splits.get_config()
    config.threshold = threshold
    with pytest.raises(ValueError, match=(
            rf"config\.threshold must be a fraction in \[0, 1\] \(0\.98 for 98%\); got "
            rf"{re.escape(repr(float(threshold)))}\. Pass --config\.threshold=0\.98\.")):
        splits.run_splits(config, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("study", ["select", "splits"])
def test_a_failed_rerun_leaves_no_report_of_an_earlier_config(tmp_path, monkeypatch, study):
    """selection.md / .json (splits.md / .json) of an earlier config stayed when a rerun with
    another config failed partway, and read as the new run's result."""
    module, run, config, names = {
        "select": (select, select.select, bbc_news_selection.get_config(), select.SELECTION_REPORTS),
        "splits": (splits, splits.run_splits, bbc_news_splits.get_config(), splits.REPORTS),
    }[study]
    for name in names:
        (tmp_path / name).write_text("an earlier config's table\n")

    def killed(config, workdir):
        raise RuntimeError("killed")

    monkeypatch.setattr(module, "run_or_reuse", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run(config, tmp_path)
    assert names and not any((tmp_path / name).exists() for name in names)


@pytest.mark.slow
def test_run_splits_pairs_the_models_on_the_same_splits(tmp_path, monkeypatch):
    config = ml_collections.ConfigDict()
    config.base = smoke.get_config()
    config.num_splits = 2
    config.models = ml_collections.ConfigDict(
        {"default": "", "tiny_lr": "optim.learning_rate=1e-6; model.features=4"})
    config.reference = "default"
    config.tfidf_svc = True
    config.threshold = 0.5
    result = splits.run_splits(config, tmp_path)
    accs = result["accuracies"]
    for name in ("default", "tiny_lr"):
        for seed in (0, 1):
            run = tmp_path / name / f"split{seed}"
            summary = json.loads((run / artifacts.SUMMARY).read_text())
            assert summary["test_accuracy"] == accs[name][seed]
            assert json.loads((run / artifacts.CONFIG).read_text())["seed"] == seed
    # the same test articles for every model of a split, other ones for another split
    test_sets = {(n, s): set(json.loads((tmp_path / n / f"split{s}" / artifacts.SPLIT)
                                        .read_text())["test"])
                 for n in ("default", "tiny_lr") for s in (0, 1)}
    assert test_sets["default", 0] == test_sets["tiny_lr", 0] != test_sets["default", 1]
    assert accs[splits.TFIDF_SVC] == [split_accuracy(config.base.data, s) for s in (0, 1)]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["default"]["diff"] == 0.0
    # a learning rate of 1e-6 leaves the model at chance; the default learns
    assert rows["tiny_lr"]["diff"] < -0.2 and rows["tiny_lr"]["worse"] == 2
    assert rows["tiny_lr"]["mean"] == pytest.approx(sum(accs["tiny_lr"]) / 2)
    assert "| tiny_lr |" in (tmp_path / "splits.md").read_text()
    # a second call reuses the finished runs
    monkeypatch.setattr(select, "train_and_evaluate",
                        lambda *a, **k: pytest.fail("a finished split was trained again"))
    assert splits.run_splits(config, tmp_path)["accuracies"] == accs


# ---- behaviours pinned down by mutation testing (each test below failed on a seeded bug)


def test_run_splits_pairs_each_model_with_the_named_reference(tmp_path, monkeypatch):
    """The reference need not be the first model; the SVM gets the same splits."""
    accs = {"first": [0.5, 0.8], "ref": [0.6, 0.6]}
    monkeypatch.setattr(splits, "run_or_reuse", lambda config, workdir: {
        "test_accuracy": accs[workdir.parent.name][int(workdir.name.removeprefix("split"))]})
    config = ml_collections.ConfigDict()
    config.base = smoke.get_config()
    config.num_splits = 2
    config.models = ml_collections.ConfigDict({"first": "model.features=8", "ref": ""})
    config.reference = "ref"
    config.tfidf_svc = True
    config.threshold = 0.6
    from experiments.textcls import tfidf_baseline

    svc_seeds = []
    monkeypatch.setattr(tfidf_baseline, "split_accuracy",
                        lambda data, seed: svc_seeds.append((data["split_seed"], seed)) or 0.6)
    rows = {r["name"]: r for r in splits.run_splits(config, tmp_path)["rows"]}
    assert svc_seeds == [(-1, 0), (-1, 1)]  # the SVM is scored on split k, as the models
    assert rows["ref"]["diff"] == 0.0 and (rows["ref"]["better"], rows["ref"]["worse"]) == (0, 0)
    assert rows["first"]["diff"] == pytest.approx(0.05) and (rows["first"]["better"], rows["first"]["worse"]) == (1, 1)
    assert rows["first"]["at_threshold"] == 1 and rows["ref"]["at_threshold"] == 2
