"""The lecture's two convnets as flax.linen modules, with Keras's layer names and default
initialisers.

Both return logits and carry their head (`Softmax`, `Sigmoid`), which owns what the logits mean: the
loss (the numerically stable way), the predicted class, the probabilities Keras's last layer would
output and the class count, so the train step, evaluation and inspection never switch on the kind of
model.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cnnjax import conv_pool
from cnnjax.ops import conv2d_nhwc, max_pool_nhwc

glorot_uniform = nn.initializers.glorot_uniform()
zeros = nn.initializers.zeros
ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
    None: lambda x: x,
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class Softmax:
    """One logit per class: categorical cross-entropy on integer labels (to_categorical implied)."""

    num_classes: int

    def loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    def predict(self, logits: jax.Array) -> jax.Array:
        """The class of each example."""
        return jnp.argmax(logits, axis=-1)

    def correct(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """1.0 where the predicted class is the label, else 0.0."""
        return (self.predict(logits) == labels).astype(jnp.float32)

    def describe(self) -> str:
        return f"softmax over {self.num_classes} units, categorical cross-entropy"

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """(N, num_classes): what Keras's softmax layer outputs."""
        return nn.softmax(logits)

    def score(self, logits: jax.Array, label: jax.Array) -> jax.Array:
        """The pre-softmax score of class `label` (what Grad-CAM differentiates)."""
        return jnp.take_along_axis(logits, jnp.asarray(label).reshape(-1, 1), axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Sigmoid:
    """One logit per example for two classes, z > 0 meaning class 1: binary cross-entropy."""

    num_classes: int = 2

    def loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))

    def predict(self, logits: jax.Array) -> jax.Array:
        return (logits > 0).astype(jnp.int32)

    def correct(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        labels = labels.astype(logits.dtype)  # as the loss takes them: XLA then fuses both alike
        return ((logits > 0).astype(labels.dtype) == labels).astype(jnp.float32)

    def describe(self) -> str:
        return "sigmoid of 1 unit, binary cross-entropy"

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """(N, 2): 1 - sigmoid(z) and sigmoid(z), Keras's sigmoid output being the second."""
        p = nn.sigmoid(logits)
        return jnp.stack([1 - p, p], axis=-1)

    def score(self, logits: jax.Array, label: jax.Array) -> jax.Array:
        """+z for class 1, -z for class 0. The class scores are sigmoid(z) and 1 - sigmoid(z); their
        gradients are +-p(1 - p) dz, a positive factor that Grad-CAM's normalisation cancels, and
        that underflows to 0 in float32 when the model is sure (|z| > ~17): +-z avoids it."""
        return jnp.where(label == 1, logits, -logits)


# Keras-like layers, each a module of its own so that its output is what flax's
# `capture_intermediates` records for it (the activation included, as in Keras) and its parameters
# sit under its name: params["conv2d"].


class Conv2D(nn.Module):
    """Keras's Conv2D ('valid' padding, stride 1), its parameters named and shaped as nn.Conv's.

    The convolution is `cnnjax.ops.conv2d_nhwc`, whose gradient is fast on the CPU too."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    activation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, then_pool: bool = False) -> jax.Array:
        """then_pool: return the 2x2 max pool of the output instead (see `sequential`)."""
        kernel = self.param(
            "kernel", glorot_uniform, (*self.kernel_size, x.shape[-1], self.features)
        )
        bias = self.param("bias", zeros, (self.features,))
        if then_pool and self.activation == "relu" and conv_pool.applies(x.shape, kernel.shape):
            return conv_pool.conv_relu_pool(x, kernel, bias)
        out = ACTIVATIONS[self.activation](conv2d_nhwc(x, kernel) + bias)
        return max_pool_nhwc(out, 2) if then_pool else out


class Dense(nn.Dense):
    """nn.Dense with Keras's default initialisers (a glorot_uniform kernel; nn.Dense's biases are
    zeros already) and an activation."""

    kernel_init: Callable = glorot_uniform
    activation: str | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.activation](super().__call__(x))


class MaxPooling2D(nn.Module):
    """2x2 max pooling, stride 2, 'valid'."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool_nhwc(x, 2)


def sequential(model: nn.Module, layers: list[nn.Module], x: jax.Array, train: bool) -> jax.Array:
    """The layers in turn, as Keras's Sequential runs them.

    In training, where no layer's output is recorded, a Conv2D and the MaxPooling2D after it run
    as one op (cnnjax.conv_pool): the same values, and a gradient that does not write the conv
    layer's whole output. Everywhere else each layer runs on its own, its output reachable by
    what records or intercepts it (`layer_outputs`, Grad-CAM in cnnjax.inspect)."""
    fuse = train and not model.is_mutable_collection("intermediates")
    i = 0
    while i < len(layers):
        pool_next = i + 1 < len(layers) and isinstance(layers[i + 1], MaxPooling2D)
        if fuse and isinstance(layers[i], Conv2D) and pool_next:
            x, i = layers[i](x, then_pool=True), i + 2
        else:
            x, i = layers[i](x), i + 1
    return x


