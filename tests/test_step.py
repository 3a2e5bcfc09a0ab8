"""The pure steps (cnnjax.step) and the heads: each test fails on one break that once went unseen.

Fast (seconds, tiny data). The loop's own guards (the epoch order per epoch, the configured
optimizer, resume) are in tests/test_train.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import models, step
from cnnjax.augment import AugmentConfig
from tests.conftest import CATS_SIZE, tiny_cats_dogs, tiny_mnist


def batch_of(images: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> dict:
    weights = np.ones(len(labels), np.float32) if weights is None else weights
    return {
        "image": jnp.asarray(images),
        "label": jnp.asarray(labels),
        "weight": jnp.asarray(weights),
    }


@pytest.fixture(scope="module")
def cats():
    """Experiment 2's convnet at 48 px (Dropout(0.5)), Adam, one state, one batch of 8."""
    model = models.CatsDogsConvNet(dropout_rate=0.5, input_shape=(CATS_SIZE, CATS_SIZE, 3))
    tx = optax.adam(1e-3)
    images, labels = tiny_cats_dogs(8)
    return model, tx, step.init_state(model, tx, jax.random.PRNGKey(0)), batch_of(images, labels)


def test_the_train_step_depends_on_the_dropout_key(cats):
    """Without augmentation the state's key feeds dropout alone: another key, other parameters.
    (Breaks caught: the train step applying the model with train=False.)"""
    model, tx, state, batch = cats
    train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx, augment=None))
    a, _ = train_step(state, batch)
    b, _ = train_step(state.replace(rng=jax.random.PRNGKey(7)), batch)
    again, _ = train_step(state, batch)
    assert not np.allclose(a.params["dense"]["kernel"], b.params["dense"]["kernel"])
    np.testing.assert_array_equal(a.params["dense"]["kernel"], again.params["dense"]["kernel"])


def test_the_eval_step_is_the_model_without_dropout_on_pixels_over_255(cats):
    """The eval step's totals are the model applied in inference mode to pixels / 255, by hand.
    (Breaks caught: dropout on in evaluation, raw pixels without the /255.)"""
    model, _, state, batch = cats
    _, sums = jax.jit(functools.partial(step.eval_step, model=model))(state.params, batch)
    logits = model.apply({"params": state.params}, np.asarray(batch["image"], np.float32) / 255.0)
    loss = optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(jnp.float32))
    np.testing.assert_allclose(float(sums["loss_sum"]), float(jnp.sum(loss)), rtol=1e-5)
    assert float(sums["correct"]) == float(jnp.sum((logits > 0) == (batch["label"] == 1)))
    assert float(sums["count"]) == 8


def test_every_example_gets_its_own_dropout_mask():
    """Identical rows through Dropout(0.5) in training: each row is masked differently, and the
    kept units are scaled by 2. (Break caught: one mask for the whole batch.)"""
    x = jnp.ones((6, 64))
    out = models.Dropout(0.5).apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    rows = {tuple(np.asarray(row)) for row in out}
    assert len(rows) == 6 and set(np.unique(out).tolist()) == {0.0, 2.0}
    np.testing.assert_array_equal(models.Dropout(0.5).apply({}, x, train=False), x)


def test_the_sigmoid_head_counts_a_positive_logit_as_class_1():
    """Logit 0.3 is p = 0.57: class 1. (Break caught: a logit above
    0.5, not 0, taken as class 1.)"""
    head = models.Sigmoid()
    logits = jnp.array([-2.0, -0.1, 0.3, 4.0])
    np.testing.assert_array_equal(head.predict(logits), [0, 0, 1, 1])
    np.testing.assert_allclose(head.probabilities(logits)[:, 1], jax.nn.sigmoid(logits), rtol=1e-6)
    batch = batch_of(np.zeros((4, 1, 1, 1), np.uint8), np.array([0, 1, 1, 1], np.int32))
    sums = step.weighted(*step.totals(models.CatsDogsConvNet(), logits, batch), batch["weight"])
    assert float(sums["correct"]) == 3  # only -0.1 for class 1 is wrong


