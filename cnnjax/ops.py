"""The lecture's operations, written to be read: convolution, padding, stride, max pooling.

`conv2d` and `max_pool` work on one image, loop over the window's taps in Python and
reproduce the lecture's worked examples (SPEC.md section 1). The models run the same
arithmetic batched through XLA (`conv2d_nhwc`, `max_pool_nhwc`); the tests check that both
agree. "Convolution" means cross-correlation, as in deep learning: the kernel is not flipped.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from functools import partial, reduce

import jax
import jax.numpy as jnp


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
# On the CPU a stride-1 "valid" convolution is routed by hand, pass by pass; elsewhere it is
# plain `lax.conv_general_dilated`. Same sums, in another order (float32 rounding aside).
# Why: XLA:CPU (jaxlib 0.10) hands a convolution to YNNPACK when YNNPACK supports it, else to
# Eigen, and on this 2-core AVX2 machine that choice is often the slow one:
# - YNNPACK's kernel gradient (x correlated with dy as the window) is several times slower
#   than Eigen's at every layer of both models, its forward pass too for the larger layers.
#   YNNPACK refuses a convolution whose window or output is larger than its input, so
#   padding the input (forward) or the window (kernel gradient) with kh zeros on one axis,
#   and slicing the extra away, moves the same sums to Eigen at the price of kh rows of
#   zeros: worth it while they are a small part of the layer (`_EIGEN_MAX_WASTE`).
# - The input gradient's output is larger than its input: it goes to Eigen by itself.
# - With 1-3 input channels (the first layer), 9-27 multiply-adds per output are too few
#   for either library to amortise its call: fused multiply-adds (forward) and small matrix
#   products image by image (kernel gradient) beat both.
# benchmarks/conv_grad.py prints the figures behind each choice; rerun it when jaxlib
# changes, since the libraries and XLA's choice between them do.

_NHWC = ("NHWC", "HWIO", "NHWC")  # dimension numbers: channels last, kernels as flax stores them
_DIRECT_MAX_TAPS = 27  # kh * kw * C_in up to this: forward as a fused sum of taps (3x3x3)
_EIGEN_MAX_WASTE = 0.3  # zero rows / useful rows up to this: pad to reach Eigen


def conv2d_nhwc(
    x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "valid"
) -> jax.Array:
    """Batched convolution, (N, H, W, C_in) with kernel (kh, kw, C_in, C_out) as flax stores it."""
    padding = _check_padding(padding)
    if jax.default_backend() == "cpu" and stride == 1 and padding == "valid":
        return _conv_valid_fast_kernel_grad(x, kernel)
    return _lax_conv(x, kernel, stride, padding)


def _lax_conv(
    x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "valid"
) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding.upper(), dimension_numbers=_NHWC
    )


@jax.custom_vjp
def _conv_valid_fast_kernel_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 'valid' convolution whose passes each take the CPU route the layer's shape
    picks."""
    return _forward(x, kernel)


def _conv_fwd(x, kernel):
    return _forward(x, kernel), (x, kernel)


def _conv_bwd(residuals, dy):
    x, kernel = residuals
    return _input_grad(dy, kernel), _kernel_grad(x, dy)


_conv_valid_fast_kernel_grad.defvjp(_conv_fwd, _conv_bwd)


def _seed_loop_under_vmap(
    fn: Callable[..., jax.Array], n_axis_args: tuple[int, ...], output_has_n_axis: bool
):
    """`fn` (one convolution pass), with a vmap rule of its own. Same sums either way.

    jax.vmap trains several seeds at once with batched kernels, which jax's batching rule
    turns into grouped convolutions; with the padded convolutions above those made a vmapped
    MNIST step slower than plain lax. Rule: when only arguments with a leading N axis are
    vmapped and the output has one too, the vmapped axis is folded into N (one call); else
    one call per index (lax.map), as fast as lax or faster (benchmarks/ablation_vmap.py).
    """
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        if output_has_n_axis and all(i in n_axis_args or not b for i, b in enumerate(in_batched)):
            folded = [a.reshape(-1, *a.shape[2:]) if b else a for a, b in zip(args, in_batched)]
            out = fn(*folded)
            return out.reshape(axis_size, -1, *out.shape[1:]), True

        def one(index):
            return fn(*[a[index] if b else a for a, b in zip(args, in_batched)])

        # Unrolling the seeds into the program instead measured the same
        # (benchmarks/ablation_vmap.py), so the smaller program wins.
        return jax.lax.map(one, jnp.arange(axis_size)), True

    return wrapped


def _taps(x: jax.Array, kh: int, kw: int) -> list[jax.Array]:
    """The kh*kw shifted views x[:, i:i+oh, j:j+ow, :], in kernel order (i, j)."""
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return [x[:, i : i + oh, j : j + ow, :] for i in range(kh) for j in range(kw)]


