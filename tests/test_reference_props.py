"""jaxbag.embedding_bag against the loop-based NumPy reference (tests/reference.py).

A parameterized grid over (mode, weighted, dtype, input form, index dtype) with empty bags and padding,
each run eagerly and under jax.jit, then hypothesis property tests on random ragged batches (fixed
shape buckets, so the number of compilations stays small).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxbag
from jaxbag._src import ops
from reference import (
    MODES,
    assert_close,
    embedding_bag_ref,
    embedding_bag_ref_vjp,
    magnitude_ref,
    numeric_vjp,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          # fp8 tables: accumulated in float32 like bf16 (gather, reduce and gradients)
          "float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}
FORMS = ("offsets", "offsets_last", "2d", "segments")
STATIC = ("mode", "padding_idx", "include_last_offset", "max_norm", "norm_type", "scale_grad_by_freq", "num_bags")


@functools.lru_cache(maxsize=None)
def _jitted(static_items):
    static = dict(static_items)

    def f(weight, indices, offsets, dyn):
        return jaxbag.embedding_bag(weight, indices, offsets, **static, **dyn)

    return jax.jit(f)


def run_op(weight, indices, offsets=None, *, jit, **kw):
    """Calls jaxbag.embedding_bag eagerly, or through a cached jax.jit with the options static."""
    static = {k: kw[k] for k in STATIC if k in kw}
    dyn = {k: v for k, v in kw.items() if k not in STATIC}
    if not jit:
        return jaxbag.embedding_bag(weight, indices, offsets, **static, **dyn)
    return _jitted(tuple(sorted(static.items())))(weight, indices, offsets, dyn)


def to_f64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


def check_against_ref(weight, indices, offsets=None, *, jit, dtype_name="float32", factor=1.0, **kw):
    out = run_op(weight, indices, offsets, jit=jit, **kw)
    assert out.dtype == weight.dtype, (out.dtype, weight.dtype)
    ref_kw = {k: v for k, v in kw.items() if k != "scale_grad_by_freq"}
    ref_kw["per_sample_weights"] = to_f64(kw.get("per_sample_weights"))
    expected = embedding_bag_ref(to_f64(weight), indices, offsets, **ref_kw)
    mag = magnitude_ref(to_f64(weight), indices, offsets, **ref_kw)
    assert_close(out, expected, mag, dtype_name, factor=factor, err_msg=f"jit={jit} {kw}")
    return out, expected


# ------------------------------------------------------------------------------------------------
# A fixed case per input form with empty bags, padding and trailing ignored entries.

V, D = 7, 3


def fixed_case(form, *, weighted, index_dtype, dtype, positive_weights):
    """(weight, indices, offsets, extra kwargs) for one input form; has empty and padding-only bags."""
    rng = np.random.default_rng(1234)
    weight = jnp.asarray(rng.normal(size=(V, D)).astype(np.float32)).astype(dtype)
    extra = {}
    if form == "2d":
        # 5 x 4, not square: a swapped bags / length stride would not go unnoticed
        indices = np.array([[1, 6, 2, 2], [6, 6, 6, 6], [0, 5, 3, 6], [4, 4, 4, 1], [2, 0, 6, 5]],
                           dtype=index_dtype)
        offsets = None
    else:
        indices = np.array([1, 6, 2, 2, 6, 0, 5, 3, 4, 4, 1, 5], dtype=index_dtype)
        if form == "offsets":
            # bags: [1 6 2 2] [] [6] [0 5 3 4 4 1 5]
            offsets = np.array([0, 4, 4, 5], dtype=index_dtype)
        elif form == "offsets_last":
            # bags: [1 6 2 2] [] [6] [0 5 3 4]; entries 9.. ([4 1 5]) are ignored
            offsets = np.array([0, 4, 4, 5, 9], dtype=index_dtype)
            extra["include_last_offset"] = True
        else:
            offsets = None
            extra["segment_ids"] = np.array([0, 0, 0, 0, 2, 3, 3, 3, 3, 4, 4, 5], dtype=np.int32)
            extra["num_bags"] = 4  # bag 1 empty; ids 4 and 5 are dropped
    if weighted:
        if positive_weights:
            psw = rng.uniform(0.25, 2.0, size=indices.shape)
        else:
            psw = rng.uniform(-2.0, 2.0, size=indices.shape)
        extra["per_sample_weights"] = jnp.asarray(psw.astype(np.float32)).astype(dtype)
    return weight, indices, offsets, extra


GRID = [(m, w) for m in MODES for w in (False, True) if not (m == "max" and w)]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode,weighted", GRID, ids=[f"{m}-{'w' if w else 'u'}" for m, w in GRID])
def test_grid_vs_reference(mode, weighted, dtype_name, form, jit):
    index_dtype = np.int64 if form in ("offsets", "2d") else np.int32
    weight, indices, offsets, extra = fixed_case(
        form, weighted=weighted, index_dtype=index_dtype, dtype=DTYPES[dtype_name], positive_weights=mode != "sum"
    )
    out, expected = check_against_ref(
        weight, indices, offsets, jit=jit, dtype_name=dtype_name, mode=mode, padding_idx=6, **extra
    )
    # The padding-only / empty bags (bag 1 in every form) are exact zeros.
    assert np.all(np.asarray(out[1]).astype(np.float64) == 0.0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_idx", [None, -1, -7])
def test_padding_idx_vs_reference(mode, form, padding_idx, jit):
    weight, indices, offsets, extra = fixed_case(
        form, weighted=False, index_dtype=np.int32, dtype=jnp.float32, positive_weights=True
    )
    check_against_ref(weight, indices, offsets, jit=jit, mode=mode, padding_idx=padding_idx, **extra)


MAX_NORM_CASES = [(1.0, 2.0, "offsets"), (0.5, 1.0, "2d"), (0.8, 3.0, "segments"), (0.8, float("inf"), "offsets_last")]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("max_norm,norm_type,form", MAX_NORM_CASES, ids=[f"{a}-{b}-{c}" for a, b, c in MAX_NORM_CASES])
@pytest.mark.parametrize("mode,weighted", GRID, ids=[f"{m}-{'w' if w else 'u'}" for m, w in GRID])
def test_max_norm_vs_reference(mode, weighted, form, max_norm, norm_type, jit):
    weight, indices, offsets, extra = fixed_case(
        form, weighted=weighted, index_dtype=np.int32, dtype=jnp.float32, positive_weights=mode != "sum"
    )
    weight = weight * 2.0
    check_against_ref(
        weight, indices, offsets, jit=jit, mode=mode, max_norm=max_norm, norm_type=norm_type, padding_idx=6, **extra
    )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode,weighted", GRID, ids=[f"{m}-{'w' if w else 'u'}" for m, w in GRID])
def test_float64_tables_compute_in_float64(mode, weighted, form, jit):
    """Under x64 a float64 table is gathered, reduced and differentiated in float64: values and
    gradients within 1e-12 of the reference, with rows 1e-9 apart that float32 cannot hold."""
    with jax.enable_x64(True):
        weight, indices, offsets, extra = fixed_case(
            form, weighted=weighted, index_dtype=np.int32, dtype=jnp.float64, positive_weights=True
        )
        weight = weight + 1e-9 * jnp.arange(weight.size, dtype=jnp.float64).reshape(weight.shape)
        psw = extra.pop("per_sample_weights", None)
        static = dict(mode=mode, padding_idx=6, **{k: v for k, v in extra.items() if k != "segment_ids"})
        seg = extra.get("segment_ids")

        def f(w, p):
            return jaxbag.embedding_bag(w, indices, offsets, per_sample_weights=p, segment_ids=seg, **static)

        cot = np.random.default_rng(0).normal(size=jax.eval_shape(f, weight, psw).shape)
        f_vjp = jax.jit(lambda w, p: jax.vjp(f, w, p)) if jit else (lambda w, p: jax.vjp(f, w, p))
        out, pullback = f_vjp(weight, psw)
        assert out.dtype == jnp.float64
        ref_kw = dict(static, per_sample_weights=None if psw is None else to_f64(psw), segment_ids=seg)
        np.testing.assert_allclose(out, embedding_bag_ref(to_f64(weight), indices, offsets, **ref_kw),
                                   rtol=1e-12, atol=1e-12)
        g_w, g_p = pullback(jnp.asarray(cot))
        want_w, want_p = embedding_bag_ref_vjp(to_f64(weight), indices, offsets, cotangent=cot, **ref_kw)
        assert g_w.dtype == jnp.float64
        np.testing.assert_allclose(g_w, want_w, rtol=1e-12, atol=1e-12)
        if psw is not None:
            np.testing.assert_allclose(g_p, want_p, rtol=1e-12, atol=1e-12)


NARROW_OPTION_CASES = [(m, o) for m in MODES for o in ("max_norm", "scale_grad_by_freq")
                       if not (m == "max" and o == "scale_grad_by_freq")]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float8_e4m3fn"])
@pytest.mark.parametrize("mode,option", NARROW_OPTION_CASES, ids=[f"{m}-{o}" for m, o in NARROW_OPTION_CASES])
def test_narrow_tables_with_max_norm_or_scale_grad_by_freq(mode, option, dtype_name, jit):
    """The path these options take (gather + segment ops) returns the table's dtype and the
    reference's values for narrow tables too (the other grids run it in float32 only)."""
    weight, indices, offsets, extra = fixed_case(
        "segments", weighted=False, index_dtype=np.int32, dtype=DTYPES[dtype_name], positive_weights=True
    )
    opts = dict(max_norm=1.0) if option == "max_norm" else dict(scale_grad_by_freq=True)
    check_against_ref(weight, indices, offsets, jit=jit, dtype_name=dtype_name, mode=mode, padding_idx=6,
                      **opts, **extra)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", MODES)
