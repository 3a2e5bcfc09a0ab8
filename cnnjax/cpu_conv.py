"""The convolution the models run on the CPU (stride 1, "valid"): each pass, the forward one and
both gradients, by the fastest of its routes at its shape, as cnnjax.routes measures it.

Same sums as `lax.conv_general_dilated` in another order (float32 rounding aside);
tests/test_ops.py checks every route against lax in float64 at every layer shape of both models.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import reduce

import jax
import jax.numpy as jnp

from cnnjax import routes

# On the CPU a stride-1 "valid" convolution is routed by hand, pass by pass; elsewhere it is
# plain `lax.conv_general_dilated` (cuDNN on a GPU). Each pass has two or more routes, the same
# sums in another order (float32 rounding aside), and cnnjax.routes times them at the layer's
# shape on the running machine, once, and keeps the fastest:
# - "matmul": the convolution as one matrix product per pass. The forward pass multiplies the
#   patches matrix (im2col: the kh*kw shifted views side by side, (N, oh, ow, kh*kw*C_in)) by
#   the kernel as a (kh*kw*C_in, C_out) matrix; the kernel gradient contracts the same patches
#   with dy over their rows (patches^T dy); the input gradient multiplies dy by the kernel's
#   transpose and adds the kh*kw shifted slices of the result back (col2im). XLA:CPU runs a dot
#   at the matmul library's rate, which on some CPUs its convolutions are far below.
# - "xla": XLA's own convolutions, steered. XLA:CPU (jaxlib 0.10) hands a convolution to
#   YNNPACK when YNNPACK supports it, else to Eigen, and on a 2-core AVX2 machine that choice
#   is often the slow one:
#   - YNNPACK's kernel gradient (x correlated with dy as the window) is several times slower
#     than Eigen's at every layer of both models, its forward pass too for the larger layers.
#     YNNPACK refuses a convolution whose window or output is larger than its input, so
#     padding the input (forward) or the window (kernel gradient) with kh zeros on one axis,
#     and slicing the extra away, moves the same sums to Eigen at the price of kh rows of
#     zeros: worth it while they are a small part of the layer (`_EIGEN_MAX_WASTE`).
#   - The input gradient's output is larger than its input: it goes to Eigen by itself.
#   - The kernel gradient may also run a few images at a time ("xla_blocksK", K images per
#     block, see `_kernel_grad_routes`): a shorter contraction, which at some layers Eigen
#     computes faster than the whole batch's.
#   - With 1-3 input channels (the first layer), 9-27 multiply-adds per output are too few
#     for either library to amortise its call: fused multiply-adds (forward) and small matrix
#     products image by image (kernel gradient) beat both.
# benchmarks/conv_layers.py prints each layer's rate against a matmul, benchmarks/conv_grad.py
# the "xla" routes against plain lax; rerun them when jaxlib changes.

NHWC = ("NHWC", "HWIO", "NHWC")  # dimension numbers: channels last, kernels as flax stores them
DIRECT_MAX_TAPS = 27  # kh * kw * C_in up to this: forward as a fused sum of taps (3x3x3)
_EIGEN_MAX_WASTE = 0.3  # zero rows / useful rows up to this: pad to reach Eigen


@jax.custom_vjp
def valid_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 'valid' convolution whose passes each take the CPU route chosen for its shape."""
    return forward(x, kernel)


def _conv_fwd(x, kernel):
    # symbolic_zeros: each primal comes with whether it is differentiated. The data's input to
    # the first layer is not, so its input gradient is neither traced nor timed.
    y = forward(x.value, kernel.value)
    return y, (x.value, kernel.value, x.perturbed)


def _conv_bwd(residuals, dy):
    x, kernel, x_perturbed = residuals
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
        dy = jnp.zeros(dy.shape, dy.dtype)
    d_input = input_grad(dy, kernel) if x_perturbed else None
    return d_input, kernel_grad(x, dy)


valid_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


def seed_loop_under_vmap(
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


def _forward_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    kh, kw, c_in, c_out = kernel.shape
    ow = x.shape[2] - kw + 1
    if kh * kw * c_in <= DIRECT_MAX_TAPS:
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
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, pad)), dimension_numbers=NHWC)
    return y[:, :, :ow, :]


