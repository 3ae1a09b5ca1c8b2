"""Bad input: eager errors that name the argument and the first offending position, jaxbag.validate
(eagerly and under checkify(jit)), and the jit behaviour for out-of-range ids (zeros, never another row).
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxbag
from jaxbag._src import fast_forward
from reference import embedding_bag_ref, embedding_bag_ref_vjp

V, D = 5, 2
W = jnp.asarray(np.arange(V * D, dtype=np.float32).reshape(V, D) + 1.0)


def i32(*xs):
    return np.array(xs, np.int32)


# Each bad case: (kwargs for embedding_bag / validate, exception types, regexes that must all match).
# Messages must name the argument and the first offending position with its value.
VALUE_CASES = {
    "offsets0_not_zero": (
        dict(indices=i32(0, 1, 2, 3), offsets=i32(1, 2)),
        (ValueError,),
        [r"offsets\[0\]", r"\b1\b"],
    ),
    "offsets0_negative": (
        dict(indices=i32(0, 1, 2, 3), offsets=i32(-1, 2)),
        (ValueError,),
        [r"offsets\[0\] = -1 but the first bag must start at 0"],
    ),
    "two_segment_ids_unsorted": (
        dict(indices=i32(0, 1), segment_ids=i32(1, 0), num_bags=2),
        (ValueError,),
        [r"segment_ids\[1\] = 0 is smaller than segment_ids\[0\] = 1", r"must be sorted"],
    ),
    "offsets_decreasing": (
        dict(indices=i32(0, 1, 2, 3), offsets=i32(0, 3, 2, 4)),
        (ValueError,),
        [r"offsets\[2\]", r"\b2\b"],
    ),
    "offsets_decreasing_first_position": (
        dict(indices=i32(0, 1, 2, 3, 4, 0), offsets=i32(0, 2, 2, 1, 5, 3)),
        (ValueError,),
        [r"offsets\[3\]", r"\b1\b"],
    ),
    "offset_past_end": (
        dict(indices=i32(0, 1, 2, 3), offsets=i32(0, 2, 7)),
        (ValueError,),
        [r"offsets\[2\]", r"\b7\b"],
    ),
    "offset_past_end_include_last": (
        dict(indices=i32(0, 1, 2, 3), offsets=i32(0, 2, 5), include_last_offset=True),
        (ValueError,),
        [r"offsets\[2\]", r"\b5\b"],
    ),
    "index_too_large": (
        dict(indices=i32(0, 1, 4, 9, 7), offsets=i32(0, 2)),
        (IndexError, ValueError),
        [r"indices\[3\]", r"\b9\b"],
    ),
    "index_equal_to_V": (
        dict(indices=i32(0, 1, 2, 3, 4, 5), offsets=i32(0)),
        (IndexError, ValueError),
        [r"indices\[5\]", r"\b5\b"],
    ),
    "index_negative": (
        dict(indices=i32(0, 2, -3, 1), offsets=i32(0, 2)),
        (IndexError, ValueError),
        [r"indices\[2\]", r"-3"],
    ),
    "index_negative_2d": (
        dict(indices=np.array([[0, 1, 2], [3, -1, 4]], np.int32)),
        (IndexError, ValueError),
        # 2-D position as [1, 1] (or flattened [4])
        [r"indices\[(1, ?1|4)\]", r"-1"],
    ),
    "index_too_large_segments": (
        dict(indices=i32(0, 1, 6, 2), segment_ids=i32(0, 0, 1, 1), num_bags=2),
        (IndexError, ValueError),
        [r"indices\[2\]", r"\b6\b"],
    ),
    "index_int64_too_large": (
        dict(indices=np.array([0, 1, 2, 3, 123], np.int64), offsets=np.array([0, 3], np.int64)),
        (IndexError, ValueError),
        [r"indices\[4\]", r"\b123\b"],
    ),
}

STATIC_CASES = {
    "unknown_mode": (
        dict(indices=i32(0, 1), offsets=i32(0), mode="average"),
        (ValueError,),
        [r"mode", r"average"],
    ),
    "per_sample_weights_with_max": (
        dict(indices=i32(0, 1), offsets=i32(0), mode="max", per_sample_weights=np.ones(2, np.float32)),
        (ValueError,),
        [r"per_sample_weights", r"max"],
    ),
    "per_sample_weights_wrong_shape": (
        dict(indices=i32(0, 1, 2), offsets=i32(0), mode="sum", per_sample_weights=np.ones(4, np.float32)),
        (ValueError,),
        [r"per_sample_weights", r"\(4,\)|\b4\b"],
    ),
    "per_sample_weights_wrong_shape_2d": (
        dict(indices=np.zeros((2, 3), np.int32), mode="sum", per_sample_weights=np.ones(6, np.float32)),
        (ValueError,),
        [r"per_sample_weights", r"\(6,\)|\b6\b"],
    ),
    "2d_with_offsets": (
        dict(indices=np.zeros((2, 3), np.int32), offsets=i32(0, 3)),
        (ValueError,),
        [r"offsets"],
    ),
    "float_indices": (
        dict(indices=np.array([0.0, 1.0], np.float32), offsets=i32(0)),
        (TypeError,),
        [r"indices", r"float"],
    ),
    "float_offsets": (
        dict(indices=i32(0, 1), offsets=np.array([0.0], np.float32)),
        (TypeError,),
        [r"offsets", r"float"],
    ),
    "padding_idx_too_large": (
        dict(indices=i32(0, 1), offsets=i32(0), padding_idx=V),
        (ValueError, IndexError),
        [r"padding_idx", rf"\b{V}\b"],
    ),
    "padding_idx_too_negative": (
        dict(indices=i32(0, 1), offsets=i32(0), padding_idx=-V - 1),
        (ValueError, IndexError),
        [r"padding_idx", rf"-{V + 1}"],
    ),
    "scale_grad_by_freq_with_max": (
        dict(indices=i32(0, 1), offsets=i32(0), mode="max", scale_grad_by_freq=True),
        (ValueError,),
        [r"scale_grad_by_freq"],
    ),
    # the whole shape is compared, not only the leading dimension
    "per_sample_weights_wrong_width_2d": (
        dict(indices=np.zeros((2, 3), np.int32), mode="sum", per_sample_weights=np.ones((2, 4), np.float32)),
        (ValueError,),
        [r"per_sample_weights must have the shape of indices", r"\(2, 4\)"],
    ),
    "per_sample_weights_2d_for_1d_indices": (
        dict(indices=i32(0, 1), offsets=i32(0), mode="sum", per_sample_weights=np.ones((2, 1), np.float32)),
        (ValueError,),
        [r"per_sample_weights must have the shape of indices", r"\(2, 1\)"],
    ),
    "segment_ids_wrong_shape": (
        dict(indices=i32(0, 1, 2), segment_ids=i32(0, 0), num_bags=1),
        (ValueError,),
        [r"segment_ids must have the shape of indices \(3,\); got \(2,\)"],
    ),
    "negative_num_bags": (
        dict(indices=i32(0, 1), segment_ids=i32(0, 0), num_bags=-1),
        (ValueError,),
        [r"num_bags must be >= 0; got num_bags=-1"],
    ),
}


def _raises(types, patterns, fn):
    with pytest.raises(types) as info:
        fn()
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in message: {msg!r}"
    return msg


@pytest.mark.parametrize("name", list(VALUE_CASES) + list(STATIC_CASES))
def test_eager_error(name):
    kw, types, patterns = {**VALUE_CASES, **STATIC_CASES}[name]
    _raises(types, patterns, lambda: jaxbag.embedding_bag(W, **kw))


@pytest.mark.parametrize("name", list(VALUE_CASES))
def test_eager_error_with_jnp_inputs(name):
    kw, types, patterns = VALUE_CASES[name]
    kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    _raises(types, patterns, lambda: jaxbag.embedding_bag(W, **kw))


@pytest.mark.parametrize("name", list(STATIC_CASES))
def test_static_errors_also_under_jit(name):
    # Errors that depend on no value (mode, dtypes, shapes, option combinations) are raised at trace time.
    kw, types, patterns = STATIC_CASES[name]
    arrays = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in kw.items() if not isinstance(v, np.ndarray)}
    f = jax.jit(lambda w, a: jaxbag.embedding_bag(w, **a, **static))
    _raises(types, patterns, lambda: f(W, arrays))


_VALIDATE_KW = ("indices", "offsets", "include_last_offset", "segment_ids", "num_bags", "padding_idx",
                "per_sample_weights", "mode")


def _validate_kwargs(kw):
    return {k: v for k, v in kw.items() if k in _VALIDATE_KW}


@pytest.mark.parametrize("name", list(VALUE_CASES) + [
    "per_sample_weights_wrong_shape", "2d_with_offsets", "float_indices", "float_offsets",
    "padding_idx_too_large", "padding_idx_too_negative", "per_sample_weights_wrong_width_2d",
    "per_sample_weights_2d_for_1d_indices", "segment_ids_wrong_shape", "negative_num_bags"])
def test_validate_eager(name):
    kw, types, patterns = {**VALUE_CASES, **STATIC_CASES}[name]
    kw = _validate_kwargs(kw)
    kw.pop("mode", None)
    indices = kw.pop("indices")
    offsets = kw.pop("offsets", None)
    _raises(types, patterns, lambda: jaxbag.validate(V, indices, offsets, **kw))


def test_validate_accepts_good_input():
    assert jaxbag.validate(V, i32(0, 4, 2), i32(0, 1, 1)) is None
    assert jaxbag.validate(V, i32(0, 4, 2, 3), i32(0, 1, 3), include_last_offset=True) is None
    assert jaxbag.validate(V, np.zeros((2, 3), np.int64), padding_idx=-1) is None
    assert jaxbag.validate(V, i32(0, 4, 2), segment_ids=i32(0, 0, 3), num_bags=2) is None


@pytest.mark.parametrize("name", list(VALUE_CASES))
def test_validate_under_checkify_jit(name):
    kw, _, patterns = VALUE_CASES[name]
    kw = _validate_kwargs(kw)
    arrays = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in kw.items() if not isinstance(v, np.ndarray)}

    def f(w, a):
        jaxbag.validate(w.shape[0], a["indices"], a.get("offsets"), segment_ids=a.get("segment_ids"), **static)
        return jaxbag.embedding_bag(w, a["indices"], a.get("offsets"), mode="sum", segment_ids=a.get("segment_ids"),
                                    **static)

    err, out = checkify.checkify(jax.jit(f))(W, arrays)
    msg = err.get()
    assert msg is not None, "checkify reported no error"
    arg = re.escape(patterns[0].split("\\[")[0])
    assert re.search(arg, msg), msg
    # The position and value are reported too.
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in {msg!r}"
    assert out.shape[1] == D
    with pytest.raises(Exception, match=arg):
        err.throw()


def test_checkify_no_error_on_good_input():
    def f(w, ids, offs):
        jaxbag.validate(w.shape[0], ids, offs)
        return jaxbag.embedding_bag(w, ids, offs, mode="sum")

    err, out = checkify.checkify(jax.jit(f))(W, i32(0, 4, 2), i32(0, 1))
    assert err.get() is None
    w = np.asarray(W)
    np.testing.assert_allclose(np.asarray(out), np.stack([w[0], w[4] + w[2]]))


# ------------------------------------------------------------------------------------------------
# Under jit, out-of-range ids are skipped: never row 0 (clamping -1) nor row V-1 (clamping V).

WD = np.zeros((V, D), np.float32)
WD[0] = [1000.0, -1000.0]  # distinctive first row
WD[V - 1] = [-3000.0, 3000.0]  # distinctive last row
WD[1:V - 1] = np.arange((V - 2) * D, dtype=np.float32).reshape(V - 2, D) * 0.25 + 0.5


@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sqrtn"])
@pytest.mark.parametrize("form", ["offsets", "2d", "segments"])
def test_jit_out_of_range_ids_are_skipped(mode, form):
    """Skipped as padding_idx is (not a zero row: not counted in a mean, no max candidate), as the
    docs say; they used to say 'contribute zeros', which the test accepted too."""
    if form == "2d":
        ids = np.array([[1, -1, 2], [V, V, V], [-1, 3, V], [2, 2, 2]], np.int32)
        offsets, extra = None, {}
    else:
        ids = np.array([1, -1, 2, V, V, -1, 3, V, 2, -7, V + 12], np.int32)
        if form == "offsets":
            offsets, extra = np.array([0, 3, 5, 8], np.int32), {}
        else:
            offsets = None
            extra = {"segment_ids": np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3], np.int32), "num_bags": 4}
    f = jax.jit(lambda w, i, o, s: jaxbag.embedding_bag(w, i, o, mode=mode, segment_ids=s, num_bags=extra.get(
        "num_bags")))
    out = np.asarray(f(jnp.asarray(WD), ids, offsets, extra.get("segment_ids")))
    assert np.all(np.abs(out) < 100.0), f"an out-of-range id picked up row 0 or row V-1:\n{out}"
    np.testing.assert_allclose(out, embedding_bag_ref(WD, ids, offsets, mode=mode, oob="drop", **extra),
                               rtol=1e-6, atol=1e-4)
    if mode in ("mean", "sqrtn"):  # a zero row instead would move these bags
        assert not np.allclose(out, embedding_bag_ref(WD, ids, offsets, mode=mode, oob="zero", **extra))
    # The bag made only of out-of-range ids is exactly zero in every mode.
    np.testing.assert_array_equal(out[1], np.zeros(D, np.float32))


@pytest.mark.parametrize("mode, want", [("mean", [-2.0, -4.0]), ("max", [-2.0, -4.0]),
                                        ("sqrtn", [-2.0, -4.0]), ("sum", [-2.0, -4.0])])
def test_jit_out_of_range_id_is_not_a_zero_row(mode, want):
    """Next to a negative row: a zero row would halve the mean and win the max."""
    w = jnp.array([[0.0, 0.0], [-2.0, -4.0], [5.0, 5.0]])
    out = jax.jit(lambda i: jaxbag.embedding_bag(w, i, jnp.array([0]), mode=mode))(jnp.array([1, 7]))
    assert out.tolist() == [want]


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "max"])
def test_jit_out_of_range_ids_get_no_gradient_and_leak_none(mode):
    ids = np.array([-1, 2, V, 1, V + 3, -V], np.int32)
    offsets = np.array([0, 3], np.int32)

    def loss(w):
        return jnp.sum(jaxbag.embedding_bag(w, ids, offsets, mode=mode))

    g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(WD)))
    assert np.all(g[0] == 0.0) and np.all(g[V - 1] == 0.0), g
    assert np.any(g[2] != 0.0) and np.any(g[1] != 0.0), g


def test_renorm_ignores_out_of_range_ids_under_jit():
    w = jnp.asarray(WD)
    out = np.asarray(jax.jit(jaxbag.renorm, static_argnames=("max_norm", "norm_type"))(
        w, i32(-1, V, 2), max_norm=1.0))
    np.testing.assert_array_equal(out[0], WD[0])
    np.testing.assert_array_equal(out[V - 1], WD[V - 1])
    np.testing.assert_allclose(np.linalg.norm(out[2]), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Under jit, ill-formed offsets and unsorted segment ids regroup ids: each valid id still counts in
# at most one bag (with segment ids, only in its own), and no row outside the batch is read. Checked with an identity table (row r is
# the unit vector e_r, so a sum bag counts the rows it read), on the CPU kernel and the XLA path.


@pytest.mark.parametrize("impl", ["kernel", "xla"])
@pytest.mark.parametrize("form", ["segments", "offsets", "last_offset"])
def test_jit_ill_formed_bags_regroup_ids_only(form, impl, set_kernel):
    set_kernel(impl == "kernel")
    v, n, b = 16, 12, 5
    eye = jnp.eye(v, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    f = jax.jit(lambda w, i, o, s: jaxbag.embedding_bag(
        w, i, o, mode="sum", segment_ids=s, num_bags=b if s is not None else None,
        include_last_offset=form == "last_offset"))
    for trial in range(40):
        ids = rng.integers(-2, v + 2, n).astype(np.int32)
        seg = offsets = None
        if form == "segments":  # unsorted, some outside [0, B)
            seg = rng.integers(-1, b + 2, n).astype(np.int32)
        else:  # unsorted, negative, past the end
            offsets = rng.integers(-2, n + 3, b + (form == "last_offset")).astype(np.int32)
        out = np.asarray(f(eye, ids, offsets, seg))
        assert out.shape == (b, v)
        counts = np.bincount(ids[(ids >= 0) & (ids < v)], minlength=v)
        read = out.sum(axis=0)
        assert np.all(out >= 0) and np.all(out == np.round(out)), f"trial {trial}: {out}"
        assert np.all(read <= counts), (
            f"trial {trial}: an id counted twice or a row not in the batch\n{out}\n{counts}")
        if seg is not None:  # each id counts in the bag its segment id names, as in
            # jax.ops.segment_sum; padding positions (segment id outside [0, B)) are never read
            for k in range(b):
                own = (seg == k) & (ids >= 0) & (ids < v)
                np.testing.assert_array_equal(
                    out[k], np.bincount(ids[own], minlength=v),
                    err_msg=f"trial {trial}, bag {k}: ids {ids}, segment ids {seg}")


@pytest.mark.parametrize("impl", ["kernel", "xla"])
@pytest.mark.parametrize("mode", jaxbag.MODES)
def test_jit_unsorted_segment_ids_value_and_gradients_agree(mode, impl, set_kernel):
    """Under jit on the CPU, unsorted segment ids group as jax.ops.segment_sum does, in the value
    and in both gradients alike (the kernel looked for a bag's ids in the position range sorted
    ids would give it: it left some out of the value, which the gradient counted). Against the
    NumPy reference, max's arg-max (its gradient) in the caller's positions included."""
    set_kernel(impl == "kernel")
    rng = np.random.default_rng(3)
    v, n, b, d = 7, 30, 5, 16
    weight = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    ct = rng.normal(size=(b, d)).astype(np.float32)
    weighted = mode != "max"

    def loss(w, psw, ids, seg):
        out = jaxbag.embedding_bag(w, ids, segment_ids=seg, num_bags=b, mode=mode, padding_idx=2,
                                   per_sample_weights=psw if weighted else None)
        return jnp.sum(out * ct), out

    f = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
    for trial in range(10):
        ids = rng.integers(-1, v + 1, n).astype(np.int32)
        seg = rng.integers(-1, b + 2, n).astype(np.int32)  # unsorted, some outside [0, B)
        psw = rng.uniform(0.5, 2.0, n).astype(np.float32)
        (_, out), (g_w, g_psw) = f(weight, psw, ids, seg)
        opts = dict(mode=mode, padding_idx=2, segment_ids=seg, num_bags=b,
                    per_sample_weights=psw if weighted else None, oob="drop")
        np.testing.assert_allclose(out, embedding_bag_ref(weight, ids, **opts), rtol=1e-5, atol=1e-5)
        opts.pop("oob")
        want_w, want_psw = embedding_bag_ref_vjp(weight, ids, cotangent=ct, **opts)
        np.testing.assert_allclose(g_w, want_w, rtol=1e-5, atol=1e-5, err_msg=f"trial {trial}")
        if weighted:
            np.testing.assert_allclose(g_psw, want_psw, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Ids at padding positions (segment id outside [0, B), past the last offset) are never read, so an
# out-of-range value there is no error: eagerly, under jit and in validate (eager and checkify).

PADDED_CASES = {
    "segments": (dict(indices=i32(1, 2, -1, 99), segment_ids=i32(0, 1, 2, 2), num_bags=2), [[3, 4], [5, 6]]),
    "last_offset": (dict(indices=i32(1, 2, 99), offsets=i32(0, 1, 2), include_last_offset=True),
                    [[3, 4], [5, 6]]),
}


@pytest.mark.parametrize("name", list(PADDED_CASES))
def test_out_of_range_ids_at_padding_positions_are_not_errors(name):
    kw, expected = PADDED_CASES[name]
    arrays = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in kw.items() if not isinstance(v, np.ndarray)}
    eager = jaxbag.embedding_bag(W, mode="sum", **kw)
    jitted = jax.jit(lambda w, a: jaxbag.embedding_bag(w, mode="sum", **a, **static))(W, arrays)
    np.testing.assert_array_equal(eager, np.asarray(expected, np.float32))
    np.testing.assert_array_equal(jitted, eager)
    assert jaxbag.validate(V, **kw) is None

    def f(w, a):
        jaxbag.validate(w.shape[0], **a, **static)
        return jaxbag.embedding_bag(w, mode="sum", **a, **static)

    err, _ = checkify.checkify(jax.jit(f))(W, arrays)
    assert err.get() is None, err.get()
    # The same out-of-range id inside a bag is still reported, eagerly and under checkify.
    inside = dict(arrays, indices=np.roll(arrays["indices"], 1))
    with pytest.raises(IndexError, match=r"indices\[0\] = 99|indices\[0\] = -1"):
        jaxbag.embedding_bag(W, mode="sum", **inside, **static)
    err, _ = checkify.checkify(jax.jit(f))(W, inside)
    assert err.get() is not None and "out of range" in err.get()


@pytest.mark.parametrize("segments", [False, True], ids=["offsets", "segment_ids"])
def test_with_no_bags_no_id_is_read_so_none_is_an_error(segments):
    """B = 0 (empty offsets, as torch allows, or num_bags=0): every id is at a padding position,
    so eager calls, jit and validate agree: a [0, D] result and no error."""
    kw = (dict(segment_ids=i32(0, 0), num_bags=0) if segments else dict(offsets=i32()))
    ids = i32(V + 4, 1)
    eager = jaxbag.embedding_bag(W, ids, mode="sum", **kw)
    jitted = jax.jit(lambda w, i: jaxbag.embedding_bag(w, i, mode="sum", **kw))(W, ids)
    assert eager.shape == jitted.shape == (0, D)
    assert jaxbag.validate(V, ids, **kw) is None

    def f(w, i):
        jaxbag.validate(w.shape[0], i, **kw)
        return jaxbag.embedding_bag(w, i, mode="sum", **kw)

    err, _ = checkify.checkify(jax.jit(f))(W, ids)
    assert err.get() is None, err.get()
    # one bag [0, 2) makes the same id an error
    with pytest.raises(IndexError, match=rf"indices\[0\] = {V + 4} is out of range"):
        jaxbag.validate(V, ids, **(dict(segment_ids=i32(0, 0), num_bags=1) if segments
                                   else dict(offsets=i32(0))))


# ------------------------------------------------------------------------------------------------
# A skipped id (padding_idx, out of range under jit, at a padding position) reads nothing: not even
# the placeholder row 0, whose inf or NaN would leak into the bag as 0 * inf = NaN.


@pytest.mark.parametrize("impl", ["kernel", "gather", "stream", "max_norm"])
@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "max"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_skipped_ids_never_leak_row_0(impl, mode, bad, set_kernel):
    set_kernel(impl != "gather")
    w = np.array([[bad, 1.0], [5.0, 5.0], [2.0, 3.0], [-1.0, 4.0]], np.float32)
    ids = i32(1, 2, 9, 3, -2, 2, 0)  # 9, -2: out of range (jit); 0: at a padding position
    seg = i32(0, 0, 0, 1, 1, 1, 2)  # segment 2 >= num_bags: padding
    psw = None if mode == "max" else jnp.asarray(np.linspace(0.5, 2.0, 7).astype(np.float32))

    def f(w_, p):
        kw = dict(mode=mode, padding_idx=1, per_sample_weights=p)
        if impl == "stream":
            return fast_forward.bag_reduce(w_, ids, seg, 2, impl="stream", **kw)
        if impl == "max_norm":  # the gather + segment formulation of ops (and sharding)
            kw["max_norm"] = 100.0
        return jaxbag.embedding_bag(w_, ids, segment_ids=seg, num_bags=2, **kw)

    out = jax.jit(f)(jnp.asarray(w), psw)
    valid = np.array([False, True, False, True, False, True, False])
    ref = embedding_bag_ref(np.where(np.isfinite(w), w, 0.0), np.asarray(ids)[valid],
                            i32(0, 1), mode=mode,
                            per_sample_weights=None if psw is None else np.asarray(psw)[valid])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6)
    # gradients (the per-sample-weight gradient reads rows too): the reference's on the valid
    # positions, zero elsewhere, row 0 included
    g_w, g_p = jax.jit(jax.grad(lambda w_, p: jnp.sum(f(w_, p)), argnums=(0, 1)))(jnp.asarray(w), psw)
    want_w, want_p = embedding_bag_ref_vjp(
        np.where(np.isfinite(w), w, 0.0), np.asarray(ids)[valid], i32(0, 1), cotangent=np.ones((2, 2)),
        mode=mode, per_sample_weights=None if psw is None else np.asarray(psw)[valid])
    np.testing.assert_allclose(np.asarray(g_w), want_w, rtol=1e-6, atol=1e-6)
    if psw is not None:
        full_p = np.zeros(7)
        full_p[valid] = want_p
        np.testing.assert_allclose(np.asarray(g_p), full_p, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# mode="max" propagates NaN (as jnp.max), wherever the NaN stands in the bag and on every path; the
# gradient goes to the first NaN. (torch 2.13's CPU kernel drops a NaN that follows a number.)


@pytest.mark.parametrize("impl", ["kernel", "gather", "stream", "chunked", "max_norm"])
def test_max_propagates_nan_on_every_path(impl, set_kernel):
    set_kernel(impl != "gather")
    w = np.array([[1.0, 0.0], [np.nan, 1.0], [2.0, 2.0], [0.5, np.nan]], np.float32)
    if impl == "chunked":  # skewed bags: the stream loop hands over to the chunked scan
        ids = i32(*([0] * 30), 1, 2, 1, 3, 2, 2, 0, 3)
        seg = i32(*([0] * 30), 1, 1, 1, 2, 2, 3, 4, 5)
    else:
        ids = i32(0, 1, 2, 1, 0, 2, 3, 2, 0, 3)
        seg = i32(0, 0, 0, 1, 1, 2, 2, 3, 4, 5)
    num_bags = 6

    def f(w_):
        if impl in ("stream", "chunked"):
            return fast_forward.bag_reduce(w_, ids, seg, num_bags, mode="max", impl="stream")
        kw = {"max_norm": 100.0} if impl == "max_norm" else {}
        return jaxbag.embedding_bag(w_, ids, segment_ids=seg, num_bags=num_bags, mode="max", **kw)

    out = np.asarray(jax.jit(f)(jnp.asarray(w)))
    rows = w[np.asarray(ids)]
    sn = np.asarray(seg)
    expected = np.stack([rows[sn == b].max(axis=0) for b in range(num_bags)])  # NumPy: NaN propagates
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    np.testing.assert_allclose(out[~np.isnan(out)], expected[~np.isnan(expected)])
    # The gradient reaches the first NaN (np.argmax's pick), else the first arg-max.
    _, vjp = jax.vjp(jax.jit(f), jnp.asarray(w))
    (g,) = vjp(jnp.ones((num_bags, w.shape[1]), jnp.float32))
    g = np.asarray(g)
    g_ref = np.zeros_like(w)
    for b in range(num_bags):
        pos = np.nonzero(sn == b)[0]
        for d in range(w.shape[1]):
            g_ref[ids[pos[np.argmax(rows[pos, d])]], d] += 1.0
    np.testing.assert_array_equal(g, g_ref)


# The helpers around the op check their arguments as it does: (call, exception, regexes).
HELPER_CASES = {
    "renorm_1d_table": (lambda: jaxbag.renorm(jnp.ones(4), i32(0), max_norm=1.0),
                        ValueError, [r"weight must be 2-D \[V, D\]", r"\(4,\)", r"weight\[None, :\]"]),
    "renorm_int_table": (lambda: jaxbag.renorm(jnp.ones((3, 2), jnp.int32), i32(0), max_norm=1.0),
                         TypeError, [r"weight must be a floating-point", r"int32", r"astype"]),
    "renorm_float_ids": (lambda: jaxbag.renorm(W, jnp.array([0.0]), max_norm=1.0),
                         TypeError, [r"indices must be an integer", r"float32"]),
    "unique_rows_valid_shape": (lambda: jaxbag.unique_rows(i32(1, 2, 3), 5, valid=jnp.ones(2, bool)),
                                ValueError, [r"valid must be a bool mask", r"\(3,\)", r"\(2,\)"]),
    "unique_rows_valid_dtype": (lambda: jaxbag.unique_rows(i32(1, 2, 3), 5, valid=i32(1, 0, 1)),
                                ValueError, [r"valid must be a bool mask", r"int32"]),
    "unique_rows_float_ids": (lambda: jaxbag.unique_rows(jnp.array([1.0]), 5),
                              TypeError, [r"indices must be an integer"]),
    "unique_rows_num_embeddings": (lambda: jaxbag.unique_rows(i32(1), 0),
                                   ValueError, [r"num_embeddings must be a positive", r"=0"]),
    "rows_int_table": (lambda: jaxbag.embedding_bag_rows(jnp.ones((3, 2), jnp.int32), i32(0), i32(0)),
                       TypeError, [r"weight must be a floating-point"]),
    # a table without rows (under jit its gathers could not even be traced)
    "empty_table": (lambda: jaxbag.embedding_bag(jnp.zeros((0, 3)), i32(0, 1), i32(0), mode="sum"),
                    ValueError, [r"weight has no rows \(shape \(0, 3\)\)", r"num_embeddings >= 1"]),
    "empty_table_jit": (lambda: jax.jit(lambda w, i: jaxbag.embedding_bag(w, i, i32(0)))(
        jnp.zeros((0, 3)), i32(0, 1)), ValueError, [r"weight has no rows"]),
    "optimizer_1d_table": (
        lambda: jaxbag.sparse_sgd(0.1).update(jnp.ones(3), jaxbag.sparse_sgd(0.1).init(jnp.ones(3)),
                                               jaxbag.RowGrads(i32(0), jnp.ones((1, 1)))),
        ValueError, [r"table must be 2-D \[V, D\]", r"\(3,\)"]),
}


@pytest.mark.parametrize("name", list(HELPER_CASES))
def test_helper_argument_errors(name):
    call, error, patterns = HELPER_CASES[name]
    _raises(error, patterns, call)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16])
def test_narrow_integer_ids_are_widened(dtype):
    """int8/int16 ids with V above their range: V wrapped in the id dtype, so eagerly 'indices[0] =
    0 is out of range for num_embeddings=40000' and, sharded under jit, all-zero bags."""
    v = 40000
    w = jnp.asarray(np.random.default_rng(0).normal(size=(v, 2)), jnp.float32)
    ids, offs = np.array([0, 5, 100], dtype), np.array([0, 1], dtype)
    want = np.stack([np.asarray(w)[0], np.asarray(w)[5] + np.asarray(w)[100]])
    f = lambda w, i, o: jaxbag.embedding_bag(w, i, o, mode="sum")
    for got in (f(w, ids, offs), jax.jit(f)(w, ids, offs),
                jaxbag.embedding_bag_rows(w, ids, offs, mode="sum")[0],
                jaxbag.embedding_bag(w, ids, segment_ids=np.array([0, 1, 1], dtype), num_bags=2,
                                     mode="sum")):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert jaxbag.unique_rows(ids, v)[0].tolist() == [0, 5, 100]
    jaxbag.validate(v, ids, offs)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_unsigned_ids_offsets_and_segment_ids(dtype, kernel, set_kernel):
    """Unsigned segment ids were clipped to [-1, B] in their own dtype, where -1 wraps to the
    largest value: on the CPU-kernel path every bag came back zero (eagerly and under jit)."""
    set_kernel(kernel)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    wn = np.asarray(w)
    top = np.iinfo(dtype).max  # a padding segment id (>= B): dropped
    ids, seg = np.array([1, 2, 3, 5], dtype), np.array([0, 0, 1, top], dtype)
    want = {"sum": np.stack([wn[1] + wn[2], wn[3]]), "max": np.stack([np.maximum(wn[1], wn[2]), wn[3]])}
    for mode, expect in want.items():
        f = lambda w, i, s: jaxbag.embedding_bag(w, i, segment_ids=s, num_bags=2, mode=mode)
        for got in (f(w, ids, seg), jax.jit(f)(w, ids, seg),
                    jaxbag.embedding_bag(w, ids[:3], np.array([0, 2], dtype), mode=mode),
                    jaxbag.embedding_bag_rows(w, ids, segment_ids=seg, num_bags=2, mode=mode)[0]):
            np.testing.assert_allclose(got, expect, rtol=1e-6)
    g = jax.jit(jax.grad(lambda w: jaxbag.embedding_bag(w, ids, segment_ids=seg, num_bags=2, mode="sum").sum()))(w)
    np.testing.assert_array_equal(np.asarray(g)[:, 0], [0, 1, 1, 1, 0, 0])  # id 5 is padding
    jaxbag.validate(6, ids, segment_ids=seg, num_bags=2)
    with pytest.raises(IndexError, match=r"indices\[1\] = 200 is out of range"):
        jaxbag.embedding_bag(w, np.array([1, 200], dtype), np.array([0], dtype))


