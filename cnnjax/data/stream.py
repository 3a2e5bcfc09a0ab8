"""Streaming input over tf.data, for image data that does not fit in memory.

The in-memory path (cnnjax.train) decodes a dataset once and keeps it on the devices as
uint8. A `Stream` instead reads each epoch from its source: image folders in Keras's
flow_from_directory layout (`FolderSource`) or a TFDS image-classification split read
record by record (`TfdsSource`). Per epoch and seed the order is the in-memory path's own
(`train.host_epoch_order`: the same jax permutation, computed on the host's CPU, padded
with index 0 / weight 0), so an epoch through the stream is the in-memory epoch. tf.data
decodes in parallel (AUTOTUNE) and batches; the Trainer puts each batch on the devices
with the mesh's (seed, data) sharding two steps ahead (train.prefetch_to_devices), and
augmentation stays in the jitted step.

Pixels: decoding runs PIL inside the pipeline (tf.numpy_function around cnnjax.data.folders'
own decoding), so Keras's load_img semantics, the 16-bit scaling and the resize filter are
those of the in-memory path, byte for byte.

K seeds: one pipeline yields (K, B, ...) batches, each seed its own order; an image drawn
by several seeds in a step is decoded once per seed (K decodes per file per epoch).

Several processes: every process computes the same order and reads only its block of each
global batch (the rows and seeds its devices hold), so across processes every example is
read once per seed and epoch.

A file that cannot be read or decoded is not a crash mid-epoch: its row gets weight 0 (it
counts as padding) and a SkippedImageWarning names it. The epoch keeps its shape and step
count. (The in-memory path drops such files before it orders the epoch, so on a folder
with broken files the two orders differ. A step whose every row is unreadable has a loss
of 0/0 for that seed: fit reports the seed as diverged rather than training on nothing.)

TensorFlow is imported here only, on first use: the rest of cnnjax never imports it.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cnnjax.config import INPUTS
from cnnjax.data import folders
from cnnjax.data.common import DataError, data_dir_from_env, first_line, tfds_reachable
from cnnjax.data.folders import SkippedImageWarning

log = logging.getLogger(__name__)

TFDS_EXTRA = "pip install 'cnnjax[tfds]'"
GIB = 1 << 30
CPU_BUDGET_CAP = 2 * GIB


# --- TensorFlow, lazily ---------------------------------------------------------------------------


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def import_tensorflow() -> Any:
    """TensorFlow with its accelerators hidden (JAX owns them) and its C++ start-up logs quiet."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise DataError(f"--input stream reads through tf.data, and TensorFlow is not installed: {TFDS_EXTRA}") from None
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # devices already initialised by an earlier user: leave them
        pass
    return tf


# --- Sources: one example by index ----------------------------------------------------------------


class Source(Protocol):
    """A dataset read one example at a time: read(i) -> (uint8 image (H, W, C), label)."""

    class_names: list[str]
    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[np.ndarray, int]: ...

    def describe(self, index: int) -> str: ...

    @property
    def labels(self) -> np.ndarray: ...


class FolderSource:
    """The images under folder/<class>/ in Keras's order (classes sorted, files sorted), decoded
    one by one exactly as cnnjax.data.folders decodes them."""

    def __init__(self, folder: str | os.PathLike, image_size: Sequence[int] = (150, 150), interpolation: str = "nearest"):
        size_hw, self.resample = folders._check_args(image_size, interpolation)
        self.size_wh = (size_hw[1], size_hw[0])
        listing = folders._list_folder(folder)
        self.folder, self.class_names, self.files, self.broken = listing.folder, list(listing.class_names), listing.files, listing.broken
        self._labels = np.asarray(listing.labels, np.int32)
        self.image_shape = (*size_hw, 3)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def read(self, index: int) -> tuple[np.ndarray, int]:
        rel = self.files[index]
        if rel in self.broken:  # a dangling symlink or a loop, found while listing
            raise OSError(self.broken[rel])
        return folders._decode_one(str(self.folder / rel), self.size_wh, self.resample), int(self._labels[index])

    def describe(self, index: int) -> str:
        return str(self.folder / self.files[index])


