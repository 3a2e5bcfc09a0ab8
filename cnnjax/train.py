"""Training: `train_and_evaluate` owns the epoch loop (no callbacks: Keras's early stopping and
ReduceLROnPlateau are written into it); `evaluate` measures a model on a dataset. How the input
reaches the compiled steps, in memory or streamed, is cnnjax.feed's.

A seed whose loss stops being finite is diverged: its history ends with a row marked
"diverged", its state goes back to its last finite one (the newest intact checkpoint, read
only then), and it waits there while the other seeds train on. A seed stopped early
(`train.early_stopping`) waits the same way, at its last state. Training ends once no seed
trains.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cnnjax import checkpoint, data, feed, files, models, optim, run_folder, step
from cnnjax import config as configlib
from cnnjax import grid as gridlib
from cnnjax import history as historylib
from cnnjax import mesh as meshlib
from cnnjax.history import History
from cnnjax.step import TrainState

TREES = ("params", "opt_state", "progress")


@dataclasses.dataclass(frozen=True)
class Result:
    """What a training leaves: per seed its history, the epoch (1-based) at which it diverged or
    was stopped early (or None), its best epoch by validation loss; and the final state (stacked
    over seeds)."""

    seeds: list[int]
    histories: list[History]
    diverged: list[int | None]
    best: list[dict[str, Any] | None]
    state: TrainState
    stopped: list[int | None] = dataclasses.field(default_factory=list)


LECTURE_CLASSES = {"mnist": 10, "cats_dogs": 2}  # the datasets whose model has a fixed head


def model_for(cfg: configlib.Config, datasets: dict[str, data.Dataset]) -> nn.Module:
    """cfg's convnet for the data: its head has one unit per class (the lecture's datasets: their
    fixed count, checked), its input the images' channels. DataError for splits whose classes
    differ from it."""
    first = next(iter(datasets.values()))
    count = LECTURE_CLASSES.get(cfg.data.dataset, len(first.class_names))
    folder = "the data folder"
    names = {"mnist": "MNIST", "cats_dogs": folder, "folder": folder}
    where = names.get(cfg.data.dataset, cfg.data.dataset)
    try:
        data.check_classes(datasets, count, where)
    except data.DataError as e:
        if cfg.data.dataset != "cats_dogs":
            raise
        raise data.DataError(
            f"{e}; experiments/images.py trains the same convnet on folders of any class count"
        ) from None
    if count < 2:
        raise data.DataError(
            f"{where} has {count} class ({', '.join(first.class_names)}): a classifier needs at "
            "least 2 class sub-folders"
        )
    channels = first.image_shape[-1]
    return models.from_config(
        cfg.model.name, cfg.data.image_size, cfg.model.dropout, count, channels
    )


def train_and_evaluate(
    cfg: configlib.Config,
    workdir: str | Path,
    datasets: dict[str, Any] | None = None,
    *,
    mesh: Mesh | None = None,
    verbose: bool = True,
    grid: Sequence[gridlib.Member] | None = None,
) -> Result:
    """Train cfg's recipe, writing into `workdir`: checkpoints/, history.json/.csv, history*.png,
    tensorboard/ (process 0). Continues from the newest intact checkpoint there when it has one.
    datasets: {"train": ..., cfg.data.validation_split: ...} already loaded (default:
    data.load(cfg.data)). grid: the members of a grid (cnnjax.grid), trained together as its seeds
    are, each with its own numbers; cfg is then the program's recipe (grid.program_config).
    """
    workdir = Path(workdir)
    verbose = verbose and meshlib.is_main_process()
    own_cfgs, labels, shown = gridlib.seeds_of(cfg, grid)
    seeds = [c.train.seed for c in own_cfgs]

    # --- Mesh: seeds over the `seed` axis, each batch over `data`.
    mesh = meshlib.make_mesh(len(seeds)) if mesh is None else mesh
    seeded = meshlib.sharding(mesh, meshlib.SEED)
    meshlib.check_batch(mesh, cfg.train.batch_size)
    meshlib.check_batch(mesh, cfg.train.eval_batch_size, "train.eval_batch_size")

    # --- Input.
    if datasets is None:
        datasets = data.load(cfg.data, ("train", cfg.data.validation_split))
    train_set, val_set = datasets["train"], datasets[cfg.data.validation_split]

    # --- Model, optimizer and the compiled steps.
    model = model_for(cfg, datasets)
    steps_per_epoch = math.ceil(len(train_set) / cfg.train.batch_size)
    tx = optim.make_optimizer(cfg.optim, steps_per_epoch, cfg.train.epochs, injected=bool(grid))
    train_data, train_batches = feed.feed(train_set, mesh)
    resident, epochs = train_data is not None, cfg.train.epochs
    train_fn = feed.train_fn(
        model, cfg.optim, cfg.augment, mesh, resident, steps_per_epoch, epochs, bool(grid)
    )
    evaluate_val = feed.evaluator(model, val_set, mesh, cfg.train.eval_batch_size)

    # --- State: the newest intact checkpoint, else a new one per seed.
    ckpts = checkpoint.Checkpoints(
        workdir / "checkpoints",
        TREES,
        keep_latest=cfg.run.keep,
        best_metrics=[f"val_loss/{k}" for k in range(len(seeds))],
    )
    # The seal proves a checkpoint's files are as saved, not that they are this run's.
    differs_from_run = functools.partial(_differs, cfg=cfg, grid=grid)
    restore = functools.partial(
        _restore, ckpts, model=model, tx=tx, seeds=seeds, mesh=mesh, grid=grid
    )
    state, histories, diverged, stopped, first_epoch = restore(
        ckpts.latest_intact(differs_from_run)
    )
    if first_epoch and verbose:
        print(f"Resuming {workdir} after epoch {first_epoch}", flush=True)
    # The states of seeds that diverged or stopped, held once one did (a copy: training donates
    # `state`).
    kept = jax.tree.map(jnp.copy, state) if any(diverged) or any(stopped) else None
    historylib.write(workdir, seeds, histories, grid)
    writers = _tensorboard(own_cfgs, labels, workdir)

    # --- The loop.
    _count_compile_time()
    show_progress = verbose and sys.stdout.isatty()
    finished = False
    try:
        for epoch in range(first_epoch, cfg.train.epochs):
            training = [k for k in range(len(seeds)) if diverged[k] is None and stopped[k] is None]
            if not training:
                break
            start, compiled_before = time.perf_counter(), _compile_seconds[0]
            order = step.epoch_order(
                meshlib.to_host(state.rng), len(train_set), cfg.train.batch_size, epoch
            )
            batches = train_batches(*feed.local_order(*order, mesh, per_seed=True))
            progress = (f"epoch {epoch + 1}", order[0].shape[1]) if show_progress else None
            state, sums = feed.run_pass(
                train_fn, state, batches, train_data, mesh, per_seed=True, progress=progress
            )
            train_metrics = step.totals_to_metrics(meshlib.to_host(sums))
            val_metrics = evaluate_val(state.params)
            seconds = time.perf_counter() - start
            rows = [
                {
                    "epoch": epoch + 1,
                    **m,
                    **{f"val_{k}": v for k, v in val.items()},
                    "seconds": seconds,
                }
                for m, val in zip(train_metrics, val_metrics)
            ]

            # Divergence and early stopping: such a seed waits in `kept` while the others train
            # on, held at its last finite state (the newest intact checkpoint, read only now;
            # before any, a new state) or its stopping state.
            newly_diverged = [k for k in training if not _finite(rows[k])]
            for k in newly_diverged:
                rows[k]["diverged"], diverged[k] = True, epoch + 1
            for k in training:
                histories[k].append(rows[k])
            patience = cfg.train.early_stopping
            newly_stopped = [
                k for k in training if diverged[k] is None and _stops(histories[k], patience)
            ]
            for k in newly_stopped:
                rows[k]["stopped"], stopped[k] = True, epoch + 1
            if newly_diverged:
                newest_finite = ckpts.latest_intact(differs_from_run)
                last_finite = restore(newest_finite)[0]
                held = np.isin(range(len(seeds)), newly_diverged)
                kept = _select(held, last_finite, state if kept is None else kept, seeded)
            if newly_stopped:
                held = np.isin(range(len(seeds)), newly_stopped)
                kept = _select(held, state, state if kept is None else kept, seeded)
            frozen = np.array([d is not None or s is not None for d, s in zip(diverged, stopped)])
            if frozen.any():
                state = kept if frozen.all() else _select(frozen, kept, state, seeded)
            if cfg.optim.plateau_factor:
                state = _with_plateau_scale(cfg.optim, state, histories, seeded)

            # Checkpoint, history, logs.
            if any(k not in newly_diverged for k in training):
                _save(
                    ckpts,
                    epoch + 1,
                    state,
                    cfg,
                    model,
                    train_set.class_names,
                    seeds,
                    histories,
                    diverged,
                    stopped,
                    _members(grid),
                )
            historylib.write(workdir, seeds, histories, grid)
            steps_done = meshlib.to_host(state.step)
            compiling = _compile_seconds[0] - compiled_before
            for k in training:
                if verbose:
                    prefix = f"[{shown[k]}] " if len(seeds) > 1 else ""
                    line = historylib.format_epoch(rows[k], cfg.train.epochs, compiling, patience)
                    print(prefix + line, flush=True)
                if writers:
                    rate = _learning_rate(
                        own_cfgs[k], steps_per_epoch, histories[k], int(steps_done[k])
                    )
                    writers[k].epoch({**rows[k], "learning_rate": rate})
        _write_figures(workdir, labels, histories, writers)
        finished = True
    finally:
        ckpts.close()
        for writer in writers:
            writer.close(finished=finished)
    return Result(seeds, histories, diverged, historylib.best_epochs(histories), state, stopped)


def evaluate(
    model: nn.Module, params: Any, dataset: Any, batch_size: int = 100
) -> dict[str, float]:
    """Loss and accuracy of one seed's parameters over all of `dataset` (in memory or a stream),
    on one device of this process."""
    mesh = meshlib.make_mesh(1, jax.local_devices()[:1])
    stacked = jax.device_put(
        jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], params),
        meshlib.sharding(mesh, meshlib.SEED),
    )
    return feed.evaluator(model, dataset, mesh, min(batch_size, len(dataset)))(stacked)[0]


# --- State, checkpoints, logs ---------------------------------------------------------------------


def _members(grid: Sequence[gridlib.Member] | None) -> list[dict[str, Any]] | None:
    return files.strict_json(gridlib.describe(grid)) if grid else None


def _differs(description: dict[str, Any], cfg: configlib.Config, grid: Any) -> list[str]:
    """How a checkpoint differs from this run: its recipe, and a grid's members."""
    differ = run_folder.checkpoint_differs(description, cfg)
    same = description.get("members") == _members(grid)
    return differ + ([] if same else ["the grid's members"])


