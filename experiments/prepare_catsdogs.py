"""Make the lecture's cats_and_dogs_small from Kaggle's "Dogs vs. Cats" download.

    python experiments/prepare_catsdogs.py --kaggle-dir ~/Downloads/dogs-vs-cats/train
        --out data/cats_and_dogs_small

--kaggle-dir is Kaggle's train folder (cat.0.jpg ... cat.12499.jpg, dog.0.jpg ...; the
folder holding train/ works too). As the book does, per class images 0-999 go to train,
1000-1499 to validation and 1500-1999 to test, under the same file names:

    OUT/train/cats/cat.0.jpg ... cat.999.jpg          OUT/train/dogs/dog.0.jpg ... dog.999.jpg
    OUT/validation/cats/cat.1000.jpg ... cat.1499.jpg  (dogs likewise)
    OUT/test/cats/cat.1500.jpg ... cat.1999.jpg        (dogs likewise)

4,000 files. Every source is checked first (it exists and PIL decodes it) and every copy
is compared with its source; a missing or undecodable source, or a different file already
at a destination (never overwritten), is a one-line error naming it, with exit status 2,
before anything is written. Safe to rerun: identical files already there are skipped, and
a run killed midway is completed (copies are atomic). Prints one summary line.
`--sizes 3 2 2` makes a smaller split of the same shape (train, validation, test per class).
"""

from __future__ import annotations

from cnnjax import flags, runs
from cnnjax.data import kaggle


def main(argv: list[str] | None = None) -> kaggle.SmallSplit:
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kaggle-dir",
        required=True,
        help="Kaggle's Dogs vs. Cats train folder (cat.0.jpg, ..., dog.0.jpg, ...)",
    )
    parser.add_argument(
        "--out", required=True, help="the folder to make: OUT/{train,validation,test}/{cats,dogs}/"
    )
    default_sizes = [n for _, n in kaggle.BOOK_SPLIT_SIZES]
    book_sizes = " ".join(map(str, default_sizes))
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=3,
        default=default_sizes,
        metavar=("TRAIN", "VALIDATION", "TEST"),
        help=f"images per class in each split (default: the book's {book_sizes})",
    )
    args = parser.parse_args(argv)
    # the library's progress lines
    runs.setup_logging()
    sizes = list(zip((split for split, _ in kaggle.BOOK_SPLIT_SIZES), args.sizes))
    with runs.exits():
        result = kaggle.prepare_small_split(args.kaggle_dir, args.out, sizes)
    total = sum(result.counts.values())
    counts = ", ".join(f"{split} {n}" for split, n in result.counts.items())
    print(
        f"{result.out}: {counts} images (cats and dogs, {total} in all); "
        f"copied {result.copied}, already there {result.present}"
    )
    return result


if __name__ == "__main__":
    runs.run_as_script(main)
