"""Per-epoch checkpoints with orbax ``CheckpointManager``: save, resume, load params.

A checkpoint (step = the number of finished epochs) holds four items:

* ``params``: the model parameters as a pure nested dict (what ``predict`` loads);
* ``opt_state``: the optax state (moments and step counts);
* ``rng``: the raw key data of the training PRNG key (dropout keys are folded from it);
* ``meta``: JSON ``{"epoch", "global_step", "vocab_sha256", "rng_impl"}``: ``vocab_sha256`` is
  the SHA-256 of the workdir's ``vocab.json`` at save time, so that a vocabulary edited in place
  is named on resume and by ``predict`` even when the table keeps its shape; ``rng_impl`` names
  the PRNG implementation of the key (``threefry2x32``, ``rbg``, ...), so that a resume under
  another ``JAX_DEFAULT_PRNG_IMPL`` is named as that, not as a damaged checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from experiments.textcls.artifacts import VOCAB
from experiments.textcls.data import file_sha256


@dataclasses.dataclass
class TrainState:
    """What training carries from step to step (and what a checkpoint restores)."""

    params: nnx.State
    opt_state: Any
    rng: jax.Array  # a typed PRNG key
    epoch: int = 0  # finished epochs
    global_step: int = 0


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).resolve() / "checkpoints"


def make_manager(workdir: str | Path, *, max_to_keep: int = 2, reader: bool = False) -> ocp.CheckpointManager:
    """The workdir's manager: the training run's (``reader=False``: creates the directory and
    removes what a save interrupted by a kill left behind), or a reader's (``predict``,
    :func:`has_checkpoint`), which writes and deletes nothing: a reader running while training
    saves must not remove the save in progress (it used to, and the training run crashed)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not reader,
        cleanup_tmp_directories=not reader,
        # Saves are synchronous: training donates nothing to a background writer,
        # and a run killed right after an epoch still has that epoch on disk.
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_names=("params", "opt_state", "rng", "meta"),
    )


def _vocab_sha256(manager: ocp.CheckpointManager) -> str | None:
    """The SHA-256 of the ``vocab.json`` beside the manager's ``checkpoints`` directory."""
    path = Path(manager.directory).parent / VOCAB
    return file_sha256(path) if path.is_file() else None


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
    meta = {"epoch": state.epoch, "global_step": state.global_step,
            "vocab_sha256": _vocab_sha256(manager), "rng_impl": _rng_impl(state.rng)}
    manager.save(
        state.epoch,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(state.params)),
            opt_state=ocp.args.StandardSave(state.opt_state),
            rng=ocp.args.StandardSave({"key_data": jax.random.key_data(state.rng)}),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    manager.wait_until_finished()


class DamagedCheckpointError(RuntimeError):
    """The latest checkpoint cannot be read (the message names its directory and the fix)."""


def _damaged(manager: ocp.CheckpointManager, step: int, error: Exception) -> DamagedCheckpointError:
    """The error for an unreadable checkpoint ``step`` (to raise ``from error``)."""
    step_dir = Path(manager.directory) / str(step)
    earlier = [s for s in manager.all_steps() if s < step]
    first_line = (str(error).splitlines() or [""])[0][:200]
    previous = (f"the previous checkpoint (epoch {max(earlier)})" if earlier else
                "no checkpoint (there is no earlier one: the run starts over)")
    return DamagedCheckpointError(
        f"checkpoint {step_dir} is damaged or unreadable ({type(error).__name__}: "
        f"{first_line}). Delete that step directory (`rm -r {step_dir}`) to go on from "
        f"{previous}, or use a new --workdir."
    )


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _params_metadata(step_dir: Path) -> Any:
    """The stored params' tree of array metadata (``.shape``, ``.dtype``) of a step directory
    (the handler reads the item's metadata only: the checkpointer warned about a missing
    step-level metadata file on every predict)."""
    meta = ocp.StandardCheckpointHandler().metadata(step_dir / "params")
    return getattr(meta, "tree", meta)


def check_fits(step_dir: Path, stored: Any, expected: Any) -> None:
    """Raises ``ValueError`` when the parameters ``stored`` in ``step_dir`` (a tree of arrays or
    array metadata) have other shapes than ``expected`` (the model this workdir's files describe):
    the checkpoint is sound, but ``vocab.json`` (or the data) changed since it was saved."""
    shapes = {jax.tree_util.keystr(k): tuple(m.shape)
              for k, m in jax.tree_util.tree_leaves_with_path(stored)}
    wrong = [(name, shapes.get(name), tuple(a.shape))
             for name, a in ((jax.tree_util.keystr(k), a)
                             for k, a in jax.tree_util.tree_leaves_with_path(expected))
             if shapes.get(name) != tuple(a.shape)]
    if wrong:
        shown = "; ".join(f"{name}: {have} saved, {want} now" for name, have, want in wrong[:4])
        raise ValueError(
            f"checkpoint {step_dir} does not fit the model this workdir's files describe "
            f"({shown}): {VOCAB} (or the data) changed since the checkpoint was saved. "
            f"Put back the {VOCAB} of that run, or use a new --workdir."
        )


def _rng_impl(key: jax.Array) -> str:
    return str(jax.random.key_impl(key))


