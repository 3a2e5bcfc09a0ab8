"""Image folders in the layout of Keras's `flow_from_directory`: decoded once (in threads) and
cached, or streamed.

    folder/<class>/<image>          e.g. cats_and_dogs_small/train/cats/cat.0.jpg
    root/{train,validation,test}/<class>/<image>

Classes are the sorted sub-folder names; images the files with an image extension (any case), in
Keras's order. Hidden files and folders (".DS_Store", "._x.jpg", ".ipynb_checkpoints") are ignored,
unlike Keras: they are never images and would break the class list. A file that cannot be read or
decoded is skipped with a SkippedImageWarning, repeated when the result comes from the cache, whose
key holds every file's sha256 (every load hashes every file, a small fraction of decoding): a
skipped file is retried only when a file changes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnjax.data.common import (
    DataError,
    Images,
    SkippedImageWarning,
    data_dir_from_env,
    thread_map,
)
from cnnjax.data.decode import (
    cache_file,
    cache_key,
    check_size,
    clean_cache,
    content_hashes,
    decode_file,
    read_cached,
    write_cached,
)
from cnnjax.files import write_json

log = logging.getLogger(__name__)

# Keras's flow_from_directory list (png jpg jpeg bmp ppm tif tiff) plus gif and webp.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
FOLDER_LAYOUT = (
    "folder/<class>/<image>, one sub-folder per class, "
    "e.g. train/cats/cat.0.jpg and train/dogs/dog.0.jpg"
)
SPLITS_LAYOUT = "root/{train,validation,test}/<class>/<image>, e.g. root/train/cats/cat.0.jpg"
CATS_DOGS_LAYOUT = (
    "<dir>/{train,validation,test}/{cats,dogs}/*.jpg (as in the lecture's cats_and_dogs_small), "
    "or a parent <dir>/cats_and_dogs_small/ holding those"
)


@dataclass
class Listing:
    """What a folder holds."""

    folder: Path  # absolute
    class_names: list[str]
    files: list[str]  # relative, "/"-separated
    labels: list[int]
    # index -> why it cannot be read (dangling symlink, loop)
    broken: dict[int, str] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return [str(self.folder / rel) for rel in self.files]


def _class_names(folder: Path) -> list[str]:
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist; expected {FOLDER_LAYOUT}")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; expected {FOLDER_LAYOUT}")
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not names:
        loose = sum(
            1
            for e in os.scandir(folder)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        found = f"only {loose} loose image file(s), " if loose else ""
        raise DataError(f"{folder} has {found}no class sub-folders; expected {FOLDER_LAYOUT}")
    return names


def _walk_images(class_dir: Path) -> list[str]:
    """Image paths under class_dir in Keras's order: folders sorted by path, file names sorted."""
    found = []
    for root, dirs, names in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune hidden folders while walking
        found.append(
            (
                root,
                sorted(
                    n
                    for n in names
                    if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
                ),
            )
        )
    return [os.path.join(root, name) for root, names in sorted(found) for name in names]


def _unreadable(path: str, error: OSError) -> str:
    """Why os.stat failed, in words: the usual cases are symlinks that lead nowhere."""
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if os.path.islink(path) and isinstance(error, FileNotFoundError):
        return f"dangling symlink (to {os.readlink(path)})"
    return f"cannot be read ({type(error).__name__}: {error.strerror or error})"


def list_folder(folder: str | os.PathLike) -> Listing:
    """The classes and image files of folder/<class>/, found without decoding anything."""
    folder = Path(folder).expanduser().absolute()
    listing = Listing(folder, _class_names(folder), [], [])
    for label, name in enumerate(listing.class_names):
        paths = _walk_images(folder / name)
        if not paths:
            raise DataError(
                f"class folder {folder / name} holds no images ({' '.join(IMAGE_EXTENSIONS)}); "
                f"every class sub-folder needs at least one: {FOLDER_LAYOUT}"
            )
        for path in paths:
            try:
                os.stat(path)
            except OSError as e:
                # a dangling symlink or a symlink loop: skipped like an undecodable file
                listing.broken[len(listing.files)] = _unreadable(path, e)
            listing.files.append(Path(os.path.relpath(path, folder)).as_posix())
            listing.labels.append(label)
    return listing


def list_splits(root: str | os.PathLike, splits: Sequence[str]) -> dict[str, Listing]:
    """list_folder(root/split) for each split, after checking that every split exists and has the
    same class sub-folders (so label i means the same class everywhere)."""
    if not splits:
        raise ValueError("splits must name at least one split")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; expected {SPLITS_LAYOUT}")
    if missing := [s for s in splits if not (root / s).is_dir()]:
        present = sorted(
            e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
        )
        has = ", ".join(present) or "no sub-folders"
        raise DataError(
            f"{root} has no {', '.join(missing)} folder (it has: {has}); expected {SPLITS_LAYOUT}"
        )
    classes = {s: _class_names(root / s) for s in splits}
    for s in splits[1:]:
        if classes[s] != classes[splits[0]]:
            raise DataError(
                f"splits have different classes: {root / splits[0]} has {classes[splits[0]]} "
                f"but {root / s} has {classes[s]}; every split needs the same class sub-folders"
            )
    return {s: list_folder(root / s) for s in splits}


