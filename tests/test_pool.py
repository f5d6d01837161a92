"""2x2 max pooling and the skip-plus-pool pair's one-pass gradient (busi_jax/models/pool.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from busi_jax import native
from busi_jax.models.pool import kernel_applies, max_pool2, skip_and_max_pool2


def test_max_pool2_matches_flax_values_and_gradient_without_ties():
    for shape in ((2, 8, 8, 3), (1, 7, 9, 2)):  # Odd sizes drop the last row/column.
        x = jax.random.normal(jax.random.key(0), shape)  # No ties (continuous values).

        def ref(x):
            return nn.max_pool(x, (2, 2), strides=(2, 2))

        np.testing.assert_array_equal(max_pool2(x), ref(x))
        g = jax.random.normal(jax.random.key(1), ref(x).shape)
        (got,) = jax.vjp(max_pool2, x)[1](g)
        (want,) = jax.vjp(ref, x)[1](g)
        np.testing.assert_allclose(got, want)
    # Tied maxima share the gradient instead of one taking it all.
    (tied,) = jax.vjp(max_pool2, jnp.ones((1, 2, 2, 1)))[1](jnp.ones((1, 1, 1, 1)))
    np.testing.assert_allclose(tied, np.full((1, 2, 2, 1), 0.25))


def _relu_activation(dtype, shape=(3, 12, 8, 32)):
    # ReLU outputs: many windows hold tied zeros; one window four tied ones.
    x = jnp.maximum(jax.random.normal(jax.random.key(0), shape), 0.0)
    x = x.at[0, :2, :2, 5].set(1.0)
    return x.astype(dtype)


def _reference_gradient(x, g_skip, g_pooled):
    # float64: g_skip + g_pooled split evenly among each window's maxima.
    b, h, w, c = x.shape
    win = np.asarray(x, np.float64).reshape(b, h // 2, 2, w // 2, 2, c)
    at_max = win == win.max(axis=(2, 4), keepdims=True)
    share = np.asarray(g_pooled, np.float64).reshape(b, h // 2, 1, w // 2, 1, c)
    unpooled = at_max * share / at_max.sum(axis=(2, 4), keepdims=True)
    return np.asarray(g_skip, np.float64) + unpooled.reshape(x.shape)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2**-8)])
@pytest.mark.parametrize("use_kernel", [False, True], ids=["autodiff", "kernel"])
def test_gradient_is_skip_plus_unpooled_with_ties_split(dtype, tol, use_kernel):
    x = _relu_activation(dtype)
    g_skip = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
    g_pooled = jax.random.normal(jax.random.key(2), (3, 6, 4, 32)).astype(dtype)
    assert kernel_applies(x, use_kernel) == use_kernel
    (skip, pooled), vjp = jax.vjp(lambda x: skip_and_max_pool2(x, use_kernel), x)
    np.testing.assert_array_equal(skip, x)
    np.testing.assert_array_equal(pooled, max_pool2(x))
    (dx,) = vjp((g_skip, g_pooled))
    assert dx.dtype == x.dtype and dx.shape == x.shape
    want = _reference_gradient(x, g_skip, g_pooled)
    # One rounding of the float32 sum to the dtype (autodiff: up to two).
    err = np.abs(np.asarray(dx, np.float64) - want) / np.maximum(np.abs(want), 1.0)
    assert err.max() <= tol * (1 if use_kernel else 2)
    tied = np.asarray(dx[0, :2, :2, 5], np.float64) - np.asarray(g_skip[0, :2, :2, 5], np.float64)
    np.testing.assert_allclose(tied, float(g_pooled[0, 0, 0, 5]) / 4, rtol=tol * 4, atol=tol)


def test_kernel_gradient_inside_a_jitted_loss_matches_autodiff():
    """Every later use of the skip reaches the kernel; float32 agrees with autodiff."""
    x = _relu_activation(jnp.float32, (2, 16, 16, 16))
    w1 = jax.random.normal(jax.random.key(3), x.shape)
    w2 = jax.random.normal(jax.random.key(4), (2, 8, 8, 16))

    def loss(x, use_kernel):
        skip, pooled = skip_and_max_pool2(x, use_kernel)
        return jnp.sum(skip * w1) + jnp.sum(jnp.tanh(pooled) * w2) + jnp.sum(skip**2)

    got = jax.jit(jax.grad(lambda x: loss(x, True)))(x)
    want = jax.jit(jax.grad(lambda x: loss(x, False)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_kernel_not_used_where_it_does_not_apply():
    assert not kernel_applies(jnp.ones((1, 7, 8, 4)), True)  # Odd height.
    assert not kernel_applies(jnp.ones((1, 8, 8, 4), jnp.float16), True)
    assert not kernel_applies(jnp.ones((1, 8, 8, 4)), False)
    # Odd sizes still pool (the last row is dropped) and differentiate.
    x = jax.random.normal(jax.random.key(0), (1, 7, 9, 2))
    skip, pooled = skip_and_max_pool2(x, True)
    assert skip is x and pooled.shape == (1, 3, 4, 2)
    assert jax.grad(lambda x: jnp.sum(skip_and_max_pool2(x, True)[1]))(x).shape == x.shape


def test_kernel_rejects_a_mismatched_call():
    """Called directly with a wrong pooled shape: one error naming the kernel."""
    call = jax.ffi.ffi_call(
        native.load("max_pool_backward"), jax.ShapeDtypeStruct((1, 4, 4, 16), jnp.float32)
    )
    x = jnp.ones((1, 4, 4, 16))
    with pytest.raises(Exception, match="busi_max_pool_backward: p and gp must be"):
        jax.block_until_ready(call(x, jnp.ones((1, 4, 2, 16)), x, jnp.ones((1, 4, 2, 16))))
    with pytest.raises(Exception, match="busi_max_pool_backward: all arrays must share"):
        p = jnp.ones((1, 2, 2, 16))
        jax.block_until_ready(call(x, p.astype(jnp.bfloat16), x, p))
