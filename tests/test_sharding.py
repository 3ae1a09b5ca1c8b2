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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