SEGMENT_CASES = {
    "offsets_float": (lambda: jaxbag.offsets_to_segment_ids(jnp.array([0.0, 1.5]), 3), TypeError,
                      [r"offsets must be an integer array", r"float32"]),
    "offsets_2d": (lambda: jaxbag.offsets_to_segment_ids(jnp.zeros((1, 2), jnp.int32), 3), ValueError,
                   [r"offsets must be 1-D", r"\(1, 2\)"]),
    "offsets_first": (lambda: jaxbag.offsets_to_segment_ids(jnp.array([1, 2]), 3), ValueError,
                      [r"offsets\[0\] = 1", r"must be 0"]),
    "offsets_decreasing": (lambda: jaxbag.offsets_to_segment_ids(jnp.array([0, 2, 1]), 3), ValueError,
                           [r"offsets\[2\] = 1 is smaller than offsets\[1\] = 2"]),
    "offsets_past_n": (lambda: jaxbag.offsets_to_segment_ids(jnp.array([0, 4]), 3), ValueError,
                       [r"offsets\[1\] = 4 is past the end", r"N = 3"]),
    "num_indices_negative": (lambda: jaxbag.offsets_to_segment_ids(jnp.array([0]), -1), ValueError,
                             [r"num_indices must be a static int >= 0", r"-1"]),
    # operator.index(True) is 1: taken as N = 1
    "num_indices_bool": (lambda: jaxbag.offsets_to_segment_ids(jnp.array([0]), True), ValueError,
                         [r"num_indices must be a static int >= 0 .*got True"]),
    "lengths_num_indices_bool": (lambda: jaxbag.lengths_to_segment_ids(jnp.array([1]), True),
                                 ValueError, [r"num_indices must be a static int >= 0 .*got True"]),
    # a Python int past int64: JAX's 'Error interpreting argument to stage as a JAX value'
    "offsets_python_int_past_int64": (lambda: jaxbag.offsets_to_segment_ids([0, 2**70], 5),
                                      ValueError, [r"offsets\[1\] = \d+ is past the end"]),
    "lengths_negative": (lambda: jaxbag.lengths_to_segment_ids(jnp.array([-2, 3]), 5), ValueError,
                         [r"lengths\[0\] = -2 is negative"]),
    "lengths_float": (lambda: jaxbag.lengths_to_segment_ids(jnp.array([1.5, 2.0]), 5), TypeError,
                      [r"lengths must be an integer array", r"float32"]),
    "lengths_bool": (lambda: jaxbag.lengths_to_segment_ids(jnp.array([True]), 5), TypeError,
                     [r"lengths must be an integer array", r"bool"]),
    "lengths_2d": (lambda: jaxbag.lengths_to_segment_ids(jnp.ones((2, 2), jnp.int32), 5), ValueError,
                   [r"lengths must be 1-D", r"\(2, 2\)"]),
    # one past N (the bound itself, not only a sum far past it)
    "lengths_one_past_n": (lambda: jaxbag.lengths_to_segment_ids(jnp.array([2, 2]), 3), ValueError,
                           [r"lengths sum to 4 > num_indices = 3"]),
    "lengths_past_n": (lambda: jaxbag.lengths_to_segment_ids(jnp.array([2, 2, 3]), 5), ValueError,
                       [r"lengths sum to 7 > num_indices = 5", r"lengths\[2\]"]),
    # the bag that passes N, not the one whose running sum reaches it exactly
    "lengths_past_n_after_exactly_n": (
        lambda: jaxbag.lengths_to_segment_ids(jnp.array([2, 3, 1]), 5), ValueError,
        [r"lengths sum to 6 > num_indices = 5 \(the bags up to lengths\[2\] already need 6 ids\)"]),
    "lengths_minus_one": (lambda: jaxbag.lengths_to_segment_ids(jnp.array([-1, 3]), 5), ValueError,
                          [r"lengths\[0\] = -1 is negative"]),
    "offsets_empty_with_last": (
        lambda: jaxbag.offsets_to_segment_ids(jnp.zeros((0,), jnp.int32), 2, include_last_offset=True),
        ValueError, [r"include_last_offset=True needs at least one offset"]),  # gave [-1, -1]
}


