"""jaxbag.sharding: multi-device checks in a subprocess (8 simulated CPU devices), plus 1-device ones.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only works if set before jax is imported,
and this pytest process has imported jax already (conftest), so each case of
tests/_sharding_worker.py runs in its own ``python`` subprocess (run in parallel by xdist). Each
case compares the sharded op / collection with the single-device one, forward and gradient, on
1-D (8) and 2-D (2 x 4) meshes, and inspects the compiled HLO for table traffic.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jaxbag
import jaxbag.sharding as jsh
from _devices import run_on_8_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_sharding_worker.py"
CASES = [
    "op_1d",
    "op_2d",
    "op_options",
    "collection",
    "planner",
    "modules",
    "sparse",
    "collection_sparse",
    "split_features",
    "plain_explicit",
    "experiment",
    "explicit_layouts",
    "vmap_explicit",
    "sparse_explicit",
]


def _worker_cases() -> list[str]:
    tree = ast.parse(WORKER.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CASES":
            return [k.value for k in node.value.keys]
    raise AssertionError("no CASES dict in the worker")


def test_every_worker_case_is_run():
    assert sorted(_worker_cases()) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_on_8_devices(case):
    proc = run_on_8_devices(WORKER, case)
    assert proc.returncode == 0, f"{case} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert f"{case}: ok" in proc.stdout


# -- in-process checks on this process's single device ---------------------------------------------


def _mesh1():
    return jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))


def test_one_device_mesh_equals_core():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(10, 3)).astype(np.float32))
    ids = jnp.asarray([1, 4, 4, 0, 9, 2], jnp.int32)
    offsets = jnp.asarray([0, 2, 2, 5], jnp.int32)
    modes = ("sum", "mean", "max", "sqrtn")

    @jax.jit
    def both(w, ids, offsets):
        mesh = _mesh1()
        return {
            m: (
                jsh.embedding_bag(w, ids, offsets, mesh=mesh, axis_name="model", mode=m),
                jaxbag.embedding_bag(w, ids, offsets, mode=m),
            )
            for m in modes
        }

    for mode, (got, want) in both(w, ids, offsets).items():
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=mode)
        np.testing.assert_array_equal(got[1], np.zeros(3, np.float32))  # the empty bag
        assert np.abs(np.asarray(want)).sum() > 0


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_eager_sharded_sparse_step_equals_jit_and_keeps_the_placements(axis_type):
    """Called eagerly, the sharded ops run their shard_map inside a jit (compiled once per call,
    not dispatched op by op: seconds per call before); the results equal the jitted step's and
    are placed as the specs say, so a later jitted step given them does not compile again."""
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(axis_type,) * 2)
    opt = jaxbag.sparse_adam(0.1)
    ids, offs = jnp.array([1, 4, 4, 0, 9, 2]), jnp.array([0, 2, 2, 4])
    kw = dict(mesh=mesh, axis_name="model", batch_axis="data", mode="mean")

    def step(w, s):
        bags, pb = jsh.embedding_bag_rows(w, ids, offs, **kw)
        rg = pb(jnp.cos(bags))
        return bags, rg, *jsh.sparse_update(opt, w, s, rg, mesh=mesh, axis_name="model")

    with jax.set_mesh(mesh):
        w = jsh.shard_table(jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32),
                            mesh, "model")
        s = jsh.sparse_init(opt, w, mesh=mesh, axis_name="model")
        eager = step(w, s)
        jitted = jax.jit(step)
        lazy = jitted(w, s)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, lazy)
        bags, rg, w1, s1 = eager
        # in the form a jitted step returns them: P() on this one-device Auto mesh (size-1 axes
        # dropped), the specs padded to the rank on an Explicit one
        explicit = axis_type == AxisType.Explicit
        assert bags.sharding.spec == (P("data", None) if explicit else P())
        assert rg.rows.sharding.spec == (P("model") if explicit else P())
        assert rg.grads.sharding.spec == (P("model", None) if explicit else P())
        assert w1.sharding.spec == w.sharding.spec == (P("model", None) if explicit else P())
        assert s1.mu.sharding.spec == s.mu.sharding.spec == w.sharding.spec
        jitted(w1, s1)  # the eager results as inputs: no second compile
        assert jitted._cache_size() == 1
        # a batch without ids (its own code path) places its empty row gradients the same way
        empty, pb = jsh.embedding_bag_rows(w, jnp.zeros((0,), jnp.int32), jnp.zeros((4,), jnp.int32),
                                           size=3, **kw)
        rg0 = pb(jnp.ones_like(empty))
        assert (rg0.rows.sharding.spec, rg0.grads.sharding.spec) == (
            rg.rows.sharding.spec, rg.grads.sharding.spec)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
def test_sharded_rows_with_too_few_slots(mode):
    """Eagerly a clear error; under jit the overflow row gets no gradient and the others get their
    exact gradient (the overflow id still counts in its bag's mean: it used to be dropped)."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32)
    ids, offs = jnp.array([7, 1, 3, 7, 9, 1]), jnp.array([0, 2, 4])
    kw = dict(mesh=_mesh1(), axis_name="model", mode=mode, size=3)
    with pytest.raises(ValueError, match=r"size=3 row slots are too few: this batch has 4 distinct"):
        jsh.embedding_bag_rows(w, ids, offs, **kw)

    @jax.jit
    def run(w, ids, offs):
        bags, pb = jsh.embedding_bag_rows(w, ids, offs, **kw)
        return bags, pb(jnp.ones_like(bags))

    bags, g = run(w, ids, offs)
    np.testing.assert_allclose(bags, jaxbag.embedding_bag(w, ids, offs, mode=mode), rtol=1e-6)
    full = jax.grad(lambda w: jaxbag.embedding_bag(w, ids, offs, mode=mode).sum())(w)
    np.testing.assert_array_equal(g.rows, [1, 3, 7])
    np.testing.assert_allclose(g.grads, full[jnp.array([1, 3, 7])], rtol=1e-6)


def test_sharded_op_widens_narrow_integer_ids():
    """int16 ids with V = 40000 > int16 max: the shard-local range checks wrapped V and every bag
    came back zero under jit."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(40000, 2)), jnp.float32)
    ids, offs = jnp.array([0, 5, 100], jnp.int16), jnp.array([0, 1], jnp.int32)
    got = jax.jit(lambda w, i, o: jsh.embedding_bag(w, i, o, mesh=_mesh1(), axis_name="model",
                                                     mode="sum"))(w, ids, offs)
    np.testing.assert_allclose(got, jaxbag.embedding_bag(w, ids.astype(jnp.int32), offs, mode="sum"),
                               rtol=1e-6)
    assert np.abs(np.asarray(got)).sum() > 0


def test_sharded_int64_ids_and_segment_ids_are_not_wrapped_into_range():
    """x64: int64 segment ids and ids were cast to int32 before the range checks, so a padding
    segment id 2**32 joined bag 0 (eagerly and under jit), and an out-of-range id 2**32 + 1 got
    row 1's gradient in the pullback."""
    w = jnp.arange(16.0, dtype=jnp.float32).reshape(8, 2)
    kw = dict(mesh=_mesh1(), axis_name="model", mode="sum")
    with jax.enable_x64(True):
        ids, seg = jnp.array([3, 5], jnp.int64), jnp.array([0, 2**32], jnp.int64)
        f = lambda w, i, s: jsh.embedding_bag(w, i, segment_ids=s, num_bags=1, **kw)
        rows = lambda w, i, s: jsh.embedding_bag_rows(w, i, segment_ids=s, num_bags=1, **kw)[0]
        for got in (f(w, ids, seg), jax.jit(f)(w, ids, seg), jax.jit(rows)(w, ids, seg)):
            np.testing.assert_array_equal(got, w[3:4])

        @jax.jit
        def step(w, i, o):
            bags, pb = jsh.embedding_bag_rows(w, i, o, **kw)
            g = pb(jnp.ones_like(bags))
            return bags, g.rows, g.grads

        bags, r, g = step(w, jnp.array([2**32 + 1, 3], jnp.int64), jnp.array([0, 1], jnp.int64))
        np.testing.assert_array_equal(bags, np.stack([np.zeros(2), np.asarray(w)[3]]))
        touched = sorted(int(x) for x, gx in zip(np.asarray(r), np.asarray(g)) if x < 8 and gx.any())
        assert touched == [3]


def test_sharded_segment_ids_stay_sorted():
    """x64: int64 segment ids were range-mapped with padding -> B, so sorted ids [-1, -1, 0, 0, 1]
    reached the reductions (told the ids are sorted) as [2, 2, 0, 0, 1]."""
    from jaxbag._src.segments import segment_ids_int32 as _segment_ids_int32

    with jax.enable_x64(True):
        for dtype in (jnp.int32, jnp.int64):
            seg = jnp.array([-5, -1, 0, 0, 1, 2, 2**20], dtype)
            got = _segment_ids_int32(seg, 2)
            assert got.dtype == jnp.int32 and got.tolist() == [-1, -1, 0, 0, 1, 2, 2]
        got = _segment_ids_int32(jnp.array([0, 2**32, 2**40], jnp.int64), 1)
        assert got.tolist() == [0, 1, 1]


def test_a_hand_built_sharding_plan_is_checked():
    """ShardingPlan is a public dataclass; a plan built or edited by hand gave 'list index out of
    range', KeyError 'modl', or (kind 'rows') was silently taken as table-wise."""
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    tables = [jaxbag.TableConfig("a", 10, 4, ("fa",)), jaxbag.TableConfig("b", 7, 4, ("fb",))]
    plan = jsh.plan_sharding(tables, mesh, axis_name="model", batch_axis="data")
    assert jaxbag.collection_layout(tables, plan=plan).groups
    for change, match in [
        (dict(placements=(("a", "table", 1), ("b", "table", 0))),
         r"placements\[0\] = \('a', 'table', 1\): a table-wise table needs a device index in \[0, 1\)"),
        (dict(placements=(("a", "table", -1), ("b", "row", None))), r"device index in \[0, 1\).*got -1"),
        (dict(placements=(("a", "rows", None), ("b", "row", None))), r"kind 'rows' is not one of"),
        (dict(placements=(("a", "row", 0), ("b", "row", None))), r"a 'row' table has no device index"),
        (dict(placements=(("a", "row", None), ("a", "row", None))), r"table 'a' is placed twice"),
        (dict(placements=(("a", "row"),)), r"placements\[0\] = \('a', 'row'\) must be"),
        (dict(axis_name="modl"), r"axis_name='modl' is not an axis of the mesh"),
        (dict(batch_axis="model"), r"must be different mesh axes"),
    ]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(plan, **change)


def _fake_mesh(shape, names):
    """A mesh of ``prod(shape)`` copies of this process's one device: enough for the planner and
    the axis helpers, which read only the axis sizes (nothing is placed on it)."""
    devices = np.array([jax.devices()[0]] * int(np.prod(shape)), dtype=object).reshape(shape)
    return jax.sharding.Mesh(devices, names, axis_types=(AxisType.Auto,) * len(shape))


def test_planner_choices_in_process():
    """The planner's rules on 2- and 4-device axes, in process (the 8-device worker case covers
    the budget search): a fair-share table stays table-wise; table-wise tables go largest first
    onto the device with the fewest rows of their group (then the fewest bytes overall); a
    one-device axis keeps every table table-wise."""
    T = jaxbag.TableConfig
    mesh4 = _fake_mesh((4,), ("model",))
    assert jsh.axis_size(_fake_mesh((2, 4), ("data", "model")), ("data", "model")) == 8
    # four equal tables on four devices: each exactly the fair share (total / n), one per device
    equal = [T(f"e{i}", 100, 8, (f"f{i}",)) for i in range(4)]
    plan = jsh.plan_sharding(equal, mesh4, axis_name="model")
    assert set(plan.as_dict().values()) == {"table"}
    assert sorted(plan.placement(t.name)[1] for t in equal) == [0, 1, 2, 3]
    assert plan.device_bytes(equal) == [100 * 8 * 4] * 4
    # three of them fill exactly min_fill = 3/4 of the four blocks: "at least", so kept
    plan = jsh.plan_sharding(equal[:3], mesh4, axis_name="model", row_threshold_bytes=10**9)
    assert set(plan.as_dict().values()) == {"table"}
    # largest first: 20 rows alone on one device, the two 10-row tables on the other (a 20-row
    # block); in the given order 10 + 20 would share a device (a 30-row block, then min_fill)
    mesh2 = _fake_mesh((2,), ("model",))
    lopsided = [T("a", 10, 4, ("a",)), T("b", 10, 4, ("b",)), T("c", 20, 4, ("c",))]
    plan = jsh.plan_sharding(lopsided, mesh2, axis_name="model", row_threshold_bytes=10**9)
    assert set(plan.as_dict().values()) == {"table"}
    assert plan.placement("a")[1] == plan.placement("b")[1] != plan.placement("c")[1]
    assert plan.device_bytes(lopsided) == [20 * 4 * 4] * 2
    # the group's rows decide before the bytes of other groups: "big" (another width) on device
    # 0 must not push both narrow tables onto device 1 (which would make min_fill send them
    # row-wise); "big" alone is sent row-wise by min_fill
    mixed = [T("big", 200, 8, ("g",)), T("n1", 100, 4, ("n1",)), T("n2", 100, 4, ("n2",))]
    plan = jsh.plan_sharding(mixed, mesh2, axis_name="model", row_threshold_bytes=10**9)
    assert plan.as_dict() == {"big": "row", "n1": "table", "n2": "table"}
    assert {plan.placement("n1")[1], plan.placement("n2")[1]} == {0, 1}
    # a table forced table-wise stays so, even alone (min_fill moves only the planner's choices)
    mesh3 = _fake_mesh((3,), ("model",))
    plan = jsh.plan_sharding(equal[:1], mesh3, axis_name="model", overrides={"e0": "table"})
    assert plan.placements == (("e0", "table", 0),)
    # a budget met by moving tables of two groups row-wise (the search's block of a group with
    # fewer tables than devices is its largest table)
    budget = [T("w0", 37, 2, ("a",)), T("n0", 16, 1, ("b",)), T("n1", 6, 1, ("c",)),
              T("w1", 20, 2, ("d",)), T("w2", 25, 2, ("e",))]
    plan = jsh.plan_sharding(budget, mesh2, axis_name="model", device_budget_bytes=395)
    assert set(plan.as_dict().values()) == {"row"} and max(plan.device_bytes(budget)) <= 395
    # one device: row-wise would store the same, and nothing is labelled row-wise
    plan = jsh.plan_sharding(equal, _fake_mesh((1,), ("model",)), axis_name="model",
                             row_threshold_bytes=0)
    assert set(plan.as_dict().values()) == {"table"}


def test_planned_stack_layout_in_process():
    """A planned group's stacked array on a 2-device axis, hand-computed: the row-wise table
    ("b", 5 rows: 3 per block, the last block's third row padding) first in every block, then
    the block's table-wise tables at their offsets, whatever order the tables were given in ("a"
    before "b"); the rest of a block zeros. Every id's stacked row holds that id's row, and
    unpack_tables gives the tables back. (The worker checks the init of 2 tables only, and its
    other comparisons read the tables back through the same layout, so rows packed in the wrong
    place went unnoticed. In process: packing reads only the mesh's axis sizes.)"""
    T = jaxbag.TableConfig
    tables = [T("a", 3, 2, ("x",), mode="sum"), T("b", 5, 2, ("y",), mode="sum"),
              T("c", 2, 2, ("z",), mode="sum")]
    plan = jsh.plan_sharding(tables, _fake_mesh((2,), ("model",)), axis_name="model",
                             overrides={"a": "table", "b": "row", "c": "table"})
    plan = dataclasses.replace(plan, placements=(("a", "table", 1), ("b", "row", None),
                                                 ("c", "table", 1)))
    layout = jaxbag.collection_layout(tables, plan=plan)
    (g,) = layout.groups
    assert (g.name, g.num_shards, g.shard_rows) == ("a+b+c", 2, 8)
    arrays = {t.name: 10.0 * (i + 1) + jnp.arange(2.0 * t.num_embeddings).reshape(-1, 2) / 2
              for i, t in enumerate(tables)}
    packed = jaxbag.pack_tables(layout, arrays)[g.name]
    #                        block 0: b 0..2, zeros    | block 1: b 3, 4, pad, a 0..2, c 0..1
    assert packed[:, 0].tolist() == [20, 21, 22, 0, 0, 0, 0, 0, 23, 24, 0, 10, 11, 12, 30, 31]
    np.testing.assert_array_equal(packed[:, 1], np.where(packed[:, 0] > 0, packed[:, 0] + 0.5, 0))
    for t in tables:
        rows = g.slot(t.name).stacked_ids(np.arange(t.num_embeddings), g.shard_rows)
        np.testing.assert_array_equal(packed[rows], arrays[t.name])
    back = jaxbag.unpack_tables(layout, {g.name: packed})
    for t in tables:
        np.testing.assert_array_equal(back[t.name], arrays[t.name])


def test_pad_rows_and_shard_table():
    w = jnp.arange(20.0, dtype=jnp.float32).reshape(10, 2)
    p = jsh.pad_rows(w, 4)
    assert p.shape == (12, 2)
    np.testing.assert_array_equal(p[:10], w)
    np.testing.assert_array_equal(p[10:], np.zeros((2, 2), np.float32))
    t = jsh.shard_table(p, _mesh1(), "model")
    assert t.sharding.spec == P()  # the form a jitted step returns on a one-device Auto axis
    np.testing.assert_array_equal(t, p)
    explicit = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Explicit,))
    assert jsh.shard_table(p, explicit, "model").sharding.spec == P("model", None)


