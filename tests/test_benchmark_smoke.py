"""The benchmark runs end to end on a tiny config (every phase, mode and implementation), and the
faster forward formulation it measures (jaxbag._src.fast_forward) agrees with embedding_bag."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbag
from jaxbag import cpu_kernel_status
from jaxbag._src.fast_forward import bag_reduce
from jaxbag._src.ops import embedding_bag_xla

ROOT = Path(__file__).resolve().parents[1]


def _load_config(name: str):
    import importlib

    return importlib.import_module(f"configs.{name}").get_config()


def test_benchmark_smoke_run(tmp_path):
    from experiments import benchmark

    config = _load_config("bench_smoke")
    out = benchmark.run(config, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["threads"] >= 1 and data["meta"]["torch_threads"] == data["meta"]["threads"]
    assert data["meta"]["torch_device"] == "cpu"  # "auto", with JAX on the CPU
    assert data["meta"]["memcpy_gbps"] > 0
    results = data["results"]
    assert len(results) == len(out["results"])
    for name in ("table.txt", "reference.png", "sweep_V.png"):
        assert (tmp_path / name).stat().st_size > 0, name

    seen = {(r["phase"], r["mode"], r["impl"]) for r in results if not r.get("skipped")}
    for phase in ("fwd", "fwd_bwd", "train"):
        assert (phase, "sum", "torch") in seen
    for impl in config.fwd_impls:
        assert ("fwd", "sum", impl) in seen, impl
    for impl in config.grad_impls:
        assert ("fwd_bwd", "sum", impl) in seen, impl
    assert ("fwd_bwd", "sum", "torch_sparse") in seen
    assert ("train", "sum", "jaxbag_sparse") in seen and ("train", "sum", "torch_sparse") in seen
    # one-hot has no max; torch has no sparse max
    assert ("fwd", "max", "onehot") not in seen and ("train", "max", "torch_sparse") not in seen
    # The train step's torch baseline is the fastest of torch's dense Adam implementations (its
    # CPU default, the per-tensor loop, was the only one timed: 5x slower than fused at V = 1M).
    for mode in config.modes:
        train = {r["impl"]: r for r in results if r["phase"] == "train" and r["mode"] == mode
                 and r["framework"] == "torch"}
        variants = {k: train[f"torch_{k}"]["median_ms"] for k in ("default", "foreach", "fused")}
        fastest = min(variants, key=variants.get)
        assert train["torch"]["variant"] == f"torch_{fastest}", (train["torch"], variants)
        assert train["torch"]["median_ms"] == variants[fastest]

    measured = [r for r in results if not r.get("skipped")]
    for r in measured:
        assert r["median_ms"] > 0 and r["repeats"] == 2
        assert np.isfinite(r.get("x_torch", 1.0))
        if r["framework"] == "jax":
            assert r["compile_s"] > 0 and r["temp_bytes"] is not None
    # Every implementation computed the right thing (forward: vs float64 numpy; gradients: vs
    # torch; train: final loss vs torch's after the same number of Adam steps).
    checked = [r for r in measured if "max_abs_err" in r]
    assert len(checked) > 30
    for r in checked:  # (the tolerance a real run checks with)
        assert r["max_abs_err"] <= benchmark.check_limit(r) and not r.get("check_failed"), r
    assert out["meta"]["failed_checks"] == 0 and "failed their check" not in \
        (tmp_path / "table.txt").read_text()
    fwd = [r for r in measured if r["phase"] == "fwd"]
    assert all(r["gbps"] > 0 for r in fwd)
    sweep = [r for r in measured if r.get("sweep") == "V"]
    assert sorted({r["V"] for r in sweep}) == [50, 200]
    table = (tmp_path / "table.txt").read_text()
    assert "x torch" in table and "jaxbag_sparse" in table


def test_rounds_interleave_the_implementations_and_merge_their_calls(tmp_path, monkeypatch):
    """Torch and each JAX implementation were timed one after the other, once: a change of load
    on the shared machine fell on some of them only. With ``rounds`` every implementation of a
    (shape, phase, mode) is measured in turn, that many times, and its record covers all calls."""
    from configs import bench_smoke
    from experiments import benchmark
    from experiments.bench import timing

    order, calls = [], {}
    real_jax, real_torch = timing.time_jax, timing.time_torch

    def fake(real, name):
        def timed(*a, **kw):
            t, out = real(*a, **kw)
            k = len(order)
            order.append(name)
            # made-up times that tell the rounds apart: the merge must keep every call
            t = dataclasses.replace(t, times_ms=[k + 0.25 * i for i in range(len(t.times_ms))],
                                    compile_s=float(k), temp_bytes=k)
            calls[k] = t.times_ms
            return t, out
        return timed

    monkeypatch.setattr(timing, "time_jax", fake(real_jax, "jax"))
    monkeypatch.setattr(timing, "time_torch", fake(real_torch, "torch"))
    config = bench_smoke.get_config()
    config.update(dict(sweeps=(), phases=("fwd", "train"), modes=("sum",), fwd_impls=("kernel", "naive"),
                       train_impls=("jaxbag_sparse",), plots=False, rounds=3, repeats=2))
    results = benchmark.run(config, tmp_path)["results"]
    fwd_order = ["torch", "jax", "jax"]
    train_order = ["torch"] * 4 + ["jax"]  # three dense Adam variants, sparse, jaxbag_sparse
    assert order == fwd_order * 3 + train_order * 3
    fwd = [r for r in results if r["phase"] == "fwd"]
    assert [r["impl"] for r in fwd] == ["torch", "kernel", "naive"]
    for i, r in enumerate(fwd):  # calls i, i + 3, i + 6 of the run
        ks = [i, i + 3, i + 6]
        times = [t for k in ks for t in calls[k]]
        assert r["times_ms"] == times and r["repeats"] == 6
        assert r["median_ms"] == pytest.approx(np.median(times))
        assert r["min_ms"] == min(times) and r["compile_s"] == ks[0] and r["temp_bytes"] == ks[2]
    train = {r["impl"]: r for r in results if r["phase"] == "train"}
    assert [r["impl"] for r in results if r["phase"] == "train"] == [
        "torch_default", "torch_foreach", "torch_fused", "torch", "torch_sparse", "jaxbag_sparse"]
    assert train["jaxbag_sparse"]["repeats"] == 3 and train["torch"]["repeats"] == 3
    fastest = min(("torch_default", "torch_foreach", "torch_fused"), key=lambda k: train[k]["median_ms"])
    assert train["torch"]["variant"] == fastest
    assert train["torch"]["median_ms"] == train[fastest]["median_ms"] == train["torch_default"]["median_ms"]
    assert train["jaxbag_sparse"]["x_torch_sparse"] == pytest.approx(
        train["jaxbag_sparse"]["median_ms"] / train["torch_sparse"]["median_ms"])


def test_benchmark_cli_locks_config(tmp_path):
    base = [sys.executable, "-m", "experiments.benchmark", "--config", "configs/bench_smoke.py",
            "--workdir", str(tmp_path)]
    quick = ["--config.torch=False", "--config.modes=('sum',)", "--config.phases=('fwd',)",
             "--config.fwd_impls=('stream',)", "--config.plots=False", "--config.only=('tiny',)"]
    ok = subprocess.run(base + quick, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["impl"] for r in rows] == ["stream"] and rows[0]["max_abs_err"] < 1e-5
    bad = subprocess.run(base + ["--config.no_such_field=1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
    assert bad.returncode != 0
    assert "unknown config key 'config.no_such_field'" in bad.stderr  # with the valid keys
    assert "All valid keys: " in bad.stderr
    # a bad value: one error line (it was a ValueError traceback)
    bad = subprocess.run(base + quick + ["--config.rounds=0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert "error: config.rounds must be >= 1; got 0." in bad.stderr


def test_a_wrong_result_fails_the_run_after_the_table_is_written(tmp_path, monkeypatch, capsys):
    """Every result was said to be checked, but max_abs_err was only written into the table: a
    wrong implementation was timed and reported as if right, and the run exited 0."""
    from configs import bench_smoke
    from experiments import benchmark
    from experiments.bench import impls

    naive = impls.FORWARDS["naive"]

    def off_by_a_little(p, mode, options):  # 1e-3 of every bag off: a bug, not rounding
        fwd = naive(p, mode, options)
        return lambda w, batch: fwd(w, batch) + 1e-3

    monkeypatch.setitem(impls.FORWARDS, "naive", off_by_a_little)
    config = bench_smoke.get_config()
    config.update(dict(sweeps=(), phases=("fwd",), modes=("sum",), fwd_impls=("naive", "stream"),
                       torch=False, plots=False, rounds=1))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.run_checked(config, tmp_path)
    assert exit_info.value.code == 1
    rows = {r["impl"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["naive"]["check_failed"] and not rows["stream"].get("check_failed")
    assert rows["naive"]["max_abs_err"] == pytest.approx(1e-3, rel=0.01)
    table = (tmp_path / "table.txt").read_text()
    assert [line.split()[0] for line in table.splitlines() if line.rstrip().endswith("!")] == ["naive"]
    assert "! 1 result(s) failed their check" in table
    err = capsys.readouterr().err
    assert "warning: 1 result(s) failed their check" in err and "tiny fwd sum naive: 1.00e-03 >" in err


def test_the_check_tolerance_grows_with_the_values():
    """float32 rounding grows with the magnitudes: the sweep's sums of ~512 rows differ from
    float64 by ~1e-4; a wrong result is far above the limit at any scale."""
    from experiments import benchmark

    assert benchmark.check_limit({"check_scale": 0.5}) == benchmark.CHECK_TOL
    assert benchmark.check_limit({"check_scale": 100.0}) == pytest.approx(100 * benchmark.CHECK_TOL)
    rows = [{"max_abs_err": 9.6e-5, "check_scale": 90.0}, {"max_abs_err": 2e-4, "check_scale": 0.9},
            {"max_abs_err": float("nan"), "check_scale": 1.0}, {"phase": "fwd"}]
    assert benchmark.failed_checks(rows) == rows[1:3]


def _torch_sees_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.parametrize("override, match", [
    ({"only": ("nosuch",)}, r"config.only names \['nosuch'\], which are no shape or sweep; the names are \['tiny', 'V'\]"),
    ({"phases": ("fwd", "bwd")}, r"config phases must be a non-empty tuple of \('fwd', 'fwd_bwd', 'train'\)"),
    ({"modes": ("summ",)}, r"config modes must be"),
    ({"repeats": 0}, r"config.repeats must be >= 1"),
    ({"rounds": 0}, r"config.rounds must be >= 1"),
    ({"train_impls": ("naive_sparse",)}, r"config.train_impls has unknown implementations \['naive_sparse'\]"),
    ({"torch_device": "tpu"}, r"config.torch_device must be one of \('auto', 'cpu', 'cuda'\); got 'tpu'"),
    # (the CPU build of torch the tests install sees no CUDA device; a CUDA build would run)
    pytest.param({"torch_device": "cuda"},
                 r"config.torch_device='cuda', but torch .* sees no CUDA device .*"
                 r"Use --config.torch_device=cpu",
                 marks=pytest.mark.skipif(_torch_sees_cuda(), reason="this torch sees a GPU")),
])
def test_benchmark_config_errors_before_any_work(tmp_path, override, match):
    """An unknown --config.only name ran nothing and exited 0; bad phases, modes or repeats failed
    mid-run with a KeyError / IndexError; 'naive_sparse' was timed as jaxbag_sparse."""
    from configs import bench_smoke
    from experiments import benchmark

    config = bench_smoke.get_config()
    config.update(override)
    with pytest.raises(ValueError, match=match):
        benchmark.run(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_benchmark_times_torch_with_no_jax_copy_running(tmp_path, monkeypatch):
    """``jnp.asarray(table)`` returns before its copy is done; the benchmark timed torch while a
    512 MB copy ran (torch's ``sum`` 4-8x slower). Every JAX array must be ready when torch starts."""
    from configs import bench_smoke
    from experiments import benchmark
    from experiments.bench import timing

    pending = []
    real = timing.time_torch

    def spy(fn, **kw):
        pending.append(sum(not a.is_ready() for a in jax.live_arrays()))
        return real(fn, **kw)

    monkeypatch.setattr(timing, "time_torch", spy)
    config = bench_smoke.get_config()
    config.update(dict(shapes=(bench_smoke.shape("big", 1 << 18, 64, 64, 256),), sweeps=(),
                       phases=("fwd", "fwd_bwd", "train"), modes=("sum",), fwd_impls=("kernel",),
                       grad_impls=("kernel",), train_impls=("jaxbag_sparse",), check=False,
                       plots=False, repeats=1, train_repeats=1, rounds=2))
    benchmark.run(config, tmp_path)
    # fwd; fwd_bwd dense, sparse; train: dense Adam x 3 implementations, sparse; in two rounds
    # (the second round's torch runs after JAX did)
    assert len(pending) == 2 * 7 and not any(pending), pending


# ---- the faster forward (fast_forward.bag_reduce: C++ CPU kernel and XLA stream loop) ----------

V, D, B = 40, 6, 7


def _case(rng, lengths, n_tail=3, neg_head=0):
    lens = np.asarray(lengths)
    n = int(lens.sum()) + n_tail + neg_head
    seg = np.concatenate([np.full(neg_head, -1), np.repeat(np.arange(B), lens), np.full(n_tail, B)])
    ids = rng.integers(-2, V + 2, n).astype(np.int32)  # some out of range: skipped
    return jnp.asarray(ids), jnp.asarray(seg.astype(np.int32))


@pytest.mark.cpu_kernel
def test_sparse_update_benchmark_runs_and_its_ratios_follow_its_medians():
    """experiments.bench_sparse_update: both paths of every optimiser and dtype pair, checked to
    agree before timing; each ratio is its row's medians'."""
    r = subprocess.run(
        [sys.executable, "-m", "experiments.bench_sparse_update", "--num_embeddings", "300",
         "--features", "8", "--rows", "16,40", "--rounds", "1", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tables = r.stdout.split("V=300 D=8 rows=")[1:]
    assert [t.split(":")[0] for t in tables] == ["16", "40"], r.stdout
    for table in tables:
        rows = [line.split() for line in table.splitlines()[2:] if line.strip()]
        assert [(x[0], x[1]) for x in rows] == [
            ("sgd", "float32/default"), ("sgd", "bfloat16/default"),
            *((name, pair) for name in ("adagrad", "adam")
              for pair in ("float32/default", "bfloat16/default", "float32/bfloat16"))]
        def follows(ratio: str, num: str, den: str) -> bool:  # (all printed rounded)
            n, d, half = float(num), float(den), 0.0005  # ms to 3 decimals
            step = 0.05 if len(ratio.split(".")[1]) == 1 else 0.005
            return (n - half) / (d + half) - step <= float(ratio) <= (n + half) / (d - half) + step

        for name, _, kernel, xla, xla_ratio, f32_ratio in rows:
            f32_kernel = next(x[2] for x in rows if x[0] == name)
            assert float(kernel) > 0 and float(xla) > 0
            assert follows(xla_ratio, xla, kernel) and follows(f32_ratio, kernel, f32_kernel), table


@pytest.mark.parametrize("kwargs, match", [
    # numpy's ValueError from rng.choice, after the minutes of the correctness check
    (dict(v=1000, rows=["2000"]), r"--rows must be ints in \[1, --num_embeddings=1000\] \(distinct "
                                  r"rows per step\); got '2000'\. Pass e\.g\. --rows 512,1000\."),
    (dict(rows=["abc"]), r"--rows must be ints in \[1, --num_embeddings=1000000\] .*; got 'abc'"),
    (dict(rows=[]), r"--rows is empty: nothing to time"),
    # statistics.median of no times: StatisticsError after compiling every variant
    (dict(rounds=0), r"--rounds must be an int >= 1; got 0\. Pass e\.g\. --rounds 5\."),
    (dict(repeats=0), r"--repeats must be an int >= 1; got 0\."),
    (dict(v=0, rows=["1"]), r"--num_embeddings must be an int >= 1; got 0\."),
])
def test_sparse_update_benchmark_refuses_bad_flags_before_any_work(monkeypatch, kwargs, match):
    from experiments import bench_sparse_update as bench

    monkeypatch.setattr(bench, "check_paths_agree", lambda *a: pytest.fail("ran before the check"))
    args = dict(v=1_000_000, d=64, rows=["512"], rounds=5, repeats=5) | kwargs
    with pytest.raises(ValueError, match=match):
        bench.run(**args)
    assert bench.check_args(**dict(args, v=1000, rows=["16", "1000"], rounds=1, repeats=1)) == [16, 1000]


def test_sparse_update_benchmark_refuses_stray_arguments():
    """`del argv`: a mistyped flag without its dashes (`rows 16`) was ignored and the defaults ran."""
    from absl import app

    from experiments import bench_sparse_update as bench

    with pytest.raises(app.UsageError, match=r"unexpected arguments: \['rows', '16'\]"):
        bench.main(["bench_sparse_update", "rows", "16"])


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_the_timed_forward_backward_runs_the_forward(mode):
    """The dense forward+backward returned the gradient alone: for sum and mean, whose gradient
    does not read the bags, XLA dropped the forward (no kernel call), unlike torch's timed
    fwd_bwd. Both programs now compute and return the bags."""
    from experiments import benchmark
    from experiments.bench import impls, problems

    p = problems.make_problem("t", 50, 4, 3, 12)
    dev = benchmark.device_inputs(p)
    w, batch, cot = dev["weight"], dev["batch"], dev["cotangent"]
    for fn in (impls.dense_fwd_bwd(impls.FORWARDS["jaxbag"](p, mode, None), cot),
               impls.rows_fwd_bwd(p, mode, cot)):
        text = jax.jit(fn).lower(w, batch).compile().as_text()
        assert "jaxbag_bag_fwd_f32" in text or mode == "max" and "jaxbag_rows_grad" in text, text
        bags, _ = fn(w, batch)
        np.testing.assert_allclose(
            bags, jaxbag.embedding_bag(w, batch["ids"], batch["offsets"], mode=mode), rtol=1e-6)


def test_cpu_kernel_builds_here():
    ok, why = cpu_kernel_status()
    assert ok, why  # this machine has a C++ compiler; see test_no_compiler_falls_back for the rest


@pytest.mark.parametrize(
    "mode,skewed,impl",
    [pytest.param(m, sk, "kernel", marks=pytest.mark.cpu_kernel)
     for m, sk in (("sum", False), ("mean", False), ("max", False), ("sqrtn", True))]
    + [("sum", False, "stream"), ("sqrtn", False, "stream"), ("mean", True, "stream"),
       ("max", True, "stream")],
)
def test_bag_reduce_matches_embedding_bag(mode, skewed, impl):
    rng = np.random.default_rng(0 if skewed else 1)
    lengths = [0, 30, 1, 0, 2, 1, 1] if skewed else [3, 0, 5, 2, 4, 1, 3]
    ids, seg = _case(rng, lengths, neg_head=2)
    w = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    psw = None if mode == "max" else jnp.asarray(rng.random(ids.shape[0]) + 0.1, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)

    # ids / seg are jit arguments (traced): out-of-range ids are then skipped, not an eager error.
    def ref(w_, p_, i_, s_):
        return embedding_bag_xla(w_, i_, segment_ids=s_, num_bags=B, mode=mode,
                                    per_sample_weights=p_, padding_idx=3)

    def fast(w_, p_, i_, s_):
        # skewed: B * L = 210 > 4 N, so the stream path takes its chunked fallback (5 ids a step)
        return bag_reduce(w_, i_, s_, B, mode=mode, per_sample_weights=p_, padding_idx=3,
                          impl=impl, chunk=5)

    args = (ids, seg)
    np.testing.assert_allclose(jax.jit(fast)(w, psw, *args), jax.jit(ref)(w, psw, *args),
                               rtol=1e-5, atol=1e-5)
    argnums = (0,) if psw is None else (0, 1)
    g_ref = jax.jit(jax.grad(lambda a, b, i, s: jnp.sum(ref(a, b, i, s) * ct), argnums=argnums))(w, psw, *args)
    g_fast = jax.jit(jax.grad(lambda a, b, i, s: jnp.sum(fast(a, b, i, s) * ct), argnums=argnums))(w, psw, *args)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # forward mode (custom_jvp) and vmap
    tw = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    jr = jax.jit(lambda a, t, i, s: jax.jvp(lambda x: ref(x, psw, i, s), (a,), (t,))[1])(w, tw, *args)
    jf = jax.jit(lambda a, t, i, s: jax.jvp(lambda x: fast(x, psw, i, s), (a,), (t,))[1])(w, tw, *args)
    np.testing.assert_allclose(jf, jr, rtol=1e-4, atol=1e-5)
    ws = jnp.stack([w, 2 * w])
    vf = jax.jit(jax.vmap(lambda x, i, s: fast(x, psw, i, s), (0, None, None)))(ws, *args)
    vr = jax.jit(jax.vmap(lambda x, i, s: ref(x, psw, i, s), (0, None, None)))(ws, *args)
    np.testing.assert_allclose(vf, vr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [1, 3, 4, 6, 16, 21, 32, 64, 100, 128, 200, 256, 300])
@pytest.mark.cpu_kernel
def test_kernel_every_row_width(width):
    # The kernel has one loop per width of 16-256 and blocks of 64, 16, 4 and 1 columns for other
    # widths; every mode, weights, padding, out-of-range ids, empty bags and positions past the
    # last bag, against float64 NumPy. (Unsorted segment ids: test_errors' regrouping tests.)
    rng = np.random.default_rng(width)
    nv, nb, n = 30, 5, 40
    w = rng.standard_normal((nv, width)).astype(np.float32)
    ids = rng.integers(-1, nv + 1, n).astype(np.int32)
    seg = np.sort(rng.integers(0, nb, n)).astype(np.int32)
    seg[seg == 2] = 3  # bag 2 empty
    seg[-3:] = nb  # past the last bag: dropped
    psw = (rng.random(n) + 0.5).astype(np.float32)
    pad = 7
    take = (ids >= 0) & (ids < nv) & (ids != pad)
    for mode in ("sum", "mean", "sqrtn", "max"):
        for weighted in (False, True) if mode != "max" else (False,):
            out = jax.jit(lambda w_, p_, i, s, mode=mode: bag_reduce(
                w_, i, s, nb, mode=mode, per_sample_weights=p_, padding_idx=pad, impl="kernel"))(
                w, psw if weighted else None, ids, seg)
            expect = np.zeros((nb, width))
            for b in range(nb):
                sel = take & (seg == b)
                if not sel.any():
                    continue
                rows = w[ids[sel]].astype(np.float64)
                c = psw[sel].astype(np.float64) if weighted else np.ones(int(sel.sum()))
                if mode == "max":
                    expect[b] = rows.max(0)
                else:
                    den = {"sum": 1.0, "mean": c.sum(), "sqrtn": np.sqrt((c * c).sum())}[mode]
                    expect[b] = (c[:, None] * rows).sum(0) / den
            np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5,
                                       err_msg=f"mode={mode} weighted={weighted}")


@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sqrtn"])
@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_stream_loop_with_closed_over_constants(mode, unroll):
    # Everything a jit constant, so XLA knows the loop's trip count at compile time. The loop
    # once stepped by `unroll` positions, and XLA:CPU dropped `while i < 1: i += k` (k > 1) as
    # if it never ran: one bag of one id came back as zeros. Lengths 1..5 against unroll 1/2/4.
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    for lengths in ([1], [3], [2, 5], [0, 1, 4]):
        seg_np = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
        ids_np = rng.integers(0, 5, seg_np.shape[0]).astype(np.int32)
        ids, seg = jnp.asarray(ids_np), jnp.asarray(seg_np)
        out = jax.jit(lambda: bag_reduce(w, ids, seg, len(lengths), mode=mode, impl="stream",
                                         unroll=unroll))()
        wn = np.asarray(w)
        expect = []
        for b, length in enumerate(lengths):
            rows = wn[ids_np[seg_np == b]]
            expect.append(np.zeros(3) if length == 0 else {
                "sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0),
                "sqrtn": rows.sum(0) / np.sqrt(length)}[mode])
        np.testing.assert_allclose(out, np.stack(expect), rtol=1e-5, atol=1e-6,
                                   err_msg=f"lengths={lengths}")


@pytest.mark.parametrize("impl", [pytest.param("kernel", marks=pytest.mark.cpu_kernel), "stream", "auto"])
def test_max_of_a_bag_of_minus_inf_rows_is_minus_inf(impl):
    """A bag whose rows are all -inf has max -inf, as jnp.max and torch (the stream loop took no
    row, since -inf > -inf is false, and returned the empty bag's zeros)."""
    w = jnp.asarray([[1.0, 2.0], [-np.inf, -np.inf], [3.0, 4.0]], jnp.float32)
    ids, seg = jnp.asarray([0, 1, 1, 2], jnp.int32), jnp.asarray([0, 1, 1, 2], jnp.int32)
    out = bag_reduce(w, ids, seg, 3, mode="max", impl=impl)
    np.testing.assert_array_equal(out, [[1.0, 2.0], [-np.inf, -np.inf], [3.0, 4.0]])


@pytest.mark.parametrize("impl", [pytest.param("kernel", marks=pytest.mark.cpu_kernel), "stream"])
def test_bag_reduce_offsets_layout_including_ill_formed(impl):
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, 12), jnp.int32)
    # unsorted, repeated and out-of-range offsets: grouped exactly as offsets_to_segment_ids does
    for offs, last in [([0, 4, 4, 9], False), ([0, 3, 12], True), ([5, -1, 2, 30, 7], False)]:
        offs = jnp.asarray(offs, jnp.int32)
        f = jax.jit(lambda w_, i, o, last=last: bag_reduce(
            w_, i, offsets=o, include_last_offset=last, mode="sum", impl=impl))
        nb = offs.shape[0] - int(last)
        # under jit (ill-formed offsets are an eager error): the documented grouping
        seg = jax.jit(lambda o, last=last: jaxbag.offsets_to_segment_ids(o, 12, include_last_offset=last))(offs)
        g = jax.jit(lambda w_, i, s, nb=nb: bag_reduce(w_, i, s, nb, mode="sum", impl="stream"))
        np.testing.assert_allclose(f(w, ids, offs), g(w, ids, seg), rtol=1e-6, atol=1e-6)
    # and the well-formed case against plain numpy
    offs = jnp.array([0, 5, 5, 9], jnp.int32)
    out = jax.jit(lambda w_, i, o: bag_reduce(w_, i, offsets=o, mode="mean", impl=impl))(w, ids, offs)
    wn, idn = np.asarray(w), np.asarray(ids)
    expect = [wn[idn[0:5]].mean(0), np.zeros(D), wn[idn[5:9]].mean(0), wn[idn[9:]].mean(0)]
    np.testing.assert_allclose(out, np.stack(expect), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", [pytest.param("kernel", marks=pytest.mark.cpu_kernel), "stream"])
def test_bag_reduce_hessian_and_max_ties(impl):
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    ids, seg = jnp.array([0, 3, 3, 5, 7, 1]), jnp.array([0, 0, 1, 1, 1, 2])
    psw = jnp.asarray(rng.random(6), jnp.float32)

    def f(fn):
        return lambda w_, p_, i, s: jnp.sum(jnp.sin(fn(w_, p_, i, s)))

    fast = f(lambda w_, p_, i, s: bag_reduce(w_, i, s, 3, mode="sqrtn", per_sample_weights=p_, impl=impl))
    ref = f(lambda w_, p_, i, s: embedding_bag_xla(w_, i, segment_ids=s, num_bags=3, mode="sqrtn",
                                                      per_sample_weights=p_))
    hf = jax.jit(jax.hessian(fast, argnums=(0, 1)))(w, psw, ids, seg)
    hr = jax.jit(jax.hessian(ref, argnums=(0, 1)))(w, psw, ids, seg)
    for a, b in zip(jax.tree.leaves(hf), jax.tree.leaves(hr)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    w2 = jnp.array([[1.0, 5.0], [1.0, 2.0], [0.0, 5.0]], jnp.float32)
    ids2, seg2 = jnp.array([0, 1, 2, 1]), jnp.array([0, 0, 0, 1])
    g = jax.grad(lambda x: jnp.sum(bag_reduce(x, ids2, seg2, 2, mode="max", impl=impl)))(w2)
    # bag 0: feature 0 max 1.0 at ids 0 and 1 -> first (row 0); feature 1 max 5 at rows 0, 2 -> row 0
    np.testing.assert_array_equal(g, [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])


def test_bag_reduce_bf16_uses_xla_path():
    w = jnp.array([[1.0, 5.0], [1.0, 2.0], [0.0, 5.0]], jnp.bfloat16)
    out = bag_reduce(w, jnp.array([0, 1, 2, 1]), jnp.array([0, 0, 0, 1]), 2, mode="mean")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), [[2 / 3, 4.0], [1.0, 2.0]], rtol=1e-2)
    with pytest.raises(RuntimeError, match="float32"):
        bag_reduce(w, jnp.array([0]), jnp.array([0]), 1, mode="sum", impl="kernel")


