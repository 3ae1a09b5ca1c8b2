"""Argument checks for :func:`jaxbag.embedding_bag`.

Two kinds of checks:

* *static* checks (dtypes, ranks, shapes, mode, option combinations) always run, at trace time too;
* *value* checks (ids in range, well-formed offsets, sorted segment ids) need concrete values. They run
  eagerly inside :func:`jaxbag.embedding_bag` when its inputs are concrete, and on demand under
  ``jit`` through :func:`validate`, which uses :func:`jax.experimental.checkify.check` for traced
  values (wrap the caller in :func:`jax.experimental.checkify.checkify`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, TypeGuard, cast, get_args, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.core import Tracer
from jax.experimental import checkify
from jax.typing import ArrayLike, DTypeLike

from jaxbag._src import explicit

__all__ = ["MODES", "Mode", "validate"]

#: The type of ``mode``: a bag reduction (type checkers then catch ``mode="avg"``; a ``str``
#: variable is checked when the call runs).
Mode = Literal["sum", "mean", "max", "sqrtn"]
#: The bag reductions ``mode`` accepts (:func:`jaxbag.embedding_bag`, the modules, ``TableConfig``).
MODES: tuple[Mode, ...] = get_args(Mode)

# The value checks take device arrays, and host copies of arrays split over an Explicit mesh.
_Values = Array | np.ndarray


def is_static_int(value: object, minimum: int | None = 0) -> TypeGuard[int | np.integer]:
    """Whether ``value`` is a Python or NumPy int (not a bool, not an array) ``>= minimum``
    (``minimum=None``: any int)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return False
    return minimum is None or bool(value >= minimum)


def static_int_hint(value: object) -> str:
    """A hint for a size given as an array (``jnp.int32(10)``, a 0-d NumPy array): sizes are
    static Python ints (they fix shapes), so ``int(...)`` of a concrete array is the fix."""
    if isinstance(value, (jax.Array, np.ndarray)):
        return " Sizes fix shapes, so they must be Python ints, not arrays: pass int(x)."
    return ""


def check_nonnegative(name: str, value: object, example: str, *, allowed: str = "a float >= 0",
                      integer: bool = False, maximum: float | None = None) -> float:
    """``float(value)`` if it is a real number (a Python or NumPy int with ``integer``; never a
    bool) in ``[0, maximum]``, else a ``TypeError`` (not a number) or ``ValueError`` (out of
    range, NaN) naming ``name``, the value, what is ``allowed`` and the correct call
    (``name=example``)."""
    types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    message = f"{name} must be {allowed}; got {value!r}, e.g. {name}={example}."
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(message)
    if not (float(value) >= 0 and (maximum is None or float(value) <= maximum)):  # (NaN too)
        raise ValueError(message)
    return float(value)


def check_bool(name: str, value: object) -> None:
    """Raises unless ``value`` is a Python or NumPy bool (or a concrete 0-d bool array): a flag
    given as a string (``"False"`` from a config file) or a number would otherwise switch the
    option on by its truthiness. A traced bool cannot choose the computation: refused too."""
    if isinstance(value, np.ndarray | jax.Array) and not isinstance(value, Tracer):
        if value.ndim == 0 and value.dtype == np.bool_:
            return  # a concrete 0-d bool array (np.array(True), jnp.bool_(True))
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{name} must be a bool (True or False); got {name}={value!r} of type "
            f"{type(value).__name__}. For example {name}=False."
        )


def check_float_dtype(name: str, value: object, example: str) -> None:
    """Raises unless ``value`` names a floating-point dtype; ``example`` is a correct call."""
    try:
        got = jnp.dtype(cast(Any, value))
    except TypeError:
        got = None
    if got is None or not jnp.issubdtype(got, jnp.floating):
        shown = repr(value) if got is None else got.name
        raise TypeError(
            f"{name} must be a floating-point dtype (float32, bfloat16, float16, float64, "
            f"float8_e4m3fn, ...); got "
            f"{name}={shown}. For example: {example}."
        )