class Dropout(nn.Module):
    """Keras's Dropout: in training, zero each unit with probability `rate` and scale the rest by
    1/(1-rate).

    Each example's mask comes from the step's "dropout" key folded with the example's position in
    the global batch, so masks do not depend on how the batch is split over devices (nn.Dropout
    draws one)."""

    rate: float

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, keep: jax.Array | None = None
    ) -> jax.Array:
        """keep: a grid member's probability of keeping a unit (an array, cnnjax.grid), instead of
        1 - rate; at 1 every unit is kept, unscaled."""
        if not train or (keep is None and self.rate == 0):
            return x
        keep = 1.0 - self.rate if keep is None else keep
        rng = self.make_rng("dropout")
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(x.shape[0]))
        kept = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(keys)
        return jnp.where(kept, x / keep, 0.0)


class Flatten(nn.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1)


class MnistConvNet(nn.Module):
    """The lecture's MNIST convnet: 93,322 parameters. Returns logits for 10 classes."""

    num_classes: int = 10
    input_shape: tuple[int, int, int] = (28, 28, 1)

    @property
    def head(self) -> Softmax:
        return Softmax(self.num_classes)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, dropout_keep: jax.Array | None = None
    ) -> jax.Array:
        del train, dropout_keep  # no dropout here; one calling convention for all models
        x = Conv2D(32, (3, 3), activation="relu", name="conv2d")(x)
        x = MaxPooling2D(name="max_pooling2d")(x)
        x = Conv2D(64, (3, 3), activation="relu", name="conv2d_1")(x)
        x = MaxPooling2D(name="max_pooling2d_1")(x)
        x = Conv2D(64, (3, 3), activation="relu", name="conv2d_2")(x)
        x = Flatten(name="flatten")(x)
        x = Dense(64, activation="relu", name="dense")(x)
        return Dense(self.num_classes, name="dense_1")(x)  # softmax lives in the loss


class CatsDogsConvNet(nn.Module):
    """The lecture's cats-vs-dogs convnet: 3,453,121 parameters. Returns one logit per image for
    two classes (the lecture's sigmoid head), one per class for more (a softmax head, as Keras's
    class_mode="categorical").

    dropout_rate > 0 inserts Dropout after Flatten (the lecture's second experiment)."""

    dropout_rate: float = 0.0
    input_shape: tuple[int, int, int] = (150, 150, 3)
    num_classes: int = 2

    @property
    def head(self) -> Sigmoid | Softmax:
        return Sigmoid() if self.num_classes == 2 else Softmax(self.num_classes)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, dropout_keep: jax.Array | None = None
    ) -> jax.Array:
        """dropout_keep: a grid member's own keep probability for the Dropout layer (Dropout)."""
        convolutions = [
            Conv2D(32, (3, 3), activation="relu", name="conv2d"),
            MaxPooling2D(name="max_pooling2d"),
            Conv2D(64, (3, 3), activation="relu", name="conv2d_1"),
            MaxPooling2D(name="max_pooling2d_1"),
            Conv2D(128, (3, 3), activation="relu", name="conv2d_2"),
            MaxPooling2D(name="max_pooling2d_2"),
            Conv2D(128, (3, 3), activation="relu", name="conv2d_3"),
            MaxPooling2D(name="max_pooling2d_3"),
        ]
        x = sequential(self, convolutions, x, train)
        x = Flatten(name="flatten")(x)
        if self.dropout_rate > 0:
            x = Dropout(self.dropout_rate, name="dropout")(x, train, dropout_keep)
        x = Dense(512, activation="relu", name="dense")(x)
        if self.num_classes == 2:
            return Dense(1, name="dense_1")(x)[:, 0]  # sigmoid lives in the loss
        return Dense(self.num_classes, name="dense_1")(x)  # softmax lives in the loss


MODELS: dict[str, type[nn.Module]] = {"mnist": MnistConvNet, "cats_dogs": CatsDogsConvNet}


def model_config(model: nn.Module) -> dict[str, Any]:
    """A JSON-able description from which `build_model` rebuilds the same architecture."""
    for name, cls in MODELS.items():
        if type(model) is cls:
            fields = {
                f.name: getattr(model, f.name)
                for f in dataclasses.fields(cls)
                if f.name not in ("parent", "name")
            }
            return {"model": name, **fields, "input_shape": list(model.input_shape)}
    raise ValueError(f"unknown model class {type(model).__name__}")


