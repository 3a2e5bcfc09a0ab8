"""Classify images with a trained convnet: per image, the class and its probability.

    python experiments/predict.py my_cat.jpg                        # the shipped experiment-2 model
    python experiments/predict.py a.png b.jpg --checkpoint checkpoints/mnist
    python experiments/predict.py photos/*.jpg --checkpoint RUN --which latest

--checkpoint is a run folder (its best epoch; --which latest or an epoch number for
another), RUN/checkpoints, or one RUN/checkpoints/<epoch> folder; by default the
experiment-2 model that ships in checkpoints/catsdogs-exp2. Each image (JPEG or PNG, any
size and mode) is decoded and resized exactly as in training (the run's resize filter,
/ 255). Per image one line, `IMAGE: CLASS (P)`; for a model of more than two classes the
three most probable, best first: `IMAGE: birds (0.612), cats (0.301), dogs (0.087)`. A file
that is not an image gets one `error:` line and the others are still classified; the exit
code is then 2. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: a stop while jax loads is one line too
    from cnnjax import interrupts

    interrupts.install()

import sys
from pathlib import Path

import jax
import numpy as np
from PIL import UnidentifiedImageError

from cnnjax import checkpoint, flags, models, runs
from cnnjax import inspect as look

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "catsdogs-exp2"
TOP = 3  # classes said per image by a model of more than two


def ranked_classes(probabilities: np.ndarray, top: int = TOP) -> list[int]:
    """The class said for an image, most probable first (the lower index first on a tie): the
    best alone for two classes, where the other's probability is 1 minus it; else the `top`
    best."""
    order = np.argsort(-np.asarray(probabilities), kind="stable")
    return [int(c) for c in order[: 1 if len(order) <= 2 else top]]


def main(argv: list[str] | None = None) -> list[tuple[str, str, float]]:
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument(
        "--checkpoint",
        default=str(SHIPPED),
        help="a run folder, RUN/checkpoints or RUN/checkpoints/<epoch> "
        "(default: the shipped experiment-2 model)",
    )
    parser.add_argument(
        "--which",
        default="best",
        help="with a run folder: best, latest or an epoch number (default: best)",
    )
    args = parser.parse_args(argv)
    runs.setup_logging()
    with runs.exits():
        model, params, description = checkpoint.load_model(args.checkpoint, args.which)
        classes = checkpoint.class_names(model, description)
        interpolation = (
            description.get("config", {}).get("data", {}).get("interpolation", "nearest")
        )
        predicted, failed = [], 0
        for path in args.images:
            if not Path(path).is_file():
                why = "a folder, not an image" if Path(path).is_dir() else "no such file"
                print(
                    f"error: {path}: {why}; skipped",
                    file=sys.stderr,
                    flush=True,
                )
                failed += 1
                continue
            try:
                image = look.load_image(
                    path, model.input_shape[:2], model.input_shape[-1], interpolation
                )
            except OSError as e:  # PIL's UnidentifiedImageError is one: not an image, or unreadable
                why = (
                    type(e).__name__
                    if isinstance(e, UnidentifiedImageError)
                    else f"{type(e).__name__}: {e}"
                )
                print(
                    f"error: {path}: not an image that can be read ({why}); skipped",
                    file=sys.stderr,
                    flush=True,
                )
                failed += 1
                continue
            probabilities = np.asarray(jax.device_get(models.predict(model, params, image[None])))[
                0
            ]
            ranked = ranked_classes(probabilities)
            best = ranked[0]
            predicted.append((path, classes[best], float(probabilities[best])))
            print(
                f"{path}: " + ", ".join(f"{classes[c]} ({probabilities[c]:.3f})" for c in ranked),
                flush=True,
            )
    if failed:
        raise SystemExit(runs.EXIT_BAD_INPUT)
    return predicted


if __name__ == "__main__":
    runs.run_as_script(main)
