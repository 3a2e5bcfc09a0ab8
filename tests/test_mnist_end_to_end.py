"""One epoch of the lecture's MNIST recipe on the real MNIST, through the experiment script."""

import json

import pytest
from PIL import Image

from tests.conftest import shared_data_dir


@pytest.mark.slow
def test_one_epoch_reaches_98_percent_and_writes_the_run(tmp_path, capsys):
    from experiments import mnist as experiment

    out = tmp_path / "run"
    result = experiment.main(["--epochs", "1", "--data-dir", str(shared_data_dir()), "--out", str(out)])
    last = result.histories[0][-1]
    assert last["val_accuracy"] >= 0.98
    printed = capsys.readouterr().out
    assert "Total params: 93,322" in printed and "Epoch 1/1" in printed and f"Test accuracy: {last['val_accuracy']:.4f}" in printed
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["val_accuracy"] == last["val_accuracy"] and history[0]["seed"] == 0
    assert Image.open(out / "history.png").size == (1000, 500)
    assert (out / "checkpoints" / "1" / "params").is_dir()
    assert (out / "history.csv").read_text().splitlines()[0].startswith("seed,epoch,loss,accuracy,val_loss,val_accuracy,seconds")
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["optim"] == {"name": "rmsprop", "learning_rate": 1e-3, "epsilon": 1e-7, "rho": 0.9, "beta_1": 0.9,
                                        "beta_2": 0.999}
    assert saved["devices"]["mesh"] == {"seed": 1, "data": 1}
