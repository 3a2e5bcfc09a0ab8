"""The experiment scripts as a user runs them: main() recording what it ran, training really
augmenting, evaluate.py reproducing the best epoch, activations.py seeing what training saw.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnjax import ablation, checkpoint, config
from cnnjax.data import load_image_folder
from experiments import ablate_augmentation, activations, catsdogs, evaluate
from experiments import mnist as mnist_script
from tests._experiments_helpers import (
    ABLATION_SPEC,
    LECTURE_AUGMENTATION,
    NO_AUGMENTATION,
    resolve_cats,
    resolve_mnist,
    with_changes,
)
from tests.conftest import CATS_SIZE, png_pixels, write_cats_dogs_folder, write_mnist_folder

# --- main(): what a run records -------------------------------------------------------------------

CATS_RUN_ARGS = [
    "--image-size",
    str(CATS_SIZE),
    "--data.interpolation",
    "bilinear",
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--train.eval_batch_size",
    "8",
]
PHOTO_SIZE = (
    60  # the tiny folder's images: resized to CATS_SIZE on load, so the resize filter matters
)


def write_run_data(root: Path) -> Path:
    """16 training images (a bright square means dog) and 8 validation images whose classes
    are the other way round: the more the model learns, the higher its validation loss, so
    its best epoch is its first."""
    write_cats_dogs_folder(root, {"train": 16}, size=PHOTO_SIZE)
    write_cats_dogs_folder(
        root, {"validation": 8}, size=PHOTO_SIZE, classes=("dogs", "cats"), seed=1
    )
    return root


@pytest.fixture(scope="module")
def cats_run(tmp_path_factory):
    """catsdogs.py main() on a tiny folder, 3 epochs, bilinear resize on load: (argv, run folder,
    data folder). Tests read it and never write into it."""
    root = tmp_path_factory.mktemp("cats_run")
    data, out = write_run_data(root / "data"), root / "run"
    argv = [*CATS_RUN_ARGS, "--data-dir", str(data), "--out", str(out)]
    with pytest.MonkeyPatch.context() as env:
        env.setenv(
            "CNNJAX_CACHE_DIR", str(root / "cache")
        )  # set up before the per-test cache folder
        catsdogs.main(argv)
    return argv, out, data


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_catsdogs_main_records_the_resolved_config(cats_run):
    argv, out, _ = cats_run
    saved = json.loads((out / "config.json").read_text())
    resolved = resolve_cats(argv)
    assert (
        saved["config"] == config.to_dict(resolved)
        and config.from_dict(saved["config"]) == resolved
    )
    assert (
        saved["config"]["data"]["interpolation"] == "bilinear"
        and saved["config"]["data"]["image_size"] == CATS_SIZE
    )
    assert saved["class_names"] == ["cats", "dogs"] and saved["command"][1:] == argv
    assert saved["model"] == {
        "model": "cats_dogs",
        "dropout_rate": 0.0,
        "input_shape": [CATS_SIZE, CATS_SIZE, 3],
        "num_classes": 2,
    }
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3] and {row["seed"] for row in history} == {
        0
    }


def test_mnist_main_records_the_resolved_config(tmp_path):
    data = write_mnist_folder(tmp_path / "mnist")
    argv = [
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--train.eval_batch_size",
        "32",
        "--seed",
        "2",
        "--data-dir",
        str(data),
        "--out",
        str(tmp_path / "run"),
    ]
    result = mnist_script.main(argv)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    resolved = resolve_mnist(argv)
    assert (
        saved["config"] == config.to_dict(resolved)
        and config.from_dict(saved["config"]) == resolved
    )
    assert saved["class_names"] == [str(d) for d in range(10)] and saved["command"][1:] == argv
    rows = json.loads((tmp_path / "run" / "history.json").read_text())
    assert without_seconds(rows) == without_seconds(
        [{"seed": 2, **row} for row in result.histories[0]]
    )


def test_ablation_main_records_the_resolved_config(tmp_path, monkeypatch):
    data = write_cats_dogs_folder(tmp_path / "data")
    out = tmp_path / "ablation"
    argv = [
        "--data-dir",
        str(data),
        "--settings",
        "zoom",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--train.eval_batch_size",
        "8",
        "--image-size",
        str(CATS_SIZE),
        "--seed-mode",
        "sequential",
        "--out",
        str(out),
    ]
    resolved = {}
    real = ablation.run_ablation

    def recording(settings, base, *args, **kwargs):
        resolved["base"], resolved["settings"] = base, settings
        return real(settings, base, *args, **kwargs)

    monkeypatch.setattr(ablation, "run_ablation", recording)
    ablate_augmentation.main(argv)
    base = resolved["base"]
    assert config.flatten(base) == with_changes(
        ABLATION_SPEC,
        {
            "data.data_dir": str(data),
            "train.seeds": 1,
            "train.epochs": 1,
            "train.batch_size": 8,
            "train.eval_batch_size": 8,
            "data.image_size": CATS_SIZE,
        },
    )
    assert json.loads((out / "ablation.json").read_text())["config"] == config.to_dict(base)
    (setting,) = resolved["settings"]
    saved = json.loads((out / "zoom" / "seed0" / "config.json").read_text())["config"]
    assert config.recipe_diff(config.from_dict(saved), ablation.setting_config(base, setting)) == []
    assert saved["augment"] == {
        **NO_AUGMENTATION,
        "zoom_range": 0.5,
    }  # the setting, on the base recipe
    assert {k: v for k, v in saved.items() if k not in ("name", "augment", "run")} == {
        k: v for k, v in config.to_dict(base).items() if k not in ("name", "augment", "run")
    }


# --- Training really augments ---------------------------------------------------------------------


def test_a_run_with_augmentation_differs_from_one_without_same_seed(cats_run, tmp_path):
    """The lecture's augmentation through the whole script: epoch 1 of the
    same seed, with and without it."""
    argv, out, data = cats_run
    augmented = tmp_path / "augmented"
    catsdogs.main(
        [
            *CATS_RUN_ARGS,
            "--epochs",
            "1",
            "--augment",
            "lecture",
            "--data-dir",
            str(data),
            "--out",
            str(augmented),
        ]
    )
    saved = json.loads((augmented / "config.json").read_text())["config"]
    assert saved["augment"] == LECTURE_AUGMENTATION
    plain = json.loads((out / "history.json").read_text())[0]
    shaken = json.loads((augmented / "history.json").read_text())[0]
    assert plain["epoch"] == shaken["epoch"] == 1
    assert (
        abs(plain["loss"] - shaken["loss"]) > 1e-4
        and abs(plain["val_loss"] - shaken["val_loss"]) > 1e-6
    )
    # Same seed, same initial parameters and order: only the augmentation differs.
    # Without it, the runs are equal.
    again = tmp_path / "again"
    catsdogs.main([*CATS_RUN_ARGS, "--epochs", "1", "--data-dir", str(data), "--out", str(again)])
    assert without_seconds(json.loads((again / "history.json").read_text())) == without_seconds(
        [json.loads((out / "history.json").read_text())[0]]
    )


# --- Best checkpoints, evaluate.py, metadata ------------------------------------------------------


def best_and_last(out: Path) -> tuple[dict, dict]:
    rows = json.loads((out / "history.json").read_text())
    best = min(rows, key=lambda row: row["val_loss"])
    return best, rows[-1]


def test_the_tiny_run_has_a_best_epoch_before_its_last(cats_run):
    """The checks below tell best from latest only if they differ (the validation
    classes are swapped on purpose)."""
    best, last = best_and_last(cats_run[1])
    assert best["epoch"] < last["epoch"] and last["val_loss"] - best["val_loss"] > 1e-3


@pytest.mark.parametrize("where", ["RUN", "RUN/best"])
def test_evaluate_reproduces_the_best_epochs_validation_metrics(cats_run, where, capsys, tmp_path):
    _, out, data = cats_run
    best, _ = best_and_last(out)
    checkpoint = out if where == "RUN" else out / "best"
    metrics = evaluate.main(
        ["--checkpoint", str(checkpoint), "--data-dir", str(data), "--split", "validation"]
        + ["--out", str(tmp_path)]
    )
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert metrics["accuracy"] == best["val_accuracy"]
    assert f"(epoch {best['epoch']}) on validation (8 images)" in capsys.readouterr().out


def test_evaluate_latest_is_the_last_epoch_and_the_resize_filter_is_the_runs(cats_run, tmp_path):
    _, out, data = cats_run
    _, last = best_and_last(out)
    latest = evaluate.main(
        [
            "--checkpoint",
            str(out),
            "--which",
            "latest",
            "--data-dir",
            str(data),
            "--split",
            "validation",
            *("--out", str(tmp_path)),
        ]
    )
    assert (
        latest["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
        and latest["accuracy"] == last["val_accuracy"]
    )
    nearest = evaluate.main(
        [
            "--checkpoint",
            str(out),
            "--which",
            "latest",
            "--data-dir",
            str(data),
            "--split",
            "validation",
            "--interpolation",
            "nearest",
            *("--out", str(tmp_path)),
        ]
    )
    assert (
        abs(nearest["loss"] - last["val_loss"]) > 1e-4
    )  # what the metrics above would be with load_img's default filter


def test_checkpoint_metadata_reads_back(cats_run):
    argv, out, _ = cats_run
    best, last = best_and_last(out)
    history = without_seconds(
        [
            {k: v for k, v in row.items() if k != "seed"}
            for row in json.loads((out / "history.json").read_text())
        ]
    )
    for which, row in (("best", best), ("latest", last)):
        model, params, description = checkpoint.load_model(out, which)
        assert description["epoch"] == row["epoch"] and Path(
            description["path"]
        ) == out / "checkpoints" / str(row["epoch"])
        assert description["config"] == config.to_dict(resolve_cats(argv))
        assert description["class_names"] == ["cats", "dogs"] and description["seeds"] == [0]
        assert description["model"] == {
            "model": "cats_dogs",
            "dropout_rate": 0.0,
            "input_shape": [CATS_SIZE, CATS_SIZE, 3],
            "num_classes": 2,
        }
        assert without_seconds(description["histories"][0]) == history[: row["epoch"]]
        assert description["best"][0] == {
            "epoch": best["epoch"],
            "val_loss": best["val_loss"],
            "val_accuracy": best["val_accuracy"],
        }
        assert model.input_shape == (CATS_SIZE, CATS_SIZE, 3) and params["dense_1"][
            "kernel"
        ].shape == (512, 1)


def test_evaluate_needs_only_the_split_asked_for(cats_run, tmp_path):
    _, out, data = cats_run
    best, _ = best_and_last(out)
    only_test = tmp_path / "only_test"
    shutil.copytree(
        data / "validation", only_test / "test"
    )  # the validation images, as the only split there
    metrics = evaluate.main(
        ["--checkpoint", str(out), "--data-dir", str(only_test), "--split", "test"]
        + ["--out", str(tmp_path)]
    )
    assert (
        metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
        and metrics["accuracy"] == best["val_accuracy"]
    )


def test_evaluate_refuses_a_folder_whose_classes_differ_from_the_trained_ones(
    cats_run, tmp_path, capsys
):
    _, out, data = cats_run
    other = tmp_path / "other"
    shutil.copytree(data / "validation" / "cats", other / "test" / "cat")
    shutil.copytree(data / "validation" / "dogs", other / "test" / "dog")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(out), "--data-dir", str(other), "--split", "test"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "classes are cat, dog but the model was trained on cats, dogs" in err


# --- activations.py sees what training saw --------------------------------------------------------


def test_activations_resizes_with_the_runs_interpolation(cats_run, cats_photos, tmp_path):
    """A run trained with --data.interpolation bilinear: activations.py's input is the bilinear
    resize (not load_img's default nearest), the same pixels evaluate.py and training decode."""
    _, out, data = cats_run
    photo = (
        cats_photos / "validation" / "cats" / "cat.1000.jpg"
    )  # a real photo when CNNJAX_DATA_DIR has one
    activations.main(
        [
            "--checkpoint",
            str(out),
            "--image",
            str(photo),
            "--out",
            str(tmp_path / "photo"),
            "--layers",
            "1",
        ]
    )
    shown = png_pixels(tmp_path / "photo" / "input.png")
    with Image.open(photo) as img:
        rgb = img.convert("RGB")
        bilinear = np.asarray(rgb.resize((CATS_SIZE, CATS_SIZE), Image.BILINEAR))
        nearest = np.asarray(rgb.resize((CATS_SIZE, CATS_SIZE), Image.NEAREST))
    np.testing.assert_array_equal(shown, bilinear)
    assert np.abs(shown.astype(int) - nearest).mean() > 1
    # Without --image: the first validation cat of the data folder, decoded as
    # training and evaluate.py decode it.
    activations.main(
        [
            "--checkpoint",
            str(out),
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path / "default"),
            "--layers",
            "1",
        ]
    )
    decoded = load_image_folder(data / "validation", (CATS_SIZE, CATS_SIZE), "bilinear")
    assert decoded.files[0] == "cats/1.png" and decoded.labels[0] == 0
    np.testing.assert_array_equal(png_pixels(tmp_path / "default" / "input.png"), decoded.images[0])
    nearest = load_image_folder(data / "validation", (CATS_SIZE, CATS_SIZE), "nearest").images[0]
    assert not np.array_equal(nearest, decoded.images[0])


def test_the_checks_above_left_the_run_as_main_wrote_it(cats_run):
    """activations.py and evaluate.py write into RUN/inspect unless told otherwise: every test
    above gave --out."""
    _, out, _ = cats_run
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "config.json",
        "history.csv",
        "history.json",
        "history.png",
        "preview.png",
        "tensorboard",
    ]
