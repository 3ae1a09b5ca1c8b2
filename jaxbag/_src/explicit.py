"""Arrays split over Explicit mesh axes (``jax.make_mesh``'s default axis type).

On such a mesh an array's type carries its sharding, and JAX needs a sharding rule for every
operation: gathers, segment reductions, slices and scans of split arrays are sharding type errors.
These helpers find such arrays and take them out of that typing (replicate them, let the
compiler partition a computation as on an Auto mesh, or run a batched computation on each
device's rows), or give a gather the sharding JAX cannot infer under ``vmap``. Auto meshes and
``shard_map`` bodies (manual axes) are left alone.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
from jax.core import Tracer
from jax.sharding import AxisType, NamedSharding, PartitionSpec

__all__ = [
    "batch_as_auto", "explicit_axes", "explicit_mesh", "gather", "on_explicit_mesh", "unsplit",
]


def _axes(entry: Any) -> tuple:
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def explicit_axes(mesh: Any) -> tuple[str, ...]:
    """The names of ``mesh``'s Explicit axes."""
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)


def explicit_mesh(x: Any) -> Any:
    """The (abstract) mesh whose Explicit axes split ``x``, or ``None`` (not an array, not split,
    or split over Auto / Manual axes only)."""
    if not isinstance(x, jax.Array | Tracer):
        return None
    sharding: Any = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    used = {a for e in sharding.spec for a in _axes(e)}
    return mesh if used & set(explicit_axes(mesh)) else None


def split_mesh(*xs: Any) -> Any:
    """The mesh of the first of ``xs`` split over Explicit mesh axes, or ``None``."""
    return next((m for m in map(explicit_mesh, xs) if m is not None), None)


def _tracing() -> bool:
    """Whether a JAX transformation is tracing here (an operation on constants then gives a
    ``Tracer``; JAX has no public query for it)."""
    return isinstance(jax.numpy.zeros((), jax.numpy.bool_), Tracer)


def eager_mesh_context(*xs: Any) -> contextlib.AbstractContextManager:
    """``jax.set_mesh`` of the first concrete array of ``xs`` split over Explicit mesh axes, for
    an eager call made outside any mesh context (arrays JAX creates there, then resharded onto
    the mesh, fail without one); otherwise (a mesh context already, or under a trace: ``jit``
    of a function that closes over such arrays) a no-op."""
    if not jax.sharding.get_abstract_mesh().empty or _tracing():
        return contextlib.nullcontext()
    for x in xs:
        if isinstance(x, jax.Array) and not isinstance(x, Tracer) \
                and explicit_mesh(x) is not None:
            sharding: Any = x.sharding  # a NamedSharding: explicit_mesh found its mesh
            return jax.set_mesh(sharding.mesh)
    return contextlib.nullcontext()


def run_as_auto(fn: Callable[..., Any], mesh: Any, out_sharding: Any, *args: Any) -> Any:
    """``fn(*args)`` as on an Auto mesh over ``mesh``'s Explicit axes (``auto_axes``: the
    compiler partitions it), the results split as ``out_sharding``; an eager call outside any
    mesh context enters the arguments' mesh (:func:`eager_mesh_context`)."""
    with eager_mesh_context(*jax.tree.leaves(args)):
        return jax.sharding.auto_axes(fn, axes=explicit_axes(mesh), out_sharding=out_sharding)(
            *args)


def on_explicit_mesh(x: Any) -> bool:
    """Whether ``x`` is a concrete array placed on a mesh with Explicit axes (split or not)."""
    if not isinstance(x, jax.Array) or isinstance(x, Tracer):
        return False
    mesh = getattr(x.sharding, "mesh", None)
    return mesh is not None and AxisType.Explicit in getattr(mesh, "axis_types", ())


def unsplit(x: Any) -> Any:
    """``x`` replicated if its type splits it over an Explicit mesh axis (else ``x`` itself).

    Segment ids, packed batches and eager value checks are computed on the whole batch: on an
    Explicit mesh the slices, scans and reshapes of arrays split over the batch axis
    (``feature_specs``, the "Many hosts" inputs) are sharding type errors."""
    mesh = explicit_mesh(x)
    if mesh is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))


def kept_sharding(mesh: Any, x: Any) -> NamedSharding:
    """``x``'s sharding on ``mesh`` where ``x`` is split over its Explicit axes, else whole
    (``P()``): the out_sharding that keeps a result split as its input."""
    spec = jax.typeof(x).sharding.spec if explicit_mesh(x) is not None else ()
    return NamedSharding(mesh, PartitionSpec(*spec))


def spec_entry(x: Any, dim: int) -> Any:
    """The ``PartitionSpec`` entry of ``x``'s dimension ``dim`` (``None``: not split)."""
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec[dim] if dim < len(spec) else None


def shares_axes(a: Any, b: Any) -> bool:
    """Whether two ``PartitionSpec`` entries use a common mesh axis."""
    return bool(set(_axes(a)) & set(_axes(b)))


