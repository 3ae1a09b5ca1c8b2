"""Multi-device checks of jaxbag.sharding, run in a subprocess on 8 simulated CPU devices.

Usage: ``python tests/_sharding_worker.py CASE`` (see ``CASES``); exits non-zero on failure.
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax is imported, which
is why tests/test_sharding.py runs this file in a subprocess. Every check compares with the
single-device op (itself tested against torch and NumPy elsewhere) or with NumPy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxbag  # noqa: E402
import jaxbag.sharding as jsh  # noqa: E402

AUTO = AxisType.Auto
EXPLICIT = AxisType.Explicit
MODES = ("sum", "mean", "max", "sqrtn")
V, D, B = 32, 5, 8


def meshes():
    assert len(jax.devices()) == 8, jax.devices()
    return {
        "1d": jax.make_mesh((8,), ("model",), axis_types=(AUTO,)),
        "2d": jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO)),
    }


def close(a, b, what, rtol=1e-5, atol=1e-6):
    a = np.asarray(jnp.asarray(a).astype(jnp.float32))
    b = np.asarray(jnp.asarray(b).astype(jnp.float32))
    if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol):
        diff = np.max(np.abs(a - b)) if a.shape == b.shape else "shape"
        raise AssertionError(f"{what}: sharded != single-device (max diff {diff})\n{a}\n{b}")


def expect_error(fn, text, what, exc=ValueError):
    """Calls ``fn()``; it must raise ``exc`` whose message contains ``text``."""
    try:
        fn()
    except exc as e:
        if text not in str(e):
            raise
    else:
        raise AssertionError(f"{what}: no error")


def make_data(seed=0, dtype=jnp.float32):
    """A table with tied rows on different shards, ragged bags with empty ones and padding."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(V, D)).astype(np.float32)
    w[9] = w[1]  # rows 1 and 9 tie (different shards on every mesh): max must pick the first
    w[30, :2] = w[2, :2]
    lens = rng.integers(0, 5, size=B)
    lens[3] = 0  # an empty bag
    n = int(lens.sum())
    ids = rng.integers(0, V, size=n).astype(np.int32)
    ids[:2] = [9, 1]  # the tie inside bag 0 (or the first non-empty bag)
    ids[-1] = 3  # the padding row appears
    offs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    psw = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    ids2 = rng.integers(0, V, size=(B, 3)).astype(np.int32)
    ids2[1] = 3  # a bag made only of padding -> zeros
    ids2[2, :2] = [30, 2]
    psw2 = rng.uniform(0.5, 2.0, size=(B, 3)).astype(np.float32)
    # the segment-id form with dropped padding positions at the end
    seg = np.repeat(np.arange(B), lens).astype(np.int32)
    ids_s = np.concatenate([ids, [5, 6, 7]]).astype(np.int32)
    seg_s = np.concatenate([seg, [B, B, B]]).astype(np.int32)
    psw_s = np.concatenate([psw, [1.0, 1.0, 1.0]]).astype(np.float32)
    j = jnp.asarray
    return dict(
        w=j(w).astype(dtype),
        ids=j(ids),
        offs=j(offs),
        psw=j(psw),
        ids2=j(ids2),
        psw2=j(psw2),
        ids_s=j(ids_s),
        seg_s=j(seg_s),
        psw_s=j(psw_s),
    )


def op_configs(d):
    """(name, positional args, kwargs, per-sample weights or None) for every mode and form."""
    out = []
    for mode in MODES:
        weighted = mode != "max"
        out.append((f"{mode}/offsets", (d["ids"], d["offs"]), {}, d["psw"] if weighted else None))
        out.append((f"{mode}/2d", (d["ids2"],), {}, d["psw2"] if weighted else None))
        out.append(
            (
                f"{mode}/segment_ids",
                (d["ids_s"],),
                dict(segment_ids=d["seg_s"], num_bags=B),
                d["psw_s"] if weighted else None,
            )
        )
    return out


_REF_CACHE: dict = {}


def compare_ops(mesh, axis_name, batch_axis, d, extra=None, modes=MODES, rtol=1e-5):
    """Forward and gradients (table and per-sample weights) of every config; checks the HLO.

    One jit for all configs (compiling dominates the run time). The ids are jit arguments (not
    closed-over constants); the reference, the single-device op, is jitted too.
    """
    extra = extra or {}
    names = [c[0] for c in op_configs(d) if c[0].split("/")[0] in modes]
    rng = np.random.default_rng(1)
    cts = {n: jnp.asarray(rng.normal(size=(B, D)).astype(np.float32)) for n in names}

    def sharded(w, *args, **kw):
        return jsh.embedding_bag(w, *args, mesh=mesh, axis_name=axis_name, batch_axis=batch_axis, **kw)

    def loss(fn):
        def f(ws, psws, d):
            outs = {}
            total = jnp.zeros((), jnp.float32)
            for name, args, kw, _ in op_configs(d):
                if name not in names:
                    continue
                outs[name] = fn(
                    ws[name],
                    *args,
                    mode=name.split("/")[0],
                    padding_idx=3,
                    per_sample_weights=psws.get(name),
                    **kw,
                    **extra,
                )
                total = total + jnp.sum(outs[name].astype(jnp.float32) * cts[name])
            return total, outs

        return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))

    ws = {n: d["w"] for n in names}
    psws = {n: p for n, _, _, p in op_configs(d) if n in names and p is not None}
    key = (id(d), tuple(sorted(extra.items())), tuple(modes))
    if key not in _REF_CACHE:
        _REF_CACHE[key] = loss(jaxbag.embedding_bag)(ws, psws, d)
    (_, ref), (gw_ref, gp_ref) = _REF_CACHE[key]
    ws_sharded = {n: jsh.shard_table(w, mesh, axis_name) for n, w in ws.items()}
    compiled = loss(sharded).lower(ws_sharded, psws, d).compile()
    (_, got), (gw, gp) = compiled(ws_sharded, psws, d)
    tag = f"mesh={dict(mesh.shape)} axis={axis_name} batch={batch_axis} {extra}"
    check_no_table_traffic(
        compiled.as_text(),
        [(V, D)],
        tag,
        row_group_size=jsh.axis_size(mesh, axis_name),
        allow_int_gather=bool(extra.get("scale_grad_by_freq")),
    )
    for name in ref:
        close(got[name], ref[name], f"{tag} {name} forward", rtol=rtol)
        close(gw[name], gw_ref[name], f"{tag} {name} d/dweight", rtol=rtol)
        if name in gp_ref:
            close(gp[name], gp_ref[name], f"{tag} {name} d/dper_sample_weights", rtol=rtol)
        want = P(batch_axis) if batch_axis else P()
        if got[name].sharding.spec not in (want, P(batch_axis, None) if batch_axis else P(None)):
            raise AssertionError(f"{tag} {name}: output sharding {got[name].sharding.spec}")
        # row-sharded, and in the very form shard_table placed the table (no recompile of a step
        # that updates the table with it)
        rows = NamedSharding(mesh, P(axis_name if isinstance(axis_name, str) else tuple(axis_name)))
        if not gw[name].sharding.is_equivalent_to(rows, 2) or (
                gw[name].sharding.spec != ws_sharded[name].sharding.spec):
            raise AssertionError(f"{tag} {name}: gradient sharding {gw[name].sharding.spec}, "
                                 f"table {ws_sharded[name].sharding.spec}")
        if not np.abs(np.asarray(ref[name], np.float32)).sum() > 0:
            raise AssertionError(f"{tag} {name}: degenerate test data (all-zero output)")
    if "max/offsets" in gw:  # the first occurrence of a tied maximum gets the gradient
        g = np.asarray(gw["max/offsets"])
        if not (np.abs(g[9]).sum() > 0 and np.abs(g[1]).sum() == 0):
            raise AssertionError(f"{tag} max tie: gradient went to row 1 instead of row 9")


def case_op_1d():
    m = meshes()["1d"]
    compare_ops(m, "model", None, make_data())


def case_op_2d():
    m = meshes()["2d"]
    d = make_data()
    compare_ops(m, "model", "data", d)  # data parallel x row sharded
    compare_ops(m, ("data", "model"), None, d)  # rows over all 8 devices, batch replicated


def case_op_options():
    """bf16 tables, max_norm, scale_grad_by_freq (whole-batch counts), Explicit meshes."""
    m = meshes()["2d"]
    d = make_data(seed=3)
    compare_ops(m, "model", "data", d, extra=dict(scale_grad_by_freq=True), modes=("mean",))
    compare_ops(m, "model", "data", d, extra=dict(max_norm=1.0), modes=("max",))
    dbf = make_data(seed=4, dtype=jnp.bfloat16)
    compare_ops(m, "model", "data", dbf, modes=("sum", "max"), rtol=2e-2)
    # mode="max" propagates NaN across shards as on one device (XLA:CPU's all-reduce max drops
    # it); the gradient reaches the same (first) NaN.
    w = np.asarray(d["w"]).copy()
    w[9, 0] = w[20, 1] = np.nan
    w[3, 1] = np.inf
    ids, offs = jnp.array([1, 9, 30, 20, 2, 3, 25, 9], jnp.int32), jnp.array([0, 3, 5, 7], jnp.int32)
    for mname, batch in (("1d", None), ("2d", "data")):
        mesh = meshes()[mname]
        ws = jsh.shard_table(jnp.asarray(w), mesh, "model")
        out, vjp = jax.vjp(lambda t: jsh.embedding_bag(
            t, ids, offs, mesh=mesh, axis_name="model", batch_axis=batch, mode="max"), ws)
        ref, vjp_ref = jax.vjp(lambda t: jaxbag.embedding_bag(t, ids, offs, mode="max"), jnp.asarray(w))
        if not np.isnan(np.asarray(ref)).any():
            raise AssertionError("the NaN case has no NaN bag")
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=f"max NaN {mname}")
        ones = jnp.ones(ref.shape, jnp.float32)
        np.testing.assert_array_equal(np.asarray(vjp(ones)[0]), np.asarray(vjp_ref(ones)[0]),
                                      err_msg=f"max NaN grad {mname}")
    # An Explicit-axes mesh (jax.make_mesh's default) under jax.set_mesh.
    em = jax.make_mesh((2, 4), ("data", "model"))
    with jax.set_mesh(em):
        w = jax.device_put(d["w"], NamedSharding(em, P("model", None)))
        f = jax.jit(
            lambda w: jsh.embedding_bag(
                w, d["ids2"], mesh=em, axis_name="model", batch_axis="data", mode="mean"
            )
        )
        out = f(w)
    close(out, jaxbag.embedding_bag(d["w"], d["ids2"], mode="mean"), "explicit mesh")
    # errors name the problem
    for call, text in [
        (lambda: jsh.embedding_bag(d["w"][:30], d["ids2"] % 30, mesh=m, axis_name="model"), "pad_rows"),
        (lambda: jsh.embedding_bag(d["w"], d["ids2"][:3], mesh=m, axis_name="model",
                                   batch_axis="data"), "batch_axis"),
        (lambda: jsh.embedding_bag(d["w"], d["ids2"], mesh=m, axis_name="rows"), "not an axis"),
        (lambda: jsh.embedding_bag(d["w"], d["ids2"], mesh=m, axis_name="model",
                                   batch_axis="model"), "different"),
        (lambda: jsh.embedding_bag(d["w"], jnp.array([[40]]), mesh=m, axis_name="model"), "40"),
    ]:
        try:
            call()
        except (ValueError, IndexError) as e:
            if text not in str(e):
                raise AssertionError(f"error message {e!r} lacks {text!r}") from e
        else:
            raise AssertionError(f"no error raised (expected one mentioning {text!r})")


_COLLECTIVE = re.compile(
    r"=\s*([^=]+?)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
    r"(?:-start)?\("
)


def collectives(hlo):
    """``[(op, result type)]`` of the compiled HLO's collectives."""
    return [(m.group(2), m.group(1)) for m in _COLLECTIVE.finditer(hlo)]


