"""The experiment scripts as a user runs them: the lecture's recipes exactly, each flag changing its own field
only, main() recording what it ran, evaluate.py reproducing the best epoch, activations.py seeing what
training saw.

The recipes are written out here in full (SPEC: the lecture's code), not taken from cnnjax.config: a
changed default anywhere shows as a difference from these literals.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnjax import ablation, checkpoint, config
from cnnjax.augment import AugmentConfig
from cnnjax.data import load_image_folder
from experiments import ablate_augmentation, activations, catsdogs, evaluate
from experiments import mnist as mnist_script
from tests.conftest import CATS_SIZE, png_pixels, write_cats_dogs_folder, write_mnist_folder

# --- The lecture's recipes, every field -------------------------------------------------------------

NO_AUGMENTATION = {
    "rotation_range": 0.0,
    "width_shift_range": 0.0,
    "height_shift_range": 0.0,
    "shear_range": 0.0,
    "zoom_range": 0.0,
    "horizontal_flip": False,
    "vertical_flip": False,
    "fill_mode": "nearest",
    "cval": 0.0,
    "interpolation": "bilinear",
}
# ImageDataGenerator(rotation_range=40, width_shift_range=0.2... as the lecture has it: 0.1), bilinear sampling.
LECTURE_AUGMENTATION = {
    "rotation_range": 40.0,
    "width_shift_range": 0.1,
    "height_shift_range": 0.1,
    "shear_range": 0.4,
    "zoom_range": 0.5,
    "horizontal_flip": True,
    "vertical_flip": False,
    "fill_mode": "nearest",
    "cval": 0.0,
    "interpolation": "bilinear",
}
RUN_DEFAULTS = {"out": None, "resume": False, "keep": 2, "tensorboard": True}
# The lecture trains at a constant rate: no schedule, no warmup, no ReduceLROnPlateau.
CONSTANT_RATE = {
    "schedule": "constant",
    "warmup_epochs": 0,
    "decay_rate": 0.9,
    "plateau_factor": 0.0,
    "plateau_patience": 5,
}

MNIST_SPEC = {
    "name": "mnist",
    "data": {
        "dataset": "mnist",
        "data_dir": None,
        "image_size": 28,
        "interpolation": "nearest",
        "validation_split": "test",
        "input": "auto",
    },
    "model": {"name": "mnist", "dropout": 0.0},
    "augment": NO_AUGMENTATION,
    "optim": {
        "name": "rmsprop",
        "learning_rate": 1e-3,
        "epsilon": 1e-7,
        "rho": 0.9,
        "beta_1": 0.9,
        "beta_2": 0.999,
        **CONSTANT_RATE,
    },
    "train": {
        "epochs": 5,
        "batch_size": 64,
        "eval_batch_size": 500,
        "seed": 0,
        "seeds": 1,
        "early_stopping": 0,
    },
    "run": RUN_DEFAULTS,
}
CATS_EXP1_SPEC = {
    "name": "catsdogs-exp1",
    "data": {
        "dataset": "cats_dogs",
        "data_dir": None,
        "image_size": 150,
        "interpolation": "nearest",
        "validation_split": "validation",
        "input": "auto",
    },
    "model": {"name": "cats_dogs", "dropout": 0.0},
    "augment": NO_AUGMENTATION,
    "optim": {
        "name": "adam",
        "learning_rate": 1e-3,
        "epsilon": 1e-7,
        "rho": 0.9,
        "beta_1": 0.9,
        "beta_2": 0.999,
        **CONSTANT_RATE,
    },
    "train": {
        "epochs": 30,
        "batch_size": 20,
        "eval_batch_size": 100,
        "seed": 0,
        "seeds": 1,
        "early_stopping": 0,
    },
    "run": RUN_DEFAULTS,
}
CATS_EXP2_SPEC = {
    **CATS_EXP1_SPEC,
    "name": "catsdogs-exp2",
    "model": {"name": "cats_dogs", "dropout": 0.5},
    "augment": LECTURE_AUGMENTATION,
    "train": {**CATS_EXP1_SPEC["train"], "epochs": 100},
}
# The ablation's base: experiment 1's recipe with 3 seeds.
ABLATION_SPEC = {
    **CATS_EXP1_SPEC,
    "name": "ablation",
    "train": {**CATS_EXP1_SPEC["train"], "seeds": 3},
}


def flat(spec: dict) -> dict:
    return {
        f"{section}.{name}": value
        for section, fields in spec.items()
        if isinstance(fields, dict)
        for name, value in fields.items()
    }


def with_changes(spec: dict, changes: dict) -> dict:
    """spec, flattened, with {"section.field": value} changed."""
    out = flat(spec)
    assert set(changes) <= set(out), set(changes) - set(out)
    return {**out, **changes}


def resolve_cats(argv: list[str]) -> config.Config:
    return catsdogs.resolve_config(argv)[0]


def resolve_mnist(argv: list[str]) -> config.Config:
    return mnist_script.resolve_config(argv)[0]


@pytest.fixture()
def resolve_ablation(tmp_path, monkeypatch):
    """ablate_augmentation.main as far as the base recipe it would train. It loads its data while
    resolving: a tiny folder given by CNNJAX_DATA_DIR (so no --data-dir flag shows in the config),
    available as resolve.data."""
    data = write_cats_dogs_folder(tmp_path / "data")
    monkeypatch.setenv("CNNJAX_DATA_DIR", str(data))
    captured = {}

    def capture(settings, base, datasets, *args, **kwargs):
        captured["base"], captured["settings"], captured["datasets"] = base, settings, datasets
        return []

    monkeypatch.setattr(ablation, "run_ablation", capture)

    def resolve(argv: list[str]) -> config.Config:
        captured.clear()
        ablate_augmentation.main([*argv, "--out", str(tmp_path / "ablation")])
        return captured["base"]

    resolve.data = data
    resolve.captured = captured
    return resolve


def test_mnist_resolves_to_the_lecture_recipe():
    assert config.to_dict(resolve_mnist([])) == MNIST_SPEC


def test_catsdogs_experiment_1_and_2_resolve_to_the_lecture_recipes():
    assert config.to_dict(resolve_cats([])) == CATS_EXP1_SPEC
    exp2 = resolve_cats(["--dropout"])
    assert config.to_dict(exp2) == CATS_EXP2_SPEC
    assert exp2.augment == AugmentConfig.LECTURE


def test_the_ablation_base_is_experiment_1_with_3_seeds(resolve_ablation):
    base = resolve_ablation([])
    assert config.to_dict(base) == ABLATION_SPEC
    assert config.to_dict(ablate_augmentation.base_recipe()) == ABLATION_SPEC


# --- One flag at a time ------------------------------------------------------------------------------

# A value for every field (as typed, and as parsed), different from the field's value in every recipe above.
CHANGES = {
    "data.data_dir": ("/data/elsewhere", "/data/elsewhere"),
    "data.image_size": ("64", 64),
    "data.interpolation": ("bilinear", "bilinear"),
    "data.validation_split": ("train", "train"),
    "data.input": ("memory", "memory"),
    "model.dropout": ("0.3", 0.3),
    "augment.rotation_range": ("15", 15.0),
    "augment.width_shift_range": ("0.2", 0.2),
    "augment.height_shift_range": ("0.3", 0.3),
    "augment.shear_range": ("5", 5.0),
    "augment.zoom_range": ("0.2", 0.2),
    "augment.vertical_flip": ("true", True),
    "augment.fill_mode": ("reflect", "reflect"),
    "augment.cval": ("7", 7.0),
    "augment.interpolation": ("nearest", "nearest"),
    "optim.learning_rate": ("0.002", 0.002),
    "optim.epsilon": ("1e-6", 1e-6),
    "optim.rho": ("0.8", 0.8),
    "optim.beta_1": ("0.8", 0.8),
    "optim.beta_2": ("0.99", 0.99),
    "optim.schedule": ("cosine", "cosine"),
    "optim.warmup_epochs": ("1", 1),
    "optim.decay_rate": ("0.5", 0.5),
    "optim.plateau_factor": ("0.2", 0.2),
    "optim.plateau_patience": ("3", 3),
    "train.early_stopping": ("4", 4),
    "train.epochs": ("7", 7),
    "train.batch_size": ("16", 16),
    "train.eval_batch_size": ("50", 50),
    "train.seed": ("3", 3),
    "train.seeds": ("2", 2),
    "run.out": ("/runs/elsewhere", "/runs/elsewhere"),
    "run.resume": ("true", True),
    "run.keep": ("4", 4),
    "run.tensorboard": ("false", False),
}


def change_for(path: str, spec: dict, changes: dict | None = None) -> tuple[str, object]:
    """(changes or CHANGES)[path], or for the fields with two values the one the recipe does not have."""
    if path == "augment.horizontal_flip":
        return ("false", False) if spec["augment"]["horizontal_flip"] else ("true", True)
    if path == "optim.name":
        return ("adam", "adam") if spec["optim"]["name"] == "rmsprop" else ("rmsprop", "rmsprop")
    return {**CHANGES, **(changes or {})}[path]


# Fields a script has no flag for (it cannot change them), each refused in one line naming the flag.
NO_FLAG = {"data.dataset": "unknown flag --data.dataset", "model.name": "unknown flag --model.name"}
REFUSED = {
    "mnist": {
        **NO_FLAG,
        **{
            p: f"unknown flag --{p}"
            for p in config.paths()
            if p.split(".")[0] in ("model", "augment")
            or p in ("data.image_size", "data.interpolation")
        },
    },
    "catsdogs": NO_FLAG,
    "ablation": {
        **NO_FLAG,
        **{p: f"unknown flag --{p}" for p in config.paths() if p.startswith("run.")},
    },
}


def check_one_flag_at_a_time(
    resolve, spec: dict, refused: dict, capsys, changes: dict | None = None
) -> int:
    """Every field's --section.field flag, alone: that field takes the value, every other field keeps the recipe's."""
    checked = 0
    for path in config.paths():
        if path in refused:
            with pytest.raises(SystemExit) as exit_info:
                resolve(
                    [f"--{path}", "cats_dogs" if spec["model"]["name"] == "mnist" else "mnist"]
                    if path in NO_FLAG
                    else [f"--{path}", change_for(path, spec, changes)[0]]
                )
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and refused[path] in err and err.count("\n") == 1, (
                path,
                err,
            )
            continue
        typed, parsed = change_for(path, spec, changes)
        assert flat(spec)[path] != parsed, path  # a real change
        assert config.flatten(resolve([f"--{path}", typed])) == with_changes(
            spec, {path: parsed}
        ), path
        checked += 1
    return checked


def test_every_mnist_flag_alone_changes_only_its_field(capsys):
    assert check_one_flag_at_a_time(resolve_mnist, MNIST_SPEC, REFUSED["mnist"], capsys) == len(
        config.paths()
    ) - len(REFUSED["mnist"])


@pytest.mark.parametrize("experiment", [1, 2])
def test_every_catsdogs_flag_alone_changes_only_its_field(experiment, capsys):
    spec, extra = (CATS_EXP1_SPEC, []) if experiment == 1 else (CATS_EXP2_SPEC, ["--dropout"])
    refused = (
        REFUSED["catsdogs"]
        if experiment == 1
        else {**REFUSED["catsdogs"], "model.dropout": "disagree"}
    )  # --dropout set it
    checked = check_one_flag_at_a_time(
        lambda argv: resolve_cats([*extra, *argv]), spec, refused, capsys
    )
    assert checked == len(config.paths()) - len(refused)


def test_the_ablation_validates_on_the_split_asked_for_and_refuses_to_stream(
    resolve_ablation, capsys
):
    from cnnjax.data import folders

    resolve_ablation(["--data.validation_split", "train"])
    assert set(resolve_ablation.captured["datasets"]) == {
        "train"
    }  # validated on the training images, not the validation folder's
    base = resolve_ablation([])
    size = (base.data.image_size, base.data.image_size)
    validation = folders.load_image_folder(
        resolve_ablation.data / "validation", size, base.data.interpolation
    )
    np.testing.assert_array_equal(
        resolve_ablation.captured["datasets"]["validation"].images, validation.images
    )
    with pytest.raises(SystemExit) as exit_info:
        resolve_ablation(["--data.input", "stream"])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and "held in memory; use --data.input memory or auto" in err
        and err.count("\n") == 1
    )


def test_every_ablation_flag_alone_changes_only_its_field(resolve_ablation, capsys):
    data = str(resolve_ablation.data)
    checked = check_one_flag_at_a_time(
        resolve_ablation,
        ABLATION_SPEC,
        REFUSED["ablation"],
        capsys,
        {"data.data_dir": (data, data)},
    )
    assert checked == len(config.paths()) - len(REFUSED["ablation"])


# The short flags users type (README), and the one field each must set.
SHORT = {
    "--epochs": "train.epochs",
    "--batch-size": "train.batch_size",
    "--learning-rate": "optim.learning_rate",
    "--seed": "train.seed",
    "--seeds": "train.seeds",
    "--data-dir": "data.data_dir",
    "--out": "run.out",
    "--resume": "run.resume",
    "--image-size": "data.image_size",
    "--input": "data.input",
    "--rotation-range": "augment.rotation_range",
    "--width-shift-range": "augment.width_shift_range",
    "--height-shift-range": "augment.height_shift_range",
    "--shear-range": "augment.shear_range",
    "--zoom-range": "augment.zoom_range",
    "--horizontal-flip": "augment.horizontal_flip",
    "--fill-mode": "augment.fill_mode",
}


def test_one_table_of_short_flags():
    assert config.ALIASES == SHORT  # every short flag is checked below


@pytest.mark.parametrize("script", ["mnist", "catsdogs", "ablation"])
def test_short_flags_set_their_own_field_only(script, resolve_ablation):
    resolve, spec = {
        "mnist": (resolve_mnist, MNIST_SPEC),
        "catsdogs": (resolve_cats, CATS_EXP1_SPEC),
        "ablation": (resolve_ablation, ABLATION_SPEC),
    }[script]
    data = str(resolve_ablation.data)
    for flag, path in SHORT.items():
        if path in REFUSED[script]:  # e.g. MNIST's image size, the ablation's run folder
            continue
        if path in (
            "run.resume",
            "augment.horizontal_flip",
        ):  # on/off switches: --flag and --no-flag
            on, off = resolve([flag]), resolve([f"--no-{flag[2:]}"])
            assert config.flatten(on) == with_changes(spec, {path: True}), flag
            assert config.flatten(off) == with_changes(spec, {path: False}), flag
            continue
        typed, parsed = change_for(path, spec, {"data.data_dir": (data, data)})
        assert config.flatten(resolve([flag, typed])) == with_changes(spec, {path: parsed}), flag


def test_catsdogs_dropout_flag_and_presets():
    exp2 = flat(CATS_EXP2_SPEC)
    assert config.flatten(resolve_cats(["--dropout"])) == exp2  # alone: Dropout(0.5)
    assert config.flatten(resolve_cats(["--dropout", "0.3"])) == {
        **exp2,
        "model.dropout": 0.3,
    }  # experiment 2 at another rate
    assert config.flatten(resolve_cats(["--dropout", "--no-horizontal-flip"])) == {
        **exp2,
        "augment.horizontal_flip": False,
    }
    assert config.flatten(resolve_cats(["--no-horizontal-flip"])) == flat(CATS_EXP1_SPEC)
    lecture = {f"augment.{k}": v for k, v in LECTURE_AUGMENTATION.items()}
    assert config.flatten(resolve_cats(["--augment", "lecture"])) == {
        **flat(CATS_EXP1_SPEC),
        **lecture,
    }
    none = {f"augment.{k}": v for k, v in NO_AUGMENTATION.items()}
    assert config.flatten(resolve_cats(["--dropout", "--augment", "none"])) == {**exp2, **none}
    assert resolve_cats(["--augment", "preview"]).augment == AugmentConfig.LECTURE_PREVIEW
    # A preset, then a field: the field wins.
    assert resolve_cats(
        ["--augment", "lecture", "--rotation-range", "10"]
    ).augment == dataclasses.replace(AugmentConfig.LECTURE, rotation_range=10.0)


def test_catsdogs_contradicting_flags_are_one_error_line(capsys):
    for argv, message in (
        (["--dropout", "0.5", "--model.dropout", "0.3"], "disagree"),
        (["--epochs", "3", "--train.epochs", "4"], "given twice"),
        (["--dropout", "1.5"], "model.dropout must be in [0, 1)"),
        (["--image-size", "40"], "at least 46x46"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            resolve_cats(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, (argv, err)


# --- main(): what a run records ------------------------------------------------------------------------

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
    """16 training images (a bright square means dog) and 8 validation images whose classes are the other
    way round: the more the model learns, the higher its validation loss, so its best epoch is its first."""
    write_cats_dogs_folder(root, {"train": 16}, size=PHOTO_SIZE)
    write_cats_dogs_folder(
        root, {"validation": 8}, size=PHOTO_SIZE, classes=("dogs", "cats"), seed=1
    )
    return root


@pytest.fixture(scope="module")
def cats_run(tmp_path_factory):
    """catsdogs.py main() on a tiny folder, 3 epochs, bilinear resize on load: (argv, run folder, data folder).
    Tests read it and never write into it."""
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


# --- Training really augments ----------------------------------------------------------------------


def test_a_run_with_augmentation_differs_from_one_without_same_seed(cats_run, tmp_path):
    """The lecture's augmentation through the whole script: epoch 1 of the same seed, with and without it."""
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
    # Same seed, same initial parameters and order: only the augmentation differs. Without it, the runs are equal.
    again = tmp_path / "again"
    catsdogs.main([*CATS_RUN_ARGS, "--epochs", "1", "--data-dir", str(data), "--out", str(again)])
    assert without_seconds(json.loads((again / "history.json").read_text())) == without_seconds(
        [json.loads((out / "history.json").read_text())[0]]
    )


