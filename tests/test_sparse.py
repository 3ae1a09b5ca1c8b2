"""Sparse row gradients and row-wise optimisers (jaxbag._src.sparse) against independent references:
numpy, dense ``jax.grad`` + optax, and live torch (``sparse=True`` + ``torch.optim.SparseAdam``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import jaxbag
from jaxbag._src import sparse, sparse_kernels

V, D = 23, 5


@pytest.fixture(params=["kernel", "xla"])
def path(request, set_kernel):
    """Runs a test on the CPU-kernel path and again on the pure-XLA path (kernel switched off)."""
    set_kernel(request.param == "kernel")
    return request.param


def _batch(rng, n_bags=4, max_len=6, v=V, pad=None, n_ids=None):
    """Random bags (some empty); with ``n_ids`` the total id count is fixed (one jit compile)."""
    if n_ids is None:
        lens = rng.integers(0, max_len, n_bags)
    else:
        cuts = np.sort(rng.integers(0, n_ids + 1, n_bags - 1))
        lens = np.diff(np.concatenate([[0], cuts, [n_ids]]))
    ids = rng.integers(0, v, int(lens.sum())).astype(np.int32)
    if pad is not None and ids.size:
        ids[rng.random(ids.size) < 0.3] = pad
    offsets = (np.cumsum(lens) - lens).astype(np.int32)
    return ids, offsets


# ---- unique_rows --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 40, 200])
def test_unique_rows_matches_numpy(path, n):
    # size=None gives U = min(N, V) slots: N = 10 < V, and N = 40, 200 > V (at 200 every row of
    # the table is present, so all U = V slots are used).
    rng = np.random.default_rng(n)
    ids = rng.integers(-3, V + 3, n).astype(np.int32)
    valid = rng.random(n) < 0.8
    rows, inv = jax.jit(lambda i, m: sparse.unique_rows(i, V, valid=m))(ids, valid)
    rows, inv = np.asarray(rows), np.asarray(inv)
    keep = valid & (ids >= 0) & (ids < V)
    expect = np.unique(ids[keep])
    u = min(n, V)
    assert rows.shape == (u,)
    if n == 200:
        assert expect.size == V
    np.testing.assert_array_equal(rows[: expect.size], expect)
    assert (rows[expect.size :] == V).all()
    np.testing.assert_array_equal(inv[~keep], u)
    np.testing.assert_array_equal(rows[inv[keep]], ids[keep])


def test_unique_rows_small_size_and_2d_shape(path):
    ids = jnp.array([[5, 1, 5], [9, 1, 7]])
    rows, inv = sparse.unique_rows(ids, 10, size=2)
    assert rows.tolist() == [1, 5]
    # 7 and 9 did not fit in the two slots: they are skipped (slot U = 2).
    assert inv.tolist() == [[1, 0, 1], [2, 0, 2]]


def test_unique_rows_rejects_bad_size():
    with pytest.raises(ValueError, match="size"):
        sparse.unique_rows(jnp.array([1, 2]), 5, size=0)


# ---- embedding_bag_rows -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,use_psw,pad,extra",
    [("sum", False, None, {}), ("mean", False, 2, {}), ("max", False, None, {}),
     ("sqrtn", True, None, {}), ("sum", True, 0, {}), ("mean", True, None, {}),
     # the general path (bag op on the gathered rows, vjp):
     ("mean", False, 2, {"max_norm": 1.5}), ("sum", False, None, {"scale_grad_by_freq": True})],
)
def test_row_grads_equal_dense_grad(mode, use_psw, pad, extra, path):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    ids, offsets = _batch(rng, n_bags=5, pad=pad)
    psw = jnp.asarray(rng.random(ids.size) + 0.5, jnp.float32) if use_psw else None
    ct = jnp.asarray(rng.standard_normal((5, D)), jnp.float32)
    kw = dict(mode=mode, per_sample_weights=psw, padding_idx=pad, **extra)

    bags, pullback = sparse.embedding_bag_rows(w, ids, offsets, **kw)
    dense_bags = jaxbag.embedding_bag(w, ids, offsets, **kw)
    np.testing.assert_allclose(bags, dense_bags, rtol=1e-6, atol=1e-6)

    rg = pullback(ct)
    dense = jax.grad(lambda w_: jnp.sum(jaxbag.embedding_bag(w_, ids, offsets, **kw) * ct))(w)
    scattered = np.zeros((V + 1, D), np.float32)
    np.add.at(scattered, np.asarray(rg.rows), np.asarray(rg.grads))
    np.testing.assert_allclose(scattered[:V], dense, rtol=1e-5, atol=1e-6)
    rows = np.asarray(rg.rows)
    real = rows[rows < V]
    assert len(set(real.tolist())) == real.size  # distinct
    if pad is not None:
        assert pad not in real.tolist()


@pytest.mark.parametrize("distinct", [None, 300])
@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "max"])
def test_row_grads_of_a_large_batch_match_numpy(mode, distinct, path):
    """Large enough (N * D >= 2**18) for the kernel to split the row gradients over the thread
    pool by slot ranges; against a float64 NumPy scatter of the bag cotangents. With 300
    distinct ids most of the U = min(N, V) = 3000 slots are unused (zeroed apart)."""
    rng = np.random.default_rng(7)
    v, d, b = 3000, 64, 512
    w = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
    ids, offsets = _batch(rng, n_bags=b, v=v, pad=5, n_ids=8192)
    if distinct is not None:
        ids = ids % distinct
    psw = None if mode == "max" else rng.random(ids.size).astype(np.float32) + 0.5
    ct = rng.standard_normal((b, d)).astype(np.float32)
    kw = dict(mode=mode, padding_idx=5, per_sample_weights=None if psw is None else jnp.asarray(psw))
    rg = jax.jit(lambda w_, i, o, g: sparse.embedding_bag_rows(w_, i, o, **kw)[1](g))(
        w, ids, offsets, ct)
    seg = np.repeat(np.arange(b), np.diff(np.append(offsets, ids.size)))
    want = np.zeros((v + 1, d))
    if mode == "max":  # the cotangent goes to the first position holding each column's max
        table = np.asarray(w, np.float64)
        for bag in range(b):
            pos = np.flatnonzero((seg == bag) & (ids != 5))
            if pos.size:
                first = pos[np.argmax(table[ids[pos]], axis=0)]
                np.add.at(want, (ids[first], np.arange(d)), ct[bag])
    else:
        c = np.where(ids == 5, 0.0, psw.astype(np.float64))
        den = np.bincount(seg, c if mode == "mean" else c ** 2, minlength=b)
        den = den if mode == "mean" else np.sqrt(den)
        coef = c / np.where(den == 0, 1.0, den)[seg] if mode != "sum" else c
        np.add.at(want, ids, coef[:, None] * ct[seg])
    rows = np.asarray(rg.rows)
    assert rows.shape == (min(ids.size, v),)
    got = np.zeros((v + 1, d))
    np.add.at(got, rows, np.asarray(rg.grads, np.float64))
    np.testing.assert_allclose(got[:v], want[:v], rtol=1e-5, atol=1e-5)
    touched = set(ids[ids != 5].tolist())
    assert set(rows[rows < v].tolist()) == touched
    np.testing.assert_array_equal(np.asarray(rg.grads)[rows == v], 0.0)  # unused slots: zeros


def test_row_grads_2d_indices_under_jit():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, (3, 4)), jnp.int32)
    ct = jnp.asarray(rng.standard_normal((3, D)), jnp.float32)

    @jax.jit
    def f(w_, i):
        bags, pb = sparse.embedding_bag_rows(w_, i, mode="sum", size=8)
        return bags, pb(ct)

    bags, rg = f(w, ids)
    np.testing.assert_allclose(bags, np.asarray(w)[np.asarray(ids)].sum(1), rtol=1e-6, atol=1e-6)
    dense = np.zeros((V + 1, D), np.float32)
    np.add.at(dense, np.asarray(rg.rows), np.asarray(rg.grads))
    expect = np.zeros((V, D), np.float32)
    np.add.at(expect, np.asarray(ids).reshape(-1), np.repeat(np.asarray(ct), 4, axis=0))
    np.testing.assert_allclose(dense[:V], expect, rtol=1e-6, atol=1e-6)


# ---- optimisers ---------------------------------------------------------------------------------


def _mse_step_sparse(opt, mode="sum"):
    @jax.jit
    def step(w, state, ids, offsets, y):
        bags, pb = sparse.embedding_bag_rows(w, ids, offsets, mode=mode)
        g = jax.grad(lambda b: jnp.mean((b - y) ** 2))(bags)
        return opt.update(w, state, pb(g))

    return step


def test_sparse_sgd_equals_dense_sgd(path):
    rng = np.random.default_rng(3)
    w0 = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    opt = sparse.sparse_sgd(0.3)
    dense_opt = optax.sgd(0.3)
    step = _mse_step_sparse(opt, "mean")

    @jax.jit
    def dense_step(w_, s_, ids, offsets, y):
        def loss(x):
            return jnp.mean((jaxbag.embedding_bag(x, ids, offsets, mode="mean") - y) ** 2)

        upd, s_ = dense_opt.update(jax.grad(loss)(w_), s_, w_)
        return optax.apply_updates(w_, upd), s_

    w_s, st = w0, opt.init(w0)
    w_d, st_d = w0, dense_opt.init(w0)
    for _ in range(4):
        ids, offsets = _batch(rng, n_bags=4, n_ids=10)
        y = jnp.asarray(rng.standard_normal((4, D)), jnp.float32)
        w_s, st = step(w_s, st, ids, offsets, y)
        w_d, st_d = dense_step(w_d, st_d, ids, offsets, y)
    assert int(st.count) == 4
    assert not np.allclose(w_s, w0)
    np.testing.assert_allclose(w_s, w_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,pad,chunk", [("sum", None, 256), ("mean", 1, 2)])
def test_sparse_adam_equals_torch_sparse_adam(mode, pad, chunk, path):
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    lr, b1, b2, eps = 0.05, 0.8, 0.95, 1e-6

    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.SparseAdam([tw], lr=lr, betas=(b1, b2), eps=eps)
    opt = sparse.sparse_adam(lr, b1, b2, eps, chunk=chunk)  # chunk=2: several scan steps
    step = _mse_step_sparse_pad(opt, mode, pad)
    w, st = jnp.asarray(w0), opt.init(jnp.asarray(w0))
    for i in range(5):
        # Small batches of a 23-row table: rows come and go, so laziness and the global step matter.
        ids, offsets = _batch(rng, n_bags=3, pad=pad, n_ids=7)
        y = rng.standard_normal((3, D)).astype(np.float32)
        topt.zero_grad()
        out = F.embedding_bag(torch.from_numpy(ids.astype(np.int64)), tw,
                              torch.from_numpy(offsets.astype(np.int64)), mode=mode, sparse=True,
                              padding_idx=pad)
        torch.mean((out - torch.from_numpy(y)) ** 2).backward()
        topt.step()
        w, st = step(w, st, ids, offsets, y)
        np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {i}")
    mu_t = topt.state[tw]["exp_avg"].numpy()
    np.testing.assert_allclose(st.mu, mu_t, rtol=1e-5, atol=1e-7)
    assert int(st.count) == 5
    assert not np.allclose(w, w0)


@pytest.mark.parametrize("form", ["segment_ids", "last_offset", "max_norm"])
def test_ids_outside_every_bag_are_not_touched(form, path):
    """Padding positions (segment id >= B as jaxbag.pack_bags writes them, or entries past the last
    offset) hold a real id (pack_bags writes 0); lazy Adam must not treat that row as touched. Row 0
    gets momentum in step 1, then appears only as padding: torch's SparseAdam leaves it alone."""
    rng = np.random.default_rng(11)
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    lr = 0.05
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.SparseAdam([tw], lr=lr)
    opt = sparse.sparse_adam(lr)
    extra = {"max_norm": 100.0} if form == "max_norm" else {}  # the vjp path (_rows_local)

    @jax.jit
    def step(w, state, packed, y):
        if form == "last_offset":
            bags, pb = sparse.embedding_bag_rows(w, packed.indices, packed.offsets, mode="sum",
                                                 include_last_offset=True, **extra)
        else:
            bags, pb = sparse.embedding_bag_rows(w, packed.indices, segment_ids=packed.segment_ids,
                                                 num_bags=packed.num_bags, mode="sum", **extra)
        g = jax.grad(lambda b: jnp.sum((b - y) ** 2))(bags)
        return opt.update(w, state, pb(g)), pb(g).rows

    w, st = jnp.asarray(w0), opt.init(jnp.asarray(w0))
    batches = [[[0, 5], [7]], [[3, 4, 3], [9]], [[12], [5, 6]]]  # row 0 only in the first
    for i, bags in enumerate(batches):
        packed = jaxbag.pack_bags(bags, batch_size=3, bucket_sizes=[16])  # 10+ padding ids of row 0
        assert (packed.indices[packed.segment_ids == 3] == 0).all()
        y = rng.standard_normal((3, D)).astype(np.float32)
        flat = np.concatenate([np.asarray(b) for b in bags]).astype(np.int64)
        offsets = np.cumsum([0] + [len(b) for b in bags[:-1]])
        topt.zero_grad()
        out = F.embedding_bag(torch.from_numpy(flat), tw, torch.from_numpy(offsets), mode="sum",
                              sparse=True)
        torch.sum((out - torch.from_numpy(y[:2])) ** 2).backward()
        topt.step()
        (w, st), rows = step(w, st, packed, y)
        touched = np.asarray(rows)[np.asarray(rows) < V]
        np.testing.assert_array_equal(touched, np.unique(flat), err_msg=f"step {i}")
        np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {i}")
    assert not np.allclose(w[0], w0[0])  # row 0 moved once (step 1), then stayed
    np.testing.assert_allclose(st.mu[0], topt.state[tw]["exp_avg"].numpy()[0], rtol=1e-6)


