"""The fastText-style classifier: EmbeddingBag -> [hidden + dropout] -> Dense, in flax NNX."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

import jaxbag
from experiments.textcls.tokenizer import UNKNOWN_ID


def symmetric_uniform(scale: float):
    """Initialiser drawing from ``U(-scale, scale)`` (fastText / the torch tutorial)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)

    return init


class FastText(nnx.Module):
    """fastText: the mean (or sum/sqrtn/max) of a document's id embeddings, then a linear head.

    Legend: ``V`` embedding rows, ``D`` features, ``H`` hidden units, ``C`` classes,
    ``N`` ids in a batch, ``B`` documents in a batch.

    Args:
        num_embeddings: ``V`` (vocabulary + n-gram buckets).
        num_classes: ``C``.
        features: ``D``.
        hidden: ``H``; 0 means no hidden layer (embedding -> logits, as fastText).
        dropout: dropout rate on the pooled (or hidden) features.
        mode: the bag reduction of :func:`jaxbag.embedding_bag`.
        embed_init_scale: embeddings start in ``U(-s, s)``.
        unknown_id: if given, this id (the ``<unk>`` word) is left out of every bag, as
            fastText drops out-of-vocabulary words (it is the bag's ``padding_idx``).
        rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        num_embeddings: int,
        num_classes: int,
        *,
        features: int,
        hidden: int = 0,
        dropout: float = 0.0,
        mode: jaxbag.Mode = "mean",
        embed_init_scale: float = 0.5,
        unknown_id: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.embed = jaxbag.nnx.EmbeddingBag(
            num_embeddings,
            features,
            mode=mode,
            padding_idx=unknown_id,
            embedding_init=symmetric_uniform(embed_init_scale),
            rngs=rngs,
        )
        self.hidden = nnx.Linear(features, hidden, rngs=rngs) if hidden > 0 else None
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(hidden if hidden > 0 else features, num_classes, rngs=rngs)

    def __call__(
        self,
        indices: ArrayLike,
        segment_ids: ArrayLike,
        *,
        num_bags: int,
        weights: ArrayLike | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``float32 [B, C]`` of a packed batch (``indices``, ``segment_ids`` ``int32 [N]``,
        optional per-id ``weights`` ``float32 [N]``, e.g. counts).

        Dropout is active only when ``dropout_key`` is given (training).
        """
        x = self.embed(indices, per_sample_weights=weights, segment_ids=segment_ids,
                       num_bags=num_bags)
        return self.classify(x, dropout_key=dropout_key)

    def classify(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits ``float32 [B, C]`` of pooled bags ``x`` ``[B, D]`` (the layers after the bag)."""
        deterministic = dropout_key is None
        if self.hidden is not None:
            x = self.dropout(x, deterministic=deterministic, rngs=dropout_key)
            x = jax.nn.relu(self.hidden(x))
        x = self.dropout(x, deterministic=deterministic, rngs=dropout_key)
        return self.head(x)


def build_model(
    model_config: Mapping[str, Any], *, num_embeddings: int, num_classes: int, seed: int
) -> FastText:
    """The model described by ``config.model``, initialised from ``seed``."""
    return FastText(
        num_embeddings,
        num_classes,
        features=int(model_config["features"]),
        hidden=int(model_config["hidden"]),
        dropout=float(model_config["dropout"]),
        mode=model_config["mode"],  # (checked by jaxbag)
        embed_init_scale=float(model_config["embed_init_scale"]),
        unknown_id=UNKNOWN_ID if model_config["ignore_unknown"] else None,
        rngs=nnx.Rngs(params=seed),
    )
