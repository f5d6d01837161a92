"""Shared building blocks for the segmentation and classification models.

All blocks are NHWC ``flax.linen`` modules. ``dtype`` is the compute dtype;
parameters are always created in float32 (``param_dtype``) so that bfloat16
compute never degrades the optimiser's master weights.

References:
  * Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018 (SE).
  * Roy, Navab & Wachinger, "Concurrent Spatial and Channel 'Squeeze &
    Excitation' in Fully Convolutional Networks", MICCAI 2018 (sSE, scSE).
  * Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas",
    MIDL 2018 (additive attention gates).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from busi_jax.models.conv import (
    amx_conv,
    amx_conv_general_dilated,
    amx_fits,
    amx_winograd_conv_general_dilated,
    chunked_conv,
    conv_parts,
    native_wgrad_conv,
    pack_kernel,
    winograd_fits,
)
from busi_jax.models.norm import BatchNormReLU
from busi_jax.models.packing import check_packed_kernel, packed_entry
from busi_jax.models.pool import max_pool2, skip_and_max_pool2  # noqa: F401 (re-exported)

Dtype = Any

NORMS = ("batch", "group", "none")
SE_MODES = ("none", "se", "sse", "scse")
UPSAMPLE_MODES = ("transpose", "bilinear", "nearest", "resize")
SCSE_COMBINE = ("add", "max")
# Which kernels run the 3x3 convolutions: XLA's own; the C++ weight gradient
# of busi_jax/csrc ('native', built on first use); or all three passes in
# bf16 with float32 sums in busi_jax/csrc/conv_amx.cc: 'native_bf16' on the
# best unit this CPU has (AMX tiles, else AVX-512 BF16), 'native_amx' on AMX
# tiles only. See busi_jax.models.conv.
WGRAD_MODES = ("xla", "native", "native_amx", "native_bf16")
BF16_MODES = ("native_amx", "native_bf16")

PARAM_DTYPE = jnp.float32

# He (Kaiming) init: every conv is followed by a ReLU, and with norm='none'
# the default LeCun init shrinks activations level by level in a deep U-Net.
HE_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

# BatchNorm settings shared by every model: PyTorch-like momentum so running
# statistics settle within a few hundred steps on a small data set like BUSI.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
_BN_ARGS = dict(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, param_dtype=PARAM_DTYPE)


def check_choice(option: str, value: Any, choices: Sequence[Any]) -> None:
    """Raises ValueError if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not valid; choose one of {tuple(choices)}")


def conv(
    features: int,
    kernel: int = 3,
    *,
    use_bias: bool = True,
    dilation: int = 1,
    dtype: Dtype = jnp.float32,
    wgrad_chunks: int = 1,
    wgrad: str = "xla",
    winograd: bool = False,
    name: str | None = None,
) -> nn.Conv:
    """A 'SAME'-padded square convolution with He init and float32 params.

    ``wgrad='native'`` computes its weight gradient with the C++ kernel,
    ``'native_bf16'`` / ``'native_amx'`` also its forward pass and input
    gradient, all in bf16 products with float32 sums (AMX tiles, or AVX-512
    BF16 for 'native_bf16' on CPUs without them) where the shapes allow;
    otherwise ``wgrad_chunks > 1`` computes it in that many batch slices
    (:mod:`busi_jax.models.conv`). Outputs and parameters are the same.
    With the bf16 kernels, ``winograd`` runs the forward pass and input
    gradient by Winograd F(2x2, 3x3) where
    :func:`busi_jax.models.conv.winograd_fits`
    (:data:`busi_jax.models.conv.amx_winograd_conv_general_dilated`).
    """
    check_choice("wgrad", wgrad, WGRAD_MODES)
    if wgrad == "native":
        custom = native_wgrad_conv
    elif wgrad in BF16_MODES:
        custom = amx_winograd_conv_general_dilated if winograd else amx_conv_general_dilated
    else:
        custom = chunked_conv(wgrad_chunks) if wgrad_chunks > 1 else None
    return nn.Conv(
        features,
        (kernel, kernel),
        padding="SAME",
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=PARAM_DTYPE,
        kernel_init=HE_INIT,
        conv_general_dilated=custom,
        name=name,
    )


