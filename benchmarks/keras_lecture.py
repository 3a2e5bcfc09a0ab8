"""The lecture's own Keras code, as the peer that cnnjax's benchmarks time themselves against.

Run as a separate process (`python benchmarks/keras_lecture.py mnist|catsdogs --epochs 1`) so
TensorFlow and JAX never share one process. Needs the optional extra:
`pip install -e '.[keras]'`. Prints one JSON line per epoch: {"epoch", "seconds", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def timed_epochs(model, epochs: int, **fit_kwargs) -> None:
    import keras

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            row = {
                "epoch": epoch + 1,
                "seconds": time.perf_counter() - self.start,
                **{k: float(v) for k, v in (logs or {}).items()},
            }
            print(json.dumps(row), flush=True)

    model.fit(epochs=epochs, callbacks=[Timer()], verbose=0, **fit_kwargs)


def mnist(args: argparse.Namespace) -> None:
    """Lecture code, MNIST section: the convnet, RMSprop, 5 epochs of batch 64."""
    from keras import layers, models
    from keras.utils import to_categorical

    from cnnjax.data import load_mnist  # the same files cnnjax reads; no TensorFlow inside

    data = load_mnist(args.data_dir)
    train_images = data["train_images"].reshape((60000, 28, 28, 1)).astype("float32") / 255
    test_images = data["test_images"].reshape((10000, 28, 28, 1)).astype("float32") / 255
    train_labels = to_categorical(data["train_labels"])
    test_labels = to_categorical(data["test_labels"])

    model = models.Sequential()
    model.add(layers.Input((28, 28, 1)))
    model.add(layers.Conv2D(32, (3, 3), activation="relu"))
    model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Conv2D(64, (3, 3), activation="relu"))
    model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Conv2D(64, (3, 3), activation="relu"))
    model.add(layers.Flatten())
    model.add(layers.Dense(64, activation="relu"))
    model.add(layers.Dense(10, activation="softmax"))
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    timed_epochs(
        model,
        args.epochs,
        x=train_images,
        y=train_labels,
        batch_size=64,
        validation_data=(test_images, test_labels),
    )


def catsdogs(args: argparse.Namespace) -> None:
    """Lecture code, second experiment: ImageDataGenerator augmentation + Dropout(0.5), Adam
    1e-3."""
    from keras import layers, models, optimizers

    try:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator  # Keras 3 keeps it here
    except ImportError:
        from keras.preprocessing.image import ImageDataGenerator  # Keras 2, as in the lecture

    from cnnjax.data.folders import find_cats_dogs_root

    root = find_cats_dogs_root(args.data_dir)
    model = models.Sequential()
    model.add(layers.Input((150, 150, 3)))
    model.add(layers.Conv2D(32, (3, 3), activation="relu"))
    model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Conv2D(64, (3, 3), activation="relu"))
    model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Conv2D(128, (3, 3), activation="relu"))
    model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Conv2D(128, (3, 3), activation="relu"))
    model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Flatten())
    model.add(layers.Dropout(0.5))
    model.add(layers.Dense(512, activation="relu"))
    model.add(layers.Dense(1, activation="sigmoid"))
    model.compile(
        loss="binary_crossentropy", metrics=["acc"], optimizer=optimizers.Adam(learning_rate=0.001)
    )

    train_datagen = ImageDataGenerator(
        rescale=1.0 / 255,
        rotation_range=40,
        width_shift_range=0.1,
        height_shift_range=0.1,
        shear_range=0.4,
        zoom_range=0.5,
        horizontal_flip=True,
    )
    test_datagen = ImageDataGenerator(rescale=1.0 / 255)
    train_generator = train_datagen.flow_from_directory(
        str(root / "train"), target_size=(150, 150), batch_size=20, class_mode="binary"
    )
    valid_generator = test_datagen.flow_from_directory(
        str(root / "validation"), target_size=(150, 150), batch_size=20, class_mode="binary"
    )
    timed_epochs(
        model,
        args.epochs,
        x=train_generator,
        steps_per_epoch=100,
        validation_data=valid_generator,
        validation_steps=50,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["mnist", "catsdogs"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    try:
        import keras  # noqa: F401
    except ImportError:
        sys.exit("keras is not installed: pip install -e '.[keras]' (TensorFlow backend)")
    {"mnist": mnist, "catsdogs": catsdogs}[args.experiment](args)


if __name__ == "__main__":
    main()