def _mse_step_sparse_pad(opt, mode, pad):
    @jax.jit
    def step(w, state, ids, offsets, y):
        bags, pb = sparse.embedding_bag_rows(w, ids, offsets, mode=mode, padding_idx=pad)
        g = jax.grad(lambda b: jnp.mean((b - y) ** 2))(bags)
        return opt.update(w, state, pb(g))

    return step


@pytest.mark.parametrize("chunk", [256, 3])
def test_sparse_adagrad_matches_numpy_rowwise_reference(chunk, path):
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    lr, eps, init_acc = 0.1, 1e-3, 0.05
    opt = sparse.sparse_adagrad(lr, eps=eps, initial_accumulator_value=init_acc, chunk=chunk)
    w, st = jnp.asarray(w0), opt.init(jnp.asarray(w0))
    ref_w, ref_acc = w0.astype(np.float64), np.full(V, init_acc)
    for _ in range(4):
        rows = np.sort(rng.choice(V, 6, replace=False)).astype(np.int32)
        g = rng.standard_normal((6, D)).astype(np.float32)
        rows_padded = np.concatenate([rows, [V, V]]).astype(np.int32)  # two fill slots
        g_padded = np.concatenate([g, np.ones((2, D), np.float32)])
        w, st = opt.update(w, st, sparse.RowGrads(jnp.asarray(rows_padded), jnp.asarray(g_padded)))
        for r, gr in zip(rows, g.astype(np.float64)):
            ref_acc[r] += np.mean(gr**2)
            ref_w[r] -= lr * gr / (np.sqrt(ref_acc[r]) + eps)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.sum_sq, ref_acc, rtol=1e-5)
    assert st.sum_sq.shape == (V,)


