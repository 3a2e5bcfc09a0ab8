"""Which augmentation matters, and how much: a grid of settings, several seeds each.

    python experiments/ablate_augmentation.py --data-dir DIR
    # a CPU-sized run (the one in README "Results"):
    python experiments/ablate_augmentation.py --data-dir DIR --image-size 64 --epochs 20
        --out runs/ablation-64px

The base recipe is experiment 1 of cnnjax.config.catsdogs (Adam 1e-3, batch 20, no
augmentation, no dropout), with any field overridden by its path (--optim.learning_rate
1e-4). Default grid: none; each transform alone at the lecture's range (flip, rotation,
shift, shear, zoom); the lecture's full set; the full set with Dropout(0.5); dropout
alone. --settings picks a subset or adds your own ("rot20:rotation_range=20,dropout=0.3",
or by path: "sharp:augment.interpolation=nearest"). Your own images: --data.dataset folder
(any number of classes, as experiments/images.py; the folder needs test/ as well).

--seed-mode: grid (auto) trains the settings that differ only in numbers (augmentation
ranges, flips, dropout, learning rate), with all their seeds, as the members of one
program, spread over every device and process (cnnjax.grid); vmap one program per
setting; sequential one run per seed. Each member trains as its setting alone would.
Interrupt it and run the same command again: finished settings are skipped, an
unfinished one resumes from its latest checkpoint, a failed one is retried.
Writes into --out: results.csv, results.md, curves.png, differences.png, a run folder
per program (grid-<hash>/) and a folder per setting with its result.json.
Each setting is compared with the reference (--reference, default none) seed by seed:
results.md gives the mean paired difference, its 95% Student's t interval and a verdict,
differences.png draws them. Exit codes: 0 done, 2 bad flags or data, 4 some setting failed
(its error.json says why) or diverged, 130 interrupted.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: a stop while jax loads is one line too
    from cnnjax import interrupts

    interrupts.install()

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cnnjax import ablation, config, data, flags, mesh, report, runs, train


def base_recipe() -> config.Config:
    """Experiment 1's recipe, 30 epochs, 3 seeds: what every setting overrides."""
    cfg = config.catsdogs(1)
    return dataclasses.replace(
        cfg, name="ablation", train=dataclasses.replace(cfg.train, epochs=30, seeds=3)
    )


def subset(images: data.Images, n: int | None, seed: int = 0) -> data.Images:
    """A class-balanced random subset of n training images (all of them when n is None)."""
    if n is None or n >= len(images):
        return images
    rng = np.random.default_rng(seed)
    labels = images.labels
    per_class = n // len(images.class_names)
    keep = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                for c in np.unique(labels)
            ]
        )
    )
    return data.Images(
        images.images[keep],
        labels[keep],
        images.class_names,
        [images.files[i] for i in keep] if images.files else [],
    )


def parse_flags(argv: list[str] | None) -> argparse.Namespace:
    """The ablation's own flags, then every field of the base recipe and the run flags."""
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=[s.name for s in ablation.default_settings()],
        help="setting names, or NAME:field=value,... (default: the whole grid)",
    )
    parser.add_argument(
        "--seed-mode",
        default="auto",
        choices=ablation.SEED_MODES,
        help="grid: every (setting, seed) pair of settings that differ only in numbers in one "
        "program (what auto takes); vmap: one program per setting; sequential: one run per seed "
        "(default: auto)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="the setting every other is compared with, seed by seed (default: none, the base "
        "recipe, where it is a setting, else the first)",
    )
    parser.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="train on a class-balanced subset of N images",
    )
    parser.add_argument(
        "--out",
        default="runs/ablation",
        help="the ablation's folder; a rerun resumes it (default: %(default)s)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="rebuild the table and plot from what --out holds; train nothing",
    )
    flags.add_flags(
        parser,
        base_recipe(),
        sections=("data", "model", "augment", "optim", "train"),
        fixed=("model.name",),
    )
    runs.add_flags(parser)
    return parser.parse_args(argv)


