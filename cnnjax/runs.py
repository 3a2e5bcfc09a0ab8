"""A run: its folder (refused, locked, described by config.json), its exit codes, and `execute`,
what an experiment script does once its config is resolved.

RUN/ holds config.json, .lock (pid and host of process 0), checkpoints/<epoch>/ (the latest
`run.keep` and each seed's best), history.json/.csv/.png and tensorboard/. The rules, stricter
than Keras's BackupAndRestore and ModelCheckpoint:
- A non-empty folder is refused unless resumed, and so is one a live process writes. The lock
  is the kernel's (fcntl.flock on RUN/.lock), so a process that dies, however it dies, lets go
  of it: what it left in the file is only read to name it.
- `--resume` ends with exactly what an uninterrupted run would have; a resume whose recipe
  differs from the saved one is refused, naming the fields.
- A run whose loss stops being finite stops, its checkpoints keeping the last finite state (EXIT_DIVERGED).
- Every check on flags and data happens before the folder is created.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cnnjax import augment, data, files, models, plots, train
from cnnjax import config as configlib
from cnnjax import mesh as meshlib
from cnnjax.checkpoint import CheckpointError
from cnnjax.config import Config, ConfigError
from cnnjax.data import DataError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # flags, data, run folder (argparse uses 2 for bad flags too)
EXIT_DIVERGED = 3  # the training loss stopped being finite
EXIT_FAILED = 4  # some ablation settings failed (see their error.json)
EXIT_NO_SPACE = 6  # the disk filled up: free space, then --resume
EXIT_INTERRUPTED = 130  # Ctrl-C: the run can be resumed


class RunError(Exception):
    """A run folder that cannot be used as asked; the message says why and what to do."""


BAD_INPUT = (
    ConfigError,
    DataError,
    RunError,
    CheckpointError,
    ValueError,
    OSError,
)  # OSError: an unreadable file


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
    traceback: bad input (2), a full disk (EXIT_NO_SPACE), Ctrl-C (EXIT_INTERRUPTED, the line
    ending with `interrupted`), processes that could not meet or lost one another (EXIT_LOST)."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted{interrupted}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        if jax.process_count() > 1 and meshlib.lost_contact(e):
            meshlib.exit_on_error(
                e
            )  # one line, EXIT_LOST, out at once: jax's own watch of the peers may act next
        if _disk_full(e):
            where = f" ({folder})" if folder else ""
            print(
                f"error: the disk is full{where}: no space left on device; every finished epoch is kept: free some space, "
                "then run the same command with --resume",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(EXIT_NO_SPACE) from None
        if isinstance(e, (meshlib.JoinError, *BAD_INPUT)):
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(
                meshlib.EXIT_LOST if isinstance(e, meshlib.JoinError) else EXIT_BAD_INPUT
            ) from None
        meshlib.exit_on_error(
            e
        )  # with several processes: one line (a lost peer) or the traceback, then out at once
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


def _quiet_closed_loop(unraisable: Any) -> None:
    """After a failed save (a full disk), orbax's writes still in flight report into its closed event
    loop: a traceback each, with nothing left to act on. Any other unraisable error is printed."""
    if not (
        unraisable.exc_type is RuntimeError and "Event loop is closed" in str(unraisable.exc_value)
    ):
        sys.__unraisablehook__(unraisable)


def _one_line_warning(
    message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
) -> str:
    return f"warning: {message}\n"  # Python's format adds the source line that warned, which tells a user nothing


def setup_logging() -> None:
    """INFO lines from cnnjax's loggers on stdout, as plain messages (process 0 only), none of orbax's
    (through absl: every save and restore). Called by the scripts, never on import."""
    for name in (
        "absl",
        "asyncio",
    ):  # orbax's save errors come back as exceptions: no second report, nor its writes left in flight
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.formatwarning = _one_line_warning
    sys.unraisablehook = _quiet_closed_loop
    level = logging.INFO if meshlib.is_main_process() else logging.WARNING
    logger = logging.getLogger("cnnjax")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def default_out(name: str, seed: int) -> Path:
    stamp = int(time.time())
    if jax.process_count() > 1:  # every process must name the same folder
        from jax.experimental import multihost_utils

        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    return (
        Path("checkpoints")
        / f"{name}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"
    )


def saved_config(path: Path) -> Config:
    """The config a run folder's config.json holds; RunError, naming it, when it holds none."""
    record = files.read_json(path)
    try:
        return configlib.from_dict(record["config"])
    except (
        TypeError,
        KeyError,
        AttributeError,
        ValueError,
    ) as e:  # a list, a missing key, a section that is not a dict
        raise RunError(
            f"{path} holds no run config ({type(e).__name__}: {e}); it was damaged or edited by hand: "
            "start the run again with another --out"
        ) from None


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class RunFolder:
    """The folder of one run, held by one process at a time (see the module docstring)."""

    def __init__(self, path: Path, resume: bool, writer: bool):
        self.path, self.resume, self.writer = path, resume, writer
        self._lock_fd: int | None = None
        # mesh's watch thread may let go while the main thread does: the second waits until the lock file is gone,
        # since either may end the process (os._exit) right after.
        self._closing = threading.Lock()

    @classmethod
    def open(cls, cfg: Config) -> RunFolder:
        """Check, create and lock the run folder (process 0); other processes only find it."""
        path = (
            Path(cfg.run.out).expanduser() if cfg.run.out else default_out(cfg.name, cfg.train.seed)
        )
        folder = cls(path.absolute(), cfg.run.resume, meshlib.is_main_process())
        refusal = None
        if folder.writer:
            try:
                folder._prepare(cfg)
            except RunError as e:
                refusal = str(e)
        refusal = meshlib.from_process_0(
            refusal
        )  # every process stops with process 0's words, none waits for it
        if refusal is not None:
            raise RunError(refusal)
        return folder

    def _prepare(self, cfg: Config) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunError(f"--out {path} is a file, not a folder")
        if (
            path / ".lock"
        ).is_file():  # a live run's folder is refused as in use, not as merely full
            os.close(
                self._flock(path / ".lock")
            )  # nobody holds it: let go again, the file untouched
        entries = [p.name for p in path.iterdir() if p.name != ".lock"] if path.is_dir() else []
        if entries and not self.resume:
            raise RunError(
                f"--out {path} already holds a run ({', '.join(sorted(entries)[:4])}...); "
                "add --resume to continue it, or choose another --out"
            )
        if self.resume and entries and not (path / "config.json").is_file():
            raise RunError(
                f"--out {path} is not empty and holds no config.json: not a cnnjax run folder, nothing to resume"
            )
        path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            files.clean_orphans(path, recursive=True)
            saved = path / "config.json"
            differ = configlib.recipe_diff(saved_config(saved), cfg) if saved.is_file() else []
            if differ:
                raise RunError(
                    f"--resume with another recipe than {path}/config.json: {'; '.join(differ)}. "
                    "Resume with the run's own flags, or start a new run with another --out"
                )
        except BaseException:
            self.close()
            raise

    def _flock(self, lock: Path) -> int:
        """An open descriptor of `lock` holding the kernel's lock on it; RunError while a live process holds it."""
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_lock(lock)
            raise RunError(
                f"{self.path} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"(since {holder.get('started', '?')}); wait for it to finish"
            ) from None
        return fd

    def _lock(self) -> None:
        """Take RUN/.lock with the kernel's flock; refuse the folder while a live process holds it."""
        lock = self.path / ".lock"
        while True:
            fd = self._flock(lock)
            if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder removed the file as it let go: lock the new one
        left = _read_lock(lock)
        if left:  # a process that died holding the folder (the kernel let go of its lock)
            log.warning(
                f"warning: {lock} was left by process {left.get('pid')}, which is no longer running; taking it over"
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._lock_fd = fd
        meshlib.before_leaving.append(self.close)

    def close(self) -> None:
        """Let go of the folder; safe to call twice, and from mesh's watch of the peers while the run ends."""
        with self._closing:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                (self.path / ".lock").unlink(
                    missing_ok=True
                )  # while still holding it: see _lock's inode check
                os.close(fd)
                if self.close in meshlib.before_leaving:
                    meshlib.before_leaving.remove(self.close)

    def write_config(self, record: dict[str, Any]) -> None:
        """config.json: the run's config as it now runs (a resume may have extended it), when it first started."""
        path = self.path / "config.json"
        if self.writer:
            first = files.read_json(path).get("started") if path.is_file() else None
            files.write_json(
                path, {**record, "started": first or time.strftime("%Y-%m-%d %H:%M:%S")}
            )


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
                f"{prefix}Diverged at epoch {result.diverged[k]}: the training loss is not finite. {ckpts} keeps {kept} "
                "Try a lower learning rate (--learning-rate)."
            )
        elif last is not None:
            lines.append(
                f"{prefix}Final val_accuracy {last.get('val_accuracy', math.nan):.4f} (epoch {last['epoch']})"
                + (
                    " - stopped early: val_loss had stopped improving"
                    if result.stopped and result.stopped[k]
                    else ""
                )
            )
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
    """The config a script runs, checked: `recipe` with the flags' overrides; or, resuming a run folder
    that holds a config.json (--resume --out RUN), that run's own config (its data folder included)
    with the overrides, which may only ask for more epochs or change where and how it runs."""
    cfg = configlib.override(recipe, overrides)
    saved = Path(cfg.run.out or "", "config.json").expanduser()
    if cfg.run.resume and cfg.run.out and saved.is_file():
        cfg = configlib.override(saved_config(saved), overrides)
    return check_config(cfg)


