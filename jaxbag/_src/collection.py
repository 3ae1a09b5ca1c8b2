"""EmbeddingBagCollection, functional core: many tables, many features, one gather per group.

Legend: ``B`` examples, ``K`` features, ``V_t``/``D_t`` rows/width of table ``t``, ``n`` shards.

Tables of equal width, dtype and mode are *stacked* into one ``[sum_t V_t, D]`` array (a group),
and each feature's ids are offset by its table's first row in the stack, so a batch does one
gather and one segment reduction per group instead of one per table (fbgemm's table-batched
embedding)::

    tables   user [3, D]   item [4, D]            stacked group "user+item" [7, D]
                                                   rows 0..2 = user, rows 3..6 = item
    features "u" -> user, "i" -> item, "i2" -> item (features may share a table)

    packed ids  [ u ids | i ids + 3 | i2 ids + 3 | padding ]    one embedding_bag call,
    bags        [ 0 .. B) [ B .. 2B) [ 2B .. 3B)                num_bags = 3B

With a :class:`jaxbag.sharding.ShardingPlan` a group is laid out for ``n`` shards: the stack is
cut into ``n`` equal blocks of ``R`` rows, a row-wise table puts ``ceil(V_t / n)`` rows in every
block, a table-wise table sits whole in one block, and the group is row-sharded
(``P(axis_name, None)``): table-wise and row-wise placements are both row sharding of the stack.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# (planner imports this module too: each refers to the other's names through the module object,
# never at import time, so either may be imported first)
from jaxbag._src import module_common, planner, sharding, validation
from jaxbag._src.jagged import JaggedFeatures, pack_features
from jaxbag._src.ops import embedding_bag
from jaxbag._src.validation import Mode


__all__ = [
    "CollectionLayout",
    "GroupLayout",
    "TableConfig",
    "collection_layout",
    "concat_features",
    "embedding_bag_collection",
    "init_collection",
    "pack_tables",
    "unpack_tables",
]

Initializer = Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """One embedding table of a collection and the features that look it up.

    Legend: ``V`` = ``num_embeddings``, ``D`` = ``features``.

    Attributes:
      name: unique table name.
      num_embeddings: ``V`` rows.
      features: ``D``, the width of a row (and of each of its features' outputs).
      feature_names: the input features (keys of :class:`jaxbag.JaggedFeatures`) looked up in
        this table; several features may share one table, a feature uses one table.
      mode: ``"sum"``, ``"mean"``, ``"max"`` or ``"sqrtn"``.
      padding_idx: optional row skipped in every bag (negative counts from the end); starts at 0.
      dtype: the table's dtype (float32, bfloat16, float16; float64 only with
        ``jax_enable_x64``), also its outputs' dtype.
      embedding_init: ``(key, shape, dtype) -> [V, D]`` initialiser (flax's ``nn.Embed`` default).

    Examples:
      >>> import jaxbag
      >>> t = jaxbag.TableConfig("item", num_embeddings=1000, features=16, feature_names=("item", "clicked"))
      >>> t.feature_names, t.mode
      (('item', 'clicked'), 'mean')
    """

    name: str
    num_embeddings: int
    features: int
    feature_names: tuple[str, ...]
    mode: Mode = "mean"
    padding_idx: int | None = None
    dtype: Any = jnp.float32
    embedding_init: Initializer = module_common.default_embed_init

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str; got name={self.name!r}.")
        names = self.feature_names
        if isinstance(names, str):
            names = (names,)
        if not np.iterable(names):  # (None, 5: tuple() would say only "not iterable")
            raise TypeError(
                f"table {self.name!r}: feature_names must be a non-empty tuple of str; got "
                f"{names!r}, e.g. feature_names=('{self.name}',)."
            )
        object.__setattr__(self, "feature_names", tuple(names))
        object.__setattr__(self, "dtype", self._checked_dtype())
        for field in ("num_embeddings", "features"):
            v = getattr(self, field)
            if not validation.is_static_int(v, 1):
                raise ValueError(
                    f"table {self.name!r}: {field} must be a positive int; got {v!r}."
                    + validation.static_int_hint(v)
                )
        if not self.feature_names or not all(isinstance(f, str) for f in self.feature_names):
            raise ValueError(
                f"table {self.name!r}: feature_names must be a non-empty tuple of str; got "
                f"{self.feature_names!r}, e.g. feature_names=('{self.name}',)."
            )
        twice = sorted({f for f in self.feature_names if self.feature_names.count(f) > 1})
        if twice:
            once = tuple(dict.fromkeys(self.feature_names))
            raise ValueError(
                f"table {self.name!r}: feature {twice[0]!r} is listed twice in feature_names="
                f"{self.feature_names!r}; list each feature once: feature_names={once!r}."
            )
        try:
            validation.check_mode(self.mode)
            validation.normalize_padding_idx(self.padding_idx, self.num_embeddings)
        except ValueError as e:
            raise ValueError(f"table {self.name!r}: {e}") from e

    def _checked_dtype(self) -> np.dtype:
        """``dtype`` as a NumPy dtype, or a TypeError: a float dtype that JAX can hold now."""
        example = f"TableConfig({self.name!r}, ..., dtype=jnp.float32)"
        if self.dtype is None:  # (jnp.dtype(None) is float64: None must not silently mean that)
            raise TypeError(
                f"table {self.name!r}: dtype must be a floating-point dtype (float32, bfloat16, "
                f"float16); got dtype=None. For example: {example}."
            )
        try:
            validation.check_float_dtype("dtype", self.dtype, example)
        except TypeError as e:
            raise TypeError(f"table {self.name!r}: {e}") from None
        got = jnp.dtype(self.dtype)
        check_x64(self.name, got)
        return got

    @property
    def pad(self) -> int | None:
        """``padding_idx`` in ``[0, V)`` (or ``None``)."""
        return validation.normalize_padding_idx(self.padding_idx, self.num_embeddings)

    @property
    def nbytes(self) -> int:
        """The table's size in bytes."""
        return self.num_embeddings * self.features * jnp.dtype(self.dtype).itemsize

    def init(self, key: Array) -> Array:
        """A fresh ``[V, D]`` table (padding row zeroed)."""
        table = self.embedding_init(key, (self.num_embeddings, self.features), self.dtype)
        if module_common.is_metadata_box(table):
            raise TypeError(
                f"table {self.name!r}: embedding_init returned a {type(table).__name__} (an "
                "initialiser wrapped in nn.with_partitioning / nnx.with_partitioning). A "
                "collection places its tables through a sharding plan instead: pass the bare "
                "initialiser and jaxbag.collection_layout(tables, plan=jaxbag.sharding."
                "plan_sharding(tables, mesh, axis_name=...))."
            )
        table = jnp.asarray(table, self.dtype)
        if self.pad is not None:
            table = table.at[self.pad].set(0)
        return table


@dataclasses.dataclass(frozen=True)
class TableSlot:
    """Where a table sits in its group (see the module docstring).

    ``kind``: ``"table"`` (whole, in block ``shard``) or ``"row"`` (``rows`` rows in every block).
    ``offset``: first row inside the block(s). ``rows``: rows per block used by the table.
    """

    table: TableConfig
    kind: str
    shard: int
    offset: int
    rows: int

    def stacked_ids(self, ids: Array | np.ndarray, shard_rows: int) -> Array | np.ndarray:
        """Maps table ids ``[0, V)`` to rows of the stacked group array (others unchanged)."""
        if self.kind == "row":
            return (ids // self.rows) * shard_rows + self.offset + ids % self.rows
        return ids + (self.shard * shard_rows + self.offset)


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """A stack of tables of one width, dtype and mode: one ``[num_shards * shard_rows, D]`` array.

    Attributes:
      name: the parameter name (table names joined by ``+``).
      features: ``D``.
      mode: the reduction.
      dtype: the array's dtype.
      slots: the tables' places.
      num_shards: ``n`` blocks (1 when not sharded).
      shard_rows: ``R`` rows per block.
      sharded: whether the array is row-sharded over the plan's ``axis_name`` (else replicated).
      pad_row: the stacked row standing for every table's ``padding_idx`` (or ``None``).
    """

    name: str
    features: int
    mode: Mode
    dtype: Any
    slots: tuple[TableSlot, ...]
    num_shards: int
    shard_rows: int
    sharded: bool

    @property
    def num_rows(self) -> int:
        """Rows of the stacked array, padding rows included."""
        return self.num_shards * self.shard_rows

    @property
    def pad_row(self) -> int | None:
        for slot in self.slots:
            if slot.table.pad is not None:
                return int(slot.stacked_ids(np.asarray(slot.table.pad, np.int64), self.shard_rows))
        return None

    def slot(self, table_name: str) -> TableSlot:
        for s in self.slots:
            if s.table.name == table_name:
                return s
        raise KeyError(table_name)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f for s in self.slots for f in s.table.feature_names)


@dataclasses.dataclass(frozen=True)
class CollectionLayout:
    """The static description of a collection: tables, features, groups, optional sharding plan.

    Build it with :func:`collection_layout`. Hashable: pass it as a static argument.

    Attributes:
      tables: the :class:`TableConfig` s.
      groups: the parameter arrays (one per table when ``stacked`` is false).
      feature_names: output order (table order, then each table's ``feature_names``).
      stacked: whether tables are stacked into groups.
      plan: the :class:`jaxbag.sharding.ShardingPlan`, or ``None`` (single device / replicated).
    """

    tables: tuple[TableConfig, ...]
    groups: tuple[GroupLayout, ...]
    feature_names: tuple[str, ...]
    stacked: bool
    plan: Any = None

    def table(self, name: str) -> TableConfig:
        """The :class:`TableConfig` named ``name`` (``KeyError`` listing the tables if none)."""
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"no table {name!r}; tables are {[t.name for t in self.tables]}.")

    def table_of(self, feature: str) -> TableConfig:
        """The table that ``feature`` looks up."""
        for t in self.tables:
            if feature in t.feature_names:
                return t
        raise KeyError(f"no table reads feature {feature!r}; features are {self.feature_names}.")

    def group_of(self, table_name: str) -> GroupLayout:
        """The :class:`GroupLayout` (one array of ``params``) that holds table ``table_name``."""
        for g in self.groups:
            if any(s.table.name == table_name for s in g.slots):
                return g
        raise KeyError(
            f"no table {table_name!r}; tables are {[t.name for t in self.tables]}.")

    @property
    def output_features(self) -> int:
        """``sum`` of the output widths: the concatenated output is ``[B, output_features]``."""
        return sum(self.table_of(f).features for f in self.feature_names)

    def param_specs(self) -> dict[str, P]:
        """``PartitionSpec`` of each parameter array: rows split over ``axis_name`` for a
        row-sharded group, replicated for the others (``P()`` for every group without a plan).

        In the form a jitted step returns (``sharding.canonical_spec``): on an Auto mesh
        ``P(axis_name)`` and ``P()`` (mesh axes of size 1 left out), on an Explicit mesh
        ``P(axis_name, None)`` and ``P(None, None)``; parameters placed in another, equivalent
        form would compile a training step a second time.
        """
        if self.plan is None:
            return {g.name: P() for g in self.groups}
        row = P(sharding.spec_entry(self.plan.axis_name), None)
        return {
            g.name: sharding.canonical_spec(self.plan.mesh, row if g.sharded else P(), 2)
            for g in self.groups
        }

    def param_shardings(self) -> dict[str, NamedSharding]:
        """``NamedSharding`` of each parameter array (needs a plan)."""
        if self.plan is None:
            raise ValueError("param_shardings needs a layout built with plan=...")
        return {k: NamedSharding(self.plan.mesh, s) for k, s in self.param_specs().items()}


