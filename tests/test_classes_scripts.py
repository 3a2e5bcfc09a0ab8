"""What a classifier's user looks at, for any number of classes: evaluate.py's per-class lines and
confusion matrix, predict.py's three most probable classes, activations.py's Grad-CAM of a class
named on the command line. A 3-class model of random parameters (saved as save_model saves one)
on a tiny 3-class image folder; the lecture's two classes keep their output."""

from __future__ import annotations

import re
import signal

import numpy as np
import pytest

from cnnjax import checkpoint, interrupts, models, plots, run_folder
from cnnjax import inspect as look
from experiments import activations, evaluate, predict
from tests.conftest import CATS_SIZE, numpy_params, png_pixels, write_cats_dogs_folder

CLASSES = ["birds", "cats", "dogs"]
SHAPE = (CATS_SIZE, CATS_SIZE, 3)
# image i goes to CLASSES[i % 3]: 4 birds, 3 cats, 3 dogs
TEST_IMAGES = 10
CLASS_LINE = re.compile(r"  (\w+): (\d+)/(\d+) right - (?:accuracy ([0-9.]+)|no images)")


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """(model, params, checkpoint folder, data folder): a 3-class model of random parameters and a
    folder holding only test/, 10 images (evaluating on test needs no train/)."""
    root = tmp_path_factory.mktemp("three")
    model = models.CatsDogsConvNet(num_classes=3, input_shape=SHAPE)
    params = numpy_params(model, seed=1)
    ckpt = checkpoint.save_model(root / "run", model, params, class_names=CLASSES)
    data = write_cats_dogs_folder(root / "data", {"test": TEST_IMAGES}, classes=tuple(CLASSES))
    return model, params, ckpt, data


def model_classes(model, params, paths) -> np.ndarray:
    """(N, classes) probabilities of image files, as predict.py decodes them (nearest)."""
    images = np.stack([look.load_image(p, SHAPE[:2]) for p in paths])
    return np.asarray(models.predict(model, params, images))


# --- Counting -----------------------------------------------------------------------------------


def test_the_confusion_matrix_counts_true_classes_in_rows_and_predictions_in_columns():
    labels = [0, 0, 1, 2, 2, 2, 0]
    predicted = [0, 1, 1, 2, 0, 2, 0]
    matrix = look.confusion_matrix(labels, predicted, 4)
    np.testing.assert_array_equal(matrix, [[2, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert matrix.dtype == np.int64 and matrix.sum() == len(labels)
    assert evaluate.class_lines(matrix, ["a", "b", "c", "d"]) == [
        "  a: 2/3 right - accuracy 0.6667",
        "  b: 1/1 right - accuracy 1.0000",
        "  c: 2/3 right - accuracy 0.6667",
        "  d: 0/0 right - no images",
    ]
    assert look.confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match=r"0\.\.2"):
        look.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="two"):
        look.confusion_matrix([0, 1], [0], 3)


def test_the_confusion_figure_writes_each_count_in_its_cell_and_names_the_classes():
    matrix = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]])
    fig = plots.confusion_figure(matrix, CLASSES, "a title")
    (ax, _colorbar) = fig.axes
    cells = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }
    assert cells == {(r, c): str(matrix[r, c]) for r in range(3) for c in range(3)}
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        plots.confusion_figure(matrix[:2], CLASSES)


# --- evaluate.py --------------------------------------------------------------------------------


