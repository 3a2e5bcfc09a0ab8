"""Looking inside a trained convnet: activations, filter patterns, Grad-CAM.

The lecture (section 4 of SPEC.md) builds a Keras `Model` whose outputs are the first 8
layers' outputs and draws them; `capture_activations` is that model, built on flax's
`capture_intermediates` (`cnnjax.models.layer_outputs`), and `normalise_channel` /
`activation_grid` lay the channels out exactly as its plotting loop does (16 per row,
each channel scaled to (x - mean) / std * 64 + 128).

Beyond the lecture, the two tools of the book's same chapter:
- `filter_patterns`: the input image each filter responds to most, by gradient ascent
  in input space (all filters of a layer in one vmapped, jitted call);
- `grad_cam`: which part of the image made the model choose a class (Grad-CAM,
  Selvaraju et al. 2017), with `overlay_heatmap` to draw it over the image.

Every computation is one jitted function, compiled once per model (and layer) and kept
in an lru_cache: flax modules are frozen dataclasses, so they are hashable cache keys.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import models
from cnnjax.ops import conv2d_nhwc, max_pool_nhwc

LayerSpec = int | Sequence[str] | None


# --- Loading one image, as keras.utils.load_img does -------------------------------------


def load_image(path: str | os.PathLike, size: tuple[int, int], channels: int = 3, interpolation: str = "nearest") -> np.ndarray:
    """One image file as float32 (h, w, channels) in 0..1, as the model saw images in training.

    The steps of Keras's load_img + img_to_array / 255: PIL opens it, converts to RGB (or L
    for a 1-channel model), resizes to (w, h) with `interpolation` (the run's
    data.interpolation; nearest is load_img's default), scales by 1/255. 16-bit and float
    images are scaled to 8 bits first, as the folder loader does for training. Raises
    OSError (PIL's UnidentifiedImageError included) when the file cannot be read.
    """
    from cnnjax.data import decode_file

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return decode_file(path, size, interpolation, "L" if channels == 1 else "RGB").astype(np.float32) / 255.0


# --- Activations -------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _layer_names(model: nn.Module) -> tuple[str, ...]:
    return tuple(models.layer_names(model))


def resolve_layers(model: nn.Module, layers: LayerSpec = None) -> list[str]:
    """Layer names for `layers`: None = all, an int N = the first N, or a list of names."""
    names = list(_layer_names(model))
    if layers is None:
        return names
    if isinstance(layers, int):
        if not 1 <= layers <= len(names):
            raise ValueError(f"layers={layers}: the model has {len(names)} layers ({', '.join(names)})")
        return names[:layers]
    if isinstance(layers, str):  # a single name would otherwise be read letter by letter
        layers = [layers]
    unknown = [name for name in layers if name not in names and name != "output"]
    if unknown:
        raise ValueError(f"unknown layer(s) {', '.join(unknown)}; the model's layers: {', '.join(names)}")
    return list(layers)


@functools.lru_cache(maxsize=64)
def _activations_fn(model: nn.Module, names: tuple[str, ...]):
    def run(params, images):
        outputs = models.layer_outputs(model, params, images)
        return [outputs[name] for name in names]  # a list: jax would sort a dict's keys

    return jax.jit(run)


def capture_activations(
    model: nn.Module, params: Any, images: jax.Array, layers: LayerSpec = None
) -> list[tuple[str, jax.Array]]:
    """(layer name, output) for the chosen layers, in the order they run: the lecture's activation model.

    images: (N, H, W, C) floats as the model was trained on (pixels / 255), or one image
    (H, W, C), in which case the outputs have no batch axis either. "output" may be named
    to get the model's own output (logits). One jitted call, compiled once per model and
    list of layers.
    """
    images = jnp.asarray(images, jnp.float32)
    single = images.ndim == 3
    names = resolve_layers(model, layers)
    outputs = _activations_fn(model, tuple(names))(params, images[None] if single else images)
    return [(name, out[0] if single else out) for name, out in zip(names, outputs, strict=True)]


def normalise_channel(x: np.ndarray) -> np.ndarray:
    """One channel as the lecture shows it: (x - mean) / std * 64 + 128, clipped to 0..255, uint8.

    A constant channel (a dead ReLU filter is all zeros) has std 0: the lecture's code
    would divide by zero and draw NaNs; it is drawn flat grey (128) here instead.
    """
    x = np.asarray(x, np.float64)
    if x.size == 0 or np.ptp(x) == 0:  # ptp, not std == 0: a float sum can leave std a hair above 0
        return np.full(x.shape, 128, np.uint8)
    x = (x - x.mean()) / x.std() * 64 + 128
    return np.clip(x, 0, 255).astype(np.uint8)


def activation_grid(activation: np.ndarray, images_per_row: int = 16) -> np.ndarray:
    """All channels of one activation (H, W, C) as one uint8 image, `images_per_row` per row.

    Channel c sits at tile row c // images_per_row, column c % images_per_row; the grid has
    ceil(C / images_per_row) rows (the lecture's C // images_per_row would drop a partial
    last row) and missing tiles are 0. A leading batch axis of size 1 is allowed.
    """
    activation = np.asarray(activation)
    if activation.ndim == 4 and activation.shape[0] == 1:
        activation = activation[0]
    if activation.ndim != 3:
        raise ValueError(f"expected an activation (H, W, C), got shape {activation.shape}")
    height, width, channels = activation.shape
    rows = math.ceil(channels / images_per_row)
    grid = np.zeros((rows * height, images_per_row * width), np.uint8)
    for c in range(channels):
        row, col = divmod(c, images_per_row)
        grid[row * height : (row + 1) * height, col * width : (col + 1) * width] = normalise_channel(activation[..., c])
    return grid


# --- Filter patterns: gradient ascent in input space ---------------------------------------


@dataclass
class FilterAscent:
    """What gradient ascent found for some filters of one layer."""

    layer: str
    filters: np.ndarray  # (F,) filter (channel) indices
    images: np.ndarray  # (F, H, W, C) the raw inputs reached (model scale, not clipped)
    before: np.ndarray  # (F,) mean activation of each filter on its starting image
    after: np.ndarray  # (F,) ... and on the image reached

    @property
    def patterns(self) -> np.ndarray:
        """The images made viewable, as the book's deprocess_image does."""
        return deprocess_image(self.images)


def deprocess_image(x: np.ndarray) -> np.ndarray:
    """Centre and scale each image to 0..1: x -= mean; x /= std + 1e-5; x *= 0.1; x += 0.5; clip.

    x: (H, W, C) or (N, H, W, C); statistics are per image, over all its pixels and channels.
    """
    x = np.asarray(x, np.float32)
    axes = tuple(range(x.ndim - 3, x.ndim))
    x = x - x.mean(axis=axes, keepdims=True)
    x = x / (x.std(axis=axes, keepdims=True) + 1e-5)
    return np.clip(x * 0.1 + 0.5, 0, 1)


@functools.lru_cache(maxsize=64)
def _layer_channels(model: nn.Module, layer: str, image_shape: tuple[int, ...]) -> int:
    resolve_layers(model, [layer])
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))  # shapes only: nothing is computed
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda p, x: models.layer_outputs(model, p, x), params, x)[layer].shape[-1]