def is_concrete(*xs: object) -> bool:
    """Whether none of ``xs`` is a tracer (i.e. their values are known now)."""
    return not any(isinstance(x, Tracer) for x in xs)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(
            f"mode must be one of {MODES}; got mode={mode!r}. For example mode='mean' (the "
            "average of each bag, torch's default) or mode='sum'."
        )


def check_options(mode: str, include_last_offset: bool, scale_grad_by_freq: bool) -> None:
    """Checks the options that do not depend on the input (the op's and the modules' settings)."""
    check_mode(mode)
    check_bool("include_last_offset", include_last_offset)
    check_bool("scale_grad_by_freq", scale_grad_by_freq)
    if scale_grad_by_freq and mode == "max":
        raise ValueError(
            "scale_grad_by_freq is not supported with mode='max' (as in torch): use mode='sum' or "
            "'mean', or scale_grad_by_freq=False."
        )


def check_norm(max_norm: float | None, norm_type: float) -> None:
    """Raises unless ``max_norm`` (or ``None``) and ``norm_type`` are real scalars, not NaN.

    Any sign is allowed, as in torch: ``max_norm <= 0`` scales every touched row to that norm
    (a negative one flips it), ``norm_type`` is torch's p (``0`` counts non-zeros, ``inf`` is the
    largest magnitude, ``-inf`` the smallest). Python, NumPy and concrete JAX scalars are
    checked; a traced ``max_norm`` (``jit`` over it) passes unchecked. ``norm_type`` must be
    static: it picks the norm's formula.
    """
    def number(value: Any) -> bool:
        if isinstance(value, (bool, np.bool_, str)) or np.ndim(value) != 0:
            return False
        if isinstance(value, Tracer):
            return True
        try:
            return not np.isnan(float(value))
        except (TypeError, ValueError):
            return False

    if isinstance(norm_type, Tracer):
        raise ValueError(
            "norm_type must be a static number: it picks the norm's formula (p = 0, inf, -inf "
            f"or another p); got a traced value, norm_type={norm_type!r}. Pass a Python float, "
            "e.g. jax.jit(f, static_argnames='norm_type') for a function f that takes it "
            "(max_norm may be traced)."
        )
    for name, value in (("max_norm", max_norm), ("norm_type", norm_type)):
        if (value is not None or name == "norm_type") and not number(value):
            raise ValueError(
                f"{name} must be a real number (not NaN){' or None' if name == 'max_norm' else ''}; "
                f"got {name}={value!r}. For example max_norm=1.0, norm_type=2.0 (the Euclidean norm)."
            )


def normalize_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    """Returns ``padding_idx`` in ``[0, V)`` (negative values count from the end, as torch)."""
    if padding_idx is None:
        return None
    if not is_static_int(padding_idx, None):
        raise TypeError(
            f"padding_idx must be a Python int or None; got {padding_idx!r} "
            f"of type {type(padding_idx).__name__}."
        )
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"padding_idx must be within [-{num_embeddings}, {num_embeddings}) for a table of "
            f"num_embeddings={num_embeddings}; got padding_idx={padding_idx}."
        )
    return int(padding_idx) % num_embeddings


def _check_static_num_bags(num_bags: object) -> None:
    """``num_bags`` is None or a Python / NumPy int (``True == 1`` and ``1.0 == 1``, so a bool or
    float would pass the comparison with ``B``)."""
    if num_bags is not None and not is_static_int(num_bags, None):
        raise ValueError(
            f"num_bags must be a static int or None; got num_bags={num_bags!r}. With offsets or "
            "2-D indices it is read from their shape: leave num_bags=None."
            + static_int_hint(num_bags)
        )


