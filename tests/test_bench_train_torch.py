"""The JAX-vs-PyTorch training benchmark trains the same function in both frameworks."""

import pytest

from configs import smoke
from experiments import bench_train_torch


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {},  # count-weighted mean, sparse lazy Adam on the table (the default's setting)
    {"tokenizer.term_weights": "log", "tokenizer.idf": True, "model.mode": "sqrtn"},
    {"tokenizer.term_weights": "none", "optim.sparse_embedding": False, "model.hidden": 8},
], ids=["count-mean-sparse", "tfidf-sqrtn", "raw-dense-hidden"])
def test_jax_and_torch_loops_reach_the_same_loss(overrides):
    config = smoke.get_config()
    config.data.max_per_class = 12
    for key, value in overrides.items():
        group, leaf = key.split(".")
        config[group][leaf] = value
    results = bench_train_torch.benchmark(config, epochs=2, torch_impls=["fused"],
                                          torch_threads=[1])
    jax_loop, torch_loop = results["loops"]["jax"], results["loops"]["torch_fused_t1"]
    assert len(jax_loop["times"]) == len(torch_loop["times"]) == 2
    # same initial weights, batches, optimiser: the last epoch's mean loss agrees
    assert jax_loop["loss"] == pytest.approx(torch_loop["loss"], rel=1e-4)
    assert jax_loop["accuracy"] == torch_loop["accuracy"]
    report = bench_train_torch.report(results, 2)
    assert "ratio jax / fastest torch (torch_fused_t1)" in report


def test_torch_weights_normalise_mean_and_sqrtn():
    import numpy as np

    bags = [np.array([0, 3, 5]), np.array([], np.int64)]
    w = [np.array([2.0, 3.0, 4.0], np.float32), np.zeros((0,), np.float32)]
    mode, out = bench_train_torch._torch_weights(bags, w, "mean", ignore_unknown=True)
    assert mode == "sum"
    np.testing.assert_allclose(out[0], [2 / 7, 3 / 7, 4 / 7])  # id 0 (unknown) not counted
    mode, out = bench_train_torch._torch_weights(bags, None, "sqrtn", ignore_unknown=False)
    np.testing.assert_allclose(out[0], np.full(3, 1 / np.sqrt(3)), rtol=1e-6)
    assert out[1].shape == (0,)
    assert bench_train_torch._torch_weights(bags, None, "mean", ignore_unknown=True) == ("mean", None)
    with pytest.raises(ValueError, match="no torch equivalent"):
        bench_train_torch._torch_weights(bags, w, "max", ignore_unknown=True)


@pytest.mark.parametrize("key, value, match", [
    ("optim.grad_clip", 0.5, r"grad_clip > 0 with the sparse table .*sparse_embedding=false"),
    ("model.mode", "max", r"mode='max' with the sparse table"),
])
def test_settings_torch_cannot_match_are_refused_up_front(key, value, match):
    """grad_clip crashed inside torch's clip_grad_norm_ (no sparse kernel), max mode inside torch's
    sparse EmbeddingBag, both after the JAX setup."""
    config = smoke.get_config()
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ValueError, match=match):
        bench_train_torch.benchmark(config, 1, ["default"], [1])


def test_cli_checks_the_default_configs_keys():
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "experiments.bench_train_torch", "--config.model.featurs=8"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode != 0 and "Valid keys under 'config.model'" in out.stderr, out.stderr[-2000:]


def test_a_timed_epoch_that_compiled_is_left_out_of_the_median():
    """Nothing kept a compile out of JAX's timed epochs: a batch shape first met in epoch 5 put
    a 1.2 s epoch among 0.07 s ones (the median over 7 absorbs one such epoch, not several)."""
    loops = {"jax": {"times": [0.1, 5.0, 0.1, 4.0, 0.1], "compiled": [2, 4], "loss": 1.0,
                     "accuracy": 0.5},
             "torch_fused_t1": {"times": [0.4] * 5, "compiled": [], "loss": 1.0, "accuracy": 0.5}}
    report = bench_train_torch.report({"num_train": 10, "loops": loops, "compilations": 3,
                                       "torch_default_threads": 2}, 5)
    assert "ratio jax / fastest torch (torch_fused_t1): 0.250" in report
    assert "jax: the train step compiled in timed epoch(s) [2, 4], left out of the median" in report


def test_default_config_is_found_from_any_directory():
    """The default config was the relative 'configs/bbc_news.py': started outside the
    repository, the benchmark failed with 'config file not found' (naming a --config it was
    not given)."""
    from pathlib import Path

    from experiments import bench_train_torch
    from experiments.textcls import config_check

    path = Path(bench_train_torch.DEFAULT_CONFIG)
    assert path.is_absolute() and path.is_file() and path.name == "bbc_news.py"
    assert config_check.config_path_from_argv(["prog", "--config", str(path)]) == str(path)


