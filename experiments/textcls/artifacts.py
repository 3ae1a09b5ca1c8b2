"""The JSON files of a workdir: config, vocabulary, split, per-epoch metrics, summary and
the misclassified evaluation examples.

``predict`` needs only these and the checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

CONFIG = "config.json"
VOCAB = "vocab.json"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
ERRORS = "errors.jsonl"  # one line per misclassified evaluation example
PLOT = "curves.png"
LOCK = ".lock"  # held by the training run (see :func:`workdir_lock`)
# What a resumed run may change: how it reports, checkpoints and evaluates, never what it trains.
# Every other config field (seed, data, tokenizer, model, optim, train schedule and batches,
# sharding) must equal the workdir's config.json, or the run would mix two trainings.
RESUMABLE = ("train.stop_after_epochs", "train.max_checkpoints", "train.progress_bar",
             "train.log_every_steps", "train.plot", "train.eval_batch_size")
# Where your data files are may change too (moved or copied): ``split.json`` records their
# SHA-256, and a resume with other bytes is refused by :func:`check_or_write_split`.
MOVABLE = ("data.train_path", "data.test_path")
_SPLIT_PATHS = ("train_path", "test_path")  # (their fields in split.json)


class WorkdirBusyError(OSError):
    """Another process is training in the workdir (the message names it)."""


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``workdir/.lock`` (``fcntl.flock``) while a run trains there.

    Two runs in one workdir (a job scheduler relaunching a job whose first run still lives)
    would both append to ``metrics.jsonl`` and overwrite each other's checkpoints; the second
    is refused instead, with :class:`WorkdirBusyError` naming the first one's process id. The
    operating system releases the lock when its process ends, ``kill -9`` included, so a killed
    run leaves no stale lock behind. (POSIX only: without ``fcntl``, as on Windows, nothing
    is locked.)
    """
    try:
        import fcntl
    except ImportError:  # (Windows)
        yield
        return
    with (workdir / LOCK).open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise WorkdirBusyError(
                f"another run (process {holder}) is training in {workdir}: wait for it to end "
                f"(or stop it) before resuming there, or pass another --workdir."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield  # (closing the file releases the lock)


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (:func:`write_text`)."""
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Writes ``text``, atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """A workdir's JSON file; a missing or damaged one is an error that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {path.parent} is not a complete training workdir (experiments.train "
            "writes it before the first epoch). Train into it again, or pass another --workdir."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); the workdir's files are written atomically, so it "
            "was changed by hand or damaged: restore it, or start afresh with a new --workdir."
        ) from e


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON round-trip of the config (tuples become lists)."""
    return json.loads(config.to_json())


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    return ml_collections.ConfigDict(read_json(path))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(workdir: Path, config: ml_collections.ConfigDict, *, resuming: bool) -> None:
    """Writes ``config.json``. When ``resuming`` (the workdir has a checkpoint), every field but
    :data:`RESUMABLE` must equal the ``config.json`` already there, and ``split.json`` and
    ``vocab.json`` must be there too (checked before anything is written; a missing one is an
    error: nothing would say what the checkpoints were trained with, and a refitted vocabulary
    or a rewritten split would silently mix two datasets); without a checkpoint, what an
    earlier run that failed before saving one left behind is simply replaced."""
    path = workdir / CONFIG
    new = config_to_dict(config)
    missing = [name for name in (CONFIG, SPLIT, VOCAB) if resuming and not (workdir / name).is_file()]
    if missing:
        names = " and ".join(missing)
        raise ValueError(
            f"{workdir} holds checkpoints but no {names}: what they were trained with is "
            f"unknown, so resuming could mix two trainings. Put back the {names} of that run, "
            "or use a new --workdir."
        )
    if resuming:
        old, cur = _flatten(read_json(path)), _flatten(new)
        diffs = [k for k in sorted(set(old) | set(cur))
                 if k not in RESUMABLE + MOVABLE and old.get(k) != cur.get(k)]
        if diffs:
            shown = "; ".join(
                f"{k}: {old.get(k, '(absent)')!r} -> {cur.get(k, '(absent)')!r}" for k in diffs[:6]
            )
            more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
            raise ValueError(
                f"{workdir} holds a run made with a different config ({shown}{more}, against "
                f"{path}); resuming would mix two trainings. Only {', '.join(RESUMABLE)} (and "
                f"{' / '.join(MOVABLE)}, to files of the same bytes) may change on resume. Use a "
                "new --workdir, or the same config."
            )
    write_json(path, new)

def _portable_split(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` as JSON, with an absolute BBC News ``root`` (written before the root was
    recorded relative to the package) cut to the package-relative form."""
    out = json.loads(json.dumps(dict(record)))
    root = out.get("root")
    if isinstance(root, str) and Path(root).is_absolute():
        parts = Path(root).parts
        out["root"] = "/".join(parts[-3:]) if len(parts) >= 3 else root
    return out


