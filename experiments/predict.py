r"""Classify texts with a trained workdir.

    python -m experiments.predict --workdir runs/bbc_news "Shares in the bank rose 5% ..."
    echo "some text" | python -m experiments.predict --workdir runs/bbc_news      # one text per line
    python -m experiments.predict --workdir runs/bbc_news --json "text one" "text two"

Everything comes from the workdir: ``config.json`` (the model), ``vocab.json`` (the
featurizer), ``split.json`` (class names) and the latest checkpoint's parameters.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

import jaxbag
from experiments.textcls import artifacts, checkpoint, data, logs, sharded
from experiments.textcls.model import build_model
from experiments.textcls.tokenizer import Featurizer

# Flag holders, set by define_flags() when run as a program.
_WORKDIR: Any = None
_JSON: Any = None
_TOP: Any = None


class Predictor:
    """A trained classifier loaded from a workdir; call it on a list of texts."""

    def __init__(self, workdir: str | Path) -> None:
        workdir = Path(workdir)
        config = artifacts.load_config(workdir)
        self.featurizer = Featurizer.from_json(artifacts.read_json(workdir / artifacts.VOCAB))
        self.class_names: list[str] = artifacts.read_json(workdir / artifacts.SPLIT)["class_names"]
        params, self.epoch = checkpoint.load_params(workdir)
        self.num_epochs = int(config.train.num_epochs)
        model = build_model(
            config.model, num_embeddings=self.featurizer.num_embeddings,
            num_classes=len(self.class_names), seed=0,
        )
        graphdef, state = nnx.split(model)
        table, rows = params["embed"]["embedding"], self.featurizer.num_embeddings
        if table.shape[0] == sharded.saved_table_rows(config, rows) != rows:
            params["embed"]["embedding"] = table[:rows]  # a sharded run's zero padding rows
        checkpoint.check_fits(checkpoint.checkpoint_dir(workdir) / str(self.epoch), params,
                              nnx.to_pure_dict(state))
        checkpoint.check_saved_vocab(workdir, self.epoch)  # an edit that kept the shapes
        nnx.replace_by_pure_dict(state, params)
        self.model = nnx.merge(graphdef, state)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), C]`` class probabilities."""
        ids, weights = zip(*(self.featurizer.bag(t) for t in texts))
        bags = jaxbag.pack_bags(ids, weights=None if weights[0] is None else weights)
        logits = self.model(bags.indices, bags.segment_ids, num_bags=bags.num_bags,
                            weights=bags.weights)
        return np.asarray(jax.nn.softmax(logits, axis=-1))

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One ``{"text", "label", "scores": {class: probability}}`` per text."""
        probs = self.scores(texts)
        return [
            {
                "text": t,
                "label": self.class_names[int(np.argmax(p))],
                "scores": {c: float(s) for c, s in zip(self.class_names, p)},
            }
            for t, p in zip(texts, probs)
        ]


def _format(result: dict[str, Any], top: int) -> str:
    ranked = sorted(result["scores"].items(), key=lambda kv: -kv[1])
    if top > 0:
        ranked = ranked[:top]
    text = result["text"].replace("\n", " ")
    lines = [f"text: {text[:100]}{'...' if len(text) > 100 else ''}",
             f"predicted: {result['label']}"]
    lines += [f"  {name:<16} {score:.4f}" for name, score in ranked]
    return "\n".join(lines)


def read_texts(args: Sequence[str], stdin: TextIO) -> list[str]:
    """The texts to classify: the arguments, or else ``stdin``'s lines (each line a text,
    blank ones too, so that the outputs line up with the inputs). Bytes that are not UTF-8
    are an error naming the argument or the line (``data.decode_utf8``), not text with
    lone surrogates (how Python decodes them in argv, and in stdin under a C.UTF-8 locale)
    that loses the word they are in and is not valid JSON."""
    for i, arg in enumerate(args, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            data.decode_utf8(os.fsencode(arg), f"argument {i}", "pass UTF-8 text", lines=False)
            raise  # (decode_utf8 raised; this only keeps the type checker informed)
    if args:
        return list(args)
    text = data.decode_utf8(stdin.buffer.read(), "<stdin>",
                            "re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE`")
    return [line.rstrip("\n") for line in io.StringIO(text, newline=None)]


def define_flags() -> None:
    """Defines --workdir, --json, --top (only when run as a program)."""
    global _WORKDIR, _JSON, _TOP
    _WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.")
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON object per text instead of a table.")
    _TOP = flags.DEFINE_integer("top", 0, "Show only the top-k class scores (0: all; table only).")


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    logs.quiet_orbax()
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required, e.g. --workdir runs/bbc_news")
    texts = logs.exit_on_user_error(read_texts, argv[1:], sys.stdin)
    if not texts:
        raise app.UsageError('give texts as arguments (or on stdin, one per line): "some text"')
    predictor = logs.exit_on_user_error(Predictor, _WORKDIR.value)
    if predictor.epoch < predictor.num_epochs:
        print(f"note: {_WORKDIR.value} holds epoch {predictor.epoch} of {predictor.num_epochs}: "
              "training has not finished (these are that epoch's predictions).", file=sys.stderr)
    results = predictor.predict(texts)
    for r in results:
        print(json.dumps(r) if _JSON.value else _format(r, _TOP.value))


if __name__ == "__main__":
    define_flags()
    app.run(main)