@overload
def as_ids(x: None) -> None: ...
@overload
def as_ids(x: ArrayLike) -> Array: ...
@overload
def as_ids(x: ArrayLike | None) -> Array | None: ...
def as_ids(x: ArrayLike | None) -> Array | None:
    """``x`` as an array of a signed integer dtype of at least 32 bits (``None`` stays).

    Ids, offsets and segment ids are compared with ``V``, ``N`` and ``B``, which an int8 / int16
    array cannot hold (``V = 40000`` wraps negative in int16 and masks every id out), and clipped
    to ``-1``, which an unsigned array cannot hold (``-1`` wraps to its largest value). Narrow
    dtypes are widened to int32; unsigned ones become the default int dtype (int32, or int64 with
    x64), values past its maximum clipped to it: they are out of range as ids, offsets and
    segment ids either way. Likewise NumPy int64 input without x64 is clipped to int32 (JAX's
    own conversion wraps it around). Float and bool arrays are left for :func:`require_int`.
    """
    if x is None:
        return None
    if isinstance(x, tuple) and type(x).__name__ == "PackedBags":  # (batching imports this module)
        raise TypeError(
            "got a jaxbag.PackedBags where an array of ids (or offsets, segment ids) was expected; "
            "pass its fields: embedding_bag(weight, pb.indices, segment_ids=pb.segment_ids, "
            "num_bags=pb.num_bags, per_sample_weights=pb.weights), or module(pb.indices, "
            "segment_ids=pb.segment_ids, num_bags=pb.num_bags)."
        )
    if type(x).__name__ == "JaggedFeatures":  # (jagged imports this module)
        raise TypeError(
            "got a jaxbag.JaggedFeatures where an array of ids was expected; a multi-feature "
            "batch goes to jaxbag.embedding_bag_collection / EmbeddingBagCollection. For one "
            "feature: ids, seg, w = jf.feature(key); embedding_bag(weight, ids, segment_ids=seg, "
            "num_bags=jf.batch_size, per_sample_weights=w), or module(ids, segment_ids=seg, "
            "num_bags=jf.batch_size)."
        )
    if not isinstance(x, jax.Array):
        try:
            a = np.asarray(x)
        except jax.errors.TracerArrayConversionError:  # a list holding traced values (under jit)
            pass
        else:
            if a.dtype == object and a.size:  # a Python int past int64 ([1, 2**70]) among them
                ints = (isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in a.flat)
                if all(ints):
                    # clipped, so it stays out of range (and is named as such)
                    info64 = np.iinfo(np.int64)
                    a = np.array([min(max(int(v), info64.min), info64.max) for v in a.flat],
                                 np.int64).reshape(a.shape)
                elif all(isinstance(v, (int, float, np.number)) for v in a.flat):
                    # with a float or bool: a float array, which require_int names
                    a = np.array([float(v) for v in a.flat]).reshape(a.shape)
            if a.dtype.kind in "iu" and a.dtype.itemsize > 4 and not jax.config.read("jax_enable_x64"):
                # jnp.asarray would cast int64 to int32 with wrap-around (a warning, then id
                # 2**32 + 1 reads row 1): clip first, so out of range stays out of range
                info = np.iinfo(np.int32)
                a = np.clip(a, info.min, info.max).astype(np.int32)
            x = a
    x = jnp.asarray(x)
    if x.size == 0 and jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.int32)  # [] (NumPy and JAX read it as float): no ids, not float ids
    if not jnp.issubdtype(x.dtype, jnp.integer):
        return x
    if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        target = jax.dtypes.canonicalize_dtype(jnp.int64)
        top = jnp.iinfo(target).max
        if jnp.iinfo(x.dtype).max > top:
            x = jnp.minimum(x, jnp.asarray(top, x.dtype))
        return x.astype(target)
    if jnp.iinfo(x.dtype).bits < 32:
        x = x.astype(jnp.int32)
    return x


def to_int32(x: Array, lo: int, hi: int, fill: int) -> Array:
    """``int32`` copy of an int array (from :func:`as_ids`); with int64 input (x64), values
    outside ``[lo, hi]`` become ``fill`` first, so an out-of-range id or segment id is never
    wrapped into range (``2**32 + 1`` would become ``1``)."""
    if x.dtype == jnp.int32:
        return x
    if jnp.dtype(x.dtype).itemsize > 4:
        x = jnp.where((x >= lo) & (x <= hi), x, jnp.asarray(fill, x.dtype))
    return x.astype(jnp.int32)


