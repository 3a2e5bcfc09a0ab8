"""Training: `train_and_evaluate` owns the epoch loop (no callbacks: Keras's early stopping and
ReduceLROnPlateau are written into it); `evaluate` measures a model on a dataset.

The input is fed one of two ways, chosen per dataset (`_feed`): a dataset in memory is put on
every device once and the compiled steps gather their batches from it by index (no image
crosses from the host during training); a stream (cnnjax.data.Stream) is read by the host and
placed two steps ahead. The numbers are the same either way.

A seed whose loss stops being finite is diverged: its history ends with a row marked
"diverged", its state goes back to its last finite one (the newest intact checkpoint, read
only then), and it waits there while the other seeds train on. A seed stopped early
(`train.early_stopping`) waits the same way, at its last state. Training ends once no seed trains.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cnnjax import checkpoint, data, files, models, optim, step
from cnnjax import config as configlib
from cnnjax import mesh as meshlib
from cnnjax.augment import AugmentConfig
from cnnjax.step import TrainState

History = list[dict[str, Any]]
TREES = ("params", "opt_state", "progress")


@dataclasses.dataclass(frozen=True)
class Result:
    """What a training leaves: per seed its history, the epoch (1-based) at which it diverged or was
    stopped early (or None), its best epoch by validation loss; and the final state (stacked over seeds)."""

    seeds: list[int]
    histories: list[History]
    diverged: list[int | None]
    best: list[dict[str, Any] | None]
    state: TrainState
    stopped: list[int | None] = dataclasses.field(default_factory=list)


def train_and_evaluate(
    cfg: configlib.Config,
    workdir: str | Path,
    datasets: dict[str, Any] | None = None,
    *,
    mesh: Mesh | None = None,
    verbose: bool = True,
) -> Result:
    """Train cfg's recipe, writing into `workdir`: checkpoints/, history.json/.csv, history*.png,
    tensorboard/ (process 0). Continues from the newest intact checkpoint there when it has one.
    datasets: {"train": ..., cfg.data.validation_split: ...} already loaded (default: data.load(cfg.data)).
    """
    workdir = Path(workdir)
    verbose = verbose and meshlib.is_main_process()
    seeds = [cfg.train.seed + k for k in range(cfg.train.seeds)]

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
    model = models.from_config(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    data.check_classes(
        datasets,
        model.head.num_classes,
        "MNIST" if cfg.data.dataset == "mnist" else "the data folder",
    )
    steps_per_epoch = math.ceil(len(train_set) / cfg.train.batch_size)
    tx = optim.make_optimizer(cfg.optim, steps_per_epoch, cfg.train.epochs)
    train_data, train_batches = _feed(train_set, mesh)
    train_fn = _train_fn(
        model,
        cfg.optim,
        cfg.augment,
        mesh,
        train_data is not None,
        steps_per_epoch,
        cfg.train.epochs,
    )
    evaluate_val = _evaluator(model, val_set, mesh, cfg.train.eval_batch_size)

    # --- State: the newest intact checkpoint, else a new one per seed.
    ckpts = checkpoint.Checkpoints(
        workdir / "checkpoints",
        TREES,
        keep_latest=cfg.run.keep,
        best_metrics=[f"val_loss/{k}" for k in range(len(seeds))],
    )
    state, histories, diverged, stopped, first_epoch = _restore(
        ckpts, ckpts.latest_intact(), model, tx, seeds, mesh
    )
    if first_epoch and verbose:
        print(f"Resuming {workdir} after epoch {first_epoch}", flush=True)
    # The states of seeds that diverged or stopped, held once one did (a copy: training donates `state`).
    kept = jax.tree.map(jnp.copy, state) if any(diverged) or any(stopped) else None
    _write_history(workdir, seeds, histories)
    writers = _tensorboard(cfg, workdir, seeds)

    # --- The loop.
    _count_compile_time()
    progress = verbose and sys.stdout.isatty()
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
            state, sums = _run_pass(
                train_fn,
                state,
                train_batches(*_local_order(*order, mesh, per_seed=True)),
                train_data,
                mesh,
                per_seed=True,
                progress=(f"epoch {epoch + 1}", order[0].shape[1]) if progress else None,
            )
            rows = [
                {
                    "epoch": epoch + 1,
                    **m,
                    **{f"val_{k}": v for k, v in val.items()},
                    "seconds": time.perf_counter() - start,
                }
                for m, val in zip(
                    step.totals_to_metrics(meshlib.to_host(sums)), evaluate_val(state.params)
                )
            ]

            # Divergence and early stopping: such a seed waits in `kept` while the others train on, held at its last
            # finite state (the newest intact checkpoint, read only now; before any, a new state) or its stopping state.
            newly_diverged = [
                k
                for k in training
                if not all(math.isfinite(rows[k][m]) for m in ("loss", "val_loss"))
            ]
            for k in newly_diverged:
                rows[k]["diverged"], diverged[k] = True, epoch + 1
            for k in training:
                histories[k].append(rows[k])
            newly_stopped = [
                k
                for k in training
                if diverged[k] is None
                and cfg.train.early_stopping
                and _stale(histories[k]) >= cfg.train.early_stopping
            ]
            for k in newly_stopped:
                rows[k]["stopped"], stopped[k] = True, epoch + 1
            if newly_diverged:
                last_finite = _restore(ckpts, ckpts.latest_intact(), model, tx, seeds, mesh)[0]
                kept = _select(
                    np.isin(range(len(seeds)), newly_diverged),
                    last_finite,
                    state if kept is None else kept,
                    seeded,
                )
            if newly_stopped:
                kept = _select(
                    np.isin(range(len(seeds)), newly_stopped),
                    state,
                    state if kept is None else kept,
                    seeded,
                )
            frozen = np.array([d is not None or s is not None for d, s in zip(diverged, stopped)])
            if frozen.any():
                state = kept if frozen.all() else _select(frozen, kept, state, seeded)
            if (
                cfg.optim.plateau_factor
            ):  # ReduceLROnPlateau: the scale for the next epoch, in the optimizer state
                scales = np.array(
                    [
                        optim.plateau_scale(cfg.optim, [row["val_loss"] for row in h])
                        for h in histories
                    ],
                    np.float32,
                )
                state = state.replace(
                    opt_state=(
                        *state.opt_state[:-1],
                        optim.PlateauState(meshlib.put(scales, seeded)),
                    )
                )

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
                )
            _write_history(workdir, seeds, histories)
            steps_done = meshlib.to_host(state.step)
            for k in training:
                if verbose:
                    prefix = f"[seed {seeds[k]}] " if len(seeds) > 1 else ""
                    print(
                        prefix
                        + format_epoch(
                            rows[k],
                            cfg.train.epochs,
                            _compile_seconds[0] - compiled_before,
                            cfg.train.early_stopping,
                        ),
                        flush=True,
                    )
                if writers:
                    writers[k].epoch(
                        {
                            **rows[k],
                            "learning_rate": _learning_rate(
                                cfg, steps_per_epoch, histories[k], int(steps_done[k])
                            ),
                        }
                    )
        _write_figures(workdir, seeds, histories, writers)
        finished = True
    finally:
        ckpts.close()
        for writer in writers:
            writer.close(finished=finished)
    return Result(seeds, histories, diverged, best_epochs(histories), state, stopped)


def evaluate(
    model: nn.Module, params: Any, dataset: Any, batch_size: int = 100
) -> dict[str, float]:
    """Loss and accuracy of one seed's parameters over all of `dataset` (in memory or a stream), on one device of this process."""
    mesh = meshlib.make_mesh(1, jax.local_devices()[:1])
    stacked = jax.device_put(
        jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], params),
        meshlib.sharding(mesh, meshlib.SEED),
    )
    return _evaluator(model, dataset, mesh, min(batch_size, len(dataset)))(stacked)[0]


