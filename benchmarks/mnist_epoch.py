"""One MNIST training epoch (cnnjax.config.mnist(): batch 64, RMSprop, validation on the 10,000
test images): cnnjax against the lecture's Keras script (TensorFlow backend) on the same data and
machine.

    python benchmarks/mnist_epoch.py --data-dir ../shared/data [--epochs 2] [--skip-keras]

cnnjax trains through its own loop (cnnjax.train.train_and_evaluate: each epoch's time
includes validation and writing the checkpoint); Keras runs in its own process
(benchmarks/keras_lecture.py). Each side trains for --epochs epochs and the fastest epoch
after the first (which includes compilation) is compared; with --epochs 1 the first epoch
is used as is. Prints seconds per epoch and the ratio cnnjax / Keras (below 1 means cnnjax
is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repository, for benchmarks.common
from benchmarks.common import real_data, recipe, run_recipe  # noqa: E402

HERE = Path(__file__).resolve().parent


def best_epoch(seconds: list[float]) -> float:
    return min(seconds[1:]) if len(seconds) > 1 else seconds[0]


def recipe_epochs(name: str, data_dir: str | None, epochs: int) -> list[dict]:
    """`epochs` epochs of a recipe of cnnjax.config as a run trains them (train_and_evaluate, seed
    0, validation and the epoch's checkpoint included, compilation in the first epoch): one
    history row per epoch."""
    cfg = recipe(name, {"train.epochs": epochs})
    return run_recipe(cfg, real_data(cfg, data_dir)).histories[0]


def cnnjax_epochs(data_dir: str | None, epochs: int) -> list[dict]:
    return recipe_epochs("mnist", data_dir, epochs)


def keras_epochs(data_dir: str | None, epochs: int, experiment: str = "mnist") -> list[dict] | None:
    """The lecture's Keras script in its own process; one dict per epoch, or None if it failed."""
    cmd = [sys.executable, str(HERE / "keras_lecture.py"), experiment, "--epochs", str(epochs)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)}
    )
    if result.returncode != 0:
        stderr = result.stderr.strip()
        why = stderr.splitlines()[-1] if stderr else result.returncode
        print(f"Keras run failed: {why}")
        return None
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def compare_with_keras(
    name: str, run_cnnjax, experiment: str, argv: list[str] | None = None
) -> None:
    """Shared main of the epoch benchmarks: time cnnjax, then the lecture's Keras script, print the
    ratio."""
    parser = argparse.ArgumentParser(description=name)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip-keras", action="store_true")
    args = parser.parse_args(argv)
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, cpus: {os.cpu_count()}")
    start = time.perf_counter()
    ours = run_cnnjax(args.data_dir, args.epochs)
    ours_s = best_epoch([r["seconds"] for r in ours])
    our_epochs = [round(r["seconds"], 1) for r in ours]
    print(
        f"cnnjax: epochs {our_epochs} s, val_accuracy {ours[-1]['val_accuracy']:.4f}; "
        f"wall {time.perf_counter() - start:.0f} s"
    )
    if args.skip_keras:
        return
    theirs = keras_epochs(args.data_dir, args.epochs, experiment)
    if not theirs:
        return
    theirs_s = best_epoch([r["seconds"] for r in theirs])
    val_key = "val_accuracy" if "val_accuracy" in theirs[-1] else "val_acc"
    their_epochs = [round(r["seconds"], 1) for r in theirs]
    their_accuracy = theirs[-1].get(val_key, float("nan"))
    print(f"keras : epochs {their_epochs} s, val_accuracy {their_accuracy:.4f}")
    print(
        f"epoch seconds: cnnjax {ours_s:.1f}, keras {theirs_s:.1f}; "
        f"ratio cnnjax/keras = {ours_s / theirs_s:.2f}"
    )


def main() -> None:
    compare_with_keras(__doc__.splitlines()[0], cnnjax_epochs, "mnist")


if __name__ == "__main__":
    main()