def test_learning_rate_schedule_and_bf16_table():
    rng = np.random.default_rng(6)
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    sched = optax.linear_schedule(0.5, 0.1, 3)
    rows = jnp.array([2, 7, V], jnp.int32)
    g = jnp.asarray(rng.standard_normal((3, D)), jnp.float32)
    opt = sparse.sparse_sgd(sched)
    w = jnp.asarray(w0, jnp.bfloat16)
    st = opt.init(w)
    ref = w0.astype(np.float64)
    for k in range(3):
        w, st = opt.update(w, st, sparse.RowGrads(rows, g))
        ref[[2, 7]] -= float(sched(k)) * np.asarray(g[:2], np.float64)
        ref = ref.astype(np.float32).astype(jnp.bfloat16).astype(np.float64)  # bf16 storage
    assert w.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(w, np.float32), ref, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(w, np.float32)[0], np.asarray(jnp.asarray(w0[0], jnp.bfloat16), np.float32))


def test_update_rejects_mismatched_row_grads():
    opt = sparse.sparse_adam()
    w = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="row_grads"):
        opt.update(w, opt.init(w), sparse.RowGrads(jnp.array([0, 1]), jnp.zeros((2, 5))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_update_rejects_repeated_rows_eagerly(name, dtype, path):
    """Two lookups' row gradients concatenated repeated row 1: the fused CPU kernel applied both
    gradients, XLA's scatter (then bfloat16's only path) one of them, with no word. Out-of-range
    rows (fill slots) may repeat."""
    opt = {"sgd": sparse.sparse_sgd(1.0), "adagrad": sparse.sparse_adagrad(1.0),
           "adam": sparse.sparse_adam(1.0)}[name]
    w = jnp.zeros((4, 2), dtype)
    rg = sparse.RowGrads(jnp.array([1, 3, 1], jnp.int32), jnp.ones((3, 2), jnp.float32))
    with pytest.raises(ValueError, match=r"row_grads\.rows must be distinct; row 1 is at positions "
                       r"\[0, 2\] .*Look the ids up in one embedding_bag_rows call"):
        opt.update(w, opt.init(w), rg)
    fill = sparse.RowGrads(jnp.array([1, 4, 4, -1, -1], jnp.int32), jnp.ones((5, 2), jnp.float32))
    new, _ = opt.update(w, opt.init(w), fill)
    assert np.flatnonzero(np.asarray(new, np.float32).any(axis=1)).tolist() == [1]


def test_update_rejects_another_optimisers_state():
    """Another optimiser's state is a TypeError naming both states, not an AttributeError."""
    w = jnp.zeros((4, 3))
    rg = sparse.RowGrads(jnp.array([0, 1]), jnp.ones((2, 3)))
    with pytest.raises(TypeError, match=r"state must be the LazyAdamState that "
                                        r"jaxbag.sparse_adam\(...\).init\(table\) returns; got SgdState"):
        sparse.sparse_adam().update(w, sparse.sparse_sgd(0.1).init(w), rg)
    with pytest.raises(TypeError, match="RowwiseAdagradState.*got LazyAdamState"):
        sparse.sparse_adagrad().update(w, sparse.sparse_adam().init(w), rg)
    with pytest.raises(TypeError, match="SgdState.*got tuple"):
        sparse.sparse_sgd(0.1).update(w, (), rg)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("make_opt, field", [(sparse.sparse_adam, "mu"),
                                             (sparse.sparse_adagrad, "sum_sq")])
def test_update_rejects_a_state_made_for_another_table(make_opt, field, jit):
    """A state made for a smaller table reached the fused CPU kernel, which read and wrote the
    moments at the table's row offsets: a segfault, or silent out-of-bounds writes under jit; the
    XLA fallback (kernel off) silently took the missing moments as zeros."""
    opt = make_opt(0.1)
    update = jax.jit(opt.update) if jit else opt.update
    table = jnp.ones((1000, 4))
    rg = sparse.RowGrads(jnp.array([500, 999]), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=rf"state.{field} has shape \(10, ?4?\).*for a table of "
                                         r"shape \(1000, 4\).*init\(table\)"):
        update(table, opt.init(jnp.zeros((10, 4))), rg)
    # moments kept in another float dtype (bf16, to save memory) are this table's: accepted
    state = opt.init(table)
    bf16 = state._replace(**{field: getattr(state, field).astype(jnp.bfloat16)})
    new_table, new_state = update(table, bf16, rg)
    want_table, _ = opt.update(table, state, rg)
    np.testing.assert_allclose(new_table, want_table, rtol=1e-2)
    assert getattr(new_state, field).dtype == jnp.bfloat16


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("make_opt, field", [(sparse.sparse_adam, "mu"),
                                             (sparse.sparse_adam, "nu"),
                                             (sparse.sparse_adagrad, "sum_sq")])
def test_update_rejects_moments_of_an_integer_dtype(make_opt, field, jit):
    """int32 moments were accepted on both paths: each step rounded them back to 0, so Adam took
    the first step's size every step (-0.238 after 3 steps instead of -0.3), with no error."""
    opt = make_opt(0.1)
    update = jax.jit(opt.update) if jit else opt.update
    table = jnp.zeros((4, 2))
    state = opt.init(table)
    bad = state._replace(**{field: getattr(state, field).astype(jnp.int32)})
    rg = sparse.RowGrads(jnp.array([1]), jnp.array([[0.5, -0.5]]))
    with pytest.raises(TypeError, match=rf"state\.{field} has dtype int32; it must be a float dtype "
                                        rf"\(float32 as jaxbag\.{make_opt.__name__}\(\.\.\.\)"
                                        rf"\.init\(table\) makes it"):
        update(table, bad, rg)


@pytest.mark.cpu_kernel
def test_adam_kernel_refuses_moments_of_the_wrong_size():
    """The kernel itself checks the moments' size (the update's check comes first; this is the
    second line of defence for any other caller)."""
    ok, why = jaxbag.cpu_kernel_status()
    assert ok, why
    table, small = jnp.ones((1000, 4)), jnp.zeros((10, 4))
    hyper = tuple(jnp.float32(x) for x in (0.1, 0.9, 0.1, 0.999, 0.001, 1e-8))
    with pytest.raises(Exception, match="jaxbag sparse_adam: bad shapes"):
        jax.block_until_ready(sparse_kernels.fused_row_update(
            "adam", (table, small, small), jnp.array([999], jnp.int32), jnp.ones((1, 4)), hyper,
            lambda *a: pytest.fail("the kernel path was not taken")))


# ---- memory: no [V, D] gradient, table updated in place ----------------------------------------


@pytest.mark.parametrize("make_opt", [sparse.sparse_sgd, sparse.sparse_adagrad, sparse.sparse_adam])
def test_train_step_never_allocates_a_dense_gradient(make_opt, path):
    big_v, d, n, b = 1 << 20, 64, 4096, 256
    opt = make_opt(0.01)

    def step(w, state, ids, offsets, y):
        bags, pb = sparse.embedding_bag_rows(w, ids, offsets, mode="sum")
        g = jax.grad(lambda x: jnp.mean((x - y) ** 2))(bags)
        return opt.update(w, state, pb(g))

    w_spec = jax.ShapeDtypeStruct((big_v, d), jnp.float32)
    state_spec = jax.eval_shape(opt.init, w_spec)
    args = (w_spec, state_spec, jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, d), jnp.float32))
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    mem = compiled.memory_analysis()
    table_bytes = big_v * d * 4
    assert mem.temp_size_in_bytes < table_bytes // 20, mem
    # Donation: the table and the state come back in the input buffers (in-place update).
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state_spec))
    assert mem.alias_size_in_bytes >= table_bytes + state_bytes - 64, mem

    # The dense alternative does allocate (at least) a [V, D] gradient: the check above can fail.
    def dense_step(w, ids, offsets, y):
        g = jax.grad(lambda w_: jnp.mean((jaxbag.embedding_bag(w_, ids, offsets, mode="sum") - y) ** 2))(w)
        return w - 0.01 * g

    dense = jax.jit(dense_step, donate_argnums=0).lower(w_spec, *args[2:]).compile()
    dm = dense.memory_analysis()
    assert dm.temp_size_in_bytes + dm.output_size_in_bytes - dm.alias_size_in_bytes >= table_bytes