class FolderSource:
    """A listing's images, for a Stream: read one by one, decoded as
    load_image_folder decodes them."""

    def __init__(
        self,
        listing: Listing,
        image_size: Sequence[int] = (150, 150),
        interpolation: str = "nearest",
    ):
        self.listing, self.interpolation = listing, interpolation
        self.class_names = list(listing.class_names)
        self.image_shape = (*check_size(image_size, interpolation), 3)
        self.labels = np.asarray(listing.labels, np.int32)

    def __len__(self) -> int:
        return len(self.listing.files)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        if index in self.listing.broken:  # a dangling symlink or a loop, found while listing
            raise OSError(self.listing.broken[index])
        image = decode_file(self.describe(index), self.image_shape[:2], self.interpolation)
        return image, int(self.labels[index])

    def describe(self, index: int) -> str:
        return str(self.listing.folder / self.listing.files[index])


def _decode_each(
    listing: Listing,
    size_hw: tuple[int, int],
    interpolation: str,
    workers: int | None,
    into: np.ndarray | None = None,
) -> dict[str, str]:
    """Decode every listed file (into `into`, or only to see that it decodes), in threads; warn
    about and return the ones that failed, {relative path: why}."""

    def one(i: int) -> str | None:  # None, or why file i failed
        if i in listing.broken:
            return listing.broken[i]
        try:
            pixels = decode_file(listing.paths[i], size_hw, interpolation)
        except Exception as e:  # noqa: BLE001
            # any failure of one file skips that file, not the load
            return f"cannot be decoded ({type(e).__name__}: {e})"
        if into is not None:
            into[i] = pixels
        return None

    errors = thread_map(one, range(len(listing.files)), workers, "cnnjax-decode")
    failed = {
        rel: error for rel, error in zip(listing.files, errors, strict=True) if error is not None
    }
    for rel, error in failed.items():
        warnings.warn(f"skipped {listing.folder / rel}: {error}", SkippedImageWarning, stacklevel=3)
    return failed


def _without(listing: Listing, failed: Sequence[str]) -> Listing:
    """The listing less the files that failed; DataError when a whole class is gone (training on the
    other classes alone would silently learn nothing useful)."""
    failed = set(failed)
    keep = [i for i, rel in enumerate(listing.files) if rel not in failed]
    labels = [listing.labels[i] for i in keep]
    if empty := [name for c, name in enumerate(listing.class_names) if c not in labels]:
        raise DataError(
            f"{listing.folder}: none of the images of class {', '.join(empty)} could be decoded "
            "(see warnings)"
        )
    return Listing(listing.folder, listing.class_names, [listing.files[i] for i in keep], labels)


def _decode_listing(
    listing: Listing, size_hw: tuple[int, int], interpolation: str, workers: int | None
) -> Images:
    """Decode into one preallocated array (no stacking copy), then drop the files that failed."""
    images = np.zeros((len(listing.files), *size_hw, 3), np.uint8)
    failed = _decode_each(listing, size_hw, interpolation, workers, images)
    kept = _without(listing, failed)
    if failed:
        images = images[[rel not in failed for rel in listing.files]]
    return Images(
        images,
        np.asarray(kept.labels, np.int32),
        list(listing.class_names),
        kept.files,
        list(failed),
    )


def stream_listing(
    listing: Listing,
    image_size: Sequence[int],
    interpolation: str = "nearest",
    workers: int | None = None,
) -> Listing:
    """The listing a Stream reads: without the files that cannot be decoded, found as
    load_listing finds them, so a stream holds the same examples as memory (the same count, order
    and loss). Finding them decodes every file once; the result is remembered under the folder's
    content-hash key."""
    size_hw = check_size(image_size, interpolation)
    clean_cache()
    key = _cache_key(listing, size_hw, interpolation, workers)
    remembered = cache_file(key).with_suffix(".skipped.json")
    try:
        failed = json.loads(remembered.read_text())
        for rel in failed:
            warnings.warn(
                f"skipped {listing.folder / rel}: cannot be read or decoded "
                "(cached result; fix or remove the file)",
                SkippedImageWarning,
                stacklevel=2,
            )
    except (OSError, ValueError):
        failed = _decode_each(listing, size_hw, interpolation, workers)
        try:
            write_json(remembered, failed)
        except OSError as e:
            warnings.warn(
                f"cannot remember the folder's unreadable files in {remembered} ({e}); "
                "checking again next time",
                stacklevel=2,
            )
    return _without(listing, failed)