def check_x64(name: str, dtype: np.dtype) -> None:
    """Raises unless JAX holds ``dtype`` as is now: without x64 a float64 table would be created
    as float32 (by :func:`init_collection` and the modules) and then refused as not float64."""
    held = jnp.dtype(jax.dtypes.canonicalize_dtype(dtype))
    if held != dtype:
        raise TypeError(
            f"table {name!r}: dtype={dtype.name} needs JAX's 64-bit mode, which is off (JAX would "
            f"create the table as {held.name}). Use dtype=jnp.float32, or enable x64 before "
            "building the tables: jax.config.update('jax_enable_x64', True)."
        )


def group_key(table: TableConfig) -> tuple[int, str, str]:
    """Tables with equal keys can be stacked: width, dtype and mode."""
    return (table.features, _dtype_name(table.dtype), table.mode)


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name  # ~6 us uncached: the planner asks T * T times


def check_tables(tables: Sequence[TableConfig]) -> tuple[TableConfig, ...]:
    if isinstance(tables, TableConfig):
        raise TypeError(
            f"tables must be a sequence of jaxbag.TableConfig; got one TableConfig "
            f"({tables.name!r}). Pass a list: tables=[TableConfig({tables.name!r}, ...)]."
        )
    try:
        tables = tuple(tables)
    except TypeError:
        raise TypeError(
            f"tables must be a non-empty sequence of jaxbag.TableConfig; got "
            f"{type(tables).__name__}."
        ) from None
    if not tables or not all(isinstance(t, TableConfig) for t in tables):
        raise TypeError(
            "tables must be a non-empty sequence of jaxbag.TableConfig; got "
            f"{[type(t).__name__ for t in tables]}."
        )
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"table names must be unique; got {names}.")
    for t in tables:  # (x64 may have been switched off since the tables were built)
        check_x64(t.name, t.dtype)
    seen: dict[str, str] = {}
    for t in tables:
        for f in t.feature_names:
            if f in seen:
                raise ValueError(
                    f"feature {f!r} is read by tables {seen[f]!r} and {t.name!r}; a feature maps "
                    "to one table (two features may share a table, not the reverse)."
                )
            seen[f] = t.name
    return tables


