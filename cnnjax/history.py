"""A run's history: per seed, one row per epoch ({"epoch", "loss", "accuracy", "val_loss",
"val_accuracy", "seconds"}, and "diverged" or "stopped" on the row where a seed ended). Written
as history.json and history.csv, one row per seed and epoch (column "seed").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnjax import files
from cnnjax import mesh as meshlib

History = list[dict[str, Any]]


def best_epochs(histories: Sequence[History]) -> list[dict[str, Any] | None]:
    """Per seed, the first epoch of lowest finite val_loss (Keras's save_best_only), or None."""
    best = []
    for history in histories:
        finite = [
            row
            for row in history
            if row.get("val_loss") is not None and math.isfinite(row["val_loss"])
        ]
        row = min(finite, key=lambda r: r["val_loss"]) if finite else None
        best.append(
            None
            if row is None
            else {
                "epoch": row["epoch"],
                "val_loss": row["val_loss"],
                "val_accuracy": row.get("val_accuracy"),
            }
        )
    return best


def format_epoch(
    row: dict[str, Any], epochs: int, compiling: float = 0.0, patience: int = 0
) -> str:
    """A Keras-like line: 'Epoch 3/5 - 12.1s - loss: 0.0412 - accuracy: 0.9871 - ...'; with
    `compiling` seconds (the first epoch), how much of the epoch went to compiling."""
    metrics = " - ".join(
        f"{k}: {row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in row
    )
    seconds = f"{row['seconds']:.1f}s" + (
        f" ({compiling:.1f}s of it compiling)" if compiling >= 0.5 else ""
    )
    note = (
        " - diverged (loss is not finite)"
        if row.get("diverged")
        else f" - stopped early (val_loss has not improved for {patience} epochs)"
        if row.get("stopped")
        else ""
    )
    return f"Epoch {row['epoch']}/{epochs} - {seconds} - {metrics}{note}"


def read(workdir: str | Path) -> dict[int, History]:
    """history.json of a run folder, as {seed: rows}."""
    out: dict[int, History] = {}
    for row in files.read_json(Path(workdir, "history.json")):
        out.setdefault(row["seed"], []).append({k: v for k, v in row.items() if k != "seed"})
    return out


def epochs_since_best(history: History) -> int:
    """Epochs since the lowest val_loss (Keras's EarlyStopping: a tie is no improvement)."""
    losses = [row["val_loss"] for row in history]
    return len(losses) - 1 - int(np.argmin(losses))


def write(
    workdir: Path,
    seeds: Sequence[int],
    histories: Sequence[History],
    grid: Sequence[Any] | None = None,
) -> None:
    """history.json and history.csv: one row per seed and epoch (column "seed"; a grid's members,
    cnnjax.grid.Member, add "setting"); process 0 only."""
    if meshlib.is_main_process():
        settings = [{"setting": m.setting} for m in grid or ()] or [{} for _ in seeds]
        rows = [
            {**setting, "seed": seed, **row}
            for setting, seed, history in zip(settings, seeds, histories)
            for row in history
        ]
        files.write_json(workdir / "history.json", rows)
        files.write_csv(workdir / "history.csv", rows)
