"""Looking inside a convnet: activations, channel grids, filter patterns, Grad-CAM, the script."""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from cnnjax import checkpoint, models, plots, step
from cnnjax import inspect as look
from experiments import activations as script
from tests.conftest import (
    CATS_DOGS_LAYERS,
    MNIST_LAYERS,
    numpy_params,
    png_pixels,
    quadrant_square_images,
    write_noise_image,
    write_solid_image,
)

MNIST_SHAPES = [(name, shape) for name, shape, _ in MNIST_LAYERS]
CATS_SHAPES = [(name, shape) for name, shape, _ in CATS_DOGS_LAYERS]


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
    # Filters dead on the grey start (no gradient after the ReLU) come alive too: the ascent follows the pre-activation.
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
    """Share of the heatmap (upsampled to the 20x20 image) in each quadrant: [[TL, TR], [BL, BR]]."""
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


# --- The script --------------------------------------------------------------------------------


def save_untrained(model, folder):
    """A checkpoint of untrained parameters, as a run would leave it: FOLDER/checkpoints/0."""
    return checkpoint.save_model(folder, model, numpy_params(model), epoch=0)


def assert_pictures_of(out, model, params, image, layers, channel, tmp_path):
    """input.png, the channel picture and every activation grid in `out` are, pixel for pixel, the
    pictures of `image` (H, W, C in 0..1) through `params`, drawn here from the activations."""
    pixels = np.round(np.asarray(image) * 255).astype(np.uint8)
    np.testing.assert_array_equal(
        png_pixels(out / "input.png"), pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    )
    captured = look.capture_activations(model, params, image, layers)
    expected = tmp_path / "expected"
    first_name, first = captured[0]
    drawn = plots.plot_channel(
        first, channel, expected / "channel.png", f"{first_name}, channel {channel}"
    )
    np.testing.assert_array_equal(
        png_pixels(out / f"channel_{first_name}_{channel}.png"), png_pixels(drawn)
    )
    for i, (name, activation) in enumerate(captured, 1):
        drawn = plots.plot_activation_grid(
            name, look.activation_grid(activation), expected / f"{i}.png"
        )
        np.testing.assert_array_equal(
            png_pixels(out / f"activations_{i}_{name}.png"), png_pixels(drawn), err_msg=name
        )
    return captured


def test_script_on_a_cats_checkpoint_and_a_small_image(tmp_path, capsys):
    model = models.CatsDogsConvNet()
    ckpt = save_untrained(model, tmp_path / "run")
    image_file = tmp_path / "tiny.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)).save(
        image_file
    )
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--image", str(image_file), "--out", str(out), "--heatmap"]
    written = script.main(
        [*argv, "--filters", "--filter-layer", "conv2d", "--num-filters", "3", "--steps", "1"]
    )
    layers = [name for name, _ in CATS_SHAPES[:8]]
    expected = [
        "input.png",
        "channel_conv2d_2.png",
        *[f"activations_{i}_{n}.png" for i, n in enumerate(layers, 1)],
    ]
    assert [p.name for p in written] == [*expected, "filters_conv2d.png", "heatmap.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in written
    )  # no temporaries left
    # The image as the model sees it: load_img's nearest resize to 150x150 (a checkpoint without a config), / 255.
    with Image.open(image_file) as img:
        image = np.asarray(img.convert("RGB").resize((150, 150), Image.NEAREST), np.float32) / 255
    params = numpy_params(model)
    assert_pictures_of(out, model, params, image, layers, 2, tmp_path)
    ascent = look.filter_ascent(model, params, "conv2d", 3, steps=1)
    drawn = plots.plot_filter_patterns(
        ascent.patterns,
        tmp_path / "filters.png",
        "conv2d: the inputs filters respond to most (1 ascent steps)",
        ["filter 0", "filter 1", "filter 2"],
    )
    np.testing.assert_array_equal(png_pixels(out / "filters_conv2d.png"), png_pixels(drawn))
    printed = capsys.readouterr().out
    assert "heatmap.png" in printed and "activations_8_max_pooling2d_3.png" in printed