def test_all_bags_empty(mode, jit):
    weight = jnp.asarray(np.arange(V * D, dtype=np.float32).reshape(V, D) - 3.0)
    out = run_op(weight, np.zeros((0,), np.int32), np.zeros((3,), np.int32), jit=jit, mode=mode)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((3, D), np.float32))
    out = run_op(
        weight,
        np.array([1, 2], np.int32),
        None,
        jit=jit,
        mode=mode,
        segment_ids=np.array([3, 3], np.int32),
        num_bags=3,
    )
    np.testing.assert_array_equal(np.asarray(out), np.zeros((3, D), np.float32))
    out = run_op(weight, np.zeros((3, 0), np.int64), None, jit=jit, mode=mode)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((3, D), np.float32))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_max_of_negative_rows_is_not_clipped_at_zero(jit):
    # A max that started from 0 instead of -inf would give 0 here.
    weight = jnp.asarray(-1.0 - np.arange(V * D, dtype=np.float32).reshape(V, D))
    out = run_op(weight, np.array([3, 4, 5], np.int32), np.array([0, 1], np.int32), jit=jit, mode="max")
    expected = np.stack([np.asarray(weight[3]), np.asarray(weight[4])])
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_negative_segment_ids_dropped(jit):
    weight = jnp.asarray(np.arange(V * D, dtype=np.float32).reshape(V, D))
    segment_ids = np.array([-1, -1, 0, 1, 1, 2], np.int32)
    indices = np.array([5, 6, 1, 2, 3, 4], np.int32)
    out = run_op(weight, indices, None, jit=jit, mode="sum", segment_ids=segment_ids, num_bags=2)
    w = np.asarray(weight)
    np.testing.assert_allclose(np.asarray(out), np.stack([w[1], w[2] + w[3]]), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Hypothesis: random ragged batches.

HV, HD = 6, 3


@st.composite
def ragged_case(draw):
    form = draw(st.sampled_from(FORMS))
    mode = draw(st.sampled_from(MODES))
    weighted = mode != "max" and draw(st.booleans())
    padding_idx = draw(st.sampled_from([None, 0, 3, -1]))
    dtype_name = draw(st.sampled_from(["float32", "float32", "bfloat16", "float16"]))
    seed = draw(st.integers(0, 2**31 - 1))
    quantized = draw(st.booleans())  # coarse values: ties and exact duplicates
    kw = {"mode": mode, "padding_idx": padding_idx}
    if form == "2d":
        b = draw(st.sampled_from([1, 3]))
        length = draw(st.sampled_from([1, 4]))
        indices = np.array(
            draw(st.lists(st.integers(0, HV - 1), min_size=b * length, max_size=b * length)), np.int32
        ).reshape(b, length)
        offsets = None
    else:
        n = draw(st.sampled_from([0, 5, 9]))
        b = draw(st.sampled_from([1, 4]))
        indices = np.array(draw(st.lists(st.integers(0, HV - 1), min_size=n, max_size=n)), np.int32)
        if form == "offsets":
            cuts = sorted(draw(st.lists(st.integers(0, n), min_size=b - 1, max_size=b - 1)))
            offsets = np.array([0, *cuts], np.int32)
        elif form == "offsets_last":
            cuts = sorted(draw(st.lists(st.integers(0, n), min_size=b, max_size=b)))
            offsets = np.array([0, *cuts], np.int32)
            kw["include_last_offset"] = True
        else:
            offsets = None
            kw["segment_ids"] = np.array(
                sorted(draw(st.lists(st.integers(0, b + 1), min_size=n, max_size=n))), np.int32
            )
            kw["num_bags"] = b
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(HV, HD))
    if quantized:
        w = np.round(w * 2) / 2
    weight = jnp.asarray(w.astype(np.float32)).astype(DTYPES[dtype_name])
    if weighted:
        lo = -2.0 if mode == "sum" else 0.25
        psw = rng.uniform(lo, 2.0, size=indices.shape)
        if quantized:
            psw = np.round(psw * 4) / 4
            if mode != "sum":
                psw = np.maximum(psw, 0.25)
        kw["per_sample_weights"] = jnp.asarray(psw.astype(np.float32)).astype(DTYPES[dtype_name])
    return weight, indices, offsets, kw, dtype_name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ragged_case(), jit=st.booleans())
