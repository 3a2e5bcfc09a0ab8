"""One epoch of the lecture's MNIST recipe on the real MNIST, through the experiment script."""

import json

import numpy as np
import pytest

from cnnjax import checkpoint, plots
from tests.conftest import png_pixels


@pytest.mark.slow
def test_one_epoch_reaches_98_percent_and_writes_the_run(tmp_path, capsys, mnist_dir):
    from experiments import evaluate
    from experiments import mnist as experiment

    out = tmp_path / "run"
    result = experiment.main(["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(out)])
    last = result.histories[0][-1]
    assert last["val_accuracy"] >= 0.98
    printed = capsys.readouterr().out
    assert (
        "Total params: 93,322" in printed
        and "Epoch 1/1" in printed
        and f"Test accuracy: {last['val_accuracy']:.4f}" in printed
    )
    history = json.loads((out / "history.json").read_text())
    assert history == [{"seed": 0, **last}]
    # The figure shows this history, pixel for pixel.
    np.testing.assert_array_equal(
        png_pixels(out / "history.png"),
        png_pixels(plots.plot_history(history, tmp_path / "expected.png")),
    )
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[0] == "seed,epoch,loss,accuracy,val_loss,val_accuracy,seconds"
    assert [float(v) for v in lines[1].split(",")] == [history[0][k] for k in lines[0].split(",")]
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["optim"] == {
        "name": "rmsprop",
        "learning_rate": 1e-3,
        "epsilon": 1e-7,
        "rho": 0.9,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "schedule": "constant",
        "warmup_epochs": 0,
        "decay_rate": 0.9,
        "plateau_factor": 0.0,
        "plateau_patience": 5,
    }
    assert saved["devices"]["mesh"] == {"seed": 1, "data": 1}
    # The checkpoint holds the trained model: evaluated again on the test split, it
    # scores what the run reported.
    assert checkpoint.find(out, "best") == out / "checkpoints" / "1"
    metrics = evaluate.main(
        ["--checkpoint", str(out), "--data-dir", str(mnist_dir), "--batch-size", "500"]
    )  # the run's eval batch
    assert metrics["accuracy"] == last["val_accuracy"] and metrics["loss"] == pytest.approx(
        last["val_loss"], rel=1e-5
    )