def test_argument_errors_name_the_problem():
    w = jnp.ones((8, 2), jnp.float32)
    ids = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="not an axis"):
        jsh.embedding_bag(w, ids, mesh=_mesh1(), axis_name="rows")
    with pytest.raises(TypeError, match="Mesh"):
        jsh.embedding_bag(w, ids, mesh="model", axis_name="model")
    with pytest.raises(ValueError, match="mode"):
        jsh.embedding_bag(w, ids, mesh=_mesh1(), axis_name="model", mode="median")


def test_axis_size_of_tuples():
    assert jsh.axis_size(_mesh1(), ("model",)) == 1
    assert jsh.axis_size(_mesh1(), None) == 1


@pytest.mark.parametrize(
    "name", ["jaxbag._src.sharding", "jaxbag._src.planner"]
)
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(name)
    result = doctest.testmod(module, globs={}, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_public_namespace():
    for name in jsh.__all__:
        assert getattr(jsh, name) is not None
    assert jaxbag.sharding is jsh


@pytest.mark.parametrize("v, multiple, want", [(10, 3, 12), (9, 4, 12), (7, 8, 8), (12, 4, 12)])
def test_pad_rows_pads_up_to_the_next_multiple(v, multiple, want):
    """``V`` rows padded to ``ceil(V / multiple) * multiple`` (10 rows by 4 is the one case where
    ``-V % m`` and ``V % m`` agree)."""
    w = jnp.arange(2.0 * v, dtype=jnp.float32).reshape(v, 2)
    p = jsh.pad_rows(w, multiple)
    assert p.shape == (want, 2)
    np.testing.assert_array_equal(p[:v], w)
    np.testing.assert_array_equal(p[v:], np.zeros((want - v, 2), np.float32))


def test_a_mesh_mixing_auto_and_explicit_axes_is_refused():
    mixed = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Auto))
    w, ids, offs = jnp.ones((8, 2), jnp.float32), jnp.array([1, 2, 3]), jnp.array([0, 1])
    for call in (
        lambda: jsh.embedding_bag(w, ids, offs, mesh=mixed, axis_name="model", batch_axis="data"),
        lambda: jsh.shard_table(w, mixed, "model"),
        lambda: jsh.plan_sharding([jaxbag.TableConfig("a", 8, 2, ("f",))], mixed, axis_name="model"),
    ):
        with pytest.raises(ValueError, match=r"mesh axes must be all Auto or all Explicit"):
            call()


