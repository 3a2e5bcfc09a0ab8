"""Faults a user meets, each one line and an exit code of the README, and nothing
half-written trusted: damaged checkpoints (skipped on resume, refused on load), a full disk,
Ctrl-C, a damaged config.json, locks a crash left, reads of a run being written, and a
stream that skips what memory skips.

In-process runs of experiments/catsdogs.py on a tiny folder (tests/conftest.py); the process-level
faults (SIGKILL, two processes) are in tests/test_runs.py and tests/test_multiprocess.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from cnnjax import checkpoint, data, feed, runs, train
from experiments import catsdogs, evaluate
from tests.conftest import CATS_SIZE, REPO, write_cats_dogs_folder

ARGS = [
    "--dropout",
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--train.eval_batch_size",
    "8",
    "--image-size",
    str(CATS_SIZE),
    "--run.keep",
    "3",
]


def without_seconds(path) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k != "seconds"} for row in json.loads(path.read_text())
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_cats_dogs_folder(tmp_path_factory.mktemp("faults") / "data")


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """An uninterrupted 3-epoch run (every epoch's checkpoint kept)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    catsdogs.main([*ARGS, "--data-dir", str(folder), "--out", str(out)])
    return out


def copy_run(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def params_file(step_dir) -> str:
    return max(
        (p for p in (step_dir / "params").rglob("*") if p.is_file() and "/d/" in p.as_posix()),
        key=lambda p: p.stat().st_size,
    )


@pytest.mark.parametrize("damage", ["bytes", "deleted"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_resume_is_exact(
    damage, folder, reference, tmp_path, capsys
):
    """4 bytes changed inside its parameter data, or its progress/ part deleted: one warning naming
    it, the intact epoch before it used, and the run ends exactly as the uninterrupted one."""
    out = copy_run(reference, tmp_path)
    newest = out / "checkpoints" / "3"
    if damage == "bytes":
        target = params_file(newest)
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2 : len(raw) // 2 + 4] = bytes(
            255 - b for b in raw[len(raw) // 2 : len(raw) // 2 + 4]
        )
        target.write_bytes(bytes(raw))
    else:
        shutil.rmtree(newest / "progress")
    catsdogs.main([*ARGS, "--data-dir", str(folder), "--out", str(out), "--resume"])
    printed = capsys.readouterr().out
    assert (
        printed.count("is damaged") == 1
        and f"{newest} is damaged" in printed
        and "after epoch 2" in printed
    )
    assert "Epoch 3/3" in printed and "Epoch 2/3" not in printed
    assert without_seconds(out / "history.json") == without_seconds(reference / "history.json")
    resumed, uninterrupted = (checkpoint.load_model(run, "latest")[1] for run in (out, reference))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.damage(newest) is None  # saved again, whole


def test_a_checkpoint_that_lost_its_description_reads_as_damaged(reference, tmp_path):
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "2" / "description")
    for path, which in ((out, 2), (out / "checkpoints" / "2", "best")):
        with pytest.raises(
            checkpoint.CheckpointError,
            match=r"checkpoints/2 is damaged \(description/\S+ is missing",
        ):
            checkpoint.load_model(path, which)


def test_evaluate_and_load_model_refuse_a_damaged_checkpoint_naming_it(
    folder, reference, tmp_path, capsys
):
    out = copy_run(reference, tmp_path)
    (out / "checkpoints" / "2" / "description" / "metadata").unlink()
    with pytest.raises(
        checkpoint.CheckpointError,
        match="checkpoints/2 is damaged .*description/metadata is missing",
    ):
        checkpoint.load_model(out, 2)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(
            [
                "--checkpoint",
                str(out),
                "--which",
                "2",
                "--data-dir",
                str(folder),
                "--split",
                "validation",
            ]
        )
    assert exit_info.value.code == runs.EXIT_BAD_INPUT
    err = one_error_line(capsys)
    assert "checkpoints/2 is damaged" in err and "weights are not used" in err
    assert checkpoint.load_model(out, 3)[2]["epoch"] == 3  # the others stay usable


def test_a_checkpoint_without_its_seal_is_incomplete(reference, tmp_path):
    """Killed after orbax's rename but before the checksums were written: not trusted."""
    out = copy_run(reference, tmp_path)
    (out / "checkpoints" / "3" / checkpoint.CHECKSUMS).unlink()
    assert "did not finish" in checkpoint.damage(out / "checkpoints" / "3")
    with checkpoint.Checkpoints(out / "checkpoints", train.TREES) as ckpts:
        assert ckpts.latest_intact() == 2


@pytest.mark.parametrize(
    "seal,why",
    [
        ("{}", "is not a seal of its files"),
        ("[1, 2]", "is not a seal of its files"),
        (None, "extra.bin is not in the seal"),
    ],
)
def test_an_emptied_or_foreign_seal_or_an_unsealed_file_is_damage(seal, why, reference, tmp_path):
    """A seal that lists nothing would check nothing: with it, changed
    weights loaded without a word."""
    out = copy_run(reference, tmp_path)
    step_dir = out / "checkpoints" / "3"
    if seal is None:
        (step_dir / "extra.bin").write_bytes(b"not saved by the run")
    else:
        (step_dir / checkpoint.CHECKSUMS).write_text(seal)
        with open(params_file(step_dir), "r+b") as f:
            f.seek(100)
            f.write(b"\xff\xff\xff\xff")
    assert why in checkpoint.damage(step_dir)
    with pytest.raises(checkpoint.CheckpointError, match="is damaged"):
        checkpoint.load_model(out, 3)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=f"{step_dir} is damaged .*: choose another epoch of its run$",
    ):
        checkpoint.find(step_dir)  # the epoch's own folder: no --which to point at


def test_a_read_of_a_run_being_written_finds_the_checkpoint_again_when_it_is_pruned(
    reference, tmp_path, monkeypatch
):
    """The best epoch is found, then pruned by the writing run before it is read (a new best
    replaced it): load_model finds the new one instead of failing with "not a cnnjax checkpoint"."""
    out = copy_run(reference, tmp_path)
    real_read, calls = checkpoint._read_model, []

    def pruned_first(step_dir, *choice):
        calls.append(step_dir.name)
        if len(calls) == 1:
            shutil.rmtree(step_dir)  # the writer's preservation policy, at the worst moment
        return real_read(step_dir, *choice)

    monkeypatch.setattr(checkpoint, "_read_model", pruned_first)
    monkeypatch.setattr(
        checkpoint,
        "find",
        lambda path, *choice: out / "checkpoints" / (calls and "3" or "1"),
    )
    _, params, description = checkpoint.load_model(out, "best")
    assert calls == ["1", "3"] and description["epoch"] == 3


def test_a_full_disk_during_a_save_is_one_line_and_the_resume_is_exact(
    folder, reference, tmp_path, monkeypatch, capsys
):
    """What orbax raises when the disk fills (measured on a 6 MB tmpfs): exit EXIT_NO_SPACE,
    one line, the lock let go, the earlier checkpoints intact; after space is freed, --resume
    ends as the uninterrupted run."""
    out = tmp_path / "run"
    real_save = checkpoint.Checkpoints.save

    def full_at_3(self, step, *args, **kwargs):
        if step == 3:
            raise ValueError(
                "RESOURCE_EXHAUSTED: Error writing local file "
                f'"{self.directory}/3.orbax-checkpoint-tmp/params": '
                "Failed to write 3045 bytes to file 16: "
                "No space left on device [os_error_code='28']"
            )
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpoints, "save", full_at_3)
    with pytest.raises(SystemExit) as exit_info:
        catsdogs.main([*ARGS, "--data-dir", str(folder), "--out", str(out)])
    assert exit_info.value.code == runs.EXIT_NO_SPACE == 6
    err = one_error_line(capsys)
    assert "the disk is full" in err and str(out) in err and "--resume" in err
    assert not (out / ".lock").exists() and sorted(
        p.name for p in (out / "checkpoints").iterdir()
    ) == ["1", "2"]
    monkeypatch.setattr(checkpoint.Checkpoints, "save", real_save)
    catsdogs.main([*ARGS, "--data-dir", str(folder), "--out", str(out), "--resume"])
    assert without_seconds(out / "history.json") == without_seconds(reference / "history.json")


@pytest.mark.parametrize("where", ["loading the data", "training"])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(
    where, folder, tmp_path, monkeypatch, capsys
):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "loading the data":
        monkeypatch.setattr(data, "load", interrupt)
    else:
        monkeypatch.setattr(feed, "train_fn", interrupt)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        catsdogs.main([*ARGS, "--data-dir", str(folder), "--out", str(out)])
    assert exit_info.value.code == runs.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted") and "\n" not in err and "Traceback" not in err
    assert ("--resume" in err) == (where == "training") and not (out / ".lock").exists()


@pytest.mark.slow  # a process stopped by SIGTERM, then its resume
def test_sigterm_ends_a_run_as_ctrl_c_does_and_the_resume_is_exact(folder, reference, tmp_path):
    """`kill` and schedulers stop with SIGTERM: one line, exit 130, the lock let
    go, every finished epoch kept."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "experiments" / "catsdogs.py"),
        *ARGS,
        "--data-dir",
        str(folder),
        "--out",
        str(out),
    ]
    with subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        for line in process.stdout:
            if line.startswith("Epoch 1/"):
                process.send_signal(signal.SIGTERM)
                break
        _, err = process.communicate(timeout=600)
    assert process.returncode == runs.EXIT_INTERRUPTED, err[-2000:]
    assert err.strip().startswith("interrupted") and "\n" not in err.strip() and "--resume" in err
    assert not (out / ".lock").exists()
    resumed = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0 and "Resuming" in resumed.stdout, resumed.stderr[-2000:]
    assert without_seconds(out / "history.json") == without_seconds(reference / "history.json")


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"config": {"name": "catsdogs', "is not valid JSON"),  # cut off
        ("[]", "holds no run config"),
        ('{"config": {"train": [1]}}', "holds no 'augment' section"),
    ],
)
def test_a_damaged_config_json_is_named_and_the_lock_let_go(
    text, message, folder, reference, tmp_path, capsys
):
    out = copy_run(reference, tmp_path)
    (out / "config.json").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        catsdogs.main([*ARGS, "--data-dir", str(folder), "--out", str(out), "--resume"])
    assert exit_info.value.code == runs.EXIT_BAD_INPUT
    assert f"{out / 'config.json'} {message}" in one_error_line(capsys)
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("left", ["empty", "garbage", "dead process"])
def test_a_lock_nobody_holds_is_taken_over(left, folder, reference, tmp_path, capsys):
    from tests.conftest import dead_pid

    out = copy_run(reference, tmp_path)
    text = {
        "empty": "",
        "garbage": "\x00\x01{",
        "dead process": json.dumps({"pid": dead_pid(), "host": os.uname().nodename}),
    }[left]
    (out / ".lock").write_text(text)
    catsdogs.main([*ARGS, "--data-dir", str(folder), "--out", str(out), "--resume"])
    printed = capsys.readouterr().out
    assert ("taking it over" in printed) == (left == "dead process")
    assert not (out / ".lock").exists()


def test_a_lock_a_live_process_holds_refuses_the_folder_naming_it(
    folder, reference, tmp_path, capsys
):
    out = copy_run(reference, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, json, os, sys, time; "
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); "
                "owner = {'pid': os.getpid(), 'host': 'here', 'started': 'now'}; "
                "os.write(fd, json.dumps(owner).encode()); "
                "print('held', flush=True); "
                "time.sleep(60)"
            ),
            str(out / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lock"}
        with pytest.raises(SystemExit) as exit_info:
            catsdogs.main([*ARGS, "--data-dir", str(folder), "--out", str(out), "--resume"])
        assert exit_info.value.code == runs.EXIT_BAD_INPUT
        assert f"is in use by process {holder.pid} on here" in one_error_line(capsys)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lock"} == before
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    catsdogs.main(
        [*ARGS, "--data-dir", str(folder), "--out", str(out), "--resume"]
    )  # the holder is gone: taken over


def test_the_stream_skips_what_memory_skips(tmp_path):
    """A broken file: memory and stream both leave it out before the epoch is ordered: the same
    count, the same labels, the same loss."""
    pytest.importorskip(
        "tensorflow", reason="the tfds extra: pip install -e '.[dev,tfds]' (CI installs it)"
    )
    from cnnjax import config

    root = write_cats_dogs_folder(tmp_path / "data", {"train": 12, "validation": 6})
    (root / "train" / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = config.override(
        config.catsdogs(1),
        {
            "data.image_size": CATS_SIZE,
            "data.data_dir": str(root),
            "train.epochs": 1,
            "train.batch_size": 4,
            "train.eval_batch_size": 6,
            "run.tensorboard": False,
        },
    )
    losses = {}
    for how in ("memory", "stream"):
        spec = config.override(cfg, {"data.input": how}).data
        with pytest.warns(data.SkippedImageWarning, match="broken.png"):
            datasets = data.load(spec, ("train", "validation"))
        assert (
            len(datasets["train"]) == 12 and datasets["train"].labels.tolist() == [0] * 6 + [1] * 6
        )
        losses[how] = train.train_and_evaluate(
            cfg, tmp_path / how, datasets, verbose=False
        ).histories[0][0]["loss"]
    assert losses["memory"] == pytest.approx(losses["stream"], rel=1e-6)


def test_a_first_epoch_that_diverges_keeps_no_checkpoint_and_says_so(tmp_path):
    result = train.Result(
        [0],
        [[{"epoch": 1, "loss": float("nan"), "val_loss": float("nan"), "diverged": True}]],
        [1],
        [None],
        None,
    )
    (line,) = runs.closing_lines(result, tmp_path)
    assert line.endswith("keeps no checkpoint. Try a lower learning rate (--learning-rate).")


def test_a_second_close_waits_until_the_lock_file_is_gone(tmp_path, monkeypatch):
    """A lost peer makes mesh's watch thread let go of the folder while the main thread may be
    doing the same; whichever returns first may end the process at once, so neither returns
    before the lock file is gone."""
    folder = runs.RunFolder(tmp_path, resume=False, writer=True)
    folder._lock()
    real_unlink = pathlib.Path.unlink
    monkeypatch.setattr(
        pathlib.Path, "unlink", lambda self, **kw: (time.sleep(0.5), real_unlink(self, **kw))[1]
    )
    first = threading.Thread(target=folder.close)
    first.start()
    time.sleep(0.1)  # the first close is letting go
    folder.close()
    assert not (tmp_path / ".lock").exists()
    first.join()
