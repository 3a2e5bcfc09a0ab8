"""Evaluate a saved model on a data split: one command, no training flags.

    # the shipped experiment-2 model, test split
    python experiments/evaluate.py --data-dir DIR
    # the shipped MNIST model
    python experiments/evaluate.py --checkpoint checkpoints/mnist
    python experiments/evaluate.py --checkpoint checkpoints/catsdogs-exp2-.../checkpoints/100
        --data-dir DIR

Without --data-dir, the data folder the run trained on (when it named one) is used, and said.
--checkpoint is a run folder (its best epoch, by validation loss; --which latest or an
epoch number for others), RUN/checkpoints, RUN/best or RUN/latest, or one
checkpoints/<epoch> folder; by default the experiment-2 model in checkpoints/catsdogs-exp2.
The architecture, the resize filter and the class names come from the checkpoint; the
folder's classes must be the ones the model was trained on. For MNIST the split is
test (or train); for cats vs dogs and other image folders (DIR/<split>/<class>/) any split
folder (train / validation / test), and a data folder holding only that split is enough. A
checkpoint without its recipe (as cnnjax.checkpoint.save_model writes) of more than two
classes reads --data-dir as such an image folder.

Prints loss and accuracy, then one line per class (its images classified right, of how
many), and writes the confusion matrix (rows: true class, columns: predicted, the count in
each cell) to --out/confusion.png, by default RUN/inspect/confusion.png as activations.py's
figures (<checkpoint>/inspect/ for a checkpoint outside a run folder; each evaluation
replaces it, its title naming the split):

    .../checkpoints/12 (epoch 12) on test (30 images): loss 1.0912 - accuracy 0.4000
      birds: 6/10 right - accuracy 0.6000
      ...
    confusion matrix: RUN/inspect/confusion.png

Bad input is one `error:` line and exit code 2.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: a stop while jax loads is one line too
    from cnnjax import interrupts

    interrupts.install()

import dataclasses
import logging
from pathlib import Path

import numpy as np

from cnnjax import checkpoint, config, data, flags, interrupts, plots, run_folder, runs, train
from cnnjax import inspect as look

log = logging.getLogger("cnnjax.evaluate")

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "catsdogs-exp2"


def recorded_run(step_dir: Path) -> config.Config | None:
    """The config.json of the run folder a checkpoint sits in; None for a checkpoint alone, an
    exported model, or a config.json that cannot be read (the checkpoint holds its own)."""
    record = step_dir.parent.parent / "config.json"
    if step_dir.parent.name != "checkpoints" or not record.is_file():
        return None
    try:
        return run_folder.saved_config(record)
    except (run_folder.RunError, OSError, ValueError):
        return None


def name_another_runs_checkpoint(description: dict) -> None:
    """A warning when the checkpoint is not of the run whose folder holds it (copied in by hand):
    the figures are then the other run's."""
    step_dir = Path(description["path"])
    run = recorded_run(step_dir)
    if run is None or "config" not in description:
        return
    differences = run_folder.checkpoint_differs(description, run)
    if differences:
        log.warning(
            "warning: %s is another run's checkpoint, not of %s (%s): what follows is that run's",
            step_dir,
            step_dir.parent.parent / "config.json",
            "; ".join(differences),
        )


def trained_data(model, description: dict) -> config.DataConfig:
    """The data the checkpoint's run trained on; for a checkpoint without its recipe, the kind its
    model fits: MNIST for one channel, cats vs dogs for two classes, else an image folder."""
    if "config" in description:
        return config.from_dict(description["config"]).data
    if model.input_shape[-1] == 1:
        dataset = "mnist"
    else:
        dataset = "cats_dogs" if model.head.num_classes == 2 else "folder"
    return config.DataConfig(dataset=dataset, image_size=model.input_shape[0])


def class_lines(matrix: np.ndarray, class_names: list[str]) -> list[str]:
    """Per class (a row of the confusion matrix): its images classified right, of how many."""
    lines = []
    for name, row, right in zip(class_names, matrix, np.diag(matrix), strict=True):
        total = int(row.sum())
        accuracy = f"accuracy {right / total:.4f}" if total else "no images"
        lines.append(f"  {name}: {right}/{total} right - {accuracy}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        default=str(SHIPPED),
        help="a run folder, RUN/checkpoints, RUN/best, RUN/latest, or "
        "RUN/checkpoints/<epoch> (default: the shipped experiment-2 model)",
    )
    parser.add_argument(
        "--which",
        default="best",
        help="with a run folder: best, latest or an epoch number (default: best)",
    )
    flags.add_member_flags(parser)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the data folder (default: CNNJAX_DATA_DIR, else the user cache or a download)",
    )
    parser.add_argument("--split", default="test", help="the split to evaluate on (default: test)")
    parser.add_argument(
        "--interpolation",
        default=None,
        choices=config.INTERPOLATIONS,
        help="resize filter (default: the one the run trained with)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=100, help="images per evaluation step (default: 100)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for confusion.png (default: RUN/inspect, as activations.py)",
    )
    args = parser.parse_args(argv)
    runs.setup_logging()
    with runs.exits():
        if args.batch_size < 1:
            raise config.ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        model, params, description = checkpoint.load_model(
            args.checkpoint, args.which, args.seed, setting=args.setting
        )
        trained = trained_data(model, description)
        name_another_runs_checkpoint(description)
        data_dir = args.data_dir or trained.data_dir
        if args.data_dir is None and trained.data_dir:
            log.info("data folder: %s (the run's own; --data-dir for another)", data_dir)
        spec = dataclasses.replace(
            trained,
            data_dir=data_dir,
            interpolation=args.interpolation or trained.interpolation,
            input="memory",
        )
        dataset = data.load(spec, (args.split,))[args.split]
        classes = description.get("class_names")
        if classes and list(dataset.class_names) != list(classes):
            raise data.DataError(
                f"the {args.split} folder's classes are {', '.join(dataset.class_names)} "
                f"but the model was trained on {', '.join(classes)}; labels would not mean the same"
            )
        data.check_classes(
            {args.split: dataset}, model.head.num_classes, f"the {args.split} folder"
        )
        metrics = train.evaluate(model, params, dataset, args.batch_size)
        # A second pass for each image's class: the evaluation step sums over batches on device.
        predicted = look.predicted_classes(model, params, dataset, args.batch_size)
        matrix = look.confusion_matrix(dataset.labels, predicted, model.head.num_classes)
        epoch = description.get("epoch", "?")
        print(
            f"{description['path']} (epoch {epoch}) on {args.split} ({len(dataset)} images): "
            f"loss {metrics['loss']:.4f} - accuracy {metrics['accuracy']:.4f}"
        )
        class_names = list(dataset.class_names)
        print("\n".join(class_lines(matrix, class_names)))
        figures = run_folder.inspect_folder(Path(description["path"]))
        out = Path(args.out) if args.out else figures
        interrupts.writing()
        title = f"{figures.parent.name}, epoch {epoch}: {args.split} ({len(dataset)} images)"
        written = plots.plot_confusion(matrix, class_names, out / "confusion.png", title)
        print(f"confusion matrix: {written}", flush=True)
    return metrics


if __name__ == "__main__":
    runs.run_as_script(main)
