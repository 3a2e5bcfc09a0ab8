"""Training: the train state, one step, the epoch loop, evaluation, on a (seed, data) device mesh.

How data flows. A dataset that fits in device memory is put there once per run, as
uint8, replicated on every device. Each epoch draws, per seed, a permutation on the
device and cuts it into batches of indices; a step gathers its batch from the resident
arrays, converts to float, augments (optional), scales by 1/255 and updates the
parameters. The host only dispatches steps and, once per call, reads the totals back.

One code path for every run. The train state always has a leading seed axis (K=1 for a
single run); the step is written for one seed and the global batch and runs under
jax.vmap over seeds; jit's shardings spread seeds over the mesh's `seed` axis and each
batch over its `data` axis (cnnjax.mesh). Randomness is drawn per example from its
position in the global batch, so 1, 2 or 8 devices compute the same numbers.

Every example is seen exactly once per epoch, as Keras does it: the last, partial batch
is padded to the full batch size with weight-0 examples, so the compiled step has one
shape and the padding changes neither the loss nor its gradient.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cnnjax import mesh as meshlib
from cnnjax.augment import AugmentConfig, random_augment

Array = jax.Array
History = list[dict[str, Any]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed; stacked over seeds)."""

    step: Array  # int32: optimizer steps taken
    params: Any
    opt_state: Any
    rng: Array  # raw uint32 PRNG key; each step folds in its step number for dropout / augmentation


def _params_and_key(model: nn.Module, rng: Array) -> tuple[Any, Array]:
    """One seed's initial parameters (from one split of rng) and its state key (the other)."""
    from cnnjax.models import init_params

    init_rng, state_rng = jax.random.split(rng)
    return init_params(model, init_rng), state_rng


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: Array) -> TrainState:
    """Initialise parameters (from one split of rng) and the optimizer state, for one seed."""
    params, state_rng = _params_and_key(model, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)


class KerasRMSpropState(NamedTuple):
    velocity: Any


@functools.lru_cache(maxsize=32)
def _seeded_params(model: nn.Module) -> Callable[[Array], tuple[Any, Array]]:
    """Per seed, create_train_state's parameters and state key, compiled once per architecture
    (drawing the initial weights is most of a small run's compile time; Trainers share it)."""
    return jax.jit(jax.vmap(lambda seed: _params_and_key(model, jax.random.PRNGKey(seed))))