@pytest.mark.slow  # the real MNIST (a download on a machine without it)
def test_script_on_an_mnist_checkpoint_uses_the_first_test_image(tmp_path, mnist_dir):
    model = models.MnistConvNet()
    ckpt = save_untrained(model, tmp_path / "run")
    argv = [
        "--checkpoint",
        str(ckpt),
        "--data-dir",
        str(mnist_dir),
        "--heatmap",
        "--filters",
        "--num-filters",
        "4",
    ]
    written = script.main(argv)
    out = tmp_path / "run" / "inspect"  # the default: in the run folder
    assert all(p.parent == out for p in written)
    names = [p.name for p in written]
    assert names[2:7] == [
        f"activations_{i}_{n}.png" for i, (n, _) in enumerate(MNIST_SHAPES[:5], 1)
    ]
    assert names[7:] == ["filters_conv2d_2.png", "heatmap.png"]
    from cnnjax.data import load_mnist

    image = load_mnist(mnist_dir)["test_images"][0].astype(np.float32) / 255  # a 7
    assert png_pixels(out / "input.png").ndim == 2  # grayscale
    params = numpy_params(model)
    assert_pictures_of(out, model, params, image, [n for n, _ in MNIST_SHAPES[:5]], 2, tmp_path)
    cam = look.grad_cam(model, params, image)
    title = f"Grad-CAM at conv2d_2: {cam.class_index} (p = {cam.probability:.2f})"
    drawn = plots.plot_heatmap(
        look.overlay_heatmap(image, cam.heatmap), cam.heatmap, tmp_path / "heatmap.png", title
    )
    np.testing.assert_array_equal(png_pixels(out / "heatmap.png"), png_pixels(drawn))


def test_default_cats_image_is_the_first_validation_cat(cats_photos):
    """cat.1000.jpg in cats_and_dogs_small (the real one, or one made with its file names in another order)."""
    assert (
        script.default_image_path(cats_photos)
        == cats_photos / "validation" / "cats" / "cat.1000.jpg"
    )
    assert (
        script.default_image_path(cats_photos.parent)
        == cats_photos / "validation" / "cats" / "cat.1000.jpg"
    )


@pytest.mark.parametrize(
    "problem", ["no checkpoint", "unreadable image", "bad channel", "bad which"]
)
def test_script_bad_input_is_one_error_line_and_nothing_written(tmp_path, capsys, problem):
    ckpt = save_untrained(models.MnistConvNet(), tmp_path / "run")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    out = tmp_path / "out"
    argv = {
        "no checkpoint": ["--checkpoint", str(tmp_path / "missing")],
        "unreadable image": ["--checkpoint", str(ckpt), "--image", str(not_an_image)],
        "bad channel": [
            "--checkpoint",
            str(ckpt),
            "--image",
            str(not_an_image.with_name("ok.png")),
            "--channel",
            "32",
        ],
        "bad which": ["--checkpoint", str(tmp_path / "run"), "--which", "bset"],
    }[problem]
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    if problem == "bad which":  # what was wrong and what to pass, not int()'s message
        assert "best, latest or an epoch number, got 'bset'" in err
    assert not out.exists()


def test_load_image_gives_the_pixels_training_saw(tmp_path):
    """The script's input goes through the folder loader's decoding: same resize, 16-bit scaled (not clipped)."""
    from cnnjax.data.folders import load_image_folder

    write_noise_image(tmp_path / "data" / "c" / "noise.png", size=(37, 23))
    for interpolation in ("nearest", "bilinear"):
        trained = load_image_folder(tmp_path / "data", (10, 15), interpolation, cache=False).images[
            0
        ]
        np.testing.assert_array_equal(
            look.load_image(tmp_path / "data" / "c" / "noise.png", (10, 15), 3, interpolation)
            * 255,
            trained,
        )
    write_solid_image(
        tmp_path / "gray16.png", 1000, mode="I;16"
    )  # round(1000 * 255 / 65535) = 4, where PIL clips to 255
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    for channels in (1, 3):
        pixels = look.load_image(tmp_path / "gray16.png", (4, 6), channels)
        assert pixels.shape == (4, 6, channels) and pixels.dtype == np.float32
        np.testing.assert_allclose(pixels * 255, 4.0, atol=1e-4)
