"""Looking inside a trained convnet: the lecture's activation pictures, filter patterns, Grad-CAM.

    python experiments/activations.py --image my_cat.jpg          # the shipped experiment-2 model
    python experiments/activations.py --checkpoint RUN --image my_cat.jpg --filters --heatmap
    python experiments/activations.py --checkpoint checkpoints/mnist --which latest

The model is rebuilt from the checkpoint alone (a run folder: its best epoch, or --which
latest / an epoch number; RUN/checkpoints, RUN/best; or one RUN/checkpoints/<epoch> folder),
by default the experiment-2 model that ships in checkpoints/catsdogs-exp2. The image is
--image, else for the cats-vs-dogs model the first cat of the validation split (sorted file
names) of the data folder (--data-dir or CNNJAX_DATA_DIR), for the MNIST model the first
MNIST test image; it is preprocessed as in training (resized to the model's input with
the run's resize filter, data.interpolation, / 255).

Writes into --out (default: RUN/inspect/):
    input.png                      the image the model sees (grayscale for MNIST)
    channel_<layer>_<c>.png        channel --channel of the first conv layer (the lecture's matshow)
    activations_<i>_<layer>.png    all channels of each of the first --layers conv/pool layers,
                                   16 per row
    filters_<layer>.png            with --filters: what --num-filters filters of --filter-layer
                                   respond to most
    heatmap.png                    with --heatmap: Grad-CAM of --class NAME (a class name of
                                   the checkpoint) or --class-index (default: the predicted
                                   class)
Bad input (no checkpoint there, an unreadable image, a --class the model does not have) prints
one `error: ...` line and exits with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cnnjax import checkpoint, data, files, flags, models, plots, run_folder, runs
from cnnjax import inspect as look
from cnnjax.data.folders import IMAGE_EXTENSIONS, find_cats_dogs_root

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "catsdogs-exp2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        default=str(SHIPPED),
        help="a run folder, RUN/checkpoints, RUN/best, RUN/latest or "
        "RUN/checkpoints/<epoch> (default: the shipped experiment-2 model)",
    )
    parser.add_argument(
        "--which",
        default="best",
        help="with a run folder: best, latest or an epoch number (default: best)",
    )
    flags.add_member_flags(parser)
    parser.add_argument(
        "--image",
        help="an image file (default: the first validation cat, or MNIST's first test image)",
    )
    parser.add_argument(
        "--data-dir", help="data folder for the default image (default: CNNJAX_DATA_DIR)"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=8,
        help="how many conv/pool layers to draw, from the first (default: 8)",
    )
    parser.add_argument(
        "--channel",
        type=int,
        default=2,
        help="channel of the first conv layer drawn on its own (default: 2)",
    )
    parser.add_argument("--out", help="output folder (default: RUN/inspect)")
    parser.add_argument(
        "--filters", action="store_true", help="draw filter patterns (gradient ascent)"
    )
    parser.add_argument("--filter-layer", help="layer for --filters (default: the last conv layer)")
    parser.add_argument(
        "--num-filters",
        type=int,
        default=16,
        help="the first N filters of --filter-layer (default: 16)",
    )
    parser.add_argument(
        "--steps", type=int, default=40, help="gradient ascent steps for --filters (default: 40)"
    )
    parser.add_argument("--heatmap", action="store_true", help="draw the Grad-CAM heatmap")
    parser.add_argument(
        "--class-index", type=int, help="class Grad-CAM explains (default: the predicted one)"
    )
    parser.add_argument(
        "--class",
        dest="class_name",
        metavar="NAME",
        help="class Grad-CAM explains, by name: one the checkpoint was trained on",
    )
    return parser.parse_args(argv)


def default_image_path(data_dir: str | os.PathLike | None) -> Path:
    """The first cat of the validation split, by sorted file name (cat.1000.jpg in
    cats_and_dogs_small)."""
    cats = find_cats_dogs_root(data_dir) / "validation" / "cats"
    files = sorted(
        p
        for p in cats.glob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not files:
        raise data.DataError(f"no images in {cats}")
    return files[0]


def load_input(model, args: argparse.Namespace, interpolation: str) -> np.ndarray:
    """The image (H, W, C) in 0..1, preprocessed as in training (the run's resize filter)."""
    height, width, channels = model.input_shape
    if args.image:
        return look.load_image(args.image, (height, width), channels, interpolation)
    if isinstance(model, models.MnistConvNet):
        return data.load_mnist(args.data_dir)["test_images"][0].astype(np.float32) / 255.0
    return look.load_image(
        default_image_path(args.data_dir), (height, width), channels, interpolation
    )


def save_png(pixels: np.ndarray, path: Path) -> Path:
    """An image in 0..1 as an exact-pixel PNG (grayscale for one channel), written atomically."""
    pixels = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    with files.atomic_path(path) as tmp:
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(tmp, format="PNG")
    return path


def check_args(model, args: argparse.Namespace, first_layer_channels: int) -> None:
    if args.layers < 1:
        raise ValueError(f"--layers must be at least 1, got {args.layers}")
    if not 0 <= args.channel < first_layer_channels:
        raise ValueError(f"--channel must be in 0..{first_layer_channels - 1}, got {args.channel}")
    if args.filters:
        look.resolve_layers(model, [args.filter_layer or look.last_conv_layer(model)])
        if args.num_filters < 1 or args.steps < 0:
            raise ValueError("--num-filters must be at least 1 and --steps at least 0")
    if (
        args.heatmap
        and args.class_index is not None
        and not 0 <= args.class_index < model.head.num_classes
    ):
        raise ValueError(
            f"--class-index must be in 0..{model.head.num_classes - 1}, got {args.class_index}"
        )


def class_to_explain(args: argparse.Namespace, class_names: list[str]) -> int | None:
    """The class index Grad-CAM explains: --class NAME's among the checkpoint's classes, else
    --class-index; None (the predicted class) for neither. Both, naming different classes, is an
    error: which one was meant cannot be guessed."""
    if args.class_name is None:
        return args.class_index
    if args.class_name not in class_names:
        raise ValueError(
            f"--class {args.class_name}: not a class of this model "
            f"(its classes: {', '.join(class_names)})"
        )
    index = class_names.index(args.class_name)
    if args.class_index is not None and args.class_index != index:
        raise ValueError(
            f"--class {args.class_name} is class {index} but --class-index is {args.class_index}; "
            "give one of them"
        )
    return index


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    runs.setup_logging()
    with runs.exits():
        return draw(args)


def draw(args: argparse.Namespace) -> list[Path]:
    """Everything that can fail on bad input happens before the first file is written."""
    model, params, description = checkpoint.load_model(
        args.checkpoint, args.which, args.seed, setting=args.setting
    )
    interpolation = description.get("config", {}).get("data", {}).get("interpolation", "nearest")
    image = load_input(model, args, interpolation)
    conv_pool = [n for n in look.resolve_layers(model) if n.startswith(("conv2d", "max_pooling2d"))]
    # The lecture: the first layers' outputs for one image (MNIST has only 5 conv/pool layers).
    activations = look.capture_activations(model, params, image, conv_pool[: max(args.layers, 1)])
    check_args(model, args, activations[0][1].shape[-1])
    class_names = checkpoint.class_names(model, description)
    class_index = class_to_explain(args, class_names)
    if args.filters:
        filter_layer = args.filter_layer or look.last_conv_layer(model)
        ascent = look.filter_ascent(model, params, filter_layer, args.num_filters, steps=args.steps)
        before, after = ascent.before.mean(), ascent.after.mean()
        print(
            f"{filter_layer}: mean activation {before:.3g} -> {after:.3g} after {args.steps} steps"
        )
    if args.heatmap:
        cam = look.grad_cam(model, params, image, class_index)
        label = class_names[cam.class_index]
        predicted = class_names[cam.predicted]
        print(
            f"Grad-CAM for class {label} (p = {cam.probability:.3f}); "
            f"the model predicts {predicted}"
        )

    out = Path(args.out) if args.out else run_folder.inspect_folder(Path(description["path"]))
    out.mkdir(parents=True, exist_ok=True)
    written = [save_png(image, out / "input.png")]
    # One channel of the first layer, then every channel of each layer, 16 per row.
    first_name, first = activations[0]
    channel_path = out / f"channel_{first_name}_{args.channel}.png"
    written.append(
        plots.plot_channel(
            first, args.channel, channel_path, f"{first_name}, channel {args.channel}"
        )
    )
    for i, (name, activation) in enumerate(activations, start=1):
        written.append(
            plots.plot_activation_grid(
                name, look.activation_grid(activation), out / f"activations_{i}_{name}.png"
            )
        )
    if args.filters:
        title = f"{filter_layer}: the inputs filters respond to most ({args.steps} ascent steps)"
        labels = [f"filter {f}" for f in ascent.filters]
        written.append(
            plots.plot_filter_patterns(
                ascent.patterns, out / f"filters_{filter_layer}.png", title, labels
            )
        )
    if args.heatmap:
        title = f"Grad-CAM at {look.last_conv_layer(model)}: {label} (p = {cam.probability:.2f})"
        written.append(
            plots.plot_heatmap(
                look.overlay_heatmap(image, cam.heatmap), cam.heatmap, out / "heatmap.png", title
            )
        )

    print(f"Wrote {out}/:")
    for path in written:
        print(f"  {path.name}")
    return written


if __name__ == "__main__":
    runs.run_as_script(main)
