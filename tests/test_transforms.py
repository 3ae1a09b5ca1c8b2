"""jaxbag.embedding_bag under JAX transforms: jit (no recompilation for equal shapes), vmap over any
argument (== a Python loop), grad w.r.t. weight and per_sample_weights (== the NumPy reference's
analytic gradient), and jax.test_util.check_grads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbag
import jaxbag.nnx
from reference import assert_close, embedding_bag_ref, embedding_bag_ref_vjp, magnitude_ref

V, D = 6, 3
MODES = ("sum", "mean", "max", "sqrtn")


def table(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(V, D)) + np.arange(V * D).reshape(V, D) * 1e-2  # distinct: no max ties
    return jnp.asarray(w.astype(np.float32)).astype(dtype)


def f64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# jit: one compilation for equal shapes, whatever the values.


def _value_sets(form, rng):
    """Three argument sets of equal shapes and different values (bags, empty bags, padding, weights)."""
    sets = []
    for k in range(3):
        ids = rng.integers(0, V, size=8)
        if form == "2d":
            sets.append(dict(indices=ids.reshape(2, 4).astype(np.int64 if k == 1 else np.int32)))
        elif form == "offsets":
            offs = np.sort(rng.integers(0, 9, size=3))
            offs[0] = 0
            sets.append(dict(indices=ids.astype(np.int64 if k == 1 else np.int32), offsets=offs.astype(np.int32)))
        else:
            seg = np.sort(rng.integers(0, 5, size=8)).astype(np.int32)  # ids 3, 4 dropped with num_bags=3
            sets.append(dict(indices=ids.astype(np.int32), segment_ids=seg))
        sets[-1]["per_sample_weights"] = jnp.asarray(rng.uniform(0.25, 2.0, size=ids.shape).reshape(
            sets[-1]["indices"].shape).astype(np.float32))
    return sets


def test_the_compile_counter_counts(count_compiles):
    """The counter the no-recompile tests use sees every XLA compilation of the function."""

    def h(x):
        return jaxbag.embedding_bag(table(), x, jnp.array([0], jnp.int32), mode="sum")

    jh = jax.jit(h)
    with count_compiles(h) as compiles:
        jh(jnp.array([1, 2], jnp.int32))
        jh(jnp.array([3, 4], jnp.int32))
        assert len(compiles) == 1
        jh(jnp.array([1, 2, 3], jnp.int32))  # a new shape: a second compilation
    assert len(compiles) == 2


@pytest.mark.parametrize("form", ["offsets", "2d", "segments"])
@pytest.mark.parametrize("mode", MODES)
def test_jit_compiles_once_for_equal_shapes(mode, form, count_compiles):
    traces = []
    num_bags = 3 if form == "segments" else None

    def f(weight, a):
        traces.append(1)
        a = dict(a)
        if mode == "max":
            a.pop("per_sample_weights")
        return jaxbag.embedding_bag(weight, mode=mode, padding_idx=-1, num_bags=num_bags, **a)

    jf = jax.jit(f)
    rng = np.random.default_rng(0)
    with count_compiles(f) as compiles:
        outs = [(k, args, jf(table(seed=k), args)) for k, args in enumerate(_value_sets(form, rng))]
    for k, args, out in outs:
        weight = table(seed=k)
        kw = {k2: v for k2, v in args.items() if k2 != "per_sample_weights"}
        psw = None if mode == "max" else f64(args["per_sample_weights"])
        expected = embedding_bag_ref(f64(weight), mode=mode, padding_idx=-1, num_bags=num_bags,
                                     per_sample_weights=psw, **kw)
        mag = magnitude_ref(f64(weight), mode=mode, padding_idx=-1, num_bags=num_bags, per_sample_weights=psw, **kw)
        assert_close(out, expected, mag, "float32")
    assert len(traces) == 1, f"traced {len(traces)} times"
    assert len(compiles) == 1


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_jit_grad_compiles_once(mode, count_compiles):
    traces = []

    def loss(weight, ids, offs):
        traces.append(1)
        return jnp.sum(jaxbag.embedding_bag(weight, ids, offs, mode=mode, max_norm=1.0) ** 2)

    g = jax.jit(jax.grad(loss))
    rng = np.random.default_rng(1)
    with count_compiles(loss) as compiles:
        for _ in range(3):
            ids = rng.integers(0, V, size=7).astype(np.int32)
            offs = np.array([0, *np.sort(rng.integers(0, 8, size=2))], np.int32)
            g(table(), ids, offs)
    assert len(traces) == 1
    assert len(compiles) == 1


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("call", ["forward", "grad", "rows_pullback", "nnx"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_eager_calls_compile_only_the_first_time(mode, call, kernel, set_kernel, count_compiles):
    """Called eagerly (no jit of the user's), a repeated call compiles nothing: on the CPU
    kernel's path every call compiled a new program (jit(cond): 30 ms, and JAX's eager cache
    kept each one, 1.5 MB a call: memory grew without bound)."""
    set_kernel(kernel)
    w = table()
    ids, offs = jnp.array([1, 2, 3, 1, 0], jnp.int32), jnp.array([0, 2, 2], jnp.int32)
    f = {
        "forward": lambda: jaxbag.embedding_bag(w, ids, offs, mode=mode),
        "grad": lambda: jax.grad(lambda w: jaxbag.embedding_bag(w, ids, offs, mode=mode).sum())(w),
        "rows_pullback": lambda: jaxbag.embedding_bag_rows(w, ids, offs, mode=mode)[1](
            jnp.ones((3, D), jnp.float32)),
        "nnx": lambda: jaxbag.nnx.EmbeddingBag.from_pretrained(w, mode=mode)(ids, offs),
    }[call]
    first = jax.block_until_ready(f())
    with count_compiles() as compiles:
        again = [jax.block_until_ready(f()) for _ in range(3)]
    assert compiles == [], compiles
    for a in again:  # (and the same values)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(first), strict=True):
            np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------
# vmap over a leading axis of any argument == a Python loop (and == the reference).

T = 3


def _stacked_case(form):
    rng = np.random.default_rng(42)
    weights = jnp.stack([table(seed=s) for s in range(T)])
    if form == "2d":
        ids = rng.integers(0, V, size=(T, 3, 4)).astype(np.int32)
        offs = None
        segs = None
    else:
        ids = rng.integers(0, V, size=(T, 9)).astype(np.int32)
        if form == "offsets":
            offs = np.stack([np.array([0, *np.sort(rng.integers(0, 10, size=3))]) for _ in range(T)]).astype(np.int32)
            segs = None
        else:
            offs = None
            segs = np.sort(rng.integers(0, 5, size=(T, 9)), axis=1).astype(np.int32)
    psw = jnp.asarray(rng.uniform(0.25, 2.0, size=ids.shape).astype(np.float32))
    return weights, ids, offs, segs, psw


# Which arguments are batched (the others take element 0 of the stack).
AXES = {
    "weight": (0, None, None, None, None),
    "indices": (None, 0, None, None, None),
    "offsets_or_segments": (None, None, 0, 0, None),
    "per_sample_weights": (None, None, None, None, 0),
    "all": (0, 0, 0, 0, 0),
}


VMAP_CASES = [
    (m, w, f, b)
    for m, w in [("sum", True), ("mean", True), ("max", False), ("sqrtn", True)]
    for f, b in [
        ("offsets", "weight"), ("offsets", "indices"), ("2d", "indices"), ("segments", "indices"),
        ("offsets", "offsets_or_segments"), ("segments", "offsets_or_segments"), ("2d", "per_sample_weights"),
        ("offsets", "all"), ("2d", "all"), ("segments", "all"),
    ]
    if w or b != "per_sample_weights"
]


def _use_path(path, set_kernel):
    """Selects the formulation under test: ``kernel`` (the CPU kernel), ``gather`` (what the
    fast path lowers where the kernel does not apply) or ``reference`` (``max_norm``: the
    gather + segment-op path of ``ops``). Returns the extra ``embedding_bag`` options."""
    if path != "reference":
        set_kernel(path == "kernel")
    return {"max_norm": 1.5} if path == "reference" else {}


@pytest.mark.parametrize("path", ["kernel", "gather", "reference"])
@pytest.mark.parametrize("mode,weighted,form,batched", VMAP_CASES,
                         ids=[f"{m}-{'w' if w else 'u'}-{f}-{b}" for m, w, f, b in VMAP_CASES])
def test_vmap_equals_loop(mode, weighted, form, batched, path, set_kernel):
    weights, ids, offs, segs, psw = _stacked_case(form)
    if not weighted:
        psw = None
    axes = AXES[batched]
    num_bags = 4 if form == "segments" else None
    options = dict(mode=mode, padding_idx=2, num_bags=num_bags, **_use_path(path, set_kernel))

    def f(w, i, o, s, p):
        return jaxbag.embedding_bag(w, i, o, segment_ids=s, per_sample_weights=p, **options)

    args = (weights, ids, offs, segs, psw)
    in_axes = tuple(None if a is None else ax for a, ax in zip(args, axes))
    unbatched = tuple(a if (a is None or ax == 0) else a[0] for a, ax in zip(args, in_axes))
    out = jax.jit(jax.vmap(f, in_axes=in_axes))(*unbatched)
    assert out.shape[0] == T
    jf = jax.jit(f)
    for t in range(T):
        a_t = tuple(a if (a is None or ax is None) else a[t] for a, ax in zip(unbatched, in_axes))
        loop = jf(*a_t)
        np.testing.assert_allclose(np.asarray(out[t]), np.asarray(loop), rtol=1e-5, atol=1e-6)
        ref = embedding_bag_ref(f64(a_t[0]), a_t[1], a_t[2], segment_ids=a_t[3], per_sample_weights=f64(a_t[4]),
                                **options)
        np.testing.assert_allclose(np.asarray(out[t]), ref, rtol=1e-5, atol=1e-5)


ILL_FORMED = {
    # (ids [T, N], offsets [T, K]): rows whose first offset is past 0 (ids before it are in no
    # bag), unsorted and out-of-range offsets (bag k starts at the k-th smallest offset in
    # [0, N]), repeated offsets (empty bags) and out-of-range ids
    "offsets": (
        [[0, 5, -1, 9, 3, 4, 6, 1], [2, 2, 7, 0, 1, 3, 5, 4], [1, 6, 3, 8, 0, 2, 2, 5]],
        [[2, 5, 5], [7, 0, 3], [0, 40, -3]],
    ),
    # (ids, segment ids): negative and past-num_bags segment ids, gaps (empty bags), and one row
    # of unsorted ids (each id counts in the bag its segment id names, as jax.ops.segment_sum)
    "segments": (
        [[0, 5, 1, 9, 3, 4, 6, 1], [2, 2, 7, 0, 1, 3, 5, 4], [1, 6, 3, -2, 0, 2, 2, 5]],
        [[-1, 0, 0, 2, 2, 3, 4, 4], [3, 0, 1, 0, -1, 3, 7, 1], [-3, -1, 1, 1, 3, 3, 3, 9]],
    ),
}


@pytest.mark.parametrize("mode,path", [(m, "kernel") for m in MODES] + [("mean", "gather"),
                                                                          ("max", "gather")])
@pytest.mark.parametrize("form,last", [("offsets", False), ("offsets", True), ("segments", False)])
def test_vmap_of_ill_formed_rows_equals_loop(form, last, mode, path, set_kernel):
    """vmap over the fast path is one call on all rows' bags (each row's bags, then one for its
    ids outside them): ids before a row's first offset, past its last one (include_last_offset)
    or of an out-of-range segment id must stay out of every bag, its own row's and the next
    one's; out-of-range ids and padding are skipped; the max arg-max (its gradient) is per row."""
    _use_path(path, set_kernel)
    ids, bounds = (jnp.asarray(np.array(a, np.int32)) for a in ILL_FORMED[form])
    weights = jnp.stack([table(seed=s) for s in range(T)])
    psw = None if mode == "max" else jnp.asarray(
        np.random.default_rng(1).uniform(0.5, 2.0, size=ids.shape).astype(np.float32))
    kw = dict(mode=mode, padding_idx=4)
    if form == "offsets":
        kw["include_last_offset"] = last
    else:
        kw["num_bags"] = 5

    def f(w, i, b, p):
        o, s = (b, None) if form == "offsets" else (None, b)
        return jaxbag.embedding_bag(w, i, o, segment_ids=s, per_sample_weights=p, **kw)

    cot = jnp.asarray(np.random.default_rng(2).normal(size=(T, *jax.eval_shape(
        f, weights[0], ids[0], bounds[0], None if psw is None else psw[0]).shape)).astype(np.float32))

    def loss(w, i, b, p, c):
        return jnp.sum(f(w, i, b, p) * c)

    argnums = (0, 3) if psw is not None else 0
    jf, jg = jax.jit(f), jax.jit(jax.grad(loss, argnums=argnums))
    for w_axis in (None, 0):  # one table for every row, or a table per row
        w = weights[0] if w_axis is None else weights
        in_axes = (w_axis, 0, 0, None if psw is None else 0)
        out = jax.jit(jax.vmap(f, in_axes=in_axes))(w, ids, bounds, psw)
        grads = jax.jit(jax.vmap(jax.grad(loss, argnums=argnums), in_axes=(*in_axes, 0)))(
            w, ids, bounds, psw, cot)
        for t in range(T):
            w_t = w if w_axis is None else w[t]
            p_t = None if psw is None else psw[t]
            # (eagerly such rows are errors: under jit they are regrouped and skipped)
            np.testing.assert_allclose(out[t], jf(w_t, ids[t], bounds[t], p_t),
                                       rtol=1e-6, atol=1e-6)
            # the reference reads offsets as given: pass them as the op reads them (sorted, the
            # out-of-range ones dropped, the missing bags empty at the end)
            o_t = np.asarray(bounds[t])
            o_t = np.sort(np.where((o_t >= 0) & (o_t <= ids.shape[1]), o_t, ids.shape[1]))
            ref = embedding_bag_ref(
                f64(w_t), np.asarray(ids[t]), o_t if form == "offsets" else None,
                segment_ids=np.asarray(bounds[t]) if form == "segments" else None,
                per_sample_weights=f64(p_t), **kw)
            np.testing.assert_allclose(out[t], ref, rtol=1e-5, atol=1e-5)
            g_t = jg(w_t, ids[t], bounds[t], p_t, cot[t])
            for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(g_t)):
                np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["kernel", "gather"])
