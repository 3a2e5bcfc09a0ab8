"""Images per second of cnnjax's augmentation vs Keras's ImageDataGenerator, same settings, same
run.

Both augment random uint8 150x150x3 images with the lecture's experiment-2 settings
(rotation 40, shifts 0.1, shear 0.4, zoom 0.5, horizontal flip, nearest fill, bilinear):

- cnnjax: ``random_augment`` jitted, the batch already on the device (as in training),
  a fresh key per call, timed after a warm-up call, ``block_until_ready`` on each result;
- Keras: ``ImageDataGenerator(...).flow(x, batch_size=...)`` and ``next()`` repeatedly
  (numpy + scipy.ndimage on the host, one image and channel at a time).

    python benchmarks/augment_throughput.py                 # batch sizes 20 and 128, ~1 minute
    python benchmarks/augment_throughput.py --seconds 1 --batch-sizes 20
    python benchmarks/augment_throughput.py --no-keras

Without Keras installed it says so and still prints cnnjax's figure. Keras runs on the
backend KERAS_BACKEND names; when it is unset and TensorFlow (Keras's default backend) is
not installed, on JAX (the generator itself is numpy/scipy either way). The backend used
is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import config
from cnnjax.augment import random_augment

RECIPE = config.catsdogs(2)  # the lecture's experiment 2: its augmentation at its image size
SIZE = RECIPE.data.image_size
CONFIG = RECIPE.augment


def time_loop(step, seconds: float, min_calls: int = 3) -> tuple[int, float]:
    """Call step() until `seconds` have passed (at least min_calls times): (calls, elapsed)."""
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        step()
        calls += 1
    return calls, time.perf_counter() - start


def cnnjax_images_per_second(batch_size: int, seconds: float) -> float:
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (batch_size, SIZE, SIZE, 3), dtype=np.uint8)
    )

    @jax.jit
    def augment(key, i, x):
        # As in the train step: uint8 -> float on the 0..255 scale, then augment.
        return random_augment(jax.random.fold_in(key, i), x.astype(jnp.float32), CONFIG)

    key = jax.random.PRNGKey(0)
    augment(key, 0, images).block_until_ready()  # compile
    counter = iter(range(1 << 30))
    calls, elapsed = time_loop(
        lambda: augment(key, next(counter), images).block_until_ready(), seconds
    )
    return calls * batch_size / elapsed


def choose_keras_backend() -> str:
    """Set KERAS_BACKEND=jax when it is unset and TensorFlow is not installed (Keras would
    default to TensorFlow and fail to import); a KERAS_BACKEND the user set is kept.
    Returns why the backend is what it is, for the printout."""
    if "KERAS_BACKEND" in os.environ:
        return "KERAS_BACKEND as set"
    if importlib.util.find_spec("tensorflow") is None:
        os.environ["KERAS_BACKEND"] = "jax"
        return "TensorFlow not installed, so KERAS_BACKEND=jax"
    return "Keras's default"


def keras_image_module():
    """Keras's legacy preprocessing module, or None when Keras is not importable."""
    # The generator is pure numpy/scipy; a quiet TensorFlow start keeps the output readable.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        from keras.src.legacy.preprocessing import image  # Keras 3
    except ImportError:
        try:
            from keras.preprocessing import image  # Keras 2
        except ImportError:
            return None
    return image


def keras_images_per_second(image, batch_size: int, seconds: float) -> float:
    gen = image.ImageDataGenerator(
        rotation_range=CONFIG.rotation_range,
        width_shift_range=CONFIG.width_shift_range,
        height_shift_range=CONFIG.height_shift_range,
        shear_range=CONFIG.shear_range,
        zoom_range=CONFIG.zoom_range,
        horizontal_flip=CONFIG.horizontal_flip,
        fill_mode=CONFIG.fill_mode,
    )
    x = np.random.default_rng(0).integers(0, 256, (4 * batch_size, SIZE, SIZE, 3), dtype=np.uint8)
    flow = gen.flow(x, batch_size=batch_size, seed=0)
    next(flow)  # warm-up: first-call overheads
    calls, elapsed = time_loop(lambda: next(flow), seconds, min_calls=2)
    return calls * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[20, 128])
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement")
    parser.add_argument("--no-keras", action="store_true", help="skip the Keras measurement")
    args = parser.parse_args()

    why = None if args.no_keras else choose_keras_backend()
    image = None if args.no_keras else keras_image_module()
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs"
    )
    print(f"settings: {CONFIG}")
    if image is not None:
        import keras

        print(f"Keras {keras.__version__} on the {keras.backend.backend()} backend ({why})")
    elif not args.no_keras:
        backend = os.environ.get("KERAS_BACKEND", "Keras's default")
        print(
            f"Keras is not importable with backend {backend} (pip install 'cnnjax[keras]'): "
            "showing cnnjax's figure only."
        )
    for bs in args.batch_sizes:
        ours = cnnjax_images_per_second(bs, args.seconds)
        line = f"batch {bs:4d}: cnnjax {ours:9.0f} images/s"
        if image is not None:
            theirs = keras_images_per_second(image, bs, args.seconds)
            line += (
                f" | Keras ImageDataGenerator {theirs:7.0f} images/s | ratio {ours / theirs:6.1f}x"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
