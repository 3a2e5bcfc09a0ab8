"""The ablation: settings as overrides, resume and retry, the table recomputed from
the runs, best checkpoints."""

import csv
import dataclasses
import json
import types

import numpy as np
import pytest
from scipy import stats

from cnnjax import ablation, checkpoint, config, data, paired, plots, report, runs, train
from cnnjax import history as historylib
from cnnjax.augment import AugmentConfig
from tests.conftest import CATS_SIZE, TINY_ABLATION_FLAGS, tiny_cats_dogs, write_cats_dogs_folder

BASE = dataclasses.replace(
    config.override(
        config.catsdogs(1),
        {
            "data.image_size": CATS_SIZE,
            "train.epochs": 2,
            "train.batch_size": 8,
            "train.eval_batch_size": 10,
            "train.seeds": 2,
        },
    ),
    name="ablation",
)


CLASSES = ["cats", "dogs"]


@pytest.fixture()
def splits():
    return {
        "train": data.Images(*tiny_cats_dogs(24), CLASSES),
        "validation": data.Images(*tiny_cats_dogs(10, 1), CLASSES),
    }


@pytest.fixture()
def test_set():
    return data.Images(*tiny_cats_dogs(10, 2), CLASSES)


def test_settings_are_overrides_of_the_recipe():
    assert ablation.parse_setting("zoom") == ablation.Setting.of(
        "zoom", {"augment.zoom_range": 0.5}
    )
    custom = ablation.parse_setting("mine:rotation_range=20,horizontal_flip=true,dropout=0.3")
    assert custom == ablation.Setting.of(
        "mine",
        {"augment.rotation_range": 20.0, "augment.horizontal_flip": True, "model.dropout": 0.3},
    )
    assert (
        ablation.setting_config(BASE, ablation.parse_setting("lecture")).augment
        == AugmentConfig.LECTURE
    )
    by_path = ablation.parse_setting("sharp:augment.interpolation=nearest")
    assert ablation.setting_config(BASE, by_path).augment.interpolation == "nearest"
    assert (
        ablation.setting_config(BASE, by_path).data.interpolation == "nearest"
    )  # untouched: a section of its own
    with pytest.raises(config.ConfigError, match="unknown setting"):
        ablation.parse_setting("colour")
    with pytest.raises(
        config.ConfigError,
        match="interpolation.*several sections.*augment.interpolation or data.interpolation",
    ):
        ablation.parse_setting(
            "x:interpolation=bilinear"
        )  # two sections have it: the path is required
    with pytest.raises(config.ConfigError, match="brightness"):
        ablation.parse_setting("x:brightness=2")
    with pytest.raises(config.ConfigError, match="fill_mode"):
        ablation.parse_setting("x:fill_mode=mirror")
    names = [s.name for s in ablation.default_settings()]
    assert names == [
        "none",
        "flip",
        "rotation",
        "shift",
        "shear",
        "zoom",
        "lecture",
        "lecture+dropout",
        "dropout",
    ]