def _group_size(line):
    """Devices per replica group of a collective's HLO line (explicit or iota notation)."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:  # mesh['axis_0'=2,'axis_1'=4] {'axis_0'}: groups span the listed axes
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2))]))
    raise AssertionError(f"cannot read replica groups of: {line[:200]} ... {line[-400:]}")


def check_no_table_traffic(hlo, table_shapes, what, row_group_size, allow_int_gather=False):
    """Checks the compiled HLO: the table never travels over the row axis.

    * no all-gather at all (except, with ``allow_int_gather``, integer ids: for
      ``scale_grad_by_freq`` over a split batch, and the sparse paths' one slot space);
    * no collective over the row axis (replica groups of ``row_group_size`` devices), and no
      collective-permute, carries an array of a table's shape (collectives over the data axis
      may: that is the data-parallel gradient sync of a table replicated over that axis);
    * the partial bags are all-reduced over the row axis.
    """
    ops = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        op, ty = m.group(2), m.group(1)
        ops.append((op, ty))
        if op == "all-gather" and not (allow_int_gather and re.match(r"\(?(s32|s64|pred)", ty)):
            raise AssertionError(f"{what}: all-gather in the compiled HLO: {op} {ty}")
        # a collective-permute (point to point, e.g. bags moving to their batch shard) has no
        # replica groups; it must not carry a table either
        if "source_target_pairs=" in line or _group_size(line) == row_group_size:
            for v, dd in table_shapes:
                if re.search(rf"\[{v},{dd}\]", ty):
                    raise AssertionError(f"{what}: {op} moves a full table {ty} over the rows")
    if not any(o[0] == "all-reduce" for o in ops):
        raise AssertionError(f"{what}: expected the partial bags to be all-reduced; got {ops}")
    return ops


def collection_tables():
    """Every table (and group) has more rows than any bag buffer ([features * B, D], <= 24 rows),
    so the HLO check can tell a table from bags by its shape."""
    T = jaxbag.TableConfig
    return [
        T("user", 29, 4, ("u",), padding_idx=0),
        T("item", 41, 4, ("i", "i2"), padding_idx=-1),
        T("cat", 26, 4, ("c",), mode="max"),
        T("geo", 33, 4, ("g",), mode="max", padding_idx=2),
        T("bf", 31, 4, ("b",), dtype=jnp.bfloat16),
        T("rep", 3, 4, ("r",), mode="sum"),
        T("s1", 25, 3, ("s1",), mode="sqrtn"),
        T("s2", 25, 3, ("s2",), mode="sqrtn"),
        T("s3", 25, 3, ("s3",), mode="sqrtn"),
        T("s4", 25, 3, ("s4",), mode="sqrtn"),
    ]


def collection_batch(tables, seed=0, batch=8, weights=False):
    rng = np.random.default_rng(seed)
    feats, ws = {}, {}
    for t in tables:
        for f in t.feature_names:
            feats[f] = [
                list(rng.integers(0, t.num_embeddings, size=rng.integers(1, 4)))
                for _ in range(batch)
            ]
            feats[f][2] = []  # an empty bag in every feature
            ws[f] = [list(rng.uniform(0.5, 2.0, size=len(x))) for x in feats[f]]
    return feats, (ws if weights else None)


def compare_collection(plan, tables, num_shards, weights=False):
    feats, ws = collection_batch(tables, weights=weights)
    if weights:  # weights are not allowed with max tables; a few tables keep it quick
        tables = [t for t in tables if t.name in ("user", "item", "bf", "rep", "s1", "s4")]
        plan = jsh.plan_sharding(
            tables,
            plan.mesh,
            axis_name=plan.axis_name,
            batch_axis=plan.batch_axis,
            overrides={"rep": "replicated"},  # 3 rows: row-wise blocks would be bag-sized
        )
        keep = {f for t in tables for f in t.feature_names}
        feats = {k: v for k, v in feats.items() if k in keep}
        ws = {k: v for k, v in ws.items() if k in keep}
    jf_single = jaxbag.JaggedFeatures.from_lists(feats, weights=ws)
    jf = jaxbag.JaggedFeatures.from_lists(feats, weights=ws, num_shards=num_shards)
    lp = jaxbag.collection_layout(tables, plan=plan)
    lu = jaxbag.collection_layout(tables, stack=False)
    if not weights:  # created sharded by init_collection
        pp = jaxbag.init_collection(lp, jax.random.key(0))
        for g in lp.groups:
            want = lp.param_specs()[g.name]
            if pp[g.name].sharding.spec != want:
                raise AssertionError(f"{g.name}: param sharding {pp[g.name].sharding.spec} != {want}")
        pu = jaxbag.unpack_tables(lp, pp)
        # the same tables as an unsharded init (tables are keyed by name: a subset suffices)
        some = [t for t in tables if t.name in ("item", "s2")]
        ref_init = jaxbag.init_collection(jaxbag.collection_layout(some, stack=False), jax.random.key(0))
        for k in ref_init:  # bit for bit (an eager unsharded init rounded differently: 1 ulp)
            if not np.array_equal(np.asarray(pu[k]), np.asarray(ref_init[k])):
                raise AssertionError(f"init {k}: sharded and unsharded tables differ")
    else:  # placed from host tables
        rng = np.random.default_rng(9)
        pu = {
            t.name: jnp.asarray(rng.normal(size=(t.num_embeddings, t.features)), t.dtype)
            for t in tables
        }
        pp = jax.device_put(jaxbag.pack_tables(lp, pu), lp.param_shardings())
    rng = np.random.default_rng(5)
    width = lp.output_features
    ct = jnp.asarray(rng.normal(size=(jf.batch_size, width)).astype(np.float32))

    def loss(p, j, layout):
        o = jaxbag.embedding_bag_collection(p, j, layout=layout, concat=True, dtype=jnp.float32)
        return jnp.sum(o * ct), o

    grad = jax.value_and_grad(loss, has_aux=True)
    compiled = jax.jit(lambda p, j: grad(p, j, lp)).lower(pp, jf).compile()
    (_, out), g = compiled(pp, jf)
    (_, out_ref), g_ref = jax.jit(lambda p, j: grad(p, j, lu))(pu, jf_single)
    tag = f"collection plan={plan.as_dict()}"
    bf16 = any(t.dtype == jnp.bfloat16 for t in tables)
    close(out, out_ref, f"{tag} forward", rtol=1e-2 if bf16 else 1e-5)
    if out.sharding.spec not in (P(plan.batch_axis), P(plan.batch_axis, None), P()):
        raise AssertionError(f"{tag}: output sharding {out.sharding.spec}")
    g_tables = jaxbag.unpack_tables(lp, g)
    for k in g_ref:
        low = jnp.dtype(g_ref[k].dtype).itemsize < 4  # bf16 gradients round (1 ulp ~ 0.4%)
        close(g_tables[k], g_ref[k], f"{tag} d/d{k}", rtol=1e-2 if low else 1e-5)
        if not np.abs(np.asarray(g_ref[k], np.float32)).sum() > 0:
            raise AssertionError(f"{tag}: table {k} got no gradient: degenerate test data")
    # (a replicated table's gradient is all-reduced whole, as any data-parallel parameter)
    shapes = [(g.num_rows, g.features) for g in lp.groups if g.sharded] + [
        (t.num_embeddings, t.features)
        for t in tables
        if plan.placement(t.name)[0] != "replicated"
    ]
    check_no_table_traffic(compiled.as_text(), shapes, tag, plan.num_shards)
    return lp


def case_collection():
    ms = meshes()
    tables = collection_tables()
    plan = jsh.plan_sharding(
        tables,
        ms["2d"],
        axis_name="model",
        batch_axis="data",
        overrides={"rep": "replicated", "geo": "row", "cat": "table"},
    )
    kinds = plan.as_dict()
    want = {"rep": "replicated", "geo": "row", "cat": "table", "s1": "table", "item": "row",
            "s4": "table"}
    if any(kinds[k] != v for k, v in want.items()):
        raise AssertionError(f"unexpected plan {kinds}")
    # the four equal s-tables go round-robin, one per device
    shards = sorted(plan.placement(f"s{i}")[1] for i in range(1, 5))
    if shards != [0, 1, 2, 3]:
        raise AssertionError(f"s1..s4 not spread over the 4 devices: {shards}")
    lp = compare_collection(plan, tables, num_shards=2)
    s_group = lp.group_of("s1")
    if s_group.shard_rows != 25:  # each device holds one whole 25-row table, no padding
        raise AssertionError(f"s-group blocks of {s_group.shard_rows} rows, expected 25")
    plan1 = jsh.plan_sharding(tables, ms["1d"], axis_name="model")
    compare_collection(plan1, tables, num_shards=1, weights=True)
    # replicated groups are looked up locally: with every table replicated, the forward over a
    # batch split over "data" needs no collective at all (no partial bags summed over "model")
    rep = jsh.plan_sharding(tables, ms["2d"], axis_name="model", batch_axis="data",
                            overrides={t.name: "replicated" for t in tables})
    rep_layout = jaxbag.collection_layout(tables, plan=rep)
    feats, _ = collection_batch(tables, seed=0)
    jf = jaxbag.JaggedFeatures.from_lists(feats, capacity=24, num_shards=2)
    fwd = jax.jit(lambda p, j: jaxbag.embedding_bag_collection(p, j, layout=rep_layout, concat=True))
    ops = collectives(fwd.lower(jaxbag.init_collection(rep_layout, jax.random.key(0)), jf)
                      .compile().as_text())
    if ops:
        raise AssertionError(f"all-replicated plan: collectives in the forward: {ops}")


def case_planner():
    ms = meshes()
    T = jaxbag.TableConfig
    tables = [T("big", 4000, 16, ("a",))] + [T(f"t{i}", 100 + i, 16, (f"f{i}",)) for i in range(8)]
    plan = jsh.plan_sharding(tables, ms["1d"], axis_name="model")
    if plan.placement("big")[0] != "row":
        raise AssertionError(f"the big table should go row-wise: {plan.as_dict()}")
    counts = np.bincount([plan.placement(f"t{i}")[1] for i in range(8)], minlength=8)
    if not (counts == 1).all():
        raise AssertionError(f"8 similar tables on 8 devices should be one each: {counts}")
    # a threshold below every table -> all row-wise; overrides win
    plan = jsh.plan_sharding(
        tables, ms["1d"], axis_name="model", row_threshold_bytes=0, overrides={"t0": "replicated"}
    )
    if plan.as_dict()["t0"] != "replicated" or plan.as_dict()["t1"] != "row":
        raise AssertionError(plan.as_dict())
    # a lone table-wise table would waste 7/8 of its blocks: it goes row-wise (unless forced)
    lone = [T("x", 100, 8, ("x",)), T("y", 100, 4, ("y",))]
    plan = jsh.plan_sharding(lone, ms["1d"], axis_name="model", row_threshold_bytes=10**9)
    if plan.as_dict() != {"x": "row", "y": "row"}:
        raise AssertionError(plan.as_dict())
    plan = jsh.plan_sharding(lone, ms["1d"], axis_name="model", overrides={"x": "table"})
    if plan.as_dict()["x"] != "table":
        raise AssertionError(plan.as_dict())
    # the budget: bytes per device, and an error when it cannot fit
    per = jsh.plan_sharding(tables, ms["1d"], axis_name="model").device_bytes(tables)
    if max(per) > (4000 // 8 + 101 + 8) * 16 * 4 + 8 * 16 * 4:
        raise AssertionError(f"unbalanced: {per}")
    expect_error(lambda: jsh.plan_sharding(tables, ms["1d"], axis_name="model",
                                           device_budget_bytes=1000),
                 "device_budget_bytes", "an over-budget plan")
    # 7 equal tables on 4 devices: the greedy table-wise packing puts 2 on some device (192 B),
    # over a 180 B budget that all-row-wise meets (168 B); it used to raise
    equal = [T(f"e{i}", 24, 1, (f"g{i}",)) for i in range(7)]
    plan = jsh.plan_sharding(equal, ms["2d"], axis_name="model", device_budget_bytes=180)
    if max(plan.device_bytes(equal)) > 180 or set(plan.as_dict().values()) != {"row"}:
        raise AssertionError(f"budget fallback: {plan.as_dict()} {plan.device_bytes(equal)}")
    if set(jsh.plan_sharding(equal, ms["2d"], axis_name="model").as_dict().values()) != {"table"}:
        raise AssertionError("without a budget the equal tables stay table-wise")
    # a budget that only a mixed plan meets (all table-wise by the threshold): 8 one-row tables
    # pad less table-wise (1 row per device) than row-wise (1 row each, 8 per device); 12 tables
    # of 40 rows fit better row-wise (5 rows each, 60 per device) than table-wise (2 on some
    # devices: an 80-row block). Greedy: 32 + 5120 B per device; all row-wise: 256 + 3840 B;
    # mixed: 32 + 3840 B. It used to raise (all row-wise or nothing).
    mixed = [T(f"tiny{i}", 1, 8, (f"t{i}",)) for i in range(8)]
    mixed += [T(f"big{i}", 40, 16, (f"b{i}",)) for i in range(12)]
    big_share = 10**9
    greedy = jsh.plan_sharding(mixed, ms["1d"], axis_name="model", row_threshold_bytes=big_share)
    if max(greedy.device_bytes(mixed)) != 32 + 5120 or set(greedy.as_dict().values()) != {"table"}:
        raise AssertionError(f"mixed, no budget: {greedy.as_dict()} {greedy.device_bytes(mixed)}")
    plan = jsh.plan_sharding(
        mixed, ms["1d"], axis_name="model", row_threshold_bytes=big_share, device_budget_bytes=4000
    )
    want = {**{f"tiny{i}": "table" for i in range(8)}, **{f"big{i}": "row" for i in range(12)}}
    if plan.as_dict() != want or max(plan.device_bytes(mixed)) != 32 + 3840:
        raise AssertionError(f"mixed budget: {plan.as_dict()} {plan.device_bytes(mixed)}")
    # min_fill sends four 9-row tables and an 8-row one row-wise (a 17-row block on the device
    # with two: sum 44 < 0.75 * 4 * 17): 3 + 3 + 3 + 3 + 2 = 14 rows (56 B). The largest-first
    # rule had nothing left to move and raised under 48 B; the per-group search moves the 8-row
    # table alone: 2 rows + 9 (one 9-row table per device) = 11 rows (44 B), the lower bound
    # ceil(44 / 4); under that it still raises.
    odd = [T(f"e{i}", 9, 1, (f"g{i}",)) for i in range(4)] + [T("s", 8, 1, ("s",))]
    if set(jsh.plan_sharding(odd, ms["2d"], axis_name="model").as_dict().values()) != {"row"}:
        raise AssertionError("without a budget min_fill sends the 9/8-row tables row-wise")
    plan = jsh.plan_sharding(odd, ms["2d"], axis_name="model", device_budget_bytes=48)
    shards = sorted(plan.placement(f"e{i}")[1] for i in range(4))
    if plan.placement("s")[0] != "row" or shards != [0, 1, 2, 3] or plan.device_bytes(odd) != [44] * 4:
        raise AssertionError(f"per-group search: {plan.placements} {plan.device_bytes(odd)}")
    expect_error(lambda: jsh.plan_sharding(odd, ms["2d"], axis_name="model", device_budget_bytes=43),
                 "device_budget_bytes=43", "a budget under the lower bound")
    for bad in [dict(overrides={"nope": "row"}), dict(overrides={"t0": "rows"})]:
        try:
            jsh.plan_sharding(tables, ms["1d"], axis_name="model", **bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{bad} did not raise")


def case_modules():
    """linen and nnx collections with a plan: sharded params, same outputs as the functional core."""
    from flax import linen as nn
    from flax import nnx

    from jaxbag._src.collection_nnx import EmbeddingBagCollection as NnxCollection

    ms = meshes()
    mesh = ms["2d"]
    T = jaxbag.TableConfig
    tables = (
        T("words", 64, 8, ("title", "body")),
        T("tags", 12, 8, ("tags",), mode="sum"),
        T("small", 4, 8, ("s",), mode="max"),
    )
    plan = jsh.plan_sharding(
        tables, mesh, axis_name="model", batch_axis="data", overrides={"small": "replicated"}
    )
    feats, _ = collection_batch(tables, seed=2, batch=4)
    jf = jaxbag.JaggedFeatures.from_lists(feats, num_shards=2)
    jf1 = jaxbag.JaggedFeatures.from_lists(feats)
    model = jaxbag.EmbeddingBagCollection(tables=tables, plan=plan)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jf)
    shardings = nn.get_sharding(abstract, mesh)
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), jf)
    params = nn.unbox(variables)["params"]
    layout = model.layout
    for name, spec in layout.param_specs().items():
        if params[name].sharding.spec != spec:
            raise AssertionError(f"linen {name}: {params[name].sharding.spec} != {spec}")
    out = jax.jit(lambda v, j: model.apply(v, j, concat=True))(variables, jf)
    lu = jaxbag.collection_layout(tables, stack=False)
    ref = jaxbag.embedding_bag_collection(
        jaxbag.unpack_tables(layout, params), jf1, layout=lu, concat=True
    )
    close(out, ref, "linen sharded collection")

    m = NnxCollection(tables, plan=plan, rngs=nnx.Rngs(0))
    for name, spec in m.layout.param_specs().items():
        if m.embeddings[name][...].sharding.spec != spec:
            raise AssertionError(f"nnx {name}: {m.embeddings[name][...].sharding.spec} != {spec}")

    @nnx.jit
    def fwd(m, j):
        return m(j, concat=True)

    out = fwd(m, jf)
    p = {k: v[...] for k, v in m.embeddings.items()}
    ref = jaxbag.embedding_bag_collection(
        jaxbag.unpack_tables(m.layout, p), jf1, layout=lu, concat=True
    )
    close(out, ref, "nnx sharded collection")

    # Explicit-axes mesh (jax.make_mesh's default): eager unpack_tables (a ShardingTypeError), the
    # NNX module under jax.set_mesh (a flax mesh assertion) and linen (a with_sharding_constraint
    # error) used to fail; only the functional lookup worked.
    emesh = jax.make_mesh((2, 4), ("data", "model"))
    eplan = jsh.plan_sharding(
        tables, emesh, axis_name="model", batch_axis="data", overrides={"small": "replicated"}
    )
    elayout = jaxbag.collection_layout(tables, plan=eplan)
    want_tables = jaxbag.unpack_tables(layout, jaxbag.init_collection(layout, jax.random.key(0)))
    eparams = jaxbag.init_collection(elayout, jax.random.key(0))
    for name, got in jaxbag.unpack_tables(elayout, eparams).items():  # eager, no mesh context
        close(got, want_tables[name], f"explicit unpack {name}")

    def reference(group_params):  # single-device, from the module's own tables
        own = jaxbag.unpack_tables(elayout, group_params)
        return jaxbag.embedding_bag_collection(own, jf1, layout=lu, concat=True)

    with jax.set_mesh(emesh):
        em = NnxCollection(tables, plan=eplan, rngs=nnx.Rngs(0))
        close(fwd(em, jf), reference({k: v[...] for k, v in em.embeddings.items()}),
              "explicit nnx collection")
        emodel = jaxbag.EmbeddingBagCollection(tables=tables, plan=eplan)
        ev = emodel.init(jax.random.key(0), jf)
        close(jax.jit(lambda v, j: emodel.apply(v, j, concat=True))(ev, jf),
              reference(nn.unbox(ev)["params"]), "explicit linen collection")
    try:
        emodel.init(jax.random.key(0), jf)
    except ValueError as e:
        if "jax.set_mesh(mesh)" not in str(e):
            raise
    else:
        raise AssertionError("linen on an Explicit mesh outside set_mesh: no error")


def case_sparse():
    """Sparse row updates of a row-sharded table equal the single-device sparse path."""
    ms = meshes()
    d = make_data(seed=6)
    opts = {
        "sgd": jaxbag.sparse_sgd(0.5),
        "adagrad": jaxbag.sparse_adagrad(0.3),
        "adam": jaxbag.sparse_adam(0.1),
    }
    configs = [
        ("2d", "model", "data", "mean", (d["ids2"],), {}),
        ("2d", "model", "data", "sum", (d["ids"], d["offs"]), {}),
        ("1d", "model", None, "sqrtn", (d["ids_s"],), dict(segment_ids=d["seg_s"], num_bags=B)),
        ("1d", "model", None, "max", (d["ids"], d["offs"]), {}),
        # rows over both axes of the 2 x 4 mesh: shard i of the tuple holds rows [i R, (i+1) R)
        ("2d", ("data", "model"), None, "sum", (d["ids"], d["offs"]), {}),
    ]
    rng = np.random.default_rng(7)
    gs = [jnp.asarray(rng.normal(size=(B, D)).astype(np.float32)) for _ in range(2)]

    def single(w, state, opt, mode, args, kw):
        for g in gs:
            _, pb = jaxbag.embedding_bag_rows(w, *args, mode=mode, padding_idx=3, **kw)
            w, state = opt.update(w, state, pb(g))
        return w, state

    def sharded(w, state, opt, mode, args, kw, mesh, axis, batch):
        for g in gs:
            bags, pb = jsh.embedding_bag_rows(
                w, *args, mesh=mesh, axis_name=axis, batch_axis=batch, mode=mode, padding_idx=3, **kw
            )
            w, state = jsh.sparse_update(opt, w, state, pb(g), mesh=mesh, axis_name=axis)
        return w, state, bags

    # Clear errors, before any work: a table that does not split over the shards (shard_map's
    # own error before), and a single-device table's global-row RowGrads (read as local rows,
    # they updated the wrong rows).
    odd = jnp.zeros((V + 1, D))
    for what, fn in [("sparse_init", lambda: jsh.sparse_init(opts["sgd"], odd, mesh=ms["1d"],
                                                              axis_name="model")),
                     ("sparse_update", lambda: jsh.sparse_update(
                         opts["sgd"], odd, opts["sgd"].init(odd), jaxbag.RowGrads(
                             jnp.arange(8), jnp.ones((8, D))), mesh=ms["1d"], axis_name="model"))]:
        expect_error(fn, f"table has V={V + 1} rows, not divisible by the 8 devices of "
                         "axis_name='model'; pad the table once with jaxbag.sharding.pad_rows",
                     f"{what} with {V + 1} rows on 8 shards")
    w_sh = jsh.shard_table(d["w"], ms["1d"], "model")
    _, pb = jaxbag.embedding_bag_rows(d["w"], d["ids"], d["offs"], size=24)  # 8 | 24
    expect_error(lambda: jsh.sparse_update(opts["sgd"], w_sh, jsh.sparse_init(
        opts["sgd"], w_sh, mesh=ms["1d"], axis_name="model"), pb(gs[0]), mesh=ms["1d"],
        axis_name="model"), "row_grads must hold per-shard local rows split over axis_name="
        "'model' (8 devices)", "single-device row grads fed to sparse_update")
    # the same global rows replicated on the mesh (a NamedSharding, not split over the rows)
    replicated = jax.device_put(pb(gs[0]), jax.sharding.NamedSharding(ms["1d"], P()))
    expect_error(lambda: jsh.sparse_update(opts["sgd"], w_sh, jsh.sparse_init(
        opts["sgd"], w_sh, mesh=ms["1d"], axis_name="model"), replicated, mesh=ms["1d"],
        axis_name="model"), "row_grads must hold per-shard local rows split over axis_name="
        "'model' (8 devices)", "replicated global row grads fed to sparse_update")

    for mname, axis, batch, mode, args, kw in configs:  # one jit per config, all optimisers
        mesh = ms[mname]
        w0 = jsh.shard_table(d["w"], mesh, axis)
        s0 = {k: jsh.sparse_init(o, w0, mesh=mesh, axis_name=axis) for k, o in opts.items()}
        ref = jax.jit(
            lambda w, s: {k: single(w, s[k], o, mode, args, kw) for k, o in opts.items()}
        )(d["w"], {k: o.init(d["w"]) for k, o in opts.items()})
        f = jax.jit(
            lambda w, s: {
                k: sharded(w, s[k], o, mode, args, kw, mesh, axis, batch) for k, o in opts.items()
            }
        )
        compiled = f.lower(w0, s0).compile()
        got = compiled(w0, s0)
        for oname in opts:
            got_w, got_s, _ = got[oname]
            ref_w, ref_s = ref[oname]
            tag = f"sparse {oname} {mname} {mode} {len(args)}-arg"
            close(got_w, ref_w, f"{tag} table", atol=1e-5)  # CPU kernel vs XLA rounding
            for a, b in zip(jax.tree.leaves(got_s), jax.tree.leaves(ref_s)):
                close(a, b, f"{tag} state", atol=1e-5)
            if got_w.sharding.spec not in (P(axis, None), P(axis)):
                raise AssertionError(f"{tag}: table came back as {got_w.sharding.spec}")
            if np.allclose(np.asarray(got_w), np.asarray(d["w"])):
                raise AssertionError(f"{tag}: nothing was updated")
        check_no_table_traffic(
            compiled.as_text(), [(V, D)], f"sparse {mname} {axis}",
            row_group_size=jsh.axis_size(mesh, axis), allow_int_gather=True,
        )

    # Ids at positions outside every bag (segment id >= B: padding) are not rows of the batch: a
    # lazy optimiser must not touch them (single-device: tests/test_sparse.py).
    ids_s, seg_s = np.asarray(d["ids_s"]), np.asarray(d["seg_s"])
    expect = sorted(set(ids_s[(seg_s < B) & (ids_s != 3)].tolist()))
    if set(ids_s[seg_s >= B].tolist()) <= set(expect):
        raise AssertionError("make_data: a padding id must be absent from the bags")
    for mname, axis, batch in [("1d", "model", None), ("2d", "model", "data")]:
        mesh = ms[mname]
        n = mesh.shape[axis]
        _, pb = jsh.embedding_bag_rows(
            jsh.shard_table(d["w"], mesh, axis), d["ids_s"], mesh=mesh, axis_name=axis,
            batch_axis=batch, mode="sum", padding_idx=3, segment_ids=d["seg_s"], num_bags=B,
        )
        rows = np.asarray(pb(gs[0]).rows).reshape(n, -1)  # local row numbers, R = unused
        r = V // n
        # every slot a shard does not own holds R (skipped by any mode="drop" scatter), never a
        # negative local row number of another shard's row (a scatter would wrap it)
        if rows.min() < 0 or rows.max() > r:
            raise AssertionError(f"sparse rows {mname}: local rows outside [0, {r}]: {rows}")
        got = sorted(set((rows + np.arange(n)[:, None] * r)[rows < r].tolist()))
        if got != expect:
            raise AssertionError(f"sparse rows {mname}: touched {got}, the bags hold {expect}")

    # bf16 / f16 tables: a row's gradient is summed in float32 (3000 ones: 3000, not bf16's 256
    # or f16's 2048), as on one device; it was summed in the table's dtype.
    ids = jnp.zeros((3000, 1), jnp.int32)
    for dtype in (jnp.bfloat16, jnp.float16):
        w0 = jsh.shard_table(jnp.ones((V, D), dtype), ms["1d"], "model")
        _, pb = jsh.embedding_bag_rows(w0, ids, mesh=ms["1d"], axis_name="model", mode="sum")
        rg = pb(jnp.ones((3000, D), dtype))
        got = np.asarray(rg.grads)[np.asarray(rg.rows) == 0]
        if rg.grads.dtype != jnp.float32 or got.tolist() != [[3000.0] * D]:
            raise AssertionError(f"sharded {jnp.dtype(dtype).name} row grads {rg.grads.dtype} {got}")

    # A batch without ids (1-D N = 0, 2-D [B, 0]): zero bags and no row touched, as on one
    # device (with batch_axis the pullback used to fail in jax.vjp / an all_gather of 0 ids).
    mesh = ms["2d"]
    w0 = jsh.shard_table(d["w"], mesh, "model")
    opt = jaxbag.sparse_adam(0.1)
    for ids, kw in [(jnp.zeros((0,), jnp.int32), dict(offsets=jnp.zeros((B,), jnp.int32))),
                    (jnp.zeros((B, 0), jnp.int32), {})]:
        for size in (None, 3):
            for batch in (None, "data"):
                def step(w, s, ids=ids, kw=kw, size=size, batch=batch):
                    bags, pb = jsh.embedding_bag_rows(w, ids, mesh=mesh, axis_name="model",
                                                      batch_axis=batch, size=size, mode="sum", **kw)
                    rg = pb(jnp.ones_like(bags))
                    return bags, rg, jsh.sparse_update(opt, w, s, rg, mesh=mesh, axis_name="model")

                for run in (step, jax.jit(step)):
                    bags, rg, (w1, _) = run(w0, jsh.sparse_init(opt, w0, mesh=mesh, axis_name="model"))
                    tag = f"empty batch {ids.shape} size={size} batch_axis={batch}"
                    close(bags, np.zeros((B, D)), tag)
                    if size and (rg.rows.sharding.spec != P("model")  # (0 rows: any spec)
                                 or rg.grads.sharding.spec not in (P("model", None), P("model"))):
                        raise AssertionError(f"{tag}: {rg.rows.sharding} {rg.grads.sharding}")
                    if rg.rows.shape != (4 * (size or 0),) or np.any(np.asarray(rg.rows) != V // 4):
                        raise AssertionError(f"{tag}: rows {np.asarray(rg.rows)}")
                    close(w1, d["w"], f"{tag}: table changed")


def check_batch_shard_ids(step, opt, layout, p, s, tables, what):
    """In the compiled sparse collection step, every group's looked-up rows are its batch
    shard's ``[M / m, D]``, never the whole batch's ``[M, D]`` (``M`` the group's packed ids,
    ``m`` batch shards): each device reads only its own examples' ids (the ids are gathered over
    the batch axis as ints, for one slot space). Capacities differ per feature, so no two groups'
    ``M`` or ``M / m`` coincide."""
    feats, _ = collection_batch(tables, seed=0)
    m = layout.plan.mesh.shape["data"]
    jf = jaxbag.JaggedFeatures.from_lists(
        feats, capacity={f: 40 + 8 * i for i, f in enumerate(feats)}, num_shards=m)
    hlo = jax.jit(functools.partial(step, opt, layout)).lower(p, s, jf).compile().as_text()
    whole = {g.name: (m * sum(jf.capacities[jf.index(f)] for f in g.feature_names), g.features)
             for g in layout.groups}
    local = {k: (n // m, d) for k, (n, d) in whole.items()}
    if len(set(whole.values()) | set(local.values())) != 2 * len(whole):
        raise AssertionError(f"{what}: ambiguous shapes {whole} {local}")
    for name, (n, d) in whole.items():
        if f"f32[{n},{d}]" in hlo:
            raise AssertionError(f"{what}: group {name} looks up the whole batch's ids f32[{n},{d}]")
        if f"f32[{n // m},{d}]" not in hlo:
            raise AssertionError(f"{what}: group {name}: no f32[{n // m},{d}] batch-shard rows")


def case_collection_sparse():
    """Sparse row updates of a planned (sharded) collection equal the plain single-device path.

    A (data 2 x model 4) plan with row-wise, table-wise and replicated groups (every mode, a
    shared table, padding rows) against the unstacked layout on one device: bags, and the tables
    and optimiser states after 3 steps of each sparse optimiser (ragged batches, one compile).
    The compiled step moves no table over the model axis, and every group is updated. Then the
    tables and states move to a (data 4 x model 2) plan with other placements (unpack_tables /
    unpack_states, pack_tables / pack_states) and a 4th step there equals the plain path's.
    """
    ms = meshes()
    mesh = ms["2d"]
    tables = [t for t in collection_tables() if t.name not in ("bf", "s3")]
    plan = jsh.plan_sharding(tables, mesh, axis_name="model", batch_axis="data",
                             overrides={"rep": "replicated", "geo": "row", "item": "row"})
    kinds = set(plan.as_dict().values())
    if kinds != {"row", "table", "replicated"}:
        raise AssertionError(f"want every placement kind: {plan.as_dict()}")
    lp = jaxbag.collection_layout(tables, plan=plan)
    lu = jaxbag.collection_layout(tables, stack=False)
    p0 = jaxbag.init_collection(lp, jax.random.key(3))
    u0 = jaxbag.unpack_tables(lp, p0)
    batches = []
    for seed in range(4):  # ragged: other lengths, same capacities (the 4th: after the move)
        feats, _ = collection_batch(tables, seed=seed)
        caps = {f: 3 * 8 for f in feats}
        batches.append((jaxbag.JaggedFeatures.from_lists(feats, capacity=caps, num_shards=2),
                        jaxbag.JaggedFeatures.from_lists(feats, capacity=caps),
                        jaxbag.JaggedFeatures.from_lists(feats, capacity=caps, num_shards=4)))
    # Another plan to move to: a (data 4 x model 2) mesh, the replicated table now row-wise.
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AUTO, AUTO))
    plan2 = jsh.plan_sharding(tables, mesh2, axis_name="model", batch_axis="data",
                              overrides={"rep": "row", "geo": "table", "item": "row"})
    l2 = jaxbag.collection_layout(tables, plan=plan2)
    rng = np.random.default_rng(11)
    head = jnp.asarray(rng.normal(size=(lp.output_features,)).astype(np.float32))

    def step(opt, layout, p, s, jf):
        x, pullback = jaxbag.embedding_bag_collection_rows(p, jf, layout=layout, concat=True,
                                                           dtype=jnp.float32)
        # (a loss whose gradient is well conditioned: tanh's saturates, and adagrad's first
        # step divides by the gradient's own size)
        g = jax.grad(lambda x: jnp.sum(jnp.sin(x @ head)))(x)
        return (*opt.update(p, s, pullback(g)), x)

    ls = jaxbag.collection_layout(tables)  # stacked, no plan: the same group names
    if [g.name for g in ls.groups] != [g.name for g in lp.groups]:
        raise AssertionError(f"group names {[g.name for g in ls.groups]}")

    @jax.jit
    def plain_rows(u, jf):
        out, pullback = jaxbag.embedding_bag_collection_rows(jaxbag.pack_tables(ls, u), jf,
                                                             layout=ls)
        return pullback(jax.tree.map(jnp.ones_like, out))

    for oname, base in [("sgd", jaxbag.sparse_sgd(0.5)), ("adagrad", jaxbag.sparse_adagrad(0.3)),
                        ("adam", jaxbag.sparse_adam(0.1))]:
        opt_p = jaxbag.collection_optimizer(base, layout=lp)
        opt_u = jaxbag.collection_optimizer(base, layout=lu)
        sharded = jax.jit(functools.partial(step, opt_p, lp))
        single = jax.jit(functools.partial(step, opt_u, lu))
        p, s = p0, opt_p.init(p0)
        for g in lp.groups:  # row-sharded as the group (scalars replicated), or replicated
            for a in jax.tree.leaves(s[g.name]):
                spec = P("model", *[None] * (a.ndim - 1)) if g.sharded and a.ndim else P()
                if not a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim):
                    raise AssertionError(f"{oname} {g.name}: state sharded {a.sharding}")
        u, su = u0, opt_u.init(u0)
        for jf, jf1, _ in batches[:3]:
            p, s, x = sharded(p, s, jf)
            u, su, x1 = single(u, su, jf1)
            close(x, x1, f"collection sparse {oname} bags", rtol=1e-5)
        tag = f"collection sparse {oname}"

        def check_equal(layout, p, s, want_p, want_s, when, tol=1e-4):
            got, states = jaxbag.unpack_tables(layout, p), jaxbag.unpack_states(layout, s)
            for t in tables:
                close(got[t.name], want_p[t.name], f"{tag} table {t.name} {when}", rtol=tol,
                      atol=tol / 10)
                if np.allclose(np.asarray(got[t.name]), np.asarray(u0[t.name])):
                    raise AssertionError(f"{tag}: table {t.name} not updated")
                if jax.tree.structure(states[t.name]) != jax.tree.structure(want_s[t.name]):
                    raise AssertionError(f"{tag}: state of {t.name}: {states[t.name]}")
                for a, b in zip(jax.tree.leaves(states[t.name]), jax.tree.leaves(want_s[t.name])):
                    close(a, b, f"{tag} optimizer state of {t.name} {when}", rtol=tol,
                          atol=tol / 10)

        # float summation order (3 steps; the 3-row table sums many ids per row)
        check_equal(lp, p, s, u, su, "after 3 steps")
        for name, want in lp.param_shardings().items():
            if not p[name].sharding.is_equivalent_to(want, 2):
                raise AssertionError(f"{tag} {name}: {p[name].sharding.spec}")
        if oname == "sgd":  # a plain layout's row gradients (global rows) are refused, eagerly
            expect_error(lambda: opt_p.update(p, s, plain_rows(u, batches[0][1])),
                         "per-shard local rows split over axis_name='model'",
                         "plain row gradients fed to the planned optimiser")
        if sharded._cache_size() != 1:  # ragged batches, state as init placed it: one compile
            raise AssertionError(f"{tag}: the step compiled {sharded._cache_size()} times")
        compiled = sharded.lower(p, s, batches[0][0]).compile()
        shapes = [(g.num_rows, g.features) for g in lp.groups if g.sharded]
        check_no_table_traffic(compiled.as_text(), shapes, tag, plan.num_shards,
                               allow_int_gather=True)
        if oname == "adam":  # data parallel: each device looks up its batch shard's ids only
            check_batch_shard_ids(step, opt_p, lp, p, s, tables, tag)
        # Tables and optimizer state moved to the other plan (pack_states places the state as
        # opt.init does: one compile), one more step: as a 4th step on the first plan (the same
        # sums, so up to 1e-6), and, up to float drift, the plain path's 4th step.
        opt2 = jaxbag.collection_optimizer(base, layout=l2)
        moved = jax.jit(functools.partial(step, opt2, l2))
        p2 = jax.device_put(jaxbag.pack_tables(l2, jaxbag.unpack_tables(lp, p)),
                            l2.param_shardings())
        s2 = jaxbag.pack_states(l2, jaxbag.unpack_states(lp, s))
        moved(p2, opt2.init(p2), batches[3][2])
        p2, s2, x = moved(p2, s2, batches[3][2])
        u, su, x1 = single(u, su, batches[3][1])
        pq, sq, xq = sharded(p, s, batches[3][0])
        close(x, xq, f"{tag} bags after the move", rtol=1e-6)
        close(x, x1, f"{tag} bags after the move, plain path", rtol=1e-4, atol=1e-5)
        if moved._cache_size() != 1:
            raise AssertionError(f"{tag}: the moved step compiled {moved._cache_size()} times")
        check_equal(l2, p2, s2, jaxbag.unpack_tables(lp, pq), jaxbag.unpack_states(lp, sq),
                    "after the move and a 4th step (vs the first plan)", tol=1e-6)
        check_equal(l2, p2, s2, u, su, "after the move and a 4th step (vs the plain path)",
                    tol=2e-4)


    # One compile whatever the group order or argument order: a replicated group named first, the
    # batch as the first argument (a step that mixes placements reads the specs back from the
    # compiled program: P('model',), which init_collection / collection_optimizer now place).
    small = [jaxbag.TableConfig("a", 3, 4, ("r",), mode="sum"),
             jaxbag.TableConfig("m", 40, 4, ("i",), mode="mean")]
    # Also an Explicit mesh outside jax.set_mesh: the replicated group's CPU-kernel update
    # returned P() for the P(None, None) it was given (a second compile).
    for mesh_ in (mesh, jax.make_mesh((8, 1), ("data", "model"), axis_types=(AUTO, AUTO)),
                  jax.make_mesh((2, 4), ("data", "model"), axis_types=(EXPLICIT, EXPLICIT))):
        lay = jaxbag.collection_layout(small, plan=jsh.plan_sharding(
            small, mesh_, axis_name="model", batch_axis="data", overrides={"a": "replicated"}))
        opt = jaxbag.collection_optimizer(jaxbag.sparse_adam(0.1), layout=lay)

        @functools.partial(jax.jit, donate_argnums=(1, 2))
        def batch_first(jf, p, s, lay=lay, opt=opt):
            x, pb = jaxbag.embedding_bag_collection_rows(p, jf, layout=lay, concat=True)
            return opt.update(p, s, pb(jnp.cos(x)))

        p = jaxbag.init_collection(lay, jax.random.key(0))
        s = opt.init(p)
        n_batch = mesh_.shape["data"]
        for seed in range(3):
            jf = jaxbag.JaggedFeatures.from_lists(
                {"r": [[seed % 3]] * 8, "i": [[seed, 2 * seed + 1]] * 8}, capacity=16,
                num_shards=n_batch)
            p, s = batch_first(jf, p, s)
        if batch_first._cache_size() != 1:
            raise AssertionError(f"mesh {dict(mesh_.shape)} {mesh_.axis_types}: the batch-first "
                                 f"step compiled {batch_first._cache_size()} times")


def case_experiment():
    """The text classifier trained data-parallel x row-sharded (2 x 4) equals single-device."""
    import json
    import pathlib
    import tempfile

    import ml_collections

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/, experiments/

    from configs import bbc_news_sharded, smoke
    from experiments import train
    from experiments.textcls import sharded

    def config(with_mesh):
        c = smoke.get_config()
        c.train.num_epochs = 2
        c.train.plot = False
        c.optim.sparse_embedding = False  # as configs/bbc_news_sharded.py
        if with_mesh:
            c.sharding = ml_collections.ConfigDict(bbc_news_sharded.get_config().sharding)
        return c

    # On CPU the sharded loop keeps one step in flight (XLA:CPU deadlocks with several queued).
    if not sharded.one_step_in_flight(config(True)) or sharded.one_step_in_flight(config(False)):
        raise AssertionError("one_step_in_flight: True for the sharded config on CPU only")
    waits = []
    block_until_ready = jax.block_until_ready

    def counting_block_until_ready(x):
        waits.append(1)
        return block_until_ready(x)

    with tempfile.TemporaryDirectory() as tmp:
        single = train.train_and_evaluate(config(False), f"{tmp}/single")
        jax.block_until_ready = counting_block_until_ready
        try:
            split = train.train_and_evaluate(config(True), f"{tmp}/sharded")
        finally:
            jax.block_until_ready = block_until_ready
        hist = [
            [json.loads(x) for x in open(f"{tmp}/{n}/metrics.jsonl")]
            for n in ("single", "sharded")
        ]
        # a sharded run stopped after epoch 1, then resumed, ends where the uninterrupted one did
        stopped = config(True)
        stopped.train.stop_after_epochs = 1
        train.train_and_evaluate(stopped, f"{tmp}/resumed")
        resumed = train.train_and_evaluate(config(True), f"{tmp}/resumed")
        steps = hist[1][-1]["global_step"]
        if len(waits) < steps:
            raise AssertionError(f"the sharded loop waited {len(waits)} times in {steps} steps")
        if resumed["resumed_from_epoch"] != 1:
            raise AssertionError(f"did not resume: {resumed['resumed_from_epoch']}")
        for k in ("test_accuracy", "test_loss"):
            if resumed[k] != split[k]:
                raise AssertionError(f"resumed {k} {resumed[k]} != uninterrupted {split[k]}")
        # predict on the sharded workdir from a 1-device process (it refused: topology mismatch)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        pred = subprocess.run(
            [sys.executable, "-m", "experiments.predict", "--workdir", f"{tmp}/sharded", "--json",
             "shares fell"], cwd=pathlib.Path(__file__).resolve().parents[1], env=env,
            capture_output=True, text=True, timeout=300, check=False)
        if pred.returncode != 0 or '"label"' not in pred.stdout:
            raise AssertionError(f"predict on a sharded workdir failed:\n{pred.stdout}{pred.stderr[-3000:]}")
    if split["test_accuracy"] != single["test_accuracy"]:
        raise AssertionError(f"accuracy {split['test_accuracy']} != {single['test_accuracy']}")
    for a, b in zip(*hist):
        for k in ("train_loss", "test_loss"):
            if not np.isclose(a[k], b[k], rtol=1e-4):
                raise AssertionError(f"epoch {a['epoch']} {k}: {b[k]} (sharded) != {a[k]}")
    if split["num_embeddings"] != single["num_embeddings"]:
        raise AssertionError("vocabularies differ")
    # One compilation per padded batch size, as single-device: fresh optimizer step counts and
    # metric sums start replicated on the mesh, as the train step returns them.
    # (The resumed run's count covers both of its processes, each compiling at most as often as
    # the uninterrupted run: a process trains one epoch, so it may see fewer batch sizes.)
    compiled, twice = (r["compilations"]["train_step"] for r in (split, resumed))
    if compiled != single["compilations"]["train_step"] or not 2 <= twice <= 2 * compiled:
        raise AssertionError(f"train_step compiled {compiled}x sharded ({twice}x in the two "
                             f"processes of the resumed run), "
                             f"{single['compilations']['train_step']}x single-device")


def case_split_features():
    """A batch that arrives split over the data axis (``feature_specs``, as the "Many hosts"
    recipe builds it) gives exactly the results of the same batch replicated, on a (2 x 4) mesh
    with Auto and with Explicit axes.

    On Auto axes the results were silently wrong: XLA's SPMD partitioner (jax 0.10.2) counts
    the replicated leading 0 of a scatter-add at ``concatenate([0], ends split over 'data')``
    twice, the pattern lengths_to_segment_ids used. On Explicit axes packing a split batch was
    a sharding type error.
    """
    tables = [t for t in collection_tables() if t.name not in ("bf",)]
    feats, ws = collection_batch(tables, seed=5, weights=False)
    for axis_type in (AUTO, EXPLICIT):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
        tag = f"split features ({axis_type})"
        with jax.set_mesh(mesh):
            jf = jaxbag.JaggedFeatures.from_lists(feats, capacity=24, num_shards=2)
            specs = jsh.feature_specs(jf, "data")
            split = jax.tree.map(lambda a, sp: jax.device_put(a, NamedSharding(mesh, sp)), jf,
                                 specs)
            whole = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), jf)
            if split.lengths.sharding.spec != P(None, "data"):
                raise AssertionError(f"{tag}: lengths not split: {split.lengths.sharding}")
            lengths = jnp.asarray([2, 0, 3, 1, 1, 0, 2, 1], jnp.int32)
            cases = {"lengths_to_segment_ids": (
                lambda l: jaxbag.lengths_to_segment_ids(l, 16),
                (jax.device_put(lengths, NamedSharding(mesh, P()))),
                (jax.device_put(lengths, NamedSharding(mesh, P("data")))))}
            cases["JaggedFeatures.feature"] = (lambda j: j.feature("i2"), (whole,), (split,))
            plan = jsh.plan_sharding(tables, mesh, axis_name="model", batch_axis="data",
                                     overrides={"rep": "replicated", "geo": "row"})
            for name, layout in (("plain", jaxbag.collection_layout(tables)),
                                 ("planned", jaxbag.collection_layout(tables, plan=plan))):
                params = jaxbag.init_collection(layout, jax.random.key(1))
                if layout.plan is None:
                    params = jax.device_put(params, NamedSharding(mesh, P()))

                def rows(p, j, layout=layout):
                    x, pullback = jaxbag.embedding_bag_collection_rows(p, j, layout=layout,
                                                                       concat=True)
                    return x, pullback(jnp.cos(x))

                cases[f"{name} collection"] = (
                    lambda p, j, layout=layout: jaxbag.embedding_bag_collection(
                        p, j, layout=layout, concat=True), (params, whole), (params, split))
                cases[f"{name} collection rows"] = (rows, (params, whole), (params, split))
            for what, (fn, a, b) in cases.items():
                a = a if isinstance(a, tuple) else (a,)
                b = b if isinstance(b, tuple) else (b,)
                want, got = jax.jit(fn)(*a), jax.jit(fn)(*b)
                for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
                    if not np.array_equal(np.asarray(x), np.asarray(y)):
                        raise AssertionError(f"{tag}: {what} differs for the split batch\n"
                                             f"{np.asarray(x)}\n{np.asarray(y)}")
        # Eagerly, outside jax.set_mesh, with a batch on one device (an earlier fix moved it onto
        # the mesh first, and the eager argument checks then failed on an Explicit mesh).
        planned = jaxbag.collection_layout(tables, plan=plan)
        params = jaxbag.init_collection(planned, jax.random.key(1))
        jf = jaxbag.JaggedFeatures.from_lists(feats, capacity=24, num_shards=2)
        eager = jaxbag.embedding_bag_collection_rows(params, jf, layout=planned, concat=True)[0]
        jitted = jax.jit(lambda p, j: jaxbag.embedding_bag_collection_rows(
            p, j, layout=planned, concat=True)[0])(params, jf)
        close(eager, jitted, f"{tag}: eager planned rows outside set_mesh")


def compare_split_inputs(mesh, w, ids, psw, offsets, wspec, ispec, ospec, want_spec, modes):
    """The plain op on a table, ids (and per-sample weights) and offsets placed with ``wspec``,
    ``ispec`` and ``ospec`` on an Explicit mesh (run under ``jax.set_mesh``): eager and jitted
    values and the table gradient equal the single-device op's, and the jitted bags come out
    with ``want_spec``."""
    ws = jax.device_put(w, NamedSharding(mesh, wspec))
    xs = jax.device_put(ids, NamedSharding(mesh, ispec))
    ps = jax.device_put(psw, NamedSharding(mesh, ispec))
    ref_extra = () if offsets is None else (jnp.asarray(offsets),)
    extra = () if offsets is None else (jax.device_put(offsets, NamedSharding(mesh, ospec)),)
    for mode in modes:
        tag = f"explicit {wspec} table, {ispec} ids [{ids.ndim}-D], {ospec} offsets, {mode}"
        kw = {} if mode == "max" else {"per_sample_weights": ps}
        kw_ref = {} if mode == "max" else {"per_sample_weights": jnp.asarray(psw)}

        def loss(t, i, *o, kw, mode=mode):
            return jnp.sum(jnp.sin(jaxbag.embedding_bag(t, i, *o, mode=mode, **kw)))

        want = jaxbag.embedding_bag(w, ids, *ref_extra, mode=mode, **kw_ref)
        close(jaxbag.embedding_bag(ws, xs, *extra, mode=mode, **kw), want, f"{tag}: eager")
        jitted = jax.jit(lambda t, i, *o, kw=kw, mode=mode: jaxbag.embedding_bag(
            t, i, *o, mode=mode, **kw))(ws, xs, *extra)
        close(jitted, want, f"{tag}: jit")
        if jitted.sharding.spec != want_spec:
            raise AssertionError(f"{tag}: bags {jitted.sharding.spec}, want {want_spec}")
        got = jax.jit(jax.grad(functools.partial(loss, kw=kw)))(ws, xs, *extra)
        close(got, jax.grad(functools.partial(loss, kw=kw_ref))(w, ids, *ref_extra),
              f"{tag}: table gradient")


def case_plain_explicit():
    """The plain op and the NNX module on inputs split over an Explicit (2 x 4) mesh, as a
    data-parallel model on jax.make_mesh's default axes holds them: a batch-split 2-D id array
    (eagerly, the value checks sliced it: a sharding type error), a column- or row-split table,
    or both. Values and table gradients equal the single-device op's, the bags come out split
    over the batch as the ids and over the features as the table, and a jitted step compiles
    once for two batches."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(EXPLICIT, EXPLICIT))
    rng = np.random.default_rng(3)
    w = rng.normal(size=(V, 8)).astype(np.float32)
    ids = rng.integers(0, V, (B, 3)).astype(np.int32)
    psw = rng.random((B, 3)).astype(np.float32)
    layouts = [(P(), P("data", None)), (P(None, "model"), P()), (P("model", None), P()),
               (P(None, "model"), P("data", None)), (P(None, "data"), P("data", None))]
    with jax.set_mesh(mesh):
        for wspec, ispec in layouts:
            bags_axis = None if ispec == P() or wspec == P(None, "data") else "data"
            want_spec = P(bags_axis, wspec[1] if len(wspec) > 1 else None)
            compare_split_inputs(mesh, w, ids, psw, None, wspec, ispec, None, want_spec, MODES)
        # a data-parallel NNX step: one compile for two batches of the same shape
        from flax import nnx

        model = jaxbag.nnx.EmbeddingBag(V, 8, mode="mean", rngs=nnx.Rngs(0))
        traces = []

        @jax.jit
        def step(table, i):
            traces.append(1)
            return jax.grad(lambda t: jnp.sum(jaxbag.embedding_bag(t, i, mode="mean") ** 2))(table)

        table = jax.device_put(model.embedding[...], NamedSharding(mesh, P()))
        for seed in (0, 1):
            batch = np.random.default_rng(seed).integers(0, V, (B, 3)).astype(np.int32)
            step(table, jax.device_put(batch, NamedSharding(mesh, P("data", None))))
        if len(traces) != 1:
            raise AssertionError(f"explicit data-parallel step traced {len(traces)} times")
        out = model(jax.device_put(ids, NamedSharding(mesh, P("data", None))))
        close(out, jaxbag.embedding_bag(model.embedding[...], ids, mode="mean"), "NNX module")
        # ids captured by a jitted function (a constant: checked eagerly as a host copy; a reshard
        # of it inside jit was traced, and the checks' bool() failed)
        xs = jax.device_put(ids, NamedSharding(mesh, P("data", None)))
        got = jax.jit(lambda t: jaxbag.embedding_bag(t, xs, mode="sum"))(w)
        close(got, jaxbag.embedding_bag(w, ids, mode="sum"), "explicit ids captured under jit")
        # a shard_map over the data axis only: the model axis stays Explicit inside, and only it
        # is made Auto (auto_axes over every axis tried to convert the Manual one)
        sm = jax.jit(jax.shard_map(
            lambda t, i: jaxbag.embedding_bag(t, i, mode="mean"), in_specs=(P(), P("data")),
            out_specs=P("data"), axis_names={"data"}))
        for wspec in (P(None, "model"), P("model", None)):
            got = sm(jax.device_put(w, NamedSharding(mesh, wspec)), xs)
            close(got, jaxbag.embedding_bag(w, ids, mode="mean"), f"partial shard_map, {wspec}")
        # vmap over a batch axis split over "data" (JAX's own loop rule for the kernel call, and
        # the batched gather of the other path, were sharding type errors): one call on all rows'
        # bags, split over the batch as the rows; per-example gradients too (the gradient of the
        # vmap, per_sample_weights and tables per row: case vmap_explicit)
        rows = rng.integers(0, V, (B, 2, 3)).astype(np.int32)
        rs = jax.device_put(rows, NamedSharding(mesh, P("data")))
        for wspec in (P(), P(None, "model")):
            ws = jax.device_put(w, NamedSharding(mesh, wspec))
            for mode in ("mean", "max"):
                tag = f"vmap over data-split ids, {wspec} table, {mode}"

                def one(t, i, mode=mode):
                    return jaxbag.embedding_bag(t, i, mode=mode)

                got = jax.jit(jax.vmap(one, in_axes=(None, 0)))(ws, rs)
                close(got, np.stack([np.asarray(one(w, r)) for r in rows]), tag)
                want_spec = P("data", None, wspec[1] if len(wspec) > 1 else None)
                if got.sharding.spec != want_spec:
                    raise AssertionError(f"{tag}: bags {got.sharding.spec}, want {want_spec}")
                per_example = jax.jit(jax.vmap(jax.grad(lambda t, i: jnp.sum(jnp.sin(one(t, i)))),
                                               in_axes=(None, 0)))(ws, rs)
                for k in (0, B - 1):
                    close(np.asarray(per_example)[k], jax.grad(lambda t: jnp.sum(jnp.sin(one(t, rows[k]))))(w),
                          f"{tag}: per-example gradient {k}")
    # eagerly outside jax.set_mesh, ids on the Explicit mesh (replicated or split): the value
    # checks' compile-time ops failed for want of the mesh context
    for ispec in (P(), P("data", None)):
        xs = jax.device_put(ids, NamedSharding(mesh, ispec))
        close(jaxbag.embedding_bag(w, xs, mode="sum"), jaxbag.embedding_bag(w, ids, mode="sum"),
              f"eager outside set_mesh, {ispec} ids")