def test_sparse_update_checks_the_shape_of_traced_row_grads():
    """Under jit the placement of ``row_grads`` is unknown, so their shape alone tells global row
    numbers (a single-device pullback's ``min(N, V)`` slots) from per-shard local rows: 5 rows do
    not split over 2 shards."""
    mesh2 = _fake_mesh((2,), ("model",))
    opt = jaxbag.sparse_sgd(0.5)
    w = jnp.zeros((8, 2), jnp.float32)

    def step(w, rows, grads):
        return jsh.sparse_update(opt, w, opt.init(w), jaxbag.RowGrads(rows, grads), mesh=mesh2,
                                 axis_name="model")

    with pytest.raises(ValueError, match=r"row_grads must hold per-shard local rows split over "
                                         r"axis_name='model' \(2 devices\).*shape \(5,\)"):
        jax.eval_shape(step, w, jnp.zeros((5,), jnp.int32), jnp.zeros((5, 2), jnp.float32))


def test_an_empty_axis_name_is_refused():
    """``axis_name=()`` names no mesh axis: an error, not a silently replicated table."""
    w, ids = jnp.ones((8, 2), jnp.float32), jnp.zeros((2, 3), jnp.int32)
    for call in (lambda: jsh.embedding_bag(w, ids, mesh=_mesh1(), axis_name=()),
                 lambda: jsh.shard_table(w, _mesh1(), ()),
                 lambda: jsh.plan_sharding([jaxbag.TableConfig("a", 8, 2, ("f",))], _mesh1(),
                                           axis_name=())):
        with pytest.raises(ValueError, match="axis_name must name at least one mesh axis"):
            call()


