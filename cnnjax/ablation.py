"""Ablations of augmentation settings: several seeds per setting, trained together.

A setting is a name, an augmentation config and a dropout rate. All seeds of one setting
train in one compiled program (`train.Trainer(num_seeds=K)`: jax.vmap over stacked
parameters, optimizer states and keys), each seed with its own initialisation,
shuffling, augmentation and dropout.

On disk, under the ablation folder:
    <setting>/latest/        stacked train state after the last finished epoch (resume point)
    <setting>/best/          per seed, the parameters of its lowest validation loss
    <setting>/result.json    written last: histories, per-seed summary, test accuracy, wall time
    results.csv, results.md, curves.png
A setting with result.json is finished and never redone; one with latest/ resumes from
it; the table is always rebuilt from the result files. A setting whose seeds all diverge
(NaN loss) is recorded as diverged, and an error inside one setting is recorded as
failed; neither stops the ablation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import checkpoint, models, plots, runs, train
from cnnjax.augment import AugmentConfig, make_augment_fn

LECTURE = AugmentConfig.LECTURE


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    augment: AugmentConfig = AugmentConfig()
    dropout: float = 0.0


def default_settings() -> list[Setting]:
    """No augmentation; each transform alone at the lecture's range; the full set; with dropout; dropout alone."""
    return [
        Setting("none"),
        Setting("flip", AugmentConfig(horizontal_flip=True)),
        Setting("rotation", AugmentConfig(rotation_range=LECTURE.rotation_range)),
        Setting("shift", AugmentConfig(width_shift_range=LECTURE.width_shift_range, height_shift_range=LECTURE.height_shift_range)),
        Setting("shear", AugmentConfig(shear_range=LECTURE.shear_range)),
        Setting("zoom", AugmentConfig(zoom_range=LECTURE.zoom_range)),
        Setting("lecture", LECTURE),
        Setting("lecture+dropout", LECTURE, 0.5),
        Setting("dropout", AugmentConfig(), 0.5),
    ]


def parse_setting(spec: str) -> Setting:
    """A default setting by name ("zoom"), or your own: "NAME:field=value,..." where a field
    is an AugmentConfig field or dropout, e.g. "rot20:rotation_range=20,dropout=0.3"."""
    defaults = {s.name: s for s in default_settings()}
    if ":" not in spec:
        if spec not in defaults:
            raise ValueError(f"unknown setting {spec!r}; known: {', '.join(defaults)}, or NAME:field=value,...")
        return defaults[spec]
    name, _, body = spec.partition(":")
    fields = {f.name: f.type for f in dataclasses.fields(AugmentConfig)}
    augment_kwargs: dict[str, Any] = {}
    dropout = 0.0
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or (key not in fields and key != "dropout"):
            raise ValueError(f"setting {spec!r}: {item!r} is not field=value with a field of {', '.join([*fields, 'dropout'])}")
        if key == "dropout":
            dropout = float(value)
        elif key in ("horizontal_flip", "vertical_flip"):
            augment_kwargs[key] = value.lower() in ("1", "true", "yes")
        elif key in ("fill_mode", "interpolation"):
            augment_kwargs[key] = value
        else:
            augment_kwargs[key] = float(value)
    return Setting(name or "custom", AugmentConfig(**augment_kwargs), dropout)


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    seeds: int = 3
    epochs: int = 30
    batch_size: int = 20
    learning_rate: float = 1e-3
    image_size: int = 150
    eval_batch_size: int = 100


