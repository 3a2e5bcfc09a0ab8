"""Splits made out of others: a validation split held out of train, stratified per class and
chosen by the examples' names alone (`stratified_holdout`, for folders `split_listing`); and the
class counts a user should hear about before training (`warn_class_counts`)."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import numpy as np

from cnnjax.data.common import DataError
from cnnjax.data.folders import Listing


def stratified_holdout(
    labels: np.ndarray,
    class_names: Sequence[str],
    fraction: float,
    where: str,
    names: Sequence[str] | None = None,
    unit: str = "record",
    hint: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held): positions into `labels`, ascending. Per class round(fraction * n) held out
    (at least one, leaving at least one): those whose name (a file's relative path; by default
    the position as a decimal string) has the smallest sha256, so the choice depends on nothing
    but the names and labels (not on the run, the machine or the device count), and a new
    example moves at most one other. A class without examples holds out none."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction!r}")
    labels = np.asarray(labels)
    names = [str(i) for i in range(len(labels))] if names is None else names
    held: list[int] = []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label).tolist()
        if not members:
            continue
        if len(members) < 2:
            raise DataError(
                f"class {name} has 1 {unit} in {where}: holding out a validation split needs at "
                f"least 2 per class{hint}"
            )
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        members.sort(key=lambda i: hashlib.sha256(names[i].encode()).digest())
        held += members[:count]
    is_held = np.zeros(len(labels), bool)
    is_held[held] = True
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


class ClassCountWarning(UserWarning):
    """A split whose classes hold few images, or very different numbers of them."""


FEW_IMAGES = 10  # fewer in a class: too few to learn or to measure it
UNBALANCED = 3.0  # the largest class over the smallest: accuracy then hides the small classes


def class_counts(listing: Listing) -> dict[str, int]:
    counts = np.bincount(listing.labels, minlength=len(listing.class_names))
    return dict(zip(listing.class_names, counts.tolist(), strict=True))


def warn_class_counts(listing: Listing, split: str) -> None:
    """One ClassCountWarning line with every class's count when a class has fewer than FEW_IMAGES
    images or the largest class UNBALANCED times the smallest."""
    counts = class_counts(listing)
    smallest, largest = min(counts.values()), max(counts.values())
    why = []
    if smallest < FEW_IMAGES:
        why.append(f"fewer than {FEW_IMAGES} images in a class")
    if largest >= UNBALANCED * smallest:
        why.append(f"the largest class {largest / smallest:.1f} times the smallest")
    if why:
        listed = ", ".join(f"{name} {n}" for name, n in counts.items())
        warnings.warn(f"{split}: {' and '.join(why)} ({listed})", ClassCountWarning, stacklevel=2)


def _subset(listing: Listing, keep: Sequence[int]) -> Listing:
    broken = {new: listing.broken[old] for new, old in enumerate(keep) if old in listing.broken}
    files = [listing.files[i] for i in keep]
    labels = [listing.labels[i] for i in keep]
    return Listing(listing.folder, listing.class_names, files, labels, broken)


def split_listing(listing: Listing, fraction: float) -> tuple[Listing, Listing]:
    """(train, validation): per class, `fraction` of its files held out for validation, chosen by
    their names alone (stratified_holdout), so a rerun, another machine or another device
    count holds out the same files. Both keep Keras's order."""
    kept, held = stratified_holdout(
        np.asarray(listing.labels),
        listing.class_names,
        fraction,
        str(listing.folder),
        listing.files,
        "image",
        "; add images or give a validation/ folder",
    )
    return _subset(listing, kept.tolist()), _subset(listing, held.tolist())
