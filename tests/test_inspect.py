"""Looking inside a convnet: activations, channel grids, filter patterns, Grad-CAM (the script:
tests/test_inspect_script.py)."""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import inspect as look
from cnnjax import models, step
from tests.conftest import (
    CATS_SHAPES,
    MNIST_SHAPES,
    numpy_params,
    quadrant_square_images,
)


@pytest.fixture(scope="module")
def mnist():
    model = models.MnistConvNet()
    return model, numpy_params(model)


@pytest.fixture(scope="module")
def cats():
    model = models.CatsDogsConvNet()
    return model, numpy_params(model)


# --- Activations ---------------------------------------------------------------------------


def test_mnist_activations_have_the_spec_shapes_and_end_in_the_models_output(mnist):
    model, params = mnist
    images = jax.random.uniform(jax.random.PRNGKey(1), (3, 28, 28, 1))
    captured = look.capture_activations(model, params, images)
    assert [(name, a.shape[1:]) for name, a in captured] == MNIST_SHAPES
    assert all(a.shape[0] == 3 for _, a in captured)
    np.testing.assert_allclose(
        captured[-1][1], model.apply({"params": params}, images), rtol=1e-6, atol=1e-6
    )


def test_cats_activations_have_the_spec_shapes_and_end_in_the_models_output(cats):
    model, params = cats
    image = jax.random.uniform(jax.random.PRNGKey(1), (150, 150, 3))
    captured = look.capture_activations(model, params, image)  # one image: no batch axis
    assert [(name, a.shape) for name, a in captured] == CATS_SHAPES
    np.testing.assert_allclose(
        captured[-1][1][0], model.apply({"params": params}, image[None])[0], rtol=1e-5, atol=1e-6
    )
    # The lecture's "first 8 layers": 4 conv + 4 pool.
    first8 = look.capture_activations(model, params, image, 8)
    assert [name for name, _ in first8] == [name for name, _ in CATS_SHAPES[:8]]
    np.testing.assert_array_equal(first8[3][1], captured[3][1])


def test_layers_by_name_and_bad_names(mnist):
    model, params = mnist
    images = jnp.zeros((1, 28, 28, 1))
    picked = look.capture_activations(model, params, images, ["conv2d_2", "conv2d", "output"])
    shapes = [(name, a.shape) for name, a in picked]
    assert shapes == [("conv2d_2", (1, 3, 3, 64)), ("conv2d", (1, 26, 26, 32)), ("output", (1, 10))]
    with pytest.raises(ValueError, match="unknown layer.*conv2d_9"):
        look.capture_activations(model, params, images, ["conv2d_9"])
    with pytest.raises(ValueError, match="8 layers"):
        look.capture_activations(model, params, images, 9)


# --- Channel grids ---------------------------------------------------------------------------


def test_grid_puts_channel_c_at_row_c_div_16_column_c_mod_16():
    height, width, channels = 3, 2, 20
    activation = np.zeros((height, width, channels), np.float32)
    for c in range(channels):  # channel c: zero but for one pixel, at flat position c % 6
        activation.reshape(-1, channels)[c % (height * width), c] = c + 1.0
    grid = look.activation_grid(activation)
    assert (
        grid.shape == (2 * height, 16 * width) and grid.dtype == np.uint8
    )  # ceil(20 / 16) = 2 rows
    for c in range(channels):
        row, col = divmod(c, 16)
        tile = grid[row * height : (row + 1) * height, col * width : (col + 1) * width]
        np.testing.assert_array_equal(tile, look.normalise_channel(activation[..., c]))
        assert np.argmax(tile) == c % (height * width)
    assert not grid[height:, 4 * width :].any()  # channels 20..31 do not exist: zero tiles


