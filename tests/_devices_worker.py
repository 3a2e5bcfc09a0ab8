"""Every device-count comparison of tests/test_devices.py in one process (jax starts once), as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests._devices_worker OUT_DIR

Prints one JSON object on its last line of stdout:
  mnist, cats:     per device count (1, 2, 4): the mesh, each epoch's metrics, the final
                   parameters' largest difference from the 1-device run
  seeds:           K=2 seeds on 2 devices (mesh shape) against each seed run alone on 1 device
  script_errors:   what experiments/*.py print for a batch the 4-device data axis cannot split
  script_devices:  config.json's "devices" of a 1-epoch experiments/mnist.py run on 4 devices
  refused_folders: the run folders the refused scripts left (none expected)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from cnnjax import config, data, mesh, train
from tests.conftest import tiny_cats_dogs, tiny_mnist, write_mnist_folder

EPOCHS = 2
SEEDS = (3, 4)  # not 0, 1: a seed taken for its position in the stack would show


def recipe(name: str) -> config.Config:
    if name == "mnist":  # 100 examples in batches of 32: the last one padded with weight-0 rows
        return config.override(
            config.mnist(),
            {"train.batch_size": 32, "train.eval_batch_size": 20, "train.epochs": EPOCHS},
        )
    # Experiment 2 (lecture augmentation, Dropout(0.5)) at 48 px; 20 examples in batches of 8
    return config.override(
        config.catsdogs(2),
        {
            "data.image_size": 48,
            "train.batch_size": 8,
            "train.eval_batch_size": 8,
            "train.epochs": EPOCHS,
        },
    )


def datasets(cfg: config.Config) -> dict[str, data.Images]:
    if cfg.data.dataset == "mnist":
        (x, y), (vx, vy), classes = (
            tiny_mnist(100, 0),
            tiny_mnist(40, 1),
            [str(d) for d in range(10)],
        )
    else:
        (x, y), (vx, vy), classes = tiny_cats_dogs(20, 0), tiny_cats_dogs(16, 1), ["cats", "dogs"]
    return {
        "train": data.Images(x, y, classes),
        cfg.data.validation_split: data.Images(vx, vy, classes),
    }


def run(cfg: config.Config, seeds: list[int], devices: list) -> dict:
    """Train cfg's recipe for `seeds` (consecutive) on a mesh over `devices`: the histories and the
    final parameters, with the epoch-1 checkpoint's parameters as a witness of the start."""
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, seed=seeds[0], seeds=len(seeds)),
        run=dataclasses.replace(cfg.run, tensorboard=False),
    )
    grid = mesh.make_mesh(len(seeds), devices)
    with tempfile.TemporaryDirectory() as workdir:
        result = train.train_and_evaluate(cfg, workdir, datasets(cfg), mesh=grid, verbose=False)
    histories = [
        [{k: row[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")} for row in h]
        for h in result.histories
    ]
    return {
        "mesh": dict(grid.shape),
        "histories": histories,
        "params": mesh.to_host(result.state.params),
    }


def max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def device_counts(name: str, seed: int) -> tuple[dict, dict]:
    """The recipe on 1, 2 and 4 devices; and the 1-device run itself."""
    cfg = recipe(name)
    one = run(cfg, [seed], jax.devices()[:1])
    runs = {1: one, **{n: run(cfg, [seed], jax.devices()[:n]) for n in (2, 4)}}
    return {
        str(n): {
            "mesh": r["mesh"],
            "histories": r["histories"],
            "params_diff": max_diff(r["params"], one["params"]),
        }
        for n, r in runs.items()
    }, one


def seeds_together(alone_first: dict, seeds: tuple[int, int]) -> dict:
    """K=2 seeds on 2 devices against each seed alone on 1 device (the first: `alone_first`)."""
    cfg = recipe("cats")
    together = run(cfg, list(seeds), jax.devices()[:2])
    alone = [alone_first, run(cfg, [seeds[1]], jax.devices()[:1])]
    stacked = jax.tree.map(lambda *leaves: np.concatenate(leaves), *[a["params"] for a in alone])
    return {
        "mesh": together["mesh"],
        "together": together["histories"],
        "alone": [a["histories"][0] for a in alone],
        "params_diff": max_diff(together["params"], stacked),
    }


def script(module: str, argv: list[str]) -> dict:
    """experiments/<module>.py's main(argv) in this process: exit code, stdout and stderr."""
    experiment = __import__(f"experiments.{module}", fromlist=["main"])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            experiment.main(argv)
        except SystemExit as e:
            code = e.code
        except Exception as e:  # noqa: BLE001 - reported, so the other comparisons still come back
            code = f"{type(e).__name__}: {e}"
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    tmp = Path(sys.argv[1])
    results = {"devices": jax.device_count(), "mnist": device_counts("mnist", 0)[0]}
    results["cats"], cats_alone = device_counts("cats", SEEDS[0])
    results["seeds"] = seeds_together(cats_alone, SEEDS)
    mnist_dir = write_mnist_folder(tmp / "mnist", n_train=100, n_test=40)
    small = ["--epochs", "1", "--data-dir", str(mnist_dir)]
    results["script_errors"] = {
        "mnist": script(
            "mnist",
            [
                *small,
                "--batch-size",
                "30",
                "--train.eval_batch_size",
                "20",
                "--out",
                str(tmp / "refused-mnist"),
            ],
        ),
        "mnist_eval": script(
            "mnist",
            [
                *small,
                "--batch-size",
                "32",
                "--train.eval_batch_size",
                "30",
                "--out",
                str(tmp / "refused-eval"),
            ],
        ),
        "catsdogs": script(
            "catsdogs",
            [
                "--dropout",
                "--batch-size",
                "10",
                "--data-dir",
                str(tmp / "no-such-folder"),
                "--out",
                str(tmp / "refused-cats"),
            ],
        ),
    }
    done = script(
        "mnist",
        [*small, "--batch-size", "32", "--train.eval_batch_size", "20", "--out", str(tmp / "run")],
    )
    results["script_devices"] = {
        "code": done["code"],
        "stdout": done["stdout"],
        "devices": json.loads((tmp / "run" / "config.json").read_text())["devices"],
    }
    results["refused_folders"] = [
        name for name in ("refused-mnist", "refused-eval", "refused-cats") if (tmp / name).exists()
    ]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
