"""A run: a config, a folder that belongs to it, the data checked, training that survives a crash.

    RUN/
        config.json        the resolved config (whole), the devices, the classes, the command
        .lock              pid and host of the process writing RUN (process 0)
        checkpoints/<E>/   orbax, after every epoch E: params, optimizer state, step and RNG,
                           and a description (config, model, classes, histories, best so far).
                           The latest `run.keep` epochs are kept, and each seed's best.
        history.json/.csv  one row per seed and epoch, rewritten after every epoch
        history.png        the lecture's "Accuracy & Loss" figure (history-seedN.png for K > 1)
        tensorboard/       event files (tensorboard/seedN/ for K > 1)

Rules, as Keras's BackupAndRestore and ModelCheckpoint have them, and stricter:
- A run into an existing non-empty folder is refused unless it is resumed (`run.resume`);
  a folder another live process writes is refused (its lock names the pid); a lock left
  by a dead process is taken over with a warning.
- `--resume` continues from the latest checkpoint, with exactly the history, parameters
  and best checkpoints an uninterrupted run would have (same seed). A folder with no
  checkpoint yet starts from the beginning. A resume whose recipe differs from the
  saved one is refused, naming the fields.
- A run whose loss stops being finite stops; its checkpoints keep the last finite
  state, and the process exits with EXIT_DIVERGED.
- Every check on flags and data happens before the folder is created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import checkpoint, files, models, train
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
EXIT_INTERRUPTED = 130  # Ctrl-C: the run can be resumed

TREES = ("params", "opt_state", "progress")


class RunError(Exception):
    """A run folder that cannot be used as asked; the message says why and what to do."""


@contextlib.contextmanager
def exit_on_bad_input() -> Iterator[None]:
    """Turn the errors a user can cause into one line on stderr and exit code 2, no traceback."""
    try:
        yield
    except (ConfigError, DataError, RunError, CheckpointError, ValueError, OSError) as e:  # OSError: an unreadable file
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record arrives (not the one at setup), so a
    redirected or replaced stdout (pytest's capture, a notebook) still gets the lines."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging() -> None:
    """INFO lines from cnnjax's loggers on stdout, as plain messages (process 0 only)."""
    level = logging.INFO if meshlib.is_main_process() else logging.WARNING
    logger = logging.getLogger("cnnjax")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


# --- The data a config asks for --------------------------------------------------------------------


@dataclasses.dataclass
class Splits:
    """Training and validation data as uint8 arrays, with the class names."""

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    class_names: list[str]


def check_classes(model: Any, class_names: Sequence[str], labels: Sequence[np.ndarray], where: str) -> None:
    """The model's head must fit the classes: exactly two for the sigmoid head, and every label in range."""
    count = 2 if model.head == "sigmoid" else model.num_classes
    if len(class_names) != count:
        raise DataError(f"{where} has {len(class_names)} classes ({', '.join(class_names)}) but the model needs exactly {count}; "
                        f"give a folder with {count} class sub-folders")
    for array in labels:
        if len(array) and (int(np.min(array)) < 0 or int(np.max(array)) >= count):
            raise DataError(f"{where}: labels run from {int(np.min(array))} to {int(np.max(array))}, outside 0..{count - 1}")


