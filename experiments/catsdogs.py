"""Cats vs dogs from scratch: the lecture's two experiments (cnnjax.config.catsdogs).

    # experiment 1: no augmentation, no dropout, Adam 1e-3, batch 20, 30 epochs (overfits)
    python experiments/catsdogs.py --data-dir DIR
    # experiment 2: the lecture's augmentation + Dropout(0.5) after Flatten, 100 epochs
    python experiments/catsdogs.py --data-dir DIR --dropout
    # continue a killed run where it stopped
    python experiments/catsdogs.py --data-dir DIR --dropout --resume
        --out checkpoints/catsdogs-exp2-...

DIR holds train/ and validation/ (and test/), each with cats/ and dogs/ (Keras's
flow_from_directory layout; experiments/prepare_catsdogs.py builds it from Kaggle's
download). Change one piece at a time: --augment none|lecture|preview, then any field by
its path (--augment.rotation_range 20, --model.dropout 0.3, --optim.learning_rate 1e-4);
--help lists them all with their defaults.

Expected (README "Results"): experiment 1 reaches training accuracy near 1.0 while
validation accuracy stalls near 0.70; experiment 2 ends near 0.80-0.85.
Writes into --out: config.json, preview.png (one training image and four augmented
versions), history.json/.csv, history.png, checkpoints/<epoch>/ (the latest epochs and
the one of lowest validation loss), tensorboard/. Evaluate a checkpoint on the test
split with experiments/evaluate.py. Exit codes: 0 done, 2 bad flags / data / run folder,
3 diverged, 5 another process of a multi-process run was lost, 130 interrupted (resumable).
"""

from __future__ import annotations

if __name__ == "__main__":  # first: a stop while jax loads is one line too
    from cnnjax import interrupts

    interrupts.install()

import sys

from cnnjax import config, flags, runs, train


def resolve_config(argv: list[str] | None = None) -> tuple[config.Config, object]:
    """Experiment 1, or 2 with --dropout; then --augment's preset; then every field flag given.
    Checked."""
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dropout",
        nargs="?",
        const=0.5,
        type=float,
        metavar="RATE",
        help="experiment 2: the lecture's augmentation, 100 epochs and Dropout(RATE) after Flatten "
        "(RATE: 0.5)",
    )
    parser.add_argument(
        "--augment",
        choices=tuple(config.AUGMENT_PRESETS),
        metavar="PRESET",
        help="augmentation preset, none | lecture | preview "
        "(default: none; lecture with --dropout)",
    )
    flags.add_flags(
        parser,
        config.catsdogs(1),
        fixed=("data.dataset", "model.name"),
        other_defaults={"experiment 2": config.catsdogs(2)},
    )
    runs.add_flags(parser)
    args = parser.parse_args(argv)
    with runs.exits():
        # before the config is checked: jax.distributed must join before anything starts jax's
        # backend
        runs.start(args)
        fields = flags.overrides_from_args(args)
        # the preset first: a field given by its own flag wins
        overrides = {} if args.augment is None else runs.augment_overrides(args.augment)
        if args.dropout is not None:
            if (
                "model.dropout" in fields
                and config.override(config.catsdogs(2), fields).model.dropout != args.dropout
            ):
                given = fields["model.dropout"]
                raise config.ConfigError(
                    f"--dropout {args.dropout} and --model.dropout {given} disagree"
                )
            overrides["model.dropout"] = args.dropout
        cfg = runs.resolve(
            config.catsdogs(2 if args.dropout is not None else 1), {**overrides, **fields}
        )
    return cfg, args


def main(argv: list[str] | None = None) -> train.Result:
    cfg, args = resolve_config(argv)
    result = runs.execute(cfg, args, argv, preview=True)
    if runs.exit_code(result):
        sys.exit(runs.exit_code(result))
    return result


if __name__ == "__main__":
    runs.run_as_script(main)
