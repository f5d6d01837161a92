"""The faster convolution kernels (busi_jax/models/conv.py) change speed, not results."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from busi_jax import models, native
from busi_jax.models import blocks
from busi_jax.models import conv as conv_lib
from busi_jax.models.conv import (
    amx_available,
    amx_conv,
    amx_conv_general_dilated,
    amx_input_gradient,
    amx_weight_gradient,
    avx512_bf16_available,
    bf16_kernels_available,
    chunked_conv,
    native_weight_gradient,
    native_wgrad_conv,
)

# The bf16 kernels run on AMX tiles or, without them, on AVX-512 BF16; the
# project's machines have had one or the other (and CI runs on them). Each
# bf16-kernel test runs on every unit this CPU has (an AMX CPU also has
# AVX-512 BF16, so both paths get tested there); on a CPU with neither they
# are skipped and model.wgrad='native_bf16' is refused by the config check
# (test_train).
needs_bf16 = pytest.mark.skipif(
    not bf16_kernels_available(), reason="this CPU has neither AMX nor AVX-512 BF16"
)


@pytest.fixture(
    params=[
        pytest.param(
            "amx", marks=pytest.mark.skipif(not amx_available(), reason="no AMX bf16 tiles")
        ),
        pytest.param(
            "avx512_bf16",
            marks=pytest.mark.skipif(not avx512_bf16_available(), reason="no AVX-512 BF16"),
        ),
    ]
)
def bf16_unit(request, monkeypatch):
    """Runs the test on one unit: AMX, or AVX-512 BF16 (AMX hidden where present)."""
    # The unit is read when a function is traced: no trace of the other
    # unit's run may be reused.
    jax.clear_caches()
    if request.param == "avx512_bf16":
        monkeypatch.setattr(conv_lib, "amx_available", lambda: False)
    yield request.param
    jax.clear_caches()


on_bf16_units = pytest.mark.usefixtures("bf16_unit")
NHWC = ("NHWC", "HWIO", "NHWC")


def _bf16(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


def _exact_conv(x, w, pads, dilation):
    """XLA's stride-1 NHWC conv, float32 products at full precision."""
    return jax.lax.conv_general_dilated(
        x,
        w,
        (1, 1),
        pads,
        rhs_dilation=(dilation,) * 2,
        dimension_numbers=NHWC,
        precision="highest",
    )


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


@functools.cache  # The XLA reference curve serves several tests: compile it once.
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
    return tuple(curve)


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


@on_bf16_units
@pytest.mark.parametrize(
    "shape,kernel,dilation,c_out,pads",
    [
        ((2, 16, 16, 16), 3, 1, 32, ((1, 1), (1, 1))),  # 16-channel chunks, 16-pixel tiles.
        ((1, 8, 8, 32), 3, 1, 16, ((1, 1), (1, 1))),  # Batch 1: bands of rows; 8-pixel tiles.
        ((2, 16, 16, 32), 3, 2, 16, ((2, 2), (2, 2))),  # Dilated (the bottleneck cascade).
        ((2, 8, 24, 48), 3, 1, 48, ((1, 1), (1, 1))),  # 3 chunks, 3 output blocks, 3 runs.
        ((3, 16, 64, 64), 3, 1, 64, ((1, 1), (1, 1))),  # 32-channel chunks, 4-run tiles.
        ((2, 8, 8, 16), 1, 1, 16, ((0, 0), (0, 0))),  # 1x1 kernel.
        ((2, 10, 18, 16), 3, 1, 16, ((0, 0), (0, 0))),  # 'VALID': smaller output.
    ],
)
def test_amx_conv_is_xla_conv_of_bf16_inputs(shape, kernel, dilation, c_out, pads):
    """The AMX kernel sums exact products of bf16-rounded inputs in float32."""
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], c_out))
    ref = _exact_conv(_bf16(x), _bf16(w), pads, dilation)
    got = jax.jit(
        lambda x, w: amx_conv(x, w, (dilation,) * 2, (pads[0][0], pads[1][0]), ref.shape[1:3])
    )(x, w)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@on_bf16_units