def checked_settings(args: argparse.Namespace) -> tuple[config.Config, list[ablation.Setting]]:
    """The base recipe with the field flags given, and the settings; each checked."""
    base = runs.check_config(config.override(base_recipe(), flags.overrides_from_args(args)))
    settings = [ablation.parse_setting(spec, base) for spec in args.settings]
    names = [s.name for s in settings]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise config.ConfigError(f"two settings are named {twice[0]!r}; give each its own name")
    for setting in settings:
        try:
            runs.check_config(ablation.setting_config(base, setting))
        except config.ConfigError as e:
            raise config.ConfigError(f"setting {setting.name!r}: {e}") from None
    if args.reference is not None and args.reference not in names:
        raise config.ConfigError(
            f"--reference {args.reference!r} is not one of the settings ({', '.join(names)})"
        )
    if args.train_subset is not None and args.train_subset < 2:
        raise config.ConfigError(
            f"--train-subset must be at least 2 (one image per class), got {args.train_subset}"
        )
    if base.data.input == "stream":
        raise config.ConfigError(
            "--data.input stream: the ablation trains every setting on the same images, held "
            "in memory; use --data.input memory or auto"
        )
    return base, settings


def load_datasets(
    base: config.Config, train_subset: int | None
) -> tuple[dict[str, data.Images], data.Images]:
    """The training images (a subset with --train-subset) and the validation split, in memory,
    checked against the model's classes; and the test split."""
    validation = base.data.validation_split
    loaded = data.load(
        dataclasses.replace(base.data, input="memory"),
        tuple(dict.fromkeys(("train", validation, "test"))),
    )
    datasets = {"train": subset(loaded["train"], train_subset)}
    # validating on "train": the images trained on
    datasets.setdefault(validation, loaded[validation])
    train.model_for(base, datasets)  # checks the classes
    return datasets, loaded["test"]


def interrupted(out: Path, settings: list[ablation.Setting], main_process: bool) -> SystemExit:
    """After Ctrl-C: the report of the finished settings rebuilt (process 0), said on stderr."""
    names = [s.name for s in settings]
    results = (
        report.rebuild_report(out, names) if main_process else report.collect_results(out, names)
    )
    done = len(results) - len(report.failed(results))
    if main_process:
        print(
            f"\ninterrupted: {done} finished setting(s) are in {out}/results.md; "
            "the same command skips them and resumes the rest",
            file=sys.stderr,
            flush=True,
        )
    return SystemExit(runs.EXIT_INTERRUPTED)


def print_report(out: Path, failed: list[str], diverged: list[str]) -> None:
    """The results table, what was written, and which settings failed or diverged."""
    results_md = out / "results.md"
    print(results_md.read_text() if results_md.exists() else "no results", flush=True)
    figures = "curves.png, differences.png" if (out / "differences.png").exists() else "curves.png"
    print(
        f"Wrote {out}/: results.csv, results.md, {figures}, one run folder per setting",
        flush=True,
    )
    if diverged:
        print(
            f"error: {len(diverged)} setting(s) diverged: {', '.join(diverged)} (a loss went "
            "NaN or inf; see results.md); try a lower --optim.learning_rate",
            file=sys.stderr,
            flush=True,
        )
    if failed:
        print(
            f"error: {len(failed)} setting(s) failed: {', '.join(failed)} (see their error.json); "
            "run the same command again to retry them",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_flags(argv)
    out = Path(args.out)
    if args.table_only:
        results = report.rebuild_report(out, reference=args.reference)
        print((out / "results.md").read_text() if results else f"no finished settings in {out}")
        return results
    with runs.exits():
        runs.start(args)
        base, settings = checked_settings(args)
        ablation.check_out(out, base, settings, inputs(args))
        datasets, test = load_datasets(base, args.train_subset)
    # with several processes, process 0 prints (and writes)
    main_process = mesh.is_main_process()
    if main_process:
        print(
            f"{base.train.epochs} epochs, {len(datasets['train'])} training images at "
            f"{base.data.image_size}px, validation on {base.data.validation_split}",
            flush=True,
        )
    try:
        results = ablation.run_ablation(
            settings,
            base,
            datasets,
            test,
            out,
            args.seed_mode,
            reference=args.reference,
            inputs=inputs(args),
        )
    except KeyboardInterrupt:
        raise interrupted(out, settings, main_process) from None
    failed, diverged = report.failed(results), report.diverged(results)
    if main_process:
        print_report(out, failed, diverged)
    if failed or diverged:
        raise SystemExit(runs.EXIT_FAILED)
    return results


def inputs(args: argparse.Namespace) -> dict[str, Any]:
    """What decides the numbers besides the recipe and the settings: recorded, checked on a
    rerun."""
    return {"train_subset": args.train_subset}


if __name__ == "__main__":
    runs.run_as_script(main)
