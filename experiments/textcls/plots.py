"""Loss and accuracy curves of a run as a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_curves(
    history: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    train_label: str = "train",
    eval_label: str = "test",
) -> Path:
    """Writes train/test loss and accuracy per epoch to ``path`` and returns it.

    ``train_label`` names the training curve (e.g. to say its loss is label-smoothed),
    ``eval_label`` the evaluation curve (the ``test_*`` metrics: a validation fold's when
    ``config.data.validation_folds`` is set).
    """
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, label in (("train", train_label), ("test", eval_label)):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=label)
        ax_acc.plot(epochs, [100 * h[f"{split}_accuracy"] for h in history], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
