"""A user's calls of jaxbag's public API, for mypy (tests/test_typing.py): what each call is
typed as (``assert_type``), and misuses the types must refuse (:func:`misuses`: each
``# type: ignore[code]`` must be needed; with ``warn_unused_ignores``, a misuse that
type-checks is an error).

Not collected by pytest (its name does not start with ``test_``); tests/test_typing.py
type-checks it and runs its functions except :func:`misuses` (so the calls are real ones).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import assert_type

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

import jaxbag


def functional() -> None:
    weight = jnp.ones((5, 2))
    ids = jnp.array([0, 3, 1, 2])
    assert_type(jaxbag.embedding_bag(weight, ids, jnp.array([0]), mode="sum"), Array)
    assert_type(jaxbag.embedding_bag(np.ones((5, 2)), np.array([[0, 1]])), Array)  # NumPy in
    assert_type(jaxbag.offsets_to_segment_ids(jnp.array([0, 2]), 4), Array)
    assert_type(jaxbag.renorm(weight, ids, 1.0), Array)
    assert_type(jaxbag.cpu_kernel_status(), tuple[bool, str])
    jaxbag.validate(5, ids, jnp.array([0]), mode="sum")
    modes: tuple[jaxbag.Mode, ...] = jaxbag.MODES  # a user's own wrapper names the type
    for mode in modes:
        jaxbag.embedding_bag(weight, ids, jnp.array([0]), mode=mode)


def ragged() -> None:
    pb = jaxbag.pack_bags([[1, 2], [3]], bucket_sizes=[8])
    assert_type(pb, jaxbag.PackedBags)
    assert_type(pb.num_bags, int)
    assert_type(jaxbag.bucket_size(5), int)
    jf = jaxbag.JaggedFeatures.from_lists({"words": [[1, 2], [3]]})
    assert_type(jf, jaxbag.JaggedFeatures)


def modules(key: Array) -> None:
    ids = jnp.array([[0, 1]])
    model = jaxbag.EmbeddingBag(num_embeddings=5, features=2, mode="sum")
    variables = model.init(key, ids)
    model.apply(variables, ids)  # (flax types apply's result loosely)
    layer = jaxbag.nnx.EmbeddingBag(5, 2, rngs=nnx.Rngs(0))
    assert_type(layer(ids), Array)
    assert_type(layer.attend(jnp.ones((3, 2))), Array)  # tied-weight logits [3, 5]
    model.apply(variables, jnp.ones((3, 2)), method="attend")
    meta = jaxbag.nnx.EmbeddingBag(5, 2, rngs=nnx.Rngs(0), embedding_metadata={"note": "x"})
    assert_type(meta, jaxbag.nnx.EmbeddingBag)
    assert isinstance(layer, nnx.Module) and isinstance(model, nn.Module)
    # from_pretrained / from_torch take the settings as typed keywords
    table = jnp.ones((5, 2))
    pretrained = jaxbag.EmbeddingBag.from_pretrained(table, mode="sum", name="bag", sparse=False)
    assert_type(pretrained, jaxbag.EmbeddingBag)
    frozen = jaxbag.nnx.EmbeddingBag.from_pretrained(table, mode="max", rngs=nnx.Rngs(1),
                                                     embedding_metadata={"note": "x"})
    assert_type(frozen, jaxbag.nnx.EmbeddingBag)
    converted, _ = jaxbag.EmbeddingBag.from_torch(np.ones((5, 2), np.float32), freeze=True)
    assert_type(converted, jaxbag.EmbeddingBag)
    assert_type(jaxbag.nnx.EmbeddingBag.from_torch(table, padding_idx=0), jaxbag.nnx.EmbeddingBag)


def sparse_training() -> None:
    table = jnp.zeros((5, 2))
    opt = jaxbag.sparse_adam(1e-3)
    assert_type(opt, jaxbag.SparseOptimizer[Array, jaxbag.RowGrads])
    state = opt.init(table)
    bags, pullback = jaxbag.embedding_bag_rows(table, jnp.array([0, 3]), jnp.array([0]))
    assert_type(bags, Array)
    assert_type(pullback, Callable[[Array], jaxbag.RowGrads])
    row_grads = pullback(jnp.ones_like(bags))
    table, state = opt.update(table, state, row_grads)
    assert_type(table, Array)
    assert_type(jaxbag.unique_rows(jnp.array([3, 3, 1]), 5), tuple[Array, Array])


def collections(key: Array) -> None:
    tables = [jaxbag.TableConfig("t", num_embeddings=5, features=2, feature_names=("f",))]
    layout = jaxbag.collection_layout(tables)
    params = jaxbag.init_collection(layout, key)
    jf = jaxbag.JaggedFeatures.from_lists({"f": [[1, 2], [3]]})
    # concat picks the result's type: a dict by feature, or one [B, sum D_f] array
    assert_type(jaxbag.embedding_bag_collection(params, jf, layout=layout), dict[str, Array])
    assert_type(jaxbag.embedding_bag_collection(params, jf, layout=layout, concat=True), Array)
    out, pullback = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout)
    assert_type(out, dict[str, Array])
    assert_type(pullback(out), dict[str, jaxbag.RowGrads])
    flat, _ = jaxbag.embedding_bag_collection_rows(params, jf, layout=layout, concat=True)
    assert_type(flat, Array)
    opt = jaxbag.collection_optimizer(jaxbag.sparse_sgd(0.1), layout=layout)
    assert_type(opt, jaxbag.SparseOptimizer[Mapping[str, Array], Mapping[str, jaxbag.RowGrads]])
    model = jaxbag.nnx.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0))
    assert_type(model(jf), dict[str, Array])
    assert_type(model(jf, concat=True), Array)
    linen_model = jaxbag.EmbeddingBagCollection(tables=tuple(tables))
    bound = linen_model.bind(linen_model.init(key, jf))
    assert_type(bound(jf), dict[str, Array])
    assert_type(bound(jf, concat=True), Array)


def sharding() -> None:
    mesh = jax.make_mesh((1,), ("model",))
    table = jaxbag.sharding.shard_table(jnp.zeros((4, 2)), mesh, axis_name="model")
    assert_type(table, Array)
    out = jaxbag.sharding.embedding_bag(table, jnp.array([0, 1]), jnp.array([0]), mesh=mesh,
                                        axis_name="model")
    assert_type(out, Array)


def misuses(key: Array) -> None:
    """Calls the types refuse (never run: each would raise)."""
    weight, ids = jnp.ones((5, 2)), jnp.array([0, 3])
    jaxbag.embedding_bag(weight, ids, jnp.array([0]), num_bags="2")  # type: ignore[arg-type]
    table = jnp.zeros((5, 2))
    opt = jaxbag.sparse_adam(1e-3)
    bags, _ = jaxbag.embedding_bag_rows(table, ids, jnp.array([0]))
    opt.update(table, opt.init(table), bags)  # type: ignore[arg-type]  # bags, not RowGrads
    jaxbag.embedding_bag_rows(table, ids, mode=2)  # type: ignore[arg-type]
    jaxbag.embedding_bag_rows(table, ids, modes="sum")  # type: ignore[call-arg]
    layout = jaxbag.collection_layout(
        [jaxbag.TableConfig("t", num_embeddings=5, features=2, feature_names=("f",))])
    per_collection = jaxbag.collection_optimizer(opt, layout=layout)
    jaxbag.collection_optimizer(per_collection, layout=layout)  # type: ignore[arg-type]
    jaxbag.EmbeddingBag(num_embeddings=5, features=2, mode=3)  # type: ignore[arg-type]
    # mode is a Literal: a misspelt one is caught before the run, in every entry point
    jaxbag.embedding_bag(weight, ids, jnp.array([0]), mode="avg")  # type: ignore[arg-type]
    jaxbag.nnx.EmbeddingBag(5, 2, mode="average", rngs=nnx.Rngs(0))  # type: ignore[arg-type]
    jaxbag.TableConfig("t", 5, 2, ("f",), mode="Sum")  # type: ignore[arg-type]
    jaxbag.EmbeddingBag.from_pretrained(weight, mode="avg")  # type: ignore[arg-type]
    jaxbag.nnx.EmbeddingBag.from_pretrained(weight, modes="sum")  # type: ignore[call-arg]
    jaxbag.EmbeddingBag.from_torch(weight, rngs=nnx.Rngs(0))  # type: ignore[call-arg]  # NNX's
    jaxbag.nnx.EmbeddingBag.from_torch(weight, padding_idx="0")  # type: ignore[arg-type]
    tables = [jaxbag.TableConfig("t", 5, 2, ("f",))]
    jaxbag.nnx.EmbeddingBagCollection(tables, plan="auto", rngs=nnx.Rngs(0))  # type: ignore[arg-type]
    jaxbag.EmbeddingBagCollection(tables=tuple(tables), plan=layout)  # type: ignore[arg-type]