@pytest.mark.parametrize("dilation", [1, 2])
def test_amx_input_gradient_is_xla_vjp_of_bf16_inputs(dilation):
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 16))
    dy = jax.random.normal(jax.random.key(2), (2, 16, 16, 16))
    pads = ((dilation, dilation),) * 2

    (ref,) = jax.vjp(lambda x: _exact_conv(x, _bf16(w), pads, dilation), x)[1](_bf16(dy))
    got = jax.jit(lambda dy, w: amx_input_gradient(dy, w, (dilation,) * 2, pads, (16, 16)))(dy, w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@on_bf16_units
def test_amx_conv_gradients_close_to_xla_float32():
    """Forward and both gradients within bf16 rounding of XLA's float32 ones."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 16))
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
    ref = _grads(jax.lax.conv_general_dilated, x, w)
    got = _grads(amx_conv_general_dilated, x, w)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=0.02 * float(jnp.max(jnp.abs(r))))
    assert _targets(amx_conv_general_dilated, x, w) == [
        "busi_conv_amx",  # forward
        "busi_conv_amx",  # input gradient
        "busi_conv_amx_wgrad",
    ]


def _targets(conv_fn, x, w):
    text = str(jax.make_jaxpr(lambda x, w: _grads(conv_fn, x, w))(x, w))
    return re.findall(r"target_name=(\w+)", text)


@on_bf16_units
@pytest.mark.parametrize(
    "shape,c_out,dilation",
    [
        ((2, 16, 16, 16), 16, 1),  # 16-pixel steps; taps in groups of 4, 4, 1.
        ((3, 8, 8, 32), 48, 1),  # 8-pixel steps; 2 channel and 3 output blocks.
        ((2, 32, 32, 16), 32, 2),  # 32-pixel steps; dilated.
    ],
)
def test_amx_weight_gradient_is_native_of_bf16_inputs(shape, c_out, dilation):
    x = jax.random.normal(jax.random.key(0), shape)
    dy = jax.random.normal(jax.random.key(1), (*shape[:3], c_out))
    args = ((3, 3, shape[-1], c_out), (dilation,) * 2, ((dilation, dilation),) * 2)
    ref = native_weight_gradient(_bf16(x), _bf16(dy), *args)
    got = jax.jit(lambda x, dy: amx_weight_gradient(x, dy, *args))(x, dy)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@on_bf16_units
def test_amx_conv_falls_back_where_shapes_do_not_fit():
    """8 channels or a 12-px-wide output: the C++ weight gradient only (no AMX call)."""
    for xs, ws in (((2, 8, 8, 8), (3, 3, 8, 16)), ((2, 12, 12, 16), (3, 3, 16, 16))):
        x, w = jnp.ones(xs), jnp.ones(ws)
        assert _targets(amx_conv_general_dilated, x, w) == ["busi_conv_wgrad"]


@on_bf16_units
def test_amx_loss_curve_tracks_xla():
    """Six Adam steps of a width-16 U-Net++ on AMX stay within bf16 noise of XLA's float32."""
    xla = _loss_curve(6, name="unetpp", features=16, depth=2, wgrad="xla")
    amx = _loss_curve(6, name="unetpp", features=16, depth=2, wgrad="native_bf16")
    assert xla[-1] < xla[0] and amx[-1] < amx[0]
    np.testing.assert_allclose(amx, xla, rtol=1e-2)


@on_bf16_units
def test_amx_kernels_take_bfloat16_buffers_as_they_are():
    """bf16 in, bf16 out (forward, input gradient); the same sums as from float32."""
    x = _bf16(jax.random.normal(jax.random.key(0), (2, 16, 16, 32)))
    w = _bf16(jax.random.normal(jax.random.key(1), (3, 3, 32, 16)))
    dy = _bf16(jax.random.normal(jax.random.key(2), (2, 16, 16, 16)))
    b = jnp.bfloat16
    y32 = amx_conv(x, w, (1, 1), (1, 1), (16, 16))
    y16 = amx_conv(x.astype(b), w.astype(b), (1, 1), (1, 1), (16, 16))
    assert y16.dtype == b
    np.testing.assert_array_equal(y16, y32.astype(b))  # One rounding of the same sum.
    pads = ((1, 1), (1, 1))
    d32 = amx_input_gradient(dy, w, (1, 1), pads, (16, 16))
    d16 = amx_input_gradient(dy.astype(b), w.astype(b), (1, 1), pads, (16, 16))
    np.testing.assert_array_equal(d16, d32.astype(b))
    # The weight gradient reads bf16 x and dy, including the image's last value.
    args = ((3, 3, 32, 16), (1, 1), pads)
    g32 = amx_weight_gradient(x, dy, *args)
    g16 = amx_weight_gradient(x.astype(b), dy.astype(b), *args)
    assert g16.dtype == jnp.float32
    np.testing.assert_array_equal(g16, g32)


@on_bf16_units
def test_amx_with_bfloat16_activations_tracks_float32():
    """The fastest setting (bf16 activations + AMX) keeps the loss curve within 2%."""
    xla = _loss_curve(6, name="unetpp", features=16, depth=2, wgrad="xla")
    amx = _loss_curve(6, name="unetpp", features=16, depth=2, wgrad="native_bf16", dtype="bfloat16")
    assert amx[-1] < amx[0]
    np.testing.assert_allclose(amx, xla, rtol=2e-2)


@on_bf16_units
def test_amx_selftest_passes_here():
    """The config check's probe runs the kernel on this machine (and would name the failure)."""
    from busi_jax.models.conv import amx_selftest

    amx_selftest()


@on_bf16_units
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_amx_affine_relu_epilogue_is_applied_to_the_float32_sums(out_dtype):
    """scale/shift + ReLU in the store: relu(conv * scale + shift), one rounding at the end."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 48))
    scale = jax.random.normal(jax.random.key(2), (48,))
    shift = jax.random.normal(jax.random.key(3), (48,))
    ref = jnp.maximum(_exact_conv(_bf16(x), _bf16(w), ((1, 1), (1, 1)), 1) * scale + shift, 0)
    got = amx_conv(x, w, (1, 1), (1, 1), (16, 16), scale=scale, shift=shift, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    assert float(jnp.mean(got == 0)) > 0.3  # The ReLU did clip.
    tol = 1e-5 if out_dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=tol, atol=tol * 10)
    plain = amx_conv(x, w, (1, 1), (1, 1), (16, 16))
    np.testing.assert_allclose(
        plain, _exact_conv(_bf16(x), _bf16(w), ((1, 1), (1, 1)), 1), rtol=1e-5, atol=1e-4
    )  # The plain call is untouched.


def _folded_and_plain(block, x, fold, monkeypatch):
    """A ConvBlock at train=False with its ``fold`` method on, then off.

    Returns ``(variables, lowered text, folded output, unfolded output)``;
    the variables' running statistics and affine parameters are moved away
    from their initial 0/1 so a wrong fold shows.
    """
    v = block.init(jax.random.key(1), x, train=False)
    v = jax.tree.map(lambda a: a + 0.5 * jax.random.uniform(jax.random.key(a.size), a.shape), v)

    def apply(v, x):
        return block.apply(v, x, train=False)

    text = jax.jit(apply).lower(v, x).as_text()
    folded = jax.jit(apply)(v, x)
    monkeypatch.setattr(blocks.ConvBlock, fold, lambda self, x, train: False)
    return v, text, folded, jax.jit(apply)(v, x)


@on_bf16_units
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_amx_conv_block_at_inference_folds_norm_into_one_call(dtype, monkeypatch):
    """train=False: conv + running-average BatchNorm + ReLU as one AMX call, same result."""
    block = blocks.ConvBlock(features=32, wgrad="native_bf16", dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 16))
    v, text, fused, plain = _folded_and_plain(block, x, "_folds_norm", monkeypatch)
    assert re.findall(r"busi_conv_amx\w*", text) == ["busi_conv_amx_affine_relu"] * 2
    assert fused.dtype == plain.dtype == jnp.dtype(dtype)
    # float32: the same sums, only the BatchNorm's arithmetic reordered;
    # bfloat16: the unfolded path rounds the conv output once more.
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(
        np.asarray(fused, np.float32), np.asarray(plain, np.float32), rtol=tol, atol=tol
    )
    # Training mode keeps batch statistics: nothing is folded.
    train_text = (
        jax.jit(lambda v, x: block.apply(v, x, train=True, mutable=["batch_stats"]))
        .lower(v, x)
        .as_text()
    )
    assert "busi_conv_amx_affine_relu" not in train_text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_scan_reading_block_at_inference_folds_norm_over_taps(dtype, channels, monkeypatch):
    """train=False on a 1- or 3-channel scan: conv0 + BatchNorm + ReLU as nine shifted
    products in one fused loop, no conv op left; the unfolded result."""
    block = blocks.ConvBlock(features=16, wgrad="native_bf16", dtype=dtype)
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, channels))
    _, text, folded, plain = _folded_and_plain(block, x, "_folds_norm_over_taps", monkeypatch)
    assert "convolution" not in text
    assert re.findall(r"busi_conv_amx\w*", text) == ["busi_conv_amx_affine_relu"]
    assert folded.dtype == plain.dtype == jnp.dtype(dtype)
    # bfloat16: the unfolded conv multiplies bf16-rounded scans and kernels.
    tol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(
        np.asarray(folded, np.float32), np.asarray(plain, np.float32), rtol=tol, atol=tol
    )


@on_bf16_units
def test_amx_conv_of_parts_is_the_conv_of_their_concatenation():
    """U-Net skips: the parts are read where they lie, bit-identical to concatenating first."""
    keys = jax.random.split(jax.random.key(0), 6)
    parts = [
        jax.random.normal(keys[0], (2, 16, 16, 16)),
        jax.random.normal(keys[1], (2, 16, 16, 32)).astype(jnp.bfloat16),
        jax.random.normal(keys[2], (2, 16, 16, 16)),
    ]
    w = jax.random.normal(keys[3], (3, 3, 64, 32))
    scale, shift = jax.random.normal(keys[4], (32,)), jax.random.normal(keys[5], (32,))
    kw = dict(scale=scale, shift=shift, out_dtype=jnp.float32)
    got = jax.jit(lambda p: amx_conv(p, w, (1, 1), (1, 1), (16, 16), **kw))(parts)
    cat = jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)
    np.testing.assert_array_equal(got, amx_conv(cat, w, (1, 1), (1, 1), (16, 16), **kw))
    # Without the epilogue: the plain convolution (training's forward pass).
    plain = jax.jit(lambda p: amx_conv(p, w, (1, 1), (1, 1), (16, 16)))
    assert "busi_conv_amx_concat" in plain.lower(parts).as_text()
    np.testing.assert_array_equal(plain(parts), amx_conv(cat, w, (1, 1), (1, 1), (16, 16)))
    # The weight gradient reads the parts the same way.
    dy = jax.random.normal(keys[5], (2, 16, 16, 32))
    args = ((3, 3, 64, 32), (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_array_equal(
        amx_weight_gradient(parts, dy, *args), amx_weight_gradient(cat, dy, *args)
    )


@on_bf16_units
def test_conv_block_given_parts_convolves_their_concatenation():
    block = blocks.ConvBlock(features=16, wgrad="native_bf16")
    parts = [jax.random.normal(jax.random.key(i), (1, 16, 16, 16)) for i in range(3)]
    cat = jnp.concatenate(parts, axis=-1)
    v = block.init(jax.random.key(3), cat, train=False)
    v = jax.tree.map(lambda a: a + 0.5 * jax.random.uniform(jax.random.key(a.size), a.shape), v)
    infer = jax.jit(lambda v, x: block.apply(v, x, train=False))
    calls = re.findall(r"busi_conv_amx\w*", infer.lower(v, parts).as_text())
    assert calls == ["busi_conv_amx_concat_affine_relu", "busi_conv_amx_affine_relu"]
    np.testing.assert_array_equal(infer(v, parts), infer(v, cat))
    # Training reads the parts where they lie too (PartsConv): the same
    # parameters at init, and the same bits forward and backward.
    init_parts = block.init(jax.random.key(3), parts, train=True)
    init_cat = block.init(jax.random.key(3), cat, train=True)
    assert jax.tree.structure(init_parts) == jax.tree.structure(init_cat)
    for a, b in zip(jax.tree.leaves(init_parts), jax.tree.leaves(init_cat)):
        np.testing.assert_array_equal(a, b)

    def loss(v, x):
        y, _ = block.apply(v, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), y

    train = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    calls = re.findall(r"busi_conv_amx\w*", train.lower(v, parts).as_text())
    assert calls.count("busi_conv_amx_concat") == 1 and "busi_conv_amx_concat_wgrad" in calls
    (_, y_parts), (gv_parts, gx_parts) = train(v, parts)
    (_, y_cat), (gv_cat, gx_cat) = train(v, cat)
    np.testing.assert_array_equal(y_parts, y_cat)
    for a, b in zip(jax.tree.leaves(gv_parts), jax.tree.leaves(gv_cat)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jnp.concatenate(gx_parts, axis=-1), gx_cat)


def test_load_model_refuses_unknown_kernels(tiny_pipeline):
    from busi_jax import inference

    _, workdir, _ = tiny_pipeline
    with pytest.raises(ValueError, match="kernels='fast' is not valid"):
        inference.load_model(workdir / "segmenter", kernels="fast")


@on_bf16_units
def test_mask_predictor_on_amx_kernels_agrees_with_xla(tiny_pipeline, tiny_data_dir):
    """Same checkpoint, other kernels: the masks agree up to bf16 rounding at the threshold."""
    from busi_jax import data, inference

    config, workdir, _ = tiny_pipeline
    _, model, _ = inference.load_model(workdir / "segmenter", kernels="native_bf16")
    assert model.wgrad == "native_bf16"
    images = data.load_split(config.segmenter.data, "validation")["image"]
    xla = inference.mask_predictor(workdir / "segmenter")(images)
    amx = inference.mask_predictor(workdir / "segmenter", kernels="native_bf16")(images)
    assert amx.shape == xla.shape and np.mean(amx != xla) < 0.01
    # The classifier has no AMX path: it loads and runs on XLA.
    _, clf, _ = inference.load_model(workdir / "classifier", kernels="native_bf16")
    assert not hasattr(clf, "wgrad")


@on_bf16_units
def test_amx_deconv_is_the_matmul_of_bf16_inputs_with_its_gradients():
    """Deconv2x2(wgrad='native_bf16'): the same function and gradients in bf16 products."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
    amx = blocks.Deconv2x2(16, wgrad="native_bf16")
    ref = blocks.Deconv2x2(16)
    v = ref.init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)

    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

    assert "busi_conv_amx" in jax.jit(amx.apply).lower(v, x).as_text()
    vb = {"params": {**v["params"], "kernel": _bf16(v["params"]["kernel"])}}  # Bias unrounded.
    np.testing.assert_allclose(amx.apply(v, x), ref.apply(vb, _bf16(x)), rtol=1e-5, atol=1e-5)
    g_amx = jax.grad(loss(amx), argnums=(0, 1))(v, x)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
    for a, b in zip(jax.tree.leaves(g_amx), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(b))))
    # Shapes AMX cannot tile keep the matmul.
    x8 = jax.random.normal(jax.random.key(3), (2, 8, 8, 8))
    v8 = ref.init(jax.random.key(1), x8)
    assert "busi_conv_amx" not in jax.jit(amx.apply).lower(v8, x8).as_text()


