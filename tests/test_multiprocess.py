"""Two processes on this machine (127.0.0.1, CPU, gloo collectives) train
like one, and survive one another.

Each test starts experiments/mnist.py as two processes (tests/_mp_worker.py runs them, records
what each writes in the run folder and can SIGKILL one as an epoch starts) and compares with
the same run as a single process. The data is tiny (write_mnist_folder); 200 training images
make the last batch of every epoch a padded one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cnnjax import mesh
from tests.conftest import REPO, TINY_ABLATION_FLAGS, write_cats_dogs_folder, write_mnist_folder

ARGS = ["--epochs", "3", "--batch-size", "32", "--train.eval_batch_size", "32"]
TOLERANCE = 1e-5
LOST_WITHIN_S = 90


def free_port() -> int:
    """A port free with the one after it (jax's coordinator takes PORT,
    cnnjax's gathering PORT+1)."""
    while True:
        with socket.socket() as s, socket.socket() as t:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                t.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


class Launch:
    """N processes of one run of experiments/mnist.py, each with its own logs and write report."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        argv: list[str],
        out: Path,
        num_processes: int = 2,
        die: dict[int, int] | None = None,
        script: str = "experiments/mnist.py",
    ):
        self.dir = tmp / name
        self.dir.mkdir()
        address = f"127.0.0.1:{free_port()}"
        self.procs = []
        for i in range(num_processes):
            flags = [
                "--coordinator-address",
                address,
                "--num-processes",
                str(num_processes),
                "--process-id",
                str(i),
            ]
            kill = ["--die-in-epoch", str(die[i])] if die and i in die else []
            cmd = [
                sys.executable,
                "-m",
                "tests._mp_worker",
                "--watch",
                str(out),
                "--report",
                str(self.dir / f"writes{i}"),
                *kill,
                "--",
                script,
                *argv,
                *flags,
            ]
            with (
                open(self.dir / f"out{i}", "w") as stdout,
                open(self.dir / f"err{i}", "w") as stderr,
            ):
                self.procs.append(
                    subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=stdout, stderr=stderr)
                )

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(max(1.0, deadline - time.monotonic())) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    def out(self, i: int) -> str:
        return (self.dir / f"out{i}").read_text()

    def err(self, i: int) -> str:
        return (self.dir / f"err{i}").read_text()

    def writes(self, i: int) -> list[str]:
        return (self.dir / f"writes{i}").read_text().splitlines()


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    assert [row["epoch"] for row in a] == [row["epoch"] for row in b]
    for x, y in zip(a, b):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert abs(x[key] - y[key]) <= TOLERANCE, (x["epoch"], key, x[key], y[key])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def run_alone(script: str, argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    """One process of `script` (relative to the repository) with `argv`, its output captured."""
    return subprocess.run(
        [sys.executable, script, *argv],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def mnist_data(tmp_path_factory) -> Path:
    return write_mnist_folder(tmp_path_factory.mktemp("mnist"), n_train=200, n_test=64)


@pytest.fixture(scope="module")
def single_process(mnist_data, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("single") / "run"
    done = run_alone(
        "experiments/mnist.py", [*ARGS, "--data-dir", str(mnist_data), "--out", str(out)], 240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return history(out)


def wait_for_survivor(launch: Launch, victim: int) -> tuple[int, list[str]]:
    """The victim's SIGKILL, then the other process's exit within LOST_WITHIN_S:
    (its code, its error lines)."""
    survivor = 1 - victim
    assert launch.procs[victim].wait(240) == -signal.SIGKILL, launch.err(victim)[-3000:]
    try:  # a bound, not a speed: the survivor must not wait for the dead process
        launch.procs[survivor].wait(LOST_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {survivor} still runs {LOST_WITHIN_S} s after process {victim} died")
    return launch.wait()[survivor], error_lines(launch.err(survivor))


def assert_only_process_0_writes(launch: Launch) -> None:
    """Process 1 writes nothing in the run folder through Python but its own orbax metadata."""
    assert any("/history.json" in line for line in launch.writes(0))  # the hook does see writes
    others = [
        line for line in launch.writes(1) if "/checkpoints/" not in line or "process_1" not in line
    ]
    assert others == [], others[:5]


@pytest.mark.slow  # three launches of two processes each
def test_two_processes_survive_each_other_and_resume_to_the_single_process_run(
    mnist_data, single_process, tmp_path
):
    """Epoch 2 starts and process 1 is SIGKILLed: process 0 exits with one line (EXIT_LOST). Both
    resume; epoch 3 starts and process 0, the coordinator, is SIGKILLed: process 1 stops too. Both
    resume again and finish with the single-process history. Process 0 alone writes the run
    folder; a start without --resume is refused by both processes in the same words."""
    out = tmp_path / "run"
    argv = [*ARGS, "--data-dir", str(mnist_data), "--out", str(out)]

    first = Launch(tmp_path, "first", argv, out, die={1: 2})
    code, lines = wait_for_survivor(first, victim=1)
    assert code == mesh.EXIT_LOST, first.err(0)[-3000:]
    assert (
        len(lines) == 1
        and "lost contact with the other processes" in lines[0]
        and "--resume" in lines[0]
    ), lines
    assert "Traceback" not in first.err(0)
    assert not (out / ".lock").exists()  # the survivor let go of the folder
    assert [row["epoch"] for row in history(out)] == [1]

    second = Launch(tmp_path, "second", [*argv, "--resume"], out, die={0: 3})
    code, lines = wait_for_survivor(second, victim=0)  # the coordinator is gone
    assert code == mesh.EXIT_LOST, second.err(1)[-3000:]
    assert (
        len(lines) == 1
        and "lost contact with the other processes" in lines[0]
        and "--resume" in lines[0]
    ), lines
    assert "Traceback" not in second.err(1)
    assert "Resuming" in second.out(0) and "after epoch 1" in second.out(0)
    assert [row["epoch"] for row in history(out)] == [1, 2]

    third = Launch(tmp_path, "third", [*argv, "--resume"], out)
    assert third.wait() == [0, 0], third.err(0)[-3000:] + third.err(1)[-3000:]
    assert "taking it over" in third.out(0) and "after epoch 2" in third.out(
        0
    )  # the killed process 0's lock
    assert "devices: 2 x cpu (cpu), 2 process(es), mesh seed=1 x data=2" in third.out(0)
    assert "Epoch 3/3" in third.out(0) and "Epoch" not in third.out(1)
    assert_same_history(history(out), single_process)
    devices = json.loads((out / "config.json").read_text())["devices"]
    assert (
        devices["count"] == 2
        and devices["processes"] == 2
        and devices["mesh"] == {"seed": 1, "data": 2}
    )
    for launch in (first, second, third):
        assert_only_process_0_writes(launch)

    refused = Launch(tmp_path, "refused", argv, out)
    assert refused.wait() == [2, 2]
    first_words, second_words = error_lines(refused.err(0)), error_lines(refused.err(1))
    assert (
        first_words == second_words and len(first_words) == 1 and "add --resume" in first_words[0]
    )


@pytest.mark.slow  # starts a process that waits for a peer that never comes
@pytest.mark.parametrize("present", [0, 1])
def test_a_peer_that_never_starts_is_one_line_within_the_join_timeout(
    present, mnist_data, tmp_path
):
    address = f"127.0.0.1:{free_port()}"
    flags = [
        "--coordinator-address",
        address,
        "--num-processes",
        "2",
        "--process-id",
        str(present),
        "--join-timeout",
        "5",
    ]
    start = time.monotonic()
    argv = [*ARGS, "--data-dir", str(mnist_data), "--out", str(tmp_path / "run"), *flags]
    done = run_alone("experiments/mnist.py", argv, 120)
    assert done.returncode == mesh.EXIT_LOST and time.monotonic() - start < 60, done.stderr[-2000:]
    lines = error_lines(done.stderr)
    assert (
        len(lines) == 1
        and "Traceback" not in done.stderr
        and "within 5 s (--join-timeout)" in lines[0]
    ), done.stderr[-2000:]
    assert ("process(es) 1 did not join" if present == 0 else "process 0 did not gather") in lines[
        0
    ]
    assert not (tmp_path / "run").exists()


def test_a_single_cluster_task_is_not_joined_and_several_are(monkeypatch):
    """`srun --ntasks=1 python ...` stays one process with every local device
    (joining would give it one GPU)."""
    for name, value in {
        "SLURM_JOB_ID": "12",
        "SLURM_STEP_NODELIST": "node[01-02]",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert mesh.cluster_detected() is None
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert mesh.cluster_detected() == "SLURM"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert mesh.cluster_detected() == "Open MPI"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num-processes", "2"], "go together: give all three or none"),
        (
            ["--coordinator-address", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
            "must be HOST:PORT",
        ),
        (
            ["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be in 0..1",
        ),
    ],
)
def test_bad_process_flags_are_one_line_exit_2(flags, message, tmp_path, capsys):
    from experiments import mnist as experiment

    with pytest.raises(SystemExit) as exit_info:
        experiment.main([*flags, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_loss_found_by_two_threads_at_once_is_said_once(monkeypatch, capsys):
    """A peer's watch thread and the main thread (its collective failing) can both call `_lost`:
    the first one says it and leaves, the other waits for the process to end."""
    exits = []
    monkeypatch.setattr(mesh, "_leaving", threading.Lock())
    monkeypatch.setattr(mesh.os, "_exit", exits.append)  # returns, as the real one never does
    threads = [
        threading.Thread(target=mesh._lost, args=(f"why {i}",), daemon=True) for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2)  # the second stays blocked, as it would until the process ends
    assert exits == [mesh.EXIT_LOST]
    assert len(error_lines(capsys.readouterr().err)) == 1


@pytest.mark.slow  # an ablation grid as two processes and as one
def test_a_grid_shares_its_members_over_two_processes(tmp_path):
    """4 members (2 settings x 2 seeds) over 2 processes of one CPU device each: the member axis
    is sharded, two members a process. The table's numbers are the single process's (there the
    members run in turn, here two vmapped on each device), and process 0 alone writes."""
    data = write_cats_dogs_folder(tmp_path / "cats", {"train": 16, "validation": 8, "test": 8})
    argv = [
        *("--data-dir", str(data), *TINY_ABLATION_FLAGS, "--settings", "none", "flip"),
    ]
    single = run_alone(
        "experiments/ablate_augmentation.py", [*argv, "--out", str(tmp_path / "one")], 240
    )
    assert single.returncode == 0, single.stderr[-3000:]
    out = tmp_path / "two"
    launch = Launch(
        tmp_path,
        "grid",
        [*argv, "--out", str(out)],
        out,
        script="experiments/ablate_augmentation.py",
    )
    assert launch.wait() == [0, 0], launch.err(0)[-3000:] + launch.err(1)[-3000:]
    assert "[grid] 4 members train in one program" in launch.out(0)
    grid_config = json.loads(next(out.glob("grid-*/config.json")).read_text())
    assert grid_config["devices"]["mesh"] == {"seed": 2, "data": 1}
    for setting in ("none", "flip"):
        ours, theirs = (
            json.loads((folder / setting / "result.json").read_text())
            for folder in (out, tmp_path / "one")
        )
        for a, b in zip(ours["histories"], theirs["histories"]):
            for x, y in zip(a, b):
                for key in ("loss", "val_loss"):
                    assert x[key] == pytest.approx(y[key], rel=2e-4)
                assert abs(x["accuracy"] - y["accuracy"]) * 16 <= 1 + 1e-9
                assert abs(x["val_accuracy"] - y["val_accuracy"]) * 8 <= 1 + 1e-9
    assert_only_process_0_writes(launch)
