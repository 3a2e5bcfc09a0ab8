"""One nested config per recipe: data, model, augment, optim, train, run.

The lecture's recipes are `mnist` and `catsdogs` at the bottom; everything else changes them by
path, `override(catsdogs(2), {"augment.rotation_range": 20})`. Sections are separate frozen
dataclasses so two can share a field name (`data.interpolation` resizes on load,
`augment.interpolation` samples the augmentation) without one being read for the other.
On the command line every field is a flag, `--augment.rotation_range 20` (cnnjax.flags); `check`
validates a resolved config once, before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cnnjax.augment import AugmentConfig
from cnnjax.data import INPUTS
from cnnjax.data import INTERPOLATIONS as RESIZE_FILTERS
from cnnjax.optim import NAMES as OPTIMIZERS
from cnnjax.optim import SCHEDULES

INTERPOLATIONS = tuple(RESIZE_FILTERS)  # keras.utils.load_img's names
DATASETS = ("mnist", "cats_dogs", "folder")  # and "tfds:NAME", any TFDS image-classification set
MODELS = ("mnist", "cats_dogs")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what is allowed."""


def _field(
    default: Any, help: str, recipe: bool = True, choices: Sequence[str] | None = None
) -> Any:
    """A dataclass field with its --help text. recipe=False: where or how a run happens, not what
    it computes."""
    return dataclasses.field(
        default=default, metadata={"help": help, "recipe": recipe, "choices": choices}
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = _field(
        "mnist",
        "which data: mnist, cats_dogs (the lecture's two classes), folder (any image folder of "
        "N >= 2 classes) or tfds:NAME (a TFDS image-classification set, e.g. tfds:cifar10)",
    )
    data_dir: str | None = _field(
        None,
        "folder holding the data; none: CNNJAX_DATA_DIR, else the user cache or a download",
        recipe=False,
    )
    image_size: int = _field(28, "images are resized to image_size x image_size on load")
    interpolation: str = _field(
        "nearest", "resize filter on load, as keras.utils.load_img", choices=INTERPOLATIONS
    )
    validation_split: str = _field("test", "the split validated on after every epoch")
    validation_fraction: float = _field(
        0.2,
        "a folder without validation/ (or a TFDS set without that split): validate on this "
        "fraction of train, stratified per class and the same on every rerun",
    )
    input: str = _field(
        "auto",
        "memory (decoded once, on the device), stream (tf.data) or auto",
        recipe=False,
        choices=INPUTS,
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = _field("mnist", "the convnet", choices=MODELS)
    dropout: float = _field(0.0, "Dropout rate after Flatten, in [0, 1)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = _field("rmsprop", "with Keras's defaults", choices=OPTIMIZERS)
    learning_rate: float = _field(1e-3, "learning rate (the peak, with a schedule)")
    epsilon: float = _field(1e-7, "Keras's epsilon (both optimizers)")
    rho: float = _field(0.9, "RMSprop's decay rate")
    beta_1: float = _field(0.9, "Adam's first-moment decay")
    beta_2: float = _field(0.999, "Adam's second-moment decay")
    schedule: str = _field(
        "constant",
        "the rate over training: cosine decays to 0 by the last epoch, exponential by decay_rate "
        "each epoch",
        choices=SCHEDULES,
    )
    warmup_epochs: int = _field(0, "first raise the rate linearly from 0 over this many epochs")
    decay_rate: float = _field(0.9, "exponential: the rate's factor per epoch")
    plateau_factor: float = _field(
        0.0,
        "ReduceLROnPlateau: times this when val_loss has not improved for plateau_patience "
        "epochs (0: off)",
    )
    plateau_patience: int = _field(5, "ReduceLROnPlateau: epochs without improvement")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = _field(
        5, "passes over the training data (more than a finished run's extends it with --resume)"
    )
    batch_size: int = _field(64, "global batch size (split over the devices)")
    eval_batch_size: int = _field(500, "batch size of validation and evaluation")
    seed: int = _field(0, "random seed: initialisation, shuffling, augmentation, dropout")
    seeds: int = _field(
        1, "train this many seeds together (seed, seed+1, ...), one compiled program"
    )
    early_stopping: int = _field(
        0,
        "EarlyStopping: stop a seed once val_loss has not improved for this many epochs "
        "(0: off; its best checkpoint is kept)",
    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    out: str | None = _field(None, "run folder (default: runs/NAME-seedN-TIME)", recipe=False)
    resume: bool = _field(
        False,
        "continue the run in --out from its latest checkpoint, with its config.json",
        recipe=False,
    )
    keep: int = _field(
        2, "latest checkpoints kept (the best one per seed is kept as well)", recipe=False
    )
    tensorboard: bool = _field(
        True, "write TensorBoard event files into the run folder", recipe=False
    )


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    data: DataConfig
    model: ModelConfig
    augment: AugmentConfig
    optim: OptimConfig
    train: TrainConfig
    run: RunConfig = RunConfig()


SECTION_CLASSES: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "augment": AugmentConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "run": RunConfig,
}
SECTIONS = tuple(SECTION_CLASSES)


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTION_CLASSES[section])}


def paths() -> list[str]:
    """Every field's path, "section.field", in declaration order."""
    return [f"{section}.{name}" for section in SECTIONS for name in _section_fields(section)]


def field_type(path: str) -> Any:
    section, name = path.split(".")
    return typing.get_type_hints(SECTION_CLASSES[section])[name]


def field_meta(path: str) -> Mapping[str, Any]:
    """The field's help, choices and recipe (whether it changes what a run computes: data_dir,
    input and run.* do not). A field without them (one added to AugmentConfig, say) is still a
    flag: no help, any value, part of the recipe."""
    section, name = path.split(".")
    return {"help": "", "recipe": True, "choices": None, **_section_fields(section)[name].metadata}


def _parse_value(path: str, raw: Any, hint: Any) -> Any:
    """A command-line string (or a value) as the field's type."""
    if not isinstance(raw, str):
        return raw
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if type(None) in args and raw.lower() in ("none", "null"):
            return None
        if path == "augment.zoom_range" and "," in raw:
            lo, _, hi = raw.partition(",")
            return (_parse_value(path, lo, float), _parse_value(path, hi, float))
        hint = next(a for a in args if a is not type(None))
        hint = typing.get_origin(hint) or hint
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{path} must be true or false (yes, no, 1, 0), got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ConfigError(
                f"--{path} must be {'an integer' if hint is int else 'a number'}, got {raw!r}"
            ) from None
    return raw


def resolve_path(key: str) -> str:
    """The "section.field" path `key` names: a path itself, or a field name only one section has."""
    if key in _PATHS:
        return key
    near = sorted(p for p in _PATHS if p.split(".")[-1] == key.split(".")[-1])
    if "." not in key and len(near) == 1:
        return near[0]
    section = key.split(".")[0]
    if "." not in key and near:
        hint = f": several sections have it, give its path, {' or '.join(near)}"
    elif near:
        hint = f"; did you mean {' or '.join(near)}?"
    elif section in SECTIONS and "." in key:
        hint = f"; {section} has {', '.join(_section_fields(section))}"
    else:
        hint = f"; sections are {', '.join(SECTIONS)}"
    raise ConfigError(f"unknown config field {key!r}{hint}")


def override(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """cfg with each field set to its value (strings are parsed as the field's type). A field is
    named by its path ("augment.rotation_range") or by a name only one section has
    ("rotation_range")."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, raw in overrides.items():
        path = resolve_path(key)
        section, name = path.split(".")
        by_section.setdefault(section, {})[name] = _parse_value(path, raw, field_type(path))
    changes = {}
    for section, fields in by_section.items():
        try:
            changes[section] = dataclasses.replace(getattr(cfg, section), **fields)
        except ValueError as e:  # AugmentConfig validates itself
            raise ConfigError(f"augment: {e}") from None
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The whole config as nested JSON-able data (what config.json holds)."""
    out: dict[str, Any] = {"name": cfg.name}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


def from_dict(d: Mapping[str, Any]) -> Config:
    """Inverse of `to_dict`; fields missing from d keep their defaults."""
    sections = {}
    for section, cls in SECTION_CLASSES.items():  # (AugmentConfig makes a zoom_range list a tuple)
        sections[section] = cls(
            **{k: v for k, v in d.get(section, {}).items() if k in _section_fields(section)}
        )
    return Config(name=d.get("name", "run"), **sections)


def flatten(cfg: Config) -> dict[str, Any]:
    """{"section.field": value} for every field (TensorBoard's hyperparameters, diffs)."""
    return {
        f"{s}.{k}": v
        for s, values in to_dict(cfg).items()
        if isinstance(values, dict)
        for k, v in values.items()
    }


def recipe_diff(saved: Config, asked: Config, extend: bool = True) -> list[str]:
    """The recipe fields whose values differ, as "path: saved -> asked" (where and how a run
    happens is ignored, and with `extend` more epochs than saved extend a run)."""
    fa, fb = flatten(saved), flatten(asked)
    return [
        f"{p}: {fa[p]!r} -> {fb[p]!r}"
        for p in paths()
        if field_meta(p)["recipe"]
        and fa[p] != fb[p]
        and not (extend and p == "train.epochs" and fb[p] > fa[p])
    ]


def check(cfg: Config, min_image_size: Callable[[Config], int] | None = None) -> Config:
    """Raise ConfigError (one line: the field, the value, what is allowed) for a config that
    cannot run.

    min_image_size(cfg) gives the model's smallest input, so the message can name the model's limit.
    """
    flat = flatten(cfg)
    for path in paths():
        choices, value = field_meta(path)["choices"], flat[path]
        if choices is not None and value not in choices:
            raise ConfigError(f"{path} must be one of {', '.join(choices)}, got {value!r}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    rules = [
        (
            (
                "train.epochs",
                "train.batch_size",
                "train.eval_batch_size",
                "train.seeds",
                "run.keep",
                "data.image_size",
                "optim.plateau_patience",
            ),
            lambda v: isinstance(v, int) and v >= 1,
            "an integer >= 1",
        ),
        (
            ("train.seed", "train.early_stopping", "optim.warmup_epochs"),
            lambda v: isinstance(v, int) and v >= 0,
            "an integer >= 0",
        ),
        # Counts must fit a step counter or an index (int32), seeds jax's key (uint32, seed +
        # seeds - 1 included).
        (
            (
                "train.epochs",
                "train.batch_size",
                "train.eval_batch_size",
                "train.seeds",
                "run.keep",
                "data.image_size",
                "optim.plateau_patience",
                "train.early_stopping",
                "optim.warmup_epochs",
            ),
            lambda v: v < 2**31,
            "below 2**31",
        ),
        (("train.seed",), lambda v: v <= 2**32 - cfg.train.seeds, "at most 2**32 - train.seeds"),
        (
            ("optim.learning_rate", "optim.epsilon"),
            lambda v: number(v) and v > 0,
            "a finite number > 0",
        ),
        (
            ("optim.rho", "optim.beta_1", "optim.beta_2", "optim.plateau_factor", "model.dropout"),
            lambda v: number(v) and 0 <= v < 1,
            "in [0, 1)",
        ),
        (("data.validation_fraction",), lambda v: number(v) and 0 < v < 1, "in (0, 1)"),
        (("optim.decay_rate",), lambda v: number(v) and 0 < v <= 1, "in (0, 1]"),
    ]
    for rule_paths, ok, what in rules:
        for path in rule_paths:
            if isinstance(flat[path], bool) or not ok(flat[path]):
                raise ConfigError(f"{path} must be {what}, got {flat[path]!r}")
    dataset = cfg.data.dataset
    by_name = dataset.startswith("tfds:")
    if dataset not in DATASETS and not (by_name and len(dataset) > len("tfds:")):
        raise ConfigError(
            f"data.dataset must be one of {', '.join(DATASETS)} or tfds:NAME, got {dataset!r}"
        )
    if (dataset == "mnist") != (cfg.model.name == "mnist") and not by_name:
        raise ConfigError(f"model.name {cfg.model.name!r} does not fit data.dataset {dataset!r}")
    if cfg.model.name == "mnist":
        if cfg.data.image_size != 28:
            raise ConfigError(f"data.image_size must be 28 for MNIST, got {cfg.data.image_size}")
        if cfg.model.dropout:
            raise ConfigError(
                "model.dropout: the MNIST convnet has no Dropout layer; leave it at 0"
            )
    if cfg.optim.warmup_epochs >= cfg.train.epochs and cfg.optim.warmup_epochs:
        raise ConfigError(
            f"optim.warmup_epochs {cfg.optim.warmup_epochs} leaves no epoch after the warmup of "
            f"{cfg.train.epochs}"
        )
    if min_image_size is not None and cfg.data.image_size < (smallest := min_image_size(cfg)):
        raise ConfigError(
            f"data.image_size {cfg.data.image_size} is too small: the {cfg.model.name} convnet "
            f"needs at least {smallest}x{smallest} pixels (every conv and pool layer must keep an "
            "output of at least 1x1)"
        )
    return cfg


def mnist() -> Config:
    """The lecture's MNIST convnet (`python experiments/mnist.py`): RMSprop (Keras defaults),
    batch 64, 5 epochs, validated on the 10,000 test images. Expected test accuracy: about 0.991
    (the book's; the lecture's about 0.98).
    """
    return Config(
        name="mnist",
        data=DataConfig(dataset="mnist", image_size=28, validation_split="test"),
        model=ModelConfig(name="mnist"),
        augment=AugmentConfig(),
        optim=OptimConfig(name="rmsprop", learning_rate=1e-3),
        train=TrainConfig(epochs=5, batch_size=64, eval_batch_size=500),
    )


def catsdogs(experiment: int = 1) -> Config:
    """Cats vs dogs from scratch, 150x150 (nearest resize on load, as load_img), Adam (Keras
    defaults), batch 20, validated on 1,000 images.

    experiment 1 (`python experiments/catsdogs.py`): 30 epochs; overfits, training accuracy
        reaches 1.0 while validation accuracy stalls near 0.70.
    experiment 2 (`--dropout`): AugmentConfig.LECTURE and Dropout(0.5) after Flatten, 100 epochs;
        ends near 0.80-0.85 validation accuracy.
    """
    if experiment not in (1, 2):
        raise ConfigError(f"experiment must be 1 or 2, got {experiment!r}")
    second = experiment == 2
    return Config(
        name=f"catsdogs-exp{experiment}",
        data=DataConfig(
            dataset="cats_dogs",
            image_size=150,
            interpolation="nearest",
            validation_split="validation",
        ),
        model=ModelConfig(name="cats_dogs", dropout=0.5 if second else 0.0),
        augment=AugmentConfig.LECTURE if second else AugmentConfig(),
        optim=OptimConfig(name="adam", learning_rate=1e-3),
        train=TrainConfig(epochs=100 if second else 30, batch_size=20, eval_batch_size=100),
    )


def images() -> Config:
    """Experiment 2 on any image folder (`python experiments/images.py --data-dir DIR`): the
    cats-vs-dogs convnet with one output per class (the lecture's sigmoid for two classes, a
    softmax for more), the lecture's augmentation, Dropout(0.5), Adam, batch 20, 100 epochs,
    validated on validation/ (or a stratified fifth of train/ where there is none)."""
    lecture = catsdogs(2)
    return dataclasses.replace(
        lecture, name="images", data=dataclasses.replace(lecture.data, dataset="folder")
    )


AUGMENT_PRESETS = {
    "none": AugmentConfig(),
    "lecture": AugmentConfig.LECTURE,
    "preview": AugmentConfig.LECTURE_PREVIEW,
}

_PATHS = frozenset(paths())
