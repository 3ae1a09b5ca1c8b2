"""JaggedFeatures and EmbeddingBagCollection (functional core, linen, nnx) on one device.

References are independent NumPy computations (per bag, per feature), and the stacked path is
compared with the plain per-feature path, values and gradients.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxbag
from jaxbag._src.collection_nnx import EmbeddingBagCollection as NnxCollection
from jaxbag._src.jagged import pack_features

T = jaxbag.TableConfig
JF = jaxbag.JaggedFeatures
B = 5


# -- JaggedFeatures ---------------------------------------------------------------------------------


FEATS = {"words": [[4, 1], [], [2, 2, 7], [5], [0]], "tags": [[9], [3], [], [1, 1], []]}


def test_from_lists_layout_and_round_trip():
    jf = jaxbag.JaggedFeatures.from_lists(FEATS, capacity={"words": 8, "tags": 4})
    assert jf.keys == ("words", "tags") and jf.capacities == (8, 4) and jf.batch_size == 5
    assert jf.lengths.tolist() == [[2, 0, 3, 1, 1], [1, 1, 0, 2, 0]]
    assert jf.values.tolist() == [4, 1, 2, 2, 7, 5, 0, 0, 9, 3, 1, 1]
    assert jf.values.dtype == jnp.int32
    assert jf.to_lists() == FEATS


def test_num_shards_blocks_hold_their_examples():
    feats = {k: v + [[6]] for k, v in FEATS.items()}  # B = 6, two shards of 3
    jf = jaxbag.JaggedFeatures.from_lists(feats, capacity=5, num_shards=2)
    assert jf.values.shape == (2 * 10,)
    block0, block1 = jf.values[:10].tolist(), jf.values[10:].tolist()
    assert block0 == [4, 1, 2, 2, 7, 9, 3, 0, 0, 0]  # examples 0..2: words then tags
    assert block1 == [5, 0, 6, 0, 0, 1, 1, 6, 0, 0]  # examples 3..5
    assert jf.to_lists() == feats


def test_from_lengths_and_offsets_match_from_lists():
    flat = [4, 1, 2, 2, 7, 5, 0, 9, 3, 1, 1]
    lengths = [2, 0, 3, 1, 1, 1, 1, 0, 2, 0]
    a = jaxbag.JaggedFeatures.from_lengths(["words", "tags"], flat, lengths, capacity=8)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    b = jaxbag.JaggedFeatures.from_offsets(["words", "tags"], flat, offsets, capacity=8)
    c = jaxbag.JaggedFeatures.from_lists(FEATS, capacity=8)
    for x in (a, b):
        np.testing.assert_array_equal(x.values, c.values)
        np.testing.assert_array_equal(x.lengths, c.lengths)


def test_capacity_default_and_errors():
    jf = jaxbag.JaggedFeatures.from_lists(FEATS)  # 7 and 4 ids, rounded up to 8
    assert jf.capacities == (8, 8)
    with pytest.raises(ValueError, match="capacity=2"):
        jaxbag.JaggedFeatures.from_lists(FEATS, capacity=2)
    with pytest.raises(ValueError, match="same number of examples"):
        jaxbag.JaggedFeatures.from_lists({"a": [[1]], "b": [[1], [2]]})
    with pytest.raises(ValueError, match="num_shards"):
        jaxbag.JaggedFeatures.from_lists(FEATS, num_shards=2)
    with pytest.raises(ValueError, match="weights"):
        jaxbag.JaggedFeatures.from_lists(FEATS, weights={"words": FEATS["words"]})
    key = sorted(FEATS)[1]
    with pytest.raises(ValueError, match=f"capacity has no entry for feature '{key}'"):
        jaxbag.JaggedFeatures.from_lists(FEATS, capacity={sorted(FEATS)[0]: 16})
    # a misspelt key next to the real ones was ignored; a bare id was a bag of one
    with pytest.raises(ValueError, match=r"capacity has keys that are not features: \['wrods'\]"):
        jaxbag.JaggedFeatures.from_lists(FEATS, capacity={**{k: 16 for k in FEATS}, "wrods": 4})
    with pytest.raises(ValueError, match=r"features\['user'\]\[0\] = 1 is a single id, not a bag"):
        jaxbag.JaggedFeatures.from_lists({"user": [1, 2]})
    for bad in (0, -1, -8, 2.5):
        with pytest.raises(ValueError, match=rf"round_to must be an int >= 1.*round_to={bad}"):
            jaxbag.JaggedFeatures.from_lists(FEATS, round_to=bad)
    assert jaxbag.JaggedFeatures.from_lists(FEATS, round_to=1).capacities == (7, 4)


def test_is_a_pytree_with_static_keys():
    jf = jaxbag.JaggedFeatures.from_lists(FEATS, capacity=8)
    traces = []

    @jax.jit
    def f(j):
        traces.append(1)
        return j.values * 2, j.lengths.sum()

    f(jf)
    other = jaxbag.JaggedFeatures.from_lists(
        {"words": [[1]] * 5, "tags": [[2]] * 5}, capacity=8
    )
    v, n = f(other)  # same static structure: no retrace
    assert len(traces) == 1
    assert n == 10 and v[0] == 2
    leaves, treedef = jax.tree.flatten(jf)
    assert len(leaves) == 2  # values, lengths (no weights)
    back = jax.tree.unflatten(treedef, leaves)
    assert back.keys == jf.keys and back.to_lists() == FEATS


def test_pack_features_sorted_segments_and_padding_last():
    jf = jaxbag.JaggedFeatures.from_lists(FEATS, capacity={"words": 8, "tags": 4})
    ids, seg, w = pack_features(jf, ["tags", "words"], lambda j, x: x + 100 * j)
    want_ids, want_seg = [], []
    for j, key in enumerate(["tags", "words"]):
        for b, bag in enumerate(FEATS[key]):
            want_ids += [x + 100 * j for x in bag]
            want_seg += [j * B + b] * len(bag)
    n = len(want_ids)
    assert ids[:n].tolist() == want_ids and seg[:n].tolist() == want_seg
    assert seg[n:].tolist() == [2 * B] * (12 - n)  # padding -> dropped bag id
    assert w is None
    assert np.all(np.diff(np.asarray(seg)) >= 0)


# -- collections ------------------------------------------------------------------------------------


def tables():
    return [
        T("user", 7, 4, ("u",), padding_idx=0),
        T("item", 11, 4, ("i", "i2"), padding_idx=-1),  # two features share one table
        T("tag", 5, 3, ("t",), mode="sum"),
        T("cat", 6, 4, ("c",), mode="max"),
        T("geo", 9, 4, ("g",), mode="max", padding_idx=2),
        T("low", 8, 4, ("b",), dtype=jnp.bfloat16),
        T("sq", 6, 2, ("s",), mode="sqrtn"),
    ]


def batch(tabs, seed=0, weights=False):
    rng = np.random.default_rng(seed)
    feats, ws = {}, {}
    for t in tabs:
        for f in t.feature_names:
            feats[f] = [
                [int(x) for x in rng.integers(0, t.num_embeddings, size=rng.integers(1, 5))]
                for _ in range(B)
            ]
            feats[f][1] = []  # an empty bag
            if t.pad is not None:
                feats[f][3] = [t.pad, t.pad]  # a bag of padding only
                feats[f][0] = feats[f][0] + [t.pad]
            ws[f] = [[float(x) for x in rng.uniform(0.5, 2, size=len(bag))] for bag in feats[f]]
    return feats, (ws if weights else None)


def numpy_bag(table, ids, mode, pad, weights=None):
    """The reference reduction of one bag, in float64."""
    table = np.asarray(jnp.asarray(table).astype(jnp.float32), np.float64)
    keep = [i for i, x in enumerate(ids) if x != pad]
    if not keep:
        return np.zeros(table.shape[1])
    rows = table[[ids[i] for i in keep]]
    w = np.ones(len(keep)) if weights is None else np.asarray([weights[i] for i in keep])
    if mode == "max":
        return rows.max(axis=0)
    s = (rows * w[:, None]).sum(axis=0)
    if mode == "sum":
        return s
    if mode == "mean":
        return s / w.sum()
    return s / np.sqrt((w * w).sum())


@pytest.mark.parametrize("stack", [True, False])
def test_collection_matches_numpy(stack):
    tabs = tables()
    feats, _ = batch(tabs)
    layout = jaxbag.collection_layout(tabs, stack=stack)
    params = jax.jit(jaxbag.init_collection, static_argnums=0)(layout, jax.random.key(0))
    per_table = jaxbag.unpack_tables(layout, params)
    out = jax.jit(lambda p, j: jaxbag.embedding_bag_collection(p, j, layout=layout))(
        params, jaxbag.JaggedFeatures.from_lists(feats)
    )
    assert set(out) == set(layout.feature_names)
    for f, bags in feats.items():
        t = layout.table_of(f)
        assert out[f].dtype == t.dtype and out[f].shape == (B, t.features)
        for b, ids in enumerate(bags):
            want = numpy_bag(per_table[t.name], ids, t.mode, t.pad)
            tol = 1e-2 if t.dtype == jnp.bfloat16 else 1e-5
            np.testing.assert_allclose(
                np.asarray(out[f][b].astype(jnp.float32)), want, rtol=tol, atol=tol, err_msg=f
            )


def test_stacking_groups_equal_width_dtype_mode():
    layout = jaxbag.collection_layout(tables())
    assert [(g.name, g.num_rows, g.features) for g in layout.groups] == [
        ("user+item", 18, 4),
        ("tag", 5, 3),
        ("cat+geo", 15, 4),
        ("low", 8, 4),
        ("sq", 6, 2),
    ]
    # item's padding row (its last, -1) is the group's padding row, in stacked coordinates
    assert layout.groups[0].pad_row == 0  # user's padding_idx=0 comes first
    unstacked = jaxbag.collection_layout(tables(), stack=False)
    assert [g.name for g in unstacked.groups] == [t.name for t in tables()]
    assert layout.output_features == 4 * 3 + 3 + 4 * 2 + 4 + 2


def test_stacked_equals_unstacked_values_and_gradients():
    tabs = [t for t in tables() if t.mode != "max"]  # per-sample weights: not with max
    feats, ws = batch(tabs, seed=1, weights=True)
    jf = jaxbag.JaggedFeatures.from_lists(feats, weights=ws)
    stacked = jaxbag.collection_layout(tabs)
    plain = jaxbag.collection_layout(tabs, stack=False)
    ps = jaxbag.init_collection(stacked, jax.random.key(1))
    pu = jaxbag.unpack_tables(stacked, ps)
    ct = jnp.asarray(np.random.default_rng(2).normal(size=(B, stacked.output_features)), jnp.float32)

    leaves, aux = jf.tree_flatten()

    def loss(params, weights, layout):
        j = jaxbag.JaggedFeatures.tree_unflatten(aux, (leaves[0], leaves[1], weights))
        out = jaxbag.embedding_bag_collection(params, j, layout=layout, concat=True)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
    (_, o_s), (g_s, gw_s) = grad(ps, jf.weights, stacked)
    (_, o_u), (g_u, gw_u) = grad(pu, jf.weights, plain)
    assert o_s.dtype == jnp.float32  # mixed bf16/f32 tables -> float32 concatenation
    np.testing.assert_allclose(o_s, o_u, rtol=1e-5, atol=1e-6)
    g_tables = jaxbag.unpack_tables(stacked, g_s)
    for name, g in g_u.items():
        tol = 1e-2 if g.dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(
            np.asarray(g_tables[name].astype(jnp.float32)),
            np.asarray(g.astype(jnp.float32)),
            rtol=tol,
            atol=1e-6,
        )
        assert np.abs(np.asarray(g.astype(jnp.float32))).sum() > 0
    # the gradient with respect to the per-id weights too
    np.testing.assert_allclose(gw_s, gw_u, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(gw_s)).sum() > 0
    # padding rows of the stacked group get no gradient
    group = stacked.group_of("user")
    assert not np.asarray(g_s[group.name][group.pad_row]).any()


def test_max_tables_stacked_equals_unstacked_gradients():
    tabs = [t for t in tables() if t.mode == "max"]
    feats, _ = batch(tabs, seed=3)
    jf = jaxbag.JaggedFeatures.from_lists(feats)
    stacked, plain = jaxbag.collection_layout(tabs), jaxbag.collection_layout(tabs, stack=False)
    ps = jaxbag.init_collection(stacked, jax.random.key(2))
    pu = jaxbag.unpack_tables(stacked, ps)

    def loss(p, layout):
        out = jaxbag.embedding_bag_collection(p, jf, layout=layout, concat=True)
        return jnp.sum(out * jnp.arange(out.shape[1], dtype=jnp.float32)[None, :])

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    gs = jaxbag.unpack_tables(stacked, grad(ps, stacked))
    gu = grad(pu, plain)
    for k in gu:
        np.testing.assert_allclose(gs[k], gu[k], rtol=1e-6)


def test_pack_unpack_round_trip_and_init_independent_of_grouping():
    tabs = tables()
    stacked, plain = jaxbag.collection_layout(tabs), jaxbag.collection_layout(tabs, stack=False)
    ps = jaxbag.init_collection(stacked, jax.random.key(0))
    pu = jaxbag.init_collection(plain, jax.random.key(0))
    for k, v in jaxbag.unpack_tables(stacked, ps).items():
        np.testing.assert_array_equal(v, pu[k])
    again = jaxbag.pack_tables(stacked, pu)
    for k in ps:
        np.testing.assert_array_equal(again[k], ps[k])
    # padding rows start at zero, like torch
    assert not np.asarray(pu["user"][0]).any() and not np.asarray(pu["item"][10]).any()


def test_concat_order_and_dtype():
    tabs = [T("a", 4, 2, ("x",), mode="sum"), T("b", 4, 3, ("y", "z"), mode="sum")]
    layout = jaxbag.collection_layout(tabs)
    params = jaxbag.pack_tables(
        layout,
        {"a": jnp.arange(8.0, dtype=jnp.float32).reshape(4, 2),
         "b": -jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3)},
    )
    jf = jaxbag.JaggedFeatures.from_lists({"z": [[1]], "x": [[3]], "y": [[0, 2]]})
    out = jaxbag.embedding_bag_collection(params, jf, layout=layout, concat=True)
    assert out.tolist() == [[6.0, 7.0, -6.0, -8.0, -10.0, -3.0, -4.0, -5.0]]
    out16 = jaxbag.embedding_bag_collection(
        params, jf, layout=layout, concat=True, dtype=jnp.bfloat16
    )
    assert out16.dtype == jnp.bfloat16


def test_layout_and_input_errors():
    with pytest.raises(ValueError, match="feature 'x' is read by tables"):
        jaxbag.collection_layout([T("a", 4, 2, ("x",)), T("b", 4, 2, ("x",))])
    with pytest.raises(ValueError, match="unique"):
        jaxbag.collection_layout([T("a", 4, 2, ("x",)), T("a", 4, 2, ("y",))])
    with pytest.raises(ValueError, match="mode"):
        T("a", 4, 2, ("x",), mode="median")
    with pytest.raises(ValueError, match="num_embeddings"):
        T("a", 0, 2, ("x",))
    layout = jaxbag.collection_layout([T("a", 4, 2, ("x",))])
    params = jaxbag.init_collection(layout, jax.random.key(0))
    with pytest.raises(KeyError, match="missing"):
        jaxbag.embedding_bag_collection(
            params, jaxbag.JaggedFeatures.from_lists({"y": [[1]]}), layout=layout
        )
    weighted = jaxbag.JaggedFeatures.from_lists({"x": [[1]]}, weights={"x": [[0.5]]})
    for stack in (True, False):  # the stacked and the per-table lookups give the same error
        maxed = jaxbag.collection_layout([T("m", 4, 2, ("x",), mode="max")], stack=stack)
        with pytest.raises(ValueError, match=r"features \['x'\] use mode='max' tables, which take "
                                             r"no per-id weights.*two collections"):
            jaxbag.embedding_bag_collection(
                jaxbag.init_collection(maxed, jax.random.key(0)), weighted, layout=maxed
            )
    bad = jaxbag.JaggedFeatures.from_lists({"x": [[1], [4]]})
    with pytest.raises(IndexError, match="feature 'x'.*id 4"):
        jaxbag.embedding_bag_collection(params, bad, layout=layout)
    # under jit an out-of-range id contributes nothing (never another table's row)
    out = jax.jit(lambda p, j: jaxbag.embedding_bag_collection(p, j, layout=layout))(params, bad)
    np.testing.assert_array_equal(out["x"][1], np.zeros(2, np.float32))


def test_group_names_never_collide():
    """A table named 'a+b' and the stack of tables 'a' and 'b' would share one parameter name:
    one table silently vanished (its feature read the other group's rows)."""
    tables = [T("a+b", 4, 2, ("x",), mode="sum"), T("a", 3, 3, ("y",), mode="sum"),
              T("b", 3, 3, ("z",), mode="sum")]
    with pytest.raises(ValueError, match=r"both be named 'a\+b'.*\[\['a\+b'\], \['a', 'b'\]\].*'a_b'"):
        jaxbag.collection_layout(tables)
    assert len(jaxbag.collection_layout(tables, stack=False).groups) == 3  # one array per table


def test_params_must_match_the_layout():
    """Wrong rows, width or dtype: an error naming the group (extra rows and another width were
    accepted, a [1, 10] output for a [1, 4] layout; too few rows an IndexError about a stacked id)."""
    layout = jaxbag.collection_layout([T("a", 4, 2, ("x",), mode="sum"), T("b", 3, 2, ("y",), mode="sum")])
    jf = jaxbag.JaggedFeatures.from_lists({"x": [[1]], "y": [[2]]})
    for arr, got in [(jnp.ones((9, 2)), r"float32 \[9, 2\]"), (jnp.ones((7, 5)), r"float32 \[7, 5\]"),
                     (jnp.ones((7, 2), jnp.float16), r"float16 \[7, 2\]"),
                     (jnp.ones((5, 2)), r"float32 \[5, 2\]")]:
        with pytest.raises(ValueError, match=rf"params\['a\+b'\] \(tables \['a', 'b'\]\) must be float32 \[7, 2\]; got {got}"):
            jaxbag.embedding_bag_collection({"a+b": arr}, jf, layout=layout)
    with pytest.raises(KeyError, match=r"no array for the groups \['a\+b'\]"):
        jaxbag.embedding_bag_collection({"a": jnp.ones((4, 2))}, jf, layout=layout)


def test_jagged_input_errors():
    """Float ids, fractional lengths, nested bags, [B, K] lengths were truncated, flattened or
    transposed silently; lengths that overflow a capacity or are negative leaked ids into the
    next feature (eagerly and under jit)."""
    with pytest.raises(TypeError, match=r"features\['x'\]\[0\] must hold integer ids; got dtype float64"):
        JF.from_lists({"x": [[1.7, 2.2]]})
    with pytest.raises(ValueError, match=r"features\['x'\]\[0\] must be a flat list of ids"):
        JF.from_lists({"x": [[[1, 2]], [3]]})
    with pytest.raises(TypeError, match=r"values must hold integer ids"):
        JF.from_lengths(["x"], [1.9, 2.5], [2])
    with pytest.raises(TypeError, match=r"lengths must be integer counts"):
        JF.from_lengths(["x"], [1, 2], [1.5, 1.5])
    with pytest.raises(ValueError, match=r"\[K, B\] with K=2 keys.*\(3, 2\)"):
        JF.from_lengths(["x", "y"], [1, 2, 3], np.array([[1, 1], [0, 1], [0, 0]]))
    assert JF.from_lists({"x": [[], [np.int32(3)]]}).to_lists() == {"x": [[], [3]]}
    with pytest.raises(ValueError, match=r"feature 'x' has 3 ids in shard 0 but capacity 2"):
        JF(["x", "y"], jnp.array([1, 2, 3, 0]), jnp.array([[3], [1]]), capacities=(2, 2))
    with pytest.raises(ValueError, match=r"lengths must be >= 0; got lengths\[0, 0\] = -1"):
        JF(["x", "y"], jnp.array([1, 2, 0]), jnp.array([[-1, 3], [0, 0]]), capacities=(2, 1))
    with pytest.raises(TypeError, match=r"lengths must be integer counts"):
        JF(["x"], jnp.array([1, 2]), jnp.array([[1.0]]), capacities=(2,))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: JF.from_offsets(["a"], [1, 2], [0.0, 1.5, 2.0]), TypeError,
         r"offsets must be integer positions; got dtype float64"),  # was truncated to [0, 1, 2]
        (lambda: JF.from_offsets(["a"], [1, 2], [1, 2]), ValueError, r"must start at 0.*offsets\[0\] = 1"),
        (lambda: JF.from_offsets(["a"], [1, 2], [0, 2, 1, 2]), ValueError,
         r"offsets\[2\] = 1 is smaller than offsets\[1\] = 2"),
        (lambda: JF.from_lengths(["a", "b"], [1, 2, 3], [2, 0, 2, -1]), ValueError,
         r"lengths\[3\] = -1 \(feature 'b', example 1\) is negative"),
        (lambda: JF.from_lengths(["a"], [5, 2**40], [1, 1]), ValueError,
         r"values\[1\] = 1099511627776 does not fit in int32"),
    ],
)
def test_host_constructors_name_the_offending_position(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_out_of_range_ids_never_reach_a_neighbouring_table_under_jit():
    tabs = [T("a", 3, 2, ("x",), mode="sum"), T("b", 3, 2, ("y",), mode="sum")]
    layout = jaxbag.collection_layout(tabs)
    params = {"a+b": jnp.ones((6, 2), jnp.float32)}
    # (the raw constructor: the builders refuse negative ids, as pack_bags does)
    jf = jaxbag.JaggedFeatures(["x", "y"], jnp.array([3, 5, -1, 0, -1, 2]), jnp.array([[4], [2]]),
                               capacities=(4, 2))
    out = jax.jit(lambda p, j: jaxbag.embedding_bag_collection(p, j, layout=layout))(params, jf)
    assert out["x"].tolist() == [[1.0, 1.0]] and out["y"].tolist() == [[1.0, 1.0]]


def test_one_compile_per_shape():
    tabs = tables()
    layout = jaxbag.collection_layout(tabs)
    params = jaxbag.init_collection(layout, jax.random.key(0))
    traces = []

    @jax.jit
    def f(p, j):
        traces.append(1)
        return jaxbag.embedding_bag_collection(p, j, layout=layout, concat=True)

    caps = {f: 24 for t in tabs for f in t.feature_names}
    for seed in range(3):
        feats, _ = batch(tabs, seed=seed)
        f(params, jaxbag.JaggedFeatures.from_lists(feats, capacity=caps))
    assert len(traces) == 1


# -- modules ----------------------------------------------------------------------------------------


def small_tables():
    return [t for t in tables() if t.name in ("user", "item", "cat", "low")]


def test_linen_module_matches_functional_core_and_trains():
    tabs = small_tables()
    feats, _ = batch(tabs, seed=4)
    jf = jaxbag.JaggedFeatures.from_lists(feats)
    model = jaxbag.EmbeddingBagCollection(tables=tuple(tabs))
    variables = jax.jit(model.init)(jax.random.key(0), jf)
    params = variables["params"]
    assert set(params) == {g.name for g in model.layout.groups}
    out, cat = jax.jit(lambda v, j: (model.apply(v, j), model.apply(v, j, concat=True)))(
        variables, jf
    )
    ref = jax.jit(lambda p, j: jaxbag.embedding_bag_collection(p, j, layout=model.layout))(
        params, jf
    )
    for f in ref:
        np.testing.assert_array_equal(out[f], ref[f])
    assert cat.shape == (B, model.layout.output_features)
    g = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, jf, concat=True))))(variables)
    assert np.abs(np.asarray(g["params"]["user+item"])).sum() > 0
    # unstacked module: one parameter per table, same outputs for the same tables
    plain = jaxbag.EmbeddingBagCollection(tables=tuple(tabs), stack=False)
    per_table = jaxbag.unpack_tables(model.layout, params)
    out_plain = jax.jit(lambda v, j: plain.apply(v, j, concat=True))({"params": per_table}, jf)
    np.testing.assert_allclose(
        out_plain.astype(jnp.float32), cat.astype(jnp.float32), rtol=1e-5, atol=1e-6
    )
    assert isinstance(nn.Module, type)


