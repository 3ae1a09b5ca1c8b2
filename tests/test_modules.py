"""The linen and NNX modules: init, parity with each other and the op, pretrained, torch round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn
from flax import nnx
from flax import struct

import jaxbag
from reference import embedding_bag_ref_vjp

IDS = jnp.array([1, 2, 4, 5, 4, 0, 3], jnp.int32)
OFFSETS = jnp.array([0, 2, 2, 5], jnp.int32)
WEIGHTS = jnp.array([0.5, 1.0, 2.0, -1.0, 0.25, 1.5, 3.0], jnp.float32)


def _table(v=10, d=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (v, d), jnp.float32)


@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sqrtn"])
@pytest.mark.parametrize("padding_idx", [None, 4, -6])
def test_linen_and_nnx_identical_for_same_table(mode, padding_idx):
    table = _table()
    kwargs = dict(mode=mode, padding_idx=padding_idx)
    lin = jaxbag.EmbeddingBag.from_pretrained(table, freeze=False, **kwargs)
    variables = lin.init(jax.random.key(0), IDS, OFFSETS)
    nn_mod = jaxbag.nnx.EmbeddingBag.from_pretrained(table, freeze=False, **kwargs)
    weights = None if mode == "max" else WEIGHTS
    out_lin = lin.apply(variables, IDS, OFFSETS, weights)
    out_nnx = nn_mod(IDS, OFFSETS, weights)
    direct = jaxbag.embedding_bag(table, IDS, OFFSETS, per_sample_weights=weights, **kwargs)
    np.testing.assert_array_equal(out_lin, out_nnx)
    np.testing.assert_array_equal(out_lin, direct)
    # gradients too
    g_lin = jax.grad(lambda p: lin.apply(p, IDS, OFFSETS, weights).sum())(variables)
    g_nnx = nnx.grad(lambda m: m(IDS, OFFSETS, weights).sum())(nn_mod)
    np.testing.assert_array_equal(g_lin["params"]["embedding"], g_nnx["embedding"][...])


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_init_shapes_names_dtypes_and_zero_padding_row(api):
    if api == "linen":
        mod = jaxbag.EmbeddingBag(num_embeddings=12, features=3, padding_idx=-1,
                                  param_dtype=jnp.bfloat16)
        params = mod.init(jax.random.key(0), IDS, OFFSETS)["params"]
        assert list(params) == ["embedding"]
        table = params["embedding"]
        out = mod.apply({"params": params}, IDS, OFFSETS)
    else:
        mod = jaxbag.nnx.EmbeddingBag(12, 3, padding_idx=-1, param_dtype=jnp.bfloat16,
                                      rngs=nnx.Rngs(0))
        assert isinstance(mod.embedding, nnx.Param)
        table = mod.embedding[...]
        out = mod(IDS, OFFSETS)
    assert table.shape == (12, 3) and table.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(table[11], np.float32), np.zeros(3, np.float32))
    assert float(jnp.std(table[:11].astype(jnp.float32))) > 0.1  # really initialised
    assert out.dtype == jnp.bfloat16 and out.shape == (4, 3)
    # empty bag (offsets 2, 2) gives zeros
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), np.zeros(3, np.float32))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_dtype_casts_the_computation(api):
    """The table is kept in param_dtype and cast to dtype for the lookup (the NNX module was
    untested: a table made in dtype, or dtype ignored in the call, passed)."""
    if api == "linen":
        mod = jaxbag.EmbeddingBag(10, 4, dtype=jnp.bfloat16)
        variables = mod.init(jax.random.key(0), IDS, OFFSETS)
        table = variables["params"]["embedding"]
        out = mod.apply(variables, IDS, OFFSETS)
    else:
        nmod = jaxbag.nnx.EmbeddingBag(10, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        table = nmod.embedding[...]
        out = nmod(IDS, OFFSETS)
    assert table.dtype == jnp.float32
    assert out.dtype == jnp.bfloat16
    ref = jaxbag.embedding_bag(table.astype(jnp.bfloat16), IDS, OFFSETS)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_default_init_is_flax_embeds():
    """Both modules start from the table flax's nn.Embed / nnx.Embed draw for the same key."""
    key = jax.random.key(3)
    lin = jaxbag.EmbeddingBag(50, 8).init(key, IDS, OFFSETS)["params"]["embedding"]
    np.testing.assert_array_equal(lin, nn.Embed(50, 8).init(key, IDS)["params"]["embedding"])
    got = jaxbag.nnx.EmbeddingBag(50, 8, rngs=nnx.Rngs(3)).embedding[...]
    np.testing.assert_array_equal(got, nnx.Embed(50, 8, rngs=nnx.Rngs(3)).embedding[...])


def test_a_pretrained_linen_module_cloned_to_another_shape_is_an_error():
    m = jaxbag.EmbeddingBag.from_pretrained(jnp.ones((6, 2)))
    with pytest.raises(ValueError, match="pretrained embeddings have shape"):
        m.clone(num_embeddings=4).init(jax.random.key(0), IDS % 4, OFFSETS)


class _Box(struct.PyTreeNode, nn.meta.AxisMetadata):
    """A linen metadata box that is not nn.Partitioned (a user's own)."""

    value: jax.Array
    tag: str = struct.field(pytree_node=False, default="t")

    def unbox(self):
        return self.value

    def replace_boxed(self, val):
        return self.replace(value=val)

    def add_axis(self, index, params):
        return self

    def remove_axis(self, index, params):
        return self


def test_padding_idx_with_any_linen_metadata_box_keeps_the_box():
    def init(key, shape, dtype):
        return _Box(jnp.ones(shape, dtype))

    m = jaxbag.EmbeddingBag(5, 2, padding_idx=1, embedding_init=init)
    box = m.init(jax.random.key(0), jnp.array([1, 2]), jnp.array([0]))["params"]["embedding"]
    assert isinstance(box, _Box) and box.tag == "t"
    np.testing.assert_array_equal(box.value[1], np.zeros(2, np.float32))
    np.testing.assert_array_equal(box.value[0], np.ones(2, np.float32))


def test_from_pretrained_freeze_linen():
    table = _table()
    frozen = jaxbag.EmbeddingBag.from_pretrained(table, mode="sum")
    variables = frozen.init(jax.random.key(0), IDS, OFFSETS)
    np.testing.assert_array_equal(variables["params"]["embedding"], table)
    g = jax.grad(lambda p: frozen.apply(p, IDS, OFFSETS).sum())(variables)
    np.testing.assert_array_equal(g["params"]["embedding"], jnp.zeros_like(table))
    trainable = jaxbag.EmbeddingBag.from_pretrained(table, freeze=False, mode="sum")
    g = jax.grad(lambda p: trainable.apply(p, IDS, OFFSETS).sum())(variables)
    assert float(jnp.abs(g["params"]["embedding"]).sum()) > 0


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_frozen_table_gets_no_gradient_trainable_gets_the_reference(api, dtype):
    """With a computation dtype as without: frozen, the table's gradient is exactly zero (the
    freeze must not depend on the cast); trainable, it is the NumPy reference's."""
    table = _table()
    cot = np.random.default_rng(0).normal(size=(len(OFFSETS), table.shape[1])).astype(np.float32)

    def table_grad(freeze):
        if api == "linen":
            m = jaxbag.EmbeddingBag.from_pretrained(table, freeze=freeze, mode="mean", dtype=dtype)
            variables = m.init(jax.random.key(0), IDS, OFFSETS)
            g = jax.grad(lambda v: jnp.sum(m.apply(v, IDS, OFFSETS).astype(jnp.float32) * cot))(
                variables)
            return g["params"]["embedding"]
        m = jaxbag.nnx.EmbeddingBag.from_pretrained(table, freeze=freeze, mode="mean", dtype=dtype)
        graph, state = nnx.split(m)  # every variable, the frozen table too
        g = jax.grad(lambda st: jnp.sum(nnx.merge(graph, st)(IDS, OFFSETS).astype(jnp.float32)
                                        * cot))(state)
        return g["embedding"][...]

    np.testing.assert_array_equal(table_grad(True), np.zeros(table.shape, np.float32))
    want, _ = embedding_bag_ref_vjp(table, IDS, OFFSETS, cotangent=cot, mode="mean")
    tol = 1e-6 if dtype is None else 1e-2  # (bf16 bags: the cotangent of a rounded output)
    np.testing.assert_allclose(table_grad(False), want, rtol=tol, atol=tol)


