"""Ablations: a grid of settings, each a list of overrides of one recipe, several seeds each.

A setting is a name and overrides by path, e.g. ("rotation", {"augment.rotation_range": 40}). Each
setting is a run of `cnnjax.runs` (its own folder, checkpoints, resume, history):

    OUT/ablation.json            the base recipe and the settings
    OUT/<setting>/seeds/         one run of K seeds together (seeds="vmap"), or
    OUT/<setting>/seed<N>/       one run per seed (seeds="sequential")
    OUT/<setting>/result.json    written last: histories, per-seed summary, test accuracy
    OUT/<setting>/error.json     instead, when the setting failed (retried on the next run)
    OUT/results.csv, results.md, curves.png, differences.png (each setting against the reference,
                                 paired by seed: cnnjax.paired)

"auto" takes vmap on accelerators (the seeds in one program spread over the mesh's seed axis keep
the device busy) and sequential on the CPU, where a one-seed step runs unbatched (cnnjax.step) and
3 seeds in one program measured slower than in turn (benchmarks/ablation_vmap.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cnnjax import checkpoint, files, mesh, models, paired, plots, runs, train
from cnnjax import config as configlib
from cnnjax import history as historylib
from cnnjax.augment import AugmentConfig
from cnnjax.config import Config, ConfigError
from cnnjax.history import History

LECTURE = AugmentConfig.LECTURE
SEED_MODES = ("auto", "vmap", "sequential")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, overrides: Mapping[str, Any] | None = None) -> Setting:
        return cls(name, tuple(sorted((overrides or {}).items())))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "overrides": dict(self.overrides)}


def default_settings() -> list[Setting]:
    """No augmentation; each transform alone at the lecture's range; the full set; with dropout;
    dropout alone."""
    lecture = {
        f"augment.{f.name}": getattr(LECTURE, f.name) for f in dataclasses.fields(AugmentConfig)
    }
    return [
        Setting.of("none"),
        Setting.of("flip", {"augment.horizontal_flip": True}),
        Setting.of("rotation", {"augment.rotation_range": LECTURE.rotation_range}),
        Setting.of(
            "shift",
            {
                "augment.width_shift_range": LECTURE.width_shift_range,
                "augment.height_shift_range": LECTURE.height_shift_range,
            },
        ),
        Setting.of("shear", {"augment.shear_range": LECTURE.shear_range}),
        Setting.of("zoom", {"augment.zoom_range": LECTURE.zoom_range}),
        Setting.of("lecture", lecture),
        Setting.of("lecture+dropout", {**lecture, "model.dropout": 0.5}),
        Setting.of("dropout", {"model.dropout": 0.5}),
    ]


def parse_setting(spec: str, base: Config | None = None) -> Setting:
    """A default setting by name ("zoom"), or your own: "NAME:field=value,..." with each field named
    as config.override takes it: a path (augment.rotation_range) or a name only one section has
    (dropout)."""
    defaults = {s.name: s for s in default_settings()}
    if ":" not in spec:
        if spec not in defaults:
            raise ConfigError(
                f"unknown setting {spec!r}; known: {', '.join(defaults)}, or NAME:field=value,..."
            )
        return defaults[spec]
    name, _, body = spec.partition(":")
    if not name or not all(c.isalnum() or c in "-_.+" for c in name):
        raise ConfigError(f"setting {spec!r}: the name must be letters, digits or -_.+")
    items = [item.partition("=") for item in filter(None, body.split(","))]
    bad = [key for key, eq, _ in items if not eq]
    if bad:
        raise ConfigError(f"setting {spec!r}: {bad[0]!r} is not field=value")
    try:
        overrides = {configlib.resolve_path(key): value for key, _, value in items}
        resolved = configlib.flatten(
            configlib.override(base or configlib.catsdogs(1), overrides)
        )  # every value parsed and checked
    except ConfigError as e:
        raise ConfigError(f"setting {spec!r}: {e}") from None
    return Setting.of(name, {path: resolved[path] for path in overrides})


def setting_config(base: Config, setting: Setting) -> Config:
    cfg = configlib.override(base, dict(setting.overrides))
    return dataclasses.replace(cfg, name=f"{base.name}-{setting.name}")


def resolve_mode(mode: str) -> str:
    """auto: the seeds of a setting one after another on the CPU, in one vmapped program elsewhere
    (measured; see the module docstring)."""
    if mode not in SEED_MODES:
        raise ConfigError(f"seed mode must be one of {', '.join(SEED_MODES)}, got {mode!r}")
    return ("sequential" if jax.default_backend() == "cpu" else "vmap") if mode == "auto" else mode


def _folder_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def _run_configs(cfg: Config, folder: Path, mode: str) -> list[Config]:
    """The run(s) of one setting: K seeds in one folder, or one folder per seed."""
    if mode == "vmap":
        return [configlib.override(cfg, {"run.resume": True, "run.out": str(folder / "seeds")})]
    seeds = range(cfg.train.seed, cfg.train.seed + cfg.train.seeds)
    return [
        configlib.override(
            cfg,
            {
                "train.seed": seed,
                "train.seeds": 1,
                "run.resume": True,
                "run.out": str(folder / f"seed{seed}"),
            },
        )
        for seed in seeds
    ]


def run_setting(
    setting: Setting,
    base: Config,
    datasets: dict[str, Any],
    test: Any,
    folder: Path,
    mode: str = "auto",
    verbose: bool = True,
) -> dict[str, Any]:
    """Train every seed of one setting (resuming where it stopped), then write its result.json.

    datasets: {"train": ..., base.data.validation_split: ...} in memory; test: a dataset or None."""
    mode = resolve_mode(mode)
    cfg = setting_config(base, setting)
    model = train.model_for(cfg, datasets)
    histories: list[History] = []
    tests: list[float] = []
    wall = 0.0  # training time: the seeds of one run share each epoch's seconds
    for run_cfg in _run_configs(cfg, folder, mode):
        with contextlib.closing(runs.RunFolder.open(run_cfg)) as run_folder:
            run_folder.write_config(
                {
                    "config": configlib.to_dict(run_cfg),
                    "setting": setting.as_dict(),
                    "class_names": list(datasets["train"].class_names),
                    "model": models.model_config(model),
                }
            )
            result = train.train_and_evaluate(run_cfg, run_folder.path, datasets, verbose=verbose)
        histories += result.histories
        # A diverged seed's history stops while the others train on: the longest one is the run's
        # time.
        wall += max(sum(row["seconds"] for row in history) for history in result.histories)
        for seed, best in zip(
            result.seeds, result.best
        ):  # each seed's best checkpoint (lowest validation loss) on the test split
            if test is None or best is None:
                tests.append(math.nan)
            else:
                _, params, _ = checkpoint.load_model(run_folder.path, "best", seed)
                tests.append(
                    train.evaluate(model, params, test, cfg.train.eval_batch_size)["accuracy"]
                )
    summary = summarize(setting, histories, tests, wall)
    record = {
        "setting": setting.as_dict(),
        "config": configlib.to_dict(cfg),
        "mode": mode,
        **summary,
        "histories": histories,
    }
    if mesh.is_main_process():  # in a run of several processes, process 0 writes the folder
        files.write_json(folder / "result.json", record)
        (folder / "error.json").unlink(missing_ok=True)
    return record


def summarize(
    setting: Setting, histories: Sequence[History], tests: Sequence[float], wall: float
) -> dict[str, Any]:
    """Per seed: best and final validation accuracy, final and best validation loss, best epoch,
    test accuracy."""
    seeds = []
    for history, test, best in zip(histories, tests, historylib.best_epochs(histories)):
        finite = [row for row in history if not row.get("diverged")]
        last = finite[-1] if finite else None
        seeds.append(
            {
                "best_val_accuracy": max((row["val_accuracy"] for row in finite), default=math.nan),
                "final_val_accuracy": last["val_accuracy"] if last else math.nan,
                "final_val_loss": last["val_loss"] if last else math.nan,
                "best_val_loss": best["val_loss"] if best else math.nan,
                "best_epoch": best["epoch"] if best else math.nan,
                "test_accuracy": test,
                "diverged": any(row.get("diverged") for row in history),
            }
        )
    diverged = [s["diverged"] for s in seeds]
    status = "diverged" if all(diverged) else ("partly diverged" if any(diverged) else "ok")
    return {
        "name": setting.name,
        "status": status,
        "seeds": seeds,
        "epochs": max((len(h) for h in histories), default=0),
        "wall_seconds": wall,
    }


def check_out(
    out: Path,
    base: Config,
    settings: Sequence[Setting],
    inputs: Mapping[str, Any] | None = None,
) -> None:
    """Refuse, before anything is written, an --out that is a file, holds something other than an
    ablation, or holds one of another base recipe, other settings of the same names or other
    `inputs` (what else decides the numbers: the script's --train-subset); its finished settings
    would be taken for this one's."""
    if out.exists() and not out.is_dir():
        raise runs.RunError(f"--out {out} is a file, not a folder")
    if not (out / "ablation.json").is_file():
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise runs.RunError(
                f"--out {out} holds something other than an ablation (no ablation.json); "
                "choose another --out"
            )
        return
    saved = files.read_json(out / "ablation.json")
    # No extending here: a finished setting is skipped, so more epochs would leave it at its old
    # count.
    differ = configlib.recipe_diff(configlib.from_dict(saved["config"]), base, extend=False)
    kept = {s["name"]: s["overrides"] for s in saved.get("settings", [])}
    differ += [
        f"setting {s.name}: {kept[s.name]} -> {s.as_dict()['overrides']}"
        for s in settings
        if s.name in kept and kept[s.name] != files.strict_json(s.as_dict()["overrides"])
    ]
    saved_inputs = saved.get("inputs", {})
    differ += [
        f"{key}: {saved_inputs.get(key)} -> {value}"
        for key, value in files.strict_json(dict(inputs or {})).items()
        if saved_inputs.get(key) != value
    ]
    if differ:
        raise runs.RunError(
            f"--out {out} holds an ablation of another recipe ({'; '.join(differ)}); "
            "rerun it with its own flags to finish it, or choose another --out"
        )


def run_ablation(
    settings: Sequence[Setting],
    base: Config,
    datasets: dict[str, Any],
    test: Any,
    out: Path,
    mode: str = "auto",
    verbose: bool = True,
    reference: str | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every setting in turn (finished ones skipped, unfinished ones resumed, failed ones retried),
    then the table and the plots, each setting against `reference` (default: "none" where it is a
    setting, else the first). `inputs` (check_out's) are recorded in ablation.json. Returns every
    setting's record, failed ones with status "failed: ..."."""
    mode = resolve_mode(mode)
    names = [s.name for s in settings]
    reference = paired.reference_name(names, reference)
    main = mesh.is_main_process()  # in a run of several processes, process 0 writes and prints
    verbose = verbose and main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        files.clean_orphans(out)
        files.write_json(
            out / "ablation.json",
            {
                "config": configlib.to_dict(base),
                "mode": mode,
                "reference": reference,
                "inputs": dict(inputs or {}),
                "settings": [s.as_dict() for s in settings],
            },
        )
    if verbose:
        how = "together in one program (vmap)" if mode == "vmap" else "one after another"
        print(
            f"{len(settings)} settings x {base.train.seeds} seeds; "
            f"the seeds of a setting train {how} "
            f"({jax.default_backend()}, {jax.device_count()} device(s))",
            flush=True,
        )
    for setting in settings:
        folder = out / _folder_name(setting.name)
        if (folder / "result.json").exists():
            if verbose:
                print(f"[{setting.name}] finished earlier, skipped", flush=True)
            continue
        if verbose:
            print(f"[{setting.name}] {dict(setting.overrides) or 'the base recipe'}", flush=True)
        try:
            run_setting(setting, base, datasets, test, folder, mode, verbose)
        # one broken setting must not end the whole ablation (Ctrl-C is no Exception)
        except Exception as e:  # noqa: BLE001
            if main:
                files.write_json(
                    folder / "error.json",
                    {
                        "setting": setting.as_dict(),
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(),
                    },
                )
                print(
                    f"[{setting.name}] failed: {type(e).__name__}: {e} (retried on the next run)",
                    flush=True,
                )
    return rebuild_report(out, names, reference) if main else collect_results(out, names)


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
        folder = out / _folder_name(name)
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
