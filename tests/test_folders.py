"""Image folders: layout errors, Keras-identical decoding, skipping bad files, splits, TFDS.

Every test builds its own tiny folders in tmp_path; the real cats_and_dogs_small is never read.
The cache has its own module: tests/test_folders_cache.py.
"""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cnnjax.data import DataError, Images, SkippedImageWarning, decode, load
from cnnjax.data.folders import find_cats_dogs_root, load_image_folder, load_splits
from cnnjax.data.tfds import load_tfds_cats_vs_dogs
from tests._folders_helpers import forbid_decoding
from tests.conftest import write_noise_image, write_solid_image, write_two_classes

# --- classes, order, values -----------------------------------------------------------------------


def test_classes_sorted_and_files_in_keras_order(tmp_path):
    # Created out of order; upper-case extensions count, non-images and hidden files do not.
    write_solid_image(tmp_path / "dogs" / "z.png", (0, 0, 3))
    write_solid_image(tmp_path / "dogs" / "b.PNG", (0, 0, 2))
    write_solid_image(tmp_path / "cats" / "y.Jpg", (200, 200, 200))
    write_solid_image(tmp_path / "cats" / "x.bmp", (0, 0, 1))
    write_solid_image(
        tmp_path / "cats" / "sub" / "w.gif", 0, mode="L"
    )  # sub-folders of a class count, after its files
    write_solid_image(tmp_path / "birds" / "m.webp", (9, 9, 9))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    write_solid_image(tmp_path / "cats" / ".hidden.png", (1, 1, 1))
    write_solid_image(
        tmp_path / ".ipynb_checkpoints" / "q.png", (1, 1, 1)
    )  # hidden folder: not a class
    write_solid_image(
        tmp_path / "loose.png", (1, 1, 1)
    )  # outside any class folder: ignored, as in Keras

    data = load_image_folder(tmp_path, image_size=(4, 6))
    assert isinstance(data, Images)
    assert data.class_names == ["birds", "cats", "dogs"]
    assert data.files == [
        "birds/m.webp",
        "cats/x.bmp",
        "cats/y.Jpg",
        "cats/sub/w.gif",
        "dogs/b.PNG",
        "dogs/z.png",
    ]
    assert data.labels.dtype == np.int32 and data.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert data.images.dtype == np.uint8 and data.images.shape == (6, 4, 6, 3)
    assert data.images[1, 0, 0].tolist() == [0, 0, 1]  # lossless formats keep exact values
    assert data.images[4, 0, 0].tolist() == [0, 0, 2]
    assert data.images[5].reshape(-1, 3).tolist() == [[0, 0, 3]] * 24
    assert data.skipped == [] and len(data) == 6


def test_modes_converted_to_rgb(tmp_path):
    write_solid_image(tmp_path / "c" / "1_gray.png", 100, mode="L")
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    palette.save(tmp_path / "c" / "2_palette.png")
    write_solid_image(
        tmp_path / "c" / "3_rgba.png", (50, 60, 70, 0), mode="RGBA"
    )  # alpha dropped, not composited (Keras does the same)
    write_solid_image(tmp_path / "c" / "4_cmyk.tif", (255, 0, 0, 0), mode="CMYK")
    write_solid_image(tmp_path / "c" / "5_cmyk_black.tif", (0, 0, 0, 255), mode="CMYK")
    write_solid_image(
        tmp_path / "c" / "6_gray16.png", 1000, mode="I;16"
    )  # scaled: round(1000 * 255 / 65535) = 4, not clipped to 255
    data = load_image_folder(tmp_path, image_size=(4, 6))
    assert data.images.shape == (6, 4, 6, 3)
    first_pixels = data.images[:, 0, 0].tolist()
    assert first_pixels == [
        [100] * 3,
        [12, 34, 56],
        [50, 60, 70],
        [0, 255, 255],
        [0, 0, 0],
        [4] * 3,
    ]
    for path, image in zip(
        data.files[:5], data.images, strict=False
    ):  # the 8-bit ones equal PIL's own conversion
        assert np.array_equal(image, np.asarray(Image.open(tmp_path / path).convert("RGB")))


def gradient16(height=48, width=64) -> np.ndarray:
    """Every 16-bit level from 0 to 65535 in steps of about 21, with values
    either side of a rounding edge."""
    values = np.linspace(0, 65535, height * width).round().astype(np.uint16)
    values[:4] = [
        128,
        129,
        385,
        386,
    ]  # 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1, 385 -> 1, 386 -> 2
    return values.reshape(height, width)


