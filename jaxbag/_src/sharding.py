"""Row-sharded EmbeddingBag on a device mesh (``jax.sharding`` + ``jax.shard_map``).

Legend: ``V`` table rows, ``D`` features, ``N`` ids, ``B`` bags, ``L`` ids per bag (2-D form),
``n`` shards of the table (the size of ``axis_name``), ``R = V / n`` rows per shard.

The table lives row-sharded, ``NamedSharding(mesh, P(axis_name, None))``: shard ``i`` holds rows
``[i R, (i + 1) R)``. Every shard sees the ids of the bags it works on, reads only its own rows and
reduces them to partial bags; the partial bags are combined over ``axis_name``::

       ids (replicated over axis_name)        table rows                    bags
                                          dev 0: [  0,  R)  -> partial sums  \\
       [4 1 | | 2 2 7] ---- mask to ----> dev 1: [  R, 2R)  -> partial sums   +-- psum --> [B, D]
                           own rows       ...                                /   (pmax for max)
                                          dev n-1            -> partial sums

Only ``[B, D]`` partial bags travel (an all-reduce over ``axis_name``), never table rows; the
gradient of each shard's rows is computed on that shard. ``mean``/``sqrtn`` divide by counts every
shard computes itself from the ids. ``max`` takes the per-shard max, ``pmax``, then the shard
holding the first position of the maximum in the bag (``pmin`` of positions) alone contributes
its row, so the gradient reaches exactly the row the single-device op picks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxbag._src import bag_terms, ops, segments, sparse, validation
from jaxbag._src.dtypes import acc_dtype
from jaxbag._src.validation import Mode

__all__ = [
    "AxisName",
    "axis_size",
    "embedding_bag",
    "embedding_bag_in_shard_map",
    "embedding_bag_rows",
    "pad_rows",
    "shard_table",
    "sparse_init",
    "sparse_update",
]

AxisName = str | tuple[str, ...]


def axis_tuple(axis: AxisName | None) -> tuple[str, ...]:
    """``axis`` as a tuple of mesh axis names (``()`` for ``None``); raises ``TypeError`` for
    anything else than a name or a sequence of names."""
    if axis is None:
        return ()
    if isinstance(axis, str):
        return (axis,)
    axes = tuple(axis) if isinstance(axis, Sequence) else None
    if axes is None or not all(isinstance(a, str) for a in axes):
        raise TypeError(
            f"a mesh axis (axis_name, batch_axis) must be a name or a tuple of names (str); got "
            f"{axis!r}, e.g. axis_name='model' or axis_name=('data', 'model')."
        )
    return axes


def spec_entry(axis: AxisName | None) -> str | tuple[str, ...] | None:
    """The ``PartitionSpec`` entry that shards one dimension over ``axis``."""
    axes = axis_tuple(axis)
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def axis_size(mesh: Mesh, axis: AxisName | None) -> int:
    """The number of devices along ``axis`` (a name or a tuple of names) of ``mesh``.

    Args:
      mesh: a ``jax.sharding.Mesh``.
      axis: a mesh axis name, a tuple of them, or ``None`` (size 1).

    Returns:
      The product of the sizes of the named axes.

    Raises:
      ValueError: ``axis`` names a mesh axis more than once (its devices would count twice).

    Examples:
      >>> import jax, jaxbag.sharding
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> jaxbag.sharding.axis_size(mesh, "model")
      1
    """
    axes = axis_tuple(axis)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise ValueError(
            f"axis={axis!r}: {unknown[0]!r} is not an axis of the mesh, whose axes are "
            f"{tuple(mesh.shape)}; e.g. axis={tuple(mesh.shape)[-1]!r}."
        )
    check_unique_axes("axis", axis, axes)
    return math.prod(int(mesh.shape[a]) for a in axes)


def check_unique_axes(name: str, axis: object, axes: tuple[str, ...]) -> None:
    """Raises unless the mesh axes ``axes`` (of the argument ``name`` = ``axis``) are distinct: a
    repeated axis would count its devices twice (and JAX refuses the ``PartitionSpec`` later)."""
    repeated = [a for i, a in enumerate(axes) if a in axes[:i]]
    if repeated:
        once = tuple(dict.fromkeys(axes))
        raise ValueError(
            f"{name}={axis!r} names mesh axis {repeated[0]!r} more than once; name each axis "
            f"once, e.g. {name}={once[0] if len(once) == 1 else once!r}."
        )


def check_axes(mesh: Mesh, axis_name: AxisName, batch_axis: AxisName | None) -> None:
    """Raises if the axes are unknown to ``mesh``, repeated or overlap."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}. Build one with "
            "jax.make_mesh((2, 4), ('data', 'model'))."
        )
    rows, batch = axis_tuple(axis_name), axis_tuple(batch_axis)
    if not rows:
        raise ValueError(
            f"axis_name must name at least one mesh axis; got axis_name={axis_name!r}, e.g. "
            f"axis_name={tuple(mesh.shape)[-1]!r}."
        )
    for name, value, axes in (("axis_name", axis_name, rows), ("batch_axis", batch_axis, batch)):
        for a in axes:
            if a not in mesh.shape:
                # (the batch over an axis the rows are not split over)
                free = [m for m in mesh.shape if name == "axis_name" or m not in rows]
                example = (free or list(mesh.shape))[-1 if name == "axis_name" else 0]
                raise ValueError(
                    f"{name}={a!r} is not an axis of the mesh, whose axes are "
                    f"{tuple(mesh.shape)}; e.g. {name}={example!r}."
                )
        check_unique_axes(name, value, axes)
    if set(rows) & set(batch):
        raise ValueError(
            f"axis_name={axis_name!r} and batch_axis={batch_axis!r} must be different mesh axes "
            "(rows are split over one, the batch over the other)."
        )
    types = set(mesh.axis_types)
    if len(types) > 1:
        raise ValueError(
            f"mesh axes must be all Auto or all Explicit; got axis_types={mesh.axis_types}."
        )


