"""Image folders in the layout of Keras's `flow_from_directory`, decoded once and cached.

    folder/<class>/<image>          e.g. cats_and_dogs_small/train/cats/cat.0.jpg
    root/{train,validation,test}/<class>/<image>

Decoding follows `keras.utils.load_img(path, target_size=(h, w))` pixel for pixel:
PIL opens the file, `convert("RGB")` whatever the mode (L, P, RGBA, CMYK, ...; alpha is
dropped, not composited, as Keras does), then `resize((w, h), NEAREST)` unless the image
already has that size ("bilinear" and PIL's other filters on request). One deliberate
difference: 16-bit grayscale (PIL modes I;16, I;16B, and I from a PNG or PGM) is scaled
to 8 bits, round(v * 255 / 65535), where PIL and Keras clip it to 255 (all white); float
images ("F") are rounded and clipped to 0-255 (see `_to_8bit`). No JPEG
`draft()` mode: it decodes at a reduced DCT scale, and on cats_and_dogs_small only ~30 %
of the images then matched load_img, for a small speed-up.

Classes are the sorted sub-folder names (cats -> 0, dogs -> 1); images are the files with
an image extension (case-insensitive), walked like Keras (sub-folders of a class included,
file names sorted). Hidden files and folders (".DS_Store", "._x.jpg", ".ipynb_checkpoints")
are ignored, which Keras does not do: they are never images and would break the class list.

Decoding runs in a thread pool: Pillow releases the GIL while it decodes and resizes, and
on a 2-core machine threads beat a process pool, which pays for starting workers and for
pickling every array back (and forking after JAX has started threads is unsafe).

A file that cannot be read or decoded (a broken image, a dangling symlink, a symlink loop)
is skipped with a SkippedImageWarning naming it. The result, skipped list included, is
cached in `cache_root()/folders/<key>.npz`, written atomically (`cnnjax.files`; the
temporaries of killed processes are removed on the next load). The key hashes the absolute
folder path, the image size, the interpolation, the Pillow version and every image file's
relative path and sha256, so any added, removed or edited file invalidates it, even one
rewritten with the same size and mtime. The price: every load reads and hashes every file
(in threads, each a slice of the files), which makes a warm (cached) load slower than a
(size, mtime) key did, though still a small fraction of decoding (the README has the
figures). After a decode the files are hashed once more, and the result is cached only if
nothing changed meanwhile. A cached result with skipped files repeats their warnings on
every load; a skipped file is only retried when it (or another file) changes.

Each load logs one INFO line (logger "cnnjax.data.folders"): images decoded or loaded from
the cache, the folder, the time taken and the cache file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import PIL
from PIL import Image

from cnnjax.data.common import DataError, cache_root, data_dir_from_env, first_line, tfds_reachable
from cnnjax.files import atomic_path, atomic_write, clean_orphans

log = logging.getLogger(__name__)
T = TypeVar("T")

# Keras's flow_from_directory list (png jpg jpeg bmp ppm tif tiff) plus gif and webp.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
# The names keras.utils.load_img accepts.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
CACHE_VERSION = 2  # bump when the decoding or the cache layout changes
FOLDER_LAYOUT = "folder/<class>/<image>, one sub-folder per class, e.g. train/cats/cat.0.jpg and train/dogs/dog.0.jpg"
SPLITS_LAYOUT = "root/{train,validation,test}/<class>/<image>, e.g. root/train/cats/cat.0.jpg"
CATS_DOGS_LAYOUT = (
    "<dir>/{train,validation,test}/{cats,dogs}/*.jpg (as in the lecture's cats_and_dogs_small), "
    "or a parent <dir>/cats_and_dogs_small/ holding those"
)
# The book's cats_and_dogs_small: per class, images 0-999 for train, 1000-1499 validation, 1500-1999 test.
BOOK_SPLIT_SIZES = (("train", 1000), ("validation", 500), ("test", 500))
# The deterministic TFDS subset: per class, the first 1000 in TFDS order for train, next 500, next 500.
TFDS_SPLIT_SIZES = BOOK_SPLIT_SIZES
# Kaggle's "Dogs vs. Cats" train/ names its files cat.0.jpg ... cat.12499.jpg and dog.0.jpg ...
KAGGLE_CLASSES = (("cat", "cats"), ("dog", "dogs"))


class SkippedImageWarning(UserWarning):
    """An image file that could not be decoded and was left out."""


@dataclass
class ImageFolder:
    """Decoded images with their labels, in Keras's order (class by class, file names sorted)."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int32 (N,), indices into class_names
    class_names: list[str]
    files: list[str]  # paths relative to the folder, "/"-separated, one per image
    skipped: list[str] = field(default_factory=list)  # relative paths that could not be decoded

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class _Listing:
    """What a folder holds, found without decoding anything."""

    folder: Path
    class_names: list[str]
    files: list[str]  # relative, "/"-separated
    labels: list[int]
    broken: dict[str, str] = field(default_factory=dict)  # relative path -> why it cannot be read (dangling symlink, loop)