def test_the_softmax_head():
    head = models.Softmax(3)
    logits = jnp.array([[1.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    np.testing.assert_array_equal(head.predict(logits), [1, 2])
    np.testing.assert_allclose(head.probabilities(logits).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        head.loss(logits, jnp.array([1, 0])), -jax.nn.log_softmax(logits)[[0, 1], [1, 0]], rtol=1e-6
    )
    np.testing.assert_array_equal(head.score(logits, jnp.array(2)), [0.0, 5.0])


def test_padding_changes_neither_loss_nor_gradient():
    """10 examples in one batch of 10, or padded with weight-0 rows into a
    batch of 16: the same update."""
    model = models.MnistConvNet()
    tx = optax.sgd(0.1)
    state = step.init_state(model, tx, jax.random.PRNGKey(0))
    images, labels = tiny_mnist(10)
    pad = np.zeros((6, 28, 28, 1), np.uint8)
    train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx, augment=None))
    a, ta = train_step(state, batch_of(images, labels))
    b, tb = train_step(
        state,
        batch_of(
            np.concatenate([images, pad]),
            np.concatenate([labels, np.full(6, 3, np.int32)]),
            np.array([1.0] * 10 + [0.0] * 6, np.float32),
        ),
    )
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert float(ta["count"]) == float(tb["count"]) == 10
    np.testing.assert_allclose(float(ta["loss_sum"]), float(tb["loss_sum"]), rtol=1e-5)


def test_the_train_step_augments_with_its_own_key():
    """With augmentation and no dropout, the step's key changes the
    update through the images alone."""
    model = models.CatsDogsConvNet(input_shape=(CATS_SIZE, CATS_SIZE, 3))
    tx = optax.sgd(0.1)
    state = step.init_state(model, tx, jax.random.PRNGKey(0))
    batch = batch_of(*tiny_cats_dogs(4))
    train_step = jax.jit(
        functools.partial(step.train_step, model=model, tx=tx, augment=AugmentConfig.LECTURE)
    )
    plain = jax.jit(functools.partial(step.train_step, model=model, tx=tx, augment=None))(
        state, batch
    )[0]
    a, b = (
        train_step(state, batch)[0],
        train_step(state.replace(rng=jax.random.PRNGKey(3)), batch)[0],
    )
    assert not np.allclose(a.params["dense_1"]["kernel"], b.params["dense_1"]["kernel"])
    assert not np.allclose(a.params["dense_1"]["kernel"], plain.params["dense_1"]["kernel"])


def test_epoch_batches_cover_every_example_once():
    idx, w = step.epoch_batches(jax.random.PRNGKey(0), 60_000, 64)
    assert idx.shape == (938, 64)  # as Keras: 937 full batches and one of 32
    real = np.asarray(idx)[np.asarray(w) > 0]
    assert sorted(real.tolist()) == list(range(60_000))
    assert float(w[-1].sum()) == 32 and float(w[:-1].min()) == 1


def test_each_epoch_and_each_seed_has_its_own_order():
    keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in (0, 1)])
    first, _ = step.epoch_order(keys, 50, 10, epoch=0)
    second, _ = step.epoch_order(keys, 50, 10, epoch=1)
    assert first.shape == (2, 5, 10)
    for order in (first[0], first[1], second[0]):
        assert sorted(order.ravel().tolist()) == list(range(50))
    assert not np.array_equal(first[0], second[0]) and not np.array_equal(first[0], first[1])


def test_steps_per_call_divides_the_pass_into_few_calls():
    for num_steps in range(1, 2000):
        each = step.steps_per_call(num_steps)
        assert num_steps % each == 0
        calls = num_steps // each
        assert calls == 1 or 2 <= calls <= 20
    assert step.steps_per_call(100) == 10 and step.steps_per_call(938) == 67


def test_seeds_taking_turns_side_by_side_compute_each_seed_alone(monkeypatch):
    """On a one-device CPU mesh, K seeds take turns through the one-seed program, several at once
    on host threads (mesh.seeds_at_once): every seed's carry and totals are what it computes
    alone, bit for bit, however many run side by side."""
    from cnnjax import mesh as meshlib

    def toy_step(carry, batch):
        # a matmul, so XLA's threads are at work too; each seed's numbers its own
        w = jnp.tanh(carry["w"] @ batch["image"].T).mean() + carry["w"] * 0.99
        totals = {"loss_sum": w.sum(), "correct": jnp.float32(1), "count": batch["weight"].sum()}
        return {"w": w}, totals

    num_seeds, steps = 5, 3
    rng = np.random.default_rng(0)
    carry = {"w": jnp.asarray(rng.standard_normal((num_seeds, 64)), jnp.float32)}
    batches = {
        "image": jnp.asarray(rng.standard_normal((num_seeds, steps, 32, 64)), jnp.float32),
        "weight": jnp.ones((num_seeds, steps, 32), jnp.float32),
    }
    one_device = meshlib.make_mesh(num_seeds, jax.devices()[:1])
    assert meshlib.seeds_in_turn(one_device)

    def run(at_once: int):
        monkeypatch.setattr(meshlib, "seeds_at_once", lambda mesh, k: at_once)
        compiled = step.compile_steps(
            toy_step, one_device, per_seed=True, resident=False, donate=False
        )
        return jax.device_get(compiled(carry, step.zero_totals(num_seeds), batches, None))

    alone = run(1)
    for at_once in (2, 5):
        together = run(at_once)
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(together)):
            np.testing.assert_array_equal(a, b)
    for k in range(num_seeds):
        w = carry["w"][k]
        for i in range(steps):
            w = jnp.tanh(w @ batches["image"][k, i].T).mean() + w * 0.99
        np.testing.assert_allclose(alone[0]["w"][k], w, rtol=1e-5, atol=1e-6)


def test_seeds_run_side_by_side_only_on_one_device_in_one_process():
    from cnnjax import mesh as meshlib

    assert 1 <= meshlib.seeds_at_once(meshlib.make_mesh(4, jax.devices()[:1]), 4) <= 4
    assert meshlib.seeds_at_once(meshlib.make_mesh(4, jax.devices()[:1]), 1) == 1
    if len(jax.devices()) > 1:
        assert meshlib.seeds_at_once(meshlib.make_mesh(1, jax.devices()[:2]), 4) == 1
