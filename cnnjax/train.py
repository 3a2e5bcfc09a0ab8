"""Training: the train state, one jitted step, the epoch loop, evaluation.

How data flows. A dataset that fits in device memory is put there once per run, as
uint8. Each epoch draws a permutation on the device and cuts it into batches of
indices; a step gathers its batch from the device-resident arrays, converts to float,
augments (optional), scales by 1/255 and updates the parameters. The host only
dispatches steps and, once per epoch, reads the metrics back.

Every example is seen exactly once per epoch, as Keras does it: the last, partial batch
is padded to the full batch size with weight-0 examples, so the compiled step has one
shape and the padding changes neither the loss nor its gradient.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
# augment(rng, images) -> images: float images in 0..255, (N, H, W, C), random per example.
AugmentFn = Callable[[Array, Array], Array]
History = list[dict[str, float]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed, vmapped)."""

    step: Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: Array  # raw uint32 PRNG key; each step folds in its step number for dropout / augmentation


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: Array) -> TrainState:
    """Initialise parameters (from one split of rng) and the optimizer state."""
    from cnnjax.models import init_params

    init_rng, state_rng = jax.random.split(rng)
    params = init_params(model, init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)


def rmsprop_keras(learning_rate: float = 1e-3, rho: float = 0.9, epsilon: float = 1e-7) -> optax.GradientTransformation:
    """RMSprop as Keras defines it: eps added outside the square root, no momentum.

    optax.rmsprop(eps_in_sqrt=False) is exactly Keras's update, and its accumulator
    starts at zero like Keras's.
    """
    return optax.rmsprop(learning_rate, decay=rho, eps=epsilon, eps_in_sqrt=False)


def adam_keras(learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """Adam with Keras's defaults (beta_1 0.9, beta_2 0.999, epsilon 1e-7)."""
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-7)


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


def zero_totals(num_seeds: int | None = None) -> dict[str, Array]:
    shape = () if num_seeds is None else (num_seeds,)
    return {"loss_sum": jnp.zeros(shape), "correct": jnp.zeros(shape), "count": jnp.zeros(shape)}


def totals_to_metrics(totals: dict[str, Any]) -> Any:
    """{"loss", "accuracy"} from running totals; a list of them for stacked seeds."""
    loss_sum, correct, count = (np.asarray(totals[k], np.float64) for k in ("loss_sum", "correct", "count"))
    if loss_sum.ndim:
        return [{"loss": float(l / c), "accuracy": float(a / c)} for l, a, c in zip(loss_sum, correct, count)]  # noqa: E741
    return {"loss": float(loss_sum / count), "accuracy": float(correct / count)}


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


def preprocess(images: Array, rng: Array | None = None, augment: AugmentFn | None = None) -> Array:
    """uint8 pixels -> float, augmented (when given) on the 0..255 scale, then / 255.

    Keras's ImageDataGenerator also augments first and rescales after, so a constant
    fill value (cval) means the same in both.
    """
    x = images.astype(jnp.float32)
    if augment is not None:
        x = augment(rng, x)
    return x / 255.0


# --- The steps -----------------------------------------------------------------------

TrainStep = Callable[..., tuple[TrainState, dict[str, Array]]]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, augment: AugmentFn | None = None) -> TrainStep:
    """A pure (un-jitted) training step, to be jitted, scanned or vmapped by the caller.

    train_step(state, totals, images, labels, batch_indices, batch_weights, i) takes
    row i of the epoch's index/weight matrices, updates the state and adds the batch's
    loss and accuracy to the running totals.
    """

    def train_step(state, totals, images, labels, batch_indices, batch_weights, i):
        idx, w = batch_indices[i], batch_weights[i]
        step_rng = jax.random.fold_in(state.rng, state.step)
        augment_rng, dropout_rng = jax.random.split(step_rng)
        x = preprocess(images[idx], augment_rng, augment)
        y = labels[idx]

        def loss_fn(params):
            logits = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_rng})
            loss, correct = per_example_loss_and_correct(model.head, logits, y)
            # Mean over the real examples: padding has weight 0 and adds nothing.
            return jnp.sum(loss * w) / jnp.sum(w), (loss, correct)

        grads, (loss, correct) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_totals = jax.tree.map(jnp.add, totals, _weighted_totals(loss, correct, w))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), new_totals

    return train_step