def _forward_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """im2col: the patches, (n, oh, ow, kh*kw*C_in) in the kernel's (i, j, c) order, times the
    kernel as a (kh*kw*C_in, C_out) matrix, a block of n images at a time (`_image_blocks`)."""
    kh, kw, c_in, c_out = kernel.shape
    matrix = kernel.reshape(kh * kw * c_in, c_out)

    def block(xb):
        return jnp.concatenate(_taps(xb, kh, kw), axis=-1) @ matrix

    size = _image_blocks(x.shape[0], _patches_bytes(x, kernel.shape))
    if size == x.shape[0]:
        return block(x)
    out = jax.lax.map(block, x.reshape(-1, size, *x.shape[1:]))
    return out.reshape(x.shape[0], *out.shape[2:])


# The matmul routes build the patches matrix a block of images at a time: one image's patches
# at the cats' second layer are several MB, and the whole batch's, written out and read back,
# measured slower than the product itself. Blocks of up to this many bytes stay near the cache.
_BLOCK_BYTES = 4 << 20


def _patches_bytes(x: jax.Array, kernel_shape: tuple[int, ...]) -> int:
    """Bytes of one image's patches matrix."""
    kh, kw = kernel_shape[:2]
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return oh * ow * kh * kw * x.shape[3] * x.dtype.itemsize


def _image_blocks(n: int, image_bytes: int, block_bytes: int = _BLOCK_BYTES) -> int:
    """The largest number of images, dividing n, whose patches fit in block_bytes (at least 1)."""
    fits = max(1, block_bytes // max(image_bytes, 1))
    return max(d for d in range(1, min(n, fits) + 1) if n % d == 0)


def _kernel_grad_xla(x: jax.Array, dy: jax.Array) -> jax.Array:
    """dK[i, j, c, d] = sum over n, y, x of x[n, y+i, x+j, c] * dy[n, y, x, d]."""
    n, oh, ow, c_out = dy.shape
    kh, kw, c_in = x.shape[1] - oh + 1, x.shape[2] - ow + 1, x.shape[3]
    if kh * kw * c_in <= DIRECT_MAX_TAPS:
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
        x_t, dy_t, (1, 1), ((0, pad), (0, 0)), dimension_numbers=NHWC
    )
    return out.transpose(1, 2, 0, 3)  # (C_in, kh, kw, C_out) -> (kh, kw, C_in, C_out)


