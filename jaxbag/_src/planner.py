"""The sharding planner: which table goes row-wise, which goes whole to one device.

Legend: ``n`` devices along ``axis_name``, ``V_t``/``D_t`` rows/width of table ``t``.

Three placements (TorchRec's names):

* ``"table"`` (table-wise): the whole table on one device of ``axis_name`` (replicated over the
  other mesh axes); tables are spread over the devices balancing bytes.
* ``"row"`` (row-wise): ``ceil(V_t / n)`` rows on every device; for tables too big for one.
* ``"replicated"``: a full copy everywhere (small, hot tables; no communication at all).

Default rule: a table goes row-wise when its bytes exceed ``row_threshold_bytes`` (default: a fair
share ``total bytes / n``, i.e. a table that could not be balanced whole) or
``device_budget_bytes``; otherwise table-wise, greedily largest-first onto the least loaded device
among tables of its group (same width, dtype and mode: they share one stacked array, whose per
device block is as large as its fullest device). A group whose table-wise tables cannot fill the
devices' blocks evenly (``min_fill``; e.g. a lone table) goes row-wise instead, which then stores
less and communicates the same. ``overrides`` forces a placement per table.

Cost model of this implementation (be aware): every device of ``axis_name`` receives all ids of
a group and masks those outside its rows (SPMD, no id routing), so compute per device is the same
for row-wise and table-wise; table-wise keeps a table, its gradient, optimizer state and sparse
updates on one device. Communication is one all-reduce of the ``[B, D]`` bags per group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
from jax.sharding import Mesh

from jaxbag._src import collection, sharding, validation
from jaxbag._src.collection import TableConfig

__all__ = ["PLACEMENTS", "ShardingPlan", "plan_sharding"]

PLACEMENTS = ("row", "table", "replicated")


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where every table of a collection lives on the mesh (hashable; static).

    Attributes:
      mesh: the ``jax.sharding.Mesh``.
      axis_name: mesh axis (or tuple) the tables are split over.
      batch_axis: mesh axis (or tuple) the batch is split over, or ``None`` (replicated batch).
      placements: ``(table name, "row" | "table" | "replicated", device index or None)``.
    """

    mesh: Mesh
    axis_name: sharding.AxisName
    batch_axis: sharding.AxisName | None
    placements: tuple[tuple[str, str, int | None], ...]

    def __post_init__(self) -> None:
        # A plan may be built or edited by hand (dataclasses.replace): check it as the planner would.
        sharding.check_axes(self.mesh, self.axis_name, self.batch_axis)
        n = self.num_shards
        seen = set()
        for i, entry in enumerate(self.placements):
            try:
                name, kind, shard = entry
            except (TypeError, ValueError):
                raise ValueError(
                    f"placements[{i}] = {entry!r} must be (table name, kind, device index or None)."
                ) from None
            if kind not in PLACEMENTS:
                raise ValueError(
                    f"placements[{i}] = {entry!r}: kind {kind!r} is not one of {PLACEMENTS}."
                )
            if kind == "table":
                if not validation.is_static_int(shard, 0) or shard >= n:
                    raise ValueError(
                        f"placements[{i}] = {entry!r}: a table-wise table needs a device index in "
                        f"[0, {n}) along axis_name={self.axis_name!r}; got {shard!r}."
                    )
            elif shard is not None:
                raise ValueError(
                    f"placements[{i}] = {entry!r}: a {kind!r} table has no device index; use None."
                )
            if name in seen:
                raise ValueError(f"placements[{i}]: table {name!r} is placed twice.")
            seen.add(name)

    @property
    def num_shards(self) -> int:
        """``n``: devices along ``axis_name``."""
        return sharding.axis_size(self.mesh, self.axis_name)

    def placement(self, table: str) -> tuple[str, int | None]:
        """``(kind, device index)`` of ``table`` (the index only for ``"table"``)."""
        for name, kind, shard in self.placements:
            if name == table:
                return kind, shard
        raise KeyError(f"no table {table!r} in this plan: {[p[0] for p in self.placements]}.")

    def as_dict(self) -> dict[str, str]:
        """``{table: kind}``: the shape of ``overrides`` (to tweak and plan again)."""
        return {name: kind for name, kind, _ in self.placements}

    def device_bytes(self, tables: Sequence[TableConfig]) -> list[int]:
        """Bytes of table storage on each of the ``n`` devices of ``axis_name`` (padding included)."""
        layout = collection.collection_layout(tables, plan=self)
        per = [0] * self.num_shards
        for g in layout.groups:
            size = g.shard_rows * g.features * jnp.dtype(g.dtype).itemsize
            for i in range(self.num_shards):
                per[i] += size
        return per

    def describe(self, tables: Sequence[TableConfig]) -> str:
        """A readable table of placements and per-device bytes.

        Args:
          tables: the tables the plan was made for.

        Returns:
          One line for the mesh and axes, one per table (bytes and placement), one with the
          bytes on each device of ``axis_name``.
        """
        lines = [
            f"mesh {dict(self.mesh.shape)}, tables over {self.axis_name!r}, batch over "
            f"{self.batch_axis!r}"
        ]
        by_name = {t.name: t for t in tables}
        for name, kind, shard in self.placements:
            where = f"device {shard}" if kind == "table" else kind
            lines.append(f"  {name:<20} {by_name[name].nbytes:>14,d} B  {where}")
        lines.append(f"  per device: {self.device_bytes(tables)}")
        return "\n".join(lines)