def test_16bit_gradient_scaled_to_8bit(tmp_path):
    values = gradient16()
    (tmp_path / "c").mkdir()
    Image.fromarray(values).save(tmp_path / "c" / "a_gray16.png")
    Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes()).save(
        tmp_path / "c" / "b_gray16_big_endian.tif"
    )
    pgm = b"P5\n%d %d\n65535\n" % values.shape[::-1] + values.astype(">u2").tobytes()
    (tmp_path / "c" / "c_gray16.ppm").write_bytes(
        pgm
    )  # a 16-bit PGM (.ppm is the extension Keras lists): PIL's mode "I"
    names = ["a_gray16.png", "b_gray16_big_endian.tif", "c_gray16.ppm"]
    assert [Image.open(tmp_path / "c" / n).mode for n in names] == ["I;16", "I;16B", "I"]
    data = load_image_folder(tmp_path, image_size=values.shape)
    assert data.files == [f"c/{n}" for n in names]
    expected = np.round(values.astype(np.float64) * 255 / 65535)
    for rel, image in zip(data.files, data.images, strict=True):
        assert np.abs(image.astype(np.float64) - expected[..., None]).max() <= 1, rel
        assert image[0, :4, 0].tolist() == [0, 1, 1, 2], rel  # rounded, not truncated
        assert image.max() == 255 and image.min() == 0 and len(np.unique(image)) == 256, rel


def test_16bit_in_mode_i_from_png():
    """Older Pillow opens 16-bit PNGs as mode "I": the same scaling applies (a 32-bit
    TIFF "I" keeps PIL's clipping)."""
    values = gradient16(4, 6)
    image = Image.fromarray(values.astype(np.int32), "I")
    image.format = "PNG"
    scaled = decode._pixels(image, (4, 6), "nearest").astype(np.float64)
    assert np.abs(scaled[..., 0] - np.round(values.astype(np.float64) * 255 / 65535)).max() <= 1
    assert scaled[0, :4, 0].tolist() == [0, 1, 1, 2]
    image.format = "TIFF"
    clipped = decode._pixels(image, (4, 6), "nearest")
    assert clipped[0, :4, 0].tolist() == [128, 129, 255, 255]


def test_float_images_rounded_and_clipped(tmp_path):
    (tmp_path / "c").mkdir()
    floats = np.array([[-5.0, 0.4, 0.6, 100.7, 254.6, 300.0, np.nan]], np.float32)
    Image.fromarray(floats, "F").save(tmp_path / "c" / "f.tif")
    data = load_image_folder(tmp_path, image_size=(1, 7))
    assert data.images[0, 0, :, 0].tolist() == [0, 0, 1, 101, 255, 255, 0]


def test_nearest_resize_equals_pil_nearest(tmp_path):
    path = write_noise_image(tmp_path / "c" / "n.png", size=(37, 23))
    data = load_image_folder(
        tmp_path, image_size=(10, 15)
    )  # (height, width), not square: catches a swap
    expected = np.asarray(Image.open(path).convert("RGB").resize((15, 10), Image.NEAREST))
    assert data.images.shape == (1, 10, 15, 3)
    assert np.array_equal(data.images[0], expected)


def test_bilinear_on_request(tmp_path):
    path = write_noise_image(tmp_path / "c" / "n.png", size=(37, 23))
    bilinear = load_image_folder(tmp_path, image_size=(10, 15), interpolation="bilinear").images[0]
    nearest = load_image_folder(tmp_path, image_size=(10, 15)).images[0]
    assert np.array_equal(bilinear, np.asarray(Image.open(path).resize((15, 10), Image.BILINEAR)))
    assert not np.array_equal(bilinear, nearest)  # and the cache kept the two apart
    with pytest.raises(ValueError, match="interpolation"):
        load_image_folder(tmp_path, interpolation="cubic-ish")


def test_equals_keras_load_img(tmp_path):
    import keras  # a dev dependency: missing, it fails; it never skips

    write_noise_image(tmp_path / "c" / "n.png", size=(37, 23))
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (97, 131, 3), dtype=np.uint8))
    big.save(tmp_path / "c" / "photo.jpg", quality=85)
    big.convert("CMYK").save(tmp_path / "c" / "print.jpg")
    write_solid_image(
        tmp_path / "c" / "same_size.png", (1, 2, 3), size=(15, 10)
    )  # no resize at the target size
    for interpolation in ("nearest", "bilinear"):
        data = load_image_folder(tmp_path, image_size=(10, 15), interpolation=interpolation)
        for rel, image in zip(data.files, data.images, strict=True):
            pil = keras.utils.load_img(
                str(tmp_path / rel), target_size=(10, 15), interpolation=interpolation
            )
            expected = keras.utils.img_to_array(pil)
            assert np.array_equal(image.astype(np.float32), expected), (rel, interpolation)


