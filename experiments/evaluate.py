"""Evaluate a saved checkpoint on a data split: one command, no training flags.

    python experiments/evaluate.py --checkpoint checkpoints/catsdogs-exp2-.../best --data-dir ../shared/data --split test
    python experiments/evaluate.py --checkpoint checkpoints/mnist-.../checkpoint --data-dir ../shared/data

The architecture comes from the checkpoint folder; images are loaded at its input size.
For MNIST the split is the 10,000 test images (or "train"); for cats vs dogs any folder
split (train / validation / test). Prints loss and accuracy.
"""

from __future__ import annotations

import argparse
import sys

import optax

from cnnjax import checkpoint, data, train


def load_split(model, data_dir: str | None, split: str, interpolation: str):
    if model.input_shape[-1] == 1:  # MNIST
        mnist = data.load_mnist(data_dir)
        if split not in ("train", "test"):
            raise data.DataError(f"MNIST has the splits train and test, not {split!r}")
        return mnist[f"{split}_images"], mnist[f"{split}_labels"]
    folder = data.load_cats_dogs(data_dir, (split,), model.input_shape[:2], interpolation)[split]
    return folder.images, folder.labels


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder written by a run (checkpoint/ or best/)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--interpolation", default=None, help="resize filter (default: the one the run trained with)")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        model, params, meta = checkpoint.restore_model(args.checkpoint)
        interpolation = args.interpolation or meta.get("config", {}).get("interpolation", "nearest")
        images, labels = load_split(model, args.data_dir, args.split, interpolation)
    except (checkpoint.CheckpointError, data.DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    metrics = train.Trainer(model, optax.identity()).evaluate(params, images, labels, args.batch_size)
    epoch = meta.get("epoch", "?")
    print(f"{args.checkpoint} (epoch {epoch}) on {args.split} ({len(labels)} images): "
          f"loss {metrics['loss']:.4f} - accuracy {metrics['accuracy']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
