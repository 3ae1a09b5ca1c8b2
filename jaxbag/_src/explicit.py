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

__all__ = ["explicit_axes", "explicit_mesh", "on_explicit_mesh", "unsplit"]


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