# --- bad files and bad layouts --------------------------------------------------------------------


def test_corrupt_file_skipped_with_warning(tmp_path):
    write_two_classes(tmp_path)
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    good = (tmp_path / "dogs" / "a.png").read_bytes()
    (tmp_path / "dogs" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.warns(SkippedImageWarning) as record:
        data = load_image_folder(tmp_path, image_size=(4, 6))
    messages = " ".join(str(w.message) for w in record)
    assert "broken.jpg" in messages and "cut.png" in messages
    assert data.files == ["cats/a.png", "cats/b.png", "dogs/a.png"]
    assert data.labels.tolist() == [0, 0, 1] and len(data.images) == 3
    assert data.skipped == ["cats/broken.jpg", "dogs/cut.png"]
    # The cached result remembers the skipped files and warns again.
    with pytest.warns(SkippedImageWarning) as record:
        again = load_image_folder(tmp_path, image_size=(4, 6))
    assert (
        len(record) == 2
        and "broken.jpg" in str(record[0].message)
        and "cut.png" in str(record[1].message)
    )
    assert again.files == data.files and again.skipped == data.skipped


def test_an_image_past_pils_pixel_limit_is_an_unreadable_file(tmp_path, monkeypatch):
    """PIL refuses decompression bombs with an error of its own, no OSError: one is skipped or
    refused like a broken file."""
    Image.new("RGB", (40, 40)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40 x 40 is past twice the limit
    with pytest.raises(
        OSError,
        match=r"huge.png has more pixels than PIL decodes safely \(Image size \(1600 pixels\)",
    ):
        decode.decode_file(tmp_path / "huge.png", (4, 4))


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_symlink_skipped_with_warning(tmp_path, kind):
    write_two_classes(tmp_path)
    link = tmp_path / "cats" / "c.png"
    if kind == "dangling":
        link.symlink_to(tmp_path / "cats" / "gone.png")
    else:  # c.png -> d.png -> c.png: os.stat raises ELOOP
        link.symlink_to(tmp_path / "cats" / "d.png")
        (tmp_path / "cats" / "d.png").symlink_to(link)
    with pytest.warns(SkippedImageWarning) as record:
        data = load_image_folder(tmp_path, image_size=(4, 6))
    messages = [str(w.message) for w in record]
    assert any(
        str(link) in m and ("dangling symlink" if kind == "dangling" else "symlink loop") in m
        for m in messages
    ), messages
    assert data.files == ["cats/a.png", "cats/b.png", "dogs/a.png"] and "cats/c.png" in data.skipped
    with pytest.warns(SkippedImageWarning) as record:  # the cached result repeats the warnings
        assert load_image_folder(tmp_path, image_size=(4, 6)).files == data.files
    assert any(str(link) in str(w.message) for w in record)
    link.unlink()
    write_solid_image(
        link, (30, 0, 0)
    )  # mended (and d.png, a link to it, with it): not served the old result from the cache
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedImageWarning)
        mended = load_image_folder(tmp_path, image_size=(4, 6))
    assert "cats/c.png" in mended.files and mended.skipped == []


def test_class_with_only_undecodable_files_is_an_error(tmp_path):
    write_solid_image(tmp_path / "cats" / "a.png", (1, 2, 3))
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "bad.png").write_bytes(b"junk")
    with (
        pytest.warns(SkippedImageWarning),
        pytest.raises(DataError, match="none of the images of class dogs"),
    ):
        load_image_folder(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; expected folder/<class>/<image>"):
        load_image_folder(tmp_path / "nowhere")


def test_no_class_subfolders(tmp_path):
    write_solid_image(tmp_path / "a.png", (1, 2, 3))
    expected = (
        r"has only 1 loose image file\(s\), no class sub-folders; expected folder/<class>/<image>"
    )
    with pytest.raises(DataError, match=expected):
        load_image_folder(tmp_path)
    (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_image_folder(tmp_path)


def test_empty_class_folder(tmp_path):
    write_solid_image(tmp_path / "cats" / "a.png", (1, 2, 3))
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path)
    message = str(info.value)
    assert (
        str(tmp_path / "dogs") in message
        and "holds no images" in message
        and "folder/<class>/<image>" in message
    )
    assert "\n" not in message


# --- splits ---------------------------------------------------------------------------------------


def test_load_splits(tmp_path):
    write_two_classes(tmp_path / "train")
    write_two_classes(tmp_path / "validation")
    write_solid_image(tmp_path / "validation" / "dogs" / "b.png", (0, 40, 0))
    data = load_splits(tmp_path, image_size=(4, 6))
    assert list(data) == ["train", "validation"]
    assert len(data["train"]) == 3 and len(data["validation"]) == 4
    assert data["validation"].class_names == ["cats", "dogs"]


def test_missing_split(tmp_path):
    write_two_classes(tmp_path / "train")
    expected = (
        r"has no validation, test folder \(it has: train\); "
        r"expected root/\{train,validation,test\}/<class>"
    )
    with pytest.raises(DataError, match=expected):
        load_splits(tmp_path, splits=("train", "validation", "test"))
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "nowhere")


