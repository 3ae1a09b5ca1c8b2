r"""Model selection by k-fold cross-validation on the training split (never the test split).

    python -m experiments.select --config configs/bbc_news_selection.py --workdir runs/select \
        [--config.folds=5] [--config.base.train.num_epochs=20 ...]

``config.base`` is a full training config (``configs/bbc_news.py``'s fields);
``config.candidates`` maps a name to overrides of it, ``"tokenizer.term_weights=log;
model.features=128"``. Each candidate is trained ``config.folds`` times (times
``config.repeats`` seeded partitions: repeated CV) with
:func:`experiments.train.train_and_evaluate`, each time on ``folds - 1`` folds of the
training split and evaluated on the remaining one (``config.data.validation_folds``),
so every training document is predicted once per repeat by a model that did not see
it (whose vocabulary and idf come from its own training folds only). The
candidates are ranked by that cross-validated accuracy (then by validation loss), and
each is compared with ``config.reference`` fold by fold (paired differences).

The workdir gets one sub-workdir per (candidate, fold) (a finished one is not run
again, so a killed selection resumes), ``selection.json`` and ``selection.md``.
"""

from __future__ import annotations

import ast
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.textcls import artifacts, config_check, logs, runtime
from experiments.textcls.data import with_validation_fold
from experiments.train import parse_flags, train_and_evaluate

