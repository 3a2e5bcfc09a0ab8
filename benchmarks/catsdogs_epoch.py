"""One epoch of cats-vs-dogs experiment 2 (cnnjax.config.catsdogs(2): augmentation + Dropout(0.5),
Adam, batch 20: 2,000 training and 1,000 validation images): cnnjax against the lecture's Keras
script (TensorFlow backend, ImageDataGenerator) on the same data and machine.

    python benchmarks/catsdogs_epoch.py --data-dir ../shared/data [--epochs 2] [--skip-keras]

cnnjax trains through its own loop (cnnjax.train.train_and_evaluate: each epoch's time
includes validation and writing the checkpoint); Keras runs in its own process
(benchmarks/keras_lecture.py). The fastest epoch after the first (which includes
compilation, and for cnnjax nothing else: decoding is done before, and cached) is compared.
Prints seconds per epoch and the ratio cnnjax / Keras (below 1: cnnjax faster).
"""

from __future__ import annotations

from mnist_epoch import (
    compare_with_keras,
    recipe_epochs,
)  # benchmarks/ is on the path when run as a script


def cnnjax_epochs(data_dir: str | None, epochs: int) -> list[dict]:
    return recipe_epochs("catsdogs2", data_dir, epochs)


def main() -> None:
    compare_with_keras(__doc__.splitlines()[0], cnnjax_epochs, "catsdogs")


if __name__ == "__main__":
    main()
