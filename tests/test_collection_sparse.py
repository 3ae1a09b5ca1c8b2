"""jaxbag.embedding_bag_collection_rows: collection bags plus a pullback to each group's rows.

Checked against the dense path: the bags equal embedding_bag_collection's, the row gradients
scattered into a zero table equal jax.grad of the same loss, and sparse SGD steps equal dense
optax.sgd steps; plus the touched rows (padding, shared tables), jit without recompiles, a
sharding plan on a one-device mesh (8 devices: tests/_sharding_worker.py) and the errors.
"""

from __future__ import annotations

import contextlib
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


@pytest.mark.parametrize("kind", [None, "row", "table", "replicated"])
def test_rows_touched_shared_tables_and_padding(kind):
    """A shared table gets one RowGrads whose rows are distinct (the optimisers need that); the
    padding_idx row and the ids of empty bags are not touched; hand-computed gradients. Also on
    a planned layout (1 x 1 mesh, each placement), whose random test batches rarely hold the
    padding id: a pullback whose slots counted padding_idx's row passed them."""
    tables = [T("item", 10, 2, ("item", "last_item"), mode="sum", padding_idx=0)]
    plan = None if kind is None else jaxbag.sharding.plan_sharding(
        tables, jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2),
        axis_name="model", batch_axis="data", overrides={"item": kind})
    layout = jaxbag.collection_layout(tables, plan=plan)
    params = jaxbag.pack_tables(layout, {"item": jnp.arange(20.0).reshape(10, 2)})
    jf = jaxbag.JaggedFeatures.from_lists({"item": [[1, 0, 3], [3]], "last_item": [[3, 5], [0]]})
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
    # a collection optimizer given again: its init failed later with "params must be a dict"
    per_collection = jaxbag.collection_optimizer(jaxbag.sparse_sgd(0.1), layout=layout)
    with pytest.raises(TypeError, match=r"already a collection optimizer.*sparse_adam\(1e-3\), layout"):
        jaxbag.collection_optimizer(per_collection, layout=layout)
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
    # one group's entry: sorted() sorted a NamedTuple's arrays (a broadcasting error, or an
    # array's truth value is ambiguous)
    names = r"\['item', 'user\+user2', 'cat', 'query'\]"
    with pytest.raises(TypeError, match=r"row_grads must be a dict \{group name: RowGrads\} with "
                                        r"one entry per group " + names + r"; got RowGrads\. Pass "
                                        r"the dict pullback\(cotangent\) returns.*\{'item': row_grads\}"):
        opt.update(params, state, row_grads["cat"])
    adam = jaxbag.collection_optimizer(jaxbag.sparse_adam(0.1), layout=layout)
    with pytest.raises(TypeError, match=r"state must be a dict \{group name: state\} .*; got "
                                        r"LazyAdamState\. Pass the dict opt.init\(params\) "
                                        r"returns.*\{'item': state\}"):
        adam.update(params, adam.init(params)["cat"], row_grads)
    with pytest.raises(KeyError, match=r"params has no array for the groups \['user\+user2', 'cat', 'query'\]"):
        opt.init({"item": params["item"]})


def _one_device_plan(axis_type, batch_axis="data"):
    """A plan on a 1 x 1 mesh with row-wise, table-wise and replicated groups."""
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(axis_type,) * 2)
    plan = jaxbag.sharding.plan_sharding(
        TABLES, mesh, axis_name="model", batch_axis=batch_axis,
        overrides={"item": "row", "user": "table", "cat": "replicated"})
    return mesh, jaxbag.collection_layout(TABLES, plan=plan)


def _sin_step(base, layout):
    """(collection optimizer, jitted sparse step -> (params, state, bags)) for a fixed loss."""
    opt = jaxbag.collection_optimizer(base, layout=layout)
    head = jax.random.normal(jax.random.key(1), (layout.output_features,))

    @jax.jit
    def step(p, state, jf):
        x, pullback = jaxbag.embedding_bag_collection_rows(p, jf, layout=layout, concat=True)
        p, state = opt.update(p, state, pullback(jax.grad(lambda x: jnp.sum(jnp.sin(x @ head)))(x)))
        return p, state, x

    return opt, step


