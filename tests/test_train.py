"""The training loop: batching covers every example once, padding is inert, runs are reproducible."""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import augment, models, train
from cnnjax.augment import AugmentConfig
from tests.conftest import CATS_SIZE, tiny_cats_dogs, tiny_mnist


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
    step = jax.jit(train.gathering(train.make_train_step(model, tx)))
    totals = jax.tree.map(lambda t: t[0], train.zero_totals(1))
    # 10 examples in one batch of 10, or padded into a batch of 16: same update.
    idx10, w10 = train.epoch_batches(None, 10, 10)
    idx16, w16 = train.epoch_batches(None, 10, 16)
    a, ta = step(state, totals, images, labels, idx10, w10, 0)
    b, tb = step(state, totals, images, labels, idx16, w16, 0)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert float(ta["count"]) == float(tb["count"]) == 10
    np.testing.assert_allclose(float(ta["loss_sum"]), float(tb["loss_sum"]), rtol=1e-5)


def run(seed, use_scan=False, epochs=2, batch_size=32):
    model = models.MnistConvNet()
    tx = train.rmsprop_keras(1e-3)
    images, labels = tiny_mnist()
    trainer = train.Trainer(model, tx, use_scan=use_scan)
    result = train.fit(trainer, trainer.init([seed]), (images, labels), epochs, batch_size, (images[:40], labels[:40]), verbose=False)
    return train.seed_slice(result.state, 0), result.histories[0]


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
    # 150 examples in batches of 7: 22 steps (the last one padded), scanned in calls of several steps.
    assert 1 < train.steps_per_call(22) < 22
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


