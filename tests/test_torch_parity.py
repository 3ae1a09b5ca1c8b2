"""Live parity with PyTorch (CPU): outputs and gradients (weight and per_sample_weights).

torch runs in float64 on the same table values; jaxbag runs in float32, eagerly and under jax.jit.
Also: float64 tables under x64 against torch in float64 (to 1e-12), and bfloat16 / float16 tables
against torch's own half-precision embedding_bag (each within one rounding of the exact result).
Documented differences, handled here:

* sqrtn and weighted mean do not exist in torch: they are built from torch ops
  (weighted sum / sum(w), weighted sum / sqrt(sum(w^2)), sum / sqrt(count)).
* include_last_offset: only cases with no entries past the last offset are compared with torch
  (the difference past it is pinned by test_include_last_offset_differs_from_torch_as_documented).
* scale_grad_by_freq: torch 2.13's embedding_bag divides by the wrong count, so the torch side is
  F.embedding(..., scale_grad_by_freq=True) followed by a manual per-bag sum / mean.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxbag
from reference import RTOL, assert_close, embedding_bag_ref_vjp, magnitude_ref, renorm_ref

V, D = 8, 4
STATIC = ("mode", "padding_idx", "include_last_offset", "max_norm", "norm_type", "scale_grad_by_freq", "num_bags")


@functools.lru_cache(maxsize=None)
def _jitted_value_and_grads(static_items, jit):
    static = dict(static_items)

    def loss(weight, psw, indices, offsets, segment_ids, cot):
        kw = dict(static)
        if psw is not None:
            kw["per_sample_weights"] = psw
        if segment_ids is not None:
            kw["segment_ids"] = segment_ids
        out = jaxbag.embedding_bag(weight, indices, offsets, **kw)
        return jnp.sum(out * cot), out

    f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(f) if jit else f


def jax_value_and_grads(weight, indices, offsets=None, *, cot, jit, psw=None, segment_ids=None,
                        dtype="float32", **static):
    f = _jitted_value_and_grads(tuple(sorted(static.items())), jit)
    (_, out), (dw, dpsw) = f(
        jnp.asarray(weight, dtype),
        None if psw is None else jnp.asarray(psw, dtype),
        indices,
        offsets,
        segment_ids,
        jnp.asarray(cot, dtype),
    )
    assert out.dtype == dw.dtype == jnp.dtype(dtype), (out.dtype, dw.dtype, dtype)
    as64 = functools.partial(np.asarray, dtype=np.float64)
    return as64(out), as64(dw), None if dpsw is None else as64(dpsw)


def torch_value_and_grads(weight, indices, offsets=None, *, cot, psw=None, mode, dtype=torch.float64, **kw):
    """torch.nn.functional.embedding_bag in ``dtype`` (sqrtn / weighted mean built from torch ops).

    Returns (out, d_weight, d_psw, weight after the forward), as float64 NumPy arrays.
    """
    w = torch.tensor(np.asarray(weight, np.float64)).to(dtype).requires_grad_()
    idx = torch.tensor(np.asarray(indices, np.int64))
    off = None if offsets is None else torch.tensor(np.asarray(offsets, np.int64))
    p = None if psw is None else torch.tensor(np.asarray(psw, np.float64)).to(dtype).requires_grad_()
    if mode in ("sum", "max") or (mode == "mean" and p is None):
        out = F.embedding_bag(idx, w, off, mode=mode, per_sample_weights=p, **kw)
    else:
        # mean (weighted) / sqrtn: weighted sum divided by a torch-computed per-bag weight statistic.
        num = F.embedding_bag(idx, w, off, mode="sum", per_sample_weights=p, **kw)
        ones = torch.ones((w.shape[0], 1), dtype=dtype)
        kw2 = {k: v for k, v in kw.items() if k in ("padding_idx", "include_last_offset")}
        if mode == "mean":
            den = F.embedding_bag(idx, ones, off, mode="sum", per_sample_weights=p, **kw2)
        else:
            den = torch.sqrt(
                F.embedding_bag(idx, ones, off, mode="sum", per_sample_weights=None if p is None else p * p, **kw2)
            )
        out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    assert out.dtype == dtype, (out.dtype, dtype)
    (out * torch.tensor(np.asarray(cot, np.float64)).to(dtype)).sum().backward()

    def as64(t):
        return t.detach().to(torch.float64).numpy()

    return as64(out), as64(w.grad), None if p is None else as64(p.grad), as64(w)


def table(seed=0, scale=1.0):
    # Distinct values (no ties for max), a mix of signs.
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(V, D)) * scale
    w += np.arange(V * D).reshape(V, D) * 1e-3
    return np.asarray(w.astype(np.float32), np.float64)


def case(form):
    """(indices, offsets, torch_offsets, extra jaxbag kwargs, extra torch kwargs); has an empty bag."""
    ids = np.array([1, 2, 2, 7, 0, 3, 3, 3, 5, 6, 1], np.int32)
    if form == "offsets":
        offsets = np.array([0, 3, 3, 4, 8], np.int32)
        return ids, offsets, offsets, {}, {}
    if form == "offsets_last":  # no entry past the last offset (torch is inconsistent there)
        offsets = np.array([0, 3, 3, 4, 8, 11], np.int64)
        kw = {"include_last_offset": True}
        return ids, offsets, offsets, kw, kw
    if form == "2d":
        # 3 x 4, not square: a swapped bags / length stride would not go unnoticed
        ids2 = np.array([[1, 2, 2, 7], [0, 3, 3, 3], [6, 1, 4, 2]], np.int64)
        return ids2, None, None, {}, {}
    if form == "segments":
        seg = np.array([0, 0, 0, 2, 3, 3, 3, 3, 4, 4, 4], np.int32)  # bag 1 empty, all ids < num_bags
        torch_offsets = np.searchsorted(seg, np.arange(5), side="left")
        return ids, None, torch_offsets, {"segment_ids": seg, "num_bags": 5}, {}
    raise ValueError(form)


def num_bags_of(ids, offsets, kw):
    if ids.ndim == 2:
        return ids.shape[0]
    if "num_bags" in kw:
        return kw["num_bags"]
    return len(offsets) - (1 if kw.get("include_last_offset") else 0)


def compare(weight, ids, offsets, torch_offsets, jkw, tkw, *, mode, psw=None, jit, padding_idx=None,
            dtype="float32", torch_dtype=torch.float64, **opts):
    """jaxbag with a ``dtype`` table against torch with a ``torch_dtype`` one: values and gradients
    within ``RTOL[dtype]`` (relative to the reduction's magnitude; float32 gradients 1e-5)."""
    b = num_bags_of(ids, offsets, jkw)
    cot = np.random.default_rng(5).normal(size=(b, D))
    static = {k: v for k, v in jkw.items() if k in STATIC}
    seg = jkw.get("segment_ids")
    out, dw, dpsw = jax_value_and_grads(
        weight, ids, offsets, cot=cot, jit=jit, psw=psw, segment_ids=seg, mode=mode, padding_idx=padding_idx,
        dtype=dtype, **static, **opts,
    )
    t_out, t_dw, t_dpsw, _ = torch_value_and_grads(
        weight, ids, torch_offsets, cot=cot, psw=psw, mode=mode, padding_idx=padding_idx, dtype=torch_dtype,
        **tkw, **opts
    )
    mag_kw = {k: v for k, v in opts.items() if k in ("max_norm", "norm_type")}
    mag = magnitude_ref(
        weight, ids, offsets, mode=mode, per_sample_weights=psw, padding_idx=padding_idx,
        **{k: v for k, v in jkw.items()}, **mag_kw,
    )
    assert_close(out, t_out, mag, dtype, err_msg="forward vs torch")
    rtol = 1e-5 if dtype == "float32" else RTOL[dtype]
    np.testing.assert_allclose(dw, t_dw, rtol=rtol, atol=2 * rtol * (np.abs(t_dw).max() + 1e-6), err_msg="d_weight")
    if psw is not None:
        np.testing.assert_allclose(
            dpsw, t_dpsw, rtol=rtol, atol=2 * rtol * (np.abs(t_dpsw).max() + 1e-6), err_msg="d_per_sample_weights"
        )
    return t_out, t_dw, t_dpsw


MODES_W = [("sum", False), ("sum", True), ("mean", False), ("mean", True), ("max", False), ("sqrtn", False),
           ("sqrtn", True)]
MODE_IDS = [f"{m}-{'w' if w else 'u'}" for m, w in MODES_W]
FORMS = ("offsets", "offsets_last", "2d", "segments")


def weights_for(ids, mode, seed=11):
    rng = np.random.default_rng(seed)
    lo = -1.5 if mode == "sum" else 0.25
    return np.asarray(rng.uniform(lo, 1.5, size=ids.shape).astype(np.float32), np.float64)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("padding_idx", [None, -1])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode,weighted", MODES_W, ids=MODE_IDS)
def test_parity(mode, weighted, form, padding_idx, jit):
    ids, offsets, t_off, jkw, tkw = case(form)
    psw = weights_for(ids, mode) if weighted else None
    compare(table(), ids, offsets, t_off, jkw, tkw, mode=mode, psw=psw, jit=jit, padding_idx=padding_idx)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode,weighted", MODES_W, ids=MODE_IDS)
def test_parity_float64_under_x64(mode, weighted, form, jit):
    """A float64 table under x64 against torch in float64, to 1e-12: the rows differ by 1e-9
    steps that a float32 computation anywhere on the way would lose (padding_idx -1 is in the
    bags)."""
    padding_idx = -1
    ids, offsets, t_off, jkw, tkw = case(form)
    psw = weights_for(ids, mode) if weighted else None
    weight = table() + 1e-9 * np.arange(V * D).reshape(V, D)
    with jax.enable_x64(True):
        compare(weight, ids, offsets, t_off, jkw, tkw, mode=mode, psw=psw, jit=jit, padding_idx=padding_idx,
                dtype="float64")


HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TORCH_NATIVE_W = [("sum", False), ("sum", True), ("mean", False), ("max", False)]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", sorted(HALF))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode,weighted", TORCH_NATIVE_W, ids=[f"{m}-{'w' if w else 'u'}" for m, w in TORCH_NATIVE_W])
def test_parity_half_precision(mode, weighted, form, dtype, jit):
    """bfloat16 / float16 tables against torch's own half-precision embedding_bag (the modes torch
    has): both results are one rounding of the exact value, so they agree within the dtype's
    tolerance, and so do the gradients (padding_idx 3 is in the bags)."""
    ids, offsets, t_off, jkw, tkw = case(form)
    weight = np.asarray(jnp.asarray(table(), dtype), np.float64)  # values both sides hold exactly
    psw = None
    if weighted:
        psw = np.asarray(jnp.asarray(weights_for(ids, mode), dtype), np.float64)
    compare(weight, ids, offsets, t_off, jkw, tkw, mode=mode, psw=psw, jit=jit, padding_idx=3,
            dtype=dtype, torch_dtype=HALF[dtype])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("max_norm,norm_type", [(1.0, 2.0), (0.7, 1.0), (2.5, 0.0),
                                               (0.3, float("-inf"))])