def load_data(cfg: Config, model: Any) -> Splits:
    """The training split and cfg.data.validation_split, checked against the model."""
    from cnnjax import data

    if cfg.data.data_dir is not None and not Path(cfg.data.data_dir).expanduser().is_dir():
        raise DataError(f"--data-dir {cfg.data.data_dir} does not exist; pass the folder that holds the data")
    if cfg.data.dataset == "mnist":
        if cfg.data.input == "stream":
            raise DataError("--input stream is for image folders and TFDS image sets (cats_dogs); MNIST (55 MB as uint8) "
                            "always fits in memory: use --input memory or auto")
        if cfg.data.validation_split not in ("test", "train"):
            raise DataError(f"MNIST has the splits train and test, not {cfg.data.validation_split!r}")
        log.info("input: memory (%s)", "--input memory" if cfg.data.input == "memory" else "auto: MNIST's 55 MB of uint8 images always fit")
        mnist = data.load_mnist(cfg.data.data_dir)
        split = cfg.data.validation_split
        splits = Splits((mnist["train_images"], mnist["train_labels"]), (mnist[f"{split}_images"], mnist[f"{split}_labels"]),
                        [str(d) for d in range(10)])
        where = "MNIST"
    else:
        from cnnjax.data import stream

        size = (cfg.data.image_size, cfg.data.image_size)
        wanted = ("train", cfg.data.validation_split)
        # --input: memory, stream or auto (logs its choice); streams read as (images, labels) pairs too.
        streams = stream.cats_dogs_streams(cfg.data.input, cfg.data.data_dir, wanted, size, cfg.data.interpolation)
        if streams is not None:
            train_set, val_set = streams["train"], streams[cfg.data.validation_split]
            splits = Splits(train_set, val_set, list(train_set.class_names))  # type: ignore[arg-type]
        else:
            folders = data.load_cats_dogs(cfg.data.data_dir, wanted, size, cfg.data.interpolation)
            train_set, val_set = folders["train"], folders[cfg.data.validation_split]
            splits = Splits((train_set.images, train_set.labels), (val_set.images, val_set.labels), list(train_set.class_names))
        where = "the data folder"
    check_classes(model, splits.class_names, [splits.train[1], splits.validation[1]], where)
    return splits


# --- The run folder --------------------------------------------------------------------------------


def default_out(name: str, seed: int) -> Path:
    stamp = int(time.time())
    if jax.process_count() > 1:  # every process must name the same folder
        from jax.experimental import multihost_utils

        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    return Path("checkpoints") / f"{name}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class RunFolder:
    """The folder of one run, held by one process at a time (see the module docstring)."""

    def __init__(self, path: Path, resume: bool, writer: bool):
        self.path, self.resume, self.writer = path, resume, writer
        self._locked = False

    @classmethod
    def open(cls, cfg: Config) -> RunFolder:
        """Check, create and lock the run folder (process 0); other processes only find it."""
        path = Path(cfg.run.out).expanduser() if cfg.run.out else default_out(cfg.name, cfg.train.seed)
        folder = cls(path.absolute(), cfg.run.resume, meshlib.is_main_process())
        refusal = None
        if folder.writer:
            try:
                folder._prepare(cfg)
            except RunError as e:
                refusal = str(e)
        refusal = meshlib.from_process_0(refusal)  # every process stops with process 0's words, none waits for it
        if refusal is not None:
            raise RunError(refusal)
        return folder

    def _prepare(self, cfg: Config) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunError(f"--out {path} is a file, not a folder")
        lock = path / ".lock"
        if lock.is_file():
            self._refuse_if_held(lock)
        entries = [p.name for p in path.iterdir() if p.name != ".lock"] if path.is_dir() else []
        if entries and not self.resume:
            raise RunError(f"--out {path} already holds a run ({', '.join(sorted(entries)[:4])}...); "
                           "add --resume to continue it, or choose another --out")
        if self.resume and entries and not (path / "config.json").is_file():
            raise RunError(f"--out {path} is not empty and holds no config.json: not a cnnjax run folder, nothing to resume")
        path.mkdir(parents=True, exist_ok=True)
        self._lock()
        files.clean_orphans(path, recursive=True)
        saved = self.saved_config()
        if saved is not None:
            differ = configlib.recipe_diff(configlib.from_dict(saved), cfg)
            if differ:
                self.close()
                raise RunError(f"--resume with another recipe than {path}/config.json: {'; '.join(differ)}. "
                               "Resume with the run's own flags, or start a new run with another --out")

    def _lock(self) -> None:
        lock = self.path / ".lock"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_if_held(lock)
                log.warning(f"warning: {lock} was left by process {_read_lock(lock).get('pid')}, which is no longer running; "
                            "taking it over")
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            return
        raise RunError(f"could not take the lock {lock}; another process is starting in {self.path}")

    def _refuse_if_held(self, lock: Path) -> None:
        """A lock of a live process (or of another host, which cannot be checked) refuses the folder."""
        holder = _read_lock(lock)
        pid, host = holder.get("pid", -1), holder.get("host")
        if host != socket.gethostname() or files.pid_alive(int(pid)):
            raise RunError(f"{self.path} is in use by process {pid} on {host} (since {holder.get('started', '?')}); "
                           f"wait for it to finish, or remove {lock} if that process is gone")

    def close(self) -> None:
        if self._locked:
            (self.path / ".lock").unlink(missing_ok=True)
            self._locked = False

    def saved_config(self) -> dict[str, Any] | None:
        path = self.path / "config.json"
        return json.loads(path.read_text())["config"] if path.is_file() else None

    def write_config(self, record: dict[str, Any]) -> None:
        if self.writer and not (self.path / "config.json").is_file():
            files.write_json(self.path / "config.json", record)

    def write_history(self, histories: Sequence[train.History], seeds: Sequence[int]) -> None:
        """history.json and history.csv: one row per seed and epoch (column "seed")."""
        if not self.writer:
            return
        rows = [{"seed": seed, **row} for seed, history in zip(seeds, histories) for row in history]
        files.write_json(self.path / "history.json", rows)
        files.write_csv(self.path / "history.csv", rows)