def require_int(name: str, x: Array) -> None:
    """Raises ``TypeError`` naming ``name`` unless ``x`` has an integer dtype."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer array; got dtype {x.dtype}. "
            f"Cast it first: {name}.astype(jnp.int32)."
        )


def check_table(table: Array | np.ndarray, name: str = "weight") -> None:
    """Raises unless ``table`` is a 2-D ``[V, D]`` floating-point array with ``V >= 1``."""
    # integer "weights": most likely ids passed first, in torch's F.embedding_bag order
    swapped = (
        f" Integer values look like ids: jaxbag takes the table first, embedding_bag({name}, "
        "indices, offsets), where torch's F.embedding_bag(input, weight, offsets) takes the "
        "ids first."
        if name == "weight" and jnp.issubdtype(table.dtype, jnp.integer) else ""
    )
    if table.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [V, D] (one row per id); got shape {table.shape}. A single row "
            f"of D features is {name}[None, :].{swapped}"
        )
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point table; got dtype {table.dtype}. Cast it first: "
            f"{name}.astype(jnp.float32).{swapped}"
        )
    if table.shape[0] == 0:  # (every id would be out of range; the gathers need a row)
        raise ValueError(
            f"{name} has no rows (shape {table.shape}): a table needs num_embeddings >= 1, e.g. "
            f"jnp.zeros((1, {table.shape[1]})) for a table whose ids are all padding."
        )


@dataclasses.dataclass(frozen=True)
class Layout:
    """The input form after static checks. ``num_bags`` is ``B``; ``ids_shape`` is indices' shape."""

    num_bags: int
    two_d: bool


def check_static(
    *,
    num_embeddings: int,
    indices: Array,
    offsets: Array | None,
    per_sample_weights: Array | None,
    segment_ids: Array | None,
    num_bags: int | None,
    include_last_offset: bool,
    mode: Mode,
    scale_grad_by_freq: bool = False,
) -> Layout:
    """Checks everything that does not need values; returns the number of bags."""
    check_options(mode, include_last_offset, scale_grad_by_freq)
    require_int("indices", indices)
    if indices.ndim == 2:
        if offsets is not None:
            raise ValueError(
                f"offsets must be None when indices is 2-D [B, L] = {indices.shape} (each row is a "
                f"bag); got offsets of shape {jnp.shape(offsets)}. Flatten instead: "
                "embedding_bag(weight, indices.reshape(-1), offsets, ...)."
            )
        if segment_ids is not None:
            raise ValueError(
                f"segment_ids must be None when indices is 2-D [B, L] = {indices.shape} (each row "
                "is a bag); pass 1-D indices with segment_ids instead."
            )
        _check_static_num_bags(num_bags)
        if num_bags is not None and num_bags != indices.shape[0]:
            raise ValueError(
                f"num_bags={num_bags!r} does not match 2-D indices of shape {indices.shape}; "
                "leave num_bags=None for 2-D input."
            )
        layout = Layout(num_bags=indices.shape[0], two_d=True)
    elif indices.ndim == 1:
        if offsets is not None and segment_ids is not None:
            raise ValueError(
                "pass either offsets or segment_ids (with num_bags), not both: "
                "embedding_bag(weight, indices, offsets) or "
                "embedding_bag(weight, indices, segment_ids=ids, num_bags=B)."
            )
        if offsets is not None:
            require_int("offsets", offsets)
            if offsets.ndim != 1:
                raise ValueError(
                    f"offsets must be 1-D [B] (or [B+1] with include_last_offset=True); got shape "
                    f"{offsets.shape}."
                )
            b = offsets.shape[0] - (1 if include_last_offset else 0)
            if b < 0:
                raise ValueError(
                    "include_last_offset=True needs at least one offset (the end of the last bag); "
                    "got an empty offsets array."
                )
            _check_static_num_bags(num_bags)
            if num_bags is not None and num_bags != b:
                raise ValueError(
                    f"num_bags={num_bags!r} does not match offsets of shape {offsets.shape} "
                    f"(include_last_offset={include_last_offset}, so B={b}); leave num_bags=None."
                )
            layout = Layout(num_bags=b, two_d=False)
        elif segment_ids is not None:
            require_int("segment_ids", segment_ids)
            if segment_ids.shape != indices.shape:
                raise ValueError(
                    f"segment_ids must have the shape of indices {indices.shape}; got "
                    f"{segment_ids.shape}."
                )
            if not is_static_int(num_bags, None):
                raise ValueError(
                    "segment_ids needs a static Python int num_bags (the number of bags B; ids >= B "
                    f"are dropped); got num_bags={num_bags!r}. For example: embedding_bag(weight, "
                    "indices, segment_ids=ids, num_bags=32)."
                )
            if num_bags < 0:
                raise ValueError(f"num_bags must be >= 0; got num_bags={num_bags}.")
            layout = Layout(num_bags=int(num_bags), two_d=False)
        else:
            raise ValueError(
                f"1-D indices of shape {indices.shape} need offsets (bag starts) or segment_ids with "
                "num_bags. For a single bag: embedding_bag(weight, indices, jnp.array([0])); or pass "
                "2-D indices [B, L] where each row is a bag."
            )
    else:
        raise ValueError(
            f"indices must be 1-D [N] (with offsets or segment_ids) or 2-D [B, L]; got shape "
            f"{indices.shape}."
        )
    if per_sample_weights is not None:
        if mode == "max":
            raise ValueError(
                "per_sample_weights is not supported with mode='max' (as in torch): use mode='sum', "
                "'mean' or 'sqrtn', or drop per_sample_weights."
            )
        if not jnp.issubdtype(per_sample_weights.dtype, jnp.floating):
            raise TypeError(
                "per_sample_weights must be a floating-point array; got dtype "
                f"{per_sample_weights.dtype}. Cast it first: per_sample_weights.astype(jnp.float32)."
            )
        if per_sample_weights.shape != indices.shape:
            raise ValueError(
                f"per_sample_weights must have the shape of indices {indices.shape}; got "
                f"{per_sample_weights.shape}."
            )
    return layout