def test_segment_id_helpers_edge_cases():
    """[] lengths were read as float ids ('lengths must be an integer array'); int64 lengths whose
    running sum wraps passed the eager check (x64)."""
    assert jaxbag.lengths_to_segment_ids([], 3).tolist() == [0, 0, 0]
    assert jaxbag.offsets_to_segment_ids([], 2).tolist() == [-1, -1]
    assert jaxbag.embedding_bag(jnp.ones((3, 2)), [], [0, 0], mode="sum").tolist() == [[0, 0], [0, 0]]
    with jax.enable_x64(True):
        for lengths in ([2**62] * 4, [2**63 - 1, 1]):
            _raises(ValueError, [r"lengths\[0\] = \d+ > num_indices = 3"],
                    lambda lengths=lengths: jaxbag.lengths_to_segment_ids(jnp.array(lengths, jnp.int64), 3))


@pytest.mark.parametrize("name", sorted(SEGMENT_CASES))
def test_segment_id_helpers_check_their_arguments(name):
    """offsets_to_segment_ids / lengths_to_segment_ids checked nothing: negative lengths gave
    [0, 1, 1, 1, 1], float lengths were truncated, decreasing offsets passed."""
    call, error, patterns = SEGMENT_CASES[name]
    _raises(error, patterns, call)