def test_property_forward_vs_reference(case, jit):
    weight, indices, offsets, kw, dtype_name = case
    check_against_ref(weight, indices, offsets, jit=jit, dtype_name=dtype_name, **kw)


def _loss_fn(indices, offsets, kw, cot, wrt_psw):
    static = {k: kw[k] for k in STATIC if k in kw}
    dyn = {k: v for k, v in kw.items() if k not in STATIC}

    def loss(weight, psw):
        d = dict(dyn)
        if wrt_psw:
            d["per_sample_weights"] = psw
        out = jaxbag.embedding_bag(weight, indices, offsets, **static, **d)
        return jnp.sum(out.astype(jnp.float32) * cot)

    return loss


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ragged_case(), jit=st.booleans(), sgbf=st.booleans())
def test_property_grad_vs_reference(case, jit, sgbf):
    weight, indices, offsets, kw, dtype_name = case
    weight = weight.astype(jnp.float32)
    if kw["mode"] == "max":
        sgbf = False
        # Distinct values per column so that the arg-max is well defined under rounding.
        weight = weight + jnp.asarray(np.arange(HV * HD, dtype=np.float32).reshape(HV, HD) * 1e-3)
    if sgbf:
        kw = {**kw, "scale_grad_by_freq": True}
    wrt_psw = "per_sample_weights" in kw
    if wrt_psw:
        kw["per_sample_weights"] = kw["per_sample_weights"].astype(jnp.float32)
    b = embedding_bag_ref(np.zeros((HV, HD)), indices, offsets, **{k: v for k, v in kw.items() if k in (
        "include_last_offset", "segment_ids", "num_bags")}).shape[0]
    cot = jnp.asarray(np.random.default_rng(7).normal(size=(b, HD)).astype(np.float32))
    loss = _loss_fn(indices, offsets, kw, cot, wrt_psw)
    grad = jax.grad(loss, argnums=(0, 1))
    if jit:
        grad = jax.jit(grad)
    dw, dpsw = grad(weight, kw.get("per_sample_weights", jnp.zeros((), jnp.float32)))
    ref_kw = {k: v for k, v in kw.items() if k != "per_sample_weights"}
    ref_dw, ref_dpsw = embedding_bag_ref_vjp(
        to_f64(weight),
        indices,
        offsets,
        cotangent=to_f64(cot),
        per_sample_weights=to_f64(kw.get("per_sample_weights")),
        **ref_kw,
    )
    # Absolute slack from the size of the terms (a gradient can be an exact 0 made of cancelling terms).
    g_max = float(np.abs(np.asarray(cot)).max())
    scale = np.max(np.abs(ref_dw)) + g_max
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=2e-5 * scale, err_msg=f"dweight {kw}")
    if wrt_psw:
        scale = np.max(np.abs(ref_dpsw), initial=0.0) + g_max * float(np.abs(np.asarray(weight)).max()) * HD
        np.testing.assert_allclose(np.asarray(dpsw), ref_dpsw, rtol=1e-5, atol=2e-5 * scale, err_msg=f"dpsw {kw}")


