"""The experiment scripts' command lines: each resolves to the lecture's recipe exactly, and each
flag changes its own field only (the recipes: tests/_experiments_helpers.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cnnjax import ablation, config, flags, run_folder
from cnnjax.augment import AugmentConfig
from experiments import ablate_augmentation
from tests._experiments_helpers import (
    ABLATION_SPEC,
    CATS_EXP1_SPEC,
    CATS_EXP2_SPEC,
    LECTURE_AUGMENTATION,
    MNIST_SPEC,
    NO_AUGMENTATION,
    flat,
    resolve_cats,
    resolve_mnist,
    with_changes,
)
from tests.conftest import write_cats_dogs_folder


@pytest.fixture(autouse=True)
def resume_without_a_run_folder(monkeypatch):
    """--resume alone resolves to the recipe with run.resume set: these tests check what each flag
    sets, not the run folder it continues (tests/test_resume_checks.py checks those refusals)."""
    monkeypatch.setattr(run_folder, "resumable", lambda out, recipe: recipe)


# --- The lecture's recipes, every field -----------------------------------------------------------


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


# --- One flag at a time ---------------------------------------------------------------------------

# A value for every field (as typed, and as parsed), different from the field's
# value in every recipe above.
CHANGES = {
    "data.data_dir": ("/data/elsewhere", "/data/elsewhere"),
    "data.image_size": ("64", 64),
    "data.interpolation": ("bilinear", "bilinear"),
    "data.validation_split": ("train", "train"),
    "data.validation_fraction": ("0.3", 0.3),
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
    """(changes or CHANGES)[path], or for the fields with two values the
    one the recipe does not have."""
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
    "ablation": {  # any dataset the cats-vs-dogs convnet trains on, a folder of N classes say
        "model.name": NO_FLAG["model.name"],
        **{p: f"unknown flag --{p}" for p in config.paths() if p.startswith("run.")},
    },
}


def check_one_flag_at_a_time(
    resolve, spec: dict, refused: dict, capsys, changes: dict | None = None
) -> int:
    """Every field's --section.field flag, alone: that field takes the value, every
    other field keeps the recipe's."""
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
        {"data.data_dir": (data, data), "data.dataset": ("folder", "folder")},
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
    assert flags.ALIASES == SHORT  # every short flag is checked below


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