def _kernel_grad_xla_blocks(size: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The "xla" kernel gradient `size` images at a time (size divides N), the blocks summed."""

    def in_blocks(x: jax.Array, dy: jax.Array) -> jax.Array:
        # Unrolled: a scan over the blocks measured slower than the same convolutions written out.
        blocks = [
            _kernel_grad_xla(x[i : i + size], dy[i : i + size]) for i in range(0, len(x), size)
        ]
        return reduce(operator.add, blocks)

    return in_blocks


def _kernel_grad_matmul(x: jax.Array, dy: jax.Array) -> jax.Array:
    """A block of images at a time, the patches (n*oh*ow, kh*kw*C_in), as the forward pass builds
    them, contracted with dy (n*oh*ow, C_out) over their rows; the blocks summed by a scan."""
    n, oh, ow, c_out = dy.shape
    kh, kw, c_in = x.shape[1] - oh + 1, x.shape[2] - ow + 1, x.shape[3]
    # Larger blocks than the other passes': with one image of the first layer per block its
    # product measured far slower (benchmarks/conv_layers.py).
    size = _image_blocks(n, _patches_bytes(x, (kh, kw)), 2 * _BLOCK_BYTES)
    rows = (((0,), (0,)), ((), ()))  # contract the rows: patches^T dy, no transpose written

    def add_block(acc, x_dy):
        xb, dyb = x_dy
        patches = jnp.concatenate(_taps(xb, kh, kw), axis=-1).reshape(-1, kh * kw * c_in)
        return acc + jax.lax.dot_general(patches, dyb.reshape(-1, c_out), rows), None

    blocks = (x.reshape(-1, size, *x.shape[1:]), dy.reshape(-1, size, *dy.shape[1:]))
    d_kernel, _ = jax.lax.scan(add_block, jnp.zeros((kh * kw * c_in, c_out), dy.dtype), blocks)
    return d_kernel.reshape(kh, kw, c_in, c_out)


def _input_grad_xla(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """dx: dy "fully" correlated with the kernel flipped in space, C_in and C_out swapped.

    Exactly the convolution XLA derives, written in the layout of Eigen, which computes it.
    """
    kh, kw = kernel.shape[:2]
    flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)  # (kh, kw, C_out, C_in)
    return jax.lax.conv_general_dilated(
        dy, flipped, (1, 1), ((kh - 1, kh - 1), (kw - 1, kw - 1)), dimension_numbers=NHWC
    )


def _input_grad_matmul(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """col2im: dy times the kernel's transpose gives each output's share of its kh*kw inputs,
    (n, oh, ow, kh*kw*C_in); tap (i, j)'s slice, shifted by (i, j), adds into dx. A block of
    images at a time, as the forward pass."""
    kh, kw, c_in, c_out = kernel.shape
    matrix_t = kernel.reshape(kh * kw * c_in, c_out).T

    def block(dyb):
        shares = dyb @ matrix_t
        dx = None
        for t in range(kh * kw):
            i, j = divmod(t, kw)
            tap = shares[..., t * c_in : (t + 1) * c_in]
            shifted = jnp.pad(tap, ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
            dx = shifted if dx is None else dx + shifted
        return dx

    n, oh, ow, _ = dy.shape
    size = _image_blocks(n, oh * ow * kh * kw * c_in * dy.dtype.itemsize)
    if size == n:
        return block(dy)
    out = jax.lax.map(block, dy.reshape(-1, size, *dy.shape[1:]))
    return out.reshape(n, *out.shape[2:])


# Each pass's routes, the default (the one taken without measuring) first.
FORWARD_ROUTES = {"xla": _forward_xla, "matmul": _forward_matmul}
KERNEL_GRAD_ROUTES = {"xla": _kernel_grad_xla, "matmul": _kernel_grad_matmul}
INPUT_GRAD_ROUTES = {"xla": _input_grad_xla, "matmul": _input_grad_matmul}
# The kernel gradient's contraction runs over N*oh*ow rows. At some layers Eigen computes it
# faster a few images at a time, in blocks of up to about this many rows of dy, than for the whole
# batch at once; which size, if any, differs by layer, so each is one more route to measure.
_KERNEL_GRAD_BLOCK_ROWS = (1024, 4096)


def _kernel_grad_routes(x: jax.Array, dy: jax.Array) -> dict[str, Callable[..., jax.Array]]:
    """KERNEL_GRAD_ROUTES, and "xla_blocksK" (K images per block) for each block size that
    `_KERNEL_GRAD_BLOCK_ROWS` gives this shape short of the whole batch. Not for the first
    layer, whose "xla" route already goes image by image."""
    n, oh, ow, _ = dy.shape
    kh, kw = x.shape[1] - oh + 1, x.shape[2] - ow + 1
    found = dict(KERNEL_GRAD_ROUTES)
    if kh * kw * x.shape[3] <= DIRECT_MAX_TAPS:
        return found
    for rows in _KERNEL_GRAD_BLOCK_ROWS:
        size = _image_blocks(n, oh * ow, rows)
        if size < n:
            found[f"xla_blocks{size}"] = _kernel_grad_xla_blocks(size)
    return found


def routed(
    operation: str, candidates: Callable[..., dict[str, Callable[..., jax.Array]]]
) -> Callable[..., jax.Array]:
    """One pass: of the routes `candidates` offers for the arguments' shapes, the one cnnjax.routes
    chooses."""

    def run(*args: jax.Array) -> jax.Array:
        offered = candidates(*args)
        return offered[routes.choose(operation, offered, args)](*args)

    return run


forward = seed_loop_under_vmap(
    routed("conv_forward", lambda *_: FORWARD_ROUTES), n_axis_args=(0,), output_has_n_axis=True
)
kernel_grad = seed_loop_under_vmap(
    routed("conv_kernel_grad", _kernel_grad_routes), n_axis_args=(0, 1), output_has_n_axis=False
)
input_grad = seed_loop_under_vmap(
    routed("conv_input_grad", lambda *_: INPUT_GRAD_ROUTES),
    n_axis_args=(0,),
    output_has_n_axis=True,
)