def test_from_pretrained_freeze_nnx_optimizer_leaves_table_alone():
    table = _table()

    class Model(nnx.Module):
        def __init__(self, freeze):
            self.bag = jaxbag.nnx.EmbeddingBag.from_pretrained(table, freeze=freeze, mode="sum")
            self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(1))

        def __call__(self, ids, offsets):
            return self.head(self.bag(ids, offsets))

    for freeze in (True, False):
        model = Model(freeze)
        opt = nnx.Optimizer(model, optax.adamw(0.1, weight_decay=0.1), wrt=nnx.Param)
        grads = nnx.grad(lambda m: m(IDS, OFFSETS).sum())(model)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int steps and floats
            opt.update(model, grads)
        changed = not np.array_equal(model.bag.embedding[...], table)
        assert changed is (not freeze)
        assert model.bag.frozen is freeze


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_torch_round_trip(mode):
    torch.manual_seed(0)
    tb = torch.nn.EmbeddingBag(9, 5, mode=mode, padding_idx=3, include_last_offset=True)
    ids = torch.tensor([1, 3, 2, 8, 0, 3, 7])
    offsets = torch.tensor([0, 2, 2, 5, 7])
    expected = tb(ids, offsets).detach().numpy()
    jids, joff = jnp.asarray(ids.numpy()), jnp.asarray(offsets.numpy())

    lin, variables = jaxbag.EmbeddingBag.from_torch(tb)
    assert (lin.mode, lin.padding_idx, lin.include_last_offset) == (mode, 3, True)
    np.testing.assert_allclose(lin.apply(variables, jids, joff), expected, rtol=1e-6, atol=1e-6)
    nn_mod = jaxbag.nnx.EmbeddingBag.from_torch(tb)
    np.testing.assert_allclose(nn_mod(jids, joff), expected, rtol=1e-6, atol=1e-6)
    # state_dict + settings given by hand
    from_sd = jaxbag.nnx.EmbeddingBag.from_torch(
        tb.state_dict(), mode=mode, padding_idx=3, include_last_offset=True
    )
    np.testing.assert_allclose(from_sd(jids, joff), expected, rtol=1e-6, atol=1e-6)

    # export back: the same settings and weight, and the same outputs after a change in JAX
    variables = jax.tree.map(lambda t: t * 2.0, variables)
    back = lin.to_torch(variables)
    assert (back.mode, back.padding_idx, back.include_last_offset) == (mode, 3, True)
    np.testing.assert_allclose(back(ids, offsets).detach().numpy(),
                               lin.apply(variables, jids, joff), rtol=1e-6, atol=1e-6)
    back_nnx = nn_mod.to_torch()
    np.testing.assert_array_equal(back_nnx.weight.detach().numpy(), tb.weight.detach().numpy())


def test_module_settings_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        jaxbag.nnx.EmbeddingBag(10, 4, mode="avg", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding_idx must be within"):
        jaxbag.EmbeddingBag(10, 4, padding_idx=10).init(jax.random.key(0), IDS, OFFSETS)
    with pytest.raises(ValueError, match="features must be a positive int"):
        jaxbag.nnx.EmbeddingBag(10, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no mode='sqrtn'"):
        jaxbag.nnx.EmbeddingBag(10, 4, mode="sqrtn", rngs=nnx.Rngs(0)).to_torch()


def test_from_pretrained_keeps_the_padding_row_as_torch():
    """torch's from_pretrained(padding_idx=p) keeps row p as given; so do both modules (and so a
    torch module survives from_torch -> to_torch), while a fresh module starts with row p at 0."""
    t = np.arange(1.0, 13.0, dtype=np.float32).reshape(4, 3)
    ids, offs = jnp.array([0]), jnp.array([0])
    lin = jaxbag.EmbeddingBag.from_pretrained(jnp.asarray(t), padding_idx=1)
    np.testing.assert_array_equal(lin.init(jax.random.key(0), ids, offs)["params"]["embedding"], t)
    np.testing.assert_array_equal(jaxbag.nnx.EmbeddingBag.from_pretrained(t, padding_idx=1).embedding[...], t)
    tb = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(t.copy()), padding_idx=1)
    back = jaxbag.nnx.EmbeddingBag.from_torch(tb).to_torch()
    np.testing.assert_array_equal(back.weight.detach().numpy(), tb.weight.detach().numpy())
    fresh = jaxbag.EmbeddingBag(num_embeddings=4, features=3, padding_idx=1)
    assert not np.asarray(fresh.init(jax.random.key(0), ids, offs)["params"]["embedding"][1]).any()
    with pytest.raises(ValueError, match=r"embeddings must be 2-D \[V, D\]; got shape \(3,\)"):
        jaxbag.nnx.EmbeddingBag.from_pretrained(jnp.ones(3))


def test_nnx_from_torch_takes_freeze():
    tb = torch.nn.EmbeddingBag(6, 3, mode="sum")
    assert isinstance(jaxbag.nnx.EmbeddingBag.from_torch(tb).embedding, nnx.Param)
    frozen = jaxbag.nnx.EmbeddingBag.from_torch(tb, freeze=True)
    assert isinstance(frozen.embedding, jaxbag.nnx.FrozenEmbedding)
    np.testing.assert_array_equal(frozen.embedding[...], tb.weight.detach().numpy())


@pytest.mark.parametrize("tdtype", [torch.bfloat16, torch.float16, torch.float64])
def test_from_torch_keeps_the_table_dtype(tdtype):
    """A bf16 (f16, f64) torch table becomes a bf16 (f16, f64) parameter, bit for bit, and goes back
    to torch as the same dtype (bf16 used to come back float32)."""
    torch.manual_seed(0)
    tb = torch.nn.EmbeddingBag(7, 3, mode="sum").to(tdtype)
    want = jnp.dtype(str(tdtype).removeprefix("torch."))
    with jax.enable_x64(tdtype == torch.float64):
        nn_mod = jaxbag.nnx.EmbeddingBag.from_torch(tb)
        lin, variables = jaxbag.EmbeddingBag.from_torch(tb)
        for table in (nn_mod.embedding[...], variables["params"]["embedding"]):
            assert table.dtype == want
            np.testing.assert_array_equal(np.asarray(table, np.float64),
                                          tb.weight.detach().double().numpy())
        assert nn_mod.to_torch().weight.dtype == tdtype
        assert lin.to_torch(variables).weight.dtype == tdtype


def test_linen_from_torch_follows_dtype_and_init_gives_the_torch_table():
    """linen's from_torch ignored the table dtype and a param_dtype override (NNX did not), and
    its module.init (inside a parent model) gave a random table, not torch's."""
    torch.manual_seed(1)
    tb = torch.nn.EmbeddingBag(6, 3, mode="sum", padding_idx=2)
    ids, offs = jnp.array([1, 2, 3]), jnp.array([0, 1])
    lin, v = jaxbag.EmbeddingBag.from_torch(tb, param_dtype=jnp.bfloat16)
    nm = jaxbag.nnx.EmbeddingBag.from_torch(tb, param_dtype=jnp.bfloat16)
    assert v["params"]["embedding"].dtype == jnp.bfloat16 == nm.embedding[...].dtype
    np.testing.assert_array_equal(lin.apply(v, ids, offs), nm(ids, offs))
    lin16, v16 = jaxbag.EmbeddingBag.from_torch(tb.to(torch.bfloat16))
    assert lin16.param_dtype == jnp.bfloat16
    lin, v = jaxbag.EmbeddingBag.from_torch(tb.float())
    inited = lin.init(jax.random.key(0), ids, offs)["params"]["embedding"]
    np.testing.assert_array_equal(inited, tb.weight.detach().numpy())  # padding row kept, as torch
    np.testing.assert_array_equal(inited, v["params"]["embedding"])


def test_to_torch_keeps_freeze_and_conversion_errors():
    t = np.arange(6.0, dtype=np.float32).reshape(3, 2)
    lin = jaxbag.EmbeddingBag.from_pretrained(jnp.asarray(t))  # freeze=True, as torch
    variables = lin.init(jax.random.key(0), jnp.array([0]), jnp.array([0]))
    assert lin.to_torch(variables).weight.requires_grad is False
    assert jaxbag.nnx.EmbeddingBag.from_pretrained(t).to_torch().weight.requires_grad is False
    assert jaxbag.nnx.EmbeddingBag.from_pretrained(t, freeze=False).to_torch().weight.requires_grad
    with pytest.raises(TypeError, match=r"converts a torch.nn.EmbeddingBag; got a Embedding.*emb.weight"):
        jaxbag.nnx.EmbeddingBag.from_torch(torch.nn.Embedding(4, 2))
    with pytest.raises(TypeError, match=r"embeddings must be a floating-point table; got dtype int"):
        jaxbag.nnx.EmbeddingBag.from_pretrained(np.ones((3, 2), np.int32))


@pytest.mark.parametrize("form", ["module", "state_dict", "tensor"])
def test_from_torch_copies_the_table(form):
    """linen's from_torch returned variables sharing memory with the torch weight (NumPy view +
    jnp.asarray with a dtype), so a later torch optimizer step or max_norm renorm rewrote them."""
    torch.manual_seed(0)
    tb = torch.nn.EmbeddingBag(6, 3, mode="sum")
    source = {"module": tb, "state_dict": tb.state_dict(), "tensor": tb.weight}[form]
    kw = {} if form == "module" else {"mode": "sum"}
    lin, variables = jaxbag.EmbeddingBag.from_torch(source, **kw)
    nm = jaxbag.nnx.EmbeddingBag.from_torch(source, **kw)
    lin_pre = jaxbag.EmbeddingBag.from_pretrained(tb.weight, mode="sum")  # a Parameter, as torch's
    nnx_pre = jaxbag.nnx.EmbeddingBag.from_pretrained(tb.weight, mode="sum")
    ids, offs = jnp.array([0, 4]), jnp.array([0])
    pre_vars = lin_pre.init(jax.random.key(0), ids, offs)
    before = tb.weight.detach().numpy().copy()
    with torch.no_grad():
        tb.weight.mul_(-3.0).add_(1.0)
    for table in (variables["params"]["embedding"], nm.embedding[...], pre_vars["params"]["embedding"],
                  nnx_pre.embedding[...], lin_pre.init(jax.random.key(0), ids, offs)["params"]["embedding"]):
        np.testing.assert_array_equal(table, before)


def test_from_pretrained_takes_a_bf16_torch_tensor():
    t = torch.arange(6.0).reshape(3, 2).to(torch.bfloat16)
    for m in (jaxbag.nnx.EmbeddingBag.from_pretrained(t), jaxbag.nnx.EmbeddingBag.from_torch(t)):
        assert m.embedding[...].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(m.embedding[...], np.float32), t.float().numpy())


