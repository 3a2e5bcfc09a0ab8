"""The optimizers of the lecture's recipes, as Keras 3 computes them, operation for operation:
both give Keras 3's parameters bit for bit (tests/test_optim.py). optax's own differ:

Adam (cats vs dogs): Keras folds the bias corrections into the rate, so its epsilon acts as
optax.adam's divided by sqrt(1 - beta_2**t), 31.6x at step 1: small-gradient steps differ by up to
11x.
RMSprop (MNIST): optax.rmsprop(..., eps_in_sqrt=True) computes g * rsqrt(v + eps) * lr, not
lr * g / sqrt(v + eps): 1-2 float32 ulps apart per step, which training amplifies (MNIST, seed 0:
epoch 1's loss 0.17431 against 0.17464, epoch 2's val_loss 0.0405 against 0.0423).

Schedules and ReduceLROnPlateau (beyond the lecture) are stages after the optimizer, their
state in the optimizer state, so a resumed run goes on exactly.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

NAMES = ("rmsprop", "adam")
SCHEDULES = ("constant", "cosine", "exponential")


class KerasRMSpropState(NamedTuple):
    velocity: Any


def rmsprop_keras(
    learning_rate: float = 1e-3, rho: float = 0.9, epsilon: float = 1e-7
) -> optax.GradientTransformation:
    """Keras 3's RMSprop (no momentum, not centered), operation for operation."""

    def init(params: Any) -> KerasRMSpropState:
        return KerasRMSpropState(jax.tree.map(jnp.zeros_like, params))

    def update(
        grads: Any, state: KerasRMSpropState, params: Any = None
    ) -> tuple[Any, KerasRMSpropState]:
        del params
        velocity = jax.tree.map(
            lambda v, g: rho * v + (1 - rho) * jnp.square(g), state.velocity, grads
        )
        updates = jax.tree.map(
            lambda v, g: -((learning_rate * g) / jnp.sqrt(v + epsilon)), velocity, grads
        )
        return updates, KerasRMSpropState(velocity)

    return optax.GradientTransformation(init, update)


class KerasAdamState(NamedTuple):
    count: jax.Array  # int32: steps taken
    momentum: Any
    velocity: Any


def adam_keras(
    learning_rate: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7
) -> optax.GradientTransformation:
    """Keras 3's Adam (not amsgrad), operation for operation."""

    def init(params: Any) -> KerasAdamState:
        return KerasAdamState(
            jnp.zeros((), jnp.int32),
            jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(jnp.zeros_like, params),
        )

    def update(grads: Any, state: KerasAdamState, params: Any = None) -> tuple[Any, KerasAdamState]:
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        alpha = (
            learning_rate
            * jnp.sqrt(1 - jnp.power(jnp.float32(beta_2), t))
            / (1 - jnp.power(jnp.float32(beta_1), t))
        )
        momentum = jax.tree.map(lambda m, g: m + (g - m) * (1 - beta_1), state.momentum, grads)
        velocity = jax.tree.map(
            lambda v, g: v + (jnp.square(g) - v) * (1 - beta_2), state.velocity, grads
        )
        updates = jax.tree.map(
            lambda m, v: -((m * alpha) / (jnp.sqrt(v) + epsilon)), momentum, velocity
        )
        return updates, KerasAdamState(count, momentum, velocity)

    return optax.GradientTransformation(init, update)


def schedule(optim: Any, steps_per_epoch: int, epochs: int) -> optax.Schedule | None:
    """The rate step by step as a fraction of optim.learning_rate, or None for a constant rate:
    cosine decay to 0 by the last epoch, exponential decay (decay_rate per epoch), after a linear
    warmup from 0."""
    warmup = optim.warmup_epochs * steps_per_epoch
    if optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(1.0, max(1, epochs * steps_per_epoch - warmup))
    elif optim.schedule == "exponential":
        main = optax.exponential_decay(1.0, steps_per_epoch, optim.decay_rate)
    elif warmup:
        main = optax.constant_schedule(1.0)
    else:
        return None
    return (
        optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), main], [warmup])
        if warmup
        else main
    )


class PlateauState(NamedTuple):
    scale: jax.Array  # float32: ReduceLROnPlateau's factor so far


def plateau() -> optax.GradientTransformation:
    """Updates times the state's scale, which the loop lowers on a plateau (`plateau_scale`)."""
    return optax.GradientTransformation(
        lambda params: PlateauState(jnp.ones((), jnp.float32)),
        lambda updates, state, params=None: (
            jax.tree.map(lambda u: u * state.scale, updates),
            state,
        ),
    )


def plateau_scale(optim: Any, val_losses: list[float]) -> float:
    """Keras's ReduceLROnPlateau on val_loss (min_delta 1e-4, no cooldown): the factor so far after
    these epochs."""
    scale, best, wait = 1.0, math.inf, 0
    for loss in val_losses:
        if loss < best - 1e-4:
            best, wait = loss, 0
        elif (wait := wait + 1) >= optim.plateau_patience:
            scale, wait = scale * optim.plateau_factor, 0
    return scale


def make_optimizer(
    optim: Any, steps_per_epoch: int = 1, epochs: int = 1, injected: bool = False
) -> optax.GradientTransformation:
    """The optimizer a config's optim section describes (cnnjax.config.OptimConfig), over `epochs`
    of `steps_per_epoch` steps (what a schedule needs). `injected`: the learning rate is an array
    in the optimizer state (optax.inject_hyperparams), where each member of a grid holds its own
    (cnnjax.grid); the arithmetic is the same."""
    rate = schedule(optim, steps_per_epoch, epochs)

    def base(learning_rate: Any) -> optax.GradientTransformation:
        if optim.name == "rmsprop":
            return rmsprop_keras(learning_rate, optim.rho, optim.epsilon)
        if optim.name == "adam":
            return adam_keras(learning_rate, optim.beta_1, optim.beta_2, optim.epsilon)
        raise ValueError(f"unknown optimizer {optim.name!r}; known: {', '.join(NAMES)}")

    def scheduled(learning_rate: Any) -> optax.GradientTransformation:
        return optax.scale_by_schedule(lambda count: learning_rate * rate(count))

    # With a schedule, the optimizer's own rate is 1 and the rate scales the schedule.
    with_rate = base if rate is None else scheduled
    if injected:
        rated = optax.inject_hyperparams(with_rate)(learning_rate=optim.learning_rate)
    else:
        rated = with_rate(optim.learning_rate)
    stages = [rated] if rate is None else [base(1.0), rated]
    if optim.plateau_factor:
        stages.append(plateau())
    return optax.chain(*stages) if len(stages) > 1 else stages[0]


def current_rate(
    optim: Any, steps_per_epoch: int, epochs: int, step: int, scale: float = 1.0
) -> float:
    """The learning rate at optimizer step `step` (what TensorBoard shows), with the plateau's
    scale."""
    rate = schedule(optim, steps_per_epoch, epochs)
    return float(optim.learning_rate * (1.0 if rate is None else rate(step)) * scale)
