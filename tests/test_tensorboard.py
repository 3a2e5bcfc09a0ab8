"""TensorBoard logs written by cnnjax.tensorboard and read back with
tensorboard's own event reader."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from cnnjax import plots
from cnnjax.tensorboard import Writer
from tests.tensorboard_events import read_events

FLAT = {
    "model.name": "cats_dogs",
    "model.dropout": 0.5,
    "data.image_size": 150,
    "train.seed": 7,
    "data.data_dir": None,
    "augment.zoom_range": (0.5, 1.5),
    "augment.horizontal_flip": True,
}
HISTORY = [
    {
        "epoch": 1,
        "loss": 0.69,
        "accuracy": 0.52,
        "val_loss": 0.68,
        "val_accuracy": 0.55,
        "learning_rate": 1e-3,
        "seconds": 58.1,
    },
    {
        "epoch": 2,
        "loss": 0.61,
        "accuracy": 0.66,
        "val_loss": None,
        "val_accuracy": 0.61,
        "learning_rate": 1e-3,
        "seconds": 57.9,
    },
    {
        "epoch": 3,
        "loss": float("nan"),
        "accuracy": 0.70,
        "val_loss": 0.58,
        "val_accuracy": 0.69,
        "learning_rate": 5e-4,
        "diverged": True,
    },
]


def f32(x: float) -> float:
    """What TensorBoard stores for a scalar: float32, as Keras does."""
    return float(np.float32(x))


def test_one_run_reads_back_exactly(tmp_path):
    logdir = tmp_path / "runs" / "seed0"
    png = plots.plot_history(HISTORY, tmp_path / "history.png")
    writer = Writer(logdir)
    writer.config(FLAT)
    for row in HISTORY:
        writer.epoch(row)
    writer.png("history", png, 3)
    writer.close()
    events = read_events(logdir)
    assert events["scalars"] == {
        "epoch/loss": [(1, f32(0.69)), (2, f32(0.61))],  # epoch 3's NaN skipped
        "epoch/accuracy": [(1, f32(0.52)), (2, f32(0.66)), (3, f32(0.70))],
        "epoch/val_loss": [(1, f32(0.68)), (3, f32(0.58))],  # epoch 2's None skipped
        "epoch/val_accuracy": [(1, f32(0.55)), (2, f32(0.61)), (3, f32(0.69))],
        "epoch/learning_rate": [(1, f32(1e-3)), (2, f32(1e-3)), (3, f32(5e-4))],
    }
    # hparams hold one number type (float), booleans and strings; anything else is its str
    assert events["hparams"] == {
        "model.name": "cats_dogs",
        "model.dropout": 0.5,
        "data.image_size": 150.0,
        "train.seed": 7.0,
        "data.data_dir": "None",
        "augment.zoom_range": "(0.5, 1.5)",
        "augment.horizontal_flip": True,
    }
    assert events["finished"] is True
    assert events["images"] == {"history": [(3, png.read_bytes())]}  # the file's bytes, unchanged
    assert [p.is_file() and "tfevents" in p.name for p in logdir.iterdir()] == [
        True
    ]  # no timestamped sub-run


def test_an_interrupted_run_is_not_marked_finished(tmp_path):
    writer = Writer(tmp_path / "run")
    writer.config({"train.seed": 0})
    writer.epoch({"epoch": 1, "loss": 0.25})
    writer.close(finished=False)
    events = read_events(tmp_path / "run")
    assert events["finished"] is False and events["hparams"] == {"train.seed": 0.0}
    assert events["scalars"] == {"epoch/loss": [(1, 0.25)]}


def test_each_epoch_is_on_disk_when_logged(tmp_path):
    """What a kill -9 right after an epoch leaves (tensorboardX's SummaryWriter would
    still hold it in its queue)."""
    code = (
        f"from cnnjax.tensorboard import Writer; w = Writer({str(tmp_path / 'run')!r}); "
        "w.epoch({'epoch': 1, 'val_accuracy': 0.75}); import os; os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert read_events(tmp_path / "run")["scalars"] == {"epoch/val_accuracy": [(1, 0.75)]}


def test_import_pulls_in_neither_tensorflow_nor_tensorboard():
    code = (
        "import sys, cnnjax.tensorboard; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorboard')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


def test_a_resumed_run_adds_a_second_event_file_to_the_same_run(tmp_path):
    for epoch, loss in ((1, 0.5), (2, 0.25)):  # same process, same second
        writer = Writer(tmp_path / "run")
        writer.epoch({"epoch": epoch, "loss": loss})
        writer.close()
    assert len(list((tmp_path / "run").iterdir())) == 2
    assert read_events(tmp_path / "run")["scalars"] == {"epoch/loss": [(1, 0.5), (2, 0.25)]}