def best_epochs(histories: Sequence[History]) -> list[dict[str, Any] | None]:
    """Per seed, the first epoch of lowest finite val_loss (Keras's save_best_only), or None."""
    best = []
    for history in histories:
        finite = [
            row
            for row in history
            if row.get("val_loss") is not None and math.isfinite(row["val_loss"])
        ]
        row = min(finite, key=lambda r: r["val_loss"]) if finite else None
        best.append(
            None
            if row is None
            else {
                "epoch": row["epoch"],
                "val_loss": row["val_loss"],
                "val_accuracy": row.get("val_accuracy"),
            }
        )
    return best


def format_epoch(
    row: dict[str, Any], epochs: int, compiling: float = 0.0, patience: int = 0
) -> str:
    """A Keras-like line: 'Epoch 3/5 - 12.1s - loss: 0.0412 - accuracy: 0.9871 - ...'; with
    `compiling` seconds (the first epoch), how much of the epoch went to compiling."""
    metrics = " - ".join(
        f"{k}: {row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in row
    )
    seconds = f"{row['seconds']:.1f}s" + (
        f" ({compiling:.1f}s of it compiling)" if compiling >= 0.5 else ""
    )
    note = (
        " - diverged (loss is not finite)"
        if row.get("diverged")
        else f" - stopped early (val_loss has not improved for {patience} epochs)"
        if row.get("stopped")
        else ""
    )
    return f"Epoch {row['epoch']}/{epochs} - {seconds} - {metrics}{note}"


