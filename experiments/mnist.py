"""The lecture's MNIST convnet, trained with its recipe (cnnjax.config.mnist).

    python experiments/mnist.py                          # RMSprop 1e-3, 5 epochs, batch 64
    python experiments/mnist.py --epochs 1 --seed 1 --out runs/mnist-try
    python experiments/mnist.py --resume --out runs/mnist-try   # continue a killed run

Expected: test accuracy about 0.991 after 5 epochs (the book reports 0.991; the lecture
about 0.98); README "Results" has the measured run. The data comes by itself: --data-dir,
else CNNJAX_DATA_DIR, else the user cache, else a checksum-verified download.
Writes into --out: config.json, history.json/.csv, history.png, checkpoints/<epoch>/,
tensorboard/. Exit codes: 0 done, 2 bad flags / data / run folder, 3 diverged, 5 another
process of a multi-process run was lost, 130 interrupted (resumable).
"""

from __future__ import annotations

if __name__ == "__main__":  # first: a stop while jax loads is one line too
    from cnnjax import interrupts

    interrupts.install()

import sys

from cnnjax import config, flags, mesh, runs, train


def resolve_config(argv: list[str] | None = None) -> tuple[config.Config, object]:
    """The recipe with the flags given applied, checked; and the parsed flags."""
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    # MNIST's images are 28x28 grayscale and its convnet has no dropout: only what can change is a
    # flag.
    flags.add_flags(
        parser,
        config.mnist(),
        sections=("data", "optim", "train", "run"),
        fixed=("data.dataset", "data.image_size", "data.interpolation"),
    )
    runs.add_flags(parser)
    args = parser.parse_args(argv)
    with runs.exits():
        # before the config is checked: jax.distributed must join before anything starts jax's
        # backend
        runs.start(args)
        cfg = runs.resolve(config.mnist(), flags.overrides_from_args(args))
    return cfg, args


def main(argv: list[str] | None = None) -> train.Result:
    cfg, args = resolve_config(argv)
    result = runs.execute(cfg, args, argv)
    last = result.histories[0][-1]
    if mesh.is_main_process() and not last.get("diverged"):
        print(f"Test accuracy: {last['val_accuracy']:.4f} (test loss {last['val_loss']:.4f})")
    if runs.exit_code(result):
        sys.exit(runs.exit_code(result))
    return result


if __name__ == "__main__":
    runs.run_as_script(main)