def test_nested_vmap_equals_loop(path, set_kernel):
    _use_path(path, set_kernel)
    rng = np.random.default_rng(5)
    w = table()
    ids = jnp.asarray(rng.integers(-1, V + 1, size=(2, 3, 7)).astype(np.int32))
    offs = jnp.asarray(np.sort(rng.integers(0, 8, size=(2, 3, 3)), axis=-1).astype(np.int32))

    def f(i, o):
        return jaxbag.embedding_bag(w, i, o, mode="max", include_last_offset=True)

    out = jax.jit(jax.vmap(jax.vmap(f)))(ids, offs)
    f = jax.jit(f)
    for a in range(2):
        for b in range(3):
            np.testing.assert_allclose(out[a, b], f(ids[a, b], offs[a, b]),
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["kernel", "gather"])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_vmap_over_an_empty_batch(mode, path, set_kernel):
    """S = 0 rows: [0, B, D] bags and [0, V, D] per-example gradients, as a loop gives (the
    batching rule's reshape of the [0, ...] arg-max output failed)."""
    _use_path(path, set_kernel)
    w = table()

    def f(w, i, o):
        return jaxbag.embedding_bag(w, i, o, mode=mode)

    ids, offs = jnp.zeros((0, 4), jnp.int32), jnp.zeros((0, 2), jnp.int32)
    assert jax.jit(jax.vmap(f, in_axes=(None, 0, 0)))(w, ids, offs).shape == (0, 2, D)
    grads = jax.jit(jax.vmap(jax.grad(lambda w, i, o: jnp.sum(f(w, i, o))), in_axes=(None, 0, 0)))
    assert grads(w, ids, offs).shape == (0, V, D)
    tables = jnp.zeros((0, V, D), jnp.float32)
    assert jax.jit(jax.vmap(f))(tables, ids, offs).shape == (0, 2, D)