def _parse_value(text: str) -> Any:
    """``"128"`` -> 128, ``"true"`` -> True, ``"log"`` -> ``"log"``."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(base: ml_collections.ConfigDict, overrides: str) -> ml_collections.ConfigDict:
    """A copy of ``base`` with ``"a.b=v; c.d=w"`` applied (``base`` is not changed).

    Raises:
        ValueError: an override that is not ``key=value``, names an unknown key or gives a
            value of another type than the key's.
    """
    config = ml_collections.ConfigDict(base.to_dict())  # a deep copy
    for item in filter(None, (part.strip() for part in overrides.split(";"))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(
                f"candidate override {item!r} is not key=value, e.g. model.features=128")
        problem = config_check.unknown_key_message(config, key, item)
        if problem:
            raise ValueError(problem)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            node[leaf] = _parse_value(value.strip())
        except TypeError as e:  # (ml_collections: a value of another type than the key's)
            raise ValueError(
                f"candidate override {item!r}: {e}. Give a value of type "
                f"{type(node[leaf]).__name__}, e.g. {key}={node[leaf]!r}."
            ) from None
    return config


def variants(base: Any, overrides: Any, reference: str, where: str) -> dict[str, ml_collections.ConfigDict]:
    """``{name: base with overrides[name] applied}``, every one checked before anything runs.

    Raises:
        ValueError: ``reference`` is not one of the names, or an override is invalid.
    """
    if reference not in overrides:
        raise ValueError(f"config.reference={reference!r} is not in {where}: {list(overrides)}")
    base = ml_collections.ConfigDict(base)
    config_check.check_values(base, prefix="base.")
    out = {}
    for name in overrides:
        try:
            out[name] = apply_overrides(base, overrides[name])
        except ValueError as e:  # which candidate
            raise ValueError(f"{where}[{name!r}] = {overrides[name]!r}: {e}") from None
    for name, config in out.items():
        config_check.check_values(config, prefix="base.", where=(
            f"{where}[{name!r}] = {overrides[name]!r} applied to config.base: "))
    return out


def fold_config(candidate: ml_collections.ConfigDict, folds: int, fold: int, repeat: int = 0):
    """``candidate`` trained on the other folds of partition ``repeat``, evaluated on ``fold``."""
    config = ml_collections.ConfigDict(candidate.to_dict())
    config.data = with_validation_fold(config.data.to_dict(), folds, fold, repeat)
    config.train.progress_bar = False
    config.train.plot = False
    return config


def run_or_reuse(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """The summary of a finished run in ``workdir`` with exactly ``config``, or a new run."""
    done = workdir / artifacts.SUMMARY
    if done.is_file():
        ran = artifacts.read_json(workdir / artifacts.CONFIG)
        if ran != artifacts.config_to_dict(config):
            raise ValueError(
                f"{workdir} holds a finished run of another config "
                f"({workdir / artifacts.CONFIG}): the config changed since it ran. Use a "
                "new --workdir (or delete that directory)."
            )
        return artifacts.read_json(done)
    return train_and_evaluate(config, workdir)


def select(config: ml_collections.ConfigDict, workdir: str | Path) -> list[dict[str, Any]]:
    """Cross-validates every candidate; returns the rows of the table, best first."""
    config = ml_collections.FrozenConfigDict(config)
    workdir = Path(workdir).resolve()
    config_check.require_int(config.repeats, "repeats", 1, "N (seeded CV partitions, N >= 1)")
    config_check.require_int(config.folds, "folds", 2, "k (k-fold cross-validation, k >= 2)")
    candidates = variants(config.base, config.candidates, config.reference, "config.candidates")
    names = list(candidates)
    rows = []
    for name in names:
        accs, losses, times = [], [], []
        for repeat in range(config.repeats):
            for fold in range(config.folds):
                summary = run_or_reuse(fold_config(candidates[name], config.folds, fold, repeat),
                                       workdir / name / f"repeat{repeat}_fold{fold}")
                accs.append(summary["test_accuracy"])  # the held-out fold's accuracy
                losses.append(summary["test_loss"])
                times.append(summary["train_time_s"])
        rows.append({"name": name, "overrides": config.candidates[name],
                     "accuracy": statistics.fmean(accs), "loss": statistics.fmean(losses),
                     "fold_accuracy": accs, "train_time_s": statistics.fmean(times)})
        logging.info("%s: cv accuracy %.2f%%", name, 100 * rows[-1]["accuracy"])
    reference = next(r for r in rows if r["name"] == config.reference)
    for row in rows:
        diffs = [a - b for a, b in zip(row["fold_accuracy"], reference["fold_accuracy"])]
        row["diff_vs_reference"] = statistics.fmean(diffs)
        row["folds_better"] = sum(d > 0 for d in diffs)
        row["folds_worse"] = sum(d < 0 for d in diffs)
    rows.sort(key=lambda r: (-r["accuracy"], r["loss"]))
    artifacts.write_json(workdir / "selection.json", {
        "folds": config.folds, "repeats": config.repeats, "base_seed": config.base.seed,
        "rows": rows})
    table = format_table(rows, reference["name"], config.folds, config.repeats)
    (workdir / "selection.md").write_text(table + "\n")
    print(table)
    return rows


def format_table(rows: list[dict[str, Any]], reference: str, folds: int, repeats: int) -> str:
    cv = f"{folds}-fold CV" if repeats == 1 else f"{repeats} x {folds}-fold CV"
    lines = [
        f"| candidate | overrides | {cv} accuracy | CV loss | vs {reference} "
        "(folds better/worse) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | `{r['overrides'] or '(none)'}` | {100 * r['accuracy']:.2f}% | "
            f"{r['loss']:.4f} | {100 * r['diff_vs_reference']:+.2f} ({r['folds_better']}/"
            f"{r['folds_worse']}) |"
        )
    return "\n".join(lines)


def study_main(run: Callable[[ml_collections.ConfigDict, str], Any], example: str) -> None:
    """The command line of a study (this module, ``experiments.splits``): ``--config``, a
    locked config file with dotted overrides, and ``--workdir``; calls ``run(config, workdir)``.
    ``example`` (``"--config configs/x.py --workdir runs/x"``) is shown when one is missing.
    Turns on XLA's deterministic GPU ops first (:mod:`experiments.textcls.runtime`)."""
    runtime.request_deterministic_ops()  # (before JAX starts its backend)
    config = config_flags.DEFINE_config_file(
        "config", None, "Study config file (configs/*.py).", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Directory for the runs and the table.")

    def main(argv: list[str]) -> None:
        logs.quiet_orbax()
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if config.value is None or not workdir.value:
            raise app.UsageError(f"--config and --workdir are required, e.g. {example}")
        logs.exit_on_user_error(run, config.value, workdir.value)

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    study_main(select, "--config configs/bbc_news_selection.py --workdir runs/select")
