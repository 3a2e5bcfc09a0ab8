"""A run, as an experiment script sees it: `execute` (what a script does once its config is
resolved), its exit codes, and the one line a user meets instead of a traceback (`exits`).

The run folder itself (refused, locked, described by config.json) is cnnjax.run_folder's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cnnjax import augment, compile_cache, data, interrupts, models, plots, run_folder, train
from cnnjax import config as configlib
from cnnjax import mesh as meshlib
from cnnjax.checkpoint import CheckpointError
from cnnjax.config import Config, ConfigError
from cnnjax.data import DataError
from cnnjax.run_folder import RunError, RunFolder

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # flags, data, run folder (argparse uses 2 for bad flags too)
EXIT_DIVERGED = 3  # the training loss stopped being finite
EXIT_FAILED = 4  # some ablation settings failed (see their error.json)
EXIT_NO_SPACE = 6  # the disk filled up: free space, then --resume
EXIT_INTERRUPTED = interrupts.EXIT_INTERRUPTED  # Ctrl-C: the run can be resumed


BAD_INPUT = (
    ConfigError,
    DataError,
    RunError,
    CheckpointError,
    ValueError,
    OSError,
)  # OSError: an unreadable file


# The advice a user needs for the OS errors a path they gave can meet.
OS_ADVICE = {
    errno.EACCES: "no permission: choose another path, or fix its permissions",
    errno.EPERM: "not permitted: choose another path, or fix its permissions",
    errno.EROFS: "a read-only filesystem: choose a path on another one",
    errno.EISDIR: "a folder, where a file was expected: name a file",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
    errno.ENOENT: "does not exist: check the path",
}


def error_line(error: BaseException) -> str:
    """The one line an error a user can act on prints: an OS error names its path and what to do."""
    if isinstance(error, OSError) and error.errno in OS_ADVICE and error.filename is not None:
        return f"error: {error.filename}: {OS_ADVICE[error.errno]} ({error.strerror})"
    return f"error: {error}"


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def _interrupted(error: BaseException | None) -> bool:
    """Whether a Ctrl-C is behind `error`: a library that runs Python code under its own (XLA's
    tracing, orbax's threads) may hand it back as an error of its own."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt) or "KeyboardInterrupt" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if (
            isinstance(error, OSError) and error.errno == errno.ENOSPC
        ) or "no space left on device" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def exits(interrupted: str = "", folder: Path | None = None) -> Iterator[None]:
    """What a user can cause or meet, as one line on stderr and an exit code of the README, no
    traceback: bad input (2; out of memory too: a batch too large), a full disk (EXIT_NO_SPACE),
    Ctrl-C (EXIT_INTERRUPTED, the line ending with `interrupted`), processes that could not meet or
    lost one another (EXIT_LOST)."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted{interrupted}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        if _interrupted(e):
            print(f"\ninterrupted{interrupted}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        if jax.process_count() > 1 and meshlib.lost_contact(e):
            # One line, EXIT_LOST, out at once: jax's own watch of the peers may act next.
            meshlib.exit_on_error(e)
        if _disk_full(e):
            where = f" ({folder})" if folder else ""
            print(
                f"error: the disk is full{where}: no space left on device; every finished epoch "
                "is kept: free some space, then run the same command with --resume",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(EXIT_NO_SPACE) from None
        if _out_of_memory(e):
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(
                f"error: out of memory ({what}): start again with a lower --batch-size "
                "(or --train.eval_batch_size) and a new --out",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(EXIT_BAD_INPUT) from None
        if isinstance(e, (meshlib.JoinError, *BAD_INPUT)):
            print(error_line(e), file=sys.stderr, flush=True)
            raise SystemExit(
                meshlib.EXIT_LOST if isinstance(e, meshlib.JoinError) else EXIT_BAD_INPUT
            ) from None
        # With several processes: one line (a lost peer) or the traceback, then out at once.
        meshlib.exit_on_error(e)
        raise


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record arrives (not the one at setup), so a
    redirected or replaced stdout (pytest's capture, a notebook) still gets the lines."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _unraisable(unraisable: Any) -> None:
    """Python drops an exception raised where it cannot propagate (a garbage-collection callback,
    as jax's, a weakref callback, `__del__`). A Ctrl-C dropped there is sent again a moment later,
    once that code has returned, so it reaches the loop. After a failed save (a full disk),
    orbax's writes still in flight report into its closed event loop, with nothing left to act on:
    not printed. Any other is printed."""
    if unraisable.exc_type is KeyboardInterrupt:
        # To the main thread itself: a real signal also wakes it from a sleep or a wait.
        main = threading.main_thread().ident
        threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGINT)).start()
    elif not (
        unraisable.exc_type is RuntimeError and "Event loop is closed" in str(unraisable.exc_value)
    ):
        sys.__unraisablehook__(unraisable)


def _one_line_warning(
    message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
) -> str:
    # Python's format adds the source line that warned, which tells a user nothing.
    return f"warning: {message}\n"


def setup_logging() -> None:
    """INFO lines from cnnjax's loggers on stdout, as plain messages (process 0 only), none of
    orbax's (through absl: every save and restore). Called by the scripts, never on import."""
    # orbax's save errors come back as exceptions: no second report, nor its writes left in
    # flight.
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.formatwarning = _one_line_warning
    sys.unraisablehook = _unraisable
    level = logging.INFO if meshlib.is_main_process() else logging.WARNING
    logger = logging.getLogger("cnnjax")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def exit_code(result: train.Result) -> int:
    return EXIT_DIVERGED if any(d is not None for d in result.diverged) else EXIT_OK


def closing_lines(result: train.Result, folder: Path) -> list[str]:
    """What the run leaves, in words that are true of it."""
    lines = []
    ckpts = folder / "checkpoints"
    for k, (seed, history) in enumerate(zip(result.seeds, result.histories)):
        prefix = f"[seed {seed}] " if len(result.seeds) > 1 else ""
        best = result.best[k]
        last = next((row for row in reversed(history) if not row.get("diverged")), None)
        if result.diverged[k] is not None:
            kept = f"the last finite state, epoch {last['epoch']}." if last else "no checkpoint."
            lines.append(
                f"{prefix}Diverged at epoch {result.diverged[k]}: the training loss is not "
                f"finite. {ckpts} keeps {kept} Try a lower learning rate (--learning-rate)."
            )
        elif last is not None:
            accuracy = last.get("val_accuracy", math.nan)
            early = result.stopped and result.stopped[k]
            note = " - stopped early: val_loss had stopped improving" if early else ""
            lines.append(f"{prefix}Final val_accuracy {accuracy:.4f} (epoch {last['epoch']}){note}")
        if best is not None:
            lines.append(
                f"{prefix}Best val_loss {best['val_loss']:.4f} at epoch {best['epoch']} "
                f"(val_accuracy {best['val_accuracy']:.4f}): {ckpts / str(best['epoch'])}"
            )
    return lines


def check_config(cfg: Config) -> Config:
    """config.check, with the model's smallest input size computed from its layers."""
    return configlib.check(cfg, lambda c: models.min_input_size(models.MODELS[c.model.name]()))


def resolve(recipe: Config, overrides: dict[str, Any]) -> Config:
    """The config a script runs, checked: `recipe` with the flags' overrides; or, resuming a run
    folder that holds a config.json (--resume --out RUN), that run's own config (its data folder
    included) with the overrides, which may only ask for more epochs or change where and how it
    runs."""
    cfg = configlib.override(recipe, overrides)
    if cfg.run.resume:
        cfg = configlib.override(run_folder.resumable(cfg.run.out, recipe), overrides)
    return check_config(cfg)


def augment_overrides(preset: str) -> dict[str, Any]:
    """Every augment field of the --augment preset (config.AUGMENT_PRESETS), as overrides."""
    chosen = configlib.AUGMENT_PRESETS[preset]
    return {f"augment.{f.name}": getattr(chosen, f.name) for f in dataclasses.fields(chosen)}


def add_flags(parser: Any) -> None:
    """The flags every experiment script shares besides its config: where the processes meet."""
    meshlib.add_flags(parser)


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C, and `kill` or a scheduler's SIGTERM, as KeyboardInterrupt: one line,
    EXIT_INTERRUPTED, the lock let go (`_unraisable` sends it again where Python dropped it)."""
    raise KeyboardInterrupt


def start(args: Any) -> None:
    """Join the other processes (when flags or a cluster say so), set up logging, and take Ctrl-C
    and SIGTERM as an interrupt the loop can catch wherever it lands."""
    meshlib.initialize(
        args.coordinator_address, args.num_processes, args.process_id, args.join_timeout
    )
    setup_logging()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)


def run_as_script(main: Callable[[], Any]) -> None:
    """A script's entry point: main(), with compiled programs kept on disk (cnnjax.compile_cache),
    and after an interrupt an exit that skips the interpreter's teardown (XLA may still be
    compiling on its own threads, and tearing down under them crashes); the lock and the files
    were let go on the way out of main."""
    compile_cache.enable()
    try:
        main()
    except SystemExit as e:
        if e.code != EXIT_INTERRUPTED:
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def versions() -> dict[str, str]:
    import flax
    import optax
    import orbax.checkpoint

    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": orbax.checkpoint.__version__,
        "numpy": np.__version__,
    }


def write_preview(dataset: Any, augmentation: augment.AugmentConfig, path: Path, seed: int) -> Path:
    """The lecture's preview: one training image and four augmented versions of it (with the
    lecture's preview settings when the run does not augment)."""
    shown = augmentation if not augmentation.is_identity else augment.AugmentConfig.LECTURE_PREVIEW
    image = dataset.image(7 if len(dataset) > 7 else 0)  # the lecture shows train/cats' 8th file
    augmented = augment.random_augment(
        jax.random.PRNGKey(seed), np.repeat(image[None].astype(np.float32), 4, axis=0), shown
    )
    grid = np.concatenate([image[None] / 255.0, np.clip(np.asarray(augmented) / 255.0, 0, 1)])
    title = "augmented" if not augmentation.is_identity else "lecture preview settings"
    return plots.plot_image_grid(grid, path, ["original"] + [f"{title} {i}" for i in range(1, 5)])


