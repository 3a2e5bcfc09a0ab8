"""Both models: Keras layer names, output shapes and parameter counts of SPEC.md section 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import models
from tests.conftest import CATS_DOGS_LAYERS, MNIST_LAYERS

KERAS_TYPES = {
    "conv2d": "Conv2D",
    "max_pooling2d": "MaxPooling2D",
    "flatten": "Flatten",
    "dropout": "Dropout",
    "dense": "Dense",
}


def _param_count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "model,layers,total",
    [
        (models.MnistConvNet(), MNIST_LAYERS, 93_322),
        (models.CatsDogsConvNet(), CATS_DOGS_LAYERS, 3_453_121),
    ],
)
def test_layer_shapes_and_parameter_counts(model, layers, total):
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
    x = jax.ShapeDtypeStruct((2, *model.input_shape), jnp.float32)
    outputs = jax.eval_shape(lambda p, x: models.layer_outputs(model, p, x), params, x)
    assert models.layer_names(model) == [name for name, _, _ in layers]
    for name, shape, count in layers:
        assert outputs[name].shape == (2, *shape), name
        assert _param_count(params.get(name, {})) == count, name
    assert _param_count(params) == total
    table = models.summary(model)
    assert f"Total params: {total:,}" in table and f"Trainable params: {total:,}" in table
    assert "Non-trainable params: 0" in table
    # Every layer's row, read back: name (type), output shape, parameter
    # count, in the model's order.
    rows = [
        line.split()
        for line in table.splitlines()
        if line.split() and line.split()[0] in models.layer_names(model)
    ]
    expected = [
        (
            name,
            f"({KERAS_TYPES[name.rstrip('_0123456789')]})",
            f"(None, {', '.join(map(str, shape))})",
            count,
        )
        for name, shape, count in layers
    ]
    assert [(row[0], row[1], " ".join(row[2:-1]), int(row[-1])) for row in rows] == expected


def test_dropout_sits_after_flatten_and_adds_no_parameters():
    model = models.CatsDogsConvNet(dropout_rate=0.5)
    names = models.layer_names(model)
    assert names[names.index("flatten") + 1] == "dropout"
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
    assert _param_count(params) == 3_453_121
    assert "dropout (Dropout)" in models.summary(model)


def test_a_layer_of_another_kind_gets_its_row_in_the_summary():
    """Changing the model is editing its module (README): a layer kind the lecture
    lacks must not break summary."""
    import flax.linen as nn

    class Normed(nn.Module):
        input_shape: tuple = (8, 8, 1)

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = models.Conv2D(4, activation="relu", name="conv2d")(x)
            x = nn.LayerNorm(name="layer_normalization")(x)
            return models.Dense(2, name="dense")(models.Flatten(name="flatten")(x))

    table = models.summary(Normed())
    assert "layer_normalization (LayerNormalization) (None, 6, 6, 4) 8".split() in [
        line.split() for line in table.splitlines()
    ]
    assert "Total params: 338" in table  # 40 + 8 + 290
    assert (
        models.layer_type("max_pooling2d_3") == "MaxPooling2D"
        and models.layer_type("dense_1") == "Dense"
    )


def test_dropout_is_active_in_training_and_off_in_evaluation():
    model = models.CatsDogsConvNet(dropout_rate=0.5, input_shape=(64, 64, 3))
    params = models.init_params(model, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 64, 64, 3))
    evals = [model.apply({"params": params}, x, train=False) for _ in range(2)]
    np.testing.assert_array_equal(evals[0], evals[1])
    inner = models.layer_outputs(
        model, params, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}
    )
    dropped = np.asarray(inner["dropout"])
    kept = dropped != 0
    assert (
        0.35 < kept[np.asarray(inner["flatten"]) != 0].mean() < 0.65
    )  # about half the features survive
    np.testing.assert_allclose(
        dropped[kept], 2 * np.asarray(inner["flatten"])[kept], rtol=1e-6
    )  # inverted dropout scales by 2
    train_out = model.apply(
        {"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}
    )
    assert not np.allclose(train_out, evals[0])


def test_keras_initialisers():
    params = models.init_params(models.MnistConvNet(), jax.random.PRNGKey(0))
    kernel = params["conv2d_1"]["kernel"]  # glorot_uniform: limit sqrt(6 / (fan_in + fan_out))
    limit = np.sqrt(6 / (3 * 3 * 32 + 3 * 3 * 64))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
    assert all(not np.any(layer["bias"]) for layer in params.values())


def test_model_config_round_trip_and_unknown_model():
    model = models.CatsDogsConvNet(dropout_rate=0.5, input_shape=(64, 64, 3))
    assert models.build_model(models.model_config(model)) == model
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model({"model": "resnet"})


def test_predict_gives_probabilities():
    model = models.MnistConvNet()
    params = models.init_params(model, jax.random.PRNGKey(0))
    probs = models.predict(model, params, jnp.ones((3, 28, 28, 1)) * 0.5)
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    cats = models.CatsDogsConvNet(input_shape=(48, 48, 3))
    x = jnp.ones((2, 48, 48, 3)) * 0.5
    cats_params = models.init_params(cats, jax.random.PRNGKey(0))
    probs = models.predict(cats, cats_params, x)
    np.testing.assert_allclose(
        probs[:, 1], jax.nn.sigmoid(cats.apply({"params": cats_params}, x)), rtol=1e-6
    )  # Keras's sigmoid output
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_captured_dense_output_is_after_its_relu():
    model = models.MnistConvNet()
    params = models.init_params(model, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
    outputs = models.layer_outputs(model, params, x)
    assert (
        float(outputs["dense"].min()) >= 0
    )  # ReLU applied, as Keras's Dense(64, activation="relu") outputs
    expected = jax.nn.relu(outputs["flatten"] @ params["dense"]["kernel"] + params["dense"]["bias"])
    np.testing.assert_allclose(outputs["dense"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["output"], model.apply({"params": params}, x), rtol=1e-6)
