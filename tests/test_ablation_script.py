"""experiments/ablate_augmentation.py as a user runs it: the paired report it prints, the flags it
records and checks on a rerun, and exit 4 when a setting diverges."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_ABLATION_FLAGS, write_cats_dogs_folder

REPO = Path(__file__).resolve().parents[1]


def _ablate(
    tmp_path: Path, data: Path, *flags: str, killed: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """The script on `data`, into tmp_path/ablation; `killed`: through tests/_killed_run.py, killed
    at (point, epoch)."""
    script = (
        ["-m", "tests._killed_run", "ablate", *killed, "--"]
        if killed
        else [str(REPO / "experiments" / "ablate_augmentation.py")]
    )
    command = [
        sys.executable,
        *script,
        "--data-dir",
        str(data),
        *TINY_ABLATION_FLAGS,
        "--out",
        str(tmp_path / "ablation"),
        *flags,
    ]
    return subprocess.run(
        command, cwd=REPO if killed else tmp_path, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cats_dogs_folder(
        tmp_path_factory.mktemp("cats"), {"train": 16, "validation": 8, "test": 8}
    )


def test_the_report_compares_each_setting_with_none_and_a_rerun_checks_the_subset(tmp_path, data):
    done = _ablate(tmp_path, data, "--settings", "none", "flip", "--train-subset", "12")
    assert done.returncode == 0, done.stderr
    assert "Paired differences from 'none'" in done.stdout
    assert "| flip | " in done.stdout.split("Paired differences")[1]
    out = tmp_path / "ablation"
    assert (out / "differences.png").is_file() and "differences.png" in done.stdout
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["inputs"] == {"train_subset": 12} and saved["reference"] == "none"
    # The same folder with another subset would mix two recipes in one table: refused.
    other = _ablate(tmp_path, data, "--settings", "none", "flip", "--train-subset", "14")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"error: --out {out} holds an ablation of another recipe (train_subset: 12 -> 14); "
        "rerun it with its own flags to finish it, or choose another --out"
    ]
    unknown = _ablate(tmp_path, data, "--settings", "flip", "--reference", "zoom")
    assert unknown.returncode == 2 and "--reference 'zoom' is not one of" in unknown.stderr


def test_a_diverged_setting_exits_4_with_one_line(tmp_path, data):
    done = _ablate(tmp_path, data, "--settings", "none", "--optim.learning_rate", "1e12")
    assert done.returncode == 4, done.stderr
    assert "| none | diverged | 2 |" in done.stdout
    assert done.stderr.strip().splitlines() == [
        "error: 1 setting(s) diverged: none (a loss went NaN or inf; see results.md); "
        "try a lower --optim.learning_rate"
    ]


@pytest.mark.slow  # two settings of two seeds
def test_an_ablation_runs_on_a_folder_of_three_classes(tmp_path):
    three = write_cats_dogs_folder(tmp_path / "three", classes=("birds", "cats", "dogs"))
    done = _ablate(tmp_path, three, "--data.dataset", "folder", "--settings", "none", "flip")
    assert done.returncode == 0, done.stderr
    assert "| flip | " in done.stdout.split("Paired differences")[1]
    grid_folder = next((tmp_path / "ablation").glob("grid-*"))
    run_config = json.loads((grid_folder / "config.json").read_text())
    assert run_config["class_names"] == ["birds", "cats", "dogs"]
    assert run_config["model"]["num_classes"] == 3


def _without_seconds(out: Path) -> dict:
    """Every setting's result.json, less what depends on the clock (seconds, wall time)."""
    results = {}
    for path in sorted(out.glob("*/result.json")):
        result = json.loads(path.read_text())
        result.pop("wall_seconds")
        for history in result["histories"]:
            for row in history:
                row.pop("seconds")
        results[path.parent.name] = result
    return results


@pytest.mark.slow  # an ablation run whole, one killed mid-epoch and its resume
def test_a_grid_killed_mid_epoch_resumes_to_the_same_table(tmp_path, data):
    flags = ("--settings", "none", "flip", "rotation", "--epochs", "2")
    for folder in ("whole", "killed"):
        (tmp_path / folder).mkdir()
    whole = _ablate(tmp_path / "whole", data, *flags)
    assert whole.returncode == 0, whole.stderr
    assert "[grid] 6 members train in one program" in whole.stdout
    killed = _ablate(tmp_path / "killed", data, *flags, killed=("mid-epoch", "2"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = tmp_path / "killed" / "ablation"
    assert not list(out.glob("*/result.json"))  # nothing finished
    resumed = _ablate(tmp_path / "killed", data, *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout and "after epoch 1" in resumed.stdout
    assert _without_seconds(out) == _without_seconds(tmp_path / "whole" / "ablation")
    table = (out / "results.md").read_text().split("Paired differences")[1]
    assert (
        table
        == (tmp_path / "whole" / "ablation" / "results.md")
        .read_text()
        .split("Paired differences")[1]
    )


def test_evaluate_picks_a_grid_member_by_its_setting_and_seed(tmp_path, data, capsys):
    """A grid's run holds every member: evaluate.py --setting S --seed K scores that member's best
    checkpoint, and a seed alone, which every setting has, is refused in one line."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from cnnjax import checkpoint, models, train
    from cnnjax import data as datalib
    from experiments import evaluate

    result = _ablate(tmp_path, data, "--settings", "none", "flip", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    grid_run = next((tmp_path / "ablation").glob("grid-*"))
    members = json.loads((grid_run / "config.json").read_text())["members"]
    position = {(m["setting"], m["seed"]): i for i, m in enumerate(members)}

    def member_loss(setting: str, seed: int) -> float:
        k = position[setting, seed]  # read by position, as the checkpoint stacks the members
        best = checkpoint.read_description(checkpoint.find(grid_run, "latest"))["best"][k]["epoch"]
        model, _, description = checkpoint.load_model(grid_run, best)
        keys = jax.ShapeDtypeStruct((len(members), 2), jnp.uint32)
        shapes = jax.eval_shape(jax.vmap(lambda key: models.init_params(model, key)), keys)
        stacked = checkpoint.restore_trees(grid_run / "checkpoints" / str(best), {"params": shapes})
        params = jax.tree.map(lambda leaf: leaf[k], stacked["params"])
        spec = dataclasses.replace(evaluate.trained_data(model, description), input="memory")
        test_set = datalib.load(spec, ("test",))["test"]
        return train.evaluate(model, params, test_set, 100)["loss"]

    scored = evaluate.main(["--checkpoint", str(grid_run), "--setting", "flip", "--seed", "1"])
    assert scored["loss"] == member_loss("flip", 1) != member_loss("none", 1)
    capsys.readouterr()
    for argv, says in (
        (["--seed", "1"], "is an ablation grid: seed 1 is one of each setting (none, flip)"),
        (["--setting", "zoom"], "holds the settings none, flip; --setting 'zoom' is not one"),
        (["--setting", "flip", "--seed", "7"], "holds seed(s) 0, 1 of flip; seed 7 is not one"),
    ):
        with pytest.raises(SystemExit) as stopped:
            evaluate.main(["--checkpoint", str(grid_run), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(err) == 1 and says in err[0], err