def collection_layout(
    tables: Sequence[TableConfig],
    *,
    stack: bool = True,
    plan: planner.ShardingPlan | None = None,
) -> CollectionLayout:
    """Groups ``tables`` into parameter arrays: stacked by (width, dtype, mode) or one per table.

    Args:
      tables: the :class:`TableConfig` s (unique names; a feature maps to one table).
      stack: stack tables of equal width, dtype and mode into one array (one gather per group);
        ``False`` keeps one array per table and does one lookup per feature (the plain path).
      plan: optional :class:`jaxbag.sharding.ShardingPlan` (from
        :func:`jaxbag.sharding.plan_sharding`); implies ``stack=True``. It must place exactly
        ``tables`` (a ``ValueError`` names a table it lacks, or one it places that is not given).

    Returns:
      A hashable :class:`CollectionLayout`.

    Examples:
      >>> import jaxbag
      >>> layout = jaxbag.collection_layout([
      ...     jaxbag.TableConfig("user", 100, 8, ("user",)),
      ...     jaxbag.TableConfig("item", 500, 8, ("item", "last_item")),
      ...     jaxbag.TableConfig("tag", 50, 4, ("tag",), mode="sum")])
      >>> [(g.name, g.num_rows) for g in layout.groups]
      [('user+item', 600), ('tag', 50)]
      >>> layout.feature_names, layout.output_features
      (('user', 'item', 'last_item', 'tag'), 28)
    """
    tables = check_tables(tables)
    validation.check_bool("stack", stack)
    if plan is not None and not isinstance(plan, planner.ShardingPlan):
        raise TypeError(
            f"plan must be a jaxbag.sharding.ShardingPlan or None; got {plan!r} of type "
            f"{type(plan).__name__}. Make one with jaxbag.sharding.plan_sharding(tables, mesh, "
            "axis_name=...); for one placement everywhere use its overrides={table: 'row'}."
        )
    features = tuple(f for t in tables for f in t.feature_names)
    if plan is None and not stack:
        unstacked = tuple(
            GroupLayout(
                name=t.name,
                features=t.features,
                mode=t.mode,
                dtype=t.dtype,
                slots=(TableSlot(t, "table", 0, 0, t.num_embeddings),),
                num_shards=1,
                shard_rows=t.num_embeddings,
                sharded=False,
            )
            for t in tables
        )
        return CollectionLayout(tables, unstacked, features, stacked=False, plan=None)

    placement = {}
    if plan is not None:
        planner.check_plan_tables(plan, tables)
        placement = {name: (kind, shard) for name, kind, shard in plan.placements}
    buckets: dict[tuple, list[TableConfig]] = {}
    for t in tables:
        kind = placement.get(t.name, ("table", 0))[0]
        buckets.setdefault(group_key(t) + (kind == "replicated",), []).append(t)

    groups: list[GroupLayout] = []
    for key, members in buckets.items():
        replicated = key[-1]
        n = 1 if (plan is None or replicated) else plan.num_shards
        slots, used = [], [0] * n
        row_wise = [t for t in members if n > 1 and placement[t.name][0] == "row"]
        row_names = {t.name for t in row_wise}
        offset = 0
        for t in row_wise:  # same offset in every block
            rows = -(-t.num_embeddings // n)
            slots.append(TableSlot(t, "row", 0, offset, rows))
            offset += rows
        used = [offset] * n
        for t in members:
            if t.name in row_names:
                continue
            shard = placement.get(t.name, ("table", 0))[1] if n > 1 else 0
            shard = 0 if shard is None else int(shard)
            slots.append(TableSlot(t, "table", shard, used[shard], t.num_embeddings))
            used[shard] += t.num_embeddings
        # Order slots as the tables were given (stable, readable); offsets are already fixed.
        order = {t.name: i for i, t in enumerate(members)}
        slots.sort(key=lambda s: order[s.table.name])
        groups.append(
            GroupLayout(
                name="+".join(t.name for t in members),
                features=members[0].features,
                mode=members[0].mode,
                dtype=members[0].dtype,
                slots=tuple(slots),
                num_shards=n,
                shard_rows=max(max(used), 1),
                sharded=plan is not None and not replicated,
            )
        )
    names = [g.name for g in groups]
    for name in names:
        if names.count(name) > 1:
            clash = [[t.name for t in members] for (_, members), g in zip(buckets.items(), groups)
                     if g.name == name]
            raise ValueError(
                f"two parameter arrays would both be named {name!r} (a group is named by joining its "
                f"tables' names with '+'): the groups of tables {clash}. Rename the table whose "
                f"name holds '+' (e.g. {name.replace('+', '_')!r})."
            )
    return CollectionLayout(tables, tuple(groups), features, stacked=True, plan=plan)


def _table_keys(layout: CollectionLayout, key: Array) -> dict[str, Array]:
    """One key per table, derived from its name: the same tables whatever the grouping."""
    return {
        t.name: jax.random.fold_in(key, zlib.crc32(t.name.encode()) & 0x7FFFFFFF)
        for t in layout.tables
    }


def pack_tables(layout: CollectionLayout, tables: Mapping[str, Array]) -> dict[str, Array]:
    """Builds the parameter arrays of ``layout`` from one ``[V_t, D_t]`` array per table.

    Args:
      layout: the collection layout.
      tables: ``{table name: [V_t, D_t]}`` for every table, each cast to its table's ``dtype``
        (a float32 array for a bfloat16 table becomes bfloat16).

    Returns:
      ``{group name: [num_rows, D]}`` in the tables' dtypes (block padding rows are zeros).
      Under ``jax.jit`` with ``out_shardings=layout.param_shardings()`` the result is created
      sharded.

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> layout = jaxbag.collection_layout([jaxbag.TableConfig("a", 2, 1, ("x",)),
      ...                                    jaxbag.TableConfig("b", 3, 1, ("y",))])
      >>> p = jaxbag.pack_tables(layout, {"a": jnp.zeros((2, 1)), "b": jnp.ones((3, 1))})
      >>> p["a+b"][:, 0].tolist()
      [0.0, 0.0, 1.0, 1.0, 1.0]
    """
    check_layout("pack_tables", layout)
    check_table_keys(layout, tables, "tables", "[V_t, D_t] array")
    return {g.name: pack_group(g, tables) for g in layout.groups}


def check_table_keys(layout: CollectionLayout, by_table: Mapping[str, Any], what: str,
                     each: str) -> None:
    """``by_table`` has exactly one entry per table of ``layout`` (KeyError / ValueError)."""
    names = [t.name for t in layout.tables]
    missing = [n for n in names if n not in by_table]
    unknown = sorted(set(by_table) - set(names))
    problems = [f"missing {missing}"] * bool(missing) + [f"not in the layout: {unknown}"] * bool(
        unknown)
    if problems:
        raise (KeyError if missing else ValueError)(
            f"{what} must have one {each} per table of the layout {names}; "
            f"{'; '.join(problems)}."
        )


def pack_group(
    g: GroupLayout,
    tables: Mapping[str, Array],
    *,
    row_shape: tuple[int, ...] | None = None,
    dtype: Any = None,
    what: str = "table",
) -> Array:
    """The ``[num_rows, *row_shape]`` array of group ``g`` from ``{table name: [V_t, *row_shape]}``.

    ``row_shape`` defaults to ``(D,)`` and ``dtype`` to the group's (the tables); block padding
    rows are zeros. ``what`` names the arrays in errors.
    """
    row_shape = (g.features,) if row_shape is None else tuple(row_shape)
    dtype = g.dtype if dtype is None else dtype
    blocks = []
    for s in range(g.num_shards):
        parts = []
        for slot in sorted(g.slots, key=lambda x: x.offset):
            t = slot.table
            arr = jnp.asarray(tables[t.name])
            if arr.shape != (t.num_embeddings, *row_shape):
                raise ValueError(
                    f"{what} {t.name!r} must have shape {(t.num_embeddings, *row_shape)}; got "
                    f"{arr.shape}."
                )
            arr = arr.astype(dtype)
            if slot.kind == "row":
                padded = sharding.pad_rows(arr, g.num_shards)
                parts.append(padded[s * slot.rows : (s + 1) * slot.rows])
            elif slot.shard == s:
                parts.append(arr)
        used = sum(p.shape[0] for p in parts)
        parts.append(jnp.zeros((g.shard_rows - used, *row_shape), dtype))
        blocks.append(jnp.concatenate(parts, axis=0))
    return jnp.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]


