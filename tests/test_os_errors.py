"""The OS errors a path a user gave can meet, and running out of memory: one line naming the path
(or the batch size) and what to do, exit code 2, no traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import jax
import pytest

from cnnjax import runs
from tests.conftest import REPO


def line_and_code(error: BaseException, capsys) -> tuple[str, int]:
    with pytest.raises(SystemExit) as exit_info:
        with runs.exits():
            raise error
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err, exit_info.value.code


@pytest.mark.parametrize(
    "code,advice",
    [
        (errno.EACCES, "no permission: choose another path, or fix its permissions"),
        (errno.EPERM, "not permitted: choose another path, or fix its permissions"),
        (errno.EISDIR, "a folder, where a file was expected: name a file"),
        (errno.ENOTDIR, "a part of this path is a file, not a folder: choose another path"),
        (errno.ENOENT, "does not exist: check the path"),
    ],
)
def test_an_os_error_names_its_path_and_what_to_do(code, advice, capsys):
    error = OSError(code, os.strerror(code), "/some/path")
    line, exit_code = line_and_code(error, capsys)
    assert line == f"error: /some/path: {advice} ({os.strerror(code)})"
    assert exit_code == runs.EXIT_BAD_INPUT


def test_running_out_of_memory_names_the_batch_size(capsys):
    error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 155 bytes.")
    line, exit_code = line_and_code(error, capsys)
    assert line == (
        "error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 155 bytes.): start "
        "again with a lower --batch-size (or --train.eval_batch_size) and a new --out"
    )
    assert exit_code == runs.EXIT_BAD_INPUT


def test_another_runtime_error_keeps_its_traceback():
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        with runs.exits():
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")


def run_script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    command = [sys.executable, *argv]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_the_scripts_say_what_is_wrong_with_a_path(tmp_path):
    (tmp_path / "a_file").write_text("")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    shipped = str(REPO / "checkpoints" / "mnist")
    for argv, line in (
        (
            ["experiments/activations.py", "--checkpoint", shipped, "--image", str(folder)],
            f"error: {folder}: a folder, where a file was expected: name a file",
        ),
        (
            ["experiments/export_model.py", shipped, str(tmp_path / "a_file" / "out")],
            f"error: {tmp_path / 'a_file' / 'out'}: a part of this path is a file, not a folder",
        ),
    ):
        finished = run_script(*argv)
        err = finished.stderr.strip()
        assert finished.returncode == runs.EXIT_BAD_INPUT, err
        assert err.startswith(line) and "\n" not in err and "Traceback" not in err, err