def test_from_torch_names_what_it_got_and_what_it_takes():
    """Any torch module (nn.Linear, an nn.Sequential around a bag) or None/a path was read as a
    weight: "the torch weight must be 2-D [V, D]; got shape ()", naming neither."""
    for bad in (torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.EmbeddingBag(4, 2))):
        for convert in (jaxbag.EmbeddingBag.from_torch, jaxbag.nnx.EmbeddingBag.from_torch):
            with pytest.raises(TypeError, match=rf"got a {type(bad).__name__}\. .*from_torch\(model\.bag\)"):
                convert(bad)
    for bad in (None, "bag.pt", np.ones(3, np.float32)):
        with pytest.raises(ValueError, match=rf"must be 2-D \[V, D\]; got shape .* from a {type(bad).__name__}"):
            jaxbag.nnx.EmbeddingBag.from_torch(bad)
    with pytest.raises(TypeError, match=r"num_embeddings comes from the table"):
        jaxbag.nnx.EmbeddingBag.from_torch(torch.nn.EmbeddingBag(4, 2), num_embeddings=8)
    with pytest.raises(TypeError, match=r"embedding_init comes from the table"):
        jaxbag.EmbeddingBag.from_pretrained(np.ones((3, 2), np.float32), embedding_init=jnp.zeros)


def test_torch_sparse_is_not_dropped_silently():
    """torch's sparse=True has no module option: from_torch warns, from_pretrained(sparse=True)
    refuses (sparse=False, torch's default, is accepted), and to_torch(sparse=True) sets it back.
    The flag used to vanish in a round trip, and SparseAdam then failed on the torch side."""
    tb = torch.nn.EmbeddingBag(5, 2, mode="sum", sparse=True)
    with pytest.warns(UserWarning, match=r"sparse=True: .*embedding_bag_rows"):
        nm = jaxbag.nnx.EmbeddingBag.from_torch(tb)
    with pytest.warns(UserWarning, match=r"sparse=True"):
        lin, variables = jaxbag.EmbeddingBag.from_torch(tb)
    assert nm.to_torch().sparse is False
    back = nm.to_torch(sparse=True)
    back(torch.tensor([1, 2]), torch.tensor([0])).sum().backward()
    assert back.weight.grad.is_sparse
    assert lin.to_torch(variables, sparse=True).sparse is True
    with pytest.raises(ValueError, match=r"sparse=True: torch's sparse gradients have no module option"):
        jaxbag.nnx.EmbeddingBag.from_pretrained(np.ones((3, 2), np.float32), sparse=True)
    with pytest.raises(ValueError, match=r"sparse=True"):
        jaxbag.EmbeddingBag.from_pretrained(np.ones((3, 2), np.float32), sparse=True)
    assert jaxbag.EmbeddingBag.from_pretrained(np.ones((3, 2), np.float32), sparse=False).freeze
    for make in (jaxbag.EmbeddingBag.from_pretrained, jaxbag.nnx.EmbeddingBag.from_pretrained):
        with pytest.raises(TypeError, match=r"sparse must be a bool \(True or False\); got sparse='no'"):
            make(np.ones((3, 2), np.float32), sparse="no")  # (was "sparse=True: ...")


def test_a_frozen_torch_table_stays_frozen():
    """to_torch maps a frozen table to requires_grad=False; from_torch now maps it back (it made
    every table trainable, so a round trip unfroze torch's from_pretrained(freeze=True))."""
    t = torch.arange(6.0).reshape(3, 2)
    tb = torch.nn.EmbeddingBag.from_pretrained(t, freeze=True)
    nm = jaxbag.nnx.EmbeddingBag.from_torch(tb)
    lin, _ = jaxbag.EmbeddingBag.from_torch(tb)
    assert nm.frozen and lin.freeze
    assert nm.to_torch().weight.requires_grad is False
    assert not jaxbag.nnx.EmbeddingBag.from_torch(tb, freeze=False).frozen
    assert not jaxbag.nnx.EmbeddingBag.from_torch(tb.state_dict(), mode="mean").frozen


