"""Your own images: the lecture's cats-vs-dogs convnet and its experiment-2 recipe on any folder of
N >= 2 classes (cnnjax.config.images).

    # DIR/train/<class>/*.jpg, and validation/ (else a stratified fifth of train/) and test/
    python experiments/images.py --data-dir DIR
    python experiments/images.py --data-dir DIR --image-size 96 --epochs 30 --augment none
    # a TFDS image-classification set by name (pip install 'cnnjax[tfds]')
    python experiments/images.py --data.dataset tfds:cifar10 --image-size 48
    # continue a killed run where it stopped
    python experiments/images.py --data-dir DIR --resume --out checkpoints/images-...

Two classes keep the lecture's Sigmoid head and binary cross-entropy; more get a Softmax head of
one unit per class and categorical cross-entropy (Keras's class_mode="categorical"). Without a
validation/ folder, --data.validation_fraction (0.2) of each class of train/ is held out, the same
files on every rerun. Every field is a flag (--help); --augment none|lecture|preview picks the
augmentation. Writes what catsdogs.py writes; evaluate.py, predict.py and activations.py read its
checkpoints, class names included. Exit codes: 0 done, 2 bad flags / data / run folder, 3 diverged,
5 another process of a multi-process run was lost, 130 interrupted (resumable).
"""

from __future__ import annotations

if __name__ == "__main__":  # first: a stop while jax loads is one line too
    from cnnjax import interrupts

    interrupts.install()

import sys

from cnnjax import config, flags, runs, train


def resolve_config(argv: list[str] | None = None) -> tuple[config.Config, object]:
    """The images recipe; then --augment's preset; then every field flag given. Checked."""
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--augment",
        choices=tuple(config.AUGMENT_PRESETS),
        metavar="PRESET",
        help="augmentation preset, none | lecture | preview (default: lecture)",
    )
    flags.add_flags(parser, config.images(), fixed=("model.name",))
    runs.add_flags(parser)
    args = parser.parse_args(argv)
    with runs.exits():
        # before the config is checked: jax.distributed must join before anything starts jax's
        # backend
        runs.start(args)
        fields = flags.overrides_from_args(args)
        # the preset first: a field given by its own flag wins
        preset = {} if args.augment is None else runs.augment_overrides(args.augment)
        cfg = runs.resolve(config.images(), {**preset, **fields})
    return cfg, args


def main(argv: list[str] | None = None) -> train.Result:
    cfg, args = resolve_config(argv)
    result = runs.execute(cfg, args, argv, preview=True)
    if runs.exit_code(result):
        sys.exit(runs.exit_code(result))
    return result


if __name__ == "__main__":
    runs.run_as_script(main)