def _bf16_step_memory(make_opt, table_dtype, state_dtype, big_v=1 << 18, d=64, n=4096):
    """The compiled memory analysis of a donated update of a ``[big_v, d]`` table, and the
    bytes of its bfloat16 arrays."""
    opt = make_opt(0.01)
    w_spec = jax.ShapeDtypeStruct((big_v, d), table_dtype)
    state_spec = jax.tree.map(lambda x: x.update(dtype=state_dtype) if x.ndim else x,
                              jax.eval_shape(opt.init, w_spec))
    args = (w_spec, state_spec, jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct((n, d), jnp.float32))
    step = jax.jit(lambda w, s, r, g: opt.update(w, s, sparse.RowGrads(r, g)), donate_argnums=(0, 1))
    bf16_bytes = sum(x.size * 2 for x in jax.tree.leaves((w_spec, state_spec))
                     if x.dtype == jnp.bfloat16)
    return step.lower(*args).compile().memory_analysis(), bf16_bytes


_BF16_CASES = [  # (optimizer, table dtype, state dtype): SGD has no state to cast
    (name, table, state) for name in ("sgd", "adagrad", "adam")
    for table, state in (("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16"))
    if name != "sgd" or state == "float32"]


@pytest.mark.parametrize("name, table_dtype, state_dtype", _BF16_CASES)
def test_bf16_updates_cost_the_rows_touched(name, table_dtype, state_dtype, set_kernel):
    """XLA:CPU scatters into a bfloat16 array by converting all of it to float32 and back: a step
    on a bfloat16 table (or bfloat16 moments) cost O(V D) (81 ms at V = 1M, D = 64, 512 rows;
    float32: 0.04 ms). The kernel has bfloat16 variants that touch the rows only."""
    make_opt = getattr(sparse, f"sparse_{name}")
    set_kernel(True)
    mem, bf16_bytes = _bf16_step_memory(make_opt, table_dtype, state_dtype)
    assert mem.temp_size_in_bytes < bf16_bytes // 20, mem
    set_kernel(False)  # the XLA path does convert the whole arrays: the check above can fail
    mem, bf16_bytes = _bf16_step_memory(make_opt, table_dtype, state_dtype)
    assert mem.temp_size_in_bytes >= bf16_bytes, mem


