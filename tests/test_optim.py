"""cnnjax's optimizers against Keras 3's own (on the JAX backend: tests/conftest.py), step by step.

Every cats-vs-dogs run trains with `optim.adam_keras`, every MNIST run with `optim.rmsprop_keras`
(what `optim.make_optimizer` builds from the recipes). Each test feeds the same 5 gradients
(different at every step) to ours and to keras.optimizers.Adam / RMSprop and compares the
float32 parameters after every step: they are equal, bit for bit.

Large gradients (10 to 100) test the dynamics (betas, rho, the learning rate, the bias
corrections); tiny ones (near epsilon) test where epsilon sits: Keras's Adam folds the bias
corrections into the learning rate, so its epsilon acts as optax.adam's eps / sqrt(1 - b2^t)
(31.6 eps at step 1), and Keras 3's RMSprop divides by sqrt(v + eps), not sqrt(v) + eps.
optax.adam fails these tests by far; optax.rmsprop(eps_in_sqrt=True) by a few ulps (below).
"""

from __future__ import annotations

import keras
import numpy as np
import optax
import pytest

from cnnjax import optim

SHAPE = (3, 4)
STEPS = 5
# Parameters start at 0 and every element's gradient keeps its sign, so each parameter is
# the sum of its updates, all of one sign: a relative tolerance applies to the updates.
# Ours compute Keras's operations in Keras's order: equal (RTOL 0). A wrong beta, rho,
# learning rate, epsilon or bias correction moves the parameters by 1e-3 relative or more.
RTOL = 0.0
LATE_STEP = (
    100_000  # 0.9**t and 0.999**t are below float32's half ulp of 1: both corrections are 1.0
)


def _gradients(low: float, high: float, seed: int) -> np.ndarray:
    """STEPS gradients, log-uniform magnitudes in [low, high], each
    element of one sign throughout."""
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=SHAPE)
    magnitudes = np.exp(rng.uniform(np.log(low), np.log(high), size=(STEPS, *SHAPE)))
    return (signs * magnitudes).astype(np.float32)


def _keras_steps(optimizer, grads: np.ndarray, start_step: int = 0) -> np.ndarray:
    """The parameters after each of Keras's steps, from zeros."""
    var = keras.Variable(np.zeros(SHAPE, np.float32), dtype="float32")
    optimizer.build([var])
    optimizer.iterations.assign(start_step)
    out = []
    for g in grads:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
        out.append(np.array(var.value))
    return np.stack(out)


def _optax_steps(
    tx: optax.GradientTransformation, grads: np.ndarray, start_step: int = 0
) -> np.ndarray:
    """The parameters after each of our steps, from zeros (the step counter set to start_step)."""
    params = np.zeros(SHAPE, np.float32)
    state = tx.init(params)
    if start_step:
        state = optax.tree_utils.tree_set(state, count=np.asarray(start_step, np.int32))
    out = []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.array(params))
    return np.stack(out)


def _assert_same_steps(ours: np.ndarray, keras_params: np.ndarray, rtol: float = RTOL) -> None:
    assert ours.dtype == keras_params.dtype == np.float32
    for step, (a, b) in enumerate(zip(ours, keras_params), start=1):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=f"after step {step}")


LEARNING_RATES = {"default": {}, "lr_3e-2": {"learning_rate": 3e-2}}


@pytest.mark.parametrize("hyper", LEARNING_RATES)
def test_adam_keras_equals_keras_adam_steps_1_to_5(hyper):
    """From a fresh state: the moments, their betas and the bias corrections (step 1 alone
    gives m_hat = g whatever beta_1 is; steps 2-5 see the betas)."""
    grads = _gradients(10.0, 100.0, seed=0)
    ours = _optax_steps(optim.adam_keras(**LEARNING_RATES[hyper]), grads)
    _assert_same_steps(ours, _keras_steps(keras.optimizers.Adam(**LEARNING_RATES[hyper]), grads))


@pytest.mark.parametrize("hyper", LEARNING_RATES)
def test_adam_keras_epsilon_equals_keras_at_late_steps(hyper):
    """Tiny gradients (1e-8 to 1e-5: sqrt(v) from 3e-10 to 1e-5 against eps = 1e-7), from
    zero moments at step 100,001, where Keras's and optax's formulas are the same: an
    epsilon of 1e-8 changes the steps by up to 10x."""
    grads = _gradients(1e-8, 1e-5, seed=1)
    ours = _optax_steps(optim.adam_keras(**LEARNING_RATES[hyper]), grads, start_step=LATE_STEP)
    _assert_same_steps(
        ours,
        _keras_steps(keras.optimizers.Adam(**LEARNING_RATES[hyper]), grads, start_step=LATE_STEP),
    )


@pytest.mark.parametrize("hyper", LEARNING_RATES)
def test_rmsprop_keras_equals_keras_rmsprop(hyper):
    """rho and the learning rate (no momentum, the accumulator starting at 0)."""
    grads = _gradients(10.0, 100.0, seed=2)
    ours = _optax_steps(optim.rmsprop_keras(**LEARNING_RATES[hyper]), grads)
    _assert_same_steps(ours, _keras_steps(keras.optimizers.RMSprop(**LEARNING_RATES[hyper]), grads))


def test_adam_keras_equals_keras_adam_with_small_gradients_from_step_1():
    grads = _gradients(1e-7, 1e-5, seed=3)
    _assert_same_steps(
        _optax_steps(optim.adam_keras(), grads), _keras_steps(keras.optimizers.Adam(), grads)
    )


def test_rmsprop_keras_equals_keras_rmsprop_with_small_gradients():
    grads = _gradients(1e-5, 1e-3, seed=4)
    _assert_same_steps(
        _optax_steps(optim.rmsprop_keras(), grads), _keras_steps(keras.optimizers.RMSprop(), grads)
    )


def test_optax_rmsprop_is_keras_to_rounding_but_not_to_the_bit():
    """Why optim keeps its own RMSprop: optax's computes Keras's formula in another order
    (g * rsqrt(v + eps) * lr), a few ulps off per step, and training amplifies them (the optim
    module docstring has the figures)."""
    grads = _gradients(10.0, 100.0, seed=2)
    optax_params = _optax_steps(optax.rmsprop(1e-3, decay=0.9, eps=1e-7, eps_in_sqrt=True), grads)
    keras_params = _keras_steps(keras.optimizers.RMSprop(), grads)
    _assert_same_steps(optax_params, keras_params, rtol=1e-6)
    assert not np.array_equal(optax_params, keras_params)


def test_the_recipes_train_with_these_optimizers():
    from cnnjax import config

    grads = _gradients(1.0, 2.0, seed=6)
    for cfg, ours in (
        (config.mnist(), optim.rmsprop_keras()),
        (config.catsdogs(1), optim.adam_keras()),
    ):
        np.testing.assert_array_equal(
            _optax_steps(optim.make_optimizer(cfg.optim), grads), _optax_steps(ours, grads)
        )
