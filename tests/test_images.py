"""Your own images: folders of N >= 2 classes (experiments/images.py), the stratified validation
split of a train-only folder, the class-count warning, and the lecture's script refusing other
class counts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnnjax import checkpoint, config, data, models, train
from cnnjax.data import folders, splits
from tests.conftest import CATS_SIZE, REPO, write_cats_dogs_folder
from tests.test_runs import CATS_ARGS, assert_same_run, run_script

THREE = ("birds", "cats", "dogs")
ARGS = [arg for arg in CATS_ARGS if arg != "--dropout"]  # images.py is experiment 2 already


def write_train_only(root: Path, per_class: int = 10) -> Path:
    return write_cats_dogs_folder(root, {"train": per_class * len(THREE)}, classes=THREE)


def test_split_listing_is_stratified_disjoint_deterministic_and_stable(tmp_path):
    root = write_train_only(tmp_path / "data")
    listing = folders.list_folder(root / "train")
    train, held = splits.split_listing(listing, 0.2)
    assert splits.class_counts(held) == {name: 2 for name in THREE}
    assert splits.class_counts(train) == {name: 8 for name in THREE}
    assert not set(train.files) & set(held.files)
    assert sorted(train.files + held.files) == sorted(listing.files)
    # labels follow their files; Keras's order kept within each part
    by_file = dict(zip(listing.files, listing.labels))
    assert all(by_file[f] == c for f, c in zip(held.files, held.labels))
    assert held.files == [f for f in listing.files if f in set(held.files)]
    again = splits.split_listing(folders.list_folder(root / "train"), 0.2)
    assert (again[0].files, again[1].files) == (train.files, held.files)
    # a new image moves at most one other file between the parts
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "cats" / "new.png")
    _, held_after = splits.split_listing(folders.list_folder(root / "train"), 0.2)
    assert len(set(held.files) ^ (set(held_after.files) - {"cats/new.png"})) <= 1


def test_split_listing_needs_two_images_per_class(tmp_path):
    root = write_cats_dogs_folder(tmp_path / "data", {"train": 3}, classes=THREE)
    with pytest.raises(data.DataError, match="class birds has 1 image.*at least 2 per class"):
        splits.split_listing(folders.list_folder(root / "train"), 0.2)


def test_few_or_unbalanced_classes_warn_once_with_the_counts(tmp_path):
    few = folders.list_folder(write_train_only(tmp_path / "few", per_class=4) / "train")
    with pytest.warns(splits.ClassCountWarning) as caught:
        splits.warn_class_counts(few, "few/train")
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "few/train: fewer than 10 images in a class (birds 4, cats 4, dogs 4)"
    )
    balanced = folders.list_folder(write_train_only(tmp_path / "ok") / "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits.warn_class_counts(balanced, "ok/train")
    unbalanced = dataclasses.replace(
        balanced, files=balanced.files + [f"dogs/x{i}.png" for i in range(20)]
    )
    unbalanced.labels = balanced.labels + [2] * 20
    with pytest.warns(splits.ClassCountWarning, match=r"3\.0 times the smallest.*dogs 30"):
        splits.warn_class_counts(unbalanced, "ok/train")


def test_a_train_only_folder_validates_on_its_held_out_part(tmp_path):
    root = write_train_only(tmp_path / "data")
    spec = config.override(
        config.images(), {"data.data_dir": str(root), "data.image_size": CATS_SIZE}
    ).data
    loaded = data.load(spec, ("train", "validation"))
    assert loaded["train"].class_names == loaded["validation"].class_names == list(THREE)
    assert (len(loaded["train"]), len(loaded["validation"])) == (24, 6)
    assert not set(loaded["train"].files) & set(loaded["validation"].files)
    assert np.bincount(loaded["validation"].labels).tolist() == [2, 2, 2]
    with_test = data.load(spec, ("test",)) if (root / "test").is_dir() else None
    assert with_test is None  # nothing invented for a split that is not there
    with pytest.raises(data.DataError, match="has no test folder"):
        data.load(spec, ("train", "test"))


_HELD_OUT = """
import json, sys
from cnnjax import config, data
import jax
spec = config.override(config.images(), {"data.data_dir": sys.argv[1], "data.image_size": 48}).data
held = data.load(spec, ("validation",))["validation"]
print(json.dumps({"devices": jax.device_count(), "files": held.files}))
"""


def test_the_split_is_the_same_on_one_and_two_devices(tmp_path):
    root = write_train_only(tmp_path / "data")
    seen = []
    for devices in (1, 2):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
        }
        done = subprocess.run(
            [sys.executable, "-c", _HELD_OUT, str(root)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        seen.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert [s["devices"] for s in seen] == [1, 2]
    assert seen[0]["files"] == seen[1]["files"] and len(seen[0]["files"]) == 6


def test_the_convnet_has_a_softmax_head_for_more_than_two_classes():
    three = models.from_config("cats_dogs", CATS_SIZE, num_classes=3)
    two = models.from_config("cats_dogs", CATS_SIZE)
    assert isinstance(three.head, models.Softmax) and three.head.num_classes == 3
    assert isinstance(two.head, models.Sigmoid)
    params = models.init_params(three, jax.random.PRNGKey(0))
    logits = three.apply({"params": params}, jnp.zeros((2, CATS_SIZE, CATS_SIZE, 3)))
    assert logits.shape == (2, 3)
    assert "dense_1 (Dense)                (None, 3)" in models.summary(three)
    assert models.build_model(models.model_config(three)) == three
    # a checkpoint written before num_classes existed rebuilds the lecture's two-class model
    old = {k: v for k, v in models.model_config(two).items() if k != "num_classes"}
    assert models.build_model(old) == two
    grey = models.from_config("cats_dogs", CATS_SIZE, num_classes=4, channels=1)
    assert grey.input_shape == (CATS_SIZE, CATS_SIZE, 1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        models.from_config("cats_dogs", CATS_SIZE, num_classes=1)


def test_dataset_names_are_checked():
    recipe = config.images()
    assert config.check(config.override(recipe, {"data.dataset": "tfds:cifar10"}))
    for bad, message in (
        ("tfds:", "data.dataset must be one of mnist, cats_dogs, folder or tfds:NAME"),
        ("photos", "data.dataset must be one of"),
        ("mnist", "model.name 'cats_dogs' does not fit data.dataset 'mnist'"),
    ):
        with pytest.raises(config.ConfigError, match=message):
            config.check(config.override(recipe, {"data.dataset": bad}))
    with pytest.raises(config.ConfigError, match=r"data.validation_fraction must be in \(0, 1\)"):
        config.check(config.override(recipe, {"data.validation_fraction": 1.0}))


def test_the_lecture_script_refuses_three_classes_and_points_to_images_py(tmp_path):
    root = write_cats_dogs_folder(tmp_path / "data", classes=THREE)
    out = tmp_path / "run"
    argv = [*ARGS, "--data-dir", str(root), "--out", str(out)]
    done = run_script(["experiments/catsdogs.py", *argv])
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the data folder has 3 classes (birds, cats, dogs)")
    assert "experiments/images.py" in last and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.slow  # a reference run, a killed one and its resume
def test_three_classes_train_resume_after_a_kill_and_load_with_their_names(tmp_path):
    root = write_train_only(tmp_path / "data")
    reference, out = tmp_path / "reference", tmp_path / "run"
    argv = [*ARGS, "--data-dir", str(root)]
    done = run_script(["experiments/images.py", *argv, "--out", str(reference)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dense_1 (Dense)                (None, 3)" in done.stdout
    assert "Output: softmax over 3 units, categorical cross-entropy" in done.stdout
    assert "classes birds, cats, dogs" in done.stdout
    assert "validation: 6 images, 0.2 of" in done.stdout + done.stderr
    assert "warning: " in done.stderr and "fewer than 10 images in a class" in done.stderr
    argv += ["--out", str(out)]
    killed = run_script(["-m", "tests._killed_run", "images", "mid-epoch", "2", "--", *argv])
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_script(["experiments/images.py", *argv, "--resume"])
    assert resumed.returncode == 0 and "Resuming" in resumed.stdout, resumed.stderr[-2000:]
    assert_same_run(out, reference)
    model, params, description = checkpoint.load_model(out, "best")
    assert isinstance(model.head, models.Softmax) and model.head.num_classes == 3
    assert checkpoint.class_names(model, description) == list(THREE)
    images = jnp.zeros((2, CATS_SIZE, CATS_SIZE, 3))
    probabilities = models.predict(model, params, images)
    np.testing.assert_allclose(np.asarray(probabilities).sum(axis=1), 1.0, rtol=1e-5)


def test_a_folder_of_one_class_is_refused_in_one_line(tmp_path):
    root = write_cats_dogs_folder(
        tmp_path / "data", {"train": 4, "validation": 2}, classes=("cats",)
    )
    cfg = config.override(
        config.images(), {"data.data_dir": str(root), "data.image_size": CATS_SIZE}
    )
    datasets = data.load(cfg.data, ("train", "validation"))
    with pytest.raises(data.DataError, match=r"^the data folder has 1 class \(cats\): a classif"):
        train.model_for(cfg, datasets)
