"""TFDS image sets: any image-classification set by name (`tfds:NAME`), cats_vs_dogs in the
lecture's split sizes, and any split read record by record.

By name (`tfds_named_sources`, `tfds_sources_in_memory`): image shape, channels (1 for a grey set,
kept grey), class names and splits come from the dataset's info; images are resized to the size
asked for. A "validation" split the set lacks is held out of "train" (splits.stratified_holdout).

TFDS's cats_vs_dogs has one 'train' split (23,262 images); `tfds_subset` takes from it in TFDS
order (shuffle_files=False) per class 1000 for "train", then 500 for "validation" and 500 for
"test", cats then dogs: the lecture's split sizes (cats_and_dogs_small), not its pictures.

Images are decoded with PIL (cnnjax.data.decode), as folders are. Prepared data first; a download
(as array_record, which reading by index needs) only when allowed and TFDS's server answers, checked
first so that offline fails in seconds. TensorFlow and TFDS are imported on first use.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
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
from cnnjax.data.splits import stratified_holdout

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
    """(random-access source, DatasetInfo, tfds) of a split of a TFDS image-classification set,
    images left encoded. Reading by index needs the array_record format, which a download here
    prepares. The info names every split once the set is prepared (none before)."""
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
        raise DataError(
            f"TFDS has no dataset {name!r} ({first_line(e)}); `tfds.list_builders()` or "
            "https://www.tensorflow.org/datasets/catalog/overview lists the names"
        ) from None
    classification_keys(name, builder.info, tfds)  # the info comes from code: before a download
    image_keys = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
    kwargs = {
        "split": split,
        "decoders": {k: tfds.decode.SkipDecoding() for k in image_keys},
    }
    try:
        return (
            tfds.data_source(name, data_dir=data_dir, download=False, **kwargs),
            builder.info,
            tfds,
        )
    except Exception as e:  # noqa: BLE001 - TFDS raises assorted errors for "not prepared"
        if builder.is_prepared():
            check_split(name, builder.info, split)
            raise DataError(
                f"TFDS {name!r} is prepared at {builder.data_dir} in a format that cannot be read "
                f"by index ({builder.info.file_format}); streaming needs array_record: "
                f"prepare it again with `tfds build {name} --file_format=array_record`"
            ) from None
        if not download:
            raise DataError(
                f"TFDS {name!r} is not prepared and downloading is off ({first_line(e)})"
            ) from None
    if not tfds_reachable():
        raise DataError(
            f"TFDS {name!r} is not prepared and its download server cannot be reached; prepare "
            f"it where there is a network (tfds build {name} --file_format=array_record) and "
            "pass that data folder with --data-dir"
        )
    log.info(
        "downloading TFDS %s from TFDS's download server into TFDS's data folder (%s), "
        "prepared as array_record",
        name,
        data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets",
    )
    try:
        # tfds.data_source(download=True) would prepare TFRecord files, which it cannot read
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # noqa: BLE001
        raise DataError(f"TFDS {name!r} download failed: {first_line(e)}") from None
    check_split(name, builder.info, split)  # the splits are known now
    return builder.as_data_source(**kwargs), builder.info, tfds


def classification_keys(name: str, info: Any, tfds: Any) -> tuple[str, str]:
    """(image feature, label feature) of an image-classification set; DataError for any other."""
    image_key, label_key = info.supervised_keys or ("image", "label")
    features = dict(info.features.items())  # a FeaturesDict has no .get
    if not (
        isinstance(features.get(image_key), tfds.features.Image)
        and isinstance(features.get(label_key), tfds.features.ClassLabel)
    ):
        raise DataError(
            f"TFDS {name!r} is not an image-classification dataset "
            "(no image feature with a class label)"
        )
    return image_key, label_key


def check_split(name: str, info: Any, split: str) -> None:
    """DataError naming the splits a prepared set has when `split` (or a part of it, as in
    "train[:80%]+test") is none of them."""
    wrong = [part for part in re.split(r"\s*\+\s*", split) if part.split("[")[0] not in info.splits]
    if info.splits and wrong:
        raise DataError(f"TFDS {name!r} has the splits {', '.join(info.splits)}, not {wrong[0]!r}")


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
        self.data, self.info, tfds = open_tfds(name, split, data_dir, download)
        self.image_key, self.label_key = classification_keys(name, self.info, tfds)
        features = self.info.features
        shape = features[self.image_key].shape
        if image_size is None:
            if None in shape[:2]:
                raise DataError(f"TFDS {name!r} has images of varying size; give an image size")
            image_size = shape[:2]
        self.image_shape = (*check_size(image_size, interpolation), shape[-1] or 3)
        self.class_names = list(features[self.label_key].names)
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
        labels = np.array([0] * len(cats) + [1] * len(dogs), np.int32)
        out[split] = _restrict(full, cats + dogs, labels)
    return out


def _restrict(
    source: TfdsSource, positions: Sequence[int] | np.ndarray, labels: np.ndarray | None = None
) -> TfdsSource:
    """The same split, restricted to the records at these positions of `source`, in their order.
    labels: theirs when known (else taken from `source` when it has read them, else read on
    first use)."""
    part = copy.copy(source)
    positions = np.asarray(positions, np.int64)
    part.indices = source.indices[positions]
    if labels is not None:
        part.labels = labels
    elif "labels" in vars(source):  # functools.cached_property keeps them in the instance
        part.labels = source.labels[positions]
    else:
        vars(part).pop("labels", None)
    return part


def tfds_named_sources(
    name: str,
    splits: Sequence[str],
    image_size: Sequence[int] | None,
    interpolation: str,
    validation_fraction: float,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> dict[str, TfdsSource]:
    """{split: TfdsSource} of the TFDS image-classification set `name` (TFDS's split names); a
    "validation" the set lacks is held out of "train" (`stratified_holdout`), which is then the
    rest. image_size: (height, width) to resize to (None: the set's own). DataError (one line)
    for a missing extra, an unknown name, a set not of image classes, one neither prepared nor
    downloadable, or a split it lacks."""
    if isinstance(splits, str) or not splits:
        raise ValueError(f"splits must be a non-empty sequence of split names, got {splits!r}")
    splits = tuple(dict.fromkeys(splits))
    if not 0 < validation_fraction < 1:  # before anything is opened or downloaded
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    # Train first when validation may come out of it: opening it prepares (or downloads) the
    # whole set, after which the info names every split.
    first = "train" if "train" in splits or "validation" in splits else splits[0]
    base = TfdsSource(name, first, image_size, interpolation, data_dir, download)
    # No split info at all (TFDS's mock data): take the names as they are. A split the set
    # lacks is refused as it is opened (check_split).
    available = list(base.info.splits) or list(splits)
    hold_out = "validation" in splits and "validation" not in available
    sources = {
        s: base
        if s == first
        else TfdsSource(name, s, image_size, interpolation, data_dir, download)
        for s in splits
        if not (hold_out and s == "validation")
    }
    if hold_out:
        kept, held = stratified_holdout(
            base.labels, base.class_names, validation_fraction, f"TFDS {name!r} train"
        )
        sources["validation"] = _restrict(base, held)
        if "train" in sources:
            sources["train"] = _restrict(base, kept)
        log.info(
            "validation: %d records, %g of TFDS %s train (stratified per class; it has no "
            "validation split)",
            len(held),
            validation_fraction,
            name,
        )
    return {s: sources[s] for s in splits}


def tfds_sources_in_memory(
    sources: Mapping[str, TfdsSource], cache: bool = True
) -> dict[str, Images]:
    """Each source decoded into memory, pixel for pixel what it reads, and cached under the
    set's name and version, the TFDS split, the records' indices, the size and the
    interpolation. For a caller that has the sources already (to size them): no second
    opening, no second pass over train's labels."""
    start = time.perf_counter()
    if cache:
        clean_cache()
    results: dict[str, Images] = {}
    for split, source in sources.items():
        key = cache_key(
            {
                "source": f"tfds:{source.name}",
                "version": str(source.info.version),
                "split": source.split,
                "indices": hashlib.sha256(source.indices.astype("<i8").tobytes()).hexdigest(),
                "image_size": list(source.image_shape[:2]),
                "interpolation": source.interpolation,
            }
        )
        height, width, channels = source.image_shape
        if cache and (held := read_cached(key, (height, width), channels)) is not None:
            results[split] = held
            continue
        # the labels come with the pixels: no second pass over the records for source.labels
        read = thread_map(source.read, range(len(source)))
        results[split] = Images(
            np.stack([image for image, _ in read])
            if read
            else np.zeros((0, *source.image_shape), np.uint8),
            np.array([label for _, label in read], np.int32),
            list(source.class_names),
            [source.describe(i) for i in range(len(source))],
        )
        if cache:
            write_cached(key, results[split])
    log.info(
        "TFDS %s (%s) in memory in %.1f s%s",
        ", ".join(dict.fromkeys(source.name for source in sources.values())),
        ", ".join(f"{s} {len(r)}" for s, r in results.items()),
        time.perf_counter() - start,
        f"; cache {cache_folder()}" if cache else "",
    )
    return results
