"""How the training loop drives an epoch: one jitted step per Python call (the loop) against
~10 calls of a lax.scan over consecutive steps (what cnnjax.train runs), same process, same data.

    python benchmarks/train_loop.py [--models mnist,cats] [--rounds 3] [--examples-mnist 12800]
        [--examples-cats 2000] [--image-size N]

Each round trains one epoch from the same initial state with both drivers, interleaved:
the MNIST recipe (cnnjax.config.mnist(): batch 64, RMSprop) and cats-vs-dogs experiment 2
(cnnjax.config.catsdogs(2): batch 20, 150x150 or --image-size, lecture augmentation +
Dropout(0.5), Adam).
Both run the loop's own compiled steps, order and feeding (cnnjax.train's internals); the
loop driver is the same with cnnjax.step.steps_per_call patched to 1 (one step per call).
Images are random uint8: speed does not depend on the values. Prints ms per step (wall
clock; CPU time in brackets) for the fastest round after the first (which compiles), the
ratio scan / loop (below 1: scan is faster), and checks that both drivers end with the
same loss.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import jax

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repository, for benchmarks.common
from benchmarks.common import (  # noqa: E402
    Training,
    one_step_per_call,
    random_data,
    recipe,
    training,
)
from cnnjax import step  # noqa: E402

RECIPES = {"mnist": "mnist", "cats": "catsdogs2"}


def time_epoch(run: Training, loop: bool) -> tuple[float, float, float]:
    """(wall s, CPU s, training loss) of one epoch from the initial state; `loop`: one step per
    call."""
    state = run.place()
    jax.block_until_ready(state)
    wall, cpu = time.perf_counter(), time.process_time()
    with one_step_per_call() if loop else contextlib.nullcontext():
        state, metrics = run.epoch(state, epoch=0)
    jax.block_until_ready(state)
    return time.perf_counter() - wall, time.process_time() - cpu, metrics[0]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,cats")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples-mnist", type=int, default=12_800)
    parser.add_argument("--examples-cats", type=int, default=2_000)
    parser.add_argument(
        "--image-size", type=int, default=None, help="cats only (default: the recipe's 150)"
    )
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}; "
        "ms per step, best round after the first: wall (CPU)"
    )
    for name in args.models.split(","):
        cfg = recipe(
            RECIPES[name],
            {"data.image_size": args.image_size} if args.image_size and name == "cats" else {},
        )
        batch = cfg.train.batch_size
        # both drivers: the same compiled steps and data
        run = training(cfg, random_data(cfg, getattr(args, f"examples_{name}")))
        steps = math.ceil(len(run.dataset) / batch)
        runs: dict[str, list[tuple[float, float, float]]] = {"loop": [], "scan": []}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(time_epoch(run, loop=kind == "loop"))
        best = {k: min(r[1:] or r) for k, r in runs.items()}
        losses = {k: r[0][2] for k, r in runs.items()}
        per_call = step.steps_per_call(steps)
        print(f"{name}: {steps} steps of batch {batch}, scan in calls of {per_call} steps")
        for kind, (wall, cpu, _) in best.items():
            print(f"  {kind:5s} {wall / steps * 1e3:8.1f} ({cpu / steps * 1e3:8.1f})")
        wall_ratio = best["scan"][0] / best["loop"][0]
        cpu_ratio = best["scan"][1] / best["loop"][1]
        print(
            f"  scan / loop = {wall_ratio:.2f} wall, {cpu_ratio:.2f} CPU; "
            f"epoch loss loop {losses['loop']:.6f}, scan {losses['scan']:.6f}"
        )


if __name__ == "__main__":
    main()
