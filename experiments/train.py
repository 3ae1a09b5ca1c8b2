r"""Train and evaluate a fastText-style text classifier built on jaxbag.

    python -m experiments.train --config configs/bbc_news.py --workdir runs/bbc_news \
        [--config.model.features=128 ...] [--print_config]

Everything happens in :func:`train_and_evaluate`. The workdir receives ``config.json``,
``split.json``, ``vocab.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoints/``
(orbax, one per epoch), ``summary.json``, ``errors.jsonl`` (the misclassified evaluation
examples) and ``curves.png``. Running again on the same
workdir resumes from the last checkpoint; while a run trains, ``.lock`` refuses a second one
there.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from experiments.textcls import artifacts, checkpoint, config_check, logs, runtime, sharded
from experiments.textcls.batches import iterate_batches, num_batches, plan_buckets, plan_epochs
from experiments.textcls.data import TextDataset, load_splits
from experiments.textcls.metrics import (
    Metrics,
    confusion_matrix,
    format_confusion,
    format_misclassified,
    misclassified,
)

from experiments.textcls.model import build_model
from experiments.textcls.optim import make_optimizer, make_sparse_optimizer, sparse_table_notes
from experiments.textcls.steps import make_steps, split_model
from experiments.textcls.tokenizer import Featurizer

# Flag holders, set by define_flags() when run as a program.
_CONFIG: Any = None
_WORKDIR: Any = None
_PRINT_CONFIG: Any = None


def _featurize(
    featurizer: Featurizer, texts: tuple[str, ...]
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Per document: the ids, and the per-id weights (term weights) or None."""
    pairs = [featurizer.bag(t) for t in texts]
    ids = [i for i, _ in pairs]
    if not featurizer.weighted:
        return ids, None
    weights = []
    for _, w in pairs:  # Featurizer.bag: None exactly when unweighted
        assert w is not None  # (a filter would misalign the weights with the ids)
        weights.append(w)
    return ids, weights