@pytest.mark.cpu_kernel
def test_vmap_of_the_kernel_is_one_call_not_a_loop():
    """vmap over the CPU kernel lowers to one kernel call on all rows' bags: JAX's default rule
    for an FFI call is a loop of one call per row (slower, and a loop cannot run over a batch
    axis split over an Explicit mesh axis)."""
    assert jaxbag.cpu_kernel_status()[0]
    ids = jnp.zeros((16, 2, 5), jnp.int32)
    f = jax.vmap(lambda i: jaxbag.embedding_bag(table(), i, mode="mean"))
    hlo = jax.jit(f).lower(ids).as_text()
    assert hlo.count("jaxbag_bag_fwd_f32") == 1, hlo
    assert "while" not in hlo, hlo


def test_vmap_of_grad_per_example_gradients():
    weights, ids, offs, _, psw = _stacked_case("offsets")
    cot = np.random.default_rng(3).normal(size=(4, D)).astype(np.float32)

    def loss(w, i, o, p):
        return jnp.sum(jaxbag.embedding_bag(w, i, o, mode="mean", per_sample_weights=p, padding_idx=0) * cot)

    dw, dp = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 3))))(weights, ids, offs, psw)
    for t in range(T):
        r_dw, r_dp = embedding_bag_ref_vjp(f64(weights[t]), ids[t], offs[t], cotangent=f64(cot), mode="mean",
                                           per_sample_weights=f64(psw[t]), padding_idx=0)
        np.testing.assert_allclose(np.asarray(dw[t]), r_dw, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dp[t]), r_dp, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# grad w.r.t. weight and per_sample_weights == the reference's analytic gradient.

