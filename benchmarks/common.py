"""What the benchmarks share: a recipe of cnnjax.config, its data (real or random), its training
epochs run as cnnjax.train runs them (an epoch timed twice, compile kept apart), and timed fits.

Training alone is timed through cnnjax.feed (`feed`, `train_fn`, `run_pass`, `local_order`,
`evaluator`): the same compiled steps, order and feeding as
`train_and_evaluate`, without its checkpoints, history files and figures. `run_recipe` runs
the loop itself (`train_and_evaluate`), files and all, in a folder thrown away afterwards.

Run the benchmarks as `python benchmarks/NAME.py` (cnnjax installed, or PYTHONPATH=$PWD as on
the GPU machine); each puts the repository on sys.path itself to import this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from cnnjax import config, data, feed, files, mesh, models, optim, step, train
from cnnjax.step import TrainState


def recipe(name: str, overrides: dict[str, Any] | None = None) -> config.Config:
    """mnist, catsdogs1 or catsdogs2 (experiment 1 or 2) from cnnjax.config, with overrides by path;
    no TensorBoard files."""
    base = {
        "mnist": config.mnist,
        "catsdogs1": lambda: config.catsdogs(1),
        "catsdogs2": lambda: config.catsdogs(2),
    }[name]()
    return config.override(base, {"run.tensorboard": False, **(overrides or {})})


def random_data(cfg: config.Config, n: int, seed: int = 0) -> data.Images:
    """n random uint8 images of cfg's shape, with labels: speed does not depend on the values."""
    rng = np.random.default_rng(seed)
    if cfg.data.dataset == "mnist":
        shape, classes = (28, 28, 1), [str(d) for d in range(10)]
    else:
        shape, classes = (cfg.data.image_size, cfg.data.image_size, 3), ["cats", "dogs"]
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return data.Images(images, rng.integers(0, len(classes), n).astype(np.int32), classes)


def real_data(
    cfg: config.Config,
    data_dir: str | None,
    splits: Sequence[str] | None = None,
    input: str = "memory",
) -> dict[str, Any]:
    """{split: dataset} of cfg's data from data_dir (MNIST's IDX files, or a cats-vs-dogs folder)
    through cnnjax.data.load; by default the training and validation splits, held in memory."""
    splits = ("train", cfg.data.validation_split) if splits is None else tuple(splits)
    return data.load(
        config.override(cfg, {"data.data_dir": data_dir, "data.input": input}).data, splits
    )


def subset(dataset: data.Images, n: int | None) -> data.Images:
    """Every k-th example, about n of them (both classes, unlike the first n of a sorted folder)."""
    if n is None or n >= len(dataset):
        return dataset
    every = len(dataset) // n
    return data.Images(
        dataset.images[::every][:n], dataset.labels[::every][:n], dataset.class_names
    )


def first(dataset: data.Images, n: int) -> data.Images:
    """The first n examples."""
    return data.Images(dataset.images[:n], dataset.labels[:n], dataset.class_names)


@contextlib.contextmanager
def one_step_per_call() -> Iterator[None]:
    """Run every pass as one jitted call per step instead of scanned calls of several steps (the
    loop's order and numbers are unchanged): cnnjax.step.steps_per_call, which the in-memory feed
    asks, patched to 1 while the context lasts."""
    saved = step.steps_per_call
    step.steps_per_call = lambda num_steps: 1
    try:
        yield
    finally:
        step.steps_per_call = saved


@dataclasses.dataclass
class Training:
    """A recipe's compiled training steps on a mesh, fed one dataset, run epoch by epoch exactly as
    train_and_evaluate runs them (cnnjax.feed; no evaluation, checkpoints or files)."""

    cfg: config.Config
    mesh: Mesh
    model: nn.Module
    dataset: Any
    # the seeds' initial states on the host: each call donates its state, so timed runs restart
    # from here
    start: TrainState
    fn: Callable
    on_device: dict | None
    batches: Callable

    def place(self, state: TrainState | None = None) -> TrainState:
        """A host state (default: the initial one) on the devices, sharded over the seed axis."""
        return jax.device_put(
            self.start if state is None else state, mesh.sharding(self.mesh, mesh.SEED)
        )

    def epoch(self, state: TrainState, epoch: int = 0) -> tuple[TrainState, list[dict[str, float]]]:
        """One epoch from a placed state (donated): the new state and per seed {"loss",
        "accuracy"}."""
        order = step.epoch_order(
            mesh.to_host(state.rng), len(self.dataset), self.cfg.train.batch_size, epoch
        )
        batches = self.batches(*feed.local_order(*order, self.mesh, per_seed=True))
        state, sums = feed.run_pass(
            self.fn, state, batches, self.on_device, self.mesh, per_seed=True
        )
        return state, step.totals_to_metrics(mesh.to_host(sums))

    def timed_epoch(self, epoch: int = 0) -> tuple[float, list[dict[str, float]]]:
        """Seconds of one epoch from the initial state (placing it not counted), and its metrics."""
        state = self.place()
        jax.block_until_ready(state)
        begin = time.perf_counter()
        state, metrics = self.epoch(state, epoch)
        jax.block_until_ready(state)
        return time.perf_counter() - begin, metrics

    def evaluator(self, dataset: Any) -> Callable[[Any], list[dict[str, float]]]:
        """params (stacked over seeds) -> per seed {"loss", "accuracy"} on `dataset`, as the loop
        validates."""
        return feed.evaluator(self.model, dataset, self.mesh, self.cfg.train.eval_batch_size)