def test_segment_reductions_send_no_index_out_of_range():
    """Positions outside [0, B) are reduced into two spare segments that are sliced off, not
    given to the scatter as out-of-range indices: XLA's deterministic GPU scatter rewrite
    flattens a vmapped scatter's indices before dropping out-of-range ones, so row r's segment B
    landed on row r + 1's bag 0 (an H200 gave zeros there). On the CPU both ways give the same
    values, so this checks the indices themselves, and that the library reduces by segment
    through this one helper."""
    import inspect

    from jaxbag._src import segments

    seg = jnp.array([-7, -1, 0, 0, 2, 3, 3, 9], jnp.int32)
    for b in (0, 1, 3, 4):
        ids = np.asarray(segments.spare_bag_ids(seg, b))
        assert ids.min() >= 0 and ids.max() <= b + 1 and np.all(np.diff(ids) >= 0), (b, ids)
        inside = (np.asarray(seg) >= 0) & (np.asarray(seg) < b)
        np.testing.assert_array_equal(ids[inside], np.asarray(seg)[inside] + 1)
    with jax.enable_x64(True):  # a wide dtype's values past int32 do not wrap into a bag
        big = jnp.array([-2**40, 0, 1, 2**32, 2**33 + 1], jnp.int64)
        assert segments.spare_bag_ids(big, 2).tolist() == [0, 1, 2, 3, 3]
    vals = jnp.array([np.inf, np.nan, 1.0, 2.0, 4.0, 8.0, np.nan, -np.inf], jnp.float32)
    f = jax.jit(segments.segment_reduce, static_argnums=(0, 3))
    assert f(jax.ops.segment_sum, vals, seg, 3).tolist() == [3.0, 0.0, 4.0]
    assert f(jax.ops.segment_max, vals, seg, 3).tolist() == [2.0, -np.inf, 4.0]
    assert f(jax.ops.segment_sum, vals, seg, 0).shape == (0,)
    rows = jnp.stack([seg, jnp.array([0, 0, 1, 1, 1, 2, 5, 5], jnp.int32)])
    got = jax.vmap(lambda s_: segments.segment_reduce(jax.ops.segment_sum, jnp.arange(8.0), s_, 3))(rows)
    np.testing.assert_array_equal(got, [[5.0, 0.0, 4.0], [1.0, 9.0, 5.0]])
    # out-of-range offsets mark an unread slot, under vmap too
    offs = jnp.array([[0, 9, 2], [0, 2, -5]], jnp.int32)
    g = jax.jit(jax.vmap(segments.offsets_to_segment_ids_unchecked, (0, None)), static_argnums=1)
    assert g(offs, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    # no other module calls the segment reductions directly (sparse_kernels' slots are in range)
    import jaxbag._src as src
    for path in sorted(pathlib.Path(inspect.getfile(src)).parent.glob("*.py")):
        text = "\n".join(l.split("#")[0] for l in path.read_text().splitlines())
        calls = re.findall(r"jax\.ops\.segment_\w+\(", text)
        if path.name == "segments.py":
            assert not calls, calls  # (it receives the op as an argument)
        elif path.name == "sparse_kernels.py":
            assert calls == ["jax.ops.segment_sum("], calls
        else:
            assert not calls, (path.name, calls)


_sgd = jaxbag.sparse_sgd(0.5)


def test_row_scatters_send_invalid_rows_past_every_stacked_table():
    """renorm's and the sparse optimisers' row scatters send an invalid row to 2**31 - 1, not to
    V: XLA's deterministic GPU scatter rewrite flattens a vmapped scatter's (table, row) indices
    to t * V + row before dropping out-of-range ones, so V would land on the next table's row 0.
    On the CPU both give the same values, so this checks the index and the traced scatters."""
    from jaxbag._src import segments

    big = 2**31 - 1
    rows = jnp.array([-3, 0, 4, 5, 7, big], jnp.int32)
    assert segments.dropped_rows(rows, 5).tolist() == [big, 0, 4, big, big, big]
    for v, tables in ((5, 3), (1000, 7), (2**20, 2**10 - 1)):  # T * V < 2**31
        t = np.arange(tables, dtype=np.int64)
        flat = ((t * v + big + 2**31) % 2**32) - 2**31  # the int32 sum, wrapped
        assert np.all((flat < 0) | (flat >= tables * v)) and np.all(t * v + big >= tables * v)
    w = jnp.array([[3.0, 4.0], [6.0, 8.0], [0.3, 0.4]])
    ids = jnp.array([1, 3, -1])
    for fn in (lambda w_, i_: jaxbag.renorm(w_, i_, 1.0),
               lambda w_, i_: _sgd.update(w_, _sgd.init(w_), jaxbag.RowGrads(i_, jnp.ones((3, 2))))[0]):
        assert str(big) in str(jax.make_jaxpr(fn)(w, ids)), "the scatter's fill row"
        stacked = jnp.stack([w, w + 1.0])
        got = jax.jit(jax.vmap(fn))(stacked, jnp.stack([ids, jnp.array([0, 2, 5])]))
        np.testing.assert_allclose(got[0], fn(w, ids), rtol=1e-6)
        np.testing.assert_allclose(got[1], fn(w + 1.0, jnp.array([0, 2, 5])), rtol=1e-6)
    np.testing.assert_allclose(jaxbag.renorm(w, ids, 1.0), [[3.0, 4.0], [0.6, 0.8], [0.3, 0.4]],
                               rtol=1e-6)


def test_segment_id_helpers_under_jit_follow_the_documented_rule():
    """Under jit (values unknown, unchecked): negative lengths count as 0, bags are cut at N, and
    lengths whose sum wraps int32 do not wrap; offsets outside [0, N] mark nothing."""
    f = jax.jit(jaxbag.lengths_to_segment_ids, static_argnums=1)
    assert f(jnp.array([-2, 3]), 5).tolist() == [1, 1, 1, 2, 2]
    assert f(jnp.array([2, 2, 3]), 5).tolist() == [0, 0, 1, 1, 2]
    assert f(jnp.array([2**30, 2**30, 2**30]), 3).tolist() == [0, 0, 0]
    assert f(jnp.array([1, 2**31 - 1, 1]), 4).tolist() == [0, 1, 1, 1]
    # N + 1 bags of length N: the first takes every position; a running sum of the clipped
    # lengths that did not saturate at N would reach (N + 1) * N = 2**32 + 2**16 and wrap
    n = 2**16
    np.testing.assert_array_equal(f(jnp.full((n + 1,), n), n), np.zeros(n, np.int32))
    g = jax.jit(jaxbag.offsets_to_segment_ids, static_argnums=1)
    assert g(jnp.array([0, 9, 2]), 4).tolist() == [0, 0, 1, 1]
    assert g(jnp.array([0, -2]), 5).tolist() == [0, 0, 0, 0, 0]  # a negative offset too
    # valid input: the same eagerly and under jit, against a NumPy model
    rng = np.random.default_rng(0)
    for _ in range(20):
        lens = rng.integers(0, 4, rng.integers(1, 6))
        n = int(lens.sum()) + int(rng.integers(0, 3))
        want = np.concatenate([np.repeat(np.arange(len(lens)), lens), np.full(n - lens.sum(), len(lens))])
        assert jaxbag.lengths_to_segment_ids(jnp.asarray(lens), n).tolist() == want.tolist()
        assert f(jnp.asarray(lens), n).tolist() == want.tolist()
        offs = np.concatenate([[0], np.cumsum(lens)[:-1]])
        want_o = np.where(want == len(lens), len(lens) - 1, want)  # no last offset: last bag runs on
        assert jaxbag.offsets_to_segment_ids(jnp.asarray(offs), n).tolist() == want_o.tolist()


@pytest.mark.parametrize("check", ["embedding_bag", "validate"])
@pytest.mark.parametrize("big", [2**70, -(2**70)])
def test_python_ints_past_int64_are_named_as_out_of_range_ids(check, big):
    """A list holding 2**70 became a NumPy object array, which JAX refused ('Error interpreting
    argument to stage as a JAX value') without naming the argument or the position."""
    call = {"embedding_bag": lambda: jaxbag.embedding_bag(W, [1, big, 2], [0]),
            "validate": lambda: jaxbag.validate(V, [1, big, 2], [0])}[check]
    _raises(IndexError, [r"indices\[1\] = -?\d+ is out of range", r"may stand for a larger"], call)
    _raises(IndexError, [r"indices\[1\] = -?\d+ is out of range"],  # NumPy ints among them
            lambda: jaxbag.validate(V, [np.int64(1), big], [0]))
    # with a float (or bool) among them: not an integer array, named
    _raises(TypeError, [r"indices must be an integer array"],
            lambda: jaxbag.validate(V, [1, big, 2.5], [0]))


@pytest.mark.parametrize("num_bags", [True, 1.0, np.array(1), jnp.int32(1)])
def test_num_bags_must_be_an_int_in_every_form(num_bags):
    """True == 1 and 1.0 == 1: with 2-D indices or offsets a bool or float num_bags passed (the
    segment-ids form refused it); an array is a size given as an array, as elsewhere."""
    hint = r".*pass int\(x\)" if isinstance(num_bags, (np.ndarray, jax.Array)) else ""
    for call in (lambda: jaxbag.embedding_bag(W, i32(1, 2)[None], num_bags=num_bags),
                 lambda: jaxbag.embedding_bag(W, i32(1, 2), i32(0), num_bags=num_bags)):
        _raises(ValueError, [r"num_bags must be a static int or None; got num_bags=.*leave "
                             r"num_bags=None\." + hint], call)
    assert jaxbag.embedding_bag(W, i32(1, 2), i32(0), num_bags=np.int64(1)).shape == (1, D)
    assert jaxbag.embedding_bag(W, i32(1, 2)[None], num_bags=1).shape == (1, D)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sqrtn"])
def test_2d_input_without_columns_gives_empty_bags(mode, jit):
    """[B, 0] indices: B empty bags (zeros), not a ZeroDivisionError from the bag layout."""
    f = lambda w, i: jaxbag.embedding_bag(w, i, mode=mode)  # noqa: E731
    out = (jax.jit(f) if jit else f)(W, jnp.zeros((3, 0), jnp.int32))
    np.testing.assert_array_equal(out, np.zeros((3, D), np.float32))
    g = jax.grad(lambda w: jnp.sum(f(w, jnp.zeros((3, 0), jnp.int32))))(W)
    np.testing.assert_array_equal(g, np.zeros_like(W))


def test_small_argument_inconsistencies():
    """A NumPy int size was refused (num_bags accepts one), a misspelt keyword of
    embedding_bag_rows was reported against a private function, and validate took
    num_embeddings=5.0 or -1 ('0 <= id < -1')."""
    w, ids, offs = jnp.ones((5, 2)), jnp.array([0, 1]), jnp.array([0])
    bags, _ = jaxbag.embedding_bag_rows(w, ids, offs, size=np.int64(2))
    assert bags.shape == (1, 2)
    assert jaxbag.unique_rows(ids, 5, size=np.int64(2))[0].tolist() == [0, 1]
    _raises(TypeError, [r"embedding_bag_rows\(\) got an unexpected keyword argument 'modee'",
                        r"mode, per_sample_weights"],
            lambda: jaxbag.embedding_bag_rows(w, ids, offs, modee="sum"))
    for v in (5.0, -1, True):
        _raises(ValueError, [r"num_embeddings must be a static int >= 0", re.escape(repr(v))],
                lambda v=v: jaxbag.validate(v, ids, offs))
    jaxbag.validate(np.int64(5), ids, offs)


@pytest.mark.parametrize("id_dtype, pos_dtype", [(np.int64, np.int32), (np.int32, np.int64)])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_mixed_int32_int64_inputs_under_x64_and_strict_promotion(id_dtype, pos_dtype, mode):
    """x64 with strict promotion: int64 ids with int32 offsets (or the reverse) failed with a
    TypePromotionError inside the library (include_last_offset checks, the streaming loop, the
    JaggedFeatures packing)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        w = jnp.asarray(rng.normal(size=(9, 3)), jnp.float32)
        ids = jnp.array([1, 8, 4, 0, 8], id_dtype)  # id V - 1 in a bag and past the last offset
        offs = jnp.array([0, 2, 4], pos_dtype)
        seg = jnp.array([0, 0, 1, 1, 2], pos_dtype)
        want = embedding_bag_ref(np.asarray(w, np.float64), np.asarray(ids)[:4], np.array([0, 2]),
                                 mode=mode)
        got = [jaxbag.embedding_bag(w, ids, offs, mode=mode, include_last_offset=True),
               jax.jit(lambda w, i, o: jaxbag.embedding_bag(w, i, o, mode=mode, include_last_offset=True))(w, ids, offs),
               fast_forward.bag_reduce(w, ids, seg, 2, mode=mode, impl="stream"),
               jaxbag.embedding_bag_rows(w, ids, offs, mode=mode, include_last_offset=True)[0]]
        for g in got:
            np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)
        jaxbag.validate(9, ids, offs, include_last_offset=True)
        jf = jaxbag.JaggedFeatures(["x"], jnp.array([1, 2, 3, 0], id_dtype), jnp.array([[2, 1]], pos_dtype),
                                   capacities=(4,))
        layout = jaxbag.collection_layout([jaxbag.TableConfig("t", 9, 3, ("x",), mode=mode)])
        out = jax.jit(lambda p, j: jaxbag.embedding_bag_collection(p, j, layout=layout))({"t": w}, jf)
        red = np.max if mode == "max" else np.sum
        np.testing.assert_allclose(out["x"], np.stack([red(np.asarray(w)[[1, 2]], 0), np.asarray(w)[3]]),
                                   rtol=1e-6)


def test_ids_past_int64_under_x64_are_named_as_possibly_clipped():
    """Under x64, uint64 ids and Python ints past int64 are clipped to int64's maximum (as ids
    past int32 are without x64): the error showed 9223372036854775807 with no word that it may
    stand for a larger id. embedding_bag, validate and the collection now say so; an id of
    int64's own range gets no note."""
    top = 2**63 - 1
    note = rf"{top} may stand for a larger id: uint64 ids and Python ints past int64's range"
    with jax.enable_x64(True):
        w = jnp.arange(8.0, dtype=jnp.float32).reshape(4, 2)
        for ids in (np.array([1, 2**64 - 3], np.uint64), [1, 2**70]):
            _raises(IndexError, [rf"indices\[1\] = {top} is out of range", note],
                    lambda ids=ids: jaxbag.embedding_bag(w, ids, np.array([0]), mode="sum"))
            _raises(IndexError, [rf"indices\[1\] = {top} is out of range", note],
                    lambda ids=ids: jaxbag.validate(4, ids, np.array([0])))
        msg = _raises(IndexError, [r"indices\[0\] = 4294967297 is out of range"],
                      lambda: jaxbag.embedding_bag(w, np.array([2**32 + 1]), np.array([0])))
        assert "may stand for" not in msg
        layout = jaxbag.collection_layout([jaxbag.TableConfig("a", 4, 2, ("a",), mode="sum")])
        jf = jaxbag.JaggedFeatures(["a"], np.array([1, 2**64 - 3], np.uint64), np.array([[2]]),
                                   capacities=(2,))
        _raises(IndexError, [rf"has id {top} in example 0", note],
                lambda: jaxbag.embedding_bag_collection({"a": w}, jf, layout=layout))


