"""A ReLU convolution and the 2x2 max pool after it as one op on the CPU, for its gradient's sake.

Layer by layer, the backward pass writes the convolution's whole output gradient, four times the
size of the pooled map, and reads it back for the kernel gradient: at the cats convnet's first
layer, 56 MB per step each way, which costs more than the convolution's arithmetic. Here the
forward pass keeps the pooled map and which of each window's four positions held its maximum
(a bitmask, one byte per pooled value), and the backward pass rebuilds the output gradient from
them. At the first layer it may do so one image at a time, inside the loop that contracts it
with the image's patches, so that the whole gradient is never written: one more route for
cnnjax.routes to time against the other.

Same values as `max_pool_nhwc(relu(conv2d_nhwc(x, kernel) + bias))` and the same gradient, ties
included (each position equal to its window's maximum takes an equal share); only the float sums
of the kernel and bias gradients may run in another order.

cnnjax.models takes it in training only (`models.sequential`): a layer's own output must stay
reachable for what inspects it, and Grad-CAM (cnnjax.inspect) intercepts the last conv layer's
call and adds to its output, which this op, returning the pooled map, does not have.
"""

from __future__ import annotations

from functools import reduce

import jax
import jax.numpy as jnp

from cnnjax import cpu_conv, ops

WINDOW = 2  # the models' pool: 2x2, stride 2, "valid"
# bit o of the mask: offset (a, b) of the window, in the order of ops.pool_views
_OFFSETS = [(a, b) for a in range(WINDOW) for b in range(WINDOW)]


