"""The lecture's recipes, every field, written out in full (SPEC: the lecture's code) for the
experiment-script tests, not taken from cnnjax.config: a changed default anywhere shows as a
difference from these literals. Also how a script's command line resolves to its recipe.
"""

from __future__ import annotations

from cnnjax import config
from experiments import catsdogs
from experiments import mnist as mnist_script

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
# ImageDataGenerator(rotation_range=40, width_shift_range=0.2... as the lecture has
# it: 0.1), bilinear sampling.
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
        "validation_fraction": 0.2,
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
        "validation_fraction": 0.2,
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
