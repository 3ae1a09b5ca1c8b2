"""Unknown ``--config.<key>`` overrides, reported with the list of valid keys.

``ml_collections`` rejects an unknown key in a locked config, but its message only
suggests one spelling. :func:`unknown_override_errors` checks every override on the
command line against the config file first and explains each bad key.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted keys of ``config`` (sub-configs are expanded), sorted."""
    keys = []
    for name in sorted(config.keys()):
        value = config[name]
        dotted = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.append(dotted)
            keys.extend(leaf_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Calls ``get_config()`` of a config file given as ``path`` or ``path:arg``."""
    path, arg = spec, None
    if not Path(spec).is_file() and ":" in spec:
        path, arg = spec.split(":", 1)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    module_spec = importlib.util.spec_from_file_location(f"_config_check_{p.stem}", p)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def _long(arg: str) -> str:
    """``-flag...`` as ``--flag...`` (absl takes both spellings)."""
    return "-" + arg if arg.startswith("-") and not arg.startswith("--") else arg


def config_path_from_argv(argv: Sequence[str], flag: str = "config") -> str | None:
    """The value of ``--config=PATH`` / ``--config PATH`` (or ``-config``) in ``argv``
    (None if absent)."""
    argv = [_long(a) for a in argv]
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def override_keys(argv: Sequence[str], flag: str = "config") -> list[tuple[str, str]]:
    """``(dotted_key, argument)`` of each ``--config.KEY[=V]`` / ``--noconfig.KEY`` in argv
    (or with one dash, as absl also accepts)."""
    out = []
    for arg in argv:
        if arg == "--":
            break
        for prefix in (f"--{flag}.", f"--no{flag}."):
            if _long(arg).startswith(prefix):
                out.append((_long(arg)[len(prefix):].split("=", 1)[0], arg))
    return out


def unknown_key_message(config: ml_collections.ConfigDict, key: str, argument: str) -> str | None:
    """``None`` if ``key`` exists in ``config``, else a message listing the valid keys."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth])
        if isinstance(node, ml_collections.ConfigDict) and part in node:
            node = node[part]
            continue
        if isinstance(node, ml_collections.ConfigDict):
            valid = sorted(node.keys())
            where = f"under 'config.{here}'" if here else "at the top level"
            guess = difflib.get_close_matches(part, valid, n=1)
            hint = f" Did you mean 'config.{'.'.join([*parts[:depth], guess[0]])}'?" if guess else ""
            return (
                f"unknown config key 'config.{key}' (from {argument}): no '{part}' {where}. "
                f"Valid keys {where}: {', '.join(valid)}.{hint}\n"
                f"All valid keys: {', '.join(leaf_keys(config))}"
            )
        return (
            f"unknown config key 'config.{key}' (from {argument}): 'config.{here}' is a "
            f"value, not a group of keys.\nAll valid keys: {', '.join(leaf_keys(config))}"
        )
    return None


def unknown_override_errors(argv: Sequence[str], flag: str = "config") -> list[str]:
    """One message per ``--config.KEY`` override in ``argv`` whose KEY is not in the config file,
    or one saying that the config file does not exist.

    Returns an empty list when there is no config flag or every key exists.
    """
    spec = config_path_from_argv(argv, flag)
    if spec is None:
        return []
    try:
        config = load_config_file(spec)
    except FileNotFoundError as e:
        return [f"{e} (from --{flag} {spec}); the configs are in configs/*.py"]
    overrides = override_keys(argv, flag)
    messages = [unknown_key_message(config, key, arg) for key, arg in overrides]
    return [m for m in messages if m is not None]
