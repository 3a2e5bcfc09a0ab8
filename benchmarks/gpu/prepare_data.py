"""A 150x150 copy of cats_and_dogs_small small enough to travel to the GPU machine.

    python benchmarks/gpu/prepare_data.py --data-dir ../shared/data --out .devdata

The full folder is 67 MB and the device tool carries 64 MiB in all, so each image is
resized here exactly as the loader would (`keras.utils.load_img`: NEAREST to 150x150)
and saved as JPEG quality 95 under OUT/cats_and_dogs_small/<split>/<class>/. Loading the
copy at 150x150 then resizes nothing; the only difference from the original pixels is
the JPEG round trip (measured and printed: mean absolute error in 0-255 units).
OUT must be git-ignored: these are derivatives of the data and never belong in the repo.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cnnjax import data

SIZE = (150, 150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=".devdata")
    parser.add_argument("--splits", nargs="+", default=["train", "validation", "test"])
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    try:
        splits = data.load_cats_dogs(args.data_dir, tuple(args.splits), SIZE)
    except (ValueError, data.DataError) as e:
        sys.exit(f"error: {e}")
    root = Path(args.out) / "cats_and_dogs_small"
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    errors = []
    for split, folder in splits.items():
        for image, name in zip(folder.images, folder.files):  # same names, so the same order when loaded
            path = (tmp / split / name).with_suffix(".jpg")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path, quality=args.quality)
        reread = data.load_image_folder(tmp / split, SIZE, cache=False).images
        errors.append(np.abs(reread.astype(np.float32) - folder.images.astype(np.float32)).mean())
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)  # whole or not at all: a half-written copy is never at OUT
    megabytes = sum(p.stat().st_size for p in root.rglob("*.jpg")) / 2**20
    print(f"wrote {root}: {', '.join(f'{s} {len(f.labels)}' for s, f in splits.items())} images, {megabytes:.1f} MiB; "
          f"JPEG round trip mean |error| {np.mean(errors):.2f}/255")


if __name__ == "__main__":
    main()
