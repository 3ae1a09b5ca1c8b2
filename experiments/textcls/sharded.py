r"""Data-parallel x row-sharded training of the fastText classifier (``jaxbag.sharding``).

The embedding table is split by rows over the ``model`` axis of a ``(data, model)`` mesh and the
batch over the ``data`` axis; the dense head is replicated (plain data parallelism, XLA inserts
the gradient all-reduce). Each device reads only its rows of the table; only pooled ``[B, D]``
bags are all-reduced over ``model``.

Run it on 8 simulated CPU devices (the flag must be set before jax starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m experiments.textcls.sharded --config configs/bbc_news_sharded.py \
        --workdir runs/bbc_news_sharded

(run as a program, this module sets both variables itself when they are missing). It is
``experiments.train`` itself: after ``build_model``, :func:`maybe_shard` swaps the model's
``jaxbag.nnx.EmbeddingBag`` for a :class:`ShardedEmbeddingBag` on the mesh of
``config.sharding`` (a no-op for configs without one).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

if __name__ == "__main__":  # before jax is imported: simulated devices for the mesh
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbag
import jaxbag.sharding as jsh
from experiments.textcls.model import FastText


class ShardedEmbeddingBag(nnx.Module):
    """``jaxbag.nnx.EmbeddingBag``'s call, with the table row-sharded over ``axis_name``.

    Legend: ``V`` rows (padded up to a multiple of the ``axis_name`` size), ``D`` features.

    Attributes:
      embedding: ``nnx.Param [V, D]``, ``NamedSharding(mesh, P(axis_name, None))``.
    """

    def __init__(
        self,
        table: jax.Array,
        *,
        mode: jaxbag.Mode,
        padding_idx: int | None,
        mesh: Mesh,
        axis_name: str,
        batch_axis: str | None,
    ) -> None:
        n = jsh.axis_size(mesh, axis_name)
        self.num_embeddings = int(table.shape[0])  # before padding: ids are < this
        self.embedding = nnx.Param(jsh.shard_table(jsh.pad_rows(table, n), mesh, axis_name))
        self.mode = mode
        self.padding_idx = padding_idx
        self.mesh = mesh
        self.axis_name = axis_name
        self.batch_axis = batch_axis

    def __call__(
        self,
        indices: jax.Array,
        offsets: jax.Array | None = None,
        per_sample_weights: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        num_bags: int | None = None,
    ) -> jax.Array:
        """``[B, D]`` bags, split over ``batch_axis``; arguments as ``jaxbag.embedding_bag``."""
        return jsh.embedding_bag(
            self.embedding[...],
            indices,
            offsets,
            mesh=self.mesh,
            axis_name=self.axis_name,
            batch_axis=self.batch_axis,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            padding_idx=self.padding_idx,
            segment_ids=segment_ids,
            num_bags=num_bags,
        )


def mesh_problem(sharding_config: Any, key: str = "config.sharding") -> str | None:
    """Why ``sharding_config``'s mesh cannot be built in this process (``None``: it can);
    ``key`` is where that config is (a study's ``config.base.sharding``)."""
    shape, names = tuple(sharding_config.mesh_shape), tuple(sharding_config.axis_names)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape):
        return (f"{key}.mesh_shape must be a tuple of positive ints (devices per mesh axis); got "
                f"{shape!r}. Pass --{key}.mesh_shape=\"(2, 4)\".")
    if len(names) != len(shape):
        return (f"{key}.axis_names must name each axis of mesh_shape={shape}; got {names!r}. "
                f"Pass --{key}.axis_names=\"('data', 'model')\" (one name per axis).")
    for field, allowed in (("row_axis", names), ("batch_axis", names + ("",))):
        if sharding_config[field] not in allowed:
            return (f"{key}.{field} must be one of {allowed!r} ({key}.axis_names"
                    f"{' or empty' if field == 'batch_axis' else ''}); got "
                    f"{sharding_config[field]!r}. Pass --{key}.{field}={names[-1]}.")
    need, have = math.prod(shape), len(jax.devices())
    if have < need:
        return (f"{key}.mesh_shape={shape} needs {need} devices, jax sees {have}. On CPU "
                f"simulate them: XLA_FLAGS=--xla_force_host_platform_device_count={need} (set "
                "before jax starts), or run python -m experiments.textcls.sharded.")
    return None


