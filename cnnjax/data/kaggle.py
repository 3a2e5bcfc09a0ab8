"""The lecture's cats_and_dogs_small, copied out of Kaggle's "Dogs vs. Cats" train folder
(experiments/prepare_catsdogs.py).

Kaggle names its files cat.0.jpg ... cat.12499.jpg and dog.0.jpg ...; the book takes, per class,
images 0-999 for train, 1000-1499 for validation and 1500-1999 for test, under the same file names.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cnnjax.data.common import DataError, first_line, thread_map
from cnnjax.files import atomic_path, clean_orphans, sha256

log = logging.getLogger(__name__)

BOOK_SPLIT_SIZES = (("train", 1000), ("validation", 500), ("test", 500))  # images per class
KAGGLE_CLASSES = (("cat", "cats"), ("dog", "dogs"))  # file name prefix, class folder


@dataclass
class SmallSplit:
    """What prepare_small_split did: images per split (both classes), files copied,
    files already there."""

    out: Path
    counts: dict[str, int]
    copied: int
    present: int


def _check_sizes(sizes: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    checked = [(str(split), int(n)) for split, n in sizes]
    if (
        not checked
        or any(n < 1 for _, n in checked)
        or len({split for split, _ in checked}) != len(checked)
    ):
        raise ValueError(
            f"sizes must be distinct (split, count) pairs with counts >= 1, got {sizes!r}"
        )
    return checked


def small_split_plan(
    kaggle_dir: str | os.PathLike,
    out: str | os.PathLike,
    sizes: Sequence[tuple[str, int]] = BOOK_SPLIT_SIZES,
) -> list[tuple[Path, Path]]:
    """(source, destination) for every file: per class the first sizes[0] images (by
    number) to out/<first split>/{cats,dogs}/, under the same name, the next sizes[1] to
    the second split, ..."""
    kaggle, out, sizes = Path(kaggle_dir).expanduser(), Path(out).expanduser(), _check_sizes(sizes)
    plan = []
    for prefix, class_folder in KAGGLE_CLASSES:
        index = 0
        for split, n in sizes:
            names = [f"{prefix}.{i}.jpg" for i in range(index, index + n)]
            plan += [(kaggle / name, out / split / class_folder / name) for name in names]
            index += n
    return plan


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _checked_source(path: Path) -> str | BaseException:
    """sha256 of a source file's bytes after PIL decoded those very bytes, or why the
    file cannot be used."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return hashlib.sha256(data).hexdigest()
    except Exception as e:  # noqa: BLE001 - any failure means this file cannot be used
        return e


def prepare_small_split(
    kaggle_dir: str | os.PathLike,
    out: str | os.PathLike,
    sizes: Sequence[tuple[str, int]] = BOOK_SPLIT_SIZES,
    workers: int | None = None,
) -> SmallSplit:
    """Copy the book's cats_and_dogs_small out of Kaggle's Dogs vs. Cats train folder
    (kaggle_dir or its train/).

    Every source must exist and decode, and no destination hold a different file, before anything is
    written; then each missing file is copied atomically and compared with its source: a rerun
    leaves identical files alone."""
    kaggle = Path(kaggle_dir).expanduser()
    if not kaggle.is_dir():
        raise DataError(
            f"Kaggle folder {kaggle} does not exist; pass the train/ folder of Kaggle's "
            "Dogs vs. Cats (cat.0.jpg, ...)"
        )
    if not (kaggle / "cat.0.jpg").exists() and (kaggle / "train" / "cat.0.jpg").exists():
        kaggle = kaggle / "train"
    out, sizes = Path(out).expanduser(), _check_sizes(sizes)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass the folder to make")
    plan = small_split_plan(kaggle, out, sizes)
    planned = {dest for _, dest in plan}
    for folder in sorted({dest.parent for dest in planned}):
        present = folder.iterdir() if folder.is_dir() else ()
        if extra := sorted(
            p.name for p in present if p not in planned and not p.name.startswith(".")
        ):
            raise DataError(
                f"{folder} holds {extra[0]}{_more(extra)}, which this split puts elsewhere or "
                "nowhere (an earlier run with other --sizes?): splits sharing images would mislead "
                "every validation; choose another --out"
            )
    start = time.perf_counter()

    if missing := [src for src, _ in plan if not src.is_file()]:
        per_class = sum(n for _, n in sizes)
        last = per_class - 1
        ranges = [f"{prefix}.0.jpg ... {prefix}.{last}.jpg" for prefix, _ in KAGGLE_CLASSES]
        raise DataError(
            f"{missing[0]} is missing{_more(missing)}: --kaggle-dir must be Kaggle's Dogs vs. Cats "
            f"train folder, holding {' and '.join(ranges)}"
        )
    digests = thread_map(_checked_source, [src for src, _ in plan], workers, "cnnjax-check")
    if bad := [
        (src, d) for (src, _), d in zip(plan, digests, strict=True) if isinstance(d, BaseException)
    ]:
        src, e = bad[0]
        raise DataError(
            f"{src} cannot be decoded ({type(e).__name__}: {first_line(e)}){_more(bad)}; "
            "replace it with the file from the Kaggle download"
        )
    log.info(
        "checked %d Kaggle images in %s (all there, all decode) in %.1f s",
        len(plan),
        kaggle,
        time.perf_counter() - start,
    )

    to_copy = []
    for (src, dest), digest in zip(plan, digests, strict=True):
        if not os.path.lexists(dest):
            to_copy.append((src, dest, digest))
        elif dest.is_symlink() or not dest.is_file() or sha256(dest) != digest:
            raise DataError(
                f"refusing to overwrite {dest}: it differs from {src}; "
                "move it away or choose another --out"
            )

    start = time.perf_counter()
    for folder in sorted({dest.parent for _, dest in plan}):
        clean_orphans(folder)  # what a killed run was writing when it died

    def copy(item: tuple[Path, Path, str]) -> None:
        src, dest, digest = item
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
            # raising here removes the temporary: dest is never a bad copy
            if sha256(tmp) != digest:
                raise DataError(
                    f"copying {src} to {dest} gave different bytes (did the source change?); "
                    "run again"
                )

    thread_map(copy, to_copy, workers, "cnnjax-copy")
    present = len(plan) - len(to_copy)
    log.info(
        "copied %d files into %s in %.1f s (%d already there)",
        len(to_copy),
        out,
        time.perf_counter() - start,
        present,
    )
    return SmallSplit(
        out, {split: n * len(KAGGLE_CLASSES) for split, n in sizes}, len(to_copy), present
    )