def read_history(path: str | os.PathLike) -> dict[int, train.History]:
    """history.json of a run folder, as {seed: rows}."""
    rows = json.loads(Path(path, "history.json").read_text())
    out: dict[int, train.History] = {}
    for row in rows:
        out.setdefault(row["seed"], []).append({k: v for k, v in row.items() if k != "seed"})
    return out


# --- Training with checkpoints ---------------------------------------------------------------------


def best_epochs(histories: Sequence[train.History]) -> list[dict[str, Any] | None]:
    """Per seed, the first epoch of lowest finite val_loss (Keras's save_best_only), or None."""
    best = []
    for history in histories:
        finite = [row for row in history if row.get("val_loss") is not None and math.isfinite(row["val_loss"])]
        row = min(finite, key=lambda r: r["val_loss"]) if finite else None
        best.append(None if row is None else {"epoch": row["epoch"], "val_loss": row["val_loss"],
                                              "val_accuracy": row.get("val_accuracy")})
    return best


@dataclasses.dataclass
class RunResult:
    folder: RunFolder
    trainer: train.Trainer
    state: train.TrainState
    histories: list[train.History]
    diverged: list[int | None]
    best: list[dict[str, Any] | None]
    seeds: list[int]

    @property
    def exit_code(self) -> int:
        return EXIT_DIVERGED if any(d is not None for d in self.diverged) else EXIT_OK


def describe_checkpoint(cfg: Config, model: Any, class_names: Sequence[str], seeds: Sequence[int], result: train.FitResult,
                        epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "config": configlib.to_dict(cfg),
        "model": models.model_config(model),
        "class_names": list(class_names),
        "seeds": list(seeds),
        "histories": result.histories,
        "diverged": result.diverged,
        "best": best_epochs(result.histories),
    }