def test_evaluate_prints_each_class_and_draws_the_confusion_matrix(three_classes, capsys):
    model, params, ckpt, data = three_classes
    metrics = evaluate.main(["--checkpoint", str(ckpt.parent.parent), "--data-dir", str(data)])
    out = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(out) if " on test (" in line)
    assert re.fullmatch(
        rf".*/0 \(epoch 0\) on test \({TEST_IMAGES} images\): loss [0-9.]+ - accuracy [0-9.]+",
        out[first],
    )
    rows = [CLASS_LINE.fullmatch(line) for line in out[first + 1 : first + 4]]
    assert all(rows), out
    assert [r[1] for r in rows] == CLASSES and [int(r[3]) for r in rows] == [4, 3, 3]
    right = [int(r[2]) for r in rows]
    assert sum(right) / TEST_IMAGES == pytest.approx(metrics["accuracy"])
    # The default: beside activations.py's figures, in the run folder.
    figure = ckpt.parent.parent / "inspect" / "confusion.png"
    assert out[first + 4] == f"confusion matrix: {figure}"
    # The counts of the figure: the model's own predictions of every test image, drawn here.
    files = sorted((data / "test").glob("*/*.png"))
    labels = [CLASSES.index(p.parent.name) for p in files]
    predicted = model_classes(model, params, files).argmax(axis=1)
    matrix = look.confusion_matrix(labels, predicted, 3)
    assert matrix.sum() == TEST_IMAGES and np.diag(matrix).tolist() == right
    drawn = plots.plot_confusion(
        matrix, CLASSES, ckpt.parent / "expected.png", f"run, epoch 0: test ({TEST_IMAGES} images)"
    )
    np.testing.assert_array_equal(png_pixels(figure), png_pixels(drawn))


def test_evaluate_on_the_lectures_two_classes_and_out(tmp_path, cats_folder, capsys):
    model = models.CatsDogsConvNet(input_shape=SHAPE)
    ckpt = checkpoint.save_model(tmp_path / "run", model, numpy_params(model), ["cats", "dogs"])
    out = tmp_path / "figures"
    argv = ["--checkpoint", str(ckpt), "--data-dir", str(cats_folder), "--out", str(out)]
    metrics = evaluate.main([*argv, "--split", "validation"])
    printed = capsys.readouterr().out.splitlines()
    rows = [m for line in printed if (m := CLASS_LINE.fullmatch(line))]
    assert [(r[1], int(r[3])) for r in rows] == [("cats", 4), ("dogs", 4)]
    assert (int(rows[0][2]) + int(rows[1][2])) / 8 == pytest.approx(metrics["accuracy"])
    assert printed[-1] == f"confusion matrix: {out / 'confusion.png'}"
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png"]  # no temporaries
    assert not (tmp_path / "run" / "inspect").exists()


# --- predict.py ---------------------------------------------------------------------------------


def test_ranked_classes_best_first_and_one_for_two_classes():
    assert predict.ranked_classes(np.array([0.3, 0.7])) == [1]
    assert predict.ranked_classes(np.array([0.5, 0.5])) == [0]  # np.argmax's choice on a tie
    assert predict.ranked_classes(np.array([0.1, 0.2, 0.3, 0.15, 0.25])) == [2, 4, 1]
    assert predict.ranked_classes(np.array([0.25, 0.25, 0.5])) == [2, 0, 1]


def test_predict_says_the_three_most_probable_classes(three_classes, capsys):
    model, params, ckpt, data = three_classes
    paths = [data / "test" / "birds" / "0.png", data / "test" / "dogs" / "2.png"]
    said = predict.main([*map(str, paths), "--checkpoint", str(ckpt)])
    lines = capsys.readouterr().out.strip().splitlines()
    expected = model_classes(model, params, paths)
    assert len(lines) == len(paths)
    for path, line, probabilities, (_, best, p_best) in zip(
        paths, lines, expected, said, strict=True
    ):
        entry = r"(\w+) \(([0-9.]+)\)"
        match = re.fullmatch(rf"{re.escape(str(path))}: {entry}, {entry}, {entry}", line)
        assert match, line
        names, shown = list(match.groups()[::2]), [float(p) for p in match.groups()[1::2]]
        assert sorted(names) == CLASSES and shown == sorted(shown, reverse=True)
        assert sum(shown) <= 1 + 1.5e-3  # three values each rounded to 3 decimals
        np.testing.assert_allclose(
            shown, [probabilities[CLASSES.index(n)] for n in names], atol=5e-4
        )
        assert (best, p_best) == (names[0], pytest.approx(shown[0], abs=5e-4))