def add_flags(parser: Any) -> None:
    """The flags every experiment script shares besides its config: where the processes meet."""
    meshlib.add_flags(parser)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # `kill` or a scheduler's stop ends a run as Ctrl-C does: one line, EXIT_INTERRUPTED, the lock let go


def start(args: Any) -> None:
    """Join the other processes (when flags or a cluster say so), set up logging, and take SIGTERM as Ctrl-C."""
    meshlib.initialize(
        args.coordinator_address, args.num_processes, args.process_id, args.join_timeout
    )
    setup_logging()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


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
    """Everything an experiment script does after resolving its config: join the processes, check the
    data and the folder (before writing anything), write config.json (and the `preview`), train, and
    print what the run left. A diverged run returns: the script exits with `exit_code(result)`."""
    with exits():
        start(args)
        model = models.from_config(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
        mesh = meshlib.make_mesh(cfg.train.seeds)
        meshlib.check_batch(mesh, cfg.train.batch_size)
        meshlib.check_batch(mesh, cfg.train.eval_batch_size, "train.eval_batch_size")
        datasets = data.load(cfg.data, ("train", cfg.data.validation_split))
        train_set, val_set = datasets["train"], datasets[cfg.data.validation_split]
        data.check_classes(
            datasets,
            model.head.num_classes,
            "MNIST" if cfg.data.dataset == "mnist" else "the data folder",
        )
        folder = RunFolder.open(cfg)
    main = meshlib.is_main_process()
    resume = f": every finished epoch is kept in {folder.path}/checkpoints; continue with the same command plus --resume"
    with exits(resume if main else "", folder.path):
        try:
            if main:
                print(meshlib.summary_line(mesh), flush=True)
                print(models.summary(model), flush=True)
                print(
                    f"train: {len(train_set)} images, validation: {len(val_set)}, classes {', '.join(train_set.class_names)}; "
                    f"run folder {folder.path}",
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