@on_bf16_units
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_shuffled_store_is_the_pixel_shuffle_plus_bias_rounded_once(out_dtype):
    """amx_conv(shuffle=True, relu=False): the 1x1 conv's float32 sums + bias, shuffled, one rounding."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 16, 32)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (1, 1, 32, 64))  # 4 x 16 outputs
    bias = jax.random.normal(jax.random.key(2), (16,))
    y = amx_conv(
        x,
        kernel,
        (1, 1),
        (0, 0),
        (8, 16),
        scale=jnp.ones(64),
        shift=jnp.tile(bias, 4),
        relu=False,
        shuffle=True,
        out_dtype=out_dtype,
    )
    sums = amx_conv(x, kernel, (1, 1), (0, 0), (8, 16), out_dtype=jnp.float32)
    want = sums.reshape(2, 8, 16, 2, 32).transpose(0, 1, 3, 2, 4).reshape(2, 16, 32, 16) + bias
    assert y.shape == (2, 16, 32, 16) and y.dtype == out_dtype
    assert float(jnp.min(want)) < 0  # relu=False keeps the negatives.
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want.astype(out_dtype)))


@on_bf16_units
def test_shuffled_store_refuses_what_it_cannot_do():
    x = jnp.ones((1, 8, 8, 16))
    with pytest.raises(Exception, match="shuffle=1 needs"):  # 32 / 4 = 8 channels: not 16s.
        jax.block_until_ready(
            amx_conv(x, jnp.ones((1, 1, 16, 32)), (1, 1), (0, 0), (8, 8), shuffle=True)
        )


@on_bf16_units
def test_amx_deconv_at_inference_is_one_fused_call_of_the_same_function():
    """Deconv2x2(inference=True): matmul, bias and shuffle in one kernel call, as the training path."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32)).astype(jnp.bfloat16)
    amx = blocks.Deconv2x2(16, dtype=jnp.bfloat16, wgrad="native_bf16")
    v = amx.init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)
    fused = jax.jit(lambda v, x: amx.apply(v, x, inference=True))
    # With its kernel packed (models.packing), XLA has nothing left to move.
    _, made = amx.apply(v, x, inference=True, mutable=["packed"])
    hlo = fused.lower({**v, **made}, x).compile().as_text()
    assert hlo.count("custom-call(") == 1 and "transpose" not in hlo
    want = amx.apply(v, x).astype(jnp.float32)  # The training path: rounds, then adds the bias.
    got = fused(v, x).astype(jnp.float32)
    np.testing.assert_array_equal(fused({**v, **made}, x).astype(jnp.float32), got)
    assert got.shape == want.shape == (2, 16, 16, 16)
    # One bf16 rounding apart at most.
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * float(jnp.max(jnp.abs(want))))