def check_divisible_rows(what: str, num_rows: int, mesh: Mesh, axis_name: AxisName) -> None:
    """Raises unless ``num_rows`` splits evenly over the devices of ``axis_name``."""
    n = axis_size(mesh, axis_name)
    if num_rows % n:
        raise ValueError(
            f"{what} has V={num_rows} rows, not divisible by the {n} devices of axis_name="
            f"{axis_name!r}; pad the table once with jaxbag.sharding.pad_rows(weight, {n}) (ids "
            "stay the same)."
        )


def check_split_rows(
    row_grads: sparse.RowGrads, mesh: Mesh, axis_name: AxisName, *, what: str = "row_grads",
    source: str = "jaxbag.sharding.embedding_bag_rows' pullback",
) -> None:
    """Raises unless ``row_grads`` hold per-shard local rows split over ``axis_name`` (their
    shape; eagerly also their placement): global row numbers would update the wrong rows. (On a
    one-device axis the two cannot be told apart, and need not be: local rows are global.)"""
    n = axis_size(mesh, axis_name)
    split = NamedSharding(mesh, P(spec_entry(axis_name)))
    rows = row_grads.rows
    placed = getattr(rows, "sharding", None) if validation.is_concrete(rows) else None
    if rows.ndim != 1 or rows.shape[0] % n or (
        isinstance(placed, NamedSharding) and not placed.is_equivalent_to(split, 1)
    ) or (n > 1 and isinstance(placed, jax.sharding.SingleDeviceSharding)):
        raise ValueError(
            f"{what} must hold per-shard local rows split over axis_name={axis_name!r} ({n} "
            f"devices), as {source} returns them; got rows of shape {tuple(rows.shape)} placed "
            f"{getattr(rows, 'sharding', 'unknown')}. (Row gradients of an unsharded table hold "
            "global row numbers: they would update the wrong rows.)"
        )


def is_explicit(mesh: Mesh) -> bool:
    """Whether every axis of ``mesh`` is Explicit (shardings are part of the array types)."""
    return bool(mesh.axis_types) and all(t == AxisType.Explicit for t in mesh.axis_types)


def place(x: Any, mesh: Mesh, spec: Any) -> Any:
    """Puts ``x`` (a pytree) on ``spec`` for ``shard_map``; needed only for Explicit meshes."""
    if is_explicit(mesh):
        return jax.tree.map(
            lambda a, s: a if a is None else jax.reshard(a, NamedSharding(mesh, s)),
            x,
            spec,
            is_leaf=lambda a: a is None,
        )
    return x


def shard_map_call(fn: Any, mesh: Mesh, in_specs: Any, out_specs: Any, *args: Any) -> Any:
    """``jax.shard_map(fn, ...)(*args)`` inside a ``jax.jit``.

    Called eagerly, the body is then compiled once per call instead of dispatched op by op on
    every device (seconds per call), and the results are placed in the form a jitted step
    returns them (:func:`canonical_spec`), so feeding them to one does not compile it twice.
    Under an outer ``jit`` the inner one is inlined.
    """
    out = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))(*args)
    if not validation.is_concrete(*jax.tree.leaves(args)):
        return out
    return jax.tree.map(
        lambda spec, x: jax.device_put(x, NamedSharding(mesh, canonical_spec(mesh, spec, x.ndim))),
        out_specs,
        out,
        is_leaf=lambda x: isinstance(x, P),
    )


def canonical_spec(mesh: Mesh, spec: P, ndim: int) -> P:
    """The form of ``spec`` (for an ``ndim``-dimensional array) that a jitted step returns.

    jaxbag places the arrays it creates (:func:`shard_table`, :func:`sparse_init`,
    :func:`jaxbag.init_collection`, the collection modules) in this form, so they round-trip
    through a jitted training step without a second compilation (a mesh that mixes Explicit
    and Auto axes counts as Auto here, as in :func:`place`). On an Explicit mesh the array
    types keep the spec, padded to ``ndim`` entries (``P('model', None)``, ``P(None, None)``).
    On an Auto mesh a step that mixes placements reads them back from the compiled program,
    which knows neither mesh axes of size 1 (they split nothing) nor trailing unsplit
    dimensions: ``P('model', None)`` comes back as ``P('model')``, and as ``P()`` on a
    one-device ``model`` axis.
    """
    entries = list(spec) + [None] * (ndim - len(spec))
    if is_explicit(mesh):
        return P(*entries)
    kept_entries = []
    for entry in entries:
        kept = tuple(a for a in axis_tuple(entry) if mesh.shape[a] > 1)
        kept_entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    while kept_entries and kept_entries[-1] is None:
        kept_entries.pop()
    return P(*kept_entries)


def constrain(x: Any, mesh: Mesh, spec: Any) -> Any:
    """Pins ``x`` (a pytree) to ``spec`` on any mesh: ``jax.reshard`` (Explicit axes), else a
    sharding constraint (so a jitted step returns what it was given: no recompile)."""
    if is_explicit(mesh):
        return place(x, mesh, spec)
    return jax.tree.map(
        lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, s)), x, spec
    )


def shard_table(weight: ArrayLike, mesh: Mesh, axis_name: AxisName) -> Array:
    """Places ``weight [V, D]`` row-sharded: ``NamedSharding(mesh, P(axis_name, None))``.

    (On an Auto-axes mesh in the equivalent form ``P(axis_name)`` a jitted step returns: see
    :func:`table_shardings`.)

    Args:
      weight: ``float [V, D]``; ``V`` must be divisible by the size of ``axis_name`` (see
        :func:`pad_rows`).
      mesh: the device mesh.
      axis_name: the mesh axis (or tuple of axes) the rows are split over.

    Returns:
      The table as a ``jax.Array`` whose shard ``i`` holds rows ``[i V/n, (i+1) V/n)``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag.sharding
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> w = jaxbag.sharding.shard_table(jnp.ones((8, 2)), mesh, "model")
      >>> w.sharding.spec
      P('model', None)
    """
    weight = jnp.asarray(weight)
    check_axes(mesh, axis_name, None)
    n = axis_size(mesh, axis_name)
    if weight.ndim != 2 or weight.shape[0] % n:
        raise ValueError(
            f"weight must be [V, D] with V divisible by the {n} shards of axis_name="
            f"{axis_name!r}; got shape {weight.shape}. Pad it: "
            f"jaxbag.sharding.pad_rows(weight, {n})."
        )
    return jax.device_put(weight, table_shardings(mesh, axis_name))