def execute(
    cfg: Config, args: Any, argv: list[str] | None = None, preview: bool = False
) -> train.Result:
    """Everything an experiment script does after resolving its config: join the processes, check
    the data and the folder (before writing anything), write config.json (and the `preview`),
    train, and print what the run left. A diverged run returns: the script exits with
    `exit_code(result)`."""
    with exits():
        start(args)
        mesh = meshlib.make_mesh(cfg.train.seeds)
        meshlib.check_batch(mesh, cfg.train.batch_size)
        meshlib.check_batch(mesh, cfg.train.eval_batch_size, "train.eval_batch_size")
        datasets = data.load(cfg.data, ("train", cfg.data.validation_split))
        train_set, val_set = datasets["train"], datasets[cfg.data.validation_split]
        model = train.model_for(cfg, datasets)
        folder = RunFolder.open(cfg)
    main = meshlib.is_main_process()
    resume = (
        f": every finished epoch is kept in {folder.path}/checkpoints; continue with the same "
        "command plus --resume"
    )
    with exits(resume if main else "", folder.path):
        try:
            if main:
                print(meshlib.summary_line(mesh), flush=True)
                print(models.summary(model), flush=True)
                print(f"Output: {model.head.describe()}", flush=True)
                classes = ", ".join(train_set.class_names)
                print(
                    f"train: {len(train_set)} images, validation: {len(val_set)}, classes "
                    f"{classes}; run folder {folder.path}",
                    flush=True,
                )
            folder.write_config(
                {
                    "config": configlib.to_dict(cfg),
                    "devices": meshlib.describe(mesh),
                    "class_names": list(train_set.class_names),
                    "model": models.model_config(model),
                    "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
                    "versions": versions(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            )
            if preview and main:
                write_preview(train_set, cfg.augment, folder.path / "preview.png", cfg.train.seed)
            result = train.train_and_evaluate(cfg, folder.path, datasets, mesh=mesh)
            if main:
                for line in closing_lines(result, folder.path):
                    print(line, flush=True)
                written = sorted(
                    p.name + ("/" if p.is_dir() else "")
                    for p in folder.path.iterdir()
                    if not p.name.startswith(".")
                )
                print(f"Wrote {folder.path}/: {', '.join(written)}", flush=True)
        finally:
            folder.close()
    return result