def test_loss_falls_and_evaluate_matches_history():
    state, history = run(0, epochs=4)
    assert history[-1]["loss"] < history[0]["loss"]
    model = models.MnistConvNet()
    images, labels = tiny_mnist()
    trainer = train.Trainer(model, train.rmsprop_keras())
    metrics = trainer.evaluate(train.stack_states([state]).params, (images[:40], labels[:40]), batch_size=7)[0]
    np.testing.assert_allclose(metrics["loss"], history[-1]["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], history[-1]["val_accuracy"])


def test_diverging_run_stops_and_keeps_the_last_finite_state():
    model = models.MnistConvNet()
    tx = optax.sgd(1e30)
    images, labels = tiny_mnist(64)
    trainer = train.Trainer(model, tx)
    start = trainer.init([0])
    kept = jax.tree.map(np.array, start)
    result = train.fit(trainer, start, (images, labels), 5, 16, (images, labels), verbose=False)
    assert result.diverged == [1] and len(result.histories[0]) == 1 and result.histories[0][0]["diverged"] is True
    # The epoch that produced NaN is undone: the state is the last finite one (here, the initial one).
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(a, b)


def test_a_diverging_seed_is_frozen_while_the_others_train():
    """Seed 1's weights are made huge (finite) after epoch 1, so its loss overflows in epoch 2:
    it is marked diverged there, goes back to its last finite state and stays; seed 0 trains on."""
    model = models.MnistConvNet()
    tx = train.rmsprop_keras(1e-3)
    images, labels = tiny_mnist(64)
    trainer = train.Trainer(model, tx, num_seeds=2)
    result = train.fit(trainer, trainer.init([0, 1]), (images, labels), 1, 16, (images, labels), verbose=False)
    huge = result.state.replace(params=jax.tree.map(lambda p: p.at[1].set(1e30), result.state.params))
    before = jax.tree.map(np.array, huge)  # fit reuses the state's buffers
    result = train.fit(trainer, huge, (images, labels), 3, 16, (images, labels), verbose=False, initial_epoch=1,
                       histories=result.histories, diverged=result.diverged)
    assert result.diverged == [None, 2]
    assert [row["epoch"] for row in result.histories[1]] == [1, 2] and result.histories[1][-1]["diverged"]
    assert [row["epoch"] for row in result.histories[0]] == [1, 2, 3] and not any(r.get("diverged") for r in result.histories[0])
    final = jax.tree.map(np.asarray, result.state)
    for a, b in zip(jax.tree.leaves(train.seed_slice(final, 1)), jax.tree.leaves(train.seed_slice(before, 1))):
        np.testing.assert_array_equal(a, b)  # frozen at its last finite state, step count included
    assert int(final.step[0]) == int(before.step[0]) + 2 * 4
    assert not np.array_equal(final.params["dense"]["kernel"][0], before.params["dense"]["kernel"][0])


def _fit_seeds_together_and_alone(model, tx, augment, data, epochs, batch_size, seeds):
    """(state, histories) of the seeds vmapped, and (state, history) of each seed run alone."""
    alone = []
    for seed in seeds:
        trainer = train.Trainer(model, tx, augment)
        result = train.fit(trainer, trainer.init([seed]), data, epochs, batch_size, data, verbose=False)
        alone.append((train.seed_slice(result.state, 0), result.histories[0]))
    trainer = train.Trainer(model, tx, augment, num_seeds=len(seeds))
    result = train.fit(trainer, trainer.init(seeds), data, epochs, batch_size, data, verbose=False)
    return result.state, result.histories, alone


def _assert_each_seed_matches(state, histories, alone):
    """Seed k of a vmapped run against its own run: metrics to 1e-4 relative, parameters to 1e-4."""
    for k, (seq_state, seq_history) in enumerate(alone):
        for a, b in zip(_metrics(histories[k]), _metrics(seq_history)):
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=f"seed index {k} {key}")
        for a, b in zip(jax.tree.leaves(train.seed_slice(state, k).params), jax.tree.leaves(seq_state.params)):
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
    assert len(histories) == 3 and np.asarray(state.step).tolist() == [2 * 4] * 3
    _assert_each_seed_matches(state, histories, alone)


def test_vmapped_seeds_with_augmentation_and_dropout_equal_seeds_run_one_at_a_time():
    """The ablation's case: each seed draws its own augmentation and dropout masks, under vmap
    exactly as alone. Same tolerance as above (float32 reassociation only)."""
    model = models.CatsDogsConvNet(dropout_rate=0.5, input_shape=(CATS_SIZE, CATS_SIZE, 3))
    tx = train.adam_keras(1e-3)
    images, labels = tiny_cats_dogs(24)
    state, histories, alone = _fit_seeds_together_and_alone(model, tx, AugmentConfig.LECTURE, (images, labels), 2, 8, seeds=[0, 1])
    _assert_each_seed_matches(state, histories, alone)


# --- Training really augments ------------------------------------------------------------------


class InputProbe(nn.Module):
    """logit_i = <probe_i, x_i>, one zero-initialised probe per batch position: after one SGD step of
    rate 1 on the mean binary cross-entropy, probe_i = (y_i - 1/2) x_i / B, so the parameters hold the
    exact batch the train step fed the model, after preprocessing and augmentation."""

    batch: int
    input_shape: tuple[int, int, int] = (CATS_SIZE, CATS_SIZE, 3)
    head: ClassVar[str] = "sigmoid"

    @nn.compact
    def __call__(self, x, train=False):
        probe = self.param("probe", nn.initializers.zeros, (self.batch, *self.input_shape))
        return jnp.sum(probe[: x.shape[0]] * x, axis=(1, 2, 3))


def seen_by_the_model(augmentation: AugmentConfig | None, batch: int = 8):
    """One training step of the Trainer on one batch: (what the model saw, the batch gathered, the state's key and step)."""
    images, labels = tiny_cats_dogs(batch)
    trainer = train.Trainer(InputProbe(batch), optax.sgd(1.0), augmentation)
    state = trainer.init([0])
    key, step = np.asarray(state.rng[0]), int(state.step[0])  # the step donates the state's buffers
    indices = np.asarray(trainer.epoch_order(state, batch, batch, 0)[0])[0, 0]
    new_state, _ = trainer.train_epoch(state, (images, labels), batch, 0)
    probe = np.asarray(new_state.params["probe"][0])
    seen = probe * batch / (labels[indices] - 0.5)[:, None, None, None]
    return seen, images[indices], key, step


def test_the_train_step_feeds_the_model_the_augmented_batch():
    """The batch the model trains on is random_augment of the gathered batch, keyed as make_train_step
    documents (fold_in(state.rng, state.step), split into augmentation and dropout keys), then / 255."""
    seen, gathered, key, step = seen_by_the_model(AugmentConfig.LECTURE)
    augment_key, _ = jax.random.split(jax.random.fold_in(key, step))
    expected = np.asarray(augment.random_augment(augment_key, jnp.asarray(gathered, jnp.float32), AugmentConfig.LECTURE)) / 255
    np.testing.assert_allclose(seen, expected, atol=1e-5)
    assert np.abs(seen - gathered / 255).mean() > 0.05  # and it is not the batch as loaded


def test_without_augmentation_the_model_sees_the_batch_as_loaded():
    for augmentation in (None, AugmentConfig()):
        seen, gathered, _, _ = seen_by_the_model(augmentation)
        np.testing.assert_allclose(seen, gathered / 255, atol=1e-6)
