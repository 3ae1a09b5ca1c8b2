"""Classification metrics as a small pytree of sums and counts, the confusion matrix, and
the misclassified examples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


class Metrics(NamedTuple):
    """Sums over examples (a pytree; add two with :meth:`merge`, read with :meth:`compute`).

    Attributes:
        loss_sum: float32 scalar, the summed per-example loss.
        correct: float32 scalar, how many predictions were right.
        count: float32 scalar, how many real (unmasked) examples were seen.
    """

    loss_sum: jax.Array
    correct: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do

    @classmethod
    def zeros(cls) -> Metrics:
        # Three distinct buffers: a train step may donate them.
        return cls(*(jnp.zeros((), jnp.float32) for _ in range(3)))

    @classmethod
    def from_batch(cls, per_example_loss: jax.Array, logits: jax.Array, labels: ArrayLike,
                   mask: ArrayLike) -> Metrics:
        """Metrics of one batch; ``mask`` (bool ``[B]``) drops the padding bags."""
        m = jnp.asarray(mask).astype(jnp.float32)
        hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return cls(jnp.sum(per_example_loss * m), jnp.sum(hit * m), jnp.sum(m))

    def merge(self, other: Metrics) -> Metrics:
        return Metrics(*(a + b for a, b in zip(self, other)))

    def compute(self) -> dict[str, float]:
        """Host floats ``{"loss", "accuracy", "count"}`` (mean loss and accuracy)."""
        loss_sum, correct, count = (float(x) for x in jax.device_get(tuple(self)))
        n = max(count, 1.0)
        return {"loss": loss_sum / n, "accuracy": correct / n, "count": count}


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 ``[C, C]``; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def format_confusion(cm: np.ndarray, class_names: Sequence[str]) -> str:
    """A plain-text table (rows: true class, columns: predicted class)."""
    names = [str(n) for n in class_names]
    corner = "true \\ pred"
    width = max(6, *(len(n) for n in names), len(str(int(cm.max(initial=0)))))
    first = max(width, len(corner)) + 2  # (the row names' column: short names under the corner)
    head = corner.ljust(first) + " ".join(n[:width].rjust(width) for n in names)
    rows = [
        names[i][:width].ljust(first) + " ".join(str(int(v)).rjust(width) for v in cm[i])
        for i in range(cm.shape[0])
    ]
    return "\n".join([head, *rows])


def misclassified(sources: Sequence[str], texts: Sequence[str], labels: np.ndarray,
                  predictions: np.ndarray, class_names: Sequence[str]) -> list[dict[str, str]]:
    """One record per example whose prediction is wrong, in dataset order:
    ``{"source", "label", "predicted", "first_line"}`` (class names; the text's first
    non-empty line, at most 100 characters: a BBC article's headline)."""
    records = []
    for i in np.nonzero(np.asarray(labels) != np.asarray(predictions))[0].tolist():
        line = next((s.strip() for s in texts[i].splitlines() if s.strip()), "")
        records.append({
            "source": sources[i],
            "label": str(class_names[int(labels[i])]),
            "predicted": str(class_names[int(predictions[i])]),
            "first_line": line[:100],
        })
    return records


def format_misclassified(records: Sequence[dict[str, str]], *, limit: int) -> str:
    """The first ``limit`` records as ``source  label -> predicted  first line``."""
    rows = [f"  {r['source']}  {r['label']} -> {r['predicted']}  {r['first_line']}"
            for r in records[:limit]]
    if len(records) > limit:
        rows.append(f"  ... {len(records) - limit} more")
    return "\n".join(rows)
