"""An ablation's report, rebuilt from what its folder holds: each setting's result.json (or its
error.json), the table (results.csv, results.md: mean ± std over seeds, then each setting's paired
difference from the reference, cnnjax.paired) and the figures (curves.png, differences.png).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnjax import files, paired, plots


def folder_name(name: str) -> str:
    """A setting's folder in the ablation's: its name, any character but -_.+ and alphanumerics
    as _."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def rebuild_report(
    out: Path, names: Sequence[str] | None = None, reference: str | None = None
) -> list[dict[str, Any]]:
    """The table and plots from the settings on disk, in the order ablation.json lists them,
    against its reference unless another is named."""
    saved = files.read_json(out / "ablation.json") if (out / "ablation.json").exists() else {}
    if names is None:
        names = [s["name"] for s in saved.get("settings", [])] or sorted(
            p.parent.name for p in out.glob("*/result.json")
        )
    results = collect_results(out, names)
    if not results:
        return results
    # a reference that failed or has not run yet: the differences from the next best one
    ref, diffs = paired.from_reference(results, reference or saved.get("reference"))
    write_table(results, out, diffs, ref)
    plots.plot_curves([r for r in results if r.get("histories")], out / "curves.png")
    if diffs:
        plots.plot_differences(diffs, ref, paired.LABELS, out / "differences.png")
    return results


def collect_results(out: Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """Each named setting's result.json, or its error.json as a failed record; unstarted ones left
    out."""
    results = []
    for name in names:
        folder = out / folder_name(name)
        if (folder / "result.json").exists():
            results.append(files.read_json(folder / "result.json"))
        elif (folder / "error.json").exists():
            error = files.read_json(folder / "error.json")
            results.append(
                {
                    "name": name,
                    "status": f"failed: {error['error']}",
                    "seeds": [],
                    "histories": [],
                    "wall_seconds": math.nan,
                }
            )
    return results


def failed(results: Sequence[dict[str, Any]]) -> list[str]:
    return [r["name"] for r in results if str(r["status"]).startswith("failed")]


def diverged(results: Sequence[dict[str, Any]]) -> list[str]:
    """Settings of which one seed or more diverged."""
    return [r["name"] for r in results if "diverged" in str(r["status"])]


COLUMNS = [
    ("best_val_accuracy", "best val acc"),
    ("final_val_accuracy", "final val acc"),
    ("final_val_loss", "final val loss"),
    ("best_epoch", "best epoch (val loss)"),
    ("test_accuracy", "test acc (best ckpt)"),
]


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and (population) standard deviation of the finite values; NaN when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite))


def write_table(
    results: Sequence[dict[str, Any]],
    out: Path,
    diffs: Mapping[str, Sequence[paired.Difference]] | None = None,
    reference: str = "",
) -> None:
    """results.csv (every number) and results.md (mean ± std over seeds, then each setting's paired
    difference from the reference)."""
    diffs = diffs or {}
    header = ["setting", "status", "seeds", *(label for _, label in COLUMNS), "wall (s)"]
    rows, lines = [], ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        row: dict[str, Any] = {
            "setting": result["name"],
            "status": result["status"],
            "seeds": len(result["seeds"]),
        }
        cells = [row["setting"], row["status"], str(row["seeds"])]
        for key, _ in COLUMNS:
            mean, std = mean_std([s[key] for s in result["seeds"]])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            fmt = ".1f" if key == "best_epoch" else ".3f"
            cells.append("n/a" if math.isnan(mean) else f"{mean:{fmt}} ± {std:{fmt}}")
        row["wall_seconds"] = result.get("wall_seconds", math.nan)
        cells.append("n/a" if math.isnan(row["wall_seconds"]) else f"{row['wall_seconds']:.0f}")
        row.update(paired.csv_columns(diffs.get(result["name"])))
        rows.append(row)
        lines.append("| " + " | ".join(cells) + " |")
    if diffs:
        lines += ["", *paired.table_lines(dict(diffs), reference)]
    files.write_csv(out / "results.csv", rows)
    files.write_text(out / "results.md", "\n".join(lines) + "\n")