def test_to_torch_checks_the_table():
    lin = jaxbag.EmbeddingBag(5, 2, mode="sum")
    variables = lin.init(jax.random.key(0), jnp.array([1]), jnp.array([0]))
    with pytest.raises(ValueError, match=r"shape \(7, 3\), but the module has num_embeddings=5, features=2"):
        lin.to_torch({"params": {"embedding": jnp.ones((7, 3))}})
    with pytest.raises(TypeError, match=r"got a mapping with keys \['embedding'\]\. Call module.to_torch\(variables\)"):
        lin.to_torch(variables["params"])
    with pytest.raises(TypeError, match=r"got an object of type"):
        lin.to_torch(variables["params"]["embedding"])
    with pytest.raises(TypeError, match=r"needs a float16, bfloat16, float32 or float64 table; got int32"):
        lin.to_torch({"params": {"embedding": jnp.ones((5, 2), jnp.int32)}})
    f8 = jaxbag.nnx.EmbeddingBag(5, 2, param_dtype=jnp.float8_e4m3fn, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"got float8_e4m3fn\. Cast it first"):
        f8.to_torch()


def test_to_torch_without_torch_says_how_to_install_it(monkeypatch):
    """torch is not a dependency of jaxbag: to_torch gave a bare ModuleNotFoundError."""
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if not installed
    lin = jaxbag.EmbeddingBag(10, 4, mode="sum")
    variables = {"params": {"embedding": _table()}}
    with pytest.raises(ImportError, match=r"to_torch needs PyTorch.*pip install torch"):
        lin.to_torch(variables)
    with pytest.raises(ImportError, match=r"to_torch needs PyTorch"):
        jaxbag.nnx.EmbeddingBag(10, 4, rngs=nnx.Rngs(0)).to_torch()


@pytest.mark.parametrize("name, value", [("param_dtype", jnp.int32), ("param_dtype", jnp.complex64),
                                         ("dtype", jnp.int32), ("dtype", "not-a-dtype")])
def test_module_dtypes_must_be_floating(name, value):
    """An int param_dtype failed inside flax's initialiser ("dtype argument to 'normal'"), a
    complex one only at the first call ("weight must be a floating-point table"): neither named
    the module's argument."""
    shown = value if isinstance(value, str) else jnp.dtype(value).name
    match = rf"{name} must be a floating-point dtype .*got {name}='?{shown}"
    ids, offsets = jnp.array([0, 1]), jnp.array([0])
    with pytest.raises(TypeError, match=match):
        jaxbag.EmbeddingBag(5, 2, **{name: value}).init(jax.random.key(0), ids, offsets)
    with pytest.raises(TypeError, match=match):
        jaxbag.nnx.EmbeddingBag(5, 2, **{name: value}, rngs=nnx.Rngs(0))


def test_from_pretrained_under_a_trace():
    """check_pretrained read the table back into NumPy, so from_pretrained failed under any trace:
    a linen parent building the bag in setup under jax.jit(init) / jax.eval_shape(init) (the
    sharded-init recipe), nnx.eval_shape, or a jitted function building an NNX bag."""
    w = np.arange(20, dtype=np.float32).reshape(10, 2)
    ids, offs = jnp.array([1, 2]), jnp.array([0])

    class Parent(nn.Module):
        def setup(self):
            self.bag = jaxbag.EmbeddingBag.from_pretrained(w, mode="sum", freeze=False)

        def __call__(self, i, o):
            return self.bag(i, o)

    p = Parent()
    variables = jax.jit(p.init)(jax.random.key(0), ids, offs)
    np.testing.assert_array_equal(variables["params"]["bag"]["embedding"], w)
    shapes = jax.eval_shape(p.init, jax.random.key(0), ids, offs)
    assert shapes["params"]["bag"]["embedding"].shape == (10, 2)
    abstract = nnx.eval_shape(lambda: jaxbag.nnx.EmbeddingBag.from_pretrained(w))
    assert abstract.embedding.shape == (10, 2)
    out = jax.jit(lambda t: jaxbag.nnx.EmbeddingBag.from_pretrained(t, mode="sum")(ids, offs))(w)
    np.testing.assert_array_equal(out, [w[1] + w[2]])


def test_from_pretrained_copies_a_jax_table():
    """A first fix kept a JAX table as given, so donating the caller's array (a jitted train step
    with donate_argnums) deleted the module's table too."""
    w = jnp.arange(6.0).reshape(3, 2)
    lin = jaxbag.EmbeddingBag.from_pretrained(w, mode="sum")
    nm = jaxbag.nnx.EmbeddingBag.from_pretrained(w, mode="sum")
    w.delete()
    ids, offs = jnp.array([0, 2]), jnp.array([0])
    np.testing.assert_array_equal(lin.apply(lin.init(jax.random.key(0), ids, offs), ids, offs), [[4.0, 6.0]])
    np.testing.assert_array_equal(nm(ids, offs), [[4.0, 6.0]])
    # init returns a fresh copy each time: donating one init's variables leaves the next intact
    # (the initialiser returned its own table, which the donation then deleted)
    for module in (lin, jaxbag.EmbeddingBag.from_torch(torch.nn.EmbeddingBag(3, 2))[0]):
        donate = jax.jit(lambda v: jax.tree.map(lambda x: x * 2, v), donate_argnums=0)
        donate(module.init(jax.random.key(0), ids, offs))
        assert module.init(jax.random.key(0), ids, offs)["params"]["embedding"].shape == (3, 2)


@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_padding_idx_with_a_sharding_annotated_init(padding_idx):
    """nn.with_partitioning / nnx.with_partitioning (the Flax way to shard a parameter) box the
    initialiser's array; with padding_idx the padding-row zeroing called .at on the box
    (AttributeError). The row is zeroed inside the box and the sharding annotation kept."""
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        m = jaxbag.nnx.EmbeddingBag(
            10, 4, padding_idx=padding_idx, rngs=nnx.Rngs(0),
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("model", None)))
        lin = jaxbag.EmbeddingBag(
            10, 4, padding_idx=padding_idx,
            embedding_init=nn.with_partitioning(nn.initializers.normal(1.0), ("model", None)))
        variables = lin.init(jax.random.key(0), IDS, OFFSETS)
    assert m.embedding[...].sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert nn.get_partition_spec(variables)["params"]["embedding"] == jax.sharding.PartitionSpec(
        "model", None)
    for table in (np.asarray(m.embedding[...]), np.asarray(nn.unbox(variables)["params"]["embedding"])):
        assert table.shape == (10, 4)
        nonzero = np.any(table != 0, axis=1)
        if padding_idx is None:
            assert nonzero.all()
        else:
            assert not nonzero[padding_idx] and nonzero.sum() == 9
    # to_torch takes the variables as init returned them, box included (it saw a 0-d table)
    t = lin.to_torch(variables)
    np.testing.assert_array_equal(t.weight.detach().numpy(),
                                  np.asarray(nn.unbox(variables)["params"]["embedding"]))
    np.testing.assert_array_equal(m.to_torch().weight.detach().numpy(), m.embedding[...])