def _bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (nearest, ties to even), back in float64."""
    return np.asarray(jnp.asarray(np.asarray(x, np.float32), jnp.bfloat16), np.float64)


@pytest.mark.parametrize("name, table_dtype, state_dtype", _BF16_CASES)
def test_bf16_updates_match_numpy_on_both_paths(name, table_dtype, state_dtype, path):
    """bfloat16 tables and state (moments cast to bfloat16 to save memory): each step computes in
    float32, the table from the new state before its rounding, and rounds what it stores to
    bfloat16 (nearest, ties to even), on the kernel and the XLA path alike."""
    rng = np.random.default_rng(11)
    opt = {"sgd": sparse.sparse_sgd(0.05), "adagrad": sparse.sparse_adagrad(0.05),
           "adam": sparse.sparse_adam(0.05)}[name]
    w = jnp.asarray(rng.standard_normal((V, D)), table_dtype)
    state = jax.tree.map(lambda x: x.astype(state_dtype) if x.ndim else x, opt.init(w))
    table_round = _bf16 if table_dtype == "bfloat16" else (lambda x: x.astype(np.float32))
    state_round = _bf16 if state_dtype == "bfloat16" else (lambda x: x.astype(np.float32))
    ref = np.asarray(w, np.float64)
    mu, nu, acc = np.zeros((V, D)), np.zeros((V, D)), np.zeros(V)
    update = jax.jit(lambda w_, s_, r, g: opt.update(w_, s_, sparse.RowGrads(r, g)))
    for t in range(1, 5):
        rows = rng.permutation(V)[:9].astype(np.int32)
        g = rng.standard_normal((9, D)).astype(np.float32)
        w, state = update(w, state, jnp.asarray(rows), jnp.asarray(g))
        if name == "sgd":
            ref[rows] -= 0.05 * g
        elif name == "adagrad":
            acc[rows] += np.mean(g.astype(np.float64) ** 2, axis=1)
            ref[rows] -= 0.05 * g / (np.sqrt(acc[rows])[:, None] + 1e-8)
            acc = state_round(acc)
        else:
            mu[rows] = 0.9 * mu[rows] + 0.1 * g
            nu[rows] = 0.999 * nu[rows] + 0.001 * g.astype(np.float64) ** 2
            step = 0.05 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            ref[rows] -= step * mu[rows] / (np.sqrt(nu[rows]) + 1e-8)
            mu, nu = state_round(mu), state_round(nu)
        ref = table_round(ref)
    assert w.dtype == table_dtype
    assert all(x.dtype == state_dtype for x in jax.tree.leaves(state) if x.ndim)
    # within one bfloat16 step (2^-8 relative): float32 rounding may tip a value the other way
    np.testing.assert_allclose(np.asarray(w, np.float64), ref, rtol=2**-7, atol=1e-6)
    if name != "sgd":
        got = state.sum_sq if name == "adagrad" else state.nu
        np.testing.assert_allclose(np.asarray(got, np.float64), acc if name == "adagrad" else nu,
                                   rtol=2**-7, atol=1e-12)


def test_donated_step_runs_in_place(path):
    rng = np.random.default_rng(7)
    opt = sparse.sparse_adam(0.01)
    w = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    st = opt.init(w)
    ids, offsets = _batch(rng, n_bags=3)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(w_, s_):
        bags, pb = sparse.embedding_bag_rows(w_, ids, offsets, mode="sum")
        return opt.update(w_, s_, pb(jnp.ones_like(bags)))

    before = np.asarray(w).copy()
    w2, st2 = step(w, st)
    assert w.is_deleted()  # the input buffer was donated
    touched = np.unique(ids)
    untouched = np.setdiff1d(np.arange(V), touched)
    np.testing.assert_array_equal(np.asarray(w2)[untouched], before[untouched])
    assert not np.allclose(np.asarray(w2)[touched], before[touched])
    assert int(st2.count) == 1


def test_embedding_bag_rows_takes_the_general_options_at_their_defaults(path):
    w = jnp.arange(10.0).reshape(5, 2)
    ids, offsets = jnp.array([1, 2, 4]), jnp.array([0, 2])
    plain, pb = sparse.embedding_bag_rows(w, ids, offsets, mode="sum")
    same, pb2 = sparse.embedding_bag_rows(w, ids, offsets, mode="sum", max_norm=None, norm_type=2.0,
                                          scale_grad_by_freq=False)
    np.testing.assert_array_equal(same, plain)
    g = jnp.ones((2, 2))
    np.testing.assert_array_equal(pb2(g).grads, pb(g).grads)


def test_embedding_bag_rows_checks_offsets_and_segment_ids_eagerly():
    w = jnp.arange(10.0).reshape(5, 2)
    with pytest.raises(ValueError, match=r"offsets\[0\] = 1"):
        sparse.embedding_bag_rows(w, jnp.array([1, 2]), jnp.array([1]), mode="sum")
    with pytest.raises(ValueError, match=r"offsets\[2\] = 1 is smaller than offsets\[1\] = 2"):
        sparse.embedding_bag_rows(w, jnp.array([1, 2, 3]), jnp.array([0, 2, 1]), mode="sum")
    with pytest.raises(ValueError, match=r"segment_ids\[2\] = 0 is smaller"):
        sparse.embedding_bag_rows(w, jnp.array([1, 2, 3]), segment_ids=jnp.array([0, 1, 0]),
                                  num_bags=2, mode="sum")
    # Out-of-range ids stay skipped, eagerly too (the documented contract of this function).
    bags, _ = sparse.embedding_bag_rows(w, jnp.array([1, 7, -1]), jnp.array([0]), mode="sum")
    np.testing.assert_array_equal(bags, [[2.0, 3.0]])


@pytest.mark.parametrize("make_opt", [lambda: sparse.sparse_sgd(0.1), lambda: sparse.sparse_adagrad(0.1),
                                      lambda: sparse.sparse_adam(0.1)])
def test_a_batch_without_ids_updates_nothing_under_jit(make_opt, path):
    opt = make_opt()
    w = jnp.arange(10.0).reshape(5, 2)

    @jax.jit
    def step(w, state):
        bags, pb = sparse.embedding_bag_rows(w, jnp.zeros((0,), jnp.int32), jnp.array([0, 0]), mode="sum")
        return opt.update(w, state, pb(jnp.ones_like(bags)))

    new_w, _ = step(w, opt.init(w))
    np.testing.assert_array_equal(new_w, w)


def test_unique_rows_skips_int64_ids_out_of_range_without_wrapping():
    with jax.enable_x64(True):
        ids = jnp.array([2**32 + 3, 5, -(2**32) + 1], dtype=jnp.int64)
        rows, inverse = sparse.unique_rows(ids, 10)
    np.testing.assert_array_equal(rows, [5, 10, 10])
    np.testing.assert_array_equal(inverse, [3, 0, 3])


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_float64_tables_are_updated_in_float64(name):
    """An x64 table keeps float64 precision: state and arithmetic in float64 (was float32)."""
    make = {"sgd": lambda: sparse.sparse_sgd(0.1), "adagrad": lambda: sparse.sparse_adagrad(0.1, eps=1e-10),
            "adam": lambda: sparse.sparse_adam(0.1, eps=1e-10)}[name]
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        w0 = 1.0 + rng.normal(size=(6, 3)) * 1e-9  # differences below float32's resolution at 1.0
        g = rng.normal(size=(2, 3))
        opt = make()
        w, state = jnp.asarray(w0), opt.init(jnp.asarray(w0))
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(state) if x.ndim)
        for _ in range(3):
            w, state = jax.jit(opt.update)(w, state, sparse.RowGrads(jnp.array([1, 4]), jnp.asarray(g)))
        assert w.dtype == jnp.float64
        # float64 NumPy reference of the same rule
        ref = w0.copy()
        mu, nu, acc = np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2)
        for t in range(1, 4):
            if name == "sgd":
                ref[[1, 4]] -= 0.1 * g
            elif name == "adagrad":
                acc += np.mean(g * g, axis=1)
                ref[[1, 4]] -= 0.1 * g / (np.sqrt(acc)[:, None] + 1e-10)
            else:
                mu = 0.9 * mu + 0.1 * g
                nu = 0.999 * nu + 0.001 * g * g
                ref[[1, 4]] -= 0.1 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * mu / (np.sqrt(nu) + 1e-10)
        np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_negative_rows_are_skipped_on_both_paths(name, set_kernel):
    """Rows outside [0, V) in RowGrads are skipped by the kernel and by XLA alike (the XLA scatter
    used to wrap -1 to the last row)."""
    opt = {"sgd": sparse.sparse_sgd(1.0), "adagrad": sparse.sparse_adagrad(1.0),
           "adam": sparse.sparse_adam(1.0)}[name]
    w = jnp.arange(10.0).reshape(5, 2)
    rg = sparse.RowGrads(jnp.array([-1, 2, -5, 7], jnp.int32), jnp.ones((4, 2)))
    outs = []
    for kernel in (True, False):
        set_kernel(kernel)
        new, _ = jax.jit(lambda *a: opt.update(*a))(w, opt.init(w), rg)  # a fresh trace
        outs.append(np.asarray(new))
        changed = np.flatnonzero(np.any(outs[-1] != np.asarray(w), axis=1))
        np.testing.assert_array_equal(changed, [2])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_eager_update_takes_numpy_row_grads(name, path):
    """RowGrads of NumPy arrays (host copies) update eagerly as jax arrays do; the XLA path's
    chunk loop indexed the NumPy gradients with its traced counter (TracerArrayConversionError)."""
    opt = {"sgd": sparse.sparse_sgd(0.5), "adagrad": sparse.sparse_adagrad(0.5),
           "adam": sparse.sparse_adam(0.5)}[name]
    w = jnp.arange(10.0).reshape(5, 2)
    rows, grads = np.array([3, 0], np.int32), np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    got, _ = opt.update(w, opt.init(w), sparse.RowGrads(rows, grads))
    want, _ = opt.update(w, opt.init(w), sparse.RowGrads(jnp.asarray(rows), jnp.asarray(grads)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.flatnonzero(np.any(np.asarray(got) != np.asarray(w), axis=1)).tolist() == [0, 3]


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_int64_rows_past_int32_are_skipped_not_wrapped(name, path):
    """x64: the kernel cast int64 RowGrads.rows to int32, so row 2**32 + 1 updated row 1."""
    opt = {"sgd": sparse.sparse_sgd(1.0), "adagrad": sparse.sparse_adagrad(1.0),
           "adam": sparse.sparse_adam(1.0)}[name]
    with jax.enable_x64(True):
        w = jnp.arange(10.0, dtype=jnp.float32).reshape(5, 2)
        rg = sparse.RowGrads(jnp.array([2**32 + 1, 3], jnp.int64), jnp.ones((2, 2), jnp.float32))
        new, _ = jax.jit(lambda *a: opt.update(*a))(w, opt.init(w), rg)
        changed = np.flatnonzero(np.any(np.asarray(new) != np.asarray(w), axis=1))
        np.testing.assert_array_equal(changed, [3])


def test_sparse_adam_matches_torch_in_float32_to_rounding(set_kernel):
    """Bias corrections and 1 - beta are rounded once from double, as torch does: float32 b2 ** t
    (1 - 0.999f is 1.3e-5 off) made every step 6e-6 too small or too large."""
    rng = np.random.default_rng(1)
    w0 = (rng.normal(size=(6, 4)) * 1e-3).astype(np.float32)  # small: float32 resolves the steps
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.SparseAdam([tw], lr=0.01)
    outs = {}
    for kernel in (True, False):
        opt = sparse.sparse_adam(0.01)
        w, state = jnp.asarray(w0), opt.init(jnp.asarray(w0))
        with pytest.MonkeyPatch.context() as mp:
            set_kernel(kernel, mp)
            update = jax.jit(opt.update)
            for step in range(5):
                g = np.random.default_rng(step).normal(size=(2, 4)).astype(np.float32)
                rows = np.array([1, 4]) if step % 2 else np.array([0, 4])
                w, state = update(w, state, sparse.RowGrads(jnp.asarray(rows, jnp.int32), jnp.asarray(g)))
                if kernel:
                    tw.grad = torch.sparse_coo_tensor(torch.from_numpy(rows)[None], torch.from_numpy(g), (6, 4),
                                                      check_invariants=True)
                    topt.step()
        outs[kernel] = np.asarray(w)
    ref = tw.detach().numpy()
    for kernel in (True, False):
        np.testing.assert_allclose(outs[kernel], ref, rtol=0, atol=2e-8)


def test_sparse_adam_rejects_betas_outside_0_1():
    """As torch's 'Invalid beta parameter': betas outside [0, 1) are refused (a negative one
    would train on: its bias correction comes out as 1, a wrong step without a word)."""
    for kw in ({"b2": 1.0}, {"b1": -0.5}, {"b2": -0.1}):
        (name, value), = kw.items()
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\).*{name}={value}"):
            sparse.sparse_adam(0.1, **kw)


def test_size_too_small_never_lets_the_padding_id_into_a_bag(path):
    """Under jit, with max_norm and too few row slots, the ids past the slots are read directly
    from the table: a padding_idx id among them must still count as nothing."""
    w = jnp.arange(30.0).reshape(10, 3)
    ids, offs = jnp.array([7, 1, 3, 9, 2]), jnp.array([0, 3])
    kw = dict(mode="sum", padding_idx=2, max_norm=1e6)
    with pytest.raises(ValueError, match=r"size=3 row slots are too few: this batch has 4 distinct ids"):
        sparse.embedding_bag_rows(w, ids, offs, size=3, **kw)

    @jax.jit
    def run(w):
        bags, pb = sparse.embedding_bag_rows(w, ids, offs, size=3, **kw)
        return bags, pb(jnp.ones_like(bags))

    bags, g = run(w)
    wn = np.arange(30.0).reshape(10, 3)
    np.testing.assert_array_equal(bags, np.stack([wn[7] + wn[1] + wn[3], wn[9]]))
    np.testing.assert_array_equal(g.rows, [1, 3, 7])  # (9 overflowed, 2 is padding)
    np.testing.assert_array_equal(g.grads, np.ones((3, 3)))


def test_an_empty_batch_touches_no_row(path):
    """No ids: every row slot is the 'no row' V, so an optimiser step moves nothing (slots of
    row 0 would take a zero gradient: Adam's moments and table rows decay)."""
    rows, inv = sparse.unique_rows(jnp.zeros((0,), jnp.int32), 4, size=2)
    assert rows.tolist() == [4, 4] and inv.shape == (0,)
    opt = jaxbag.sparse_adam(0.1)

    @jax.jit
    def step(w, state, ids, offs):
        bags, pb = jaxbag.embedding_bag_rows(w, ids, offs, mode="sum", size=2)
        return opt.update(w, state, pb(jnp.ones_like(bags)))

    w0 = jnp.arange(8.0).reshape(4, 2)
    w1, s1 = step(w0, opt.init(w0), jnp.array([0, 0]), jnp.array([0, 1]))
    np.testing.assert_allclose(w1[0], [-0.1, 0.9], rtol=1e-6)
    w2, s2 = step(w1, s1, jnp.zeros((0,), jnp.int32), jnp.array([0, 0]))
    np.testing.assert_array_equal(w2, w1)
    np.testing.assert_array_equal(s2.mu, s1.mu)
    np.testing.assert_array_equal(s2.nu, s1.nu)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("grad_dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_row_grads_update_a_float32_table(name, grad_dtype, path):
    """Row gradients of a half-precision loss on a float32 table: the same update as float32
    gradients of the same values (the kernel takes float32 buffers only)."""
    opt = {"sgd": jaxbag.sparse_sgd, "adagrad": jaxbag.sparse_adagrad, "adam": jaxbag.sparse_adam}[name](0.5)
    w = jnp.zeros((4, 2), jnp.float32)
    rows, g = jnp.array([3, 0]), jnp.array([[1.0, -2.0], [0.5, 4.0]])  # (exact in both dtypes)
    want, _ = opt.update(w, opt.init(w), jaxbag.RowGrads(rows, g))
    got, _ = opt.update(w, opt.init(w), jaxbag.RowGrads(rows, g.astype(grad_dtype)))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(got)[1:3], 0.0)
    if name == "sgd":
        np.testing.assert_array_equal(got, np.array([[-0.25, -2.0], [0, 0], [0, 0], [-0.5, 1.0]]))


@pytest.mark.parametrize("kw", [dict(mode="mean"), dict(mode="mean", max_norm=1.5),
                                dict(mode="sum", scale_grad_by_freq=True)],
                         ids=["direct", "max_norm", "freq"])
def test_size_too_small(kw, path):
    """Eagerly a clear error; under jit the bags still equal embedding_bag on every path (the
    max_norm path used to drop the overflow ids from the bags) and only the overflow rows get no
    gradient."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32)
    ids, offs = jnp.array([7, 1, 3, 7, 9, 1]), jnp.array([0, 2, 4])
    with pytest.raises(ValueError, match=r"size=3 row slots are too few: this batch has 4 distinct ids"):
        sparse.embedding_bag_rows(w, ids, offs, size=3, **kw)

    @jax.jit
    def run(w, i, o):
        bags, pb = sparse.embedding_bag_rows(w, i, o, size=3, **kw)
        return bags, pb(jnp.ones_like(bags))

    bags, g = run(w, ids, offs)
    np.testing.assert_allclose(bags, jaxbag.embedding_bag(w, ids, offs, **kw), rtol=1e-6)
    full = jax.grad(lambda w: jaxbag.embedding_bag(w, ids, offs, **kw).sum())(w)
    np.testing.assert_array_equal(g.rows, [1, 3, 7])
    np.testing.assert_allclose(g.grads, full[jnp.array([1, 3, 7])], rtol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
def test_zero_weight_ids_under_non_finite_cotangents(mode, path):
    """A weight-0 id gets 0 * cotangent, so NaN for an inf/NaN cotangent, as jax.vjp of
    embedding_bag and torch give (the kernel skipped weight-0 ids: 0 instead of NaN)."""
    w = jnp.arange(8.0).reshape(4, 2)
    ids, offs = jnp.array([1, 2, 3, 0]), jnp.array([0, 2])
    psw = jnp.array([0.0, 1.0, 2.0, 0.0])
    g = jnp.array([[jnp.nan, 1.0], [1.0, jnp.inf]])
    f = functools.partial(jaxbag.embedding_bag, indices=ids, offsets=offs, mode=mode,
                          per_sample_weights=psw)
    want = jax.vjp(lambda w: f(w), w)[1](g)[0]
    _, pb = sparse.embedding_bag_rows(w, ids, offs, mode=mode, per_sample_weights=psw)
    rg = pb(g)
    np.testing.assert_array_equal(rg.rows, [0, 1, 2, 3])
    np.testing.assert_array_equal(rg.grads, want)
    assert np.isnan(np.asarray(rg.grads)[1, 0]) and np.isnan(np.asarray(rg.grads)[0, 1])


@pytest.mark.parametrize("kw", [{}, {"max_norm": 1e9}, {"mode": "mean", "max_norm": 0.005}],
                         ids=["direct", "max_norm", "mean_renormed"])
def test_bf16_row_gradients_accumulate_in_float32(kw, path):
    """RowGrads are summed in float32 for a bf16 table on every path (the max_norm path summed
    300 ones in bf16: 256)."""
    w = jnp.full((4, 2), 0.01, jnp.bfloat16)
    ids, seg = jnp.zeros((300,), jnp.int32), jnp.arange(300, dtype=jnp.int32)
    kw = {"mode": "sum", **kw}
    bags, pb = sparse.embedding_bag_rows(w, ids, segment_ids=seg, num_bags=300, **kw)
    assert bags.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bags, jaxbag.embedding_bag(w, ids, segment_ids=seg, num_bags=300, **kw))
    g = pb(jnp.ones((300, 2), jnp.bfloat16))
    assert g.grads.dtype == jnp.float32
    # 300 cotangents of 1, summed exactly (max_norm's gradient is the renormed table's: no scale)
    np.testing.assert_allclose(np.asarray(g.grads)[0], [300.0, 300.0], rtol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "max"])
def test_the_pullback_can_be_differentiated_on_both_paths(mode, path):
    """The row-gradient kernel had no derivative rule ('cannot be differentiated'), so
    grad-of-pullback (gradient penalties, meta-learning) only worked on the XLA path."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    ids, offs = jnp.array([0, 3, 3, 1]), jnp.array([0, 2])
    psw = None if mode == "max" else jnp.array([0.5, 2.0, 1.0, 3.0])
    g0 = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)

    def via_rows(g, p):
        _, pb = sparse.embedding_bag_rows(w, ids, offs, mode=mode, per_sample_weights=p)
        return jnp.sum(pb(g).grads ** 2)

    def via_dense(g, p):  # the same quantity from jax.vjp of embedding_bag: rows 0, 1, 3
        f = lambda w: jaxbag.embedding_bag(w, ids, offs, mode=mode, per_sample_weights=p)
        return jnp.sum(jax.vjp(f, w)[1](g)[0][jnp.array([0, 1, 3])] ** 2)

    argnums = (0,) if psw is None else (0, 1)
    got = jax.jit(jax.grad(via_rows, argnums=argnums))(g0, psw)
    want = jax.grad(via_dense, argnums=argnums)(g0, psw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "max"])
