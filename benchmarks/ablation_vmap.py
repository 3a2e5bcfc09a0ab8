"""K seeds trained together (one compiled program, the seeds spread over the mesh's seed axis)
against one seed, same recipe, same process. The ablation's "vmap" seed mode relies on the first.

    python benchmarks/ablation_vmap.py --data-dir ../shared/data [--seeds 8] [--image-size 64]
        [--steps 20] [--json FILE]
    # random images: no data needed
    python benchmarks/ablation_vmap.py --random [--seeds 8] ...

The recipe is cats-vs-dogs experiment 2 (cnnjax.config.catsdogs(2): lecture augmentation,
Dropout(0.5), Adam, batch 20) at --image-size. One epoch of --steps steps (the first
steps x 20 training images) is trained once to compile, then once more timed, for one
seed and for K seeds; the per-step time and the ratio K seeds / one seed are printed (and
written to --json). Epochs run as the core runs them (scanned calls; --loop for one call
per step: cnnjax.step.steps_per_call patched to 1). On a GPU the goal is K = 8 seeds for
at most 2x the time of one; on a 2-core CPU the work itself is the limit, so K x or less
would pay: the ablation's "auto" seed mode takes sequential on the CPU because this measured
more than K x there.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repository, for benchmarks.common
from benchmarks.common import (  # noqa: E402
    backend_line,
    epoch_twice,
    first,
    one_step_per_call,
    random_data,
    real_data,
    recipe,
    training,
    write_json,
)


def ms_per_step(num_seeds: int, cfg, dataset, steps: int, loop: bool) -> tuple[float, dict]:
    """Milliseconds per training step of `num_seeds` seeds (compile excluded), and the mesh."""
    run = training(cfg, dataset, num_seeds)
    with one_step_per_call() if loop else contextlib.nullcontext():
        seconds, _ = epoch_twice(run)
    return seconds[-1] / steps * 1e3, dict(run.mesh.shape)


def measure(cfg, dataset, seeds: int, steps: int, loop: bool = False) -> dict:
    """One seed and `seeds` seeds on the first steps x batch images: ms per step and their ratio."""
    dataset = first(dataset, steps * cfg.train.batch_size)
    one, one_mesh = ms_per_step(1, cfg, dataset, steps, loop)
    together, k_mesh = ms_per_step(seeds, cfg, dataset, steps, loop)
    return {
        "seeds": seeds,
        "steps": steps,
        "image_size": cfg.data.image_size,
        "batch_size": cfg.train.batch_size,
        "one_seed_ms_per_step": one,
        "k_seeds_ms_per_step": together,
        "k_over_one": together / one,
        "k_over_sequential": together / (seeds * one),
        "mesh_one": one_mesh,
        "mesh_k": k_mesh,
        "scan": not loop,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--random", action="store_true", help="random images instead of the data")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--loop", action="store_true", help="one jitted step per call instead of scanned calls"
    )
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    cfg = recipe("catsdogs2", {"data.image_size": args.image_size})
    n = args.steps * cfg.train.batch_size
    dataset = (
        random_data(cfg, n) if args.random else real_data(cfg, args.data_dir, ("train",))["train"]
    )
    if len(dataset) < n:
        parser.error(f"--steps {args.steps} needs {n} training images, the data has {len(dataset)}")
    print(backend_line())
    result = measure(cfg, dataset, args.seeds, args.steps, args.loop)
    print(
        f"experiment 2 at {args.image_size}px, batch {cfg.train.batch_size}, {args.steps} steps "
        f"({'one call per step' if args.loop else 'scanned calls'})"
    )
    print(
        f"1 seed: {result['one_seed_ms_per_step']:.1f} ms/step (mesh {result['mesh_one']}); "
        f"{args.seeds} seeds together: "
        f"{result['k_seeds_ms_per_step']:.1f} ms/step (mesh {result['mesh_k']})"
    )
    print(
        f"{args.seeds} seeds / 1 seed = {result['k_over_one']:.2f}x (GPU goal: <= 2x for 8 seeds); "
        f"together / one after another = {result['k_over_sequential']:.2f}"
    )
    write_json(args.json, {"backend": backend_line(), **result})


if __name__ == "__main__":
    main()