def make_mesh(sharding_config: Any) -> Mesh:
    """The ``(data, model)`` mesh of ``config.sharding`` (Auto axes: jit propagates shardings);
    ``ValueError`` with :func:`mesh_problem`'s message if it cannot be built here."""
    problem = mesh_problem(sharding_config)
    if problem is not None:
        raise ValueError(problem)
    shape = tuple(int(x) for x in sharding_config.mesh_shape)
    names = tuple(sharding_config.axis_names)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def maybe_shard(model: FastText, config: Any) -> FastText:
    """Puts ``model`` (an ``experiments.textcls.model.FastText``) on ``config.sharding``'s mesh.

    No-op when ``config`` has no ``sharding.mesh_shape``. Otherwise ``model.embed`` becomes a
    :class:`ShardedEmbeddingBag` holding the same table (padded with zero rows up to a multiple
    of the row-axis size), and every other parameter is replicated over the mesh. The model keeps
    its call signature, so the train and eval steps are unchanged.
    """
    sc = mesh_config(config)
    if sc is None:
        return model
    mesh = make_mesh(sc)  # (config.optim.sparse_embedding=False: checked with the config's values)
    embed = model.embed
    settings = embed.settings  # jaxbag.nnx.EmbeddingBag's options
    if settings.max_norm is not None or settings.scale_grad_by_freq:
        raise ValueError("the sharded classifier supports mode and padding_idx only.")
    # the same call as jaxbag.nnx.EmbeddingBag (duck-typed: FastText.embed is declared as that)
    model.embed = ShardedEmbeddingBag(  # type: ignore[assignment]
        embed.embedding[...],
        mode=settings.mode,
        padding_idx=settings.padding_idx,
        mesh=mesh,
        axis_name=sc.row_axis,
        batch_axis=sc.batch_axis or None,
    )
    nnx.update(model, _replicate_on(mesh, nnx.state(model, nnx.Param)))
    return model


def saved_table_rows(config: Any, num_embeddings: int) -> int:
    """The rows of the table a run of ``config`` saves: ``num_embeddings``, padded up to a
    multiple of the row axis' devices when ``config.sharding`` asks for a mesh (as
    :func:`maybe_shard` pads it)."""
    sc = mesh_config(config)
    if sc is None:
        return num_embeddings
    n = int(tuple(sc.mesh_shape)[tuple(sc.axis_names).index(sc.row_axis)])
    return -(-num_embeddings // n) * n


def mesh_config(config: Any) -> Any:
    """``config.sharding`` when it asks for a mesh (a ``mesh_shape``), else ``None``."""
    sc = config.get("sharding") if hasattr(config, "get") else None
    return sc if sc is not None and sc.get("mesh_shape") else None


def _replicate_on(mesh: Mesh, tree: Any) -> Any:
    """``tree`` with every array not already on ``mesh`` replicated over it."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: x
        if getattr(getattr(x, "sharding", None), "mesh", None) == mesh
        else jax.device_put(x, replicated),
        tree,
    )


def replicate(tree: Any, config: Any) -> Any:
    """``tree`` (optimizer state, metric sums) replicated over ``config.sharding``'s mesh.

    No-op without ``config.sharding``. The train step returns its scalars (step counts, metric
    sums) replicated over the mesh; passing fresh ones placed the same way keeps jit from
    compiling the step again for the first step and for each epoch's fresh metric sums.
    """
    sc = mesh_config(config)
    return tree if sc is None else _replicate_on(make_mesh(sc), tree)


def one_step_in_flight(config: Any) -> bool:
    """Whether the training loop must wait for each step before dispatching the next.

    True for a sharded config on the CPU backend. XLA:CPU (jaxlib 0.10) runs the per-device
    parts of a multi-device step on a pool of ``max(cores, devices)`` threads. With several
    steps queued by asynchronous dispatch, a thread dump of a hung run showed 6 of the 8 pool
    threads in an all-reduce and the other 2 waiting, inside the pool, on a device's limit of
    computations in flight: the devices the all-reduce waited for had no thread to run on,
    and XLA aborted the run after 40 s ("Termination timeout for all reduce"). On 8 simulated
    devices with the 2 cores kept busy by other processes, 12 of 21 full runs aborted so;
    with one step in flight, 1 of 112 (cause not found). GPU and TPU run each device's steps
    in order on its own stream and keep asynchronous dispatch.
    """
    return mesh_config(config) is not None and jax.default_backend() == "cpu"


def main() -> None:
    """``experiments.train``'s command line (8 simulated CPU devices set up above)."""
    from absl import app

    from experiments import train
    from experiments.textcls import runtime

    runtime.request_deterministic_ops()  # (before JAX starts its backend, as experiments.train)
    train.define_flags()
    app.run(train.main, flags_parser=train.parse_flags)


if __name__ == "__main__":
    main()
    sys.exit(0)