# --- Best checkpoints, evaluate.py, metadata -----------------------------------------------------------


def best_and_last(out: Path) -> tuple[dict, dict]:
    rows = json.loads((out / "history.json").read_text())
    best = min(rows, key=lambda row: row["val_loss"])
    return best, rows[-1]


def test_the_tiny_run_has_a_best_epoch_before_its_last(cats_run):
    """The checks below tell best from latest only if they differ (the validation classes are swapped on purpose)."""
    best, last = best_and_last(cats_run[1])
    assert best["epoch"] < last["epoch"] and last["val_loss"] - best["val_loss"] > 1e-3


@pytest.mark.parametrize("where", ["RUN", "RUN/best"])
def test_evaluate_reproduces_the_best_epochs_validation_metrics(cats_run, where, capsys):
    _, out, data = cats_run
    best, _ = best_and_last(out)
    checkpoint = out if where == "RUN" else out / "best"
    metrics = evaluate.main(
        ["--checkpoint", str(checkpoint), "--data-dir", str(data), "--split", "validation"]
    )
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert metrics["accuracy"] == best["val_accuracy"]
    assert f"(epoch {best['epoch']}) on validation (8 images)" in capsys.readouterr().out


def test_evaluate_latest_is_the_last_epoch_and_the_resize_filter_is_the_runs(cats_run):
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


# --- activations.py sees what training saw ------------------------------------------------------------


def test_activations_resizes_with_the_runs_interpolation(cats_run, cats_photos, tmp_path):
    """A run trained with --data.interpolation bilinear: activations.py's input is the bilinear resize
    (not load_img's default nearest), the same pixels evaluate.py and training decode."""
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
    # Without --image: the first validation cat of the data folder, decoded as training and evaluate.py decode it.
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
    """activations.py writes into RUN/inspect unless told otherwise: every test above gave --out."""
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
