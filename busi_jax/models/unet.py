"""U-Net (Ronneberger et al., MICCAI 2015) and its SE variant SUNet.

The network is split into :class:`UNetEncoder` and :class:`UNetDecoder` so
that the multi-task model can share the encoder with a classification head.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from busi_jax.models.blocks import (
    NORMS,
    SE_MODES,
    UPSAMPLE_MODES,
    WGRAD_MODES,
    AttentionGate,
    ConvBlock,
    DilatedBottleneck,
    UpSample,
    cam_point,
    check_choice,
    check_divisible,
    skip_and_max_pool2,
)
from busi_jax.models.head import logit_head

Dtype = Any


def _check_common(
    depth: int, features: int, norm: str, se: str, upsample: str | None = None
) -> None:
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if features < 1:
        raise ValueError(f"features must be >= 1, got {features}")
    check_choice("norm", norm, NORMS)
    check_choice("se", se, SE_MODES)
    if upsample is not None:
        check_choice("upsample", upsample, UPSAMPLE_MODES)


class UNetEncoder(nn.Module):
    """Contracting path: ``depth`` conv blocks + max-pools, then a bottleneck.

    Level ``i`` has ``features * 2**i`` channels; the bottleneck (level
    ``depth``) has ``features * 2**depth``.

    Attributes:
      depth: number of 2x downsamplings.
      features: width of level 0.
      norm, se, se_reduction, norm_groups: see :class:`ConvBlock`.
      dilated_bottleneck: use :class:`DilatedBottleneck` at the bottom.
      dilations: dilation rates of the dilated bottleneck.
      dtype: compute dtype.
    """

    depth: int = 4
    features: int = 32
    norm: str = "batch"
    se: str = "none"
    se_reduction: int = 16
    norm_groups: int = 8
    dilated_bottleneck: bool = False
    dilations: Sequence[int] = (1, 2, 4)
    dtype: Dtype = jnp.float32
    wgrad_chunks: int = 1
    wgrad: str = "xla"
    winograd: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[list[jax.Array], jax.Array]:
        """Encodes an image batch.

        Args:
          x: ``[B, H, W, C_in]`` with H, W divisible by ``2**depth``.
          train: BatchNorm mode.

        Returns:
          ``(skips, bottleneck)``: skips[i] is ``[B, H/2**i, W/2**i, f*2**i]``
          for ``i < depth``; bottleneck is ``[B, H/2**d, W/2**d, f*2**d]``.
        """
        check_divisible(x, self.depth)
        kw = dict(
            norm=self.norm,
            se=self.se,
            se_reduction=self.se_reduction,
            norm_groups=self.norm_groups,
            dtype=self.dtype,
            wgrad_chunks=self.wgrad_chunks,
            wgrad=self.wgrad,
            winograd=self.winograd,
        )
        skips = []
        for i in range(self.depth):
            x = ConvBlock(self.features * 2**i, name=f"enc{i}", **kw)(x, train)
            # The models on the C++ conv kernels also pool through one.
            skip, x = skip_and_max_pool2(x, use_kernel=self.wgrad != "xla")
            skips.append(skip)
        width = self.features * 2**self.depth
        if self.dilated_bottleneck:
            x = DilatedBottleneck(width, dilations=tuple(self.dilations), name="bottleneck", **kw)(
                x, train
            )
        else:
            x = ConvBlock(width, name="bottleneck", **kw)(x, train)
        return skips, x


class UNetDecoder(nn.Module):
    """Expanding path: upsample, (gate the skip), concatenate, conv block.

    Attributes:
      depth: number of 2x upsamplings (must match the encoder).
      features: width of level 0.
      upsample: 'transpose', 'bilinear', 'nearest' or 'resize' (bilinear).
      attention: gate each skip with an :class:`AttentionGate` whose gating
        signal is the coarser decoder feature (before upsampling), with
        ``F_int = max(1, C_skip // 2)``.
      norm, se, se_reduction, norm_groups, dtype: see :class:`ConvBlock`.
    """

    depth: int = 4
    features: int = 32
    norm: str = "batch"
    upsample: str = "transpose"
    se: str = "none"
    se_reduction: int = 16
    norm_groups: int = 8
    attention: bool = False
    dtype: Dtype = jnp.float32
    wgrad_chunks: int = 1
    wgrad: str = "xla"
    winograd: bool = True

    @nn.compact
    def __call__(self, skips: Sequence[jax.Array], x: jax.Array, train: bool = False) -> jax.Array:
        """Decodes.

        Args:
          skips: encoder skips, finest first (as returned by the encoder).
          x: bottleneck ``[B, H/2**d, W/2**d, C]``.
          train: BatchNorm mode.

        Returns:
          ``[B, H, W, features]`` full-resolution features.
        """
        if len(skips) != self.depth:
            raise ValueError(f"expected {self.depth} skips, got {len(skips)}")
        for i in reversed(range(self.depth)):
            width = self.features * 2**i
            skip = skips[i]
            up = UpSample(width, self.upsample, dtype=self.dtype, wgrad=self.wgrad, name=f"up{i}")(
                x, inference=not train
            )
            if self.attention:
                skip = AttentionGate(max(1, width // 2), dtype=self.dtype, name=f"att{i}")(skip, x)
            x = ConvBlock(
                width,
                norm=self.norm,
                se=self.se,
                se_reduction=self.se_reduction,
                norm_groups=self.norm_groups,
                dtype=self.dtype,
                wgrad_chunks=self.wgrad_chunks,
                wgrad=self.wgrad,
                winograd=self.winograd,
                name=f"dec{i}",
            )([skip, up.astype(skip.dtype)], train)
        return x


class UNet(nn.Module):
    """U-Net segmenter returning float32 logits.

    Parameter count (norm='batch'/'group', upsample='transpose', se='none',
    no attention, ``C_in`` input channels, ``f_i = features * 2**i``)::

        block(a, b) = 9ab + 9b^2 + 4b
        sum_{i<d} block(C_prev, f_i) + block(f_{d-1}, f_d)         # encoder
        + sum_{i<d} [4 f_{i+1} f_i + f_i + block(2 f_i, f_i)]        # decoder
        + f_0 + 1                                                    # 1x1 head

    e.g. 7,762,465 at the defaults (depth 4, width 32, 1 input channel).

    Attributes:
      depth: number of 2x downsamplings; H and W must be divisible by
        ``2**depth``.
      features: base width (doubles at each level).
      out_channels: logit channels (1 for binary lesion masks).
      norm: 'batch', 'group' or 'none'.
      norm_groups: upper bound on GroupNorm groups.
      upsample: 'transpose' (2x2 stride-2 transposed conv), or 'bilinear',
        'nearest', 'resize' (= bilinear) resize followed by a 3x3 conv.
      se: 'none', 'se', 'sse' or 'scse', applied at the end of every conv
        block (encoder, bottleneck and decoder).
      se_reduction: SE reduction ratio ``r``.
      attention: attention gates on the skip connections.
      dilated_bottleneck: replace the bottleneck block by a dilated cascade.
      dilations: dilation rates of that cascade.
      dtype: compute dtype (params are float32 regardless; the 1x1 head runs
        in float32 so the logits keep full precision).
      wgrad_chunks: batch slices for the weight gradient of the wider,
        coarser convolutions (see :class:`busi_jax.models.blocks.ConvBlock`);
        a speed setting: outputs and parameters do not change.
      wgrad: 'xla' or 'native': every 3x3 conv's weight gradient from the
        C++ kernel (:mod:`busi_jax.models.conv`; built on first use, needs a
        C++ compiler); a speed setting like ``wgrad_chunks``.
      winograd: with the bf16 kernels on AVX-512 BF16 (no AMX), the 3x3
        convolutions' forward passes, input and weight gradients by Winograd
        F(2x2, 3x3) (:func:`busi_jax.models.conv.winograd_fits`; 2.25x fewer
        products; results differ from the direct pass by bf16 roundings);
        False keeps the direct pass. A speed setting.
    """

    depth: int = 4
    features: int = 32
    out_channels: int = 1
    norm: str = "batch"
    norm_groups: int = 8
    upsample: str = "transpose"
    se: str = "none"
    se_reduction: int = 16
    attention: bool = False
    dilated_bottleneck: bool = False
    dilations: Sequence[int] = (1, 2, 4)
    dtype: Dtype = jnp.float32
    wgrad_chunks: int = 1
    wgrad: str = "xla"
    winograd: bool = True

    def __post_init__(self):
        _check_common(self.depth, self.features, self.norm, self.se, self.upsample)
        check_choice("wgrad", self.wgrad, WGRAD_MODES)
        super().__post_init__()

    def _encoder(self) -> UNetEncoder:
        return UNetEncoder(
            depth=self.depth,
            features=self.features,
            norm=self.norm,
            se=self.se,
            se_reduction=self.se_reduction,
            norm_groups=self.norm_groups,
            dilated_bottleneck=self.dilated_bottleneck,
            dilations=tuple(self.dilations),
            dtype=self.dtype,
            wgrad_chunks=self.wgrad_chunks,
            wgrad=self.wgrad,
            winograd=self.winograd,
            name="encoder",
        )

    def _decoder(self) -> UNetDecoder:
        return UNetDecoder(
            depth=self.depth,
            features=self.features,
            norm=self.norm,
            upsample=self.upsample,
            se=self.se,
            se_reduction=self.se_reduction,
            norm_groups=self.norm_groups,
            attention=self.attention,
            dtype=self.dtype,
            wgrad_chunks=self.wgrad_chunks,
            wgrad=self.wgrad,
            winograd=self.winograd,
            name="decoder",
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Segments a batch.

        Args:
          x: ``[B, H, W, C_in]`` float images in [0, 1].
          train: BatchNorm uses batch statistics (True) or running averages.

        Returns:
          float32 logits ``[B, H, W, out_channels]``.
        """
        skips, bottom = self._encoder()(x, train)
        bottom = cam_point(self, "bottleneck", bottom)
        y = self._decoder()(skips, bottom, train)
        y = cam_point(self, "decoder", y)
        return logit_head(self.out_channels, y, name="head")


class SUNet(UNet):
    """SUNet: U-Net with Squeeze-and-Excitation in every encoder, bottleneck
    and decoder conv block (a :class:`UNet` preset with ``se='se'``)."""

    se: str = "se"
