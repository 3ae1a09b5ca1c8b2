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


def _leaf_types(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaf_types(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = type(v)
    return out


def test_the_default_config_is_the_selected_candidate():
    """The frozen base the selection ran (configs/bbc_news_selection_base.json) with the
    winner's overrides is exactly configs/bbc_news.py: values and the type of every leaf."""
    config = bbc_news_selection.get_config()
    chosen = select.apply_overrides(config.base, config.candidates[bbc_news.SELECTED])
    default = bbc_news.get_config()
    assert chosen.to_dict() == default.to_dict()
    assert _leaf_types(chosen.to_dict()) == _leaf_types(default.to_dict())  # (1 == 1.0, () != [])


def test_an_edit_of_the_default_config_fails_the_selection_check(monkeypatch):
    """The selection's base was the live bbc_news.get_config() with four fields reverted, so the
    check above compared the default with itself: 50 epochs, 256 features, another learning rate
    or bigrams in configs/bbc_news.py still passed. The base is now the frozen file."""
    original = bbc_news.get_config

    def drifted():
        c = original()
        c.train.num_epochs = 50
        return c

    monkeypatch.setattr(bbc_news, "get_config", drifted)
    config = bbc_news_selection.get_config()
    chosen = select.apply_overrides(config.base, config.candidates[bbc_news.SELECTED])
    assert chosen.train.num_epochs == 10  # the selection ran 10 epochs, whatever the default says
    assert chosen.to_dict() != bbc_news.get_config().to_dict()


def test_the_frozen_base_loads_with_the_configs_types():
    base = bbc_news_selection.get_config().base
    assert base.data.class_names == () and isinstance(base.data.class_names, tuple)
    assert isinstance(base.tokenizer.num_buckets, int) and isinstance(base.optim.b2, float)
    assert isinstance(base.model.dropout, float) and base.model.ignore_unknown is True
    # the starting point of the selection, as documented
    assert (base.tokenizer.term_weights, base.tokenizer.idf, base.model.mode,
            base.train.label_smoothing) == ("count", False, "mean", 0.1)


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


def _fake_folds(accuracy):
    """A run_or_reuse that trains nothing: ``accuracy[candidate]``, and the configs it got."""
    seen = {}

    def run_or_reuse(config, workdir):
        seen[workdir.parent.name, workdir.name] = config
        return {"test_accuracy": accuracy[workdir.parent.name], "test_loss": 0.5,
                "train_time_s": 1.0}

    return run_or_reuse, seen


def test_select_names_the_winner_and_it_is_the_top_of_the_ranking(tmp_path, monkeypatch, capsys):
    """The rule (the top candidate wins) was only a sort: the outputs did not say which won."""
    fake, _ = _fake_folds({"default": 0.8, "better": 0.9, "worse": 0.7})
    monkeypatch.setattr(select, "run_or_reuse", fake)
    config = _selection_config()
    config.candidates = ml_collections.ConfigDict(
        {"default": "", "worse": "model.features=4", "better": "model.features=8"})
    rows = select.select(config, tmp_path)
    saved = json.loads((tmp_path / "selection.json").read_text())
    assert saved["winner"] == rows[0]["name"] == saved["rows"][0]["name"] == "better"
    assert "winner: **better**" in (tmp_path / "selection.md").read_text()
    assert "winner: **better**" in capsys.readouterr().out


def test_a_candidate_with_another_seed_keeps_the_base_split(tmp_path, monkeypatch):
    """split_seed=-1 splits by config.seed: a candidate "seed=1" was cross-validated on the split
    of seed 1, whose folds held most of the base's test articles (357 of 444 on BBC News). Its
    split (and folds) are now the base's; its seed still varies the initialisation."""
    from experiments.textcls.data import load_splits

    fake, seen = _fake_folds({"default": 0.8, "seed_1": 0.8})
    monkeypatch.setattr(select, "run_or_reuse", fake)
    config = _selection_config()
    config.candidates = ml_collections.ConfigDict({"default": "", "seed_1": "seed=1"})
    select.select(config, tmp_path)
    base_train, base_test, _ = load_splits(config.base.data, config.base.seed)
    test_articles = set(base_test.sources)  # (files: BBC News holds some texts twice)
    for (name, run), fold_config in seen.items():
        train, held_out, _ = load_splits(fold_config.data, fold_config.seed)
        assert not test_articles & (set(train.sources) | set(held_out.sources)), (name, run)
        assert set(train.sources) | set(held_out.sources) == set(base_train.sources)
        other = seen["default" if name == "seed_1" else "seed_1", run]
        assert held_out.sources == load_splits(other.data, other.seed)[1].sources  # paired
    assert {c.seed for (name, _), c in seen.items() if name == "seed_1"} == {1}
