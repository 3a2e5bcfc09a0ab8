"""TFDS image sets: cats_vs_dogs in the lecture's split sizes, and any image-classification split
read record by record.

TFDS's cats_vs_dogs has a single 'train' split (23,262 images). `tfds_subset` takes, in TFDS order
(shuffle_files=False, deterministic for a dataset version), per class the first 1000 for "train",
the next 500 for "validation" and 500 for "test": the sizes of the lecture's cats_and_dogs_small,
not its pictures; each split holds its cats, then its dogs. Images are decoded with PIL
(cnnjax.data.decode), as image folders are, not by TFDS. Prepared data is used first; a download
only when allowed and TFDS's server answers. TensorFlow and TFDS are imported on first use only.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from cnnjax.data.common import (
    TFDS_EXTRA,
    DataError,
    Images,
    first_line,
    import_tensorflow,
    tfds_reachable,
    thread_map,
)
from cnnjax.data.decode import (
    cache_folder,
    cache_key,
    check_size,
    clean_cache,
    decode_bytes,
    read_cached,
    write_cached,
)
from cnnjax.data.folders import CATS_DOGS_LAYOUT
from cnnjax.data.kaggle import BOOK_SPLIT_SIZES

log = logging.getLogger(__name__)
T = TypeVar("T")

TFDS_SPLIT_SIZES = BOOK_SPLIT_SIZES  # images per class and split, taken in this order


def tfds_subset(labelled: Iterable[tuple[int, T]]) -> dict[str, tuple[list[T], list[T]]]:
    """Per split, (cats, dogs): the items of `labelled`, (label, item) pairs in TFDS order, that go
    there (see the module docstring); reading stops once every split is full."""
    per_class = sum(n for _, n in TFDS_SPLIT_SIZES)
    bounds = np.cumsum([n for _, n in TFDS_SPLIT_SIZES])
    taken: dict[str, tuple[list[T], list[T]]] = {split: ([], []) for split, _ in TFDS_SPLIT_SIZES}
    counts = [0, 0]  # label 0 = cat, 1 = dog in TFDS
    for label, item in labelled:
        if label not in (0, 1) or counts[label] >= per_class:
            continue
        split = TFDS_SPLIT_SIZES[int(np.searchsorted(bounds, counts[label], side="right"))][0]
        taken[split][label].append(item)
        counts[label] += 1
        if min(counts) >= per_class:
            return taken
    raise DataError(
        f"TFDS 'cats_vs_dogs' has only {counts[0]} cats and {counts[1]} dogs; "
        f"{per_class} of each are needed"
    )


def load_tfds_cats_vs_dogs(
    image_size: Sequence[int] = (150, 150),
    interpolation: str = "nearest",
    cache: bool = True,
    allow_download: bool = True,
) -> dict[str, Images]:
    """The TFDS subset (train, validation, test) decoded into memory, each split cached
    (without TFDS's version)."""
    size_hw = check_size(image_size, interpolation)
    keys = {
        split: cache_key(
            {
                "source": "tfds:cats_vs_dogs/train",
                "subset": TFDS_SPLIT_SIZES,
                "split": split,
                "image_size": list(size_hw),
                "interpolation": interpolation,
            }
        )
        for split, _ in TFDS_SPLIT_SIZES
    }
    start = time.perf_counter()
    if cache:
        clean_cache()
        cached = {split: read_cached(key, size_hw) for split, key in keys.items()}
        if all(r is not None for r in cached.values()):
            log.info(
                "loaded TFDS cats_vs_dogs (%s) from the cache %s in %.2f s",
                ", ".join(f"{s} {len(r)}" for s, r in cached.items()),
                cache_folder(),
                time.perf_counter() - start,
            )
            return cached  # type: ignore[return-value]
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            "cats vs dogs: the TFDS fallback needs tensorflow-datasets, which is not installed "
            f"({TFDS_EXTRA}); or put the images in folders: {CATS_DOGS_LAYOUT}, and pass --data-dir"
        ) from e
    kwargs = {
        "split": "train",
        "as_supervised": True,
        "shuffle_files": False,
        "decoders": {"image": tfds.decode.SkipDecoding()},
    }
    try:  # prepared data first: never touches the network
        ds = tfds.load("cats_vs_dogs", download=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - TFDS raises assorted errors for "not prepared"
        if not allow_download:
            raise DataError(
                f"TFDS 'cats_vs_dogs' is not prepared and downloading is off ({first_line(e)})"
            ) from e
        if not tfds_reachable():
            raise DataError(
                "TFDS 'cats_vs_dogs' is not prepared and its download server cannot be reached"
            ) from e
        log.info(
            "downloading TFDS cats_vs_dogs (Microsoft's Kaggle cats and dogs zip, "
            "several hundred MB) from TFDS's download server into TFDS's data folder "
            "($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        )
        try:
            ds = tfds.load("cats_vs_dogs", download=True, **kwargs)
        except Exception as e2:  # noqa: BLE001
            raise DataError(f"TFDS 'cats_vs_dogs' download failed: {first_line(e2)}") from e2

    taken = tfds_subset(
        (int(label), (index, data)) for index, (data, label) in enumerate(tfds.as_numpy(ds))
    )
    results: dict[str, Images] = {}
    for split, (cats, dogs) in taken.items():
        # TFDS already dropped the dataset's undecodable files, so a failure here is a real error.
        images = np.stack(
            thread_map(
                lambda item: decode_bytes(bytes(item[1]), size_hw, interpolation), cats + dogs
            )
        )
        results[split] = Images(
            images,
            np.array([0] * len(cats) + [1] * len(dogs), np.int32),
            ["cats", "dogs"],
            [f"tfds:cats_vs_dogs/train[{index}]" for index, _ in cats + dogs],
        )
        if cache:
            write_cached(keys[split], results[split])
    log.info(
        "decoded TFDS cats_vs_dogs (%s) in %.1f s%s",
        ", ".join(f"{s} {len(r)}" for s, r in results.items()),
        time.perf_counter() - start,
        f"; cached in {cache_folder()}" if cache else "",
    )
    return results


def open_tfds(
    name: str, split: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> tuple[Any, Any, Any]:
    """(random-access source, DatasetInfo, tfds) of a TFDS split with images left encoded.
    Reading by index needs the array_record format, which TFDS prepares for data sources."""
    import_tensorflow()
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"TFDS {name!r}: tensorflow-datasets is not installed ({TFDS_EXTRA})"
        ) from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and config errors alike
        raise DataError(f"TFDS has no dataset {name!r} ({first_line(e)})") from None
    image_keys = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
    kwargs = {
        "split": split,
        "data_dir": data_dir,
        "decoders": {k: tfds.decode.SkipDecoding() for k in image_keys},
    }
    try:
        return tfds.data_source(name, download=False, **kwargs), builder.info, tfds
    except Exception as e:  # noqa: BLE001 - TFDS raises assorted errors for "not prepared"
        if builder.is_prepared():
            raise DataError(
                f"TFDS {name!r} is prepared at {builder.data_dir} in a format that cannot be read "
                f"by index ({builder.info.file_format}); streaming needs array_record: "
                f"prepare it again with `tfds build {name} --file_format=array_record`, "
                "or use --input memory"
            ) from None
        if not download:
            raise DataError(
                f"TFDS {name!r} is not prepared and downloading is off ({first_line(e)})"
            ) from None
    if not tfds_reachable():
        raise DataError(f"TFDS {name!r} is not prepared and its download server cannot be reached")
    log.info(
        "downloading TFDS %s from TFDS's download server into TFDS's data folder (%s), "
        "prepared as array_record",
        name,
        data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets",
    )
    try:
        return tfds.data_source(name, download=True, **kwargs), builder.info, tfds
    except Exception as e:  # noqa: BLE001
        raise DataError(f"TFDS {name!r} download failed: {first_line(e)}") from None


class TfdsSource:
    """A TFDS image-classification split (e.g. "mnist", "test" or "cats_vs_dogs",
    "train[:80%]") read record by record, for a Stream. image_size resizes the images (None:
    the dataset's fixed size)."""

    def __init__(
        self,
        name: str,
        split: str,
        image_size: Sequence[int] | None = None,
        interpolation: str = "nearest",
        data_dir: str | os.PathLike | None = None,
        download: bool = True,
    ):
        self.name, self.split, self.interpolation = name, split, interpolation
        self.data, info, tfds = open_tfds(name, split, data_dir, download)
        image_key, label_key = info.supervised_keys or ("image", "label")
        features = info.features
        if (
            image_key not in features
            or label_key not in features
            or not isinstance(features[label_key], tfds.features.ClassLabel)
        ):
            raise DataError(
                f"TFDS {name!r} is not an image-classification dataset "
                "(no image feature with a class label)"
            )
        self.image_key, self.label_key = image_key, label_key
        shape = features[image_key].shape
        if image_size is None:
            if None in shape[:2]:
                raise DataError(f"TFDS {name!r} has images of varying size; give an image size")
            image_size = shape[:2]
        self.image_shape = (*check_size(image_size, interpolation), shape[-1] or 3)
        self.class_names = list(features[label_key].names)
        self.indices = np.arange(len(self.data))

    def __len__(self) -> int:
        return len(self.indices)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Every label, in order: one pass over the records, the first time it is asked for."""
        return np.array([self.label(i) for i in range(len(self))], np.int32)

    def label(self, index: int) -> int:
        return int(self.data[int(self.indices[index])][self.label_key])

    def read(self, index: int) -> tuple[np.ndarray, int]:
        record = self.data[int(self.indices[index])]
        image = record[self.image_key]
        if isinstance(image, bytes | np.bytes_):
            image = decode_bytes(
                bytes(image),
                self.image_shape[:2],
                self.interpolation,
                "RGB" if self.image_shape[-1] == 3 else "L",
            )
        elif image.shape != self.image_shape:
            raise ValueError(f"image of shape {image.shape}, expected {self.image_shape}")
        return np.asarray(image, np.uint8), int(record[self.label_key])

    def describe(self, index: int) -> str:
        return f"tfds:{self.name}/{self.split}[{int(self.indices[index])}]"


def tfds_cats_vs_dogs_subsets(
    splits: Sequence[str], image_size: Sequence[int], interpolation: str, download: bool = True
) -> dict[str, TfdsSource]:
    """The subset load_tfds_cats_vs_dogs holds, as record-by-record sources; finding it reads
    every label once."""
    full = TfdsSource("cats_vs_dogs", "train", image_size, interpolation, download=download)
    full.class_names = ["cats", "dogs"]  # the image folders' names (TFDS's are "cat" and "dog")
    taken = tfds_subset((full.label(i), i) for i in range(len(full)))
    out = {}
    for split in splits:
        cats, dogs = taken[split]
        part = copy.copy(full)  # the same split, restricted to these records
        part.indices, part.labels = (
            full.indices[cats + dogs],
            np.array([0] * len(cats) + [1] * len(dogs), np.int32),
        )
        out[split] = part
    return out