def test_linen_modules_from_pretrained_pickle():
    """from_pretrained / from_torch built their initialiser as a closure, so the linen module
    could not be pickled (plain modules and NNX modules could)."""
    import pickle

    t = np.arange(12, dtype=np.float32).reshape(6, 2)
    from_torch, _ = jaxbag.EmbeddingBag.from_torch(torch.nn.EmbeddingBag.from_pretrained(
        torch.from_numpy(t.copy()), mode="sum", padding_idx=1))
    for module in (jaxbag.EmbeddingBag.from_pretrained(jnp.asarray(t), mode="sum", padding_idx=1),
                   from_torch):
        back = pickle.loads(pickle.dumps(module))
        a = module.init(jax.random.key(0), IDS[:4] % 6, OFFSETS[:2])
        b = back.init(jax.random.key(1), IDS[:4] % 6, OFFSETS[:2])
        np.testing.assert_array_equal(nn.unbox(b)["params"]["embedding"], t)  # row 1 as given
        np.testing.assert_array_equal(back.apply(b, IDS[:4] % 6, OFFSETS[:2]),
                                      module.apply(a, IDS[:4] % 6, OFFSETS[:2]))


def test_module_input_and_size_errors_show_the_fix():
    jf = jaxbag.JaggedFeatures.from_lists({"a": [[1]]})
    m = jaxbag.nnx.EmbeddingBag(10, 4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"got a jaxbag.JaggedFeatures.*jf.feature\(key\)"):
        m(jf)
    with pytest.raises(TypeError, match=r"got a jaxbag.JaggedFeatures"):
        jaxbag.embedding_bag(jnp.ones((10, 4)), jf)
    for size in (jnp.int32(10), np.array(10)):
        with pytest.raises(ValueError, match=r"num_embeddings must be a positive int.*pass int\(x\)"):
            jaxbag.nnx.EmbeddingBag(size, 4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kw, error, match", [
    (dict(num_embeddings=0), ValueError, "num_embeddings must be a positive int"),
    (dict(mode="avg"), ValueError, "mode must be one of"),
    (dict(padding_idx=10), ValueError, "padding_idx must be within"),
    (dict(param_dtype=jnp.int32), TypeError, "param_dtype must be a floating-point dtype"),
    (dict(mode="max", scale_grad_by_freq=True), ValueError, "scale_grad_by_freq is not supported"),
    (dict(max_norm="1"), ValueError, "max_norm must be a real number"),
])
def test_settings_that_never_work_raise_when_the_module_is_built(kw, error, match):
    """Linen checked its settings only in setup (at init or apply, deep inside a parent model's
    init) and NNX let mode='max' with scale_grad_by_freq through to the first call: both now
    raise when the module is built, before any parameter exists."""
    args = dict(num_embeddings=10, features=4) | kw
    with pytest.raises(error, match=match):
        jaxbag.EmbeddingBag(**args)
    with pytest.raises(error, match=match):
        jaxbag.nnx.EmbeddingBag(**args, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("value", ["False", 0, 1, None, jnp.array([False])])
@pytest.mark.parametrize("flag", ["include_last_offset", "scale_grad_by_freq"])
def test_flags_must_be_bools(flag, value):
    """A flag from a config file ("False") switched the option on by its truthiness: with
    include_last_offset a bag was silently lost, with scale_grad_by_freq the gradient changed."""
    match = rf"{flag} must be a bool \(True or False\); got {flag}="
    with pytest.raises(TypeError, match=match):
        jaxbag.embedding_bag(jnp.ones((5, 2)), IDS % 5, OFFSETS, mode="sum", **{flag: value})
    with pytest.raises(TypeError, match=match):
        jaxbag.EmbeddingBag(5, 2, **{flag: value})
    with pytest.raises(TypeError, match=match):
        jaxbag.nnx.EmbeddingBag(5, 2, **{flag: value}, rngs=nnx.Rngs(0))
    if flag == "include_last_offset":
        with pytest.raises(TypeError, match=match):
            jaxbag.offsets_to_segment_ids(OFFSETS, 7, include_last_offset=value)
    # NumPy bools and concrete 0-d bool arrays are bools
    for ok in (np.False_, np.array(False), jnp.bool_(False)):
        np.testing.assert_array_equal(
            jaxbag.embedding_bag(jnp.ones((5, 2)), IDS % 5, OFFSETS, mode="sum", **{flag: ok}),
            jaxbag.embedding_bag(jnp.ones((5, 2)), IDS % 5, OFFSETS, mode="sum"))


def test_module_and_collection_flags_must_be_bools():
    tables = [jaxbag.TableConfig("a", 5, 4, ("a",))]
    jf = jaxbag.JaggedFeatures.from_lists({"a": [[1, 2], []]})
    with pytest.raises(TypeError, match=r"freeze must be a bool .*got freeze='False'"):
        jaxbag.EmbeddingBag(5, 2, freeze="False")
    with pytest.raises(TypeError, match=r"freeze must be a bool .*got freeze='no'"):
        jaxbag.nnx.EmbeddingBag.from_pretrained(jnp.ones((5, 2)), freeze="no")
    with pytest.raises(TypeError, match=r"freeze must be a bool"):
        jaxbag.EmbeddingBag.from_pretrained(jnp.ones((5, 2)), freeze=1)
    with pytest.raises(TypeError, match=r"sparse must be a bool .*got sparse='False'"):
        jaxbag.nnx.EmbeddingBag(5, 2, rngs=nnx.Rngs(0)).to_torch(sparse="False")
    with pytest.raises(TypeError, match=r"stack must be a bool .*got stack='no'"):
        jaxbag.EmbeddingBagCollection(tables, stack="no")
    with pytest.raises(TypeError, match=r"stack must be a bool"):
        jaxbag.nnx.EmbeddingBagCollection(tables, stack=0, rngs=nnx.Rngs(0))
    model = jaxbag.nnx.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"concat must be a bool .*got concat='True'"):
        model(jf, concat="True")
    with pytest.raises(TypeError, match=r"concat must be a bool"):
        jaxbag.embedding_bag_collection_rows(
            {"a": model.embeddings["a"][...]}, jf, layout=model.layout, concat=1)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, "foo"])
