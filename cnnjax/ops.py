"""The lecture's operations, written to be read: convolution, padding, stride, max pooling.

`conv2d` and `max_pool` work on one image, loop over the window's taps in Python and
reproduce the lecture's worked examples (SPEC.md section 1). The models run the same
arithmetic batched through XLA (`conv2d_nhwc`, `max_pool_nhwc`); the tests check that both
agree. "Convolution" means cross-correlation, as in deep learning: the kernel is not flipped.
"""

from __future__ import annotations

import math
from functools import partial, reduce

import jax
import jax.numpy as jnp

from cnnjax import cpu_conv


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


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "valid") -> jax.Array:
    """Cross-correlate one image with one or more filters.

    x: (H, W) or (H, W, C_in). kernel: (kh, kw) or (kh, kw, C_in, C_out).
    Returns (H', W') for a 2-D kernel, else (H', W', C_out): each filter's per-channel
    results are summed into one feature map.
    """
    padding = _check_padding(padding)
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    single_filter = kernel.ndim == 2
    if x.ndim == 2:
        x = x[:, :, None]
    if single_filter:
        if x.shape[2] != 1:
            raise ValueError("a 2-D kernel needs a 2-D (single-channel) input")
        kernel = kernel[:, :, None, None]
    if x.ndim != 3 or kernel.ndim != 4:
        raise ValueError(
            f"x must be (H, W[, C]) and kernel (kh, kw[, C_in, C_out]); "
            f"got {x.shape}, {kernel.shape}"
        )
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
            patch = x[
                i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride
            ]
            out = out + patch @ kernel[i, j]  # (H', W', C_in) @ (C_in, C_out): sum over channels
    return out[:, :, 0] if single_filter else out


def max_pool(
    x: jax.Array, window: int = 2, stride: int | None = None, padding: str = "valid"
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
            patch = x[
                i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride
            ]
            out = jnp.maximum(out, patch)
    return out[:, :, 0] if squeeze else out


# --- What the models run: the same operations, batched (N, H, W, C), through XLA. ---
#
# On the CPU a stride-1 "valid" convolution runs each pass by the faster of two routes for its
# shape (cnnjax/cpu_conv.py); elsewhere it is plain `lax.conv_general_dilated` (cuDNN on a GPU).


def conv2d_nhwc(
    x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "valid"
) -> jax.Array:
    """Batched convolution, (N, H, W, C_in) with kernel (kh, kw, C_in, C_out) as flax stores it."""
    padding = _check_padding(padding)
    if jax.default_backend() == "cpu" and stride == 1 and padding == "valid":
        return cpu_conv.valid_conv(x, kernel)
    return _lax_conv(x, kernel, stride, padding)


def _lax_conv(
    x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "valid"
) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding.upper(), dimension_numbers=cpu_conv.NHWC
    )


def max_pool_nhwc(x: jax.Array, window: int = 2) -> jax.Array:
    """Non-overlapping max pooling (stride = window, "valid") as a reshape and a max.

    Same result as `nn.max_pool(x, (w, w), (w, w))`, but its gradient is a compare-and-select
    (ties share it), not XLA's select_and_scatter, which made an MNIST step on the CPU several
    times slower. On the CPU `_max_pool` writes both on the window's strided views, which
    XLA:CPU fuses better.
    """
    if jax.default_backend() == "cpu":
        return _max_pool(x, window)
    n, h, w, c = x.shape
    oh, ow = h // window, w // window
    x = x[:, : oh * window, : ow * window, :]  # "valid": drop the border that fills no window
    return x.reshape(n, oh, window, ow, window, c).max(axis=(2, 4))


def pool_views(x: jax.Array, window: int) -> list[jax.Array]:
    """x[:, a::w, b::w, :] for each (a, b) of the window, cropped to whole windows ("valid")."""
    oh, ow = x.shape[1] // window, x.shape[2] // window
    x = x[:, : oh * window, : ow * window, :]
    return [x[:, a::window, b::window, :] for a in range(window) for b in range(window)]


def _max_pool_forward(x: jax.Array, window: int) -> jax.Array:
    return reduce(
        jnp.maximum, pool_views(x, window)
    )  # elementwise: XLA fuses it with the ReLU before


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, window: int) -> jax.Array:
    return _max_pool_forward(x, window)


def _max_pool_fwd(x, window):
    y = _max_pool_forward(x, window)
    return y, (x, y)


def _max_pool_bwd(window, residuals, dy):
    """Bitwise the gradient jax derives for reshape-and-max, ties included: each position
    equal to its window's max gets dy / (number of such positions in the window), the rest 0.

    Written on the strided views rather than a (N, oh, w, ow, w, C) reshape: XLA fuses them
    into fewer passes, measured markedly faster for ReLU + pool, forward and gradient.
    """
    x, y = residuals
    hits = [(view == y).astype(dy.dtype) for view in pool_views(x, window)]
    share = dy / sum(hits)  # ties share the gradient, as jax's reduce-max rule does
    return (from_window_parts([hit * share for hit in hits], window, x.shape),)


def from_window_parts(parts: list[jax.Array], window: int, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of `pool_views`: the (N, oh, ow, C) parts, in window order (a, b), interleaved
    into one (N, H, W, C) array of `shape`, zero on the border "valid" pooling dropped."""
    n, oh, ow, c = parts[0].shape
    rows = [jnp.stack(parts[a * window : (a + 1) * window], axis=3) for a in range(window)]
    out = jnp.stack(rows, axis=2).reshape(n, oh * window, ow * window, c)
    border = ((0, 0), (0, shape[1] - oh * window), (0, shape[2] - ow * window), (0, 0))
    return out if out.shape == tuple(shape) else jnp.pad(out, border)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