def pad_rows(weight: ArrayLike, multiple: int) -> Array:
    """Appends zero rows to ``weight [V, D]`` so that its row count is a multiple of ``multiple``.

    The new rows ``[V, V')`` are never looked up by valid ids (``< V``); pass ids as before.

    Args:
      weight: ``float [V, D]`` (or any ``[V, ...]``, e.g. an optimizer's per-row state).
      multiple: the number of shards, an ``int >= 1``.

    Returns:
      ``[V', D]`` with ``V' = ceil(V / multiple) * multiple``.

    Examples:
      >>> import jax.numpy as jnp, jaxbag.sharding
      >>> jaxbag.sharding.pad_rows(jnp.ones((10, 2)), 4).shape
      (12, 2)
    """
    weight = jnp.asarray(weight)
    if not validation.is_static_int(multiple, 1):
        raise ValueError(
            f"multiple must be an int >= 1 (the number of shards); got {multiple!r}, e.g. "
            "pad_rows(weight, jaxbag.sharding.axis_size(mesh, 'model'))."
            + validation.static_int_hint(multiple)
        )
    if weight.ndim == 0:
        raise ValueError("weight must have rows ([V, D], or [V] per-row state); got a scalar.")
    extra = -weight.shape[0] % int(multiple)
    if extra == 0:
        return weight
    return jnp.concatenate([weight, jnp.zeros((extra, *weight.shape[1:]), weight.dtype)], axis=0)


def embedding_bag_in_shard_map(
    local_weight: Array,
    indices: Array,
    segment_ids: Array,
    *,
    num_bags: int,
    num_embeddings: int,
    axis_name: AxisName,
    mode: Mode = "mean",
    per_sample_weights: Array | None = None,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    inverse_freq: Array | None = None,
    valid: Array | None = None,
    owned: Array | None = None,
) -> Array:
    """The row-sharded bag reduction, to be called *inside* ``jax.shard_map``.

    Legend: ``R`` rows on this shard, ``D`` features, ``N`` ids, ``B`` bags.

    This shard holds the rows ``[i R, (i + 1) R)`` of the ``[n R, D]`` table, ``i`` being its
    index along ``axis_name``. It reduces the ids that fall in its rows and combines the partial
    bags with ``psum`` (``pmax``/``pmin`` for ``max``) over ``axis_name``; the result is the same
    on every shard of ``axis_name`` and equals :func:`jaxbag.embedding_bag` on the whole table.
    Use it to build your own ``shard_map`` step; :func:`embedding_bag` wraps it for you.

    Args:
      local_weight: ``float [R, D]``, this shard's rows.
      indices: ``int [N]`` global row ids (the same on every shard of ``axis_name``).
      segment_ids: ``int [N]`` sorted bag of each id; ids outside ``[0, num_bags)`` are dropped.
      num_bags: static ``B``.
      num_embeddings: ``V``, the number of valid global rows (ids outside ``[0, V)`` are dropped).
      axis_name: the mesh axis (or tuple) the rows are split over.
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      per_sample_weights: optional ``float [N]`` (not with ``max``).
      padding_idx: optional global padding row in ``[-V, V)``, skipped everywhere (negative
        counts from ``num_embeddings``, as :func:`jaxbag.embedding_bag`).
      max_norm: optional max norm of looked-up rows (as :func:`jaxbag.embedding_bag`).
      norm_type: the p of the p-norm for ``max_norm``.
      inverse_freq: optional ``float [N]`` gradient scale per id (``scale_grad_by_freq``).
      valid: optional ``bool [N]``: positions to keep (on top of the range checks).
      owned: optional ``bool [N]``: which ids this shard owns. When given, ``indices`` are
        positions in ``local_weight`` itself (a compact table of gathered rows) rather than global
        rows, and ``num_embeddings`` bounds them.

    Returns:
      ``[B, D]`` bags in ``local_weight.dtype``, replicated over ``axis_name``.

    Raises:
      ValueError, TypeError: the static checks of :func:`jaxbag.embedding_bag`, with its
        messages (``mode``, ``padding_idx``, ``per_sample_weights``: not with ``max``, the shape
        of ``indices``; ``segment_ids`` of ``indices``' shape, a static ``num_bags``), before any
        work.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag.sharding as jsh
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> def local(lw, ids, seg):
      ...     return jsh.embedding_bag_in_shard_map(lw, ids, seg, num_bags=2, num_embeddings=4,
      ...                                           axis_name="model", mode="sum")
      >>> f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("model", None), P(), P()),
      ...                           out_specs=P()))
      >>> f(jnp.arange(8.0).reshape(4, 2), jnp.array([3, 1, 3]), jnp.array([0, 0, 1])).tolist()
      [[8.0, 10.0], [6.0, 7.0]]
    """
    # The static checks of jaxbag.embedding_bag (same helpers, same messages), before any work.
    validation.check_table(local_weight, "local_weight")
    validation.check_norm(max_norm, norm_type)
    if not validation.is_static_int(num_embeddings, 1):
        raise ValueError(
            f"num_embeddings must be an int >= 1 (V, the table's global rows); got "
            f"{num_embeddings!r}." + validation.static_int_hint(num_embeddings)
        )
    num_embeddings = int(num_embeddings)
    padding_idx = validation.normalize_padding_idx(padding_idx, num_embeddings)
    validation.check_static(
        num_embeddings=num_embeddings, indices=indices, offsets=None,
        per_sample_weights=per_sample_weights, segment_ids=segment_ids, num_bags=num_bags,
        include_last_offset=False, mode=mode,
    )
    r, d = local_weight.shape
    n = indices.shape[0]
    if num_bags == 0 or n == 0:
        return jnp.zeros((num_bags, d), local_weight.dtype)
    ok = bag_terms.valid_positions(indices, segment_ids, num_embeddings, num_bags, padding_idx)
    if valid is not None:
        ok = ok & valid
    if owned is None:
        row0 = (jax.lax.axis_index(axis_tuple(axis_name)) * r).astype(indices.dtype)
        local = indices - row0
        mine = ok & (local >= 0) & (local < r)
    else:
        local, mine = indices, ok & owned
    rows = ops.lookup_rows(
        local_weight,
        local,
        mine,
        max_norm=max_norm,
        norm_type=norm_type,
        inverse_freq=inverse_freq,
    )
    weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
    out = ops.reduce_bags(
        rows,
        segment_ids,
        num_bags,
        mode,
        valid=ok,
        weights=weights,
        held=mine,
        axes=axis_tuple(axis_name),
    )
    return out.astype(local_weight.dtype)