def test_nnx_module_matches_functional_core_and_trains():
    tabs = small_tables()
    feats, _ = batch(tabs, seed=5)
    jf = jaxbag.JaggedFeatures.from_lists(feats)
    model = NnxCollection(tabs, rngs=nnx.Rngs(0))
    params = {k: v[...] for k, v in model.embeddings.items()}
    ref = jaxbag.init_collection(model.layout, nnx.Rngs(0).params())
    for k in ref:
        np.testing.assert_array_equal(params[k], ref[k])
    out = model(jf, concat=True)
    want = jaxbag.embedding_bag_collection(params, jf, layout=model.layout, concat=True)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(out, want)
    else:  # an H200 without deterministic ops gave 2 of 100 values 1 ulp apart (atomic adds)
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=0)

    @nnx.jit
    def loss_and_grad(m, j):
        return nnx.value_and_grad(lambda m: jnp.sum(m(j, concat=True) ** 2))(m)

    loss, grads = loss_and_grad(model, jf)
    assert np.isclose(float(loss), float(jnp.sum(want**2)), rtol=1e-5)
    g = grads.embeddings["user+item"][...]
    assert g.shape == params["user+item"].shape and np.abs(np.asarray(g)).sum() > 0


@pytest.mark.parametrize("stack", [True, False])
def test_nnx_collection_tabulates(stack):
    """nnx.tabulate wraps an nnx.Dict's methods: the call iterated self.embeddings.items() there
    and recursed (RecursionError). It reads the groups by the layout's static names now."""
    tabs = small_tables()
    feats, _ = batch(tabs, seed=6)
    jf = jaxbag.JaggedFeatures.from_lists(feats)
    model = NnxCollection(tabs, stack=stack, rngs=nnx.Rngs(0))
    n = sum(model.embeddings[g.name][...].size for g in model.layout.groups)
    text = _nnx_tabulate(model, jf, console_kwargs={"width": 250})
    assert "EmbeddingBagCollection" in text and f"Total Parameters: {n:,}" in text
    # the input by its leaves' names (JaggedFeatures flattens with GetAttrKey paths)
    assert f"values: int32[{jf.values.shape[0]}]" in _plain(text)
    assert f"lengths: int32[{len(jf.keys)},{B}]" in _plain(text)
    for f in model.layout.feature_names:  # the outputs column: {feature: [B, D_f]}
        assert f"{f}: " in text
    out = model(jf, concat=True)  # the module still works after tabulate
    want = jaxbag.embedding_bag_collection(
        {g.name: model.embeddings[g.name][...] for g in model.layout.groups}, jf,
        layout=model.layout, concat=True)
    np.testing.assert_array_equal(out, want)