# Layers whose weight gradient is computed in batch slices when a model sets
# wgrad_chunks: at least this many channels and at most this many pixels.
# Measured on 2 CPU cores, batch 16, 8 slices: 32 ch at 64x64 2.2x faster,
# 64 ch at 32x32 2.4x, 128 ch at 16x16 1.1x; 16 ch at 128x128 2x slower.
WGRAD_MIN_FEATURES = 32
WGRAD_MAX_PIXELS = 64 * 64

# Inference convolutions of at most this many input channels (the scan:
# grayscale or RGB) run as nine shifted multiply-adds: see
# ConvBlock._folds_norm_over_taps.
TAPS_MAX_CHANNELS = 3


def apply_norm(
    kind: str,
    x: jax.Array,
    train: bool,
    *,
    groups: int = 8,
    dtype: Dtype = jnp.float32,
    relu: bool = False,
    kernel: bool = False,
    name: str | None = None,
) -> jax.Array:
    """Applies the configured normalisation layer, optionally followed by ReLU.

    Must be called from inside a parent module's compact method: the norm layer
    is created as a child of that module under ``name``.

    Args:
      kind: 'batch', 'group' or 'none'.
      x: ``[B, H, W, C]`` activations.
      train: batch statistics (True) or running averages (False) for BatchNorm.
      groups: upper bound on GroupNorm groups; the actual count is
        ``gcd(C, groups)`` so that any width works.
      dtype: compute dtype.
      relu: apply ReLU after the norm. With ``kind='batch'`` the pair is then
        one layer, :class:`busi_jax.models.norm.BatchNormReLU`: Flax
        BatchNorm's variables under ``name`` and its values up to rounding,
        with a hand-written gradient 3x faster in bfloat16 on CPU (issue #9).
      kernel: with ``kind='batch'`` and ``relu``, train through the C++
        kernel (``busi_jax/csrc/batch_norm.cc``; see
        :func:`busi_jax.models.norm.batch_norm_relu`).
      name: child module name.

    Returns:
      Normalised (and rectified) ``[B, H, W, C]`` activations.
    """
    check_choice("norm", kind, NORMS)
    if kind == "batch" and relu:
        return BatchNormReLU(dtype=dtype, use_kernel=kernel, name=name, **_BN_ARGS)(x, train)
    if kind == "batch":
        x = nn.BatchNorm(use_running_average=not train, dtype=dtype, name=name, **_BN_ARGS)(x)
    elif kind == "group":
        x = nn.GroupNorm(
            num_groups=math.gcd(x.shape[-1], groups),
            epsilon=BN_EPSILON,
            dtype=dtype,
            param_dtype=PARAM_DTYPE,
            name=name,
        )(x)
    return nn.relu(x) if relu else x


def _norm_relu(block: nn.Module, x: jax.Array, train: bool, i: int) -> jax.Array:
    """``relu(norm{i}(x))`` with ``block``'s norm settings (ConvBlock, DilatedBottleneck)."""
    return apply_norm(
        block.norm,
        x,
        train,
        groups=block.norm_groups,
        dtype=block.dtype,
        relu=True,
        # The models that build C++ kernels for their convolutions also
        # train BatchNorm + ReLU in one.
        kernel=block.wgrad != "xla",
        name=f"norm{i}",
    )