@dataclasses.dataclass(frozen=True)
class _Problem:
    """A value check: ``bad`` is a scalar bool; ``args`` fill ``message`` when it is true."""

    error: type[Exception]
    bad: Array
    message: str
    args: Sequence[Array]


def _first(mask: _Values) -> Array:
    return jnp.argmax(mask).astype(jnp.int32)


def _decreasing(name: str, x: _Values, rule: str) -> _Problem:
    """The problem "``x[i] < x[i - 1]``" at the first such ``i`` (``x`` has >= 2 entries)."""
    dec = x[1:] < x[:-1]
    i = _first(dec) + 1
    return _Problem(
        ValueError,
        jnp.any(dec),
        f"{name}[{{}}] = {{}} is smaller than {name}[{{}}] = {{}}: {rule}",
        [i, x[i], i - 1, x[i - 1]],
    )


def _in_bags(
    n: int, offsets: _Values | None, segment_ids: _Values | None, num_bags: int,
    include_last_offset: bool,
) -> _Values | None:
    """``bool [N]``: the positions inside a bag (``None``: all). The ids elsewhere (segment id
    outside ``[0, B)``, past the last offset, every id when ``offsets`` is empty) are padding: never
    read, so never out of range."""
    if segment_ids is not None:
        return (segment_ids >= 0) & (segment_ids < num_bags)
    if offsets is not None and offsets.shape[0] == 0:  # no bag at all (as torch: no error)
        return jnp.zeros(n, dtype=bool)
    if offsets is not None and include_last_offset:
        return jnp.arange(n, dtype=offsets.dtype) < offsets[-1]
    return None