def _best_by_brute_force(tables, overrides, mesh, min_fill=0.75):
    """The fewest bytes per device over every row/table choice of the tables not in
    ``overrides``, each plan built by the planner's own assignment (``_assign``: table-wise
    tables largest first onto the least loaded device, then ``min_fill``) and measured by
    ``ShardingPlan.device_bytes`` (the stacked layout), not by the search's block model."""
    import itertools

    from jaxbag._src import planner

    free = [t.name for t in tables if t.name not in overrides]
    best = None
    for choice in itertools.product(["row", "table"], repeat=len(free)):
        kinds = {**overrides, **dict(zip(free, choice))}
        plan = planner._assign(tables, kinds, overrides, mesh, "model", None, min_fill)
        size = max(plan.device_bytes(tables))
        best = size if best is None else min(best, size)
    return best


@settings(max_examples=150, deadline=None)
@given(
    n=st.sampled_from([2, 3, 4]),
    specs=st.lists(st.tuples(st.integers(1, 40), st.sampled_from([1, 2]),
                             st.sampled_from([None, None, None, "row", "table", "replicated"])),
                   min_size=1, max_size=6),
    slack=st.sampled_from([0, 0, 1, 7]),
)
def test_planner_meets_every_budget_some_placement_meets(n, specs, slack):
    """Groups of at most 12 free tables are searched exhaustively: whenever some choice of
    row-/table-wise for the tables not in ``overrides`` fits the budget, plan_sharding returns a
    plan that fits (it raised for tables of 11, 19, 39, 39 rows on 2 devices: it only tried the
    k largest row-wise), and under the best such choice it raises, naming the best one."""
    T = jaxbag.TableConfig
    tables = [T(f"t{i}", v, d, (f"f{i}",)) for i, (v, d, _) in enumerate(specs)]
    overrides = {f"t{i}": kind for i, (_, _, kind) in enumerate(specs) if kind is not None}
    mesh = _fake_mesh((n,), ("model",))
    best = _best_by_brute_force(tables, overrides, mesh)
    plan = jsh.plan_sharding(tables, mesh, axis_name="model", overrides=overrides,
                             device_budget_bytes=best + slack)
    assert max(plan.device_bytes(tables)) <= best + slack
    assert all(plan.as_dict()[name] == kind for name, kind in overrides.items())
    if best > 0:
        with pytest.raises(ValueError, match=rf"device_budget_bytes={best - 1:,d}"):
            jsh.plan_sharding(tables, mesh, axis_name="model", overrides=overrides,
                              device_budget_bytes=best - 1)


def test_planner_budget_cases_the_old_search_missed():
    """Hand-computed, 2 devices, 4-byte rows. (1) Tables of 11, 19, 39, 39 rows: table-wise 39 +
    19 = 58 rows on one device (232 B); the k largest row-wise never beat that; the two smallest
    row-wise give 6 + 10 + 39 = 55 rows (220 B). (2) "a" (34 rows, forced table-wise) and "b" (36
    rows, over the fair share, so row-wise by the threshold): 18 + 34 = 52 rows (416 B); keeping
    "b" table-wise too gives 36 rows (288 B). (3) Under that, the error names the search's best
    (every row-/table-wise choice tried; devices chosen greedily) and the fix."""
    T = jaxbag.TableConfig
    mesh2 = _fake_mesh((2,), ("model",))
    tables = [T("a", 11, 1, ("a",)), T("b", 19, 1, ("b",)), T("c", 39, 1, ("c",)),
              T("d", 39, 1, ("d",))]
    assert max(jsh.plan_sharding(tables, mesh2, axis_name="model").device_bytes(tables)) == 232
    plan = jsh.plan_sharding(tables, mesh2, axis_name="model", device_budget_bytes=220)
    assert plan.as_dict() == {"a": "row", "b": "row", "c": "table", "d": "table"}
    assert plan.device_bytes(tables) == [220, 220]
    pair = [T("a", 34, 2, ("a",)), T("b", 36, 2, ("b",))]
    plan = jsh.plan_sharding(pair, mesh2, axis_name="model", overrides={"a": "table"},
                             device_budget_bytes=300)
    assert plan.as_dict() == {"a": "table", "b": "table"} and plan.device_bytes(pair) == [288] * 2
    with pytest.raises(ValueError, match=r"device_budget_bytes=287 .*the search's best placement "
                       r"needs 288: every row-wise / table-wise choice of the tables not in "
                       r"overrides was tried, but .*greedily.*\)\. Tables in overrides are never "
                       r"moved"):
        jsh.plan_sharding(pair, mesh2, axis_name="model", overrides={"a": "table"},
                          device_budget_bytes=287)