@needs_bf16
def test_every_spin_setting_waits_for_every_task(monkeypatch):
    """BUSI_JAX_SPIN_US (parallel.h) changes how a caller waits, never what it returns."""
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 32)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 32, 32))
    conv = jax.jit(lambda x, k: amx_conv(x, k, (1, 1), (1, 1), (64, 64)))
    want = np.asarray(conv(x, kernel))
    for setting in ("0", "1", "100000", "not a number"):
        monkeypatch.setenv("BUSI_JAX_SPIN_US", setting)
        for _ in range(3):
            np.testing.assert_array_equal(np.asarray(conv(x, kernel)), want)


@pytest.mark.parametrize("kernel", ["native", pytest.param("amx", marks=needs_bf16)])
def test_weight_gradients_are_bit_identical_call_to_call(kernel):
    """Images are summed in a fixed order, whatever the threads did: no run-to-run drift."""
    x = jax.random.normal(jax.random.key(0), (13, 16, 16, 32))
    dy = jax.random.normal(jax.random.key(1), (13, 16, 16, 16))
    fn = amx_weight_gradient if kernel == "amx" else native_weight_gradient
    args = ((3, 3, 32, 16), (1, 1), ((1, 1), (1, 1)))
    first = np.asarray(fn(x, dy, *args))
    for _ in range(6):
        np.testing.assert_array_equal(np.asarray(fn(x, dy, *args)), first)


