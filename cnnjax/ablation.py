"""Ablations: a grid of settings, each a list of overrides of one recipe, several seeds each.

A setting is a name and overrides by path, e.g. ("rotation", {"augment.rotation_range": 40}).
Settings run as runs of `cnnjax.runs` (folders, checkpoints, resume, history), one of three ways:

    OUT/ablation.json            the base recipe and the settings
    OUT/grid-<hash>/             one run of every (setting, seed) pair of the settings that differ
                                 only in numbers (seeds="grid", cnnjax.grid), or
    OUT/<setting>/seeds/         one run of a setting's K seeds together (seeds="vmap"), or
    OUT/<setting>/seed<N>/       one run per seed (seeds="sequential")
    OUT/<setting>/result.json    written last: histories, per-seed summary, test accuracy
    OUT/<setting>/error.json     instead, when the setting failed (retried on the next run)
    OUT/results.csv, results.md, curves.png, differences.png (cnnjax.report: each setting against
                                 the reference, paired by seed, cnnjax.paired)

"auto" is grid everywhere: on accelerators the members are vmapped, one batched program filling
the device; on the CPU they take turns through it (cnnjax.step), each step unbatched as a run
alone, and the grid saves the compiling and checkpointing of one run per setting
(benchmarks/ablation_vmap.py measures both against the settings in turn).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from cnnjax import checkpoint, files, grid, mesh, models, paired, report, runs, train
from cnnjax import config as configlib
from cnnjax import history as historylib
from cnnjax.augment import AugmentConfig
from cnnjax.config import Config, ConfigError
from cnnjax.history import History

LECTURE = AugmentConfig.LECTURE
SEED_MODES = ("auto", "grid", "vmap", "sequential")
HOW = {
    "grid": "the settings that differ only in numbers, all their seeds, as members of one program",
    "vmap": "the seeds of a setting together in one program",
    "sequential": "each seed a run of its own, one after another",
}


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
    """auto: grid, on every backend (see the module docstring)."""
    if mode not in SEED_MODES:
        raise ConfigError(f"seed mode must be one of {', '.join(SEED_MODES)}, got {mode!r}")
    return "grid" if mode == "auto" else mode


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
    if mode == "grid":
        return run_grid([setting], base, datasets, test, folder.parent, verbose)[0]
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
        wall += _run_seconds(result.histories)
        tests += _best_on_test(run_folder.path, result, model, test, cfg)
    summary = summarize(setting, histories, tests, wall)
    return _write_result(setting, cfg, mode, summary, histories, folder)


def run_grid(
    settings: Sequence[Setting],
    base: Config,
    datasets: dict[str, Any],
    test: Any,
    out: Path,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Train every (setting, seed) pair of settings that differ only in numbers as the members of
    one program (cnnjax.grid), in OUT/grid-<hash of their names>/ (resuming where it stopped), then
    write each setting's result.json."""
    named = [(s.name, setting_config(base, s)) for s in settings]
    if len(grid.groups(named)) > 1:
        raise ConfigError(f"settings {', '.join(dict(named))} differ in more than numbers")
    members = grid.members(named)
    names = ",".join(dict(named))
    grid_folder = out / f"grid-{hashlib.sha256(names.encode()).hexdigest()[:8]}"
    run_cfg = configlib.override(
        grid.program_config(members, f"{base.name}-grid"),
        {"run.resume": True, "run.out": str(grid_folder)},
    )
    model = train.model_for(run_cfg, datasets)
    with contextlib.closing(runs.RunFolder.open(run_cfg)) as run_folder:
        run_folder.write_config(
            {
                "config": configlib.to_dict(run_cfg),
                "settings": [s.as_dict() for s in settings],
                "members": grid.describe(members),
                # the member axis over the devices, as train_and_evaluate lays it out
                "devices": mesh.describe(mesh.make_mesh(len(members))),
                "class_names": list(datasets["train"].class_names),
                "model": models.model_config(model),
            }
        )
        result = train.train_and_evaluate(
            run_cfg, run_folder.path, datasets, verbose=verbose, grid=members
        )
    # One program: every member shares each epoch's seconds, each setting its share of them.
    share = _run_seconds(result.histories) / len(settings)
    by_setting = [m.setting for m in members]
    tests = _best_on_test(run_folder.path, result, model, test, run_cfg, by_setting)
    records = []
    for setting, (_, cfg) in zip(settings, named):
        own = [k for k, m in enumerate(members) if m.setting == setting.name]
        histories = [result.histories[k] for k in own]
        summary = summarize(setting, histories, [tests[k] for k in own], share)
        folder = out / report.folder_name(setting.name)
        extra = {"grid": grid_folder.name}
        records.append(_write_result(setting, cfg, "grid", summary, histories, folder, extra))
    return records


