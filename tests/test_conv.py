"""The batch-chunked weight gradient (busi_jax/models/conv.py) changes speed, not results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from busi_jax import models
from busi_jax.models import blocks
from busi_jax.models.conv import chunked_conv


@pytest.mark.parametrize("chunks", [1, 2, 3, 4])
def test_conv_gradients_match_xla(chunks):
    # Batch 8 with 3 chunks uses 2 (the largest divisor not above 3).
    x = jax.random.normal(jax.random.key(0), (8, 12, 12, 3))
    plain = nn.Conv(5, (3, 3), padding="SAME")
    chunked = nn.Conv(5, (3, 3), padding="SAME", conv_general_dilated=chunked_conv(chunks))
    v = plain.init(jax.random.key(1), x)

    def loss(v, x, m):
        return jnp.sum(jnp.sin(m.apply(v, x)))

    np.testing.assert_array_equal(plain.apply(v, x), chunked.apply(v, x))
    g_plain = jax.grad(loss, argnums=(0, 1))(v, x, plain)
    g_chunked = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(v, x, chunked)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_chunked)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_same_function_object_and_bad_chunks():
    assert chunked_conv(4) is chunked_conv(4)
    with pytest.raises(ValueError, match="chunks"):
        chunked_conv(0)


def test_only_wide_coarse_layers_are_chunked():
    seen = []

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x):
            return blocks.ConvBlock(self.features, wgrad_chunks=8)(x)

        features: int = 32

    for features, size, expect in ((32, 64, True), (16, 64, False), (32, 128, False)):
        m = Probe(features)
        x = jnp.zeros((2, size, size, 1))
        jaxpr = jax.make_jaxpr(lambda v, x, m=m: jax.grad(lambda v: m.apply(v, x).sum())(v))(
            m.init(jax.random.key(0), x), x
        )
        seen.append(("custom_vjp" in str(jaxpr)) == expect)
    assert all(seen)


def test_loss_curve_unchanged_by_chunking():
    """Four Adam steps of a U-Net with and without chunking give the same losses."""
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
    y = (x > 0.6).astype(jnp.float32)
    losses = {}
    for chunks in (1, 2):
        net = models.create_model(dict(name="unet", features=32, depth=1, wgrad_chunks=chunks))
        v = net.init(jax.random.key(1), x)
        params, stats = v["params"], v["batch_stats"]
        tx = optax.adam(1e-2)
        opt = tx.init(params)

        @jax.jit
        def step(params, stats, opt, net=net, tx=tx):
            def loss_fn(p):
                out, upd = net.apply(
                    {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                return optax.sigmoid_binary_cross_entropy(out, y).mean(), upd["batch_stats"]

            (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            upd, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, upd), stats, opt, loss

        curve = []
        for _ in range(4):
            params, stats, opt, loss = step(params, stats, opt)
            curve.append(float(loss))
        losses[chunks] = curve
    assert losses[1][-1] < losses[1][0]
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)