def _window_views(z: jax.Array) -> list[jax.Array]:
    """z[:, a::2, b::2, :] for each offset (a, b), cropped to whole windows ("valid").

    ops.pool_views holds the same elements, but its crop-then-stride slicing made XLA fuse the
    first layer's sum of taps otherwise, and the pooled values differed from the layers' own in
    the last bit (tests/test_conv_pool.py)."""
    height, width = WINDOW * (z.shape[1] // WINDOW), WINDOW * (z.shape[2] // WINDOW)
    return [z[:, a:height:WINDOW, b:width:WINDOW, :] for a, b in _OFFSETS]


def _pooled_and_hits(x: jax.Array, kernel: jax.Array, bias: jax.Array):
    """The pooled ReLU output and the bitmask of each window's maximal positions."""
    biased = [view + bias for view in _window_views(cpu_conv.forward(x, kernel))]
    top = reduce(jnp.maximum, biased)
    # ReLU is monotone, so it commutes with the max: pool(relu(z)) == relu(pool(z)), bitwise.
    hits = sum((view == top).astype(jnp.uint8) << o for o, view in enumerate(biased))
    return jax.nn.relu(top), hits


@jax.custom_vjp
def conv_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """max_pool(relu(valid_conv(x, kernel) + bias)), 2x2, on the CPU's convolution routes."""
    return _pooled_and_hits(x, kernel, bias)[0]


def _fwd(x, kernel, bias):
    pooled, hits = _pooled_and_hits(x.value, kernel.value, bias.value)
    return pooled, (x.value, kernel.value, pooled, hits, x.perturbed)


def _shares(pooled: jax.Array, hits: jax.Array, d_pooled: jax.Array) -> list[jax.Array]:
    """The gradient at each window offset: d_pooled shared among the window's maximal positions,
    none where the ReLU was off (jax's rules for reduce-max and ReLU)."""
    bits = [((hits >> o) & 1).astype(d_pooled.dtype) for o in range(len(_OFFSETS))]
    share = jnp.where(pooled > 0, d_pooled, 0.0) / sum(bits)
    return [bit * share for bit in bits]


def _output_grad(x, kernel, pooled, hits, d_pooled) -> jax.Array:
    """The convolution's output gradient, (N, oh, ow, C_out), zero on the border no window
    covered."""
    oh, ow = x.shape[1] - kernel.shape[0] + 1, x.shape[2] - kernel.shape[1] + 1
    shape = (x.shape[0], oh, ow, kernel.shape[3])
    return ops.from_window_parts(_shares(pooled, hits, d_pooled), WINDOW, shape)


def _grads_whole(x, kernel, pooled, hits, d_pooled):
    """(d_kernel, d_bias) from the whole output gradient, written once, on the kernel gradient's
    own routes."""
    dz = _output_grad(x, kernel, pooled, hits, d_pooled)
    return _packed(cpu_conv.kernel_grad(x, dz), dz.sum(axis=(0, 1, 2)))


def _packed(d_kernel: jax.Array, d_bias: jax.Array) -> jax.Array:
    """Both gradients as one (kh*kw*C_in + 1, C_out) array, the bias's last: one output for the
    seeds' vmap rule."""
    return jnp.concatenate([d_kernel.reshape(-1, d_bias.shape[0]), d_bias[None]])


def _grads_by_image(x, kernel, pooled, hits, d_pooled):
    """(d_kernel, d_bias) one image at a time, each window offset's share contracted with the
    patches at that offset (taps stacked on the leading axis): no whole gradient is written."""
    kh, kw, c_in = kernel.shape[:3]
    taps = [(i, j, c) for i in range(kh) for j in range(kw) for c in range(c_in)]
    ph, pw, c_out = d_pooled.shape[1:]

    def add_image(sums, image):
        xi, pooled_i, hits_i, d_i = image
        d_kernel, d_bias = sums
        for (a, b), share in zip(_OFFSETS, _shares(pooled_i, hits_i, d_i)):
            rows = [
                xi[a + i : a + i + WINDOW * ph : WINDOW, b + j : b + j + WINDOW * pw : WINDOW, c]
                for i, j, c in taps
            ]
            patches_t = jnp.stack([row.reshape(-1) for row in rows])  # (taps, ph*pw)
            share = share.reshape(ph * pw, c_out)
            d_kernel, d_bias = d_kernel + patches_t @ share, d_bias + share.sum(axis=0)
        return (d_kernel, d_bias), None

    zeros = (jnp.zeros((len(taps), c_out), d_pooled.dtype), jnp.zeros(c_out, d_pooled.dtype))
    (d_kernel, d_bias), _ = jax.lax.scan(add_image, zeros, (x, pooled, hits, d_pooled))
    return _packed(d_kernel, d_bias)


# Below about this size the output gradient stays near the cache and the layers on their own were
# as fast or faster inside the training step: MNIST's first layer (5.5 MB) measured slower with
# the op, the cats convnet's (56 MB) faster (benchmarks/conv_layers.py for the whole steps).
_MIN_OUTPUT_BYTES = 16 << 20


def pays(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> bool:
    """Whether a layer is worth the op: one with few taps (kh*kw*C_in, as a first layer), whose
    convolution is cheap beside the traffic of its output gradient, and a large output. At the
    layers after the first the op measured no faster than the layers on their own."""
    kh, kw, c_in, c_out = kernel_shape
    n, h, w, _ = x_shape
    output_bytes = n * (h - kh + 1) * (w - kw + 1) * c_out * 4
    return kh * kw * c_in <= cpu_conv.DIRECT_MAX_TAPS and output_bytes >= _MIN_OUTPUT_BYTES


def applies(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> bool:
    """Whether a ReLU conv layer followed by the pool should run as this op: on the CPU, where it
    `pays`; elsewhere (cuDNN) the layers on their own."""
    return jax.default_backend() == "cpu" and pays(x_shape, kernel_shape)


def _grad_routes(*_) -> dict:
    return {"whole": _grads_whole, "by_image": _grads_by_image}


_grads = cpu_conv.seed_loop_under_vmap(
    cpu_conv.routed("conv_relu_pool_grad", _grad_routes),
    n_axis_args=(0, 2, 3, 4),
    output_has_n_axis=False,
)


def _bwd(residuals, d_pooled):
    x, kernel, pooled, hits, x_perturbed = residuals
    if isinstance(d_pooled, jax.custom_derivatives.SymbolicZero):
        d_pooled = jnp.zeros(d_pooled.shape, d_pooled.dtype)
    if not x_perturbed:
        packed = _grads(x, kernel, pooled, hits, d_pooled)
        return None, packed[:-1].reshape(kernel.shape), packed[-1]
    dz = _output_grad(x, kernel, pooled, hits, d_pooled)
    d_input = cpu_conv.input_grad(dz, kernel)
    return d_input, cpu_conv.kernel_grad(x, dz), dz.sum(axis=(0, 1, 2))


conv_relu_pool.defvjp(_fwd, _bwd, symbolic_zeros=True)