def test_the_pullback_has_forward_mode_derivatives_on_both_paths(mode, path):
    """The row-gradient kernel's derivative was a custom_vjp, so jvp / jax.hessian /
    Hessian-vector products (forward over reverse) of the pullback failed with 'can't apply
    forward-mode autodiff (jvp) to a custom_vjp function' on the CPU-kernel path."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    ids, offs = jnp.array([0, 3, 3, 1]), jnp.array([0, 2])
    psw = None if mode == "max" else jnp.array([0.5, 2.0, 1.0, 3.0])
    g0 = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
    dg = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)

    def rows(g):
        _, pb = sparse.embedding_bag_rows(w, ids, offs, mode=mode, per_sample_weights=psw)
        return pb(g).grads[:3]  # rows 0, 1, 3

    def dense(g):
        f = lambda w: jaxbag.embedding_bag(w, ids, offs, mode=mode, per_sample_weights=psw)
        return jax.vjp(f, w)[1](g)[0][jnp.array([0, 1, 3])]

    got = jax.jit(lambda g, t: jax.jvp(rows, (g,), (t,)))(g0, dg)
    want = jax.jvp(dense, (g0,), (dg,))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the pullback is linear in g, so the Hessian of |pullback(g)|^2 is constant and nonzero
    loss = lambda f: lambda g: jnp.sum(f(g) ** 2)
    h_rows, h_dense = jax.jit(jax.hessian(loss(rows)))(g0), jax.hessian(loss(dense))(g0)
    np.testing.assert_allclose(h_rows, h_dense, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(h_rows)).max() > 0


def test_grad_through_the_rows_bags_keeps_scale_grad_by_freq():
    """jax.grad through embedding_bag_rows' bags (not its pullback) dropped scale_grad_by_freq's
    1/count: they were jax.vjp's primal output, whose derivative skips the custom rule. Forward
    mode now raises, as for embedding_bag (scale_grad_by_freq is reverse-mode only); it gave the
    unscaled tangent."""
    w = jnp.asarray(np.arange(30.0).reshape(10, 3) / 10, jnp.float32)
    ids, offs = jnp.array([1, 4, 4, 7]), jnp.array([0])  # one bag, row 4 twice
    kw = dict(mode="sum", scale_grad_by_freq=True)
    want = jax.grad(lambda w: jaxbag.embedding_bag(w, ids, offs, **kw).sum())(w)
    got = jax.grad(lambda w: sparse.embedding_bag_rows(w, ids, offs, **kw)[0].sum())(w)
    np.testing.assert_array_equal(got, want)
    assert got[4].tolist() == [1.0, 1.0, 1.0]  # 2 occurrences / 2
    rg = sparse.embedding_bag_rows(w, ids, offs, **kw)[1](jnp.ones((1, 3), jnp.float32))
    np.testing.assert_array_equal(rg.grads[:3], want[jnp.array([1, 4, 7])])
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda w: sparse.embedding_bag_rows(w, ids, offs, **kw)[0], (w,), (w,))


def test_scale_grad_by_freq_is_exact_for_float64_tables():
    """1/count was computed in float32, so a float64 table's gradient was float32-accurate
    (3 * float32(1/3) != 1)."""
    with jax.enable_x64(True):
        w = jnp.ones((4, 2), jnp.float64)
        ids, offs = jnp.array([1, 1, 1]), jnp.array([0])
        kw = dict(mode="sum", scale_grad_by_freq=True)
        g = jax.grad(lambda w: jaxbag.embedding_bag(w, ids, offs, **kw).sum())(w)
        assert g.dtype == jnp.float64 and g[1].tolist() == [1.0, 1.0]
        rg = sparse.embedding_bag_rows(w, ids, offs, **kw)[1](jnp.ones((1, 2), jnp.float64))
        assert rg.grads.dtype == jnp.float64 and rg.grads[0].tolist() == [1.0, 1.0]


def test_unique_rows_sorts_ids_past_2_to_the_24():
    """The CPU kernel radix-sorts the distinct ids 8 bits a pass: ids that differ only above bit 24
    (a table of more than 16M rows) must still come out in increasing order, with matching slots."""
    v = 2**31 - 1
    ids = np.array([2**24 + 1, 5, 2**24, 2**30 + 3, 5, 2**30], np.int32)
    rows, inv = jaxbag.unique_rows(jnp.asarray(ids), v, size=5)
    want = np.unique(ids)
    np.testing.assert_array_equal(np.asarray(rows), want)
    np.testing.assert_array_equal(np.asarray(rows)[np.asarray(inv)], ids)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("name", ["sparse_adam", "sparse_adagrad", "sparse_sgd"])
def test_schedules_are_read_at_the_count_of_updates_done(name, kernel, set_kernel):
    """A schedule gets the number of updates done before this one (0 on the first), as optax's
    ``scale_by_learning_rate``; only sparse_sgd's schedule was tested. With every row touched,
    sparse_adam (eps=0) is dense Adam and sparse_sgd is dense SGD, step for step."""
    set_kernel(kernel)
    sched = optax.linear_schedule(0.0, 0.3, 4)  # lr(0) = 0: the first update changes no weight
    rng = np.random.default_rng(3)
    v, d = 5, 3
    w0 = rng.standard_normal((v, d)).astype(np.float32)
    kw = dict(eps=0.0) if name != "sparse_sgd" else {}
    opt = getattr(jaxbag, name)(sched, **kw)
    dense = {"sparse_adam": optax.adam(sched, eps=0.0), "sparse_sgd": optax.sgd(sched)}.get(name)
    w = jnp.asarray(w0)
    st = opt.init(w)
    wd = jnp.asarray(w0)
    std = None if dense is None else dense.init(wd)
    for k in range(3):
        g = jnp.asarray(rng.standard_normal((v, d)).astype(np.float32))
        w, st = opt.update(w, st, jaxbag.RowGrads(jnp.arange(v, dtype=jnp.int32), g))
        if k == 0:
            np.testing.assert_array_equal(np.asarray(w), w0)
        if dense is not None:
            with jax.numpy_dtype_promotion("standard"):  # (optax's bias correction mixes dtypes)
                upd, std = dense.update(g, std, wd)
                wd = optax.apply_updates(wd, upd)
            np.testing.assert_allclose(np.asarray(w), np.asarray(wd), rtol=2e-5, atol=2e-6)
    assert not np.allclose(np.asarray(w), w0)


@pytest.mark.parametrize("extra", [{}, dict(max_norm=1.0)])
def test_size_equal_to_the_distinct_ids_is_enough(extra):
    """``size`` slots hold a batch of exactly ``size`` distinct ids (the bound is inclusive: only
    more distinct ids than slots is an error), and every touched row gets its gradient."""
    w = jnp.asarray(np.arange(20, dtype=np.float32).reshape(10, 2))
    ids = jnp.array([3, 7, 3, 1])  # 3 distinct
    bags, pb = jaxbag.embedding_bag_rows(w, ids, jnp.array([0, 2]), mode="sum", size=3, **extra)
    g = pb(jnp.ones_like(bags))
    assert g.rows.tolist() == [1, 3, 7]
    np.testing.assert_array_equal(np.asarray(g.grads), [[1, 1], [2, 2], [1, 1]])
    with pytest.raises(ValueError, match="size=2 row slots are too few"):
        jaxbag.embedding_bag_rows(w, ids, jnp.array([0, 2]), mode="sum", size=2, **extra)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_vmap_of_rows_pullback_and_update_equals_a_loop(mode, path):
    """``vmap`` over ``unique_rows``, ``embedding_bag_rows`` (bags and per-example row gradients,
    e.g. for per-example clipping) and a sparse optimiser over stacked tables gives what a loop
    over the examples gives, on the kernel (whose calls batch as a loop) and on the XLA path."""
    rng = np.random.default_rng(7)
    s, n, b, u = 4, 9, 3, 8
    w = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(-1, V + 1, size=(s, n)), jnp.int32)  # some out of range
    offs = jnp.asarray(np.sort(rng.integers(0, n, size=(s, b)), axis=1), jnp.int32)
    g = jnp.asarray(rng.normal(size=(s, b, D)), jnp.float32)

    def example(table, i, o, gg):
        out, pullback = jaxbag.embedding_bag_rows(table, i, o, mode=mode, size=u)
        return out, pullback(gg)

    def check(batched, looped):
        for k in range(s):
            jax.tree.map(lambda a, c: np.testing.assert_allclose(a[k], c, rtol=1e-6, atol=1e-6),
                         batched, looped[k])

    check(jax.jit(jax.vmap(lambda i: jaxbag.unique_rows(i, V, size=u)))(ids),
          [jaxbag.unique_rows(ids[k], V, size=u) for k in range(s)])
    out, rg = jax.jit(jax.vmap(example, (None, 0, 0, 0)))(w, ids, offs, g)
    looped = [jax.jit(example)(w, ids[k], offs[k], g[k]) for k in range(s)]
    check((out, rg), looped)
    for k in range(s):  # and each example's row gradients are its dense gradient's rows
        dense = jax.jit(lambda t, i, o, gg: jax.vjp(  # jit: out-of-range ids are skipped
            lambda t: jaxbag.embedding_bag(t, i, o, mode=mode), t)[1](gg)[0])(w, ids[k], offs[k], g[k])
        keep = np.asarray(rg.rows[k]) < V
        np.testing.assert_allclose(np.asarray(rg.grads[k])[keep], np.asarray(dense)[np.asarray(rg.rows[k])[keep]],
                                   rtol=1e-6, atol=1e-6)
    opt = sparse.sparse_adam(0.1)
    tables = w[None] * jnp.arange(1, s + 1, dtype=jnp.float32)[:, None, None]
    new, state = jax.jit(jax.vmap(opt.update))(tables, jax.vmap(opt.init)(tables), rg)
    check((new, state), [opt.update(tables[k], opt.init(tables[k]), jax.tree.map(lambda x: x[k], rg))
                         for k in range(s)])


def test_embedding_bag_rows_defaults_are_embedding_bags():
    """With no options the bags are embedding_bag's (its default mode, mean): the direct path
    restates its options by name, and a wrong default there passed every other test."""
    w = jnp.asarray(np.random.default_rng(3).normal(size=(6, 3)).astype(np.float32))
    ids = jnp.array([0, 5, 2, 2, 1], jnp.int32)
    for args, kw in (((ids, jnp.array([0, 2])), {}), ((ids.reshape(1, 5),), {}),
                     ((ids,), dict(segment_ids=jnp.array([0, 0, 1, 1, 1]), num_bags=2))):
        bags, _ = jaxbag.embedding_bag_rows(w, *args, **kw)
        np.testing.assert_allclose(bags, jaxbag.embedding_bag(w, *args, **kw), rtol=1e-6)


@pytest.mark.parametrize("b1,b2", [(0.0, 0.999), (0.9, 0.0), (0.0, 0.0)])
def test_sparse_adam_with_a_zero_beta_equals_torch(b1, b2, path):
    """A beta of 0 (no first / second moment memory): the bias correction ``1 - 0 ** t`` is 1,
    as torch's Python ``0.0 ** t``; a log(0) taken as 0 made it 0 (an infinite step)."""
    rng = np.random.default_rng(11)
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.SparseAdam([tw], lr=0.1, betas=(b1, b2))
    opt = sparse.sparse_adam(0.1, b1, b2)
    step = _mse_step_sparse_pad(opt, "sum", None)
    w, st = jnp.asarray(w0), opt.init(jnp.asarray(w0))
    for i in range(3):
        ids, offsets = _batch(rng, n_bags=3, n_ids=7)
        y = rng.standard_normal((3, D)).astype(np.float32)
        topt.zero_grad()
        out = F.embedding_bag(torch.from_numpy(ids.astype(np.int64)), tw,
                              torch.from_numpy(offsets.astype(np.int64)), mode="sum", sparse=True)
        torch.mean((out - torch.from_numpy(y)) ** 2).backward()
        topt.step()
        w, st = step(w, st, ids, offsets, y)
        assert np.isfinite(np.asarray(w)).all()
        np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=f"step {i}")


