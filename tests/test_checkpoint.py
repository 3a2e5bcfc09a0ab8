"""Checkpoints: a round trip reproduces the model exactly; a wrong one is a clear error."""

import jax
import numpy as np
import pytest

from cnnjax import checkpoint, models, train
from tests.test_train import tiny_mnist


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = models.MnistConvNet()
    tx = train.rmsprop_keras()
    state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
    images, labels = tiny_mnist()
    trainer = train.Trainer(model, tx)
    state, _ = train.fit(trainer, state, (images, labels), 1, 32, verbose=False)
    path = tmp_path_factory.mktemp("run") / "checkpoint"
    checkpoint.save_checkpoint(path, state, model, {"epoch": 1})
    return model, tx, state, path, trainer, (images, labels)


def test_round_trip_reproduces_accuracy_exactly(trained):
    model, tx, state, path, trainer, (images, labels) = trained
    before = trainer.evaluate(state.params, images, labels)
    restored_model, params, meta = checkpoint.restore_model(path)  # from the folder alone
    assert restored_model == model and meta == {"epoch": 1}
    assert trainer.evaluate(params, images, labels) == before
    full, _ = checkpoint.restore_train_state(path, model, tx)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(full.opt_state) == jax.tree.structure(state.opt_state)


def test_saving_again_replaces_and_leaves_no_temporaries(trained):
    model, _, state, path, _, _ = trained
    checkpoint.save_checkpoint(path, state.replace(step=state.step + 7), model, {"epoch": 2})
    assert checkpoint.read_json_item(path, "meta") == {"epoch": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint"]


def test_other_architecture_is_a_clear_error(trained):
    _, tx, _, path, _, _ = trained
    with pytest.raises(checkpoint.CheckpointError, match="different architecture"):
        checkpoint.restore_train_state(path, models.CatsDogsConvNet(), tx)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a cnnjax checkpoint"):
        checkpoint.restore_model(tmp_path)
