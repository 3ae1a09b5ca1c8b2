"""jaxbag.embedding_bag_collection_rows: collection bags plus a pullback to each group's rows.

Checked against the dense path: the bags equal embedding_bag_collection's, the row gradients
scattered into a zero table equal jax.grad of the same loss, and sparse SGD steps equal dense
optax.sgd steps; plus the touched rows (padding, shared tables), jit without recompiles, a
sharding plan on a one-device mesh (8 devices: tests/_sharding_worker.py) and the errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import jaxbag

T = jaxbag.TableConfig
TABLES = [
    T("item", 50, 4, ("item", "last_item"), mode="mean", padding_idx=0),  # shared by two features
    T("user", 30, 4, ("user",), mode="sum"),  # stacks with item (width 4, but another mode: no)
    T("user2", 40, 4, ("user2",), mode="sum"),  # stacks with user
    T("cat", 8, 2, ("cat",), mode="max"),
    T("query", 20, 3, ("query",), mode="sqrtn"),
]
VOCAB = {"item": 50, "last_item": 50, "user": 30, "user2": 40, "cat": 8, "query": 20}


def _batch(rng, batch_size=6, capacity=32):
    lists = {
        f: [list(rng.integers(0, v, rng.integers(0, 5))) for _ in range(batch_size)]
        for f, v in VOCAB.items()
    }
    return jaxbag.JaggedFeatures.from_lists(lists, capacity={f: capacity for f in VOCAB})


def _scatter(rg: jaxbag.RowGrads, shape) -> np.ndarray:
    dense = np.zeros(shape, np.float64)
    rows = np.asarray(rg.rows)
    ok = rows < shape[0]
    np.add.at(dense, rows[ok], np.asarray(rg.grads, np.float64)[ok])
    return dense


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_bags_and_row_gradients_equal_the_dense_path(stack, concat, jit):
    layout = jaxbag.collection_layout(TABLES, stack=stack)
    params = jaxbag.init_collection(layout, jax.random.key(0))
    jf = _batch(np.random.default_rng(0))
    head = jax.random.normal(jax.random.key(1), (layout.output_features,))

    def loss_of(out):
        flat = out if concat else jaxbag.concat_features(layout, out)
        return jnp.sum(jnp.tanh(flat @ head))

    def sparse(p, j):
        out, pullback = jaxbag.embedding_bag_collection_rows(p, j, layout=layout, concat=concat)
        return out, pullback(jax.grad(loss_of)(out))

    out, row_grads = (jax.jit(sparse) if jit else sparse)(params, jf)
    dense_out = jaxbag.embedding_bag_collection(params, jf, layout=layout, concat=concat)
    jax.tree.map(np.testing.assert_array_equal, out, dense_out)
    dense_grads = jax.grad(lambda p: loss_of(
        jaxbag.embedding_bag_collection(p, jf, layout=layout, concat=concat)))(params)
    assert set(row_grads) == set(params) == {g.name for g in layout.groups}
    for name, table in params.items():
        np.testing.assert_allclose(_scatter(row_grads[name], table.shape), dense_grads[name],
                                   rtol=1e-5, atol=1e-6)


def test_rows_touched_shared_tables_and_padding():
    """A shared table gets one RowGrads whose rows are distinct (the optimisers need that); the
    padding_idx row and the ids of empty bags are not touched; hand-computed gradients."""
    layout = jaxbag.collection_layout([T("item", 10, 2, ("item", "last_item"), mode="sum", padding_idx=0)])
    params = {"item": jnp.arange(20.0).reshape(10, 2)}
    jf = jaxbag.JaggedFeatures.from_lists({"item": [[1, 0, 3], [3]], "last_item": [[3, 5], []]})
    out, pullback = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout, size=5)
    np.testing.assert_array_equal(out["item"], [[8.0, 10.0], [6.0, 7.0]])   # row 0 skipped
    np.testing.assert_array_equal(out["last_item"], [[16.0, 18.0], [0.0, 0.0]])
    g = pullback({"item": jnp.array([[1.0, 2.0], [3.0, 4.0]]),
                  "last_item": jnp.array([[5.0, 6.0], [7.0, 8.0]])})["item"]
    assert g.rows.tolist() == [1, 3, 5, 10, 10]  # distinct, sorted, padded with V; no row 0
    np.testing.assert_array_equal(g.grads[:3], [[1.0, 2.0], [1 + 3 + 5, 2 + 4 + 6], [5.0, 6.0]])


def test_sparse_sgd_steps_equal_dense_sgd_without_recompiles(count_compiles):
    layout = jaxbag.collection_layout(TABLES)
    params = jaxbag.init_collection(layout, jax.random.key(2))
    head = jax.random.normal(jax.random.key(3), (layout.output_features,))
    opt = jaxbag.sparse_sgd(0.5)

    def loss_of(flat, y):
        return jnp.mean((flat @ head - y) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def sparse_step(p, state, jf, y):
        flat, pullback = jaxbag.embedding_bag_collection_rows(p, jf, layout=layout, concat=True)
        row_grads = pullback(jax.grad(loss_of)(flat, y))
        new_p, new_state = {}, {}
        for name in p:
            new_p[name], new_state[name] = opt.update(p[name], state[name], row_grads[name])
        return new_p, new_state

    dense_opt = optax.sgd(0.5)

    @jax.jit
    def dense_step(p, state, jf, y):
        g = jax.grad(lambda p: loss_of(
            jaxbag.embedding_bag_collection(p, jf, layout=layout, concat=True), y))(p)
        updates, state = dense_opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    rng = np.random.default_rng(4)
    dense, dense_state = params, dense_opt.init(params)
    sparse = jax.tree.map(jnp.copy, params)
    state = {name: opt.init(a) for name, a in sparse.items()}
    with count_compiles(sparse_step) as compiles:
        for _ in range(8):  # ragged batches of one static shape: one compile
            jf, y = _batch(rng), jnp.asarray(rng.normal(size=6), jnp.float32)
            sparse, state = sparse_step(sparse, state, jf, y)
            dense, dense_state = dense_step(dense, dense_state, jf, y)
    assert len(compiles) == 1
    for name in params:
        np.testing.assert_allclose(sparse[name], dense[name], rtol=1e-5, atol=1e-6)
        assert not np.allclose(sparse[name], params[name])  # the steps moved every group


def test_errors():
    layout = jaxbag.collection_layout(TABLES)
    params = jaxbag.init_collection(layout, jax.random.key(0))
    jf = _batch(np.random.default_rng(5))
    with pytest.raises(ValueError, match=r"size names unknown groups \['nope'\]"):
        jaxbag.embedding_bag_collection_rows(params, jf, layout=layout, size={"nope": 4})
    with pytest.raises(ValueError, match=r"group 'item' \(features \['item', 'last_item'\]\): "
                                         r"size=2 row slots are too few"):
        jaxbag.embedding_bag_collection_rows(params, jf, layout=layout, size=2)
    out, pullback = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout)
    ones = jax.tree.map(jnp.ones_like, out)
    with pytest.raises(ValueError, match=r"cotangent\['user'\] must have the output's shape "
                                         r"\(6, 4\); got \(6, 3\)"):
        pullback({**ones, "user": jnp.ones((6, 3))})
    with pytest.raises(ValueError, match=r"one entry per output feature .*; got \['cat', 'item'"):
        pullback({k: v for k, v in ones.items() if k != "last_item"})
    with pytest.raises(TypeError, match=r"must be a dict \{feature: \[B, D_f\]\}"):
        pullback(jnp.ones((6, layout.output_features)))
    _, pullback = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout, concat=True)
    for width in (layout.output_features - 1, layout.output_features + 1):  # +1 was ignored
        with pytest.raises(ValueError, match=r"shape of the concatenated output \(6, 21\)"):
            pullback(jnp.ones((6, width)))
    with pytest.raises(TypeError, match=r"jaxbag.sparse_adam\(1e-3\) \(called\)"):
        jaxbag.collection_optimizer(jaxbag.sparse_sgd, layout=layout)
    with pytest.raises(TypeError, match=r"layout must be a jaxbag.CollectionLayout.*got list"):
        jaxbag.collection_optimizer(jaxbag.sparse_sgd(0.1), layout=TABLES)
    bad = jaxbag.JaggedFeatures.from_lists({**{f: [[1]] for f in VOCAB}, "user": [[30]]})
    with pytest.raises(IndexError, match=r"feature 'user' \(table 'user', num_embeddings=30\) has id 30"):
        jaxbag.embedding_bag_collection_rows(params, bad, layout=layout)
    weighted = jaxbag.JaggedFeatures.from_lists({f: [[1]] for f in VOCAB},
                                                weights={f: [[2.0]] for f in VOCAB})
    with pytest.raises(ValueError, match=r"mode='max' tables, which take no per-id weights.*two collections"):
        jaxbag.embedding_bag_collection_rows(params, weighted, layout=layout)
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    plan = jaxbag.sharding.plan_sharding(TABLES, mesh, axis_name="model", batch_axis="data")
    planned = jaxbag.collection_layout(TABLES, plan=plan)
    split = jaxbag.JaggedFeatures.from_lists({f: [[1], [2]] for f in VOCAB}, num_shards=2)
    with pytest.raises(ValueError, match=r"batch_axis='data' \(1 devices\) but the features have "
                                         r"num_shards=2"):
        jaxbag.embedding_bag_collection_rows(jaxbag.init_collection(planned, jax.random.key(0)),
                                             split, layout=planned)
    opt = jaxbag.collection_optimizer(jaxbag.sparse_sgd(0.1), layout=layout)
    state = opt.init(params)
    _, pullback = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout)
    row_grads = pullback(jax.tree.map(jnp.ones_like, _))
    with pytest.raises(ValueError, match=r"row_grads must have one entry per group"):
        opt.update(params, state, {k: v for k, v in row_grads.items() if k != "cat"})
    with pytest.raises(ValueError, match=r"state must have one entry per group"):
        opt.update(params, {**state, "extra": state["cat"]}, row_grads)
    with pytest.raises(KeyError, match=r"params has no array for the groups \['user\+user2', 'cat', 'query'\]"):
        opt.init({"item": params["item"]})


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_planned_layout_on_one_device_equals_the_plain_path(axis_type, count_compiles):
    """A sharding plan on a 1 x 1 mesh (row-wise, table-wise and replicated groups): the same
    bags and, after 3 sparse Adam steps through collection_optimizer, the same tables as the plain
    layout; one compile. (8 devices: tests/_sharding_worker.py, case collection_sparse.)"""
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(axis_type,) * 2)
    plan = jaxbag.sharding.plan_sharding(
        TABLES, mesh, axis_name="model", batch_axis="data",
        overrides={"item": "row", "user": "table", "cat": "replicated"})
    assert set(plan.as_dict().values()) == {"row", "table", "replicated"}
    planned = jaxbag.collection_layout(TABLES, plan=plan)
    plain = jaxbag.collection_layout(TABLES, stack=False)
    base = jaxbag.sparse_adam(0.05)
    head = jax.random.normal(jax.random.key(1), (planned.output_features,))

    def make_step(layout):
        opt = jaxbag.collection_optimizer(base, layout=layout)

        @jax.jit
        def step(p, state, jf):
            x, pullback = jaxbag.embedding_bag_collection_rows(p, jf, layout=layout, concat=True)
            p, state = opt.update(p, state, pullback(jax.grad(lambda x: jnp.sum(jnp.sin(x @ head)))(x)))
            return p, state, x

        return opt, step

    with jax.set_mesh(mesh):
        params = jaxbag.init_collection(planned, jax.random.key(0))
        tables = jaxbag.unpack_tables(planned, params)
        opt_p, step_p = make_step(planned)
        opt_u, step_u = make_step(plain)
        state_p, state_u = opt_p.init(params), opt_u.init(tables)
        rng = np.random.default_rng(8)
        batches = [_batch(rng) for _ in range(3)]
        plain_bags = []
        for jf in batches:
            tables, state_u, x_u = step_u(tables, state_u, jf)
            plain_bags.append(x_u)
        with count_compiles(step_p) as compiles:  # (both steps are named "step": count one)
            for jf, x_u in zip(batches, plain_bags):
                params, state_p, x_p = step_p(params, state_p, jf)
                np.testing.assert_allclose(x_p, x_u, rtol=1e-5, atol=1e-6)
        assert len(compiles) == 1
        got = jaxbag.unpack_tables(planned, params)
    for name, table in tables.items():
        np.testing.assert_allclose(got[name], table, rtol=1e-5, atol=1e-6)