# ------------------------------------------------------------------------------------------------
# The reference's own analytic gradient agrees with finite differences of its forward (float64).


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode,weighted", GRID, ids=[f"{m}-{'w' if w else 'u'}" for m, w in GRID])
def test_reference_vjp_matches_finite_differences_grid(mode, weighted, form):
    weight, indices, offsets, extra = fixed_case(
        form, weighted=weighted, index_dtype=np.int32, dtype=jnp.float32, positive_weights=mode != "sum"
    )
    w = to_f64(weight) + np.arange(V * D).reshape(V, D) * 1e-3
    psw = to_f64(extra.pop("per_sample_weights", None))
    kw = dict(mode=mode, padding_idx=6, **extra)
    b = embedding_bag_ref(w, indices, offsets, **kw).shape[0]
    cot = np.random.default_rng(3).normal(size=(b, D))
    dw, dpsw = embedding_bag_ref_vjp(w, indices, offsets, cotangent=cot, per_sample_weights=psw, **kw)
    num_dw = numeric_vjp(lambda x: embedding_bag_ref(x, indices, offsets, per_sample_weights=psw, **kw), w, cot)
    np.testing.assert_allclose(dw, num_dw, rtol=1e-6, atol=1e-7)
    assert np.abs(dw).max() > 0
    if weighted:
        num_dpsw = numeric_vjp(lambda p: embedding_bag_ref(w, indices, offsets, per_sample_weights=p, **kw), psw, cot)
        np.testing.assert_allclose(dpsw, num_dpsw, rtol=1e-6, atol=1e-7)


