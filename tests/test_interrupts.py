"""Ctrl-C and SIGTERM reach the training loop wherever they land: inside a garbage-collection
callback or a weakref callback (Python prints and drops an exception raised there) as anywhere
else, and while the first step compiles."""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import signal
import subprocess
import sys
import time
import weakref

import pytest

from cnnjax import runs
from tests.conftest import CATS_SIZE, REPO, write_cats_dogs_folder


@pytest.fixture()
def handlers():
    """The handlers runs.start installs, put back afterwards."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    parser = argparse.ArgumentParser()
    runs.add_flags(parser)
    runs.start(parser.parse_args([]))
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class Dying:
    pass


def interrupted_in(where: str, signum: int) -> list[float]:
    """Arrange `signum` to arrive inside code whose exceptions Python drops: a garbage-collection
    callback (as jax's _xla_gc_callback) or a weakref callback. Returns [when it was sent]."""
    sent: list[float] = []

    def send(*args: object) -> None:
        if not sent:
            sent.append(time.monotonic())
            os.kill(os.getpid(), signum)
            for _ in range(10_000):  # the handler runs here, inside the callback
                pass

    if where == "gc callback":
        gc.callbacks.append(send)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(send)
    else:
        dying = Dying()
        alive = weakref.ref(dying, send)  # the callback runs as `dying` goes
        del dying
        assert alive() is None
    return sent


@pytest.mark.parametrize("where", ["gc callback", "weakref callback"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_where_python_drops_exceptions_still_reaches_the_loop(handlers, signum, where):
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        assert interrupted_in(where, signum)
        time.sleep(5)  # dropped, the interrupt would never come
    assert time.monotonic() - started < 5


def test_a_signal_elsewhere_interrupts_at_once(handlers):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):
            pass


def test_a_signal_while_the_first_step_compiles_is_one_line_and_exit_130(tmp_path):
    """Stopped while XLA compiles on its own threads: the interpreter's teardown under them
    crashed (a segmentation fault after the `interrupted` line) in most tries before."""
    folder = write_cats_dogs_folder(tmp_path / "data")
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        command = [sys.executable, str(REPO / "experiments" / "catsdogs.py"), "--epochs", "3"]
        command += ["--image-size", str(CATS_SIZE), "--data-dir", str(folder), "--out", str(out)]
        with subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as process:
            for line in process.stdout:
                if "run folder" in line:  # the next thing it does is compile the first step
                    time.sleep(0.3)
                    process.send_signal(signal.SIGTERM)
                    break
            _, err = process.communicate(timeout=300)
        assert process.returncode == runs.EXIT_INTERRUPTED, (attempt, process.returncode, err)
        assert err.strip().startswith("interrupted") and "\n" not in err.strip(), err
        assert not (out / ".lock").exists()


def handles_sigterm(pid: int) -> None:
    """Wait until process `pid` catches SIGTERM (Linux's /proc/PID/status, SigCgt)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        caught = int(status.split("SigCgt:")[1].split()[0], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never caught SIGTERM")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
# The training scripts until runs.start takes over; evaluate and predict, which write nothing, for
# their whole run.
@pytest.mark.parametrize(
    "script", ["mnist.py", "catsdogs.py", "ablate_augmentation.py", "evaluate.py", "predict.py"]
)
def test_a_signal_while_a_script_imports_is_one_line_and_exit_130(tmp_path, script, signum):
    command = [sys.executable, str(REPO / "experiments" / script), "--out", str(tmp_path / "run")]
    with subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        handles_sigterm(process.pid)  # the script's first lines ran; jax is still loading
        process.send_signal(signum)
        _, err = process.communicate(timeout=300)
    assert process.returncode == runs.EXIT_INTERRUPTED, (process.returncode, err)
    assert err.strip() == "interrupted while starting: nothing was written", err
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_a_library_hands_back_as_its_own_error_is_still_an_interrupt(capsys):
    for handed_back in (RuntimeError("wrapped"), RuntimeError("KeyboardInterrupt: in a callback")):
        with pytest.raises(SystemExit) as exit_info:
            with runs.exits(": resume it"):
                if "wrapped" in str(handed_back):
                    try:
                        raise KeyboardInterrupt
                    except KeyboardInterrupt as e:
                        raise handed_back from e
                raise handed_back
        assert exit_info.value.code == runs.EXIT_INTERRUPTED
        assert capsys.readouterr().err.strip() == "interrupted: resume it"