def check_rng_impl(step_dir: Path, meta: Any, fresh_rng: jax.Array) -> None:
    """Raises ``ValueError`` when the checkpoint in ``step_dir`` (its restored ``meta``) holds a
    key of another PRNG implementation than this process makes (``jax_default_prng_impl``): its
    key data has another shape, which orbax reports as a shape error of a sound checkpoint.
    Checkpoints without the name are not checked."""
    saved = meta.get("rng_impl") if isinstance(meta, dict) else None
    now = _rng_impl(fresh_rng)
    if saved is not None and saved != now:
        raise ValueError(
            f"checkpoint {step_dir} holds a {saved} PRNG key and this process makes {now} keys "
            f"(jax_default_prng_impl): resume with JAX_DEFAULT_PRNG_IMPL={saved}, or use a new "
            f"--workdir."
        )


def check_vocab(manager: ocp.CheckpointManager, step: int, meta: Any) -> None:
    """Raises ``ValueError`` when the checkpoint ``step`` (its restored ``meta``) was saved with
    another ``vocab.json`` than the workdir holds now: an edit that keeps the table's shape
    (words swapped, or rows a sharded run pads anyway) would otherwise map words to rows
    trained for other words. Checkpoints without the digest are not checked."""
    saved = meta.get("vocab_sha256") if isinstance(meta, dict) else None
    now = _vocab_sha256(manager)
    if saved is not None and saved != now:
        raise ValueError(
            f"checkpoint {Path(manager.directory) / str(step)} was saved with another {VOCAB} "
            f"(SHA-256 {saved[:12]}... then, {str(now)[:12]}... now): {VOCAB} changed since the "
            f"checkpoint was saved. Put back the {VOCAB} of that run, or use a new --workdir."
        )


def restore_latest(manager: ocp.CheckpointManager, fresh: TrainState) -> TrainState | None:
    """The latest checkpoint, restored into the structure of ``fresh``; ``None`` if none."""
    step = manager.latest_step()
    if step is None:
        return None
    pure = nnx.to_pure_dict(fresh.params)
    step_dir = Path(manager.directory) / str(step)
    try:
        stored = _params_metadata(step_dir)
    except Exception:  # (unreadable metadata: the restore below reports the damage)
        stored = None
    if stored is not None:
        check_fits(step_dir, stored, pure)
    try:  # meta first: what it names (another PRNG, another vocabulary) is no damage
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        epoch, global_step = int(meta["epoch"]), int(meta["global_step"])
    except Exception as e:
        raise _damaged(manager, step, e) from e
    check_rng_impl(step_dir, meta, fresh.rng)
    check_vocab(manager, step, meta)
    key_data = jax.random.key_data(fresh.rng)
    try:
        r = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(pure)),
                opt_state=ocp.args.StandardRestore(_abstract(fresh.opt_state)),
                rng=ocp.args.StandardRestore(_abstract({"key_data": key_data})),
            ),
        )
    except Exception as e:  # orbax/tensorstore/json errors of a damaged step directory
        raise _damaged(manager, step, e) from e
    params = jax.tree.map(lambda x: x, fresh.params)  # a copy to fill in
    nnx.replace_by_pure_dict(params, r.params)
    rng = jax.random.wrap_key_data(
        jnp.asarray(r.rng["key_data"]), impl=jax.random.key_impl(fresh.rng)
    )
    return TrainState(params=params, opt_state=r.opt_state, rng=rng, epoch=epoch,
                      global_step=global_step)


def has_checkpoint(workdir: str | Path) -> bool:
    """Whether ``workdir`` holds a finished checkpoint (a run to resume)."""
    if not checkpoint_dir(workdir).is_dir():
        return False
    manager = make_manager(workdir, reader=True)
    try:
        return manager.latest_step() is not None
    finally:
        manager.close()


def _no_checkpoint(workdir: str | Path) -> str:
    # (the config file of the run is not recorded: any config may have written the workdir)
    return (f"no checkpoint in {checkpoint_dir(workdir)}; train first (or again, if a run "
            f"stopped before its first epoch ended) with `python -m experiments.train --config "
            f"CONFIG --workdir {workdir}`, the config that run used (e.g. configs/bbc_news.py)")


def load_params(workdir: str | Path) -> tuple[dict, int]:
    """The parameters (pure nested dict of NumPy arrays) of the latest checkpoint and its epoch.
    (Check them with :func:`check_fits`, then :func:`check_saved_vocab`.)"""
    if not checkpoint_dir(workdir).is_dir():
        raise FileNotFoundError(_no_checkpoint(workdir))
    manager = make_manager(workdir, reader=True)
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(_no_checkpoint(workdir))
        # Restored onto this process's first device, whatever mesh saved it: a table saved
        # row-sharded over 8 devices (experiments.textcls.sharded) loads in a 1-device process.
        try:
            tree = _params_metadata(checkpoint_dir(workdir) / str(step))
            here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
            r = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as e:  # orbax/tensorstore errors of a damaged step directory
            raise _damaged(manager, step, e) from e
    finally:
        manager.close()
    return jax.tree.map(np.asarray, r.params), int(step)


def check_saved_vocab(workdir: str | Path, step: int) -> None:
    """:func:`check_vocab` for a reader (``predict``): checkpoint ``step`` of ``workdir``."""
    manager = make_manager(workdir, reader=True)
    try:
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # a damaged meta item
            raise _damaged(manager, step, e) from e
        check_vocab(manager, step, meta)
    finally:
        manager.close()