def build_model(config: dict[str, Any]) -> nn.Module:
    """Inverse of `model_config`."""
    config = dict(config)
    name = config.pop("model", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if "input_shape" in config:
        config["input_shape"] = tuple(config["input_shape"])
    return MODELS[name](**config)


def from_config(
    name: str,
    image_size: int,
    dropout: float = 0.0,
    num_classes: int | None = None,
    channels: int = 0,
) -> nn.Module:
    """The model a config's model and data sections describe (see cnnjax.config), for the data's
    class count and image channels (None, 0: the lecture's, 10 digits in grey, 2 classes in RGB)."""
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if name == "mnist":
        return MnistConvNet(num_classes=num_classes or 10, input_shape=(28, 28, channels or 1))
    if name == "cats_dogs":
        shape = (image_size, image_size, channels or 3)
        return CatsDogsConvNet(
            dropout_rate=dropout, input_shape=shape, num_classes=num_classes or 2
        )
    raise ValueError(f"unknown model {name!r}; known: mnist, cats_dogs")


def _fits(model: nn.Module, size: int) -> bool:
    """Whether every layer keeps an output of at least 1 pixel for a size x size input."""
    try:
        shapes = layer_shapes(model.clone(input_shape=(size, size, model.input_shape[2])))
    except Exception:  # noqa: BLE001 - a layer whose output would be empty fails to trace
        return False
    return all(min(out.shape[1:], default=1) >= 1 for out in shapes.values())


@functools.lru_cache(maxsize=16)
def min_input_size(model: nn.Module) -> int:
    """The smallest square input every layer of `model` can take, found by tracing its layers
    (no arithmetic copied from them): 46 for the cats-vs-dogs convnet."""
    if not _fits(model, model.input_shape[0]):
        raise ValueError(
            f"{type(model).__name__} does not fit its own input shape {model.input_shape}"
        )
    sizes = range(1, model.input_shape[0] + 1)  # fitting is monotone in the size
    return sizes[bisect.bisect_left(sizes, True, key=lambda size: _fits(model, size))]


def init_params(model: nn.Module, rng: jax.Array) -> Any:
    """Parameters for one example of the model's input shape."""
    dummy = jnp.zeros((1, *model.input_shape), jnp.float32)
    return model.init(rng, dummy)["params"]


def predict(model: nn.Module, params: Any, images: jax.Array) -> jax.Array:
    """Class probabilities (N, num_classes), from what Keras's softmax / sigmoid output layer
    gives."""
    return model.head.probabilities(model.apply({"params": params}, images))


def layer_outputs(
    model: nn.Module, params: Any, images: jax.Array, train: bool = False, rngs: Any = None
) -> dict[str, jax.Array]:
    """Every layer's output by Keras name, in the order the layers run, and the model's own under
    "output"."""
    output, state = model.apply(
        {"params": params},
        images,
        train=train,
        rngs=rngs,
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    captured = state["intermediates"]
    # [-1]: the layer's outermost call. Dense runs nn.Dense.__call__ inside its own __call__,
    # so flax records the pre-activation value first and the layer's output last.
    layers = {name: value["__call__"][-1] for name, value in captured.items() if name != "__call__"}
    return {**layers, "output": output}


def layer_shapes(model: nn.Module, params: Any | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """`layer_outputs` for one example, traced (nothing computed), in the order the layers run.

    The order is read while tracing: jax sorts dict keys in traced outputs."""
    if params is None:
        params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    names: list[str] = []

    def trace(params, x):
        outputs = layer_outputs(model, params, x)
        names.extend(outputs)
        return outputs

    outputs = jax.eval_shape(
        trace, params, jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
    )
    return {name: outputs[name] for name in names}


def layer_names(model: nn.Module) -> list[str]:
    """The Keras layer names in the order the layers run (dropout included when present)."""
    return [name for name in layer_shapes(model) if name != "output"]


# Keras names a layer after its class in snake case; these two classes are not the CamelCase of
# their names.
LAYER_TYPES = {"conv2d": "Conv2D", "max_pooling2d": "MaxPooling2D"}


def layer_type(name: str) -> str:
    """Keras's class name for a layer name ("conv2d_1" -> "Conv2D",
    "layer_normalization" -> "LayerNormalization")."""
    prefix = name.rstrip("0123456789").rstrip("_")
    return LAYER_TYPES.get(prefix) or "".join(
        word[:1].upper() + word[1:] for word in prefix.split("_")
    )


def summary(model: nn.Module, params: Any | None = None) -> str:
    """The Keras `model.summary()` table: layer (type), output shape with None batch, params (shapes
    traced, nothing computed)."""
    if params is None:
        params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    rows = []
    for name, output in layer_shapes(model, params).items():
        if name != "output":
            count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params.get(name, {})))
            shape = "(None, " + ", ".join(str(d) for d in output.shape[1:]) + ")"
            rows.append((f"{name} ({layer_type(name)})", shape, str(count)))
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    widths = (max(29, max(len(r[0]) for r in rows) + 1), 26, 10)
    line = lambda cells: "".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    rule = sum(widths)
    out = [
        f'Model: "{type(model).__name__}"',
        "_" * rule,
        line(("Layer (type)", "Output Shape", "Param #")),
        "=" * rule,
    ]
    for i, row in enumerate(rows):
        out.append(line(row))
        out.append("=" * rule if i == len(rows) - 1 else "")
    out += [
        f"Total params: {total:,}",
        f"Trainable params: {total:,}",
        "Non-trainable params: 0",
        "_" * rule,
    ]
    return "\n".join(out)
