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
devices' blocks evenly (``min_fill``; e.g. a lone table) goes row-wise instead, if that stores no
more (row-wise costs ``ceil(V_t / n)`` rows per device per table: more than the table-wise block
when many tables have fewer rows than devices, and such a group stays table-wise); the traffic is
the same. ``overrides`` forces a placement per table.

Cost model of this implementation (be aware): every device of ``axis_name`` receives all ids of
a group and masks those outside its rows (SPMD, no id routing), so compute per device is the same
for row-wise and table-wise; table-wise keeps a table, its gradient, optimizer state and sparse
updates on one device. Communication is one all-reduce of the ``[B, D]`` bags per group.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
from jax.sharding import Mesh

from jaxbag._src import collection, sharding, validation

__all__ = ["PLACEMENTS", "ShardingPlan", "plan_sharding"]

#: The placement kinds of a :class:`ShardingPlan` (``overrides`` values of :func:`plan_sharding`):
#: rows split over the row axis, a whole table on one device, or a copy on every device.
PLACEMENTS = ("row", "table", "replicated")

# Groups with at most this many tables not in ``overrides`` are searched exhaustively
# (``2**k`` choices) when a plan misses ``device_budget_bytes``.
_EXACT_TABLES = 12
# Bounds on the local search for larger groups: block evaluations, and evaluations times the
# group's tables (an evaluation's cost).
_LOCAL_SEARCH_STEPS = 20_000
_LOCAL_SEARCH_WORK = 2_000_000
_LOCAL_SEARCH_STARTS = 4


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where every table of a collection lives on the mesh (hashable; static).

    Attributes:
      mesh: the ``jax.sharding.Mesh``.
      axis_name: mesh axis (or tuple) the tables are split over.
      batch_axis: mesh axis (or tuple) the batch is split over, or ``None`` (replicated batch).
      placements: ``(table name, "row" | "table" | "replicated", device index or None)``.

    Build it with :func:`plan_sharding`; edited by hand (``dataclasses.replace``), it is checked
    on construction, and lists given for the axes or the placements become tuples (a plan is
    static: ``jit`` hashes it).

    Examples:
      >>> import jax, jaxbag, jaxbag.sharding
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> tables = [jaxbag.TableConfig("big", 1000, 8, ("q",))]
      >>> plan = jaxbag.sharding.plan_sharding(tables, mesh, axis_name="model",
      ...                                      overrides={"big": "row"})
      >>> plan.placement("big"), plan.num_shards, plan.device_bytes(tables)
      (('row', None), 1, [32000])
    """

    mesh: Mesh
    axis_name: sharding.AxisName
    batch_axis: sharding.AxisName | None
    placements: tuple[tuple[str, str, int | None], ...]

    def __post_init__(self) -> None:
        # A plan may be built or edited by hand (dataclasses.replace): check it as the planner
        # would. It is static (jit hashes it with the layout): lists where tuples are documented
        # become tuples (a list made an unhashable plan, refused deep inside JAX).
        for field in ("axis_name", "batch_axis"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        if not isinstance(self.placements, (tuple, list)):
            raise TypeError(
                "placements must be a tuple of (table name, kind, device index or None); got "
                f"{self.placements!r}, e.g. placements=(('big', 'row', None), ('small', 'table', "
                "0))."
            )
        sharding.check_axes(self.mesh, self.axis_name, self.batch_axis)
        n = self.num_shards
        seen = set()
        normalised = []
        for i, entry in enumerate(self.placements):
            try:
                name, kind, shard = entry
            except (TypeError, ValueError):
                raise ValueError(
                    f"placements[{i}] = {entry!r} must be (table name, kind, device index or None)."
                ) from None
            entry = tuple(entry)
            if not isinstance(name, str):
                raise TypeError(
                    f"placements[{i}] = {entry!r}: the table name must be a str (a "
                    f"TableConfig's name); got {name!r} of type {type(name).__name__}."
                )
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
            normalised.append((name, kind, None if shard is None else int(shard)))
        object.__setattr__(self, "placements", tuple(normalised))

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

    def device_bytes(self, tables: Sequence[collection.TableConfig]) -> list[int]:
        """Bytes of table storage on each of the ``n`` devices of ``axis_name`` (padding included)."""
        layout = collection.collection_layout(tables, plan=self)
        per = [0] * self.num_shards
        for g in layout.groups:
            size = g.shard_rows * g.features * jnp.dtype(g.dtype).itemsize
            for i in range(self.num_shards):
                per[i] += size
        return per

    def describe(self, tables: Sequence[collection.TableConfig]) -> str:
        """A readable table of placements and per-device bytes.

        Args:
          tables: the tables the plan was made for (a ``ValueError`` names any it does not
            place, or that it places but are not given).

        Returns:
          One line for the mesh and axes, one per table (bytes and placement), one with the
          bytes on each device of ``axis_name``.
        """
        tables = collection.check_tables(tables)
        check_plan_tables(self, tables)
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


def check_plan_tables(plan: ShardingPlan, tables: Sequence[collection.TableConfig]) -> None:
    """Raises unless ``plan`` places exactly ``tables`` (by name), as it does the tables it was
    made for: a missing placement, or one of a table not given (ignored otherwise)."""
    placed = [name for name, _, _ in plan.placements]
    given = [t.name for t in tables]
    placed_set, given_set = set(placed), set(given)
    missing = [name for name in given if name not in placed_set]
    if missing:
        raise ValueError(
            f"the plan has no placement for tables {missing}; build it from the same tables: "
            "jaxbag.sharding.plan_sharding(tables, mesh, axis_name=...)."
        )
    extra = [name for name in placed if name not in given_set]
    if extra:
        raise ValueError(
            f"the plan places tables {extra} that are not among the tables given {given}; pass "
            "the tables it was made for, or plan these: jaxbag.sharding.plan_sharding(tables, "
            "mesh, axis_name=...)."
        )


def plan_sharding(
    tables: Sequence[collection.TableConfig],
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
        placement of a big table; small ones pad less table-wise). If none of those steps fits,
        each group (tables of one width, dtype and mode; its block does not depend on the other
        groups) is searched on its own over which of its tables not in ``overrides`` go row-wise
        and which table-wise: every choice for a group of at most 12 such tables, else its
        ``k`` largest table-wise tables row-wise (any ``k``), one alone or all, improved by a
        bounded local search; the smallest block, fewest changes on ties. Which device each
        table-wise table goes to is not searched: it is chosen greedily (largest first onto the
        least loaded device of its group), which can miss a tighter packing. If that does not
        fit either (or the budget is under ``ceil(rows / n)`` per group, which no placement
        beats), it raises, saying the best placement found. The searches run only when the plan
        built with the budget's rule (tables larger than the budget row-wise) does not fit; one
        that fits is returned unchanged. ``min_fill`` applies to every plan searched. When the
        budget is tight, a plan built by hand may fit where the search's does not: set the
        devices yourself, ``plan = dataclasses.replace(plan, placements=(("a", "table", 0),
        ("b", "table", 1), ...))`` (checked on construction), and read
        ``plan.device_bytes(tables)``.
      min_fill: table-wise tables of a group are kept only if they fill at least this fraction of
        the group's per-device blocks; else the group goes row-wise, if that stores no more
        (the same traffic; many tables with fewer rows than devices stay table-wise).

    Returns:
      A :class:`ShardingPlan`; pass it to :func:`jaxbag.collection_layout` or the modules.

    Raises:
      TypeError: ``overrides`` is not a mapping ``{table name: kind}``.
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
    tables = collection.check_tables(tables)
    sharding.check_axes(mesh, axis_name, batch_axis)
    _check_numbers(row_threshold_bytes, device_budget_bytes, min_fill)
    n = sharding.axis_size(mesh, axis_name)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(
            f"overrides must be a mapping {{table name: {' | '.join(map(repr, PLACEMENTS))}}}; "
            f"got {overrides!r}, e.g. overrides={{{tables[0].name!r}: 'row'}}."
        )
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
    budget = device_budget_bytes
    if budget is None or max(plan.device_bytes(tables)) <= budget:
        return plan
    # Over budget: which tables not in overrides go row-wise. First the largest-first rule (the
    # same plans as before the search existed, in O(group size) per step); if it never fits, the
    # per-group search (exhaustive for small groups), which may also keep a table table-wise that
    # the threshold sent row-wise, and undoes min_fill's moves (a group min_fill sent row-wise
    # can fit once one table is out). Moves never touch overrides, and the found plan is rebuilt
    # by _assign and checked with device_bytes before it is returned.
    def fitting(found):  # the plan for the found kinds, if it fits
        if found is None:
            return None
        candidate = _assign(tables, found, overrides, mesh, axis_name, batch_axis, min_fill)
        return candidate if max(candidate.device_bytes(tables)) <= budget else None

    model = _BudgetModel(tables, overrides, n, min_fill)
    searched = None
    if model.lower_bound <= budget:  # else no placement fits (e.g. n = 1: all store the same)
        candidate = fitting(model.largest_first(plan.as_dict(), budget))
        if candidate is None:
            found, searched = model.per_group(kinds, budget)
            candidate = fitting(found)
        if candidate is not None:
            return candidate
    per = plan.device_bytes(tables)
    fixes = "raise device_budget_bytes, or use more devices."
    if searched is None:
        best = f"no placement of these tables and overrides needs less than {model.lower_bound:,d}"
    else:
        greedy = ("each table-wise table's device is chosen greedily (largest first onto the "
                  "least loaded device)")
        best = f"the search's best placement needs {searched:,d}: " + (
            "every row-wise / table-wise choice of the tables not in overrides was tried, but "
            f"{greedy}, which can miss a tighter packing"
            if model.complete else
            f"a heuristic search of the row-wise / table-wise choices (a group has more than "
            f"{_EXACT_TABLES} tables not in overrides), and {greedy}; none needs less than "
            f"{model.lower_bound:,d}"
        )
        example = ", ".join(f"({t.name!r}, 'table', {i % n})" for i, t in enumerate(tables[:2]))
        fixes = (
            "raise device_budget_bytes, use more devices, or build the plan by hand: plan = "
            "dataclasses.replace(jaxbag.sharding.plan_sharding(tables, mesh, axis_name="
            f"{axis_name!r}), placements=({example}{', ...' if len(tables) > 2 else ''})); "
            "print(plan.device_bytes(tables))."
        )
    raise ValueError(
        f"the plan needs {max(per):,d} bytes of tables on one device, over "
        f"device_budget_bytes={budget:,d} (per device: {per}; {best}). Tables in overrides are "
        "never moved: change their placements (row-wise stores least for a big table), " + fixes
    )


def _check_numbers(row_threshold_bytes, device_budget_bytes, min_fill) -> None:
    """Raises unless the planner's numbers are what its docstring says (before any planning)."""
    if row_threshold_bytes is not None:
        validation.check_nonnegative("row_threshold_bytes", row_threshold_bytes, "2**30",
                                     allowed="None or a number >= 0 (bytes)")
    if device_budget_bytes is not None:
        validation.check_nonnegative("device_budget_bytes", device_budget_bytes, "2**30",
                                     allowed="None or an int >= 0 (bytes)", integer=True)
    validation.check_nonnegative("min_fill", min_fill, "0.75", allowed="a number in [0, 1]",
                                 maximum=1)


