"""The steps: one seed, one global batch, pure functions; and how a pass of steps is compiled.

A batch is a dict: "image" uint8 (B, H, W, C), "label" int32 (B,), "weight" float32 (B,). An
epoch sees every example once, as Keras does; its last batch is padded with weight-0 rows so
that one compiled program serves every step (the padding changes neither loss nor gradient).

`compile_steps` is the one place where a step meets the devices. Augmentation and dropout draw
from the state's key folded with the step number, then per example from its position in the
global batch, so 1, 2 or 8 devices compute the same numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cnnjax import mesh as meshlib
from cnnjax import models
from cnnjax.augment import AugmentConfig, member_augment, random_augment
from cnnjax.data.common import thread_map

Array = jax.Array
Batch = dict[str, Array]
Totals = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed; stacked over seeds)."""

    step: Array  # int32: optimizer steps taken
    params: Any
    opt_state: Any
    # raw uint32 PRNG key; each step folds in its step number for augmentation and dropout
    rng: Array
    # a grid member's own augmentation and dropout (cnnjax.grid.member_numbers); None outside a
    # grid. Not checkpointed: the grid's recipe gives them again.
    numbers: Any = None


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: Array) -> TrainState:
    """One seed's initial state: parameters from one split of rng, the state's key from the
    other."""
    init_rng, state_rng = jax.random.split(rng)
    params = models.init_params(model, init_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )


def init_states(
    model: nn.Module, tx: optax.GradientTransformation, seeds: Sequence[int], mesh: Mesh
) -> TrainState:
    """init_state(model, tx, PRNGKey(seed)) for each seed, stacked and placed over the mesh's seed
    axis."""
    seeded = meshlib.sharding(mesh, meshlib.SEED)
    params, rng = _seeded_params(model)(meshlib.put(np.asarray(seeds, np.uint32), seeded))
    state = TrainState(
        step=jnp.zeros((len(seeds),), jnp.int32),
        params=params,
        opt_state=jax.vmap(tx.init)(params),
        rng=rng,
    )
    return jax.device_put(state, seeded)


@functools.lru_cache(maxsize=32)
def _seeded_params(model: nn.Module) -> Callable[[Array], tuple[Any, Array]]:
    """Per seed, init_state's parameters and key, compiled once per architecture (drawing the
    initial weights is most of a small run's compile time; every run of the model shares it)."""

    def one(seed: Array) -> tuple[Any, Array]:
        init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
        return models.init_params(model, init_rng), state_rng

    return jax.jit(jax.vmap(one))


def abstract_states(
    model: nn.Module, tx: optax.GradientTransformation, num_seeds: int, mesh: Mesh
) -> TrainState:
    """Shapes, dtypes and shardings of init_states' result: the target of a checkpoint restore."""
    seeded = meshlib.sharding(mesh, meshlib.SEED)
    shapes = jax.eval_shape(
        jax.vmap(lambda seed: init_state(model, tx, jax.random.PRNGKey(seed))),
        jax.ShapeDtypeStruct((num_seeds,), jnp.uint32),
    )
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=seeded), shapes)


def preprocess(
    images: Array,
    rng: Array | None = None,
    augment: AugmentConfig | None = None,
    numbers: dict[str, Array] | None = None,
) -> Array:
    """uint8 pixels -> float, augmented (when given) on the 0..255 scale, then / 255: Keras's
    ImageDataGenerator also rescales after augmenting, so a constant fill value (cval) means the
    same. A grid member's `numbers` bring its own ranges (`augment` then says how to sample), or
    none: it skips the transform, as its setting alone does."""
    x = images.astype(jnp.float32)
    if augment is None or augment.is_identity:
        pass
    elif numbers is None:
        x = random_augment(rng, x, augment)
    else:
        x = jax.lax.cond(
            numbers["augments"],
            lambda x: member_augment(rng, x, augment, numbers["bounds"], numbers["flips"]),
            lambda x: x,
            x,
        )
    return x / 255.0


def totals(model: nn.Module, logits: Array, batch: Batch) -> tuple[Array, Array]:
    """Per-example losses and 0/1 correctness."""
    return model.head.loss(logits, batch["label"]), model.head.correct(logits, batch["label"])


