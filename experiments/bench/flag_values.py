"""Checks of the benchmarks' command-line values, made before any work."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def int_list(flag: str, values: Iterable[Any], *, ok: Callable[[int], bool], allowed: str,
             example: str) -> list[int]:
    """``--flag``'s values (absl's list flags give strings) as ints, each one ``ok``.

    Raises:
        ValueError: ``--{flag} must be {allowed}; got {value!r}. Pass e.g. --{flag} {example}.``
            for the first value that is not an int (a bool, a float, ``"abc"``) or not ``ok``.
    """
    out = []
    for value in values:
        try:
            n = None if isinstance(value, bool | float) else int(value)
        except (TypeError, ValueError):
            n = None
        if n is None or not ok(n):
            raise ValueError(f"--{flag} must be {allowed}; got {value!r}. Pass e.g. "
                             f"--{flag} {example}.")
        out.append(n)
    return out