def plan_sharding(
    tables: Sequence[TableConfig],
    mesh: Mesh,
    *,
    axis_name: sharding.AxisName,
    batch_axis: sharding.AxisName | None = None,
    overrides: Mapping[str, str] | None = None,
    row_threshold_bytes: int | None = None,
    device_budget_bytes: int | None = None,
    min_fill: float = 0.75,
) -> ShardingPlan:
    """Chooses a placement for every table from its size and the mesh.

    Args:
      tables: the collection's :class:`jaxbag.TableConfig` s.
      mesh: the device mesh.
      axis_name: mesh axis (or tuple) the tables are split over (``n`` devices).
      batch_axis: optional mesh axis the batch is split over (data parallelism).
      overrides: ``{table: "row" | "table" | "replicated"}`` forced placements.
      row_threshold_bytes: tables above this go row-wise (default ``total bytes / n``).
      device_budget_bytes: optional bytes of table storage allowed per device: larger tables go
        row-wise; if the plan still does not fit, table-wise tables not in ``overrides`` go
        row-wise one at a time, largest first, until it fits (row-wise is the smallest sharded
        placement of a big table; small ones pad less table-wise), at the end all of them; if
        that does not fit either, it raises.
      min_fill: table-wise tables of a group are kept only if they fill at least this fraction of
        the group's per-device blocks (else the group goes row-wise: less memory, same traffic).

    Returns:
      A :class:`ShardingPlan`; pass it to :func:`jaxbag.collection_layout` or the modules.

    Raises:
      ValueError: unknown tables or placements in ``overrides``, bad axes, or over budget.

    Examples:
      >>> import jax, jaxbag, jaxbag.sharding
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> tables = [jaxbag.TableConfig("big", 1000, 8, ("q",)),
      ...           jaxbag.TableConfig("small", 10, 8, ("s",))]
      >>> plan = jaxbag.sharding.plan_sharding(
      ...     tables, mesh, axis_name="model", overrides={"small": "replicated"})
      >>> plan.as_dict()
      {'big': 'table', 'small': 'replicated'}
    """
    tables = collection._check_tables(tables)
    sharding.check_axes(mesh, axis_name, batch_axis)
    n = sharding.axis_size(mesh, axis_name)
    overrides = dict(overrides or {})
    names = {t.name for t in tables}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"overrides names unknown tables {unknown}; tables are {sorted(names)}.")
    for name, kind in overrides.items():
        if kind not in PLACEMENTS:
            raise ValueError(
                f"overrides[{name!r}] must be one of {PLACEMENTS}; got {kind!r}, e.g. "
                f"overrides={{{name!r}: 'row'}}."
            )
    total = sum(t.nbytes for t in tables)
    threshold = total / n if row_threshold_bytes is None else row_threshold_bytes
    kinds = {}
    for t in tables:
        if t.name in overrides:
            kinds[t.name] = overrides[t.name]
        elif n > 1 and (
            t.nbytes > threshold
            or (device_budget_bytes is not None and t.nbytes > device_budget_bytes)
        ):
            kinds[t.name] = "row"
        else:
            kinds[t.name] = "table"

    plan = _assign(tables, kinds, overrides, mesh, axis_name, batch_axis, min_fill)
    if device_budget_bytes is None or max(plan.device_bytes(tables)) <= device_budget_bytes:
        return plan
    # Over budget: move table-wise tables (not forced by overrides) to row-wise, largest first,
    # until the plan fits. Row-wise is the smallest sharded placement of a big table (ceil(V / n)
    # rows per device), so the greedy table-wise packing can miss a budget that moving a few
    # tables meets; small tables stay table-wise (row-wise pads each to n rows at least). The
    # last candidate is every table not in overrides row-wise.
    candidate = plan
    for t in sorted(tables, key=lambda t: -t.nbytes):
        if t.name in overrides or candidate.placement(t.name)[0] != "table":
            continue
        kinds = {**candidate.as_dict(), t.name: "row"}
        candidate = _assign(tables, kinds, overrides, mesh, axis_name, batch_axis, min_fill)
        if max(candidate.device_bytes(tables)) <= device_budget_bytes:
            return candidate
    per = plan.device_bytes(tables)
    raise ValueError(
        f"the plan needs {max(per):,d} bytes of tables on one device, over "
        f"device_budget_bytes={device_budget_bytes:,d} (per device: {per}; with every table "
        f"not in overrides row-wise: {candidate.device_bytes(tables)}); place tables "
        "row-wise rather than replicated or table-wise in overrides, or use more devices."
    )


