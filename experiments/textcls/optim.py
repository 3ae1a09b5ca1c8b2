"""The optax optimiser and learning-rate schedule described by ``config.optim``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

import jaxbag

OPTIMIZERS = ("adamw", "adam", "adagrad", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(optim_config: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """``constant``, ``cosine`` or ``linear`` decay to 0, after ``warmup_steps`` linear warmup."""
    lr = float(optim_config["learning_rate"])
    warmup = min(int(optim_config["warmup_steps"]), max(total_steps - 1, 0))
    kind = str(optim_config["schedule"])
    decay_steps = max(total_steps - warmup, 1)
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps)
    elif kind == "linear":
        main = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        raise ValueError(
            f"config.optim.schedule must be 'constant', 'cosine' or 'linear', got {kind!r}"
        )
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(optim_config: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """``adamw``, ``adam``, ``adagrad`` or ``sgd`` (with momentum) on the schedule,
    after optional global-norm clipping (``grad_clip > 0``)."""
    schedule = make_schedule(optim_config, total_steps)
    name = str(optim_config["name"])
    wd = float(optim_config["weight_decay"])
    if name == "adamw":
        opt = optax.adamw(schedule, b1=float(optim_config["b1"]), b2=float(optim_config["b2"]),
                          weight_decay=wd)
    elif name == "adam":
        opt = optax.adam(schedule, b1=float(optim_config["b1"]), b2=float(optim_config["b2"]))
    elif name == "adagrad":
        opt = optax.adagrad(schedule)
    elif name == "sgd":
        opt = optax.sgd(schedule, momentum=float(optim_config["momentum"]) or None)
    else:
        raise ValueError(
            f"config.optim.name must be 'adamw', 'adam', 'adagrad' or 'sgd', got {name!r}"
        )
    clip = float(optim_config["grad_clip"])
    if clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    return opt


def make_sparse_optimizer(optim_config: Mapping[str, Any], total_steps: int) -> jaxbag.SparseOptimizer:
    """The row-wise optimiser of the embedding table when ``optim.sparse_embedding`` is set.

    ``adamw``/``adam`` -> ``jaxbag.sparse_adam`` (lazy Adam, as torch's ``SparseAdam``: no
    weight decay, moments of untouched rows stay put, ``eps`` outside the bias correction where
    the dense optax AdamW adds it inside); ``sgd`` -> ``jaxbag.sparse_sgd``
    (exactly dense SGD without momentum); ``adagrad`` -> ``jaxbag.sparse_adagrad``
    (row-wise). Same learning-rate schedule as the dense parameters.
    """
    optax_schedule = make_schedule(optim_config, total_steps)

    def schedule(count):
        # optax schedules mix Python floats with the int32 count; strict dtype promotion
        # (the test suite's setting) rejects that, so they run under standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            return optax_schedule(count)

    name = str(optim_config["name"])
    if name in ("adamw", "adam"):
        return jaxbag.sparse_adam(schedule, b1=float(optim_config["b1"]), b2=float(optim_config["b2"]))
    if name == "sgd":
        return jaxbag.sparse_sgd(schedule)
    if name == "adagrad":
        return jaxbag.sparse_adagrad(schedule)
    raise ValueError(
        f"config.optim.name must be 'adamw', 'adam', 'adagrad' or 'sgd', got {name!r}"
    )


def sparse_table_notes(optim_config: Mapping[str, Any]) -> list[str]:
    """What of ``config.optim`` reaches the dense head only when the table is sparse
    (``optim.sparse_embedding``): one line each, for the run's log."""
    if not optim_config["sparse_embedding"]:
        return []
    name, notes = str(optim_config["name"]), []
    off = "--config.optim.sparse_embedding=false trains the table with it too."
    if name == "sgd" and float(optim_config["momentum"]) > 0:
        notes.append(f"optim.momentum={optim_config['momentum']} moves the dense head only: the "
                     f"sparse embedding table takes plain SGD (jaxbag.sparse_sgd). {off}")
    if name == "adamw" and float(optim_config["weight_decay"]) > 0:
        notes.append(f"optim.weight_decay={optim_config['weight_decay']} decays the dense head "
                     "only: the sparse embedding table takes lazy Adam without decay "
                     f"(jaxbag.sparse_adam, as torch's SparseAdam). {off}")
    return notes
