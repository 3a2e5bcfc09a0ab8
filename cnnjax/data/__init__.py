"""Data: MNIST, image folders and TFDS, as datasets held in memory (`Images`) or streamed (`Stream`).

`load(spec, splits)` is the way in (cnnjax.data.inputs). Below it: decode (one image as keras.utils.load_img, and
the cache of decoded sets), folders (Keras's flow_from_directory layout), tfds, mnist (the IDX files), kaggle
(making cats_and_dogs_small) and common (what they share: the dataset types, errors, threads).
"""

from cnnjax.data.common import DataError, Dataset, Images, SkippedImageWarning, Stream, cache_root
from cnnjax.data.decode import INTERPOLATIONS, check_size, decode_bytes, decode_file
from cnnjax.data.folders import find_cats_dogs_root, load_image_folder, load_splits
from cnnjax.data.inputs import INPUTS, DataSpec, check_classes, choose_input, load
from cnnjax.data.kaggle import prepare_small_split
from cnnjax.data.mnist import load_mnist, parse_idx

__all__ = [
    "INPUTS", "INTERPOLATIONS", "DataError", "DataSpec", "Dataset", "Images", "SkippedImageWarning", "Stream", "cache_root",
    "check_classes", "check_size", "choose_input", "decode_bytes", "decode_file", "find_cats_dogs_root", "load",
    "load_image_folder", "load_mnist", "load_splits", "parse_idx", "prepare_small_split",
]
