"""Data sources: MNIST IDX files, image folders, TFDS; decoded once and cached."""

from cnnjax.data.common import DataError, cache_root
from cnnjax.data.mnist import load_mnist, parse_idx

__all__ = ["DataError", "cache_root", "load_mnist", "parse_idx"]
