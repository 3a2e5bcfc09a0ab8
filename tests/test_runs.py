"""Runs that survive: resume after SIGKILL at any moment, refusals, the lock,
divergence, data checked first.

The kill tests run the real experiment scripts in a subprocess (tests/_killed_run.py kills it
at a chosen moment), resume them, and compare with an uninterrupted run of the same seed:
same history (but for the seconds), bitwise the same parameters, the same best checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cnnjax import checkpoint, data, runs
from tests.conftest import CATS_SIZE, REPO, poison, write_cats_dogs_folder, write_mnist_folder

MNIST_ARGS = ["--epochs", "3", "--batch-size", "32", "--train.eval_batch_size", "32"]
CATS_ARGS = [
    "--dropout",
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--train.eval_batch_size",
    "8",
    "--image-size",
    str(CATS_SIZE),
]


def run_script(
    args: list[str], env_extra: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def latest_params(folder: Path):
    return jax.tree.map(np.asarray, checkpoint.load_model(folder, "latest")[1])


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same training: history, latest parameters,
    best epoch and its parameters."""
    assert without_seconds(json.loads((a / "history.json").read_text())) == without_seconds(
        json.loads((b / "history.json").read_text())
    )
    for x, y in zip(jax.tree.leaves(latest_params(a)), jax.tree.leaves(latest_params(b))):
        np.testing.assert_array_equal(x, y)
    assert checkpoint.find(a, "best").name == checkpoint.find(b, "best").name
    best_a, best_b = checkpoint.load_model(a, "best")[1], checkpoint.load_model(b, "best")[1]
    for x, y in zip(jax.tree.leaves(best_a), jax.tree.leaves(best_b)):
        np.testing.assert_array_equal(x, y)
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == sorted(
        p.name for p in (b / "checkpoints").iterdir()
    )