def _real_rows(num_embeddings: object, num_rows: int) -> int:
    """``num_embeddings`` (the rows before :func:`pad_rows`), checked against the table's."""
    if num_embeddings is None:
        return num_rows
    if not validation.is_static_int(num_embeddings, 1) or num_embeddings > num_rows:
        raise ValueError(
            f"num_embeddings must be an int in [1, {num_rows}] (the table's rows before "
            f"pad_rows; the padded table has {num_rows}); got {num_embeddings!r}."
            + validation.static_int_hint(num_embeddings)
        )
    return int(num_embeddings)


def embedding_bag(
    weight: ArrayLike,
    indices: ArrayLike,
    offsets: ArrayLike | None = None,
    *,
    mesh: Mesh,
    axis_name: AxisName,
    batch_axis: AxisName | None = None,
    mode: Mode = "mean",
    per_sample_weights: ArrayLike | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    segment_ids: ArrayLike | None = None,
    num_bags: int | None = None,
    num_embeddings: int | None = None,
) -> Array:
    """:func:`jaxbag.embedding_bag` with the table row-sharded over ``axis_name`` of ``mesh``.

    Legend: ``V`` table rows, ``D`` features, ``N`` ids, ``B`` bags, ``L`` ids per bag, ``n`` the
    size of ``axis_name``, ``m`` the size of ``batch_axis``.

    Same arguments, forms, modes and results as :func:`jaxbag.embedding_bag`, values and
    gradients (up to float summation order). The table is used as
    ``NamedSharding(mesh, P(axis_name, None))`` (place it so once with :func:`shard_table`; any
    other placement is resharded on every call). Each device reads only its own ``V / n`` rows;
    only ``[B, D]`` partial bags are communicated (never the table). Call it under ``jax.jit``
    (not inside another ``shard_map``: use :func:`embedding_bag_in_shard_map` there); called
    eagerly it compiles its ``shard_map`` body on every call (a fraction of a second). With an
    Explicit-axes mesh (the default of ``jax.make_mesh``) run the surrounding code under
    ``jax.set_mesh(mesh)``.

    Batch placement (``batch_axis``):

    * ``None``: ids and bags are replicated on every device.
    * a mesh axis (data parallelism): the output ``[B, D]`` is split over ``batch_axis``
      (``P(batch_axis, None)``; ``B`` divisible by ``m``). 2-D ``indices [B, L]`` (and their
      ``per_sample_weights``) are split the same way, so each device only sees its bags' ids. In
      the 1-D forms (offsets / segment ids) the ids stay replicated and each device reduces only
      its block of bags.

    Args:
      weight: ``float [V, D]`` table, ``V`` divisible by ``n`` (see :func:`pad_rows`).
      indices: ``int [N]`` (with ``offsets`` or ``segment_ids``) or ``int [B, L]``.
      offsets: ``int [B]`` bag starts (``[B+1]`` with ``include_last_offset``).
      mesh: the ``jax.sharding.Mesh``.
      axis_name: mesh axis (or tuple of axes) the table rows are split over.
      batch_axis: optional mesh axis (or tuple) the bags are split over.
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      per_sample_weights: optional ``float``, shape of ``indices`` (not with ``max``).
      padding_idx: optional row skipped everywhere (negative counts from the end).
      include_last_offset: ``offsets`` has a trailing end offset.
      max_norm: optional; looked-up rows are rescaled to at most this norm (table unchanged).
      norm_type: the p of the p-norm for ``max_norm``.
      scale_grad_by_freq: divide each row's gradient by its count in the (whole) batch.
      segment_ids: ``int [N]`` sorted bag ids (with ``num_bags``).
      num_bags: static ``B`` for ``segment_ids``.
      num_embeddings: the table's real row count when ``weight`` was padded by
        :func:`pad_rows` (``None``: all ``V`` rows): ids at or past it are out of range, and a
        negative ``padding_idx`` counts from it (``-1`` is its last real row, not a padding row).

    Returns:
      ``[B, D]`` in ``weight.dtype``, sharded ``P(batch_axis, None)`` (replicated if ``None``).
      Empty bags are zeros in every mode (zero gradient), as in :func:`jaxbag.embedding_bag`.

    Raises:
      ValueError, TypeError, IndexError: as :func:`jaxbag.embedding_bag`, plus unknown or
        overlapping mesh axes, ``V`` not divisible by ``n``, ``B`` not divisible by ``m``. An id
        outside ``[0, V)`` is an ``IndexError`` eagerly; under ``jit`` it is skipped on every
        shard (no shard reads a row for it; not counted in a mean).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag, jaxbag.sharding
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> w = jnp.arange(8.0).reshape(4, 2)
      >>> ids, offsets = jnp.array([0, 3, 1]), jnp.array([0, 2])
      >>> jaxbag.sharding.embedding_bag(w, ids, offsets, mesh=mesh, axis_name="model").tolist()
      [[3.0, 4.0], [2.0, 3.0]]
      >>> jaxbag.embedding_bag(w, ids, offsets).tolist()
      [[3.0, 4.0], [2.0, 3.0]]
    """
    weight = jnp.asarray(weight)
    indices = validation.as_ids(indices)
    offsets, segment_ids = validation.as_ids(offsets), validation.as_ids(segment_ids)
    psw = None if per_sample_weights is None else jnp.asarray(per_sample_weights)
    validation.check_table(weight)
    validation.check_norm(max_norm, norm_type)
    check_axes(mesh, axis_name, batch_axis)
    num_rows, features = weight.shape
    num_embeddings = _real_rows(num_embeddings, num_rows)
    pad = validation.normalize_padding_idx(padding_idx, num_embeddings)
    # (Concrete ids closed over by a jitted function are still checked, eagerly.)
    layout = validation.check_arguments(
        num_embeddings=num_embeddings,
        indices=indices,
        offsets=offsets,
        per_sample_weights=psw,
        segment_ids=segment_ids,
        num_bags=num_bags,
        include_last_offset=include_last_offset,
        mode=mode,
        scale_grad_by_freq=scale_grad_by_freq,
    )
    check_divisible_rows("weight", num_rows, mesh, axis_name)
    n_batch = axis_size(mesh, batch_axis)
    b = layout.num_bags
    if b % n_batch:
        raise ValueError(
            f"the {b} bags cannot be split evenly over the {n_batch} devices of batch_axis="
            f"{batch_axis!r}; pad the batch with empty bags to a multiple of {n_batch}, or pass "
            "batch_axis=None."
        )
    b_loc = b // n_batch
    rows_spec = P(spec_entry(axis_name), None)
    out_spec = P(spec_entry(batch_axis), None)
    kw: dict[str, Any] = dict(
        num_embeddings=num_embeddings,
        axis_name=axis_name,
        mode=mode,
        padding_idx=pad,
        max_norm=max_norm,
        norm_type=norm_type,
    )
    batch_axes = axis_tuple(batch_axis)

    if layout.two_d:
        length = indices.shape[1]
        ids_spec = P(spec_entry(batch_axis), None)

        def local_2d(lw, ids2, w2):
            ids = ids2.reshape(-1)
            seg = segments.row_segment_ids(b_loc, length)
            inv = None
            if scale_grad_by_freq:
                ok = (ids >= 0) & (ids < num_embeddings)
                if pad is not None:
                    ok = ok & (ids != pad)
                all_ids, all_ok = ids, ok
                if batch_axes:  # counts over the whole batch, not this device's share of it
                    all_ids = jax.lax.all_gather(ids, batch_axes, tiled=True)
                    all_ok = jax.lax.all_gather(ok, batch_axes, tiled=True)
                inv = ops.inverse_counts(
                    ids, ok, num_embeddings, dtype=acc_dtype(lw.dtype), among=(all_ids, all_ok)
                )
            return embedding_bag_in_shard_map(
                lw,
                ids,
                seg,
                num_bags=b_loc,
                per_sample_weights=None if w2 is None else w2.reshape(-1),
                inverse_freq=inv,
                **kw,
            )

        args = (weight, indices, psw)
        specs = (rows_spec, ids_spec, None if psw is None else ids_spec)
        fn = local_2d
    else:
        n = indices.shape[0]
        if offsets is not None:
            seg = segments.offsets_to_segment_ids_unchecked(offsets, n)
        else:
            assert segment_ids is not None  # (checked: offsets or segment_ids)
            seg = segments.segment_ids_int32(segment_ids, b)

        def local_1d(lw, ids, seg, w):
            inv = None
            if scale_grad_by_freq:
                ok = (ids >= 0) & (ids < num_embeddings) & (seg >= 0) & (seg < b)
                if pad is not None:
                    ok = ok & (ids != pad)
                inv = ops.inverse_counts(ids, ok, num_embeddings, dtype=acc_dtype(lw.dtype))
            if batch_axes:  # this device's block of bags
                first_bag = jax.lax.axis_index(batch_axes).astype(seg.dtype) * b_loc
                seg = seg - first_bag
            return embedding_bag_in_shard_map(
                lw, ids, seg, num_bags=b_loc, per_sample_weights=w, inverse_freq=inv, **kw
            )

        args = (weight, indices, seg, psw)
        specs = (rows_spec, P(), P(), None if psw is None else P())
        fn = local_1d

    args = place(args, mesh, specs)
    return shard_map_call(fn, mesh, specs, out_spec, *args)