def test_collection_modules_check_dtype_and_plan_when_built(dtype):
    """An int dtype truncated the bags to ints and bool made them True, silently; 'foo' failed at
    the first call without naming dtype; plan='row' raised AttributeError / flax's
    DescriptorAttributeError naming neither plan nor ShardingPlan."""
    tables = [jaxbag.TableConfig("a", 5, 4, ("a",))]
    match = r"dtype must be a floating-point dtype .*got dtype="
    with pytest.raises(TypeError, match=match):
        jaxbag.EmbeddingBagCollection(tables, dtype=dtype)
    with pytest.raises(TypeError, match=match):
        jaxbag.nnx.EmbeddingBagCollection(tables, dtype=dtype, rngs=nnx.Rngs(0))
    layout = jaxbag.collection_layout(tables)
    jf = jaxbag.JaggedFeatures.from_lists({"a": [[1, 2], []]})
    params = jaxbag.init_collection(layout, jax.random.key(0))
    with pytest.raises(TypeError, match=match):
        jaxbag.embedding_bag_collection(params, jf, layout=layout, concat=True, dtype=dtype)
    match = r"plan must be a jaxbag.sharding.ShardingPlan or None; got 'row'.*plan_sharding"
    with pytest.raises(TypeError, match=match):
        jaxbag.EmbeddingBagCollection(tables, plan="row")
    with pytest.raises(TypeError, match=match):
        jaxbag.nnx.EmbeddingBagCollection(tables, plan="row", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_init_may_return_a_numpy_table(padding_idx):
    """flax's nn.Embed takes an initialiser returning a NumPy array; with padding_idx the
    padding-row zeroing called .at on it (AttributeError)."""
    table = np.arange(40, dtype=np.float64).reshape(10, 4)
    init = lambda key, shape, dtype=jnp.float32: table  # noqa: E731
    want = table.copy()
    if padding_idx is not None:
        want[padding_idx] = 0
    lin = jaxbag.EmbeddingBag(10, 4, padding_idx=padding_idx, embedding_init=init)
    got = lin.init(jax.random.key(0), IDS, OFFSETS)["params"]["embedding"]
    np.testing.assert_array_equal(got, want)
    m = jaxbag.nnx.EmbeddingBag(10, 4, padding_idx=padding_idx, embedding_init=init,
                                rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(m.embedding[...], want)
    assert table[0, 1] == 1.0  # the initialiser's array itself is left alone
    # cast to the dtype it was asked for (param_dtype), as a flax initialiser's result is
    bf16 = jaxbag.nnx.EmbeddingBag(10, 4, padding_idx=padding_idx, embedding_init=init,
                                   param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert bf16.embedding[...].dtype == jnp.bfloat16 and got.dtype == jnp.float32


def test_embedding_init_of_the_wrong_shape_is_an_error():
    """A (3, 3) table in a module of num_embeddings=10, features=4 gave [B, 3] outputs and, for an
    id >= 3, an IndexError blaming 'num_embeddings=3'."""
    init = lambda key, shape, dtype=jnp.float32: jnp.ones((3, 3), dtype)  # noqa: E731
    match = r"embedding_init returned a table of shape \(3, 3\); the module needs .* \(10, 4\)"
    with pytest.raises(ValueError, match=match):
        jaxbag.EmbeddingBag(10, 4, embedding_init=init).init(jax.random.key(0), IDS, OFFSETS)
    with pytest.raises(ValueError, match=match):
        jaxbag.nnx.EmbeddingBag(10, 4, embedding_init=init, rngs=nnx.Rngs(0))


def test_nnx_module_has_nnx_embed_size_attributes():
    m = jaxbag.nnx.EmbeddingBag(7, 3, mode="sum", rngs=nnx.Rngs(0))
    assert (m.num_embeddings, m.features) == (7, 3)
    assert m.embedding[...].shape == (m.num_embeddings, m.features)


def test_nnx_settings_are_read_only_attributes_as_linens():
    """bag.mode etc. read as the linen module's fields; assigning one is an AttributeError (it set
    an attribute the call never read: m.mode = 'avg' changed nothing, without a word)."""
    settings = dict(mode="sqrtn", padding_idx=-2, max_norm=1.5, norm_type=1.0,
                    scale_grad_by_freq=True, include_last_offset=True)
    m = jaxbag.nnx.EmbeddingBag(7, 3, **settings, rngs=nnx.Rngs(0))
    lin = jaxbag.EmbeddingBag(7, 3, **settings)
    for name, value in settings.items():
        assert getattr(m, name) == getattr(lin, name) == value, name
        with pytest.raises(AttributeError, match="no setter"):
            setattr(m, name, value)
    assert m.mode == "sqrtn"


def test_a_float64_torch_table_without_x64_gives_a_float32_module():
    """The module said param_dtype=float64 while its parameter was float32 (JAX without x64)."""
    assert not jax.config.jax_enable_x64
    t = torch.nn.EmbeddingBag(5, 3).double()
    lin, variables = jaxbag.EmbeddingBag.from_torch(t)
    assert lin.param_dtype == variables["params"]["embedding"].dtype == jnp.float32
    m = jaxbag.nnx.EmbeddingBag.from_torch(t)
    assert m.param_dtype == m.embedding[...].dtype == jnp.float32


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_torch_round_trip_keeps_max_norm_norm_type_and_scale_grad_by_freq(api):
    """from_torch / to_torch carry every torch setting, not only mode / padding_idx /
    include_last_offset: max_norm, norm_type and scale_grad_by_freq as well (a dropped one gives
    other bags, or other gradients, without an error)."""
    torch.manual_seed(0)
    kw = dict(mode="sum", max_norm=0.5, norm_type=1.0, scale_grad_by_freq=True)
    tb = torch.nn.EmbeddingBag(9, 5, **kw)
    ids, offsets = torch.tensor([1, 3, 3, 8, 0, 3, 7]), torch.tensor([0, 2, 5])
    jids, joff = jnp.asarray(ids.numpy()), jnp.asarray(offsets.numpy())
    cot = jax.random.normal(jax.random.key(1), (3, 5))
    if api == "linen":
        lin, variables = jaxbag.EmbeddingBag.from_torch(tb)
        table, back = variables["params"]["embedding"], lin.to_torch(variables)
        out = lin.apply(variables, jids, joff)
        grad = jax.grad(lambda v: jnp.sum(lin.apply(v, jids, joff) * cot))(variables)
        grad = grad["params"]["embedding"]
    else:
        mod = jaxbag.nnx.EmbeddingBag.from_torch(tb)
        table, back, out = mod.embedding[...], mod.to_torch(), mod(jids, joff)
        grad = nnx.grad(lambda m: jnp.sum(m(jids, joff) * cot))(mod).embedding[...]
    assert (back.max_norm, back.norm_type, back.scale_grad_by_freq) == (0.5, 1.0, True)
    # the forward is torch's (max_norm, norm_type: run after the conversion, torch renorms its
    # weight in place); the gradient is the op's with the same settings (torch's own
    # scale_grad_by_freq in embedding_bag is off: see test_torch_parity)
    np.testing.assert_allclose(out, tb(ids, offsets).detach().numpy(), rtol=1e-5, atol=1e-6)
    want = jax.grad(lambda t: jnp.sum(jaxbag.embedding_bag(t, jids, joff, **kw) * cot))(table)
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-7)


def test_from_torch_overrides_replace_the_torch_modules_settings():
    """``**overrides`` replace what is read from an nn.EmbeddingBag (not only complete a
    state_dict's): from_torch(tb, mode='sum') of a 'mean' module is a 'sum' module."""
    tb = torch.nn.EmbeddingBag(6, 3, mode="mean", padding_idx=1)
    ids, offs = jnp.array([0, 1, 2, 4]), jnp.array([0, 2])
    lin, variables = jaxbag.EmbeddingBag.from_torch(tb, mode="sum", padding_idx=None)
    mod = jaxbag.nnx.EmbeddingBag.from_torch(tb, mode="sum", padding_idx=None)
    assert (lin.mode, lin.padding_idx) == ("sum", None)
    assert (mod.settings.mode, mod.settings.padding_idx) == ("sum", None)
    table = tb.weight.detach().numpy()
    want = np.stack([table[0] + table[1], table[2] + table[4]])
    np.testing.assert_allclose(lin.apply(variables, ids, offs), want, rtol=1e-6)
    np.testing.assert_allclose(mod(ids, offs), want, rtol=1e-6)


@pytest.mark.parametrize("form", ["state_dict", "tensor"])
def test_from_torch_of_a_state_dict_or_weight_is_trainable(form):
    """A state_dict or weight carries no requires_grad flag to follow: the module is trainable
    (freeze=False, as documented), not frozen as from_pretrained's default would make it."""
    tb = torch.nn.EmbeddingBag(5, 2, mode="sum")
    source = tb.state_dict() if form == "state_dict" else tb.weight.detach()
    lin, variables = jaxbag.EmbeddingBag.from_torch(source, mode="sum")
    assert lin.freeze is False
    ids, offs = jnp.array([1, 2]), jnp.array([0])
    grad = jax.grad(lambda v: jnp.sum(lin.apply(v, ids, offs)))(variables)
    assert np.asarray(grad["params"]["embedding"][1]).any()
    mod = jaxbag.nnx.EmbeddingBag.from_torch(source, mode="sum")
    assert not mod.frozen and isinstance(mod.embedding, nnx.Param)


# -- review findings and mutation testing --------------------------------------------------------


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_from_pretrained_of_an_int_list_shows_a_cast_that_works_for_lists(api):
    """The hint was embeddings.astype(jnp.float32), which a list does not have."""
    cls = jaxbag.EmbeddingBag if api == "linen" else jaxbag.nnx.EmbeddingBag
    embeddings = [[1, 2], [3, 4]]
    with pytest.raises(TypeError, match=r"embeddings must be a floating-point table; got dtype "
                                        r"int\d+\. .*EmbeddingBag\.from_pretrained\("
                                        r"jnp\.asarray\(embeddings, jnp\.float32\)\)"):
        cls.from_pretrained(embeddings)
    module = cls.from_pretrained(jnp.asarray(embeddings, jnp.float32), mode="sum")  # the hint
    assert module.param_dtype == jnp.float32


def test_nnx_frozen_pretrained_table_gets_no_gradient_through_split_state():
    """A frozen table is a FrozenEmbedding and the call stops its gradient: differentiating the
    whole split state (not only nnx.Param) gives it zeros."""
    ids, offsets = jnp.array([0, 1, 4, 4], jnp.int32), jnp.array([0, 2], jnp.int32)
    for freeze in (True, False):
        g, state = nnx.split(jaxbag.nnx.EmbeddingBag.from_pretrained(
            jnp.ones((5, 2)), freeze=freeze, mode="sum"))
        grads = jax.grad(lambda s: nnx.merge(g, s)(ids, offsets).sum())(state)
        d_table = grads["embedding"][...]
        assert d_table.shape == (5, 2)
        if freeze:
            np.testing.assert_array_equal(d_table, np.zeros((5, 2), np.float32))
        else:
            np.testing.assert_array_equal(d_table[:, 0], [1.0, 1.0, 0.0, 0.0, 2.0])


@pytest.mark.parametrize("max_norm", [jnp.array(1.5), np.float32(1.5), np.array(1.5), 1.5])
def test_a_concrete_max_norm_is_kept_as_a_python_float(max_norm):
    """max_norm=jnp.array(1.5) passed the checks, then made the linen module unhashable: hash()
    failed and nn.jit(EmbeddingBag) raised 'iteration over a 0-d array'. Both modules keep a
    concrete max_norm (and norm_type) as a Python float."""
    lin = jaxbag.EmbeddingBag(10, 4, mode="sum", max_norm=max_norm, norm_type=jnp.array(2.0))
    m = jaxbag.nnx.EmbeddingBag(10, 4, mode="sum", max_norm=max_norm, norm_type=np.float64(2),
                                rngs=nnx.Rngs(0))
    for mod in (lin, m):
        assert type(mod.max_norm) is float and mod.max_norm == 1.5
        assert type(mod.norm_type) is float and mod.norm_type == 2.0
    assert type(m.settings.max_norm) is float
    assert hash(lin) == hash(jaxbag.EmbeddingBag(10, 4, mode="sum", max_norm=1.5))
    variables = lin.init(jax.random.key(0), IDS, OFFSETS)
    want = jaxbag.embedding_bag(variables["params"]["embedding"], IDS, OFFSETS, mode="sum",
                                max_norm=1.5)

    class Parent(nn.Module):
        @nn.compact
        def __call__(self, ids, offsets):
            return nn.jit(jaxbag.EmbeddingBag)(10, 4, mode="sum", max_norm=max_norm)(ids, offsets)

    parent = Parent()
    pv = parent.init(jax.random.key(0), IDS, OFFSETS)
    (table,) = jax.tree.leaves(pv)
    np.testing.assert_allclose(
        parent.apply(pv, IDS, OFFSETS),
        jaxbag.embedding_bag(table, IDS, OFFSETS, mode="sum", max_norm=1.5), rtol=1e-6)
    # a module as a static jit argument
    out = jax.jit(lambda mod, v: mod.apply(v, IDS, OFFSETS), static_argnums=0)(lin, variables)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    m.embedding[...] = variables["params"]["embedding"]
    np.testing.assert_allclose(nnx.jit(lambda mod: mod(IDS, OFFSETS))(m), want, rtol=1e-6)


@pytest.mark.parametrize("init", [None, "normal", jnp.ones((10, 4))])
def test_embedding_init_must_be_callable(init):
    """embedding_init=None failed at init with "'NoneType' object is not callable", naming no
    argument; now both modules refuse it when built."""
    match = (r"embedding_init must be an initialiser, a callable \(key, shape, dtype\).*got "
             r"embedding_init=.* of type .*embedding_init=jax.nn.initializers.normal\(0.02\)"
             r".*from_pretrained\(table\)")
    with pytest.raises(TypeError, match=match):
        jaxbag.EmbeddingBag(10, 4, embedding_init=init)
    with pytest.raises(TypeError, match=match):
        jaxbag.nnx.EmbeddingBag(10, 4, embedding_init=init, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("rngs", [0, jax.random.key(0), None])
def test_nnx_modules_need_an_nnx_rngs(rngs):
    """rngs=0 raised AttributeError: 'int' object has no attribute 'params'."""
    tables = [jaxbag.TableConfig("a", 5, 4, ("a",))]
    match = r"rngs must be an nnx.Rngs with a params stream; got rngs=.* of type "
    with pytest.raises(TypeError, match=match + r".*EmbeddingBag\(10, 4, rngs=nnx.Rngs\(0\)\)"):
        jaxbag.nnx.EmbeddingBag(10, 4, rngs=rngs)
    with pytest.raises(TypeError, match=match + r".*EmbeddingBagCollection\(tables, rngs="):
        jaxbag.nnx.EmbeddingBagCollection(tables, rngs=rngs)
    with pytest.raises(TypeError, match=match):
        jaxbag.nnx.EmbeddingBag.from_pretrained(jnp.ones((5, 4)), rngs=rngs)
    if rngs is not None and not isinstance(rngs, int):
        with pytest.raises(TypeError, match=r"\(from a key: rngs=nnx.Rngs\(key\)\)"):
            jaxbag.nnx.EmbeddingBag(10, 4, rngs=rngs)


def _attend_both(table, query, **kw):
    """attend of the linen and the NNX module holding ``table`` (trainable)."""
    lin = jaxbag.EmbeddingBag.from_pretrained(table, freeze=False, **kw)
    variables = lin.init(jax.random.key(0), query, method="attend")
    m = jaxbag.nnx.EmbeddingBag.from_pretrained(table, freeze=False, **kw)
    return lin.apply(variables, query, method="attend"), m.attend(query)


@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16])
def test_attend_gives_flax_embeds_tied_logits(dtype):
    """attend(query) is query @ embedding.T, as flax's nn.Embed.attend and nnx.Embed.attend,
    linen and NNX alike, whatever the leading shape of query."""
    table = _table(10, 4)
    query = jax.random.normal(jax.random.key(1), (2, 3, 4))
    got_lin, got_nnx = _attend_both(table, query, dtype=dtype)
    want = np.asarray(query, np.float64) @ np.asarray(table, np.float64).T  # [2, 3, 10]
    assert got_lin.shape == got_nnx.shape == (2, 3, 10)
    assert got_lin.dtype == got_nnx.dtype == (dtype or jnp.float32)
    np.testing.assert_array_equal(got_lin, got_nnx)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got_lin, np.float64), want, rtol=tol, atol=tol)
    flax_lin = nn.Embed(10, 4, dtype=dtype).apply({"params": {"embedding": table}}, query,
                                                  method="attend")
    embed = nnx.Embed(10, 4, dtype=dtype, rngs=nnx.Rngs(0))
    embed.embedding[...] = table
    for theirs in (flax_lin, embed.attend(query)):
        assert theirs.dtype == got_lin.dtype
        np.testing.assert_array_equal(theirs, got_lin)
    # the stored table as is: max_norm does not rescale it, the padding row has its logit
    capped, _ = _attend_both(table, query, max_norm=0.1, padding_idx=0)
    np.testing.assert_array_equal(capped, _attend_both(table, query)[0])