def case_explicit_layouts():
    """Inputs on an Explicit (2 x 4) mesh in the layouts plain_explicit leaves out: a table or 2-D
    ids split over both axes at once (a tuple ``PartitionSpec`` entry, ``P(("data", "model"))``),
    1-D ids (offsets form) split over the batch axis, whose bags stay whole over ``B`` (``B``
    need not divide by the axis), and split offsets. Values (eager and jitted) and table
    gradients equal the single-device op's, and the bags come out split as documented. Also:
    ``shard_table`` of a table that does not split over the shards names the fix."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(EXPLICIT, EXPLICIT))
    both = ("data", "model")
    rng = np.random.default_rng(11)
    w = rng.normal(size=(V, 8)).astype(np.float32)
    ids2 = rng.integers(0, V, (B, 3)).astype(np.int32)
    psw2 = rng.random((B, 3)).astype(np.float32)
    ids1 = rng.integers(0, V, (24,)).astype(np.int32)
    offs1 = np.array([0, 5, 5, 9, 20], np.int32)  # B = 5: not divisible by the 2 of "data"
    offs6 = np.array([0, 2, 7, 7, 11, 23], np.int32)
    psw1 = rng.random(24).astype(np.float32)
    # (table spec, id spec, ids, offsets, per-sample weights, expected bags spec)
    layouts = [
        (P(), P(both, None), ids2, None, psw2, P(both, None)),
        (P(None, both), P(), ids2, None, psw2, P(None, both)),
        (P(both, None), P(), ids2, None, psw2, P(None, None)),
        (P(None, "model"), P(both, None), ids2, None, psw2, P(None, "model")),  # shared axis: on D
        (P(), P("data"), ids1, offs1, psw1, P(None, None)),
        (P(None, "model"), P("data"), ids1, offs1, psw1, P(None, "model")),
        (P(None, both), P("data"), ids1, offs1, psw1, P(None, both)),
        (P(None, "model"), P("data"), ids1, offs6, psw1, P(None, "model")),  # offsets split too
    ]
    with jax.set_mesh(mesh):
        for wspec, ispec, ids, offs, psw, want_spec in layouts:
            ospec = None if offs is None else P("data") if len(offs) % 2 == 0 else P()
            compare_split_inputs(mesh, w, ids, psw, offs, wspec, ispec, ospec, want_spec,
                                 ("sum", "max"))
        # split offsets in the row-sharded op (data parallel) and the public conversion: the
        # scatter at the bag starts is a sharding type error for offsets split over "data"
        os6 = jax.device_put(offs6, NamedSharding(mesh, P("data")))
        wt = jsh.shard_table(w, mesh, "model")
        for mode in ("mean", "max"):
            def sharded(t, o, mode=mode):
                return jsh.embedding_bag(t, ids1, o, mesh=mesh, axis_name="model",
                                         batch_axis="data", mode=mode)

            want = jaxbag.embedding_bag(w, ids1, offs6, mode=mode)
            close(sharded(wt, os6), want, f"row-sharded op, split offsets, {mode}: eager")
            close(jax.jit(sharded)(wt, os6), want, f"row-sharded op, split offsets, {mode}: jit")
        seg = jax.jit(lambda o: jaxbag.offsets_to_segment_ids(o, 24))(os6)
        if not np.array_equal(np.asarray(seg), np.asarray(jaxbag.offsets_to_segment_ids(offs6, 24))):
            raise AssertionError(f"offsets_to_segment_ids of split offsets: {seg}")
    # shard_table: V = 30 on the 8 devices of ("data", "model"), or 4 of "model": the fix named
    for axis in ("model", both):
        expect_error(lambda axis=axis: jsh.shard_table(w[:30], mesh, axis), "pad_rows(weight, ",
                     f"shard_table of 30 rows over {axis}")
    got = jsh.shard_table(jsh.pad_rows(w[:30], 8), mesh, both)
    close(got, np.concatenate([w[:30], np.zeros((2, 8), np.float32)]), "shard_table(pad_rows)")
    if got.sharding.spec != P(both, None):
        raise AssertionError(f"shard_table over {both}: {got.sharding.spec}")


def case_vmap_explicit():
    """``jax.vmap`` over a batch axis split over Explicit mesh axes (2 x 4 mesh; S = 8 rows split
    over ``("data", "model")`` or over ``"data"``), on the kernel and the XLA paths: forward, the
    gradient *of* the vmap (a sum over the rows) with respect to the table and to
    ``per_sample_weights``, and per-example table gradients (vmap *of* grad) equal a loop of the
    single-device op, for one shared table (replicated or column-split) and a table per row,
    both id forms, each layout in every mode over the two paths. The derivative rule's gathers
    were sharding type errors there (JAX's gather batching rule) for a replicated table and for
    ``per_sample_weights``. A table column-split over an axis the batch also uses is refused, as
    JAX refuses a matmul there. Then the sparse path (:func:`check_sparse_vmap`)."""
    from jaxbag._src import cpu_kernel, explicit

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(EXPLICIT, EXPLICIT))
    rng = np.random.default_rng(19)
    s = 8
    w = rng.normal(size=(V, 8)).astype(np.float32)
    w_rows = rng.normal(size=(s, V, 8)).astype(np.float32)
    forms = {  # per-example ids, offsets (shared) or None
        "2-D": (rng.integers(0, V, (s, 3, 4)).astype(np.int32), None),
        "offsets": (rng.integers(0, V, (s, 9)).astype(np.int32), np.array([0, 2, 2, 6], np.int32)),
    }
    # (table, its spec, in_axes of the table, batch spec of ids / psw)
    layouts = [
        (w, P(), None, P(("data", "model"))),
        (w, P(None, "model"), None, P("data")),
        (w_rows, P("data"), 0, P("data")),
        (w_rows, P("data", None, "model"), 0, P("data")),
    ]
    # explicit.gather under vmap: split over the batch as the indices, and the unindexed
    # (column) dimension stays split as the table's (not replicated: an all-gather of the rows)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.vmap(explicit.gather, in_axes=(None, 0)))(
            jax.device_put(w, NamedSharding(mesh, P(None, "model"))),
            jax.device_put(forms["2-D"][0][:, 0], NamedSharding(mesh, P("data"))))
    close(got, w[forms["2-D"][0][:, 0]], "explicit.gather under vmap")
    if tuple(got.sharding.spec) != ("data", None, "model"):
        raise AssertionError(f"explicit.gather under vmap: {got.sharding.spec}")
    with jax.set_mesh(mesh):  # (no vmap: indices split over "data" split the result so)
        got = jax.jit(explicit.gather)(jax.device_put(w, NamedSharding(mesh, P(None, "model"))),
                                       jax.device_put(w[:, 0].argsort().astype(np.int32),
                                                      NamedSharding(mesh, P("data"))))
    close(got, w[w[:, 0].argsort()], "explicit.gather of split indices")
    if tuple(got.sharding.spec) != ("data", "model"):
        raise AssertionError(f"explicit.gather of split indices: {got.sharding.spec}")
    # a table whose columns are split over an axis the vmapped batch also uses is refused at
    # trace time (as JAX refuses `one_hot(ids) @ table` there: no array is split twice over one
    # axis), never computed; the README gives the fix
    with jax.set_mesh(mesh):
        wt = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
        it = jax.device_put(forms["2-D"][0], NamedSharding(mesh, P(("data", "model"))))
        for what, f in (("embedding_bag", lambda i: jaxbag.embedding_bag(wt, i)),
                        ("one_hot @ table", lambda i: jax.nn.one_hot(i, V) @ wt)):
            try:
                jax.jit(jax.vmap(f))(it)
            except Exception as e:  # (JAX's DuplicateSpecError / ShardingTypeError)
                if "model" not in str(e):
                    raise AssertionError(f"{what}: the error does not name the axis: {e}") from e
            else:
                raise AssertionError(f"{what}: a column split over a batch axis was accepted")
    # each device runs the kernels on its own rows: no all-gather of the batch (under auto_axes
    # the compiler gathered every row onto every device, an FFI call being unpartitionable)
    with jax.set_mesh(mesh):
        rows8 = jax.device_put(forms["offsets"][0], NamedSharding(mesh, P(("data", "model"))))
        offs = jnp.asarray(forms["offsets"][1])
        for what, f, args in (
                ("unique_rows", lambda i: jaxbag.unique_rows(i, V), (rows8,)),
                ("embedding_bag", lambda t, i: jaxbag.embedding_bag(t, i, offs, mode="sum"),
                 (jax.device_put(w, NamedSharding(mesh, P())), rows8)),
                ("embedding_bag_rows", lambda t, i: jaxbag.embedding_bag_rows(t, i, offs)[0],
                 (jax.device_put(w, NamedSharding(mesh, P())), rows8))):
            axes = (None, 0) if len(args) == 2 else 0
            hlo = jax.jit(jax.vmap(f, in_axes=axes)).lower(*args).compile().as_text()
            if "all-gather" in hlo or "custom-call" not in hlo:
                raise AssertionError(f"vmap of {what} over a batch split 8 ways: not each "
                                     f"device's rows alone:\n{hlo}")
    built, why = cpu_kernel.cpu_kernel_status()
    if not built:
        raise AssertionError(f"the CPU kernel is not built: {why}")
    for kernel in (True, False):
        cpu_kernel._kernel_state["ok"] = kernel  # (what every kernel_ok call reads)
        # every layout meets every mode once over the two paths: layout i, form f takes
        # mode i + 2 f (+ 1 on the XLA path)
        combos = [(layout, form, MODES[(i + 2 * f + (not kernel)) % len(MODES)])
                  for f, form in enumerate(forms.items()) for i, layout in enumerate(layouts)]
        for c, ((table, wspec, w_axis, bspec), (form, (ids, offsets)), mode) in enumerate(combos):
            psw = rng.random(ids.shape).astype(np.float32)
            tag = f"vmap, kernel={kernel}, {wspec} table, {bspec} rows, {form} ids, {mode}"
            extra = () if offsets is None else (jnp.asarray(offsets),)

            def one(t, i, p, mode=mode, extra=extra):
                kw = {} if mode == "max" else {"per_sample_weights": p}
                return jaxbag.embedding_bag(t, i, *extra, mode=mode, **kw)

            def loss(t, p, i, w_axis=w_axis, one=one):
                return jnp.sum(jnp.sin(jax.vmap(one, in_axes=(w_axis, 0, 0))(t, i, p)))

            def row_table(t, k, w_axis=w_axis):
                return t if w_axis is None else t[k]

            # the single-device loop, outside the mesh context
            want = np.stack([one(row_table(table, k), ids[k], psw[k]) for k in range(s)])
            want_gt, want_gp = (np.asarray(g) for g in jax.grad(loss, argnums=(0, 1))(table, psw, ids))
            loop_gt = [jax.grad(lambda t, k=k: jnp.sum(jnp.sin(one(t, ids[k], psw[k]))))(
                row_table(table, k)) for k in range(s)]
            loop_gp = [jax.grad(lambda p, k=k: jnp.sum(jnp.sin(one(row_table(table, k), ids[k], p))))(
                psw[k]) for k in range(s)]
            close(want_gt, sum(loop_gt) if w_axis is None else np.stack(loop_gt), f"{tag}: reference")
            close(want_gp, np.stack(loop_gp), f"{tag}: reference psw")
            with jax.set_mesh(mesh):
                ts = jax.device_put(table, NamedSharding(mesh, wspec))
                xs = jax.device_put(ids, NamedSharding(mesh, bspec))
                ps = jax.device_put(psw, NamedSharding(mesh, bspec))
                got = jax.jit(jax.vmap(one, in_axes=(w_axis, 0, 0)))(ts, xs, ps)
                gt, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(ts, ps, xs)
                # eagerly too: JAX refuses an eager shard_map over some of a mesh's Explicit
                # axes ("out_specs refers to 'model'"), so the rule's shard_map is jitted
                eager = jax.vmap(one, in_axes=(w_axis, 0, 0))(ts, xs, ps)
                if c < 2:  # (a replicated and a column-split table; eager grads are slow)
                    eager_g = jax.grad(loss, argnums=(0, 1))(ts, ps, xs)
                    close(eager_g[0], want_gt, f"{tag}: eager gradient of the vmap, table")
                    close(eager_g[1], want_gp, f"{tag}: eager gradient of the vmap, psw")
                per_example = jax.jit(jax.vmap(
                    jax.grad(lambda t, i, p, one=one: jnp.sum(jnp.sin(one(t, i, p)))),
                    in_axes=(w_axis, 0, 0)))(ts, xs, ps)
            close(got, want, f"{tag}: bags")
            close(eager, want, f"{tag}: eager bags")
            close(gt, want_gt, f"{tag}: gradient of the vmap, table")
            close(gp, want_gp, f"{tag}: gradient of the vmap, per_sample_weights")
            close(per_example, np.stack(loop_gt), f"{tag}: per-example table gradients")
        check_sparse_vmap(mesh, f"kernel={kernel}")
    cpu_kernel._kernel_state["ok"] = built


def case_sparse_explicit():
    """The sparse path's plain functions on inputs split over an Explicit (2 x 4) mesh, as a
    data-parallel model holds them (no ``vmap``): ``unique_rows``, ``embedding_bag_rows`` (bags
    and row gradients) and each sparse optimiser's update, for a replicated, column-split or
    row-split table and ids split over the batch or not, eagerly and under ``jit``, on the kernel
    and XLA paths. Every split input was a sharding type error (the sort of the ids, the
    gathers, the kernels). Values equal the single-device path's; the bags are split as
    ``embedding_bag``'s, the row gradients over ``D`` as the table's columns, and the table and
    its state keep their split."""
    from jaxbag._src import cpu_kernel

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(EXPLICIT, EXPLICIT))
    rng = np.random.default_rng(29)
    w = rng.normal(size=(V, 8)).astype(np.float32)
    ids = rng.integers(-1, V, (B, 4)).astype(np.int32)  # -1: skipped by the sparse path
    psw = rng.random((B, 4)).astype(np.float32)
    options = [  # (embedding_bag_rows keyword arguments, optimiser)
        (dict(mode="mean", per_sample_weights=psw), jaxbag.sparse_adam(0.1)),
        (dict(mode="max", padding_idx=3), jaxbag.sparse_adagrad(0.1)),
        (dict(mode="sum", max_norm=1.0), jaxbag.sparse_sgd(0.1)),
    ]
    layouts = [(P(), P("data")), (P(None, "model"), P()), (P(None, "model"), P("data")),
               (P("model", None), P("data"))]
    built = cpu_kernel.cpu_kernel_status()[0]
    for kernel in (True, False):
        cpu_kernel._kernel_state["ok"] = built and kernel  # (what every kernel_ok call reads)
        for k, (wspec, ispec) in enumerate(layouts):
            kw, opt = options[(k + (not kernel)) % len(options)]

            def step(t, st, i, p, kw=kw, opt=opt):
                kw = dict(kw, per_sample_weights=p) if "per_sample_weights" in kw else kw
                bags, pullback = jaxbag.embedding_bag_rows(t, i, size=4 * B, **kw)
                g = pullback(jnp.cos(bags))
                return bags, g, opt.update(t, st, g), jaxbag.unique_rows(i, V, size=4 * B)

            want = step(w, opt.init(w), ids, psw)
            for how in ("eager", "jit", "eager outside set_mesh"):
                tag = f"sparse, kernel={kernel}, {wspec} table, {ispec} ids, {kw['mode']}, {how}"
                with contextlib.nullcontext() if how.endswith("set_mesh") else jax.set_mesh(mesh):
                    t = jax.device_put(w, NamedSharding(mesh, wspec))
                    i = jax.device_put(ids, NamedSharding(mesh, ispec))
                    p = jax.device_put(psw, NamedSharding(mesh, ispec))
                    got = (step if how.startswith("eager") else jax.jit(step))(t, opt.init(t), i, p)
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                    close(a, b, tag)
                bags, g, (table, state), (_, inverse) = got
                if how == "jit":  # (init under jit within set_mesh too)
                    with jax.set_mesh(mesh):
                        state = jax.jit(opt.init)(t)
                want_specs = {
                    "inverse": (ispec[0] if ispec != P() else None, None),
                    "bags": (ispec[0] if ispec != P() else None, wspec[1] if len(wspec) > 1 else None),
                    "grads": (None, wspec[1] if len(wspec) > 1 else None),
                    "table": tuple(wspec) + (None,) * (2 - len(wspec)),
                }
                for name, x in (("bags", bags), ("grads", g.grads), ("table", table),
                                ("inverse", inverse)):
                    spec = tuple(jax.typeof(x).sharding.spec)
                    if spec != want_specs[name]:
                        raise AssertionError(f"{tag}: {name} split {spec}, want {want_specs[name]}")
                for leaf in jax.tree.leaves(state):  # per-row state: split as the table's rows
                    want_spec = want_specs["table"][:np.ndim(leaf)]
                    if np.ndim(leaf) and tuple(jax.typeof(leaf).sharding.spec) != want_spec:
                        raise AssertionError(f"{tag}: state {jax.typeof(leaf)}, want {want_spec}")
    cpu_kernel._kernel_state["ok"] = built
    # only one argument split: the row gradients (replicated table), per_sample_weights, the
    # valid mask; and jit outside set_mesh of functions that close over split arrays (eagerly
    # the library enters their mesh; under a trace it must not: set_mesh is refused inside jit.
    # Whether such a jit works otherwise is JAX's matter: it asks for set_mesh)
    opt = jaxbag.sparse_adam(0.1)
    bags, pullback = jaxbag.embedding_bag_rows(w, ids, mode="mean", per_sample_weights=psw)
    g = pullback(jnp.cos(bags))
    want_update = opt.update(w, opt.init(w), g)
    valid = ids % 3 > 0
    want_unique = jaxbag.unique_rows(ids, V, valid=valid)

    def close_tree(a, b, what):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            close(x, y, what)

    with jax.set_mesh(mesh):
        split_g = jaxbag.RowGrads(g.rows, jax.device_put(g.grads, NamedSharding(mesh, P(None, "model"))))
        for how, f in (("eager", lambda f: f), ("jit", jax.jit)):
            close_tree(f(opt.update)(w, opt.init(w), split_g), want_update, f"split row grads only, {how}")
            split_p = jax.device_put(psw, NamedSharding(mesh, P("data")))
            close(f(lambda p: jaxbag.embedding_bag_rows(w, ids, mode="mean", per_sample_weights=p)[0])(
                split_p), bags, f"split per_sample_weights only, {how}")
            split_v = jax.device_put(valid, NamedSharding(mesh, P("data")))
            close_tree(f(lambda v: jaxbag.unique_rows(ids, V, valid=v))(split_v), want_unique,
                       f"split valid only, {how}")
    t = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
    i = jax.device_put(ids, NamedSharding(mesh, P("data")))
    close(jax.jit(lambda x: jaxbag.embedding_bag_rows(x, i, mode="mean", per_sample_weights=psw)[0])(t),
          bags, "jit closing over split ids")
    # What a jitted data-parallel step moves (replicated table, batch split over "data"): the
    # compiler all-gathers the ids, their coefficients and the bag cotangent, then every device
    # computes the row gradients and the update; never an array of the table's V rows (a dense
    # gradient's all-reduce carries [V, D], and Adam's moments are [V, D] too).
    v2, b2 = 1000, 16  # (sizes no other array here has)
    adam = jaxbag.sparse_adam(0.1)

    def dp_step(t, st, i, gb):
        _, pullback = jaxbag.embedding_bag_rows(t, i, mode="sum")
        return adam.update(t, st, pullback(gb))

    with jax.set_mesh(mesh):
        t = jax.device_put(rng.normal(size=(v2, 8)).astype(np.float32), NamedSharding(mesh, P()))
        i = jax.device_put(rng.integers(0, v2, (b2, 5)).astype(np.int32), NamedSharding(mesh, P("data")))
        gb = jax.device_put(np.ones((b2, 8), np.float32), NamedSharding(mesh, P("data")))
        moved = collectives(jax.jit(dp_step).lower(t, adam.init(t), i, gb).compile().as_text())
    if not moved or any(re.search(rf"\[{v2}[,\]]", ty) for _, ty in moved):
        raise AssertionError(f"data-parallel sparse step moves a table-sized array: {moved}")


def check_sparse_vmap(mesh, what):
    """The sparse path under ``vmap`` over rows split over the Explicit ``"data"`` axis:
    ``unique_rows``, ``embedding_bag_rows`` (bags and per-example row gradients, which hold each
    example's dense gradient) and every sparse optimiser over stacked tables equal a loop of
    single-device calls, and come out split over the batch; ``embedding_bag_rows`` and
    ``sparse_adam`` also under a ``vmap`` nested in that one."""
    rng = np.random.default_rng(23)
    s, n, u = 8, 9, 8
    w = rng.normal(size=(V, 4)).astype(np.float32)
    ids = rng.integers(-1, V + 1, size=(s, n)).astype(np.int32)  # some out of range: skipped
    offs = np.sort(rng.integers(0, n, size=(s, 3)), axis=1).astype(np.int32)
    g = rng.normal(size=(s, 3, 4)).astype(np.float32)
    tables = w[None] * np.arange(1, s + 1, dtype=np.float32)[:, None, None]

    def example(table, i, o, gg, mode):
        out, pullback = jaxbag.embedding_bag_rows(table, i, o, mode=mode, size=u)
        return out, pullback(gg)

    def split(x):
        return jax.device_put(x, NamedSharding(mesh, P("data")))

    def same(got, want, tag):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            close(a, b, f"sparse vmap, {what}: {tag}")
            if jax.typeof(a).sharding.spec[0] != "data":
                raise AssertionError(f"sparse vmap, {what}: {tag} is {jax.typeof(a)}, not split")

    def stacked(results):
        return jax.tree.map(lambda *xs: np.stack(xs), *results)

    want_unique = stacked([jaxbag.unique_rows(ids[k], V, size=u) for k in range(s)])
    unique = jax.vmap(lambda i: jaxbag.unique_rows(i, V, size=u))
    # without a context mesh (jax.set_mesh): the Explicit mesh is known from the arguments only
    same(jax.jit(unique)(split(ids)), want_unique, "unique_rows without set_mesh")
    same(unique(split(ids)), want_unique, "eager unique_rows without set_mesh")
    with jax.set_mesh(mesh):
        same(jax.jit(unique)(split(ids)), want_unique, "unique_rows")
        same(unique(split(ids)), want_unique, "eager unique_rows")
    for mode in ("mean", "max"):
        want = stacked([jax.jit(example, static_argnums=4)(w, ids[k], offs[k], g[k], mode)
                        for k in range(s)])
        dense = np.stack([jax.jit(lambda t, i, o, gg, mode=mode: jax.vjp(
            lambda t: jaxbag.embedding_bag(t, i, o, mode=mode), t)[1](gg)[0])(w, ids[k], offs[k], g[k])
            for k in range(s)])
        with jax.set_mesh(mesh):
            args = (jax.device_put(w, NamedSharding(mesh, P())), split(ids), split(offs), split(g))
            batched = jax.vmap(functools.partial(example, mode=mode), (None, 0, 0, 0))
            got, eager = jax.jit(batched)(*args), batched(*args)
        same(got, want, f"embedding_bag_rows, {mode}")
        same(eager, want, f"eager embedding_bag_rows, {mode}")
        rows, grads = (np.asarray(x) for x in got[1])
        for k in range(s):
            keep = rows[k] < V
            close(grads[k][keep], dense[k][rows[k][keep]], f"sparse vmap, {what}: row gradients {k}")
    row_grads = jax.tree.map(np.asarray, got[1])  # the max mode's (host copies)
    for make in (jaxbag.sparse_sgd, jaxbag.sparse_adagrad, jaxbag.sparse_adam):
        opt = make(0.1)
        want = stacked([opt.update(tables[k], opt.init(tables[k]),
                                   jax.tree.map(lambda x: x[k], row_grads)) for k in range(s)])
        with jax.set_mesh(mesh):
            state = jax.tree.map(split, jax.vmap(opt.init)(tables))  # placed as the tables
            args = (split(tables), state, jax.tree.map(split, row_grads))
            new, eager = jax.jit(jax.vmap(opt.update))(*args), jax.vmap(opt.update)(*args)
        same(new, want, make.__name__)
        same(eager, want, f"eager {make.__name__}")
    # a vmap nested in the one over the split batch: each level batches through the same rule
    # (it was a sharding type error: the inner level's loop sliced the split rows)
    inner = ids.reshape(s, 3, 3)
    inner_offs = np.zeros((s, 3, 1), np.int32)
    inner_g = g[:, :, None, :]
    want = [[example(w, inner[k, j], inner_offs[k, j], inner_g[k, j], "sum") for j in range(3)]
            for k in range(s)]
    want = stacked([stacked(row) for row in want])
    nested = jax.vmap(jax.vmap(functools.partial(example, mode="sum"), (None, 0, 0, 0)),
                      (None, 0, 0, 0))
    with jax.set_mesh(mesh):
        got = jax.jit(nested)(jax.device_put(w, NamedSharding(mesh, P())), split(inner),
                              split(inner_offs), split(inner_g))
    same(got, want, "nested vmap of embedding_bag_rows")
    opt = jaxbag.sparse_adam(0.1)
    row_grads = jax.tree.map(np.asarray, got[1])
    stacks = np.broadcast_to(tables[:, None], (s, 3) + tables.shape[1:]).copy()
    want = stacked([stacked([opt.update(stacks[k, j], opt.init(stacks[k, j]),
                                        jax.tree.map(lambda x: x[k, j], row_grads))
                             for j in range(3)]) for k in range(s)])
    with jax.set_mesh(mesh):
        state = jax.tree.map(split, jax.vmap(jax.vmap(opt.init))(stacks))
        new = jax.jit(jax.vmap(jax.vmap(opt.update)))(split(stacks), state,
                                                      jax.tree.map(split, row_grads))
    same(new, want, "nested vmap of sparse_adam")


CASES = {
    "op_1d": case_op_1d,
    "op_2d": case_op_2d,
    "op_options": case_op_options,
    "collection": case_collection,
    "planner": case_planner,
    "modules": case_modules,
    "sparse": case_sparse,
    "collection_sparse": case_collection_sparse,
    "split_features": case_split_features,
    "plain_explicit": case_plain_explicit,
    "experiment": case_experiment,
    "explicit_layouts": case_explicit_layouts,
    "vmap_explicit": case_vmap_explicit,
    "sparse_explicit": case_sparse_explicit,
}


if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    for name in names:
        CASES[name]()
        print(f"{name}: ok", flush=True)