def rmsprop_keras(learning_rate: float = 1e-3, rho: float = 0.9, epsilon: float = 1e-7) -> optax.GradientTransformation:
    """Keras 3's RMSprop (no momentum, not centered), operation for operation:

        velocity = rho * velocity + (1 - rho) * g**2      (velocity starts at 0)
        w -= lr * g / sqrt(velocity + epsilon)

    Epsilon sits inside the square root, as in Keras 3 and TensorFlow's tf.keras (Keras
    2.0 added it outside; optax.rmsprop's default rounds differently).
    """

    def init(params):
        return KerasRMSpropState(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        velocity = jax.tree.map(lambda v, g: rho * v + (1 - rho) * jnp.square(g), state.velocity, grads)
        updates = jax.tree.map(lambda v, g: -((learning_rate * g) / jnp.sqrt(v + epsilon)), velocity, grads)
        return updates, KerasRMSpropState(velocity)

    return optax.GradientTransformation(init, update)


class KerasAdamState(NamedTuple):
    count: Array  # int32: steps taken
    momentum: Any
    velocity: Any


def adam_keras(
    learning_rate: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7
) -> optax.GradientTransformation:
    """Keras 3's Adam, operation for operation (not amsgrad):

        t = step + 1;  alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)
        m += (g - m) * (1 - beta_1);  v += (g**2 - v) * (1 - beta_2)
        w -= m * alpha / (sqrt(v) + epsilon)

    Keras folds the bias corrections into the learning rate, so its epsilon acts like
    optax.adam's epsilon divided by sqrt(1 - beta_2**t): 31.6x larger at step 1.
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return KerasAdamState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        alpha = learning_rate * jnp.sqrt(1 - jnp.power(jnp.float32(beta_2), t)) / (1 - jnp.power(jnp.float32(beta_1), t))
        momentum = jax.tree.map(lambda m, g: m + (g - m) * (1 - beta_1), state.momentum, grads)
        velocity = jax.tree.map(lambda v, g: v + (jnp.square(g) - v) * (1 - beta_2), state.velocity, grads)
        updates = jax.tree.map(lambda m, v: -((m * alpha) / (jnp.sqrt(v) + epsilon)), momentum, velocity)
        return updates, KerasAdamState(count, momentum, velocity)

    return optax.GradientTransformation(init, update)


def make_optimizer(optim: Any) -> optax.GradientTransformation:
    """The optimizer a config's optim section describes (cnnjax.config.OptimConfig)."""
    if optim.name == "rmsprop":
        return rmsprop_keras(optim.learning_rate, optim.rho, optim.epsilon)
    if optim.name == "adam":
        return adam_keras(optim.learning_rate, optim.beta_1, optim.beta_2, optim.epsilon)
    raise ValueError(f"unknown optimizer {optim.name!r}; known: rmsprop, adam")


# --- Losses and metrics --------------------------------------------------------------


def per_example_loss_and_correct(head: str, logits: Array, labels: Array) -> tuple[Array, Array]:
    """Cross-entropy and 0/1 correctness per example, for a softmax or a sigmoid head."""
    if head == "softmax":  # categorical cross-entropy on integer labels (to_categorical is implied)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, axis=-1) == labels
    elif head == "sigmoid":  # binary cross-entropy
        labels = labels.astype(logits.dtype)
        loss = optax.sigmoid_binary_cross_entropy(logits, labels)
        correct = (logits > 0).astype(labels.dtype) == labels
    else:
        raise ValueError(f"unknown head {head!r}")
    return loss, correct.astype(jnp.float32)


def _weighted_totals(loss: Array, correct: Array, weights: Array) -> dict[str, Array]:
    return {"loss_sum": jnp.sum(loss * weights), "correct": jnp.sum(correct * weights), "count": jnp.sum(weights)}


def zero_totals(num_seeds: int) -> dict[str, Array]:
    return {"loss_sum": jnp.zeros((num_seeds,)), "correct": jnp.zeros((num_seeds,)), "count": jnp.zeros((num_seeds,))}


def totals_to_metrics(totals: dict[str, Any]) -> list[dict[str, float]]:
    """One {"loss", "accuracy"} per seed from running totals."""
    loss_sum, correct, count = (np.asarray(totals[k], np.float64).reshape(-1) for k in ("loss_sum", "correct", "count"))
    return [{"loss": float(s / c), "accuracy": float(a / c)} for s, a, c in zip(loss_sum, correct, count)]


# --- Batching on the device ----------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def epoch_batches(rng: Array | None, num_examples: int, batch_size: int) -> tuple[Array, Array]:
    """Index and weight matrices (steps, batch_size) covering every example once.

    rng=None keeps the order (evaluation). The last batch is padded with index 0 and
    weight 0.
    """
    steps = steps_per_epoch(num_examples, batch_size)
    order = jnp.arange(num_examples) if rng is None else jax.random.permutation(rng, num_examples)
    pad = steps * batch_size - num_examples
    indices = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).astype(jnp.int32)
    weights = (jnp.arange(steps * batch_size) < num_examples).astype(jnp.float32)
    return indices.reshape(steps, batch_size), weights.reshape(steps, batch_size)


def epoch_rng(state_rng: Array, epoch: int | Array) -> Array:
    """The key of one seed's shuffling in one epoch (0-based)."""
    return jax.random.fold_in(jax.random.fold_in(state_rng, 0x5EED), epoch)


def preprocess(images: Array, rng: Array | None = None, augment: AugmentConfig | None = None) -> Array:
    """uint8 pixels -> float, augmented (when given) on the 0..255 scale, then / 255.

    Keras's ImageDataGenerator also augments first and rescales after, so a constant
    fill value (cval) means the same in both.
    """
    x = images.astype(jnp.float32)
    if augment is not None and not augment.is_identity:
        x = random_augment(rng, x, augment)
    return x / 255.0