def _nnx_tabulate(model, *args, **kwargs):
    """nnx.tabulate, then undo what it leaves behind: flax 0.12 wraps the methods of every class
    in the graph and "restores" them with setattr, so inherited methods (nnx.Module's
    set_attributes, ...) end up in each class's own __dict__ for the rest of the process."""
    classes = {type(node) for _, node in nnx.iter_graph(model)}
    before = {cls: dict(vars(cls)) for cls in classes}
    try:
        return nnx.tabulate(model, *args, **kwargs)
    finally:
        for cls, attrs in before.items():
            for name in set(vars(cls)) - set(attrs):
                delattr(cls, name)
            for name, value in attrs.items():
                if vars(cls).get(name, value) is not value:
                    setattr(cls, name, value)


def _plain(text):
    """A rich table without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("weighted", [False, True])
def test_linen_collection_tabulates_a_jagged_features_input(weighted):
    """Flax's linen tabulate renders an input dataclass by its fields and anything else with
    yaml.safe_dump: a JaggedFeatures raised RepresenterError ('cannot represent an object')."""
    tabs = [t for t in small_tables() if t.mode != "max"]  # (max tables take no weights)
    feats, ws = batch(tabs, seed=7, weights=weighted)
    jf = jaxbag.JaggedFeatures.from_lists(feats, weights=ws)
    model = jaxbag.EmbeddingBagCollection(tables=tuple(tabs))
    n_values, k = jf.values.shape[0], len(jf.keys)
    weights = f"float32[{n_values}]" if weighted else "None"
    for text in (
        model.tabulate(jax.random.key(0), jf, console_kwargs={"width": 250}),
        nn.tabulate(model, jax.random.key(0), console_kwargs={"width": 250})(jf, concat=True),
    ):
        text = _plain(text)
        assert "EmbeddingBagCollection" in text
        assert f"values: int32[{n_values}]" in text and f"lengths: int32[{k},{B}]" in text
        assert f"weights: {weights}" in text
        for g in model.layout.groups:  # the params column
            assert f"{g.name}: " in text
    assert f"float32[{B},{model.layout.output_features}]" in text  # concat=True's output
    # nnx.tabulate too (without a keyword argument: flax 0.12's nnx input rendering fails on any
    # custom pytree argument next to one, a flax.struct.dataclass as well)
    nnx_text = _plain(_nnx_tabulate(NnxCollection(tabs, rngs=nnx.Rngs(0)), jf,
                                    console_kwargs={"width": 250}))
    assert f"values: int32[{n_values}]" in nnx_text
    assert (f"weights: float32[{n_values}]" in nnx_text) == weighted


@pytest.mark.parametrize("stack", [True, False])
def test_padding_values_are_never_read_nor_checked(stack):
    """Values past a feature's real ids (its padding) are never read: an out-of-range value there
    is no error eagerly, and the result equals the one under jit."""
    layout = jaxbag.collection_layout([
        jaxbag.TableConfig("t", 4, 2, ("x",), mode="sum"),
        jaxbag.TableConfig("u", 3, 2, ("y",), mode="mean"),
    ], stack=stack)
    tables = {"t": jnp.arange(8.0).reshape(4, 2), "u": -jnp.arange(6.0).reshape(3, 2)}
    jf = jaxbag.JaggedFeatures(["x", "y"], jnp.array([1, 2, 3, 99, 2, 0, -5, 7]),
                               jnp.array([[2, 1], [1, 1]]), capacities=(4, 4))
    assert jf.to_lists() == {"x": [[1, 2], [3]], "y": [[2], [0]]}
    eager = jaxbag.embedding_bag_collection(tables, jf, layout=layout)
    jitted = jax.jit(lambda t, f: jaxbag.embedding_bag_collection(t, f, layout=layout))(tables, jf)
    np.testing.assert_array_equal(eager["x"], [[6.0, 8.0], [6.0, 7.0]])
    np.testing.assert_array_equal(eager["y"], [[-4.0, -5.0], [-0.0, -1.0]])
    for k in eager:
        np.testing.assert_array_equal(jitted[k], eager[k])


def test_lengths_that_overflow_under_jit_cut_the_bag_short():
    """Built inside jit (values unknown, so unchecked), lengths over a capacity cut the bag at
    the capacity: an id is never read as another feature's (feature 'x' used to take 'y''s id)."""
    w = jnp.arange(8.0).reshape(4, 2)
    layout = jaxbag.collection_layout([T("t", 4, 2, ("x", "y"), mode="sum")])

    @jax.jit
    def run(values, lengths):
        jf = jaxbag.JaggedFeatures(["x", "y"], values, lengths, capacities=(2, 2))
        return jaxbag.embedding_bag_collection({"t": w}, jf, layout=layout)

    out = run(jnp.array([1, 2, 3, 0]), jnp.array([[3], [1]]))
    np.testing.assert_array_equal(out["x"], w[1:2] + w[2:3])  # ids 1, 2: not y's 3
    np.testing.assert_array_equal(out["y"], w[3:4])
    out = run(jnp.array([1, 2, 3, 0]), jnp.array([[-1], [1]]))
    np.testing.assert_array_equal(out["x"], np.zeros((1, 2)))
    np.testing.assert_array_equal(out["y"], w[3:4])
    # lengths whose sum wraps int32 (the cumsum wrapped: 'x' read the zero fill, 'y' lost its id)
    out = run(jnp.array([1, 2, 3, 0]), jnp.array([[2**30, 2**30], [1, 0]]).reshape(2, 2))
    np.testing.assert_array_equal(out["x"], np.stack([w[1] + w[2], np.zeros(2)]))
    np.testing.assert_array_equal(out["y"], np.stack([w[3], np.zeros(2)]))


def test_int64_ids_and_lengths_are_not_wrapped_into_range_under_jit():
    """x64: an int64 id 2**32 + 1 was cast to int32 (id 1) before the range check, and an int64
    length 2**32 + 1 became 1, so the wrong rows were read (and got gradients)."""
    w = jnp.arange(16.0).reshape(8, 2)
    layout = jaxbag.collection_layout([T("a", 4, 2, ("x",), mode="sum"), T("b", 4, 2, ("y",), mode="sum")])
    with jax.enable_x64(True):

        @jax.jit
        def run(p, values, lengths):
            jf = jaxbag.JaggedFeatures(["x", "y"], values, lengths, capacities=(2, 2))
            return jaxbag.embedding_bag_collection(p, jf, layout=layout)

        vals = jnp.array([0, 0, 2**32 + 1, 3], jnp.int64)
        out = run({"a+b": w}, vals, jnp.array([[1], [2]], jnp.int64))
        np.testing.assert_array_equal(out["y"], w[7:8])  # b's row 3 only, not b's row 1
        g = jax.grad(lambda p: run(p, vals, jnp.array([[1], [2]], jnp.int64))["y"].sum())({"a+b": w})
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(g["a+b"])[:, 0]), [7])
        out = run({"a+b": w}, vals, jnp.array([[2**32 + 1], [0]], jnp.int64))  # cut at capacity 2
        np.testing.assert_array_equal(out["x"], w[0:1] + w[0:1])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32])
@pytest.mark.parametrize("capacity", [200, 256])
def test_jagged_features_with_narrow_lengths(dtype, capacity):
    """Narrow lengths were clipped to capacity.astype(their dtype), which wraps (256 -> 0 in uint8,
    200 -> -56 in int8): every bag came out empty, eagerly and under jit, while to_lists() was
    right."""
    layout = jaxbag.collection_layout([T("a", 10, 2, ("a",), mode="sum")])
    params = {"a": jnp.arange(20.0).reshape(10, 2)}
    values = np.zeros(capacity, np.int32)
    values[:3] = [1, 2, 3]
    jf = JF(["a"], values, np.array([[2, 1]], dtype), capacities=(capacity,))
    assert jf.to_lists() == {"a": [[1, 2], [3]]}
    want = np.array([[6.0, 8.0], [6.0, 7.0]])  # rows 1 + 2, row 3
    run = lambda p, j: jaxbag.embedding_bag_collection(p, j, layout=layout)["a"]  # noqa: E731
    np.testing.assert_array_equal(run(params, jf), want)
    np.testing.assert_array_equal(jax.jit(run)(params, jf), want)
    # lengths made narrow after construction (tree.map skips __init__): the lookup widens them
    narrow = jax.tree.map(lambda x: x.astype(dtype) if x.ndim == 2 else x, jf)
    assert narrow.lengths.dtype == dtype
    np.testing.assert_array_equal(jax.jit(run)(params, narrow), want)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_jagged_features_numpy_int64_ids_are_not_wrapped_without_x64(dtype):
    """JaggedFeatures(...) took NumPy int64 ids through jnp.asarray, which wraps 2**32 + 1 to 1:
    row 1 was read, eagerly and under jit. They are now clipped as embedding_bag's are: out of
    range (an error eagerly, skipped under jit)."""
    layout = jaxbag.collection_layout([T("a", 10, 2, ("a",), mode="sum")])
    params = {"a": jnp.arange(1.0, 21.0).reshape(10, 2)}
    jf = JF(["a"], np.array([2**32 + 1], dtype), np.array([[1]]), capacities=(1,))
    assert jf.values.dtype == jnp.int32 and int(jf.values[0]) == 2**31 - 1
    run = lambda p, j: jaxbag.embedding_bag_collection(p, j, layout=layout)["a"]  # noqa: E731
    with pytest.raises(IndexError, match=r"has id 2147483647 in example 0 \(its id 0; "
                                         r"features\.values\[0\]\); ids must be in \[0, 10\)"
                                         r"\. \(2147483647 may stand for a larger id"):
        run(params, jf)
    np.testing.assert_array_equal(jax.jit(run)(params, jf), np.zeros((1, 2)))


def test_jagged_features_repr_with_non_array_leaves():
    """repr read lengths.shape, so feature_specs' PartitionSpec pytree (and any jax.tree.map that
    changes the leaves) raised AttributeError when printed."""
    jf = JF.from_lists({"x": [[1, 2], [3]]})
    assert repr(jf).startswith("JaggedFeatures(keys=('x',), batch_size=2,")
    for other in (jax.tree.map(str, jf), jax.tree.map(lambda x: 0, jf)):
        assert "batch_size=None" in repr(other)


def test_tables_and_collections_with_the_default_init_pickle():
    """The default embedding_init was flax's variance_scaling closure, so a TableConfig, a layout
    and an NNX collection could not be pickled."""
    import pickle

    t = T("user", 10, 4, ("user",))
    assert pickle.loads(pickle.dumps(t)) == t
    layout = jaxbag.collection_layout([t])
    assert pickle.loads(pickle.dumps(layout)) == layout
    model = NnxCollection([t], rngs=nnx.Rngs(0))
    back = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(nnx.state(back)["embeddings"]["user"][...],
                                  nnx.state(model)["embeddings"]["user"][...])
    # the same values as flax's nn.Embed default
    key = jax.random.key(3)
    np.testing.assert_array_equal(t.embedding_init(key, (10, 4), jnp.float32),
                                  nn.Embed(10, 4).embedding_init(key, (10, 4), jnp.float32))


def test_linen_collection_with_a_list_of_tables_is_hashable():
    """tables=[...] (as the examples write it) made the linen module unhashable, so it could not
    be a static argument of jax.jit."""
    make = lambda: jaxbag.EmbeddingBagCollection(tables=[T("user", 10, 4, ("user",))])  # noqa: E731
    model = make()
    assert isinstance(model.tables, tuple) and hash(model) == hash(make())
    jf = JF.from_lists({"user": [[1, 2], [3]]})
    variables = model.init(jax.random.key(0), jf)
    out = jax.jit(lambda m, v, j: m.apply(v, j), static_argnums=0)(model, variables, jf)
    np.testing.assert_array_equal(out["user"], model.apply(variables, jf)["user"])


def test_linen_collection_starts_from_the_same_tables_whatever_the_layout():
    """linen drew each group array from flax's per-parameter key, which depends on the group's
    name, so stack=True and stack=False started from different tables (NNX did not)."""
    tables = [T("user", 10, 4, ("user",)), T("item", 12, 4, ("item",)), T("tag", 6, 2, ("tag",), mode="sum")]
    jf = JF.from_lists({"user": [[1]], "item": [[2]], "tag": [[3]]})
    per_table = []
    for stack in (True, False):
        model = jaxbag.EmbeddingBagCollection(tables=tables, stack=stack)
        variables = model.init(jax.random.key(7), jf)
        per_table.append(jaxbag.unpack_tables(model.layout, variables["params"]))
    assert set(per_table[0]) == {"user", "item", "tag"}
    jax.tree.map(np.testing.assert_array_equal, per_table[0], per_table[1])
    nnx_tables = [jaxbag.unpack_tables(m.layout, {k: v[...] for k, v in m.embeddings.items()})
                  for m in (NnxCollection(tables, stack=s, rngs=nnx.Rngs(7)) for s in (True, False))]
    jax.tree.map(np.testing.assert_array_equal, nnx_tables[0], nnx_tables[1])


def test_unpack_and_pack_tables_check_their_arrays():
    """unpack_tables sliced whatever it got: a [45, 8] array for a [50, 8] group gave a 25-row
    table, a whole variables dict a bare KeyError. pack_tables ignored unknown table names and
    gave a bare KeyError for a missing one."""
    layout = jaxbag.collection_layout([T("user", 20, 8, ("u",)), T("item", 30, 8, ("i",))])
    params = jaxbag.init_collection(layout, jax.random.key(0))
    (name,) = params
    with pytest.raises(ValueError, match=rf"params\['{re.escape(name)}'\].*must be float32 \[50, 8\]; "
                                         r"got float32 \[45, 8\]"):
        jaxbag.unpack_tables(layout, {name: jnp.ones((45, 8))})
    with pytest.raises(KeyError, match="no array for the groups"):
        jaxbag.unpack_tables(layout, {"params": params})
    with pytest.raises(TypeError, match="params must be a dict"):
        jaxbag.unpack_tables(layout, params[name])
    # another dtype is fine (e.g. optimiser moments or a checkpoint): each table keeps it
    half = jaxbag.unpack_tables(layout, {name: params[name].astype(jnp.bfloat16)})
    assert half["user"].dtype == jnp.bfloat16 and half["item"].shape == (30, 8)
    tables = jaxbag.unpack_tables(layout, params)
    with pytest.raises(KeyError, match=r"missing \['item'\]"):
        jaxbag.pack_tables(layout, {"user": tables["user"]})
    with pytest.raises(ValueError, match=r"not in the layout: \['itme'\]"):
        jaxbag.pack_tables(layout, {**tables, "itme": tables["item"]})
    np.testing.assert_array_equal(jaxbag.pack_tables(layout, tables)[name], params[name])


def test_table_config_errors_name_the_table_and_show_the_fix():
    with pytest.raises(ValueError, match=r"table 'a': mode must be one of"):
        T("a", 4, 2, ("x",), mode="avg")
    with pytest.raises(ValueError, match=r"table 'a': padding_idx must be within"):
        T("a", 4, 2, ("x",), padding_idx=4)
    with pytest.raises(ValueError, match=r"table 'a': num_embeddings.*pass int\(x\)"):
        T("a", jnp.int32(4), 2, ("x",))
    for names in (None, 5):  # (tuple(None) said only "'NoneType' object is not iterable")
        with pytest.raises(TypeError, match=rf"table 'a': feature_names must be a non-empty tuple "
                                            rf"of str; got {names}, e.g. feature_names=\('a',\)"):
            T("a", 4, 2, names)
    one = T("a", 4, 2, ("x",))
    for make in (lambda: jaxbag.collection_layout(one),
                 lambda: NnxCollection(one, rngs=nnx.Rngs(0)),
                 lambda: jaxbag.EmbeddingBagCollection(tables=one)):
        with pytest.raises(TypeError, match=r"got one TableConfig \('a'\). Pass a list"):
            make()
    for init in (nn.with_partitioning(nn.initializers.normal(), ("model", None)),
                 nnx.with_partitioning(nnx.initializers.normal(), ("model", None))):
        boxed = T("b", 4, 2, ("x",), embedding_init=init)
        with pytest.raises(TypeError, match=r"table 'b': embedding_init returned a .*sharding plan"):
            NnxCollection([boxed], rngs=nnx.Rngs(0))


# -- from mutation testing of the collection modules: each fails on a seeded bug the suite missed --


def test_tables_of_one_shape_start_from_different_values():
    """Each table is drawn from its own key (derived from its name): with one key for all, two
    tables of one shape started equal (stacked or not, functional core or NNX), and every
    layout-independence test still passed."""
    tables = [T("user", 6, 3, ("u",)), T("item", 6, 3, ("i",))]
    for stack in (True, False):
        layout = jaxbag.collection_layout(tables, stack=stack)
        per_table = jaxbag.unpack_tables(layout, jaxbag.init_collection(layout, jax.random.key(0)))
        assert not np.allclose(per_table["user"], per_table["item"]), stack
        model = NnxCollection(tables, stack=stack, rngs=nnx.Rngs(0))
        per_table = jaxbag.unpack_tables(model.layout, {k: v[...] for k, v in model.embeddings.items()})
        assert not np.allclose(per_table["user"], per_table["item"]), stack


def test_module_dtype_sets_the_concatenated_output():
    """The modules' ``dtype`` is the concatenated output's dtype (linen and NNX), as
    embedding_bag_collection's ``dtype``; it was only checked, never passed on."""
    tables = [T("a", 4, 2, ("x",), mode="sum"), T("b", 4, 3, ("y",), mode="sum")]
    layout = jaxbag.collection_layout(tables)
    params = jaxbag.pack_tables(layout, {"a": jnp.arange(8.0).reshape(4, 2) / 3,
                                         "b": -jnp.arange(12.0).reshape(4, 3) / 3})
    jf = JF.from_lists({"x": [[3, 1]], "y": [[0, 2]]})
    want = jaxbag.embedding_bag_collection(params, jf, layout=layout, concat=True, dtype=jnp.bfloat16)
    assert want.dtype == jnp.bfloat16
    lin = jaxbag.EmbeddingBagCollection(tables=tables, dtype=jnp.bfloat16)
    out = lin.apply({"params": params}, jf, concat=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out.astype(jnp.float32), want.astype(jnp.float32))
    model = NnxCollection(tables, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    for name, value in params.items():
        model.embeddings[name][...] = value
    out = model(jf, concat=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out.astype(jnp.float32), want.astype(jnp.float32))


def test_nnx_collection_takes_stack():
    """stack=False gives one NNX parameter per table (the layout-independence tests compare
    unpacked tables, which agree whether or not stack is honoured)."""
    tables = [T("user", 10, 4, ("user",)), T("item", 12, 4, ("item",))]
    plain = NnxCollection(tables, stack=False, rngs=nnx.Rngs(0))
    assert not plain.layout.stacked and set(plain.embeddings) == {"user", "item"}
    assert set(NnxCollection(tables, rngs=nnx.Rngs(0)).embeddings) == {"user+item"}


def test_eager_id_check_reads_every_shard():
    """Features split into num_shards blocks (no plan): an id out of range in the second block
    is the collection's IndexError naming the feature, the id, its example, its place in that
    example's bag and in ``values`` (with the check reading the first block's region for every
    block, only the op's error about a stacked id -1 at indices[2] came, naming neither the
    feature nor the table; then the place was a position within a shard)."""
    layout = jaxbag.collection_layout([T("a", 4, 2, ("x",), mode="sum")])
    params = {"a": jnp.arange(8.0).reshape(4, 2)}
    bad = JF.from_lists({"x": [[1], [2, 7]]}, num_shards=2)
    k = bad.shard_capacity + 1  # shard 1's region starts at T; 7 is its 2nd id
    assert int(bad.values[k]) == 7
    with pytest.raises(IndexError, match=rf"feature 'x' .*has id 7 in example 1 \(its id 1; "
                                         rf"features\.values\[{k}\]\)"):
        jaxbag.embedding_bag_collection(params, bad, layout=layout)
    # three examples in one shard: the 2nd example's 3rd id
    bad = JF.from_lists({"x": [[1], [2, 3, 9], [0]]})
    with pytest.raises(IndexError, match=r"has id 9 in example 1 \(its id 2; features\.values\[3\]\)"):
        jaxbag.embedding_bag_collection(params, bad, layout=layout)
    ok = JF.from_lists({"x": [[1], [2, 3]]}, num_shards=2)
    np.testing.assert_array_equal(jaxbag.embedding_bag_collection(params, ok, layout=layout)["x"],
                                  [[2.0, 3.0], [10.0, 12.0]])


def test_outputs_follow_feature_names_whatever_the_groups_and_names():
    """Tables "a" and "c" stack (width 2) ahead of "b" (width 3), and the feature names are not in
    sorted order: the dict and the concatenation still follow layout.feature_names (the group
    order and the sorted order both differ from it; test_concat_order_and_dtype's names are
    sorted and its groups in table order, so it could not tell)."""
    tables = [T("a", 4, 2, ("q",), mode="sum"), T("b", 4, 3, ("p",), mode="sum"),
              T("c", 4, 2, ("o",), mode="sum")]
    layout = jaxbag.collection_layout(tables)
    assert [g.name for g in layout.groups] == ["a+c", "b"] and layout.feature_names == ("q", "p", "o")
    params = jaxbag.pack_tables(layout, {"a": jnp.arange(8.0).reshape(4, 2),
                                         "b": -jnp.arange(12.0).reshape(4, 3),
                                         "c": 100 + jnp.arange(8.0).reshape(4, 2)})
    jf = JF.from_lists({"o": [[1]], "p": [[0, 2]], "q": [[3]]})
    out = jaxbag.embedding_bag_collection(params, jf, layout=layout)
    assert list(out) == ["q", "p", "o"]
    cat = jaxbag.embedding_bag_collection(params, jf, layout=layout, concat=True)
    assert cat.tolist() == [[6.0, 7.0, -6.0, -8.0, -10.0, 102.0, 103.0]]


# -- review findings: dtypes, concat_features' input, the layout's type (each failed before) ---


def test_table_dtype_none_and_float64_without_x64_are_refused():
    """dtype=None silently became float64 (jnp.dtype(None)), and a float64 table without x64 was
    created as float32 by init_collection and then refused by embedding_bag_collection as not
    float64: the error told the user to do what they had done."""
    assert not jax.config.jax_enable_x64
    with pytest.raises(TypeError, match=r"table 't': dtype must be a floating-point dtype "
                                        r"\(float32, bfloat16, float16\); got dtype=None\. For "
                                        r"example: TableConfig\('t', \.\.\., dtype=jnp\.float32\)"):
        T("t", 5, 2, ("a",), dtype=None)
    with pytest.raises(TypeError, match=r"table 't': dtype must be a floating-point dtype .*got "
                                        r"dtype=int32"):
        T("t", 5, 2, ("a",), dtype=jnp.int32)
    for dtype in (jnp.float64, "float64", np.float64):
        with pytest.raises(TypeError, match=r"table 't': dtype=float64 needs JAX's 64-bit mode, "
                                            r"which is off .*as float32.*dtype=jnp\.float32.*"
                                            r"jax_enable_x64"):
            T("t", 5, 2, ("a",), dtype=dtype)
    with jax.enable_x64(True):  # with x64 a float64 table works end to end
        t64 = T("t", 5, 2, ("a",), dtype=jnp.float64, mode="sum")
        layout = jaxbag.collection_layout([t64])
        params = jaxbag.init_collection(layout, jax.random.key(0))
        assert params["t"].dtype == jnp.float64
        out = jaxbag.embedding_bag_collection(params, JF.from_lists({"a": [[1, 3]]}), layout=layout)
        assert out["a"].dtype == jnp.float64
        np.testing.assert_allclose(out["a"][0], params["t"][1] + params["t"][3])
    # built under x64, used without it: refused when the layout is built, not after init
    with pytest.raises(TypeError, match=r"table 't': dtype=float64 needs JAX's 64-bit mode"):
        jaxbag.collection_layout([t64])


def test_a_feature_listed_twice_in_one_table_is_named_as_such():
    """The message said "feature 'a' is read by tables 't' and 't'"."""
    with pytest.raises(ValueError, match=r"table 't': feature 'a' is listed twice in "
                                         r"feature_names=\('a', 'a'\); list each feature once: "
                                         r"feature_names=\('a',\)"):
        T("t", 5, 2, ("a", "a"))
    with pytest.raises(ValueError, match=r"feature 'b' is listed twice.*\('a', 'b'\)"):
        T("t", 5, 2, ("a", "b", "b"))
    with pytest.raises(ValueError, match="feature 'x' is read by tables 'a' and 'b'"):
        jaxbag.collection_layout([T("a", 4, 2, ("x",)), T("b", 4, 2, ("x",))])


def test_concat_features_checks_its_outputs():
    """A feature output of the wrong width was concatenated silently ([2, 6] where
    [B, output_features] = [2, 5] was promised), and a missing feature was a bare KeyError."""
    layout = jaxbag.collection_layout([T("a", 4, 2, ("x",)), T("b", 4, 3, ("y",))])
    x, y = jnp.ones((2, 2)), jnp.zeros((2, 3))
    assert jaxbag.concat_features(layout, {"x": x, "y": y}).shape == (2, layout.output_features)
    with pytest.raises(ValueError, match=r"outputs\['y'\] must be \[B, D\] = \[B, 3\] \(D the "
                                         r"width of table 'b'\); got shape \(2, 4\)"):
        jaxbag.concat_features(layout, {"x": x, "y": jnp.ones((2, 4))})
    with pytest.raises(ValueError, match=r"outputs\['x'\] must be \[B, D\] = \[B, 2\].*got shape "
                                         r"\(2,\)"):
        jaxbag.concat_features(layout, {"x": jnp.ones(2), "y": y})
    with pytest.raises(ValueError, match=r"outputs has no feature 'y': concat_features needs a "
                                         r"\[B, 3\] array for every feature of the layout "
                                         r"\['x', 'y'\]; got the features \['x'\]"):
        jaxbag.concat_features(layout, {"x": x})
    with pytest.raises(ValueError, match=r"outputs\['y'\] must be \[B, 3\] with the batch of "
                                         r"outputs\['x'\], B=2; got shape \(3, 3\)"):
        jaxbag.concat_features(layout, {"x": x, "y": jnp.zeros((3, 3))})
    with pytest.raises(TypeError, match=r"outputs must be a dict \{feature: \[B, D_f\] array\}"):
        jaxbag.concat_features(layout, [x, y])


def test_functions_taking_a_layout_name_it_when_given_the_tables():
    """layout=[TableConfig(...)] failed with AttributeError: 'list' object has no attribute
    'feature_names'."""
    tables = [T("a", 4, 2, ("x",))]
    layout = jaxbag.collection_layout(tables)
    params = jaxbag.init_collection(layout, jax.random.key(0))
    jf = JF.from_lists({"x": [[1]]})
    match = (r"{}: layout must be a jaxbag.CollectionLayout; got a list of TableConfig\. Build it "
             r"from the tables once with layout = jaxbag.collection_layout\(tables\)")
    with pytest.raises(TypeError, match=match.format("embedding_bag_collection")):
        jaxbag.embedding_bag_collection(params, jf, layout=tables)
    with pytest.raises(TypeError, match=match.format("init_collection")):
        jaxbag.init_collection(tables, jax.random.key(0))
    with pytest.raises(TypeError, match=match.format("pack_tables")):
        jaxbag.pack_tables(tables, {"a": jnp.ones((4, 2))})
    with pytest.raises(TypeError, match=match.format("unpack_tables")):
        jaxbag.unpack_tables(tables, params)
    # (these three reached an AttributeError too: 'feature_names', 'groups', 'tables')
    with pytest.raises(TypeError, match=match.format("embedding_bag_collection_rows")):
        jaxbag.embedding_bag_collection_rows(params, jf, layout=tables)
    state = jaxbag.collection_optimizer(jaxbag.sparse_adam(0.1), layout=layout).init(params)
    with pytest.raises(TypeError, match=match.format("unpack_states")):
        jaxbag.unpack_states(tables, state)
    with pytest.raises(TypeError, match=match.format("pack_states")):
        jaxbag.pack_states(tables, jaxbag.unpack_states(layout, state))
    with pytest.raises(TypeError, match=r"concat_features: layout must be a jaxbag.Collection"
                                        r"Layout; got dict"):
        jaxbag.concat_features({"x": 2}, {"x": jnp.ones((1, 2))})


# -- from mutation testing: each fails on a seeded bug the suite missed ---------------------------


def test_concat_of_one_narrow_dtype_keeps_it():
    """Outputs that share one dtype are concatenated in it (bf16 tables: bf16), not float32."""
    tables = [T("a", 4, 2, ("x",), dtype=jnp.bfloat16), T("b", 4, 3, ("y",), dtype=jnp.bfloat16)]
    layout = jaxbag.collection_layout(tables)
    params = jaxbag.init_collection(layout, jax.random.key(0))
    jf = JF.from_lists({"x": [[1], [2]], "y": [[0, 3], []]})
    out = jaxbag.embedding_bag_collection(params, jf, layout=layout, concat=True)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 5)
    mixed = jaxbag.concat_features(layout, {"x": jnp.ones((2, 2), jnp.bfloat16),
                                            "y": jnp.ones((2, 3), jnp.float16)})
    assert mixed.dtype == jnp.float32


