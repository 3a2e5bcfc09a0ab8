"""The lecture's operations, written to be read: convolution, padding, stride, max pooling.

These are the teaching versions. They work on one image (no batch axis), loop over the
kernel's taps in Python, and reproduce the worked examples of the lecture (SPEC.md
section 1). The models run the same arithmetic through XLA (`conv2d_nhwc`,
`max_pool_nhwc` below); the tests check that both agree.

"Convolution" here is what deep learning means by it: cross-correlation, the kernel is
not flipped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Padding = str  # "valid" or "same"


def same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """Zeros to add before and after one axis for Keras/TF "same" padding.

    The output has ceil(size / stride) positions; when the padding needed is odd the
    extra row/column goes after (bottom/right), as TensorFlow does.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def _check_padding(padding: str) -> str:
    padding = padding.lower()
    if padding not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    return padding


def conv2d(
    x: jax.Array, kernel: jax.Array, stride: int = 1, padding: Padding = "valid"
) -> jax.Array:
    """Cross-correlate one image with one or more filters.

    x: (H, W) or (H, W, C_in). kernel: (kh, kw) or (kh, kw, C_in, C_out).
    Returns (H', W') for a 2-D kernel, else (H', W', C_out): each filter's per-channel
    results are summed into one feature map.
    """
    padding = _check_padding(padding)
    x = jnp.asarray(x)
    kernel = jnp.asarray(kernel)
    single_filter = kernel.ndim == 2
    if x.ndim == 2:
        x = x[:, :, None]
    if single_filter:
        if x.shape[2] != 1:
            raise ValueError("a 2-D kernel needs a 2-D (single-channel) input")
        kernel = kernel[:, :, None, None]
    if x.ndim != 3 or kernel.ndim != 4:
        raise ValueError(f"x must be (H, W[, C]) and kernel (kh, kw[, C_in, C_out]); got {x.shape}, {kernel.shape}")
    kh, kw, c_in, _ = kernel.shape
    if x.shape[2] != c_in:
        raise ValueError(f"input has {x.shape[2]} channels but the kernel expects {c_in}")

    if padding == "same":
        pad_h = same_padding(x.shape[0], kh, stride)
        pad_w = same_padding(x.shape[1], kw, stride)
        x = jnp.pad(x, (pad_h, pad_w, (0, 0)))  # the "ring of zeros"
    out_h = (x.shape[0] - kh) // stride + 1
    out_w = (x.shape[1] - kw) // stride + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"a {kh}x{kw} kernel does not fit in a {x.shape[0]}x{x.shape[1]} input")

    # Slide the window: for each tap (i, j) of the kernel, the input pixels it meets at
    # every output position form a strided slice; weight them and add them up.
    out = jnp.zeros((out_h, out_w, kernel.shape[3]), jnp.result_type(x, kernel))
    for i in range(kh):
        for j in range(kw):
            patch = x[i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride]
            out = out + patch @ kernel[i, j]  # (H', W', C_in) @ (C_in, C_out): sum over channels
    return out[:, :, 0] if single_filter else out


def max_pool(
    x: jax.Array, window: int = 2, stride: int | None = None, padding: Padding = "valid"
) -> jax.Array:
    """Max pooling of one image, (H, W) or (H, W, C). stride defaults to the window.

    "same" padding pads the bottom/right with -inf, as Keras does, so a border row or
    column that does not fill a window is still pooled.
    """
    padding = _check_padding(padding)
    stride = window if stride is None else stride
    x = jnp.asarray(x)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[:, :, None]
    if padding == "same":
        pad_h = same_padding(x.shape[0], window, stride)
        pad_w = same_padding(x.shape[1], window, stride)
        x = jnp.pad(x, (pad_h, pad_w, (0, 0)), constant_values=-jnp.inf)
    out_h = (x.shape[0] - window) // stride + 1
    out_w = (x.shape[1] - window) // stride + 1
    out = jnp.full((out_h, out_w, x.shape[2]), -jnp.inf, x.dtype)
    for i in range(window):
        for j in range(window):
            patch = x[i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride]
            out = jnp.maximum(out, patch)
    return out[:, :, 0] if squeeze else out


# --- What the models run: the same operations, batched (N, H, W, C), through XLA. ---


def conv2d_nhwc(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: Padding = "valid") -> jax.Array:
    """Batched convolution with jax.lax; kernel (kh, kw, C_in, C_out), as flax stores it."""
    padding = _check_padding(padding)
    if jax.default_backend() == "cpu" and stride == 1 and padding == "valid":
        return _conv_valid_fast_kernel_grad(x, kernel)
    return _lax_conv(x, kernel, stride, padding)


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "valid") -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding.upper(), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@jax.custom_vjp
def _conv_valid_fast_kernel_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 'valid' convolution whose kernel gradient is nine plain matrix products.

    On the CPU, XLA computes the kernel gradient of a convolution as another
    convolution that runs 2.5-3x slower than the same sums written as one matrix product
    per kernel tap (benchmarks/conv_grad.py). The forward pass and the input gradient
    stay with XLA's convolution, which is fast for them.
    """
    return _lax_conv(x, kernel)


def _conv_fwd(x, kernel):
    return _lax_conv(x, kernel), (x, kernel)


def _conv_bwd(residuals, dy):
    x, kernel = residuals
    kh, kw, c_in, c_out = kernel.shape
    _, oh, ow, _ = dy.shape
    # dK[i, j] = sum over batch and positions of x[n, y+i, x+j, :]^T dy[n, y, x, :]
    taps = jnp.stack([x[:, i : i + oh, j : j + ow, :] for i in range(kh) for j in range(kw)])
    d_kernel = jnp.einsum("tnhwc,nhwd->tcd", taps, dy).reshape(kernel.shape)
    _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, kernel), x)
    return input_vjp(dy)[0], d_kernel


_conv_valid_fast_kernel_grad.defvjp(_conv_fwd, _conv_bwd)


def max_pool_nhwc(x: jax.Array, window: int = 2) -> jax.Array:
    """Non-overlapping max pooling (stride = window, "valid") as a reshape and a max.

    Same result as `nn.max_pool(x, (w, w), (w, w))`, but its gradient is a plain
    compare-and-select instead of XLA's select_and_scatter, which on the CPU made one
    MNIST training step about 2.5x slower (measured: benchmarks/pool_grad.py).
    """
    n, h, w, c = x.shape
    oh, ow = h // window, w // window
    x = x[:, : oh * window, : ow * window, :]  # "valid": drop the border that fills no window
    return x.reshape(n, oh, window, ow, window, c).max(axis=(2, 4))
