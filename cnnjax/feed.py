"""Feeding the compiled steps, one of two ways chosen per dataset (`feed`): a dataset in memory is
put on every device once and the compiled steps gather their batches from it by index (no image
crosses from the host during training); a stream (cnnjax.data.Stream) is read by the host and
placed two steps ahead. The numbers are the same either way.

`run_pass` runs every call of one pass (an epoch's training, or an evaluation) over the mesh;
`train_fn` and `eval_fn` are the compiled steps, shared by every run of a recipe in a process.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from cnnjax import data, optim, step
from cnnjax import mesh as meshlib
from cnnjax.augment import AugmentConfig


def feed(
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


def run_pass(
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
    # progress: (description, steps), a bar for a terminal; reading the totals for it waits for
    # the devices.
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(
            desc=progress[0], total=progress[1], leave=False, unit="step", dynamic_ncols=True
        )
    for batch in prefetch(
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


def prefetch(
    batches: Iterable[dict], sharding: jax.sharding.NamedSharding, ahead: int = 2
) -> Iterator[dict]:
    """Host batches (this process's block) as global arrays, `ahead` batches on the devices
    before the one handed out."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append({k: meshlib.put_local(np.asarray(v), sharding) for k, v in batch.items()})
        if len(queue) > ahead:
            yield queue.popleft()
    yield from queue


def local_order(
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
def train_fn(
    model: nn.Module,
    optim_cfg: Any,
    augment: AugmentConfig,
    mesh: Mesh,
    resident: bool,
    steps_per_epoch: int,
    epochs: int,
    grid: bool = False,
) -> Callable:
    """The compiled training steps of a recipe, shared by every run of it in this process; a grid's
    (cnnjax.grid) with the learning rate in the optimizer state."""
    train_step = functools.partial(
        step.train_step,
        model=model,
        tx=optim.make_optimizer(optim_cfg, steps_per_epoch, epochs, injected=grid),
        augment=None if augment.is_identity else augment,
    )
    return step.compile_steps(train_step, mesh, per_seed=True, resident=resident, donate=True)


@functools.lru_cache(maxsize=16)
def eval_fn(model: nn.Module, mesh: Mesh, resident: bool) -> Callable:
    return step.compile_steps(
        functools.partial(step.eval_step, model=model),
        mesh,
        per_seed=False,
        resident=resident,
        donate=False,
    )


def evaluator(
    model: nn.Module, dataset: Any, mesh: Mesh, batch_size: int
) -> Callable[[Any], list[dict[str, float]]]:
    """params (stacked over seeds) -> per seed {"loss", "accuracy"} over all of `dataset`, in
    file order."""
    meshlib.check_batch(mesh, batch_size, "the evaluation batch size")
    on_device, batches = feed(dataset, mesh)
    fn = eval_fn(model, mesh, resident=on_device is not None)
    indices, weights = (
        np.asarray(a)[None] for a in step.epoch_batches(None, len(dataset), batch_size)
    )
    indices, weights = local_order(indices, weights, mesh, per_seed=False)

    def run(params: Any) -> list[dict[str, float]]:
        _, sums = run_pass(fn, params, batches(indices, weights), on_device, mesh, per_seed=False)
        return step.totals_to_metrics(meshlib.to_host(sums))

    return run