def read_history(workdir: str | Path) -> dict[int, History]:
    """history.json of a run folder, as {seed: rows}."""
    out: dict[int, History] = {}
    for row in files.read_json(Path(workdir, "history.json")):
        out.setdefault(row["seed"], []).append({k: v for k, v in row.items() if k != "seed"})
    return out


# --- Feeding the steps ----------------------------------------------------------------------------


def _feed(
    dataset: Any, mesh: Mesh
) -> tuple[dict[str, jax.Array] | None, Callable[[np.ndarray, np.ndarray], Iterator[dict]]]:
    """(the data the compiled steps gather from, or None; batches(indices, weights) -> the host
    batches of a pass, each holding the steps of one call). indices and weights are the pass's
    order (seeds or 1, steps, batch) restricted to this process's block."""
    if isinstance(
        dataset, data.Stream
    ):  # the host reads each step's batch (seeds, batch, ...): one call of one step
        return None, lambda indices, weights: (
            {k: v[:, None] for k, v in b.items()} for b in dataset.batches(indices, weights)
        )

    replicated = meshlib.replicated(mesh)
    on_device = {
        "image": meshlib.put(dataset.images, replicated),
        "label": meshlib.put(np.asarray(dataset.labels, np.int32), replicated),
    }

    def chunks(indices: np.ndarray, weights: np.ndarray) -> Iterator[dict]:
        each = step.steps_per_call(indices.shape[1])
        for start in range(0, indices.shape[1], each):
            yield {
                "index": indices[:, start : start + each],
                "weight": weights[:, start : start + each],
            }

    return on_device, chunks


