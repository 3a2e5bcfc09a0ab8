"""The "Accuracy & Loss" figure, read back from the matplotlib objects and the PNG it writes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

from cnnjax import files, plots
from tests.conftest import png_pixels


def history(n: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "loss": 1.0 / e,
            "accuracy": 1 - 0.5 / e,
            "val_loss": 1.2 / e,
            "val_accuracy": 0.9 - 0.3 / e,
        }
        for e in range(1, n + 1)
    ]


def rendered(fig) -> np.ndarray:
    """The figure's pixels as Agg draws them at its own size (dpi 100:
    1000x500 for the history figure)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def assert_png_shows(path, rows: list[dict]) -> None:
    """The PNG file is, pixel for pixel, the figure history_figure(rows) draws (whose
    content check_panels reads back)."""
    pixels = png_pixels(path)
    assert pixels.shape == (500, 1000, 4)
    np.testing.assert_array_equal(pixels, rendered(plots.history_figure(rows)))


def lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def visible_xticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if lo <= t <= hi]


def check_panels(fig, rows: list[dict]) -> None:
    """Both panels hold exactly the history's values: training as blue dots, validation
    as a red line with markers."""
    epochs = [row["epoch"] for row in rows]
    accuracy, loss = fig.axes
    assert fig.get_suptitle() == "Accuracy & Loss"
    for ax, metric, name in ((accuracy, "accuracy", "Accuracy"), (loss, "loss", "Loss")):
        assert ax.get_title() == f"Training and Validation {name}"
        drawn = lines(ax)
        assert set(drawn) == {f"Training {name}", f"Validation {name}"}
        train, val = drawn[f"Training {name}"], drawn[f"Validation {name}"]
        expected = [math.nan if row.get(metric) is None else row[metric] for row in rows]
        np.testing.assert_array_equal(train.get_xdata(), epochs)
        np.testing.assert_array_equal(train.get_ydata(), expected)
        expected = [
            math.nan if row.get(f"val_{metric}") is None else row[f"val_{metric}"] for row in rows
        ]
        np.testing.assert_array_equal(val.get_xdata(), epochs)
        np.testing.assert_array_equal(val.get_ydata(), expected)
        # training: dots, no line; validation: a line whose points also show
        assert train.get_linestyle() == "None" and train.get_marker() == "o"
        assert to_rgba(train.get_color()) == to_rgba("b")
        assert val.get_linestyle() == "-" and to_rgba(val.get_color()) == to_rgba("r")
        assert val.get_marker() not in (None, "", " ", "None", "none") and val.get_markersize() >= 3
        assert {t.get_text() for t in ax.get_legend().get_texts()} == set(drawn)


def test_one_epoch_shows_its_points_and_one_integer_tick():
    rows = history(1)
    fig = plots.history_figure(rows)
    check_panels(fig, rows)
    fig.canvas.draw()  # the ticks as they are rendered
    for ax in fig.axes:
        assert visible_xticks(ax) == [1.0]
        lo, hi = ax.get_xlim()
        assert lo <= 0.5 and hi >= 1.5, "the lone epoch needs room on both sides"


def test_five_epochs_tick_every_epoch():
    rows = history(5)
    fig = plots.history_figure(rows)
    check_panels(fig, rows)
    fig.canvas.draw()
    for ax in fig.axes:
        assert visible_xticks(ax) == [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("n", [2, 12, 100])
def test_x_ticks_are_whole_epochs(n):
    fig = plots.history_figure(history(n))
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = visible_xticks(ax)
        assert len(ticks) >= 2
        assert all(t == int(t) for t in ticks), ticks


def test_none_and_nan_are_gaps(tmp_path):
    rows = history(4)
    rows[1]["val_loss"] = None  # strict JSON's null for a diverged epoch
    rows[2]["loss"] = float("nan")
    rows[3]["val_accuracy"] = float("inf")
    del rows[0]["val_accuracy"]  # a row without the metric at all
    fig = plots.history_figure(rows)
    expected = [dict(row) for row in rows]
    expected[2]["loss"] = None
    expected[3]["val_accuracy"] = None
    check_panels(fig, expected)
    path = plots.save_figure(fig, tmp_path / "history.png")
    assert_png_shows(path, rows)
    # The gaps are in the picture too: the figure of the rows without the bad
    # values draws the same pixels.
    assert_png_shows(
        path, [{k: v for k, v in row.items() if v is not None and np.isfinite(v)} for row in rows]
    )


def test_all_none_draws_empty_panels(tmp_path):
    rows = [{"epoch": 1, "loss": None, "accuracy": None, "val_loss": None, "val_accuracy": None}]
    path = plots.plot_history(rows, tmp_path / "history.png")
    check_panels(plots.history_figure(rows), rows)
    assert_png_shows(path, rows)


def test_training_only_history_has_no_validation_line():
    fig = plots.history_figure(
        [{"epoch": 1, "loss": 0.5, "accuracy": 0.8}, {"epoch": 2, "loss": 0.4, "accuracy": 0.9}]
    )
    assert [set(lines(ax)) for ax in fig.axes] == [{"Training Accuracy"}, {"Training Loss"}]


def test_plot_history_writes_a_png_of_the_figure_size_through_atomic_path(tmp_path, monkeypatch):
    used = []
    real = files.atomic_path

    def recording(path):
        used.append(path)
        return real(path)

    monkeypatch.setattr(files, "atomic_path", recording)
    path = plots.plot_history(history(3), tmp_path / "run" / "history.png")
    assert path == tmp_path / "run" / "history.png"
    assert used == [path]
    assert_png_shows(path, history(3))  # figsize (10, 5) at dpi 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["history.png"], (
        "no temporary left behind"
    )


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "history.png"
    path.write_bytes(b"old")
    fig = plots.history_figure(history(2))

    def broken(target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"half a png")
        raise OSError("disk full")

    fig.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        plots.save_figure(fig, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["history.png"]


@pytest.mark.parametrize("n, cols", [(16, 8), (8, 8), (5, 2)])
def test_filter_pattern_labels_never_run_into_an_image_or_the_title(tmp_path, monkeypatch, n, cols):
    saved = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=100: saved.append(fig) or path)
    images = np.random.default_rng(0).random((n, 150, 150, 3))
    plots.plot_filter_patterns(
        images,
        tmp_path / "f.png",
        "conv2d_3: the inputs filters respond to most (40 ascent steps)",
        [f"filter {i}" for i in range(n)],
        cols=cols,
    )
    fig = saved[0]
    rendered(fig)
    renderer = fig.canvas.get_renderer()
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == n
    for ax in shown:
        label = ax.title.get_window_extent(renderer)
        assert ax.title.get_text() and not label.overlaps(fig._suptitle.get_window_extent(renderer))
        for other in shown:
            assert not label.overlaps(other.get_window_extent(renderer)), (
                ax.title.get_text(),
                other.title.get_text(),
            )