def _restore(
    ckpts: checkpoint.Checkpoints,
    epoch: int | None,
    model: nn.Module,
    tx: Any,
    seeds: Sequence[int],
    mesh: Mesh,
    grid: Sequence[gridlib.Member] | None = None,
) -> tuple[TrainState, list[History], list[int | None], list[int | None], int]:
    """(state, histories, diverged, stopped, epoch) of the checkpoint of `epoch`; for None, a new
    state per seed at epoch 0. A grid's state gets its members' numbers."""
    num_seeds = len(seeds)
    if epoch is None:
        state = step.init_states(model, tx, seeds, mesh)
        description = {"histories": [[] for _ in seeds], "diverged": [None] * num_seeds}
    else:
        description = ckpts.description(epoch)
        saved_seeds = len(description.get("seeds", []))
        if saved_seeds != num_seeds:
            raise checkpoint.CheckpointError(
                f"{ckpts.path(epoch)} holds {saved_seeds} seeds, this run trains {num_seeds}"
            )
        target = step.abstract_states(model, tx, num_seeds, mesh)
        trees = ckpts.restore(
            epoch,
            {
                "params": target.params,
                "opt_state": target.opt_state,
                "progress": {"step": target.step, "rng": target.rng},
            },
        )
        state = TrainState(
            step=trees["progress"]["step"],
            params=trees["params"],
            opt_state=trees["opt_state"],
            rng=trees["progress"]["rng"],
        )
    if grid:
        seeded = meshlib.sharding(mesh, meshlib.SEED)
        state = gridlib.with_numbers(state, grid, *model.input_shape[:2], seeded)
    histories = [
        [{k: math.nan if v is None else v for k, v in row.items()} for row in h]
        for h in description["histories"]
    ]
    stopped = list(description.get("stopped", [None] * num_seeds))
    return state, histories, list(description["diverged"]), stopped, int(epoch or 0)