class SqueezeExcitation(nn.Module):
    """Channel Squeeze-and-Excitation (Hu et al. 2018), a.k.a. cSE.

    ``y = x * sigmoid(W2 relu(W1 mean_hw(x)))`` with ``W1: C -> max(1, C // r)``
    and ``W2: max(1, C // r) -> C`` (both with bias), so the block has
    ``2 * C * h + h + C`` parameters where ``h = max(1, C // r)``.

    The per-channel gate ``[B, 1, 1, C]`` is sown to ``intermediates/gate``.

    Attributes:
      reduction: reduction ratio ``r``.
      dtype: compute dtype.
    """

    reduction: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x ``[B, H, W, C]``. Returns: recalibrated ``[B, H, W, C]``."""
        channels = x.shape[-1]
        hidden = max(1, channels // self.reduction)
        # The squeeze is a mean over many pixels: do it in float32 under bf16.
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
        s = nn.Dense(hidden, dtype=self.dtype, param_dtype=PARAM_DTYPE, name="fc1")(s)
        s = nn.relu(s)
        s = nn.Dense(channels, dtype=self.dtype, param_dtype=PARAM_DTYPE, name="fc2")(s)
        gate = nn.sigmoid(s.astype(jnp.float32))
        self.sow("intermediates", "gate", gate)
        return x * gate.astype(x.dtype)


class SpatialSE(nn.Module):
    """Spatial squeeze, channel excitation (sSE, Roy et al. 2018).

    ``y = x * sigmoid(conv1x1_{C->1}(x))``: ``C + 1`` parameters. The
    ``[B, H, W, 1]`` gate is sown to ``intermediates/gate``.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x ``[B, H, W, C]``. Returns: recalibrated ``[B, H, W, C]``."""
        q = conv(1, 1, use_bias=True, dtype=self.dtype, name="squeeze")(x)
        gate = nn.sigmoid(q.astype(jnp.float32))
        self.sow("intermediates", "gate", gate)
        return x * gate.astype(x.dtype)


class ChannelSpatialSE(nn.Module):
    """Concurrent spatial and channel SE (scSE, Roy et al. 2018).

    Runs cSE and sSE in parallel on the same input and combines them by
    element-wise addition (the MICCAI 2018 paper) or max-out (the later
    journal version's best variant).

    Attributes:
      reduction: cSE reduction ratio.
      combine: 'add' or 'max'.
      dtype: compute dtype.
    """

    reduction: int = 16
    combine: str = "add"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x ``[B, H, W, C]``. Returns: recalibrated ``[B, H, W, C]``."""
        check_choice("combine", self.combine, SCSE_COMBINE)
        c = SqueezeExcitation(self.reduction, dtype=self.dtype, name="cse")(x)
        s = SpatialSE(dtype=self.dtype, name="sse")(x)
        return c + s if self.combine == "add" else jnp.maximum(c, s)


def recalibrate(
    mode: str, x: jax.Array, *, reduction: int = 16, dtype: Dtype = jnp.float32, name: str = "se"
) -> jax.Array:
    """Applies the SE variant selected by ``mode`` ('none'|'se'|'sse'|'scse').

    Must be called from inside a parent module's compact method.
    """
    check_choice("se", mode, SE_MODES)
    if mode == "se":
        return SqueezeExcitation(reduction, dtype=dtype, name=name)(x)
    if mode == "sse":
        return SpatialSE(dtype=dtype, name=name)(x)
    if mode == "scse":
        return ChannelSpatialSE(reduction, dtype=dtype, name=name)(x)
    return x


class ConvBlock(nn.Module):
    """(conv3x3 -> norm -> ReLU) x 2, then optional SE recalibration.

    Convs carry a bias only when ``norm='none'`` (a bias before a norm layer is
    cancelled by its mean subtraction). Parameter count for ``C_in -> C``:
    ``9*C_in*C + 9*C*C`` plus ``4*C`` for batch/group norm (scale and bias of
    two norms) or ``2*C`` conv biases for ``norm='none'``, plus the SE block.

    Attributes:
      features: output channels ``C``.
      norm: 'batch', 'group' or 'none'.
      se: 'none', 'se', 'sse' or 'scse'.
      se_reduction: SE reduction ratio.
      norm_groups: upper bound on GroupNorm groups.
      dtype: compute dtype.
      wgrad_chunks: batch slices for the weight gradients of layers with at
        least WGRAD_MIN_FEATURES channels on at most WGRAD_MAX_PIXELS pixels
        (1: XLA's own); outputs and parameters do not change.
      wgrad: 'xla', 'native' (the C++ weight-gradient kernel for every
        conv), 'native_bf16' or 'native_amx' (that, plus bf16 forward and
        input gradient: see :func:`conv`); any but 'xla' overrides
        ``wgrad_chunks``.
      winograd: with the bf16 kernels on AVX-512 BF16 (no AMX), the 3x3
        convolutions' forward passes, input and weight gradients by Winograd
        F(2x2, 3x3) (:func:`busi_jax.models.conv.winograd_fits`,
        :func:`busi_jax.models.conv.amx_conv`); False: the direct pass.
    """

    features: int
    norm: str = "batch"
    se: str = "none"
    se_reduction: int = 16
    norm_groups: int = 8
    dtype: Dtype = jnp.float32
    wgrad_chunks: int = 1
    wgrad: str = "xla"
    winograd: bool = True

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array], train: bool = False) -> jax.Array:
        """Args: x ``[B, H, W, C_in]``, or a sequence of ``[B, H, W, C_k]`` taken
        as their concatenation along channels (``C_in = sum C_k``; U-Net skips).
        Returns: ``[B, H, W, features]``."""
        # The bf16 kernels read the parts where they are (the folded
        # inference kernel, and conv0 in training); any other path convolves
        # their concatenation.
        if isinstance(x, (list, tuple)) and not (
            self._folds_norm(x, train) or self._convolves_parts(x)
        ):
            x = jnp.concatenate(x, axis=-1)
        chunks = self.wgrad_chunks
        first = x[0] if isinstance(x, (list, tuple)) else x
        if self.features < WGRAD_MIN_FEATURES or first.shape[1] * first.shape[2] > WGRAD_MAX_PIXELS:
            chunks = 1
        for i in range(2):
            if self._folds_norm(x, train):
                x = self._amx_conv_norm_relu(x, i)
                continue
            if self._folds_norm_over_taps(x, train):
                x = self._taps_conv_norm_relu(x, i)
                continue
            if isinstance(x, (list, tuple)):
                x = PartsConv(
                    self.features, dtype=self.dtype, winograd=self.winograd, name=f"conv{i}"
                )(x)
                x = _norm_relu(self, x, train, i)
                continue
            x = conv(
                self.features,
                3,
                use_bias=self.norm == "none",
                dtype=self.dtype,
                wgrad_chunks=chunks,
                wgrad=self.wgrad,
                winograd=self.winograd,
                name=f"conv{i}",
            )(x)
            x = _norm_relu(self, x, train, i)
        return recalibrate(self.se, x, reduction=self.se_reduction, dtype=self.dtype, name="se")

    def _folds_norm(self, x: jax.Array | Sequence[jax.Array], train: bool) -> bool:
        # Inference with the AMX kernels: the running-average BatchNorm is an
        # affine map, so it and the ReLU run in the convolution's store
        # instead of as a separate pass over the activations (at batch 1
        # those passes cost about as much as the convolutions' own stores).
        parts = x if isinstance(x, (list, tuple)) else [x]
        fits = all(amx_fits(p.shape[-1], self.features, p.shape[2]) for p in parts)
        return (
            not train
            and self.wgrad in BF16_MODES
            and self.norm == "batch"
            and not self.is_initializing()
            and fits
        )

    def _folds_norm_over_taps(self, x: jax.Array | Sequence[jax.Array], train: bool) -> bool:
        # The same folding for a block reading the scan itself (1-3
        # channels: too few for the bf16 kernels). XLA:CPU runs that 1 -> 16
        # channel conv at ~5 GFLOP/s; as nine shifted multiply-adds with the
        # BatchNorm and ReLU it is one fused loop: the width-16 U-Net++'s
        # batch-1 inference 10.52 -> 10.03 ms (docs/BENCHMARKS.md,
        # fourteenth session).
        return (
            not train
            and not isinstance(x, (list, tuple))
            and x.shape[-1] <= TAPS_MAX_CHANNELS
            and self.wgrad in BF16_MODES
            and self.norm == "batch"
            and not self.is_initializing()
        )

    def _taps_conv_norm_relu(self, x: jax.Array, i: int) -> jax.Array:
        """``relu(norm{i}(conv{i}(x)))`` at ``train=False``, the conv as 9 shifted products."""
        kernel = self.variables["params"][f"conv{i}"]["kernel"]
        scale, shift = self._folded_norm(i)
        h, w = x.shape[1:3]
        xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = sum(
            jnp.sum(xp[:, a : a + h, b : b + w, :, None] * kernel[a, b], axis=-2)
            for a in range(3)
            for b in range(3)
        )
        return jnp.maximum(y * scale + shift, 0).astype(self.dtype)

    def _folded_norm(self, i: int) -> tuple[jax.Array, jax.Array]:
        """The running-average BatchNorm ``norm{i}`` as ``(scale, shift)`` ``[features]``."""
        bn = self.variables["params"][f"norm{i}"]
        stats = self.variables["batch_stats"][f"norm{i}"]
        scale = bn["scale"] * jax.lax.rsqrt(stats["var"] + BN_EPSILON)
        return scale, bn["bias"] - stats["mean"] * scale

    def _convolves_parts(self, x: jax.Array | Sequence[jax.Array]) -> bool:
        # conv_parts has no bias: with norm='none' the convs carry one.
        parts = x if isinstance(x, (list, tuple)) else [x]
        return (
            self.wgrad in BF16_MODES
            and self.norm != "none"
            and all(amx_fits(p.shape[-1], self.features, p.shape[2]) for p in parts)
        )

    def _amx_conv_norm_relu(self, x: jax.Array | Sequence[jax.Array], i: int) -> jax.Array:
        """``relu(norm{i}(conv{i}(x)))`` at ``train=False`` in one AMX call, same variables.

        With a ``'packed'`` entry (:func:`busi_jax.models.packing.pack_inference`)
        the kernel is already in the C++ layout. The folded norm is computed
        here either way: a few ``[features]`` vectors, and computed in the
        same traced graph its float32 bits cannot depend on packing.
        """
        hw = (x[0] if isinstance(x, (list, tuple)) else x).shape[1:3]
        winograd = self.winograd and winograd_fits(*hw)
        kernel = self.variables["params"][f"conv{i}"]["kernel"]
        packed = packed_entry(self, f"conv{i}", lambda: pack_kernel(kernel, winograd=winograd))
        if packed is not None:
            check_packed_kernel(packed, winograd, f"{self.name}/conv{i}")
            kernel = packed
        scale, shift = self._folded_norm(i)
        return amx_conv(
            x,
            kernel,
            (1, 1),
            (1, 1),
            hw,
            scale=scale,
            shift=shift,
            out_dtype=self.dtype,
            winograd=winograd,
            packed=packed is not None,
        )