@pytest.mark.parametrize("axis_type, set_mesh, batch_axis", [
    (AxisType.Auto, True, "data"), (AxisType.Auto, False, "data"),
    (AxisType.Explicit, True, "data"), (AxisType.Explicit, False, "data"),
    (AxisType.Explicit, False, None)])
def test_planned_layout_on_one_device_equals_the_plain_path(axis_type, set_mesh, batch_axis,
                                                            count_compiles):
    """A sharding plan on a 1 x 1 mesh (row-wise, table-wise and replicated groups; the batch
    split over an axis or not): the same bags and, after 3 sparse Adam steps through
    collection_optimizer, the same tables as the plain layout; one compile, under
    ``jax.set_mesh`` or not. (8 devices, where a replicated group's placement can also come back
    in another form: tests/_sharding_worker.py, case collection_sparse.)"""
    mesh, planned = _one_device_plan(axis_type, batch_axis)
    assert set(planned.plan.as_dict().values()) == {"row", "table", "replicated"}
    plain = jaxbag.collection_layout(TABLES, stack=False)
    make_step = functools.partial(_sin_step, jaxbag.sparse_adam(0.05))

    with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
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


@pytest.mark.parametrize("axis_type, batch_axis", [
    (AxisType.Auto, "data"), (AxisType.Explicit, "data"), (AxisType.Auto, None)])
@pytest.mark.parametrize("empty", ["cat", "query"])  # a replicated group, a row-wise one
def test_a_planned_group_without_ids_this_batch_takes_a_sparse_step(axis_type, batch_axis, empty):
    """Features sized to the batch (``capacity=lambda n: n``) with a group empty for the whole
    batch: its capacity 0 made the planned sparse pullback raise ("unexpected JAX type ... for
    argument to VJP function"), eagerly and under jit, while the forward pass and the plain
    layout worked. Now the empty group's rows stay put and the others equal the plain path."""
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(axis_type,) * 2)
    plan = jaxbag.sharding.plan_sharding(
        TABLES, mesh, axis_name="model", batch_axis=batch_axis,
        overrides={"item": "row", "user": "table", "cat": "replicated", "query": "row"})
    planned = jaxbag.collection_layout(TABLES, plan=plan)
    plain = jaxbag.collection_layout(TABLES, stack=False)
    rng = np.random.default_rng(5)
    lists = {f: [list(rng.integers(0, v, 1 + i % 3)) if f != empty else [] for i in range(4)]
             for f, v in VOCAB.items()}
    jf = jaxbag.JaggedFeatures.from_lists(lists, capacity=lambda n: n)
    assert jf.capacities[list(jf.keys).index(empty)] == 0
    with jax.set_mesh(mesh):
        params = jaxbag.init_collection(planned, jax.random.key(0))
        tables = jaxbag.unpack_tables(planned, params)
        for layout, p in ((planned, params), (plain, tables)):
            opt, step = _sin_step(jaxbag.sparse_sgd(0.5), layout)
            stepped, _, _ = step(p, opt.init(p), jf)
            if layout is planned:
                got = jaxbag.unpack_tables(planned, stepped)
            else:
                want = stepped
    for name, table in tables.items():
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        moved = not np.array_equal(np.asarray(got[name]), np.asarray(table))
        assert moved == (name != empty), name


# -- optimizer states across layouts (pack_states / unpack_states) -----------------------------


@pytest.mark.parametrize("name, axis_type", [("sgd", AxisType.Auto), ("adagrad", AxisType.Auto),
                                             ("adam", AxisType.Auto), ("adam", AxisType.Explicit)])