def _save(
    ckpts: checkpoint.Checkpoints,
    epoch: int,
    state: TrainState,
    cfg: configlib.Config,
    model: nn.Module,
    class_names: Sequence[str],
    seeds: Sequence[int],
    histories: Sequence[History],
    diverged: Sequence[int | None],
    stopped: Sequence[int | None],
    members: list[dict[str, Any]] | None = None,
) -> None:
    """The epoch's checkpoint (a grid's: with its members, cnnjax.grid.describe); each seed's
    val_loss (inf once it no longer trains) decides which
    epoch is its best."""
    metrics = {
        f"val_loss/{k}": h[-1]["val_loss"]
        if d is None and h and h[-1]["epoch"] == epoch
        else math.inf
        for k, (h, d) in enumerate(zip(histories, diverged))
    }
    trees = {
        "params": state.params,
        "opt_state": state.opt_state,
        "progress": {"step": state.step, "rng": state.rng},
    }
    description = {
        "epoch": epoch,
        "config": configlib.to_dict(cfg),
        "model": models.model_config(model),
        "class_names": list(class_names),
        "seeds": list(seeds),
        "histories": histories,
        "diverged": list(diverged),
        "stopped": list(stopped),
        "best": historylib.best_epochs(histories),
        **({"members": members} if members else {}),
    }
    ckpts.save(epoch, trees, description, metrics)