@settings(max_examples=150, deadline=None)
@given(case=ragged_case())
def test_reference_vjp_matches_finite_differences(case):
    weight, indices, offsets, kw, _ = case
    w = to_f64(weight) + np.arange(HV * HD).reshape(HV, HD) * 1e-3  # no ties for max
    psw = to_f64(kw.pop("per_sample_weights", None))
    b = embedding_bag_ref(w, indices, offsets, **{k: v for k, v in kw.items() if k != "mode"}).shape[0]
    cot = np.random.default_rng(3).normal(size=(b, HD))
    dw, dpsw = embedding_bag_ref_vjp(w, indices, offsets, cotangent=cot, per_sample_weights=psw, **kw)
    num_dw = numeric_vjp(lambda x: embedding_bag_ref(x, indices, offsets, per_sample_weights=psw, **kw), w, cot)
    np.testing.assert_allclose(dw, num_dw, rtol=1e-6, atol=1e-7)
    if psw is not None:
        num_dpsw = numeric_vjp(
            lambda p: embedding_bag_ref(w, indices, offsets, per_sample_weights=p, **kw), psw, cot
        )
        np.testing.assert_allclose(dpsw, num_dpsw, rtol=1e-6, atol=1e-7)


NARROW_GRAD_OPS = {
    "fast": jaxbag.embedding_bag,  # bag_reduce's custom_jvp
    "xla": ops.embedding_bag_xla,  # gather + segment ops (lookup_rows)
    "max_norm": functools.partial(jaxbag.embedding_bag, max_norm=1e9),  # lookup_rows' path
}