OPTIONS = {
    "plain": {},
    "padding_neg": {"padding_idx": -2},
    "max_norm": {"max_norm": 0.9},
    "max_norm_l1": {"max_norm": 1.1, "norm_type": 1.0},
    "sgbf": {"scale_grad_by_freq": True},
    "sgbf_padding_max_norm": {"scale_grad_by_freq": True, "padding_idx": 1, "max_norm": 0.9},
    "trailing": {"include_last_offset": True},  # entries past the last offset: no gradient
}
# (option, form) pairs: every form plainly, each option on one or two forms.
OPTION_FORMS = [
    ("plain", "offsets"), ("plain", "2d"), ("plain", "segments"),
    ("padding_neg", "offsets"), ("padding_neg", "2d"),
    ("max_norm", "offsets"), ("max_norm", "segments"),
    ("max_norm_l1", "2d"),
    ("sgbf", "segments"),
    ("sgbf_padding_max_norm", "offsets"), ("sgbf_padding_max_norm", "2d"),
    ("trailing", "offsets"),
]


def _grad_case(form, trailing):
    ids = np.array([1, 4, 4, 2, 0, 1, 1, 5, 3, 3, 4], np.int32)
    if form == "2d":
        return ids[:8].reshape(2, 4), None, {}
    if form == "segments":
        seg = np.array([0, 0, 0, 1, 3, 3, 3, 3, 4, 4, 5], np.int32)  # bag 2 empty, 4 and 5 dropped
        return ids, None, {"segment_ids": seg, "num_bags": 4}
    if trailing:
        return ids, np.array([0, 3, 3, 4, 8], np.int32), {}  # entries 8.. ignored
    return ids, np.array([0, 3, 3, 4], np.int32), {}