def test_attend_dtype_follows_the_module_dtype_as_nnx_embed():
    """dtype=None casts the query to the table's dtype (nnx.Embed); linen's nn.Embed promotes to
    jnp.result_type instead, which differs only for a query wider than the table (documented)."""
    table = _table(6, 3).astype(jnp.bfloat16)
    query = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)
    lin_out, nnx_out = _attend_both(table, query)
    embed = nnx.Embed(6, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    embed.embedding[...] = table
    assert lin_out.dtype == nnx_out.dtype == embed.attend(query).dtype == jnp.bfloat16
    np.testing.assert_array_equal(lin_out, embed.attend(query))
    with jax.numpy_dtype_promotion("standard"):  # (strict promotion refuses result_type)
        linen_embed = nn.Embed(6, 3).apply({"params": {"embedding": table}}, query,
                                           method="attend")
    assert linen_embed.dtype == jnp.float32  # (the documented difference)
    # an int query becomes the table's dtype; dtype= casts both, as flax
    ints = jnp.array([[1, 0, 2]])
    assert _attend_both(table, ints)[1].dtype == jnp.bfloat16
    for out in _attend_both(table, query, dtype=jnp.float32):
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(
            out, query @ table.astype(jnp.float32).T)


def test_attend_under_jit_and_grad_and_frozen_tables():
    table = _table(7, 4)
    query = jax.random.normal(jax.random.key(2), (3, 4))
    cot = jax.random.normal(jax.random.key(3), (3, 7))
    lin = jaxbag.EmbeddingBag.from_pretrained(table, freeze=False, padding_idx=0)
    variables = lin.init(jax.random.key(0), query, method="attend")
    m = jaxbag.nnx.EmbeddingBag.from_pretrained(table, freeze=False, padding_idx=0)
    eager = lin.apply(variables, query, method="attend")
    np.testing.assert_array_equal(
        jax.jit(lambda v, q: lin.apply(v, q, method="attend"))(variables, query), eager)
    np.testing.assert_array_equal(nnx.jit(lambda mod, q: mod.attend(q))(m, query), eager)
    # gradients: d/dtable = cot.T @ query, d/dquery = cot @ table (NumPy, float64)
    want_table = np.asarray(cot, np.float64).T @ np.asarray(query, np.float64)
    want_query = np.asarray(cot, np.float64) @ np.asarray(table, np.float64)
    g_lin, g_q = jax.jit(jax.grad(
        lambda v, q: jnp.sum(lin.apply(v, q, method="attend") * cot), argnums=(0, 1)))(
        variables, query)
    g_nnx = nnx.jit(nnx.grad(lambda mod: jnp.sum(mod.attend(query) * cot)))(m)
    np.testing.assert_allclose(g_lin["params"]["embedding"], want_table, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_nnx["embedding"][...], want_table, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_q, want_query, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(g_lin["params"]["embedding"][0])).sum() > 0  # the padding row too
    # a frozen table gets none, as in the bags
    frozen = jaxbag.EmbeddingBag.from_pretrained(table)
    g = jax.grad(lambda v: jnp.sum(frozen.apply(v, query, method="attend") * cot))(variables)
    np.testing.assert_array_equal(g["params"]["embedding"], np.zeros_like(table))
    nnx_frozen = jaxbag.nnx.EmbeddingBag.from_pretrained(table)
    assert "embedding" not in nnx.grad(lambda mod: jnp.sum(mod.attend(query) * cot))(nnx_frozen)


def test_attend_checks_the_query_width():
    lin = jaxbag.EmbeddingBag(10, 4)
    m = jaxbag.nnx.EmbeddingBag(10, 4, rngs=nnx.Rngs(0))
    match = (r"query must be \[\.\.\., features\] = \[\.\.\., 4\].*got query of shape \(2, 3\)"
             r".*bag.attend\(jnp.ones\(\(2, 4\)\)\)")
    with pytest.raises(ValueError, match=match):
        m.attend(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=match):
        lin.init(jax.random.key(0), jnp.ones((2, 3)), method="attend")
    with pytest.raises(ValueError, match=r"got query of shape \(\)"):
        m.attend(1.0)


def test_nnx_embedding_metadata_as_nnx_embed():
    """nnx.Embed's embedding_metadata (nnx.Param metadata, e.g. the sharding): the same argument,
    kept by from_pretrained's frozen table."""
    m = jaxbag.nnx.EmbeddingBag(10, 4, rngs=nnx.Rngs(0), embedding_metadata={"note": "words"})
    embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0), embedding_metadata={"note": "words"})
    assert m.embedding.get_metadata() == embed.embedding.get_metadata()
    assert m.embedding.get_metadata()["note"] == "words"
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec("model", None)
    with jax.set_mesh(mesh):
        for freeze in (False, True):
            p = jaxbag.nnx.EmbeddingBag.from_pretrained(
                _table(), freeze=freeze, padding_idx=1,
                embedding_metadata={"out_sharding": ("model", None)})
            assert p.embedding.get_metadata()["out_sharding"] == ("model", None)
            assert p.embedding[...].sharding.spec == spec and p.frozen == freeze
            specs = nnx.get_partition_spec(nnx.state(p))
            assert jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, type(spec))) == [spec]
            np.testing.assert_array_equal(p.embedding[...], _table())
    with pytest.raises(TypeError, match=r"embedding_metadata must be a mapping .*got "
                                        r"embedding_metadata=\['model'\].*out_sharding"):
        jaxbag.nnx.EmbeddingBag(10, 4, embedding_metadata=["model"], rngs=nnx.Rngs(0))