def test_mismatched_classes_fail_before_decoding(tmp_path, monkeypatch):
    write_two_classes(tmp_path / "train")
    write_solid_image(tmp_path / "validation" / "cat" / "a.png", (1, 2, 3))
    write_solid_image(tmp_path / "validation" / "dogs" / "a.png", (1, 2, 3))
    forbid_decoding(monkeypatch)
    expected = (
        r"different classes: .*train has \['cats', 'dogs'\] but .*validation has \['cat', 'dogs'\]"
    )
    with pytest.raises(DataError, match=expected):
        load_splits(tmp_path)


def test_empty_class_in_a_later_split_fails_before_decoding(tmp_path, monkeypatch):
    write_two_classes(tmp_path / "train")
    write_solid_image(tmp_path / "validation" / "cats" / "a.png", (1, 2, 3))
    (tmp_path / "validation" / "dogs").mkdir(parents=True)
    forbid_decoding(monkeypatch)
    with pytest.raises(DataError, match="holds no images"):
        load_splits(tmp_path)


def test_find_cats_dogs_root(tmp_path, monkeypatch):
    monkeypatch.delenv("CNNJAX_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no data folder given.*CNNJAX_DATA_DIR"):
        find_cats_dogs_root()
    data = tmp_path / "cats_and_dogs_small"
    for split in ("train", "validation", "test"):
        (data / split / "cats").mkdir(parents=True)
    assert find_cats_dogs_root(data) == data
    assert find_cats_dogs_root(tmp_path) == data  # a parent of cats_and_dogs_small/
    monkeypatch.setenv("CNNJAX_DATA_DIR", str(tmp_path))
    assert find_cats_dogs_root() == data
    with pytest.raises(
        DataError, match=r"tried .*elsewhere and .*elsewhere/cats_and_dogs_small \(from data_dir\)"
    ):
        find_cats_dogs_root(tmp_path / "elsewhere")


def test_find_cats_dogs_root_takes_the_splits_needed(tmp_path, monkeypatch):
    """A folder with only test/ serves `evaluate.py --split test`; the default still
    needs train/ and validation/."""
    monkeypatch.delenv("CNNJAX_DATA_DIR", raising=False)
    data = tmp_path / "cats_and_dogs_small"
    write_two_classes(data / "test")
    assert find_cats_dogs_root(tmp_path, ("test",)) == data
    assert find_cats_dogs_root(data, ["test"]) == data
    with pytest.raises(DataError, match=r"neither holds train/ and validation/\."):
        find_cats_dogs_root(tmp_path)
    with pytest.raises(DataError, match=r"neither holds validation/ and test/\."):
        find_cats_dogs_root(tmp_path, ("validation", "test"))
    with pytest.raises(ValueError, match="splits"):
        find_cats_dogs_root(tmp_path, "test")  # a string, not a sequence of names
    spec = SimpleNamespace(
        dataset="cats_dogs",
        data_dir=str(tmp_path),
        image_size=4,
        interpolation="nearest",
        input="memory",
    )
    loaded = load(spec, ("test",))
    assert list(loaded) == ["test"] and loaded["test"].files == [
        "cats/a.png",
        "cats/b.png",
        "dogs/a.png",
    ]


# --- TFDS -----------------------------------------------------------------------------------------


def test_tfds_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
    with pytest.raises(
        DataError, match="needs tensorflow-datasets, which is not installed.*train,validation,test"
    ):
        load_tfds_cats_vs_dogs()


def test_the_configs_interpolation_names_are_the_loaders():
    from cnnjax import config

    assert config.INTERPOLATIONS == tuple(decode.INTERPOLATIONS)