@pytest.mark.parametrize("mode", ["vmap", "sequential"])
def test_table_is_the_runs_recomputed_and_best_checkpoints_hold_the_best_epoch(
    splits, test_set, tmp_path, mode
):
    settings = [
        ablation.Setting.of("none"),
        ablation.Setting.of("zoom", {"augment.zoom_range": 0.5}),
    ]
    results = ablation.run_ablation(settings, BASE, splits, test_set, tmp_path, mode, verbose=False)
    assert [r["name"] for r in results] == ["none", "zoom"] and all(
        r["mode"] == mode for r in results
    )
    # Every mean ± std cell of results.md, recomputed from the result files.
    table = (tmp_path / "results.md").read_text().splitlines()
    for result, line in zip(results, table[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [result["name"], "ok", "2"]
        for (key, _), cell in zip(report.COLUMNS, cells[3:]):
            values = [s[key] for s in result["seeds"]]
            digits = ".1f" if key == "best_epoch" else ".3f"
            assert cell == f"{np.mean(values):{digits}} ± {np.std(values):{digits}}"
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3
    # The paired table: zoom minus none, seed by seed, as scipy's paired t interval.
    paired_rows = table[
        table.index(
            "| setting | " + " | ".join(f"{label} - none" for _, label, _ in paired.METRICS) + " |"
        )
        + 2 :
    ]
    cells = [c.strip() for c in paired_rows[0].strip("|").split("|")]
    assert len(paired_rows) == 1 and cells[0] == "zoom"
    with open(tmp_path / "results.csv", newline="") as f:
        csv_rows = {row["setting"]: row for row in csv.DictReader(f)}
    for (key, _, _), cell in zip(paired.METRICS, cells[1:]):
        zoom, none = ([s[key] for s in r["seeds"]] for r in results[::-1])
        diff = np.subtract(zoom, none)
        low, high = stats.ttest_rel(zoom, none).confidence_interval(0.95)
        digits = "+.4f" if key.endswith("loss") else "+.3f"
        assert cell.startswith(f"{np.mean(diff):{digits}} [{low:{digits}}, {high:{digits}}] ")
        np.testing.assert_allclose(float(csv_rows["zoom"][f"{key}_diff_low"]), low, rtol=1e-9)
        assert csv_rows["none"][f"{key}_diff"] == ""  # the reference has no difference
    assert (tmp_path / "differences.png").stat().st_size > 0
    for result in results:
        folder = tmp_path / result["name"]
        for k, (seed, history) in enumerate(zip(result["seeds"], result["histories"])):
            losses = [row["val_loss"] for row in history]
            assert seed["best_epoch"] == 1 + int(np.argmin(losses))
            # The seed's best checkpoint holds exactly the best epoch's parameters: evaluating
            # it gives that epoch's metrics.
            run_folder = folder / "seeds" if mode == "vmap" else folder / f"seed{k}"
            model, params, description = checkpoint.load_model(run_folder, "best", seed=k)
            assert description["epoch"] == seed["best_epoch"]
            metrics = train.evaluate(model, params, splits["validation"], 10)
            best_row = history[seed["best_epoch"] - 1]
            np.testing.assert_allclose(metrics["loss"], best_row["val_loss"], rtol=1e-5)
            assert metrics["accuracy"] == best_row["val_accuracy"]
            test_metrics = train.evaluate(model, params, test_set, 10)
            assert seed["test_accuracy"] == test_metrics["accuracy"]


def test_curves_plot_the_mean_and_std_over_seeds(splits, tmp_path):
    results = ablation.run_ablation(
        [ablation.Setting.of("none")],
        dataclasses.replace(BASE, train=dataclasses.replace(BASE.train, epochs=1)),
        splits,
        None,
        tmp_path,
        "vmap",
        verbose=False,
    )
    x, mean, std = plots.curve_stats(results[0]["histories"], "val_loss")
    values = [h[0]["val_loss"] for h in results[0]["histories"]]
    assert (
        x.tolist() == [1]
        and mean[0] == pytest.approx(np.mean(values))
        and std[0] == pytest.approx(np.std(values))
    )
    assert (
        results[0]["seeds"][0]["test_accuracy"] is None
    )  # no test split: null (NaN) in result.json, not invented
    assert "| n/a |" in (tmp_path / "results.md").read_text()


def test_resume_after_an_interrupt_and_skip_finished_settings(
    splits, test_set, tmp_path, monkeypatch
):
    settings = [
        ablation.Setting.of("none"),
        ablation.Setting.of("flip", {"augment.horizontal_flip": True, "model.dropout": 0.5}),
    ]
    real_write = historylib.write

    def interrupted_after_first_epoch_of_flip(workdir, seeds, histories, *grid):
        real_write(workdir, seeds, histories, *grid)
        if workdir.parent.name == "flip" and histories[0]:
            raise KeyboardInterrupt  # Ctrl-C right after epoch 1 was saved

    monkeypatch.setattr(historylib, "write", interrupted_after_first_epoch_of_flip)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation(settings, BASE, splits, test_set, tmp_path, "vmap", verbose=False)
    monkeypatch.setattr(historylib, "write", real_write)
    none_result = (tmp_path / "none" / "result.json").read_text()
    assert not (tmp_path / "flip" / "result.json").exists()
    first_epoch = historylib.read(tmp_path / "flip" / "seeds")
    assert [len(h) for h in first_epoch.values()] == [1, 1]

    trained = []
    real_run = ablation.run_setting
    monkeypatch.setattr(
        ablation,
        "run_setting",
        lambda setting, *a, **k: trained.append(setting.name) or real_run(setting, *a, **k),
    )
    results = ablation.run_ablation(
        settings, BASE, splits, test_set, tmp_path, "vmap", verbose=False
    )
    assert trained == ["flip"]  # "none" was finished: not redone
    assert (tmp_path / "none" / "result.json").read_text() == none_result
    flip = json.loads((tmp_path / "flip" / "result.json").read_text())
    assert [len(h) for h in flip["histories"]] == [2, 2]
    assert [h[0] for h in flip["histories"]] == [
        h[0] for h in first_epoch.values()
    ]  # epoch 1 kept, not retrained
    assert [r["name"] for r in results] == ["none", "flip"]


def test_a_diverging_setting_is_reported_and_keeps_finite_checkpoints(splits, tmp_path):
    base = config.override(BASE, {"optim.learning_rate": 1e12, "train.epochs": 3})
    results = ablation.run_ablation(
        [ablation.Setting.of("none")], base, splits, None, tmp_path, "vmap", verbose=False
    )
    assert results[0]["status"] == "diverged"
    assert "| none | diverged | 2 |" in (tmp_path / "results.md").read_text()
    row = next(csv.DictReader((tmp_path / "results.csv").open()))
    assert (
        row["status"] == "diverged" and row["best_val_accuracy_mean"] == ""
    )  # NaN as an empty cell, like history.csv
    history = json.loads((tmp_path / "none" / "seeds" / "history.json").read_text())
    assert all(
        row["loss"] is None for row in history if row.get("diverged")
    )  # strict JSON: NaN as null
    # Both seeds diverged in epoch 1: no finite state beyond the initial one, so nothing was
    # saved (never a NaN checkpoint).
    assert list((tmp_path / "none" / "seeds" / "checkpoints").iterdir()) == []


def test_wall_time_is_the_longest_seed_when_one_diverged_early(splits, tmp_path, monkeypatch):
    """The seeds of one run share each epoch's seconds; a diverged seed's history stops early."""

    def row(epoch, seconds, diverged=False):
        return {
            "epoch": epoch,
            "loss": 0.5,
            "accuracy": 0.5,
            "val_loss": 0.6,
            "val_accuracy": 0.5,
            "seconds": seconds,
            **({"diverged": True} if diverged else {}),
        }

    histories = [[row(1, 2.0, diverged=True)], [row(1, 2.0), row(2, 3.0), row(3, 4.0)]]
    monkeypatch.setattr(
        train,
        "train_and_evaluate",
        lambda *a, **k: types.SimpleNamespace(histories=histories, seeds=[0, 1], best=[None, None]),
    )
    record = ablation.run_setting(
        ablation.Setting.of("none"), BASE, splits, None, tmp_path / "none", "vmap", verbose=False
    )
    assert record["wall_seconds"] == 9.0 and record["status"] == "partly diverged"


def test_a_failed_setting_is_retried_and_the_script_exits_non_zero(tmp_path, monkeypatch, capsys):
    from experiments import ablate_augmentation

    data = write_cats_dogs_folder(tmp_path / "data")
    real_run = ablation.run_setting
    broken = {"on": True}

    def sometimes_broken(setting, *args, **kwargs):
        if setting.name == "flip" and broken["on"]:
            raise RuntimeError("out of memory")
        return real_run(setting, *args, **kwargs)

    monkeypatch.setattr(ablation, "run_setting", sometimes_broken)
    out = tmp_path / "ablation"
    argv = [
        "--data-dir",
        str(data),
        "--settings",
        "none",
        "flip",
        *TINY_ABLATION_FLAGS,
        "--out",
        str(out),
        "--seed-mode",
        "vmap",
    ]
    with pytest.raises(SystemExit) as exit_info:
        ablate_augmentation.main(argv)
    assert exit_info.value.code == runs.EXIT_FAILED
    assert "1 setting(s) failed: flip" in capsys.readouterr().err
    assert "failed: RuntimeError: out of memory" in (out / "results.md").read_text()
    broken["on"] = False
    results = ablate_augmentation.main(argv)  # the failed setting is tried again, and now works
    assert [r["status"] for r in results] == ["ok", "ok"] and not (
        out / "flip" / "error.json"
    ).exists()


def test_the_script_reports_an_interrupt_and_keeps_finished_settings(tmp_path, monkeypatch, capsys):
    from experiments import ablate_augmentation

    data = write_cats_dogs_folder(tmp_path / "data")
    real_run = ablation.run_setting

    def ctrl_c_during_flip(setting, *args, **kwargs):
        if setting.name == "flip":
            raise KeyboardInterrupt
        return real_run(setting, *args, **kwargs)

    monkeypatch.setattr(ablation, "run_setting", ctrl_c_during_flip)
    out = tmp_path / "ablation"
    argv = [
        "--data-dir",
        str(data),
        "--settings",
        "none",
        "flip",
        *TINY_ABLATION_FLAGS,
        "--out",
        str(out),
        "--seed-mode",
        "sequential",  # a setting at a time: one finishes before the other is interrupted
    ]
    with pytest.raises(SystemExit) as exit_info:
        ablate_augmentation.main(argv)
    assert exit_info.value.code == runs.EXIT_INTERRUPTED
    assert "interrupted: 1 finished setting(s)" in capsys.readouterr().err
    assert (
        "| none | ok | 2 |" in (out / "results.md").read_text()
        and not (out / "flip" / "result.json").exists()
    )

    # Its finished settings are kept for the same recipe only: anything else is
    # refused before a thing is written.
    before = sorted((p.relative_to(out).as_posix(), p.stat().st_mtime_ns) for p in out.rglob("*"))
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_run").mkdir()
    (tmp_path / "a_run" / "config.json").write_text("{}")
    for change, message in [
        (["--epochs", "2"], "holds an ablation of another recipe (train.epochs: 1 -> 2)"),
        (["--settings", "none:dropout=0.5"], "setting none: {} -> {'model.dropout': 0.5}"),
        (["--out", str(tmp_path / "a_file")], "is a file, not a folder"),
        (["--out", str(tmp_path / "a_run")], "holds something other than an ablation"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            ablate_augmentation.main([*argv, *change])
        err = capsys.readouterr().err.strip()
        assert (
            exit_info.value.code == runs.EXIT_BAD_INPUT
            and err.startswith("error: ")
            and "\n" not in err
            and message in err
        ), err
    assert (
        sorted((p.relative_to(out).as_posix(), p.stat().st_mtime_ns) for p in out.rglob("*"))
        == before
    )
