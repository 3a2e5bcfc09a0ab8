"""Figures, written as PNG files (matplotlib's Agg backend: no screen needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save atomically (a temporary file renamed into place) and close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def plot_history(history: Sequence[dict[str, float]], path: str | os.PathLike) -> Path:
    """The lecture's figure: accuracy and loss per epoch, training as dots, validation as a line."""
    epochs = [row["epoch"] for row in history]
    fig = plt.figure(figsize=(10, 5))
    for panel, (metric, title, train_label, val_label) in enumerate(
        [
            ("accuracy", "Training and Validation Accuracy", "Training Accuracy", "Validation Accuracy"),
            ("loss", "Training and Validation Loss", "Training Loss", "Validation Loss"),
        ]
    ):
        plt.subplot(1, 2, panel + 1)
        plt.plot(epochs, [row[metric] for row in history], "bo", label=train_label)
        if all(f"val_{metric}" in row for row in history):
            plt.plot(epochs, [row[f"val_{metric}"] for row in history], "r", label=val_label)
        plt.title(title)
        plt.xlabel("epoch")
        plt.legend()
    plt.suptitle("Accuracy & Loss")
    plt.tight_layout()
    return save_figure(fig, path)


def plot_image_grid(images: np.ndarray, path: str | os.PathLike, titles: Sequence[str] | None = None, cols: int = 5) -> Path:
    """Images (N, H, W, C) in 0..1 or uint8, side by side (the augmentation preview)."""
    images = np.asarray(images)
    n = len(images)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
