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
candidates are ranked by that cross-validated accuracy (then by validation loss), the
first is named the ``winner``, and each is compared with ``config.reference`` fold by fold
(paired differences).

Every candidate is cross-validated on the same training split and folds, those of
``config.base``: a candidate may not override ``data.*`` (the split, the dataset; the study
sets the validation fields itself), and one that overrides ``seed`` keeps the base's split
(``data.split_seed`` is pinned to the base's split seed; its own seed still varies the
initialisation and the batch order). Otherwise its folds would hold test articles.

The workdir gets one sub-workdir per (candidate, fold) (a finished one is not run
again, so a killed selection resumes), ``selection.json`` and ``selection.md`` (an earlier
run's are removed when the training starts, so a run that fails leaves none behind).
"""

from __future__ import annotations

import ast
import statistics
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.textcls import artifacts, config_check, logs, runtime
from experiments.textcls.data import split_seed_of, with_validation_fold
from experiments.train import parse_flags, train_and_evaluate

def _parse_value(text: str) -> Any:
    """``"128"`` -> 128, ``"true"`` -> True, ``"log"`` -> ``"log"``."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _items(overrides: str) -> Iterator[str]:
    """The ``key=value`` items of ``"a.b=v; c.d=w"``."""
    return filter(None, (part.strip() for part in overrides.split(";")))


def override_keys(overrides: str) -> list[str]:
    """The dotted keys that ``"a.b=v; c=w"`` sets: ``["a.b", "c"]``."""
    return [item.partition("=")[0].strip() for item in _items(overrides)]


def apply_overrides(base: ml_collections.ConfigDict, overrides: str) -> ml_collections.ConfigDict:
    """A copy of ``base`` with ``"a.b=v; c.d=w"`` applied (``base`` is not changed).

    Raises:
        ValueError: an override that is not ``key=value``, names an unknown key or gives a
            value of another type than the key's.
    """
    config = ml_collections.ConfigDict(base.to_dict())  # a deep copy
    for item in _items(overrides):
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


def variants(base: Any, overrides: Any, reference: str, where: str, *,
             fixed: Sequence[str] = (), why: str = "") -> dict[str, ml_collections.ConfigDict]:
    """``{name: base with overrides[name] applied}``, every one checked before anything runs.

    ``fixed``: keys (``"seed"``) and groups (``"data"``: every ``data.*`` key) that the study
    keeps the same for every variant; ``why`` says why, in the error.

    Raises:
        ValueError: ``reference`` is not one of the names, or an override is invalid or sets
            a ``fixed`` key.
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
        refused = [k for k in override_keys(overrides[name])
                   if any(k == f or k.startswith(f + ".") for f in fixed)]
        if refused:
            raise ValueError(f"{where}[{name!r}] = {overrides[name]!r} overrides "
                             f"{', '.join(refused)}: {why}")
    for name, config in out.items():
        config_check.check_values(config, prefix="base.", where=(
            f"{where}[{name!r}] = {overrides[name]!r} applied to config.base: "))
    return out


def same_split(candidate: ml_collections.ConfigDict,
               base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``candidate`` on ``base``'s train/test split and folds: when its own ``seed`` would move
    them (``data.split_seed=-1`` follows ``config.seed``), a copy with ``data.split_seed`` pinned
    to ``base``'s split seed; else ``candidate`` itself (its config, and so its runs, unchanged)."""
    seed = split_seed_of(base.data, base.seed)
    if split_seed_of(candidate.data, candidate.seed) == seed:
        return candidate
    config = ml_collections.ConfigDict(candidate.to_dict())
    config.data.split_seed = seed
    return config


#: Why a candidate may not override ``data.*`` (the split, the dataset, the validation folds).
SAME_FOLDS = (
    "every candidate is cross-validated on the same training split and folds, those of "
    "config.base.data (config.folds and config.repeats set the validation fields), so that no "
    "test article is in a fold and the folds pair up with the reference's. Drop the override; "
    "to study another split or dataset, change config.base.data for the whole study (e.g. "
    "--config.base.data.test_fraction=0.1)."
)


def candidate_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """``{name: the candidate's training config}`` (before :func:`fold_config`), all checked
    before anything runs, every one on ``config.base``'s split (:func:`same_split`).

    Raises:
        ValueError: a bad count, reference or override, or a candidate that overrides ``data.*``.
    """
    config_check.require_int(config.repeats, "repeats", 1, "N (seeded CV partitions, N >= 1)")
    config_check.require_int(config.folds, "folds", 2, "k (k-fold cross-validation, k >= 2)")
    candidates = variants(config.base, config.candidates, config.reference, "config.candidates",
                          fixed=("data",), why=SAME_FOLDS)
    return {name: same_split(c, config.base) for name, c in candidates.items()}


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
    """Cross-validates every candidate; returns the rows of the table, best first (the
    ``winner``, named in ``selection.json`` / ``selection.md``)."""
    config = ml_collections.FrozenConfigDict(config)
    workdir = Path(workdir).resolve()
    candidates = candidate_configs(config)
    remove_reports(workdir, SELECTION_REPORTS)  # (an earlier config's: not this run's)
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
    winner = rows[0]["name"]  # the rule: the highest cross-validated accuracy (then lower loss)
    artifacts.write_json(workdir / "selection.json", {
        "folds": config.folds, "repeats": config.repeats, "base_seed": config.base.seed,
        "winner": winner, "rule": WINNER_RULE, "rows": rows})
    table = format_table(rows, reference["name"], config.folds, config.repeats)
    table += f"\n\nwinner: **{winner}** ({WINNER_RULE})"
    artifacts.write_text(workdir / "selection.md", table + "\n")
    print(table)
    return rows


WINNER_RULE = "the highest cross-validated accuracy; a tie goes to the lower CV loss"
SELECTION_REPORTS = ("selection.json", "selection.md")


def remove_reports(workdir: Path, names: Sequence[str]) -> None:
    """Removes a study's report files left in ``workdir`` by an earlier run (a run with another
    config that fails before writing its own would leave them looking like its result)."""
    for name in names:
        (workdir / name).unlink(missing_ok=True)


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