def pre_activation(model: nn.Module, params: Any, images: jax.Array, layer: str) -> jax.Array:
    """`layer`'s output before its ReLU: relu(pre_activation(...)) is the layer's output.

    Conv2D and Dense: the layer's input times its kernel plus bias; a max pooling layer
    pools the pre-activation of the conv before it (max and ReLU commute); other layers
    (flatten, dropout, a layer without activation) have no ReLU: their output. Follows
    the layers of `cnnjax.models` (valid 3x3 convs, 2x2 pools).
    """
    names = list(_layer_names(model))
    outputs = models.layer_outputs(model, params, images)
    i = names.index(layer)
    kind = models.layer_type(layer)
    inputs = images if i == 0 else outputs[names[i - 1]]
    if kind == "Conv2D":
        return conv2d_nhwc(inputs, params[layer]["kernel"]) + params[layer]["bias"]
    if kind == "Dense":
        return inputs @ params[layer]["kernel"] + params[layer]["bias"]
    if kind == "MaxPooling2D" and i > 0 and models.layer_type(names[i - 1]) == "Conv2D":
        return max_pool_nhwc(pre_activation(model, params, images, names[i - 1]), 2)
    return outputs[layer]


@functools.lru_cache(maxsize=32)
def _ascent_fn(model: nn.Module, layer: str, steps: int):
    def activation(params, x, f):
        return jnp.mean(models.layer_outputs(model, params, x[None])[layer][0][..., f])

    def objective(params, x, f):
        # The filter's mean *before* its ReLU: where the ReLU is off everywhere (most deep filters
        # on a grey image) the ReLU's output has no gradient and the ascent would never start.
        # Only `layer` is used: XLA drops the layers after it from the compiled program.
        return jnp.mean(pre_activation(model, params, x[None], layer)[0][..., f])

    grad = jax.grad(objective, argnums=1)

    def ascend(params, x0, f, step_size):
        def step(_, x):
            g = grad(params, x, f)
            g = g / (jnp.sqrt(jnp.mean(g**2)) + 1e-5)  # normalised step: the same pace for every filter
            return x + step_size * g

        x = jax.lax.fori_loop(0, steps, step, x0)
        return x, activation(params, x0, f), activation(params, x, f)

    # One filter per vmapped lane: the whole layer's filters in one program.
    return jax.jit(jax.vmap(ascend, in_axes=(None, 0, 0, None)))