def _run_seconds(histories: Sequence[History]) -> float:
    """A run's training time: a diverged seed's history stops while the others train on, so the
    longest one."""
    return max(sum(row["seconds"] for row in history) for history in histories)


def _best_on_test(
    path: Path,
    result: train.Result,
    model: Any,
    test: Any,
    cfg: Config,
    settings: Sequence[str | None] | None = None,
) -> list[float]:
    """Each seed's best checkpoint (lowest validation loss) on the test split, found by its seed
    and (a grid's members, whose seeds repeat) its setting; NaN without a test split or a best
    epoch."""
    tests = []
    for k, (seed, best) in enumerate(zip(result.seeds, result.best)):
        if test is None or best is None:
            tests.append(math.nan)
            continue
        setting = settings[k] if settings else None
        _, params, _ = checkpoint.load_model(path, "best", seed, setting=setting)
        tests.append(train.evaluate(model, params, test, cfg.train.eval_batch_size)["accuracy"])
    return tests


def _write_result(
    setting: Setting,
    cfg: Config,
    mode: str,
    summary: dict[str, Any],
    histories: Sequence[History],
    folder: Path,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A setting's result.json: its recipe, how it ran, its summary and its seeds' histories."""
    record = {
        "setting": setting.as_dict(),
        "config": configlib.to_dict(cfg),
        "mode": mode,
        **(extra or {}),
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


def _write_error(folder: Path, setting: Setting, e: Exception) -> None:
    """A failed setting's error.json (it is retried on the next run), and the line that says so."""
    files.write_json(
        folder / "error.json",
        {
            "setting": setting.as_dict(),
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        },
    )
    print(f"[{setting.name}] failed: {type(e).__name__}: {e} (retried on the next run)", flush=True)


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
        print(
            f"{len(settings)} settings x {base.train.seeds} seeds; {HOW[mode]} "
            f"({jax.default_backend()}, {jax.device_count()} device(s))",
            flush=True,
        )
    pending = []
    for setting in settings:
        if (out / report.folder_name(setting.name) / "result.json").exists():
            if verbose:
                print(f"[{setting.name}] finished earlier, skipped", flush=True)
        else:
            pending.append(setting)
    if mode == "grid":  # one program per group of settings that differ only in numbers
        by_name = {s.name: s for s in pending}
        named = [(s.name, setting_config(base, s)) for s in pending]
        programs = [[by_name[name] for name in group] for group in grid.groups(named)]
    else:
        programs = [[s] for s in pending]
    for program in programs:
        if verbose:
            for setting in program:
                overrides = dict(setting.overrides) or "the base recipe"
                print(f"[{setting.name}] {overrides}", flush=True)
            if mode == "grid":
                members = len(program) * base.train.seeds
                print(f"[grid] {members} members train in one program", flush=True)
        try:
            if mode == "grid":
                run_grid(program, base, datasets, test, out, verbose)
            else:
                folder = out / report.folder_name(program[0].name)
                run_setting(program[0], base, datasets, test, folder, mode, verbose)
        # one broken program must not end the whole ablation (Ctrl-C is no Exception)
        except Exception as e:  # noqa: BLE001
            if main:
                for setting in program:
                    _write_error(out / report.folder_name(setting.name), setting, e)
    return (
        report.rebuild_report(out, names, reference) if main else report.collect_results(out, names)
    )