def weighted(loss: Array, correct: Array, weight: Array) -> Totals:
    """A batch's totals: weighted loss sum, correct count, example count."""
    return {
        "loss_sum": jnp.sum(loss * weight),
        "correct": jnp.sum(correct * weight),
        "count": jnp.sum(weight),
    }


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    augment: AugmentConfig | None,
) -> tuple[TrainState, Totals]:
    """One optimizer step on one batch, for one seed: augment, dropout, loss, gradient, update.
    A grid member (cnnjax.grid) augments and drops out by its state's numbers."""
    augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    x = preprocess(batch["image"], augment_rng, augment, state.numbers)
    own = {} if state.numbers is None else {"dropout_keep": state.numbers["dropout_keep"]}

    def loss_fn(params: Any) -> tuple[Array, tuple[Array, Array]]:
        logits = model.apply(
            {"params": params}, x, train=True, rngs={"dropout": dropout_rng}, **own
        )
        loss, correct = totals(model, logits, batch)
        # The mean over the real examples: padding has weight 0 and adds nothing.
        return jnp.sum(loss * batch["weight"]) / jnp.sum(batch["weight"]), (loss, correct)

    grads, (loss, correct) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), weighted(
        loss, correct, batch["weight"]
    )


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> tuple[Any, Totals]:
    """Loss and correct count of one batch, for one seed (no augmentation, no dropout)."""
    logits = model.apply({"params": params}, preprocess(batch["image"]), train=False)
    return params, weighted(*totals(model, logits, batch), batch["weight"])


def compile_steps(
    step: Callable[[Any, Batch], tuple[Any, Totals]],
    mesh: Mesh,
    *,
    per_seed: bool,
    resident: bool,
    donate: bool,
) -> Callable:
    """`step(carry, batch) -> (carry, totals)` as one jitted
    `run(carry, totals, batches, data) -> (carry, totals)` over many steps (lax.scan) and every seed
    (vmap; on the CPU the seeds take turns through it: `mesh.seeds_in_turn`). carry (a TrainState
    or params) and totals have a leading seed axis, sharded over `seed`; batches hold the call's
    steps on a leading axis (after the seed axis when `per_seed`: each seed its own order), sharded
    over `data`. With `resident`, a batch is {"index", "weight"} and the step gathers its images
    and labels from `data` ({"image", "label"}, the whole set, replicated on every device); else
    batches are whole and data is None."""

    def one_seed(
        carry: Any, sums: Totals, batches: Batch, data: Batch | None, i: Array
    ) -> tuple[Any, Totals]:
        batch = {k: v[i] for k, v in batches.items()}
        if resident:
            index = batch.pop("index")
            batch = {"image": data["image"][index], "label": data["label"][index], **batch}
        carry, batch_totals = step(carry, batch)
        return carry, jax.tree.map(jnp.add, sums, batch_totals)

    vmapped = jax.vmap(one_seed, in_axes=(0, 0, 0 if per_seed else None, None, None))

    def seeds(
        carry: Any, sums: Totals, batches: Batch, data: Batch | None, i: Array
    ) -> tuple[Any, Totals]:
        if jax.tree.leaves(sums)[0].shape[0] > 1:
            return vmapped(carry, sums, batches, data, i)
        # One seed runs the step itself, unbatched: vmapped, XLA drops the one-trip loops of the
        # batched convolutions (cnnjax.cpu_conv) and then fuses each layer's ReLU and pool into
        # the transposing copy its kernel gradient makes, far slower on the CPU
        # (benchmarks/step_parts.py times both).
        first = functools.partial(jax.tree.map, lambda leaf: leaf[0])
        carry, sums = one_seed(
            first(carry), first(sums), first(batches) if per_seed else batches, data, i
        )
        return jax.tree.map(lambda leaf: leaf[None], (carry, sums))

    def run(carry: Any, sums: Totals, batches: Batch, data: Batch | None) -> tuple[Any, Totals]:
        num_steps = batches["weight"].shape[1 if per_seed else 0]
        (carry, sums), _ = jax.lax.scan(
            lambda c, i: (seeds(*c, batches, data, i), None), (carry, sums), jnp.arange(num_steps)
        )
        return carry, sums

    seeded = meshlib.sharding(mesh, meshlib.SEED)
    batch_sharding = meshlib.sharding(
        mesh, *((meshlib.SEED,) if per_seed else ()), None, meshlib.DATA
    )
    compiled = jax.jit(
        run,
        in_shardings=(seeded, seeded, batch_sharding, meshlib.replicated(mesh)),
        out_shardings=(seeded, seeded),
        donate_argnums=(0,) if donate else (),
    )  # not the totals: the host waits on earlier calls' totals
    if not meshlib.seeds_in_turn(mesh):
        return compiled

    def in_turn(carry: Any, sums: Totals, batches: Batch, data: Batch | None) -> tuple[Any, Totals]:
        # Several seeds take turns through the one-seed program, compiled once for them all: the
        # numbers of each seed alone, and on the CPU faster than vmapped or than the seeds in turn
        # inside one program (lax.map), which XLA runs slower (benchmarks/ablation_vmap.py).
        num_seeds = jax.tree.leaves(sums)[0].shape[0]
        if num_seeds == 1:
            return compiled(carry, sums, batches, data)

        def turn(k: int) -> tuple[Any, Totals]:
            seed_batches = _seed(batches, k) if per_seed else batches
            return compiled(*_seed((carry, sums), k), seed_batches, data)

        # One seed's program leaves part of the cores idle (its small operations run on one
        # thread), so turns run side by side, one host thread each, each waiting for its own
        # call: dispatched from one thread, XLA runs the calls in order. Each seed's numbers are
        # the same either way.
        at_once = meshlib.seeds_at_once(mesh, num_seeds)
        run_turn = turn if at_once == 1 else lambda k: jax.block_until_ready(turn(k))
        return _stacked(thread_map(run_turn, list(range(num_seeds)), at_once, "cnnjax-seeds"))

    return in_turn


