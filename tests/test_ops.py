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


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="padding"):
        ops.conv2d(IMAGE, FILTER, padding="full")
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d(np.zeros((5, 5, 2)), np.zeros((3, 3, 3, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        ops.conv2d(np.zeros((2, 2)), FILTER)