def _load_or_fit_featurizer(
    workdir: Path, texts: tuple[str, ...], tok_config: Any, *, resuming: bool
) -> Featurizer:
    """The resumed run's ``vocab.json`` (there: ``artifacts.check_resume_config``), or a
    featurizer fitted on ``texts`` (and saved)."""
    path = workdir / artifacts.VOCAB
    if resuming:
        return Featurizer.from_json(artifacts.read_json(path))
    featurizer = Featurizer.fit(texts, tok_config)
    artifacts.write_json(path, featurizer.to_json())
    return featurizer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains the model described by ``config``, evaluating on the test split each epoch
    (or, with ``config.data.validation_folds``, on a held-out fold of the training split).

    Resumes from the latest checkpoint in ``workdir`` if there is one (the batch order
    of an epoch depends only on ``(config.seed, epoch)`` and the optimiser state and
    PRNG key are checkpointed, so a resumed run ends with the same parameters as an
    uninterrupted one). ``config`` is read, never modified.

    Returns:
        The summary dict (also written to ``workdir/summary.json`` when the run
        completes ``config.train.num_epochs`` epochs).

    Raises:
        artifacts.WorkdirBusyError: another process trains in ``workdir`` (an ``OSError``).
    """
    t_start = time.perf_counter()
    config = ml_collections.FrozenConfigDict(config)
    config_check.check_values(config)  # bad values: an error before anything is written
    # Data (a missing file, an empty split: an error before the workdir gets a file).
    train_ds, test_ds, split_record = load_splits(config.data, config.seed)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with artifacts.workdir_lock(workdir):  # (a second run there is refused: it names this one)
        return _train_in(workdir, config, (train_ds, test_ds, split_record), t_start)


def _train_in(
    workdir: Path, config: ml_collections.FrozenConfigDict,
    data: tuple[TextDataset, TextDataset, dict[str, Any]], t_start: float,
) -> dict[str, Any]:
    """:func:`train_and_evaluate` once its config and data are checked and ``workdir`` is
    locked: resume or start, train, evaluate, write the summary."""
    train_ds, test_ds, split_record = data
    # Without a checkpoint there is nothing to resume: the files of a run that failed before its
    # first checkpoint (a typo in a path, a bad value) are replaced, not held against this one.
    resuming = checkpoint.has_checkpoint(workdir)
    artifacts.check_resume_config(workdir, ml_collections.ConfigDict(config), resuming=resuming)
    tc = config.train

    # Features.
    artifacts.check_or_write_split(workdir, split_record, resuming=resuming)
    featurizer = _load_or_fit_featurizer(workdir, train_ds.texts, config.tokenizer, resuming=resuming)
    train_bags, train_weights = _featurize(featurizer, train_ds.texts)
    test_bags, test_weights = _featurize(featurizer, test_ds.texts)
    num_classes = train_ds.num_classes
    logging.info(
        "data %s: %d train / %d test, %d classes, vocabulary %d + %d n-gram buckets, "
        "%.0f ids per train document",
        config.data.name, len(train_ds), len(test_ds), num_classes, len(featurizer.vocab),
        featurizer.num_embeddings - len(featurizer.vocab),
        float(np.mean([b.size for b in train_bags])) if train_bags else 0.0,
    )
    copies = test_ds.copies_of(train_ds)
    if copies:
        logging.info("%d of the %d test texts are also in the training split (e.g. %s)",
                     len(copies), len(test_ds), ", ".join(copies[:3]))
    missing = train_ds.missing_classes()
    if missing:
        logging.warning(
            "no training example has class %s (of %s): the model cannot learn to predict it. "
            "Check the training file's labels (a class left out, or numbered from another base)",
            ", ".join(repr(m) for m in missing), list(train_ds.class_names))

    # Model, optimiser, state.
    model = build_model(
        config.model, num_embeddings=featurizer.num_embeddings, num_classes=num_classes,
        seed=config.seed,
    )
    model = sharded.maybe_shard(model, config)  # no-op unless config.sharding.mesh_shape
    batch_size = tc.batch_size
    steps_per_epoch = num_batches(len(train_ds), batch_size)
    total_steps = tc.num_epochs * steps_per_epoch
    compilations = {"train_step": 0, "eval_step": 0}  # traces = compilations
    for note in sparse_table_notes(config.optim):
        logging.warning(note)
    steps = make_steps(
        model, make_optimizer(config.optim, total_steps=total_steps),
        num_classes=num_classes, label_smoothing=tc.label_smoothing,
        sparse_tx=make_sparse_optimizer(config.optim, total_steps)
        if config.optim.sparse_embedding else None,
        compilations=compilations,
    )
    _, params, _ = split_model(model)
    state = checkpoint.TrainState(
        params=params,
        opt_state=sharded.replicate(steps.init_opt_state(params), config),
        rng=jax.random.fold_in(jax.random.key(config.seed), 1),  # dropout stream
    )
    manager = checkpoint.make_manager(workdir, max_to_keep=tc.max_checkpoints)
    try:
        restored = checkpoint.restore_latest(manager, state)
    except checkpoint.DamagedCheckpointError:
        manager.close()  # (its threads would outlive the error)
        raise
    resumed_from = 0
    if restored is not None:
        state = restored
        resumed_from = state.epoch
        logging.info("resuming from the checkpoint of epoch %d in %s", state.epoch, workdir)
    history = artifacts.read_metrics(workdir, up_to_epoch=state.epoch)
    k = config.data.validation_folds
    # With validation folds, "test" below means the held-out fold of the training split.
    evaluated_on = f"validation fold {config.data.validation_fold}/{k}" if k else "test"

    train_step, eval_step = steps.train_step, steps.eval_step
    sync_each_step = sharded.one_step_in_flight(config)
    # Padded id counts: at most max_buckets per step function over the whole run (every epoch's
    # order is known now), so the train step compiles at most that many times, resumed or not.
    ladder = {"min_size": tc.bucket_min_size, "growth": tc.bucket_growth}
    orders, train_buckets = plan_epochs(train_bags, tc, seed=config.seed,
                                        epochs=range(1, tc.num_epochs + 1))
    test_order = np.arange(len(test_ds))  # evaluation's order, planned with the same
    test_buckets = plan_buckets(test_bags, [test_order], batch_size=tc.eval_batch_size,
                                max_buckets=tc.max_buckets, **ladder)
    for name, fitted in (("train", train_buckets), ("test", test_buckets)):
        if fitted is not None:
            logging.info("%s batches: padded id counts fitted to the batches (the ladder from %d "
                         "by %g needs more than %d): %s", name, tc.bucket_min_size,
                         tc.bucket_growth, tc.max_buckets, fitted)

    def evaluate(p) -> tuple[dict[str, float], np.ndarray]:
        total, preds = Metrics.zeros(), []
        for batch in iterate_batches(test_bags, test_ds.labels, test_order,
                                     batch_size=tc.eval_batch_size,
                                     weights=test_weights, bucket_sizes=test_buckets, **ladder):
            batch_metrics, batch_preds = eval_step(p, batch)
            total = total.merge(batch_metrics)
            preds.append(np.asarray(batch_preds)[np.asarray(batch.bags.bag_mask)])
        return total.compute(), np.concatenate(preds) if preds else np.zeros((0,), np.int64)

    # Training.
    params, opt_state, global_step = state.params, state.opt_state, state.global_step
    stopped_early = False
    for epoch in range(state.epoch + 1, tc.num_epochs + 1):
        order = orders[epoch - 1]
        metrics = sharded.replicate(Metrics.zeros(), config)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{tc.num_epochs}",
                   disable=not tc.progress_bar, leave=True, dynamic_ncols=True, file=sys.stdout)
        compiled_before = compilations["train_step"]
        t_epoch = time.perf_counter()
        for i, batch in enumerate(iterate_batches(train_bags, train_ds.labels, order,
                                                  batch_size=batch_size, weights=train_weights,
                                                  bucket_sizes=train_buckets, **ladder)):
            params, opt_state, metrics = train_step(params, opt_state, metrics, batch, state.rng,
                                                    np.int32(global_step))
            global_step += 1
            if sync_each_step:  # XLA:CPU with several devices: see sharded.one_step_in_flight
                jax.block_until_ready(metrics)
            bar.update(1)
            if not bar.disable and ((i + 1) % tc.log_every_steps == 0 or i + 1 == steps_per_epoch):
                m = metrics.compute()
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{100 * m['accuracy']:.2f}%")
        jax.block_until_ready((params, metrics))
        epoch_time = time.perf_counter() - t_epoch
        bar.close()
        train_m = metrics.compute()
        test_m, _ = evaluate(params)
        row = {
            "epoch": epoch,
            "global_step": global_step,
            "train_loss": train_m["loss"],
            "train_accuracy": train_m["accuracy"],
            "test_loss": test_m["loss"],
            "test_accuracy": test_m["accuracy"],
            "epoch_time_s": epoch_time,
            # compilations of the train step during the epoch (inside epoch_time_s)
            "train_step_compiled": compilations["train_step"] - compiled_before,
        }
        history.append(row)
        artifacts.append_metrics(workdir, row)
        checkpoint.save(manager, checkpoint.TrainState(params, opt_state, state.rng, epoch, global_step))
        logging.info(
            "epoch %d: train loss %.4f acc %.2f%% | %s loss %.4f acc %.2f%% | %.2fs",
            epoch, row["train_loss"], 100 * row["train_accuracy"], evaluated_on, row["test_loss"],
            100 * row["test_accuracy"], epoch_time,
        )
        if tc.stop_after_epochs > 0 and epoch >= tc.stop_after_epochs and epoch < tc.num_epochs:
            stopped_early = True
            logging.info("stopping after epoch %d (config.train.stop_after_epochs)", epoch)
            break
    manager.close()

    # Summary.
    test_m, preds = evaluate(params)
    cm = confusion_matrix(test_ds.labels, preds, num_classes)
    # The median epoch leaves out the epochs that compiled the train step (a resumed run
    # compiles again: with 1 of 3 epochs after a resume, 2 of 3 times included compilation).
    epoch_times = [h["epoch_time_s"] for h in history if not h.get("train_step_compiled", 0)]
    epoch_times = epoch_times or [h["epoch_time_s"] for h in history]
    median_epoch = statistics.median(epoch_times) if epoch_times else float("nan")
    best = max(history, key=lambda h: h["test_accuracy"]) if history else None
    summary = {
        "evaluated_on": evaluated_on,
        "test_accuracy": test_m["accuracy"],
        "test_loss": test_m["loss"],
        "best_epoch": best["epoch"] if best else None,
        "best_test_accuracy": best["test_accuracy"] if best else None,
        "epochs": history[-1]["epoch"] if history else 0,
        "train_time_s": time.perf_counter() - t_start,  # this process (since a resume)
        "epoch_time_s": median_epoch,
        "examples_per_s": len(train_ds) / median_epoch if epoch_times else float("nan"),
        # train_step: over the whole run (a resumed run's earlier processes too, from
        # metrics.jsonl); eval_step: this process's
        "compilations": {"train_step": sum(h.get("train_step_compiled", 0) for h in history),
                         "eval_step": compilations["eval_step"]},
        "resumed_from_epoch": resumed_from,
        "stopped_early": stopped_early,
        "num_train": len(train_ds),
        "num_test": len(test_ds),
        "num_embeddings": featurizer.num_embeddings,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "class_names": list(train_ds.class_names),
        "confusion_matrix": cm.tolist(),
        "backend": jax.default_backend(),
    }
    logging.info("train_step compiled %d times, eval_step %d times",
                 summary["compilations"]["train_step"], compilations["eval_step"])
    if stopped_early:
        return summary
    if tc.plot and history:
        from experiments.textcls.plots import plot_curves  # matplotlib only when plotting

        ls = tc.label_smoothing
        plot_curves(history, workdir / artifacts.PLOT, title=f"{config.data.name} (jaxbag fastText)",
                    train_label=f"train (label smoothing {ls:g})" if ls else "train",
                    eval_label=(f"validation fold {config.data.validation_fold}"
                                if config.data.validation_folds else "test"))
    artifacts.write_json(workdir / artifacts.SUMMARY, summary)
    errors = misclassified(test_ds.sources, test_ds.texts, test_ds.labels, preds,
                           train_ds.class_names)
    artifacts.write_jsonl(workdir / artifacts.ERRORS, errors)
    print(f"{evaluated_on} confusion matrix ({config.data.name}, epoch {summary['epochs']}):")
    print(format_confusion(cm, train_ds.class_names))
    if errors:
        print(f"misclassified ({len(errors)}, all in {workdir / artifacts.ERRORS}):")
        print(format_misclassified(errors, limit=10))
    print(
        f"{evaluated_on} accuracy {100 * summary['test_accuracy']:.2f}% | "
        f"best epoch {summary['best_epoch']} ({100 * (summary['best_test_accuracy'] or 0):.2f}%) | "
        f"run {summary['train_time_s']:.1f}s | median epoch {summary['epoch_time_s']:.3f}s | "
        f"{summary['examples_per_s']:.0f} examples/s | "
        f"train_step compiled {summary['compilations']['train_step']}x"
    )
    return summary


def define_flags() -> None:
    """Defines --config, --workdir, --print_config (only when run as a program, so that
    importing this module leaves absl's global flags alone)."""
    global _CONFIG, _WORKDIR, _PRINT_CONFIG
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Path to a config file (configs/*.py).", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, metrics and the summary."
    )
    _PRINT_CONFIG = flags.DEFINE_bool(
        "print_config", False, "Print the resolved config (after overrides) and exit."
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, after checking ``--config.*`` keys (unknown ones list the valid keys)."""
    errors = config_check.unknown_override_errors(argv)
    if errors:
        for e in errors:
            print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError) as e:  # (config_flags raises ValueError: --noconfig.k=v)
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str]) -> None:
    logs.quiet_orbax()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/bbc_news.py")
    if _PRINT_CONFIG.value:
        print(_CONFIG.value)
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required, e.g. --workdir runs/bbc_news")
    logs.exit_on_user_error(train_and_evaluate, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    runtime.request_deterministic_ops()  # (before JAX starts its backend)
    define_flags()
    app.run(main, flags_parser=parse_flags)
