"""MNIST as a user runs it, whole process: `experiments/mnist.py` against the lecture's Keras script
(TensorFlow backend), alternated A B A B on the same data and machine.

    python benchmarks/mnist_process.py --data-dir ../shared/data [--epochs 2] [--rounds 2]

Each side is one fresh process from start to exit: imports, loading MNIST, compiling, training
--epochs epochs with validation, and (cnnjax) its checkpoints, history files and figures. The
first cnnjax process of a machine also measures its convolution routes (cnnjax.routes) and
keeps them in the user cache, so later rounds show the cost of that choice as their difference.
Prints each process's seconds and the ratio cnnjax / Keras of the medians (below 1: cnnjax
faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    """Wall seconds of one process; a failed one stops the benchmark with its last line."""
    begin = time.perf_counter()
    result = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    seconds = time.perf_counter() - begin
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        sys.exit(f"{Path(cmd[1]).name} failed: {lines[-1] if lines else result.returncode}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs")
    args = parser.parse_args()
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    keras = [sys.executable, str(REPO / "benchmarks" / "keras_lecture.py"), "mnist"]
    seconds: dict[str, list[float]] = {"cnnjax": [], "keras": []}
    with tempfile.TemporaryDirectory(prefix="cnnjax-mnist-process-") as workdir:
        for r in range(args.rounds):
            out = ["--out", str(Path(workdir) / f"run{r}")]
            ours = [sys.executable, str(REPO / "experiments" / "mnist.py"), *data, *out]
            seconds["cnnjax"].append(timed([*ours, "--epochs", str(args.epochs)]))
            seconds["keras"].append(timed([*keras, *data, "--epochs", str(args.epochs)]))
            print(
                f"round {r + 1}: cnnjax {seconds['cnnjax'][-1]:.1f} s, "
                f"keras {seconds['keras'][-1]:.1f} s",
                flush=True,
            )
    ours_s, theirs_s = (statistics.median(seconds[k]) for k in ("cnnjax", "keras"))
    print(
        f"whole process, {args.epochs} epochs, median of {args.rounds}: cnnjax {ours_s:.1f} s, "
        f"keras {theirs_s:.1f} s; ratio cnnjax/keras = {ours_s / theirs_s:.2f}"
    )


if __name__ == "__main__":
    main()