def test_concat_features_follows_the_layout_not_the_dicts_order():
    layout = jaxbag.collection_layout([T("a", 4, 1, ("x",)), T("b", 4, 2, ("y", "z"))])
    outputs = {"z": jnp.full((1, 2), 3.0), "y": jnp.full((1, 2), 2.0), "x": jnp.full((1, 1), 1.0)}
    assert list(outputs) != list(layout.feature_names)
    out = jaxbag.concat_features(layout, outputs)
    assert out.tolist() == [[1.0, 2.0, 2.0, 3.0, 3.0]]


def test_init_collection_does_not_depend_on_the_python_hash_seed():
    """Each table's key is folded from a stable hash of its name (crc32), never Python's hash(),
    which changes with PYTHONHASHSEED: the same key gave other tables in another process."""
    import os
    import subprocess
    import sys

    script = (
        "import jax, jaxbag\n"
        "t = [jaxbag.TableConfig('user', 3, 2, ('u',)), jaxbag.TableConfig('item', 4, 2, ('i',))]\n"
        "layout = jaxbag.collection_layout(t, stack=False)\n"
        "p = jaxbag.init_collection(layout, jax.random.key(0))\n"
        "print(repr({k: v.tolist() for k, v in sorted(p.items())}))\n"
    )
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        runs.append(done.stdout)
    assert runs[0] == runs[1]
    layout = jaxbag.collection_layout(
        [T("user", 3, 2, ("u",)), T("item", 4, 2, ("i",))], stack=False)
    here = jaxbag.init_collection(layout, jax.random.key(0))
    assert runs[0].strip() == repr({k: v.tolist() for k, v in sorted(here.items())})


