"""The lecture's worked examples (SPEC.md section 1), and agreement with what the models run."""

import contextlib
import zlib

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import cpu_conv, ops, routes

IMAGE = np.array(
    [[1, 0, 0, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 3, 1], [2, 1, 0, 1, 1]],
    np.float32,
)
FILTER = np.array([[0, 1, 0], [0, 1, 0], [1, 1, 0]], np.float32)
FEATURE_MAP = np.array([[3, 2, 2], [4, 2, 4], [5, 1, 4]], np.float32)


def test_valid_convolution_is_the_lecture_example():
    np.testing.assert_array_equal(ops.conv2d(IMAGE, FILTER), FEATURE_MAP)


def test_same_padding_adds_one_ring_of_zeros():
    out = ops.conv2d(IMAGE, FILTER, padding="same")
    assert out.shape == (5, 5)
    padded = np.pad(IMAGE, 1)
    np.testing.assert_array_equal(out, ops.conv2d(padded, FILTER))
    np.testing.assert_array_equal(out[1:4, 1:4], FEATURE_MAP)


def test_stride_two_starts_windows_at_rows_and_columns_0_and_2():
    out = ops.conv2d(IMAGE, FILTER, stride=2)
    np.testing.assert_array_equal(out, FEATURE_MAP[::2, ::2])
    assert out.shape == (2, 2)


def test_max_pool_same_padding_is_the_lecture_example():
    np.testing.assert_array_equal(ops.max_pool(FEATURE_MAP, 2, 2, "same"), [[4, 4], [5, 4]])
    np.testing.assert_array_equal(ops.max_pool(FEATURE_MAP, 2), [[4]])  # valid drops the border


def test_multichannel_filter_sums_per_channel_results():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7, 3)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, 1)).astype(np.float32)
    per_channel = sum(ops.conv2d(x[:, :, c], k[:, :, c, 0]) for c in range(3))
    np.testing.assert_allclose(ops.conv2d(x, k)[:, :, 0], per_channel, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding", [(1, "valid"), (1, "same"), (2, "valid"), (2, "same")])
def test_conv2d_agrees_with_lax(stride, padding):
    rng = np.random.default_rng(stride)
    x = rng.normal(size=(9, 8, 4)).astype(np.float32)
    k = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    ours = ops.conv2d(x, k, stride, padding)
    theirs = ops.conv2d_nhwc(x[None], k, stride, padding)[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(8, 8), (9, 7), (13, 11)])
