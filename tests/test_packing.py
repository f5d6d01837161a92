"""Weights packed once for inference (busi_jax/models/packing.py) change speed, not outputs."""

import jax
import jax.numpy as jnp
import pytest

from busi_jax import models
from busi_jax.models import blocks
from busi_jax.models.conv import amx_conv, bf16_kernels_available, pack_kernel, winograd_fits
from busi_jax.models.packing import PACKED, pack_inference

needs_bf16 = pytest.mark.skipif(
    not bf16_kernels_available(), reason="this CPU has neither AMX nor AVX-512 BF16"
)
# Winograd runs only on AVX-512 BF16 without AMX (winograd_fits).
needs_winograd = pytest.mark.skipif(
    not (bf16_kernels_available() and winograd_fits(8, 8)), reason="no Winograd path here"
)
WINOGRAD = [False, pytest.param(True, marks=needs_winograd)]


def _inputs(key, hw, channels):
    keys = jax.random.split(key, len(channels))
    # One bf16 part and one float32 part: the kernels read both as they are.
    return [
        jax.random.normal(k, (2, *hw, c), jnp.bfloat16 if i == 0 else jnp.float32)
        for i, (k, c) in enumerate(zip(keys, channels))
    ]


@needs_bf16
@pytest.mark.parametrize("winograd", WINOGRAD)
@pytest.mark.parametrize("kernel_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("affine", [False, True])
def test_packed_kernel_gives_the_same_bits(winograd, kernel_dtype, affine):
    hw, channels, out = (16, 16), (32, 16), 32
    parts = _inputs(jax.random.key(0), hw, channels)
    kk, ks, kb = jax.random.split(jax.random.key(1), 3)
    kernel = (jax.random.normal(kk, (3, 3, sum(channels), out)) / 8).astype(kernel_dtype)
    extra = {}
    if affine:
        extra = {"scale": jax.random.normal(ks, (out,)), "shift": jax.random.normal(kb, (out,))}
    run = lambda k, packed: amx_conv(
        parts,
        k,
        (1, 1),
        (1, 1),
        hw,
        out_dtype=jnp.bfloat16,
        winograd=winograd,
        packed=packed,
        **extra,
    )
    packed = pack_kernel(kernel, winograd=winograd)
    assert packed.dtype == jnp.bfloat16
    assert packed.shape == ((4, 4) if winograd else (3, 3)) + kernel.shape[2:]
    want = run(kernel, False)
    assert float(jnp.max(jnp.abs(want.astype(jnp.float32)))) > 1.0  # Not all zeros.
    assert jnp.array_equal(run(packed, True), want)


@needs_bf16
def test_packed_1x1_kernel_gives_the_same_bits():
    # The transposed convs' matmul: a 1x1 conv on the direct pass.
    (x,) = _inputs(jax.random.key(2), (8, 8), (32,))
    kernel = jax.random.normal(jax.random.key(3), (1, 1, 32, 64))
    run = lambda k, packed: amx_conv(
        x, k, (1, 1), (0, 0), (8, 8), out_dtype=jnp.float32, packed=packed
    )
    assert jnp.array_equal(run(pack_kernel(kernel), True), run(kernel, False))


@needs_bf16
def test_unpacked_kernel_marked_packed_is_refused():
    (x,) = _inputs(jax.random.key(4), (8, 8), (16,))
    kernel = jnp.ones((3, 3, 16, 16), jnp.float32)  # float32: cannot be a packed kernel.
    with pytest.raises(Exception, match="packed=1 needs the bf16 kernel"):
        jax.block_until_ready(amx_conv(x, kernel, (1, 1), (1, 1), (8, 8), packed=True))


def _model(name, wgrad="native_bf16", dtype="bfloat16"):
    return models.create_model(
        {"name": name, "features": 16, "depth": 2, "dtype": dtype, "wgrad": wgrad}
    )


def _trained_like(variables, key):
    """Every variable moved off its initial value (BatchNorm statistics and biases are
    0 / 1 at init, which would hide a fold computed differently); variances stay positive."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    moved = []
    for i, (path, a) in enumerate(leaves):
        a = a + 0.3 * jax.random.normal(jax.random.fold_in(key, i), a.shape)
        moved.append(jnp.abs(a) + 0.5 if "var" in str(path[-1]) else a)
    return jax.tree_util.tree_unflatten(treedef, moved)


@needs_bf16
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", ["unetpp", "unet", "sunet"])
def test_pack_inference_keeps_the_outputs_bit_for_bit(name, dtype):
    model = _model(name, dtype=dtype)
    x = jax.random.uniform(jax.random.key(5), (1, 32, 32, 1))
    variables = model.init(jax.random.key(6), x, train=False)
    assert PACKED not in variables  # init packs nothing (every collection is mutable there).
    variables = _trained_like(variables, jax.random.key(8))
    packed = pack_inference(model, variables, x)
    assert set(packed) == {"params", "batch_stats", PACKED}
    # Every 3x3 conv on the bf16 kernels has its entry; the first (1-channel) one does not.
    assert len(jax.tree.leaves(packed[PACKED])) >= 3 * 3
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    # Any batch size: the packing depends on the input's height, width and channels.
    x4 = jax.random.uniform(jax.random.key(7), (4, 32, 32, 1))
    for inputs in (x, x4):
        want = apply(variables, inputs)
        assert jnp.array_equal(apply(packed, inputs), want)
    # Packing again replaces the collection rather than reading the old one.
    again = pack_inference(model, packed, x)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, again[PACKED], packed[PACKED]))


def test_pack_inference_adds_nothing_on_xla_kernels():
    model = _model("unetpp", wgrad="xla")
    x = jnp.zeros((1, 32, 32, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    assert set(pack_inference(model, variables, x)) == {"params", "batch_stats"}


@needs_winograd
def test_kernel_packed_for_another_input_size_is_refused():
    # An even height runs by Winograd, an odd one directly: other layouts.
    block = blocks.ConvBlock(16, dtype=jnp.bfloat16, wgrad="native_bf16")
    x = jnp.ones((1, 8, 16, 16))
    variables = block.init(jax.random.key(0), x, train=False)
    _, made = block.apply(variables, x, train=False, mutable=[PACKED])
    with pytest.raises(ValueError, match=r"conv0: its packed kernel .* Winograd.*pack_inference"):
        block.apply({**variables, **made}, jnp.ones((1, 9, 16, 16)), train=False)
