"""Looking inside a trained convnet: activations, filter patterns, Grad-CAM; what it gets right.

`capture_activations` is the lecture's activation model (SPEC.md section 4) and
`activation_grid` lays the channels out as its plotting loop does. Beyond the lecture, the
book's same chapter: `filter_ascent` (the input each filter responds to most) and
`grad_cam` (Selvaraju et al. 2017). Each computation is one jitted function kept in an
lru_cache per model (and layer): flax modules are frozen dataclasses, hence hashable keys.
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
from cnnjax.step import preprocess

LayerSpec = int | Sequence[str] | None


def load_image(
    path: str | os.PathLike,
    size: tuple[int, int],
    channels: int = 3,
    interpolation: str = "nearest",
) -> np.ndarray:
    """One image file as float32 (h, w, channels) in 0..1, as Keras's load_img + img_to_array / 255.

    Decoded as the folder loader decodes training images (`interpolation` is the run's
    data.interpolation; nearest is load_img's default). Raises OSError when unreadable.
    """
    from cnnjax.data import decode_file

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return (
        decode_file(path, size, interpolation, "L" if channels == 1 else "RGB").astype(np.float32)
        / 255.0
    )


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
            raise ValueError(
                f"layers={layers}: the model has {len(names)} layers ({', '.join(names)})"
            )
        return names[:layers]
    if isinstance(layers, str):  # a single name would otherwise be read letter by letter
        layers = [layers]
    unknown = [name for name in layers if name not in names and name != "output"]
    if unknown:
        raise ValueError(
            f"unknown layer(s) {', '.join(unknown)}; the model's layers: {', '.join(names)}"
        )
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
    """(layer name, output) for the chosen layers, in the order they run: the lecture's activation
    model.

    images: (N, H, W, C) in 0..1, or one image (H, W, C), whose outputs then have no batch
    axis either. "output" names the model's own output (logits).
    """
    images = jnp.asarray(images, jnp.float32)
    single = images.ndim == 3
    names = resolve_layers(model, layers)
    outputs = _activations_fn(model, tuple(names))(params, images[None] if single else images)
    return [(name, out[0] if single else out) for name, out in zip(names, outputs, strict=True)]


def normalise_channel(x: np.ndarray) -> np.ndarray:
    """One channel as the lecture shows it: (x - mean) / std * 64 + 128, clipped to 0..255, uint8.

    A constant channel (a dead ReLU filter) is flat grey (128), where the lecture's code
    would divide by zero and draw NaNs.
    """
    x = np.asarray(x, np.float64)
    if x.size == 0 or np.ptp(x) == 0:  # ptp, not std == 0: a float sum can leave std a hair above 0
        return np.full(x.shape, 128, np.uint8)
    x = (x - x.mean()) / x.std() * 64 + 128
    return np.clip(x, 0, 255).astype(np.uint8)


def activation_grid(activation: np.ndarray, images_per_row: int = 16) -> np.ndarray:
    """All channels of one activation (H, W, C) as one uint8 image, `images_per_row` per row.

    Channel c is tile (c // images_per_row, c % images_per_row); missing tiles are 0. The grid
    has ceil(C / images_per_row) rows, where the lecture's C // images_per_row drops a partial row.
    """
    activation = np.asarray(activation)
    if activation.ndim != 3:
        raise ValueError(f"expected an activation (H, W, C), got shape {activation.shape}")
    height, width, channels = activation.shape
    rows = math.ceil(channels / images_per_row)
    grid = np.zeros((rows * height, images_per_row * width), np.uint8)
    for c in range(channels):
        row, col = divmod(c, images_per_row)
        grid[row * height : (row + 1) * height, col * width : (col + 1) * width] = (
            normalise_channel(activation[..., c])
        )
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
    """Each image (H, W, C), alone or in a batch, made viewable as the book does:
    x -= mean; x /= std + 1e-5; x *= 0.1; x += 0.5; clip."""
    x = np.asarray(x, np.float32)
    axes = tuple(range(x.ndim - 3, x.ndim))
    x = x - x.mean(axis=axes, keepdims=True)
    x = x / (x.std(axis=axes, keepdims=True) + 1e-5)
    return np.clip(x * 0.1 + 0.5, 0, 1)


def pre_activation(model: nn.Module, params: Any, images: jax.Array, layer: str) -> jax.Array:
    """`layer`'s output before its ReLU: relu(pre_activation(...)) is the layer's output.

    A max pooling layer pools the pre-activation of the conv before it (max and ReLU
    commute); layers without a ReLU give their output. Assumes the layers of `cnnjax.models`.
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
            g = g / (
                jnp.sqrt(jnp.mean(g**2)) + 1e-5
            )  # normalised step: the same pace for every filter
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
) -> FilterAscent:
    """Gradient ascent on the mean activation of each chosen filter of `layer` (None = all, N = the
    first N, or indices).

    Each starts from grey (0.5) plus its own seeded uniform noise in +-0.05 and takes `steps`
    steps of `step_size` along the gradient of its mean before the ReLU, normalised by its
    root mean square; `before` and `after` report the mean activation after the ReLU.
    """
    resolve_layers(model, [layer])
    available = models.layer_shapes(model, params)[layer].shape[-1]
    if filters is None:
        chosen = np.arange(available)
    elif isinstance(filters, int):
        chosen = np.arange(min(filters, available))
    else:
        chosen = np.asarray(list(filters), np.int32)
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= available:
        raise ValueError(
            f"filters must be indices in 0..{available - 1} of {layer}, got {list(chosen)}"
        )
    noise = jax.random.uniform(
        jax.random.PRNGKey(seed), (len(chosen), *model.input_shape), minval=-0.05, maxval=0.05
    )
    images, before, after = _ascent_fn(model, layer, int(steps))(
        params, 0.5 + noise, jnp.asarray(chosen, jnp.int32), step_size
    )
    return FilterAscent(layer, chosen, *jax.device_get((images, before, after)))


# --- Grad-CAM --------------------------------------------------------------------------------


class GradCam(NamedTuple):
    heatmap: np.ndarray  # (h, w) in 0..1, at the resolution of the layer's output
    class_index: int  # the class explained
    probability: float  # the model's probability for that class (softmax, or sigmoid / 1 - sigmoid)
    predicted: int  # the class the model predicts


def last_conv_layer(model: nn.Module) -> str:
    """The name of the model's last conv2d layer, the one Grad-CAM looks at."""
    names = [name for name in _layer_names(model) if name.startswith("conv2d")]
    if not names:
        raise ValueError(f"{type(model).__name__} has no conv2d layer")
    return names[-1]


def _add_to_output(layer: str, delta: jax.Array, captured: list):
    """A flax method interceptor that adds `delta` to the output of the child module `layer`
    and keeps that output in `captured`: the gradient with respect to delta (at 0) is the
    gradient with respect to the layer's output."""
    depth = [0]

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        # Only the model's own child of that name (the root module's parent is a flax Scope).
        parent = module.parent
        is_layer = (
            module.name == layer
            and isinstance(parent, nn.Module)
            and not isinstance(parent.parent, nn.Module)
        )
        if context.method_name != "__call__" or not is_layer:
            return next_fun(*args, **kwargs)
        # a layer that calls its base class's __call__ is intercepted twice: add once, outermost
        depth[0] += 1
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

        grads, (activation, c, probability, predicted) = jax.grad(target, has_aux=True)(
            jnp.zeros(shape, jnp.float32)
        )
        weights = jnp.mean(
            grads[0], axis=(0, 1)
        )  # one weight per channel: the gradient averaged over positions
        cam = jax.nn.relu(jnp.sum(activation[0] * weights, axis=-1))
        peak = jnp.max(cam)
        heatmap = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
        return heatmap, c, probability, predicted

    return jax.jit(run)


def grad_cam(
    model: nn.Module, params: Any, image: jax.Array, class_index: int | None = None
) -> GradCam:
    """Grad-CAM heatmap of one image (H, W, C) for `class_index` (default: the predicted class).

    The gradient of the class score (the head's `score`) with respect to the last conv
    layer's output, averaged over positions, weighs its channels: the heatmap is
    ReLU(sum_c w_c A_c) over its maximum (all zeros when nothing speaks for the class).
    """
    image = jnp.asarray(image, jnp.float32)
    if image.ndim != 3:
        raise ValueError(f"expected one image (H, W, C), got shape {image.shape}")
    classes = model.head.num_classes
    if class_index is not None and not 0 <= class_index < classes:
        raise ValueError(f"class_index must be in 0..{classes - 1}, got {class_index}")
    index = jnp.int32(-1 if class_index is None else class_index)
    heatmap, c, probability, predicted = jax.device_get(
        _grad_cam_fn(model, last_conv_layer(model))(params, image, index)
    )
    return GradCam(np.asarray(heatmap), int(c), float(probability), int(predicted))


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The heatmap upsampled (bilinear) to the image (H, W, 3 or 1; 0..1) and coloured with jet:
    (1 - alpha) * image + alpha * colour."""
    import matplotlib

    image = np.asarray(image, np.float32)
    upsampled = np.asarray(
        jax.image.resize(jnp.asarray(heatmap, jnp.float32), image.shape[:2], "bilinear")
    )
    colour = matplotlib.colormaps["jet"](np.clip(upsampled, 0, 1))[..., :3]
    return np.clip((1 - alpha) * image + alpha * colour, 0, 1).astype(
        np.float32
    )  # a gray image broadcasts to 3 channels


# --- What a classifier gets right: predictions and the confusion matrix ------------------------


@functools.lru_cache(maxsize=16)
def _classes_fn(model: nn.Module):
    # uint8 pixels preprocessed as training's evaluation step does (/ 255, no augmentation)
    return jax.jit(
        lambda params, pixels: model.head.predict(
            model.apply({"params": params}, preprocess(pixels), train=False)
        )
    )


def predicted_classes(model: nn.Module, params: Any, dataset: Any, batch_size: int) -> np.ndarray:
    """The class the model predicts for every image of `dataset` (in memory or a stream), int
    (N,), in the dataset's order; one compiled batch shape, the last batch padded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = min(batch_size, max(len(dataset), 1))  # a small set: no batch of padding
    held = getattr(dataset, "images", None)  # Images: slices; a Stream decodes image by image
    fn, out = _classes_fn(model), []
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        pixels = (
            held[start:stop]
            if held is not None
            else np.stack([dataset.image(i) for i in range(start, stop)])
        )
        padded = np.zeros((batch_size, *pixels.shape[1:]), pixels.dtype)
        padded[: len(pixels)] = pixels
        out.append(np.asarray(jax.device_get(fn(params, padded)))[: len(pixels)])
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def confusion_matrix(
    labels: Sequence[int], predicted: Sequence[int], num_classes: int
) -> np.ndarray:
    """Counts (num_classes, num_classes), int64: row = true class, column = predicted class. Its
    sum is the number of examples; its diagonal, those classified right."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    if labels.shape != predicted.shape or labels.ndim != 1:
        raise ValueError(
            f"labels and predictions must be two (N,) arrays, got {labels.shape}, {predicted.shape}"
        )
    if len(labels) and (
        min(labels.min(), predicted.min()) < 0 or max(labels.max(), predicted.max()) >= num_classes
    ):
        raise ValueError(f"classes must be in 0..{num_classes - 1}")
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix
