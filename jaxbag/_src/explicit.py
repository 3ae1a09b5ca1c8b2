"""Arrays split over Explicit mesh axes (``jax.make_mesh``'s default axis type).

On such a mesh an array's type carries its sharding, and JAX needs a sharding rule for every
operation: gathers, segment reductions, slices and scans of split arrays are sharding type errors.
These helpers find such arrays and take them out of that typing (replicate them, or let the
compiler partition a computation as on an Auto mesh). Auto meshes and ``shard_map`` bodies
(manual axes) are left alone.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

__all__ = ["explicit_axes", "explicit_mesh", "gather", "on_explicit_mesh", "unsplit"]


def _axes(entry: Any) -> tuple:
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def explicit_axes(mesh: Any) -> tuple[str, ...]:
    """The names of ``mesh``'s Explicit axes."""
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)


def explicit_mesh(x: Any) -> Any:
    """The (abstract) mesh whose Explicit axes split ``x``, or ``None`` (not an array, not split,
    or split over Auto / Manual axes only)."""
    if not isinstance(x, jax.Array | jax.core.Tracer):
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    used = {a for e in sharding.spec for a in _axes(e)}
    return mesh if used & set(explicit_axes(mesh)) else None


def on_explicit_mesh(x: Any) -> bool:
    """Whether ``x`` is a concrete array placed on a mesh with Explicit axes (split or not)."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
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
    ``out_sharding`` (the indices' ``PartitionSpec``, then the unindexed dimensions of ``x`` as
    they are split in ``x``, over axes the indices do not use) resolves it, and ``vmap`` extends it over the batch axis. Off Explicit meshes (no
    mesh, Auto axes, inside ``auto_axes``) this is the plain gather.
    """
    ref = idx[0]
    sharding = getattr(jax.typeof(ref), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not explicit_axes(mesh):
        return x.at[idx].get(mode="clip", wrap_negative_indices=False)
    shape = jax.numpy.broadcast_shapes(*(jax.numpy.shape(i) for i in idx))
    spec = tuple(sharding.spec) if jax.numpy.shape(ref) == shape else (None,) * len(shape)
    used = {a for e in spec for a in _axes(e)}
    # the unindexed dimensions stay split as in x, over axes the indices do not use
    spec = spec + tuple(None if set(_axes(e)) & used else e
                        for e in (spec_entry(x, d) for d in range(len(idx), jax.numpy.ndim(x))))
    return x.at[idx].get(mode="clip", wrap_negative_indices=False,
                         out_sharding=NamedSharding(mesh, PartitionSpec(*spec)))