GRAD_MODES = [("sum", False), ("sum", True), ("mean", False), ("mean", True), ("sqrtn", False), ("sqrtn", True),
              ("max", False)]


@pytest.mark.parametrize("path", ["kernel", "gather"])
@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
def test_linear_transpose_of_the_linearization_is_the_vjp(mode, path, set_kernel):
    """The op is linear in the table for these modes; as the README says, transposing the op
    itself raises (its custom_vmap wrapper has no transpose rule) and its linearization
    transposes to the vjp."""
    set_kernel(path == "kernel")
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    ids, offsets = jnp.array([0, 4, 4, 2, 5], jnp.int32), jnp.array([0, 2, 2], jnp.int32)
    ct = jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)

    def f(w_):
        return jaxbag.embedding_bag(w_, ids, offsets, mode=mode)

    with pytest.raises(NotImplementedError, match="custom_vmap_call"):
        jax.linear_transpose(f, w)(ct)
    (got,) = jax.linear_transpose(jax.linearize(f, w)[1], w)(ct)
    (want,) = jax.vjp(f, w)[1](ct)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.abs(np.asarray(got)).sum() > 0


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("option,form", OPTION_FORMS, ids=[f"{o}-{f}" for o, f in OPTION_FORMS])
@pytest.mark.parametrize("mode,weighted", GRAD_MODES, ids=[f"{m}-{'w' if w else 'u'}" for m, w in GRAD_MODES])
def test_grad_vs_reference(mode, weighted, form, option, jit):
    opts = dict(OPTIONS[option])
    if mode == "max" and opts.get("scale_grad_by_freq"):
        with pytest.raises(ValueError, match="scale_grad_by_freq"):
            jaxbag.embedding_bag(table(), np.zeros((2, 2), np.int32), mode="max", **opts)
        return
    ids, offs, extra = _grad_case(form, option == "trailing")
    weight = table(seed=5) * 1.5
    rng = np.random.default_rng(6)
    psw = jnp.asarray(rng.uniform(0.25, 2.0, size=ids.shape).astype(np.float32)) if weighted else None
    b = embedding_bag_ref(np.zeros((V, D)), ids, offs, **{k: v for k, v in {**opts, **extra}.items()
                                                          if k in ("include_last_offset", "segment_ids", "num_bags")}
                          ).shape[0]
    cot = jnp.asarray(rng.normal(size=(b, D)).astype(np.float32))

    def loss(w, p):
        out = jaxbag.embedding_bag(w, ids, offs, mode=mode, per_sample_weights=p, **opts, **extra)
        return jnp.sum(out * cot)

    grad = jax.grad(loss, argnums=(0, 1) if weighted else 0)
    if jit:
        grad = jax.jit(grad)
    got = grad(weight, psw)
    dw, dp = got if weighted else (got, None)
    r_dw, r_dp = embedding_bag_ref_vjp(f64(weight), ids, offs, cotangent=f64(cot), mode=mode,
                                       per_sample_weights=f64(psw), **opts, **extra)
    np.testing.assert_allclose(np.asarray(dw), r_dw, rtol=1e-5, atol=1e-5 * (1 + np.abs(r_dw).max()))
    if weighted:
        np.testing.assert_allclose(np.asarray(dp), r_dp, rtol=1e-5, atol=1e-5 * (1 + np.abs(r_dp).max()))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("mode", MODES)