def test_max_pool_agrees_with_flax_and_the_models_pool(size):
    x = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32)
    reference = nn.max_pool(x, (2, 2), (2, 2), "VALID")
    np.testing.assert_array_equal(ops.max_pool_nhwc(x), reference)
    np.testing.assert_array_equal(ops.max_pool(x[0]), reference[0])
    same = nn.max_pool(x, (2, 2), (2, 2), "SAME")
    np.testing.assert_array_equal(ops.max_pool(x[0], padding="same"), same[0])


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="padding"):
        ops.conv2d(IMAGE, FILTER, padding="full")
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d(np.zeros((5, 5, 2)), np.zeros((3, 3, 3, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        ops.conv2d(np.zeros((2, 2)), FILTER)


# --- The routed CPU convolution against lax, at the models' real layer shapes ----------------
#
# On the CPU `conv2d_nhwc` (stride 1, "valid") runs each pass by one of its routes, "xla",
# "matmul" or (the kernel gradient) "xla_blocksK", the fastest as cnnjax.routes measures it;
# the tests below run under each.
# Within "xla" the layer's shape picks the implementation (cnnjax/cpu_conv.py): the forward pass and
# the kernel gradient are "direct"
# (kh*kw*C_in <= cpu_conv.DIRECT_MAX_TAPS: fused taps / a scan of per-image products),
# "padded" (kw/ow resp. kh/oh <= cpu_conv._EIGEN_MAX_WASTE: zero-padded so that Eigen takes it)
# or "unpadded" (the plain library call); the input gradient has one route ("full": the
# full correlation with the flipped kernel).

# name: ((H, W, C_in, C_out) of the layer's input and filters, forward route, kernel-gradient route)
CONV_LAYERS = {
    "mnist_conv2d": ((28, 28, 1, 32), "direct", "direct"),
    "mnist_conv2d_1": ((13, 13, 32, 64), "padded", "padded"),
    "mnist_conv2d_2": ((5, 5, 64, 64), "unpadded", "unpadded"),
    "cats_conv2d": (
        (150, 150, 3, 32),
        "direct",
        "direct",
    ),  # 3*3*3 = 27 taps: the direct bound itself
    "cats_conv2d_1": ((74, 74, 32, 64), "padded", "padded"),
    "cats_conv2d_2": ((36, 36, 64, 128), "padded", "padded"),
    "cats_conv2d_3": ((17, 17, 128, 128), "padded", "padded"),
    # Not model layers: the forward pass decides on the width, the kernel gradient on the height.
    "strip_wide": ((5, 40, 32, 8), "padded", "unpadded"),
    "strip_tall": ((40, 5, 32, 8), "unpadded", "padded"),
}
EVERY_ROUTE = {
    ("forward", "direct"), ("forward", "padded"), ("forward", "unpadded"),
    ("kernel_grad", "direct"), ("kernel_grad", "padded"), ("kernel_grad", "unpadded"),
    ("input_grad", "full"),
}  # fmt: skip
KH = KW = 3
# Max |ours - reference| / max |reference| for the value and both gradients, the reference
# being lax.conv_general_dilated in float64 on the same float32 numbers. Measured on this
# machine (5 seeds, every shape below): at most 1.5e-6, float32 summation only. lax's own
# float32 result is up to 7.8e-6 off (cats conv2d kernel gradient), which is why the
# reference is float64: against float32 lax a 1e-5 bound would keep a margin of 1.3x.
# A wrong tap, a missing image, row or column, or a factor of 1 + 1e-5 is above the bound.
CONV_RTOL = 5e-6


def _float32_exact():
    """On the CPU float32 convolutions are float32: the programs stay the ones the models run.
    Elsewhere (a GPU computes float32 convolutions in TF32 by default) ask for full float32,
    so that CONV_RTOL means the same there."""
    return (
        contextlib.nullcontext()
        if jax.default_backend() == "cpu"
        else jax.default_matmul_precision("highest")
    )


def _lax_valid_conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _lax_float64(x, kernel, ct):
    """lax's value and vjp in float64, of the same float32 numbers: the reference."""
    with jax.enable_x64(True):
        out = _LAX_VALUE_AND_VJP(*(np.asarray(a, np.float64) for a in (x, kernel, ct)))
        out = [np.asarray(a) for a in out]
    assert all(a.dtype == np.float64 for a in out)
    return out


def _value_and_vjp(conv):
    """(x, kernel, cotangent) -> (conv(x, kernel), d_input, d_kernel); the
    tests jit it, as the models run."""

    def f(x, kernel, ct):
        y, vjp = jax.vjp(conv, x, kernel)
        return (y, *vjp(ct))

    return f


_LAX_VALUE_AND_VJP = jax.jit(_value_and_vjp(_lax_valid_conv))


def _conv_arrays(shape, n, seed, lead=()):
    """Input, kernel (Glorot-like scale) and cotangent for a layer,
    with extra leading axes `lead`."""
    h, w, c_in, c_out = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, n, h, w, c_in))
    kernel = rng.normal(size=(*lead, KH, KW, c_in, c_out)) / np.sqrt(KH * KW * c_in)
    ct = rng.normal(size=(*lead, n, h - KH + 1, w - KW + 1, c_out))
    return (jnp.asarray(a, jnp.float32) for a in (x, kernel, ct))


def _rel_err(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _predicted_routes(h, w, c_in):
    """The routes the predicates of cnnjax/cpu_conv.py choose for a 3x3 layer."""
    oh, ow = h - KH + 1, w - KW + 1
    direct = KH * KW * c_in <= cpu_conv.DIRECT_MAX_TAPS
    forward = (
        "direct" if direct else "padded" if KW / ow <= cpu_conv._EIGEN_MAX_WASTE else "unpadded"
    )
    kernel_grad = (
        "direct" if direct else "padded" if KH / oh <= cpu_conv._EIGEN_MAX_WASTE else "unpadded"
    )
    return {"forward": forward, "kernel_grad": kernel_grad, "input_grad": "full"}


def _all_eqns(eqn):
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        for inner in sub.eqns:
            yield from _all_eqns(inner)


def _traced_routes(h, w, c_in, c_out):
    """The routes the traced program really takes: read from the jaxpr of value and vjp.

    Each pass is one top-level call, told apart by its operands: (x, kernel) the forward
    pass, (dy, kernel) the input gradient, (x, dy) the kernel gradient. Its route follows
    from the convolutions inside (none, or which zero padding) and a scan.
    """
    x, kernel, ct = (
        jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _conv_arrays((h, w, c_in, c_out), 2, 0)
    )
    # The routed function itself: what conv2d_nhwc calls on the CPU (elsewhere it is plain lax).
    jaxpr = jax.make_jaxpr(_value_and_vjp(cpu_conv.valid_conv))(x, kernel, ct).jaxpr
    passes = {
        (x.shape, kernel.shape): "forward",
        (ct.shape, kernel.shape): "input_grad",
        (x.shape, ct.shape): "kernel_grad",
    }
    routes = {}
    for eqn in jaxpr.eqns:
        name = passes.get(tuple(v.aval.shape for v in eqn.invars))
        if name is None:
            continue
        inner = list(_all_eqns(eqn))
        pads = [
            tuple(map(tuple, e.params["padding"]))
            for e in inner
            if e.primitive.name == "conv_general_dilated"
        ]
        scans = [e for e in inner if e.primitive.name == "scan"]
        known = {
            ("forward", ()): "direct",
            ("forward", (((0, 0), (0, KW)),)): "padded",
            ("forward", (((0, 0), (0, 0)),)): "unpadded",
            ("kernel_grad", ()): "direct" if scans else "no convolution and no scan",
            ("kernel_grad", (((0, KH), (0, 0)),)): "padded",
            ("kernel_grad", (((0, 0), (0, 0)),)): "unpadded",
            ("input_grad", (((KH - 1, KH - 1), (KW - 1, KW - 1)),)): "full",
        }
        routes[name] = known.get((name, tuple(pads)), f"unknown: convolutions padded {pads}")
    return routes


@pytest.mark.parametrize("layer", CONV_LAYERS)
def test_conv_layer_shape_selects_the_route_claimed(layer):
    shape, forward, kernel_grad = CONV_LAYERS[layer]
    claimed = {"forward": forward, "kernel_grad": kernel_grad, "input_grad": "full"}
    assert _predicted_routes(*shape[:3]) == claimed
    with routes.pinned("xla"):
        assert _traced_routes(*shape) == claimed


@pytest.mark.parametrize("layer", CONV_LAYERS)
def test_matmul_route_traces_one_product_per_pass_and_no_convolution(layer):
    x, kernel, ct = (
        jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _conv_arrays(CONV_LAYERS[layer][0], 2, 0)
    )
    with routes.pinned("matmul"):
        jaxpr = jax.make_jaxpr(_value_and_vjp(ops.conv2d_nhwc))(x, kernel, ct).jaxpr
    names = [e.primitive.name for top in jaxpr.eqns for e in _all_eqns(top)]
    assert "conv_general_dilated" not in names
    assert names.count("dot_general") == 3  # forward, input gradient, kernel gradient (per image)


def test_conv_layers_cover_every_route():
    covered = {
        (p, r)
        for _, f, k in CONV_LAYERS.values()
        for p, r in (("forward", f), ("kernel_grad", k), ("input_grad", "full"))
    }
    assert covered == EVERY_ROUTE


@pytest.mark.parametrize("route", ["xla", "matmul", "xla_blocks1"])
@pytest.mark.parametrize("layer", CONV_LAYERS)
def test_conv_value_and_both_gradients_match_lax_at_layer_shapes(layer, route):
    """conv2d_nhwc against lax.conv_general_dilated (float64): value, input and kernel
    gradients for a random cotangent. Two images, so the kernel gradient's sum over images
    is exercised."""
    shape = CONV_LAYERS[layer][0]
    x, kernel, ct = _conv_arrays(shape, 2, seed=zlib.crc32(layer.encode()))
    with _float32_exact(), routes.pinned(route):
        ours = jax.jit(_value_and_vjp(ops.conv2d_nhwc))(x, kernel, ct)
    reference = _lax_float64(x, kernel, ct)
    for what, a, b in zip(("value", "d_input", "d_kernel"), ours, reference):
        err = _rel_err(a, b)
        assert err <= CONV_RTOL, f"{layer} {what}: relative error {err:.2e}"


@pytest.mark.parametrize("layer", CONV_LAYERS)
def test_kernel_gradient_in_blocks_of_images_matches_lax_at_layer_shapes(layer):
    """The "xla_blocksK" routes, 1 and 2 images per block of 4: every block counted once."""
    x, kernel, ct = _conv_arrays(CONV_LAYERS[layer][0], 4, seed=zlib.crc32(layer.encode()))
    d_kernel = _lax_float64(x, kernel, ct)[2]
    for size in (1, 2):
        ours = jax.jit(cpu_conv._kernel_grad_xla_blocks(size))(x, ct)
        err = _rel_err(ours, d_kernel)
        assert err <= CONV_RTOL, f"{layer} blocks of {size}: relative error {err:.2e}"


def test_kernel_gradient_offers_blocks_only_where_they_split_the_batch():
    def offered(n, layer):
        x, _, ct = _conv_arrays(CONV_LAYERS[layer][0], n, seed=0)
        return list(cpu_conv._kernel_grad_routes(x, ct))

    base = list(cpu_conv.KERNEL_GRAD_ROUTES)
    # 72*72 rows of dy per image: one image per block under either bound.
    assert offered(20, "cats_conv2d_1") == [*base, "xla_blocks1"]
    # 11*11 rows per image: blocks of the most images under 1024 and 4096 rows dividing 64.
    assert offered(64, "mnist_conv2d_1") == [*base, "xla_blocks8", "xla_blocks32"]
    assert offered(64, "mnist_conv2d_2") == base  # 3*3 rows: the whole batch fits either bound
    assert offered(20, "cats_conv2d") == base  # the first layer goes image by image already
    # Under the blocked route the program holds one kernel-gradient convolution per block.
    x, kernel, ct = (
        jax.ShapeDtypeStruct(a.shape, a.dtype)
        for a in _conv_arrays(CONV_LAYERS["cats_conv2d_1"][0], 3, 0)
    )
    with routes.pinned("xla_blocks1"):
        jaxpr = jax.make_jaxpr(_value_and_vjp(cpu_conv.valid_conv))(x, kernel, ct).jaxpr
    convs = [
        e
        for top in jaxpr.eqns
        for e in _all_eqns(top)
        if e.primitive.name == "conv_general_dilated"
    ]
    assert len(convs) == 1 + 1 + 3  # forward, input gradient, kernel gradient in 3 blocks


# vmap: kernel batched (seeds trained together: one call per seed, lax.map) or only the
# input (and cotangent) batched (filter ascent in cnnjax/inspect.py: folded into N, one call).
VMAP_AXES = {
    "seeds": (0, 0, 0),
    "seeds_shared_input": (None, 0, 0),
    "fold": (0, None, 0),
    "fold_shared_cotangent": (0, None, None),
}


@pytest.mark.parametrize("route", ["xla", "matmul"])
@pytest.mark.parametrize("axes", VMAP_AXES)
@pytest.mark.parametrize(
    "layer", ["mnist_conv2d", "mnist_conv2d_1", "mnist_conv2d_2"]
)  # direct, padded, unpadded
def test_conv_under_vmap_equals_lax_one_index_at_a_time(layer, axes, route):
    """jax.vmap of value and vjp over 3 lanes, each lane against lax
    (float64) on that lane alone."""
    in_axes = VMAP_AXES[axes]
    lanes = 3
    batched = _conv_arrays(
        CONV_LAYERS[layer][0], 2, seed=zlib.crc32((layer + axes).encode()), lead=(lanes,)
    )
    args = [a if ax == 0 else a[0] for a, ax in zip(batched, in_axes)]
    with _float32_exact(), routes.pinned(route):
        vmapped = jax.jit(jax.vmap(_value_and_vjp(ops.conv2d_nhwc), in_axes=in_axes))
        ours = vmapped(*args)
        jaxpr = vmapped.trace(*args).jaxpr
    for s in range(lanes):
        reference = _lax_float64(*[a[s] if ax == 0 else a for a, ax in zip(args, in_axes)])
        for what, a, b in zip(("value", "d_input", "d_kernel"), ours, reference):
            err = _rel_err(a[s], b)
            assert err <= CONV_RTOL, f"{layer} {axes} lane {s} {what}: relative error {err:.2e}"
    if jax.default_backend() == "cpu":
        # The custom vmap rule ran, not jax's: a batched kernel would become a grouped convolution.
        eqns = [e for top in jaxpr.eqns for e in _all_eqns(top)]
        convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
        assert {
            (e.params["feature_group_count"], e.params["batch_group_count"]) for e in convs
        } <= {(1, 1)}
        # And the forward pass took the path claimed: lanes folded into N (one output of
        # lanes * 2 images) or one call per lane (lax.map: a scan, no folded output).
        h, w, _, c_out = CONV_LAYERS[layer][0]
        folded = (lanes * 2, h - KH + 1, w - KW + 1, c_out) in {
            tuple(v.aval.shape) for e in eqns for v in e.outvars
        }
        assert folded == axes.startswith("fold")
        assert any(
            e.primitive.name == "scan" for e in eqns
        )  # kernel gradient: one call per lane, always


# --- Max pooling: the CPU's custom gradient against autodiff of reshape-and-max ------------


def _reshape_max_pool(x, window):
    """The plain pooling whose autodiff gradient `ops._max_pool` writes out by hand."""
    n, h, w, c = x.shape
    oh, ow = h // window, w // window
    return (
        x[:, : oh * window, : ow * window, :].reshape(n, oh, window, ow, window, c).max(axis=(2, 4))
    )


def _pool_input(kind, size, seed):
    rng = np.random.default_rng(seed)
    shape = (2, *size, 3)
    if kind == "normal":
        return rng.normal(size=shape).astype(np.float32)
    if kind == "ties":  # integers from a small range: most windows hold their max more than once
        return rng.integers(-2, 2, size=shape).astype(np.float32)
    return np.full(shape, 1.5, np.float32)  # "equal": every window all ties


@pytest.mark.parametrize("kind", ["normal", "ties", "equal"])
@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize(
    "size", [(5, 7), (13, 13), (26, 26), (75, 75)], ids="{0[0]}x{0[1]}".format
)  # odd: a border dropped
def test_max_pool_value_and_gradient_bitwise_equal_autodiff_of_reshape_and_max(size, window, kind):
    """The docstring's claim: bitwise the same value and gradient as autodiff of
    reshape-and-max, ties included (they share the gradient equally), the dropped border 0."""
    x = _pool_input(kind, size, seed=zlib.crc32(repr((size, window, kind)).encode()))
    oh, ow = size[0] // window, size[1] // window
    ct = jnp.asarray(np.random.default_rng(7).normal(size=(2, oh, ow, 3)), jnp.float32)
    if jax.default_backend() == "cpu":  # the hand-written gradient is what runs there
        assert (
            jax.make_jaxpr(lambda x: ops.max_pool_nhwc(x, window))(x).eqns[0].primitive.name
            == "custom_vjp_call"
        )
    y, dx = jax.jit(_value_and_vjp(lambda x, _: ops.max_pool_nhwc(x, window)))(x, None, ct)[:2]
    y_ref, dx_ref = jax.jit(_value_and_vjp(lambda x, _: _reshape_max_pool(x, window)))(x, None, ct)[
        :2
    ]
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    dx = np.asarray(dx)
    assert (
        not dx[:, oh * window :].any() and not dx[:, :, ow * window :].any()
    )  # the border is dropped
    maxima_per_window = (
        (x[:, : oh * window, : ow * window] == np.repeat(np.repeat(y, window, 1), window, 2))
        .reshape(2, oh, window, ow, window, 3)
        .sum(axis=(2, 4))
    )
    if kind == "ties":
        assert (maxima_per_window > 1).mean() > 0.2  # the data really has ties to share
    if kind == "equal":  # every position of a window gets ct / window**2
        shared = np.repeat(np.repeat(np.asarray(ct) / np.float32(window**2), window, 1), window, 2)
        np.testing.assert_array_equal(dx[:, : oh * window, : ow * window], shared)