def init_group(layout: CollectionLayout, g: GroupLayout, key: Array) -> Array:
    """Group ``g``'s part of :func:`init_collection` (the same tables for the same ``key``)."""
    keys = _table_keys(layout, key)
    return pack_group(g, {s.table.name: s.table.init(keys[s.table.name]) for s in g.slots})


def unpack_tables(layout: CollectionLayout, params: Mapping[str, Array]) -> dict[str, Array]:
    """The inverse of :func:`pack_tables`: ``{table name: [V_t, D_t]}`` from the group arrays.

    Args:
      layout: the collection layout.
      params: ``{group name: [num_rows, D]}``.

    Returns:
      ``{table name: [V_t, D_t]}``, one array per table (padding rows of the stacking dropped).

    Examples:
      >>> import jax, jaxbag
      >>> layout = jaxbag.collection_layout([jaxbag.TableConfig("a", 4, 2, ("x",)),
      ...                                    jaxbag.TableConfig("b", 6, 2, ("y",))])
      >>> tables = jaxbag.unpack_tables(layout, jaxbag.init_collection(layout, jax.random.key(0)))
      >>> {name: t.shape for name, t in tables.items()}
      {'a': (4, 2), 'b': (6, 2)}
    """
    check_layout("unpack_tables", layout)
    check_params(layout, params, check_dtype=False)  # (each table keeps the array's dtype)
    rows = unpack_rows(layout, {g.name: [params[g.name]] for g in layout.groups})
    return {name: arrays[0] for name, arrays in rows.items()}


