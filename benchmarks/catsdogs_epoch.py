"""One epoch of cats-vs-dogs experiment 2 (augmentation + Dropout(0.5), Adam, batch 20:
2,000 training and 1,000 validation images): cnnjax against the lecture's Keras script
(TensorFlow backend, ImageDataGenerator) on the same data and machine.

    python benchmarks/catsdogs_epoch.py --data-dir ../shared/data [--epochs 2] [--skip-keras]

Keras runs in its own process (benchmarks/keras_lecture.py). The fastest epoch after the
first (which includes compilation, and for cnnjax nothing else: decoding is cached) is
compared. Prints seconds per epoch and the ratio cnnjax / Keras (below 1: cnnjax faster).
"""

from __future__ import annotations

import jax
from mnist_epoch import compare_with_keras  # benchmarks/ is on the path when run as a script

from cnnjax import augment, data, models, train


def cnnjax_epochs(data_dir: str | None, epochs: int) -> list[dict]:
    splits = data.load_cats_dogs(data_dir, ("train", "validation"))
    model = models.CatsDogsConvNet(dropout_rate=0.5)
    tx = train.adam_keras(1e-3)
    state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
    trainer = train.Trainer(model, tx, augment=augment.make_augment_fn(augment.AugmentConfig.LECTURE))
    _, history = train.fit(
        trainer, state, (splits["train"].images, splits["train"].labels), epochs, 20,
        (splits["validation"].images, splits["validation"].labels), eval_batch_size=100, verbose=False, progress=False,
    )
    return history


def main() -> None:
    compare_with_keras(__doc__.splitlines()[0], cnnjax_epochs, "catsdogs")


if __name__ == "__main__":
    main()
