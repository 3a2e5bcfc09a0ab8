"""The training loop: batching covers every example once, padding is inert, runs are reproducible."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import models, train
from cnnjax.augment import AugmentConfig, make_augment_fn


def tiny_mnist(n=150, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for i, label in enumerate(labels):  # a learnable signal: a bright bar whose row is the label
        images[i, 2 + 2 * label : 4 + 2 * label, 4:24, 0] = 250
    return images, labels


def test_epoch_batches_cover_every_example_once():
    idx, w = train.epoch_batches(jax.random.PRNGKey(0), 60_000, 64)
    assert idx.shape == (938, 64)  # as Keras: 937 full batches and one of 32
    real = np.asarray(idx)[np.asarray(w) > 0]
    assert sorted(real.tolist()) == list(range(60_000))
    assert float(w[-1].sum()) == 32 and float(w[:-1].min()) == 1


def test_padding_changes_neither_loss_nor_gradient():
    model = models.MnistConvNet()
    tx = optax.sgd(0.1)
    state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
    images, labels = tiny_mnist(10)
    step = jax.jit(train.make_train_step(model, tx))
    # 10 examples in one batch of 10, or padded into a batch of 16: same update.
    idx10, w10 = train.epoch_batches(None, 10, 10)
    idx16, w16 = train.epoch_batches(None, 10, 16)
    a, ta = step(state, train.zero_totals(), images, labels, idx10, w10, 0)
    b, tb = step(state, train.zero_totals(), images, labels, idx16, w16, 0)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert float(ta["count"]) == float(tb["count"]) == 10
    np.testing.assert_allclose(float(ta["loss_sum"]), float(tb["loss_sum"]), rtol=1e-5)


def run(seed, use_scan=False, epochs=2, batch_size=32):
    model = models.MnistConvNet()
    tx = train.rmsprop_keras(1e-3)
    state = train.create_train_state(model, tx, jax.random.PRNGKey(seed))
    images, labels = tiny_mnist()
    trainer = train.Trainer(model, tx, use_scan=use_scan)
    return train.fit(trainer, state, (images, labels), epochs, batch_size, (images[:40], labels[:40]), verbose=False)


def _metrics(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_same_seed_same_history_other_seed_other_history():
    _, h1 = run(0)
    _, h2 = run(0)
    _, h3 = run(1)
    assert _metrics(h1) == _metrics(h2)
    assert _metrics(h1) != _metrics(h3)
    assert set(h1[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"}


def test_scan_and_python_loop_agree():
    # 150 examples in batches of 7: 22 steps (the last one padded), scanned as 11 calls of 2.
    assert train.steps_per_call(22) == 2
    s1, h1 = run(0, use_scan=False, batch_size=7)
    s2, h2 = run(0, use_scan=True, batch_size=7)
    for a, b in zip(_metrics(h1), _metrics(h2)):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4)
    assert int(s1.step) == int(s2.step) == 2 * 22
    for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_steps_per_call_divides_the_pass_into_few_calls():
    for num_steps in range(1, 2000):
        each = train.steps_per_call(num_steps)
        assert num_steps % each == 0
        calls = num_steps // each
        assert calls <= 20 or each == 1  # few calls, or single steps for short passes
    assert train.steps_per_call(100) == 10 and train.steps_per_call(938) == 67  # cats epoch; MNIST epoch
    assert train.steps_per_call(101) == 101  # a prime: one call


def test_loss_falls_and_evaluate_matches_history():
    state, history = run(0, epochs=4)
    assert history[-1]["loss"] < history[0]["loss"]
    model = models.MnistConvNet()
    images, labels = tiny_mnist()
    metrics = train.Trainer(model, train.rmsprop_keras()).evaluate(state.params, images[:40], labels[:40], batch_size=7)
    np.testing.assert_allclose(metrics["loss"], history[-1]["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], history[-1]["val_accuracy"])


def test_rmsprop_matches_keras_update_rule():
    """Keras RMSprop: v = rho v + (1 - rho) g^2; w -= lr g / (sqrt(v) + eps)."""
    tx = train.rmsprop_keras(1e-3, 0.9, 1e-7)
    w = jnp.array([1.0, -2.0])
    g = jnp.array([0.5, 1e-4])
    updates, _ = tx.update(g, tx.init(w), w)
    v = 0.1 * g**2
    np.testing.assert_allclose(updates, -1e-3 * g / (jnp.sqrt(v) + 1e-7), rtol=1e-6)


def test_diverging_run_is_marked_and_stops():
    model = models.MnistConvNet()
    tx = optax.sgd(1e30)
    state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
    images, labels = tiny_mnist(64)
    _, history = train.fit(train.Trainer(model, tx), state, (images, labels), 5, 16, verbose=False)
    assert history[-1].get("diverged") is True and len(history) < 5


def _fit_seeds_together_and_alone(model, tx, augment, data, epochs, batch_size, seeds):
    """(state, histories) of the seeds vmapped, and (state, history) of each seed run alone."""
    alone = []
    for seed in seeds:
        state = train.create_train_state(model, tx, jax.random.PRNGKey(seed))
        alone.append(train.fit(train.Trainer(model, tx, augment), state, data, epochs, batch_size, data, verbose=False))
    stacked = train.stack_states([train.create_train_state(model, tx, jax.random.PRNGKey(s)) for s in seeds])
    trainer = train.Trainer(model, tx, augment, num_seeds=len(seeds))
    state, histories = train.fit(trainer, stacked, data, epochs, batch_size, data, verbose=False)
    return state, histories, alone


def _assert_each_seed_matches(state, histories, alone):
    """Seed k of a vmapped run against its own run: metrics to 1e-4 relative, parameters to 1e-4."""
    for k, (seq_state, seq_history) in enumerate(alone):
        for a, b in zip(_metrics(histories[k]), _metrics(seq_history)):
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=f"seed index {k} {key}")
        for a, b in zip(jax.tree.leaves(train.unstack_state(state, k).params), jax.tree.leaves(seq_state.params)):
            np.testing.assert_allclose(a, b, atol=1e-4)
    assert _metrics(histories[0]) != _metrics(histories[1])  # the seeds really differ


def test_vmapped_seeds_equal_seeds_run_one_at_a_time():
    """K seeds in one compiled program (jax.vmap) give each seed's own run.

    Tolerance: float32 reassociation only (vmap batches the convolutions differently):
    metrics within 1e-4 relative, parameters within 1e-4 absolute after 2 epochs.
    """
    model = models.MnistConvNet()
    tx = train.rmsprop_keras(1e-3)
    images, labels = tiny_mnist(100)  # 4 steps of 32 (the last partial): not the number of seeds
    state, histories, alone = _fit_seeds_together_and_alone(model, tx, None, (images, labels), 2, 32, seeds=[3, 4, 5])
    assert len(histories) == 3 and int(state.step[0]) == 2 * 4
    _assert_each_seed_matches(state, histories, alone)


def test_vmapped_seeds_with_augmentation_and_dropout_equal_seeds_run_one_at_a_time():
    """The ablation's case: each seed draws its own augmentation and dropout masks, under vmap
    exactly as alone. Same tolerance as above (float32 reassociation only)."""
    size = 48
    model = models.CatsDogsConvNet(dropout_rate=0.5, input_shape=(size, size, 3))
    tx = train.adam_keras(1e-3)
    augment = make_augment_fn(AugmentConfig.LECTURE)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (24, size, size, 3)).astype(np.uint8)
    labels = (np.arange(24) % 2).astype(np.int32)
    state, histories, alone = _fit_seeds_together_and_alone(model, tx, augment, (images, labels), 2, 8, seeds=[0, 1])
    _assert_each_seed_matches(state, histories, alone)