# --- The steps (one seed, one global batch) ------------------------------------------


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, augment: AugmentConfig | None = None) -> Callable:
    """A pure training step on one batch: step(state, totals, images, labels, weights) -> (state, totals).

    images are uint8 (B, H, W, C); weight-0 rows are padding. Augmentation and dropout
    draw from the state's key folded with its step number (then per example).
    """

    def train_step(state, totals, images, labels, weights):
        step_rng = jax.random.fold_in(state.rng, state.step)
        augment_rng, dropout_rng = jax.random.split(step_rng)
        x = preprocess(images, augment_rng, augment)

        def loss_fn(params):
            logits = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_rng})
            loss, correct = per_example_loss_and_correct(model.head, logits, labels)
            # Mean over the real examples: padding has weight 0 and adds nothing.
            return jnp.sum(loss * weights) / jnp.sum(weights), (loss, correct)

        grads, (loss, correct) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_totals = jax.tree.map(jnp.add, totals, _weighted_totals(loss, correct, weights))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), new_totals

    return train_step


def make_eval_step(model: nn.Module) -> Callable:
    """A pure evaluation step on one batch: step(params, totals, images, labels, weights) -> (params, totals)."""

    def eval_step(params, totals, images, labels, weights):
        logits = model.apply({"params": params}, preprocess(images), train=False)
        loss, correct = per_example_loss_and_correct(model.head, logits, labels)
        return params, jax.tree.map(jnp.add, totals, _weighted_totals(loss, correct, weights))

    return eval_step


def gathering(step: Callable) -> Callable:
    """The step for a dataset in device memory: it takes row i of the epoch's index and weight
    matrices and gathers its batch from the resident arrays."""

    def gathered(carry, totals, images, labels, batch_indices, batch_weights, i):
        idx = batch_indices[i]
        return step(carry, totals, images[idx], labels[idx], batch_weights[i])

    return gathered


def scan_steps(step_fn: Callable, num_steps: int) -> Callable:
    """Fuse `num_steps` consecutive steps into one XLA program with lax.scan.

    The fused call takes the index of its first step where the single step takes its
    step index, so an epoch is a few calls of the same compiled program.
    """

    def run(carry_a, carry_b, *args):
        *data, start = args

        def body(carry, i):
            return step_fn(*carry, *data, i), None

        (a, b), _ = jax.lax.scan(body, (carry_a, carry_b), start + jnp.arange(num_steps))
        return a, b

    return run


def steps_per_call(num_steps: int, max_calls: int = 20) -> int:
    """How many steps one scanned call runs: a divisor of num_steps, so one program serves
    the whole epoch, small enough that the host sees progress about every tenth of it.

    Where no divisor gives at least two calls and at most `max_calls`, the whole pass is
    one call (a prime step count: no progress within the epoch, but still one program).
    """
    for calls in [*range(10, max_calls + 1), *range(9, 1, -1)]:  # about ten calls preferred
        if calls <= num_steps and num_steps % calls == 0:
            return num_steps // calls
    return num_steps


# --- Epoch loops ---------------------------------------------------------------------