def _assign(tables, kinds, overrides, mesh, axis_name, batch_axis, min_fill) -> ShardingPlan:
    """The plan for ``kinds`` (``{table: kind}``): ``min_fill``'s moves, then the device indices of
    the table-wise tables."""
    kinds = dict(kinds)
    n = sharding.axis_size(mesh, axis_name)
    key = {t.name: collection.group_key(t) for t in tables}
    rows = {t.name: t.num_embeddings for t in tables}
    padded = {t.name: -(-t.num_embeddings // n) for t in tables}  # row-wise, per device
    largest_first = sorted(tables, key=lambda t: -t.nbytes)
    # min_fill first, group by group: it depends only on the group's rows (_min_fill), not on
    # which device gets which table.
    table_wise: dict[tuple, list[str]] = {}
    for t in largest_first:
        if kinds[t.name] == "table":
            table_wise.setdefault(key[t.name], []).append(t.name)
    for names in table_wise.values():
        for name in _min_fill(names, rows, padded, overrides, n, min_fill)[1]:
            kinds[name] = "row"
    # Table-wise: largest first onto the device with the fewest rows of this group so far (its
    # stacked array's block is as big as the fullest device); ties -> fewest bytes overall, then
    # lowest index (round-robin for equal tables).
    shard_of: dict[str, int] = {}
    # row-wise tables weigh the same on every device
    device_total = [sum(t.nbytes // n for t in tables if kinds[t.name] == "row")] * n
    group_rows: dict[tuple, list[int]] = {}
    for t in largest_first:
        if kinds[t.name] != "table":
            continue
        loads = group_rows.setdefault(key[t.name], [0] * n)
        best = min(range(n), key=lambda i: (loads[i], device_total[i], i))
        shard_of[t.name] = best
        loads[best] += t.num_embeddings
        device_total[best] += t.nbytes
    return ShardingPlan(
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axis,
        placements=tuple((t.name, kinds[t.name], shard_of.get(t.name)) for t in tables),
    )


def _min_fill(
    table_wise: Sequence[str], rows: Mapping[str, int], padded: Mapping[str, int],
    overrides: Mapping[str, str], n: int, min_fill: float,
) -> tuple[int, list[str]]:
    """The ``min_fill`` rule for one group's table-wise tables (largest first): ``(rows per
    device they take, the tables it sends row-wise)``.

    Tables that fill less than ``min_fill`` of the group's per-device blocks (e.g. one table
    alone: every other device pads its block with unused rows) go row-wise, all but those forced
    table-wise by ``overrides`` -- only if that stores no more: row-wise costs ``ceil(V / n)``
    rows on every device per table, more than a table-wise block when many tables have fewer
    rows than devices. The forced tables left are placed after the move (``_assign``), so their
    block is ``_fullest`` of their rows alone.
    """
    if not table_wise:
        return 0, []
    sizes = [rows[name] for name in table_wise]
    top = _fullest(sizes, n)
    if n > 1 and sum(sizes) < min_fill * n * top:
        moved = [name for name in table_wise if name not in overrides]
        kept = [rows[name] for name in table_wise if name in overrides]
        after = sum(padded[name] for name in moved) + (_fullest(kept, n) if kept else 0)
        if moved and after <= top:
            return after, moved
    return top, []


def _fullest(rows: list[int], n: int) -> int:
    """Rows on the fullest of ``n`` devices after placing ``rows`` (largest first) each on a least
    loaded one, as ``_assign`` does. The loads' multiset, hence this maximum, is the same whichever
    tied device gets a table, so a group's block does not depend on the other groups (in _assign
    they only break ties)."""
    if len(rows) <= n:
        return rows[0]
    loads, top, total = [0] * n, 0, sum(rows)
    for r in rows:
        # Each table left goes where the load is at most the mean (total - r') / n, so it ends
        # below total / n + r' <= total / n + r: once that is <= top, the rest stays below top.
        if top * n >= total + n * r:
            break
        load = loads[0] + r
        heapq.heapreplace(loads, load)
        if load > top:
            top = load
    return top


class _BudgetModel:
    """Per-device bytes of the plan for ``{table: kind}``, group by group, without building it.

    Every device of ``axis_name`` holds the same bytes: per group one block of its row-wise tables'
    ``ceil(V / n)`` rows plus the fullest device's table-wise rows (``_fullest``; the ``min_fill``
    rule applied: ``_min_fill``), per replicated group all its rows. Moving a table changes only
    its group's block, so a search step costs that group's size, not the collection's.
    """

    def __init__(self, tables: Sequence[collection.TableConfig], overrides, n, min_fill):
        self.n, self.min_fill, self.overrides = n, min_fill, overrides
        self.seen: dict[tuple, tuple[int, list[str]]] = {}
        self.order = [t.name for t in sorted(tables, key=lambda t: -t.nbytes)]  # the move order
        self.rows = {t.name: t.num_embeddings for t in tables}
        self.padded = {t.name: -(-t.num_embeddings // n) for t in tables}  # row-wise, per device
        self.key = {t.name: collection.group_key(t) for t in tables}
        self.members: dict[tuple, list[str]] = {}  # group -> its tables, largest first
        for name in self.order:
            self.members.setdefault(self.key[name], []).append(name)
        by_name = {t.name: t for t in tables}
        self.row_bytes = {
            g: by_name[m[0]].features * jnp.dtype(by_name[m[0]].dtype).itemsize
            for g, m in self.members.items()
        }
        self.complete = True  # False once a search skipped a choice (see per_group)
        self.replicated = 0  # replicated tables of a group: one array with all their rows
        self.lower_bound = 0  # no plan stores less (see below)
        for g, members in self.members.items():
            rep = [self.rows[m] for m in members if overrides.get(m) == "replicated"]
            if rep:
                self.replicated += sum(rep) * self.row_bytes[g]
            if len(rep) < len(members):
                # sum ceil(V / n) over row-wise tables + the fullest device's table-wise rows
                # >= ceil(all sharded rows / n), whatever goes where
                sharded = sum(self.rows[m] for m in members) - sum(rep)
                self.lower_bound += max(-(-sharded // n), 1) * self.row_bytes[g]
        self.lower_bound += self.replicated

    def group_bytes(self, g, kinds) -> tuple[int, list[str]]:
        """(bytes of group ``g``'s sharded block, its tables ``min_fill`` sends row-wise)."""
        members = self.members[g]
        if all(kinds[name] == "replicated" for name in members):
            return 0, []
        row = sum(self.padded[name] for name in members if kinds[name] == "row")
        return self.block(g, row, [name for name in members if kinds[name] == "table"])

    def block(self, g, row, table_wise) -> tuple[int, list[str]]:
        """``group_bytes`` from ``row`` (rows of the row-wise tables per device) and the
        table-wise tables, largest first."""
        key = (g, row, tuple(table_wise))
        if key not in self.seen:  # the two searches meet the same states
            top, moved = _min_fill(table_wise, self.rows, self.padded, self.overrides, self.n,
                                   self.min_fill)
            self.seen[key] = max(row + top, 1) * self.row_bytes[g], moved
        return self.seen[key]

    def largest_first(self, kinds, budget) -> dict[str, str] | None:
        """The rule of old: from the plan's ``kinds``, table-wise tables not in ``overrides`` go
        row-wise one at a time, largest first (a group that ``min_fill`` sends row-wise stays so),
        until the plan fits; the fitting step's kinds, or ``None``."""
        kinds = dict(kinds)
        cost = {g: self.group_bytes(g, kinds)[0] for g in self.members}
        total = self.replicated + sum(cost.values())
        for name in self.order:
            if name in self.overrides or kinds[name] != "table":
                continue
            kinds[name] = "row"
            g = self.key[name]
            new, moved = self.group_bytes(g, kinds)
            if total - cost[g] + new <= budget:
                return kinds
            for m in moved:
                kinds[m] = "row"
            total += new - cost[g]
            cost[g] = new
        return None

    def per_group(self, kinds, budget) -> tuple[dict[str, str] | None, int]:
        """Each group on its own (a group's block depends only on its own tables): which of its
        free tables (not in ``overrides``) go row-wise, the others table-wise. A group with at
        most ``_EXACT_TABLES`` free tables tries every choice (``2**k``); a larger one tries,
        from the threshold's ``kinds``, its ``k`` largest table-wise free tables row-wise (any
        ``k``), one alone, or all, then a bounded local search from the best few of those (flip
        one table, or swap a row-wise and a table-wise one, while the block shrinks). Smallest
        block first, fewest changes from ``kinds`` on ties.

        Returns ``(kinds, total)``: the found kinds if the groups' sum ``total`` fits (else
        ``None``), and ``total``."""
        out, total = dict(kinds), self.replicated
        for g, members in self.members.items():
            if all(kinds[name] == "replicated" for name in members):
                continue
            free = [name for name in members if name not in self.overrides]
            size, _, row_set = self._best_rows(g, members, free, kinds)
            total += size
            for name in free:
                out[name] = "row" if name in row_set else "table"
        return (out if total <= budget else None), total

    def _best_rows(self, g, members, free, kinds) -> tuple[int, int, frozenset[str]]:
        """``(bytes, changes, row-wise free tables)`` of group ``g``'s best choice."""
        fixed_row = sum(self.padded[m] for m in members if self.overrides.get(m) == "row")
        forced = {m for m in members if self.overrides.get(m) == "table"}
        start = frozenset(m for m in free if kinds[m] == "row")

        def score(row_set) -> tuple[int, int, frozenset[str]]:
            row = fixed_row + sum(self.padded[m] for m in row_set)
            table_wise = [m for m in members if m in forced or (m in free and m not in row_set)]
            size = self.block(g, row, table_wise)[0]
            return size, len(row_set ^ start), row_set

        best: tuple[int, int, frozenset[str]] | None = None

        def consider(row_set) -> tuple[int, int, frozenset[str]]:
            nonlocal best
            found = score(frozenset(row_set))
            if best is None or found[:2] < best[:2]:
                best = found
            return found

        if len(free) <= _EXACT_TABLES:
            for r in range(len(free) + 1):
                for row_set in itertools.combinations(free, r):
                    consider(row_set)
            assert best is not None  # (the empty choice, at least)
            return best
        self.complete = False
        table_wise = [m for m in free if m not in start]  # largest first
        starts = [consider(free)]  # all row-wise: what min_fill reaches too
        starts += [consider(start.union(table_wise[:k])) for k in range(len(table_wise) + 1)]
        starts += [consider(start | {name}) for name in table_wise]
        # local search from the best few of those: flip one free table, or swap a row-wise one
        # with a table-wise one, while the block shrinks (first improvement; each step costs the
        # group's size, and the steps are bounded so that a huge group stays fast)
        evals = min(_LOCAL_SEARCH_STEPS, _LOCAL_SEARCH_WORK // len(members))
        ranked = sorted({f[2]: f for f in starts}.values(), key=lambda f: f[:2])
        for current in ranked[:_LOCAL_SEARCH_STARTS]:
            while evals > 0:
                moves = itertools.chain(
                    ({name} for name in free),
                    ({a, b} for a, b in itertools.combinations(free, 2)
                     if (a in current[2]) != (b in current[2])),
                )
                for move in itertools.islice(moves, evals):
                    evals -= 1
                    found = consider(current[2] ^ move)
                    if found[0] < current[0]:
                        current = found
                        break
                else:
                    break  # no move shrinks it (or the steps ran out)
        assert best is not None  # (every start was considered)
        return best