def test_planner_search_pins():
    """Exact outcomes of the budget search (each pinned against a mutant that survived the
    property test's budgets): the greedy's fullest device (``_fullest``), the lower bound in the
    error, a budget exactly at the lower bound, and which device each table-wise table gets."""
    from jaxbag._src.planner import _fullest

    T = jaxbag.TableConfig
    # largest first on 3 devices: 6 | 4 | 4, then 4 joins a 4: 8 (not 6 + 4 = 10)
    assert _fullest([6, 4, 4, 4], 3) == 8
    assert _fullest([9, 7, 5], 3) == 9 and _fullest([5, 5, 5, 5, 5], 2) == 15
    # the bound: ceil(sharded rows / n) per group + replicated rows: t0..t2 (width 1) hold 6 + 12
    # (t2 replicated: 12 rows everywhere) -> ceil(18 / 4) = 5 rows + 12 = 17 rows, 68 B; t3
    # (width 2): ceil(4 / 4) = 1 row of 8 B: 76 B in all
    tables = [T("t0", 6, 1, ("a",)), T("t1", 12, 1, ("b",)), T("t2", 12, 1, ("c",)),
              T("t3", 4, 2, ("d",))]
    with pytest.raises(ValueError, match=r"needs less than 76\)"):
        jsh.plan_sharding(tables, _fake_mesh((4,), ("model",)), axis_name="model",
                          overrides={"t2": "replicated"}, device_budget_bytes=21)
    # a budget equal to the lower bound is met when a placement reaches it: 5 tables of 5, 2, 4,
    # 5, 5 rows on 3 devices, t1 replicated (2 rows): ceil(19 / 3) = 7 rows + 2 = 9 rows (36 B)
    tables = [T(f"t{i}", v, 1, (f"f{i}",)) for i, v in enumerate([5, 2, 4, 5, 5])]
    plan = jsh.plan_sharding(tables, _fake_mesh((3,), ("model",)), axis_name="model",
                             overrides={"t1": "replicated"}, device_budget_bytes=36)
    assert max(plan.device_bytes(tables)) == 36
    # device indices: largest first onto the device with the fewest rows of the group, ties to
    # the fewest bytes overall (the wide tables count), then the lowest index
    tables = [T("t0", 9, 2, ("a",)), T("t1", 11, 1, ("b",)), T("t2", 2, 1, ("c",)),
              T("t3", 5, 1, ("d",)), T("t4", 1, 1, ("e",)), T("t5", 4, 2, ("f",))]
    plan = jsh.plan_sharding(tables, _fake_mesh((2,), ("model",)), axis_name="model",
                             row_threshold_bytes=10**9, min_fill=0)
    where = {name: shard for name, _, shard in plan.placements}
    assert where == {"t0": 0, "t5": 1, "t1": 1, "t3": 0, "t2": 0, "t4": 0}, where


def test_planner_rules_at_their_bounds():
    """Pins from a mutation test of the planner (each failed to be noticed by the tests above;
    every plan here is what the documented rules give, hand-checked):

    * a table exactly at ``device_budget_bytes`` is not "larger", and a plan exactly at the
      budget fits (returned unchanged);
    * ``min_fill`` moves a group row-wise when that stores no more, equal included (a lone
      1-row table on 2 devices: 1 row each way), and tables in ``overrides`` count in the
      group's fill (three forced 5-row tables fill 3 devices, so the 15-row one goes row-wise
      at 5 rows per device, not onto a device as a 20-row block);
    * ``device_bytes`` and the budget use the table's itemsize (bfloat16: 2 bytes);
    * the largest-first step returns its first plan that fits (148 B here, though the search
      would find 144 B), keeps the tables ``min_fill`` moved row-wise, and counts a group's
      replicated rows;
    * the search's ties go to the fewest changes from the threshold's choices."""
    T = jaxbag.TableConfig
    m1, m2, m3, m4 = (_fake_mesh((n,), ("model",)) for n in (1, 2, 3, 4))

    def plan(tables, mesh, **kw):
        p = jsh.plan_sharding(tables, mesh, axis_name="model", **kw)
        return p.as_dict(), p.device_bytes(tables)

    two = [T("a", 100, 1, ("a",)), T("b", 100, 1, ("b",))]  # 400 B each
    assert plan(two, m2, device_budget_bytes=400) == ({"a": "table", "b": "table"}, [400, 400])
    assert plan([T("a", 1, 4, ("a",))], m2, row_threshold_bytes=10**9) == ({"a": "row"}, [16, 16])
    forced = [T("a", 5, 1, ("a",)), T("b", 5, 1, ("b",)), T("c", 5, 1, ("c",)), T("f", 15, 1, ("f",))]
    assert plan(forced, m3, row_threshold_bytes=10**9,
                overrides={"a": "table", "b": "table", "c": "table"}) == (
        {"a": "table", "b": "table", "c": "table", "f": "row"}, [40, 40, 40])
    for dtype in (jnp.bfloat16, jnp.float16):
        half = [T("a", 10, 4, ("a",), dtype=dtype)]
        assert plan(half, m1, device_budget_bytes=80) == ({"a": "table"}, [80])

    def tabs(spec):
        return [T(f"t{i}", v, d, (f"f{i}",)) for i, (v, d) in enumerate(spec)]

    first = tabs([(9, 1), (4, 1), (14, 2), (15, 1), (19, 1), (4, 2), (16, 1)])
    assert plan(first, m3, device_budget_bytes=148) == (
        {"t0": "table", "t1": "table", "t2": "row", "t3": "table", "t4": "row", "t5": "row",
         "t6": "table"}, [148] * 3)
    moved = tabs([(v, 1) for v in (1, 15, 28, 18, 13, 24, 15, 28, 16)])
    assert plan(moved, m3, overrides={"t0": "table"}, device_budget_bytes=220) == (
        {"t0": "table", "t1": "row", "t2": "table", "t3": "row", "t4": "table", "t5": "row",
         "t6": "row", "t7": "table", "t8": "table"}, [212] * 3)
    replicated = tabs([(20, 2), (34, 1), (13, 2), (30, 1)])
    assert plan(replicated, m4, overrides={"t0": "replicated", "t1": "table"},
                device_budget_bytes=399, min_fill=0) == (
        {"t0": "replicated", "t1": "table", "t2": "row", "t3": "row"}, [360] * 4)
    ties = tabs([(7, 1), (31, 1), (14, 2), (37, 1), (6, 2), (9, 2)])
    got, per_device = plan(ties, m2, overrides={"t1": "table"}, row_threshold_bytes=40,
                           device_budget_bytes=295)
    assert got == {"t0": "table", "t1": "table", "t2": "row", "t3": "table", "t4": "row",
                   "t5": "row"} and max(per_device) == 272


