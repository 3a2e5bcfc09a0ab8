"""The one way in: `load(cfg.data, ("train", "validation"))` gives {split: Images | Stream},
then `check_classes`.

MNIST always fits in memory. cats vs dogs comes from the folders of data_dir or CNNJAX_DATA_DIR,
else from TFDS; "folder" is any folder of N >= 2 classes (validation held out of train/ where it
has no validation/), "tfds:NAME" any TFDS image-classification set. `input` says how: "memory"
decodes every image once, "stream" reads them batch by batch, "auto" keeps them in memory when they
fit a budget (`choose_input`). The choice is logged in
one line, "input: ...".
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cnnjax.data import folders, tfds
from cnnjax.data.common import (
    TFDS_EXTRA,
    DataError,
    Dataset,
    Images,
    Stream,
    data_dir_from_env,
    import_tensorflow,
    tensorflow_available,
)
from cnnjax.data.decode import check_size
from cnnjax.data.mnist import load_mnist
from cnnjax.data.splits import split_listing, warn_class_counts

log = logging.getLogger(__name__)

INPUTS = ("auto", "memory", "stream")
GIB = 1 << 30
CPU_BUDGET_CAP = 2 * GIB


class DataSpec(Protocol):
    """What `load` reads: cnnjax.config.DataConfig has these fields. The data layer names only
    this, so that the imports run one way, config -> data."""

    dataset: str
    data_dir: str | None
    image_size: int
    interpolation: str
    input: str
    validation_fraction: float


def memory_budget(devices: Sequence[Any] | None = None) -> tuple[int, str]:
    """(bytes, why) the in-memory path may take. On accelerators a quarter of the smallest device's
    memory (the set is replicated on every device, beside the model and its activations); on the CPU
    a quarter of the RAM, at most 2 GiB (the set is held as decoded arrays and on the device, and
    the decode cache writes it again)."""
    import jax

    devices = list(jax.devices() if devices is None else devices)
    if devices and devices[0].platform != "cpu":
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        if all(limits):
            smallest, platform = min(limits), devices[0].platform
            why = f"a quarter of the smallest {platform} device's {smallest / GIB:.1f} GiB"
            return smallest // 4, why
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 4 * CPU_BUDGET_CAP
    why = f"a quarter of the host's {ram / GIB:.0f} GiB of RAM, at most 2 GiB"
    return min(ram // 4, CPU_BUDGET_CAP), why


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MiB"


def choose_input(mode: str, nbytes: int, budget: tuple[int, str] | None = None) -> tuple[str, str]:
    """("memory" or "stream", the reason in words) for --input `mode` and a uint8 set of `nbytes`.
    Without TensorFlow, "stream" is a DataError naming the extra to install and "auto" is memory."""
    if mode not in INPUTS:
        raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {mode!r}")
    size = f"{_mib(nbytes)} of uint8 images"
    if mode == "stream" and not tensorflow_available():
        raise DataError(
            f"--input stream reads through tf.data, and TensorFlow is not installed: {TFDS_EXTRA}"
        )
    if mode != "auto":
        return mode, f"--input {mode}; {size}"
    limit, rule = budget or memory_budget()
    fits = nbytes <= limit
    verdict = f"{size} {'fit' if fits else 'exceed'} the {_mib(limit)} budget, {rule}"
    if fits:
        return "memory", f"auto: {verdict}"
    if not tensorflow_available():
        return "memory", f"auto: {verdict}, but streaming needs TensorFlow ({TFDS_EXTRA})"
    return "stream", f"auto: {verdict}"


def load(spec: DataSpec, splits: Sequence[str]) -> dict[str, Dataset]:
    """{split: Images or Stream} for the splits asked for, e.g. ("train", "validation") or
    ("test",), all with the same class names. DataError, before anything is decoded or downloaded,
    for a data_dir that does not exist, a split the data set lacks, or a folder whose splits have
    different classes."""
    if isinstance(splits, str) or not splits:
        raise ValueError(f"splits must be a non-empty sequence of split names, got {splits!r}")
    # ("train", "train") when validating on the training split
    splits = tuple(dict.fromkeys(splits))
    if spec.data_dir is not None and not Path(spec.data_dir).expanduser().is_dir():
        what = (
            "is a file, not a folder"
            if Path(spec.data_dir).expanduser().exists()
            else "does not exist"
        )
        raise DataError(f"--data-dir {spec.data_dir} {what}; pass the folder that holds the data")
    if spec.dataset == "mnist":
        return _mnist(spec, splits)
    if spec.dataset == "cats_dogs":
        return _cats_dogs(spec, splits)
    if spec.dataset == "folder":
        return _folder(spec, splits)
    if spec.dataset.startswith("tfds:"):
        return _tfds_named(spec, splits)
    raise ValueError(f"dataset must be mnist, cats_dogs, folder or tfds:NAME, got {spec.dataset!r}")


def _mnist(spec: DataSpec, splits: tuple[str, ...]) -> dict[str, Dataset]:
    if spec.input == "stream":
        raise DataError(
            "--input stream is for image folders and TFDS image sets (cats_dogs); "
            "MNIST (55 MB as uint8) always fits in memory: use --input memory or auto"
        )
    # before a load that may download
    if wrong := [s for s in splits if s not in ("train", "test")]:
        raise DataError(f"MNIST has the splits train and test, not {wrong[0]!r}")
    log.info(
        "input: memory (%s)",
        "--input memory"
        if spec.input == "memory"
        else "auto: MNIST's 55 MB of uint8 images always fit",
    )
    arrays = load_mnist(spec.data_dir)
    return {
        s: Images(arrays[f"{s}_images"], arrays[f"{s}_labels"], [str(d) for d in range(10)])
        for s in splits
    }


def _cats_dogs(spec: DataSpec, splits: tuple[str, ...]) -> dict[str, Dataset]:
    size = check_size((spec.image_size, spec.image_size), spec.interpolation)
    if spec.data_dir is not None or data_dir_from_env() is not None:
        root = folders.find_cats_dogs_root(spec.data_dir, splits)
        return _from_listings(spec, folders.list_splits(root, splits))
    # TFDS is opened only once the input is chosen: its subset's size is known
    sizes = dict(tfds.TFDS_SPLIT_SIZES)
    if wrong := [s for s in splits if s not in sizes]:
        raise DataError(f"TFDS cats_vs_dogs has the splits {', '.join(sizes)}, not {wrong[0]!r}")
    count = sum(2 * sizes[s] for s in splits)
    choice, why = choose_input(spec.input, count * size[0] * size[1] * 3)
    log.info("input: %s (%s)", choice, why)
    if choice == "stream":
        import_tensorflow()  # fails here, before anything is read, when TensorFlow is missing
        sources = tfds.tfds_cats_vs_dogs_subsets(splits, size, spec.interpolation)
        return {s: Stream(source) for s, source in sources.items()}
    try:
        held = tfds.load_tfds_cats_vs_dogs(size, spec.interpolation)
    except DataError as e:
        raise DataError(
            f"cats vs dogs: no --data-dir or CNNJAX_DATA_DIR, and TFDS failed ({e}). "
            f"Expected {folders.CATS_DOGS_LAYOUT}"
        ) from None
    return {s: held[s] for s in splits}


def _folder(spec: DataSpec, splits: tuple[str, ...]) -> dict[str, Dataset]:
    """Any folder of N >= 2 classes; without validation/, validation is a stratified part of
    train/ (split_listing)."""
    base = spec.data_dir if spec.data_dir is not None else data_dir_from_env()
    if base is None:
        raise DataError(
            "data.dataset folder: no data folder given; pass --data-dir DIR, with "
            f"{folders.SPLITS_LAYOUT} (validation/ and test/ optional)"
        )
    root = Path(base).expanduser()
    split_off = "validation" in splits and not (root / "validation").is_dir()
    # train/ is read for the validation it holds out, not when only test/ is asked for
    listed = [s for s in splits if s != "validation"] + ["train"] if split_off else list(splits)
    listings = folders.list_splits(root, tuple(dict.fromkeys(listed)))
    if split_off:
        fraction = spec.validation_fraction
        listings["train"], listings["validation"] = split_listing(listings["train"], fraction)
        log.info(
            "validation: %d images, %g of %s (stratified per class; no validation/ folder)",
            len(listings["validation"].files),
            fraction,
            root / "train",
        )
    for split in splits:
        held = split_off and split == "validation"
        warn_class_counts(listings[split], f"{root / split}" + held * " (held out of train/)")
    return _from_listings(spec, {split: listings[split] for split in splits})


def _tfds_named(spec: DataSpec, splits: tuple[str, ...]) -> dict[str, Dataset]:
    """A TFDS image-classification set by name, from spec.data_dir (else TFDS's own folder),
    downloaded when it is not prepared there and TFDS's server answers."""
    name = spec.dataset.removeprefix("tfds:")
    size = check_size((spec.image_size, spec.image_size), spec.interpolation)
    found = (name, splits, size, spec.interpolation, spec.validation_fraction, spec.data_dir)
    sources = tfds.tfds_named_sources(*found)
    pixels = sum(len(source) * math.prod(source.image_shape) for source in sources.values())
    choice, why = choose_input(spec.input, pixels)
    log.info("input: %s (%s)", choice, why)
    if choice == "stream":
        import_tensorflow()
        return {split: Stream(source) for split, source in sources.items()}
    return dict(tfds.tfds_sources_in_memory(sources))


def _from_listings(spec: DataSpec, listings: Mapping[str, folders.Listing]) -> dict[str, Dataset]:
    """The listed images in memory or as streams, as spec.input chooses."""
    size = check_size((spec.image_size, spec.image_size), spec.interpolation)
    count = sum(len(listing.files) for listing in listings.values())
    choice, why = choose_input(spec.input, count * size[0] * size[1] * 3)
    log.info("input: %s (%s)", choice, why)
    if choice == "stream":
        import_tensorflow()  # fails here, before anything is read, when TensorFlow is missing
        return {
            s: Stream(
                folders.FolderSource(
                    folders.stream_listing(listing, size, spec.interpolation),
                    size,
                    spec.interpolation,
                )
            )
            for s, listing in listings.items()
        }
    return {
        s: folders.load_listing(listing, size, spec.interpolation)
        for s, listing in listings.items()
    }


def check_classes(datasets: Mapping[str, Dataset], num_classes: int, where: str) -> None:
    """Every dataset must have exactly num_classes classes (2 for a sigmoid head) and its labels in
    0..num_classes-1."""
    for dataset in datasets.values():
        names = dataset.class_names
        if len(names) != num_classes:
            raise DataError(
                f"{where} has {len(names)} classes ({', '.join(names)}) but the model needs "
                f"exactly {num_classes}; give a folder with {num_classes} class sub-folders"
            )
        labels = dataset.labels
        if len(labels) and (int(np.min(labels)) < 0 or int(np.max(labels)) >= num_classes):
            low, high = int(np.min(labels)), int(np.max(labels))
            raise DataError(
                f"{where}: labels run from {low} to {high}, outside 0..{num_classes - 1}"
            )
