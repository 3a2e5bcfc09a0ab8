"""Image folders: the decoded-folder cache (hits, invalidation, atomic writes, logging).

Every test builds its own tiny folders in tmp_path; the real cats_and_dogs_small is never read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings

import numpy as np
import pytest

from cnnjax import files
from cnnjax.data import DataError, SkippedImageWarning, decode, folders
from cnnjax.data.folders import load_image_folder
from tests._folders_helpers import cache_files, forbid_decoding
from tests.conftest import dead_pid, write_noise_image, write_solid_image, write_two_classes

# --- the cache ------------------------------------------------------------------------------------


def test_second_load_comes_from_the_cache(tmp_path, cache_dir, monkeypatch):
    write_two_classes(tmp_path)
    first = load_image_folder(tmp_path, image_size=(4, 6))
    assert len(cache_files(cache_dir)) == 1 and cache_files(cache_dir)[0].endswith(".npz")
    forbid_decoding(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skipped files, no damaged-cache warning
        second = load_image_folder(tmp_path, image_size=(4, 6))
    assert np.array_equal(second.images, first.images) and np.array_equal(
        second.labels, first.labels
    )
    assert (
        second.labels.dtype == np.int32
        and second.class_names == first.class_names
        and second.files == first.files
    )
    with pytest.warns(
        SkippedImageWarning
    ):  # another size is another key: decoded (and here refused)
        with pytest.raises(DataError):
            load_image_folder(tmp_path, image_size=(5, 5))


def test_changed_added_removed_files_invalidate_the_cache(tmp_path, cache_dir):
    write_two_classes(tmp_path)
    assert load_image_folder(tmp_path, image_size=(4, 6)).images[0, 0, 0].tolist() == [10, 0, 0]
    path = write_solid_image(tmp_path / "cats" / "a.png", (99, 0, 0))
    stat = path.stat()
    os.utime(
        path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000)
    )  # coarse file-system clocks
    assert load_image_folder(tmp_path, image_size=(4, 6)).images[0, 0, 0].tolist() == [99, 0, 0]
    write_solid_image(tmp_path / "dogs" / "c.png", (0, 77, 0))
    assert load_image_folder(tmp_path, image_size=(4, 6)).files[-1] == "dogs/c.png"
    (tmp_path / "cats" / "b.png").unlink()
    assert load_image_folder(tmp_path, image_size=(4, 6)).files == [
        "cats/a.png",
        "dogs/a.png",
        "dogs/c.png",
    ]
    assert len(cache_files(cache_dir)) == 4


def test_file_edited_with_same_size_and_mtime_is_not_served_stale(tmp_path, cache_dir):
    """The key holds each file's content hash, not only its size and mtime."""
    write_two_classes(tmp_path)
    path = tmp_path / "cats" / "a.bmp"  # BMP: the file size depends only on the image size
    write_solid_image(path, (10, 0, 0))
    before = path.stat()
    assert load_image_folder(tmp_path, image_size=(4, 6)).images[0, 0, 0].tolist() == [10, 0, 0]
    write_solid_image(path, (99, 0, 0))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (
        before.st_size,
        before.st_mtime_ns,
    )  # only the bytes differ
    assert load_image_folder(tmp_path, image_size=(4, 6)).images[0, 0, 0].tolist() == [99, 0, 0]
    assert len(cache_files(cache_dir)) == 2


def test_file_edited_while_the_folder_decodes_is_not_cached_under_its_old_content(
    tmp_path, cache_dir, monkeypatch
):
    """The key is hashed before the decode reads the files again; an edit in between must not cache
    the new pixels under the old bytes' key (the next load, with the file back, would get them)."""
    write_two_classes(tmp_path)
    path = tmp_path / "cats" / "a.png"
    original = path.read_bytes()
    decode = folders._decode_listing

    def edit_then_decode(*args, **kwargs):
        write_solid_image(path, (99, 0, 0))
        return decode(*args, **kwargs)

    monkeypatch.setattr(folders, "_decode_listing", edit_then_decode)
    assert load_image_folder(tmp_path, image_size=(4, 6)).images[0, 0, 0].tolist() == [99, 0, 0]
    assert cache_files(cache_dir) == []
    monkeypatch.setattr(folders, "_decode_listing", decode)
    path.write_bytes(original)
    assert load_image_folder(tmp_path, image_size=(4, 6)).images[0, 0, 0].tolist() == [10, 0, 0]
    assert len(cache_files(cache_dir)) == 1