def train_run(
    cfg: Config,
    model: Any,
    splits: Splits,
    folder: RunFolder,
    mesh: jax.sharding.Mesh | None = None,
    verbose: bool = True,
    callbacks: Sequence[train.EpochCallback] = (),
    trainer: train.Trainer | None = None,
) -> RunResult:
    """Train cfg's recipe in `folder`, resuming from its latest checkpoint when there is one.

    trainer: one already compiled for this model, optimizer, augmentation and seed count
    (the ablation's seed runs share one), else a new one on `mesh`.
    """
    seeds = [cfg.train.seed + k for k in range(cfg.train.seeds)]
    if trainer is None:
        tx = train.make_optimizer(cfg.optim)
        mesh = meshlib.make_mesh(len(seeds)) if mesh is None else mesh
        trainer = train.Trainer(model, tx, cfg.augment, num_seeds=len(seeds), mesh=mesh)
    meshlib.check_batch(trainer.mesh, cfg.train.batch_size)
    meshlib.check_batch(trainer.mesh, cfg.train.eval_batch_size, "train.eval_batch_size")
    metric_names = [f"val_loss/{k}" for k in range(len(seeds))]
    ckpts = checkpoint.Checkpoints(folder.path / "checkpoints", TREES, keep_latest=cfg.run.keep, best_metrics=metric_names)
    latest = ckpts.latest_step()
    if latest is None:
        state = trainer.init(seeds)
        fit_state = train.FitResult(state, [[] for _ in seeds], [None] * len(seeds))
        epoch = 0
    else:
        start = time.perf_counter()
        fit_state, epoch = _restore(ckpts, latest, trainer)
        if verbose and meshlib.is_main_process():
            print(f"Resuming {folder.path} after epoch {epoch} (restored in {time.perf_counter() - start:.1f} s)", flush=True)
    folder.write_history(fit_state.histories, seeds)

    def save_epoch(epoch: int, result: train.FitResult) -> None:
        if not result.all_diverged:  # when every seed went back a step, there is nothing new to save
            metrics = {f"val_loss/{k}": (h[-1].get("val_loss") if h and h[-1]["epoch"] == epoch and not h[-1].get("diverged")
                                         else math.inf) for k, h in enumerate(result.histories)}
            trees = {"params": result.state.params, "opt_state": result.state.opt_state,
                     "progress": {"step": result.state.step, "rng": result.state.rng}}
            ckpts.save(epoch, trees, describe_checkpoint(cfg, model, splits.class_names, seeds, result, epoch), metrics)
        folder.write_history(result.histories, seeds)

    loggers = _tensorboard_loggers(cfg, folder, seeds)

    def log_epoch(epoch: int, result: train.FitResult) -> None:
        for logger, history in zip(loggers, result.histories):
            if history and history[-1]["epoch"] == epoch:
                logger.log_epoch({**history[-1], "learning_rate": cfg.optim.learning_rate})

    finished = False
    try:
        result = train.fit(
            trainer, fit_state.state, splits.train, cfg.train.epochs, cfg.train.batch_size, splits.validation,
            cfg.train.eval_batch_size, callbacks=[save_epoch, log_epoch, *callbacks], verbose=verbose,
            initial_epoch=epoch, histories=fit_state.histories, diverged=fit_state.diverged,
        )
        if folder.writer:
            _write_figures(folder, seeds, result.histories, loggers)
        finished = True
    finally:
        ckpts.close()
        for logger in loggers:
            logger.close(finished=finished)
    return RunResult(folder, trainer, result.state, result.histories, result.diverged, best_epochs(result.histories), seeds)


def _tensorboard_loggers(cfg: Config, folder: RunFolder, seeds: Sequence[int]) -> list[Any]:
    """One TensorBoard run per seed (tensorboard/, or tensorboard/seedN/ for several), process 0 only."""
    if not (cfg.run.tensorboard and folder.writer):
        return []
    from cnnjax.tensorboard import TensorBoardLogger

    loggers = []
    for seed in seeds:
        logger = TensorBoardLogger(folder.path / "tensorboard" / (f"seed{seed}" if len(seeds) > 1 else ""))
        logger.log_config(configlib.to_dict(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, seeds=1))))
        loggers.append(logger)
    return loggers


def history_figure_name(seed: int, num_seeds: int) -> str:
    return "history.png" if num_seeds == 1 else f"history-seed{seed}.png"


def _write_figures(folder: RunFolder, seeds: Sequence[int], histories: Sequence[train.History], loggers: Sequence[Any]) -> None:
    """The lecture's accuracy & loss figure per seed; with the augmentation preview, into TensorBoard too."""
    from cnnjax import plots

    for k, (seed, history) in enumerate(zip(seeds, histories)):
        path = plots.plot_history(history, folder.path / history_figure_name(seed, len(seeds)))
        if loggers:
            last = history[-1]["epoch"] if history else 0
            loggers[k].log_png("history", path, last)
            if (folder.path / "preview.png").is_file():
                loggers[k].log_png("preview", folder.path / "preview.png", 0)