def test_grad_low_precision(mode, dtype):
    ids, offs, _ = _grad_case("offsets", False)
    weight = table(seed=5, dtype=dtype)
    cot = np.random.default_rng(8).normal(size=(4, D)).astype(np.float32)

    def loss(w):
        return jnp.sum(jaxbag.embedding_bag(w, ids, offs, mode=mode).astype(jnp.float32) * cot)

    dw = jax.jit(jax.grad(loss))(weight)
    assert dw.dtype == weight.dtype
    r_dw, _ = embedding_bag_ref_vjp(f64(weight), ids, offs, cotangent=f64(cot), mode=mode)
    tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
    np.testing.assert_allclose(f64(dw), r_dw, rtol=tol, atol=tol * np.abs(r_dw).max())


@pytest.mark.parametrize("mode", MODES)
def test_bf16_table_gradient_accumulates_in_float32(mode):
    """300 one-id bags of the same row of a bf16 table: its gradient is 300 in every mode (the
    derivative rule gathers the tangent in float32, so its transpose sums in float32; summed in
    bf16 it stalls at 256, as it would if max mode's (row, column) gather cast after gathering)."""
    w = jnp.full((4, 2), 0.01, jnp.bfloat16)
    ids, seg = jnp.zeros((300,), jnp.int32), jnp.arange(300, dtype=jnp.int32)

    def loss(w):
        out = jaxbag.embedding_bag(w, ids, segment_ids=seg, num_bags=300, mode=mode)
        return jnp.sum(out.astype(jnp.float32))

    dw = jax.jit(jax.grad(loss))(w)
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dw, np.float32)[0], [300.0, 300.0])


TIE_PATHS = [("kernel", "float32"), ("xla", "float32"), ("max_norm", "float32"),
             ("xla", "bfloat16"), ("max_norm", "bfloat16")]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("form", ["offsets", "2d", "segments"])
@pytest.mark.parametrize("path,dtype", TIE_PATHS, ids=[f"{p}-{d}" for p, d in TIE_PATHS])
def test_max_grad_goes_to_first_occurrence_on_ties(path, dtype, form, jit, set_kernel):
    """On every path (the CPU kernel; the XLA formulation other platforms and narrow tables get;
    the max_norm path, whose norm bound here changes no row) and input form."""
    if path != "max_norm":
        set_kernel(path == "kernel")
    w = np.zeros((V, D), np.float32)
    w[1] = [5.0, 1.0, -1.0]
    w[2] = [5.0, 2.0, -1.0]  # ties with row 1 in features 0 and 2
    w[3] = [5.0, 0.0, -1.0]
    ids = np.array([2, 1, 1, 2, 3, 1], np.int32)
    offs = np.array([0, 2, 4], np.int32)  # bags [2 1] [1 2] [3 1]
    cot = np.array([[1.0, 10.0, 100.0], [2.0, 20.0, 200.0], [3.0, 30.0, 300.0]], np.float32)

    bags = {"offsets": (ids, offs, {}), "2d": (ids.reshape(3, 2), None, {}),
            "segments": (ids, None, dict(segment_ids=np.repeat(np.arange(3), 2), num_bags=3))}
    i, o, extra = bags[form]
    if path == "max_norm":
        extra = dict(extra, max_norm=1e9)

    def loss(weight):
        out = jaxbag.embedding_bag(weight, i, o, mode="max", **extra)
        return jnp.sum(out.astype(jnp.float32) * cot)

    g = jax.grad(loss)
    if jit:
        g = jax.jit(g)
    dw = g(jnp.asarray(w, dtype))
    assert dw.dtype == jnp.dtype(dtype)
    dw = np.asarray(dw, np.float32)
    expected = np.zeros((V, D))
    expected[2] += [1.0, 10.0, 100.0]  # bag 0: row 2 first in features 0, 2; row 2 max in feature 1
    expected[1] += [2.0, 0.0, 200.0]  # bag 1: row 1 first in features 0, 2
    expected[2] += [0.0, 20.0, 0.0]  # bag 1: row 2 max in feature 1
    expected[3] += [3.0, 0.0, 300.0]  # bag 2: row 3 first in features 0, 2
    expected[1] += [0.0, 30.0, 0.0]  # bag 2: row 1 max in feature 1
    np.testing.assert_array_equal(dw, expected)
    r_dw, _ = embedding_bag_ref_vjp(w, ids, offs, cotangent=cot, mode="max")
    np.testing.assert_array_equal(r_dw, expected)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", MODES)