# --- finding the files ----------------------------------------------------------------------------


def _class_names(folder: Path) -> list[str]:
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist; expected {FOLDER_LAYOUT}")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; expected {FOLDER_LAYOUT}")
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not names:
        loose = sum(1 for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        found = f"only {loose} loose image file(s), " if loose else ""
        raise DataError(f"{folder} has {found}no class sub-folders; expected {FOLDER_LAYOUT}")
    return names


def _walk_images(class_dir: Path) -> Iterator[str]:
    """Image paths under class_dir in Keras's order: folders sorted by path, file names sorted."""

    def walk() -> Iterator[tuple[str, list[str], list[str]]]:
        for root, dirs, names in os.walk(class_dir):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune hidden folders while walking
            yield root, dirs, names

    for root, _dirs, names in sorted(walk(), key=lambda t: t[0]):
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(root, name)


def _unreadable(path: str, error: OSError) -> str:
    """Why os.stat failed, in words: the usual cases are symlinks that lead nowhere."""
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if os.path.islink(path) and isinstance(error, FileNotFoundError):
        return f"dangling symlink (to {os.readlink(path)})"
    return f"cannot be read ({type(error).__name__}: {error.strerror or error})"


def _list_folder(folder: str | os.PathLike) -> _Listing:
    folder = Path(folder).expanduser().absolute()
    class_names = _class_names(folder)
    files: list[str] = []
    labels: list[int] = []
    broken: dict[str, str] = {}
    for label, name in enumerate(class_names):
        count = 0
        for path in _walk_images(folder / name):
            rel = Path(os.path.relpath(path, folder)).as_posix()
            try:
                os.stat(path)
            except OSError as e:  # a dangling symlink or a symlink loop: skipped like an undecodable file
                broken[rel] = _unreadable(path, e)
            files.append(rel)
            labels.append(label)
            count += 1
        if count == 0:
            raise DataError(
                f"class folder {folder / name} holds no images ({' '.join(IMAGE_EXTENSIONS)}); "
                f"every class sub-folder needs at least one: {FOLDER_LAYOUT}"
            )
    return _Listing(folder, class_names, files, labels, broken)


# --- decoding -------------------------------------------------------------------------------------


def _check_args(image_size: Sequence[int], interpolation: str) -> tuple[tuple[int, int], Image.Resampling]:
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (height, width) with positive sizes, got {image_size!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    return (size[0], size[1]), INTERPOLATIONS[interpolation]


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale as 8-bit "L"; every other mode unchanged.

    PIL's convert("RGB") clips these to 0-255 instead of scaling, so a 16-bit image comes
    out all white. 16-bit values v become round(v * 255 / 65535) = (v + 128) // 257 (no
    ties are possible): modes "I;16*", and mode "I" from a PNG or PPM/PGM file, where PIL
    keeps 16-bit samples. A 32-bit "I" from another format (TIFF) keeps PIL's clipping:
    nothing says which range its values use. "F" (float) is taken as 0-255 like PIL
    does, but rounded rather than truncated, with NaN as 0.
    """
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format in ("PNG", "PPM")):
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return img


def _to_array(img: Image.Image, size_wh: tuple[int, int], resample: Image.Resampling, mode: str = "RGB") -> np.ndarray:
    """uint8 (H, W, 3) for mode "RGB", (H, W, 1) for "L"."""
    # The steps and the order of keras.utils.load_img(color_mode="rgb" or "grayscale", target_size=...),
    # except that 16-bit and float images are scaled to 8 bits first (Keras clips them).
    img = _to_8bit(img)
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != size_wh:
        img = img.resize(size_wh, resample)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[..., None] if mode == "L" else pixels


def _decode_one(path: str, size_wh: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """One file as uint8 (H, W, 3); raises whatever PIL raises for a bad file."""
    with open(path, "rb") as f:
        return _to_array(Image.open(f), size_wh, resample)


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    # Twice the cores: file reads and the Python between PIL calls leave cores idle at one per core.
    return min(16, 2 * cpus)


def _decode_all(
    paths: list[str],
    size_hw: tuple[int, int],
    resample: Image.Resampling,
    workers: int | None,
    known: dict[int, str] | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Decode into one preallocated array (no stacking copy); errors[i] is None or why file i failed.

    known: files already found unreadable (index -> why), not opened again."""
    images = np.zeros((len(paths), *size_hw, 3), np.uint8)
    size_wh = (size_hw[1], size_hw[0])
    known = known or {}

    def work(i: int) -> str | None:
        if i in known:
            return known[i]
        try:
            images[i] = _decode_one(paths[i], size_wh, resample)
        except Exception as e:  # noqa: BLE001 - any failure of one file skips that file, not the load
            return f"cannot be decoded ({type(e).__name__}: {e})"
        return None

    workers = _default_workers() if workers is None else workers
    if workers <= 1 or len(paths) <= 1:
        return images, [work(i) for i in range(len(paths))]
    with ThreadPoolExecutor(min(workers, len(paths)), thread_name_prefix="cnnjax-decode") as pool:
        return images, list(pool.map(work, range(len(paths))))


def _warn_skipped(folder: Path, skipped: list[str], reasons: list[str] | None = None) -> None:
    for i, rel in enumerate(skipped):
        why = reasons[i] if reasons else "cannot be read or decoded (cached result; fix or remove the file)"
        warnings.warn(f"skipped {folder / rel}: {why}", SkippedImageWarning, stacklevel=3)


def _decode_listing(listing: _Listing, size_hw: tuple[int, int], resample: Image.Resampling, workers: int | None) -> ImageFolder:
    paths = [str(listing.folder / rel) for rel in listing.files]
    known = {i: listing.broken[rel] for i, rel in enumerate(listing.files) if rel in listing.broken}
    images, errors = _decode_all(paths, size_hw, resample, workers, known)
    labels = np.asarray(listing.labels, np.int32)
    files = list(listing.files)
    skipped = [rel for rel, err in zip(files, errors, strict=True) if err is not None]
    if skipped:
        _warn_skipped(listing.folder, skipped, [err for err in errors if err is not None])
        keep = np.array([err is None for err in errors])
        images, labels = images[keep], labels[keep]
        files = [rel for rel, ok in zip(files, keep, strict=True) if ok]
        counts = np.bincount(labels, minlength=len(listing.class_names))
        empty = [listing.class_names[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            # Training on the other classes alone would silently learn nothing useful.
            raise DataError(f"{listing.folder}: none of the images of class {', '.join(empty)} could be decoded (see warnings)")
    return ImageFolder(images, labels, list(listing.class_names), files, skipped)


# --- the cache ------------------------------------------------------------------------------------


def _hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # hashlib lets other threads run while it hashes a buffer this big
            digest.update(chunk)
    return digest.hexdigest()


def _content_hashes(listing: _Listing, workers: int | None) -> list[str]:
    """sha256 of every file's bytes, or why it could not be read, in listing order.

    Threads each take one contiguous slice of the files: handing them out one by one costs
    more in thread switching than hashing a 20 kB JPEG does (it measured slower).
    """
    paths = [str(listing.folder / rel) for rel in listing.files]

    def one(i: int) -> str:
        if listing.files[i] in listing.broken:
            return f"broken: {listing.broken[listing.files[i]]}"
        try:
            return _file_digest(paths[i])
        except OSError as e:  # decoding will fail on it too and skip it with a warning
            return f"unreadable: {type(e).__name__}"

    workers = max(1, min(_default_workers() if workers is None else workers, len(paths)))
    if workers == 1:
        return [one(i) for i in range(len(paths))]
    step = -(-len(paths) // workers)
    slices = [range(start, min(start + step, len(paths))) for start in range(0, len(paths), step)]
    with ThreadPoolExecutor(len(slices), thread_name_prefix="cnnjax-hash") as pool:
        return [digest for part in pool.map(lambda indices: [one(i) for i in indices], slices) for digest in part]


def _cache_key(listing: _Listing, size_hw: tuple[int, int], interpolation: str, workers: int | None = None) -> str:
    return _hash({
        "version": CACHE_VERSION,
        "pillow": PIL.__version__,  # another libjpeg can decode other pixels
        "folder": str(listing.folder),
        "image_size": list(size_hw),
        "interpolation": interpolation,
        "classes": listing.class_names,
        "files": [[rel, digest] for rel, digest in zip(listing.files, _content_hashes(listing, workers), strict=True)],
    })


def _cache_folder() -> Path:
    return cache_root() / "folders"


def _cache_path(key: str) -> Path:
    return _cache_folder() / f"{key}.npz"


def _clean_cache_folder() -> None:
    """Remove the temporaries that writers killed mid-write left behind (their process is gone)."""
    removed = clean_orphans(_cache_folder())
    if removed:
        log.info("removed %d unfinished cache file(s) of dead processes from %s", len(removed), _cache_folder())


def _read_cache(path: Path, key: str, size_hw: tuple[int, int]) -> ImageFolder | None:
    """The cached result, or None when absent; a damaged file is reported and ignored."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored_key = str(z["key"])
            images, labels = z["images"], z["labels"]
            class_names, files, skipped = (z[k].tolist() for k in ("class_names", "files", "skipped"))
        n = len(labels)
        if stored_key != key or images.dtype != np.uint8 or images.shape != (n, *size_hw, 3) or len(files) != n:
            raise ValueError("contents do not match what was asked for")
        if labels.dtype != np.int32 or (n and not 0 <= labels.min() <= labels.max() < len(class_names)):
            raise ValueError("bad labels")
    except Exception as e:  # noqa: BLE001 - a cut-off zip raises BadZipFile, EOFError, OSError, KeyError, ...
        warnings.warn(f"ignoring damaged cache file {path} ({type(e).__name__}: {e}); decoding again", stacklevel=3)
        return None
    return ImageFolder(images, labels, class_names, files, skipped)


def _write_cache(path: Path, key: str, result: ImageFolder) -> bool:
    """Write atomically (cnnjax.files): readers see no file or the whole new one, never half of
    one, even when this process is killed mid-write. False (with a warning) when it cannot."""
    try:
        with atomic_write(path, "wb") as f:
            # Uncompressed: 2000 images at 150x150 are 135 MB and load in a fraction of a second;
            # zlib would take seconds each way for little gain on photos.
            np.savez(
                f,
                key=np.array(key),
                images=result.images,
                labels=result.labels,
                class_names=np.array(result.class_names, dtype=str),
                files=np.array(result.files, dtype=str),
                skipped=np.array(result.skipped, dtype=str),
            )
    except OSError as e:
        warnings.warn(f"cannot write the image cache {path} ({e}); decoding again next time", stacklevel=3)
        return False
    return True


# --- public API -----------------------------------------------------------------------------------


def _counted(result: ImageFolder) -> str:
    return f"{len(result)} images" + (f" ({len(result.skipped)} skipped)" if result.skipped else "")


def _load_listing(
    listing: _Listing, image_size: Sequence[int], interpolation: str, cache: bool, workers: int | None
) -> ImageFolder:
    size_hw, resample = _check_args(image_size, interpolation)
    start = time.perf_counter()
    if not cache:
        result = _decode_listing(listing, size_hw, resample, workers)
        log.info("decoded %s from %s in %.1f s; not cached (cache=False)", _counted(result), listing.folder, time.perf_counter() - start)
        return result
    _clean_cache_folder()
    key = _cache_key(listing, size_hw, interpolation, workers)
    path = _cache_path(key)
    cached = _read_cache(path, key, size_hw)
    if cached is not None:
        log.info(
            "loaded %s of %s from the cache %s in %.2f s (every file's content hash checked)",
            _counted(cached), listing.folder, path, time.perf_counter() - start,
        )
        _warn_skipped(listing.folder, cached.skipped)
        return cached
    result = _decode_listing(listing, size_hw, resample, workers)
    # The key was computed from the bytes before the decode read them again: a file edited in
    # between would put new pixels under the old content's key. Hash again, cache only if equal.
    if _cache_key(listing, size_hw, interpolation, workers) != key:
        note = "not cached: a file changed while the folder was being decoded"
    else:
        note = f"cached at {path}" if _write_cache(path, key, result) else "not cached (see warning)"
    log.info("decoded %s from %s in %.1f s; %s", _counted(result), listing.folder, time.perf_counter() - start, note)
    return result


def load_image_folder(
    folder: str | os.PathLike,
    image_size: Sequence[int] = (150, 150),
    interpolation: str = "nearest",
    cache: bool = True,
    workers: int | None = None,
) -> ImageFolder:
    """All images under folder/<class>/ as uint8 (N, height, width, 3) with int32 labels.

    image_size is (height, width) as Keras's target_size. interpolation is a load_img name
    ("nearest", Keras's default, or "bilinear", "bicubic", ...). cache=False neither reads nor
    writes the cache. workers: decoding threads (None: twice the cores; 0 or 1: no threads).
    Raises DataError for a missing folder, no class sub-folders, or a class without images.
    """
    _check_args(image_size, interpolation)  # bad arguments fail before the folder is listed
    return _load_listing(_list_folder(folder), image_size, interpolation, cache, workers)


def load_splits(
    root: str | os.PathLike,
    splits: Sequence[str] = ("train", "validation"),
    image_size: Sequence[int] = (150, 150),
    interpolation: str = "nearest",
    cache: bool = True,
    workers: int | None = None,
) -> dict[str, ImageFolder]:
    """load_image_folder(root/split) for each split, after checking that every split exists and
    has the same class sub-folders (so label i means the same class everywhere). All splits are
    listed and checked before any image is decoded."""
    _check_args(image_size, interpolation)
    if not splits:
        raise ValueError("splits must name at least one split")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; expected {SPLITS_LAYOUT}")
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        present = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        raise DataError(
            f"{root} has no {', '.join(missing)} folder (it has: {', '.join(present) or 'no sub-folders'}); "
            f"expected {SPLITS_LAYOUT}"
        )
    classes = {s: _class_names(root / s) for s in splits}
    first = splits[0]
    for s in splits[1:]:
        if classes[s] != classes[first]:
            raise DataError(
                f"splits have different classes: {root / first} has {classes[first]} but {root / s} has {classes[s]}; "
                "every split needs the same class sub-folders"
            )
    listings = {s: _list_folder(root / s) for s in splits}
    return {s: _load_listing(listings[s], image_size, interpolation, cache, workers) for s in splits}


def find_cats_dogs_root(data_dir: str | os.PathLike | None = None, splits: Sequence[str] = ("train", "validation")) -> Path:
    """The folder holding the cats-vs-dogs splits that are needed (by default train/ and validation/).

    data_dir, else $CNNJAX_DATA_DIR, may be that folder itself or a parent of cats_and_dogs_small/.
    Pass the splits actually used: evaluating on ("test",) needs only test/.
    """
    if isinstance(splits, str) or not splits:
        raise ValueError(f"splits must be a non-empty sequence of split names, got {splits!r}")
    if data_dir is not None:
        base, source = Path(data_dir).expanduser(), "data_dir"
    else:
        env = data_dir_from_env()
        if env is None:
            raise DataError(
                f"cats vs dogs: no data folder given; pass data_dir (--data-dir) or set CNNJAX_DATA_DIR to {CATS_DOGS_LAYOUT}"
            )
        base, source = env.expanduser(), "CNNJAX_DATA_DIR"
    tried = []
    for candidate in (base, base / "cats_and_dogs_small"):
        if all((candidate / split).is_dir() for split in splits):
            return candidate
        tried.append(str(candidate))
    needed = " and ".join(f"{split}/" for split in splits)
    raise DataError(
        f"cats vs dogs not found: tried {' and '.join(tried)} (from {source}); neither holds {needed}. Expected {CATS_DOGS_LAYOUT}"
    )


def _decode_bytes(data: bytes, size_wh: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return _to_array(Image.open(io.BytesIO(data)), size_wh, resample)


def tfds_subset(labelled: Iterable[tuple[int, T]]) -> dict[str, tuple[list[T], list[T]]]:
    """Per split of TFDS_SPLIT_SIZES, (cats, dogs): the items of `labelled` ((label, item) pairs in
    TFDS order) that go there. Per class the first TFDS_SPLIT_SIZES[0] go to train, the next to
    validation, the next to test; reading stops once every split is full. The memory path
    (load_tfds_cats_vs_dogs) and the stream (stream.tfds_cats_vs_dogs_subsets) both pick with
    it, so they hold the same examples."""
    per_class = sum(n for _, n in TFDS_SPLIT_SIZES)
    bounds = np.cumsum([n for _, n in TFDS_SPLIT_SIZES])
    taken: dict[str, tuple[list[T], list[T]]] = {split: ([], []) for split, _ in TFDS_SPLIT_SIZES}
    counts = [0, 0]  # label 0 = cat, 1 = dog in TFDS
    for label, item in labelled:
        if label not in (0, 1) or counts[label] >= per_class:
            continue
        taken[TFDS_SPLIT_SIZES[int(np.searchsorted(bounds, counts[label], side="right"))][0]][label].append(item)
        counts[label] += 1
        if min(counts) >= per_class:
            return taken
    raise DataError(f"TFDS 'cats_vs_dogs' has only {counts[0]} cats and {counts[1]} dogs; {per_class} of each are needed")


def load_tfds_cats_vs_dogs(
    image_size: Sequence[int] = (150, 150),
    interpolation: str = "nearest",
    cache: bool = True,
    allow_download: bool = True,
) -> dict[str, ImageFolder]:
    """cats vs dogs from TFDS's `cats_vs_dogs` when no folders are at hand.

    TFDS has a single 'train' split (23,262 images); this takes, in TFDS order (shuffle_files=False,
    deterministic for a dataset version), the first 1000 cats and first 1000 dogs for "train", the
    next 500 + 500 for "validation" and the next 500 + 500 for "test": the sizes of the lecture's
    cats_and_dogs_small, though not the same pictures. Each split holds its cats, then its dogs.
    The JPEG bytes are decoded with PIL (TFDS decoding skipped) and resized as load_image_folder
    does. Prepared TFDS data is used first; a download only when allowed and the server answers.
    Results are cached per split (the key does not include the TFDS dataset version).
    """
    size_hw, resample = _check_args(image_size, interpolation)
    size_wh = (size_hw[1], size_hw[0])
    keys = {
        split: _hash({
            "version": CACHE_VERSION, "pillow": PIL.__version__, "source": "tfds:cats_vs_dogs/train",
            "subset": TFDS_SPLIT_SIZES, "split": split, "image_size": list(size_hw), "interpolation": interpolation,
        })
        for split, _ in TFDS_SPLIT_SIZES
    }
    start = time.perf_counter()
    if cache:
        _clean_cache_folder()
        cached = {split: _read_cache(_cache_path(key), key, size_hw) for split, key in keys.items()}
        if all(r is not None for r in cached.values()):
            log.info("loaded TFDS cats_vs_dogs (%s) from the cache %s in %.2f s",
                     ", ".join(f"{s} {len(r)}" for s, r in cached.items()), _cache_folder(), time.perf_counter() - start)
            return cached  # type: ignore[return-value]
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            "cats vs dogs: the TFDS fallback needs tensorflow-datasets, which is not installed "
            f"(pip install 'cnnjax[tfds]'); or put the images in folders: {CATS_DOGS_LAYOUT}, and pass --data-dir"
        ) from e
    kwargs = {"split": "train", "as_supervised": True, "shuffle_files": False, "decoders": {"image": tfds.decode.SkipDecoding()}}
    try:  # prepared data first: never touches the network
        ds = tfds.load("cats_vs_dogs", download=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - TFDS raises assorted errors for "not prepared"
        if not allow_download:
            raise DataError(f"TFDS 'cats_vs_dogs' is not prepared and downloading is off ({first_line(e)})") from e
        if not tfds_reachable():
            raise DataError("TFDS 'cats_vs_dogs' is not prepared and its download server cannot be reached") from e
        log.info("downloading TFDS cats_vs_dogs (Microsoft's Kaggle cats and dogs zip, several hundred MB) from TFDS's "
                 "download server into TFDS's data folder ($TFDS_DATA_DIR or ~/tensorflow_datasets)")
        try:
            ds = tfds.load("cats_vs_dogs", download=True, **kwargs)
        except Exception as e2:  # noqa: BLE001
            raise DataError(f"TFDS 'cats_vs_dogs' download failed: {first_line(e2)}") from e2

    taken = tfds_subset((int(label), (index, data)) for index, (data, label) in enumerate(tfds.as_numpy(ds)))

    results: dict[str, ImageFolder] = {}
    for split, _ in TFDS_SPLIT_SIZES:
        items = [(label, index, data) for label in (0, 1) for index, data in taken[split][label]]
        images = np.zeros((len(items), *size_hw, 3), np.uint8)
        # TFDS already dropped the dataset's undecodable files, so a failure here is a real error.
        with ThreadPoolExecutor(_default_workers()) as pool:
            for i, array in enumerate(pool.map(lambda item: _decode_bytes(bytes(item[2]), size_wh, resample), items)):
                images[i] = array
        results[split] = ImageFolder(
            images,
            np.array([label for label, _, _ in items], np.int32),
            ["cats", "dogs"],
            [f"tfds:cats_vs_dogs/train[{index}]" for _, index, _ in items],
        )
        if cache:
            _write_cache(_cache_path(keys[split]), keys[split], results[split])
    log.info("decoded TFDS cats_vs_dogs (%s) in %.1f s%s", ", ".join(f"{s} {len(r)}" for s, r in results.items()),
             time.perf_counter() - start, f"; cached in {_cache_folder()}" if cache else "")
    return results


def load_cats_dogs(
    data_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = ("train", "validation"),
    image_size: Sequence[int] = (150, 150),
    interpolation: str = "nearest",
) -> dict[str, ImageFolder]:
    """The cats-vs-dogs splits: from --data-dir / CNNJAX_DATA_DIR folders, else TFDS.

    With neither a folder nor TFDS, one DataError says how to lay out the folders.
    """
    if data_dir is not None or data_dir_from_env() is not None:
        return load_splits(find_cats_dogs_root(data_dir, splits), splits, image_size, interpolation)
    try:
        tfds_splits = load_tfds_cats_vs_dogs(image_size, interpolation)
    except DataError as e:
        raise DataError(f"cats vs dogs: no --data-dir or CNNJAX_DATA_DIR, and TFDS failed ({e}). Expected {CATS_DOGS_LAYOUT}") from None
    return {split: tfds_splits[split] for split in splits}


# --- the lecture's small split from Kaggle's Dogs vs. Cats ------------------------------------------


@dataclass
class SmallSplit:
    """What prepare_small_split did: images per split (both classes), files copied, files already there."""

    out: Path
    counts: dict[str, int]
    copied: int
    present: int


def _check_sizes(sizes: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    checked = [(str(split), int(n)) for split, n in sizes]
    if not checked or any(n < 1 for _, n in checked) or len({split for split, _ in checked}) != len(checked):
        raise ValueError(f"sizes must be distinct (split, count) pairs with counts >= 1, got {sizes!r}")
    return checked


def kaggle_train_folder(kaggle_dir: str | os.PathLike) -> Path:
    """The folder holding Kaggle's cat.N.jpg / dog.N.jpg: kaggle_dir itself or its train/ (the zip's layout)."""
    folder = Path(kaggle_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"Kaggle folder {folder} does not exist; pass the train/ folder of Kaggle's Dogs vs. Cats (cat.0.jpg, ...)")
    if not (folder / "cat.0.jpg").exists() and (folder / "train" / "cat.0.jpg").exists():
        return folder / "train"
    return folder


def small_split_plan(
    kaggle_dir: str | os.PathLike, out: str | os.PathLike, sizes: Sequence[tuple[str, int]] = BOOK_SPLIT_SIZES
) -> list[tuple[Path, Path]]:
    """(source, destination) for every file of the small split, as the book makes it: per class the
    first sizes[0] images (by number) to the first split, the next sizes[1] to the second, ...,
    as out/<split>/{cats,dogs}/<same file name>."""
    sizes = _check_sizes(sizes)
    kaggle, out = Path(kaggle_dir).expanduser(), Path(out).expanduser()
    plan = []
    for prefix, class_folder in KAGGLE_CLASSES:
        index = 0
        for split, n in sizes:
            for i in range(index, index + n):
                name = f"{prefix}.{i}.jpg"
                plan.append((kaggle / name, out / split / class_folder / name))
            index += n
    return plan


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _checked_source(path: Path) -> str:
    """sha256 of a source file's bytes after PIL decoded those very bytes; raises for a bad file."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
    return hashlib.sha256(data).hexdigest()


def prepare_small_split(
    kaggle_dir: str | os.PathLike,
    out: str | os.PathLike,
    sizes: Sequence[tuple[str, int]] = BOOK_SPLIT_SIZES,
    workers: int | None = None,
) -> SmallSplit:
    """Copy the book's cats_and_dogs_small out of Kaggle's Dogs vs. Cats train folder (see small_split_plan).

    Everything is checked before anything is written: every source exists and decodes with PIL,
    and no destination holds a different file (DataError naming the first bad file). Then each
    missing file is copied atomically (cnnjax.files) and its bytes compared with the source's.
    Safe to rerun: identical files already there are left alone, and the temporaries of a run
    that was killed midway are removed, so the next run completes it.
    """
    kaggle = kaggle_train_folder(kaggle_dir)
    out = Path(out).expanduser()
    sizes = _check_sizes(sizes)
    plan = small_split_plan(kaggle, out, sizes)
    per_class = sum(n for _, n in sizes)
    workers = _default_workers() if workers is None else max(1, workers)
    start = time.perf_counter()

    missing = [src for src, _ in plan if not src.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]} is missing{_more(missing)}: --kaggle-dir must be Kaggle's Dogs vs. Cats train folder, holding "
            + " and ".join(f"{prefix}.0.jpg ... {prefix}.{per_class - 1}.jpg" for prefix, _ in KAGGLE_CLASSES)
        )

    def check(src: Path) -> str | BaseException:
        try:
            return _checked_source(src)
        except Exception as e:  # noqa: BLE001 - any failure means this file cannot be used
            return e

    with ThreadPoolExecutor(workers, thread_name_prefix="cnnjax-check") as pool:
        digests = list(pool.map(check, [src for src, _ in plan]))
    bad = [(src, d) for (src, _), d in zip(plan, digests, strict=True) if isinstance(d, BaseException)]
    if bad:
        src, e = bad[0]
        raise DataError(
            f"{src} cannot be decoded ({type(e).__name__}: {first_line(e)}){_more(bad)}; replace it with the file from the Kaggle download"
        )
    log.info("checked %d Kaggle images in %s (all there, all decode) in %.1f s", len(plan), kaggle, time.perf_counter() - start)

    to_copy = []
    for (src, dest), digest in zip(plan, digests, strict=True):
        if not os.path.lexists(dest):
            to_copy.append((src, dest, digest))
        elif dest.is_symlink() or not dest.is_file() or _file_digest(str(dest)) != digest:
            raise DataError(f"refusing to overwrite {dest}: it differs from {src}; move it away or choose another --out")

    start = time.perf_counter()
    for folder in sorted({dest.parent for _, dest in plan}):
        clean_orphans(folder)  # what a killed run was writing when it died

    def copy(item: tuple[Path, Path, str]) -> None:
        src, dest, digest = item
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
            if _file_digest(str(tmp)) != digest:  # raising here removes the temporary: dest is never a bad copy
                raise DataError(f"copying {src} to {dest} gave different bytes (did the source change?); run again")

    pool = ThreadPoolExecutor(workers, thread_name_prefix="cnnjax-copy")
    try:
        for _ in pool.map(copy, to_copy):
            pass
    finally:  # on an error or Ctrl-C, the copies not yet started are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
    present = len(plan) - len(to_copy)
    log.info("copied %d files into %s in %.1f s (%d already there)", len(to_copy), out, time.perf_counter() - start, present)
    return SmallSplit(out, {split: n * len(KAGGLE_CLASSES) for split, n in sizes}, len(to_copy), present)
