"""The 1x1 logit head (busi_jax/models/head.py): nn.Conv's variables and function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from busi_jax import models
from busi_jax.models.head import bf16_logits, logit_head


class _Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return logit_head(2, x, name="head")


class _ConvHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (1, 1), dtype=jnp.float32, name="head")(x)


def _features(dtype=jnp.bfloat16):
    return jax.random.normal(jax.random.key(0), (2, 8, 8, 16)).astype(dtype)


def test_same_variables_and_initial_values_as_nn_conv_in_both_dtypes():
    ref = _ConvHead().init(jax.random.key(1), _features(jnp.float32))
    for dtype in (jnp.float32, jnp.bfloat16):
        v = _Head().init(jax.random.key(1), _features(dtype))
        assert jax.tree.map(lambda a: (a.shape, a.dtype), v) == jax.tree.map(
            lambda a: (a.shape, a.dtype), ref
        )
        for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(a, b)


def test_float32_features_are_nn_conv_exactly():
    x = _features(jnp.float32)
    v = _ConvHead().init(jax.random.key(1), x)
    np.testing.assert_array_equal(_Head().apply(v, x), _ConvHead().apply(v, x))


def test_bf16_logits_match_float32_conv_and_gradients():
    x = _features()
    v = _ConvHead().init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.1, v)  # A nonzero bias.
    target = jax.random.uniform(jax.random.key(2), (2, 8, 8, 2))

    def loss(module, v, x):
        z = module.apply(v, x)
        return jnp.mean(jax.nn.softplus(z) - target * z), z

    (l_ref, z_ref), g_ref = jax.value_and_grad(
        lambda v, x: loss(_ConvHead(), v, x), (0, 1), has_aux=True
    )(v, x)
    (l, z), g = jax.jit(jax.value_and_grad(lambda v, x: loss(_Head(), v, x), (0, 1), has_aux=True))(
        v, x
    )
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(l, l_ref, rtol=1e-5)
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g[0]), jax.tree.leaves(g_ref[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert g[1].dtype == jnp.bfloat16
    # Both round a float32 input gradient to bf16 once: at most one ulp apart.
    np.testing.assert_allclose(
        np.asarray(g[1], np.float32), np.asarray(g_ref[1], np.float32), rtol=2**-7, atol=1e-7
    )


def test_bf16_logits_is_a_linear_map_in_float32():
    x = _features()
    k = jax.random.normal(jax.random.key(3), (16, 3))
    x64, k64 = np.asarray(x, np.float64), np.asarray(k, np.float64)
    want = np.einsum("...c,co->...o", x64, k64)
    err = np.abs(np.asarray(bf16_logits(x, k, jnp.zeros(3)), np.float64) - want)
    # Each weight is carried to 2^-16 of itself (bf16 alone: 2^-9), plus float32 sums.
    scale = np.einsum("...c,co->...o", np.abs(x64), np.abs(k64))
    assert np.all(err <= 2.0**-16 * scale + 1e-6)


def test_bf16_segmenters_keep_their_parameter_trees():
    """A bf16 model's head is the float32 model's (checkpoints move between them)."""
    x = jnp.zeros((1, 32, 32, 1))
    for name in ("unet", "unetpp", "multitask"):
        cfg = {"name": name, "features": 4, "depth": 2}
        a = models.create_model(cfg).init(jax.random.key(0), x)
        b = models.create_model({**cfg, "dtype": "bfloat16"}).init(jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)
        np.testing.assert_array_equal(a["params"]["head"]["kernel"], b["params"]["head"]["kernel"])