def test_pack_tables_casts_each_array_to_its_tables_dtype():
    layout = jaxbag.collection_layout([T("t", 4, 2, ("x",), dtype=jnp.bfloat16, mode="sum")])
    table = jnp.arange(8.0, dtype=jnp.float32).reshape(4, 2)
    params = jaxbag.pack_tables(layout, {"t": table})
    assert params["t"].dtype == jnp.bfloat16
    out = jaxbag.embedding_bag_collection(params, JF.from_lists({"x": [[1, 2]]}), layout=layout)
    assert out["x"].dtype == jnp.bfloat16 and out["x"].tolist() == [[6.0, 8.0]]


@pytest.mark.parametrize("jit", [False, True])
def test_eager_gradients_under_an_explicit_context_mesh_stay_on_it(jit):
    """Under ``jax.set_mesh`` with Explicit axes, an eager ``jax.grad`` of unplaced tables
    came back on an Auto copy of the mesh (the next eager op on it raised "context mesh ...
    should match the aval mesh"), and with a bfloat16 table ``jax.grad`` itself raised: the
    lookup's gather resharded ids that only carried the context mesh in their type."""
    import optax

    mesh = jax.make_mesh((1, 1), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    tables = [jaxbag.TableConfig("a", 8, 4, ("fa",)),
              jaxbag.TableConfig("s", 8, 2, ("fs",), dtype=jnp.bfloat16, mode="max")]
    layout = jaxbag.collection_layout(tables)
    params = jaxbag.init_collection(layout, jax.random.key(0))
    jf = jaxbag.JaggedFeatures.from_lists({"fa": [[1, 2], [3]], "fs": [[4], [5, 6]]})
    head = jnp.arange(1.0, 7.0)

    def loss(p):
        x = jaxbag.embedding_bag_collection(p, jf, layout=layout, concat=True, dtype=jnp.float32)
        return jnp.sum(x @ head)

    want = jax.grad(loss)(params)  # no mesh
    grad = jax.jit(jax.grad(loss)) if jit else jax.grad(loss)
    with jax.set_mesh(mesh):
        got = grad(params)
        for name, g in got.items():
            assert g.sharding.mesh.axis_types == mesh.axis_types, name
            assert g.dtype == params[name].dtype, name
        updates, _ = optax.sgd(0.1).update(got, optax.sgd(0.1).init(params))  # eager ops on it
        jax.block_until_ready(optax.apply_updates(params, updates))
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name], np.float32),
                                      np.asarray(want[name], np.float32))
    assert float(np.abs(np.asarray(want["a"])).sum()) > 0


