"""``jaxbag.nnx.EmbeddingBag``: the flax.nnx module over :func:`jaxbag.embedding_bag`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Unpack

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array
from jax.typing import ArrayLike

from jaxbag._src import module_common as common
from jaxbag._src import validation
from jaxbag._src.validation import Mode

__all__ = ["EmbeddingBag", "FrozenEmbedding"]


class PretrainedOptions(common.PretrainedOptions, total=False):
    """``from_pretrained``'s keyword arguments: the settings, ``rngs`` (not needed) and
    ``embedding_metadata``."""

    rngs: nnx.Rngs
    embedding_metadata: Mapping[str, Any]


class TorchOverrides(PretrainedOptions, total=False):
    """``from_torch``'s overrides: ``from_pretrained``'s keyword arguments and ``freeze``."""

    freeze: bool


class FrozenEmbedding(nnx.Variable):
    """A table that is not an ``nnx.Param``: ``nnx.grad`` and ``nnx.Optimizer`` skip it.

    What :meth:`EmbeddingBag.from_pretrained` (``freeze=True``) stores as ``embedding``: an
    ``nnx.Variable`` holding the ``[V, D]`` table, read by the module as a ``Param`` is.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> m = jaxbag.nnx.EmbeddingBag.from_pretrained(jnp.ones((3, 2)))
      >>> type(m.embedding).__name__, m.embedding[...].shape
      ('FrozenEmbedding', (3, 2))
    """


class EmbeddingBag(nnx.Module):
    """Bags of embeddings (flax.nnx), like ``torch.nn.EmbeddingBag``.

    Legend: ``V`` = ``num_embeddings``, ``D`` = ``features``, ``N`` ids, ``B`` bags.

    Args:
      num_embeddings: ``V``, rows in the table.
      features: ``D``, the width of each row.
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      padding_idx: optional row skipped in every bag (negative counts from the end); initialised
        to zeros, as torch does.
      max_norm: optional; a looked-up row whose ``norm_type``-norm exceeds it is scaled down to
        it (torch's forward, see :func:`jaxbag.embedding_bag`). Unlike torch, the stored
        ``embedding`` is not renormed in place: :func:`jaxbag.renorm` returns the renormed table.
        A NumPy or JAX scalar is kept as a Python float.
      norm_type: the p of the p-norm for ``max_norm`` (kept as a Python float too).
      scale_grad_by_freq: divide each row's gradient by its frequency in the batch.
      include_last_offset: ``offsets`` has ``B + 1`` entries (torch's flag).
      dtype: the computation dtype (the table is cast to it); ``None`` keeps ``param_dtype``.
      param_dtype: the dtype of the ``embedding`` parameter (float64 needs ``jax_enable_x64``:
        without it JAX creates the table in float32, with a warning, as for ``nn.Embed``).
      embedding_init: initialiser of the ``[V, D]`` table (flax's ``nnx.Embed`` default).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      embedding_metadata: metadata of the ``embedding`` variable, passed to ``nnx.Param`` as
        ``nnx.Embed``'s (e.g. ``{"out_sharding": ("model", None)}``, under a mesh); kept by
        :meth:`from_pretrained`'s frozen table.

    Attributes:
      embedding: ``nnx.Param [V, D]`` (a :class:`FrozenEmbedding` for a frozen pretrained table).
      settings: the options passed on to :func:`jaxbag.embedding_bag` (``mode``,
        ``padding_idx``, ...), each also a read-only attribute (``bag.mode``), as the linen
        module's; ``num_embeddings`` and ``features`` are attributes too, as in ``nnx.Embed``.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> from flax import nnx
      >>> bag = jaxbag.nnx.EmbeddingBag(10, 4, mode="sum", rngs=nnx.Rngs(0))
      >>> bag(jnp.array([1, 2, 4, 5, 4]), jnp.array([0, 2])).shape
      (2, 4)
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        mode: Mode = "mean",
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        include_last_offset: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        embedding_init: common.Initializer = common.default_embed_init,
        rngs: nnx.Rngs,
        embedding_metadata: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        self.settings = common.BagSettings(
            num_embeddings=num_embeddings,
            features=features,
            mode=mode,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            include_last_offset=include_last_offset,
        ).checked()  # (a concrete max_norm / norm_type as Python floats)
        self.settings.check_dtypes(dtype, param_dtype)
        common.check_embedding_init(embedding_init, "jaxbag.nnx.EmbeddingBag")
        common.check_rngs(rngs, "jaxbag.nnx.EmbeddingBag(10, 4, rngs=nnx.Rngs(0))")
        if not isinstance(embedding_metadata, Mapping):
            raise TypeError(
                "embedding_metadata must be a mapping of nnx.Param metadata; got "
                f"embedding_metadata={embedding_metadata!r}. For example jaxbag.nnx.EmbeddingBag("
                "10, 4, embedding_metadata={'out_sharding': ('model', None)}, rngs=nnx.Rngs(0))."
            )
        self.dtype = dtype
        self.param_dtype = param_dtype
        init = common.table_init(embedding_init, padding_idx, num_embeddings)
        self.embedding: nnx.Variable = nnx.Param(
            init(rngs.params(), (num_embeddings, features), param_dtype), **embedding_metadata
        )

    @property
    def num_embeddings(self) -> int:
        """``V``, rows in the table."""
        return self.settings.num_embeddings

    @property
    def features(self) -> int:
        """``D``, the width of each row."""
        return self.settings.features

    # The settings, read-only as in linen (they live in ``settings``; assigning one is an error,
    # not an attribute the call would ignore).
    @property
    def mode(self) -> Mode:
        """``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``."""
        return self.settings.mode

    @property
    def padding_idx(self) -> int | None:
        """The row skipped in every bag, or ``None``."""
        return self.settings.padding_idx

    @property
    def max_norm(self) -> float | None:
        """The largest norm of a looked-up row, or ``None``."""
        return self.settings.max_norm

    @property
    def norm_type(self) -> float:
        """The p of the p-norm for ``max_norm``."""
        return self.settings.norm_type

    @property
    def scale_grad_by_freq(self) -> bool:
        """Whether each row's gradient is divided by its frequency in the batch."""
        return self.settings.scale_grad_by_freq

    @property
    def include_last_offset(self) -> bool:
        """Whether ``offsets`` has ``B + 1`` entries."""
        return self.settings.include_last_offset

    @property
    def frozen(self) -> bool:
        """Whether the table is a :class:`FrozenEmbedding` (no gradient reaches it)."""
        return isinstance(self.embedding, FrozenEmbedding)

    def __call__(
        self,
        indices: ArrayLike,
        offsets: ArrayLike | None = None,
        per_sample_weights: ArrayLike | None = None,
        *,
        segment_ids: ArrayLike | None = None,
        num_bags: int | None = None,
    ) -> Array:
        """Reduces each bag of ids; arguments and forms as :func:`jaxbag.embedding_bag`.

        Args:
          indices: ``int [N]`` (with ``offsets`` or ``segment_ids``) or ``int [B, L]``.
          offsets: ``int [B]`` bag starts (``[B+1]`` with ``include_last_offset``).
          per_sample_weights: optional ``float`` weights of ``indices``' shape.
          segment_ids: ``int [N]`` sorted bag of each id (with ``num_bags``).
          num_bags: static ``B`` for ``segment_ids``.

        Returns:
          ``[B, D]`` bags in ``dtype`` (or ``param_dtype``); empty bags are zeros.
        """
        return common.apply_bag(
            self.embedding[...],
            self.settings,
            dtype=self.dtype,
            freeze=self.frozen,
            indices=indices,
            offsets=offsets,
            per_sample_weights=per_sample_weights,
            segment_ids=segment_ids,
            num_bags=num_bags,
        )

    def attend(self, query: ArrayLike) -> Array:
        """Tied-weight logits: the inner product of each query vector with every row of the
        table, as ``flax.nnx.Embed.attend`` (an output layer sharing the input's embedding).

        The stored table is used as is: ``max_norm`` does not rescale its rows (renorm them
        first with ``jaxbag.renorm(table, jnp.arange(V), max_norm)`` if wanted), and the
        ``padding_idx`` row gets a logit as any other row (mask it if it must never be
        predicted) and, unlike in the bags, a gradient. A frozen table (a
        :class:`FrozenEmbedding`) gets none, as in ``__call__``.

        Args:
          query: ``float [..., D]`` (any leading shape).

        Returns:
          ``[..., V]`` logits ``query @ embedding.T``, in ``dtype`` (``None``: the table's
          dtype; query and table are both cast to it, as ``nnx.Embed.attend``).

        Raises:
          ValueError: ``query``'s last dimension is not ``D``.

        Examples:
          >>> import jax.numpy as jnp, jaxbag
          >>> from flax import nnx
          >>> bag = jaxbag.nnx.EmbeddingBag(10, 4, rngs=nnx.Rngs(0))
          >>> bag.attend(jnp.ones((2, 3, 4))).shape
          (2, 3, 10)
        """
        return common.attend(self.embedding[...], query, dtype=self.dtype, freeze=self.frozen)

    @classmethod
    def from_pretrained(
        cls, embeddings: ArrayLike, freeze: bool = True, **kwargs: Unpack[PretrainedOptions]
    ) -> EmbeddingBag:
        """A module holding ``embeddings [V, D]`` (torch's API).

        Args:
          embeddings: ``float [V, D]`` table (an array, or a torch tensor or parameter: copied).
          freeze: if true (default, as torch) the table is a :class:`FrozenEmbedding`, not an
            ``nnx.Param``: no gradient reaches it and optimizers leave it alone.
          **kwargs: the other constructor arguments (``mode``, ``padding_idx``,
            ``embedding_metadata``, ...); ``rngs`` is not needed. The padding row is not zeroed
            (as torch). ``num_embeddings``, ``features`` and ``embedding_init`` come from the
            table; torch's ``sparse=False`` is accepted, ``sparse=True`` refused (no module
            option: see ``embedding_bag_rows`` and the sparse optimisers).

        Returns:
          The module.

        Examples:
          >>> import jax.numpy as jnp, jaxbag
          >>> m = jaxbag.nnx.EmbeddingBag.from_pretrained(jnp.arange(6.0).reshape(3, 2), mode="sum")
          >>> m(jnp.array([0, 2]), jnp.array([0])).tolist()
          [[4.0, 6.0]]
        """
        validation.check_bool("freeze", freeze)
        table = common.check_pretrained(embeddings)
        options = common.pretrained_kwargs(kwargs, table.dtype)
        options.setdefault("rngs", nnx.Rngs(0))
        module = cls(
            table.shape[0],
            table.shape[1],
            embedding_init=common.pretrained_init(table),
            **options,
        )
        if freeze:  # (with the Param's metadata: embedding_metadata, sharding)
            module.embedding = FrozenEmbedding(
                module.embedding[...], **module.embedding.get_metadata()
            )
        return module

    @classmethod
    def from_torch(cls, source: Any, **overrides: Unpack[TorchOverrides]) -> EmbeddingBag:
        """Converts a torch ``nn.EmbeddingBag`` (or its ``state_dict``, or a weight) to NNX.

        Args:
          source: an ``nn.EmbeddingBag`` (settings and weight are read), its ``state_dict()``
            or a ``[V, D]`` weight tensor/array (give the settings in ``overrides``). The table
            is copied.
          **overrides: constructor arguments that replace or complete those read from ``source``;
            ``freeze=True`` gives a frozen table, as :meth:`from_pretrained`.

        Returns:
          A module, trainable (its ``embedding`` an ``nnx.Param``) unless ``freeze=True`` or
          ``source`` is an ``nn.EmbeddingBag`` whose weight has ``requires_grad=False`` (as after
          torch's ``from_pretrained(freeze=True)``).

        Warns:
          UserWarning: the torch module has ``sparse=True``, which no module option matches (the
            table's gradient is dense; see ``embedding_bag_rows`` for sparse row updates).

        Examples:
          >>> import torch, jaxbag
          >>> m = jaxbag.nnx.EmbeddingBag.from_torch(torch.nn.EmbeddingBag(4, 2, mode="sum"))
          >>> m.settings.mode, m.embedding[...].shape
          ('sum', (4, 2))
        """
        settings, table, extra = common.settings_from_torch(source, overrides)
        extra.setdefault("freeze", False)
        return cls.from_pretrained(table, **settings.op_kwargs(), **extra)

    def to_torch(self, *, sparse: bool = False) -> Any:
        """Builds the equivalent ``torch.nn.EmbeddingBag`` (imports torch).

        Args:
          sparse: torch's ``sparse`` flag for the new module (sparse table gradients in torch).

        Returns:
          A ``torch.nn.EmbeddingBag`` with the same settings and a copy of the table
          (``requires_grad=False`` when the table is frozen).

        Examples:
          >>> import jaxbag
          >>> from flax import nnx
          >>> t = jaxbag.nnx.EmbeddingBag(5, 3, mode="max", rngs=nnx.Rngs(0)).to_torch()
          >>> t.mode, tuple(t.weight.shape)
          ('max', (5, 3))
        """
        return common.make_torch_module(
            self.settings, jax.device_get(self.embedding[...]), freeze=self.frozen, sparse=sparse
        )