def _decode_gray(data: bytes, size_wh: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return folders._to_array(Image.open(io.BytesIO(data)), size_wh, resample, "L")


def open_tfds(name: str, split: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> tuple[Any, Any, Any]:
    """(random-access source, DatasetInfo, tfds) of a TFDS split with images left encoded: the
    prepared data first; a download only when allowed and TFDS's server answers (checked in
    seconds, so an offline machine fails fast). Reading by index needs the array_record
    format, which TFDS prepares for data sources."""
    import_tensorflow()
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"TFDS {name!r}: tensorflow-datasets is not installed ({TFDS_EXTRA})") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and config errors alike
        raise DataError(f"TFDS has no dataset {name!r} ({first_line(e)})") from None
    image_keys = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
    decoders = {k: tfds.decode.SkipDecoding() for k in image_keys}  # PIL decodes them, as the in-memory path does
    kwargs = {"split": split, "data_dir": data_dir, "decoders": decoders}
    try:
        return tfds.data_source(name, download=False, **kwargs), builder.info, tfds
    except Exception as e:  # noqa: BLE001 - TFDS raises assorted errors for "not prepared"
        if builder.is_prepared():
            raise DataError(
                f"TFDS {name!r} is prepared at {builder.data_dir} in a format that cannot be read by index "
                f"({builder.info.file_format}); streaming needs array_record: prepare it again with "
                f"`tfds build {name} --file_format=array_record`, or use --input memory"
            ) from None
        if not download:
            raise DataError(f"TFDS {name!r} is not prepared and downloading is off ({first_line(e)})") from None
    if not tfds_reachable():
        raise DataError(f"TFDS {name!r} is not prepared and its download server cannot be reached")
    log.info("downloading TFDS %s from TFDS's download server into TFDS's data folder (%s), prepared as array_record",
             name, data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    try:
        return tfds.data_source(name, download=True, **kwargs), builder.info, tfds
    except Exception as e:  # noqa: BLE001
        raise DataError(f"TFDS {name!r} download failed: {first_line(e)}") from None


class TfdsSource:
    """A TFDS image-classification split (by name and split, e.g. "mnist", "test" or
    "cats_vs_dogs", "train[:80%]"), read record by record. Images are decoded with PIL as the
    in-memory path decodes them; image_size resizes them (None: the dataset's fixed size)."""

    def __init__(self, name: str, split: str, image_size: Sequence[int] | None = None, interpolation: str = "nearest",
                 data_dir: str | os.PathLike | None = None, download: bool = True, indices: Sequence[int] | None = None):
        self.name, self.split = name, split
        self.data, info, tfds = open_tfds(name, split, data_dir, download)
        image_key, label_key = info.supervised_keys if info.supervised_keys else ("image", "label")
        features = info.features
        if image_key not in features or label_key not in features or not isinstance(features[label_key], tfds.features.ClassLabel):
            raise DataError(f"TFDS {name!r} is not an image-classification dataset (no image feature with a class label)")
        self.image_key, self.label_key = image_key, label_key
        shape = features[image_key].shape
        channels = shape[-1] or 3
        if image_size is None:
            if None in shape[:2]:
                raise DataError(f"TFDS {name!r} has images of varying size; give an image size")
            image_size = shape[:2]
        size_hw, self.resample = folders._check_args(image_size, interpolation)
        self.size_wh = (size_hw[1], size_hw[0])
        self.image_shape = (*size_hw, channels)
        self.class_names = list(features[label_key].names)
        self.indices = np.arange(len(self.data)) if indices is None else np.asarray(indices, np.int64)
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """Every label, in order: one pass over the records, the first time it is asked for."""
        if self._labels is None:
            self._labels = np.array([int(self.data[int(i)][self.label_key]) for i in self.indices], np.int32)
        return self._labels

    def subset(self, indices: Sequence[int]) -> TfdsSource:
        """The same split restricted to `indices` (positions in this source), in that order."""
        sub = object.__new__(TfdsSource)
        sub.__dict__.update(self.__dict__)
        sub.indices = self.indices[np.asarray(indices, np.int64)]
        sub._labels = None if self._labels is None else self._labels[np.asarray(indices, np.int64)]
        return sub

    def read(self, index: int) -> tuple[np.ndarray, int]:
        record = self.data[int(self.indices[index])]
        image = record[self.image_key]
        if isinstance(image, bytes | np.bytes_):
            image = (folders._decode_bytes(bytes(image), self.size_wh, self.resample) if self.image_shape[-1] == 3
                     else _decode_gray(bytes(image), self.size_wh, self.resample))
        elif image.shape != self.image_shape:
            raise ValueError(f"image of shape {image.shape}, expected {self.image_shape}")
        return np.asarray(image, np.uint8), int(record[self.label_key])

    def describe(self, index: int) -> str:
        return f"tfds:{self.name}/{self.split}[{int(self.indices[index])}]"


def tfds_cats_vs_dogs_subsets(splits: Sequence[str], image_size: Sequence[int], interpolation: str,
                              data_dir: str | os.PathLike | None = None, download: bool = True) -> dict[str, TfdsSource]:
    """The deterministic cats_vs_dogs subset folders.load_tfds_cats_vs_dogs takes (per class the
    first 1000 in TFDS order for train, the next 500 validation, the next 500 test; cats, then
    dogs), as record-by-record sources. Finding it reads every label once."""
    full = TfdsSource("cats_vs_dogs", "train", image_size, interpolation, data_dir, download)
    taken = folders.tfds_subset((int(full.data[int(full.indices[i])][full.label_key]), i) for i in range(len(full)))
    out = {}
    for split in splits:
        sub = full.subset(taken[split][0] + taken[split][1])
        sub._labels = np.array([0] * len(taken[split][0]) + [1] * len(taken[split][1]), np.int32)
        sub.class_names = ["cats", "dogs"]
        out[split] = sub
    return out


# --- The stream -----------------------------------------------------------------------------------


class LazyImages:
    """A source's images as a read-only sequence: an image is decoded when it is indexed."""

    def __init__(self, source: Source):
        self.source = source
        self.dtype = np.dtype(np.uint8)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.source), *self.source.image_shape)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return self.source.read(int(index) % len(self.source))[0]
        return np.stack([self.source.read(int(i))[0] for i in np.arange(len(self.source))[index]])

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(f"{len(self.source)} streamed images are decoded batch by batch, never all at once; "
                        "index them, or use --input memory")