def _assign(tables, kinds, overrides, mesh, axis_name, batch_axis, min_fill) -> ShardingPlan:
    """The plan for ``kinds`` (``{table: kind}``): device indices of the table-wise tables."""
    kinds = dict(kinds)
    n = sharding.axis_size(mesh, axis_name)
    # Table-wise: largest first onto the device with the fewest rows of this group so far (its
    # stacked array's block is as big as the fullest device); ties -> fewest bytes overall, then
    # lowest index (round-robin for equal tables).
    shard_of: dict[str, int] = {}
    # row-wise tables weigh the same on every device
    device_total = [sum(t.nbytes // n for t in tables if kinds[t.name] == "row")] * n
    group_rows: dict[tuple, list[int]] = {}
    key = {t.name: collection.group_key(t) for t in tables}
    table_wise = [t for t in tables if kinds[t.name] == "table"]
    for t in sorted(table_wise, key=lambda t: -t.nbytes):
        rows = group_rows.setdefault(key[t.name], [0] * n)
        best = min(range(n), key=lambda i: (rows[i], device_total[i], i))
        shard_of[t.name] = best
        rows[best] += t.num_embeddings
        device_total[best] += t.nbytes
    # A group whose table-wise tables do not fill the devices' blocks (e.g. one table alone)
    # would pad every other device with unused rows: row-wise is then strictly smaller (same
    # communication), so such groups go row-wise unless the placement was forced.
    for gkey, rows in group_rows.items():
        members = [t for t in table_wise if key[t.name] == gkey]
        if n > 1 and sum(rows) < min_fill * n * max(rows):
            for t in members:
                if t.name not in overrides:
                    kinds[t.name] = "row"
                    shard_of.pop(t.name, None)
    return ShardingPlan(
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axis,
        placements=tuple((t.name, kinds[t.name], shard_of.get(t.name)) for t in tables),
    )
