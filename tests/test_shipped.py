"""The trained models in checkpoints/, through the scripts a user runs on
them, and the lecture notebook.

Each shipped model's card states its accuracy; these tests evaluate the shipped weights again
and must find the card's figures, to the fourth decimal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cnnjax import checkpoint
from tests.conftest import REPO, real_cats_dogs_dir

SHIPPED = {
    "mnist": REPO / "checkpoints" / "mnist",
    "catsdogs-exp2": REPO / "checkpoints" / "catsdogs-exp2",
}
MAX_BYTES = 8 * 2**20


def run_script(name: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "experiments" / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )


def card_accuracy(name: str, split: str) -> tuple[float, float]:
    """(float32, float16) accuracy on `split` from the model card's
    `| split | float32 | float16 |` row."""
    card = (SHIPPED[name] / "MODEL_CARD.md").read_text()
    row = re.search(rf"^\| {split} \| ([0-9.]+) \| ([0-9.]+) \|", card, re.M)
    assert row, f"MODEL_CARD.md of {name} has no | {split} | float32 | float16 | row"
    return float(row[1]), float(row[2])


def evaluated_accuracy(done: subprocess.CompletedProcess) -> float:
    """The accuracy of evaluate.py's first line, "... on SPLIT (N images): loss L - accuracy A"."""
    assert done.returncode == 0, done.stderr
    return float(re.search(r"images\): loss [0-9.]+ - accuracy ([0-9.]+)$", done.stdout, re.M)[1])


@pytest.mark.parametrize(
    "name, epochs, classes",
    [("mnist", 5, [str(d) for d in range(10)]), ("catsdogs-exp2", 100, ["cats", "dogs"])],
)
def test_a_shipped_model_is_small_16_bit_sealed_and_carries_its_recipe(name, epochs, classes):
    folder = SHIPPED[name]
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < MAX_BYTES
    model, params, description = checkpoint.load_model(folder)
    step_dir = Path(description["path"])
    assert checkpoint.damage(step_dir) is None and description["dtype"] == "float16"
    assert (
        description["class_names"] == classes and description["config"]["train"]["epochs"] == epochs
    )
    assert (
        description["config"]["data"]["data_dir"] is None
        and description["config"]["run"]["out"] is None
    )
    # No folder of the machine it was trained or exported on, in any file
    # (orbax's markers named one).
    assert not any(b"successful to /" in f.read_bytes() for f in folder.rglob("*") if f.is_file())
    # Stored in 16 bits, computed in 32: every weight is a float16 value, read back as float32.
    for leaf in (np.asarray(p) for p in jax.tree.leaves(params)):
        assert leaf.dtype == np.float32
        np.testing.assert_array_equal(leaf.astype(np.float16).astype(np.float32), leaf)
    history = json.loads(
        (folder / "history.json").read_text()
    )  # the whole run; the checkpoint's ends at its epoch
    assert len(history) == epochs and history[-1]["epoch"] == epochs
    assert [
        {k: row[k] for k in ("epoch", "val_loss")} for row in history[: description["epoch"]]
    ] == [{k: row[k] for k in ("epoch", "val_loss")} for row in description["histories"][0]]
    best = min(history, key=lambda row: row["val_loss"])
    assert (
        description["epoch"] == best["epoch"]
    )  # the best epoch by validation loss, as a run's best is chosen
    float32, float16 = card_accuracy(name, "test")
    assert abs(float32 - float16) <= 0.002  # 16 bits cost at most 0.2 points


@pytest.mark.slow  # the real MNIST test set
def test_the_shipped_mnist_model_scores_its_card_on_the_test_set(mnist_dir, tmp_path):
    shipped = ("--checkpoint", "checkpoints/mnist", "--data-dir", str(mnist_dir))
    done = run_script("evaluate.py", *shipped, "--out", str(tmp_path))
    accuracy = evaluated_accuracy(done)
    assert (tmp_path / "confusion.png").is_file()  # --out given: nothing beside the shipped model
    assert not (SHIPPED["mnist"] / "inspect").exists()
    assert accuracy == card_accuracy("mnist", "test")[1] and accuracy >= 0.990


def real_cats() -> Path:
    root = real_cats_dogs_dir()
    if root is None:  # the photos are not part of the repository; CI points CNNJAX_DATA_DIR at them
        pytest.skip(
            "set CNNJAX_DATA_DIR to a folder holding cats_and_dogs_small/ "
            "to test the shipped cats-vs-dogs model"
        )
    return root


@pytest.mark.parametrize("split", ["validation", "test"])
def test_the_shipped_exp2_model_scores_its_card_on_the_real_photos(split, tmp_path):
    accuracy = evaluated_accuracy(  # the default checkpoint
        run_script(
            "evaluate.py", "--data-dir", str(real_cats()), "--split", split, "--out", str(tmp_path)
        )
    )
    assert accuracy == card_accuracy("catsdogs-exp2", split)[1] and accuracy >= 0.80