@pytest.mark.parametrize("form", ["offsets", "2d", "max", "max_norm"])
def test_pullback_checks_its_cotangent(form, path):
    """The cotangent must be the bags' float ``[B, D]``: a wrong batch size was taken silently,
    and differently by the two paths (the kernel read zeros for a missing bag, XLA repeated the
    last one); a wrong width gave ``[U, 1]`` gradients; a 1-D one an unpacking error."""
    w = jnp.arange(10.0).reshape(5, 2)
    kw = {"mode": "sum"}
    if form == "2d":
        ids, offs = jnp.array([[1, 2], [3, 4]]), None
    else:
        ids, offs = jnp.array([1, 2, 3]), jnp.array([0, 1])
    if form == "max":
        kw["mode"] = "max"
    if form == "max_norm":
        kw["max_norm"] = 1.0
    bags, pullback = jaxbag.embedding_bag_rows(w, ids, offs, **kw)
    assert bags.shape == (2, 2)
    for g in (jnp.ones((1, 2)), jnp.ones((3, 2)), jnp.ones((2, 1)), jnp.ones((4,)),
              jnp.ones((2, 2), jnp.int32)):
        with pytest.raises(ValueError, match=rf"g must be the cotangent of the bags: float \[2, 2\] "
                                             rf"\(the bags' \[B, D\]\); got {g.dtype} "
                                             rf"\[{', '.join(map(str, g.shape))}\]"):
            pullback(g)
        with pytest.raises(ValueError, match=r"g must be the cotangent of the bags"):
            jax.jit(pullback)(g)
    assert pullback(jnp.ones((2, 2))).grads.shape[1] == 2


