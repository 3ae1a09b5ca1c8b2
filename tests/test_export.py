"""jax.export of code that calls jaxbag: the CPU kernel is a custom call without compatibility
guarantees, so exporting for CPU needs JAXBAG_DISABLE_CPU_KERNEL=1 (README, "jax.export").
The environment variable is read once per process, so each case runs in a fresh one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, jaxbag
from jax import export
rng = np.random.default_rng(0)
w = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
ids = jnp.array([1, 4, 4, 0, 6], jnp.int32)
offs = jnp.array([0, 2, 2], jnp.int32)
psw = jnp.array([0.5, 1.0, 2.0, 1.5, 1.0], jnp.float32)
for mode in ("sum", "mean", "max"):
    p = None if mode == "max" else psw
    f = lambda w, i, o: jaxbag.embedding_bag(w, i, o, mode=mode, per_sample_weights=p)
    g = jax.grad(lambda w, i, o: jnp.sum(f(w, i, o) ** 2))
    for fn in (f, g):
        try:
            exp = export.export(jax.jit(fn))(w, ids, offs)
        except Exception as e:
            print("REFUSED", type(e).__name__, " ".join(str(e).split())[:600])
            raise SystemExit(0)
        targets = [ln for ln in exp.mlir_module().splitlines() if "custom_call" in ln]
        assert not any("jaxbag" in ln for ln in targets), targets
        np.testing.assert_allclose(exp.call(w, ids, offs), fn(w, ids, offs), rtol=1e-6, atol=1e-6)
# vmap with a symbolic batch size (the batching rule's int32 check compared symbolic sizes)
b, = export.symbolic_shape("b")
rows = jnp.asarray(rng.integers(-1, 8, size=(4, 5)), jnp.int32)
f = lambda w, i: jaxbag.embedding_bag(w, i, offs, mode="mean")
g = jax.grad(lambda w, i: jnp.sum(f(w, i) ** 2))
for fn in (f, g):
    vf = jax.vmap(fn, in_axes=(None, 0))
    exp = export.export(jax.jit(vf))(jax.ShapeDtypeStruct(w.shape, w.dtype),
                                     jax.ShapeDtypeStruct((b, 5), jnp.int32))
    np.testing.assert_allclose(exp.call(w, rows), vf(w, rows), rtol=1e-6, atol=1e-6)
# [B, L] ids with a symbolic B (and L): each row a bag, values and gradients (int(num_bags) of a
# symbolic B raised InconclusiveDimensionOperation)
b, length = export.symbolic_shape("b, length")
for mode, weighted, extra in [("sum", True, {}), ("mean", True, {"padding_idx": 2}),
                              ("max", False, {"max_norm": 0.5}), ("sqrtn", True, {"padding_idx": -1})]:
    f = lambda w, i, p: jaxbag.embedding_bag(
        w, i, mode=mode, per_sample_weights=p if weighted else None, **extra)
    g = jax.grad(lambda w, i, p: jnp.sum(f(w, i, p) ** 2), (0, 2))
    r2 = jnp.asarray(rng.integers(0, 7, size=(4, 5)), jnp.int32)
    p2 = jnp.asarray(rng.uniform(0.5, 2.0, size=(4, 5)), jnp.float32)
    for fn in (f, g):
        for shape in [(b, 5), (b, length)]:
            specs = [(w.shape, w.dtype), (shape, jnp.int32), (shape, jnp.float32)]
            exp = export.export(jax.jit(fn))(*(jax.ShapeDtypeStruct(s, d) for s, d in specs))
            cases = [(r2, p2), (r2[:1], p2[:1])]
            if shape[1] is length:
                cases.append((r2[:, :2], p2[:, :2]))
            for i, p in cases:
                jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6),
                             exp.call(w, i, p), fn(w, i, p))
# what shape polymorphism does not support: the error says so and what to do instead
n, = export.symbolic_shape("n", scope=b.scope)
refused = [
    ((jax.ShapeDtypeStruct((5,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)), {},
     ["symbolic number of bags (b)", "offsets of shape (b,)", "pack_bags(..., batch_size=B)"]),
    ((jax.ShapeDtypeStruct((b, 5), jnp.int32),), {"scale_grad_by_freq": True},
     ["scale_grad_by_freq needs a static number of ids", "shape (b, 5)", "bucket_sizes"]),
    ((jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)),
     {"scale_grad_by_freq": True}, ["scale_grad_by_freq needs a static number of ids", "shape (n,)"]),
]
for args, kw, expected in refused:
    try:
        export.export(jax.jit(lambda w, *a: jaxbag.embedding_bag(w, *a, mode="sum", **kw)))(
            jax.ShapeDtypeStruct(w.shape, w.dtype), *args)
        raise AssertionError("exported")
    except ValueError as e:
        assert all(x in str(e) for x in expected), e
# a collection: exported with a fixed B it runs; with a symbolic B it is refused (int() of the
# symbolic lengths.shape[1] raised InconclusiveDimensionOperation from inside pack_features)
layout = jaxbag.collection_layout([jaxbag.TableConfig("a", 6, 2, ("x",), mode="sum")])
params = jaxbag.init_collection(layout, jax.random.key(0))
jf = jaxbag.JaggedFeatures.from_lists({"x": [[1, 2], [0]]}, capacity=8)
coll = jax.jit(lambda p, j: jaxbag.embedding_bag_collection(p, j, layout=layout))
exp = export.export(coll)(params, jf)
np.testing.assert_allclose(exp.call(params, jf)["x"], coll(params, jf)["x"], rtol=1e-6)
spec = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(jf), [
    jax.ShapeDtypeStruct((8,), jnp.int32), jax.ShapeDtypeStruct((1, b), jnp.int32)])
try:
    export.export(coll)(params, spec)
    raise AssertionError("exported")
except ValueError as e:
    assert all(x in str(e) for x in [
        "JaggedFeatures needs a static batch size B; got lengths of shape (1, b), a symbolic B=b",
        "export with a fixed B", "pad each batch with empty examples"]), e
print("EXPORTED")
"""


def _run(disable: bool) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("JAXBAG_DISABLE_CPU_KERNEL", None)
    if disable:
        env["JAXBAG_DISABLE_CPU_KERNEL"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_export_with_the_kernel_off_holds_only_xla_ops():
    assert "EXPORTED" in _run(disable=True)


@pytest.mark.cpu_kernel  # (off the CPU the kernel is off by design: nothing to refuse)
def test_export_with_the_kernel_on_is_refused_by_jax():
    """What the README says happens without the variable (if jax ever accepts the custom call,
    or the kernel stops being used on CPU, this test says the README needs updating)."""
    import jaxbag

    ok, why = jaxbag.cpu_kernel_status()
    if not ok:
        pytest.fail("the CPU kernel is not available here: " + why)
    out = _run(disable=False)
    assert "REFUSED" in out and "jaxbag_bag_fwd_f32" in out, out