def test_normalise_channel_formula_and_constant_channels():
    x = np.array([[0.0, 1.0], [2.0, 7.0]])
    expected = np.clip((x - x.mean()) / x.std() * 64 + 128, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(look.normalise_channel(x), expected)
    assert look.normalise_channel(np.array([[0.0, 1000.0] + [0.0] * 98])).max() == 255  # clipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for value in (
            0.0,
            0.1,
            -3.7,
        ):  # a dead ReLU channel, and constants a float mean would not hit exactly
            flat = look.normalise_channel(np.full((148, 148), value, np.float32))
            assert flat.dtype == np.uint8 and (flat == 128).all()
        grid = look.activation_grid(np.zeros((4, 4, 16), np.float32))
    assert (grid == 128).all()


# --- Filter patterns -------------------------------------------------------------------------


def test_gradient_ascent_increases_each_filters_mean_activation(mnist):
    model, params = mnist
    ascent = look.filter_ascent(model, params, "conv2d_1", filters=24, steps=8)
    assert ascent.images.shape == (24, 28, 28, 1) and list(ascent.filters) == list(range(24))
    assert (ascent.after > ascent.before).all()
    # Filters dead on the grey start (no gradient after the ReLU) come alive too: the
    # ascent follows the pre-activation.
    dead = ascent.before == 0
    assert dead.sum() >= 6 and (ascent.after[dead] > 0).all()
    patterns = look.filter_ascent(model, params, "conv2d_1", filters=[3, 5], steps=3).patterns
    assert patterns.shape == (2, 28, 28, 1) and patterns.min() >= 0 and patterns.max() <= 1
    with pytest.raises(ValueError, match="0..63"):
        look.filter_ascent(model, params, "conv2d_1", filters=[64])


def test_pre_activation_is_the_output_before_the_relu(mnist):
    model, params = mnist
    images = jax.random.uniform(jax.random.PRNGKey(2), (2, 28, 28, 1))
    for name, output in look.capture_activations(
        model, params, images, 5
    ):  # the conv and pool layers
        pre = look.pre_activation(model, params, images, name)
        assert pre.min() < 0
        np.testing.assert_allclose(jax.nn.relu(pre), output, rtol=1e-5, atol=1e-6)


def test_deprocess_image_centres_and_scales():
    x = np.random.default_rng(0).normal(5.0, 3.0, (2, 8, 8, 3))
    out = look.deprocess_image(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0.5, atol=0.01)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 0.1, atol=0.01)


# --- Grad-CAM --------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """conv2d -> pool -> conv2d_1 -> flatten -> dense_1, on 20x20 grayscale: a 7x7 Grad-CAM map."""

    num_classes: int = 2
    input_shape: tuple[int, int, int] = (20, 20, 1)

    @property
    def head(self):
        return models.Softmax(self.num_classes)

    @nn.compact
    def __call__(self, x, train=False):
        x = models.Conv2D(8, activation="relu", name="conv2d")(x)
        x = models.MaxPooling2D(name="max_pooling2d")(x)
        x = models.Conv2D(8, activation="relu", name="conv2d_1")(x)
        x = models.Flatten(name="flatten")(x)
        softmax = isinstance(self.head, models.Softmax)
        out = models.Dense(self.num_classes if softmax else 1, name="dense_1")(x)
        return out if softmax else out[:, 0]


class TinySigmoidNet(TinyNet):
    @property
    def head(self):
        return models.Sigmoid()


def quadrant_mass(heatmap: np.ndarray) -> np.ndarray:
    """Share of the heatmap (upsampled to the 20x20 image) in each
    quadrant: [[TL, TR], [BL, BR]]."""
    big = np.asarray(jax.image.resize(jnp.asarray(heatmap), (20, 20), "bilinear"))
    quads = big.reshape(2, 10, 2, 10).sum(axis=(1, 3))
    return quads / quads.sum()