def filter_ascent(
    model: nn.Module,
    params: Any,
    layer: str,
    filters: int | Sequence[int] | None = None,
    steps: int = 40,
    step_size: float = 1.0,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
) -> FilterAscent:
    """Gradient ascent on the mean activation of each chosen filter of `layer`.

    filters: None = all of the layer's channels, an int N = the first N, or a list of
    indices. Each starts from a grey image (0.5) plus uniform noise in +-0.05 (seeded; its
    own noise per filter) and takes `steps` steps of `step_size` along the gradient
    normalised by its root mean square. size: the input's (h, w), default the model's.
    The ascent follows the filter's mean before the ReLU (`pre_activation`), which always
    has a gradient; `before` and `after` report the mean activation itself (after the ReLU).
    """
    channels_in = model.input_shape[-1]
    if size is None:
        size = tuple(model.input_shape[:2])
    elif isinstance(size, int):
        size = (size, size)
    shape = (*size, channels_in)
    available = _layer_channels(model, layer, shape)
    if filters is None:
        chosen = np.arange(available)
    elif isinstance(filters, int):
        chosen = np.arange(min(filters, available))
    else:
        chosen = np.asarray(list(filters), np.int32)
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= available:
        raise ValueError(f"filters must be indices in 0..{available - 1} of {layer}, got {list(chosen)}")
    noise = jax.random.uniform(jax.random.PRNGKey(seed), (len(chosen), *shape), minval=-0.05, maxval=0.05)
    images, before, after = _ascent_fn(model, layer, int(steps))(params, 0.5 + noise, jnp.asarray(chosen, jnp.int32), step_size)
    images, before, after = jax.device_get((images, before, after))
    return FilterAscent(layer, chosen, np.asarray(images), np.asarray(before), np.asarray(after))