def test_numpy_int64_ids_past_int32_are_not_wrapped_without_x64():
    """Without x64, jnp.asarray casts NumPy int64 to int32 with wrap-around (and a warning), so
    id 2**32 + 1 read row 1, eagerly and silently; a padding segment id 2**33 became bag 0. Now
    they are clipped to int32's range, and the error says the value shown may be a clipped one."""
    w = jnp.arange(8.0).reshape(4, 2)
    for ids in (np.array([2**32 + 1]), [2**32 + 1], np.array([2**32 + 1], np.uint64)):
        _raises(IndexError, [r"indices\[0\] = 2147483647 is out of range",
                             r"2147483647 may stand for a larger id: without jax_enable_x64"],
                lambda ids=ids: jaxbag.embedding_bag(w, ids, np.array([0]), mode="sum"))
    msg = _raises(IndexError, [r"indices\[0\] = 9 is out of range"],
                  lambda: jaxbag.embedding_bag(w, np.array([9]), np.array([0]), mode="sum"))
    assert "may stand for" not in msg
    got = jaxbag.embedding_bag(w, np.array([1, 3]), segment_ids=np.array([0, 2**33]), num_bags=1,
                               mode="sum")
    np.testing.assert_array_equal(got, w[1:2])
    bags, pb = jaxbag.embedding_bag_rows(w, np.array([2**32 + 1, 3]), np.array([0, 1]), mode="sum")
    np.testing.assert_array_equal(bags, np.stack([np.zeros(2), np.asarray(w)[3]]))
    assert [int(r) for r in pb(jnp.ones((2, 2))).rows if r < 4] == [3]


