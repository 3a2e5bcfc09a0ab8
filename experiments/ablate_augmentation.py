"""Which augmentation matters, and how much: a grid of settings, several seeds each.

    python experiments/ablate_augmentation.py --data-dir ../shared/data
    # a CPU-sized run (the one in README "Results"):
    python experiments/ablate_augmentation.py --data-dir ../shared/data --image-size 64 --epochs 20 --out checkpoints/ablation-64px

Default grid: none; each transform alone at the lecture's range (flip, rotation, shift,
shear, zoom); the lecture's full set; the full set with Dropout(0.5); dropout alone.
--settings picks a subset or adds your own ("rot20:rotation_range=20,dropout=0.3").
All seeds of a setting train together (jax.vmap), each with its own initialisation,
shuffling, augmentation and dropout. Interrupt it and run it again with the same --out:
finished settings are skipped, an unfinished one resumes from its last epoch.
Writes into --out: results.csv, results.md, curves.png, and one folder per setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from cnnjax import ablation, data


def subset(images: np.ndarray, labels: np.ndarray, n: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced random subset of n training images (all of them when n is None)."""
    if n is None or n >= len(labels):
        return images, labels
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = n // len(classes)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]))
    return images[keep], labels[keep]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--settings", nargs="+", default=[s.name for s in ablation.default_settings()])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--train-subset", type=int, default=None, help="train on a class-balanced subset of N images")
    parser.add_argument("--out", default="checkpoints/ablation")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table and plot from what --out holds; train nothing")
    args = parser.parse_args(argv)
    if args.table_only:
        results = ablation.rebuild_report(Path(args.out))
        print((Path(args.out) / "results.md").read_text() if results else f"no finished settings in {args.out}")
        return results
    try:
        settings = [ablation.parse_setting(spec) for spec in args.settings]
        size = (args.image_size, args.image_size)
        splits = data.load_cats_dogs(args.data_dir, ("train", "validation", "test"), size)
    except (ValueError, data.DataError) as e:
        sys.exit(f"error: {e}")
    arrays = {name: (split.images, split.labels) for name, split in splits.items()}
    arrays["train"] = subset(*arrays["train"], args.train_subset)
    config = ablation.AblationConfig(
        seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, image_size=args.image_size
    )
    print(f"{len(settings)} settings x {args.seeds} seeds, {args.epochs} epochs, {len(arrays['train'][1])} training images "
          f"at {args.image_size}px; {dataclasses.asdict(config)}")
    out = Path(args.out)
    try:
        results = ablation.run_ablation(settings, config, arrays, out)
    except KeyboardInterrupt:
        results = ablation.rebuild_report(out)
        done = f"{len(results)} finished settings are in {out}/results.md" if results else "no setting had finished"
        sys.exit(f"interrupted: {done}; the same command with --out {out} skips finished settings and resumes the rest")
    print((out / "results.md").read_text() if (out / "results.md").exists() else "no results")
    print(f"Wrote {out}/: results.csv, results.md, curves.png, one folder per setting")
    return results


if __name__ == "__main__":
    main()