def test_predict_keeps_one_class_for_two(tmp_path, cats_folder, capsys):
    model = models.CatsDogsConvNet(input_shape=SHAPE)
    ckpt = checkpoint.save_model(tmp_path / "run", model, numpy_params(model), ["cats", "dogs"])
    image = cats_folder / "test" / "cats" / "0.png"
    predict.main([str(image), "--checkpoint", str(ckpt)])
    assert re.fullmatch(
        rf"{re.escape(str(image))}: (cats|dogs) \([0-9.]{{5}}\)\n", capsys.readouterr().out
    )


# --- activations.py --heatmap --class -------------------------------------------------------------


def test_grad_cam_of_a_class_named_on_the_command_line(three_classes, tmp_path, capsys):
    model, params, ckpt, data = three_classes
    image_file = data / "test" / "birds" / "0.png"
    image = look.load_image(image_file, SHAPE[:2])
    predicted = look.grad_cam(model, params, image).predicted
    other = (predicted + 1) % 3  # not the default: the name must be what picks it
    argv = ["--checkpoint", str(ckpt), "--image", str(image_file), "--heatmap", "--layers", "1"]
    out = tmp_path / "out"
    activations.main([*argv, "--class", CLASSES[other], "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"Grad-CAM for class {CLASSES[other]} (p = " in printed
    assert f"the model predicts {CLASSES[predicted]}" in printed
    cam = look.grad_cam(model, params, image, other)
    title = (
        f"Grad-CAM at {look.last_conv_layer(model)}: {CLASSES[other]} (p = {cam.probability:.2f})"
    )
    drawn = plots.plot_heatmap(
        look.overlay_heatmap(image, cam.heatmap), cam.heatmap, tmp_path / "heatmap.png", title
    )
    np.testing.assert_array_equal(png_pixels(out / "heatmap.png"), png_pixels(drawn))
    # the same class by name and by index: no conflict
    agreed = tmp_path / "agreed"
    activations.main(
        [*argv, "--class", CLASSES[other], "--class-index", str(other), "--out", str(agreed)]
    )
    assert f"Grad-CAM for class {CLASSES[other]} (p = " in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["unknown name", "name and index disagree"])
def test_a_class_the_model_lacks_is_one_error_line(three_classes, tmp_path, capsys, problem):
    _, _, ckpt, data = three_classes
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--image", str(data / "test" / "cats" / "1.png")]
    given = {
        "unknown name": ["--class", "horses"],
        "name and index disagree": ["--class", "dogs", "--class-index", "0"],
    }[problem]
    with pytest.raises(SystemExit) as exit_info:
        activations.main([*argv, "--heatmap", *given, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --class ") and "\n" not in err
    expected = {
        "unknown name": "--class horses: not a class of this model (its classes: birds, cats, "
        "dogs)",
        "name and index disagree": "--class dogs is class 2 but --class-index is 0",
    }[problem]
    assert expected in err
    assert not out.exists()  # nothing written


# --- Where the figures go, and a stop while writing them ----------------------------------------


def test_figures_go_into_the_run_folders_inspect(tmp_path):
    assert run_folder.inspect_folder(tmp_path / "run" / "checkpoints" / "3") == (
        tmp_path / "run" / "inspect"
    )
    assert run_folder.inspect_folder(tmp_path / "exported") == tmp_path / "exported" / "inspect"


def test_a_stop_while_evaluate_writes_is_an_interrupt_not_an_exit():
    """Before its figure evaluate.py hands Ctrl-C back as KeyboardInterrupt (its temporary file
    removed, runs.exits' line); handlers not of interrupts.install are left alone."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        interrupts.writing()
        assert {s: signal.getsignal(s) for s in saved} == saved  # pytest's own: kept
        interrupts.install()
        interrupts.writing()
        # else the signal below would end pytest itself (os._exit)
        assert signal.getsignal(signal.SIGTERM) is not interrupts._stopped_while_starting
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
