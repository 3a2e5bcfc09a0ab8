"""Evaluate a saved model on a data split: one command, no training flags.

    python experiments/evaluate.py --checkpoint checkpoints/catsdogs-exp2-... --data-dir DIR --split test
    python experiments/evaluate.py --checkpoint checkpoints/catsdogs-exp2-.../checkpoints/100 --data-dir DIR
    python experiments/evaluate.py --checkpoint checkpoints/mnist-...           # MNIST's test split

--checkpoint is a run folder (its best epoch, by validation loss; --which latest or an
epoch number for others), RUN/best or RUN/latest, or one checkpoints/<epoch> folder.
The architecture, the resize filter and the class names come from the checkpoint; the
folder's classes must be the ones the model was trained on. For MNIST the split is
test (or train); for cats vs dogs any split folder (train / validation / test), and a
data folder holding only that split is enough. Prints loss and accuracy. Bad input is
one `error:` line and exit code 2.
"""

from __future__ import annotations

import jax

from cnnjax import config, data, mesh, runs, train


def load_split(model, description: dict, data_dir: str | None, split: str, interpolation: str):
    """(images, labels) of `split`, checked against the classes the checkpoint was trained on."""
    trained = description.get("class_names")
    if model.input_shape[-1] == 1:  # MNIST
        if split not in ("train", "test"):  # before a load that may download
            raise data.DataError(f"MNIST has the splits train and test, not {split!r}")
        mnist = data.load_mnist(data_dir)
        return mnist[f"{split}_images"], mnist[f"{split}_labels"]
    folder = data.load_cats_dogs(data_dir, (split,), model.input_shape[:2], interpolation)[split]
    if trained is not None and list(folder.class_names) != list(trained):
        raise data.DataError(f"the {split} folder's classes are {', '.join(folder.class_names)} but the model was trained on "
                             f"{', '.join(trained)}; labels would not mean the same")
    runs.check_classes(model, folder.class_names, [folder.labels], f"the {split} folder")
    return folder.images, folder.labels


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = config.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder, RUN/best, RUN/latest, or RUN/checkpoints/<epoch>")
    parser.add_argument("--which", default="best", help="with a run folder: best, latest or an epoch number")
    parser.add_argument("--seed-index", type=int, default=0, help="which seed of a run that trained several (0-based)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test", help="the split to evaluate on (default: test)")
    parser.add_argument("--interpolation", default=None, help="resize filter (default: the one the run trained with)")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    runs.setup_logging()
    with runs.exit_on_bad_input():
        if args.batch_size < 1:
            raise config.ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        model, params, description = runs.load_model(args.checkpoint, args.which, args.seed_index)
        saved = description.get("config", {}).get("data", {})
        interpolation = args.interpolation or saved.get("interpolation", "nearest")
        if interpolation not in config.INTERPOLATIONS:
            raise config.ConfigError(f"--interpolation must be one of {', '.join(config.INTERPOLATIONS)}, got {interpolation!r}")
        split = args.split
        images, labels = load_split(model, description, args.data_dir, split, interpolation)
    trainer = train.Trainer(model, train.make_optimizer(config.OptimConfig()), mesh=mesh.make_mesh(1, jax.local_devices()[:1]))
    stacked = train.stack_states([params])
    metrics = trainer.evaluate(stacked, (images, labels), min(args.batch_size, len(labels)))[0]
    print(f"{description['path']} (epoch {description.get('epoch', '?')}) on {split} ({len(labels)} images): "
          f"loss {metrics['loss']:.4f} - accuracy {metrics['accuracy']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
