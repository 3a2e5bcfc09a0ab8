"""One epoch of the lecture's recipe on the real MNIST, through the experiment script."""

import json

from PIL import Image

from tests.conftest import shared_data_dir


def test_one_epoch_reaches_98_percent_and_writes_the_run(tmp_path, capsys):
    from experiments import mnist as experiment

    out = tmp_path / "run"
    test = experiment.main(["--epochs", "1", "--data-dir", str(shared_data_dir()), "--out", str(out)])
    assert test["accuracy"] >= 0.98
    printed = capsys.readouterr().out
    assert "Total params: 93,322" in printed and "Epoch 1/1" in printed and "Test accuracy" in printed
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["val_accuracy"] == test["accuracy"]
    assert Image.open(out / "history.png").size == (1000, 500)
    assert (out / "checkpoint" / "params").is_dir()
    assert (out / "history.csv").read_text().splitlines()[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy,seconds")