# Winograd F(2x2, 3x3) (conv_amx.cc, the `winograd` attribute): AVX-512 BF16 only.
needs_avx512_bf16 = pytest.mark.skipif(not avx512_bf16_available(), reason="no AVX-512 BF16")


@pytest.fixture
def avx512_unit(monkeypatch):
    """The AVX-512 BF16 path (AMX hidden where present), fresh traces before and after."""
    jax.clear_caches()
    monkeypatch.setattr(conv_lib, "amx_available", lambda: False)
    yield
    jax.clear_caches()


def _winograd_bound(x, w):
    """What two bf16 roundings per product may cost: 2^-7 of the conv of |x| and |w|."""
    return 2.0**-7 * _exact_conv(jnp.abs(x), jnp.abs(w), ((1, 1), (1, 1)), 1) + 1e-6


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
@pytest.mark.parametrize(
    "batch,h,w,c,o",
    [
        (1, 32, 32, 32, 16),  # Bands of tile rows; 16-tile runs, one output block.
        (2, 34, 32, 16, 16),  # 17 tile rows: bands of 2-4, the last shorter; two images.
        (3, 16, 16, 64, 128),  # 8 tiles a row: bands of one or two rows.
        # Small inputs (bands of under 8 tiles: all tiles transformed first, shared out by runs):
        (1, 10, 8, 48, 48),  # 5 tile rows of 4: runs of 16 and 4 (8- and 4-tile kernels); NO 2 + 1.
        (1, 8, 8, 16, 32),  # 4 tiles a row.
        (3, 8, 8, 64, 128),
    ],
)
def test_winograd_conv_is_the_conv_within_bf16_roundings(batch, h, w, c, o):
    """Against XLA's exact conv of the bf16-rounded inputs: every output (border tiles,
    which read the zero padding, included) within the error bound, and a different
    computation from the direct pass (so the Winograd path did run)."""
    keys = jax.random.split(jax.random.key(c * o + h), 2)
    x = _bf16(jax.random.normal(keys[0], (batch, h, w, c)))
    k = jax.random.normal(keys[1], (3, 3, c, o)) / np.sqrt(9 * c)
    exact = _exact_conv(x, _bf16(k), ((1, 1), (1, 1)), 1)
    wino = amx_conv(x, k, (1, 1), (1, 1), (h, w), winograd=True)
    direct = amx_conv(x, k, (1, 1), (1, 1), (h, w))
    err = np.abs(np.asarray(wino) - np.asarray(exact))
    assert np.all(err <= _winograd_bound(x, k)), err.max()
    assert not np.array_equal(np.asarray(wino), np.asarray(direct))


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
def test_winograd_reads_parts_and_applies_the_epilogue():
    """Parts (float32 and bf16) read where they lie, bit-identical to their concatenation;
    the folded BatchNorm + ReLU applied to the float32 sums; bf16 out rounds once."""
    keys = jax.random.split(jax.random.key(7), 6)
    parts = [
        jax.random.normal(keys[0], (2, 16, 16, 16)).astype(jnp.bfloat16),
        jax.random.normal(keys[1], (2, 16, 16, 32)),
        jax.random.normal(keys[2], (2, 16, 16, 16)).astype(jnp.bfloat16),
    ]
    k = jax.random.normal(keys[3], (3, 3, 64, 32)) / 24
    scale, shift = jax.random.normal(keys[4], (32,)), jax.random.normal(keys[5], (32,))
    kw = dict(winograd=True, scale=scale, shift=shift)
    got = amx_conv(parts, k, (1, 1), (1, 1), (16, 16), out_dtype=jnp.float32, **kw)
    cat = jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)
    np.testing.assert_array_equal(got, amx_conv(cat, k, (1, 1), (1, 1), (16, 16), **kw))
    plain = amx_conv(cat, k, (1, 1), (1, 1), (16, 16), winograd=True)
    np.testing.assert_allclose(got, jnp.maximum(plain * scale + shift, 0), rtol=1e-5, atol=1e-5)
    assert float(jnp.mean(got == 0)) > 0.3  # The ReLU did clip.
    half = amx_conv(parts, k, (1, 1), (1, 1), (16, 16), out_dtype=jnp.bfloat16, **kw)
    np.testing.assert_array_equal(half, got.astype(jnp.bfloat16))


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
def test_winograd_refuses_convolutions_it_cannot_compute():
    """Dilation 2, or an odd height: one error naming what Winograd needs."""
    x, k = jnp.ones((1, 16, 16, 16)), jnp.ones((3, 3, 16, 16))
    with pytest.raises(Exception, match="winograd=1 needs .*dilation 1"):
        amx_conv(x, k, (2, 2), (2, 2), (16, 16), winograd=True)
    with pytest.raises(Exception, match="even height"):
        amx_conv(jnp.ones((1, 15, 16, 16)), k, (1, 1), (1, 1), (15, 16), winograd=True)


