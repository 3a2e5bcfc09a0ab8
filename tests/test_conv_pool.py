"""cnnjax.conv_pool: a ReLU convolution and its 2x2 max pool as one op, against the two layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import conv_pool, ops, routes


def _layers(x, kernel, bias):
    return ops.max_pool_nhwc(jax.nn.relu(ops.conv2d_nhwc(x, kernel) + bias), 2)


def _inputs(shape, c_out, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    # Images flat in 4x4 blocks, as regions of a photo can be: equal maxima in a window (ties).
    n, h, w, c = shape
    blocks = jnp.round(jax.random.uniform(k[0], (n, h // 4 + 1, w // 4 + 1, c)) * 3) / 3
    x = jnp.repeat(jnp.repeat(blocks, 4, axis=1), 4, axis=2)[:, :h, :w]
    kernel = jax.random.normal(k[1], (3, 3, shape[3], c_out)) * 0.3
    bias = jax.random.normal(k[2], (c_out,)) * 0.1
    return x, kernel, bias


@pytest.mark.parametrize("route", ["whole", "by_image"])
@pytest.mark.parametrize("shape", [(3, 12, 12, 3), (2, 11, 13, 1)])  # odd sizes: a cropped border
def test_same_values_and_gradients_as_the_layers(route, shape):
    x, kernel, bias = _inputs(shape, 8)
    d_pooled = jax.random.normal(jax.random.PRNGKey(9), _layers(x, kernel, bias).shape)
    # Both sides under the pin: the forward convolution then takes one route on both (its
    # default), not the pinned one and a measured one, which sum in other orders.
    with routes.pinned(route):
        fused, fused_vjp = jax.vjp(lambda k, b: conv_pool.conv_relu_pool(x, k, b), kernel, bias)
        grads = fused_vjp(d_pooled)
        plain, plain_vjp = jax.vjp(lambda k, b: _layers(x, k, b), kernel, bias)
    np.testing.assert_array_equal(fused, plain)
    for ours, theirs in zip(grads, plain_vjp(d_pooled)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_input_gradient_where_the_input_is_differentiated():
    x, kernel, bias = _inputs((2, 10, 10, 3), 4, seed=1)
    d_pooled = jax.random.normal(jax.random.PRNGKey(3), _layers(x, kernel, bias).shape)
    ours = jax.vjp(conv_pool.conv_relu_pool, x, kernel, bias)[1](d_pooled)
    theirs = jax.vjp(_layers, x, kernel, bias)[1](d_pooled)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_under_vmap_each_seed_its_own_gradient():
    x, kernel, bias = _inputs((2, 12, 12, 3), 4, seed=2)
    kernels = jnp.stack([kernel, -kernel])

    def grad_of(layer):
        return jax.vmap(jax.grad(lambda k: jnp.sum(layer(x, k, bias) ** 2)))(kernels)

    np.testing.assert_allclose(
        grad_of(conv_pool.conv_relu_pool), grad_of(_layers), rtol=1e-5, atol=1e-6
    )


def test_taken_only_at_a_large_first_layer():
    assert conv_pool.pays((20, 150, 150, 3), (3, 3, 3, 32))  # the cats convnet's first layer
    assert not conv_pool.pays((64, 28, 28, 1), (3, 3, 1, 32))  # MNIST's: cache-sized
    assert not conv_pool.pays((20, 74, 74, 32), (3, 3, 32, 64))  # many taps