def _where_improved(improved: jax.Array, new: Any, old: Any) -> Any:
    """Per seed, `new` where improved else `old` (leaves have a leading seed axis)."""
    return jax.tree.map(lambda n, o: jnp.where(improved.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def run_setting(
    setting: Setting,
    config: AblationConfig,
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    folder: Path,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train all seeds of one setting together (resuming from folder/latest), write result.json."""
    folder.mkdir(parents=True, exist_ok=True)
    size = config.image_size
    model = models.CatsDogsConvNet(dropout_rate=setting.dropout, input_shape=(size, size, 3))
    tx = train.adam_keras(config.learning_rate)
    trainer = train.Trainer(model, tx, augment=make_augment_fn(setting.augment), num_seeds=config.seeds)
    meta: dict[str, Any] = {"histories": [[] for _ in range(config.seeds)], "best_val_loss": [math.inf] * config.seeds, "wall": 0.0}
    if (folder / "latest").exists():
        state, meta = checkpoint.restore_train_state(folder / "latest", model, tx, num_seeds=config.seeds)
        best_state, _ = checkpoint.restore_train_state(folder / "best", model, tx, num_seeds=config.seeds)
        if verbose:
            print(f"[{setting.name}] resuming after epoch {len(meta['histories'][0])}")
    else:
        state = train.stack_states([train.create_train_state(model, tx, jax.random.PRNGKey(s)) for s in range(config.seeds)])
        best_state = jax.tree.map(jnp.copy, state)  # a copy: the train step donates (reuses) the state's buffers
    histories = meta["histories"]
    best_val_loss = np.array([v if v is not None else math.inf for v in meta["best_val_loss"]])
    run_meta = {"setting": _setting_dict(setting), "config": dataclasses.asdict(config)}

    def after_epoch(epoch: int, rows: list[dict[str, float]], state: train.TrainState) -> None:
        nonlocal best_state, best_val_loss
        for history, row in zip(histories, rows):
            history.append(row)
        val_loss = np.array([row.get("val_loss", math.nan) for row in rows])
        improved = val_loss < best_val_loss  # NaN never improves
        best_val_loss = np.where(improved, val_loss, best_val_loss)
        best_state = _where_improved(jnp.asarray(improved), state, best_state)
        wall = meta["wall"] + time.perf_counter() - start
        # best first, then latest: a crash between the two resumes from the older latest with a newer best,
        # which only matters if that epoch is redone, and then best is recomputed from equal or better data.
        checkpoint.save_checkpoint(folder / "best", best_state, model, run_meta)
        best = [None if math.isinf(v) else v for v in best_val_loss]  # JSON has no infinity
        progress = {**run_meta, "histories": histories, "best_val_loss": best, "wall": wall}
        checkpoint.save_checkpoint(folder / "latest", state, model, progress)

    start = time.perf_counter()
    done = len(histories[0])
    state, _ = train.fit(
        trainer, state, data["train"], config.epochs, config.batch_size, data["validation"],
        eval_batch_size=config.eval_batch_size, callbacks=[after_epoch], verbose=verbose, initial_epoch=done,
    )
    wall = meta["wall"] + time.perf_counter() - start

    test = data.get("test")
    test_metrics = trainer.evaluate(best_state.params, *test, config.eval_batch_size) if test is not None else None
    result = summarize(setting, histories, test_metrics, wall)
    runs.write_json(folder / "result.json", {**run_meta, **result, "histories": histories})
    shutil.rmtree(folder / "latest", ignore_errors=True)  # finished: best/ and result.json are what's kept
    return result


def _setting_dict(setting: Setting) -> dict[str, Any]:
    return {"name": setting.name, "augment": dataclasses.asdict(setting.augment), "dropout": setting.dropout}


def summarize(setting: Setting, histories: list[list[dict]], test: list[dict] | None, wall: float) -> dict[str, Any]:
    """Per seed: best and final validation accuracy, final validation loss, best epoch, test accuracy."""
    seeds = []
    for k, history in enumerate(histories):
        diverged = any(row.get("diverged") for row in history)
        finite = [row for row in history if math.isfinite(row.get("val_loss", math.nan))]
        best = min(finite, key=lambda row: row["val_loss"]) if finite else None
        seeds.append({
            "best_val_accuracy": max((row["val_accuracy"] for row in history), default=math.nan),
            "final_val_accuracy": history[-1]["val_accuracy"] if history else math.nan,
            "final_val_loss": history[-1]["val_loss"] if history else math.nan,
            "best_epoch": best["epoch"] if best else math.nan,
            "test_accuracy": test[k]["accuracy"] if test and best else math.nan,
            "diverged": diverged,
        })
    status = "diverged" if all(s["diverged"] for s in seeds) else ("partly diverged" if any(s["diverged"] for s in seeds) else "ok")
    return {"name": setting.name, "status": status, "seeds": seeds, "wall_seconds": wall, "epochs": len(histories[0])}


def run_ablation(
    settings: Sequence[Setting],
    config: AblationConfig,
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    out: Path,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Every setting in turn (finished ones skipped), then the table and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(out / "ablation.json", {"config": dataclasses.asdict(config), "settings": [_setting_dict(s) for s in settings]})
    for setting in settings:
        folder = out / _folder_name(setting.name)
        if (folder / "result.json").exists():
            if verbose:
                print(f"[{setting.name}] finished earlier, skipped")
            continue
        try:
            run_setting(setting, config, data, folder, verbose)
        except Exception as e:  # noqa: BLE001 - one broken setting must not end the whole ablation
            folder.mkdir(parents=True, exist_ok=True)
            runs.write_json(folder / "result.json", {
                "setting": _setting_dict(setting), "name": setting.name, "status": f"failed: {type(e).__name__}: {e}",
                "seeds": [], "histories": [], "wall_seconds": math.nan, "traceback": traceback.format_exc(),
            })
            print(f"[{setting.name}] failed: {type(e).__name__}: {e}")
    results = collect_results(out, [s.name for s in settings])
    write_table(results, out)
    plot_curves(results, out / "curves.png")
    return results


def rebuild_report(out: Path) -> list[dict[str, Any]]:
    """The table and plot from the finished settings on disk, in the order ablation.json lists them."""
    listed = json.loads((out / "ablation.json").read_text())["settings"] if (out / "ablation.json").exists() else []
    names = [s["name"] for s in listed] or sorted(p.parent.name for p in out.glob("*/result.json"))
    results = collect_results(out, names)
    if results:
        write_table(results, out)
        plot_curves(results, out / "curves.png")
    return results


def _folder_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def collect_results(out: Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """The result.json of each named setting, in that order (missing ones left out)."""
    results = []
    for name in names:
        path = out / _folder_name(name) / "result.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    return results


COLUMNS = [
    ("best_val_accuracy", "best val acc"),
    ("final_val_accuracy", "final val acc"),
    ("final_val_loss", "final val loss"),
    ("best_epoch", "best epoch (val loss)"),
    ("test_accuracy", "test acc (best ckpt)"),
]


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite))


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        row: dict[str, Any] = {"setting": result["name"], "status": result["status"], "seeds": len(result["seeds"])}
        for key, _ in COLUMNS:
            mean, std = _mean_std([s[key] for s in result["seeds"]])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        row["wall_seconds"] = result.get("wall_seconds", math.nan)
        rows.append(row)
    return rows


def write_table(results: list[dict[str, Any]], out: Path) -> None:
    """results.csv (every number) and results.md (mean ± std over seeds)."""
    rows = table_rows(results)
    if not rows:
        return
    import csv

    with open(out / ".results.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / ".results.csv.tmp").replace(out / "results.csv")
    header = ["setting", "status", "seeds", *(label for _, label in COLUMNS), "wall (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["setting"], row["status"], str(row["seeds"])]
        for key, _ in COLUMNS:
            mean, std = row[f"{key}_mean"], row[f"{key}_std"]
            fmt = ".1f" if key == "best_epoch" else ".3f"
            cells.append("n/a" if math.isnan(mean) else f"{mean:{fmt}} ± {std:{fmt}}")
        cells.append("n/a" if math.isnan(row["wall_seconds"]) else f"{row['wall_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    (out / ".results.md.tmp").write_text("\n".join(lines) + "\n")
    (out / ".results.md.tmp").replace(out / "results.md")


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Mean validation accuracy and loss per epoch for every setting, with a ±1 std band."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for result in results:
        histories = [h for h in result.get("histories", []) if h]
        if not histories:
            continue
        epochs = min(len(h) for h in histories)
        for ax, key in zip(axes, ("val_accuracy", "val_loss")):
            values = np.array([[row.get(key, math.nan) for row in h[:epochs]] for h in histories], np.float64)
            with warnings.catch_warnings():  # a diverged setting is all NaN: plotted as a gap, not a warning
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            x = np.arange(1, epochs + 1)
            (line,) = ax.plot(x, mean, label=f"{result['name']} ({result['status']})" if result["status"] != "ok" else result["name"])
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for ax, title in zip(axes, ("Validation accuracy (mean ± std over seeds)", "Validation loss (mean ± std over seeds)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    plots.save_figure(fig, path)
