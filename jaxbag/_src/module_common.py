"""What the linen and NNX ``EmbeddingBag`` modules share: settings, initialisers, the call."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax import Array
from jax.typing import ArrayLike

from jaxbag._src import validation
from jaxbag._src.ops import embedding_bag
from jaxbag._src.validation import Mode

Initializer = Any  # (key, shape, dtype) -> Array, as flax's initializers
_variance_scaling = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def default_embed_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """flax ``nn.Embed``'s default initialiser (variance scaling, fan-in, normal), as a
    module-level function so that tables and modules holding it can be pickled."""
    return _variance_scaling(key, shape, dtype)


@dataclasses.dataclass(frozen=True)
class BagSettings:
    """The options of an EmbeddingBag module that are passed on to :func:`jaxbag.embedding_bag`."""

    num_embeddings: int
    features: int
    mode: Mode = "mean"
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    include_last_offset: bool = False

    def check(self) -> None:
        """Raises on settings that can never work (before any parameter is created)."""
        for name in ("num_embeddings", "features"):
            value = getattr(self, name)
            if not validation.is_static_int(value, 1):
                raise ValueError(
                    f"{name} must be a positive int; got {name}={value!r}."
                    + validation.static_int_hint(value)
                )
        validation.check_options(self.mode, self.include_last_offset, self.scale_grad_by_freq)
        validation.check_norm(self.max_norm, self.norm_type)
        validation.normalize_padding_idx(self.padding_idx, self.num_embeddings)

    def checked(self) -> BagSettings:
        """:meth:`check`, then the settings with a concrete ``max_norm`` and ``norm_type`` as
        Python floats: a JAX or NumPy scalar there (``max_norm=jnp.array(1.0)``) made a linen
        module unhashable (``hash``, ``nn.jit``, a module as a static ``jit`` argument) and the
        NNX module's static settings hold an array. A traced ``max_norm`` is kept as given."""
        self.check()
        max_norm = self.max_norm
        if max_norm is not None and validation.is_concrete(max_norm):
            max_norm = float(max_norm)
        return dataclasses.replace(self, max_norm=max_norm, norm_type=float(self.norm_type))

    @staticmethod
    def check_dtypes(dtype: Any, param_dtype: Any) -> None:
        """Raises unless ``param_dtype`` (and ``dtype``, unless ``None``) is a float dtype: an int
        one failed inside flax's initialiser, a complex one only at the first call, both with
        messages that did not name the module's argument."""
        for name, value in (("param_dtype", param_dtype), ("dtype", dtype)):
            if value is not None or name == "param_dtype":
                validation.check_float_dtype(name, value, f"EmbeddingBag(..., {name}=jnp.bfloat16)")

    def op_kwargs(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["num_embeddings"], d["features"]
        return d


def _shown(value: Any) -> str:
    """``name=value`` as an error shows it: an array by its shape and dtype, not its values."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_embedding_init(init: Any, module: str) -> None:
    """Raises unless ``init`` is callable (``None`` or an array failed at init with
    "'NoneType' object is not callable", naming no argument). ``module`` names the class in the
    example (``"jaxbag.EmbeddingBag"``)."""
    if not callable(init):
        raise TypeError(
            "embedding_init must be an initialiser, a callable (key, shape, dtype) -> [V, D] "
            f"array; got embedding_init={_shown(init)} of type {type(init).__name__}. For example "
            f"{module}(10, 4, embedding_init=jax.nn.initializers.normal(0.02)), or leave it out "
            f"for Flax's Embed default; for a given table use {module}.from_pretrained(table)."
        )


def check_rngs(rngs: Any, call: str) -> None:
    """Raises unless ``rngs`` is an ``nnx.Rngs`` (an int or a key failed with "'int' object has
    no attribute 'params'"); ``call`` is a correct call, with ``rngs=nnx.Rngs(0)``."""
    if not isinstance(rngs, nnx.Rngs):
        hint = " (from a key: rngs=nnx.Rngs(key))" if isinstance(rngs, jax.Array) else ""
        raise TypeError(
            f"rngs must be an nnx.Rngs with a params stream; got rngs={_shown(rngs)} of type "
            f"{type(rngs).__name__}. For example {call}{hint}."
        )


def table_init(init: Initializer, padding_idx: int | None, num_embeddings: int) -> Initializer:
    """Wraps ``init``: the table it returns must have the requested ``[V, D]`` shape (a wrong one
    would make a module whose ``num_embeddings`` / ``features`` are not its table's), and the
    padding row starts at zero (as torch's EmbeddingBag). A :func:`pretrained_init` table is kept
    as given (it checks its shape; its padding row is not zeroed, as torch's ``from_pretrained``).
    """
    pad = validation.normalize_padding_idx(padding_idx, num_embeddings)
    if getattr(init, "pretrained", False):
        return init

    def wrapped(key, shape, dtype=jnp.float32):
        def fix(table):
            if isinstance(table, np.ndarray):  # an initialiser may return a NumPy array: as
                table = jnp.asarray(table, dtype)  # flax would, in the dtype it was asked for
            if table.shape != tuple(shape):
                raise ValueError(
                    f"embedding_init returned a table of shape {table.shape}; the module needs "
                    f"[num_embeddings, features] = {tuple(shape)}. Make the initialiser use the "
                    "shape it is given: embedding_init(key, shape, dtype)."
                )
            return table if pad is None else table.at[pad].set(0)

        value = init(key, shape, dtype)
        # An initialiser wrapped in nn.with_partitioning / nnx.with_partitioning (the Flax way to
        # shard a parameter) returns the array in a metadata box: fix the table inside the box.
        if isinstance(value, nn.Partitioned):  # linen (also nn.LogicallyPartitioned)
            # (no sharding constraint here: padding_idx must not change the init program)
            return value.replace_boxed(fix(value.unbox(apply_constraint=False)))
        if isinstance(value, nn.meta.AxisMetadata):  # other linen boxes
            return value.replace_boxed(fix(value.unbox()))
        if isinstance(value, nnx.VariableMetadata):  # nnx.with_partitioning / with_metadata
            return dataclasses.replace(value, raw_value=fix(value.raw_value))
        return fix(value)

    return wrapped


def is_metadata_box(value: Any) -> bool:
    """Whether an initialiser's result is a Flax metadata box (``nn.with_partitioning``,
    ``nnx.with_partitioning`` / ``with_metadata``) rather than an array."""
    return isinstance(value, (nn.meta.AxisMetadata, nnx.VariableMetadata))


def pretrained_init(table: Array) -> Initializer:
    """An initialiser that returns a fresh copy of ``table`` (from :func:`check_pretrained`),
    checking the shape and casting to the param dtype: donating what ``init`` returned must not
    delete the table the next ``init`` reads.

    Its padding row is not zeroed (:func:`table_init` leaves it alone).
    """

    return _PretrainedInit(table)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: compared and hashed by identity
class _PretrainedInit:
    """:func:`pretrained_init`'s initialiser: a module-level class, not a closure, so that linen
    modules built by ``from_pretrained`` / ``from_torch`` can be pickled."""

    table: Array = dataclasses.field(repr=False)  # (not printed in every module's repr)
    pretrained = True  # read by table_init: the padding row is kept as given

    def __call__(self, key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        del key
        if tuple(shape) != self.table.shape:
            raise ValueError(
                f"pretrained embeddings have shape {self.table.shape}, expected {shape}."
            )
        return jnp.array(self.table, dtype, copy=True)


def check_pretrained(embeddings: ArrayLike) -> Array:
    """``embeddings`` (an array, or a torch tensor or parameter) as a JAX ``[V, D]`` table, or a
    clear error. Always a copy (the caller may donate or delete its array); a JAX array (a tracer
    too, inside ``jit`` or ``eval_shape``) is copied as a JAX array, never read back into NumPy."""
    if _is_torch_tensor(embeddings):
        table = torch_to_numpy(embeddings)
    elif isinstance(embeddings, jax.Array):
        table = embeddings
    else:
        table = np.asarray(embeddings)
    if table.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D [V, D]; got shape {table.shape}. For example "
            "EmbeddingBag.from_pretrained(jnp.ones((num_embeddings, features)))."
        )
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise TypeError(
            f"embeddings must be a floating-point table; got dtype {table.dtype}. Cast it first "
            "(an array or a nested list alike): EmbeddingBag.from_pretrained("
            "jnp.asarray(embeddings, jnp.float32)); a torch tensor: embeddings.float()."
        )
    return jnp.array(table, copy=True)


class PretrainedOptions(TypedDict, total=False):
    """The keyword arguments both modules' ``from_pretrained`` take (typed for type checkers):
    the module's settings. ``num_embeddings``, ``features`` and ``embedding_init`` come from the
    table; ``sparse`` is torch's flag (``False`` is accepted, ``True`` refused)."""

    mode: Mode
    padding_idx: int | None
    max_norm: float | None
    norm_type: float
    scale_grad_by_freq: bool
    include_last_offset: bool
    dtype: Any
    param_dtype: Any
    sparse: bool


def pretrained_kwargs(kwargs: Mapping[str, Any], table_dtype: Any) -> dict[str, Any]:
    """The constructor arguments of ``from_pretrained`` / ``from_torch``, ``param_dtype``
    defaulting to the table's ``table_dtype``. Refuses what they take from the table itself,
    and torch's ``sparse=True`` (``sparse=False``, torch's default, is dropped: it changes
    nothing)."""
    for name in ("num_embeddings", "features", "embedding_init"):
        if name in kwargs:
            raise TypeError(
                f"{name} comes from the table (embeddings [V, D]); got {name}={kwargs[name]!r} "
                "as well. Drop it, or slice or pad the table first."
            )
    options = {name: value for name, value in kwargs.items() if name != "sparse"}
    sparse = kwargs.get("sparse", False)
    validation.check_bool("sparse", sparse)
    if sparse:
        raise ValueError(f"sparse=True: {_SPARSE_NOTE}")
    options.setdefault("param_dtype", table_dtype)
    return options


_SPARSE_NOTE = (
    "torch's sparse gradients have no module option in jaxbag: jax.grad of a module gives the "
    "table a dense [V, D] gradient. For updates that touch only the rows a batch reads, train "
    "with jaxbag.embedding_bag_rows and a sparse optimiser (jaxbag.sparse_adam, ...; README: "
    "'Sparse row updates'). to_torch(..., sparse=True) sets the flag on the way back."
)


def _is_torch_tensor(x: object) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "numpy")


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A NumPy view of a torch tensor (detached, on the CPU; bf16 exactly, through float32, a
    copy): :func:`check_pretrained` copies it into JAX, so later in-place changes in torch (an
    optimizer step, ``max_norm``) do not reach the module."""
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: go through float32
        return tensor.float().numpy().astype(jnp.bfloat16)  # (exact both ways)
    return tensor.numpy()


def apply_bag(
    table: Array,
    settings: BagSettings,
    *,
    dtype: Any,
    freeze: bool,
    indices: ArrayLike,
    offsets: ArrayLike | None,
    per_sample_weights: ArrayLike | None,
    segment_ids: ArrayLike | None,
    num_bags: int | None,
) -> Array:
    """The forward pass of both modules: cast, maybe stop the gradient, call the op."""
    if freeze:
        table = jax.lax.stop_gradient(table)
    if dtype is not None:
        table = table.astype(dtype)
    return embedding_bag(
        table,
        indices,
        offsets,
        per_sample_weights=per_sample_weights,
        segment_ids=segment_ids,
        num_bags=num_bags,
        **settings.op_kwargs(),
    )


def attend(table: Array, query: ArrayLike, *, dtype: Any, freeze: bool) -> Array:
    """Both modules' ``attend``: ``query [..., D] @ table.T -> [..., V]``, as Flax's
    ``Embed.attend``, on the stored table as is (no ``max_norm``, the padding row a row as any
    other).

    ``query`` and the table are cast to ``dtype`` (``None``: the table's dtype, as ``nnx.Embed``;
    linen's ``nn.Embed`` with ``dtype=None`` takes ``jnp.result_type(query, table)`` instead,
    which differs only for a query of a wider dtype than the table). A frozen table gets no
    gradient, as in the bags.
    """
    query = jnp.asarray(query)
    features = table.shape[1]
    if query.ndim == 0 or query.shape[-1] != features:
        raise ValueError(
            f"query must be [..., features] = [..., {features}] (a vector per position, as wide "
            f"as the table's rows); got query of shape {tuple(query.shape)}. For example "
            f"bag.attend(jnp.ones((2, {features}))) gives [2, num_embeddings] logits."
        )
    if freeze:
        table = jax.lax.stop_gradient(table)
    dtype = table.dtype if dtype is None else dtype
    return jnp.dot(jnp.asarray(query, dtype), jnp.asarray(table, dtype).T)


# ----------------------------------------------------------------------------- torch interop
# Duck-typed so that torch is only imported when a torch module is actually built.


def settings_from_torch(
    source: Any, overrides: Mapping[str, Any]
) -> tuple[BagSettings, np.ndarray, dict[str, Any]]:
    """Reads the table (and, for a module, the settings) of a torch ``nn.EmbeddingBag``.

    ``source`` is an ``nn.EmbeddingBag``, its ``state_dict()`` (a mapping with ``"weight"``), a
    weight tensor, or a NumPy array; ``overrides`` give or replace settings. Returns the settings,
    the table (possibly a view of the source: ``from_pretrained`` copies it), and the overrides
    that are not settings (``dtype``, ``freeze``, ...).
    """
    settings: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if hasattr(source, "embedding_dim") and not hasattr(source, "mode"):
        raise TypeError(
            f"from_torch converts a torch.nn.EmbeddingBag; got a {type(source).__name__}. For an "
            "nn.Embedding, pass its weight and the settings: from_torch(emb.weight, mode='mean', "
            "padding_idx=emb.padding_idx)."
        )
    is_module = hasattr(source, "state_dict") and hasattr(source, "parameters")
    if is_module and not (hasattr(source, "embedding_dim") and hasattr(source, "weight")):
        raise TypeError(
            f"from_torch converts a torch.nn.EmbeddingBag, its state_dict() or a [V, D] weight; "
            f"got a {type(source).__name__}. For a bag inside a larger model, pass the bag "
            "itself: from_torch(model.bag)."
        )
    if is_module:
        settings = {
            "mode": source.mode,
            "padding_idx": source.padding_idx,
            "max_norm": source.max_norm,
            "norm_type": float(source.norm_type),
            "scale_grad_by_freq": bool(source.scale_grad_by_freq),
            "include_last_offset": bool(source.include_last_offset),
        }
        weight = source.weight
        # a frozen torch table (from_pretrained(freeze=True)) stays frozen, as to_torch maps back
        extra["freeze"] = not bool(source.weight.requires_grad)
        if getattr(source, "sparse", False):
            warnings.warn(f"the torch module has sparse=True: {_SPARSE_NOTE}", stacklevel=3)
    elif isinstance(source, Mapping):
        if "weight" not in source:
            raise KeyError(
                f"a torch EmbeddingBag state_dict has a 'weight' entry; got keys {sorted(source)}."
            )
        weight = source["weight"]
    else:
        weight = source
    if _is_torch_tensor(weight):
        table = torch_to_numpy(weight)
    elif weight is None or isinstance(weight, (str, bytes)):
        table = np.asarray(0.0)  # the 2-D check below names it
    else:
        table = np.asarray(weight)  # from_pretrained's check_pretrained copies it
    if table.ndim != 2:
        raise ValueError(
            f"the torch weight must be 2-D [V, D]; got shape {table.shape} from a "
            f"{type(weight).__name__}. from_torch takes a torch.nn.EmbeddingBag, its state_dict() "
            "or a [V, D] weight."
        )
    names = {f.name for f in dataclasses.fields(BagSettings)}
    pretrained_kwargs(overrides, table.dtype)  # its checks, before BagSettings sees a bad name
    settings.update({k: v for k, v in overrides.items() if k in names})
    extra.update({k: v for k, v in overrides.items() if k not in names})
    return BagSettings(table.shape[0], table.shape[1], **settings), table, extra


def make_torch_module(
    settings: BagSettings, table: ArrayLike, *, freeze: bool = False, sparse: bool = False
) -> Any:
    """Builds a ``torch.nn.EmbeddingBag`` with ``settings`` and the weight ``table`` (imports torch);
    a frozen table becomes a weight with ``requires_grad=False``, as torch's ``freeze=True``."""
    validation.check_bool("sparse", sparse)
    if settings.mode == "sqrtn":
        raise ValueError("torch's EmbeddingBag has no mode='sqrtn'; use 'sum', 'mean' or 'max'.")
    arr = np.asarray(table)
    want = (settings.num_embeddings, settings.features)
    if arr.shape != want:
        raise ValueError(
            f"the table has shape {arr.shape}, but the module has num_embeddings={want[0]}, "
            f"features={want[1]}: convert the module with a table of its own shape."
        )
    if arr.dtype not in (np.float16, np.float32, np.float64, jnp.bfloat16):
        raise TypeError(
            f"torch's EmbeddingBag needs a float16, bfloat16, float32 or float64 table; got "
            f"{arr.dtype}. Cast it first, e.g. table.astype(jnp.float32)."
        )
    try:
        import torch  # noqa: PLC0415  (only when asked for)
    except ImportError as e:
        raise ImportError(
            "to_torch needs PyTorch, which jaxbag does not install: pip install torch (for the CPU "
            "build: pip install torch --index-url https://download.pytorch.org/whl/cpu)."
        ) from e

    if arr.dtype == jnp.bfloat16:  # torch.from_numpy knows no bfloat16
        weight = torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
    else:
        weight = torch.from_numpy(np.array(arr))
    return torch.nn.EmbeddingBag.from_pretrained(
        weight,
        freeze=freeze,
        mode=settings.mode,
        padding_idx=settings.padding_idx,
        max_norm=settings.max_norm,
        norm_type=settings.norm_type,
        scale_grad_by_freq=settings.scale_grad_by_freq,
        include_last_offset=settings.include_last_offset,
        sparse=sparse,
    )