def test_update_checks_the_row_dtype(path):
    """Float rows were truncated by the kernel (1.7 updated row 1) and refused by XLA with a
    message that did not name row_grads; bool rows were read as 0/1."""
    opt = jaxbag.sparse_sgd(1.0)
    w = jnp.zeros((5, 2))
    for rows, grads in ((jnp.array([1.7, 3.2]), jnp.ones((2, 2))),
                        (jnp.array([True, False]), jnp.ones((2, 2))),
                        (jnp.array([1, 3]), jnp.ones((2, 2), jnp.int32))):
        with pytest.raises(TypeError, match=rf"row_grads must hold integer rows and float grads; "
                                            rf"got rows {rows.dtype} and grads {grads.dtype}"):
            opt.update(w, opt.init(w), jaxbag.RowGrads(rows, grads))


def test_optimizer_hyper_parameters_are_checked():
    """As torch's optimisers: a negative accumulator start made every touched row NaN; negative
    (or NaN) learning rates and eps, and a fractional chunk (truncated), were taken silently."""
    for make, match in [
        (lambda: jaxbag.sparse_adagrad(0.1, initial_accumulator_value=-1.0),
         r"initial_accumulator_value must be a float >= 0; got -1.0"),
        (lambda: jaxbag.sparse_adagrad(0.1, eps=-1e-8), r"eps must be a float >= 0; got -1e-08"),
        (lambda: jaxbag.sparse_adam(-0.1), r"learning_rate must be a float >= 0; got -0.1"),
        (lambda: jaxbag.sparse_adam(0.1, eps=float("nan")), r"eps must be a float >= 0; got nan"),
        (lambda: jaxbag.sparse_sgd(float("nan")), r"learning_rate must be .* got nan"),
        (lambda: jaxbag.sparse_sgd(0.1, chunk=1.5), r"chunk must be an int >= 1 .*got 1.5"),
        (lambda: jaxbag.sparse_adam(0.1, chunk=0), r"chunk must be an int >= 1 .*got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError, match=r"learning_rate must be a float >= 0; got '0.1'"):
        jaxbag.sparse_sgd("0.1")
    # a schedule is still taken as is, and 0 is allowed (a frozen table)
    w = jnp.ones((3, 2))
    opt = jaxbag.sparse_adagrad(optax.constant_schedule(0.0), initial_accumulator_value=0.0)
    out, _ = opt.update(w, opt.init(w), jaxbag.RowGrads(jnp.array([1]), jnp.ones((1, 2))))
    np.testing.assert_array_equal(out, w)