def _value_problems(
    num_embeddings: int,
    indices: _Values,
    offsets: _Values | None,
    segment_ids: _Values | None,
    *,
    num_bags: int,
    include_last_offset: bool,
    check_ids: bool = True,
) -> list[_Problem]:
    problems = []
    flat = indices.reshape(-1)
    n = flat.shape[0]
    if n > 0 and check_ids:
        out = (flat < 0) | (flat >= num_embeddings)
        in_bags = _in_bags(n, offsets, segment_ids, num_bags, include_last_offset)
        if in_bags is not None:
            out = out & in_bags
        pos = _first(out)
        if indices.ndim == 2:
            where = "indices[{}, {}] = {}"
            where_args = [pos // indices.shape[1], pos % indices.shape[1]]
        else:
            where = "indices[{}] = {}"
            where_args = [pos]
        problems.append(
            _Problem(
                IndexError,
                jnp.any(out),
                where + f" is out of range for a table of num_embeddings={num_embeddings}: ids must "
                f"satisfy 0 <= id < {num_embeddings}. (Under jit such ids are skipped, as padding_idx is.)",
                [*where_args, flat[pos]],
            )
        )
    if offsets is not None and offsets.shape[0] > 0:
        problems.append(
            _Problem(
                ValueError,
                offsets[0] != 0,
                "offsets[0] = {} but the first bag must start at 0: offsets[0] must be 0.",
                [offsets[0]],
            )
        )
    if offsets is not None and offsets.shape[0] > 1:
        problems.append(
            _decreasing(
                "offsets", offsets, "offsets must be non-decreasing (equal offsets make empty bags)."
            )
        )
    if offsets is not None and offsets.shape[0] > 0:
        past = offsets > n
        j = _first(past)
        problems.append(
            _Problem(
                ValueError,
                jnp.any(past),
                "offsets[{}] = {} is past the end of indices" + f" (N = {n}): offsets must be <= N.",
                [j, offsets[j]],
            )
        )
    if segment_ids is not None and n > 1:
        problems.append(
            _decreasing("segment_ids", segment_ids, "segment ids must be sorted (non-decreasing).")
        )
    return problems


def raise_value_problems(
    num_embeddings: int,
    indices: _Values,
    offsets: _Values | None,
    segment_ids: _Values | None,
    *,
    num_bags: int,
    include_last_offset: bool,
    check_ids: bool = True,
) -> None:
    """Raises the first value problem; inputs must be concrete (constants inside jit are).

    ``num_bags`` is ``B`` (:class:`Layout`); with ``include_last_offset``, ``offsets`` ends with
    the end of the last bag. ``check_ids=False`` leaves out the id range check (for callers that
    skip out-of-range ids by contract).
    """
    # Arrays on an Explicit mesh are checked as host copies (they are concrete here): slicing a
    # split one is a sharding type error, a reshard of a constant inside jit is traced, and
    # outside jax.set_mesh compile-time ops on them fail for want of the mesh.
    def host(x: _Values | None) -> _Values | None:
        return np.asarray(x) if explicit.on_explicit_mesh(x) else x

    indices = np.asarray(indices) if explicit.on_explicit_mesh(indices) else indices
    offsets, segment_ids = host(offsets), host(segment_ids)
    with jax.ensure_compile_time_eval():
        for p in _value_problems(num_embeddings, indices, offsets, segment_ids,
                                 num_bags=num_bags, include_last_offset=include_last_offset,
                                 check_ids=check_ids):
            if bool(p.bad):
                values = [int(a) for a in p.args]
                message = p.message.format(*values)
                if p.error is IndexError:
                    message += clipped_id_note(indices.dtype, values[-1])
                raise p.error(message)


def clipped_id_note(dtype: DTypeLike, value: int) -> str:
    """A note for an error that shows id ``value`` of an array of ``dtype``: ``""``, or, where the
    value may be :func:`as_ids`' clip of a wider or unsigned id, so: int32's bounds with x64 off,
    int64's with it on (uint64 ids, Python ints past int64)."""
    x64 = bool(jax.config.read("jax_enable_x64"))
    info = np.iinfo(np.int64) if x64 else np.iinfo(np.int32)
    if dtype != info.dtype or value not in (info.min, info.max):
        return ""
    if x64:
        return (
            f" ({value} may stand for a larger id: uint64 ids and Python ints past int64's range "
            "are clipped to it.)"
        )
    return (
        f" ({value} may stand for a larger id: without jax_enable_x64, int64 and unsigned ids "
        "past int32's range are clipped to it.)"
    )


def check_arguments(
    *,
    num_embeddings: int,
    indices: Array,
    offsets: Array | None,
    per_sample_weights: Array | None,
    segment_ids: Array | None,
    num_bags: int | None,
    include_last_offset: bool,
    mode: Mode,
    scale_grad_by_freq: bool = False,
    check_ids: bool = True,
) -> Layout:
    """:func:`check_static`, then the value checks when the values are known (concrete, also
    constants closed over inside ``jit``); returns the :class:`Layout`. ``check_ids`` as in
    :func:`raise_value_problems`."""
    layout = check_static(
        num_embeddings=num_embeddings, indices=indices, offsets=offsets,
        per_sample_weights=per_sample_weights, segment_ids=segment_ids, num_bags=num_bags,
        include_last_offset=include_last_offset, mode=mode, scale_grad_by_freq=scale_grad_by_freq,
    )
    if is_concrete(indices, offsets, segment_ids):
        raise_value_problems(num_embeddings, indices, offsets, segment_ids, num_bags=layout.num_bags,
                             include_last_offset=include_last_offset, check_ids=check_ids)
    return layout


def validate(
    num_embeddings: int,
    indices: ArrayLike,
    offsets: ArrayLike | None = None,
    *,
    mode: Mode = "mean",
    per_sample_weights: ArrayLike | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    segment_ids: ArrayLike | None = None,
    num_bags: int | None = None,
) -> None:
    """Checks the arguments of :func:`jaxbag.embedding_bag`, values included, eagerly or under jit.

    :func:`jaxbag.embedding_bag` already runs every check when its inputs are concrete. Under
    ``jit`` (or ``vmap``) values are unknown, so it only runs the static checks and treats bad ids
    safely (out-of-range ids are skipped: they never read a row). Call ``validate`` inside the
    jitted function and wrap it in :func:`jax.experimental.checkify.checkify` to have the value
    checks reported there.

    Args:
      num_embeddings: ``V``, the number of rows of the table.
      indices: ``int [N]`` or ``int [B, L]`` ids.
      offsets: optional ``int [B]`` (``[B+1]`` with ``include_last_offset``) bag starts.
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      per_sample_weights: optional ``float`` array of ``indices``' shape.
      padding_idx: optional padding row, in ``[-V, V)``.
      include_last_offset: whether ``offsets`` ends with the end of the last bag.
      segment_ids: optional sorted ``int [N]`` bag of each id (with ``num_bags``).
      num_bags: static number of bags for ``segment_ids``.

    Returns:
      ``None``; under ``jit`` the value checks are ``checkify`` checks of the caller.

    Raises:
      TypeError, ValueError, IndexError: eagerly, naming the argument and the first offending
        position. Under ``checkify.checkify`` the value problems are returned as its error instead.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag
      >>> from jax.experimental import checkify
      >>> def f(w, ids, offs):
      ...   jaxbag.validate(w.shape[0], ids, offs)
      ...   return jaxbag.embedding_bag(w, ids, offs)
      >>> err, _ = checkify.checkify(jax.jit(f))(jnp.ones((4, 2)), jnp.array([0, 9]), jnp.array([0]))
      >>> print(err.get().splitlines()[0])  # doctest: +ELLIPSIS
      indices[1] = 9 is out of range for a table of num_embeddings=4: ...
    """
    if not is_static_int(num_embeddings, 0):
        raise ValueError(
            f"num_embeddings must be a static int >= 0 (V, the table's rows); got "
            f"{num_embeddings!r}. For example: jaxbag.validate(weight.shape[0], indices, offsets)."
        )
    num_embeddings = int(num_embeddings)
    indices, offsets, segment_ids = as_ids(indices), as_ids(offsets), as_ids(segment_ids)
    per_sample_weights = None if per_sample_weights is None else jnp.asarray(per_sample_weights)
    normalize_padding_idx(padding_idx, num_embeddings)
    layout = check_static(
        num_embeddings=num_embeddings,
        indices=indices,
        offsets=offsets,
        per_sample_weights=per_sample_weights,
        segment_ids=segment_ids,
        num_bags=num_bags,
        include_last_offset=include_last_offset,
        mode=mode,
    )
    where: dict[str, Any] = dict(num_bags=layout.num_bags, include_last_offset=include_last_offset)
    if is_concrete(indices, offsets, segment_ids):
        raise_value_problems(num_embeddings, indices, offsets, segment_ids, **where)
        return
    for p in _value_problems(num_embeddings, indices, offsets, segment_ids, **where):
        checkify.check(jnp.logical_not(p.bad), p.message, *p.args)