def test_planner_numbers_are_checked():
    mesh2 = _fake_mesh((2,), ("model",))
    tables = [jaxbag.TableConfig("a", 10, 2, ("a",))]
    for kwargs, error, match in [
        (dict(device_budget_bytes="100"), TypeError, r"device_budget_bytes must be None or an int"
                                                     r" >= 0 \(bytes\); got '100'"),
        (dict(device_budget_bytes=1e9), TypeError, r"got 1000000000.0, e.g. device_budget_bytes"),
        (dict(device_budget_bytes=-1), ValueError, r"device_budget_bytes must .* got -1"),
        (dict(row_threshold_bytes=-1), ValueError, r"row_threshold_bytes must be None or a number"),
        (dict(row_threshold_bytes=True), TypeError, r"row_threshold_bytes must .* got True"),
        (dict(min_fill=2.0), ValueError, r"min_fill must be a number in \[0, 1\]; got 2.0"),
        (dict(min_fill=float("nan")), ValueError, r"min_fill must .* got nan"),
        (dict(min_fill="0.5"), TypeError, r"min_fill must .* got '0.5'"),
    ]:
        with pytest.raises(error, match=match):
            jsh.plan_sharding(tables, mesh2, axis_name="model", **kwargs)
    plan = jsh.plan_sharding(tables, mesh2, axis_name="model", row_threshold_bytes=1e9, min_fill=1)
    assert plan.as_dict() == {"a": "row"}  # alone: min_fill sends it row-wise


@pytest.mark.parametrize("jit", [False, True])
def test_a_padded_table_keeps_its_real_row_count(jit):
    """``num_embeddings`` = the rows before ``pad_rows``: ``padding_idx=-1`` is the last real row
    (it was the last padding row, so row 9 was summed into the bags), ids at or past it are out of
    range (eagerly an IndexError naming 10, not the padded 12; under jit skipped), and the sparse
    path's unused row slots (which hold 10, a padding row inside the last shard) are not rows of
    the batch: only the touched rows change (on one device the only shard holds row 10)."""
    mesh = _mesh1()
    w = jnp.arange(20.0).reshape(10, 2)
    wp = jsh.shard_table(jsh.pad_rows(w, 4), mesh, "model")
    ids, offs = jnp.array([9, 1, 9, 2]), jnp.array([0, 2])
    kw = dict(mesh=mesh, axis_name="model", num_embeddings=10)

    def maybe_jit(f):
        return jax.jit(f) if jit else f

    got = maybe_jit(lambda w: jsh.embedding_bag(w, ids, offs, mode="mean", padding_idx=-1, **kw))(wp)
    want = jaxbag.embedding_bag(w, ids, offs, mode="mean", padding_idx=-1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want, [[2.0, 3.0], [4.0, 5.0]])  # row 9 skipped in both bags
    far = jnp.array([10, 1, 11, 2])
    if jit:
        got = jax.jit(lambda w, i: jsh.embedding_bag(w, i, offs, mode="mean", **kw))(wp, far)
        np.testing.assert_array_equal(got, w[jnp.array([1, 2])])
    else:
        with pytest.raises(IndexError, match=r"indices\[0\] = 10 is out of range for a table of "
                                              r"num_embeddings=10"):
            jsh.embedding_bag(wp, far, offs, mode="mean", **kw)
    opt = jaxbag.sparse_adam(0.1)

    def step(w, s):
        bags, pb = jsh.embedding_bag_rows(w, jnp.array([9, 1, 3, 2]), offs, mode="sum",
                                          padding_idx=-1, size=6, **kw)
        g = pb(jnp.ones_like(bags))
        return jsh.sparse_update(opt, w, s, g, mesh=mesh, axis_name="model"), g.rows

    (w2, _), rows = maybe_jit(step)(wp, jsh.sparse_init(opt, wp, mesh=mesh, axis_name="model"))
    assert sorted(rows.tolist()) == [1, 2, 3, 12, 12, 12]  # 12: this shard's "no row" (R)
    bags, pb = jaxbag.embedding_bag_rows(w, jnp.array([9, 1, 3, 2]), offs, mode="sum",
                                         padding_idx=-1, size=6)
    w3, _ = opt.update(w, opt.init(w), pb(jnp.ones_like(bags)))
    np.testing.assert_allclose(w2[:10], w3, rtol=1e-6)
    np.testing.assert_array_equal(w2[10:], np.zeros((2, 2)))
    for bad in (13, 0, 10.0, jnp.int32(10)):
        with pytest.raises(ValueError, match=r"num_embeddings must be an int in \[1, 12\]"):
            jsh.embedding_bag(wp, ids, offs, mesh=mesh, axis_name="model", num_embeddings=bad)


def test_embedding_bag_in_shard_map_checks_its_arguments_as_embedding_bag():
    """The shard_map building block took ``mode="median"`` as sum, ignored ``padding_idx=-1``
    (no id equals -1), and ignored ``per_sample_weights`` with ``mode="max"``: its static
    arguments are checked as ``jaxbag.embedding_bag`` checks them (same messages), and a negative
    ``padding_idx`` counts from the end (from ``num_embeddings``)."""
    from jax.sharding import PartitionSpec as P

    mesh = _mesh1()
    w = jnp.arange(16.0).reshape(8, 2)
    ids, seg, offs = jnp.array([7, 1, 3]), jnp.array([0, 0, 1]), jnp.array([0, 2])

    def run(**kw):
        def local(lw, i, s):
            return jsh.embedding_bag_in_shard_map(lw, i, s, num_bags=2, num_embeddings=8,
                                                  axis_name="model", **kw)
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("model", None), P(), P()),
                                     out_specs=P()))(w, ids, seg)

    for pad in (-1, 7, -8, 0):
        np.testing.assert_array_equal(
            run(mode="sum", padding_idx=pad),
            jaxbag.embedding_bag(w, ids, offs, mode="sum", padding_idx=pad))
    weights = jnp.ones(3)
    for kw in (dict(mode="median"), dict(mode="max", per_sample_weights=weights),
               dict(mode="sum", padding_idx=8), dict(mode="sum", padding_idx=1.0),
               dict(mode="sum", per_sample_weights=jnp.ones(2))):
        with pytest.raises((ValueError, TypeError)) as want:
            jaxbag.embedding_bag(w, ids, offs, **kw)
        with pytest.raises(type(want.value)) as got:
            run(**kw)
        assert str(got.value) == str(want.value)


