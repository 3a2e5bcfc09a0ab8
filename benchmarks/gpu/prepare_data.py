"""The data benchmarks/gpu/run.sh needs, small enough to travel to the GPU machine (64 MiB in all).

    python benchmarks/gpu/prepare_data.py --data-dir ../shared/data --out .devdata

OUT/mnist/: MNIST's four IDX .gz files, copied as they are (11 MB).
OUT/cats_and_dogs_small/<split>/<class>/: cats vs dogs at 150x150. The full folder is 67 MB,
so each image is resized here exactly as the loader would (`keras.utils.load_img`: NEAREST
to 150x150) and saved as JPEG quality 95; loading the copy at 150x150 then resizes
nothing, and the only difference from the original pixels is the JPEG round trip
(measured and printed: mean absolute error in 0-255 units). Train and validation only by
default: the benchmarks use no test images (--splits train validation test adds them).

OUT must be git-ignored (.devdata/ is): these are copies of the data and never belong in
the repository. Each part is written whole or not at all (a .partial folder renamed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from cnnjax import data  # noqa: E402
from cnnjax.data.mnist import find_mnist_files  # noqa: E402

SIZE = (150, 150)
CARRY_LIMIT_MIB = 64


def copy_mnist(source: Path, out: Path) -> int:
    files = find_mnist_files(source)
    if files is None:
        raise data.DataError(f"{source} does not hold MNIST's four IDX files")
    data.load_mnist(source)  # parses: a broken file stops here, not on the GPU machine
    target, tmp = out / "mnist", out / "mnist.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in files.values():
        shutil.copy2(path, tmp / path.name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    return sum(p.stat().st_size for p in target.iterdir())


def copy_cats_dogs(
    data_dir: str | None, out: Path, splits: list[str], quality: int
) -> tuple[int, str]:
    folders = data.load_splits(data.find_cats_dogs_root(data_dir, splits), splits, SIZE)
    root = out / "cats_and_dogs_small"
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    errors = []
    for split, folder in folders.items():
        for image, name in zip(
            folder.images, folder.files
        ):  # same names, so the same order when loaded
            path = (tmp / split / name).with_suffix(".jpg")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path, quality=quality)
        reread = data.load_image_folder(tmp / split, SIZE, cache=False).images
        errors.append(np.abs(reread.astype(np.float32) - folder.images.astype(np.float32)).mean())
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    counts = ", ".join(f"{s} {len(f.labels)}" for s, f in folders.items())
    return sum(
        p.stat().st_size for p in root.rglob("*.jpg")
    ), f"{counts} images, JPEG round trip mean |error| {np.mean(errors):.2f}/255"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=None,
        help="holds mnist/ and cats_and_dogs_small/ (e.g. ../shared/data)",
    )
    parser.add_argument("--mnist-dir", default=None, help="MNIST's folder, if not DATA_DIR/mnist")
    parser.add_argument("--out", default=".devdata")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"])
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    out = Path(args.out)
    mnist_dir = Path(args.mnist_dir) if args.mnist_dir else Path(args.data_dir or ".") / "mnist"
    try:
        mnist_bytes = copy_mnist(mnist_dir, out)
        cats_bytes, cats_note = copy_cats_dogs(args.data_dir, out, args.splits, args.quality)
    except (ValueError, data.DataError) as e:
        sys.exit(f"error: {e}")
    total = (mnist_bytes + cats_bytes) / 2**20
    mnist_mib, cats_mib = mnist_bytes / 2**20, cats_bytes / 2**20
    print(
        f"wrote {out}/mnist ({mnist_mib:.1f} MiB) and "
        f"{out}/cats_and_dogs_small ({cats_mib:.1f} MiB: {cats_note}); {total:.1f} MiB in all"
    )
    if total > CARRY_LIMIT_MIB:
        sys.exit(
            f"error: {total:.1f} MiB is more than the {CARRY_LIMIT_MIB} MiB the device tool "
            "carries; drop a split or lower --quality"
        )


if __name__ == "__main__":
    main()
