"""K seeds trained together (one compiled program, the seeds spread over the mesh's seed axis)
against one seed, same recipe, same process; and (--grid) a whole ablation grid as one program
against its settings in turn.

    python benchmarks/ablation_vmap.py --data-dir ../shared/data [--seeds 8] [--image-size 64]
        [--steps 20] [--json FILE]
    # random images: no data needed
    python benchmarks/ablation_vmap.py --random [--seeds 8] ...
    # the grid: none,flip,rotation,lecture x 4 seeds, 5 epochs at 48 px
    python benchmarks/ablation_vmap.py --data-dir ../shared/data --grid none,flip,rotation,lecture
        --seeds 4 --epochs 5 --image-size 48

The recipe is cats-vs-dogs experiment 2 (cnnjax.config.catsdogs(2): lecture augmentation,
Dropout(0.5), Adam, batch 20) at --image-size. One epoch of --steps steps (the first
steps x 20 training images) is trained once to compile, then once more timed, for one
seed and for K seeds; the per-step time and the ratio K seeds / one seed are printed (and
written to --json). Epochs run as the core runs them (scanned calls; --loop for one call
per step: cnnjax.step.steps_per_call patched to 1). On a GPU the goal is K = 8 seeds for
at most 2x the time of one. On the CPU the seeds of one program run in turn
(cnnjax.mesh.seeds_in_turn), so the goal there is K x one seed or less.

--grid runs the ablation script's own function (cnnjax.ablation.run_ablation, experiment 1's
base recipe as the script's, test split left out) three ways, each from an empty folder,
compiling included, as a user waits for it: the grid in one program (seed mode "grid"), each
setting one program of its seeds ("vmap") and each seed a run of its own ("sequential"); it
prints the grid's time over each peer's (goal on the CPU: <= 0.9).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
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
    subset,
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


def ablation_seconds(base, datasets: dict, settings: list[str], mode: str) -> float:
    """Seconds of run_ablation in one seed mode, from an empty folder, compiling included."""
    from cnnjax import ablation

    chosen = [ablation.parse_setting(name, base) for name in settings]
    with tempfile.TemporaryDirectory() as out:
        begin = time.perf_counter()
        ablation.run_ablation(chosen, base, datasets, None, Path(out), mode, verbose=False)
        return time.perf_counter() - begin


def grid_against_settings(argv: list[str], modes=("grid", "vmap", "sequential")) -> dict:
    """Each seed mode's ablation_seconds in a process of its own (nothing compiled before, as a
    user runs the script), and the grid's ratios to the others."""
    seconds = {}
    for mode in modes:
        with tempfile.TemporaryDirectory() as folder:
            part = Path(folder) / "part.json"
            command = [sys.executable, __file__, *argv, "--only", mode, "--json", str(part)]
            subprocess.run(command, check=True)
            seconds[mode] = json.loads(part.read_text())["seconds"]
    return {
        "seconds": seconds,
        **{f"grid_over_{mode}": seconds["grid"] / seconds[mode] for mode in modes[1:]},
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
    parser.add_argument(
        "--grid", default=None, help="SETTING,...: the grid against its settings in turn"
    )
    parser.add_argument("--epochs", type=int, default=5, help="--grid: epochs (default: 5)")
    parser.add_argument(
        "--train-images", type=int, default=None, help="--grid: the first N training images"
    )
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one mode (internal)
    args = parser.parse_args()
    if args.grid:
        return main_grid(args, sys.argv[1:])
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


def main_grid(args: argparse.Namespace, argv: list[str]) -> None:
    overrides = {
        "data.image_size": args.image_size,
        "train.seeds": args.seeds,
        "train.epochs": args.epochs,
        "run.tensorboard": False,
    }
    base = recipe("catsdogs1", overrides)
    if args.random:
        n = args.train_images or 400
        datasets = {"train": random_data(base, n), "validation": random_data(base, n // 2, 1)}
    else:
        datasets = real_data(base, args.data_dir)
        datasets["train"] = subset(datasets["train"], args.train_images)
    settings = args.grid.split(",")
    if args.only:  # one mode, in this process
        seconds = ablation_seconds(base, datasets, settings, args.only)
        write_json(args.json, {"seconds": seconds})
        return
    print(backend_line())
    result = {
        "settings": settings,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "train_examples": len(datasets["train"]),
        **grid_against_settings([a for a in argv if a != "--json" and a != args.json]),
    }
    s = result["seconds"]
    print(
        f"{len(settings)} settings x {args.seeds} seeds, {args.epochs} epochs, "
        f"{result['train_examples']} training images at {args.image_size}px, each mode a fresh "
        "process"
    )
    print(
        f"grid in one program {s['grid']:.1f} s; settings in turn, each one program "
        f"{s['vmap']:.1f} s; each seed a run {s['sequential']:.1f} s"
    )
    print(
        f"grid / settings in turn = {result['grid_over_vmap']:.2f} (one program each), "
        f"{result['grid_over_sequential']:.2f} (a run per seed); goal <= 0.9"
    )
    write_json(args.json, {"backend": backend_line(), **result})


if __name__ == "__main__":
    main()