def test_grad_cam_highlights_the_square_that_decides_the_class():
    model = TinyNet()
    tx = optax.adam(1e-2)
    params = numpy_params(model)
    state = step.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )
    rng = np.random.default_rng(0)
    pixels, labels = quadrant_square_images(rng, 512)
    train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx, augment=None))
    for epoch in range(3):
        indices, weights = step.epoch_order(np.asarray(state.rng)[None], 512, 32, epoch)
        correct = 0.0
        for idx, w in zip(indices[0], weights[0]):
            state, sums = train_step(
                state, {"image": pixels[idx], "label": labels[idx], "weight": w}
            )
            correct += float(sums["correct"])
    assert correct / 512 > 0.95
    quadrants = [(0, 0), (0, 1), (1, 0), (1, 1)] * 2
    images, _ = quadrant_square_images(rng, len(quadrants), quadrants)
    for image, (qy, qx) in zip(images, quadrants, strict=True):
        cam = look.grad_cam(model, state.params, image / 255.0)
        assert cam.predicted == cam.class_index == 1 and cam.probability > 0.5
        assert (
            cam.heatmap.shape == (7, 7)
            and cam.heatmap.min() >= 0
            and cam.heatmap.max() == pytest.approx(1.0)
        )
        quads = quadrant_mass(cam.heatmap)
        assert quads[qy, qx] > 0.5 and quads[qy, qx] == quads.max(), ((qy, qx), quads)


@pytest.mark.parametrize("net", [TinyNet, TinySigmoidNet])
def test_grad_cam_equals_the_textbook_computation(net):
    """Against Grad-CAM written out by hand: the class score through the layers after conv2d_1."""
    model = net()
    params = numpy_params(model, seed=3)
    image = jax.random.uniform(jax.random.PRNGKey(4), (20, 20, 1))
    activation = dict(look.capture_activations(model, params, image[None]))["conv2d_1"]

    def score(a, c):
        softmax = isinstance(model.head, models.Softmax)
        dense_1 = models.Dense(model.num_classes if softmax else 1)
        z = dense_1.apply({"params": params["dense_1"]}, a.reshape(1, -1))
        if softmax:
            return z[0, c]  # the logit
        p = jax.nn.sigmoid(z[0, 0])
        return p if c == 1 else 1 - p  # dog: sigmoid, cat: its complement

    found_nonzero = False
    for c in range(2):
        grads = jax.grad(score)(activation, c)
        cam = jax.nn.relu(jnp.sum(activation[0] * grads[0].mean(axis=(0, 1)), axis=-1))
        expected = np.asarray(cam / cam.max()) if cam.max() > 0 else np.zeros(cam.shape)
        result = look.grad_cam(model, params, image, class_index=c)
        assert result.class_index == c
        np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
        found_nonzero |= bool(expected.max() > 0)
    assert found_nonzero


def test_grad_cam_without_evidence_is_zeros_not_nan(mnist):
    model, params = mnist
    zero_params = jax.tree.map(jnp.zeros_like, params)
    cam = look.grad_cam(model, zero_params, jnp.zeros((28, 28, 1)), class_index=4)
    assert (
        cam.heatmap.shape == (3, 3) and not np.isnan(cam.heatmap).any() and (cam.heatmap == 0).all()
    )


def test_overlay_heatmap_upsamples_and_blends():
    image = np.full((30, 40, 3), 0.5, np.float32)
    heatmap = np.array([[0.0, 1.0], [0.0, 0.0]])
    overlay = look.overlay_heatmap(image, heatmap, alpha=0.4)
    assert overlay.shape == (30, 40, 3) and overlay.min() >= 0 and overlay.max() <= 1
    # Hot (red in jet) top right, cold (blue) bottom left.
    assert overlay[2, 38, 0] > overlay[2, 38, 2] and overlay[28, 2, 2] > overlay[28, 2, 0]
    np.testing.assert_allclose(look.overlay_heatmap(image, heatmap, alpha=0.0), image)
    assert look.overlay_heatmap(np.zeros((28, 28, 1)), heatmap).shape == (28, 28, 3)
