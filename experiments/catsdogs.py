"""Cats vs dogs from scratch: the lecture's two experiments.

    # experiment 1: no augmentation, no dropout, Adam 1e-3, batch 20, 30 epochs (overfits)
    python experiments/catsdogs.py --data-dir ../shared/data
    # experiment 2: the lecture's augmentation + Dropout(0.5) after Flatten, 100 epochs
    python experiments/catsdogs.py --data-dir ../shared/data --dropout

Pieces can be changed one by one: --augment none|lecture|preview, each transform's range
(--rotation-range 20 ...), --dropout RATE, --epochs, --batch-size, --learning-rate,
--seed, --image-size, --interpolation, --out.

Expected (README "Results"): experiment 1 reaches training accuracy near 1.0 while
validation accuracy stalls near 0.70; experiment 2 ends near 0.80-0.85.
Writes into --out: config.json, history.json/.csv, history.png, preview.png (one
training image and four augmented versions), checkpoint/ (final) and best/ (lowest
validation loss). Evaluate a checkpoint on the test split with experiments/evaluate.py.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np

from cnnjax import augment, checkpoint, data, models, plots, runs, train
from cnnjax.data import folders


@dataclasses.dataclass(frozen=True)
class CatsDogsConfig:
    epochs: int | None = dataclasses.field(default=None, metadata={"help": "default: 30, or 100 with --dropout"})
    batch_size: int = 20
    learning_rate: float = 1e-3  # Adam, Keras defaults otherwise
    seed: int = 0
    dropout: float = dataclasses.field(
        default=0.0, metadata={"help": "experiment 2: --dropout alone means 0.5, the lecture's augmentation and 100 epochs",
                               "nargs": "?", "const": 0.5}
    )
    augment: str | None = dataclasses.field(
        default=None, metadata={"help": "none | lecture | preview (default: none, lecture with --dropout)"}
    )
    rotation_range: float | None = None
    width_shift_range: float | None = None
    height_shift_range: float | None = None
    shear_range: float | None = dataclasses.field(default=None, metadata={"help": "degrees"})
    zoom_range: float | None = None
    horizontal_flip: bool | None = None
    fill_mode: str | None = None
    image_size: int = 150
    interpolation: str = dataclasses.field(default="nearest", metadata={"help": "resize on load: nearest (as Keras) or bilinear"})
    data_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "folder holding train/ and validation/ (or cats_and_dogs_small/)"}
    )
    out: str | None = dataclasses.field(default=None, metadata={"help": "run folder (default: checkpoints/catsdogs-seedN-TIME)"})

    @property
    def experiment(self) -> int:
        return 2 if self.dropout > 0 else 1

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else (100 if self.experiment == 2 else 30)

    def augmentation(self) -> augment.AugmentConfig:
        """The preset (--augment), then each range given on the command line on top of it."""
        preset = self.augment or ("lecture" if self.experiment == 2 else "none")
        presets = {
            "none": augment.AugmentConfig(),
            "lecture": augment.AugmentConfig.LECTURE,
            "preview": augment.AugmentConfig.LECTURE_PREVIEW,
        }
        if preset not in presets:
            raise ValueError(f"--augment must be one of {', '.join(presets)}, got {preset!r}")
        overrides = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(augment.AugmentConfig)
            if hasattr(self, f.name) and getattr(self, f.name) is not None
        }
        return dataclasses.replace(presets[preset], **overrides)


def write_preview(images: np.ndarray, config: augment.AugmentConfig, path, seed: int) -> None:
    """The lecture's preview: one training image and four augmented versions of it."""
    shown = config if not config.is_identity else augment.AugmentConfig.LECTURE_PREVIEW
    image = images[7 if len(images) > 7 else 0]  # the lecture shows train/cats' 8th file
    batch = np.repeat(image[None].astype(np.float32), 4, axis=0)
    augmented = augment.random_augment(jax.random.PRNGKey(seed), batch, shown)
    grid = np.concatenate([image[None] / 255.0, np.clip(np.asarray(augmented) / 255.0, 0, 1)])
    plots.plot_image_grid(grid, path, ["original"] + [f"augmented {i}" for i in range(1, 5)])


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    config = runs.parse_config(CatsDogsConfig, argv, __doc__.splitlines()[0])
    try:
        augmentation = config.augmentation()
        size = (config.image_size, config.image_size)
        splits = folders.load_cats_dogs(config.data_dir, ("train", "validation"), size, config.interpolation)
    except (ValueError, data.DataError) as e:
        sys.exit(f"error: {e}")
    train_set, val_set = splits["train"], splits["validation"]
    print(f"train: {len(train_set.labels)} images, validation: {len(val_set.labels)}, classes {train_set.class_names}")

    out = runs.prepare_out(config.out, f"catsdogs-exp{config.experiment}", config.seed)
    run_config = {**dataclasses.asdict(config), "epochs": config.resolved_epochs(), "augmentation": dataclasses.asdict(augmentation)}
    runs.write_json(out / "config.json", run_config)
    write_preview(train_set.images, augmentation, out / "preview.png", config.seed)

    model = models.CatsDogsConvNet(dropout_rate=config.dropout, input_shape=(*size, 3))
    print(models.summary(model))
    tx = train.adam_keras(config.learning_rate)
    state = train.create_train_state(model, tx, jax.random.PRNGKey(config.seed))
    trainer = train.Trainer(model, tx, augment=augment.make_augment_fn(augmentation))
    save_best = checkpoint.SaveBest(out / "best", model, "val_loss", {"config": run_config})
    rows: list[dict[str, float]] = []

    def keep_history(epoch: int, row: dict[str, float], state: train.TrainState) -> None:
        """History on disk after every epoch, so an interrupted run keeps what it learned."""
        rows.append(row)
        runs.write_history(rows, out)

    state, history = train.fit(
        trainer,
        state,
        (train_set.images, train_set.labels),
        epochs=config.resolved_epochs(),
        batch_size=config.batch_size,
        validation_data=(val_set.images, val_set.labels),
        eval_batch_size=100,
        callbacks=[save_best, keep_history],
    )
    runs.write_history(history, out)
    plots.plot_history(history, out / "history.png")
    checkpoint.save_checkpoint(out / "checkpoint", state, model, {"epoch": len(history), "metrics": history[-1], "config": run_config})
    best = min(history, key=lambda row: row["val_loss"])
    print(f"Final val_accuracy {history[-1]['val_accuracy']:.4f}; best val_loss {best['val_loss']:.4f} "
          f"at epoch {best['epoch']} (val_accuracy {best['val_accuracy']:.4f}), kept in {out / 'best'}")
    print(f"Wrote {out}/: config.json, history.json, history.csv, history.png, preview.png, checkpoint/, best/")
    return history


if __name__ == "__main__":
    main()