@functools.partial(jax.jit, static_argnums=0)
def unpack_rows(
    layout: CollectionLayout, arrays: dict[str, list[Array]]
) -> dict[str, list[Array]]:
    """Each group's ``[num_rows, ...]`` arrays cut into its tables' ``[V_t, ...]`` rows.

    ``{group name: [arrays]}`` -> ``{table name: [arrays]}`` (same order), as one program. On an
    Explicit-axes mesh the arrays are first made replicated: slices of a row-sharded array that
    do not split evenly are sharding type errors.
    """
    out: dict[str, list[Array]] = {s.table.name: [] for g in layout.groups for s in g.slots}
    for g in layout.groups:
        r = g.shard_rows
        for arr in arrays[g.name]:
            if layout.plan is not None:
                arr = sharding.place(arr, layout.plan.mesh, P())
            for slot in g.slots:
                t = slot.table
                if slot.kind == "row":
                    pieces = [
                        arr[s * r + slot.offset : s * r + slot.offset + slot.rows]
                        for s in range(g.num_shards)
                    ]
                    out[t.name].append(jnp.concatenate(pieces, axis=0)[: t.num_embeddings])
                else:
                    start = slot.shard * r + slot.offset
                    out[t.name].append(arr[start : start + t.num_embeddings])
    return out


def init_collection(layout: CollectionLayout, key: Array) -> dict[str, Array]:
    """Fresh parameters for ``layout``: ``{group name: [num_rows, D]}``.

    Each table is initialised from its own key (derived from ``key`` and the table's name), so
    stacked, unstacked and sharded layouts of the same tables start from the same tables (so do
    the linen and NNX collection modules for one init key or ``nnx.Rngs``, whatever their
    layout; their tables differ from ``init_collection(layout, key)``'s, as flax derives the
    modules' keys from theirs). With a
    plan the arrays are created directly in their sharding (``jit`` with ``out_shardings``).

    Args:
      layout: the collection layout.
      key: a ``jax.random`` key.

    Returns:
      The parameter dict, each array in its group's dtype (and, with a plan, sharding).

    Examples:
      >>> import jax, jaxbag
      >>> layout = jaxbag.collection_layout([jaxbag.TableConfig("a", 4, 2, ("x",)),
      ...                                    jaxbag.TableConfig("b", 6, 2, ("y",))])
      >>> {name: a.shape for name, a in jaxbag.init_collection(layout, jax.random.key(0)).items()}
      {'a+b': (10, 2)}
    """

    check_layout("init_collection", layout)
    # Always one jitted program, so the unsharded tables equal the sharded ones bit for bit
    # (eagerly, the initialisers can round differently from their fused jitted form).
    if layout.plan is None:
        return _init_params(layout, key)
    shardings = layout.param_shardings()
    return jax.jit(_make_params, static_argnums=0, out_shardings=shardings)(layout, key)


def _make_params(layout: CollectionLayout, key: Array) -> dict[str, Array]:
    return {g.name: init_group(layout, g, key) for g in layout.groups}


_init_params = jax.jit(_make_params, static_argnums=0)


