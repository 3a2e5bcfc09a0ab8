"""The ablation runner: table and plot for every setting, resume after a kill, divergence reported."""

import json

import numpy as np
import pytest
from PIL import Image

from cnnjax import ablation, checkpoint
from cnnjax.augment import AugmentConfig

SIZE = 48  # the smallest square input the cats-vs-dogs convnet takes is 46


def tiny_cats_dogs(n=24, seed=0):
    """Dark images with a bright square (class 1) or without (class 0)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 80, (n, SIZE, SIZE, 3)).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.int32)
    images[labels == 1, 12:36, 12:36] = 230
    return images, labels


@pytest.fixture()
def data():
    train = tiny_cats_dogs(24)
    return {"train": train, "validation": tiny_cats_dogs(10, 1), "test": tiny_cats_dogs(10, 2)}


CONFIG = ablation.AblationConfig(seeds=2, epochs=2, batch_size=8, image_size=SIZE, eval_batch_size=10)


def test_parse_settings():
    assert ablation.parse_setting("zoom").augment == AugmentConfig(zoom_range=0.5)
    custom = ablation.parse_setting("mine:rotation_range=20,horizontal_flip=true,dropout=0.3")
    assert custom == ablation.Setting("mine", AugmentConfig(rotation_range=20, horizontal_flip=True), 0.3)
    with pytest.raises(ValueError, match="unknown setting"):
        ablation.parse_setting("colour")
    with pytest.raises(ValueError, match="field=value"):
        ablation.parse_setting("x:brightness=2")
    names = [s.name for s in ablation.default_settings()]
    assert names == ["none", "flip", "rotation", "shift", "shear", "zoom", "lecture", "lecture+dropout", "dropout"]


def test_resume_after_a_kill_and_skip_finished_settings(data, tmp_path, monkeypatch):
    settings = [ablation.Setting("none"), ablation.Setting("flip", AugmentConfig(horizontal_flip=True), 0.5)]
    real_save = checkpoint.save_checkpoint

    def killed_after_first_epoch_of_flip(path, state, model, meta=None):
        real_save(path, state, model, meta)
        if path.parent.name == "flip" and path.name == "latest":
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C right after epoch 1 was saved

    monkeypatch.setattr(checkpoint, "save_checkpoint", killed_after_first_epoch_of_flip)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation(settings, CONFIG, data, tmp_path, verbose=False)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    none_result = (tmp_path / "none" / "result.json").read_text()
    assert not (tmp_path / "flip" / "result.json").exists()
    first_epoch = checkpoint.read_json_item(tmp_path / "flip" / "latest", "meta")["histories"]
    assert [len(h) for h in first_epoch] == [1, 1]

    trained = []
    real_run = ablation.run_setting
    monkeypatch.setattr(ablation, "run_setting", lambda setting, *a, **k: trained.append(setting.name) or real_run(setting, *a, **k))
    results = ablation.run_ablation(settings, CONFIG, data, tmp_path, verbose=False)
    assert trained == ["flip"]  # "none" was finished: not redone
    assert (tmp_path / "none" / "result.json").read_text() == none_result
    flip = json.loads((tmp_path / "flip" / "result.json").read_text())
    assert [len(h) for h in flip["histories"]] == [2, 2]
    assert [h[0] for h in flip["histories"]] == [h[0] for h in first_epoch]  # epoch 1 kept, not retrained
    assert not (tmp_path / "flip" / "latest").exists() and (tmp_path / "flip" / "best").is_dir()
    assert [r["name"] for r in results] == ["none", "flip"]


def test_table_and_plot_hold_every_setting(data, tmp_path):
    settings = [ablation.Setting("none"), ablation.Setting("zoom", AugmentConfig(zoom_range=0.5))]
    ablation.run_ablation(settings, CONFIG, data, tmp_path, verbose=False)
    table = (tmp_path / "results.md").read_text()
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("setting,status,seeds,best_val_accuracy_mean")
    for name in ("none", "zoom"):
        assert f"| {name} | ok | 2 |" in table
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    result = json.loads((tmp_path / "zoom" / "result.json").read_text())
    assert len(result["seeds"]) == 2 and 0 <= result["seeds"][0]["test_accuracy"] <= 1


def test_a_diverging_setting_is_reported_not_fatal(data, tmp_path):
    config = ablation.AblationConfig(seeds=2, epochs=3, batch_size=8, image_size=SIZE, learning_rate=1e12)
    results = ablation.run_ablation([ablation.Setting("none")], config, data, tmp_path, verbose=False)
    assert results[0]["status"] == "diverged"
    assert "| none | diverged | 2 |" in (tmp_path / "results.md").read_text()


def test_a_failing_setting_is_recorded_and_the_rest_runs(data, tmp_path, monkeypatch):
    real_run = ablation.run_setting

    def broken(setting, *args, **kwargs):
        if setting.name == "bad":
            raise RuntimeError("out of memory")
        return real_run(setting, *args, **kwargs)

    monkeypatch.setattr(ablation, "run_setting", broken)
    config = ablation.AblationConfig(seeds=2, epochs=1, batch_size=8, image_size=SIZE)
    results = ablation.run_ablation([ablation.Setting("bad"), ablation.Setting("none")], config, data, tmp_path, verbose=False)
    assert results[0]["status"].startswith("failed: RuntimeError: out of memory")
    assert results[1]["status"] == "ok"


def test_table_can_be_rebuilt_from_disk_alone(data, tmp_path):
    config = ablation.AblationConfig(seeds=2, epochs=1, batch_size=8, image_size=SIZE)
    ablation.run_ablation([ablation.Setting("none")], config, data, tmp_path, verbose=False)
    (tmp_path / "results.md").unlink()
    (tmp_path / "curves.png").unlink()
    results = ablation.rebuild_report(tmp_path)
    assert [r["name"] for r in results] == ["none"] and (tmp_path / "curves.png").exists()
    assert "| none | ok | 2 |" in (tmp_path / "results.md").read_text()


def test_the_script_reports_an_interrupt_and_keeps_finished_settings(tmp_path, monkeypatch):
    from experiments import ablate_augmentation

    for split, n, seed in (("train", 16, 0), ("validation", 8, 1), ("test", 8, 2)):
        images, labels = tiny_cats_dogs(n, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = tmp_path / "data" / "cats_and_dogs_small" / split / ("cats", "dogs")[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    real_run = ablation.run_setting

    def ctrl_c_during_flip(setting, *args, **kwargs):
        if setting.name == "flip":
            raise KeyboardInterrupt
        return real_run(setting, *args, **kwargs)

    monkeypatch.setattr(ablation, "run_setting", ctrl_c_during_flip)
    out = tmp_path / "ablation"
    argv = ["--data-dir", str(tmp_path / "data"), "--settings", "none", "flip", "--seeds", "2", "--epochs", "1",
            "--batch-size", "8", "--image-size", str(SIZE), "--out", str(out)]
    with pytest.raises(SystemExit, match="interrupted: 1 finished settings .* resumes the rest"):
        ablate_augmentation.main(argv)
    assert "| none | ok | 2 |" in (out / "results.md").read_text() and not (out / "flip" / "result.json").exists()
