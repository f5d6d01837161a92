"""Convolutions with faster kernels on CPU (issue #9).

Three ``lax.conv_general_dilated`` replacements. The first two keep XLA's
forward pass and input gradient and give the same weight gradient up to
float rounding; the third trades float32 products for bfloat16 ones:

* :data:`amx_conv_general_dilated` runs the forward pass, the input gradient
  and the weight gradient of stride-1 NHWC convolutions with 16-channel
  multiples on the CPU's AMX tile units, or on CPUs without them on
  AVX-512 BF16 dot products (``busi_jax/csrc/conv_amx.cc``; :func:`bf16_unit`
  picks): bfloat16 products summed in float32, like a bf16 autocast. Loss curves
  track float32 within bf16 rounding (tests/test_conv.py); BUSI runs are
  compared in docs/RESULTS.md and speeds in docs/BENCHMARKS.md.

* :func:`native_wgrad_conv` computes the weight gradient of stride-1 NHWC
  convolutions with a C++ kernel through ``jax.ffi``
  (``busi_jax/csrc/conv_wgrad.cc``, built on first use by
  :mod:`busi_jax.native`); on the project's 2-core machine 1.3-8x XLA's
  speed, except 0.9x at 256 channels on 8 px (``python -m busi_jax.bench --wgrad_layers``,
  table in docs/BENCHMARKS.md). Other convolutions (strides, groups, output
  channels not a multiple of 8, non-CPU backends) keep XLA's gradient.
* :func:`chunked_conv` sums the weight gradients of batch slices (below).

Batch-chunked weight gradient:

XLA:CPU computes a 3x3 convolution's weight gradient at 25-40 GFLOP/s on this
project's 2-core machine, a third of its forward pass (issue #9). Summing the
weight gradients of ``chunks`` slices of the batch gives the same number in
2-2.5x less time for 32-64 channels at 32-64 px, where one slice's operands
fit the cache, and is slower for 16 channels at 128 px (batch 16, 8 slices).
The forward pass and the input gradient are left to XLA unchanged. Whole
train steps: ``python -m busi_jax.bench --jax_wgrad_chunks=1,8`` (see
docs/BENCHMARKS.md).

Use either as ``flax.linen.Conv(conv_general_dilated=...)``;
:func:`busi_jax.models.blocks.conv` does so per layer from the model's
``wgrad`` and ``wgrad_chunks`` settings.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from busi_jax import native


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def _chunked_weight_gradient(lhs, rhs, g, kwargs, chunks):
    def conv(x, w):
        return lax.conv_general_dilated(x, w, **kwargs)

    batch_axis = kwargs["dimension_numbers"].lhs_spec[0]
    out_batch_axis = kwargs["dimension_numbers"].out_spec[0]
    n = lhs.shape[batch_axis]
    k = _largest_divisor(n, chunks)
    step = n // k
    d_rhs = None
    # A Python loop, not lax.map: XLA then sees k independent small
    # convolutions it can schedule and keep in cache; a scan would serialise
    # them through a loop-carried accumulator.
    for i in range(k):
        x = lax.slice_in_dim(lhs, i * step, (i + 1) * step, axis=batch_axis)
        gi = lax.slice_in_dim(g, i * step, (i + 1) * step, axis=out_batch_axis)
        _, vjp_rhs = jax.vjp(lambda w, x=x: conv(x, w), rhs)
        (part,) = vjp_rhs(gi)
        d_rhs = part if d_rhs is None else d_rhs + part
    return d_rhs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(lhs: jax.Array, rhs: jax.Array, static: tuple) -> jax.Array:
    """The convolution; ``static = (kwargs, rule)``: the rule picks the kernels.

    Rules: ``("chunks", k)`` and ``("native", dilation, pads)`` change only the
    weight gradient. (``("amx", dilation, pads)``, all three passes on the
    bf16 kernels, goes to :func:`conv_parts` with one part instead.)
    """
    kwargs, _ = static
    return lax.conv_general_dilated(lhs, rhs, **dict(kwargs))


def _fwd(lhs, rhs, static):
    return _conv(lhs, rhs, static), (lhs, rhs)


def _bwd(static, res, g):
    kwargs, rule = static
    kwargs = dict(kwargs)
    lhs, rhs = res
    _, vjp_lhs = jax.vjp(lambda x: lax.conv_general_dilated(x, rhs, **kwargs), lhs)
    (d_lhs,) = vjp_lhs(g)
    if rule[0] == "chunks":
        d_rhs = _chunked_weight_gradient(lhs, rhs, g, kwargs, rule[1])
    else:
        d_rhs = native_weight_gradient(lhs, g, rhs.shape, rule[1], rule[2]).astype(rhs.dtype)
    return d_lhs, d_rhs


_conv.defvjp(_fwd, _bwd)


_SIGNATURE = inspect.signature(lax.conv_general_dilated)


def _static_kwargs(lhs, rhs, *args, **kwargs) -> tuple:
    """``lax.conv_general_dilated``'s keyword arguments, resolved, as a hashable tuple."""
    bound = _SIGNATURE.bind(lhs, rhs, *args, **kwargs)
    bound.apply_defaults()
    out = []
    for name, value in bound.arguments.items():
        if name in ("lhs", "rhs"):
            continue
        if name == "dimension_numbers":
            value = lax.conv_dimension_numbers(lhs.shape, rhs.shape, value)
        elif name == "padding" and not isinstance(value, str):
            value = tuple(map(tuple, value))
        elif name in ("window_strides", "lhs_dilation", "rhs_dilation") and value is not None:
            value = tuple(value)
        out.append((name, value))
    return tuple(out)


