"""The faster weight gradients (busi_jax/models/conv.py) change speed, not results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from busi_jax import models, native
from busi_jax.models import blocks
from busi_jax.models.conv import chunked_conv, native_wgrad_conv


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


def _loss_curve(steps, **model_kwargs):
    """Losses of ``steps`` Adam steps of a segmenter fitting a thresholded-noise mask."""
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
    y = (x > 0.6).astype(jnp.float32)
    net = models.create_model(model_kwargs)
    v = net.init(jax.random.key(1), x)
    params, stats = v["params"], v["batch_stats"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt):
        def loss_fn(p):
            out, upd = net.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.sigmoid_binary_cross_entropy(out, y).mean(), upd["batch_stats"]

        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), stats, opt, loss

    curve = []
    for _ in range(steps):
        params, stats, opt, loss = step(params, stats, opt)
        curve.append(float(loss))
    return curve


def test_loss_curve_unchanged_by_chunking():
    """Four Adam steps of a U-Net with and without chunking give the same losses."""
    plain = _loss_curve(4, name="unet", features=32, depth=1, wgrad_chunks=1)
    chunked = _loss_curve(4, name="unet", features=32, depth=1, wgrad_chunks=2)
    assert plain[-1] < plain[0]
    np.testing.assert_allclose(chunked, plain, rtol=1e-4)


def _grads(conv_fn, x, w, **kw):
    def loss(x, w):
        y = conv_fn(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize(
    "shape,kernel,dilation,c_out",
    [
        ((3, 9, 10, 1), 3, 1, 32),  # One input channel (the first layer), odd sizes.
        ((2, 8, 8, 7), 3, 1, 32),  # Channel blocks of 4 and a remainder.
        ((2, 6, 12, 20), 3, 2, 32),  # Dilated: the bottleneck cascade.
        ((1, 5, 5, 16), 1, 1, 32),  # 1x1 kernel.
        ((2, 4, 4, 32), 3, 1, 32),  # Kernel wider than the image's interior.
        ((2, 8, 8, 1), 3, 1, 8),  # 8-wide vectors (width-8 networks).
        ((2, 8, 8, 16), 3, 1, 24),  # 24 = 3 x 8: the 8-wide path.
    ],
)
def test_native_weight_gradient_matches_xla(shape, kernel, dilation, c_out):
    x = jax.random.normal(jax.random.key(0), shape)
    w = 0.1 * jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], c_out))
    ref = _grads(jax.lax.conv_general_dilated, x, w, rhs_dilation=(dilation, dilation))
    got = _grads(native_wgrad_conv, x, w, rhs_dilation=(dilation, dilation))
    np.testing.assert_array_equal(got[0], ref[0])  # Input gradient: XLA's own.
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-5 * float(jnp.max(ref[1])))


def test_native_conv_leaves_other_convolutions_to_xla():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    # 12 output channels (not a multiple of 8) and a strided conv: no custom call.
    for w, strides in ((jnp.ones((3, 3, 4, 12)), (1, 1)), (jnp.ones((3, 3, 4, 16)), (2, 2))):

        def f(x, w, strides=strides):
            return native_wgrad_conv(
                x, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            ).sum()

        text = str(jax.make_jaxpr(jax.grad(f, argnums=1))(x, w))
        assert "ffi_call" not in text and "custom_vjp" not in text
    # NCHW layouts too; the same conv in NHWC takes the kernel.
    xc, wc = jnp.ones((2, 16, 8, 8)), jnp.ones((16, 16, 3, 3))
    text = str(
        jax.make_jaxpr(jax.grad(lambda w: native_wgrad_conv(xc, w, (1, 1), "SAME").sum()))(wc)
    )
    assert "custom_vjp" not in text
    w = jnp.ones((3, 3, 4, 16))
    nhwc = ("NHWC", "HWIO", "NHWC")
    text = str(
        jax.make_jaxpr(
            jax.grad(
                lambda w: native_wgrad_conv(x, w, (1, 1), "SAME", dimension_numbers=nhwc).sum()
            )
        )(w)
    )
    assert "custom_vjp" in text


def test_native_conv_bfloat16_gradient_close_to_float32():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
    ref = _grads(jax.lax.conv_general_dilated, x, w)[1]
    got = _grads(native_wgrad_conv, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))[1]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=0.05 * float(jnp.max(ref)))


def test_native_loss_curve_matches_xla():
    """Six Adam steps of a width-16 U-Net++ with the C++ weight gradient track XLA's."""
    xla = _loss_curve(6, name="unetpp", features=16, depth=2, wgrad="xla")
    native_curve = _loss_curve(6, name="unetpp", features=16, depth=2, wgrad="native")
    assert xla[-1] < xla[0]
    np.testing.assert_allclose(native_curve, xla, rtol=1e-4)


def test_bad_wgrad_option_is_refused():
    with pytest.raises(ValueError, match="wgrad='fast' is not valid"):
        models.create_model(dict(name="unet", features=8, depth=1, wgrad="fast"))


def test_native_build_without_compiler_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("BUSI_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(native.NativeBuildError, match="needs a C\\+\\+ compiler.*wgrad='xla'"):
        native._build("conv_wgrad")
    assert list(tmp_path.iterdir()) == []


def test_native_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("BUSI_JAX_CACHE", str(tmp_path))
    first = native._build("conv_wgrad")
    mtime = first.stat().st_mtime_ns
    assert native._build("conv_wgrad") == first and first.stat().st_mtime_ns == mtime
    # Only the finished library is left: the temporary file was renamed.
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_native_build_failure_names_the_source(monkeypatch, tmp_path):
    bad = tmp_path / "src"
    bad.mkdir()
    (bad / "conv_wgrad.cc").write_text("this is not C++\n")
    monkeypatch.setenv("BUSI_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "SOURCE_DIR", bad)
    with pytest.raises(native.NativeBuildError, match="conv_wgrad.cc: compiling"):
        native._build("conv_wgrad")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