def test_states_move_between_layouts(name, axis_type, count_compiles):
    """Two sparse steps on the stacked layout, then tables and optimizer states moved to the
    unstacked layout, then to a planned one (1 x 1 mesh: row-wise, table-wise and replicated
    groups), one step on each: the same tables and states as four steps on the stacked layout.
    Without the states (opt.init afresh) Adagrad / Adam differ, so the states matter."""
    base = {"sgd": jaxbag.sparse_sgd(0.3), "adagrad": jaxbag.sparse_adagrad(0.3),
            "adam": jaxbag.sparse_adam(0.05)}[name]
    mesh, planned = _one_device_plan(axis_type)
    stacked = jaxbag.collection_layout(TABLES)
    plain = jaxbag.collection_layout(TABLES, stack=False)
    make_step = functools.partial(_sin_step, base)

    rng = np.random.default_rng(11)
    batches = [_batch(rng) for _ in range(4)]
    with jax.set_mesh(mesh):
        opt_s, step_s = make_step(stacked)
        p0 = jaxbag.init_collection(stacked, jax.random.key(0))
        ref_p, ref_s = p0, opt_s.init(p0)
        for jf in batches:
            ref_p, ref_s, _ = step_s(ref_p, ref_s, jf)
        p, s = p0, opt_s.init(p0)
        for jf in batches[:2]:
            p, s, _ = step_s(p, s, jf)
        fresh_p, fresh_s = p, opt_s.init(p)  # the same tables, states restarted
        for old, layout, jf in ((stacked, plain, batches[2]), (plain, planned, batches[3])):
            tables, states = jaxbag.unpack_tables(old, p), jaxbag.unpack_states(old, s)
            opt, step = make_step(layout)
            p, s = jaxbag.pack_tables(layout, tables), jaxbag.pack_states(layout, states)
            if layout is planned:  # placed as opt.init places them: no second compile
                p = jax.device_put(p, layout.param_shardings())
                with count_compiles(step) as compiles:
                    step(p, opt.init(p), jf)
                    p, s, _ = step(p, s, jf)
                assert len(compiles) == 1
            else:
                p, s, _ = step(p, s, jf)
        for jf in batches[2:]:
            fresh_p, fresh_s, _ = step_s(fresh_p, fresh_s, jf)
        got_t, got_s = jaxbag.unpack_tables(planned, p), jaxbag.unpack_states(planned, s)
        ref_t, ref_st = jaxbag.unpack_tables(stacked, ref_p), jaxbag.unpack_states(stacked, ref_s)
        fresh_t = jaxbag.unpack_tables(stacked, fresh_p)
    for t in TABLES:
        np.testing.assert_allclose(got_t[t.name], ref_t[t.name], rtol=1e-5, atol=1e-6)
        assert jax.tree.structure(got_s[t.name]) == jax.tree.structure(ref_st[t.name])
        for a, b in zip(jax.tree.leaves(got_s[t.name]), jax.tree.leaves(ref_st[t.name])):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert int(got_s[t.name].count) == 4
    moved = max(float(np.max(np.abs(fresh_t[t.name] - ref_t[t.name]))) for t in TABLES)
    assert (moved > 1e-4) == (name != "sgd"), moved  # states carry information (not for SGD)