def check_features(layout: CollectionLayout, jf: JaggedFeatures) -> None:
    if not isinstance(jf, JaggedFeatures):
        raise TypeError(
            f"features must be a jaxbag.JaggedFeatures; got {type(jf).__name__}. Build one with "
            "jaxbag.JaggedFeatures.from_lists({'feature': [[ids of example 0], ...], ...})."
        )
    missing = [f for f in layout.feature_names if f not in jf.keys]
    if missing:
        raise KeyError(
            f"features {missing} are read by the collection's tables but missing from the input, "
            f"whose keys are {jf.keys}."
        )
    if validation.is_concrete(jf.values, jf.lengths):
        with jax.ensure_compile_time_eval():
            values, lengths = np.asarray(jf.values), np.asarray(jf.lengths)
        s, b = jf.num_shards, jf.batch_size
        t, bs = jf.shard_capacity, b // s
        for f in layout.feature_names:
            table = layout.table_of(f)
            i = jf.index(f)
            for sh in range(s):
                n = int(lengths[i, sh * bs : (sh + 1) * bs].sum())
                start = sh * t + jf.key_offset(f)
                ids = values[start : start + n]
                bad = np.flatnonzero((ids < 0) | (ids >= table.num_embeddings))
                if bad.size:
                    p = int(bad[0])  # -> its example, and its place in that example's bag
                    ends = np.cumsum(lengths[i, sh * bs : (sh + 1) * bs])
                    k = int(np.searchsorted(ends, p, side="right"))
                    within = p - (int(ends[k - 1]) if k else 0)
                    raise IndexError(
                        f"feature {f!r} (table {table.name!r}, num_embeddings="
                        f"{table.num_embeddings}) has id {int(ids[p])} in example {sh * bs + k} "
                        f"(its id {within}; features.values[{start + p}]); ids must be in "
                        f"[0, {table.num_embeddings})."
                        + validation.clipped_id_note(values.dtype, int(ids[p]))
                    )