def make_eval_step(model: nn.Module) -> Callable[..., dict[str, Array]]:
    """A pure evaluation step over row i of index/weight matrices, adding to totals."""

    def eval_step(params, totals, images, labels, batch_indices, batch_weights, i):
        idx, w = batch_indices[i], batch_weights[i]
        logits = model.apply({"params": params}, preprocess(images[idx]), train=False)
        loss, correct = per_example_loss_and_correct(model.head, logits, labels[idx])
        return jax.tree.map(jnp.add, totals, _weighted_totals(loss, correct, w))

    return eval_step


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
            metrics = totals_to_metrics(jax.device_get(totals))
            self.bar.set_postfix(metrics if isinstance(metrics, dict) else metrics[0], refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_epoch(
    step: Callable,
    carry: Any,
    images: Array,
    labels: Array,
    batch_indices: Array,
    batch_weights: Array,
    steps_each_call: int = 1,
    progress: _Progress | None = None,
    num_seeds: int | None = None,
) -> tuple[Any, dict[str, Array]]:
    """Run one pass: `step` (jitted) runs `steps_each_call` steps from the step index it is given."""
    totals = zero_totals(num_seeds)
    num_steps = batch_indices.shape[-2]  # (steps, batch) or, for stacked seeds, (seeds, steps, batch)
    # Reading the totals waits for the device: every call when scanned (about ten per
    # epoch), every 50 single steps otherwise.
    report_every = steps_each_call if steps_each_call > 1 else 50
    for start in range(0, num_steps, steps_each_call):
        carry, totals = step(carry, totals, images, labels, batch_indices, batch_weights, np.int32(start))
        if progress is not None:
            done = start + steps_each_call
            progress.update(steps_each_call, totals if done % report_every == 0 or done == num_steps else None)
    return carry, totals


class Trainer:
    """Compiled train and eval steps for one model / optimizer / augmentation.

    Holds only compiled functions (no training state): `fit` and `evaluate` below are
    the ways to use it. With `num_seeds=K` every function works on K stacked train states
    (leading axis K on every leaf, see `stack_states`) under jax.vmap: K seeds train in
    one compiled program, each with its own initialisation, shuffling, augmentation and
    dropout, on the same data.

    use_scan: run an epoch as ~10 calls of a lax.scan over steps (`steps_per_call`) rather
    than one jitted step per call. Scanning is the default on every backend, by
    measurement (benchmarks/train_loop.py): on GPUs per-step dispatch dominates small
    convnets; on the CPU, with cnnjax.ops's convolutions and pools, the scanned epoch was
    ~11% faster for cats vs dogs and 14% for MNIST. (With jax's own pooling gradient,
    select_and_scatter, scan was once 8x slower there.)
    """

    def __init__(
        self,
        model: nn.Module,
        tx: optax.GradientTransformation,
        augment: AugmentFn | None = None,
        use_scan: bool = True,
        num_seeds: int | None = None,
    ):
        self.model = model
        self.tx = tx
        self.use_scan = use_scan
        self.num_seeds = num_seeds
        self._train_step = make_train_step(model, tx, augment)
        self._eval_step = _eval_carry_adapter(make_eval_step(model))
        self._compiled: dict[tuple, Callable] = {}

    def _steps_each_call(self, num_steps: int) -> int:
        return steps_per_call(num_steps) if self.use_scan else 1

    def _compile(self, kind: str, num_steps: int) -> Callable:
        """The jitted step (or scan of steps) for a pass of `num_steps` steps."""
        steps_each_call = self._steps_each_call(num_steps)
        key = (kind, steps_each_call)
        if key not in self._compiled:
            fn = self._train_step if kind == "train" else self._eval_step
            if self.num_seeds is not None:
                # Per seed: state/params, totals and (for training) the batch order; shared: data, step number.
                batched_order = 0 if kind == "train" else None
                fn = jax.vmap(fn, in_axes=(0, 0, None, None, batched_order, batched_order, None))
            if steps_each_call > 1:
                fn = scan_steps(fn, steps_each_call)
            self._compiled[key] = jax.jit(fn, donate_argnums=(0, 1) if kind == "train" else (1,))
        return self._compiled[key]

    def _epoch_order(self, state: TrainState, num_examples: int, batch_size: int, epoch: int) -> tuple[Array, Array]:
        def order(rng):
            return epoch_batches(jax.random.fold_in(jax.random.fold_in(rng, 0x5EED), epoch), num_examples, batch_size)

        return order(state.rng) if self.num_seeds is None else jax.vmap(order)(state.rng)

    def train_epoch(
        self, state: TrainState, images: Array, labels: Array, batch_size: int, epoch: int, progress: bool = False
    ) -> tuple[TrainState, Any]:
        """One pass over the training data; metrics as a dict (a list of dicts for stacked seeds)."""
        batch_indices, batch_weights = self._epoch_order(state, images.shape[0], batch_size, epoch)
        num_steps = batch_indices.shape[-2]
        bar = _Progress(num_steps, f"epoch {epoch + 1}", progress)
        try:
            step = self._compile("train", num_steps)
            state, totals = run_epoch(
                step, state, images, labels, batch_indices, batch_weights, self._steps_each_call(num_steps), bar,
                self.num_seeds,
            )
        finally:
            bar.close()
        return state, totals_to_metrics(jax.device_get(totals))

    def evaluate(self, params: Any, images: Array, labels: Array, batch_size: int = 500) -> Any:
        """Loss and accuracy over all of (images, labels); a list of them for stacked seeds."""
        batch_indices, batch_weights = epoch_batches(None, images.shape[0], batch_size)
        num_steps = batch_indices.shape[0]
        step = self._compile("eval", num_steps)
        _, totals = run_epoch(
            step, params, images, labels, batch_indices, batch_weights, self._steps_each_call(num_steps),
            num_seeds=self.num_seeds,
        )
        return totals_to_metrics(jax.device_get(totals))


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """K train states -> one with a leading seed axis on every leaf (for Trainer(num_seeds=K))."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def unstack_state(state: TrainState, index: int) -> TrainState:
    """Seed `index` of a stacked state."""
    return jax.tree.map(lambda leaf: leaf[index], state)


def _eval_carry_adapter(eval_step):
    """Give the eval step the (carry, totals, ...) -> (carry, totals) shape of a train step."""

    def step(params, totals, *args):
        return params, eval_step(params, totals, *args)

    return step


def format_epoch(epoch: int, epochs: int, row: dict[str, float]) -> str:
    """A Keras-like line: 'Epoch 3/5 - 12.1s - loss: 0.0412 - accuracy: 0.9871 - ...'."""
    metrics = " - ".join(f"{k}: {row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in row)
    return f"Epoch {epoch}/{epochs} - {row['seconds']:.1f}s - {metrics}"


EpochCallback = Callable[[int, dict[str, float], TrainState], None]


def fit(
    trainer: Trainer,
    state: TrainState,
    train_data: tuple[Array, Array],
    epochs: int,
    batch_size: int,
    validation_data: tuple[Array, Array] | None = None,
    eval_batch_size: int = 500,
    callbacks: Sequence[EpochCallback] = (),
    verbose: bool = True,
    progress: bool | None = None,
    initial_epoch: int = 0,
) -> tuple[TrainState, Any]:
    """Train for `epochs` epochs; returns the final state and one history row per epoch.

    Arrays are put on the device once here. Each row holds epoch, loss, accuracy,
    val_loss, val_accuracy (with validation data) and seconds (wall time of the epoch,
    validation included). A run whose training loss is not finite is marked `diverged`
    and stops: further epochs would only compute NaNs.

    With a stacked state (Trainer(num_seeds=K)) the history is a list of K histories, and
    callbacks get the list of K rows; training stops once every seed has diverged.
    """
    progress = sys.stdout.isatty() if progress is None else progress
    stacked = trainer.num_seeds is not None
    images, labels = (jax.device_put(a) for a in train_data)
    if validation_data is not None:
        val_images, val_labels = (jax.device_put(a) for a in validation_data)
    histories: list[History] = [[] for _ in range(trainer.num_seeds or 1)]
    for epoch in range(initial_epoch, epochs):
        start = time.perf_counter()
        state, train_metrics = trainer.train_epoch(state, images, labels, batch_size, epoch, progress)
        rows = [{"epoch": epoch + 1, **m} for m in (train_metrics if stacked else [train_metrics])]
        if validation_data is not None:
            val = trainer.evaluate(state.params, val_images, val_labels, eval_batch_size)
            for row, v in zip(rows, val if stacked else [val]):
                row.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
        seconds = time.perf_counter() - start
        for row, history in zip(rows, histories):
            row["seconds"] = seconds
            if not math.isfinite(row["loss"]) or any(h.get("diverged") for h in history):
                row["diverged"] = True
            history.append(row)
        all_diverged = all(row.get("diverged") for row in rows)
        if verbose:
            for k, row in enumerate(rows):
                prefix = f"[seed {k}] " if stacked else ""
                note = " - diverged (loss is not finite)" if row.get("diverged") else ""
                print(prefix + format_epoch(epoch + 1, epochs, row) + note, flush=True)
        for callback in callbacks:
            callback(epoch + 1, rows if stacked else rows[0], state)
        if all_diverged:
            break
    return state, histories if stacked else histories[0]
