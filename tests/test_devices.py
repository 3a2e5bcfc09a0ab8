"""The same numbers on any device count: 1, 2 and 4 forced CPU devices, K seeds over the seed axis.

The device count is fixed when jax starts, so one subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4 runs every comparison (tests/_devices_worker.py)
and prints them as JSON; the tests below read that. `--batch-size` is the global batch: each
device count sees the same batches, augmentation and dropout masks, so the first epoch agrees to
float32 reassociation. After it the summation order can make runs drift apart (measured on an
AVX-512 CPU: the tiny MNIST run on 4 devices, 8 steps in, loss 1.5804 against 1.5839 and val_loss
1.115 against 1.131, parameters 6e-3 apart); a wrong batch, mask or shard would show from the first
steps, and by far more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # one subprocess trains every device count

TOLERANCE = 1e-5  # the first epoch
DRIFT = 5e-2  # later epochs: losses relative, parameters absolute
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        ).strip(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests._devices_worker", str(tmp_path_factory.mktemp("devices"))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    return out


def assert_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 1
    for key in METRICS:
        assert abs(a[0][key] - b[0][key]) <= TOLERANCE, (key, a[0][key], b[0][key])
    for x, y in zip(a[1:], b[1:]):
        assert abs(x["loss"] - y["loss"]) <= DRIFT * abs(y["loss"]) and abs(
            x["val_loss"] - y["val_loss"]
        ) <= DRIFT * abs(y["val_loss"])


@pytest.mark.parametrize("recipe", ["mnist", "cats"])
def test_one_two_and_four_devices_give_the_same_history_and_parameters(results, recipe):
    """MNIST (a padded last batch) and cats vs dogs experiment 2 (lecture
    augmentation, Dropout(0.5))."""
    runs = results[recipe]
    for n in ("1", "2", "4"):
        assert runs[n]["mesh"] == {"seed": 1, "data": int(n)}
        assert_close(runs[n]["histories"][0], runs["1"]["histories"][0])
        assert runs[n]["params_diff"] <= DRIFT


def test_two_seeds_on_two_devices_spread_over_the_seed_axis_and_equal_each_seed_alone(results):
    seeds = results["seeds"]
    assert seeds["mesh"] == {"seed": 2, "data": 1}
    for together, alone in zip(seeds["together"], seeds["alone"]):
        assert_close(together, alone)
    assert seeds["together"][0] != seeds["together"][1]  # two seeds, two different runs
    assert seeds["params_diff"] <= DRIFT


@pytest.mark.parametrize(
    "case,what",
    [
        ("mnist", "train.batch_size 30"),
        ("mnist_eval", "train.eval_batch_size 30"),
        ("catsdogs", "train.batch_size 10"),
    ],
)
def test_a_batch_the_data_axis_cannot_split_is_one_line_through_the_scripts(results, case, what):
    run = results["script_errors"][case]
    assert run["code"] == 2
    err = run["stderr"].strip()
    assert (
        err
        == f"error: {what} cannot be split over the 4 devices of the data axis; use a multiple of 4"
    )
    assert results["refused_folders"] == []  # refused before the run folder was made


def test_a_four_device_run_says_where_it_ran(results):
    run = results["script_devices"]
    assert run["code"] == 0
    assert (
        "devices: 4 x cpu (cpu), 1 process(es), mesh seed=1 x data=4" in run["stdout"].splitlines()
    )
    devices = run["devices"]
    assert {k: devices[k] for k in ("platform", "count", "processes", "mesh")} == {
        "platform": "cpu",
        "count": 4,
        "processes": 1,
        "mesh": {"seed": 1, "data": 4},
    }