def _run_pass(
    fn: Callable,
    carry: Any,
    batches: Iterable[dict],
    on_device: dict | None,
    mesh: Mesh,
    *,
    per_seed: bool,
    progress: tuple[str, int] | None = None,
) -> tuple[Any, dict]:
    """Every call of a pass: batches placed over (seed, data) two calls ahead, the host kept at most
    two calls ahead of the devices. Without `per_seed`, the batches' leading axis of 1 is dropped
    (one order shared by the seeds)."""
    num_seeds = jax.tree.leaves(carry)[0].shape[0]
    sums = jax.device_put(step.zero_totals(num_seeds), meshlib.sharding(mesh, meshlib.SEED))
    sharding = meshlib.sharding(mesh, *((meshlib.SEED,) if per_seed else ()), None, meshlib.DATA)
    in_flight: collections.deque = collections.deque()
    bar = None
    if (
        progress is not None
    ):  # (description, steps): a bar for a terminal; reading the totals for it waits for the devices
        from tqdm.auto import tqdm

        bar = tqdm(
            desc=progress[0], total=progress[1], leave=False, unit="step", dynamic_ncols=True
        )
    for batch in _prefetch(
        batches if per_seed else ({k: v[0] for k, v in b.items()} for b in batches), sharding
    ):
        carry, sums = fn(carry, sums, batch, on_device)
        in_flight.append(sums)
        if len(in_flight) > 2:
            jax.block_until_ready(in_flight.popleft())
        if bar is not None:
            bar.update(batch["weight"].shape[-2])
            bar.set_postfix(step.totals_to_metrics(meshlib.to_host(sums))[0], refresh=False)
    if bar is not None:
        bar.close()
    return carry, sums


def _prefetch(
    batches: Iterable[dict], sharding: jax.sharding.NamedSharding, ahead: int = 2
) -> Iterator[dict]:
    """Host batches (this process's block) as global arrays, `ahead` batches on the devices before the one handed out."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append({k: meshlib.put_local(np.asarray(v), sharding) for k, v in batch.items()})
        if len(queue) > ahead:
            yield queue.popleft()
    yield from queue


def _local_order(
    indices: np.ndarray, weights: np.ndarray, mesh: Mesh, per_seed: bool
) -> tuple[np.ndarray, np.ndarray]:
    """This process's block of a pass's order (seeds, steps, batch)."""
    if per_seed:
        seeds, rows = meshlib.local_block(
            meshlib.sharding(mesh, meshlib.SEED, meshlib.DATA), (indices.shape[0], indices.shape[2])
        )
    else:
        seeds, (rows,) = (
            slice(None),
            meshlib.local_block(meshlib.sharding(mesh, meshlib.DATA), (indices.shape[2],)),
        )
    return indices[seeds, :, rows], weights[seeds, :, rows]


@functools.lru_cache(maxsize=16)
def _train_fn(
    model: nn.Module,
    optim_cfg: Any,
    augment: AugmentConfig,
    mesh: Mesh,
    resident: bool,
    steps_per_epoch: int,
    epochs: int,
) -> Callable:
    """The compiled training steps of a recipe, shared by every run of it in this process."""
    train_step = functools.partial(
        step.train_step,
        model=model,
        tx=optim.make_optimizer(optim_cfg, steps_per_epoch, epochs),
        augment=None if augment.is_identity else augment,
    )
    return step.compile_steps(train_step, mesh, per_seed=True, resident=resident, donate=True)


@functools.lru_cache(maxsize=16)
def _eval_fn(model: nn.Module, mesh: Mesh, resident: bool) -> Callable:
    return step.compile_steps(
        functools.partial(step.eval_step, model=model),
        mesh,
        per_seed=False,
        resident=resident,
        donate=False,
    )


def _evaluator(
    model: nn.Module, dataset: Any, mesh: Mesh, batch_size: int
) -> Callable[[Any], list[dict[str, float]]]:
    """params (stacked over seeds) -> per seed {"loss", "accuracy"} over all of `dataset`, in file order."""
    meshlib.check_batch(mesh, batch_size, "the evaluation batch size")
    on_device, batches = _feed(dataset, mesh)
    fn = _eval_fn(model, mesh, resident=on_device is not None)
    indices, weights = (
        np.asarray(a)[None] for a in step.epoch_batches(None, len(dataset), batch_size)
    )
    indices, weights = _local_order(indices, weights, mesh, per_seed=False)

    def run(params: Any) -> list[dict[str, float]]:
        _, sums = _run_pass(fn, params, batches(indices, weights), on_device, mesh, per_seed=False)
        return step.totals_to_metrics(meshlib.to_host(sums))

    return run


# --- State, checkpoints, logs ---------------------------------------------------------------------


def _restore(
    ckpts: checkpoint.Checkpoints,
    epoch: int | None,
    model: nn.Module,
    tx: Any,
    seeds: Sequence[int],
    mesh: Mesh,
) -> tuple[TrainState, list[History], list[int | None], list[int | None], int]:
    """(state, histories, diverged, stopped, epoch) of the checkpoint of `epoch`; for None, a new state per seed at epoch 0."""
    num_seeds = len(seeds)
    if epoch is None:
        return (
            step.init_states(model, tx, seeds, mesh),
            [[] for _ in seeds],
            [None] * num_seeds,
            [None] * num_seeds,
            0,
        )
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
    histories = [
        [{k: math.nan if v is None else v for k, v in row.items()} for row in h]
        for h in description["histories"]
    ]
    stopped = list(description.get("stopped", [None] * num_seeds))
    return state, histories, list(description["diverged"]), stopped, int(description["epoch"])


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
) -> None:
    """The epoch's checkpoint; each seed's val_loss (inf once it no longer trains) decides which epoch is its best."""
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
        "best": best_epochs(histories),
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
    """The rate in use after `steps_done` steps (what TensorBoard shows), ReduceLROnPlateau's scale included."""
    scale = (
        optim.plateau_scale(cfg.optim, [row["val_loss"] for row in history])
        if cfg.optim.plateau_factor
        else 1.0
    )
    return optim.current_rate(cfg.optim, steps_per_epoch, cfg.train.epochs, steps_done, scale)