def test_a_packed_bags_passed_whole_says_which_fields_to_pass():
    """jaxbag.pack_bags' own result passed as the ids gave NumPy's 'inhomogeneous shape' error,
    naming neither the argument nor PackedBags."""
    pb = jaxbag.pack_bags([[1, 2], [3]], batch_size=2)
    w = jnp.ones((5, 2), jnp.float32)
    match = r"got a jaxbag\.PackedBags .*pass its fields: embedding_bag\(weight, pb\.indices, segment_ids="
    with pytest.raises(TypeError, match=match):
        jaxbag.embedding_bag(w, pb)
    with pytest.raises(TypeError, match=match):
        jaxbag.nnx.EmbeddingBag(5, 2, rngs=__import__("flax").nnx.Rngs(0))(pb)
    np.testing.assert_array_equal(  # and the call it suggests works
        jaxbag.embedding_bag(w, pb.indices, segment_ids=pb.segment_ids, num_bags=pb.num_bags),
        [[1.0, 1.0], [1.0, 1.0]])


@pytest.mark.parametrize("kw", [dict(max_norm=float("nan")), dict(max_norm="1"), dict(max_norm=True),
                                dict(max_norm=[1.5]), dict(max_norm=1.0, norm_type=float("nan")),
                                dict(max_norm=1.0, norm_type="2")])