class PartsConv(nn.Module):
    """The bias-free 3x3 'SAME' :func:`conv` over several inputs' channel concatenation.

    Its parameter is the ``nn.Conv``'s (``kernel [3, 3, sum C_k, features]``,
    He init, float32), so it initialises, trains and checkpoints as
    ``conv(features, use_bias=False)`` applied to ``jnp.concatenate(parts, -1)``;
    :func:`busi_jax.models.conv.conv_parts` computes it on the bf16 kernels
    without writing the concatenation out.

    Attributes:
      features: output channels.
      dtype: compute dtype.
      winograd: see :func:`busi_jax.models.conv.conv_parts`.
    """

    features: int
    dtype: Dtype = jnp.float32
    winograd: bool = False

    @nn.compact
    def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
        """Args: parts ``[B, H, W, C_k]``. Returns: ``[B, H, W, features]``."""
        c = sum(p.shape[-1] for p in parts)
        kernel = self.param("kernel", HE_INIT, (3, 3, c, self.features), PARAM_DTYPE)
        *parts, kernel = nn.dtypes.promote_dtype(*parts, kernel, dtype=self.dtype)
        return conv_parts(parts, kernel, winograd=self.winograd)


class DilatedBottleneck(nn.Module):
    """Cascaded dilated convolutions whose outputs are summed (D-LinkNet style).

    ``y_0 = x``, ``y_k = relu(norm(conv3x3_{dilation d_k}(y_{k-1})))``,
    output ``sum_k y_k`` (k >= 1), then optional SE. With dilations (1, 2, 4)
    the receptive field of the bottleneck grows by 14 pixels at that scale,
    giving lesion-level context without another downsampling.

    Attributes:
      features: output channels.
      dilations: dilation rate of each conv in the cascade.
      norm, se, se_reduction, norm_groups, dtype, wgrad_chunks, wgrad, winograd:
        as in :class:`ConvBlock` (Winograd only for the dilation-1 conv).
    """

    features: int
    dilations: Sequence[int] = (1, 2, 4)
    norm: str = "batch"
    se: str = "none"
    se_reduction: int = 16
    norm_groups: int = 8
    dtype: Dtype = jnp.float32
    wgrad_chunks: int = 1
    wgrad: str = "xla"
    winograd: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Args: x ``[B, H, W, C_in]``. Returns: ``[B, H, W, features]``."""
        if not self.dilations:
            raise ValueError("dilations must not be empty")
        total = None
        y = x
        for i, d in enumerate(self.dilations):
            y = conv(
                self.features,
                3,
                use_bias=self.norm == "none",
                dilation=int(d),
                dtype=self.dtype,
                wgrad_chunks=self.wgrad_chunks,
                wgrad=self.wgrad,
                winograd=self.winograd,
                name=f"conv{i}",
            )(y)
            y = _norm_relu(self, y, train, i)
            total = y if total is None else total + y
        return recalibrate(self.se, total, reduction=self.se_reduction, dtype=self.dtype, name="se")


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018).

    ``alpha = sigmoid(psi(relu(W_x x + W_g g + b_g)) + b_psi)`` is computed at
    the gating signal's (coarser) resolution -- ``W_x`` is a strided conv that
    brings the skip ``x`` down to it -- then resized bilinearly to ``x``'s
    resolution. Bilinear interpolation is a convex combination, so ``alpha``
    stays in ``[0, 1]``. The gate returns ``x * alpha``.

    The coefficients ``[B, H, W, 1]`` (float32) are sown to
    ``intermediates/coefficients``; they are returned only when the caller
    marks 'intermediates' mutable, at no cost otherwise.

    Attributes:
      inter_features: channels ``F_int`` of the joint embedding.
      dtype: compute dtype.
    """

    inter_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, g: jax.Array) -> jax.Array:
        """Gates the skip features.

        Args:
          x: skip features ``[B, H, W, C_x]``.
          g: gating signal ``[B, H/s, W/s, C_g]`` for an integer ``s >= 1``.

        Returns:
          ``[B, H, W, C_x]`` gated skip features.
        """
        b, h, w, _ = x.shape
        gh, gw = g.shape[1:3]
        if h % gh or w % gw:
            raise ValueError(f"gating signal {g.shape} must divide skip resolution {x.shape}")
        sh, sw = h // gh, w // gw
        theta = nn.Conv(
            self.inter_features,
            (sh, sw),
            strides=(sh, sw),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=PARAM_DTYPE,
            name="theta_x",
        )(x)
        phi = nn.Conv(
            self.inter_features,
            (1, 1),
            use_bias=True,
            dtype=self.dtype,
            param_dtype=PARAM_DTYPE,
            name="phi_g",
        )(g)
        f = nn.relu(theta + phi)
        psi = nn.Conv(
            1, (1, 1), use_bias=True, dtype=self.dtype, param_dtype=PARAM_DTYPE, name="psi"
        )(f)
        alpha = nn.sigmoid(psi.astype(jnp.float32))
        if (sh, sw) != (1, 1):
            alpha = jax.image.resize(alpha, (b, h, w, 1), method="bilinear")
        self.sow("intermediates", "coefficients", alpha)
        return x * alpha.astype(x.dtype)