def test_state_round_trip_keeps_dtypes_and_values():
    """pack_states(unpack_states(s)) == s, leaf for leaf; bfloat16 tables keep float32 moments;
    per-table states equal the rows of the group state (hand-checked slices)."""
    tables = [T("a", 3, 2, ("a",), dtype=jnp.bfloat16), T("b", 5, 2, ("b",), dtype=jnp.bfloat16)]
    layout = jaxbag.collection_layout(tables)
    opt = jaxbag.collection_optimizer(jaxbag.sparse_adam(0.1), layout=layout)
    state = opt.init(jaxbag.init_collection(layout, jax.random.key(0)))
    mu = jnp.arange(16, dtype=jnp.float32).reshape(8, 2) / 7  # not representable in bfloat16
    state = {"a+b": state["a+b"]._replace(mu=mu, count=jnp.int32(3))}
    per = jaxbag.unpack_states(layout, state)
    np.testing.assert_array_equal(per["a"].mu, mu[:3])
    np.testing.assert_array_equal(per["b"].mu, mu[3:])
    assert per["a"].mu.dtype == jnp.float32 and int(per["b"].count) == 3
    back = jaxbag.pack_states(layout, per)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_state_errors():
    layout = jaxbag.collection_layout(TABLES)
    opt = jaxbag.collection_optimizer(jaxbag.sparse_adam(0.1), layout=layout)
    state = opt.init(jaxbag.init_collection(layout, jax.random.key(0)))
    per = jaxbag.unpack_states(layout, state)
    with pytest.raises(KeyError, match=r"state must have one entry per group .*got \['cat'"):
        jaxbag.unpack_states(layout, {k: v for k, v in state.items() if k != "item"})
    with pytest.raises(TypeError, match=r"state must have one entry per group .*got list"):
        jaxbag.unpack_states(layout, [state])
    bad = {**state, "cat": state["cat"]._replace(mu=jnp.zeros((9, 2)))}
    with pytest.raises(ValueError, match=r"state\['cat'\]\.mu has shape \(9, 2\); a leaf with "
                                         r"rows must have the group's 8 rows first"):
        jaxbag.unpack_states(layout, bad)
    with pytest.raises(KeyError, match=r"table_states must have one optimizer state per table "
                                       r".*missing \['query'\]"):
        jaxbag.pack_states(layout, {k: v for k, v in per.items() if k != "query"})
    with pytest.raises(ValueError, match=r"not in the layout: \['nope'\]"):
        jaxbag.pack_states(layout, {**per, "nope": per["cat"]})
    with pytest.raises(ValueError, match=r"must agree on their optimizer state's scalars .*"
                                         r"'user': 0, 'user2': 5"):
        jaxbag.pack_states(layout, {**per, "user2": per["user2"]._replace(count=jnp.int32(5))})
    sgd = jaxbag.sparse_sgd(0.1).init(jnp.zeros((40, 4)))
    with pytest.raises(ValueError, match=r"tables \['user', 'user2'\] .* must have one structure"):
        jaxbag.pack_states(layout, {**per, "user2": sgd})
    with pytest.raises(ValueError, match=r"leaf 1 of the optimizer state of table 'user2' must "
                                         r"have rows of shape \[V\] or \[V, D=4\] .*got \[40, 3\]"):
        jaxbag.pack_states(layout, {**per, "user2": per["user2"]._replace(
            mu=jnp.zeros((40, 3)), nu=jnp.zeros((40, 3)))})
    # the wrong table is named even when it is the group's first (its width was taken as the
    # group's, and the right one blamed), and a table alone in its group is checked too
    with pytest.raises(ValueError, match=r"state of table 'user' must have rows .*got \[30, 3\]"):
        jaxbag.pack_states(layout, {**per, "user": per["user"]._replace(
            mu=jnp.zeros((30, 3)), nu=jnp.zeros((30, 3)))})
    lone = jaxbag.collection_layout([jaxbag.TableConfig("t", 5, 2, ("f",))])
    adam = jaxbag.sparse_adam(0.1)
    with pytest.raises(ValueError, match=r"table 't' must have rows .*\[V, D=2\].*got \[5, 5\]"):
        jaxbag.pack_states(lone, {"t": adam.init(jnp.zeros((5, 5)))})
    with pytest.raises(ValueError, match=r"leaf 1 of the states packed into group 'user\+user2' "
                                         r"must have one dtype"):
        jaxbag.pack_states(layout, {**per, "user2": per["user2"]._replace(
            mu=per["user2"].mu.astype(jnp.float16))})


def test_row_gradients_follow_each_features_cotangent_whatever_the_names():
    """A table shared by features whose names are not in sorted order ("query" before "doc"):
    each feature's cotangent reaches the rows that feature read (checked against jax.grad)."""
    layout = jaxbag.collection_layout([T("words", 10, 2, ("query", "doc"), mode="sum")])
    params = {"words": jnp.arange(20.0).reshape(10, 2)}
    jf = jaxbag.JaggedFeatures.from_lists({"query": [[1], [2]], "doc": [[7, 8], [9]]})
    cot = {"query": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "doc": jnp.array([[5.0, 6.0], [7.0, 8.0]])}
    for concat in (False, True):
        out, pullback = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout, concat=concat)
        ct = jaxbag.concat_features(layout, cot) if concat else cot
        got = _scatter(pullback(ct)["words"], (10, 2))
        _, vjp = jax.vjp(lambda p: jaxbag.embedding_bag_collection(
            p, jf, layout=layout, concat=concat), params)
        np.testing.assert_array_equal(got, vjp(ct)[0]["words"])
        np.testing.assert_array_equal(got[1], [1.0, 2.0])  # query's first bag read row 1


# -- from mutation testing: a planned layout's eager size check --------------------------------


def test_planned_size_too_small_is_an_error_eagerly():
    """With a plan, as without: too few row slots for a group is an error eagerly, naming the
    group (without the check the pullback silently dropped the rows past the slots)."""
    _, planned = _one_device_plan(AxisType.Auto)
    params = jaxbag.init_collection(planned, jax.random.key(0))
    jf = jaxbag.JaggedFeatures.from_lists({f: [[1, 2, 3], [4]] for f in VOCAB})  # item reads 4 rows
    with pytest.raises(ValueError, match=r"group 'item' \(features \['item', 'last_item'\]\): "
                                         r"size=3 row slots are too few"):
        jaxbag.embedding_bag_collection_rows(params, jf, layout=planned, size={"item": 3})
    jaxbag.embedding_bag_collection_rows(params, jf, layout=planned, size={"item": 4})  # enough