def test_padding_row_and_empty_bags_get_no_gradient(mode, jit):
    ids = np.array([3, 0, 3, 3, 5], np.int32)
    offs = np.array([0, 0, 2, 4, 4], np.int32)  # bags [] [3 0] [3 3] [] [5]

    def loss(weight):
        return jnp.sum(jaxbag.embedding_bag(weight, ids, offs, mode=mode, padding_idx=3) ** 2 + 1.0)

    g = jax.grad(loss)
    if jit:
        g = jax.jit(g)
    dw = np.asarray(g(table()))
    assert np.all(dw[3] == 0.0), dw
    assert np.all(dw[[1, 2, 4]] == 0.0), dw
    assert np.all(dw[0] != 0.0) and np.all(dw[5] != 0.0), dw
    assert np.all(np.isfinite(dw))


# ------------------------------------------------------------------------------------------------
# jax.test_util.check_grads (numerical vs automatic, reverse and forward mode).


CHECK_GRADS_CASES = [(m, w, "offsets") for m, w in GRAD_MODES] + [
    ("mean", True, "segments"), ("sqrtn", True, "2d"), ("max", False, "2d"), ("sum", False, "segments")]


@pytest.mark.parametrize("mode,weighted,form", CHECK_GRADS_CASES,
                         ids=[f"{m}-{'w' if w else 'u'}-{f}" for m, w, f in CHECK_GRADS_CASES])
def test_check_grads(mode, weighted, form):
    ids, offs, extra = _grad_case(form, False)
    # Values at least 0.1 apart in every column, so that eps = 1e-2 never crosses a max tie.
    perm = np.random.default_rng(9).permutation(V * D).reshape(V, D)
    weight = jnp.asarray((perm * 0.1 - 0.8).astype(np.float32))
    psw = jnp.asarray(np.random.default_rng(4).uniform(0.5, 1.5, size=ids.shape).astype(np.float32))

    if weighted:
        def f(w, p):
            return jaxbag.embedding_bag(w, ids, offs, mode=mode, per_sample_weights=p, padding_idx=1, **extra)

        args = (weight, psw)
    else:
        def f(w):
            return jaxbag.embedding_bag(w, ids, offs, mode=mode, padding_idx=1, **extra)

        args = (weight,)
    check_grads(f, args, order=1, modes=["rev", "fwd"], eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", ["kernel", "xla", "reference"])
@pytest.mark.parametrize("mode, psw", [
    ("mean", [0.1, 0.2, -0.3]),   # sums to exactly 0 in float32 (not in float64)
    ("sqrtn", [1e-23] * 3),       # squares underflow to 0 in float32
    ("sqrtn", [0.0] * 3),
])
def test_zero_float32_divisor_gives_zeros_and_zero_gradients_on_every_path(mode, psw, impl,
                                                                          set_kernel):
    """The CPU kernel summed a weighted bag's divisor in float64 while the XLA formulation and
    the gradient rule sum it in float32: weights summing to 0 in float32 gave a huge bag
    (5.4e7) whose gradient was 0. The XLA formulation's sqrtn gave NaN weight gradients when the
    squares summed to 0. Now both give the zero-divisor rule's zeros, value and gradients. (The
    reference formulation, which max_norm takes, differentiates its divisor: sqrt's infinite
    derivative at 0 must not reach the weights.)"""
    set_kernel(impl == "kernel")
    w = jnp.array([[1.0], [2.0], [3.0]], jnp.float32)
    ids, offsets, p = jnp.array([0, 1, 2]), jnp.array([0]), jnp.array(psw, jnp.float32)
    extra = {"max_norm": 100.0} if impl == "reference" else {}  # (no row is renormed)

    def f(w, p):
        return jaxbag.embedding_bag(w, ids, offsets, mode=mode, per_sample_weights=p, **extra)

    for fn in (f, jax.jit(f)):
        out = fn(w, p)
        np.testing.assert_array_equal(out, np.zeros((1, 1), np.float32))
        dw, dp = jax.grad(lambda w, p: fn(w, p).sum(), (0, 1))(w, p)
        np.testing.assert_array_equal(dw, np.zeros_like(w))
        np.testing.assert_array_equal(dp, np.zeros_like(p))


# (the CPU kernel takes float32 tables only)
ZERO_DIVISOR_PATHS = [("kernel", "float32")] + [
    (path, dtype) for path in ("gather", "stream", "xla") for dtype in ("float32", "float16", "bfloat16")
]


@pytest.mark.parametrize("path,dtype", ZERO_DIVISOR_PATHS,
                         ids=[f"{p}-{d}" for p, d in ZERO_DIVISOR_PATHS])
@pytest.mark.parametrize("mode", ["mean", "sqrtn"])
def test_zero_divisor_gives_positive_zeros_on_every_path(mode, path, dtype, set_kernel):
    """A bag whose divisor is 0 is +0.0, value and tangents, as an empty bag, on every path. The
    stream loop and the gather formulation (non-float32 tables, other platforms) multiplied the
    bag's sum by a zero scale, so a negative sum gave -0.0 where the kernel gave +0.0."""
    from jaxbag._src import fast_forward
    from jaxbag._src.ops import embedding_bag_xla

    set_kernel(path == "kernel")
    w = jnp.array([[-1.0, -2.0], [3.0, -4.0]], dtype)
    ids, offsets = jnp.array([0, 1, 0]), jnp.array([0, 2])
    # bag 0 sums to [-4, 2] with a zero divisor; bag 1's only weight is 0 (a -0.0 product)
    p = jnp.array([1.0, -1.0, 0.0] if mode == "mean" else [0.0, 0.0, -0.0], dtype)

    def f(w, p):
        kw = dict(mode=mode, per_sample_weights=p)
        if path == "xla":
            return embedding_bag_xla(w, ids, offsets, **kw)
        if path == "stream":
            return fast_forward.bag_reduce(w, ids, offsets=offsets, impl="stream", **kw)
        return jaxbag.embedding_bag(w, ids, offsets, **kw)

    results = {
        "eager": f(w, p),
        "jit": jax.jit(f)(w, p),
        "vmap": jax.vmap(f, (0, None))(w[None], p)[0],
        "jvp table": jax.jvp(lambda w: f(w, p), (w,), (-w,))[1],
        "jvp weights": jax.jvp(lambda q: f(w, q), (p,), (jnp.ones_like(p),))[1],
    }
    for name, out in results.items():
        out = np.asarray(out, np.float32)
        np.testing.assert_array_equal(out, np.zeros((2, 2), np.float32), err_msg=name)
        assert not np.signbit(out).any(), (name, out.tolist())


@pytest.mark.parametrize("mode", ["mean", "sqrtn"])
def test_tiny_weights_get_finite_gradients_on_the_reference_path(mode):
    """The reference formulation (used for max_norm, scale_grad_by_freq and inside the sharded
    ops) differentiated sums / den as -sums / den**2, which overflows: weights of 1e-30 in a mean
    gave -inf weight gradients where the true ones are about +-3.3e29 (the kernel path's)."""
    from jaxbag._src.ops import embedding_bag_xla

    w = jnp.array([[1.0], [2.0], [3.0]], jnp.float32)
    ids, offsets = jnp.array([0, 1, 2]), jnp.array([0])
    scale = 1e-30 if mode == "mean" else 1e-15
    p = jnp.array([1.0, 1.0, 1.0], jnp.float32) * scale
    grads = {}
    for name, fn in (("xla", embedding_bag_xla), ("dispatched", jaxbag.embedding_bag)):
        grads[name] = jax.grad(lambda p, fn=fn: fn(w, ids, offsets, mode=mode,
                                                   per_sample_weights=p).sum())(p)
        assert np.isfinite(np.asarray(grads[name])).all(), (name, grads[name])
    # d/dp_i of sum_j p_j x_j / den(p): (x_i - out) / sum(p) (mean), x_i / |p| - out p_i / |p|^2
    p64, x = np.full(3, scale), np.array([1.0, 2.0, 3.0])
    den = p64.sum() if mode == "mean" else np.sqrt((p64**2).sum())
    out = (p64 * x).sum() / den
    want = (x - out) / den if mode == "mean" else x / den - out * p64 / den**2
    for name, g in grads.items():
        np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-5, atol=1e-6 * abs(want).max(),
                                   err_msg=name)


