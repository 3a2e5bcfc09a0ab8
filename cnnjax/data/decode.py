"""Pixels: one image decoded as `keras.utils.load_img(path, target_size=(h, w))` does, and
decoded sets cached.

As load_img: `convert("RGB")` (or "L") whatever the mode (alpha dropped, not composited), then a
NEAREST resize (other filters on request) unless the size is right already; the one deliberate
difference is `_to_8bit`. No JPEG `draft()`: it decodes at a reduced DCT scale, and on
cats_and_dogs_small only ~30 % of the images then matched load_img. Every path to pixels goes
through here, so a model sees at inference the pixels it trained on.

A cache key hashes what the caller says decides the pixels, plus the cache's and Pillow's versions
(another libjpeg can decode other pixels); a folder's key holds every file's sha256, so an edited
file invalidates it even with the same size and mtime. A damaged cache file is reported and ignored:
the caller decodes again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from cnnjax.data.common import Images, cache_root, default_workers, first_line, thread_map
from cnnjax.files import atomic_write, clean_orphans, sha256

log = logging.getLogger(__name__)

# The names keras.utils.load_img accepts.
INTERPOLATIONS = {
    name: Image.Resampling[name.upper()]
    for name in ("nearest", "bilinear", "bicubic", "hamming", "box", "lanczos")
}
CACHE_VERSION = 2  # bump when the decoding or the cache layout changes


def check_size(image_size: Sequence[int], interpolation: str = "nearest") -> tuple[int, int]:
    """image_size as (height, width); ValueError unless it is two positive sizes and
    interpolation a load_img name."""
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(
            f"image_size must be (height, width) with positive sizes, got {image_size!r}"
        )
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
        )
    return size[0], size[1]


def decode_file(
    path: str | os.PathLike,
    size_hw: Sequence[int],
    interpolation: str = "nearest",
    mode: str = "RGB",
) -> np.ndarray:
    """One image file as uint8 (H, W, 3) for mode "RGB", (H, W, 1) for "L"; raises what
    open() or PIL raises."""
    size_hw = check_size(size_hw, interpolation)
    with open(path, "rb") as f:
        try:
            image = Image.open(f)
        except Image.DecompressionBombError as e:
            # as unreadable as a broken file: skipped or refused like one
            raise OSError(
                f"{path} has more pixels than PIL decodes safely ({first_line(e).rstrip('.')})"
            ) from None
        return _pixels(image, size_hw, interpolation, mode)


def decode_bytes(
    data: bytes, size_hw: Sequence[int], interpolation: str = "nearest", mode: str = "RGB"
) -> np.ndarray:
    """decode_file for an encoded image held in memory (a TFDS record's JPEG)."""
    return _pixels(
        Image.open(io.BytesIO(data)), check_size(size_hw, interpolation), interpolation, mode
    )


def _pixels(
    img: Image.Image, size_hw: tuple[int, int], interpolation: str, mode: str = "RGB"
) -> np.ndarray:
    img = _to_8bit(img)
    # then the steps, in order, of load_img(color_mode="rgb" or "grayscale", target_size=...)
    if img.mode != mode:
        img = img.convert(mode)
    size_wh = (size_hw[1], size_hw[0])
    if img.size != size_wh:
        img = img.resize(size_wh, INTERPOLATIONS[interpolation])
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[..., None] if mode == "L" else pixels


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale as 8-bit "L"; every other mode unchanged.

    PIL's convert("RGB") clips these to 0-255 instead of scaling, so a 16-bit image comes out all
    white. 16-bit values v become round(v * 255 / 65535) = (v + 128) // 257 (no ties are possible):
    modes "I;16*", and "I" from a PNG or PPM/PGM file, where PIL keeps 16-bit samples. A 32-bit "I"
    from another format (TIFF) keeps PIL's clipping: nothing says which range its values use. "F" is
    taken as 0-255 like PIL does, but rounded, NaN as 0.
    """
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format in ("PNG", "PPM")):
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return img


def cache_folder() -> Path:
    return cache_root() / "folders"


def cache_file(key: str) -> Path:
    return cache_folder() / f"{key}.npz"


def cache_key(parts: Mapping[str, object]) -> str:
    described = json.dumps(
        {"version": CACHE_VERSION, "pillow": PIL.__version__, **parts}, sort_keys=True
    )
    return hashlib.sha256(described.encode()).hexdigest()[:32]


def content_hashes(
    paths: Sequence[str], broken: Mapping[int, str], workers: int | None = None
) -> list[str]:
    """sha256 of every file's bytes, or why it cannot be read (broken[i], known already, or an
    OSError). Each thread hashes one contiguous slice of the files: handing them out one by one
    measured slower (thread switches cost more than hashing a 20 kB JPEG)."""

    def one(i: int) -> str:
        if i in broken:
            return f"broken: {broken[i]}"
        try:
            return sha256(paths[i])
        except OSError as e:  # decoding will fail on it too and skip it with a warning
            return f"unreadable: {type(e).__name__}"

    threads = max(1, default_workers() if workers is None else workers)
    step = max(1, math.ceil(len(paths) / threads))  # files per thread
    slices = [range(len(paths))[start : start + step] for start in range(0, len(paths), step)]
    parts = thread_map(
        lambda indices: [one(i) for i in indices], slices, len(slices), "cnnjax-hash"
    )
    return [digest for part in parts for digest in part]


def clean_cache() -> None:
    """Remove the temporaries that writers killed mid-write left behind (their process is gone)."""
    if removed := clean_orphans(cache_folder()):
        log.info(
            "removed %d unfinished cache file(s) of dead processes from %s",
            len(removed),
            cache_folder(),
        )


def read_cached(key: str, size_hw: tuple[int, int], channels: int = 3) -> Images | None:
    """The cached result, or None when absent; a damaged file is reported and ignored."""
    file = cache_file(key)
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            stored_key = str(z["key"])
            images, labels = z["images"], z["labels"]
            class_names, files, skipped = (
                z[k].tolist() for k in ("class_names", "files", "skipped")
            )
        n = len(labels)
        if (
            stored_key != key
            or images.dtype != np.uint8
            or images.shape != (n, *size_hw, channels)
            or len(files) != n
        ):
            raise ValueError("contents do not match what was asked for")
        if labels.dtype != np.int32 or (
            n and not 0 <= labels.min() <= labels.max() < len(class_names)
        ):
            raise ValueError("bad labels")
    except Exception as e:  # noqa: BLE001
        # a cut-off zip raises BadZipFile, EOFError, OSError, KeyError, ...
        warnings.warn(
            f"ignoring damaged cache file {file} ({type(e).__name__}: {e}); decoding again",
            stacklevel=3,
        )
        return None
    return Images(images, labels, class_names, files, skipped)


def write_cached(key: str, result: Images) -> bool:
    """Store result under key, atomically; False (with a warning) when it cannot be written.
    Uncompressed: 2000 images at 150x150 (135 MB) load in a fraction of a second; zlib takes seconds
    each way for little gain on photos."""
    file = cache_file(key)
    try:
        with atomic_write(file, "wb") as f:
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
        warnings.warn(
            f"cannot write the image cache {file} ({e}); decoding again next time", stacklevel=3
        )
        return False
    return True
