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


# --- Looking inside a convnet (cnnjax.inspect) ------------------------------------------


def _no_ticks(ax: plt.Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_channel(activation: np.ndarray, channel: int, path: str | os.PathLike, title: str | None = None) -> Path:
    """One channel of an activation (H, W, C), as the lecture's plt.matshow(..., cmap='viridis')."""
    activation = np.asarray(activation)
    fig, ax = plt.subplots(figsize=(3, 3.3))
    ax.matshow(activation[..., channel], cmap="viridis")
    _no_ticks(ax)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_activation_grid(layer_name: str, grid: np.ndarray, path: str | os.PathLike, images_per_row: int = 16) -> Path:
    """A channel grid (`cnnjax.inspect.activation_grid`) as the lecture draws it.

    Figure size is the grid's pixel size times 1/size (one inch per channel tile), title
    the layer name, imshow with viridis, aspect auto, no grid lines.
    """
    grid = np.asarray(grid)
    scale = images_per_row / grid.shape[1]  # 1 / size: the grid is images_per_row tiles wide
    fig = plt.figure(figsize=(scale * grid.shape[1], max(scale * grid.shape[0], 1.0) + 0.4))
    plt.title(layer_name)
    plt.grid(False)
    plt.imshow(grid, aspect="auto", cmap="viridis")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_filter_patterns(
    images: np.ndarray, path: str | os.PathLike, title: str | None = None, labels: Sequence[str] | None = None, cols: int = 8
) -> Path:
    """Filter patterns (F, H, W, C) in 0..1 side by side, `cols` per row, optionally labelled."""
    images = np.asarray(images)
    n = len(images)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + (0.5 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        gray = image.shape[-1] == 1
        ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=1)
        if labels is not None:
            ax.set_title(labels[i], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_heatmap(overlay: np.ndarray, heatmap: np.ndarray, path: str | os.PathLike, title: str | None = None) -> Path:
    """Grad-CAM: the raw class-activation heatmap (matshow, as the book shows it) and its overlay on the image."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3.8))
    left.matshow(np.asarray(heatmap), cmap="jet", vmin=0, vmax=1)
    left.set_title("heatmap", fontsize=10)
    right.imshow(np.asarray(overlay))
    right.set_title("overlay", fontsize=10)
    for ax in (left, right):
        _no_ticks(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
