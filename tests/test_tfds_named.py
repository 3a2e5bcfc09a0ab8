"""TFDS image sets by name (tfds:NAME): shapes, channels, classes and splits from the dataset's
info, a validation split held out of train (stratified, deterministic), memory and source pixel
for pixel, and one-line errors that come fast offline. No network: a tiny 3-class set is generated
into a temporary folder by a TFDS builder defined here; TFDS's mock data stands in for real
names."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from cnnjax.data import DataError
from cnnjax.data import tfds as tfds_data
from cnnjax.data.splits import stratified_holdout

pytest.importorskip(
    "tensorflow", reason="the tfds extra: pip install -e '.[dev,tfds]' (CI installs it)"
)
tfds = pytest.importorskip(
    "tensorflow_datasets", reason="the tfds extra: pip install -e '.[dev,tfds]' (CI installs it)"
)

CLASSES = ["ant", "bee", "cat"]
# per split, records per class: unequal, so that a per-class count means something
COUNTS = {"train": (12, 9, 6), "test": (2, 2, 2)}
VAL_COUNTS = {"validation": (2, 1, 1)}
SHAPE = (8, 10)  # (height, width) as generated
FRACTION = 0.2  # held out of train per class: round(2.4), round(1.8), round(1.2) = 2, 2, 1
HELD = (2, 2, 1)


class CnnjaxTinyThree(tfds.core.GeneratorBasedBuilder):
    """3 classes of tiny random images, the first pixel its id (unique across splits). Configs:
    rgb and grey with train and test; rgb_val with a validation split too."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in ("rgb", "grey", "rgb_val")]

    def _channels(self) -> int:
        return 1 if self.builder_config.name == "grey" else 3

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(*SHAPE, self._channels())),
                    "label": tfds.features.ClassLabel(names=CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        counts = COUNTS | (VAL_COUNTS if self.builder_config.name == "rgb_val" else {})
        return {split: self._generate_examples(split, counts[split]) for split in counts}

    def _generate_examples(self, split, counts):
        offset = {"train": 0, "test": 100, "validation": 200}[split]
        for label, n in enumerate(counts):
            for i in range(n):
                uid = offset + 10 * label + i
                yield (
                    f"{label}-{i}",
                    {"image": expected_pixels(uid, self._channels()), "label": label},
                )


def expected_pixels(uid: int, channels: int) -> np.ndarray:
    """Record uid's image as generated: random, its first pixel uid."""
    pixels = np.random.default_rng(uid).integers(0, 256, (*SHAPE, channels), dtype=np.uint8)
    pixels[0, 0] = uid
    return pixels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The tiny set's configs prepared as array_record (what reading by index needs)."""
    root = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()  # a screenful per split otherwise
    for config in ("rgb", "grey", "rgb_val"):
        tfds.builder(f"cnnjax_tiny_three/{config}", data_dir=root).download_and_prepare(
            file_format="array_record"
        )
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Never a download, whatever the machine's network; the decode cache in a temporary folder."""
    monkeypatch.setattr(tfds_data, "tfds_reachable", lambda *a, **k: False)
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path / "cache"))


def load_named(name, *args, **kwargs):
    """A named set in memory, as data.load holds it."""
    return tfds_data.tfds_sources_in_memory(tfds_data.tfds_named_sources(name, *args, **kwargs))


def sources(config, splits, data_dir, image_size=(6, 6), fraction=FRACTION):
    return tfds_data.tfds_named_sources(
        f"cnnjax_tiny_three/{config}", splits, image_size, "bilinear", fraction, data_dir
    )


def uids(source) -> list[int]:
    """The id each record carries in its first pixel (read at the generated size)."""
    return [int(source.read(i)[0][0, 0, 0]) for i in range(len(source))]


# --- Info: classes, shapes, channels --------------------------------------------------------------


def test_classes_shapes_and_channels_come_from_the_info(data_dir):
    for config, channels in (("rgb", 3), ("grey", 1)):
        got = sources(config, ("train", "test"), data_dir)
        for split, source in got.items():
            assert source.class_names == CLASSES
            assert source.image_shape == (6, 6, channels)
            image, label = source.read(0)
            assert image.shape == (6, 6, channels) and image.dtype == np.uint8
            assert len(source) == sum(COUNTS[split])
            assert np.bincount(source.labels, minlength=3).tolist() == list(COUNTS[split])
    # real names, TFDS's mock records: the info says 32x32 RGB and 28x28 grey, and the classes
    with tfds.testing.mock_data(num_examples=6):
        cifar = tfds_data.tfds_named_sources("cifar10", ("train", "test"), (32, 32), "nearest", 0.1)
        fashion = tfds_data.tfds_named_sources("fashion_mnist", ("test",), (28, 28), "nearest", 0.1)
        image, _ = fashion["test"].read(0)
    assert list(cifar) == ["train", "test"] and cifar["test"].image_shape == (32, 32, 3)
    # cifar10's code gives 10 classes; their names come with the prepared data, absent in a mock
    assert cifar["train"].class_names == cifar["test"].class_names == [str(d) for d in range(10)]
    assert fashion["test"].image_shape == (28, 28, 1) and image.shape == (28, 28, 1)
    assert fashion["test"].class_names[0] == "T-shirt/top"


