"""The GPU measurements of benchmarks/gpu/run.sh, one part per call, each written as JSON; `merge`
puts the parts together with the goals.

    python benchmarks/gpu/bench.py mnist    --data .devdata --json OUT/parts/mnist.json    [--smoke]
    python benchmarks/gpu/bench.py catsdogs --data .devdata --json OUT/parts/catsdogs.json [--smoke]
    python benchmarks/gpu/bench.py seeds    --data .devdata --json OUT/parts/seeds.json    [--smoke]
    python benchmarks/gpu/bench.py grid     --data .devdata --json OUT/parts/grid.json     [--smoke]
    python benchmarks/gpu/bench.py merge    --parts OUT/parts --json OUT/results.json

mnist     the MNIST recipe (cnnjax.config.mnist()), 5 epochs with validation, the data on the
          device: wall time with compilation excluded (one epoch trained first and thrown
          away), compilation reported apart; goal on one H200: <= 2 s and >= 0.990 accuracy.
          Epochs run as cnnjax.train's loop runs them (benchmarks/common.py's timed_fit:
          its internals, without checkpoints, history files or figures).
catsdogs  experiment 2 (cnnjax.config.catsdogs(2)) at 150 px: seconds per epoch (median of
          the timed epochs after a compiling one) and 100 epochs projected; goal <= 60 s.
seeds     K=8 seeds of experiment 2 at 150 px in one program against one seed, ms per
          step (benchmarks/ablation_vmap.py); goal <= 2x.
grid      an ablation grid (none, flip, rotation, lecture x 4 seeds, experiment 1's base at
          150 px, 2 epochs) as one program against its settings in turn, one program each,
          each way a fresh process, compiling included (benchmarks/ablation_vmap.py --grid);
          goal <= 0.9; its seconds per epoch also give the lecture-sized grid's duration.
The device-count comparison is benchmarks/scaling.py's (run.sh calls it).

--smoke: tiny settings (subsets, small images, 1-2 epochs, K=2) so the whole chain can be
checked on a CPU; its figures mean nothing. Nothing here needs more than the GPU image has
(jax, flax, optax, orbax, numpy, pillow; no TensorFlow, no tensorboardX, no network).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from benchmarks.common import (  # noqa: E402
    backend_line,
    real_data,
    recipe,
    subset,
    timed_fit,
    write_json,
)

GOALS = {
    "mnist_wall_s": 2.0,
    "mnist_accuracy": 0.990,
    "catsdogs_100_epochs_s": 60.0,
    "seeds_k_over_one": 2.0,
    "grid_over_settings": 0.9,
}


def splits(cfg, data_dir: str, n_train: int | None, n_val: int | None):
    """cfg's training and validation split from data_dir, in memory; with sizes (--smoke),
    subsets."""
    datasets = real_data(cfg, data_dir)
    return subset(datasets["train"], n_train), subset(datasets[cfg.data.validation_split], n_val)


def mnist(data: str, smoke: bool) -> dict[str, Any]:
    epochs = 1 if smoke else 5
    cfg = recipe("mnist", {"train.epochs": epochs})
    train_set, validation = splits(
        cfg, str(Path(data) / "mnist"), *((1024, 500) if smoke else (None, None))
    )
    timing = timed_fit(cfg, train_set, validation, epochs)
    last = timing["histories"][0][-1]
    return {
        "epochs": epochs,
        "train_examples": len(train_set),
        "wall_s": timing["wall_s"],
        "epoch_s": timing["epoch_s"],
        "compile_s_estimate": timing["compile_s_estimate"],
        "warmup_epoch_s": timing["warmup_epoch_s"],
        "val_accuracy": last["val_accuracy"],
        "val_loss": last["val_loss"],
        "mesh": timing["mesh"],
    }


def catsdogs(data: str, smoke: bool) -> dict[str, Any]:
    epochs = 2 if smoke else 3
    cfg = recipe("catsdogs2", {"data.image_size": 48 if smoke else 150, "train.epochs": epochs})
    train_set, validation = splits(cfg, data, *((60, 40) if smoke else (None, None)))
    timing = timed_fit(cfg, train_set, validation, epochs)
    return {
        "image_size": cfg.data.image_size,
        "epochs_timed": epochs,
        "train_examples": len(train_set),
        "epoch_s": timing["epoch_s"],
        "median_epoch_s": timing["median_epoch_s"],
        "projected_100_epochs_s": 100 * timing["median_epoch_s"],
        "compile_s_estimate": timing["compile_s_estimate"],
        "val_accuracy_last": timing["histories"][0][-1]["val_accuracy"],
        "mesh": timing["mesh"],
    }


def seeds(data: str, smoke: bool) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ablation_vmap import measure

    size, k, steps = (48, 2, 3) if smoke else (150, 8, 50)
    cfg = recipe("catsdogs2", {"data.image_size": size})
    return measure(cfg, real_data(cfg, data, ("train",))["train"], k, steps)


def grid(data: str, smoke: bool) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ablation_vmap import grid_against_settings

    size, seeds, epochs, images = (48, 2, 1, "40") if smoke else (150, 4, 2, "2000")
    argv = [
        *("--data-dir", data, "--grid", "none,flip,rotation,lecture"),
        *("--seeds", str(seeds), "--epochs", str(epochs), "--image-size", str(size)),
        *("--train-images", images),
    ]
    result = grid_against_settings(argv, modes=("grid", "vmap"))
    members_epochs = 4 * seeds * epochs
    return {
        "image_size": size,
        "seeds": seeds,
        "epochs": epochs,
        **result,
        "grid_s_per_member_epoch": result["seconds"]["grid"] / members_epochs,
    }


def merge(parts: Path) -> dict[str, Any]:
    """Every part found, a note for each missing one, and each goal: met, missed, or not
    measured."""
    record: dict[str, Any] = {"goals": GOALS, "parts": {}}
    for name in ("mnist", "catsdogs", "seeds", "grid", "scaling_mnist", "scaling_catsdogs"):
        path = parts / f"{name}.json"
        missing = {"missing": "no result (timed out or failed: see log.txt)"}
        record["parts"][name] = json.loads(path.read_text()) if path.is_file() else missing
    p = record["parts"]
    record["smoke"] = any(
        part.get("smoke") for part in p.values()
    )  # tiny CPU settings: the figures mean nothing

    def check(part: str, key: str, goal: float, at_most: bool = True) -> dict[str, Any]:
        value = p[part].get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return {"value": None, "goal": goal, "met": None}
        return {"value": value, "goal": goal, "met": value <= goal if at_most else value >= goal}

    record["verdict"] = {
        "mnist_wall_s": check("mnist", "wall_s", GOALS["mnist_wall_s"]),
        "mnist_accuracy": check("mnist", "val_accuracy", GOALS["mnist_accuracy"], at_most=False),
        "catsdogs_100_epochs_s": check(
            "catsdogs", "projected_100_epochs_s", GOALS["catsdogs_100_epochs_s"]
        ),
        "seeds_k_over_one": check("seeds", "k_over_one", GOALS["seeds_k_over_one"]),
        "grid_over_settings": check("grid", "grid_over_vmap", GOALS["grid_over_settings"]),
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("mnist", "catsdogs", "seeds", "grid", "merge"))
    parser.add_argument(
        "--data", default=".devdata", help="holds mnist/ and cats_and_dogs_small/ (prepare_data.py)"
    )
    parser.add_argument("--parts", default=None, help="merge: the folder of the parts")
    parser.add_argument("--json", required=True)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny settings, to check the chain on a CPU"
    )
    args = parser.parse_args()
    if args.part == "merge":
        record = merge(Path(args.parts))
        write_json(args.json, record)
        print(json.dumps(record["verdict"], indent=1))
        return
    start = time.perf_counter()
    result = {"mnist": mnist, "catsdogs": catsdogs, "seeds": seeds, "grid": grid}[args.part](
        args.data, args.smoke
    )
    record = {
        "backend": backend_line(),
        "smoke": args.smoke,
        "seconds_in_all": time.perf_counter() - start,
        **result,
    }
    write_json(args.json, record)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
