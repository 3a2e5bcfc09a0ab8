"""Data: MNIST, image folders and TFDS, held in memory (`Images`) or streamed (`Stream`); `load`
(inputs) is the way in.

Below it: decode (pixels as keras.utils.load_img, and the decode cache), folders (Keras's
flow_from_directory layout), splits (validation held out of train, class counts), tfds, mnist
(the IDX files), kaggle (making cats_and_dogs_small) and common (what they share).
"""

from cnnjax.data.common import DataError, Dataset, Images, SkippedImageWarning, Stream, cache_root
from cnnjax.data.decode import INTERPOLATIONS, check_size, decode_bytes, decode_file
from cnnjax.data.folders import find_cats_dogs_root, load_image_folder, load_splits
from cnnjax.data.inputs import INPUTS, check_classes, choose_input, load
from cnnjax.data.kaggle import prepare_small_split
from cnnjax.data.mnist import load_mnist, parse_idx

__all__ = [
    "INPUTS",
    "INTERPOLATIONS",
    "DataError",
    "Dataset",
    "Images",
    "SkippedImageWarning",
    "Stream",
    "cache_root",
    "check_classes",
    "check_size",
    "choose_input",
    "decode_bytes",
    "decode_file",
    "find_cats_dogs_root",
    "load",
    "load_image_folder",
    "load_mnist",
    "load_splits",
    "parse_idx",
    "prepare_small_split",
]
