"""BatchNormReLU (busi_jax/models/norm.py) is Flax's BatchNorm + ReLU, faster."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from busi_jax import native
from busi_jax.models.norm import BatchNormReLU, batch_norm_relu


class _FlaxBnRelu(nn.Module):
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        bn = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
        )
        return nn.relu(bn(x))


# Both implementations of the training pass: jnp ops, and the C++ kernel
# (busi_jax/csrc/batch_norm.cc) that models with native kernels use.
both_paths = pytest.mark.parametrize("use_kernel", [False, True], ids=["jnp", "kernel"])


def _setup(dtype, shape=(4, 8, 8, 16), use_kernel=False):
    x = (1.5 * jax.random.normal(jax.random.key(0), shape) + 0.3).astype(dtype)
    ours = BatchNormReLU(momentum=0.9, epsilon=1e-5, dtype=dtype, use_kernel=use_kernel)
    ref = _FlaxBnRelu(dtype)
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


@both_paths
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("train", [True, False])
def test_values_and_running_statistics_match_flax(dtype, tol, train, use_kernel):
    x, ours, ref, v = _setup(dtype, use_kernel=use_kernel)
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


@both_paths
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_gradients_match_flax_autodiff(dtype, tol, use_kernel):
    """The hand-written backward pass: input, scale and bias gradients."""
    x, ours, ref, v = _setup(dtype, use_kernel=use_kernel)
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


@both_paths
def test_batch_norm_relu_normalises_each_channel(use_kernel):
    """Known answer: unit scale, zero bias -> relu of the per-channel z-score."""
    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) ** 2
    y, mean, var = jax.jit(batch_norm_relu, static_argnums=(3, 4, 5))(
        x, jnp.ones(2), jnp.zeros(2), 0.0, jnp.dtype(jnp.float32), use_kernel
    )
    flat = np.asarray(x).reshape(-1, 2)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, flat.var(0), rtol=1e-5)
    z = (flat - flat.mean(0)) / flat.std(0)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), np.maximum(z, 0), rtol=1e-5, atol=1e-6)


def _forward_and_grads(x, scale, bias, g, out_dtype, use_kernel):
    def f(x, scale, bias):
        y, mean, var = batch_norm_relu(x, scale, bias, 1e-5, jnp.dtype(out_dtype), use_kernel)
        return jnp.sum(y.astype(jnp.float32) * g), (y, mean, var)

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
        x, scale, bias
    )
    return out, grads


# Shapes that take each of the kernel's loop forms: 16-128 channels in
# compile-time-width blocks of 64-128 values, 48 and 24 channels at a
# run-time width, and row counts that leave a tail after the last block.
@pytest.mark.parametrize(
    "shape", [(4, 8, 8, 16), (2, 3, 3, 16), (2, 4, 4, 128), (3, 5, 7, 48), (5, 24)]
)
@pytest.mark.parametrize(
    "dtype,out_dtype,tol",
    [
        (jnp.float32, jnp.float32, 1e-5),
        (jnp.bfloat16, jnp.bfloat16, 1e-2),
        (jnp.float32, jnp.bfloat16, 1e-2),
        (jnp.bfloat16, jnp.float32, 1e-4),
    ],
)
def test_kernel_matches_jnp_path(shape, dtype, out_dtype, tol):
    """Outputs, statistics and all three gradients, every dtype pairing."""
    c = shape[-1]
    x = (1.5 * jax.random.normal(jax.random.key(0), shape) + 0.3).astype(dtype)
    scale = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), (c,))
    bias = 0.2 * jax.random.normal(jax.random.key(2), (c,))
    g = jax.random.normal(jax.random.key(3), shape)
    want = _forward_and_grads(x, scale, bias, g, out_dtype, False)
    got = _forward_and_grads(x, scale, bias, g, out_dtype, True)
    assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        # Elementwise outputs differ by one bf16 rounding at most.
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def test_kernel_is_deterministic_across_threads():
    """Several tasks on several threads: the same bits on every call."""
    shape = (8, 64, 64, 16)  # 524K values: every pool thread takes part.
    x = jax.random.normal(jax.random.key(0), shape).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(1), shape)
    runs = [
        _forward_and_grads(x, jnp.ones(16), jnp.zeros(16), g, jnp.bfloat16, True) for _ in range(3)
    ]
    for other in runs[1:]:
        for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_kernel_rejects_mismatched_per_channel_arrays():
    """Called directly with a wrong-sized scale: one error naming the kernel."""
    call = jax.ffi.ffi_call(
        native.load("bn_relu_forward"),
        (
            jax.ShapeDtypeStruct((2, 16), jnp.float32),
            jax.ShapeDtypeStruct((16,), jnp.float32),
            jax.ShapeDtypeStruct((16,), jnp.float32),
        ),
    )
    with pytest.raises(Exception, match="busi_bn_relu_forward: per-channel arrays"):
        jax.block_until_ready(
            call(jnp.ones((2, 16)), jnp.ones(8), jnp.zeros(16), epsilon=np.float32(1e-5))
        )