def table_shardings(mesh: Mesh, axis_name: AxisName) -> NamedSharding:
    """The placement of a row-sharded table.

    Args:
      mesh: the ``jax.sharding.Mesh``.
      axis_name: mesh axis (or tuple) the rows are split over.

    Returns:
      ``NamedSharding(mesh, P(axis_name, None))`` (e.g. for ``jit``'s ``out_shardings``), in the
      form a jitted step returns it: on an Auto-axes mesh ``P(axis_name)`` (and ``P()`` when
      the axis has one device), so a table placed so is not compiled for twice.

    Examples:
      >>> import jax, jaxbag.sharding
      >>> mesh = jax.make_mesh((1,), ("model",))    # Explicit axes (the default)
      >>> jaxbag.sharding.table_shardings(mesh, "model").spec
      P('model', None)
    """
    return NamedSharding(mesh, canonical_spec(mesh, P(spec_entry(axis_name), None), 2))



# -- sparse row updates of a row-sharded table -----------------------------------------------


def embedding_bag_rows(
    weight: ArrayLike,
    indices: ArrayLike,
    offsets: ArrayLike | None = None,
    *,
    mesh: Mesh,
    axis_name: AxisName,
    batch_axis: AxisName | None = None,
    size: int | None = None,
    mode: Mode = "mean",
    per_sample_weights: ArrayLike | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    segment_ids: ArrayLike | None = None,
    num_bags: int | None = None,
    num_embeddings: int | None = None,
) -> tuple[Array, Callable[[Array], sparse.RowGrads]]:
    """Row-sharded :func:`jaxbag.embedding_bag_rows`: bags plus a pullback to per-shard row grads.

    Legend: ``V`` rows, ``R = V / n`` rows per shard, ``D`` features, ``B`` bags, ``U`` row slots.

    The bags are :func:`embedding_bag`'s. ``pullback(g)`` maps the bag cotangent ``g [B, D]``
    (sharded as the bags) to a :class:`jaxbag.RowGrads` whose arrays are split over ``axis_name``:
    shard ``i`` holds ``rows [U]`` -- *local* row numbers in ``[0, R)`` of the rows it owns among
    the batch's distinct ids (``R`` in unused slots, skipped) -- and their ``grads [U, D]``. No
    ``[V, D]`` gradient is built and no row leaves its shard; with ``batch_axis`` the ids are
    gathered over it (ints) and the row gradients summed over it (``[U, D]``). Feed the result to
    :func:`sparse_update`. As in :func:`jaxbag.embedding_bag_rows`, ids equal to ``padding_idx``
    or at positions outside every bag (padding) are not rows of the batch.

    Args:
      weight: ``float [V, D]`` row-sharded table.
      indices, offsets, mode, per_sample_weights, padding_idx, include_last_offset, segment_ids,
        num_bags, num_embeddings: as :func:`embedding_bag` (``max_norm`` and
        ``scale_grad_by_freq`` are not supported here). Unlike
        :func:`jaxbag.embedding_bag_rows`, which skips out-of-range ids also eagerly, this
        checks them as :func:`embedding_bag` does: eagerly an ``IndexError``, under ``jit``
        skipped.
      mesh, axis_name, batch_axis: as :func:`embedding_bag`.
      size: ``U``, static row slots (``None``: ``min(N, V)`` with ``N`` the ids of the whole
        batch, always enough). Too small for a batch: eagerly a ``ValueError``; under ``jit`` the
        rows past the first ``U`` distinct ones get no gradient (with ``mode="max"``, their
        bags' gradient may then go to another row of the bag).

    Returns:
      ``(bags [B, D], pullback)``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag.sharding as jsh
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> w = jsh.shard_table(jnp.arange(8.0).reshape(4, 2), mesh, "model")
      >>> bags, pullback = jsh.embedding_bag_rows(w, jnp.array([3, 1, 3]), jnp.array([0, 2]),
      ...                                         mesh=mesh, axis_name="model", mode="sum")
      >>> bags.tolist()
      [[8.0, 10.0], [6.0, 7.0]]
      >>> g = pullback(jnp.ones((2, 2)))  # this shard's rows 1 and 3; slot 3 unused (R = 4)
      >>> g.rows.tolist(), g.grads[:, 0].tolist()
      ([1, 3, 4], [1.0, 2.0, 0.0])
    """
    weight = jnp.asarray(weight)
    indices = validation.as_ids(indices)
    offsets, segment_ids = validation.as_ids(offsets), validation.as_ids(segment_ids)
    psw = None if per_sample_weights is None else jnp.asarray(per_sample_weights)
    bags = embedding_bag(
        weight,
        indices,
        offsets,
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axis,
        mode=mode,
        per_sample_weights=psw,
        padding_idx=padding_idx,
        include_last_offset=include_last_offset,
        segment_ids=segment_ids,
        num_bags=num_bags,
        num_embeddings=num_embeddings,
    )  # also runs every argument check
    num_rows, features = weight.shape
    num_embeddings = _real_rows(num_embeddings, num_rows)
    pad = validation.normalize_padding_idx(padding_idx, num_embeddings)
    sparse.check_slots(indices, bag_terms.valid_positions(
        indices.reshape(-1), segments.bag_of_positions(indices, offsets, segment_ids),
        num_embeddings, bags.shape[0], pad), size, num_embeddings)
    b = bags.shape[0]
    b_loc = b // axis_size(mesh, batch_axis)
    batch_axes = axis_tuple(batch_axis)
    rows_spec, out_spec = P(spec_entry(axis_name), None), P(spec_entry(batch_axis), None)
    acc = acc_dtype(weight.dtype)
    two_d = indices.ndim == 2
    if two_d:
        seg_all = None
        ids_spec = P(spec_entry(batch_axis), None)
    else:
        n = indices.shape[0]
        if offsets is not None:
            seg_all = segments.offsets_to_segment_ids_unchecked(offsets, n)
        else:
            assert segment_ids is not None  # (checked: offsets or segment_ids)
            seg_all = segments.segment_ids_int32(segment_ids, b)
        ids_spec = P()

    def local_pullback(lw, ids_in, seg, w, g):
        if two_d:
            ids = validation.to_int32(ids_in.reshape(-1), 0, num_embeddings - 1, -1)
            length = ids_in.shape[1]
            seg = segments.row_segment_ids(b_loc, length)
            w = None if w is None else w.reshape(-1)
            # every position is in its row's bag (one bag for the validity check)
            valid = bag_terms.valid_positions(ids, jnp.zeros_like(ids), num_embeddings, 1, pad)
            return local_row_grads(
                lw, ids, seg, w, g, valid=valid, num_bags=b_loc, num_embeddings=num_embeddings,
                size=size, mode=mode, axis_name=axis_name, batch_axis=batch_axis,
            )
        ids = validation.to_int32(ids_in, 0, num_embeddings - 1, -1)
        # The ids are the whole batch's on every replica: one slot space, nothing to gather.
        # Ids outside every bag (segment >= B, past the last offset) are padding, not rows of the
        # batch (as in jaxbag.embedding_bag_rows).
        valid = bag_terms.valid_positions(ids, seg, num_embeddings, b, pad)
        if batch_axes:  # this replica's block of bags
            seg = seg - jax.lax.axis_index(batch_axes).astype(seg.dtype) * b_loc
        return local_row_grads(
            lw, ids, seg, w, g, valid=valid, num_bags=b_loc, num_embeddings=num_embeddings,
            size=size, mode=mode, axis_name=axis_name, batch_axis=None,
        )

    def pullback(g: Array) -> sparse.RowGrads:
        g = jnp.asarray(g)
        if g.shape != bags.shape:
            raise ValueError(f"g must have the shape of the bags {bags.shape}; got {g.shape}.")
        if indices.size == 0:  # no ids, no rows: every slot unused (shard_map would trip on it)
            n_shards = axis_size(mesh, axis_name)
            u = sparse.default_slots(0, num_embeddings) if size is None else size
            rows = jnp.full((n_shards * u,), num_rows // n_shards, jnp.int32)
            grads = jnp.zeros((n_shards * u, weight.shape[1]), acc)
            # (in the canonical form, as the shard_map path returns them)
            rows, grads = constrain((rows, grads), mesh, (
                canonical_spec(mesh, P(spec_entry(axis_name)), 1),
                canonical_spec(mesh, rows_spec, 2)))
            return sparse.RowGrads(rows=rows, grads=grads)
        args = (weight, indices, seg_all, psw, g)
        specs = (
            rows_spec,
            ids_spec,
            None if seg_all is None else P(),
            None if psw is None else ids_spec,
            out_spec,
        )
        args = place(args, mesh, specs)
        rows, grads = shard_map_call(
            local_pullback, mesh, specs, (P(spec_entry(axis_name)), P(spec_entry(axis_name), None)),
            *args,
        )
        return sparse.RowGrads(rows=rows, grads=grads)

    del features
    return bags, pullback


def local_row_grads(
    local_weight: Array,
    indices: Array,
    segment_ids: Array,
    per_sample_weights: Array | None,
    g: Array,
    *,
    valid: Array,
    num_bags: int,
    num_embeddings: int,
    size: int | None,
    mode: Mode,
    axis_name: AxisName | None,
    batch_axis: AxisName | None,
) -> tuple[Array, Array]:
    """Inside ``shard_map``: this shard's row gradients of its bags (the pullback's body).

    Legend: ``R`` rows on this shard, ``D`` features, ``N`` ids here, ``B`` bags here, ``U`` slots.

    One slot space for the whole batch: the ``valid`` ids are gathered over ``batch_axis``
    (ints; ``None`` when every replica already holds the whole batch's ids, as ``indices``), and
    every replica finds the same distinct rows. Each shard of ``axis_name`` fills the slots of the
    rows it owns (``None``: a replicated table, ``R = V``, every row its own). The gradients of
    the replicas' bags are summed over ``batch_axis`` by the transpose (``[U, D]``).

    Args:
      local_weight: ``float [R, D]``, this shard's rows.
      indices: ``int32 [N]`` global row ids (negative or ``>= V``: skipped).
      segment_ids: ``int32 [N]`` this replica's bag of each id (outside ``[0, B)``: none).
      per_sample_weights: optional ``float [N]``.
      g: ``[B, D]`` cotangent of this replica's bags.
      valid: ``bool [N]``: ids that are rows of the batch (in range, in a bag of the whole batch,
        not ``padding_idx``).
      num_bags, num_embeddings, mode: ``B``, ``V`` and the bag mode.
      size: ``U`` (``None``: ``min(N_all, V)``).
      axis_name: the mesh axis the rows are split over, or ``None`` (replicated table).
      batch_axis: the mesh axis to gather the ids over, or ``None``.

    Returns:
      ``(rows int32 [U], grads [U, D])``: local row numbers (``R`` in slots this shard does not
      own) and their gradients in the accumulation dtype.
    """
    r = local_weight.shape[0]
    acc = acc_dtype(local_weight.dtype)
    batch_axes = axis_tuple(batch_axis)
    all_ids = jnp.where(valid, indices, -1)
    if batch_axes:
        all_ids = jax.lax.all_gather(all_ids, batch_axes, tiled=True, to="invarying")
    rows, inverse = sparse.unique_rows(all_ids, num_embeddings, size=size, valid=all_ids >= 0)
    if batch_axes:  # this replica's ids
        start = jax.lax.axis_index(batch_axes) * indices.shape[0]
        inverse = jax.lax.dynamic_slice_in_dim(inverse, start, indices.shape[0])
    u = rows.shape[0]
    # Valid ids without a slot (size too small, under jit): no gradient, but still counted in
    # their bag (a mean's count), as in the forward: slot 0, not owned by any shard.
    slotless = valid & (inverse == u)
    row_axes = axis_tuple(axis_name)
    local_rows = rows
    if row_axes:
        local_rows = rows - (jax.lax.axis_index(row_axes) * r).astype(jnp.int32)
    # (unused slots hold V: on a table padded by pad_rows, a row of the last shard)
    own = (local_rows >= 0) & (local_rows < r) & (rows < num_embeddings)
    # in the accumulation dtype, so the vjp sums a row's gradient in float32 for bf16 / f16
    # tables (as jaxbag.embedding_bag_rows does), not in the table's dtype
    compact = jnp.take(local_weight, jnp.clip(local_rows, 0, r - 1), axis=0).astype(acc)
    compact = jnp.where(own[:, None], compact, jnp.zeros((), acc))
    owned = (inverse < u) & jnp.take(own, jnp.clip(inverse, 0, u - 1))
    inverse = jnp.where(slotless, 0, inverse)

    def bag(table):
        return embedding_bag_in_shard_map(
            table,
            inverse,
            segment_ids,
            num_bags=num_bags,
            num_embeddings=u,
            axis_name=row_axes,
            mode=mode,
            per_sample_weights=per_sample_weights,
            owned=owned,
        )

    if indices.shape[0] == 0 or num_bags == 0:
        # (no ids: the bags are constant zeros, which vary over no axis while ``g`` varies over
        # the batch axes, so the vjp would refuse the cotangent)
        grads = jnp.zeros_like(compact)
    else:
        out, vjp = jax.vjp(bag, compact)
        (grads,) = vjp(g.astype(out.dtype))
    # With batch_axis (or replicated ids), ``compact`` is the same on every replica of the batch
    # and the bags are not, so the transpose already sums the replicas' row gradients (an
    # all-reduce of [U, D] over batch_axis): every replica holds the whole batch's gradient.
    return jnp.where(own, local_rows, jnp.int32(r)), grads.astype(acc)


def check_sparse_table(optimizer: object, table: object) -> None:
    """Raises unless ``optimizer`` is a jaxbag sparse optimiser and ``table`` a ``[V, D]`` float
    array (the checks of :func:`sparse_init` and :func:`sparse_update`, before any work)."""
    sparse.check_optimizer(optimizer)
    if not isinstance(table, jax.Array | np.ndarray):
        raise TypeError(
            "table must be a [V, D] array (a jax.Array, placed row-sharded with "
            f"jaxbag.sharding.shard_table(weight, mesh, axis_name)); got {type(table).__name__}."
        )
    validation.check_table(table, "table")


def check_sparse_state(optimizer: sparse.TableOptimizer, table: Array, state: Any) -> None:
    """Raises unless ``state`` has the structure (type, fields) and leaf shapes that
    ``optimizer.init(table)`` gives (dtypes may differ: moments kept in another float dtype)."""
    want = sparse.state_spec(optimizer.init, tuple(table.shape), jnp.dtype(table.dtype))
    want_shapes, got_shapes = jax.tree.map(jnp.shape, want), jax.tree.map(jnp.shape, state)
    want_tree: Any = jax.tree.structure(want)  # (PyTreeDef's stub types no ==)
    same_tree = want_tree == jax.tree.structure(state)
    if not same_tree or want_shapes != got_shapes:
        error = ValueError if same_tree else TypeError
        raise error(
            f"state does not match optimizer.init's {'shapes' if same_tree else 'structure'} for "
            f"this table: expected {want_shapes}; got {got_shapes} (leaf shapes shown). Make it "
            "for this optimizer and table: state = jaxbag.sharding.sparse_init(optimizer, table, "
            "mesh=mesh, axis_name=axis_name) (after switching optimisers, init a new state)."
        )


def _state_specs(optimizer: sparse.TableOptimizer, local_table: Any, axis_name: AxisName) -> Any:
    """Scalars replicated, every other leaf split by rows (the optimisers' per-row state)."""
    shapes = jax.eval_shape(optimizer.init, local_table)
    row = spec_entry(axis_name)
    return jax.tree.map(lambda a: P() if a.ndim == 0 else P(row, *([None] * (a.ndim - 1))), shapes)


def sparse_init(
    optimizer: sparse.TableOptimizer, table: Array, *, mesh: Mesh, axis_name: AxisName
) -> Any:
    """``optimizer.init`` for a row-sharded table: the per-row state is row-sharded likewise.

    Args:
      optimizer: a :class:`jaxbag.SparseOptimizer` (``jaxbag.sparse_adam(...)``, ...).
      table: ``float [V, D]`` row-sharded over ``axis_name``.
      mesh, axis_name: as :func:`embedding_bag`.

    Returns:
      The optimiser state; ``[V]``/``[V, D]`` leaves sharded ``P(axis_name)``, scalars replicated
      (in the form a jitted :func:`sparse_update` returns them: :func:`table_shardings`).

    Raises:
      TypeError, ValueError: ``optimizer`` is not a :class:`jaxbag.SparseOptimizer` (an optax
        one, say), ``table`` is not a ``[V, D]`` float array, bad axes, or ``V`` not divisible
        by the size of ``axis_name`` (before any work).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag, jaxbag.sharding as jsh
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> w = jsh.shard_table(jnp.zeros((4, 2)), mesh, "model")
      >>> state = jsh.sparse_init(jaxbag.sparse_adagrad(0.1), w, mesh=mesh, axis_name="model")
      >>> type(state).__name__, state.sum_sq.shape
      ('RowwiseAdagradState', (4,))
    """
    check_sparse_table(optimizer, table)
    check_axes(mesh, axis_name, None)
    check_divisible_rows("table", table.shape[0], mesh, axis_name)
    n = axis_size(mesh, axis_name)
    local = jax.ShapeDtypeStruct((table.shape[0] // n, table.shape[1]), table.dtype)
    specs = _state_specs(optimizer, local, axis_name)
    table = place(table, mesh, P(spec_entry(axis_name), None))
    return shard_map_call(optimizer.init, mesh, P(spec_entry(axis_name), None), specs, table)


def sparse_update(
    optimizer: sparse.TableOptimizer,
    table: Array,
    state: Any,
    row_grads: sparse.RowGrads,
    *,
    mesh: Mesh,
    axis_name: AxisName,
) -> tuple[Array, Any]:
    """Applies a sparse optimiser on every shard to its own rows (no communication).

    Args:
      optimizer: the :class:`jaxbag.SparseOptimizer`.
      table: ``float [V, D]`` row-sharded over ``axis_name``.
      state: from :func:`sparse_init`.
      row_grads: from :func:`embedding_bag_rows`'s pullback (per-shard local rows).
      mesh, axis_name: as :func:`embedding_bag`.

    Returns:
      ``(table, state)`` updated; donate both to ``jit`` to update in place.

    Raises:
      TypeError, ValueError: as :func:`sparse_init`, plus a ``state`` whose structure or leaf
        shapes are not those ``optimizer.init`` gives this table (another optimiser's, another
        table's), and ``row_grads`` not split over ``axis_name`` (before any work).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbag, jaxbag.sharding as jsh
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> w = jsh.shard_table(jnp.zeros((4, 2)), mesh, "model")
      >>> opt = jaxbag.sparse_sgd(0.5)
      >>> state = jsh.sparse_init(opt, w, mesh=mesh, axis_name="model")
      >>> bags, pullback = jsh.embedding_bag_rows(w, jnp.array([3, 1, 3]), jnp.array([0, 2]),
      ...                                         mesh=mesh, axis_name="model", mode="sum")
      >>> g = pullback(jnp.ones((2, 2)))  # rows 1 and 3 (3 twice), 4 = unused slot
      >>> g.rows.tolist(), g.grads[:, 0].tolist()
      ([1, 3, 4], [1.0, 2.0, 0.0])
      >>> w, state = jsh.sparse_update(opt, w, state, g, mesh=mesh, axis_name="model")
      >>> w[:, 0].tolist()
      [0.0, -0.5, 0.0, -1.0]
    """
    check_sparse_table(optimizer, table)
    check_sparse_state(optimizer, table, state)
    check_axes(mesh, axis_name, None)
    check_divisible_rows("table", table.shape[0], mesh, axis_name)
    check_split_rows(row_grads, mesh, axis_name)
    n = axis_size(mesh, axis_name)
    local = jax.ShapeDtypeStruct((table.shape[0] // n, table.shape[1]), table.dtype)
    row = spec_entry(axis_name)
    specs = (
        P(row, None),
        _state_specs(optimizer, local, axis_name),
        sparse.RowGrads._make((P(row), P(row, None))),  # specs shaped as RowGrads
    )
    args = place((table, state, row_grads), mesh, specs)

    def local_update(t, s, g):
        return optimizer.update(t, s, sparse.RowGrads(*g))

    return shard_map_call(local_update, mesh, specs, specs[:2], *args)