def test_init_collection_keys_follow_table_names_not_positions():
    """A table's initial values depend on the key and its name only: reordering the tables or
    adding one does not re-initialise the others (a key from the table's position passed)."""
    a, b, c = T("a", 5, 3, ("x",)), T("b", 6, 3, ("y",)), T("c", 4, 3, ("z",))
    key = jax.random.key(0)

    def tables(ts):
        layout = jaxbag.collection_layout(ts)
        return jaxbag.unpack_tables(layout, jaxbag.init_collection(layout, key))

    ab, ba, cab = tables([a, b]), tables([b, a]), tables([c, a, b])
    for name in ("a", "b"):
        np.testing.assert_array_equal(ab[name], ba[name])
        np.testing.assert_array_equal(ab[name], cab[name])


@pytest.mark.parametrize("lists, where", [
    ({"x": [[1], [7, 2]]}, r"in example 1 \(its id 0; features\.values\[1\]\)"),
    ({"x": [[1, 2], [], [9]]}, r"in example 2 \(its id 0; features\.values\[2\]\)"),
])
def test_eager_id_error_names_the_first_id_of_a_later_example(lists, where):
    """The bad id is the first of its example (its position equals the previous examples' end):
    searchsorted(side="left") named the example before, at its last id."""
    layout = jaxbag.collection_layout([T("a", 4, 2, ("x",), mode="sum")])
    with pytest.raises(IndexError, match=where):
        jaxbag.embedding_bag_collection({"a": jnp.zeros((4, 2))}, JF.from_lists(lists), layout=layout)