@pytest.mark.slow
def test_the_jax_loop_pads_the_batches_as_training_does(tmp_path, monkeypatch):
    """The benchmark's JAX loop padded to the geometric ladder, ignoring config.train.max_buckets:
    with a fine ladder it compiled the train step once per rung its batches reached, where
    training fits at most max_buckets sizes. Both now plan with batches.plan_epochs, and the
    benchmark runs a training run's epochs (1 .. epochs + 1), so the sizes are training's."""
    from experiments import train

    config = smoke.get_config()
    config.tokenizer.max_tokens = 0  # documents of every length
    config.train.bucket_growth = 1.1  # a rung every 10%: the batches reach many
    config.train.max_buckets = 3
    config.train.num_epochs = 3
    config.train.plot = False
    padded: dict[str, set[int]] = {"train": set(), "bench": set()}

    def spy(module, key):
        real = module.iterate_batches

        def iterate(*args, **kwargs):
            for batch in real(*args, **kwargs):
                if kwargs["batch_size"] == config.train.batch_size:  # (not evaluation's)
                    padded[key].add(int(batch.bags.indices.shape[0]))
                yield batch
        monkeypatch.setattr(module, "iterate_batches", iterate)

    spy(train, "train")
    spy(bench_train_torch, "bench")
    summary = train.train_and_evaluate(config, tmp_path / "run")
    results = bench_train_torch.benchmark(config, epochs=2, torch_impls=[], torch_threads=[])
    assert len(padded["train"]) == 3 and padded["bench"] == padded["train"], padded
    assert results["compilations"] == summary["compilations"]["train_step"] == 3


@pytest.mark.parametrize("args, match", [
    # statistics.median of no epochs: StatisticsError after the whole setup
    ((0, ["default"], ["1"]), r"--epochs must be an int >= 1 \(timed epochs per loop, after one "
                              r"warm-up\); got 0\. Pass e\.g\. --epochs 7\."),
    # a KeyError once the data was loaded and the JAX model built
    ((7, ["default", "bogus"], ["1"]), r"--torch_impls names unknown AdamW implementations "
                                       r"\['bogus'\]; known: default, foreach, fused\. Pass e\.g\."),
    # torch's RuntimeError after the warm-up epoch
    ((7, ["fused"], ["1", "0"]), r"--torch_threads must be ints >= 1 \(torch intra-op threads\); "
                                 r"got '0'\. Pass e\.g\. --torch_threads 1,2\."),
    ((7, ["fused"], ["abc"]), r"--torch_threads must be ints >= 1 .*; got 'abc'\."),
    ((7, ["fused"], ["1"], -1.0), r"--settle_s must be a number of seconds >= 0; got -1\.0\."),
])
def test_bad_arguments_are_refused_before_any_work(monkeypatch, args, match):
    monkeypatch.setattr(bench_train_torch, "load_splits",
                        lambda *a: pytest.fail("the data was loaded before the arguments were checked"))
    with pytest.raises(ValueError, match=match):
        bench_train_torch.check_args(*args)
    with pytest.raises(ValueError, match=match):
        bench_train_torch.benchmark(smoke.get_config(), *args)
    assert bench_train_torch.check_args(3, ["fused", "default"], ["2", "1"]) == [2, 1]


def test_a_bad_flag_is_one_error_line():
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "experiments.bench_train_torch", "--torch_threads",
                          "abc"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "error: --torch_threads must be ints >= 1" in out.stderr, out.stderr[-2000:]


def test_timings_that_measure_the_load_are_flagged():
    """On a loaded machine torch's 2-thread epochs took 2.0 s against 0.04 s with 1 thread
    (its OpenMP threads spin-wait for cores), and nothing in the report said so."""
    quiet = {"jax": 0.05, "torch_fused_t1": 0.2, "torch_fused_t2": 0.25}
    assert bench_train_torch.timing_warnings(quiet, {k: 0.9 * v for k, v in quiet.items()}) == []
    loaded = {"jax": 0.05, "torch_default_t1": 0.04, "torch_default_t2": 2.0,
              "torch_fused_t1": 0.2, "torch_fused_t2": 0.3}
    warnings = bench_train_torch.timing_warnings(loaded, {k: v for k, v in loaded.items()})
    assert len(warnings) == 1 and warnings[0].startswith(
        "torch_default_t2's median epoch (2.000s) is 50.0x torch_default_t1's (0.040s)")
    # a median over twice the fastest epoch: the load changed during the run
    warnings = bench_train_torch.timing_warnings({"jax": 0.5}, {"jax": 0.1})
    assert len(warnings) == 1 and "jax's median epoch (0.500s) is 5.0x its fastest" in warnings[0]
    loops = {name: {"times": [t] * 3, "compiled": [], "loss": 1.0, "accuracy": 0.5}
             for name, t in loaded.items()}
    report = bench_train_torch.report({"num_train": 10, "loops": loops, "compilations": 1,
                                       "torch_default_threads": 2, "loadavg_start": [3.5, 2, 1],
                                       "loadavg_end": [4.25, 2, 1]}, 3)
    assert "load average (1 min) at start/end: 3.5/4.2" in report
    assert "warning: torch_default_t2's median epoch (2.000s) is 50.0x" in report