def test_max_norm_and_norm_type_must_be_real_numbers(kw):
    """Non-numbers were used as given (a string failed deep inside, True was 1). Any sign stays
    allowed, as torch (a negative max_norm flips the rows it touches; norm_type is torch's p, 0
    counts non-zeros)."""
    w, ids, offs = jnp.ones((4, 2), jnp.float32), jnp.array([0, 1]), jnp.array([0])
    name = "norm_type" if "norm_type" in kw else "max_norm"
    match = rf"{name} must be a real number \(not NaN\)"
    with pytest.raises(ValueError, match=match):
        jaxbag.embedding_bag(w, ids, offs, **kw)
    with pytest.raises(ValueError, match=match):
        jaxbag.renorm(w, ids, kw["max_norm"], kw.get("norm_type", 2.0))
    with pytest.raises(ValueError, match=match):
        jaxbag.nnx.EmbeddingBag(4, 2, **kw, rngs=__import__("flax").nnx.Rngs(0))
    jaxbag.embedding_bag(w, ids, offs, max_norm=float("inf"), norm_type=float("inf"))  # allowed


def test_a_traced_norm_type_is_refused_by_name_a_traced_max_norm_works():
    """A traced norm_type reached the Python branches on its value: TracerBoolConversionError."""
    w, ids, offs = jnp.ones((4, 2), jnp.float32), jnp.array([0, 1]), jnp.array([0])
    match = (r"norm_type must be a static number: it picks the norm's formula .*got a traced "
             r"value.*static_argnames='norm_type'")
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda p: jaxbag.embedding_bag(w, ids, offs, max_norm=1.0, norm_type=p))(3.0)
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda p: jaxbag.renorm(w, ids, 1.0, p))(3.0)
    got = jax.jit(lambda m: jaxbag.embedding_bag(w, ids, offs, max_norm=m, norm_type=3.0))(0.5)
    want = jaxbag.embedding_bag(w, ids, offs, max_norm=0.5, norm_type=3.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(want, jaxbag.embedding_bag(w, ids, offs))  # the rows were rescaled


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_max_norm_zero_or_negative_is_torchs(max_norm):
    """torch accepts them (0 zeroes the touched rows, a negative one flips them); so does
    from_torch of such a module."""
    import torch

    rng = np.random.default_rng(0)
    table = rng.normal(size=(4, 2)).astype(np.float32)
    ids, offs = np.array([0, 1, 3]), np.array([0, 2])
    want = torch.nn.functional.embedding_bag(torch.tensor(ids), torch.tensor(table.copy()),
                                             torch.tensor(offs), mode="sum", max_norm=max_norm)
    got = jaxbag.embedding_bag(jnp.asarray(table), ids, offs, mode="sum", max_norm=max_norm)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    t = torch.nn.EmbeddingBag(4, 2, mode="sum", max_norm=max_norm)
    m = jaxbag.nnx.EmbeddingBag.from_torch(t)
    assert m.settings.max_norm == max_norm
    w, ids, offs = jnp.ones((4, 2), jnp.float32), jnp.array([0, 1]), jnp.array([0])
    # JAX scalars, concrete or traced (jit over max_norm), worked before the check and still do
    want = jaxbag.embedding_bag(w, ids, offs, max_norm=0.5)
    np.testing.assert_array_equal(jaxbag.embedding_bag(w, ids, offs, max_norm=jnp.float32(0.5)), want)
    np.testing.assert_array_equal(
        jax.jit(lambda m: jaxbag.embedding_bag(w, ids, offs, max_norm=m))(0.5), want)


def test_lists_holding_traced_values_are_taken_as_jnp_takes_them():
    """as_ids read every non-jax.Array input through np.asarray, so a Python list holding a
    traced scalar (offsets [0, k] under jit) raised TracerArrayConversionError in embedding_bag,
    offsets_to_segment_ids and the modules (per_sample_weights lists already worked)."""
    w = jnp.arange(10.0).reshape(5, 2)
    ids = jnp.array([1, 2, 3])

    @jax.jit
    def f(k):
        return (jaxbag.embedding_bag(w, ids, [0, k], mode="sum"),
                jaxbag.embedding_bag(w, [k, 2], [0], mode="sum"),
                jaxbag.offsets_to_segment_ids([0, k], 3))

    a, b, seg = f(1)
    np.testing.assert_array_equal(a, [w[1], w[2] + w[3]])
    np.testing.assert_array_equal(b, [w[1] + w[2]])
    np.testing.assert_array_equal(seg, [0, 1, 1])
    err, _ = jax.jit(checkify.checkify(lambda k: jaxbag.validate(5, ids, [0, k])))(2)
    assert err.get() is None
    err, _ = jax.jit(checkify.checkify(lambda k: jaxbag.validate(5, ids, [0, k])))(9)
    assert "offsets[1] = 9 is past the end of indices" in err.get()
    # lists of concrete values still go through NumPy: a NumPy int64 id past int32 next to a JAX
    # scalar stays out of range (a first version sent them to jnp, which wrapped it to row 1), and
    # a Python int next to an int16 JAX scalar is not cast to int16
    with pytest.raises(IndexError, match=r"indices\[0\] = 2147483647 is out of range"):
        jaxbag.embedding_bag(w, [np.int64(2**32 + 1), jnp.int32(0)], [0], mode="sum")
    big = jnp.ones((50_000, 2))
    np.testing.assert_array_equal(jaxbag.embedding_bag(big, [jnp.int16(5), 40_000], [0], mode="sum"),
                                  [[2.0, 2.0]])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_negative_int64_segment_ids_are_dropped_under_x64(mode, jit):
    """x64: int64 segment ids reach the CPU kernel through ``segment_ids_int32``, which must keep
    ``-1`` (ids before bag 0: padding) out of bag 0. test_negative_segment_ids_dropped only
    covers int32 segment ids (they skip that conversion)."""
    with jax.enable_x64(True):
        w = jnp.asarray(np.arange(14, dtype=np.float32).reshape(7, 2))
        seg = np.array([-1, -1, 0, 1, 1, 2], np.int64)
        ids = np.array([5, 6, 1, 2, 3, 4], np.int64)
        f = lambda w_, i, s: jaxbag.embedding_bag(w_, i, segment_ids=s, num_bags=2, mode=mode)
        out = np.asarray((jax.jit(f) if jit else f)(w, jnp.asarray(ids), jnp.asarray(seg)))
    wn = np.asarray(w)
    ref = {"sum": [wn[1], wn[2] + wn[3]], "mean": [wn[1], (wn[2] + wn[3]) / 2],
           "max": [wn[1], np.maximum(wn[2], wn[3])]}[mode]
    np.testing.assert_allclose(out, np.stack(ref), rtol=1e-6)


@pytest.mark.parametrize("check", ["embedding_bag", "validate"])
def test_2d_out_of_range_id_is_named_by_row_then_column(check):
    """The one 2-D case in test_errors sits at [1, 1], where row and column are the same number:
    an id at [1, 2] of a [2, 4] batch must be reported as indices[1, 2], not [2, 1] or [6]."""
    w = jnp.ones((5, 2), jnp.float32)
    ids = np.array([[0, 1, 2, 3], [3, 4, 7, 0]], np.int32)
    with pytest.raises(IndexError, match=r"indices\[1, 2\] = 7 is out of range"):
        if check == "validate":
            jaxbag.validate(5, ids)
        else:
            jaxbag.embedding_bag(w, ids)


def test_ids_passed_first_in_torchs_order_get_a_hint():
    """``embedding_bag(ids, table, offsets)`` (F.embedding_bag's order) said only that weight
    must be 2-D: integer "weights" now also point at the argument order."""
    table, ids = jnp.ones((4, 2), jnp.float32), jnp.array([1, 2])
    for args, error in (((ids, table, jnp.array([0])), ValueError),
                        ((jnp.array([[1, 2]]), table), TypeError)):
        with pytest.raises(error, match=r"Integer values look like ids: jaxbag takes the table "
                                        r"first, embedding_bag\(weight, indices, offsets\)"):
            jaxbag.embedding_bag(*args)
    with pytest.raises(ValueError, match=r"weight must be 2-D") as info:  # a float vector: no hint
        jaxbag.embedding_bag(jnp.ones((3,)), ids, jnp.array([0]))
    assert "look like ids" not in str(info.value)
