"""Tokenizer, vocabulary and fastText-style hashed n-grams.

A document becomes one bag of ids:

* unigram ids ``[0, V)`` from a :class:`Vocabulary` built on the training split
  only (id 0 is ``<unk>``, for words not in the vocabulary);
* n-gram ids ``[V, V + num_buckets)`` for every run of 2..``ngrams`` consecutive
  tokens, hashed into ``num_buckets`` buckets with a stable hash (CRC-32 of each
  token, combined with 64-bit FNV-1a), so ids do not depend on the vocabulary,
  the process or ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

UNK = "<unk>"
UNKNOWN_ID = 0  # the id of UNK
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@functools.cache
def _token_re() -> re.Pattern[str]:
    """Words: letters with their combining marks (``re`` has no ``\\p{M}``, so the class of the
    marks of this Python's Unicode tables is built once), inner apostrophes; numbers."""
    marks, start = [], None
    for c in range(sys.maxunicode + 2):
        is_mark = c <= sys.maxunicode and unicodedata.category(chr(c)) in ("Mn", "Mc", "Me")
        if is_mark and start is None:
            start = c
        elif not is_mark and start is not None:
            marks.append(f"{re.escape(chr(start))}-{re.escape(chr(c - 1))}")
            start = None
    letter = rf"[^\W\d_][{''.join(marks)}]*"
    return re.compile(rf"(?:{letter})+(?:'(?:{letter})+)*|\d+(?:[.,]\d+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cases ``text`` (after Unicode NFC normalisation) and returns its words (letters with
    their combining marks, inner apostrophes) and numbers.

    >>> tokenize("Profits at TimeWarner jumped 76% to $1.13bn, don't panic!")
    ['profits', 'at', 'timewarner', 'jumped', '76', 'to', '1.13', 'bn', "don't", 'panic']
    >>> tokenize("Hindi: हिन्दी, cafe\u0301")  # a word with its vowel signs; 'café' composed
    ['hindi', 'हिन्दी', 'café']
    """
    return _token_re().findall(unicodedata.normalize("NFC", text).lower())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Token <-> id map; ``tokens[0]`` is ``<unk>``, the id of every unknown word."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.tokens or self.tokens[0] != UNK:
            raise ValueError(f"tokens[0] must be {UNK!r}")
        index = {t: i for i, t in enumerate(self.tokens)}
        if len(index) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(
        cls, token_lists: Iterable[Sequence[str]], *, min_freq: int = 1, max_size: int = 0
    ) -> Vocabulary:
        """Counts tokens and keeps those seen ``>= min_freq`` times, most frequent first.

        Ties are broken alphabetically (deterministic). ``max_size > 0`` caps the size,
        ``<unk>`` included.
        """
        counts: collections.Counter[str] = collections.Counter()
        for toks in token_lists:
            counts.update(toks)
        counts.pop(UNK, None)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size > 0:
            kept = kept[: max_size - 1]
        return cls((UNK, *kept))

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """int32 ``[len(tokens)]`` ids, 0 for unknown tokens."""
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return np.fromiter((index.get(t, 0) for t in tokens), dtype=np.int32, count=len(tokens))


def token_hashes(tokens: Sequence[str], cache: dict[str, int] | None = None) -> np.ndarray:
    """uint64 ``[len(tokens)]``: the CRC-32 of each token's UTF-8 bytes."""
    if cache is None:
        cache = {}
    out = np.empty(len(tokens), dtype=np.uint64)
    for i, t in enumerate(tokens):
        h = cache.get(t)
        if h is None:
            h = cache[t] = zlib.crc32(t.encode("utf-8"))
        out[i] = h
    return out


def ngram_buckets(hashes: np.ndarray, *, ngrams: int, num_buckets: int) -> np.ndarray:
    """Bucket ids in ``[0, num_buckets)`` of every 2..``ngrams``-gram, int64.

    Order: all bigrams left to right, then all trigrams, and so on. The hash of an
    n-gram folds its token hashes with 64-bit FNV-1a (one token hash per step),
    then a final xor-shift, then ``mod num_buckets``.
    """
    n_tok = hashes.shape[0]
    parts = []
    with np.errstate(over="ignore"):
        for n in range(2, ngrams + 1):
            if n_tok < n:
                break
            h = np.full(n_tok - n + 1, _FNV_OFFSET, dtype=np.uint64)
            for k in range(n):
                h = (h ^ hashes[k : n_tok - n + 1 + k]) * _FNV_PRIME
            h ^= h >> np.uint64(29)
            parts.append((h % np.uint64(num_buckets)).astype(np.int64))
    if not parts:
        return np.zeros((0,), np.int64)
    return np.concatenate(parts)


TERM_WEIGHTS = ("none", "count", "log", "binary")


@dataclasses.dataclass(frozen=True)
class Featurizer:
    """Text -> one bag of int32 ids (unigrams then hashed n-grams), optionally weighted.

    Attributes:
        vocab: the unigram vocabulary (``V`` ids).
        ngrams: longest n-gram (1: words only, 2: words + bigrams, ...).
        num_buckets: hash buckets for the n-grams (ignored when ``ngrams == 1``).
        max_tokens: keep only the first ``max_tokens`` tokens of a text (0: all).
        term_weights: what :meth:`bag` returns.

            * ``"none"``: every id in text order, unweighted (a mean over occurrences);
            * ``"count"``: each distinct id once, weighted by its count (a weighted mean
              equal to the plain mean, with about half the ids);
            * ``"log"``: each distinct id once, weighted ``1 + ln(count)`` (sublinear tf,
              as scikit-learn's ``TfidfVectorizer(sublinear_tf=True)``);
            * ``"binary"``: each distinct id once, unweighted (a mean over distinct ids).
        idf: float32 ``[num_embeddings]`` multiplied into the weights (None: off); see
            :meth:`fit`.
    """

    vocab: Vocabulary
    ngrams: int = 2
    num_buckets: int = 2**16
    max_tokens: int = 0
    term_weights: str = "none"
    idf: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.ngrams < 1:
            raise ValueError(f"ngrams must be >= 1, got {self.ngrams}")
        if self.ngrams > 1 and self.num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1 when ngrams > 1, got {self.num_buckets}")
        if self.term_weights not in TERM_WEIGHTS:
            raise ValueError(
                f"term_weights must be one of {TERM_WEIGHTS}, got {self.term_weights!r}; "
                "e.g. --config.tokenizer.term_weights=count"
            )
        if self.idf is not None and self.idf.shape != (self.num_embeddings,):
            raise ValueError(
                f"idf must have shape ({self.num_embeddings},) (one weight per embedding row), "
                f"got {self.idf.shape}"
            )
        object.__setattr__(self, "_hash_cache", {})

    @property
    def num_embeddings(self) -> int:
        """Rows of the embedding table: ``V`` (+ ``num_buckets`` with n-grams)."""
        return len(self.vocab) + (self.num_buckets if self.ngrams > 1 else 0)

    @property
    def weighted(self) -> bool:
        """Whether :meth:`bag` returns weights (``per_sample_weights``)."""
        return self.idf is not None or self.term_weights in ("count", "log")

    def tokens(self, text: str) -> list[str]:
        toks = tokenize(text)
        return toks[: self.max_tokens] if self.max_tokens > 0 else toks

    def __call__(self, text: str) -> np.ndarray:
        """Every id of ``text``, in order: int32 ``[n]``."""
        toks = self.tokens(text)
        ids = self.vocab.encode(toks)
        if self.ngrams == 1 or len(toks) < 2:
            return ids
        grams = ngram_buckets(
            token_hashes(toks, self._hash_cache),  # type: ignore[attr-defined]
            ngrams=self.ngrams,
            num_buckets=self.num_buckets,
        )
        return np.concatenate([ids, (grams + len(self.vocab)).astype(np.int32)])

    def bag(self, text: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The bag of ``text``: ``(ids int32 [n], weights float32 [n] or None)``.

        ``weights`` is None exactly when :attr:`weighted` is False.
        """
        ids = self(text)
        if self.term_weights == "none":
            weights = None
        else:
            ids, counts = np.unique(ids, return_counts=True)
            ids = ids.astype(np.int32)
            weights = {
                "count": lambda: counts.astype(np.float32),
                "log": lambda: (1.0 + np.log(counts)).astype(np.float32),
                "binary": lambda: None,
            }[self.term_weights]()
        if self.idf is not None:
            idf = self.idf[ids]
            weights = idf if weights is None else weights * idf
        return ids, weights

    def to_json(self) -> dict[str, Any]:
        return {
            "ngrams": self.ngrams,
            "num_buckets": self.num_buckets,
            "max_tokens": self.max_tokens,
            "term_weights": self.term_weights,
            "idf": None if self.idf is None else self.idf.tolist(),
            "tokens": list(self.vocab.tokens),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Featurizer:
        return cls(
            vocab=Vocabulary(tuple(obj["tokens"])),
            ngrams=int(obj["ngrams"]),
            num_buckets=int(obj["num_buckets"]),
            max_tokens=int(obj["max_tokens"]),
            term_weights=str(obj["term_weights"]),
            idf=None if obj["idf"] is None else np.asarray(obj["idf"], np.float32),
        )

    @classmethod
    def fit(cls, texts: Sequence[str], tokenizer_config: Mapping[str, Any]) -> Featurizer:
        """Builds the featurizer from ``texts`` (the training split) and ``config.tokenizer``.

        With ``tokenizer_config["idf"]`` the weights are multiplied by the smoothed inverse
        document frequency of each id over ``texts``, ``ln((1 + n) / (1 + df)) + 1`` (as
        scikit-learn's ``TfidfVectorizer``); ids no training text has get ``ln(1 + n) + 1``.
        """
        max_tokens = int(tokenizer_config["max_tokens"])
        token_lists = (
            (tokenize(t)[:max_tokens] if max_tokens > 0 else tokenize(t)) for t in texts
        )
        vocab = Vocabulary.build(
            token_lists,
            min_freq=int(tokenizer_config["min_freq"]),
            max_size=int(tokenizer_config["max_size"]),
        )
        featurizer = cls(
            vocab=vocab,
            ngrams=int(tokenizer_config["ngrams"]),
            num_buckets=int(tokenizer_config["num_buckets"]),
            max_tokens=max_tokens,
            term_weights=str(tokenizer_config["term_weights"]),
        )
        if not tokenizer_config["idf"]:
            return featurizer
        df = np.zeros(featurizer.num_embeddings, np.int64)
        for t in texts:
            df[np.unique(featurizer(t))] += 1
        n = len(texts)
        idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        return dataclasses.replace(featurizer, idf=idf)