def test_eager_id_check_of_split_features_reads_only_each_shards_ids():
    """num_shards=2: the check of shard 0's 'x' reads its one id, not the 'y' id after it (50,
    valid for 'y''s table, out of range for 'x''s): reading past it raised a false IndexError."""
    layout = jaxbag.collection_layout([T("a", 4, 2, ("x",), mode="sum"),
                                       T("b", 100, 2, ("y",), mode="sum")])
    params = jaxbag.pack_tables(layout, {"a": jnp.arange(8.0).reshape(4, 2), "b": jnp.ones((100, 2))})
    jf = JF.from_lists({"x": [[1], [2]], "y": [[50], [60]]}, num_shards=2,
                       capacity={"x": 1, "y": 1})  # values [1, 50 | 2, 60]
    out = jaxbag.embedding_bag_collection(params, jf, layout=layout)
    np.testing.assert_array_equal(out["x"], [[2.0, 3.0], [4.0, 5.0]])


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("batch_axis, match", [
    (None, r"batch_axis=None \(replicated batch\).*num_shards=2"),
    ("data", r"batch_axis='data' \(1 devices\).*num_shards=2"),
])
def test_planned_lookup_refuses_features_split_unlike_the_plan(rows, batch_axis, match):
    tables = [T("a", 5, 3, ("x",), mode="sum"), T("b", 6, 3, ("y",), mode="sum")]
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    plan = jaxbag.sharding.plan_sharding(tables, mesh, axis_name="model", batch_axis=batch_axis)
    layout = jaxbag.collection_layout(tables, plan=plan)
    params = jaxbag.init_collection(layout, jax.random.key(0))
    fn = jaxbag.embedding_bag_collection_rows if rows else jaxbag.embedding_bag_collection
    with pytest.raises(ValueError, match=match):
        fn(params, JF.from_lists({"x": [[1], [2, 3]], "y": [[0], []]}, num_shards=2), layout=layout)