def test_no_compiler_falls_back_to_xla(tmp_path):
    code = (
        "import jax.numpy as jnp\n"
        "from jaxbag import cpu_kernel_status\n"
        "from jaxbag._src.fast_forward import bag_reduce\n"
        "ok, why = cpu_kernel_status()\n"
        "assert not ok and 'compiler' in why, why\n"
        "out = bag_reduce(jnp.eye(3), jnp.array([0, 2, 2]), offsets=jnp.array([0, 1]), mode='sum')\n"
        "assert out.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], out\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), JAXBAG_CACHE_DIR=str(tmp_path),
               PATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_gather_formulation_used_off_cpu(mode):
    """impl='auto' lowers the gather + segment formulation on GPU/TPU: check it here directly."""
    from jaxbag._src import fast_forward

    rng = np.random.default_rng(5)
    ids, seg = _case(rng, [3, 0, 5, 2, 4, 1, 3], neg_head=1)
    w = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    out, arg = jax.jit(lambda w_, i, s: fast_forward._gather_primal(w_, None, i, s, B, 3, mode))(w, ids, seg)
    ref = jax.jit(lambda w_, i, s: bag_reduce(w_, i, s, B, mode=mode, padding_idx=3, impl="stream"))(w, ids, seg)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    if mode == "max":
        _, arg_k = jax.jit(lambda w_, i, s: fast_forward.bag_reduce_with_arg(
            w_, i, s, None, num_bags=B, padding_idx=3, mode=mode, layout=0, impl="stream"))(w, ids, seg)
        np.testing.assert_array_equal(arg, arg_k)
    # and it lowers for a GPU without one being present
    lowered = jax.jit(lambda w_, i, s: bag_reduce(w_, i, s, B, mode=mode)).trace(w, ids, seg).lower(
        lowering_platforms=("cuda",))
    assert "custom_call" not in lowered.as_text() or "jaxbag" not in lowered.as_text()


def test_torch_runs_where_jax_runs(monkeypatch):
    """On a GPU machine the benchmark compared JAX on the GPU with torch on the CPU. ``auto`` now
    puts torch on CUDA when JAX's backend is ``gpu`` and torch sees a CUDA device."""
    import torch

    from experiments.bench import torch_impls

    assert torch_impls.resolve_device("auto", "cpu") == "cpu"
    assert torch_impls.resolve_device("cpu", "gpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_impls.resolve_device("auto", "gpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_impls.resolve_device("auto", "gpu") == "cuda"
    assert torch_impls.resolve_device("auto", "cpu") == "cpu"
    assert torch_impls.resolve_device("cuda", "cpu") == "cuda"


def test_time_torch_on_cuda_waits_for_each_call(monkeypatch):
    """torch's CUDA calls return once queued: a timed call must end with a synchronize, and the
    memory is the growth of torch's peak allocated device memory (not the process RSS)."""
    import torch

    from experiments.bench import timing

    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: log.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5096)

    def fn():
        log.append(("call", None))
        return len(log)

    t, _ = timing.time_torch(fn, repeats=3, warmup=1, device="cuda")
    assert t.repeats == 3 and len(t.times_ms) == 3 and t.temp_bytes == 4096
    calls = [k for k, _ in log]
    # the first call, the warm-up, then each timed call, each followed by a synchronize; the peak
    # is reset after the warm-up
    assert calls == ["sync", "call", "sync", "call", "sync", "reset",
                     "call", "sync", "call", "sync", "call", "sync"]
    assert all(d == "cuda" for k, d in log if k in ("sync", "reset"))