@jax.jit
def _where_frozen(frozen: jax.Array, kept: TrainState, new: TrainState) -> TrainState:
    return jax.tree.map(
        lambda o, n: jnp.where(frozen.reshape((-1,) + (1,) * (n.ndim - 1)), o, n), kept, new
    )


def _select(
    frozen: np.ndarray, kept: TrainState, new: TrainState, seeded: jax.sharding.NamedSharding
) -> TrainState:
    """Per seed, `kept` where frozen, else `new`, keeping the state's sharding (`seeded`)."""
    return jax.device_put(_where_frozen(meshlib.put(frozen, seeded), kept, new), seeded)


def _learning_rate(
    cfg: configlib.Config, steps_per_epoch: int, history: History, steps_done: int
) -> float:
    """The rate in use after `steps_done` steps (what TensorBoard shows), ReduceLROnPlateau's
    scale included."""
    scale = (
        optim.plateau_scale(cfg.optim, [row["val_loss"] for row in history])
        if cfg.optim.plateau_factor
        else 1.0
    )
    return optim.current_rate(cfg.optim, steps_per_epoch, cfg.train.epochs, steps_done, scale)


def _stops(history: History, patience: int) -> bool:
    """Keras's EarlyStopping: `patience` epochs (0: never) without a lower val_loss."""
    return bool(patience) and historylib.epochs_since_best(history) >= patience


def _finite(row: dict[str, Any]) -> bool:
    return all(math.isfinite(row[m]) for m in ("loss", "val_loss"))


def _with_plateau_scale(
    optim_cfg: Any, state: TrainState, histories: Sequence[History], seeded: Any
) -> TrainState:
    """ReduceLROnPlateau: each seed's scale for the next epoch, into the optimizer state."""
    val_losses = [[row["val_loss"] for row in history] for history in histories]
    scales = np.array([optim.plateau_scale(optim_cfg, losses) for losses in val_losses], np.float32)
    plateau = optim.PlateauState(meshlib.put(scales, seeded))
    return state.replace(opt_state=(*state.opt_state[:-1], plateau))


def _tensorboard(
    cfgs: Sequence[configlib.Config], labels: Sequence[str], workdir: Path
) -> list[Any]:
    """One TensorBoard run per seed (member); process 0 only."""
    if not cfgs[0].run.tensorboard or not meshlib.is_main_process():
        return []
    from cnnjax import tensorboard

    return tensorboard.writers(workdir, labels, [configlib.flatten(c) for c in cfgs])


def _write_figures(
    workdir: Path, labels: Sequence[str], histories: Sequence[History], writers: Sequence[Any]
) -> None:
    if meshlib.is_main_process():
        from cnnjax import plots

        plots.plot_run(workdir, labels, histories, writers)


_compile_seconds = [0.0]


@functools.cache
def _count_compile_time() -> None:
    """Count the seconds jax spends compiling (tracing, lowering, XLA), for the first epoch's
    line."""

    def listen(event: str, seconds: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            _compile_seconds[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
