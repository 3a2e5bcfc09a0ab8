"""Shared test setup: where the real data lives, a per-test cache folder, tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Keras, where the tests compare against it, runs on the JAX backend: no TensorFlow needed.
os.environ.setdefault("KERAS_BACKEND", "jax")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """CNNJAX_DATA_DIR (set by .ci/run) or ../shared/data beside the checkout.

    Tests that need the real data fail, never skip, when it is missing: CI must run them.
    """
    folder = Path(os.environ.get("CNNJAX_DATA_DIR") or REPO.parent / "shared" / "data")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"real data not found at {folder}: set CNNJAX_DATA_DIR to the folder holding mnist/ and cats_and_dogs_small/"
        )
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder: nothing leaks into ~/.cache or between tests."""
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


# --- Tiny synthetic data, the same everywhere ---------------------------------------------------

CATS_SIZE = 48  # the smallest square input the cats-vs-dogs convnet takes is 46


def tiny_mnist(n: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-shaped noise with a learnable signal: a bright bar whose row is the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label : 4 + 2 * label, 4:24, 0] = 250
    return images, labels


def tiny_cats_dogs(n: int = 24, seed: int = 0, size: int = CATS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Dark noise images; class 1 ("dogs") has a bright square in the middle."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.int32)
    images[labels == 1, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 230
    return images, labels


def write_cats_dogs_folder(root: Path, sizes: dict[str, int] | None = None, size: int = CATS_SIZE,
                           classes: tuple[str, ...] = ("cats", "dogs")) -> Path:
    """root/{train,validation,test}/<class>/<i>.png from tiny_cats_dogs (Keras's layout); returns root."""
    sizes = sizes or {"train": 16, "validation": 8, "test": 8}
    for seed, (split, n) in enumerate(sizes.items()):
        images, _ = tiny_cats_dogs(n, seed, size)
        for i, image in enumerate(images):  # with two classes, class i % 2 is tiny_cats_dogs' label
            folder = root / split / classes[i % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


@pytest.fixture()
def cats_folder(tmp_path) -> Path:
    """A tiny cats-vs-dogs folder (16 training, 8 validation, 8 test images of 48x48)."""
    return write_cats_dogs_folder(tmp_path / "cats_and_dogs_small")


def write_mnist_folder(folder: Path, n_train: int = 192, n_test: int = 64) -> Path:
    """The four gzipped IDX files of a tiny learnable MNIST (tiny_mnist) in folder; returns folder."""
    import gzip
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = tiny_mnist(n, seed)
        for kind, array in (("images-idx3", images[..., 0]), ("labels-idx1", labels.astype(np.uint8))):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
            (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return folder