def _stale(history: History) -> int:
    """Epochs since the lowest val_loss (Keras's EarlyStopping: a tie is no improvement)."""
    losses = [row["val_loss"] for row in history]
    return len(losses) - 1 - int(np.argmin(losses))


def _write_history(workdir: Path, seeds: Sequence[int], histories: Sequence[History]) -> None:
    """history.json and history.csv: one row per seed and epoch (column "seed"); process 0 only."""
    if meshlib.is_main_process():
        rows = [{"seed": seed, **row} for seed, history in zip(seeds, histories) for row in history]
        files.write_json(workdir / "history.json", rows)
        files.write_csv(workdir / "history.csv", rows)


def _tensorboard(cfg: configlib.Config, workdir: Path, seeds: Sequence[int]) -> list[Any]:
    """One TensorBoard run per seed: tensorboard/, or tensorboard/seedN/ for several; process 0 only."""
    if not cfg.run.tensorboard or not meshlib.is_main_process():
        return []
    from cnnjax.tensorboard import Writer

    writers = []
    for seed in seeds:
        writer = Writer(workdir / "tensorboard" / (f"seed{seed}" if len(seeds) > 1 else ""))
        writer.config(
            configlib.flatten(
                dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, seeds=1))
            )
        )
        writers.append(writer)
    return writers


def _write_figures(
    workdir: Path, seeds: Sequence[int], histories: Sequence[History], writers: Sequence[Any]
) -> None:
    """The lecture's accuracy & loss figure per seed; with the augmentation preview, into TensorBoard too; process 0 only."""
    if not meshlib.is_main_process():
        return
    from cnnjax import plots

    for k, (seed, history) in enumerate(zip(seeds, histories)):
        path = plots.plot_history(
            history, workdir / ("history.png" if len(seeds) == 1 else f"history-seed{seed}.png")
        )
        if writers:
            writers[k].png("history", path, history[-1]["epoch"] if history else 0)
            if (workdir / "preview.png").is_file():
                writers[k].png("preview", workdir / "preview.png", 0)


_compile_seconds = [0.0]


@functools.cache
def _count_compile_time() -> None:
    """Count the seconds jax spends compiling (tracing, lowering, XLA), for the first epoch's line."""

    def listen(event: str, seconds: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            _compile_seconds[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