# --- The validation split held out of train -------------------------------------------------------


def held_out_by_rule(labels: list[int], fraction: float) -> list[int]:
    """The rule, written plainly: per class, the round(fraction * n) indices (at least 1, leaving 1)
    with the smallest sha256 of str(index)."""
    held = []
    for label in range(3):
        members = [i for i, lab in enumerate(labels) if lab == label]
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        held += sorted(members, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())[:count]
    return sorted(held)


def test_validation_is_held_out_of_train_stratified_deterministic_and_disjoint(data_dir):
    first = sources("rgb", ("train", "validation"), data_dir)
    again = sources("rgb", ("validation", "train"), data_dir)
    whole = sources("rgb", ("train",), data_dir)["train"]  # train alone: nothing held out
    train, validation = first["train"], first["validation"]
    assert list(again) == ["validation", "train"]
    # deterministic: the same records twice, in the same order
    assert validation.indices.tolist() == again["validation"].indices.tolist()
    assert train.indices.tolist() == again["train"].indices.tolist()
    # stratified: per class round(0.2 * n) held out
    assert np.bincount(validation.labels, minlength=3).tolist() == list(HELD)
    assert validation.labels.tolist() == [validation.label(i) for i in range(len(validation))]
    assert train.labels.tolist() == [train.label(i) for i in range(len(train))]
    # disjoint, and together all of train
    held, kept = set(validation.indices.tolist()), set(train.indices.tolist())
    assert not held & kept and held | kept == set(range(len(whole))) == set(whole.indices.tolist())
    assert validation.indices.tolist() == held_out_by_rule(whole.labels.tolist(), FRACTION)
    assert validation.describe(0) == f"tfds:cnnjax_tiny_three/rgb/train[{validation.indices[0]}]"
    # a set with its own validation split keeps it: nothing is held out of train
    own = sources("rgb_val", ("train", "validation"), data_dir)
    assert len(own["train"]) == sum(COUNTS["train"])
    assert own["validation"].split == "validation" and len(own["validation"]) == 4


def test_stratified_holdout_needs_two_records_per_class_and_a_fraction_in_0_1():
    labels = np.array([0, 0, 1, 1, 1, 2])
    with pytest.raises(DataError, match=r"^class c has 1 record in here: holding out"):
        stratified_holdout(labels, ["a", "b", "c"], 0.5, "here")
    kept, held = stratified_holdout(labels[:5], ["a", "b", "c"], 0.5, "here")
    assert np.bincount(labels[held], minlength=3).tolist() == [1, 2, 0]  # round(1.5) == 2
    assert sorted(kept.tolist() + held.tolist()) == list(range(5))
    for fraction in (0, 1):
        with pytest.raises(ValueError, match="validation_fraction must be in"):
            stratified_holdout(labels, ["a", "b", "c"], fraction, "here")


# --- In memory ------------------------------------------------------------------------------------