def test_content_hashes_threads_and_serial_agree(tmp_path):
    for i in range(7):
        write_noise_image(tmp_path / "c" / f"{i}.png", seed=i)
    (tmp_path / "c" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    listing = folders.list_folder(tmp_path)
    serial = decode.content_hashes(listing.paths, listing.broken, 1)
    assert serial[:7] == [
        hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() for rel in listing.files[:7]
    ]
    assert serial[7].startswith("broken: dangling symlink")
    for workers in (2, 3, 16):
        assert decode.content_hashes(listing.paths, listing.broken, workers) == serial


def test_orphaned_cache_temporaries_removed_on_next_load(tmp_path, cache_dir):
    write_two_classes(tmp_path)
    load_image_folder(tmp_path, image_size=(4, 6))
    (cached,) = (cache_dir / "folders").iterdir()
    mine = files.temporary_name(cached).name
    orphan = cache_dir / "folders" / mine.replace(f".tmp-{os.getpid()}-", f".tmp-{dead_pid()}-")
    living = (
        cache_dir / "folders" / mine.replace(f".tmp-{os.getpid()}-", f".tmp-{os.getppid()}-")
    )  # a writer still at work
    orphan.write_bytes(b"PK\x03\x04 half a zip")
    living.write_bytes(b"PK\x03\x04 half a zip")
    assert orphan.name != living.name and files.pid_alive(os.getppid())
    load_image_folder(tmp_path, image_size=(4, 6))
    assert not orphan.exists() and living.exists() and cached.exists()


def test_decoding_and_cache_hits_are_logged(tmp_path, cache_dir, caplog):
    write_two_classes(tmp_path)
    caplog.set_level(logging.INFO, logger="cnnjax")
    load_image_folder(tmp_path, image_size=(4, 6))
    (cached,) = (cache_dir / "folders").iterdir()
    folder_re, cached_re = re.escape(str(tmp_path)), re.escape(str(cached))
    (record,) = [r for r in caplog.records if r.name == "cnnjax.data.folders"]
    assert record.levelno == logging.INFO
    assert re.fullmatch(
        rf"decoded 3 images from {folder_re} in \d+\.\d s; cached at {cached_re}",
        record.getMessage(),
    ), record.getMessage()
    caplog.clear()
    load_image_folder(tmp_path, image_size=(4, 6))
    (record,) = [r for r in caplog.records if r.name == "cnnjax.data.folders"]
    assert re.match(
        rf"loaded 3 images of {folder_re} from the cache {cached_re} in \d+\.\d\d s",
        record.getMessage(),
    ), record.getMessage()
    caplog.clear()
    (tmp_path / "dogs" / "bad.png").write_bytes(b"junk")
    with pytest.warns(SkippedImageWarning):
        load_image_folder(tmp_path, image_size=(4, 6), cache=False)
    (record,) = [r for r in caplog.records if r.name == "cnnjax.data.folders"]
    assert (
        record.getMessage().startswith(f"decoded 3 images (1 skipped) from {tmp_path} in ")
        and "not cached" in record.getMessage()
    )


def test_damaged_cache_is_rebuilt(tmp_path, cache_dir):
    write_two_classes(tmp_path)
    first = load_image_folder(tmp_path, image_size=(4, 6))
    (cached,) = (cache_dir / "folders").iterdir()
    cached.write_bytes(cached.read_bytes()[:200])  # as if cut off
    with pytest.warns(UserWarning, match="ignoring damaged cache file"):
        second = load_image_folder(tmp_path, image_size=(4, 6))
    assert np.array_equal(second.images, first.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = load_image_folder(tmp_path, image_size=(4, 6))  # the rebuilt file is whole again
    assert np.array_equal(third.images, first.images)


def test_cache_write_is_atomic(tmp_path, cache_dir, monkeypatch):
    write_two_classes(tmp_path)
    real_savez = np.savez

    def savez_then_die(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(decode.np, "savez", savez_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_image_folder(tmp_path, image_size=(4, 6))
    assert cache_files(cache_dir) == []  # neither a half-written cache nor its temporary file

    def savez_disk_full(file, **arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(decode.np, "savez", savez_disk_full)
    with pytest.warns(UserWarning, match="cannot write the image cache"):
        data = load_image_folder(tmp_path, image_size=(4, 6))  # the load itself still succeeds
    assert len(data) == 3 and cache_files(cache_dir) == []

    monkeypatch.setattr(decode.np, "savez", real_savez)
    load_image_folder(tmp_path, image_size=(4, 6))
    assert [name.endswith(".npz") for name in cache_files(cache_dir)] == [True]


def test_cache_false_reads_and_writes_nothing(tmp_path, cache_dir):
    write_two_classes(tmp_path)
    load_image_folder(tmp_path, image_size=(4, 6), cache=False)
    assert cache_files(cache_dir) == []


def test_threads_and_serial_agree(tmp_path):
    for i in range(12):
        write_noise_image(
            tmp_path / ("cats" if i % 2 else "dogs") / f"{i:02d}.png", size=(20 + i, 30 - i), seed=i
        )
    serial = load_image_folder(tmp_path, image_size=(8, 9), cache=False, workers=1)
    threaded = load_image_folder(tmp_path, image_size=(8, 9), cache=False, workers=4)
    assert np.array_equal(serial.images, threaded.images) and serial.files == threaded.files