def _replacement(
    rule_for: Callable[[jax.Array, jax.Array, dict], tuple | None], winograd: bool = False
):
    """A ``lax.conv_general_dilated`` look-alike whose weight gradient follows ``rule_for``.

    ``rule_for(lhs, rhs, kwargs)`` returns the rule for :func:`_bwd`, or None
    to leave that convolution, gradient included, to XLA. ``winograd`` goes
    to :func:`conv_parts` for the 'amx' rule.
    """

    def conv_general_dilated(lhs, rhs, *args, **kwargs):
        static = _static_kwargs(lhs, rhs, *args, **kwargs)
        options = dict(static)
        # A batch-grouped conv is already a weight-gradient-shaped conv.
        rule = rule_for(lhs, rhs, options) if options["batch_group_count"] == 1 else None
        if rule is None:
            return lax.conv_general_dilated(lhs, rhs, **options)
        if rule[0] == "amx":
            return conv_parts([lhs], rhs, rule[1], rule[2], winograd=winograd)
        return _conv(lhs, rhs, (static, rule))

    return conv_general_dilated


@functools.cache
def chunked_conv(chunks: int) -> Callable[..., jax.Array]:
    """A ``lax.conv_general_dilated`` replacement with a batch-chunked weight gradient.

    Args:
      chunks: batch slices for the weight gradient (the largest divisor of
        the batch size not above it is used; 1 computes it in one piece).

    Returns:
      A function with ``lax.conv_general_dilated``'s signature; the same
      object for the same ``chunks`` (so Flax modules using it compare equal).
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    return _replacement(lambda lhs, rhs, kwargs: ("chunks", chunks))


# lax's (batch, feature, spatial...) specs for NHWC inputs/outputs, HWIO kernels.
_NHWC = (0, 3, 1, 2)
_HWIO = (3, 2, 0, 1)
NATIVE_LANES = 8  # Output channels must be a multiple of this (busi_jax/csrc: 16- or 8-wide).


def native_weight_gradient(
    x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...], dilation, pads
) -> jax.Array:
    """The weight gradient of a stride-1 NHWC/HWIO convolution, by the C++ kernel.

    Args:
      x: ``[B, H, W, C]`` convolution input.
      dy: ``[B, Ho, Wo, O]`` gradient of the output, ``O`` a multiple of 8.
      kernel_shape: ``(KH, KW, C, O)``.
      dilation: ``(dh, dw)`` kernel dilation.
      pads: ``((lo_h, hi_h), (lo_w, hi_w))`` input padding.

    Returns:
      ``[KH, KW, C, O]`` float32: ``sum_{b,h,w} x[b, h + i*dh - lo_h, w + j*dw - lo_w, c]
      * dy[b, h, w, o]`` with ``x`` zero outside the image.
    """
    f32 = jnp.float32
    return _wgrad_call("conv_wgrad", [x.astype(f32), dy.astype(f32)], kernel_shape, dilation, pads)


def amx_weight_gradient(
    x: jax.Array | Sequence[jax.Array],
    dy: jax.Array,
    kernel_shape: tuple[int, ...],
    dilation,
    pads,
    *,
    winograd: bool = False,
) -> jax.Array:
    """:func:`native_weight_gradient` on AMX tiles: bf16 products, float32 sums.

    Takes float32 or bfloat16 ``x`` and ``dy`` as they are (no cast on the way
    in); needs ``C`` and ``O`` multiples of 16 and ``Wo`` a multiple of 8.
    ``x`` may be a sequence of ``[B, H, W, C_k]`` parts, taken as their
    concatenation along channels without writing it out (as in :func:`amx_conv`).
    ``winograd``: by Winograd F(2x2, 3x3) (2.25x fewer products; the input
    and output-gradient transforms rounded once to bf16, ``G^T M G`` in
    float32) where the conv allows it, as in :func:`amx_conv`, and has
    more than 16 outputs (with 16 it is no faster).
    """
    parts = [_amx_io(p) for p in (x if isinstance(x, (list, tuple)) else [x])]
    out_hw = _out_hw(parts[0].shape[1:3], kernel_shape[:2], dilation, pads)
    # With one 16-output block the Winograd products load a broadcast per
    # multiply-add, and the transforms do not pay: 0.97-1.06x the direct pass
    # (the width-16 U-Net++'s 16-output layers) against 1.08-1.91x from 32
    # outputs up (python -m busi_jax.bench --winograd_layers; docs/BENCHMARKS.md).
    wino = kernel_shape[3] > AMX_CHANNELS and _winograd_applies(
        winograd, out_hw, kernel_shape, dilation, pads
    )
    attrs = {"unit": bf16_unit(), "winograd": int(wino)}
    if len(parts) > 1:
        operands = [_amx_io(dy), *parts]
        return _wgrad_call("conv_amx_concat_wgrad", operands, kernel_shape, dilation, pads, **attrs)
    return _wgrad_call(
        "conv_amx_wgrad", [parts[0], _amx_io(dy)], kernel_shape, dilation, pads, **attrs
    )


def _amx_io(a: jax.Array) -> jax.Array:
    # The AMX kernels read and write float32 or bf16 buffers as they are: a
    # bf16 network's activations then cross the call at half the bytes.
    return a if a.dtype in (jnp.float32, jnp.bfloat16) else a.astype(jnp.float32)


def _wgrad_call(kernel: str, operands, kernel_shape, dilation, pads, **attrs) -> jax.Array:
    target = native.load(kernel)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32))
    return call(
        *operands,
        dil_h=int(dilation[0]),
        dil_w=int(dilation[1]),
        pad_h=int(pads[0][0]),
        pad_w=int(pads[1][0]),
        **attrs,
    )


def _out_hw(in_hw, kernel_hw, dilation, pads) -> tuple[int, int]:
    return tuple(
        int(n + lo + hi - (k - 1) * d)
        for n, k, d, (lo, hi) in zip(in_hw, kernel_hw, dilation, pads)
    )


def amx_conv(
    x: jax.Array | Sequence[jax.Array],
    kernel: jax.Array,
    dilation,
    pad_lo,
    out_hw: tuple[int, int],
    *,
    scale: jax.Array | None = None,
    shift: jax.Array | None = None,
    out_dtype=None,
    winograd: bool = False,
    packed: bool = False,
    relu: bool = True,
    shuffle: bool = False,
) -> jax.Array:
    """A stride-1 NHWC/HWIO convolution on AMX tiles (``busi_jax/csrc/conv_amx.cc``).

    Inputs are rounded to bfloat16 and their products summed in float32, as
    XLA's and PyTorch's bf16 convolutions do. Float32 and bfloat16 buffers
    are read and written as they are.

    Args:
      x: ``[B, H, W, C]``, ``C`` a multiple of 16; or a sequence of such
        arrays ``[B, H, W, C_k]``, convolved as their concatenation along
        channels (``C = sum C_k``) without writing it out (each part is
        copied straight into the kernel's padded tile buffer).
      kernel: ``[KH, KW, C, O]``, ``O`` a multiple of 16.
      dilation: ``(dh, dw)`` kernel dilation.
      pad_lo: ``(top, left)`` zero padding (>= 0); the far side's padding
        follows from ``out_hw``.
      out_hw: ``(Ho, Wo)``, ``Wo`` a multiple of 8.
      scale, shift: optional ``[O]``: the output becomes ``max(0, conv * scale
        + shift)``, applied to the float32 sums before the one rounding to the
        output dtype (an eval-mode BatchNorm and ReLU in the store: no extra
        pass over the activations). Forward only: no gradient is defined.
      out_dtype: float32 or bfloat16; default bfloat16 if ``x`` and ``kernel``
        both are, else float32.
      winograd: compute it by Winograd F(2x2, 3x3) (2.25x fewer products;
        the transformed input and kernel are rounded to bf16, so results
        differ from the direct pass by a few bf16 roundings). Only for the
        AVX-512 BF16 unit (:func:`winograd_fits`), a 3x3 kernel, dilation 1,
        padding 1 and a same-size output of even height.
      packed: ``kernel`` is :func:`pack_kernel`'s output for the same
        ``winograd`` (``[4, 4, C, O]`` bf16 for Winograd): the call skips
        that kernel-only work. Same results as the unpacked kernel, bit for
        bit. Forward only: no gradient is defined.
      relu: with ``scale`` and ``shift``, end the epilogue in the ReLU;
        False: ``conv * scale + shift`` (a bias, for ``shuffle``).
      shuffle: a 2x2 pixel shuffle in the store: conv channel
        ``(a * 2 + b) * O / 4 + o`` of pixel ``(h, w)`` goes to output pixel
        ``(2h + a, 2w + b)``, channel ``o``. A stride-2 2x2 transposed conv
        as a 1x1 conv (see :class:`busi_jax.models.blocks.Deconv2x2`)
        without a separate shuffle pass. Needs ``O / 4`` a multiple of 16
        and ``winograd`` False. Forward only.

    Returns:
      ``[B, Ho, Wo, O]`` of ``out_dtype``; ``[B, 2 Ho, 2 Wo, O / 4]`` with
      ``shuffle``.
    """
    parts = [_amx_io(p) for p in (x if isinstance(x, (list, tuple)) else [x])]
    kernel = kernel if packed else _amx_io(kernel)
    shape = (parts[0].shape[0], *out_hw, kernel.shape[3])
    if shuffle:
        shape = (shape[0], 2 * shape[1], 2 * shape[2], shape[3] // 4)
    if out_dtype is None:
        both_bf16 = all(p.dtype == jnp.bfloat16 for p in parts) and kernel.dtype == jnp.bfloat16
        out_dtype = jnp.bfloat16 if both_bf16 else jnp.float32
    args = [parts[0], kernel]
    name = "conv_amx"
    if len(parts) > 1 and scale is None:
        name = "conv_amx_concat"
        args = [kernel, *parts]
    elif len(parts) > 1:
        name = "conv_amx_concat_affine_relu"
        args = [kernel, scale.astype(jnp.float32), shift.astype(jnp.float32), *parts]
    elif scale is not None:
        name = "conv_amx_affine_relu"
        args += [scale.astype(jnp.float32), shift.astype(jnp.float32)]
    call = jax.ffi.ffi_call(native.load(name), jax.ShapeDtypeStruct(shape, out_dtype))
    return call(
        *args,
        dil_h=int(dilation[0]),
        dil_w=int(dilation[1]),
        pad_h=int(pad_lo[0]),
        pad_w=int(pad_lo[1]),
        unit=bf16_unit(),
        winograd=int(winograd),
        packed=int(packed),
        relu=int(relu),
        shuffle=int(shuffle),
    )


def pack_kernel(kernel: jax.Array, *, winograd: bool = False) -> jax.Array:
    """A kernel in the layout :func:`amx_conv` reads with ``packed=True``.

    Each :func:`amx_conv` call otherwise rounds its kernel to bf16 and
    reorders it (Winograd: also transforms it, ``G g G^T``) before any
    product; for fixed weights (inference) that work can be done once. At
    batch 1 it is a large share of a call on the narrow, deep layers (a
    256 -> 256 channel 3x3 kernel is 2.4 MB of float32 for 64 output pixels
    at 8x8).

    Args:
      kernel: ``[KH, KW, C, O]`` float32 or bfloat16, ``C`` and ``O``
        multiples of 16; ``[3, 3, C, O]`` for ``winograd``.
      winograd: pack for :func:`amx_conv`'s ``winograd=True`` (AVX-512 BF16
        only, :func:`winograd_fits`).

    Returns:
      bfloat16 ``[4, 4, C, O]`` (winograd) or ``[KH, KW, C, O]``: opaque,
      valid only for this machine's :func:`bf16_unit` and the same
      ``winograd``.
    """
    kh, kw, c, o = kernel.shape
    shape = (4, 4, c, o) if winograd else (kh, kw, c, o)
    call = jax.ffi.ffi_call(native.load("conv_amx_pack"), jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    return call(_amx_io(kernel), unit=bf16_unit(), winograd=int(winograd))


def _transposed_pads(kernel_hw, dilation, pads) -> tuple:
    # The input gradient of a stride-1 conv is a conv of dy with the kernel
    # flipped; each side's padding becomes the kernel's reach minus the old one.
    return tuple(
        ((k - 1) * d - lo, (k - 1) * d - hi) for k, d, (lo, hi) in zip(kernel_hw, dilation, pads)
    )


def amx_input_gradient(
    dy: jax.Array,
    kernel: jax.Array,
    dilation,
    pads,
    in_hw: tuple[int, int],
    *,
    winograd: bool = False,
) -> jax.Array:
    """``d conv(x, kernel) / dx`` applied to ``dy`` ``[B, Ho, Wo, O]``, on AMX.

    ``winograd``: as in :func:`amx_conv`, where the transposed conv allows it.

    Returns:
      ``[B, H, W, C]`` (``(H, W) = in_hw``), dtype as in :func:`amx_conv`.
    """
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    back = _transposed_pads(kernel.shape[:2], dilation, pads)
    lo = tuple(p[0] for p in back)
    wino = _winograd_applies(winograd, in_hw, flipped.shape, dilation, back)
    return amx_conv(dy, flipped, dilation, lo, in_hw, winograd=wino)


def conv_parts(
    parts: Sequence[jax.Array],
    kernel: jax.Array,
    dilation=(1, 1),
    pads=((1, 1), (1, 1)),
    winograd: bool = False,
) -> jax.Array:
    """A stride-1 conv of the channel concatenation of ``parts``, differentiable, on the bf16 kernels.

    With one part, the convolution :data:`amx_conv_general_dilated` runs.

    The same function and gradients as ``amx_conv_general_dilated`` applied
    to ``jnp.concatenate(parts, -1)``, without writing the concatenation out:
    the forward pass and the weight gradient copy each part straight into
    their padded buffers (in a U-Net's decoder that copy was a separate
    pass over the skip and upsampled activations, ~6% of the width-16
    U-Net++ bf16 step); the input gradient is computed whole and sliced.

    Args:
      parts: ``[B, H, W, C_k]`` arrays, each ``C_k`` a multiple of 16,
        float32 or bfloat16.
      kernel: ``[KH, KW, sum C_k, O]``, ``O`` a multiple of 16.
      dilation: ``(dh, dw)``.
      pads: ``((lo_h, hi_h), (lo_w, hi_w))`` zero padding; the output width
        must be a multiple of 8.
      winograd: all three passes (forward, input and weight gradients) by
        Winograd F(2x2, 3x3) where the conv allows it (3x3, dilation 1,
        padding 1; :func:`winograd_fits`; see :func:`amx_conv` and
        :func:`amx_weight_gradient`).

    Returns:
      ``[B, Ho, Wo, O]`` in the parts' and kernel's result dtype.
    """
    static = (
        tuple(int(d) for d in dilation),
        tuple(tuple(int(v) for v in p) for p in pads),
        bool(winograd),
    )
    return _conv_parts(tuple(parts), kernel, static)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_parts(parts: tuple, kernel: jax.Array, static: tuple) -> jax.Array:
    dilation, pads, winograd = static
    out_hw = _out_hw(parts[0].shape[1:3], kernel.shape[:2], dilation, pads)
    wino = _winograd_applies(winograd, out_hw, kernel.shape, dilation, pads)
    y = amx_conv(list(parts), kernel, dilation, tuple(p[0] for p in pads), out_hw, winograd=wino)
    return y.astype(jnp.result_type(*(p.dtype for p in parts), kernel.dtype))


def _conv_parts_fwd(parts, kernel, static):
    return _conv_parts(parts, kernel, static), (parts, kernel)


def _conv_parts_bwd(static, res, g):
    dilation, pads, winograd = static
    parts, kernel = res
    d_x = amx_input_gradient(g, kernel, dilation, pads, parts[0].shape[1:3], winograd=winograd)
    d_parts, start = [], 0
    for p in parts:
        d_parts.append(d_x[..., start : start + p.shape[-1]].astype(p.dtype))
        start += p.shape[-1]
    d_kernel = amx_weight_gradient(list(parts), g, kernel.shape, dilation, pads, winograd=winograd)
    return tuple(d_parts), d_kernel.astype(kernel.dtype)


_conv_parts.defvjp(_conv_parts_fwd, _conv_parts_bwd)


AMX_CHANNELS = 16  # C and O must be multiples of this (one AMX tile column block).
AMX_WIDTH = 8  # Input and output widths must be multiples of this (tile rows).
# The bf16 kernels' `unit` attribute: which part of the CPU multiplies.
UNIT_AMX = 0
UNIT_AVX512_BF16 = 1


@functools.cache
def amx_available() -> bool:
    """Whether this CPU reports AMX bf16 tiles (Linux ``/proc/cpuinfo``)."""
    return {"amx_tile", "amx_bf16"} <= set(native.cpu_flags().split())


@functools.cache
def avx512_bf16_available() -> bool:
    """Whether this CPU reports AVX-512 with its bf16 dot product (``vdpbf16ps``)."""
    return {"avx512f", "avx512_bf16"} <= set(native.cpu_flags().split())


def bf16_unit() -> int:
    """The unit the bf16 conv kernels use here: AMX tiles, else AVX-512 BF16.

    Raises:
      native.NativeBuildError: this CPU has neither.
    """
    if amx_available():
        return UNIT_AMX
    if avx512_bf16_available():
        return UNIT_AVX512_BF16
    raise native.NativeBuildError(
        "the bf16 conv kernels need a CPU with AMX bf16 tiles or AVX-512 BF16; "
        "use model.wgrad='native' or 'xla'"
    )


def winograd_fits(height: int, width: int) -> bool:
    """Whether a 3x3 'SAME' conv with this output size runs by Winograd here.

    True on CPUs whose bf16 kernels use AVX-512 BF16 (AMX's tile products
    are fast enough that the transforms would not pay), for an even height
    and a width of a multiple of 8. Timed per layer on an AMD EPYC (2 cores,
    bf16 in and out; every 3x3 conv shape of the width-16 U-Net++, 8x8 to
    128x128 px, 16 to 256 channels), Winograd ran 1.24-1.94x as fast as the
    direct pass at batch 16 and 0.98-1.67x at batch 1
    (``python -m busi_jax.bench --winograd_layers``; docs/BENCHMARKS.md,
    fourteenth session).
    """
    return (
        not amx_available()
        and avx512_bf16_available()
        and height % 2 == 0
        and width % AMX_WIDTH == 0
    )


def _winograd_applies(winograd: bool, hw, kernel_shape, dilation, pads) -> bool:
    """``winograd`` requested and the conv (``kernel_shape [KH, KW, C, O]``) suits it."""
    return (
        winograd
        and tuple(kernel_shape[:2]) == (3, 3)
        and tuple(dilation) == (1, 1)
        and tuple(map(tuple, pads)) == ((1, 1), (1, 1))
        and winograd_fits(*hw)
    )


def bf16_kernels_available() -> bool:
    """Whether :func:`amx_conv` and :func:`amx_weight_gradient` can run on this CPU."""
    return amx_available() or avx512_bf16_available()


def amx_fits(c_in: int, c_out: int, width: int) -> bool:
    """Whether a stride-1 NHWC conv of these sizes can run on this machine's AMX tiles."""
    return (
        c_in % AMX_CHANNELS == 0
        and c_out % AMX_CHANNELS == 0
        and width % AMX_WIDTH == 0
        and jax.default_backend() == "cpu"
        and bf16_kernels_available()
    )