@pytest.mark.parametrize("form", ["offsets", "2d"])
@pytest.mark.parametrize("mode,weighted", MODES_W, ids=MODE_IDS)
def test_parity_max_norm(mode, weighted, form, max_norm, norm_type, jit):
    ids, offsets, t_off, jkw, tkw = case(form)
    psw = weights_for(ids, mode) if weighted else None
    weight = table(seed=2, scale=1.5)
    # Some rows are below max_norm (untouched), most above.
    weight[2] *= 0.05
    compare(
        weight, ids, offsets, t_off, jkw, tkw, mode=mode, psw=psw, jit=jit, padding_idx=5,
        max_norm=max_norm, norm_type=norm_type,
    )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("max_norm,norm_type", [(1.0, 2.0), (0.7, 1.0), (1.2, 3.0), (0.9, float("inf")),
                                               (0.3, float("-inf")),  # the smallest magnitude
                                               (2.5, 0.0)])  # p=0: torch counts nonzero entries
def test_renorm_matches_torch_weight_after_forward(max_norm, norm_type, jit):
    weight = table(seed=4, scale=1.5)
    weight[6] *= 0.05
    ids = np.array([0, 6, 6, 2, 2, 4, 1], np.int32)
    _, _, _, after = torch_value_and_grads(
        weight, ids, np.array([0, 3], np.int32), cot=np.zeros((2, D)), mode="sum", max_norm=max_norm,
        norm_type=norm_type,
    )
    assert not np.allclose(after, weight)  # the case does renorm something
    f = jaxbag.renorm
    if jit:
        f = jax.jit(jaxbag.renorm, static_argnames=("max_norm", "norm_type"))
    got = np.asarray(f(jnp.asarray(weight, jnp.float32), ids, max_norm=max_norm, norm_type=norm_type))
    np.testing.assert_allclose(got, after, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(renorm_ref(weight, ids, max_norm, norm_type), after, rtol=1e-12, atol=1e-12)


def torch_embedding_then_reduce(weight, ids, offsets, *, cot, mode, psw=None, padding_idx=None, max_norm=None):
    """torch's correct scale_grad_by_freq: F.embedding(scale_grad_by_freq=True) + a manual sum/mean."""
    w = torch.tensor(np.asarray(weight, np.float64), requires_grad=True)
    idx = torch.tensor(np.asarray(ids, np.int64)).reshape(-1)
    p = None if psw is None else torch.tensor(np.asarray(psw, np.float64).reshape(-1), requires_grad=True)
    rows = F.embedding(idx, w, padding_idx=padding_idx, scale_grad_by_freq=True, max_norm=max_norm)
    n = idx.shape[0]
    if np.asarray(ids).ndim == 2:
        length = np.asarray(ids).shape[1]
        bounds = [(s, s + length) for s in range(0, n, length)]
    else:
        starts = list(np.asarray(offsets))
        bounds = list(zip(starts, starts[1:] + [n]))
    pad = None if padding_idx is None else padding_idx % w.shape[0]
    outs = []
    for s, e in bounds:
        acc = torch.zeros(w.shape[1], dtype=torch.float64)
        count = 0
        for j in range(s, e):
            if pad is not None and int(idx[j]) == pad:
                continue
            acc = acc + (rows[j] if p is None else p[j] * rows[j])
            count += 1
        if mode == "mean" and count:
            acc = acc / count
        outs.append(acc)
    out = torch.stack(outs)
    (out * torch.tensor(cot)).sum().backward()
    return out.detach().numpy(), w.grad.numpy(), None if p is None else p.grad.numpy().reshape(np.shape(ids))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("padding_idx,max_norm", [(None, None), (3, 1.0)])
@pytest.mark.parametrize("form", ["offsets", "2d"])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)],
                         ids=["sum-u", "sum-w", "mean-u"])