@pytest.fixture(scope="module")
def mnist_data(tmp_path_factory) -> Path:
    return write_mnist_folder(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def mnist_reference(mnist_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_script(
        ["experiments/mnist.py", *MNIST_ARGS, "--data-dir", str(mnist_data), "--out", str(out)]
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow  # a killed subprocess and two more per case
@pytest.mark.parametrize(
    "point,epoch", [("compile", 1), ("mid-epoch", 2), ("mid-save", 2), ("after-save", 2)]
)
def test_mnist_killed_at_any_moment_resumes_to_the_uninterrupted_run(
    point, epoch, mnist_data, mnist_reference, tmp_path
):
    out = tmp_path / "run"
    argv = [*MNIST_ARGS, "--data-dir", str(mnist_data), "--out", str(out)]
    killed = run_script(["-m", "tests._killed_run", "mnist", point, str(epoch), "--", *argv])
    assert killed.returncode == -9, killed.stderr[-2000:]
    if point in (
        "mid-epoch",
        "mid-save",
        "after-save",
    ):  # the epochs before the kill are on disk, history included
        assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == list(
            range(1, epoch)
        )
    refused = run_script(
        ["experiments/mnist.py", *argv]
    )  # without --resume: refused, nothing touched
    assert refused.returncode == 2 and "add --resume" in refused.stderr
    resumed = run_script(["experiments/mnist.py", *argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "taking it over" in resumed.stdout  # the dead process's lock
    if point != "compile":
        assert "Resuming" in resumed.stdout
    assert_same_run(out, mnist_reference)
    leftovers = [
        p.name for p in out.rglob("*") if ".tmp-" in p.name or "orbax-checkpoint-tmp" in p.name
    ]
    assert leftovers == [] and not (out / ".lock").exists()


@pytest.mark.slow  # a killed subprocess and two more
def test_a_cosine_schedule_and_reduce_on_plateau_resume_exactly_after_sigkill(mnist_data, tmp_path):
    """Their state (the schedule's step count, the plateau's scale) is in the checkpoint: a run
    killed mid-epoch and resumed ends with the uninterrupted run's history and parameters."""
    argv = [
        *MNIST_ARGS,
        "--epochs",
        "4",
        "--optim.schedule",
        "cosine",
        "--optim.warmup_epochs",
        "1",
        "--optim.plateau_factor",
        "0.5",
        "--optim.plateau_patience",
        "1",
        "--data-dir",
        str(mnist_data),
    ]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert run_script(["experiments/mnist.py", *argv, "--out", str(reference)]).returncode == 0
    killed = run_script(
        ["-m", "tests._killed_run", "mnist", "mid-epoch", "3", "--", *argv, "--out", str(out)]
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_script(["experiments/mnist.py", *argv, "--out", str(out), "--resume"])
    assert resumed.returncode == 0 and "after epoch 2" in resumed.stdout, resumed.stderr[-2000:]
    assert_same_run(out, reference)


@pytest.mark.slow  # a killed subprocess and three more
def test_catsdogs_killed_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path):
    data = write_cats_dogs_folder(tmp_path / "data")
    reference, out = tmp_path / "reference", tmp_path / "run"
    done = run_script(
        ["experiments/catsdogs.py", *CATS_ARGS, "--data-dir", str(data), "--out", str(reference)]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    argv = [*CATS_ARGS, "--data-dir", str(data), "--out", str(out)]
    killed = run_script(["-m", "tests._killed_run", "catsdogs", "mid-epoch", "2", "--", *argv])
    assert killed.returncode == -9, killed.stderr[-2000:]
    start = time.perf_counter()
    resumed = run_script(["experiments/catsdogs.py", *argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stdout and time.perf_counter() - start > 0
    assert_same_run(out, reference)


def test_resume_with_another_recipe_is_refused_naming_the_fields(
    mnist_data, mnist_reference, tmp_path
):
    before = {p: p.stat().st_mtime_ns for p in mnist_reference.rglob("*")}
    argv = [*MNIST_ARGS, "--data-dir", str(mnist_data), "--out", str(mnist_reference), "--resume"]
    refused = run_script(["experiments/mnist.py", *argv, "--learning-rate", "0.01", "--seed", "3"])
    assert refused.returncode == 2
    err = refused.stderr.strip()
    assert (
        "\n" not in err
        and "optim.learning_rate: 0.001 -> 0.01" in err
        and "train.seed: 0 -> 3" in err
    )
    assert {
        p: p.stat().st_mtime_ns for p in mnist_reference.rglob("*")
    } == before  # nothing touched


def test_resume_of_a_finished_run_changes_nothing_and_resume_of_an_empty_folder_is_refused(
    mnist_data, mnist_reference, tmp_path
):
    finished = tmp_path / "finished"
    shutil.copytree(
        mnist_reference, finished
    )  # the module's reference run stays as it was for the other tests
    history = (finished / "history.json").read_text()
    again = run_script(
        [
            "experiments/mnist.py",
            *MNIST_ARGS,
            "--data-dir",
            str(mnist_data),
            "--out",
            str(finished),
            "--resume",
        ]
    )
    assert again.returncode == 0 and "Resuming" in again.stdout and "Epoch" not in again.stdout
    assert (finished / "history.json").read_text() == history
    assert_same_run(finished, mnist_reference)
    # Nothing to resume is a mistyped folder more often than a first start: refused before the data
    # loads, so a scheduler's first submission drops --resume.
    fresh = tmp_path / "fresh"
    refused = run_script(
        [
            "experiments/mnist.py",
            *MNIST_ARGS,
            "--epochs",
            "1",
            "--data-dir",
            str(mnist_data),
            "--out",
            str(fresh),
            "--resume",
        ]
    )
    assert refused.returncode == 2 and "Epoch" not in refused.stdout, refused
    line = refused.stderr.strip()
    assert (
        line.endswith(
            "holds nothing to resume (no run was started there): drop --resume to "
            "start a new run in it"
        )
        and "\n" not in line
    ), refused.stderr
    assert not fresh.exists()


BAD_FLAGS = [
    ("mnist", ["--epochs", "0"], "train.epochs must be an integer >= 1, got 0"),
    ("mnist", ["--epochs", "-1"], "train.epochs must be an integer >= 1, got -1"),
    ("mnist", ["--batch-size", "0"], "train.batch_size must be an integer >= 1, got 0"),
    ("mnist", ["--learning-rate", "-1"], "optim.learning_rate must be a finite number > 0"),
    ("mnist", ["--learning-rate", "nan"], "optim.learning_rate must be a finite number > 0"),
    ("mnist", ["--seeds", "0"], "train.seeds must be an integer >= 1"),
    ("mnist", ["--optim.name", "sgd"], "optim.name must be one of rmsprop, adam"),
    (
        "mnist",
        ["--model.dropout", "0.5"],
        "unknown flag --model.dropout",
    ),  # MNIST's convnet has no dropout: no flag for it
    ("mnist", ["--data.image_size", "32"], "unknown flag --data.image_size"),
    ("mnist", ["--epoch", "3"], "unknown flag --epoch; did you mean --epochs?"),
    ("mnist", ["--learning_rate", "0.1"], "did you mean --optim.learning_rate or --learning-rate?"),
    ("mnist", ["--resume", "maybe"], "run.resume must be true or false"),
    (
        "mnist",
        ["--optim.schedule", "linear"],
        "optim.schedule must be one of constant, cosine, exponential",
    ),
    ("mnist", ["--optim.warmup_epochs", "3", "--epochs", "3"], "leaves no epoch after the warmup"),
    ("mnist", ["--train.early_stopping", "-1"], "train.early_stopping must be an integer >= 0"),
    ("mnist", ["--train.epochs", "2", "--epochs", "3"], "train.epochs given twice"),
    ("catsdogs", ["--augment.fill_mode", "mirror"], "fill_mode must be one of"),
    ("catsdogs", ["--augment.rotation_range", "-5"], "rotation_range must be >= 0"),
    ("mnist", ["--data-dir", "/nonexistent/mnist"], "--data-dir /nonexistent/mnist does not exist"),
    ("mnist", ["--no-such-flag", "1"], "unknown flag --no-such-flag"),
    (
        "mnist",
        ["--data-dir", __file__],
        "is a file, not a folder; pass the folder that holds the data",
    ),
    (
        "mnist",
        ["--seed", "4294967296"],
        "train.seed must be at most 2**32 - train.seeds, got 4294967296",
    ),
    (
        "mnist",
        ["--seed", "4294967295", "--seeds", "2"],
        "train.seed must be at most 2**32 - train.seeds",
    ),
    (
        "mnist",
        ["--epochs", "99999999999999999999"],
        "train.epochs must be below 2**31, got 99999999999999999999",
    ),
    ("mnist", ["--batch-size", "2147483648"], "train.batch_size must be below 2**31"),
    ("catsdogs", ["--image-size", "32"], "needs at least 46x46 pixels"),
    ("catsdogs", ["--dropout", "1.0"], "model.dropout must be in [0, 1)"),
    ("catsdogs", ["--dropout", "0.3", "--model.dropout", "0.4"], "disagree"),
    (
        "catsdogs",
        ["--data.interpolation", "cubic"],
        "data.interpolation must be one of nearest, bilinear",
    ),
    ("catsdogs", ["--augment", "heavy"], "invalid choice: 'heavy'"),
    (
        "catsdogs",
        ["--augment.interpolation", "bicubic"],
        "interpolation must be one of ('bilinear', 'nearest')",
    ),
    (
        "catsdogs",
        ["--interpolation", "bilinear"],
        "did you mean --data.interpolation or --augment.interpolation?",
    ),  # by path only
    (
        "ablate_augmentation",
        ["--settings", "x:model.dropout=1.5"],
        "setting 'x': model.dropout must be in [0, 1), got 1.5",
    ),
    (
        "ablate_augmentation",
        ["--settings", "none", "flip", "none"],
        "two settings are named 'none'; give each its own name",
    ),
]


@pytest.mark.parametrize("script,flags,message", BAD_FLAGS)
def test_bad_flags_are_one_line_exit_2_and_no_run_folder(script, flags, message, tmp_path, capsys):
    import importlib

    experiment = importlib.import_module(f"experiments.{script}")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        experiment.main([*flags, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "classes,message",
    [
        (
            ("cats", "dogs", "foxes"),
            "has 3 classes (cats, dogs, foxes) but the model needs exactly 2",
        ),
        (("cats",), "has 1 classes (cats) but the model needs exactly 2"),
    ],
)
def test_a_folder_without_two_classes_is_refused_before_training(
    classes, message, tmp_path, capsys
):
    from experiments import catsdogs as experiment

    data = write_cats_dogs_folder(tmp_path / "data", classes=classes)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        experiment.main([*CATS_ARGS, "--data-dir", str(data), "--out", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_labels_outside_the_models_range_are_an_error():
    from cnnjax import models

    labels = np.arange(11, dtype=np.int32)
    with pytest.raises(data.DataError, match="labels run from 0 to 10, outside 0..9"):
        data.check_classes(
            {
                "train": data.Images(
                    np.zeros((11, 28, 28, 1), np.uint8), labels, [str(d) for d in range(10)]
                )
            },
            models.MnistConvNet().head.num_classes,
            "MNIST",
        )


def test_divergence_stops_keeps_the_last_finite_state_and_exits_3(tmp_path, monkeypatch, capsys):
    """Epoch 2 turns the parameters to NaN: training stops, the checkpoints hold epoch 1,
    the history is strict JSON."""
    from experiments import catsdogs as experiment

    folder = write_cats_dogs_folder(tmp_path / "data")
    poison(monkeypatch, 0, after_step=2)  # 16 images in batches of 8: in epoch 2
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        experiment.main([*CATS_ARGS, "--data-dir", str(folder), "--out", str(out)])
    assert exit_info.value.code == runs.EXIT_DIVERGED == 3
    printed = capsys.readouterr().out
    assert (
        "Diverged at epoch 2" in printed
        and "lower learning rate" in printed
        and "Final val_accuracy" not in printed
    )
    history = json.loads(
        (out / "history.json").read_text()
    )  # strict JSON: json.loads would take NaN, so read the text
    assert (
        "NaN" not in (out / "history.json").read_text()
        and history[1]["loss"] is None
        and history[1]["diverged"] is True
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["1"]
    _, params, description = checkpoint.load_model(out, "latest")
    assert description["epoch"] == 1 and all(
        np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.tree.map(np.asarray, params))
    )
    assert checkpoint.find(out, "best").name == "1"


def test_tensorboard_holds_each_seeds_history_config_and_figures(tmp_path):
    """Keras's TensorBoard callback, without TensorFlow: one run per seed, read back and
    compared with history.json."""
    from experiments import catsdogs as experiment
    from tests.tensorboard_events import read_events

    data = write_cats_dogs_folder(tmp_path / "data")
    out = tmp_path / "run"
    result = experiment.main(
        [*CATS_ARGS, "--epochs", "2", "--seeds", "2", "--data-dir", str(data), "--out", str(out)]
    )
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["seed0", "seed1"]
    for seed, history in zip(result.seeds, result.histories):
        events = read_events(out / "tensorboard" / f"seed{seed}")
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            steps, values = zip(*events["scalars"][f"epoch/{key}"])
            assert list(steps) == [1, 2]
            np.testing.assert_allclose(
                values, [row[key] for row in history], rtol=1e-6
            )  # stored as float32
        assert [v for _, v in events["scalars"]["epoch/learning_rate"]] == pytest.approx(
            [1e-3, 1e-3]
        )
        assert (
            events["hparams"]["train.seed"] == seed
            and events["hparams"]["augment.interpolation"] == "bilinear"
        )
        assert events["hparams"]["model.dropout"] == pytest.approx(0.5)
        assert set(events["images"]) == {"history", "preview"} and events["finished"]