def test_max_norm_derivatives_are_torchs_in_every_autodiff_mode():
    """max_norm's rescaling is not differentiated (torch renorms in place, outside autograd): grad,
    jvp and the Hessian all pass the renormed rows' derivative to the table unscaled. The true
    derivative of the renormed lookup comes from differentiating through jaxbag.renorm:
    for a row w of norm 5 > max_norm = 1, d(w / |w|) = (I - u u^T) / |w|, u = w / |w|."""
    ids, offsets = jnp.array([0]), jnp.array([0])
    w = jnp.array([[3.0, 4.0]])
    tangent = jnp.array([[1.0, 0.0]])

    def f(w_):
        return jaxbag.embedding_bag(w_, ids, offsets, mode="sum", max_norm=1.0)

    value, jvp = jax.jvp(f, (w,), (tangent,))
    np.testing.assert_allclose(value, [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(jvp, [[1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda w_: f(w_)[0, 0])(w), [[1.0, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(jax.hessian(lambda w_: f(w_)[0, 0])(w), np.zeros((1, 2, 1, 2)))

    def true_f(w_):
        return jaxbag.embedding_bag(jaxbag.renorm(w_, ids, 1.0), ids, offsets, mode="sum")

    np.testing.assert_allclose(jax.jvp(true_f, (w,), (tangent,))[1], [[0.128, -0.096]], rtol=1e-5)
