"""The train step with sparse embedding updates (``config.optim.sparse_embedding=True``).

A drop-in for ``make_steps``' ``train_step``: same signature and the same ``params`` (full NNX
``nnx.Param`` state, so checkpoints, evaluation and prediction are unchanged); only the optimiser
state differs: ``(dense_opt_state, table_state)``.

Per step:

1. the bags come from :func:`jaxbag.embedding_bag_rows` on the table: the gradient reaches only the
   ``U <= N`` rows the batch touches (``[U, D]``; no ``[V, D]`` gradient is ever built);
2. the rest of the model (hidden layer, dropout, head) runs on the bags; ``jax.grad`` gives the
   dense parameters' gradient and the bags' cotangent;
3. the dense parameters are updated by the optax transformation ``tx`` (as the dense path), the
   touched table rows by a :class:`jaxbag.SparseOptimizer` (lazy Adam as torch's ``SparseAdam``,
   fbgemm's row-wise Adagrad, or SGD), in place (``params`` and the states are donated).

Differences from the dense path, by design (as torch's ``sparse=True``): no weight decay and no
global-norm clipping on the table, and lazy Adam leaves the moments of untouched rows alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxbag
from experiments.textcls.batches import Batch
from experiments.textcls.metrics import Metrics

TABLE_PATH = ("embed", "embedding")


def make_sparse_optimizer(optim_config: Mapping[str, Any], schedule: optax.Schedule) -> jaxbag.SparseOptimizer:
    """``config.optim.sparse_optimizer``: ``adam`` (lazy, torch SparseAdam), ``adagrad`` (row-wise,
    fbgemm) or ``sgd``, on the same learning-rate schedule as the dense parameters."""
    name = str(optim_config.get("sparse_optimizer", "adam"))
    if name == "adam":
        return jaxbag.sparse_adam(schedule, b1=float(optim_config["b1"]), b2=float(optim_config["b2"]))
    if name == "adagrad":
        return jaxbag.sparse_adagrad(schedule)
    if name == "sgd":
        return jaxbag.sparse_sgd(schedule)
    raise ValueError(
        f"config.optim.sparse_optimizer must be 'adam', 'adagrad' or 'sgd', got {name!r}"
    )


def _table_index(params: nnx.State) -> int:
    paths = [tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    hits = [i for i, p in enumerate(paths) if p[: len(TABLE_PATH)] == TABLE_PATH]
    if len(hits) != 1:
        raise ValueError(f"expected one embedding table at {'.'.join(TABLE_PATH)}; params: {paths}")
    return hits[0]


def _logits_from_bags(model: Any, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
    """The model after its EmbeddingBag (``FastText.logits_from_bags`` when it has one)."""
    if hasattr(model, "logits_from_bags"):
        return model.logits_from_bags(x, dropout_key=dropout_key)
    deterministic = dropout_key is None
    if model.hidden is not None:
        x = model.dropout(x, deterministic=deterministic, rngs=dropout_key)
        x = jax.nn.relu(model.hidden(x))
    x = model.dropout(x, deterministic=deterministic, rngs=dropout_key)
    return model.head(x)


def make_sparse_steps(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    params: nnx.State,
    tx: optax.GradientTransformation,
    table_opt: jaxbag.SparseOptimizer,
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    compilations: MutableMapping[str, int] | None = None,
) -> tuple[Callable[[nnx.State], Any], Callable[..., Any]]:
    """Returns ``(init_opt_state, train_step)``.

    ``init_opt_state(params) -> (dense_opt_state, table_state)``.
    ``train_step(params, opt_state, metrics, batch, rng, step) -> (params, opt_state, metrics)``,
    exactly as ``make_steps``' train step (first three arguments donated).
    """
    counts: MutableMapping[str, int] = compilations if compilations is not None else {}
    counts.setdefault("train_step", 0)
    k = _table_index(params)
    treedef = jax.tree_util.tree_structure(params)
    settings = nnx.merge(graphdef, params, rest).embed.settings

    def split(p):
        leaves = jax.tree_util.tree_leaves(p)
        return leaves[k], leaves[:k] + leaves[k + 1 :]

    def join(table, dense):
        return jax.tree_util.tree_unflatten(treedef, dense[:k] + [table] + dense[k:])

    def init_opt_state(p):
        table, dense = split(p)
        return tx.init(dense), table_opt.init(table)

    def loss_and_metrics(dense, bags, table, batch: Batch, dropout_key):
        model = nnx.merge(graphdef, join(jax.lax.stop_gradient(table), dense), rest)
        logits = _logits_from_bags(model, bags, dropout_key)
        targets = optax.smooth_labels(jax.nn.one_hot(batch.labels, num_classes), label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
        mask = batch.bags.bag_mask.astype(jnp.float32)
        loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return loss, Metrics.from_batch(per_example, logits, batch.labels, batch.bags.bag_mask)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(p, opt_state, metrics: Metrics, batch: Batch, rng: jax.Array, step: jax.Array):
        counts["train_step"] += 1
        key = jax.random.fold_in(rng, step)
        table, dense = split(p)
        dense_state, table_state = opt_state
        bags, pullback = jaxbag.embedding_bag_rows(
            table, batch.bags.indices, segment_ids=batch.bags.segment_ids,
            num_bags=batch.bags.num_bags, per_sample_weights=batch.bags.weights,
            mode=settings.mode, padding_idx=settings.padding_idx,
        )
        (g_dense, g_bags), batch_metrics = jax.grad(loss_and_metrics, argnums=(0, 1), has_aux=True)(
            dense, bags, table, batch, key
        )
        table, table_state = table_opt.update(table, table_state, pullback(g_bags))
        with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
            updates, dense_state = tx.update(g_dense, dense_state, dense)
            dense = optax.apply_updates(dense, updates)
        return join(table, dense), (dense_state, table_state), metrics.merge(batch_metrics)

    return init_opt_state, train_step