@pytest.mark.parametrize("planned", [False, True])
def test_a_cotangent_of_nested_lists_is_read_as_its_array(planned):
    """A cotangent given as nested lists was 'must have the output's shape (6, 4); got ()' (its
    shape read with getattr(..., 'shape', ())): its shape is checked as an array's, and it pulls
    back as the array (with a plan too, where it goes into a shard_map)."""
    layout = _one_device_plan(AxisType.Auto)[1] if planned else jaxbag.collection_layout(TABLES)
    params = jaxbag.init_collection(layout, jax.random.key(0))
    out, pullback = jaxbag.embedding_bag_collection_rows(params, _batch(np.random.default_rng(2)),
                                                         layout=layout)
    rng = np.random.default_rng(3)
    ct = {f: rng.normal(size=v.shape).astype(np.float32) for f, v in out.items()}
    want = pullback({f: jnp.asarray(v) for f, v in ct.items()})
    got = pullback({f: v.tolist() for f, v in ct.items()})
    jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ValueError, match=r"cotangent\['user'\] must have the output's shape "
                                         r"\(6, 4\); got \(6, 3\)"):
        pullback({**ct, "user": np.ones((6, 3)).tolist()})


@pytest.mark.parametrize("stack", [True, False])
def test_rows_of_weighted_features_equal_the_dense_path(stack):
    """Per-id weights reach both the bags and the row gradients (no other test here weighs ids:
    dropping them passed)."""
    tables = [T("a", 5, 3, ("x",), mode="mean", padding_idx=1), T("b", 6, 3, ("y", "z"), mode="mean"),
              T("c", 4, 2, ("w",), mode="sqrtn"), T("d", 7, 3, ("v",), mode="sum")]
    lists = {"x": [[0, 4, 1], [1]], "y": [[2, 2], [2, 5, 0]], "z": [[], [5]], "w": [[3], [3, 0, 1]],
             "v": [[6, 1], [0]]}
    weights = {f: [[0.5 + i for i in range(len(bag))] for bag in v] for f, v in lists.items()}
    jf = jaxbag.JaggedFeatures.from_lists(lists, weights=weights)
    layout = jaxbag.collection_layout(tables, stack=stack)
    params = jaxbag.init_collection(layout, jax.random.key(0))
    ct = {f: jax.random.normal(jax.random.key(i), (2, layout.table_of(f).features))
          for i, f in enumerate(layout.feature_names)}

    def loss(p):
        out = jaxbag.embedding_bag_collection(p, jf, layout=layout)
        return sum(jnp.sum(out[f] * ct[f]) for f in out)

    dense = jax.grad(loss)(params)
    want = jaxbag.embedding_bag_collection(params, jf, layout=layout)
    out, pullback = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout)
    for f in want:
        np.testing.assert_allclose(out[f], want[f], rtol=1e-6, atol=1e-6)
    for name, rg in pullback(ct).items():
        got = np.zeros(params[name].shape)
        rows = np.asarray(rg.rows)
        ok = rows < got.shape[0]
        np.add.at(got, rows[ok], np.asarray(rg.grads)[ok])
        np.testing.assert_allclose(got, dense[name], rtol=1e-5, atol=1e-6)


def test_concat_pullback_refuses_a_cotangent_of_another_shape():
    """A [B, W + 1] cotangent was silently cut to width W."""
    layout = jaxbag.collection_layout([T("a", 5, 3, ("x",), mode="sum"), T("b", 6, 2, ("y",))])
    params = jaxbag.init_collection(layout, jax.random.key(0))
    jf = jaxbag.JaggedFeatures.from_lists({"x": [[1], [2, 3]], "y": [[0], []]})
    out, pullback = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout, concat=True)
    assert out.shape == (2, 5)
    pullback(jnp.ones((2, 5)))  # the output's shape: fine
    for shape in [(2, 6), (2, 4), (3, 5), (10,)]:
        with pytest.raises(ValueError, match=r"shape of the concatenated output \(2, 5\)"):
            pullback(jnp.ones(shape))