def test_a_mesh_axis_that_is_not_a_name_is_refused():
    """axis_name=5 was "'int' object is not iterable" (TypeError from inside tuple()), and
    axis_size with an unknown axis a bare KeyError."""
    mesh = _fake_mesh((2, 4), ("data", "model"))
    tables = [jaxbag.TableConfig("a", 100, 8, ("fa",))]
    for bad in (5, ("model", 5)):
        for call in (lambda: jsh.plan_sharding(tables, mesh, axis_name=bad),
                     lambda: jsh.shard_table(jnp.ones((8, 2)), mesh, bad),
                     lambda: jsh.plan_sharding(tables, mesh, axis_name="model", batch_axis=bad)):
            with pytest.raises(TypeError, match=r"a mesh axis \(axis_name, batch_axis\) must be a "
                               rf"name or a tuple of names \(str\); got {re.escape(repr(bad))}, "
                               r"e\.g\. axis_name='model'"):
                call()
    with pytest.raises(ValueError, match=r"axis='modl': 'modl' is not an axis of the mesh, whose "
                                         r"axes are \('data', 'model'\); e\.g\. axis='model'\."):
        jsh.axis_size(mesh, "modl")
    assert jsh.axis_size(mesh, ["data", "model"]) == 8  # (a list is a sequence of names)


def test_a_repeated_mesh_axis_is_refused():
    """``("model", "model")`` counted the 4-device axis twice (16 devices: the planner planned for
    them), then JAX raised DuplicateSpecError far from the call. Refused by every axis check,
    naming the argument; an unknown batch_axis's hint names batch_axis (it said axis_name)."""
    mesh = _fake_mesh((2, 4), ("data", "model"))
    tables = [jaxbag.TableConfig("a", 100, 8, ("fa",)), jaxbag.TableConfig("b", 40, 8, ("fb",))]
    w, ids = jnp.ones((16, 2), jnp.float32), jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"axis=\('model', 'model'\) names mesh axis 'model' "
                                         r"more than once; name each axis once, e.g. axis='model'\."):
        jsh.axis_size(mesh, ("model", "model"))
    for call, name, value in [
        (lambda: jsh.plan_sharding(tables, mesh, axis_name=("model", "model")), "axis_name",
         "('model', 'model')"),
        (lambda: jsh.plan_sharding(tables, mesh, axis_name="model",
                                   batch_axis=("data", "data")), "batch_axis", "('data', 'data')"),
        (lambda: jsh.shard_table(w, mesh, ("model", "model")), "axis_name", "('model', 'model')"),
        (lambda: jsh.embedding_bag(w, ids, mesh=mesh, axis_name="model",
                                   batch_axis=("data", "data")), "batch_axis", "('data', 'data')"),
    ]:
        with pytest.raises(ValueError, match=rf"{name}={value}".replace("(", r"\(").replace(
                ")", r"\)") + r" names mesh axis '\w+' more than once; name each axis once"):
            call()
    with pytest.raises(ValueError, match=r"batch_axis='dta' is not an axis of the mesh, whose "
                                         r"axes are \('data', 'model'\); e.g. batch_axis='data'"):
        jsh.plan_sharding(tables, mesh, axis_name="model", batch_axis="dta")
    with pytest.raises(ValueError, match=r"axis_name='modl' is not an axis .* e.g. "
                                         r"axis_name='model'"):
        jsh.plan_sharding(tables, mesh, axis_name="modl")


def test_a_sharding_plan_normalises_lists_to_tuples():
    """A plan is static (hashed by jit as part of the layout): ``axis_name=["model"]`` or list
    placements made an unhashable plan that failed deep inside JAX. Lists where the API documents
    tuples become tuples on construction; a table name that is not a str is refused."""
    mesh = _fake_mesh((2, 4), ("data", "model"))
    tables = [jaxbag.TableConfig("a", 13, 3, ("fa",)), jaxbag.TableConfig("b", 7, 3, ("fb",))]
    plan = jsh.plan_sharding(tables, mesh, axis_name=["model"], batch_axis=["data"])
    assert (plan.axis_name, plan.batch_axis) == (("model",), ("data",))
    hash(jaxbag.collection_layout(tables, plan=plan))
    plan = jsh.plan_sharding(tables, mesh, axis_name="model", batch_axis="data")
    for placements in (list(plan.placements), [list(p) for p in plan.placements]):
        edited = dataclasses.replace(plan, placements=placements)
        assert edited == plan and hash(edited) == hash(plan)
        hash(jaxbag.collection_layout(tables, plan=edited))
    edited = dataclasses.replace(plan, placements=(("a", "table", np.int64(1)), ("b", "row", None)))
    assert edited.placements == (("a", "table", 1), ("b", "row", None))
    assert type(edited.placements[0][2]) is int
    with pytest.raises(TypeError, match=r"placements\[0\] = \(1, 'row', None\): the table name "
                                        r"must be a str .*got 1 of type int"):
        dataclasses.replace(plan, placements=((1, "row", None),))
    with pytest.raises(TypeError, match=r"placements must be a tuple of \(table name, kind, "
                                        r"device index or None\); got 'a'"):
        dataclasses.replace(plan, placements="a")


def test_sparse_init_and_update_check_their_arguments():
    """A 1-D table was an IndexError, a list table an AttributeError, another optimiser's state a
    shard_map pytree error, an optax optimiser silently gave EmptyState: each is refused first,
    naming ``optimizer``, ``table`` or ``state``."""
    import optax

    mesh = _mesh1()
    kw = dict(mesh=mesh, axis_name="model")
    w = jsh.shard_table(jnp.arange(16.0).reshape(8, 2), mesh, "model")
    sgd, adam = jaxbag.sparse_sgd(0.1), jaxbag.sparse_adam(0.1)
    bags, pb = jsh.embedding_bag_rows(w, jnp.array([[7, 1], [3, 3]]), mode="sum", **kw)
    rg = pb(jnp.ones_like(bags))
    for bad in (optax.sgd(0.1), jaxbag.sparse_adam, "adam"):
        with pytest.raises(TypeError, match=r"optimizer must be a jaxbag.SparseOptimizer, e.g. "
                                            r"jaxbag.sparse_adam\(1e-3\) \(called\); got"):
            jsh.sparse_init(bad, w, **kw)
        with pytest.raises(TypeError, match=r"optimizer must be a jaxbag.SparseOptimizer"):
            jsh.sparse_update(bad, w, jsh.sparse_init(sgd, w, **kw), rg, **kw)
    with pytest.raises(ValueError, match=r"table must be 2-D \[V, D\] \(one row per id\); got "
                                         r"shape \(8,\)"):
        jsh.sparse_init(sgd, jnp.ones(8), **kw)
    with pytest.raises(TypeError, match=r"table must be a \[V, D\] array .*got list"):
        jsh.sparse_init(sgd, [[1.0]] * 8, **kw)
    with pytest.raises(TypeError, match=r"table must be a \[V, D\] array .*got list"):
        jsh.sparse_update(sgd, [[1.0]] * 8, jsh.sparse_init(sgd, w, **kw), rg, **kw)
    with pytest.raises(TypeError, match=r"state does not match optimizer.init's structure for "
                                        r"this table: expected SgdState\(count=\(\)\); got "
                                        r"LazyAdamState\(count=\(\), mu=\(8, 2\), nu=\(8, 2\)\)"):
        jsh.sparse_update(sgd, w, jsh.sparse_init(adam, w, **kw), rg, **kw)
    small = jsh.sparse_init(adam, jsh.shard_table(jnp.zeros((4, 2)), mesh, "model"), **kw)
    with pytest.raises(ValueError, match=r"state does not match optimizer.init's shapes for this "
                                         r"table: expected LazyAdamState\(count=\(\), mu=\(8, 2\)"):
        jsh.sparse_update(adam, w, small, rg, **kw)
    state = jsh.sparse_init(adam, w, **kw)  # the right ones pass
    jsh.sparse_update(adam, w, state, rg, **kw)


