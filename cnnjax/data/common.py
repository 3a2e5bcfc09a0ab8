"""What the data sources share: errors, the two kinds of dataset, where data and caches live,
threads, TensorFlow."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")
TFDS_EXTRA = "pip install 'cnnjax[tfds]'"


class DataError(Exception):
    """Data that cannot be found or read; the message says what was wrong and what to do."""


class SkippedImageWarning(UserWarning):
    """An image file that could not be decoded and was left out."""


@dataclass
class Images:
    """A dataset held in memory, in the source's order (for a folder, Keras's: class by class,
    file names sorted)."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int32 (N,), indices into class_names
    class_names: list[str]
    # where each image came from; empty for MNIST's arrays
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded, left out

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.images.shape[1:]

    def image(self, index: int) -> np.ndarray:
        return self.images[index]


class Source(Protocol):
    """A dataset read one example at a time: read(i) -> (uint8 image (H, W, C), label);
    describe(i) names it."""

    class_names: list[str]
    image_shape: tuple[int, int, int]

    @property
    def labels(self) -> np.ndarray: ...
    def __len__(self) -> int: ...
    def read(self, index: int) -> tuple[np.ndarray, int]: ...
    def describe(self, index: int) -> str: ...


class Stream:
    """A dataset the host delivers batch by batch through tf.data, for sets too large for memory.

    `batches` reads the examples that index matrices name, in their order; the training loop passes
    the order it uses for in-memory data, so an epoch through the stream is the in-memory epoch,
    pixel for pixel. K seeds: one pipeline yields (K, B, ...) batches, each seed its own rows (an
    image drawn by several seeds in a step is decoded once per seed). Several processes: each passes
    the rows and seeds its devices hold, so every example is read once per seed and epoch across
    processes. A file that cannot be read or decoded is no crash mid-epoch: its row gets weight 0
    (as padding) and a SkippedImageWarning names it. (The in-memory path drops such files before it
    orders the epoch, so on a folder with broken files the two orders differ.)
    """

    def __init__(self, source: Source):
        self.source = source
        self.class_names, self.image_shape = source.class_names, source.image_shape

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"Stream({type(self.source).__name__}, {len(self)} images of {self.image_shape})"

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels  # a TFDS source reads them on first use

    def image(self, index: int) -> np.ndarray:
        return self.source.read(index)[0]  # a preview

    def batches(self, indices: np.ndarray, weights: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """Per step of index and weight matrices (K, steps, B), the examples they name: {"image":
        (K, B, H, W, C) uint8, "label": (K, B) int32, "weight": (K, B) float32}. Weight-0 rows
        (padding) are not read: zeros."""
        tf = import_tensorflow()
        indices, weights = np.asarray(indices, np.int64), np.asarray(weights, np.float32)
        seeds, steps, rows = indices.shape
        per_step = seeds * rows
        # step-major: one step's K x B rows together
        flat_indices = indices.transpose(1, 0, 2).reshape(-1)
        flat_weights = weights.transpose(1, 0, 2).reshape(-1)
        shape = self.image_shape
        blank = np.zeros(shape, np.uint8)
        # written by tf.data's threads, read here once the batch holding it arrives
        why: dict[int, str] = {}

        def read(index: np.int64, weight: np.float32) -> tuple[np.ndarray, np.int32, np.bool_]:
            if weight <= 0:
                return blank, np.int32(0), np.bool_(True)
            try:
                image, label = self.source.read(int(index))
            except Exception as e:  # noqa: BLE001 - a bad file is skipped; the epoch goes on
                why[int(index)] = f"cannot be decoded ({type(e).__name__}: {first_line(e)})"
                return blank, np.int32(0), np.bool_(False)
            if image.shape != shape:
                why[int(index)] = f"decoded to shape {image.shape}, expected {shape}"
                return blank, np.int32(0), np.bool_(False)
            return image, np.int32(label), np.bool_(True)

        def decode(index: Any, weight: Any) -> tuple[Any, Any, Any]:
            image, label, ok = tf.numpy_function(
                read, [index, weight], (tf.uint8, tf.int32, tf.bool)
            )
            return (
                tf.ensure_shape(image, shape),
                tf.ensure_shape(label, ()),
                tf.ensure_shape(ok, ()),
            )

        ds = tf.data.Dataset.from_tensor_slices((flat_indices, flat_weights))
        ds = (
            ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(per_step)
            .prefetch(2)
        )
        for step, (images, labels, ok) in enumerate(ds.as_numpy_iterator()):
            part = slice(step * per_step, (step + 1) * per_step)
            step_weights = flat_weights[part] * ok
            for index in flat_indices[part][(flat_weights[part] > 0) & ~ok]:
                what = self.source.describe(int(index))
                reason = why.get(int(index), "unreadable")
                warnings.warn(f"skipped {what}: {reason}", SkippedImageWarning, stacklevel=2)
            yield {
                "image": images.reshape(seeds, rows, *shape),
                "label": labels.reshape(seeds, rows),
                "weight": step_weights.reshape(seeds, rows).astype(np.float32),
            }


# Both offer labels, class_names, image_shape, len and image(i): only how a training loop gets at
# the pixels differs.
Dataset = Images | Stream


def data_dir_from_env() -> Path | None:
    value = os.environ.get("CNNJAX_DATA_DIR")
    return Path(value) if value else None


def cache_root() -> Path:
    """`$CNNJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/cnnjax`, else `~/.cache/cnnjax`."""
    if os.environ.get("CNNJAX_CACHE_DIR"):
        return Path(os.environ["CNNJAX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnjax"


def tfds_reachable() -> bool:
    """Whether TFDS's download server answers at all: checked before a download, so an offline
    machine fails in seconds instead of hanging in retries."""
    try:
        with socket.create_connection(("storage.googleapis.com", 443), timeout=5.0):
            return True
    except OSError:
        return False


def first_line(error: BaseException) -> str:
    """An error's first non-empty line (its type name when it has no message), at
    most 300 characters."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one: Linux)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_workers() -> int:
    """Threads for decoding, hashing and copying files: twice the cores, as file reads and the
    Python between PIL calls leave cores idle at one per core."""
    return min(16, 2 * usable_cores())


def thread_map(
    fn: Callable[[T], R], items: Sequence[T], workers: int | None = None, name: str = "cnnjax"
) -> list[R]:
    """[fn(item) for item in items] on threads (workers None: default_workers(); 0 or 1: in
    this thread). Threads, not processes: PIL and hashlib release the GIL while they work, and
    a process pool pays for starting workers and pickling every result back (and forking after
    JAX has started threads is unsafe). On an error or Ctrl-C the calls not yet started are
    dropped, not waited for."""
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix=name)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None  # without importing it


def import_tensorflow() -> Any:
    """TensorFlow with its accelerators hidden (JAX owns them) and its C++ start-up logs quiet.
    Only streaming and TFDS import it, on first use: the rest of cnnjax never does."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Its oneDNN notice is logged before absl's logging starts, which TF_CPP_MIN_LOG_LEVEL cannot
    # silence; cnnjax runs no TensorFlow arithmetic (tf.data and TFDS only), so oneDNN is moot.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
    except ImportError:
        raise DataError(
            f"--input stream reads through tf.data, and TensorFlow is not installed: {TFDS_EXTRA}"
        ) from None
    # RuntimeError, ValueError: devices already initialised by an earlier user; leave them
    with contextlib.suppress(RuntimeError, ValueError):
        tf.config.set_visible_devices([], "GPU")
    return tf