@pytest.mark.parametrize("op", list(NARROW_GRAD_OPS))
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float8_e4m3fn"])
def test_narrow_table_gradients_are_summed_in_float32(dtype_name, mode, op):
    """A row read by 2,000 ids: its gradient was summed id by id in bf16 / f16 (errors of 20 on
    a gradient of 140 in bf16, worse than torch's 18); now it is summed in float32 and rounded
    once (to within one bf16 / f16 rounding of the float64 value)."""
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(0)
    n, b, v, d = 4096, 512, 50, 8
    ids = np.where(rng.random(n) < 0.5, 0, rng.integers(1, v, n)).astype(np.int32)
    offsets = np.concatenate([[0], np.sort(rng.choice(np.arange(1, n), b - 1, replace=False))])
    # cotangents representable in the table's dtype: the output's cast rounds them anyway
    ct = np.asarray(jnp.asarray(rng.standard_normal((b, d)), dtype).astype(jnp.float32))
    weight = jnp.asarray(rng.standard_normal((v, d)), dtype)
    f = functools.partial(NARROW_GRAD_OPS[op], mode=mode)
    grad = jax.grad(lambda w: jnp.sum(f(w, jnp.asarray(ids), jnp.asarray(offsets)).astype(jnp.float32) * ct))(weight)
    assert grad.dtype == dtype
    want = embedding_bag_ref_vjp(to_f64(weight), ids, offsets, cotangent=ct, mode=mode)[0]
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=eps, atol=eps * 1e-2 * np.abs(want).max())


@pytest.mark.parametrize("mode", ["mean", "sqrtn"])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_narrow_table_weight_gradient_uses_the_unrounded_bag(dtype_name, mode):
    """d bag / d w_k = (x_k - bag) / den used the bag rounded to bf16 / f16: with two adjacent
    representable rows, the exact gradient +-eps/4 came out as 0 or +-eps/2."""
    dtype = DTYPES[dtype_name]
    x1 = 1 + float(jnp.finfo(dtype).eps)
    weight = jnp.array([[1.0], [x1]], dtype)
    ids, offsets, psw = jnp.array([0, 1]), jnp.array([0]), jnp.ones((2,), jnp.float32)
    for op in ("fast", "xla"):
        grad = jax.grad(lambda p: NARROW_GRAD_OPS[op](
            weight, ids, offsets, mode=mode, per_sample_weights=p)[0, 0].astype(jnp.float32))(psw)
        want = embedding_bag_ref_vjp(to_f64(weight), np.array([0, 1]), np.array([0]),
                                     cotangent=np.ones((1, 1)), mode=mode, per_sample_weights=np.ones(2))[1]
        np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-3, err_msg=op)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_max_norm_leaves_a_row_of_exactly_max_norm_unchanged(norm_type):
    """torch renorms only rows whose norm is *above* max_norm (``norm > max_norm``); a row whose
    norm equals it is left bit for bit (``max_norm / (norm + 1e-7)`` would shrink it by 1 ulp)."""
    w = jnp.array([[1.0, 0.0], [0.0, -1.0], [4.0, 0.0]], jnp.float32)
    ids = jnp.array([0, 1, 2])
    out = jaxbag.embedding_bag(w, ids, jnp.array([0, 1, 2]), mode="sum", max_norm=1.0,
                               norm_type=norm_type)
    np.testing.assert_array_equal(np.asarray(out[:2]), np.asarray(w[:2]))
    assert float(out[2, 0]) < 4.0  # (above max_norm: renormed)
    new = jaxbag.renorm(w, ids, max_norm=1.0, norm_type=norm_type)
    np.testing.assert_array_equal(np.asarray(new[:2]), np.asarray(w[:2]))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_large_batch_split_over_threads_matches_numpy(mode):
    """Big enough (ids * D >= 2**15) for the CPU kernel to split the bags over XLA's thread pool
    in chunks cut at bag boundaries: every bag, those at the cuts included, must be reduced once."""
    rng = np.random.default_rng(0)
    v, d, b = 300, 64, 257
    lengths = rng.integers(0, 30, size=b)
    lengths[::17] = 0  # empty bags, some of them at or near the cuts
    n = int(lengths.sum())
    assert n * d >= 2**15
    w = rng.normal(size=(v, d)).astype(np.float32)
    ids = rng.integers(0, v, size=n).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    out = np.asarray(jaxbag.embedding_bag(jnp.asarray(w), jnp.asarray(ids), jnp.asarray(offsets),
                                          mode=mode))
    ref = np.zeros((b, d), np.float64)
    for k in range(b):
        rows = w[ids[offsets[k]: offsets[k] + lengths[k]]].astype(np.float64)
        if rows.size:
            ref[k] = {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0)}[mode]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
