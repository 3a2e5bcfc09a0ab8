"""Figures, written as PNG files.

Every figure is a `matplotlib.figure.Figure` made directly, never through pyplot: it needs
no backend or screen, nothing global is switched on import, and nothing is left open.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cnnjax import files


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save through `files.atomic_path` (a reader never sees half a PNG), as the suffix's format or
    PNG."""
    path = Path(path)
    suffix = path.suffix[1:].lower()
    with files.atomic_path(path) as tmp:
        fig.savefig(
            tmp, dpi=dpi, format=suffix if suffix in fig.canvas.get_supported_filetypes() else "png"
        )
    return path


def _metric(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """One column of the history, NaN (undrawn: a gap) where a row has None, a non-finite value or
    no entry."""
    column = np.array(
        [math.nan if row.get(key) is None else row[key] for row in history], np.float64
    )
    column[~np.isfinite(column)] = math.nan
    return column


def history_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """The lecture's two-panel "Accuracy & Loss" figure, returned unsaved
    (1000x500 pixels at dpi 100).

    Each row is one epoch: "epoch" (1-based; the row's position when absent) and any of loss,
    accuracy, val_loss, val_accuracy. Validation is a line with markers, so that an epoch
    alone between gaps still shows; None, NaN or infinite values (a diverged epoch) are gaps.
    """
    epochs = np.array([row.get("epoch", i + 1) for i, row in enumerate(history)], np.float64)
    fig = Figure(figsize=(10, 5))
    for panel, (metric, name) in enumerate((("accuracy", "Accuracy"), ("loss", "Loss"))):
        ax = fig.add_subplot(1, 2, panel + 1)
        if any(metric in row for row in history):
            ax.plot(epochs, _metric(history, metric), "bo", label=f"Training {name}")
        if any(f"val_{metric}" in row for row in history):
            ax.plot(
                epochs,
                _metric(history, f"val_{metric}"),
                "r-",
                marker="o",
                markersize=4,
                label=f"Validation {name}",
            )
        ax.set_title(f"Training and Validation {name}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(
            MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1)
        )  # one epoch: one tick, not 0.1 steps
        if len(epochs) and epochs.min() == epochs.max():
            ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("Accuracy & Loss")
    fig.tight_layout()
    return fig


def plot_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """`history_figure` written to `path` (PNG, 1000x500 pixels)."""
    return save_figure(history_figure(history), path)


def plot_image_grid(
    images: np.ndarray, path: str | os.PathLike, titles: Sequence[str] | None = None, cols: int = 5
) -> Path:
    """Images (N, H, W, C) in 0..1 or uint8, side by side (the augmentation preview)."""
    images = np.asarray(images)
    n = len(images)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.5 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(
            image.squeeze(-1) if image.shape[-1] == 1 else image,
            cmap="gray" if image.shape[-1] == 1 else None,
        )
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


# --- Looking inside a convnet (cnnjax.inspect) ------------------------------------------


