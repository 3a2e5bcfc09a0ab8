"""Paired differences between ablation settings: which setting differs from the reference, and by
how much, with a 95% Student's t interval over seeds.

Seed k of every setting starts from the same initial weights and sees the same epoch order, so
setting and reference are paired by seed: the difference seed by seed removes most of the spread
between seeds that an unpaired comparison of two means carries. With differences d_1..d_n:

    mean d, interval mean d -+ t(0.975, n - 1) * sd(d) / sqrt(n)     (sd with n - 1)

A setting is "better" or "worse" when the interval excludes 0 (in the metric's good direction:
higher accuracy, lower loss), else "not resolved with n seeds", with the seeds the observed mean
and spread would need for the interval to exclude 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
# (per-seed summary key, label, +1 where higher is better, -1 where lower is)
METRICS = (
    ("test_accuracy", "test acc (best ckpt)", +1),
    ("best_val_accuracy", "best val acc", +1),
    ("best_val_loss", "lowest val loss", -1),
)
LABELS = {key: label for key, label, _ in METRICS}
_MAX_SEEDS = 10_000  # beyond this, "seeds needed" is reported as more than it


@dataclasses.dataclass(frozen=True)
class Difference:
    """One setting minus the reference in one metric, over the seeds both have a value for."""

    metric: str
    seeds: int
    mean: float
    low: float
    high: float
    verdict: str  # "better", "worse", "not resolved with N seeds" or "n/a: ..."
    seeds_needed: int | None  # where not resolved: seeds that would resolve the observed difference

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def t_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% Student's t interval of paired differences (n >= 2)."""
    d = np.asarray(differences, np.float64)
    n = len(d)
    mean = float(np.mean(d))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * np.std(d, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def seeds_needed(mean: float, sd: float) -> int | None:
    """The fewest seeds n >= 2 whose t interval, with this mean and standard deviation, excludes
    0; None when the mean is 0 (no difference to resolve)."""
    if mean == 0:
        return None
    n = np.arange(2, _MAX_SEEDS + 1)
    enough = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / np.sqrt(n) < abs(mean)
    return int(n[np.argmax(enough)]) if enough.any() else _MAX_SEEDS + 1


def difference(
    setting: Sequence[float], reference: Sequence[float], metric: str, direction: int
) -> Difference:
    """setting - reference seed by seed (pairs where either is missing or NaN left out)."""
    pairs = [
        (s, r)
        for s, r in zip(setting, reference)
        if s is not None and r is not None and math.isfinite(s) and math.isfinite(r)
    ]
    d = [s - r for s, r in pairs]
    if len(d) < 2:
        nan = math.nan
        return Difference(metric, len(d), nan, nan, nan, "n/a: fewer than 2 paired seeds", None)
    mean, low, high = t_interval(d)
    if low > 0 or high < 0:
        verdict = "better" if mean * direction > 0 else "worse"
        needed = None
    else:
        verdict = f"not resolved with {len(d)} seeds"
        needed = seeds_needed(mean, float(np.std(d, ddof=1)))
    return Difference(metric, len(d), mean, low, high, verdict, needed)


def reference_name(names: Sequence[str], wanted: str | None = None) -> str:
    """The reference setting: `wanted`, else "none" (the base recipe) when present, else the
    first."""
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"reference setting {wanted!r} is not among {', '.join(names)}")
        return wanted
    return "none" if "none" in names else names[0]


def differences(results: Sequence[dict[str, Any]], reference: str) -> dict[str, list[Difference]]:
    """For each setting other than the reference (and failed ones), its Difference per metric."""
    by_name = {r["name"]: r for r in results}
    ref_seeds = by_name[reference]["seeds"]
    out = {}
    for result in results:
        if result["name"] == reference or not result["seeds"]:
            continue
        out[result["name"]] = [
            difference(
                [s[key] for s in result["seeds"]], [s[key] for s in ref_seeds], key, direction
            )
            for key, _, direction in METRICS
        ]
    return out


def from_reference(
    results: Sequence[dict[str, Any]], wanted: str | None = None
) -> tuple[str, dict[str, list[Difference]]]:
    """The reference among the finished settings (`wanted` where it finished, else as
    reference_name picks) and every other finished setting's differences from it; ("", {}) when
    none has finished."""
    finished = [r for r in results if r["seeds"]]
    names = [r["name"] for r in finished]
    if not names:
        return "", {}
    reference = reference_name(names, wanted if wanted in names else None)
    return reference, differences(finished, reference)


def _cell(diff: Difference) -> str:
    if math.isnan(diff.mean):
        return diff.verdict
    fmt = "+.4f" if diff.metric.endswith("loss") else "+.3f"
    cell = f"{diff.mean:{fmt}} [{diff.low:{fmt}}, {diff.high:{fmt}}] {diff.verdict}"
    if diff.seeds_needed is not None:
        more = "more than " if diff.seeds_needed > _MAX_SEEDS else ""
        cell += f" (about {more}{min(diff.seeds_needed, _MAX_SEEDS)} would resolve it)"
    return cell


def table_lines(diffs: dict[str, list[Difference]], reference: str) -> list[str]:
    """The markdown table of results.md: one row per setting, one column per metric."""
    header = ["setting", *(f"{label} - {reference}" for _, label, _ in METRICS)]
    lines = [
        f"Paired differences from {reference!r}, seed by seed: mean and 95% Student's t "
        "interval over the seeds both have.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, row in diffs.items():
        lines.append("| " + " | ".join([name, *(_cell(d) for d in row)]) + " |")
    return lines


def csv_columns(diffs: Sequence[Difference] | None) -> dict[str, Any]:
    """A setting's difference columns of results.csv (empty for the reference and failed ones)."""
    columns: dict[str, Any] = {}
    by_metric = {d.metric: d for d in diffs or ()}
    for key, _, _ in METRICS:
        d = by_metric.get(key)
        columns[f"{key}_diff"] = d.mean if d else math.nan
        columns[f"{key}_diff_low"] = d.low if d else math.nan
        columns[f"{key}_diff_high"] = d.high if d else math.nan
        columns[f"{key}_verdict"] = d.verdict if d else ""
        columns[f"{key}_seeds_needed"] = d.seeds_needed if d and d.seeds_needed else ""
    return columns