def test_a_big_pretrained_table_skips_the_jitted_init_as_documented():
    """from_pretrained's initialiser holds the table, so jit(init) compiles it in as a constant
    (documented: 205 MB of HLO for 400k x 64). The documented way round: a plain frozen bag in
    the parent model, a jitted init without the table, then the table put at the bag's path."""
    table = _table(20_000, 8)

    class Parent(nn.Module):
        bag: nn.Module

        @nn.compact
        def __call__(self, ids, offsets):
            return nn.Dense(2)(self.bag(ids, offsets))

    pretrained = Parent(jaxbag.EmbeddingBag.from_pretrained(table, mode="sum"))
    plain = Parent(jaxbag.EmbeddingBag(20_000, 8, mode="sum", freeze=True))
    hlo_bytes = [len(jax.jit(p.init).lower(jax.random.key(0), IDS, OFFSETS).as_text())
                 for p in (pretrained, plain)]
    assert hlo_bytes[0] > table.nbytes > 10 * hlo_bytes[1]  # the table is in the first program
    variables = jax.jit(plain.init)(jax.random.key(0), IDS, OFFSETS)
    variables["params"]["bag"]["embedding"] = table
    want = pretrained.apply(pretrained.init(jax.random.key(0), IDS, OFFSETS), IDS, OFFSETS)
    np.testing.assert_allclose(plain.apply(variables, IDS, OFFSETS), want, rtol=1e-6)
    # on its own the module's variables are {"params": {"embedding": table}}: no init needed
    bag = jaxbag.EmbeddingBag.from_pretrained(table, mode="sum")
    np.testing.assert_array_equal(bag.apply({"params": {"embedding": table}}, IDS, OFFSETS),
                                  jaxbag.embedding_bag(table, IDS, OFFSETS, mode="sum"))
