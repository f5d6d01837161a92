"""BatchNormReLU (busi_jax/models/norm.py) is Flax's BatchNorm + ReLU, faster."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from busi_jax.models.norm import BatchNormReLU, batch_norm_relu


class _FlaxBnRelu(nn.Module):
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        bn = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
        )
        return nn.relu(bn(x))


def _setup(dtype, shape=(4, 8, 8, 16)):
    x = (1.5 * jax.random.normal(jax.random.key(0), shape) + 0.3).astype(dtype)
    ours, ref = BatchNormReLU(momentum=0.9, epsilon=1e-5, dtype=dtype), _FlaxBnRelu(dtype)
    v = ref.init(jax.random.key(1), x, train=False)
    # Parameters and running statistics away from their initial 1 / 0.
    v = jax.tree.map(lambda a: a + 0.5 * jax.random.uniform(jax.random.key(a.size), a.shape), v)
    return x, ours, ref, v


def test_same_variables_as_flax_batchnorm():
    """Same names, shapes, dtypes and initial values: checkpoints move between the two."""
    x = jnp.ones((2, 4, 4, 16))
    a = BatchNormReLU().init(jax.random.key(0), x, train=False)
    b = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    assert jax.tree.map(lambda t: (t.shape, t.dtype), a) == jax.tree.map(
        lambda t: (t.shape, t.dtype), b
    )
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, w)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("train", [True, False])
def test_values_and_running_statistics_match_flax(dtype, tol, train):
    x, ours, ref, v = _setup(dtype)
    mine = jax.tree.map(lambda d: d["BatchNorm_0"], v, is_leaf=lambda d: "BatchNorm_0" in d)
    y, upd = ours.apply(mine, x, train=train, mutable=["batch_stats"])
    y_ref, upd_ref = ref.apply(v, x, train=train, mutable=["batch_stats"])
    assert y.dtype == y_ref.dtype == jnp.dtype(dtype)
    assert float(jnp.mean(y == 0)) > 0.2  # The ReLU clips.
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol
    )
    # Running averages: float32 statistics of the same inputs (none in eval).
    upd_ref = upd_ref["batch_stats"]["BatchNorm_0"]
    for k in ("mean", "var"):
        np.testing.assert_allclose(upd["batch_stats"][k], upd_ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_gradients_match_flax_autodiff(dtype, tol):
    """The hand-written backward pass: input, scale and bias gradients."""
    x, ours, ref, v = _setup(dtype)
    g = jax.random.normal(jax.random.key(2), x.shape)

    def loss(module, wrap):
        def f(params, x):
            y, _ = module.apply(
                {"params": wrap(params), "batch_stats": wrap(stats)},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(y.astype(jnp.float32) * g)

        return jax.grad(f, argnums=(0, 1))

    def unwrap(p):
        return p["BatchNorm_0"]

    stats = unwrap(v["batch_stats"])

    got = loss(ours, lambda d: d)(unwrap(v["params"]), x)
    want = loss(ref, lambda d: {"BatchNorm_0": d})(unwrap(v["params"]), x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_init_leaves_running_statistics_alone():
    """As Flax: initialising in train mode keeps mean 0 / var 1."""
    x = 3.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    v = BatchNormReLU().init(jax.random.key(1), x, train=True)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(16))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(16))


def test_batch_norm_relu_normalises_each_channel():
    """Known answer: unit scale, zero bias -> relu of the per-channel z-score."""
    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) ** 2
    y, mean, var = jax.jit(batch_norm_relu, static_argnums=(3, 4))(
        x, jnp.ones(2), jnp.zeros(2), 0.0, jnp.dtype(jnp.float32)
    )
    flat = np.asarray(x).reshape(-1, 2)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, flat.var(0), rtol=1e-5)
    z = (flat - flat.mean(0)) / flat.std(0)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), np.maximum(z, 0), rtol=1e-5, atol=1e-6)