def _cache_key(
    listing: Listing, size_hw: tuple[int, int], interpolation: str, workers: int | None
) -> str:
    files = [
        [rel, digest]
        for rel, digest in zip(
            listing.files, content_hashes(listing.paths, listing.broken, workers), strict=True
        )
    ]
    return cache_key(
        {
            "folder": str(listing.folder),
            "image_size": list(size_hw),
            "interpolation": interpolation,
            "classes": listing.class_names,
            "files": files,
        }
    )


def _counted(result: Images) -> str:
    return f"{len(result)} images" + (f" ({len(result.skipped)} skipped)" if result.skipped else "")


def load_listing(
    listing: Listing,
    image_size: Sequence[int],
    interpolation: str = "nearest",
    cache: bool = True,
    workers: int | None = None,
) -> Images:
    """The listed images decoded, or their cached result (see the module docstring)."""
    size_hw = check_size(image_size, interpolation)
    start = time.perf_counter()
    key = None
    if cache:
        clean_cache()
        key = _cache_key(listing, size_hw, interpolation, workers)
        if (cached := read_cached(key, size_hw)) is not None:
            log.info(
                "loaded %s of %s from the cache %s in %.2f s (every file's content hash checked)",
                _counted(cached),
                listing.folder,
                cache_file(key),
                time.perf_counter() - start,
            )
            for rel in cached.skipped:
                warnings.warn(
                    f"skipped {listing.folder / rel}: cannot be read or decoded "
                    "(cached result; fix or remove the file)",
                    SkippedImageWarning,
                    stacklevel=2,
                )
            return cached
    result = _decode_listing(listing, size_hw, interpolation, workers)
    # The key was computed from the bytes before the decode read them again: a file edited in
    # between would put new pixels under the old content's key. Hash again, cache only if equal.
    if key is None:
        note = "not cached (cache=False)"
    elif _cache_key(listing, size_hw, interpolation, workers) != key:
        note = "not cached: a file changed while the folder was being decoded"
    else:
        note = (
            f"cached at {cache_file(key)}"
            if write_cached(key, result)
            else "not cached (see warning)"
        )
    log.info(
        "decoded %s from %s in %.1f s; %s",
        _counted(result),
        listing.folder,
        time.perf_counter() - start,
        note,
    )
    return result


def load_image_folder(
    folder: str | os.PathLike,
    image_size: Sequence[int] = (150, 150),
    interpolation: str = "nearest",
    cache: bool = True,
    workers: int | None = None,
) -> Images:
    """All images under folder/<class>/ as uint8 (N, height, width, 3) with int32 labels. image_size
    is (height, width), as Keras's target_size; interpolation a load_img name. cache=False neither
    reads nor writes the cache. workers: decoding threads (None: twice the cores; 0 or 1: none)."""
    check_size(image_size, interpolation)  # bad arguments fail before the folder is listed
    return load_listing(list_folder(folder), image_size, interpolation, cache, workers)


def load_splits(
    root: str | os.PathLike,
    splits: Sequence[str] = ("train", "validation"),
    image_size: Sequence[int] = (150, 150),
    interpolation: str = "nearest",
    cache: bool = True,
    workers: int | None = None,
) -> dict[str, Images]:
    """load_image_folder(root/split) for each split; all splits are listed and checked
    before any is decoded."""
    check_size(image_size, interpolation)
    return {
        s: load_listing(listing, image_size, interpolation, cache, workers)
        for s, listing in list_splits(root, splits).items()
    }


def find_cats_dogs_root(
    data_dir: str | os.PathLike | None = None, splits: Sequence[str] = ("train", "validation")
) -> Path:
    """The folder holding the cats-vs-dogs splits needed: data_dir, else $CNNJAX_DATA_DIR,
    or its cats_and_dogs_small/. Pass the splits actually used: evaluating on ("test",)
    needs only test/."""
    if isinstance(splits, str) or not splits:
        raise ValueError(f"splits must be a non-empty sequence of split names, got {splits!r}")
    base, source = (
        (data_dir, "data_dir") if data_dir is not None else (data_dir_from_env(), "CNNJAX_DATA_DIR")
    )
    if base is None:
        raise DataError(
            "cats vs dogs: no data folder given; pass data_dir (--data-dir) or set CNNJAX_DATA_DIR "
            f"to {CATS_DOGS_LAYOUT}"
        )
    candidates = (Path(base).expanduser(), Path(base).expanduser() / "cats_and_dogs_small")
    for candidate in candidates:
        if all((candidate / split).is_dir() for split in splits):
            return candidate
    tried = " and ".join(map(str, candidates))
    needed = " and ".join(f"{split}/" for split in splits)
    raise DataError(
        f"cats vs dogs not found: tried {tried} (from {source}); neither holds {needed}. "
        f"Expected {CATS_DOGS_LAYOUT}"
    )