def test_winograd_is_chosen_on_avx512_bf16_for_even_heights(monkeypatch):
    """winograd_fits: AVX-512 BF16 without AMX, an even height, a width of 8s."""
    monkeypatch.setattr(conv_lib, "amx_available", lambda: False)
    monkeypatch.setattr(conv_lib, "avx512_bf16_available", lambda: True)
    fits = conv_lib.winograd_fits
    assert fits(128, 128) and fits(8, 8) and fits(10, 24)
    assert not fits(33, 40)  # Odd height: no whole 2x2 tiles.
    assert not fits(64, 60)  # Width not a multiple of 8.
    monkeypatch.setattr(conv_lib, "amx_available", lambda: True)
    assert not fits(128, 128)  # AMX tiles: the direct pass.
    monkeypatch.setattr(conv_lib, "amx_available", lambda: False)
    monkeypatch.setattr(conv_lib, "avx512_bf16_available", lambda: False)
    assert not fits(128, 128)


def _exact_weight_gradient(x, dy, c, o):
    """XLA's weight gradient of a 3x3 'SAME' conv, float32 products at full precision."""
    return jax.vjp(lambda k: _exact_conv(x, k, ((1, 1), (1, 1)), 1), jnp.zeros((3, 3, c, o)))[1](
        dy
    )[0]


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
@pytest.mark.parametrize(
    "batch,h,w,parts,o",
    [
        (2, 32, 32, (16,), 32),  # One band a 32-px image; two output blocks (NO = 2).
        (1, 130, 128, (16, 16), 32),  # 65 tile rows: bands of 2, the last shorter; two parts.
        (3, 16, 16, (64,), 80),  # Output blocks 3 + 2 (NO = 3, 2); images summed by chunks.
        (2, 8, 8, (32, 16), 48),  # 8 px: one band an image; NO = 3.
    ],
)
def test_winograd_weight_gradient_is_the_exact_one_within_bf16_roundings(batch, h, w, parts, o):
    """Against XLA's exact weight gradient of the same bf16 values: every tap, channel and
    output within the bound of one bf16 rounding of each transform, and not the direct
    pass's bits (so the Winograd path did run)."""
    keys = jax.random.split(jax.random.key(h * o + len(parts)), len(parts) + 1)
    xs = [
        jax.random.normal(kk, (batch, h, w, c)).astype(jnp.bfloat16)
        for kk, c in zip(keys[:-1], parts)
    ]
    dy = jax.random.normal(keys[-1], (batch, h, w, o)).astype(jnp.bfloat16)
    x = jnp.concatenate(xs, axis=-1).astype(jnp.float32)
    c = x.shape[-1]
    args = ((3, 3, c, o), (1, 1), ((1, 1), (1, 1)))
    wino = conv_lib.amx_weight_gradient(xs, dy, *args, winograd=True)
    direct = conv_lib.amx_weight_gradient(xs, dy, *args)
    exact = _exact_weight_gradient(x, dy.astype(jnp.float32), c, o)
    # Each transform holds sums of up to four values (B^T d B, A dY A^T), rounded to bf16
    # once: 2^-8 of the products' magnitudes, spread by G^T . G (weights <= 1).
    bound = 2.0**-6 * _exact_weight_gradient(jnp.abs(x), jnp.abs(dy.astype(jnp.float32)), c, o)
    err = np.abs(np.asarray(wino) - np.asarray(exact))
    assert np.all(err <= np.asarray(bound) + 1e-5), (err / np.asarray(bound)).max()
    # The direct pass: exact products, float32 sums in another order.
    np.testing.assert_allclose(direct, exact, atol=1e-5 * float(np.abs(exact).max()))
    assert not np.array_equal(np.asarray(wino), np.asarray(direct))


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
def test_winograd_weight_gradient_keeps_sixteen_outputs_direct():
    """With one 16-output block Winograd is no faster: those stay the direct pass's bits."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32)).astype(jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(1), (2, 16, 16, 16)).astype(jnp.bfloat16)
    args = ((3, 3, 32, 16), (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_array_equal(
        conv_lib.amx_weight_gradient(x, dy, *args, winograd=True),
        conv_lib.amx_weight_gradient(x, dy, *args),
    )


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
def test_winograd_weight_gradient_of_an_empty_batch_is_zero():
    x = jnp.ones((0, 16, 16, 32), jnp.bfloat16)
    dy = jnp.ones((0, 16, 16, 32), jnp.bfloat16)
    dw = conv_lib.amx_weight_gradient(
        x, dy, (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1)), winograd=True
    )
    np.testing.assert_array_equal(dw, np.zeros((3, 3, 32, 32), np.float32))


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
def test_winograd_weight_gradient_refuses_what_it_cannot_compute():
    """Called directly with dilation 2: one error naming what Winograd needs."""
    call = jax.ffi.ffi_call(
        native.load("conv_amx_wgrad"), jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)
    )
    x = jnp.ones((1, 16, 16, 16))
    with pytest.raises(Exception, match="busi_conv_amx_wgrad: winograd=1 needs"):
        jax.block_until_ready(call(x, x, dil_h=2, dil_w=2, pad_h=2, pad_w=2, unit=1, winograd=1))


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
def test_winograd_gradient_is_the_vjp_within_bf16_roundings():
    """conv_parts(winograd=True): input and weight gradients by Winograd too."""
    keys = jax.random.split(jax.random.key(3), 3)
    x = _bf16(jax.random.normal(keys[0], (2, 32, 32, 32)))
    k = _bf16(jax.random.normal(keys[1], (3, 3, 32, 32)) / 17)
    dy = _bf16(jax.random.normal(keys[2], (2, 32, 32, 32)))
    pads = ((1, 1), (1, 1))

    def grads(fn):
        _, vjp = jax.vjp(fn, x, k)
        return vjp(dy)

    text = jax.jit(lambda x, k: conv_lib.conv_parts([x], k, winograd=True)).lower(x, k).as_text()
    assert "winograd = 1" in text
    gx, gk = grads(lambda x, k: conv_lib.conv_parts([x], k, winograd=True))
    ex, ek = grads(lambda x, k: _exact_conv(x, k, pads, 1))
    bound = 2.0**-7 * _exact_conv(
        jnp.abs(dy), jnp.abs(jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)), pads, 1
    )
    assert np.all(np.abs(np.asarray(gx) - np.asarray(ex)) <= bound + 1e-6)
    k_bound = 2.0**-6 * _exact_weight_gradient(jnp.abs(x), jnp.abs(dy), 32, 32)
    assert np.all(np.abs(np.asarray(gk) - np.asarray(ek)) <= k_bound + 1e-5)
    direct_gk = grads(lambda x, k: conv_lib.conv_parts([x], k))[1]
    assert not np.array_equal(np.asarray(gk), np.asarray(direct_gk))


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
def test_winograd_loss_curve_tracks_xla_and_direct():
    """Six Adam steps of a width-16 U-Net++ with Winograd stay within bf16 noise."""
    kw = dict(name="unetpp", features=16, depth=2, wgrad="native_bf16")
    xla = _loss_curve(6, name="unetpp", features=16, depth=2, wgrad="xla")
    direct = _loss_curve(6, winograd=False, **kw)
    wino = _loss_curve(6, winograd=True, **kw)
    assert wino[-1] < wino[0]
    np.testing.assert_allclose(wino, xla, rtol=1e-2)
    np.testing.assert_allclose(wino, direct, rtol=2e-2)


@needs_avx512_bf16
@pytest.mark.usefixtures("avx512_unit")
def test_winograd_inference_of_a_model_agrees_with_the_direct_pass():
    """A U-Net++ at 64 px, batch 1: the folded inference kernels by Winograd, the same masks."""
    x = jax.random.uniform(jax.random.key(0), (1, 64, 64, 1))
    outs = {}
    for wino in (False, True):
        net = models.create_model(
            dict(name="unetpp", features=16, depth=2, wgrad="native_bf16", winograd=wino)
        )
        v = net.init(jax.random.key(1), x)
        v = jax.tree.map(lambda a: a + 0.1 * jax.random.uniform(jax.random.key(a.size), a.shape), v)
        fn = jax.jit(lambda v, x, net=net: net.apply(v, x, train=False))
        assert ("winograd = 1" in fn.lower(v, x).as_text()) == wino
        outs[wino] = np.asarray(fn(v, x))
    scale = np.abs(outs[False]).max()
    np.testing.assert_allclose(outs[True], outs[False], atol=0.05 * scale)
    assert np.mean((outs[True] > 0) == (outs[False] > 0)) > 0.99
