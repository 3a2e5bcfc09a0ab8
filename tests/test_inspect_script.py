"""Looking inside a convnet through experiments/activations.py: the pictures it saves, its input
image, its errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnnjax import checkpoint, models, plots
from cnnjax import inspect as look
from experiments import activations as script
from tests.conftest import (
    CATS_SHAPES,
    MNIST_SHAPES,
    numpy_params,
    png_pixels,
    write_noise_image,
    write_solid_image,
)

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
    # The image as the model sees it: load_img's nearest resize to 150x150 (a
    # checkpoint without a config), / 255.
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
    """cat.1000.jpg in cats_and_dogs_small (the real one, or one made with its
    file names in another order)."""
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
    """The script's input goes through the folder loader's decoding: same resize,
    16-bit scaled (not clipped)."""
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