@pytest.mark.parametrize("dtype, itemsize", [(jnp.float32, 4), (jnp.bfloat16, 2), (jnp.float16, 2)])
def test_table_nbytes_follows_its_dtype(dtype, itemsize):
    """The planner sizes tables by nbytes (its threshold and device budget)."""
    t = T("t", 10, 3, ("x",), dtype=dtype)
    assert t.nbytes == 10 * 3 * itemsize == t.init(jax.random.key(0)).nbytes


def test_nnx_collection_params_carry_the_plans_sharding_metadata():
    """The NNX collection's parameters carry the plan's specs as ``out_sharding`` metadata (what
    nnx.get_partition_spec reads). init_collection already places the arrays, so the 8-device
    test of their shardings passed without it."""
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    tables = (T("user", 8, 4, ("user",)), T("item", 6, 4, ("item",)))
    plan = jaxbag.sharding.plan_sharding(tables, mesh, axis_name="model")
    m = NnxCollection(tables, plan=plan, rngs=nnx.Rngs(0))
    got = nnx.get_partition_spec(nnx.state(m))["embeddings"]
    specs = m.layout.param_specs()
    assert set(specs) == {g.name for g in m.layout.groups} == set(m.embeddings)
    for name, spec in specs.items():
        assert got[name].get_value() == spec
        assert m.embeddings[name].get_metadata()["out_sharding"] == spec