def gather(x: Any, *idx: Any) -> Any:
    """``x[idx]`` (clipped into range, negative indices not wrapped: ``jnp.take``'s gather; one
    index array per leading dimension of ``x``, broadcast together), typed on an Explicit mesh:
    the result is split as the index arrays are.

    A plain gather cannot say how its result is split when the indices are batched by
    ``jax.vmap`` over an Explicit mesh axis while ``x`` is not (JAX's gather batching rule
    leaves the output sharding unresolved: a sharding type error). Giving the gather its
    ``out_sharding`` resolves it, and ``vmap`` extends that over the batch axis: the indices'
    ``PartitionSpec``, then the unindexed dimensions of ``x`` as ``x`` splits them, over axes
    the indices do not use. Off Explicit meshes (no mesh, Auto axes, inside ``auto_axes``), and
    for concrete indices that nothing splits, this is the plain gather.
    """
    ref = idx[0]
    sharding: Any = getattr(jax.typeof(ref), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    # Concrete indices split over no axis only took the context mesh (jax.set_mesh) into their
    # type, and cannot be rows of a vmapped batch: the plain gather (with out_sharding, an
    # eager jax.grad of the table came back on an Auto copy of the mesh).
    concrete = not any(isinstance(i, Tracer) for i in idx)
    if (mesh is None or mesh.empty or not explicit_axes(mesh)
            or (concrete and split_mesh(x, *idx) is None)):
        return x.at[idx].get(mode="clip", wrap_negative_indices=False)
    shape = jax.numpy.broadcast_shapes(*(jax.numpy.shape(i) for i in idx))
    spec = tuple(sharding.spec) if jax.numpy.shape(ref) == shape else (None,) * len(shape)
    used = {a for e in spec for a in _axes(e)}
    # the unindexed dimensions stay split as in x, over axes the indices do not use
    spec = spec + tuple(None if set(_axes(e)) & used else e
                        for e in (spec_entry(x, d) for d in range(len(idx), jax.numpy.ndim(x))))
    return x.at[idx].get(mode="clip", wrap_negative_indices=False,
                         out_sharding=NamedSharding(mesh, PartitionSpec(*spec)))


def _explicit_context(args: tuple) -> bool:
    """Whether the mesh of one of ``args`` has Explicit axes (inside ``vmap`` too: a row of a
    split batch keeps its mesh in its type; a context mesh alone splits nothing)."""
    meshes = [getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
              for a in args if isinstance(a, jax.Array | Tracer)]
    return any(m is not None and not m.empty and explicit_axes(m) for m in meshes)


def batch_as_auto(
    fn: Callable[..., Any], rule: Callable[..., Any] | None = None
) -> Callable[..., Any]:
    """``fn`` (positional array arguments -> arrays; not differentiated through) with a ``vmap``
    rule that works on a batch axis split over Explicit mesh axes.

    ``rule(axis_size, in_batched, *args)`` batches ``fn`` (default: JAX's own batching of
    ``fn``, e.g. an FFI call's loop of one call per row, itself wrapped by this helper, so that
    a ``vmap`` around that one works the same way). Where a batched argument is split
    over Explicit axes, that loop (slices of split arrays) and JAX's batched gathers, scans and
    while loops are sharding type errors; the rule then runs inside ``jax.shard_map`` over the
    batch's axes, on each device's rows (the unbatched arguments whole; any other Explicit axes
    as on an Auto mesh, ``jax.sharding.auto_axes``), and every result comes out split over its
    batch dimension as that argument is. (Under ``auto_axes`` alone the compiler gathered the
    whole batch and ran every row on every device: an FFI call cannot be partitioned.)
    Elsewhere it is the rule itself. Without a
    ``rule``, off meshes with Explicit axes, ``fn`` is returned as it is (``custom_vmap`` has no
    reverse-mode derivative, and JAX's batching needs no help there).
    """
    custom_rule = rule is not None

    def default_rule(axis_size, in_batched, *args):
        # (the batched function carries this rule too, for a vmap around this one)
        return batch_as_auto(jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched),
                                      axis_size=axis_size))(*args)

    vmap_rule = default_rule if rule is None else rule
    batchable = jax.custom_batching.custom_vmap(fn)

    @batchable.def_vmap
    def batched(axis_size, in_batched, *args):
        run = functools.partial(vmap_rule, axis_size, in_batched)
        split = [a for a, b in zip(args, in_batched) if b and explicit_mesh(a) is not None]
        if split:
            mesh = explicit_mesh(split[0])
            # the mesh axes that split the batch (dimension 0) of a batched argument
            batch = PartitionSpec(next((e for e in map(lambda a: spec_entry(a, 0), split) if e),
                                       None))
            manual = _axes(batch[0])
            # (the results' structure from one row: the rule itself may only run inside)
            row = [jax.ShapeDtypeStruct(a.shape[1:] if b else a.shape, a.dtype)
                   for a, b in zip(args, in_batched)]
            out_struct = jax.eval_shape(fn, *row)
            run = functools.partial(vmap_rule, axis_size // math.prod(mesh.shape[a] for a in manual),
                                    in_batched)
            rest = tuple(a for a in explicit_axes(mesh) if a not in manual)
            if rest:  # (inside: every result whole over the other axes)
                whole = jax.tree.map(lambda _: PartitionSpec(), out_struct)
                run = jax.sharding.auto_axes(run, axes=rest, out_sharding=whole)
            if manual:  # each device its rows; the unbatched arguments whole
                in_specs = tuple(batch if b else PartitionSpec() for b in in_batched)
                # (jitted: an eager shard_map over some of the Explicit axes of a mesh that has
                # others is refused by JAX, "out_specs refers to 'model'"; traced it is fine)
                run = jax.jit(jax.shard_map(
                    run, mesh=mesh, in_specs=in_specs,
                    out_specs=jax.tree.map(lambda _: batch, out_struct), axis_names=set(manual),
                    check_vma=False))
        out = run(*args)
        return out, jax.tree.map(lambda _: True, out)

    if custom_rule:
        return batchable
    return lambda *args: batchable(*args) if _explicit_context(args) else fn(*args)