def amx_selftest() -> None:
    """Runs one tiny AMX convolution and checks its answer.

    ``/proc/cpuinfo`` can list AMX on a machine whose kernel still refuses
    the tile state (an old Linux, some sandboxes); this finds out before a
    training run, not inside its first step.

    Raises:
      native.NativeBuildError: the kernel cannot be built or run here, or
        computes a wrong sum.
    """
    try:
        y = amx_conv(jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 16)), (1, 1), (1, 1), (8, 8))
        centre = float(y[0, 4, 4, 0])
    except native.NativeBuildError:
        raise
    except Exception as e:  # XLA wraps the kernel's own error message.
        raise native.NativeBuildError(f"the AMX kernel cannot run on this machine: {e}") from None
    if centre != 144.0:  # 3 x 3 taps x 16 channels of ones.
        raise native.NativeBuildError(f"the AMX kernel's self-test summed {centre}, not 144")


def _amx_rule(lhs, rhs, kwargs) -> tuple | None:
    rule = _native_rule(lhs, rhs, kwargs)
    if rule is None or not bf16_kernels_available():
        return rule
    _, dilation, pads = rule
    out_hw = _out_hw(lhs.shape[1:3], rhs.shape[:2], dilation, pads)
    back = _transposed_pads(rhs.shape[:2], dilation, pads)
    eligible = (
        lhs.shape[3] % AMX_CHANNELS == 0
        and rhs.shape[3] % AMX_CHANNELS == 0
        and out_hw[1] % AMX_WIDTH == 0
        and lhs.shape[2] % AMX_WIDTH == 0
        and min(out_hw) > 0
        and all(lo >= 0 for lo, _ in pads)
        and all(lo >= 0 for lo, _ in back)
    )
    return ("amx", dilation, pads) if eligible else rule