def test_memory_and_source_agree_pixel_for_pixel_and_are_cached(data_dir, tmp_path):
    splits = ("train", "validation", "test")
    for config, channels in (("rgb", 3), ("grey", 1)):
        name = f"cnnjax_tiny_three/{config}"
        for size in ((6, 6), SHAPE):
            streamed = sources(config, splits, data_dir, size)
            held = load_named(name, splits, size, "bilinear", FRACTION, data_dir)
            from_sources = tfds_data.tfds_sources_in_memory(streamed, cache=False)
            for split in splits:
                source, images = streamed[split], held[split]
                assert images.class_names == CLASSES
                assert images.images.shape == (len(source), *size, channels)
                assert images.labels.tolist() == source.labels.tolist()
                assert images.files == [source.describe(i) for i in range(len(source))]
                for i in range(len(source)):
                    np.testing.assert_array_equal(images.images[i], source.read(i)[0])
                np.testing.assert_array_equal(from_sources[split].images, images.images)
            if size == SHAPE:  # not resized: PIL's pixels are the generated ones
                for split in splits:
                    for image in held[split].images:
                        uid = int(image[0, 0, 0])
                        np.testing.assert_array_equal(image, expected_pixels(uid, channels))
    cached = sorted((tmp_path / "cache" / "folders").glob("*.npz"))
    assert len(cached) == 12  # rgb and grey, 2 sizes x 3 splits
    stamps = [f.stat().st_mtime_ns for f in cached]
    for config in ("rgb", "grey"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a cache file read as damaged would warn
            again = load_named(
                f"cnnjax_tiny_three/{config}", splits, (6, 6), "bilinear", 0.2, data_dir
            )
    assert [f.stat().st_mtime_ns for f in cached] == stamps  # read, not written again
    assert again["validation"].images.shape[-1] == 1
    again = load_named("cnnjax_tiny_three/rgb", splits, (6, 6), "bilinear", 0.2, data_dir)
    np.testing.assert_array_equal(again["validation"].images, held_rgb_validation(data_dir))
    other = load_named("cnnjax_tiny_three/rgb", splits, (6, 6), "bilinear", 0.4, data_dir)
    assert len(other["validation"]) != len(again["validation"])  # other indices, another key


def held_rgb_validation(data_dir) -> np.ndarray:
    source = sources("rgb", ("validation",), data_dir)["validation"]
    return np.stack([source.read(i)[0] for i in range(len(source))])


# --- Errors ---------------------------------------------------------------------------------------


def test_a_split_the_set_lacks_is_one_line_naming_its_splits(data_dir):
    for splits in (("holdout",), ("train", "holdout")):
        with pytest.raises(DataError) as e:
            sources("rgb", splits, data_dir)
        assert (
            str(e.value) == "TFDS 'cnnjax_tiny_three/rgb' has the splits train, test, not 'holdout'"
        )
    with pytest.raises(DataError, match=r"has the splits train, test, not 'extra'$"):
        tfds_data.TfdsSource("cnnjax_tiny_three/rgb", "train[:5]+extra", data_dir=data_dir)


def test_unknown_name_not_classification_and_offline_fail_fast_in_one_line(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        tfds_data.tfds_named_sources("no_such_set", ("train",), (8, 8), "nearest", 0.1, tmp_path)
    assert str(e.value).startswith("TFDS has no dataset 'no_such_set' (Dataset no_such_set not")
    assert "`tfds.list_builders()`" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError) as e:  # text, not images
        tfds_data.tfds_named_sources("imdb_reviews", ("train",), (8, 8), "nearest", 0.1, tmp_path)
    assert str(e.value) == (
        "TFDS 'imdb_reviews' is not an image-classification dataset "
        "(no image feature with a class label)"
    )
    # a real name, not prepared, download allowed, the server unreachable (the fixture says so)
    with pytest.raises(DataError) as e:
        load_named("cifar10", ("train", "validation"), (32, 32), "nearest", 0.1, tmp_path)
    assert str(e.value).startswith(
        "TFDS 'cifar10' is not prepared and its download server cannot be reached; prepare it"
    )
    with pytest.raises(DataError, match="^TFDS 'cifar10' is not prepared and downloading is off"):
        tfds_data.tfds_named_sources(
            "cifar10", ("test",), (32, 32), "nearest", 0.1, tmp_path, download=False
        )
    elapsed = time.perf_counter() - start
    print(f"four errors in {elapsed:.1f} s")  # seconds, not a hang in retries (not asserted)
    assert not any(tmp_path.iterdir())  # nothing downloaded, nothing prepared


def test_without_tensorflow_datasets_it_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # importing it raises ImportError
    with pytest.raises(DataError) as e:
        load_named("cifar10", ("train",), (32, 32), "nearest", 0.1, tmp_path)
    assert str(e.value) == (
        "TFDS 'cifar10': tensorflow-datasets is not installed (pip install 'cnnjax[tfds]')"
    )


def test_a_download_prepares_array_record_which_reads_by_index(monkeypatch, tmp_path):
    """The download path, on the tiny set (its generator needs no network): the server is said to
    answer, the set is prepared as array_record and read by index."""
    monkeypatch.setattr(tfds_data, "tfds_reachable", lambda *a, **k: True)
    got = sources("rgb", ("train", "validation", "test"), tmp_path, SHAPE)
    builder = tfds.builder("cnnjax_tiny_three/rgb", data_dir=tmp_path)
    assert builder.is_prepared() and builder.info.file_format.value == "array_record"
    assert [len(got[s]) for s in ("train", "validation", "test")] == [27 - sum(HELD), 5, 6]
    assert sorted(uids(got["test"])) == [
        100 + 10 * label + i for label in range(3) for i in range(2)
    ]


# --- Through the script a user runs ---------------------------------------------------------------


@pytest.mark.parametrize("config,channels", [("rgb", 3), ("grey", 1)])
def test_images_py_trains_on_a_tfds_set_by_name(config, channels, data_dir, tmp_path, capsys):
    from experiments import images

    out = tmp_path / "run"
    argv = [
        *("--data.dataset", f"tfds:cnnjax_tiny_three/{config}", "--data-dir", str(data_dir)),
        *("--image-size", "46", "--epochs", "1", "--batch-size", "4"),
        *("--train.eval_batch_size", "4", "--out", str(out)),
    ]
    result = images.main(argv)
    printed = capsys.readouterr().out
    assert "dense_1 (Dense)                (None, 3)" in printed
    assert (
        "conv2d (Conv2D)                (None, 44, 44, 32)        " + str(9 * channels * 32 + 32)
        in printed
    )
    # train holds 12 + 9 + 6 records; 2 + 2 + 1 of them are held out for validation
    assert f"train: {27 - sum(HELD)} images, validation: {sum(HELD)}, classes ant, bee, cat" in (
        printed
    )
    assert len(result.histories[0]) == 1
    saved = json.loads((out / "config.json").read_text())
    assert saved["class_names"] == CLASSES and saved["model"]["input_shape"] == [46, 46, channels]