def _forward_impl(x: jax.Array, kernel: jax.Array) -> jax.Array:
    kh, kw, c_in, c_out = kernel.shape
    ow = x.shape[2] - kw + 1
    if kh * kw * c_in <= _DIRECT_MAX_TAPS:
        # Few channels in: sum kh*kw*C_in broadcast products. XLA fuses them (with the
        # bias and ReLU that follow) into one loop; no im2col, no library call.
        taps = _taps(x, kh, kw)
        w = kernel.reshape(kh * kw, c_in, c_out)
        terms = (tap[..., c : c + 1] * w[t, c] for t, tap in enumerate(taps) for c in range(c_in))
        return reduce(operator.add, terms)  # in order, tap by tap
    # kw zero columns on the right make the output wider than the input: YNNPACK declines,
    # Eigen computes it, and the kw extra output columns are sliced away. Not for small
    # maps (MNIST conv 3: 5x5 -> 3x3), where that would double the work.
    pad = kw if kw / ow <= _EIGEN_MAX_WASTE else 0
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, pad)), dimension_numbers=_NHWC)
    return y[:, :, :ow, :]


def _kernel_grad_impl(x: jax.Array, dy: jax.Array) -> jax.Array:
    """dK[i, j, c, d] = sum over n, y, x of x[n, y+i, x+j, c] * dy[n, y, x, d]."""
    n, oh, ow, c_out = dy.shape
    kh, kw, c_in = x.shape[1] - oh + 1, x.shape[2] - ow + 1, x.shape[3]
    if kh * kw * c_in <= _DIRECT_MAX_TAPS:
        # First layer: per image, the (kh*kw*C_in, oh*ow) patches matrix (taps stacked on
        # the leading axis: a cheap copy) times dy, summed over images by a scan. Image by
        # image everything stays in cache, which beats one big product, Eigen and YNNPACK
        # at both models' first layers (benchmarks/conv_grad.py).
        def add_image(acc, x_dy):
            xi, dyi = x_dy
            patches_t = jnp.stack(
                [
                    tap[0, :, :, c].reshape(-1)
                    for tap in _taps(xi[None], kh, kw)
                    for c in range(c_in)
                ]
            )
            return acc + patches_t @ dyi.reshape(oh * ow, c_out), None

        d_kernel, _ = jax.lax.scan(add_image, jnp.zeros((kh * kw * c_in, c_out), dy.dtype), (x, dy))
        return d_kernel.reshape(kh, kw, c_in, c_out)
    # XLA's own kernel gradient, x correlated with dy as the window (C_in plays the batch, N the
    # contracted feature), in the layout Eigen and YNNPACK want (XLA would insert the same
    # transposes, but only outside loops: inside a lax.scan such a convolution falls back to a naive
    # loop). Where cheap enough, kh zero rows below dy make the window taller than x: YNNPACK
    # declines, Eigen computes it; the zero rows meet x's kh rows of padding, adding nothing.
    pad = kh if kh / oh <= _EIGEN_MAX_WASTE else 0
    x_t = x.transpose(3, 1, 2, 0)  # (C_in, H, W, N)
    dy_t = jnp.pad(dy, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(
        1, 2, 0, 3
    )  # (oh+pad, ow, N, C_out)
    out = jax.lax.conv_general_dilated(
        x_t, dy_t, (1, 1), ((0, pad), (0, 0)), dimension_numbers=_NHWC
    )
    return out.transpose(1, 2, 0, 3)  # (C_in, kh, kw, C_out) -> (kh, kw, C_in, C_out)


def _input_grad_impl(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """dx: dy "fully" correlated with the kernel flipped in space, C_in and C_out swapped.

    Exactly the convolution XLA derives, written in the layout of Eigen, which computes it.
    """
    kh, kw = kernel.shape[:2]
    flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)  # (kh, kw, C_out, C_in)
    return jax.lax.conv_general_dilated(
        dy, flipped, (1, 1), ((kh - 1, kh - 1), (kw - 1, kw - 1)), dimension_numbers=_NHWC
    )


_forward = _seed_loop_under_vmap(_forward_impl, n_axis_args=(0,), output_has_n_axis=True)
_kernel_grad = _seed_loop_under_vmap(_kernel_grad_impl, n_axis_args=(0, 1), output_has_n_axis=False)
_input_grad = _seed_loop_under_vmap(_input_grad_impl, n_axis_args=(0,), output_has_n_axis=True)


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


def _pool_views(x: jax.Array, window: int) -> list[jax.Array]:
    """x[:, a::w, b::w, :] for each (a, b) of the window, cropped to whole windows ("valid")."""
    oh, ow = x.shape[1] // window, x.shape[2] // window
    x = x[:, : oh * window, : ow * window, :]
    return [x[:, a::window, b::window, :] for a in range(window) for b in range(window)]


def _max_pool_forward(x: jax.Array, window: int) -> jax.Array:
    return reduce(
        jnp.maximum, _pool_views(x, window)
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
    n, h, w, c = x.shape
    oh, ow = y.shape[1], y.shape[2]
    hits = [(view == y).astype(dy.dtype) for view in _pool_views(x, window)]
    share = dy / sum(hits)  # ties share the gradient, as jax's reduce-max rule does
    parts = [hit * share for hit in hits]  # (N, oh, ow, C) each, in window order (a, b)
    rows = [jnp.stack(parts[a * window : (a + 1) * window], axis=3) for a in range(window)]
    dx = jnp.stack(rows, axis=2).reshape(n, oh * window, ow * window, c)
    if dx.shape != x.shape:  # the border "valid" pooling dropped gets no gradient
        dx = jnp.pad(dx, ((0, 0), (0, h - oh * window), (0, w - ow * window), (0, 0)))
    return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