def _shown(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} entries: {', '.join(map(repr, value[:3]))}, ...]"
    return repr(value)


def check_or_write_split(workdir: Path, record: Mapping[str, Any], *, resuming: bool) -> None:
    """Writes ``split.json``, or, when ``resuming``, checks that the existing one records the
    same split (naming each field that differs; :func:`check_resume_config` has made sure
    that it is there). Your data files may have moved: their SHA-256 decides, and the record
    then gets their new paths."""
    path = workdir / SPLIT
    if resuming:
        old, new = _portable_split(read_json(path)), _portable_split(record)
        diffs = [k for k in sorted(set(old) | set(new))
                 if k not in _SPLIT_PATHS and old.get(k) != new.get(k)]
        if diffs:
            shown = "; ".join(f"{k}: {_shown(old.get(k, '(absent)'))} in {SPLIT} -> "
                              f"{_shown(new.get(k, '(absent)'))} now" for k in diffs)
            raise ValueError(
                f"{path} records a different train/test split than the data now loaded ({shown}); "
                "resuming would train on another split. Use a new --workdir, or the same data."
            )
        if all(old.get(k) == new.get(k) for k in _SPLIT_PATHS):
            return
    write_json(path, dict(record))


def read_metrics(workdir: Path, *, up_to_epoch: int) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` with ``epoch <= up_to_epoch``; the file
    is rewritten to just those (a killed run may have logged an epoch it never saved).
    They must be one row for each epoch 1..``up_to_epoch`` in order, or a ``ValueError`` names
    the missing and repeated epochs (the summary's best epoch, median epoch and compilations
    are computed from them)."""
    path = workdir / METRICS
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # a run killed while appending its last line: dropped
                break
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({e}); restore it or use a "
                             "new --workdir.") from e
    rows = [r for r in rows if r["epoch"] <= up_to_epoch]
    epochs = [r["epoch"] for r in rows]
    if epochs != list(range(1, up_to_epoch + 1)):
        # (rows are appended before each checkpoint is saved: 1..epoch are all there unless the
        # file was edited, or two runs wrote the workdir at once)
        missing = sorted(set(range(1, up_to_epoch + 1)) - set(epochs))
        repeated = sorted({e for e in epochs if epochs.count(e) > 1})
        what = "; ".join(part for part in (
            f"epochs {missing} are missing" if missing else "",
            f"epochs {repeated} are there more than once" if repeated else "",
            "the epochs are out of order" if not (missing or repeated) else "") if part)
        raise ValueError(
            f"{path} does not hold one row per epoch 1..{up_to_epoch} that the checkpoint of "
            f"epoch {up_to_epoch} finished ({what}): it was edited, or two runs wrote this "
            f"workdir at once. Restore the file, or use a new --workdir."
        )
    write_jsonl(path, rows)
    return rows


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes one JSON object per line, atomically (:func:`write_text`)."""
    write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in rows))


def append_metrics(workdir: Path, row: Mapping[str, Any]) -> None:
    with (workdir / METRICS).open("a") as fh:
        fh.write(json.dumps(dict(row)) + "\n")
