"""The jitted train and eval steps (pure functions of split NNX state).

The model is split once into ``graphdef`` (static structure), ``params`` (the
``nnx.Param`` state, what the optimiser updates) and ``rest`` (other state, empty
here); the steps rebuild it with ``nnx.merge`` inside ``jax.jit``. That keeps the
per-step Python work to one ``jax.jit`` dispatch (``nnx.jit`` would walk the
module graph on every call) and lets the step donate ``params``/``opt_state``
buffers, so the optimiser updates the embedding table in place.

Each step function counts its traces in ``compilations``: the Python body runs
once per trace, and ``jax.jit`` traces once per new input shape, so the counter is
the number of compilations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, MutableMapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.textcls.batches import Batch
from experiments.textcls.metrics import Metrics


def make_steps(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    compilations: MutableMapping[str, int] | None = None,
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Returns ``(train_step, eval_step)``.

    ``train_step(params, opt_state, metrics, batch, rng, step) -> (params, opt_state, metrics)``
    takes one optimiser step on ``batch`` (padding bags masked out of the mean loss), with
    dropout key ``fold_in(rng, step)``, and adds the batch's metrics to ``metrics``. Its
    first three arguments are donated.

    ``eval_step(params, batch) -> (metrics, predictions int32 [B])`` (plain cross-entropy).
    """
    counts: MutableMapping[str, int] = compilations if compilations is not None else {}
    counts.setdefault("train_step", 0)
    counts.setdefault("eval_step", 0)

    def logits_of(p: nnx.State, batch: Batch, dropout_key: jax.Array | None) -> jax.Array:
        model = nnx.merge(graphdef, p, rest)
        return model(batch.bags.indices, batch.bags.segment_ids, num_bags=batch.bags.num_bags,
                     weights=batch.bags.weights, dropout_key=dropout_key)

    def loss_and_metrics(p: nnx.State, batch: Batch, dropout_key: jax.Array):
        logits = logits_of(p, batch, dropout_key)
        targets = optax.smooth_labels(jax.nn.one_hot(batch.labels, num_classes), label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
        mask = batch.bags.bag_mask.astype(jnp.float32)
        loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return loss, Metrics.from_batch(per_example, logits, batch.labels, batch.bags.bag_mask)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(p, opt_state, metrics: Metrics, batch: Batch, rng: jax.Array, step: jax.Array):
        counts["train_step"] += 1
        key = jax.random.fold_in(rng, step)
        grads, batch_metrics = jax.grad(loss_and_metrics, has_aux=True)(p, batch, key)
        # optax mixes Python floats with int32 step counts (Adam's bias correction), which
        # strict dtype promotion rejects; its update runs under standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, p)
            new_params = optax.apply_updates(p, updates)
        return new_params, opt_state, metrics.merge(batch_metrics)

    @jax.jit
    def eval_step(p, batch: Batch):
        counts["eval_step"] += 1
        logits = logits_of(p, batch, None)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
        metrics = Metrics.from_batch(per_example, logits, batch.labels, batch.bags.bag_mask)
        return metrics, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return train_step, eval_step