def _restore(ckpts: checkpoint.Checkpoints, step: int, trainer: train.Trainer) -> tuple[train.FitResult, int]:
    description = ckpts.description(step)
    if len(description.get("seeds", [])) != trainer.num_seeds:
        raise RunError(f"{ckpts.path(step)} holds {len(description.get('seeds', []))} seeds, this run trains {trainer.num_seeds}")
    abstract = trainer.abstract_state()
    trees = ckpts.restore(step, {"params": abstract.params, "opt_state": abstract.opt_state,
                                 "progress": {"step": abstract.step, "rng": abstract.rng}})
    state = train.TrainState(step=trees["progress"]["step"], params=trees["params"], opt_state=trees["opt_state"],
                             rng=trees["progress"]["rng"])
    histories = [[_nan_for_none(row) for row in h] for h in description["histories"]]
    return train.FitResult(state, histories, list(description["diverged"])), int(description["epoch"])


def _nan_for_none(row: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON wrote NaN as null; the history in memory holds floats."""
    return {k: (math.nan if v is None else v) for k, v in row.items()}


# --- Finding and loading a saved model --------------------------------------------------------------


def find_checkpoint(path: str | os.PathLike, which: str | int = "best", seed_index: int = 0) -> Path:
    """The checkpoint folder `path` means: a checkpoint folder itself, or a run folder (its
    best epoch for `seed_index`, its latest, or epoch N), or RUN/best, RUN/latest."""
    if isinstance(which, str) and which.isdigit():
        which = int(which)
    if which not in ("best", "latest") and not (isinstance(which, int) and which >= 0):
        raise CheckpointError(f"which checkpoint must be best, latest or an epoch number, got {which!r}")
    path = Path(path).expanduser().absolute()
    if checkpoint.is_checkpoint(path):
        return path
    if path.name in ("best", "latest") and not path.exists():
        path, which = path.parent, path.name
    folder = path / "checkpoints"
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and checkpoint.is_checkpoint(p)) if folder.is_dir() else []
    if not steps:
        raise CheckpointError(f"{path} holds no checkpoint (neither a run folder with checkpoints/<epoch>/ nor a checkpoint folder)")
    if which == "latest":
        return folder / str(steps[-1])
    if which == "best":
        description = checkpoint.read_description(folder / str(steps[-1]))
        best = description.get("best", [])
        if not 0 <= seed_index < len(best):
            raise CheckpointError(f"{path} has {len(best)} seed(s); seed index {seed_index} is not one of them")
        if best[seed_index] is None:
            raise CheckpointError(f"{path}: seed index {seed_index} has no finite validation loss, so no best epoch")
        return folder / str(best[seed_index]["epoch"])
    if which not in steps:
        raise CheckpointError(f"{path} has no checkpoint of epoch {which}; it keeps epochs {', '.join(map(str, steps))}")
    return folder / str(which)


def save_model(folder: str | os.PathLike, model: Any, params: Any, class_names: Sequence[str] | None = None, epoch: int = 0,
               extra: dict[str, Any] | None = None) -> Path:
    """Save one seed's parameters as FOLDER/checkpoints/<epoch>, which load_model, evaluate.py and
    activations.py read (for a model trained or changed outside `train_run`)."""
    ckpts = checkpoint.Checkpoints(Path(folder) / "checkpoints", ("params",))
    try:
        description = {"epoch": epoch, "model": models.model_config(model), "class_names": list(class_names or []),
                       "seeds": [0], "best": [{"epoch": epoch}], **(extra or {})}
        return ckpts.save(epoch, {"params": train.stack_states([params])}, description)
    finally:
        ckpts.close()


def load_model(path: str | os.PathLike, which: str | int = "best", seed_index: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """(model, params, description) of one seed from a checkpoint, rebuilt from the folder alone."""
    step_dir = find_checkpoint(path, which, seed_index)
    description = checkpoint.read_description(step_dir)
    model = models.build_model(description["model"])
    num_seeds = len(description.get("seeds", [0]))
    if not 0 <= seed_index < num_seeds:
        raise CheckpointError(f"{step_dir} holds {num_seeds} seed(s); seed index {seed_index} is not one of them")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(jax.vmap(lambda rng: models.init_params(model, rng)), jax.ShapeDtypeStruct((num_seeds, 2), jnp.uint32))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    params = checkpoint.restore_trees(step_dir, {"params": abstract})["params"]
    return model, train.seed_slice(params, seed_index), {**description, "path": str(step_dir)}


# --- Reports ------------------------------------------------------------------------------------------


def closing_lines(result: RunResult) -> list[str]:
    """What the run leaves, in words that are true of it."""
    lines = []
    ckpts = result.folder.path / "checkpoints"
    for k, (seed, history) in enumerate(zip(result.seeds, result.histories)):
        prefix = f"[seed {seed}] " if len(result.seeds) > 1 else ""
        best = result.best[k]
        last = next((row for row in reversed(history) if not row.get("diverged")), None)
        if result.diverged[k] is not None:
            kept = f"the last finite state, epoch {last['epoch']}," if last else "no checkpoint"
            lines.append(f"{prefix}Diverged at epoch {result.diverged[k]}: the training loss is not finite. {ckpts} keeps {kept} "
                         "Try a lower learning rate (--learning-rate).")
        elif last is not None:
            lines.append(f"{prefix}Final val_accuracy {last.get('val_accuracy', math.nan):.4f} (epoch {last['epoch']})")
        if best is not None:
            lines.append(f"{prefix}Best val_loss {best['val_loss']:.4f} at epoch {best['epoch']} "
                         f"(val_accuracy {best['val_accuracy']:.4f}): {ckpts / str(best['epoch'])}")
    return lines


def check_config(cfg: Config) -> Config:
    """config.check, with the model's smallest input size computed from its layers."""
    return configlib.check(cfg, lambda c: models.min_input_size(models.MODELS[c.model.name]()))


def add_flags(parser: Any) -> None:
    """The flags every experiment script shares besides its config: where the processes meet."""
    meshlib.add_flags(parser)


def start(args: Any) -> None:
    """Join the other processes (when flags or a cluster say so) and set up logging."""
    meshlib.initialize(args.coordinator_address, args.num_processes, args.process_id)
    setup_logging()


def versions() -> dict[str, str]:
    import flax
    import optax
    import orbax.checkpoint

    return {"python": sys.version.split()[0], "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax-checkpoint": orbax.checkpoint.__version__, "numpy": np.__version__}


def execute(cfg: Config, args: Any, argv: Sequence[str] | None = None,
            before_training: Callable[[RunFolder, Splits], None] | None = None,
            callbacks: Sequence[train.EpochCallback] = ()) -> RunResult:
    """Everything an experiment script does after resolving its config: join the processes,
    check the data and the folder (all before writing anything), train, write the history,
    its figure and the closing lines. Errors a user can cause exit with one line (code 2);
    Ctrl-C says how to resume and exits with EXIT_INTERRUPTED. A diverged run says so and
    returns: the script exits with `result.exit_code` once it has printed what it adds."""
    with exit_on_bad_input():
        start(args)
        model = models.from_config(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
        mesh = meshlib.make_mesh(cfg.train.seeds)
        meshlib.check_batch(mesh, cfg.train.batch_size)
        meshlib.check_batch(mesh, cfg.train.eval_batch_size, "train.eval_batch_size")
        splits = load_data(cfg, model)
        folder = RunFolder.open(cfg)
    main = meshlib.is_main_process()
    try:
        if main:
            print(meshlib.summary_line(mesh), flush=True)
            print(models.summary(model), flush=True)
            print(f"train: {len(splits.train[1])} images, validation: {len(splits.validation[1])}, "
                  f"classes {', '.join(splits.class_names)}; run folder {folder.path}", flush=True)
        folder.write_config({
            "config": configlib.to_dict(cfg), "devices": meshlib.describe(mesh), "class_names": splits.class_names,
            "model": models.model_config(model), "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
            "versions": versions(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        })
        if before_training is not None and main:
            before_training(folder, splits)
        try:
            result = train_run(cfg, model, splits, folder, mesh, callbacks=callbacks)
        except KeyboardInterrupt:
            if main:
                print(f"\ninterrupted: every finished epoch is kept in {folder.path}/checkpoints; continue with the same "
                      f"command plus --resume --out {folder.path}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        if main:
            for line in closing_lines(result):
                print(line, flush=True)
            written = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.path.iterdir() if not p.name.startswith("."))
            print(f"Wrote {folder.path}/: {', '.join(written)}", flush=True)
    finally:
        folder.close()
    return result
