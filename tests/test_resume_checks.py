"""What `--resume --out RUN` checks before anything loads, and what it refuses, each in one line
and exit code 2: nothing to resume, a folder that is not a run, another experiment's run, a
config.json edited by hand (a section gone, or another recipe than its checkpoints), and a lock
file that holds no object; and a checkpoint of another run, passed over by name (evaluate.py
names it too, and reads the run's own data folder).

In-process runs of experiments/catsdogs.py on a tiny folder; `--data-dir` names a folder that
does not exist wherever the refusal must come before the data is read.
"""

from __future__ import annotations

import json
import shutil

import pytest

from cnnjax import run_folder
from experiments import catsdogs, evaluate
from tests.conftest import CATS_SIZE, REPO, write_cats_dogs_folder

ARGS = ["--epochs", "2", "--batch-size", "8", "--train.eval_batch_size", "8"]
ARGS += ["--image-size", str(CATS_SIZE)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_cats_dogs_folder(tmp_path_factory.mktemp("resume-checks") / "data")


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """A finished 2-epoch run (both checkpoints kept), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    catsdogs.main([*ARGS, "--run.keep", "3", "--data-dir", str(folder), "--out", str(out)])
    return out


def refusal(argv: list[str], capsys) -> str:
    """The one line experiments/catsdogs.py ends with, checked to be exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        catsdogs.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("made", [False, True], ids=["missing", "empty"])
def test_resume_of_a_folder_with_nothing_in_it_says_so(tmp_path, capsys, made):
    out = tmp_path / "run"
    if made:
        out.mkdir()
    err = refusal(["--resume", "--out", str(out), "--data-dir", str(tmp_path / "nowhere")], capsys)
    assert f"--out {out} holds nothing to resume" in err and "drop --resume" in err
    assert out.exists() == made


def test_resume_without_out_asks_for_the_folder(tmp_path, capsys):
    err = refusal(["--resume", "--data-dir", str(tmp_path / "nowhere")], capsys)
    assert err == "error: --resume needs --out RUN, the run folder to continue"


def test_a_folder_that_is_no_run_is_refused_before_the_data(tmp_path, capsys):
    out = tmp_path / "mnist"
    shutil.copytree(REPO / "checkpoints" / "mnist", out)  # the shipped model: no config.json
    err = refusal(["--resume", "--out", str(out), "--data-dir", str(tmp_path / "nowhere")], capsys)
    assert "holds no config.json: not a cnnjax run folder" in err


def test_another_experiments_run_is_refused_naming_it(finished, tmp_path, capsys):
    out = shutil.copytree(finished, tmp_path / "run")
    record = json.loads((out / "config.json").read_text())
    record["config"]["name"], record["config"]["data"]["dataset"] = "mnist", "mnist"
    record["command"] = ["experiments/mnist.py"]
    (out / "config.json").write_text(json.dumps(record))
    err = refusal(["--resume", "--out", str(out), "--data-dir", str(tmp_path / "nowhere")], capsys)
    assert "holds a run of mnist (mnist data, started by experiments/mnist.py)" in err
    assert "not of this script's cats_dogs" in err
    assert json.loads((out / "config.json").read_text())["command"] == ["experiments/mnist.py"]


@pytest.mark.parametrize("edit", ["drop", "add"])
def test_a_config_json_missing_a_section_names_the_section(finished, tmp_path, capsys, edit):
    out = shutil.copytree(finished, tmp_path / "run")
    record = json.loads((out / "config.json").read_text())
    if edit == "drop":
        del record["config"]["model"]
    else:
        record["config"]["extra"] = {}
    (out / "config.json").write_text(json.dumps(record))
    err = refusal(["--resume", "--out", str(out), "--data-dir", str(tmp_path / "nowhere")], capsys)
    named = "no 'model' section" if edit == "drop" else "an unknown section 'extra'"
    assert f"{out}/config.json holds {named}" in err and "does not fit" not in err


def test_a_config_json_edited_to_another_recipe_is_refused_naming_the_fields(
    finished, folder, tmp_path, capsys
):
    out = shutil.copytree(finished, tmp_path / "run")
    record = json.loads((out / "config.json").read_text())
    record["config"]["optim"]["learning_rate"] = 0.5
    record["config"]["model"]["dropout"] = 0.3
    (out / "config.json").write_text(json.dumps(record))
    history = (out / "history.json").read_text()
    err = refusal(["--resume", "--epochs", "3", "--out", str(out)], capsys)
    assert f"{out}/config.json disagrees with the run's checkpoints" in err
    assert "optim.learning_rate: 0.001 -> 0.5" in err and "model.dropout: 0.0 -> 0.3" in err
    assert (out / "history.json").read_text() == history


def without_seconds(path) -> list[dict]:
    rows = json.loads(path.read_text())
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def other_run(folder, tmp_path_factory):
    """The same 2-epoch run at another learning rate: its checkpoints are sealed, but not ours."""
    out = tmp_path_factory.mktemp("other") / "run"
    argv = [*ARGS, "--learning-rate", "0.01", "--run.keep", "3"]
    catsdogs.main([*argv, "--data-dir", str(folder), "--out", str(out)])
    return out


@pytest.mark.parametrize("how", ["copied", "linked"])
def test_a_checkpoint_of_another_run_is_passed_over_naming_it(
    finished, other_run, tmp_path, capsys, how
):
    """Epoch 2 replaced by another run's epoch 2: --resume names it, goes on from epoch 1, and
    ends with the history of the uninterrupted run."""
    out = shutil.copytree(finished, tmp_path / "run")
    newest, theirs = out / "checkpoints" / "2", other_run / "checkpoints" / "2"
    shutil.rmtree(newest)
    if how == "copied":
        shutil.copytree(theirs, newest)
    else:
        newest.symlink_to(theirs, target_is_directory=True)
    capsys.readouterr()
    catsdogs.main(["--resume", "--out", str(out)])
    captured = capsys.readouterr()
    assert f"{newest} is another run's checkpoint (optim.learning_rate: 0.01 -> " in captured.out
    assert f"Resuming {out} after epoch 1" in captured.out
    assert without_seconds(out / "history.json") == without_seconds(finished / "history.json")
    assert not newest.is_symlink() and (theirs / "checksums.json").is_file()


def test_evaluate_uses_the_runs_data_folder_and_names_another_runs_checkpoint(
    finished, other_run, folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("CNNJAX_DATA_DIR", raising=False)
    out = shutil.copytree(finished, tmp_path / "run")
    capsys.readouterr()
    own = evaluate.main(["--checkpoint", str(out), "--which", "2", "--split", "validation"])
    printed = capsys.readouterr().out
    assert f"data folder: {folder} (the run's own" in printed and "another run's" not in printed
    shutil.rmtree(out / "checkpoints" / "2")
    shutil.copytree(other_run / "checkpoints" / "2", out / "checkpoints" / "2")
    theirs = evaluate.main(["--checkpoint", str(out), "--which", "2", "--split", "validation"])
    printed = capsys.readouterr().out
    assert f"{out}/checkpoints/2 is another run's checkpoint, not of {out}/config.json" in printed
    assert "optim.learning_rate: 0.01 -> " in printed and theirs != own


@pytest.mark.parametrize("content", ["1", "[1, 2]", '"pid"'])
def test_a_lock_holding_no_object_is_an_unreadable_lock(folder, tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(content)
    catsdogs.main([*ARGS, "--epochs", "1", "--data-dir", str(folder), "--out", str(out)])
    assert "Traceback" not in capsys.readouterr().err
    assert len(json.loads((out / "history.json").read_text())) == 1
    assert not (out / ".lock").exists()


def test_a_run_without_out_lands_under_runs_not_beside_the_shipped_models():
    """checkpoints/ holds the shipped models; a user's runs go to runs/ (git-ignored)."""
    assert run_folder.default_out("catsdogs", 0).parts[0] == "runs"
    gitignore = (REPO / ".gitignore").read_text().splitlines()
    assert "runs/" in gitignore