@jax.jit
def _seed(tree: Any, k: int) -> Any:
    """Seed k of a stacked tree, its seed axis kept (of 1)."""
    return jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, k, 1), tree)


@jax.jit
def _stacked(turns: list[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *turns)


def zero_totals(num_seeds: int) -> Totals:
    return {k: jnp.zeros((num_seeds,)) for k in ("loss_sum", "correct", "count")}


def totals_to_metrics(sums: dict[str, Any]) -> list[dict[str, float]]:
    """One {"loss", "accuracy"} per seed from running totals."""
    loss_sum, correct, count = (
        np.asarray(sums[k], np.float64).reshape(-1) for k in ("loss_sum", "correct", "count")
    )
    return [
        {"loss": float(s / c), "accuracy": float(a / c)}
        for s, a, c in zip(loss_sum, correct, count)
    ]


# --- The order of an epoch ----------------------------------------------------------------------


def epoch_batches(rng: Array | None, num_examples: int, batch_size: int) -> tuple[Array, Array]:
    """Index and weight matrices (steps, batch_size) covering every example once, shuffled by rng
    (None: in order, for evaluation). The last batch is padded with index 0, weight 0."""
    steps = math.ceil(num_examples / batch_size)
    order = jnp.arange(num_examples) if rng is None else jax.random.permutation(rng, num_examples)
    pad = steps * batch_size - num_examples
    indices = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).astype(jnp.int32)
    weights = (jnp.arange(steps * batch_size) < num_examples).astype(jnp.float32)
    return indices.reshape(steps, batch_size), weights.reshape(steps, batch_size)


def epoch_order(
    rngs: np.ndarray, num_examples: int, batch_size: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per seed, the epoch's index and weight matrices (K, steps, batch) as numpy, from the seeds'
    keys (K, 2). Computed on the host's CPU, the same bits on every process and backend
    (threefry)."""
    cpu = jax.local_devices(backend="cpu")[0]
    indices, weights = _order_fn(num_examples, batch_size)(
        jax.device_put(np.asarray(rngs), cpu), jax.device_put(np.int32(epoch), cpu)
    )
    return np.asarray(indices), np.asarray(weights)


@functools.lru_cache(maxsize=8)
def _order_fn(num_examples: int, batch_size: int) -> Callable:
    def one_seed(
        rng: Array, epoch: Array
    ) -> tuple[Array, Array]:  # shuffled by the seed's key of the epoch
        return epoch_batches(
            jax.random.fold_in(jax.random.fold_in(rng, 0x5EED), epoch), num_examples, batch_size
        )

    return jax.jit(jax.vmap(one_seed, in_axes=(0, None)))


def steps_per_call(num_steps: int, max_calls: int = 20) -> int:
    """How many steps one call runs: a divisor of num_steps, so one program serves the whole
    pass, small enough that the host sees progress about every tenth of it. Where no divisor
    gives 2 to `max_calls` calls, the whole pass is one call (a prime step count)."""
    for calls in [*range(10, max_calls + 1), *range(9, 1, -1)]:  # about ten calls preferred
        if calls <= num_steps and num_steps % calls == 0:
            return num_steps // calls
    return num_steps
