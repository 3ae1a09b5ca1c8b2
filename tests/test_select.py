"""Model selection by cross-validation on the training split (experiments/select.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from configs import bbc_news, bbc_news_selection, smoke
from experiments import select
from experiments.textcls import artifacts


def _selection_config():
    config = ml_collections.ConfigDict()
    config.base = smoke.get_config()
    config.base.train.num_epochs = 6
    config.folds = 2
    config.repeats = 2
    config.reference = "default"
    config.candidates = ml_collections.ConfigDict(
        {"default": "", "tiny_lr": "optim.learning_rate=1e-6; model.features=4"})
    return config


def test_apply_overrides_parses_values_and_leaves_the_base_alone():
    base = smoke.get_config()
    before = base.to_dict()
    c = select.apply_overrides(base, "model.features=128; tokenizer.idf=true; "
                                     "tokenizer.term_weights=log; optim.learning_rate=2e-2")
    assert (c.model.features, c.tokenizer.idf, c.tokenizer.term_weights) == (128, True, "log")
    assert c.optim.learning_rate == 0.02
    assert base.to_dict() == before
    with pytest.raises(ValueError, match="Did you mean 'config.model.features'"):
        select.apply_overrides(base, "model.featurs=3")
    with pytest.raises(ValueError, match="not key=value"):
        select.apply_overrides(base, "model.features")


def test_fold_config_evaluates_on_a_training_fold():
    c = select.fold_config(smoke.get_config(), 5, 3)
    assert (c.data.validation_folds, c.data.validation_fold) == (5, 3)


def test_every_candidate_of_the_shipped_selection_config_is_valid():
    config = bbc_news_selection.get_config()
    assert config.reference in config.candidates
    for name, overrides in config.candidates.items():
        select.apply_overrides(config.base, overrides)  # raises on an unknown key
        assert (name == config.reference) == (overrides == "")


def test_the_default_config_is_the_selected_candidate():
    config = bbc_news_selection.get_config()
    chosen = select.apply_overrides(config.base, config.candidates[bbc_news.SELECTED])
    assert chosen.to_dict() == bbc_news.get_config().to_dict()


@pytest.mark.slow
def test_select_ranks_candidates_by_cross_validation_and_resumes(tmp_path, monkeypatch):
    config = _selection_config()
    rows = select.select(config, tmp_path)
    by_name = {r["name"]: r for r in rows}
    # a learning rate of 1e-6 leaves the model at chance; the default learns
    assert rows[0]["name"] == "default"
    assert by_name["default"]["accuracy"] > by_name["tiny_lr"]["accuracy"] + 0.2
    assert by_name["default"]["diff_vs_reference"] == 0.0
    assert by_name["tiny_lr"]["folds_worse"] == 4
    held_out = {}
    for name in by_name:
        for repeat, fold in [(0, 0), (0, 1), (1, 0), (1, 1)]:
            run = tmp_path / name / f"repeat{repeat}_fold{fold}"
            split = json.loads((run / artifacts.SPLIT).read_text())
            assert (split["validation_folds"], split["validation_fold"]) == (2, fold)
            assert split["validation_repeat"] == repeat
            held_out[name, repeat, fold] = set(split["test"])
            summary = json.loads((run / artifacts.SUMMARY).read_text())
            assert summary["evaluated_on"] == f"validation fold {fold}/2"
            # trained on one fold of the training split, evaluated on the other
            assert summary["num_train"] + summary["num_test"] == 160  # 4/5 of 5 x 40
            assert abs(summary["num_train"] - summary["num_test"]) <= 1
    assert held_out["default", 0, 0] == held_out["tiny_lr", 0, 0]  # paired: the same folds
    assert held_out["default", 0, 0] != held_out["default", 1, 0]  # another partition
    table = (tmp_path / "selection.md").read_text()
    assert table.index("| default |") < table.index("| tiny_lr |")
    # a second call reuses the finished runs instead of training again
    monkeypatch.setattr(select, "train_and_evaluate",
                        lambda *a, **k: pytest.fail("a finished fold was trained again"))
    assert select.select(config, tmp_path) == json.loads(
        (tmp_path / "selection.json").read_text())["rows"]
    # ... but not if the candidate changed since
    config.candidates.tiny_lr = "optim.learning_rate=2e-6"
    with pytest.raises(ValueError, match="holds a finished run of another config"):
        select.select(config, tmp_path)


@pytest.mark.parametrize("key, value, match", [
    # repeats=0 / folds=0 trained nothing and died in statistics.mean (StatisticsError)
    ("repeats", 0, r"config\.repeats must be a positive int; got 0\. Pass --config\.repeats=N "),
    ("folds", 0, r"config\.folds must be an int >= 2; got 0\. Pass --config\.folds=k "),
    # folds=1 was refused naming config.data.validation_folds, not --config.folds
    ("folds", 1, r"config\.folds must be an int >= 2; got 1\. Pass --config\.folds=k "),
])
def test_bad_counts_are_config_errors(tmp_path, key, value, match):
    config = bbc_news_selection.get_config()
    config[key] = value
    with pytest.raises(ValueError, match=match):
        select.select(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_bad_candidate_value_is_an_error_before_any_candidate_runs(tmp_path):
    config = _selection_config()
    config.candidates.dropped = "model.dropout=1.5"
    with pytest.raises(ValueError, match=r"config\.candidates\['dropped'\] = 'model\.dropout=1\.5' "
                       r"applied to config\.base: config\.base\.model\.dropout must be a number in "
                       r"\[0, 1\); got 1\.5\. Pass --config\.base\.model\.dropout=0\.1\."):
        select.select(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_candidate_override_of_the_wrong_type_or_key_names_the_candidate(tmp_path):
    """A value of another type than the key's gave ml_collections' bare TypeError (a traceback
    from the study's command line), and neither error said which candidate it came from."""
    config = _selection_config()
    config.candidates.b = "model.dropout=0.1; model.features=abc"
    with pytest.raises(ValueError, match=r"config\.candidates\['b'\] = 'model\.dropout=0\.1; "
                       r"model\.features=abc': candidate override 'model\.features=abc': Could not "
                       r"override field 'features'.*Give a value of type int, e\.g\. "
                       r"model\.features=16\."):
        select.select(config, tmp_path)
    config.candidates.b = "model.featurs=8"
    with pytest.raises(ValueError, match=r"config\.candidates\['b'\] = 'model\.featurs=8': unknown "
                       r"config key 'config\.model\.featurs'"):
        select.select(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_study_command_line_reports_a_bad_candidate_in_one_line(tmp_path):
    """experiments.select (and experiments.splits, the same study_main) showed a traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "experiments.select", "--config", "configs/bbc_news_selection.py",
         "--workdir", str(tmp_path / "w"), "--config.candidates.sqrtn=model.features=abc"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"^error: config\.candidates\['sqrtn'\] = 'model\.features=abc': ", r.stderr,
                     re.M), r.stderr  # at a line start: JAX may print a platform warning first
    assert not (tmp_path / "w").exists()


# ---- behaviours pinned down by mutation testing (each test below failed on a seeded bug)


def test_select_statistics_and_ranking_from_the_fold_summaries(tmp_path, monkeypatch):
    """Mean accuracy, mean loss and time over the folds; ties in accuracy go to the lower loss;
    the reference is neither better nor worse than itself."""
    fake = {  # (candidate, repeat, fold) -> (accuracy, loss, train_time_s)
        ("ref", 0, 0): (0.9, 0.30, 1.0), ("ref", 0, 1): (0.8, 0.30, 3.0),
        ("ref", 0, 2): (0.7, 0.90, 2.0),
        ("low_loss", 0, 0): (0.8, 0.10, 1.0), ("low_loss", 0, 1): (0.9, 0.20, 1.0),
        ("low_loss", 0, 2): (0.7, 0.30, 1.0),
    }

    def run_or_reuse(config, workdir):
        name, rest = workdir.parent.name, workdir.name  # <name>/repeat<r>_fold<f>
        r, f = (int(x) for x in rest.removeprefix("repeat").split("_fold"))
        acc, loss, secs = fake[name, r, f]
        return {"test_accuracy": acc, "test_loss": loss, "train_time_s": secs, "epoch_time_s": 99.0}

    monkeypatch.setattr(select, "run_or_reuse", run_or_reuse)
    config = _selection_config()
    config.folds, config.repeats, config.reference = 3, 1, "ref"
    config.candidates = ml_collections.ConfigDict({"ref": "", "low_loss": "model.features=8"})
    rows = select.select(config, tmp_path)
    assert [r["name"] for r in rows] == ["low_loss", "ref"]  # same accuracy, lower loss first
    ref = rows[1]
    assert ref["accuracy"] == pytest.approx(0.8) and ref["loss"] == pytest.approx(0.5)
    assert ref["train_time_s"] == pytest.approx(2.0)
    assert (ref["folds_better"], ref["folds_worse"], ref["diff_vs_reference"]) == (0, 0, 0.0)
    assert (rows[0]["folds_better"], rows[0]["folds_worse"]) == (1, 1)
