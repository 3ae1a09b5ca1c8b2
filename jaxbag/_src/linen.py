"""``jaxbag.EmbeddingBag``: the flax.linen module over :func:`jaxbag.embedding_bag`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Unpack

import jax.numpy as jnp
from flax import linen as nn
from jax import Array
from jax.typing import ArrayLike

from jaxbag._src import module_common as common
from jaxbag._src import validation
from jaxbag._src.validation import Mode

__all__ = ["EmbeddingBag"]


class PretrainedOptions(common.PretrainedOptions, total=False):
    """``from_pretrained``'s keyword arguments: the settings, and linen's ``name`` / ``parent``."""

    name: str | None
    parent: Any


class TorchOverrides(PretrainedOptions, total=False):
    """``from_torch``'s overrides: ``from_pretrained``'s keyword arguments and ``freeze``."""

    freeze: bool


class EmbeddingBag(nn.Module):
    """Bags of embeddings (flax.linen), like ``torch.nn.EmbeddingBag``.

    Legend: ``V`` = ``num_embeddings``, ``D`` = ``features``, ``N`` ids, ``B`` bags.

    Attributes:
      num_embeddings: ``V``, rows in the table.
      features: ``D``, the width of each row.
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      padding_idx: optional row skipped in every bag (negative counts from the end); initialised
        to zeros, as torch does.
      max_norm: optional; a looked-up row whose ``norm_type``-norm exceeds it is scaled down to
        it (torch's forward, see :func:`jaxbag.embedding_bag`). Unlike torch, the stored
        ``embedding`` is not renormed in place (JAX arrays are immutable): :func:`jaxbag.renorm`
        returns the renormed table. A NumPy or JAX scalar is stored as a Python float (the
        module stays hashable, as ``nn.jit`` and static ``jit`` arguments need).
      norm_type: the p of the p-norm for ``max_norm`` (stored as a Python float too).
      scale_grad_by_freq: divide each row's gradient by its frequency in the batch.
      include_last_offset: ``offsets`` has ``B + 1`` entries (torch's flag).
      freeze: if true no gradient reaches the table (``stop_gradient``); an optimizer with weight
        decay still needs the table masked out (``optax.masked``).
      dtype: the computation dtype (the table is cast to it); ``None`` keeps ``param_dtype``.
      param_dtype: the dtype of the ``embedding`` parameter (float64 needs ``jax_enable_x64``:
        without it JAX creates the table in float32, with a warning, as for ``nn.Embed``).
      embedding_init: initialiser of the ``[V, D]`` ``embedding`` parameter (flax's ``nn.Embed``
        default).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag
      >>> bag = jaxbag.EmbeddingBag(num_embeddings=10, features=4, mode="sum")
      >>> ids, offsets = jnp.array([1, 2, 4, 5, 4]), jnp.array([0, 2])
      >>> params = bag.init(jax.random.key(0), ids, offsets)
      >>> params["params"]["embedding"].shape
      (10, 4)
      >>> bag.apply(params, ids, offsets).shape
      (2, 4)
    """

    num_embeddings: int
    features: int
    mode: Mode = "mean"
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    include_last_offset: bool = False
    freeze: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: common.Initializer = common.default_embed_init

    @property
    def settings(self) -> common.BagSettings:
        """The options passed on to :func:`jaxbag.embedding_bag`."""
        return common.BagSettings(
            num_embeddings=self.num_embeddings,
            features=self.features,
            mode=self.mode,
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            include_last_offset=self.include_last_offset,
        )

    def __post_init__(self) -> None:
        # Settings that can never work raise when the module is built, not at its first init
        # (deep inside a parent model's), as the NNX module and the collections do.
        settings = self.settings.checked()
        # a concrete max_norm / norm_type as Python floats: every field must be hashable
        self.max_norm, self.norm_type = settings.max_norm, settings.norm_type
        settings.check_dtypes(self.dtype, self.param_dtype)
        validation.check_bool("freeze", self.freeze)
        common.check_embedding_init(self.embedding_init, "jaxbag.EmbeddingBag")
        super().__post_init__()

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            common.table_init(self.embedding_init, self.padding_idx, self.num_embeddings),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

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
            self.embedding,
            self.settings,
            dtype=self.dtype,
            freeze=self.freeze,
            indices=indices,
            offsets=offsets,
            per_sample_weights=per_sample_weights,
            segment_ids=segment_ids,
            num_bags=num_bags,
        )

    def attend(self, query: ArrayLike) -> Array:
        """Tied-weight logits: the inner product of each query vector with every row of the
        table, as ``flax.linen.Embed.attend`` (an output layer sharing the input's embedding).

        The stored table is used as is: ``max_norm`` does not rescale its rows (renorm them
        first with ``jaxbag.renorm(table, jnp.arange(V), max_norm)`` if wanted), the
        ``padding_idx`` row gets a logit as any other row (mask it if it must never be
        predicted) and, unlike in the bags, a gradient; with ``freeze`` no gradient reaches the
        table, as in ``__call__``.

        Args:
          query: ``float [..., D]`` (any leading shape).

        Returns:
          ``[..., V]`` logits ``query @ embedding.T``, in ``dtype`` (``None``: the table's
          ``param_dtype``; query and table are both cast to it, as ``nnx.Embed.attend``; linen's
          ``nn.Embed`` with ``dtype=None`` promotes to ``jnp.result_type(query, table)``, which
          differs for a query wider than the table, e.g. float32 against bfloat16).

        Raises:
          ValueError: ``query``'s last dimension is not ``D``.

        Examples:
          >>> import jax, jax.numpy as jnp, jaxbag
          >>> bag = jaxbag.EmbeddingBag(num_embeddings=10, features=4)
          >>> variables = bag.init(jax.random.key(0), jnp.ones((3, 4)), method="attend")
          >>> bag.apply(variables, jnp.ones((2, 3, 4)), method="attend").shape
          (2, 3, 10)
        """
        return common.attend(self.embedding, query, dtype=self.dtype, freeze=self.freeze)

    @classmethod
    def from_pretrained(
        cls, embeddings: ArrayLike, freeze: bool = True, **kwargs: Unpack[PretrainedOptions]
    ) -> EmbeddingBag:
        """A module whose ``embedding`` is initialised to ``embeddings [V, D]`` (torch's API).

        Args:
          embeddings: ``float [V, D]`` table (an array, or a torch tensor or parameter: copied).
          freeze: whether no gradient reaches the table (default true, as torch).
          **kwargs: the other attributes (``mode``, ``padding_idx``, ...). The padding row is not
            zeroed (as torch). ``num_embeddings``, ``features`` and ``embedding_init`` come from
            the table; torch's ``sparse=False`` is accepted, ``sparse=True`` refused (no module
            option: see ``embedding_bag_rows`` and the sparse optimisers).

        Returns:
          The module; ``module.init(key, ...)["params"]["embedding"]`` equals ``embeddings``.

        Note:
          The module's initialiser holds the table, so ``jax.jit(module.init)`` (or a parent
          model's jitted init) compiles it into the program as a constant: a 400,000 x 64
          float32 table gives a 205 MB HLO and a slow compilation (an eager ``module.init`` only
          copies it). For a big table skip the init: the variables are
          ``{"params": {"embedding": table}}`` (what :meth:`from_torch` returns). Inside a parent
          model, use a plain ``EmbeddingBag(V, D, freeze=True, ...)``, init the parent (jitted, or
          ``jax.eval_shape(model.init, ...)`` for the structure alone) and put the table at the
          bag's path in ``variables["params"]``.

        Examples:
          >>> import jax, jax.numpy as jnp, jaxbag
          >>> m = jaxbag.EmbeddingBag.from_pretrained(jnp.arange(6.0).reshape(3, 2), mode="sum")
          >>> ids, offsets = jnp.array([0, 2]), jnp.array([0])
          >>> m.apply(m.init(jax.random.key(0), ids, offsets), ids, offsets).tolist()
          [[4.0, 6.0]]
        """
        table = common.check_pretrained(embeddings)
        return cls(
            num_embeddings=table.shape[0],
            features=table.shape[1],
            freeze=freeze,
            embedding_init=common.pretrained_init(table),
            **common.pretrained_kwargs(kwargs, table.dtype),
        )

    @classmethod
    def from_torch(
        cls, source: Any, **overrides: Unpack[TorchOverrides]
    ) -> tuple[EmbeddingBag, dict]:
        """Converts a torch ``nn.EmbeddingBag`` (or its ``state_dict``, or a weight) to linen.

        Args:
          source: an ``nn.EmbeddingBag`` (settings and weight are read), its ``state_dict()``
            or a ``[V, D]`` weight tensor/array (give the settings in ``overrides``). The table
            is copied: later changes to the torch weight do not reach ``variables``.
          **overrides: module attributes that replace or complete those read from ``source``
            (``param_dtype`` defaults to the table's dtype as JAX holds it, float64 becoming
            float32 without x64; ``freeze`` to whether an
            ``nn.EmbeddingBag`` source's weight has ``requires_grad=False``, as after torch's
            ``from_pretrained(freeze=True)``, else false).

        Returns:
          ``(module, variables)`` with ``variables = {"params": {"embedding": table}}``; the
          module's initialiser gives the same table (``module.init`` inside a parent model).

        Warns:
          UserWarning: the torch module has ``sparse=True``, which no module option matches (the
            table's gradient is dense; see ``embedding_bag_rows`` for sparse row updates).

        Examples:
          >>> import torch, jax.numpy as jnp, jaxbag
          >>> t = torch.nn.EmbeddingBag(4, 2, mode="sum")
          >>> m, variables = jaxbag.EmbeddingBag.from_torch(t)
          >>> m.mode, variables["params"]["embedding"].shape
          ('sum', (4, 2))
        """
        settings, table, extra = common.settings_from_torch(source, overrides)
        extra.setdefault("freeze", False)
        module = cls.from_pretrained(table, **settings.op_kwargs(), **extra)
        # the initialiser's copy of the table: the variables never share memory with the source
        shape = (module.num_embeddings, module.features)
        table = module.embedding_init(None, shape, module.param_dtype)
        return module, {"params": {"embedding": table}}

    def to_torch(self, variables: Mapping[str, Any], *, sparse: bool = False) -> Any:
        """Builds the equivalent ``torch.nn.EmbeddingBag`` from ``variables`` (imports torch).

        Args:
          variables: the module's variables (``{"params": {"embedding": [V, D]}}``, as ``init``
            returns them), a float16/bfloat16/float32/float64 table of this module's shape.
          sparse: torch's ``sparse`` flag for the new module (sparse table gradients in torch).

        Returns:
          A ``torch.nn.EmbeddingBag`` with the same settings and a copy of the table
          (``requires_grad=False`` when the module is frozen).

        Examples:
          >>> import jax, jax.numpy as jnp, jaxbag
          >>> m = jaxbag.EmbeddingBag(5, 3, mode="max")
          >>> variables = m.init(jax.random.key(0), jnp.array([1]), jnp.array([0]))
          >>> t = m.to_torch(variables)
          >>> t.mode, tuple(t.weight.shape)
          ('max', (5, 3))
        """
        try:
            table = variables["params"]["embedding"]
        except (KeyError, TypeError, IndexError):
            got = (f"a mapping with keys {sorted(map(str, variables))}"
                   if isinstance(variables, Mapping) else f"an object of type {type(variables).__name__}")
            raise TypeError(
                "to_torch takes the module's variables, {'params': {'embedding': [V, D]}}, as "
                f"init returned them; got {got}. Call module.to_torch(variables), not "
                "module.to_torch(variables['params'])."
            ) from None
        table = nn.meta.unbox(table)  # (an nn.with_partitioning init's box)
        return common.make_torch_module(self.settings, table, freeze=self.freeze, sparse=sparse)
