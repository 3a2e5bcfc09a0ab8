"""cnnjax.data.load, the one way in: both inputs give the same dataset, MNIST's splits and input,
the errors a spec can cause (before anything is decoded or downloaded), and check_classes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pytest

from cnnjax.data import DataError, Images, Stream, check_classes, decode_file, folders, inputs, load
from tests.conftest import write_cats_dogs_folder, write_mnist_folder


@dataclass
class Spec:
    """The attributes load reads (cnnjax.config.DataConfig has them too)."""

    dataset: str = "cats_dogs"
    data_dir: str | None = None
    image_size: int = 12
    interpolation: str = "bilinear"
    input: str = "memory"


def forbid(monkeypatch, module, name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} called although the spec was refused first")

    monkeypatch.setattr(module, name, boom)


def test_memory_and_stream_give_the_same_dataset(tmp_path, caplog):
    pytest.importorskip(
        "tensorflow", reason="the tfds extra: pip install -e '.[dev,tfds]' (CI installs it)"
    )
    root = write_cats_dogs_folder(tmp_path / "data", {"train": 6, "validation": 4}, size=20)
    caplog.set_level(logging.INFO, logger="cnnjax")
    memory = load(Spec(data_dir=str(root)), ("train", "validation"))
    streamed = load(Spec(data_dir=str(root), input="stream"), ("train", "validation"))
    inputs_logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("input: ")]
    assert inputs_logged == [
        "input: memory (--input memory; 0.0 MiB of uint8 images)",
        "input: stream (--input stream; 0.0 MiB of uint8 images)",
    ]
    assert list(memory) == list(streamed) == ["train", "validation"]
    for split in ("train", "validation"):
        held, read = memory[split], streamed[split]
        assert isinstance(held, Images) and isinstance(read, Stream)
        assert len(held) == len(read) == {"train": 6, "validation": 4}[split]
        assert held.class_names == read.class_names == ["cats", "dogs"]
        assert held.labels.dtype == read.labels.dtype == np.int32
        np.testing.assert_array_equal(held.labels, read.labels)
        assert held.image_shape == read.image_shape == (12, 12, 3)
        for i in range(len(held)):
            assert held.image(i).dtype == read.image(i).dtype == np.uint8
            np.testing.assert_array_equal(held.image(i), read.image(i))
        # The spec's size and filter reached both: the pixels are decode_file's at 12x12, bilinear.
        np.testing.assert_array_equal(
            held.image(0), decode_file(root / split / held.files[0], (12, 12), "bilinear")
        )


def test_auto_logs_its_choice_and_why(tmp_path, caplog, monkeypatch):
    root = write_cats_dogs_folder(tmp_path / "data", {"train": 4, "validation": 2}, size=20)
    caplog.set_level(logging.INFO, logger="cnnjax")
    monkeypatch.setattr(inputs, "tensorflow_available", lambda: True)
    monkeypatch.setattr(inputs, "memory_budget", lambda: (6 * 12 * 12 * 3, "test budget"))
    assert isinstance(
        load(Spec(data_dir=str(root), input="auto"), ("train", "validation"))["train"], Images
    )
    monkeypatch.setattr(inputs, "memory_budget", lambda: (6 * 12 * 12 * 3 - 1, "test budget"))
    forbid(monkeypatch, inputs, "import_tensorflow")  # stops the load once the choice is made
    with pytest.raises(AssertionError, match="import_tensorflow called"):
        load(Spec(data_dir=str(root), input="auto"), ("train", "validation"))
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("input: ")] == [
        "input: memory (auto: 0.0 MiB of uint8 images fit the 0.0 MiB budget, test budget)",
        "input: stream (auto: 0.0 MiB of uint8 images exceed the 0.0 MiB budget, test budget)",
    ]


def test_mnist_comes_in_memory_with_its_two_splits(tmp_path, caplog, monkeypatch):
    folder = write_mnist_folder(tmp_path / "mnist", n_train=12, n_test=5)
    caplog.set_level(logging.INFO, logger="cnnjax")
    data = load(
        Spec(dataset="mnist", data_dir=str(folder), image_size=28, input="auto"), ("train", "test")
    )
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("input: ")] == [
        "input: memory (auto: MNIST's 55 MB of uint8 images always fit)"
    ]
    for split, n in (("train", 12), ("test", 5)):
        assert (
            isinstance(data[split], Images)
            and len(data[split]) == n
            and data[split].image_shape == (28, 28, 1)
        )
        assert (
            data[split].class_names == [str(d) for d in range(10)]
            and data[split].labels.dtype == np.int32
        )
    forbid(monkeypatch, inputs, "load_mnist")  # refused before a load that may download
    with pytest.raises(DataError, match=r"^MNIST has the splits train and test, not 'validation'$"):
        load(Spec(dataset="mnist", data_dir=str(folder)), ("train", "validation"))
    with pytest.raises(
        DataError, match=r"--input stream is for image folders .* MNIST .* always fits in memory"
    ):
        load(Spec(dataset="mnist", data_dir=str(folder), input="stream"), ("train", "test"))


def test_a_data_dir_that_does_not_exist(tmp_path, monkeypatch):
    forbid(monkeypatch, inputs, "load_mnist")
    for dataset in ("mnist", "cats_dogs"):
        with pytest.raises(
            DataError,
            match=(
                rf"^--data-dir {tmp_path}/nowhere does not exist; "
                r"pass the folder that holds the data$"
            ),
        ):
            load(Spec(dataset=dataset, data_dir=str(tmp_path / "nowhere")), ("train", "test"))


@pytest.mark.parametrize("input", ["memory", "stream"])
def test_splits_with_different_classes_are_refused_before_decoding(tmp_path, monkeypatch, input):
    root = write_cats_dogs_folder(tmp_path / "data", {"train": 4})
    write_cats_dogs_folder(tmp_path / "data", {"validation": 3}, classes=("cats", "dogs", "birds"))
    forbid(monkeypatch, folders, "decode_file")
    forbid(monkeypatch, inputs, "import_tensorflow")
    expected = (
        r"different classes: .*train has \['cats', 'dogs'\] "
        r"but .*validation has \['birds', 'cats', 'dogs'\]"
    )
    with pytest.raises(DataError, match=expected):
        load(Spec(data_dir=str(root), input=input), ("train", "validation"))


def test_tfds_splits_are_the_lectures(monkeypatch):
    monkeypatch.delenv("CNNJAX_DATA_DIR", raising=False)
    with pytest.raises(
        DataError,
        match=r"^TFDS cats_vs_dogs has the splits train, validation, test, not 'holdout'$",
    ):
        load(Spec(), ("train", "holdout"))  # refused before TFDS is opened


def test_check_classes():
    two = {
        "train": Images(
            np.zeros((3, 2, 2, 3), np.uint8), np.array([0, 1, 1], np.int32), ["cats", "dogs"]
        )
    }
    check_classes(two, 2, "the data folder")
    with pytest.raises(
        DataError,
        match=r"^the data folder has 2 classes \(cats, dogs\) but the model needs exactly 10; "
        r"give a folder with 10 class sub-folders$",
    ):
        check_classes(two, 10, "the data folder")
    wrong = {
        "test": Images(
            np.zeros((2, 2, 2, 3), np.uint8), np.array([0, 2], np.int32), ["cats", "dogs"]
        )
    }
    with pytest.raises(
        DataError, match=r"^the test folder: labels run from 0 to 2, outside 0\.\.1$"
    ):
        check_classes({**two, **wrong}, 2, "the test folder")
