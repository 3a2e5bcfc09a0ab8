"""What the benchmarks share: a trainer for a recipe of cnnjax.config, its data (real or random),
and epochs timed on the core's own path (Trainer + fit), compile kept apart.

Run the benchmarks as `python benchmarks/NAME.py` (cnnjax installed, or PYTHONPATH=$PWD as on
the GPU machine); each puts the repository on sys.path itself to import this module.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from cnnjax import config, data, files, mesh, models, train


def recipe(name: str, overrides: dict[str, Any] | None = None) -> config.Config:
    """mnist, catsdogs1 or catsdogs2 (experiment 1 or 2) from cnnjax.config, with overrides by path."""
    base = {"mnist": config.mnist, "catsdogs1": lambda: config.catsdogs(1), "catsdogs2": lambda: config.catsdogs(2)}[name]()
    return config.override(base, overrides or {})


def trainer_for(cfg: config.Config, num_seeds: int = 1, devices: Sequence[jax.Device] | None = None,
                use_scan: bool = True) -> train.Trainer:
    """The Trainer a run of cfg builds, for `num_seeds` seeds on a mesh over `devices` (default: all)."""
    model = models.from_config(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    return train.Trainer(model, train.make_optimizer(cfg.optim), cfg.augment, num_seeds=num_seeds,
                         mesh=mesh.make_mesh(num_seeds, devices), use_scan=use_scan)


def random_data(cfg: config.Config, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 images of cfg's shape and labels: speed does not depend on the values."""
    rng = np.random.default_rng(seed)
    if cfg.data.dataset == "mnist":
        return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)
    size = cfg.data.image_size
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 2, n).astype(np.int32)


def real_data(cfg: config.Config, data_dir: str | None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """cfg's training and validation split from data_dir (MNIST's IDX files, or a cats-vs-dogs folder)."""
    if cfg.data.dataset == "mnist":
        mnist = data.load_mnist(data_dir)
        split = cfg.data.validation_split
        return (mnist["train_images"], mnist["train_labels"]), (mnist[f"{split}_images"], mnist[f"{split}_labels"])
    size = (cfg.data.image_size, cfg.data.image_size)
    folders = data.load_cats_dogs(data_dir, ("train", cfg.data.validation_split), size, cfg.data.interpolation)
    train_set, val_set = folders["train"], folders[cfg.data.validation_split]
    return (train_set.images, train_set.labels), (val_set.images, val_set.labels)


def initial_state(trainer: train.Trainer, seeds: Sequence[int]) -> train.TrainState:
    """Fresh states on the host, so that timed runs (which donate their state) can start from it again."""
    return mesh.to_host(trainer.init(list(seeds)))


def place(trainer: train.Trainer, state: train.TrainState) -> train.TrainState:
    return jax.device_put(state, mesh.sharding(trainer.mesh, mesh.SEED))


def epoch_twice(trainer: train.Trainer, start: train.TrainState, data: Any, batch_size: int) -> tuple[list[float], list[dict]]:
    """Seconds of one epoch from `start`, run twice (the first compiles, the second is the figure),
    and the second's metrics per seed."""
    seconds, metrics = [], []
    for _ in range(2):
        state = place(trainer, start)
        jax.block_until_ready(state)
        begin = time.perf_counter()
        state, metrics = trainer.train_epoch(state, data, batch_size, epoch=0)
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - begin)
    return seconds, metrics


def timed_fit(trainer: train.Trainer, start: train.TrainState, train_data: Any, epochs: int, batch_size: int,
              validation: Any = None, eval_batch_size: int = 500) -> dict[str, Any]:
    """Compile first (one epoch from `start`, thrown away), then `epochs` epochs from `start` again,
    timed. Returns the wall time of those epochs (compile excluded), each epoch's seconds, the
    warm-up epoch's seconds (compile included) and the timed run's histories."""
    train_data = trainer.put(*train_data) if isinstance(train_data, tuple) else train_data
    if isinstance(validation, tuple):
        validation = trainer.put(*validation)
    first = time.perf_counter()
    train.fit(trainer, place(trainer, start), train_data, 1, batch_size, validation, eval_batch_size, verbose=False, progress=False)
    warmup = time.perf_counter() - first
    begin = time.perf_counter()
    result = train.fit(trainer, place(trainer, start), train_data, epochs, batch_size, validation, eval_batch_size,
                       verbose=False, progress=False)
    jax.block_until_ready(result.state)
    wall = time.perf_counter() - begin
    seconds = [row["seconds"] for row in result.histories[0]]
    return {"wall_s": wall, "epoch_s": seconds, "median_epoch_s": statistics.median(seconds), "warmup_epoch_s": warmup,
            "compile_s_estimate": max(0.0, warmup - statistics.median(seconds)), "histories": result.histories}


def backend_line() -> str:
    devices = jax.devices()
    return (f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} x "
            f"{getattr(devices[0], 'device_kind', devices[0].platform)}, {jax.process_count()} process(es)")


def write_json(path: str | None, record: dict[str, Any]) -> None:
    """The record as JSON at `path` (nothing without one); printed figures stay the readable copy."""
    if path:
        files.write_json(path, record)