@jax.custom_vjp
def add_channel_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` in ``y``'s dtype, with the bias gradient summed in float32.

    Args:
      y: ``[..., C]`` activations (float32 or bfloat16).
      bias: ``[C]`` float32.

    Returns:
      ``[..., C]`` of ``y``'s dtype.

    Autodiff of a bf16 add sums the bias gradient in bf16: XLA:CPU then
    rounds every partial sum to bf16 and splits the ``[16, 128, 128, C]``
    reduction into a reduce-window op that took ~11 ms per layer in the
    width-16 U-Net++ bf16 step (7 deconvolutions: 7% of the step; profile in
    docs/BENCHMARKS.md, thirteenth session). Summed in float32 it is exact
    to float32 and took ~0.8 ms in a scratch timing.
    """
    return y + bias.astype(y.dtype)


def _add_channel_bias_fwd(y, bias):
    return add_channel_bias(y, bias), bias


def _add_channel_bias_bwd(bias, g):
    dbias = jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=jnp.float32)
    return g, dbias.astype(bias.dtype)


add_channel_bias.defvjp(_add_channel_bias_fwd, _add_channel_bias_bwd)


class Deconv2x2(nn.Module):
    """A 2x2 stride-2 transposed convolution, computed as one matmul and a pixel shuffle.

    Output pixel ``(2i + a, 2j + b)`` is ``x[i, j] @ kernel[1 - a, 1 - b] + bias``:
    the same function, parameters (``kernel [2, 2, C_in, C]``, ``bias [C]``),
    names and initialisation as ``nn.ConvTranspose(C, (2, 2), strides=(2, 2),
    padding='VALID')``, so checkpoints carry over. Why not that module: XLA:CPU
    lowers it to a base-dilated convolution whose training step took 2.5 s of
    the width-16 U-Net++'s 4.4 s step on 2 cores (jax.profiler, issue #9);
    the matmul form's forward and backward run 4-11x faster per layer.

    Attributes:
      features: output channels ``C``.
      dtype: compute dtype (parameters stay float32).
      wgrad: 'native_bf16' / 'native_amx' run the matmul, as a 1x1
        convolution to ``4C`` channels, and both its gradients in the bf16
        conv kernels (bf16 products, float32 sums) where ``C_in`` is a
        multiple of 16 and ``W`` of 8; otherwise, and for 'xla' / 'native',
        the matmul is XLA's.
    """

    features: int
    dtype: Dtype = jnp.float32
    wgrad: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, inference: bool = False) -> jax.Array:
        """Upsamples.

        Args:
          x: ``[B, H, W, C_in]``.
          inference: forward only (no gradient is defined): on the bf16
            kernels the matmul, bias and pixel shuffle are then one kernel
            call (:func:`busi_jax.models.conv.amx_conv` with ``shuffle``),
            reading the packed kernel where
            :func:`busi_jax.models.packing.pack_inference` made one. The bias
            is added to the float32 sums before the one rounding to
            ``dtype`` (training rounds the matmul, then adds).

        Returns:
          ``[B, 2H, 2W, features]``.
        """
        check_choice("wgrad", self.wgrad, WGRAD_MODES)
        b, h, w, c = x.shape
        kernel = self.param("kernel", HE_INIT, (2, 2, c, self.features), PARAM_DTYPE)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), PARAM_DTYPE)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        # The transposed conv applies the kernel flipped in space. One matmul
        # to [.., (a, b, o)], then a swap of the two middle axes whose blocks
        # are whole (b, o) rows: 1.1-2.8x faster, forward and backward, than
        # an einsum straight to [b, h, a, w, b, o], whose gradient XLA:CPU
        # transposed 64 bytes at a time (python -m busi_jax.bench --profile).
        o = self.features
        k = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c, 4 * o)
        if inference and self._on_amx(x) and o % 16 == 0:
            # Not a separate XLA pass over the upsampled activations for the
            # shuffle and bias (what that is worth at batch 1: the A/B in
            # docs/BENCHMARKS.md, sixteenth session).
            packed = packed_entry(self, "kernel", lambda: pack_kernel(k[None, None]))
            return amx_conv(
                x,
                k[None, None] if packed is None else packed,
                (1, 1),
                (0, 0),
                (h, w),
                scale=jnp.ones((4 * o,), jnp.float32),
                shift=jnp.tile(bias, 4),
                out_dtype=x.dtype,
                packed=packed is not None,
                relu=False,
                shuffle=True,
            )
        if self._on_amx(x):
            # With the 3x3 convs on AMX, XLA's matmuls here were the largest
            # remaining convolution-like cost (bf16 ones slower than float32).
            y = amx_conv_general_dilated(
                x, k[None, None], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            ).reshape(b, h, w, 2, 2 * o)
        else:
            y = (x.reshape(b * h * w, c) @ k).reshape(b, h, w, 2, 2 * o)
        return add_channel_bias(y.transpose(0, 1, 3, 2, 4).reshape(b, 2 * h, 2 * w, o), bias)

    def _on_amx(self, x: jax.Array) -> bool:
        return self.wgrad in BF16_MODES and amx_fits(x.shape[-1], 4 * self.features, x.shape[2])


class UpSample(nn.Module):
    """2x spatial upsampling followed by a channel projection.

    'transpose': 2x2 stride-2 transposed conv (``4*C_in*C + C`` params).
    'bilinear' / 'nearest': fixed resize then a 3x3 conv (``9*C_in*C + C``),
    which avoids the checkerboard artefacts transposed convs can produce.
    'resize' is an alias of 'bilinear'.

    Attributes:
      features: output channels ``C``.
      mode: 'transpose', 'bilinear', 'nearest' or 'resize'.
      dtype: compute dtype.
      wgrad: which kernels run the convolution or matmul (see :func:`conv`).
    """

    features: int
    mode: str = "transpose"
    dtype: Dtype = jnp.float32
    wgrad: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, inference: bool = False) -> jax.Array:
        """Args: x ``[B, H, W, C_in]``; inference: see :class:`Deconv2x2`.
        Returns: ``[B, 2H, 2W, features]``."""
        check_choice("upsample", self.mode, UPSAMPLE_MODES)
        if self.mode == "transpose":
            return Deconv2x2(self.features, dtype=self.dtype, wgrad=self.wgrad, name="deconv")(
                x, inference=inference
            )
        b, h, w, c = x.shape
        method = "bilinear" if self.mode == "resize" else self.mode
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method=method)
        return conv(
            self.features, 3, use_bias=True, dtype=self.dtype, wgrad=self.wgrad, name="conv"
        )(x)


def check_divisible(x: jax.Array, depth: int) -> None:
    """Raises ValueError unless H and W are divisible by ``2**depth``."""
    h, w = x.shape[1:3]
    f = 2**depth
    if h % f or w % f:
        raise ValueError(f"input spatial size {(h, w)} must be divisible by 2**depth={f}")


# Grad-CAM hooks (see busi_jax.gradcam): a point named 'x' appears as
# 'cam_x' in the 'perturbations' and 'intermediates' collections.
CAM_PREFIX = "cam_"


def cam_point(module: nn.Module, layer: str, x: jax.Array) -> jax.Array:
    """Marks ``x`` as a Grad-CAM layer of ``module``; returns ``x`` unchanged.

    Ordinary ``init``/``apply`` calls see a no-op: the point only acts when
    ``apply`` is given a 'perturbations' collection (``x`` + that zero array,
    whose gradient is then d(output)/dx) or a mutable 'intermediates'
    collection (``x`` is recorded). It is skipped while initialising so that
    ``init`` still returns only 'params' (and 'batch_stats'), i.e. existing
    checkpoints and training code are unaffected.

    Args:
      module: the module whose scope holds the point (call from a compact
        ``__call__``).
      layer: short layer name, e.g. 'bottleneck'.
      x: feature map ``[B, h, w, C]``.

    Returns:
      ``x`` (plus the perturbation, when one is supplied).
    """
    if module.is_initializing():
        return x
    name = CAM_PREFIX + layer
    module.sow("intermediates", name, x)
    return module.perturb(name, x)
