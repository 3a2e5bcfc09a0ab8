"""What a Keras or flax user expects of the command line and the training options: flags that
forgive (did-you-mean, --config.path=v, yes/no for every switch), --help with only what a script can
use, resume from the run's own config.json and extend it, one seed numbering, learning-rate
schedules, ReduceLROnPlateau and EarlyStopping, each resumed exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import optax
import pytest

from cnnjax import checkpoint, config, flags, optim
from cnnjax.augment import AugmentConfig
from experiments import catsdogs, evaluate
from experiments import mnist as mnist_script
from tests.conftest import CATS_SIZE, write_cats_dogs_folder
from tests.tensorboard_events import read_events

TINY = ["--batch-size", "8", "--train.eval_batch_size", "8", "--image-size", str(CATS_SIZE)]


def help_of(module) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return " ".join(out.getvalue().split())  # argparse wraps lines where the terminal is narrow


def without_seconds(path) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k != "seconds"} for row in json.loads(path.read_text())
    ]


def test_help_lists_only_the_fields_a_script_can_use_with_their_allowed_values():
    mnist_help, cats_help = help_of(mnist_script), help_of(catsdogs)
    assert (
        "--augment." not in mnist_help
        and "--model." not in mnist_help
        and "--data.image_size" not in mnist_help
    )
    assert (
        "{rmsprop, adam}" in mnist_help
        and "{constant, cosine, exponential}" in mnist_help
        and "short: --epochs" in mnist_help
    )
    assert (
        "{nearest, constant, reflect, wrap}" in cats_help
        and "{nearest, bilinear, bicubic, hamming, box, lanczos}" in cats_help
    )
    assert "experiment 2: True" in cats_help and "--data.dataset" not in cats_help


def test_a_field_added_to_augment_config_is_a_flag_by_itself(monkeypatch):
    """The README's "where to change what": a new AugmentConfig field needs no other edit
    to be a flag, listed by --help, overridden, checked and saved in config.json (its
    help text is its metadata)."""

    @dataclasses.dataclass(frozen=True)
    class Extended(AugmentConfig):
        brightness_range: float = dataclasses.field(
            default=0.0, metadata={"help": "brightness ~ U[1-b, 1+b]"}
        )
        channel_shift: float = 0.0  # no metadata at all

    monkeypatch.setitem(config.SECTION_CLASSES, "augment", Extended)
    monkeypatch.setattr(config, "_PATHS", frozenset(config.paths()))
    recipe = dataclasses.replace(config.catsdogs(1), augment=Extended())
    parser = flags.ArgumentParser(prog="x")
    flags.add_flags(parser, recipe)
    assert "--augment.brightness_range VALUE brightness ~ U[1-b, 1+b] [default: 0.0]" in " ".join(
        parser.format_help().split()
    )
    args = parser.parse_args(["--augment.brightness_range", "0.2", "--augment.channel_shift", "3"])
    cfg = config.check(config.override(recipe, flags.overrides_from_args(args)))
    assert (cfg.augment.brightness_range, cfg.augment.channel_shift) == (0.2, 3.0)
    assert config.from_dict(config.to_dict(cfg)).augment == cfg.augment


def test_short_and_long_switches_alike_and_flax_style_paths():
    on = config.flatten(catsdogs.resolve_config(["--augment.horizontal_flip"])[0])
    for argv in (
        ["--horizontal-flip"],
        ["--horizontal-flip", "yes"],
        ["--augment.horizontal_flip", "yes"],
        ["--config.augment.horizontal_flip=true"],
    ):
        assert config.flatten(catsdogs.resolve_config(argv)[0]) == on, argv
    off = catsdogs.resolve_config(["--dropout", "--horizontal-flip", "no"])[0]
    assert (
        off == catsdogs.resolve_config(["--dropout", "--no-horizontal-flip"])[0]
        and not off.augment.horizontal_flip
    )
    assert (
        mnist_script.resolve_config(
            ["--config.train.epochs=2", "--config.optim.learning_rate", "0.01"]
        )[0].train.epochs
        == 2
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_cats_dogs_folder(tmp_path_factory.mktemp("options") / "data")


def test_resume_alone_reads_the_runs_config_and_more_epochs_extend_it(
    folder, tmp_path, monkeypatch, capsys
):
    """A 2-epoch run, then `--resume --out RUN --epochs 4` alone (no data folder, no
    recipe flags): exactly the history of an uninterrupted 4-epoch run. Fewer epochs, or
    another recipe, are refused."""
    monkeypatch.delenv("CNNJAX_DATA_DIR", raising=False)
    reference, out = tmp_path / "reference", tmp_path / "run"
    catsdogs.main(
        ["--dropout", "--epochs", "4", *TINY, "--data-dir", str(folder), "--out", str(reference)]
    )
    catsdogs.main(
        ["--dropout", "--epochs", "2", *TINY, "--data-dir", str(folder), "--out", str(out)]
    )
    capsys.readouterr()
    catsdogs.main(["--resume", "--out", str(out), "--epochs", "4"])
    printed = capsys.readouterr().out
    assert "after epoch 2" in printed and "Epoch 3/4" in printed and "Epoch 1/4" not in printed
    assert without_seconds(out / "history.json") == without_seconds(reference / "history.json")
    assert json.loads((out / "config.json").read_text())["config"]["train"]["epochs"] == 4
    catsdogs.main(["--resume", "--out", str(out)])  # finished: nothing more to do
    assert "Epoch" not in capsys.readouterr().out
    for typed, message in (
        (["--epochs", "3"], "train.epochs: 4 -> 3"),
        (["--learning-rate", "0.01"], "optim.learning_rate: 0.001 -> 0.01"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            catsdogs.main(["--resume", "--out", str(out), *typed])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_one_seed_numbering_in_lines_files_tensorboard_and_evaluate(folder, tmp_path, capsys):
    out = tmp_path / "run"
    catsdogs.main(
        [
            "--epochs",
            "1",
            *TINY,
            "--seed",
            "5",
            "--seeds",
            "2",
            "--data-dir",
            str(folder),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert (
        "[seed 5] Epoch 1/1" in printed
        and "[seed 6] Epoch 1/1" in printed
        and "[seed 0]" not in printed
    )
    assert "[seed 6] Final val_accuracy" in printed
    assert {p.name for p in out.glob("history-seed*.png")} == {
        "history-seed5.png",
        "history-seed6.png",
    }
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["seed5", "seed6"]
    assert [row["seed"] for row in json.loads((out / "history.json").read_text())] == [5, 6]
    metrics = evaluate.main(
        [
            "--checkpoint",
            str(out),
            "--seed",
            "6",
            "--data-dir",
            str(folder),
            "--split",
            "validation",
        ]
    )
    assert metrics["loss"] == pytest.approx(
        json.loads((out / "history.json").read_text())[1]["val_loss"], rel=1e-5
    )
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(out), "--seed", "3", "--data-dir", str(folder)])
    assert "holds seed(s) 5, 6; seed 3 is not one of them" in capsys.readouterr().err


def test_the_schedules_are_optax_s():
    base = config.OptimConfig(learning_rate=0.1)
    cosine, ours = (
        optax.cosine_decay_schedule(0.1, 30),
        config.OptimConfig(learning_rate=0.1, schedule="cosine"),
    )
    for step in (0, 7, 29, 30):
        assert optim.current_rate(ours, 10, 3, step) == pytest.approx(float(cosine(step)))
    exponential = config.OptimConfig(learning_rate=0.1, schedule="exponential", decay_rate=0.5)
    assert [optim.current_rate(exponential, 10, 3, s) for s in (0, 10, 25)] == pytest.approx(
        [0.1, 0.05, 0.1 * 0.5**2.5]
    )
    warm = config.OptimConfig(learning_rate=0.1, warmup_epochs=1)
    assert [optim.current_rate(warm, 10, 3, s) for s in (0, 5, 10, 25)] == pytest.approx(
        [0.0, 0.05, 0.1, 0.1]
    )
    assert (
        optim.current_rate(base, 10, 3, 17) == 0.1 and optim.schedule(base, 10, 3) is None
    )  # the lecture: the bare optimizer


def test_reduce_on_plateau_is_keras_s_rule():
    cfg = config.OptimConfig(plateau_factor=0.5, plateau_patience=2)
    assert optim.plateau_scale(cfg, [1.0, 0.9, 0.9, 0.95]) == 0.5  # 2 epochs without improvement
    assert (
        optim.plateau_scale(cfg, [1.0, 0.9, 0.95, 0.85, 0.86, 0.9, 0.9, 0.91]) == 0.25
    )  # waits reset after each cut
    assert (
        optim.plateau_scale(cfg, [1.0, 0.99995, 0.9999]) == 0.5
    )  # an improvement below min_delta 1e-4 is none


def swapped_folder(root):
    """Training images whose bright square means dog, validation the other way round: the more the
    model learns, the higher its validation loss (a plateau from epoch 1, an early stop)."""
    write_cats_dogs_folder(root, {"train": 16}, size=CATS_SIZE)
    write_cats_dogs_folder(
        root, {"validation": 8}, size=CATS_SIZE, classes=("dogs", "cats"), seed=1
    )
    return root


def test_reduce_on_plateau_lowers_the_rate_the_tensorboard_scalar_shows_it(tmp_path):
    out = tmp_path / "run"
    catsdogs.main(
        [
            "--epochs",
            "4",
            *TINY,
            "--optim.plateau_factor",
            "0.5",
            "--optim.plateau_patience",
            "1",
            "--data-dir",
            str(swapped_folder(tmp_path / "data")),
            "--out",
            str(out),
        ]
    )
    history = json.loads((out / "history.json").read_text())
    expected = [
        optim.plateau_scale(
            config.OptimConfig(plateau_factor=0.5, plateau_patience=1),
            [r["val_loss"] for r in history[:e]],
        )
        for e in range(1, 5)
    ]
    assert expected[-1] < 1  # the validation loss did rise
    rates = [v for _, v in read_events(out / "tensorboard")["scalars"]["epoch/learning_rate"]]
    assert rates == pytest.approx([1e-3 * s for s in expected])


def test_early_stopping_stops_and_keeps_the_best_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    catsdogs.main(
        [
            "--epochs",
            "6",
            *TINY,
            "--train.early_stopping",
            "2",
            "--data-dir",
            str(swapped_folder(tmp_path / "data")),
            "--out",
            str(out),
        ]
    )
    history = json.loads((out / "history.json").read_text())
    losses = [row["val_loss"] for row in history]
    best = int(np.argmin(losses)) + 1
    assert (
        len(history) == best + 2 < 6 and history[-1]["stopped"] is True
    )  # two epochs without improvement
    printed = capsys.readouterr().out
    assert (
        f"Epoch {best + 2}/6" in printed
        and "stopped early (val_loss has not improved for 2 epochs)" in printed
    )
    assert checkpoint.find(out, "best").name == str(best)
    catsdogs.main(["--resume", "--out", str(out)])  # a stopped run stays stopped
    assert "Epoch" not in capsys.readouterr().out