def filter_patterns(
    model: nn.Module,
    params: Any,
    layer: str,
    filters: int | Sequence[int] | None = None,
    steps: int = 40,
    step_size: float = 1.0,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """The patterns (F, H, W, C) in 0..1 that the chosen filters of `layer` respond to most.

    `filter_ascent` with the images deprocessed; call that for the activations reached.
    """
    return filter_ascent(model, params, layer, filters, steps, step_size, seed, size).patterns


# --- Grad-CAM --------------------------------------------------------------------------------


class GradCam(NamedTuple):
    heatmap: np.ndarray  # (h, w) in 0..1, at the resolution of the layer's output
    class_index: int  # the class explained
    probability: float  # the model's probability for that class (softmax, or sigmoid / 1 - sigmoid)
    predicted: int  # the class the model predicts


def last_conv_layer(model: nn.Module) -> str:
    names = [name for name in _layer_names(model) if name.startswith("conv2d")]
    if not names:
        raise ValueError(f"{type(model).__name__} has no conv2d layer")
    return names[-1]


def _add_to_output(layer: str, delta: jax.Array, captured: list):
    """A flax method interceptor that adds `delta` to the output of the child module `layer`.

    With delta = 0 the model computes exactly what it did; differentiating with respect
    to delta is differentiating with respect to that layer's output. The layer's output is
    also kept in `captured`.
    """
    depth = [0]

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        # Only the model's own child of that name (the root module's parent is a flax Scope).
        parent = module.parent
        is_layer = module.name == layer and isinstance(parent, nn.Module) and not isinstance(parent.parent, nn.Module)
        if context.method_name != "__call__" or not is_layer:
            return next_fun(*args, **kwargs)
        depth[0] += 1  # a layer that calls its base class's __call__ is intercepted twice: add once, outermost
        try:
            out = next_fun(*args, **kwargs)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            out = out + delta
            captured.append(out)
        return out

    return interceptor


@functools.lru_cache(maxsize=32)
def _grad_cam_fn(model: nn.Module, layer: str):
    def run(params, image, class_index):
        x = image[None]
        shape = jax.eval_shape(lambda: models.layer_outputs(model, params, x)[layer]).shape

        def target(delta):
            captured: list = []
            with nn.intercept_methods(_add_to_output(layer, delta, captured)):
                logits = model.apply({"params": params}, x)
            predicted = model.head.predict(logits)[0]
            c = jnp.where(class_index < 0, predicted, class_index)
            probability = model.head.probabilities(logits)[0, c]
            return model.head.score(logits, c)[0], (captured[0], c, probability, predicted)

        grads, (activation, c, probability, predicted) = jax.grad(target, has_aux=True)(jnp.zeros(shape, jnp.float32))
        weights = jnp.mean(grads[0], axis=(0, 1))  # one weight per channel: the gradient averaged over positions
        cam = jax.nn.relu(jnp.sum(activation[0] * weights, axis=-1))
        peak = jnp.max(cam)
        heatmap = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
        return heatmap, c, probability, predicted

    return jax.jit(run)


def grad_cam(
    model: nn.Module, params: Any, image: jax.Array, class_index: int | None = None, layer: str | None = None
) -> GradCam:
    """Grad-CAM heatmap of one image (H, W, C) for `class_index` (default: the predicted class).

    The gradient of the class score (the model head's `score`: the class's logit, or +-z for
    the sigmoid head) with respect to `layer`'s output (default: the last conv layer),
    averaged over positions, weighs that layer's channels; the heatmap is
    ReLU(sum_c w_c A_c) divided by its maximum (all zeros when nothing speaks for the class).
    """
    image = jnp.asarray(image, jnp.float32)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"expected one image (H, W, C), got shape {image.shape}")
    layer = layer or last_conv_layer(model)
    resolve_layers(model, [layer])
    classes = model.head.num_classes
    if class_index is not None and not 0 <= class_index < classes:
        raise ValueError(f"class_index must be in 0..{classes - 1}, got {class_index}")
    index = jnp.int32(-1 if class_index is None else class_index)
    heatmap, c, probability, predicted = jax.device_get(_grad_cam_fn(model, layer)(params, image, index))
    if heatmap.ndim != 2:
        raise ValueError(f"layer {layer} has output shape {heatmap.shape} per image; Grad-CAM needs a (h, w, channels) layer")
    return GradCam(np.asarray(heatmap), int(c), float(probability), int(predicted))


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The heatmap upsampled (bilinear) to the image, coloured with jet, blended: (H, W, 3) in 0..1.

    image: (H, W, 3) or (H, W, 1) in 0..1. The result is (1 - alpha) * image + alpha * colour.
    """
    import matplotlib

    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    height, width = image.shape[:2]
    upsampled = np.asarray(jax.image.resize(jnp.asarray(heatmap, jnp.float32), (height, width), "bilinear"))
    colour = matplotlib.colormaps["jet"](np.clip(upsampled, 0, 1))[..., :3]
    return np.clip((1 - alpha) * image + alpha * colour, 0, 1).astype(np.float32)