class Stream:
    """A dataset the host delivers batch by batch through tf.data (see the module docstring).

    It also reads as the (images, labels) pair the in-memory path uses: `images` decodes an
    image when indexed (a preview), `labels` are every label. `prefetch` is the number of
    batches tf.data keeps ready; `parallel` the decoding calls in flight (None: AUTOTUNE).
    """

    def __init__(self, source: Source, prefetch: int = 2, parallel: int | None = None):
        self.source, self.prefetch, self.parallel = source, prefetch, parallel
        self.images = LazyImages(source)

    @property
    def num_examples(self) -> int:
        return len(self.source)

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    @property
    def nbytes(self) -> int:
        """What the in-memory path would hold: every image as uint8."""
        return len(self.source) * int(np.prod(self.source.image_shape))

    def __iter__(self) -> Iterator[Any]:
        return iter((self.images, self.labels))

    def __getitem__(self, i: int) -> Any:
        return (self.images, self.labels)[i]

    def __repr__(self) -> str:
        return f"Stream({type(self.source).__name__}, {self.num_examples} images of {self.source.image_shape})"

    def host_batches(self, indices: np.ndarray, weights: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per step, the examples of index matrix rows (K, steps, B) as (K, B, H, W, C) uint8 images,
        (K, B) int32 labels and (K, B) float32 weights. Weight-0 rows (padding) are not read and come
        as zeros; an unreadable file's row comes with weight 0 and a SkippedImageWarning."""
        tf = import_tensorflow()
        indices, weights = np.asarray(indices, np.int64), np.asarray(weights, np.float32)
        seeds, steps, rows = indices.shape
        per_step = seeds * rows
        flat_indices = indices.transpose(1, 0, 2).reshape(-1)  # step-major: one step's K x B rows together
        flat_weights = weights.transpose(1, 0, 2).reshape(-1)
        shape = self.source.image_shape
        blank = np.zeros(shape, np.uint8)
        why: dict[int, str] = {}  # written by tf.data's threads, read here once the batch holding it arrives

        def read(index: np.int64, weight: np.float32) -> tuple[np.ndarray, np.int32, np.bool_]:
            if weight <= 0:
                return blank, np.int32(0), np.bool_(True)
            try:
                image, label = self.source.read(int(index))
            except Exception as e:  # noqa: BLE001 - one bad file is skipped, never the end of the epoch
                why[int(index)] = f"cannot be decoded ({type(e).__name__}: {first_line(e)})"
                return blank, np.int32(0), np.bool_(False)
            if image.shape != shape:
                why[int(index)] = f"decoded to shape {image.shape}, expected {shape}"
                return blank, np.int32(0), np.bool_(False)
            return image, np.int32(label), np.bool_(True)

        def decode(index: Any, weight: Any) -> tuple[Any, Any, Any]:
            image, label, ok = tf.numpy_function(read, [index, weight], (tf.uint8, tf.int32, tf.bool))
            return tf.ensure_shape(image, shape), tf.ensure_shape(label, ()), tf.ensure_shape(ok, ())

        ds = tf.data.Dataset.from_tensor_slices((flat_indices, flat_weights))
        ds = ds.map(decode, num_parallel_calls=self.parallel or tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(per_step).prefetch(self.prefetch)
        for step, (images, labels, ok) in enumerate(ds.as_numpy_iterator()):
            part = slice(step * per_step, (step + 1) * per_step)
            step_weights = flat_weights[part] * ok
            for index in flat_indices[part][(flat_weights[part] > 0) & ~ok]:
                warnings.warn(f"skipped {self.source.describe(int(index))}: {why.get(int(index), 'unreadable')}",
                              SkippedImageWarning, stacklevel=2)
            yield (images.reshape(seeds, rows, *shape), labels.reshape(seeds, rows),
                   step_weights.reshape(seeds, rows).astype(np.float32))


# --- Choosing the input -----------------------------------------------------------------------------


def memory_budget(devices: Sequence[Any] | None = None) -> tuple[int, str]:
    """(bytes, why) the in-memory path may take. On accelerators a quarter of the smallest
    device's memory (the set is replicated on every device, beside the model and its
    activations); on the CPU a quarter of the host's RAM, at most 2 GiB (the set is held once
    as decoded arrays and once on the device, and the decode cache writes it again)."""
    import jax

    devices = list(jax.devices() if devices is None else devices)
    if devices and devices[0].platform != "cpu":
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        if all(limits):
            return min(limits) // 4, f"a quarter of the smallest {devices[0].platform} device's {min(limits) / GIB:.1f} GiB"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 4 * CPU_BUDGET_CAP
    return min(ram // 4, CPU_BUDGET_CAP), f"a quarter of the host's {ram / GIB:.0f} GiB of RAM, at most 2 GiB"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MiB"


def choose_input(mode: str, nbytes: int, budget: tuple[int, str] | None = None) -> tuple[str, str]:
    """("memory" or "stream", the reason in words) for --input `mode` and a uint8 set of `nbytes`.
    Without TensorFlow, "stream" is a DataError naming the extra to install and "auto" is memory."""
    if mode not in INPUTS:
        raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {mode!r}")
    size = f"{_mib(nbytes)} of uint8 images"
    if mode == "memory":
        return "memory", f"--input memory; {size}"
    if mode == "stream":
        if not tensorflow_available():
            raise DataError(f"--input stream reads through tf.data, and TensorFlow is not installed: {TFDS_EXTRA}")
        return "stream", f"--input stream; {size}"
    limit, rule = budget or memory_budget()
    fits = nbytes <= limit
    verdict = f"{size} {'fit' if fits else 'exceed'} the {_mib(limit)} budget, {rule}"
    if fits:
        return "memory", f"auto: {verdict}"
    if not tensorflow_available():
        return "memory", f"auto: {verdict}, but streaming needs TensorFlow ({TFDS_EXTRA})"
    return "stream", f"auto: {verdict}"


def cats_dogs_streams(mode: str, data_dir: str | os.PathLike | None, splits: Sequence[str], image_size: Sequence[int],
                      interpolation: str, budget: tuple[int, str] | None = None) -> dict[str, Stream] | None:
    """The cats-vs-dogs splits as Streams when `mode` (auto, memory, stream) streams them, else None
    (the caller loads them into memory). Logs the choice and why, in one line. The folders of
    --data-dir / CNNJAX_DATA_DIR when given, else TFDS cats_vs_dogs (the in-memory path's subset)."""
    size_hw = tuple(int(s) for s in image_size)
    if data_dir is not None or data_dir_from_env() is not None:
        root = folders.find_cats_dogs_root(data_dir, splits)
        sources: dict[str, Source] | None = {s: FolderSource(root / s, size_hw, interpolation) for s in splits}
        classes = {s: source.class_names for s, source in sources.items()}
        if len({tuple(c) for c in classes.values()}) > 1:
            raise DataError(f"splits have different classes under {root}: {classes}; every split needs the same class sub-folders")
        count = sum(len(source) for source in sources.values())
    else:  # TFDS is opened only once streaming is chosen: its subset's size is known
        sources = None
        count = sum(n * 2 for split, n in folders.TFDS_SPLIT_SIZES if split in splits)
    choice, why = choose_input(mode, count * size_hw[0] * size_hw[1] * 3, budget)
    log.info("input: %s (%s)", choice, why)
    if choice == "memory":
        return None
    import_tensorflow()  # fails here, before anything is read, when TensorFlow is missing
    if sources is None:
        sources = dict(tfds_cats_vs_dogs_subsets(splits, size_hw, interpolation))
    return {s: Stream(source) for s, source in sources.items()}