def plot_channel(
    activation: np.ndarray, channel: int, path: str | os.PathLike, title: str | None = None
) -> Path:
    """One channel of an activation (H, W, C), as the lecture's plt.matshow(..., cmap='viridis')."""
    fig = Figure(figsize=(3, 3.3))
    ax = fig.subplots()
    ax.matshow(np.asarray(activation)[..., channel], cmap="viridis")
    ax.set(xticks=[], yticks=[])
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_activation_grid(
    layer_name: str, grid: np.ndarray, path: str | os.PathLike, images_per_row: int = 16
) -> Path:
    """A channel grid (`cnnjax.inspect.activation_grid`) as the lecture draws it: one inch per
    channel tile, viridis."""
    grid = np.asarray(grid)
    scale = images_per_row / grid.shape[1]  # 1 / size: the grid is images_per_row tiles wide
    fig = Figure(figsize=(scale * grid.shape[1], max(scale * grid.shape[0], 1.0) + 0.4))
    ax = fig.subplots()
    ax.set_title(layer_name)
    ax.grid(False)
    ax.imshow(grid, aspect="auto", cmap="viridis")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_filter_patterns(
    images: np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    cols: int = 8,
) -> Path:
    """Filter patterns (F, H, W, C) in 0..1 side by side, `cols` per row, optionally labelled."""
    images = np.asarray(images)
    n = len(images)
    cols = min(cols, n)
    rows = -(-n // cols)
    # constrained layout keeps room for each label above its image (tight_layout let a row's labels
    # run into the row above)
    fig = Figure(
        figsize=(
            1.6 * cols,
            (1.6 + (0.25 if labels is not None else 0)) * rows + (0.5 if title else 0),
        ),
        layout="constrained",
    )
    axes = fig.subplots(rows, cols, squeeze=False)
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
    return save_figure(fig, path)


def plot_heatmap(
    overlay: np.ndarray, heatmap: np.ndarray, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Grad-CAM: the raw class-activation heatmap (matshow, as the book shows it) and its overlay on
    the image."""
    fig = Figure(figsize=(7, 3.8))
    left, right = fig.subplots(1, 2)
    left.matshow(np.asarray(heatmap), cmap="jet", vmin=0, vmax=1)
    left.set_title("heatmap", fontsize=10)
    right.imshow(np.asarray(overlay))
    right.set_title("overlay", fontsize=10)
    for ax in (left, right):
        ax.set(xticks=[], yticks=[])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


# --- What a classifier gets right (experiments/evaluate.py) ------------------------------


def confusion_figure(
    matrix: np.ndarray, class_names: Sequence[str], title: str | None = None
) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted; `cnnjax.inspect.confusion_matrix`)
    as a grid of counts, returned unsaved: each cell's count written in it, shaded by the share of
    its row (its true class), so a small class's mistakes show as clearly as a large one's."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ValueError(f"a confusion matrix of {n} classes is ({n}, {n}), got {matrix.shape}")
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    side = min(max(4.0, 0.6 * n + 2.0), 24.0)  # room for the names; 40 classes still fit a page
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    size = max(5, min(11, 120 // max(n, 1)))
    for (row, column), count in np.ndenumerate(matrix):
        ax.text(
            column,
            row,
            str(count),
            ha="center",
            va="center",
            fontsize=size,
            color="white" if share[row, column] > 0.5 else "black",  # legible on dark cells
        )
    ax.set_xticks(
        range(n), list(class_names), rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center"
    )
    ax.set_yticks(range(n), list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_confusion(
    matrix: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """`confusion_figure` written to `path` (PNG)."""
    return save_figure(confusion_figure(matrix, class_names, title), path)


# --- Ablations (cnnjax.ablation) ---------------------------------------------------------


def curve_stats(
    histories: Sequence[Sequence[Mapping[str, Any]]], key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean, std) of `key` over seeds, per epoch, up to the shortest history; NaN where
    every seed lacks it."""
    epochs = min(len(h) for h in histories)
    values = np.array(
        [[np.nan if row.get(key) is None else row[key] for row in h[:epochs]] for h in histories],
        np.float64,
    )
    with (
        warnings.catch_warnings()
    ):  # a diverged setting is all NaN: plotted as a gap, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.arange(1, epochs + 1), np.nanmean(values, 0), np.nanstd(values, 0)


def plot_curves(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Mean validation accuracy and loss per epoch of each ablation setting, with a ±1 std band
    over seeds."""
    fig = Figure(figsize=(13, 5))
    axes = fig.subplots(1, 2)
    for result in results:
        histories = [h for h in result.get("histories", []) if h]
        if not histories:
            continue
        for ax, key in zip(axes, ("val_accuracy", "val_loss")):
            x, mean, std = curve_stats(histories, key)
            label = (
                result["name"]
                if result["status"] == "ok"
                else f"{result['name']} ({result['status']})"
            )
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    titles = [f"Validation {what} (mean ± std over seeds)" for what in ("accuracy", "loss")]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_differences(
    diffs: Mapping[str, Sequence[Any]], reference: str, labels: Mapping[str, str], path: Path
) -> Path:
    """A forest plot: each setting's paired difference from the reference (cnnjax.paired), one
    panel per metric, the mean as a dot and its 95% interval as a bar, 0 as a line. diffs: at
    least one setting."""
    names = list(diffs)
    metrics = [d.metric for d in diffs[names[0]]]
    fig = Figure(figsize=(4.5 * len(metrics), 1.2 + 0.45 * len(names)))
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
    y = np.arange(len(names))[::-1]
    for i, (ax, metric) in enumerate(zip(axes, metrics)):
        rows = [diffs[name][i] for name in names]
        mean = np.array([r.mean for r in rows], np.float64)
        low = np.array([r.low for r in rows], np.float64)
        high = np.array([r.high for r in rows], np.float64)
        resolved = np.array([r.verdict in ("better", "worse") for r in rows])
        ax.axvline(0.0, color="gray", linewidth=1)
        for keep, color in ((resolved, "C3"), (~resolved, "C0")):
            ax.errorbar(
                mean[keep],
                y[keep],
                xerr=[mean[keep] - low[keep], high[keep] - mean[keep]],
                fmt="o",
                color=color,
                capsize=3,
            )
        ax.set_title(f"{labels[metric]} - {reference}", fontsize=10)
        ax.set_yticks(y, names)
        ax.set_ylim(-0.7, len(names) - 0.3)
    title = "Paired difference from the reference, 95% t interval (red: resolved)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_run(
    workdir: Path, labels: Sequence[str], histories: Sequence[Any], writers: Sequence[Any] = ()
) -> None:
    """A training's figures: the lecture's accuracy & loss figure per seed (history.png, or
    history-LABEL.png for several); with TensorBoard writers, into them too, with the
    augmentation preview."""
    for k, (label, history) in enumerate(zip(labels, histories)):
        path = plot_history(
            history, workdir / ("history.png" if len(labels) == 1 else f"history-{label}.png")
        )
        if writers:
            writers[k].png("history", path, history[-1]["epoch"] if history else 0)
            if (workdir / "preview.png").is_file():
                writers[k].png("preview", workdir / "preview.png", 0)
