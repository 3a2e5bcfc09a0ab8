"""TensorBoard logs written with tensorboardX and read back with tensorboard's own event reader."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnnjax import plots
from cnnjax.tensorboard import TensorBoardLogger, flatten_config, read_events

CONFIG = {
    "model": {"name": "catsdogs", "dropout": 0.5, "image_size": 150},
    "train": {"epochs": 3, "learning_rate": 1e-3, "batch_size": 20, "use_scan": True, "augment": {"rotation_range": 40}},
    "seed": np.int64(7),
    "data_dir": None,
    "settings": ["none", "flip"],
}
FLAT = {
    "model.name": "catsdogs",
    "model.dropout": 0.5,
    "model.image_size": 150,
    "train.epochs": 3,
    "train.learning_rate": 1e-3,
    "train.batch_size": 20,
    "train.use_scan": True,
    "train.augment.rotation_range": 40,
    "seed": 7,
    "data_dir": "None",
    "settings": "['none', 'flip']",
}
HISTORY = [
    {"epoch": 1, "loss": 0.69, "accuracy": 0.52, "val_loss": 0.68, "val_accuracy": 0.55, "learning_rate": 1e-3, "seconds": 58.1},
    {"epoch": 2, "loss": 0.61, "accuracy": 0.66, "val_loss": None, "val_accuracy": 0.61, "learning_rate": 1e-3, "seconds": 57.9},
    {"epoch": 3, "loss": float("nan"), "accuracy": 0.70, "val_loss": 0.58, "val_accuracy": 0.69, "learning_rate": 5e-4, "diverged": True},
]


def f32(x: float) -> float:
    """What TensorBoard stores for a scalar: float32, as Keras does."""
    return float(np.float32(x))


def test_flatten_config():
    flat = flatten_config(CONFIG)
    assert flat == FLAT
    assert type(flat["seed"]) is int and type(flat["train.use_scan"]) is bool


def write_run(logdir, tmp_path):
    png = plots.plot_history(HISTORY, tmp_path / "history.png")
    image = np.linspace(0.0, 1.0, 6 * 5 * 3).reshape(6, 5, 3)
    with TensorBoardLogger(logdir) as logger:
        assert logger.log_config(CONFIG) == FLAT
        written = [logger.log_epoch(row) for row in HISTORY]
        logger.log_image("preview/augmented", image, step=1)
        logger.log_image("preview/augmented", (image[..., 0] * 255).astype(np.uint8), step=2)  # HxW uint8
        logger.log_png("history", png, step=3)
    return written, image, png


def test_one_run_reads_back_exactly(tmp_path):
    logdir = tmp_path / "runs" / "seed0"
    written, image, png = write_run(logdir, tmp_path)
    assert written[1] == {"epoch/loss": 0.61, "epoch/accuracy": 0.66, "epoch/val_accuracy": 0.61, "epoch/learning_rate": 1e-3}
    assert "epoch/loss" not in written[2]

    events = read_events(logdir)
    assert events["scalars"] == {
        "epoch/loss": [(1, f32(0.69)), (2, f32(0.61))],  # epoch 3's NaN skipped
        "epoch/accuracy": [(1, f32(0.52)), (2, f32(0.66)), (3, f32(0.70))],
        "epoch/val_loss": [(1, f32(0.68)), (3, f32(0.58))],  # epoch 2's None skipped
        "epoch/val_accuracy": [(1, f32(0.55)), (2, f32(0.61)), (3, f32(0.69))],
        "epoch/learning_rate": [(1, f32(1e-3)), (2, f32(1e-3)), (3, f32(5e-4))],
    }
    # hparams hold one number type (float); strings and booleans stay as they are
    assert events["hparams"] == {k: float(v) if type(v) is int else v for k, v in FLAT.items()}
    assert events["finished"] is True

    assert {tag: [step for step, _ in images] for tag, images in events["images"].items()} == {"preview/augmented": [1, 2], "history": [3]}
    (_, first), (_, second) = events["images"]["preview/augmented"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(first))), np.round(image * 255).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(second))), (image[..., 0] * 255).astype(np.uint8))
    assert events["images"]["history"][0][1] == png.read_bytes()  # the file's bytes, unchanged

    # the hparams live in the run itself: no timestamped sub-run beside the event file
    assert [p.is_file() and "tfevents" in p.name for p in logdir.iterdir()] == [True]


def test_sibling_runs_are_two_runs(tmp_path):
    parent = tmp_path / "ablation"
    for seed in (0, 1):
        with TensorBoardLogger(parent / f"seed{seed}") as logger:
            logger.log_config({"seed": seed, "setting": "flip"})
            logger.log_epoch({"epoch": 1, "loss": 0.5 + seed})
    runs = sorted({path.parent.name for path in parent.rglob("*tfevents*")})
    assert runs == ["seed0", "seed1"]
    assert sorted(p.name for p in parent.iterdir()) == runs
    for seed in (0, 1):
        events = read_events(parent / f"seed{seed}")
        assert events["hparams"] == {"seed": float(seed), "setting": "flip"}
        assert events["scalars"] == {"epoch/loss": [(1, 0.5 + seed)]}
    with pytest.raises(FileNotFoundError, match="seed0, seed1"):
        read_events(parent)  # the parent is not a run: the error names the runs below it


def test_an_interrupted_run_is_not_marked_finished(tmp_path):
    with pytest.raises(KeyboardInterrupt), TensorBoardLogger(tmp_path / "run") as logger:
        logger.log_config({"seed": 0})
        logger.log_epoch({"epoch": 1, "loss": 0.25})
        raise KeyboardInterrupt
    events = read_events(tmp_path / "run")
    assert events["finished"] is False
    assert events["hparams"] == {"seed": 0.0}
    assert events["scalars"] == {"epoch/loss": [(1, 0.25)]}


def test_each_epoch_is_on_disk_before_close(tmp_path):
    logger = TensorBoardLogger(tmp_path / "run")
    logger.log_epoch({"epoch": 1, "val_accuracy": 0.75})
    assert read_events(tmp_path / "run")["scalars"] == {"epoch/val_accuracy": [(1, 0.75)]}
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log_epoch({"epoch": 2, "loss": 0.5})


def test_bad_images_are_refused(tmp_path):
    with TensorBoardLogger(tmp_path / "run") as logger:
        with pytest.raises(ValueError, match="HxW"):
            logger.log_image("x", np.zeros((2, 4, 4, 3)), 1)
        with pytest.raises(TypeError, match="uint8"):
            logger.log_image("x", np.zeros((4, 4, 3), np.int32), 1)


def test_read_events_without_tensorboard_says_how_to_install(tmp_path, monkeypatch):
    with TensorBoardLogger(tmp_path / "run") as logger:
        logger.log_epoch({"epoch": 1, "loss": 0.5})
    for name in [name for name in sys.modules if name.split(".")[0] == "tensorboard"] + ["tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing tensorboard (or any of its modules) now fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        read_events(tmp_path / "run")


def test_import_pulls_in_neither_tensorflow_nor_tensorboard():
    code = "import sys, cnnjax.tensorboard; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorboard')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_a_resumed_run_adds_a_second_event_file_to_the_same_run(tmp_path):
    with TensorBoardLogger(tmp_path / "run") as logger:
        logger.log_epoch({"epoch": 1, "loss": 0.5})
    with TensorBoardLogger(tmp_path / "run") as logger:  # same process, same second
        logger.log_epoch({"epoch": 2, "loss": 0.25})
    assert len(list((tmp_path / "run").iterdir())) == 2
    assert read_events(tmp_path / "run")["scalars"] == {"epoch/loss": [(1, 0.5), (2, 0.25)]}