class _Progress:
    """A progress bar within an epoch when attached to a terminal; silent otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, unit="step", dynamic_ncols=True)

    def update(self, n: int, totals: dict[str, Array] | None = None) -> None:
        if self.bar is None:
            return
        if totals is not None:  # reading the totals waits for the device: done only every few steps
            self.bar.set_postfix(totals_to_metrics(meshlib.to_host(totals))[0], refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass(frozen=True)
class DeviceData:
    """A dataset resident on the devices (replicated): uint8 images and int32 labels."""

    images: Array
    labels: Array

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class Trainer:
    """Compiled train and eval steps for one model / optimizer / augmentation on one mesh.

    Holds only compiled functions (no training state): `init`, `train_epoch`, `evaluate`
    and `fit` below are the ways to use it. Every state it takes and returns holds
    `num_seeds` seeds stacked on a leading axis; each seed has its own initialisation,
    shuffling, augmentation and dropout, on the same data.

    use_scan: run an epoch as ~10 calls of a lax.scan over steps (`steps_per_call`) rather
    than one jitted step per call. Scanning is the default on every backend, by
    measurement (benchmarks/train_loop.py): on GPUs per-step dispatch dominates small
    convnets; on the CPU, with cnnjax.ops's convolutions and pools, the scanned epoch was
    faster too. (With jax's own pooling gradient, select_and_scatter, scan was once much
    slower there.)
    """

    def __init__(
        self,
        model: nn.Module,
        tx: optax.GradientTransformation,
        augment: AugmentConfig | None = None,
        num_seeds: int = 1,
        mesh: Mesh | None = None,
        use_scan: bool = True,
    ):
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
        self.model, self.tx, self.num_seeds, self.use_scan = model, tx, num_seeds, use_scan
        self.augment = None if augment is None or augment.is_identity else augment
        self.mesh = meshlib.make_mesh(num_seeds) if mesh is None else mesh
        if num_seeds % self.mesh.shape[meshlib.SEED]:
            raise ValueError(f"{num_seeds} seeds cannot be spread over a seed axis of {self.mesh.shape[meshlib.SEED]} devices")
        self.train_step = make_train_step(model, tx, self.augment)
        self.eval_step = make_eval_step(model)
        self._seeded = meshlib.sharding(self.mesh, meshlib.SEED)
        self._replicated = meshlib.replicated(self.mesh)
        self._compiled: dict[tuple, Callable] = {}

    # --- state and data ---

    def _init_one(self, seed: Array) -> TrainState:
        return create_train_state(self.model, self.tx, jax.random.PRNGKey(seed))

    def init(self, seeds: Sequence[int]) -> TrainState:
        """Fresh states for `seeds` (one per seed, stacked), placed on the mesh: what
        create_train_state(model, tx, PRNGKey(seed)) gives for each seed."""
        if len(seeds) != self.num_seeds:
            raise ValueError(f"this trainer trains {self.num_seeds} seeds, got {len(seeds)}")
        params, rng = _seeded_params(self.model)(meshlib.put(np.asarray(seeds, np.uint32), self._seeded))
        state = TrainState(step=jnp.zeros((self.num_seeds,), jnp.int32), params=params, opt_state=jax.vmap(self.tx.init)(params),
                           rng=rng)
        return jax.device_put(state, self._seeded)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of a state (the target of a checkpoint restore)."""
        shapes = jax.eval_shape(jax.vmap(self._init_one), jax.ShapeDtypeStruct((self.num_seeds,), jnp.uint32))
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self._seeded), shapes)

    def put(self, images: Any, labels: Any) -> DeviceData:
        """A host dataset on the devices, once per run (replicated: each device gathers its own batch rows)."""
        if isinstance(images, jax.Array) and isinstance(labels, jax.Array):
            return DeviceData(images, labels)
        return DeviceData(meshlib.put(images, self._replicated), meshlib.put(np.asarray(labels, np.int32), self._replicated))

    def _as_data(self, data: DeviceData | tuple) -> DeviceData:
        return data if isinstance(data, DeviceData) else self.put(*data)

    # --- compiled functions ---

    def _steps_each_call(self, num_steps: int) -> int:
        return steps_per_call(num_steps) if self.use_scan else 1

    def _compile(self, kind: str, num_steps: int) -> Callable:
        """The jitted (scan of) gathering step(s) of a pass of `num_steps` steps, vmapped over seeds."""
        steps_each_call = self._steps_each_call(num_steps)
        key = (kind, steps_each_call)
        if key not in self._compiled:
            step = gathering(self.train_step if kind == "train" else self.eval_step)
            # Per seed: state / params, totals and (for training) the batch order; shared: data, step number.
            order_axis = 0 if kind == "train" else None
            fn = jax.vmap(step, in_axes=(0, 0, None, None, order_axis, order_axis, None))
            if steps_each_call > 1:
                fn = scan_steps(fn, steps_each_call)
            order = meshlib.sharding(self.mesh, *((meshlib.SEED,) if kind == "train" else ()), None, meshlib.DATA)
            r, s = self._replicated, self._seeded
            self._compiled[key] = jax.jit(
                fn,
                in_shardings=(s, s, r, r, order, order, r),
                out_shardings=(s, s),
                donate_argnums=(0, 1) if kind == "train" else (1,),
            )
        return self._compiled[key]

    def _run(self, kind: str, carry: Any, data: DeviceData, indices: Array, weights: Array, bar: _Progress | None) -> tuple[Any, Any]:
        num_steps = indices.shape[-2]
        steps_each_call = self._steps_each_call(num_steps)
        step = self._compile(kind, num_steps)
        totals = jax.device_put(zero_totals(self.num_seeds), self._seeded)
        # Reading the totals waits for the device: every call when scanned (about ten per
        # epoch), every 50 single steps otherwise.
        report_every = steps_each_call if steps_each_call > 1 else 50
        for start in range(0, num_steps, steps_each_call):
            carry, totals = step(carry, totals, data.images, data.labels, indices, weights, np.int32(start))
            if bar is not None:
                done = start + steps_each_call
                bar.update(steps_each_call, totals if done % report_every == 0 or done == num_steps else None)
        return carry, totals

    def epoch_order(self, state: TrainState, num_examples: int, batch_size: int, epoch: int) -> tuple[Array, Array]:
        """Per seed, the epoch's index and weight matrices (K, steps, batch), sharded over seed and data."""
        meshlib.check_batch(self.mesh, batch_size)
        fn = self._compiled.get(("order", num_examples, batch_size))
        if fn is None:
            fn = jax.jit(_seed_orders(num_examples, batch_size),
                         out_shardings=meshlib.sharding(self.mesh, meshlib.SEED, None, meshlib.DATA))
            self._compiled[("order", num_examples, batch_size)] = fn
        return fn(state.rng, jnp.int32(epoch))

    def train_epoch(self, state: TrainState, data: DeviceData | tuple, batch_size: int, epoch: int,
                    progress: bool = False) -> tuple[TrainState, list[dict[str, float]]]:
        """One pass over the training data (epoch is 0-based); metrics per seed."""
        if is_host_fed(data):
            return self.train_epoch_host(state, data, batch_size, epoch, progress)
        data = self._as_data(data)
        indices, weights = self.epoch_order(state, len(data), batch_size, epoch)
        bar = _Progress(indices.shape[-2], f"epoch {epoch + 1}", progress)
        try:
            state, totals = self._run("train", state, data, indices, weights, bar)
        finally:
            bar.close()
        return state, totals_to_metrics(meshlib.to_host(totals))

    def evaluate(self, params: Any, data: DeviceData | tuple, batch_size: int = 500) -> list[dict[str, float]]:
        """Loss and accuracy over all of `data`, per seed (params stacked over seeds)."""
        if is_host_fed(data):
            return self.evaluate_host(params, data, batch_size)
        data = self._as_data(data)
        meshlib.check_batch(self.mesh, batch_size, "eval batch size")
        indices, weights = epoch_batches(None, len(data), batch_size)
        order = meshlib.sharding(self.mesh, None, meshlib.DATA)
        indices, weights = jax.device_put(indices, order), jax.device_put(weights, order)
        _, totals = self._run("eval", params, data, indices, weights, None)
        return totals_to_metrics(meshlib.to_host(totals))

    # --- host-fed data (cnnjax.data.stream): batches delivered by the host, step by step ---

    def _compile_host(self, kind: str) -> Callable:
        """One step per call on a (K, B, ...) batch for training (each seed its own rows) or a
        (B, ...) batch shared by the seeds for evaluation: the same step as the gathering path."""
        key = (kind, "host")
        if key not in self._compiled:
            if kind == "train":
                fn = jax.vmap(self.train_step, in_axes=(0, 0, 0, 0, 0))
                batch = meshlib.sharding(self.mesh, meshlib.SEED, meshlib.DATA)
            else:
                fn = jax.vmap(self.eval_step, in_axes=(0, 0, None, None, None))
                batch = meshlib.sharding(self.mesh, meshlib.DATA)
            s = self._seeded
            # The totals are not donated: the loop waits on the totals of the step before the
            # last to keep the host from queueing the whole epoch (and its batches) ahead.
            self._compiled[key] = jax.jit(fn, in_shardings=(s, s, batch, batch, batch), out_shardings=(s, s),
                                          donate_argnums=(0,) if kind == "train" else ())
        return self._compiled[key]

    def _run_host(self, kind: str, carry: Any, batches: Iterable[tuple[np.ndarray, ...]], global_batch: tuple[int, ...],
                  num_steps: int, bar: _Progress | None) -> tuple[Any, Any]:
        step = self._compile_host(kind)
        sharding = meshlib.sharding(self.mesh, *((meshlib.SEED,) if kind == "train" else ()), meshlib.DATA)
        totals = jax.device_put(zero_totals(self.num_seeds), self._seeded)
        waiting: collections.deque = collections.deque()
        done = 0
        for images, labels, weights in prefetch_to_devices(batches, sharding, global_batch):
            carry, totals = step(carry, totals, images, labels, weights)
            waiting.append(totals)
            if len(waiting) > 2:
                jax.block_until_ready(waiting.popleft())
            done += 1
            if bar is not None:
                bar.update(1, totals if done % max(1, num_steps // 10) == 0 or done == num_steps else None)
        if done != num_steps:
            raise RuntimeError(f"the host delivered {done} batches for a pass of {num_steps} steps")
        return carry, totals

    def train_epoch_host(self, state: TrainState, data: HostData, batch_size: int, epoch: int,
                         progress: bool = False) -> tuple[TrainState, list[dict[str, float]]]:
        """train_epoch for data the host delivers: per seed the same order (host_epoch_order) and
        the same step, fed (K, B, ...) batches placed over (seed, data), two ahead of the step.
        Each process reads only its block of every global batch."""
        meshlib.check_batch(self.mesh, batch_size)
        indices, weights = host_epoch_order(meshlib.to_host(state.rng), data.num_examples, batch_size, epoch)
        seeds, rows = local_block(meshlib.sharding(self.mesh, meshlib.SEED, meshlib.DATA), (self.num_seeds, batch_size))
        batches = data.host_batches(indices[seeds, :, rows], weights[seeds, :, rows])
        bar = _Progress(indices.shape[1], f"epoch {epoch + 1}", progress)
        try:
            state, totals = self._run_host("train", state, batches, (self.num_seeds, batch_size), indices.shape[1], bar)
        finally:
            bar.close()
        return state, totals_to_metrics(meshlib.to_host(totals))

    def evaluate_host(self, params: Any, data: HostData, batch_size: int = 500) -> list[dict[str, float]]:
        """evaluate for data the host delivers, in file order, each batch shared by the seeds."""
        meshlib.check_batch(self.mesh, batch_size, "eval batch size")
        indices, weights = (np.asarray(a)[None] for a in epoch_batches(None, data.num_examples, batch_size))
        (rows,) = local_block(meshlib.sharding(self.mesh, meshlib.DATA), (batch_size,))
        batches = ((x[0], y[0], w[0]) for x, y, w in data.host_batches(indices[:, :, rows], weights[:, :, rows]))
        _, totals = self._run_host("eval", params, batches, (batch_size,), indices.shape[1], None)
        return totals_to_metrics(meshlib.to_host(totals))


class HostData(Protocol):
    """What a host-fed dataset (cnnjax.data.stream.Stream) offers the Trainer: its size, and the
    batches of given index and weight matrices (K, steps, B) as (K, B, ...) uint8 images, labels and
    weights, step by step. A row it could not read comes back with weight 0."""

    num_examples: int

    def host_batches(self, indices: np.ndarray, weights: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]: ...


def is_host_fed(data: Any) -> bool:
    return hasattr(data, "host_batches")


def host_epoch_order(rngs: np.ndarray, num_examples: int, batch_size: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Trainer.epoch_order's index and weight matrices (K, steps, batch) as numpy, computed on the
    host's CPU from the seeds' keys (the same function: threefry draws the same bits everywhere)."""
    cpu = jax.devices("cpu")[0]
    indices, weights = _host_order_fn(num_examples, batch_size)(jax.device_put(np.asarray(rngs), cpu), jax.device_put(np.int32(epoch), cpu))
    return np.asarray(indices), np.asarray(weights)


def _seed_orders(num_examples: int, batch_size: int) -> Callable[[Array, Array], tuple[Array, Array]]:
    """(seed keys (K, 2), epoch) -> per seed the epoch's (indices, weights): the one order the device
    path (Trainer.epoch_order) and the host path (host_epoch_order) both compile."""
    return jax.vmap(lambda rng, epoch: epoch_batches(epoch_rng(rng, epoch), num_examples, batch_size), in_axes=(0, None))


@functools.lru_cache(maxsize=8)
def _host_order_fn(num_examples: int, batch_size: int) -> Callable:
    return jax.jit(_seed_orders(num_examples, batch_size))


def local_block(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The block of a global array of `shape` that this process's devices hold under `sharding`, one
    slice per axis (the whole array in a single process). Raises when the block is not contiguous."""
    pieces = {tuple(s.indices(n)[:2] for s, n in zip(index, shape)) for index in sharding.addressable_devices_indices_map(shape).values()}
    block = tuple(slice(min(p[d][0] for p in pieces), max(p[d][1] for p in pieces)) for d in range(len(shape)))
    if math.prod(b.stop - b.start for b in block) != sum(math.prod(hi - lo for lo, hi in p) for p in pieces):
        raise ValueError(f"this process's devices hold a non-contiguous part of a {shape} batch; use a mesh whose "
                         "processes each hold whole blocks")
    return block


def prefetch_to_devices(batches: Iterable[tuple[np.ndarray, ...]], sharding: jax.sharding.Sharding,
                        global_shape: tuple[int, ...], ahead: int = 2) -> Iterator[tuple[Array, ...]]:
    """Host batches as global arrays placed with `sharding`, `ahead` batches on the devices before
    the one handed out. Each process gives its own block (local_block); the global batch has
    `global_shape` on its leading axes."""
    queue: collections.deque = collections.deque()

    def put(local: np.ndarray) -> Array:
        if jax.process_count() == 1:
            return jax.device_put(local, sharding)
        return jax.make_array_from_process_local_data(sharding, local, (*global_shape, *local.shape[len(global_shape):]))

    for batch in batches:
        queue.append(tuple(put(np.asarray(a)) for a in batch))
        if len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """Single-seed states -> one with a leading seed axis on every leaf."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def seed_slice(tree: Any, index: int) -> Any:
    """Seed `index` of a tree stacked over seeds (a TrainState, or params)."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def format_epoch(epoch: int, epochs: int, row: dict[str, Any], compiling: float = 0.0) -> str:
    """A Keras-like line: 'Epoch 3/5 - 12.1s - loss: 0.0412 - accuracy: 0.9871 - ...'; with
    `compiling` seconds (the first epoch), how much of the epoch went to compiling."""
    metrics = " - ".join(f"{k}: {row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in row)
    seconds = f"{row['seconds']:.1f}s" + (f" ({compiling:.1f}s of it compiling)" if compiling >= 0.5 else "")
    return f"Epoch {epoch}/{epochs} - {seconds} - {metrics}"


_compile_seconds = [0.0]


def _count_compile_time(event: str, seconds: float, **_: Any) -> None:
    if event.startswith("/jax/core/compile/"):  # tracing, lowering and XLA's compile of every jitted program
        _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile_time)


def compile_seconds() -> float:
    """Seconds this process has spent compiling jitted programs so far."""
    return _compile_seconds[0]


@dataclasses.dataclass
class FitResult:
    """Where `fit` stopped: the state, each seed's history, and the epoch (1-based) at which a
    seed's loss stopped being finite (None while it trains)."""

    state: TrainState
    histories: list[History]
    diverged: list[int | None]

    @property
    def all_diverged(self) -> bool:
        return all(d is not None for d in self.diverged)


# callback(epoch, result) after every epoch: epoch is 1-based, result.histories holds its rows.
EpochCallback = Callable[[int, FitResult], None]


def _is_finite(row: dict[str, Any]) -> bool:
    return all(math.isfinite(row[k]) for k in ("loss", "val_loss") if k in row)


def fit(
    trainer: Trainer,
    state: TrainState,
    train_data: DeviceData | tuple,
    epochs: int,
    batch_size: int,
    validation_data: DeviceData | tuple | None = None,
    eval_batch_size: int = 500,
    callbacks: Sequence[EpochCallback] = (),
    verbose: bool = True,
    progress: bool | None = None,
    initial_epoch: int = 0,
    histories: Sequence[History] | None = None,
    diverged: Sequence[int | None] | None = None,
) -> FitResult:
    """Train from epoch `initial_epoch` (0-based; with the histories so far) to `epochs`.

    Each history row holds epoch (1-based), loss, accuracy, val_loss and val_accuracy
    (with validation data) and seconds (wall time of the epoch, validation included).

    A seed whose loss stops being finite is diverged: its row is marked `diverged`, its
    state goes back to the end of the previous epoch (the last finite state) and stays
    there, and its history ends. Training stops once every seed has diverged.
    """
    progress = (sys.stdout.isatty() and meshlib.is_main_process()) if progress is None else progress
    verbose = verbose and meshlib.is_main_process()
    train_data = train_data if is_host_fed(train_data) else trainer._as_data(train_data)
    val_data = validation_data if validation_data is None or is_host_fed(validation_data) else trainer._as_data(validation_data)
    result = FitResult(state, [list(h) for h in histories] if histories else [[] for _ in range(trainer.num_seeds)],
                       list(diverged) if diverged else [None] * trainer.num_seeds)
    keep = _select_seeds(trainer)
    for epoch in range(initial_epoch, epochs):
        start, compiled_before = time.perf_counter(), compile_seconds()
        before = jax.tree.map(jnp.copy, result.state)  # the train step reuses the state's buffers
        state, train_metrics = trainer.train_epoch(result.state, train_data, batch_size, epoch, progress)
        rows = [{"epoch": epoch + 1, **m} for m in train_metrics]
        if val_data is not None:
            for row, v in zip(rows, trainer.evaluate(state.params, val_data, eval_batch_size)):
                row.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
        seconds = time.perf_counter() - start
        frozen = []
        for k, row in enumerate(rows):
            row["seconds"] = seconds
            if result.diverged[k] is not None:
                frozen.append(True)  # diverged earlier: its history has ended
                continue
            if not _is_finite(row):
                row["diverged"] = True
                result.diverged[k] = epoch + 1
            result.histories[k].append(row)
            frozen.append(result.diverged[k] is not None)
        result.state = keep(np.asarray(frozen), before, state) if any(frozen) else state
        if verbose:
            for k, row in enumerate(rows):
                if result.diverged[k] is not None and result.diverged[k] < epoch + 1:
                    continue
                prefix = f"[seed {k}] " if trainer.num_seeds > 1 else ""
                note = " - diverged (loss is not finite)" if row.get("diverged") else ""
                print(prefix + format_epoch(epoch + 1, epochs, row, compile_seconds() - compiled_before) + note, flush=True)
        for callback in callbacks:
            callback(epoch + 1, result)
        if result.all_diverged:
            break
    return result


def _select_seeds(trainer: Trainer) -> Callable[[np.ndarray, TrainState, TrainState], TrainState]:
    """where(frozen[k], old, new) per seed, compiled once, keeping the state's sharding."""

    @jax.jit
    def select(frozen, old, new):
        def pick(o, n):
            return jnp.where(frozen.reshape((-1,) + (1,) * (n.ndim - 1)), o, n)

        return jax.tree.map(pick, old, new)

    def keep(frozen: np.ndarray, old: TrainState, new: TrainState) -> TrainState:
        return jax.device_put(select(meshlib.put(frozen, trainer._seeded), old, new), trainer._seeded)

    return keep