def check_params(
    layout: CollectionLayout, params: Mapping[str, Array], *, check_dtype: bool = True
) -> None:
    """Every group's array is there, ``[num_rows, D]`` (of the tables' dtype with
    ``check_dtype``); static checks."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a dict {{group name: array}}; got {type(params).__name__}. Build it "
            "with jaxbag.init_collection(layout, key) or jaxbag.pack_tables(layout, {table: array})."
        )
    missing = [g.name for g in layout.groups if g.name not in params]
    if missing:
        raise KeyError(
            f"params has no array for the groups {missing}; the layout's parameter names are "
            f"{[g.name for g in layout.groups]} (got {sorted(params)}). Build params with "
            "jaxbag.init_collection(layout, key) or jaxbag.pack_tables(layout, {table: array})."
        )
    for g in layout.groups:
        arr = params[g.name]
        want = (g.num_rows, g.features)
        dtype_ok = not check_dtype or jnp.dtype(jnp.result_type(arr)) == jnp.dtype(g.dtype)
        if tuple(jnp.shape(arr)) != want or not dtype_ok:
            tables = [s.table.name for s in g.slots]
            raise ValueError(
                f"params[{g.name!r}] (tables {tables}) must be {jnp.dtype(g.dtype).name} {list(want)}; "
                f"got {jnp.dtype(jnp.result_type(arr)).name} {list(jnp.shape(arr))}. Build it with "
                "jaxbag.init_collection(layout, key) or jaxbag.pack_tables(layout, {table: array})."
            )


def group_ids(g: GroupLayout, layout: CollectionLayout, keys: Sequence[str]):
    """The per-slot id transform into stacked rows: out-of-range ids -> -1, padding -> pad_row."""
    pad_row = g.pad_row

    def transform(j: int, ids: Array) -> Array:
        t = layout.table_of(keys[j])
        slot = g.slot(t.name)
        ids = validation.to_int32(ids, 0, t.num_embeddings - 1, -1)  # int64: no wrap into range
        ok = (ids >= 0) & (ids < t.num_embeddings)
        out = jnp.where(ok, slot.stacked_ids(ids, g.shard_rows).astype(jnp.int32), -1)
        if t.pad is not None:
            out = jnp.where(ids == t.pad, jnp.int32(pad_row), out)
        return out

    return transform


def check_no_max_weights(g: GroupLayout, keys: Sequence[str], jf: JaggedFeatures) -> None:
    """A ``max`` group takes no per-id weights (as torch)."""
    if g.mode == "max" and jf.weights is not None:
        raise ValueError(
            f"the features {list(keys)} use mode='max' tables, which take no per-id weights (as "
            "torch); build the JaggedFeatures without weights, or use mode='sum'/'mean'/'sqrtn' "
            "tables. "
            "To mix weighted features with max tables, use two collections over two "
            "JaggedFeatures (TorchRec's EmbeddingBagCollection and its weighted twin)."
        )


def _lookup_group(
    g: GroupLayout,
    layout: CollectionLayout,
    weight: Array,
    jf: JaggedFeatures,
    sharded_axis: Any = None,
) -> dict[str, Array]:
    """One packed lookup for all features of group ``g``; splits the ``[F * B, D]`` result."""
    keys = g.feature_names
    check_no_max_weights(g, keys, jf)
    ids, seg, w = pack_features(jf, keys, group_ids(g, layout, keys))
    b = jf.batch_size
    num_bags = len(keys) * b
    if sharded_axis is not None:
        out = sharding.embedding_bag_in_shard_map(
            weight,
            ids,
            seg,
            num_bags=num_bags,
            num_embeddings=g.num_rows,
            axis_name=sharded_axis,
            mode=g.mode,
            per_sample_weights=w,
            padding_idx=g.pad_row,
        )
    else:
        out = embedding_bag(
            weight,
            ids,
            segment_ids=seg,
            num_bags=num_bags,
            mode=g.mode,
            per_sample_weights=w,
            padding_idx=g.pad_row,
        )
    return {f: out[j * b : (j + 1) * b] for j, f in enumerate(keys)}


def _lookup_unstacked(layout, params, jf) -> dict[str, Array]:
    for g in layout.groups:  # (one group per table here)
        check_no_max_weights(g, g.feature_names, jf)
    out = {}
    for f in layout.feature_names:
        t = layout.table_of(f)
        ids, seg, w = pack_features(jf, [f])
        out[f] = embedding_bag(
            params[t.name],
            ids,
            segment_ids=seg,
            num_bags=jf.batch_size,
            mode=t.mode,
            per_sample_weights=w,
            padding_idx=t.pad,
        )
    return out


def check_output_dtype(dtype: Any) -> None:
    """Raises unless ``dtype`` (of a concatenated output) is ``None`` or a floating-point dtype."""
    if dtype is not None:
        validation.check_float_dtype("dtype", dtype, "dtype=jnp.float32 (or None: the tables' own)")


def concat_features(
    layout: CollectionLayout, outputs: Mapping[str, Array], dtype: Any = None
) -> Array:
    """Concatenates outputs ``{feature: [B, D_f]}`` into ``[B, sum D_f]`` (``feature_names`` order).

    Args:
      layout: the collection layout.
      outputs: ``{feature: [B, D_f]}`` for every feature of the layout (others are ignored).
      dtype: the output dtype; ``None``: the outputs' dtype if they all share one, else float32.

    Returns:
      ``[B, layout.output_features]``.

    Raises:
      ValueError: a feature missing from ``outputs``, or an output that is not ``[B, D_f]``
        (another width, or another ``B`` than the other features').

    Examples:
      >>> import jax.numpy as jnp, jaxbag
      >>> layout = jaxbag.collection_layout([jaxbag.TableConfig("a", 4, 2, ("x",)),
      ...                                    jaxbag.TableConfig("b", 4, 3, ("y",))])
      >>> jaxbag.concat_features(layout, {"y": jnp.ones((1, 3)), "x": jnp.zeros((1, 2))}).tolist()
      [[0.0, 0.0, 1.0, 1.0, 1.0]]
    """
    check_layout("concat_features", layout)
    check_output_dtype(dtype)
    check_outputs(layout, outputs)
    if dtype is None:
        dtypes = {jnp.dtype(outputs[f].dtype) for f in layout.feature_names}
        dtype = dtypes.pop() if len(dtypes) == 1 else jnp.float32
    return jnp.concatenate([outputs[f].astype(dtype) for f in layout.feature_names], axis=1)


def check_outputs(layout: CollectionLayout, outputs: Mapping[str, Array]) -> None:
    """``outputs`` holds a ``[B, D_f]`` array for every feature of ``layout``, with one ``B``."""
    names = layout.feature_names
    if not isinstance(outputs, Mapping):
        raise TypeError(
            f"outputs must be a dict {{feature: [B, D_f] array}} for the features {list(names)}; "
            f"got {type(outputs).__name__}. Pass what jaxbag.embedding_bag_collection(params, "
            "features, layout=layout) returns."
        )
    first = None
    for f in names:
        d = layout.table_of(f).features
        if f not in outputs:
            raise ValueError(
                f"outputs has no feature {f!r}: concat_features needs a [B, {d}] array for every "
                f"feature of the layout {list(names)}; got the features {list(outputs)}."
            )
        shape = tuple(jnp.shape(outputs[f]))
        if len(shape) != 2 or shape[1] != d:
            raise ValueError(
                f"outputs[{f!r}] must be [B, D] = [B, {d}] (D the width of table "
                f"{layout.table_of(f).name!r}); got shape {shape}."
            )
        if first is None:
            first = (f, shape[0])
        elif shape[0] != first[1]:
            raise ValueError(
                f"outputs[{f!r}] must be [B, {d}] with the batch of outputs[{first[0]!r}], "
                f"B={first[1]}; got shape {shape}. Every feature's output has one row per example."
            )


def check_layout(fn: str, layout: Any) -> None:
    """``layout`` is a :class:`CollectionLayout` (not, say, the list of tables it is built from)."""
    if not isinstance(layout, CollectionLayout):
        got = type(layout).__name__
        if isinstance(layout, (list, tuple)) and any(isinstance(t, TableConfig) for t in layout):
            got = f"a {got} of TableConfig"
        raise TypeError(
            f"{fn}: layout must be a jaxbag.CollectionLayout; got {got}. Build it from the tables "
            "once with layout = jaxbag.collection_layout(tables), and pass layout=layout."
        )


@overload
def embedding_bag_collection(
    params: Mapping[str, Array], features: JaggedFeatures, *, layout: CollectionLayout,
    concat: Literal[False] = False, dtype: Any = None,
) -> dict[str, Array]: ...
@overload
def embedding_bag_collection(
    params: Mapping[str, Array], features: JaggedFeatures, *, layout: CollectionLayout,
    concat: Literal[True], dtype: Any = None,
) -> Array: ...
@overload
def embedding_bag_collection(
    params: Mapping[str, Array], features: JaggedFeatures, *, layout: CollectionLayout,
    concat: bool, dtype: Any = None,
) -> dict[str, Array] | Array: ...
def embedding_bag_collection(
    params: Mapping[str, Array],
    features: JaggedFeatures,
    *,
    layout: CollectionLayout,
    concat: bool = False,
    dtype: Any = None,
) -> dict[str, Array] | Array:
    """Looks up and reduces every feature of ``features`` in its table.

    Legend: ``B`` examples, ``D_f`` the width of feature ``f``'s table.

    Args:
      params: ``{group name: array}`` from :func:`init_collection` or :func:`pack_tables`.
      features: a :class:`jaxbag.JaggedFeatures` holding (at least) ``layout.feature_names``.
        With a plan whose ``batch_axis`` is set, build it with ``num_shards`` equal to that axis'
        size.
      layout: the :class:`CollectionLayout`.
      concat: return one ``[B, sum D_f]`` array (``feature_names`` order) instead of a dict.
      dtype: dtype of the concatenated output (see :func:`concat_features`).

    Returns:
      ``{feature: [B, D_f]}`` in each table's dtype (empty bags are zeros), or the concatenation.
      With a plan, outputs are sharded ``P(batch_axis, None)``.

    Raises:
      IndexError: eagerly, an id outside ``[0, V_t)`` of its feature's table, naming the feature,
        the table, the id and its position. Under ``jit`` such an id is skipped: it never
        reads a row of another table in the same group (nor ``padding_idx``'s row).

    Examples:
      >>> import jax, jaxbag
      >>> table = jaxbag.TableConfig("t", 10, 4, ("a", "b"), mode="sum")
      >>> layout = jaxbag.collection_layout([table])
      >>> params = jaxbag.init_collection(layout, jax.random.key(0))
      >>> jf = jaxbag.JaggedFeatures.from_lists({"a": [[1, 2], []], "b": [[3], [3, 3]]})
      >>> out = jaxbag.embedding_bag_collection(params, jf, layout=layout)
      >>> bool((out["b"][1] == 2 * params["t"][3]).all()), out["a"][1].tolist()
      (True, [0.0, 0.0, 0.0, 0.0])
      >>> jaxbag.embedding_bag_collection(params, jf, layout=layout, concat=True).shape
      (2, 8)
    """
    check_layout("embedding_bag_collection", layout)
    validation.check_bool("concat", concat)
    check_output_dtype(dtype)
    check_features(layout, features)
    check_params(layout, params)
    if layout.plan is not None:
        out = apply_sharded(layout, params, features)
    elif not layout.stacked:
        out = _lookup_unstacked(layout, params, features)
    else:
        out = {}
        for g in layout.groups:
            out.update(_lookup_group(g, layout, params[g.name], features))
        out = {f: out[f] for f in layout.feature_names}
    if concat:
        return concat_features(layout, out, dtype)
    return out


def feature_specs(jf: JaggedFeatures, batch_axis: Any) -> JaggedFeatures:
    """The ``PartitionSpec`` s of a :class:`jaxbag.JaggedFeatures` split over ``batch_axis``.

    Args:
      jf: the features (only their structure is used).
      batch_axis: the mesh axis (or tuple, or ``None``) the batch is split over.

    Returns:
      A ``JaggedFeatures``-shaped pytree of ``PartitionSpec`` s (``values`` and ``weights``
      ``P(batch_axis)``, ``lengths [K, B]`` ``P(None, batch_axis)``), e.g. for ``shard_map``'s
      ``in_specs`` or ``jax.device_put``.

    Examples:
      >>> import jaxbag, jaxbag.sharding
      >>> jf = jaxbag.JaggedFeatures.from_lists({"x": [[1], [2, 3]]}, num_shards=2)
      >>> specs = jaxbag.sharding.feature_specs(jf, "data")
      >>> specs.values, specs.lengths
      (P('data',), P(None, 'data'))
    """
    b = sharding.spec_entry(batch_axis)
    leaves, aux = jf.tree_flatten()
    specs = (P(b), P(None, b), None if jf.weights is None else P(b))
    del leaves
    return JaggedFeatures.tree_unflatten(aux, specs)


def check_batch_shards(plan: planner.ShardingPlan, jf: JaggedFeatures) -> None:
    """The features are split as the plan splits the batch (``num_shards`` = batch-axis size)."""
    batch_axis = plan.batch_axis
    n_batch = sharding.axis_size(plan.mesh, batch_axis)
    if batch_axis is not None and jf.num_shards != n_batch:
        raise ValueError(
            f"the plan splits the batch over batch_axis={batch_axis!r} ({n_batch} devices) but the "
            f"features have num_shards={jf.num_shards}; build them with "
            f"JaggedFeatures.from_lists(..., num_shards={n_batch})."
        )
    if batch_axis is None and jf.num_shards != 1:
        raise ValueError(
            f"the plan has batch_axis=None (replicated batch) but the features have num_shards="
            f"{jf.num_shards}; build them with num_shards=1 or plan with batch_axis=..."
        )


def one_shard(jf_local: JaggedFeatures, batch_axis: Any) -> JaggedFeatures:
    """Inside ``shard_map`` over :func:`feature_specs`: this device's block of the features as a
    one-shard ``JaggedFeatures`` (unchanged when the batch is not split)."""
    if batch_axis is None:
        return jf_local
    leaves, (keys, caps, _) = jf_local.tree_flatten()
    return JaggedFeatures.tree_unflatten((keys, caps, 1), leaves)


def apply_sharded(layout, params, jf) -> dict[str, Array]:
    """The planned lookup: one ``shard_map``, each device its batch shard's features."""
    plan = layout.plan
    mesh, axis_name, batch_axis = plan.mesh, plan.axis_name, plan.batch_axis
    check_batch_shards(plan, jf)
    param_specs = layout.param_specs()
    params = {g.name: params[g.name] for g in layout.groups}
    in_specs = (param_specs, feature_specs(jf, batch_axis))
    out_spec = P(sharding.spec_entry(batch_axis), None)
    out_specs = {f: out_spec for f in layout.feature_names}
    local_layout = dataclasses.replace(layout, plan=None)

    def local(params, jf_local):
        jf_local = one_shard(jf_local, batch_axis)
        out = {}
        for g in layout.groups:
            axis = axis_name if g.sharded else None
            out.update(_lookup_group(g, local_layout, params[g.name], jf_local, axis))
        return {f: out[f] for f in layout.feature_names}

    args = sharding.place((params, jf), mesh, in_specs)
    return sharding.shard_map_call(local, mesh, in_specs, out_specs, *args)