def test_planner_overrides_and_plan_tables_are_checked():
    """Overrides given as a string or a list were read by dict() ("dictionary update sequence
    element #0 has length 1"); a 3-table plan's describe() of 2 tables was a bare KeyError, and
    collection_layout of 2 tables silently ignored the third placement."""
    mesh = _fake_mesh((2, 4), ("data", "model"))
    T = jaxbag.TableConfig
    tables = [T("a", 100, 8, ("fa",)), T("b", 40, 8, ("fb",)), T("c", 30, 8, ("fc",))]
    for bad in ("a", ["a"], [("a", "row")]):
        with pytest.raises(TypeError, match=r"overrides must be a mapping \{table name: 'row' \| "
                                            r"'table' \| 'replicated'\}; got .*, e.g. "
                                            r"overrides=\{'a': 'row'\}"):
            jsh.plan_sharding(tables, mesh, axis_name="model", overrides=bad)
    with pytest.raises(ValueError, match=r"overrides names unknown tables \[1\]"):
        jsh.plan_sharding(tables, mesh, axis_name="model", overrides={1: "row"})
    plan = jsh.plan_sharding(tables, mesh, axis_name="model")
    extra = (r"the plan places tables \['c'\] that are not among the tables given "
             r"\['a', 'b'\]; pass the tables it was made for")
    for call in (lambda: plan.describe(tables[:2]), lambda: plan.device_bytes(tables[:2]),
                 lambda: jaxbag.collection_layout(tables[:2], plan=plan)):
        with pytest.raises(ValueError, match=extra):
            call()
    small = jsh.plan_sharding(tables[:2], mesh, axis_name="model")
    with pytest.raises(ValueError, match=r"the plan has no placement for tables \['c'\]"):
        small.describe(tables)
    assert "per device" in plan.describe(tables)


def test_min_fill_never_makes_a_plan_larger():
    """min_fill sent every group that fills its blocks poorly row-wise, "strictly smaller": not
    when its tables have fewer rows than devices (row-wise costs ceil(V / n) rows per device per
    table). 8 devices, five 3-row tables of 64 floats and an 80k-row one: row-wise 5 rows per
    device (2,561,280 B in all), table-wise 3 (2,560,768 B). Now a group moves only when that
    stores no more; a lone table still goes row-wise, and no plan is larger than min_fill=0's."""
    import random

    T = jaxbag.TableConfig
    mesh8 = _fake_mesh((8,), ("model",))
    tables = [T(f"enum{i}", 3, 64, (f"f{i}",)) for i in range(5)] + [T("big", 80_000, 64, ("g",))]
    plan = jsh.plan_sharding(tables, mesh8, axis_name="model")
    assert plan.device_bytes(tables) == [(10_000 + 3) * 64 * 4] * 8 == [2_560_768] * 8
    assert {plan.as_dict()[f"enum{i}"] for i in range(5)} == {"table"}
    lone = [T("a", 100, 4, ("a",))]
    plan = jsh.plan_sharding(lone, mesh8, axis_name="model", row_threshold_bytes=10**9)
    assert plan.as_dict() == {"a": "row"} and plan.device_bytes(lone) == [13 * 16] * 8
    rng = random.Random(0)
    for _ in range(300):
        n = rng.choice([2, 3, 4, 8])
        tables = [T(f"t{i}", rng.randint(1, 30), rng.choice([1, 2]), (f"f{i}",))
                  for i in range(rng.randint(1, 7))]
        overrides = {t.name: "table" for t in tables if rng.random() < 0.2}
        mesh = _fake_mesh((n,), ("model",))
        sizes = [max(jsh.plan_sharding(tables, mesh, axis_name="model", overrides=overrides,
                                       row_threshold_bytes=threshold, min_fill=fill)
                     .device_bytes(tables)) for threshold in (None, 10**9) for fill in (0.75, 0)]
        assert sizes[0] <= sizes[1] and sizes[2] <= sizes[3], (n, tables, overrides, sizes)


def test_the_budget_error_says_what_was_searched():
    """The error said "every placement of the tables not in overrides was tried", but only the
    row-/table-wise choice is searched; each table-wise table's device is chosen greedily. 2
    devices, one-column tables of 21, 23, 10, 15, 23 rows: largest first gives 23 + 21 | 23 + 15
    + 10 = 48 rows (192 B; the best row/table choice 188 B), while 21 + 10 + 15 | 23 + 23 = 46
    rows (184 B) fits: the error says the assignment is greedy and shows a hand-built plan."""
    T = jaxbag.TableConfig
    mesh = _fake_mesh((2,), ("model",))
    tables = [T(f"t{i}", v, 1, (f"f{i}",)) for i, v in enumerate([21, 23, 10, 15, 23])]
    with pytest.raises(ValueError) as error:
        jsh.plan_sharding(tables, mesh, axis_name="model", device_budget_bytes=184)
    message = str(error.value)
    assert "every placement" not in message
    assert ("the search's best placement needs 188: every row-wise / table-wise choice of the "
            "tables not in overrides was tried, but each table-wise table's device is chosen "
            "greedily (largest first onto the least loaded device), which can miss a tighter "
            "packing)") in message, message
    assert ("or build the plan by hand: plan = dataclasses.replace(jaxbag.sharding.plan_sharding("
            "tables, mesh, axis_name='model'), placements=(('t0', 'table', 0), ('t1', 'table', "
            "1), ...)); print(plan.device_bytes(tables)).") in message, message
    plan = jsh.plan_sharding(tables, mesh, axis_name="model")
    hand = dataclasses.replace(plan, placements=(
        ("t0", "table", 0), ("t1", "table", 1), ("t2", "table", 0), ("t3", "table", 0),
        ("t4", "table", 1)))
    assert hand.device_bytes(tables) == [184, 184]
    # under the bound no plan helps: no hand-built one is suggested
    with pytest.raises(ValueError, match=r"needs less than 184\)\. Tables in overrides are never "
                                         r"moved: .* or use more devices\.$"):
        jsh.plan_sharding(tables, mesh, axis_name="model", device_budget_bytes=183)