def training(
    cfg: config.Config,
    dataset: Any,
    num_seeds: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Training:
    """cfg's training of `num_seeds` seeds (cfg.train.seed, +1, ...) on a mesh over `devices`
    (default: all)."""
    m = mesh.make_mesh(num_seeds, devices)
    mesh.check_batch(m, cfg.train.batch_size)
    model = models.from_config(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    seeds = [cfg.train.seed + k for k in range(num_seeds)]
    steps_per_epoch = math.ceil(len(dataset) / cfg.train.batch_size)
    tx = optim.make_optimizer(cfg.optim, steps_per_epoch, cfg.train.epochs)
    start = mesh.to_host(step.init_states(model, tx, seeds, m))
    on_device, batches = feed.feed(dataset, m)
    fn = feed.train_fn(
        model, cfg.optim, cfg.augment, m, on_device is not None, steps_per_epoch, cfg.train.epochs
    )
    return Training(cfg, m, model, dataset, start, fn, on_device, batches)


def epoch_twice(run: Training) -> tuple[list[float], list[dict[str, float]]]:
    """Seconds of one epoch from the initial state, run twice (the first compiles, the second is
    the figure), and the second's metrics per seed."""
    seconds, metrics = [], []
    for _ in range(2):
        s, metrics = run.timed_epoch()
        seconds.append(s)
    return seconds, metrics


def timed_fit(cfg: config.Config, train_set: Any, val_set: Any, epochs: int) -> dict[str, Any]:
    """Epochs as the loop runs them (training, then validation on `val_set`; no checkpoints or
    files): one from the initial state to compile, thrown away, then `epochs` from it again, timed.
    Returns the wall time of those epochs (compile excluded), each epoch's seconds, the warm-up
    epoch's seconds (compile included), the histories of the timed run and the mesh."""
    run = training(cfg, train_set)
    validate = run.evaluator(val_set)

    def fit(n: int) -> tuple[float, list[list[dict[str, Any]]]]:
        state = run.place()
        jax.block_until_ready(state)
        histories: list[list[dict[str, Any]]] = [[] for _ in range(run.start.step.shape[0])]
        begin = time.perf_counter()
        for epoch in range(n):
            start = time.perf_counter()
            state, metrics = run.epoch(state, epoch)
            val = validate(state.params)
            for history, m, v in zip(histories, metrics, val):
                history.append(
                    {
                        "epoch": epoch + 1,
                        **m,
                        "val_loss": v["loss"],
                        "val_accuracy": v["accuracy"],
                        "seconds": time.perf_counter() - start,
                    }
                )
        jax.block_until_ready(state)
        return time.perf_counter() - begin, histories

    warmup, _ = fit(1)
    wall, histories = fit(epochs)
    seconds = [row["seconds"] for row in histories[0]]
    return {
        "wall_s": wall,
        "epoch_s": seconds,
        "median_epoch_s": statistics.median(seconds),
        "warmup_epoch_s": warmup,
        "compile_s_estimate": max(0.0, warmup - statistics.median(seconds)),
        "histories": histories,
        "mesh": dict(run.mesh.shape),
    }


def run_recipe(cfg: config.Config, datasets: dict[str, Any] | None = None) -> train.Result:
    """cfg trained by cnnjax.train.train_and_evaluate (checkpoints, history files and figures
    included; no TensorBoard) in a temporary folder, removed afterwards. Each history row's
    "seconds" is its epoch's wall time; the first epoch's includes compiling."""
    with tempfile.TemporaryDirectory(prefix="cnnjax-bench-") as workdir:
        return train.train_and_evaluate(
            config.override(cfg, {"run.tensorboard": False}), workdir, datasets, verbose=False
        )


def backend_line() -> str:
    devices = jax.devices()
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} x "
        f"{kind}, {jax.process_count()} process(es)"
    )


def write_json(path: str | None, record: dict[str, Any]) -> None:
    """The record as JSON at `path` (nothing without one); printed figures stay the readable
    copy."""
    if path:
        files.write_json(path, record)