def _native_rule(lhs, rhs, kwargs) -> tuple | None:
    dn = kwargs["dimension_numbers"]
    strides = kwargs["window_strides"]
    dilation = kwargs["rhs_dilation"] or (1,) * (lhs.ndim - 2)
    eligible = (
        lhs.ndim == 4
        and tuple(dn.lhs_spec) == _NHWC
        and tuple(dn.out_spec) == _NHWC
        and tuple(dn.rhs_spec) == _HWIO
        and all(s == 1 for s in strides)
        and all(d == 1 for d in (kwargs["lhs_dilation"] or (1, 1)))
        and kwargs["feature_group_count"] == 1
        and rhs.shape[3] % NATIVE_LANES == 0
        and jax.default_backend() == "cpu"
    )
    if not eligible:
        return None
    padding = kwargs["padding"]
    if isinstance(padding, str):
        effective = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], effective, strides, padding)
    return ("native", tuple(dilation), tuple(tuple(p) for p in padding))


native_wgrad_conv = _replacement(_native_rule)
native_wgrad_conv.__doc__ = """``lax.conv_general_dilated`` whose weight gradient runs in the C++ kernel where it can.

Same signature and forward result as ``lax.conv_general_dilated``. The
kernel takes stride-1, ungrouped, 2-D NHWC/HWIO convolutions with a
multiple of 8 output channels on the CPU backend; anything else is
passed to XLA unchanged, gradient included.
"""

amx_conv_general_dilated = _replacement(_amx_rule)
amx_conv_general_dilated.__doc__ = """``lax.conv_general_dilated`` on AMX tiles in bf16 where it can.

Where :func:`_amx_rule` accepts a convolution (the C++ weight gradient's
conditions, plus 16-channel multiples, widths a multiple of 8 and an AMX
CPU), its forward pass and input gradient run in :func:`amx_conv` and its
weight gradient in :func:`amx_weight_gradient` (bf16 products, float32
sums); otherwise it behaves as :data:`native_wgrad_conv`.
"""

amx_winograd_conv_general_dilated = _replacement(_amx_rule, winograd=True)
amx_winograd_conv_general_dilated.__doc__ = """:data:`amx_conv_general_dilated` with ``winograd=True``.

Its 3x3 'SAME' convolutions' forward passes, input gradients and weight
gradients run by Winograd F(2x2, 3x3) where :func:`winograd_fits`
(AVX-512 BF16 CPUs only); every other convolution as
:data:`amx_conv_general_dilated`.
"""