def test_predict_classifies_any_image_file_and_names_each_bad_one(tmp_path):
    photo = sorted((real_cats() / "test" / "cats").glob("*.jpg"))[0]
    with Image.open(photo) as img:
        rgb = img.convert("RGB")
    files = {"photo.jpg": photo}
    rgb.save(files.setdefault("same.png", tmp_path / "same.png"))
    rgb.convert("RGBA").save(
        files.setdefault("alpha.png", tmp_path / "alpha.png")
    )  # opaque alpha: the same pixels
    rgb.resize((1600, 1200), Image.BICUBIC).save(
        files.setdefault("large.jpg", tmp_path / "large.jpg"), quality=95
    )
    rgb.convert("L").save(files.setdefault("gray.png", tmp_path / "gray.png"))
    rgb.convert("P").save(files.setdefault("palette.png", tmp_path / "palette.png"))
    (tmp_path / "notes.jpg").write_text("not a picture")
    (tmp_path / "cut.jpg").write_bytes(photo.read_bytes()[:300])
    paths = [str(p) for p in files.values()]
    (tmp_path / "folder.jpg").mkdir()
    done = run_script(
        "predict.py",
        paths[0],
        str(tmp_path / "notes.jpg"),
        *paths[1:],
        str(tmp_path / "cut.jpg"),
        str(tmp_path / "missing.png"),
        str(tmp_path / "folder.jpg"),
    )
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert [line.split(":")[1].strip() for line in errors] == [
        str(tmp_path / n) for n in ("notes.jpg", "cut.jpg", "missing.png", "folder.jpg")
    ]
    assert errors[-1].endswith("folder.jpg: a folder, not an image; skipped")
    assert (
        all(line.startswith("error: ") and "skipped" in line for line in errors)
        and "Traceback" not in done.stderr
    )
    printed = dict(
        re.fullmatch(r"(.+): (cats|dogs) \(([0-9.]+)\)", line).group(1, 3)
        for line in done.stdout.splitlines()
    )
    assert list(printed) == paths
    assert all(f"{p}: cats" in done.stdout for p in paths[:5])  # a clear cat however it is stored
    assert (
        printed[paths[0]] == printed[paths[1]] == printed[paths[2]]
    )  # JPEG decoded once: its PNG copies are the same pixels


def test_activations_reads_the_shipped_model_by_default(tmp_path):
    photo = sorted((real_cats() / "test" / "cats").glob("*.jpg"))[0]
    out = tmp_path / "pictures"
    done = run_script(
        "activations.py",
        "--image",
        str(photo),
        "--out",
        str(out),
        "--heatmap",
        "--filters",
        "--num-filters",
        "2",
        "--steps",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert "the model predicts cats" in done.stdout
    names = sorted(p.name for p in out.iterdir())
    assert {"input.png", "heatmap.png", "filters_conv2d_3.png", "activations_1_conv2d.png"} <= set(
        names
    ), names
    assert not (
        SHIPPED["catsdogs-exp2"] / "inspect"
    ).exists()  # --out given: nothing written beside the shipped model


@pytest.mark.slow  # trains one MNIST epoch
def test_the_lecture_notebook_runs_top_to_bottom(tmp_path, mnist_dir):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "experiments" / "lecture.ipynb", as_version=4)
    figures = tmp_path / "figures"
    env = {
        "CNNJAX_NOTEBOOK_FIGURES": str(figures),
        "CNNJAX_DATA_DIR": os.environ.get("CNNJAX_DATA_DIR") or str(mnist_dir),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(
            notebook,
            timeout=900,
            kernel_name="python3",
            resources={"metadata": {"path": str(REPO / "experiments")}},
        ).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    # Joined as written: the kernel may send one print's pieces in several stream
    # messages when the machine is busy.
    printed = "".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "[[3. 2. 2.]\n [4. 2. 4.]\n [5. 1. 4.]]" in printed  # the lecture's worked convolution
    assert "[[4. 4.]\n [5. 4.]]" in printed  # and its max pooling
    assert "Total params: 93,322" in printed and "Total params: 3,453,121" in printed
    assert float(re.search(r"after one epoch: val_accuracy ([0-9.]+)", printed)[1]) >= 0.98
    shipped_mnist = float(
        re.search(r"shipped MNIST model, epoch [0-9]+: test accuracy ([0-9.]+)", printed)[1]
    )
    assert shipped_mnist == card_accuracy("mnist", "test")[1]
    assert "100 epochs; last:" in printed and re.search(r"Grad-CAM for (cats|dogs)", printed)
    photo = re.search(r"the photo: (\S+\.jpg)", printed)
    # A real cat (CI's data): the notebook decodes it as predict.py does, so both give the same
    # probability.
    if photo:
        said = re.search(r"the model predicts (\w+) \(p = ([0-9.]+)", printed)
        assert (
            run_script("predict.py", photo[1]).stdout.strip().endswith(f": {said[1]} ({said[2]})")
        )
    assert {
        "augmentation.png",
        "history.png",
        "channel.png",
        "heatmap.png",
        "filters_conv2d_3.png",
    } <= {p.name for p in figures.iterdir()}