def test_parity_scale_grad_by_freq(mode, weighted, form, padding_idx, max_norm, jit):
    ids, offsets, _, jkw, _ = case(form)
    psw = weights_for(ids, mode) if weighted else None
    weight = table(seed=3)
    b = num_bags_of(ids, offsets, jkw)
    cot = np.random.default_rng(9).normal(size=(b, D))
    out, dw, dpsw = jax_value_and_grads(
        weight, ids, offsets, cot=cot, jit=jit, psw=psw, mode=mode, padding_idx=padding_idx,
        scale_grad_by_freq=True, max_norm=max_norm,
    )
    t_out, t_dw, t_dpsw = torch_embedding_then_reduce(
        weight, ids, offsets, cot=cot, mode=mode, psw=psw, padding_idx=padding_idx, max_norm=max_norm
    )
    np.testing.assert_allclose(out, t_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, t_dw, rtol=1e-5, atol=1e-5)
    r_dw, r_dpsw = embedding_bag_ref_vjp(
        weight, ids, offsets, cotangent=cot, mode=mode, per_sample_weights=psw, padding_idx=padding_idx,
        scale_grad_by_freq=True, max_norm=max_norm,
    )
    np.testing.assert_allclose(r_dw, t_dw, rtol=1e-10, atol=1e-10)
    if weighted:
        np.testing.assert_allclose(dpsw, t_dpsw, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r_dpsw, t_dpsw, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_scale_grad_by_freq_counts_right(jit):
    # ids [0, 0, 1] in one bag: row 0 gets 2/2 and row 1 gets 1/1 of the upstream gradient (torch 2.13's
    # embedding_bag says 0.5 for row 1: the documented difference).
    weight = table()
    ids = np.array([0, 0, 1], np.int32)
    _, dw, _ = jax_value_and_grads(
        weight, ids, np.array([0], np.int32), cot=np.ones((1, D)), jit=jit, mode="sum", scale_grad_by_freq=True
    )
    expected = np.zeros((V, D))
    expected[0] = 1.0
    expected[1] = 1.0
    np.testing.assert_allclose(dw, expected, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("form", ["segment_id_-1", "past_last_offset"])
def test_scale_grad_by_freq_counts_only_positions_in_a_bag(form, jit):
    """A position outside every bag (segment id -1, or past the last offset) is not an occurrence:
    row 0, at two positions of which one is in a bag, gets the whole upstream gradient."""
    weight, ids = table(), np.array([0, 0, 1], np.int32)
    if form == "segment_id_-1":
        kw = dict(segment_ids=jnp.array([-1, 0, 0], jnp.int32), num_bags=1)
        ids, cot = np.array([0, 0, 1], np.int32), np.ones((1, D))
    else:  # bag 0 = [1, 0], the id 0 after it is past the last offset
        kw = dict(offsets=np.array([0, 2], np.int32), include_last_offset=True)
        ids, cot = np.array([1, 0, 0], np.int32), np.ones((1, D))
    offsets = kw.pop("offsets", None)
    _, dw, _ = jax_value_and_grads(weight, ids, offsets, cot=cot, jit=jit, mode="sum",
                                   scale_grad_by_freq=True, **kw)
    expected = np.zeros((V, D))
    expected[[0, 1]] = 1.0
    np.testing.assert_allclose(dw, expected, rtol=1e-6)
    ref_dw, _ = embedding_bag_ref_vjp(np.asarray(weight, np.float64), ids, offsets, cotangent=cot,
                                      mode="sum", scale_grad_by_freq=True, **kw)
    np.testing.assert_allclose(ref_dw, expected, rtol=1e-12)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_include_last_offset_differs_from_torch_as_documented(jit):
    """Ids past the last offset: torch 2.13 ignores them in sum, counts them in mean's divisor
    without adding their rows, and takes them into the max (the README's stated difference);
    jaxbag ignores them in every mode, as the documented rule says."""
    w = np.arange(12.0, dtype=np.float32).reshape(6, 2)
    ids, offsets = np.array([1, 2, 3, 5, 4], np.int32), np.array([0, 2, 3], np.int32)
    last = {"sum": [6.0, 7.0], "mean": [6.0, 7.0], "max": [6.0, 7.0]}  # bag 1 holds only row 3
    torch_last = {"sum": [6.0, 7.0], "mean": [6.0 / 3, 7.0 / 3], "max": [10.0, 11.0]}
    f = jax.jit(jaxbag.embedding_bag, static_argnames=("mode", "include_last_offset")) if jit \
        else jaxbag.embedding_bag
    for mode in ("sum", "mean", "max"):
        got = f(jnp.asarray(w), ids, offsets, mode=mode, include_last_offset=True)
        np.testing.assert_allclose(got[1], last[mode], rtol=1e-6)
        t = F.embedding_bag(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(w),
                            torch.from_numpy(offsets.astype(np.int64)), mode=mode,
                            include_last_offset=True)
        np.testing.assert_allclose(t[1].numpy(), torch_last[mode], rtol=1e-6)
        np.testing.assert_allclose(got[0], t[0].numpy(), rtol=1e-6)  # bag 0 agrees


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_weights_past_the_last_offset_get_no_gradient(mode, jit):
    """Ids past the last offset are in no bag, so their per_sample_weights get a zero gradient
    (torch 2.13's is not zero there: values from uninitialised memory, up to about 1e22 in a
    review's runs; the README says so). Bag 0's weights agree with torch (which weighs only
    sum)."""
    w = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    ids, offsets = np.array([1, 2, 3, 5, 4], np.int32), np.array([0, 2, 3], np.int32)
    psw = np.array([0.5, 2.0, 1.5, 3.0, 0.7], np.float32)

    def f(p):
        return jnp.sum(jaxbag.embedding_bag(jnp.asarray(w), ids, offsets, mode=mode,
                                            per_sample_weights=p, include_last_offset=True) ** 2)

    g = np.asarray((jax.jit(jax.grad(f)) if jit else jax.grad(f))(jnp.asarray(psw)))
    np.testing.assert_array_equal(g[3:], 0.0)
    assert np.all(g[:3] != 0.0)
    if mode != "sum":
        return
    p = torch.tensor(psw, requires_grad=True)
    t = F.embedding_bag(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(w),
                        torch.from_numpy(offsets.astype(np.int64)), mode=mode,
                        per_sample_weights=p, include_last_offset=True)
    (t ** 2).sum().backward()
    np.testing.assert_allclose(g[:3], p.grad.numpy()[:3], rtol=1e-5)


def test_reference_matches_torch_directly():
    """The NumPy reference itself against torch on a ragged batch (guards the reference)."""
    from reference import embedding_bag_ref

    ids, offsets, t_off, jkw, tkw = case("offsets")
    weight = table()
    cot = np.random.default_rng(1).normal(size=(len(offsets), D))
    for mode in ("sum", "mean", "max"):
        for padding_idx in (None, 3):
            t_out, t_dw, _, _ = torch_value_and_grads(weight, ids, t_off, cot=cot, mode=mode, padding_idx=padding_idx)
            r_out = embedding_bag_ref(weight, ids, offsets, mode=mode, padding_idx=padding_idx)
            r_dw, _ = embedding_bag_ref_vjp(weight, ids, offsets, cotangent=cot, mode=mode, padding_idx=padding_idx)
            np.testing.assert_allclose(r_out, t_out, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(r_dw, t_dw, rtol=1e-12, atol=1e-12)
