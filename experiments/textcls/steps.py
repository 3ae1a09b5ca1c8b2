"""The jitted train and eval steps (pure functions of split NNX state).

The model is split once into ``graphdef`` (static structure), ``params`` (the
``nnx.Param`` state) and ``rest`` (other state, empty here); the steps rebuild it
with ``nnx.merge`` inside ``jax.jit``. That keeps the per-step Python work to one
``jax.jit`` dispatch (``nnx.jit`` would walk the module graph on every call) and lets
the step donate ``params``/``opt_state`` buffers, so the table is updated in place.

Two ways to train the embedding table:

* dense (default): ``jax.grad`` of the whole model and one optax optimiser, as
  ``torch.nn.EmbeddingBag`` + ``torch.optim.AdamW``;
* sparse (``sparse_tx``): the table goes through ``jaxbag.embedding_bag_rows`` (the
  gradient of the touched rows only) and a ``jaxbag`` row-wise optimiser such as
  ``jaxbag.sparse_adam`` (lazy Adam, as ``EmbeddingBag(sparse=True)`` +
  ``torch.optim.SparseAdam``); the other parameters use optax.

Each step function counts its traces in ``compilations``: the Python body runs
once per trace, and ``jax.jit`` traces once per new input shape, so the counter is
the number of compilations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, MutableMapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxbag
from experiments.textcls.batches import Batch
from experiments.textcls.metrics import Metrics
from experiments.textcls.model import FastText

TABLE = nnx.PathContains("embedding")  # the EmbeddingBag table among the params


class Steps(NamedTuple):
    """What :func:`make_steps` returns.

    Attributes:
        init_opt_state: ``params -> opt_state`` (an optax state, or ``(optax state,
            sparse state)`` on the sparse path).
        train_step: ``(params, opt_state, metrics, batch, rng, step) -> (params,
            opt_state, metrics)``: one optimiser step on ``batch`` (padding bags masked
            out of the mean loss), dropout key ``fold_in(rng, step)``, the batch's
            metrics added to ``metrics``. The first three arguments are donated.
        eval_step: ``(params, batch) -> (metrics, predictions int32 [B])`` (plain
            cross-entropy, no dropout).
    """

    init_opt_state: Callable[[nnx.State], Any]
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]


def split_model(model: FastText) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, rest)`` of ``model``."""
    graphdef, params, *others = nnx.split(model, nnx.Param, ...)
    (rest,) = others  # two filters, two states
    return graphdef, params, rest


def make_steps(
    model: FastText,
    tx: optax.GradientTransformation,
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    sparse_tx: jaxbag.SparseOptimizer | None = None,
    compilations: MutableMapping[str, int] | None = None,
) -> Steps:
    """The jitted steps of ``model`` (its structure and settings; not its values).

    Args:
        model: the model (only its graph and bag settings are used).
        tx: optax optimiser of all parameters (dense) or of all but the table (sparse).
        num_classes: ``C``.
        label_smoothing: optax label smoothing of the training loss.
        sparse_tx: a jaxbag row-wise optimiser for the table; ``None`` trains densely.
        compilations: a dict whose ``"train_step"``/``"eval_step"`` entries count traces.
    """
    graphdef, _, rest = split_model(model)
    # The bag's mode and padding row, read from jaxbag.nnx.EmbeddingBag's settings (or from
    # the same-named attributes of a replacement module, e.g. a row-sharded one).
    embed = model.embed
    bag_mode = getattr(getattr(embed, "settings", embed), "mode", None)
    bag_padding_idx = getattr(getattr(embed, "settings", embed), "padding_idx", None)
    if sparse_tx is not None and bag_mode is None:
        raise ValueError(
            f"config.optim.sparse_embedding=True needs model.embed to expose the bag mode "
            f"(jaxbag.nnx.EmbeddingBag does), got {type(embed).__name__}; "
            "set --config.optim.sparse_embedding=false"
        )
    counts: MutableMapping[str, int] = compilations if compilations is not None else {}
    counts.setdefault("train_step", 0)
    counts.setdefault("eval_step", 0)

    def loss_of(logits: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
        targets = optax.smooth_labels(jax.nn.one_hot(batch.labels, num_classes), label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
        mask = batch.bags.bag_mask.astype(jnp.float32)
        loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return loss, Metrics.from_batch(per_example, logits, batch.labels, batch.bags.bag_mask)

    def apply_optax(params, grads, opt_state):
        # optax mixes Python floats with int32 step counts (Adam's bias correction), which
        # strict dtype promotion rejects; its update runs under standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

    def dense_step(p, opt_state, metrics: Metrics, batch: Batch, key: jax.Array):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            logits = m(batch.bags.indices, batch.bags.segment_ids, num_bags=batch.bags.num_bags,
                       weights=batch.bags.weights, dropout_key=key)
            return loss_of(logits, batch)

        grads, batch_metrics = jax.grad(loss_fn, has_aux=True)(p)
        p, opt_state = apply_optax(p, grads, opt_state)
        return p, opt_state, metrics.merge(batch_metrics)

    def sparse_step(p, opt_state, metrics: Metrics, batch: Batch, key: jax.Array):
        assert sparse_tx is not None and bag_mode is not None
        dense_opt, table_opt = opt_state
        table_state, others = nnx.split_state(p, TABLE, ...)
        (table,) = jax.tree.leaves(table_state)
        pooled, pullback = jaxbag.embedding_bag_rows(
            table, batch.bags.indices, segment_ids=batch.bags.segment_ids,
            num_bags=batch.bags.num_bags, per_sample_weights=batch.bags.weights,
            mode=bag_mode, padding_idx=bag_padding_idx)

        def loss_fn(others, pooled):
            m = nnx.merge(graphdef, table_state, others, rest)
            return loss_of(m.classify(pooled, dropout_key=key), batch)

        (g_others, g_pooled), batch_metrics = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
            others, pooled)
        table, table_opt = sparse_tx.update(table, table_opt, pullback(g_pooled))
        others, dense_opt = apply_optax(others, g_others, dense_opt)
        table_state = jax.tree.unflatten(jax.tree.structure(table_state), [table])
        return (nnx.merge_state(table_state, others), (dense_opt, table_opt),
                metrics.merge(batch_metrics))

    body = dense_step if sparse_tx is None else sparse_step

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(p, opt_state, metrics: Metrics, batch: Batch, rng: jax.Array, step: jax.Array):
        counts["train_step"] += 1
        return body(p, opt_state, metrics, batch, jax.random.fold_in(rng, step))

    @jax.jit
    def eval_step(p, batch: Batch):
        counts["eval_step"] += 1
        m = nnx.merge(graphdef, p, rest)
        logits = m(batch.bags.indices, batch.bags.segment_ids, num_bags=batch.bags.num_bags,
                   weights=batch.bags.weights)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
        metrics = Metrics.from_batch(per_example, logits, batch.labels, batch.bags.bag_mask)
        return metrics, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def init_opt_state(p: nnx.State) -> Any:
        if sparse_tx is None:
            return tx.init(p)
        table_state, others = nnx.split_state(p, TABLE, ...)
        (table,) = jax.tree.leaves(table_state)
        return tx.init(others), sparse_tx.init(table)

    return Steps(init_opt_state, train_step, eval_step)
