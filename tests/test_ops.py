"""The lecture's worked examples (SPEC.md section 1), and agreement with what the models run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import ops

IMAGE = np.array(
    [[1, 0, 0, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 3, 1], [2, 1, 0, 1, 1]], np.float32
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


def test_fast_conv_gradient_matches_lax_gradient():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 10, 9, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(3, 8, 7, 6)), jnp.float32)
    ours = jax.grad(lambda x, k: jnp.sum(ops.conv2d_nhwc(x, k) * y), argnums=(0, 1))(x, k)
    lax = jax.grad(lambda x, k: jnp.sum(ops._lax_conv(x, k) * y), argnums=(0, 1))(x, k)
    for a, b in zip(ours, lax):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c_in", [1, 4])  # first-layer path (fused taps) and the library path
def test_conv_under_vmap_equals_one_seed_at_a_time(c_in):
    """Seeds vmapped with their own kernels and inputs (the ablation's case) and with a
    shared input (only the kernel batched): value and both gradients as seed by seed."""
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.normal(size=(3, 2, 9, 8, c_in)), jnp.float32)
    ks = jnp.asarray(rng.normal(size=(3, 3, 3, c_in, 5)), jnp.float32)
    ys = jnp.asarray(rng.normal(size=(3, 2, 7, 6, 5)), jnp.float32)

    def value_and_grads(x, k, y):
        return jax.value_and_grad(lambda x, k: jnp.sum(ops.conv2d_nhwc(x, k) * y), argnums=(0, 1))(x, k)

    for in_axes, x_of in (((0, 0, 0), lambda s: xs[s]), ((None, 0, 0), lambda s: xs[0])):
        vmapped = jax.jit(jax.vmap(value_and_grads, in_axes=in_axes))(xs if in_axes[0] == 0 else xs[0], ks, ys)
        for s in range(3):
            one = value_and_grads(x_of(s), ks[s], ys[s])
            for a, b in zip(jax.tree.leaves(vmapped), jax.tree.leaves(one)):
                np.testing.assert_allclose(a[s], b, rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="padding"):
        ops.conv2d(IMAGE, FILTER, padding="full")
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d(np.zeros((5, 5, 2)), np.zeros((3, 3, 3, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        ops.conv2d(np.zeros((2, 2)), FILTER)
