"""Data sources: MNIST IDX files, image folders, TFDS; decoded once and cached."""

from cnnjax.data.common import DataError, cache_root
from cnnjax.data.folders import (
    ImageFolder,
    find_cats_dogs_root,
    load_cats_dogs,
    load_image_folder,
    load_splits,
    prepare_small_split,
)
from cnnjax.data.mnist import load_mnist, parse_idx

__all__ = [
    "DataError", "ImageFolder", "cache_root", "find_cats_dogs_root", "load_cats_dogs", "load_image_folder", "load_mnist",
    "load_splits", "parse_idx", "prepare_small_split",
]
