"""U-Net++ (Zhou et al., DLMIA 2018): nested, densely connected skip paths.

Node ``X^{i,j}`` sits at downsampling level ``i`` (``f_i = features * 2**i``
channels) and column ``j``:

* ``X^{i,0}`` is the backbone encoder: ``block(pool(X^{i-1,0}))``;
* ``X^{i,j} = block(concat(X^{i,0}, ..., X^{i,j-1}, up(X^{i+1,j-1})))`` for
  ``j >= 1``, with its own upsampling layer ``up_{i}_{j}: f_{i+1} -> f_i``.

With deep supervision a 1x1 head sits on each of ``X^{0,1} ... X^{0,L}``
(``L = depth``), giving ``K = L`` outputs. Head ``k`` (0-based) only depends
on nodes with ``i + j <= k + 1``, which is what model pruning exploits.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from busi_jax.models.blocks import (
    WGRAD_MODES,
    ConvBlock,
    DilatedBottleneck,
    UpSample,
    cam_point,
    check_choice,
    check_divisible,
    skip_and_max_pool2,
)
from busi_jax.models.head import logit_head
from busi_jax.models.unet import _check_common

Dtype = Any

DS_INFERENCE_MODES = ("mean", "all")


def resolve_head_index(ds_inference: Any, num_heads: int) -> int | None:
    """Maps a ``ds_inference`` setting to a 0-based head index.

    Args:
      ds_inference: 'mean', 'all', or an int (negative counts from the end;
        a string holding an int is accepted so config files can use one type).
      num_heads: number of deep-supervision heads ``K``.

    Returns:
      None for 'mean'/'all', else the head index in ``[0, K)``.

    Raises:
      ValueError: for anything else or an out-of-range index.
    """
    if isinstance(ds_inference, str):
        if ds_inference in DS_INFERENCE_MODES:
            return None
        try:
            ds_inference = int(ds_inference)
        except ValueError:
            raise ValueError(
                f"ds_inference={ds_inference!r} is not valid; use one of "
                f"{DS_INFERENCE_MODES} or a head index"
            ) from None
    if isinstance(ds_inference, bool) or not isinstance(ds_inference, int):
        raise ValueError(
            f"ds_inference={ds_inference!r} is not valid; use one of "
            f"{DS_INFERENCE_MODES} or a head index"
        )
    if not -num_heads <= ds_inference < num_heads:
        raise ValueError(f"ds_inference={ds_inference} out of range for {num_heads} heads")
    return ds_inference % num_heads


class UNetPlusPlus(nn.Module):
    """U-Net++ segmenter returning float32 logits.

    Parameter count (norm='batch'/'group', upsample='transpose', se='none',
    ``C_in`` input channels, ``f_i = features * 2**i``,
    ``block(a, b) = 9ab + 9b^2 + 4b``)::

        sum_{i=0..L} block(C_prev, f_i)                              # X^{i,0}
        + sum_{j=1..L} sum_{i=0..L-j} [4 f_{i+1} f_i + f_i           # up_{i}_{j}
                                       + block((j+1) f_i, f_i)]      # X^{i,j}
        + K (f_0 + 1)                       # heads: K = L with DS, else 1

    e.g. 9,045,249 at the defaults (depth 4, width 32, 1 input channel),
    9,045,348 with deep supervision.

    Attributes:
      depth: ``L``, the number of 2x downsamplings.
      features: base width (doubles at each level).
      out_channels: logit channels.
      norm, norm_groups, upsample, se, se_reduction, dilated_bottleneck,
        dilations, dtype, wgrad_chunks, wgrad, winograd: as in
        :class:`busi_jax.models.unet.UNet` (the
        dilated bottleneck replaces ``X^{L,0}``). Attention gates are not
        offered: the dense skip pathways already re-weight encoder features.
      deep_supervision: heads on every ``X^{0,j}``. With ``train=True`` the
        model returns all ``K = L`` heads stacked ``[K, B, H, W, C]``.
      ds_inference: what ``train=False`` returns with deep supervision:
        'mean' -- the average of the K heads' logits ``[B, H, W, C]``;
        'all' -- the stack ``[K, B, H, W, C]`` (e.g. to evaluate each head);
        int k -- head ``k`` only ``[B, H, W, C]`` (``-1`` is the full model).
        With an int, only the nodes head ``k`` depends on are computed
        (``i + j <= k + 1``), i.e. the pruned, faster model of the paper;
        the other parameters may even be absent from ``variables``.
    """

    depth: int = 4
    features: int = 32
    out_channels: int = 1
    norm: str = "batch"
    norm_groups: int = 8
    upsample: str = "transpose"
    se: str = "none"
    se_reduction: int = 16
    dilated_bottleneck: bool = False
    dilations: Sequence[int] = (1, 2, 4)
    deep_supervision: bool = False
    ds_inference: Any = "mean"
    dtype: Dtype = jnp.float32
    wgrad_chunks: int = 1
    wgrad: str = "xla"
    winograd: bool = True

    def __post_init__(self):
        _check_common(self.depth, self.features, self.norm, self.se, self.upsample)
        check_choice("wgrad", self.wgrad, WGRAD_MODES)
        resolve_head_index(self.ds_inference, self.depth)
        super().__post_init__()

    @property
    def num_heads(self) -> int:
        """Number of outputs ``K`` in deep-supervision training mode."""
        return self.depth if self.deep_supervision else 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Segments a batch.

        Args:
          x: ``[B, H, W, C_in]`` float images in [0, 1], H and W divisible by
            ``2**depth``.
          train: BatchNorm mode; with deep supervision also selects the
            stacked output.

        Returns:
          float32 logits: ``[K, B, H, W, C]`` when deep supervision is on and
          ``train`` is True (or ``ds_inference='all'``), else ``[B, H, W, C]``.
        """
        check_divisible(x, self.depth)
        depth = self.depth
        head_index = None
        if self.deep_supervision and not train:
            head_index = resolve_head_index(self.ds_inference, depth)
        # Column budget: head k reads X^{0,k+1}, which needs i + j <= k + 1.
        # While initialising we build everything so that every parameter
        # exists whatever mode the variables are later applied in.
        cols = depth
        if head_index is not None and not self.is_initializing():
            cols = head_index + 1

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
        nodes: dict[tuple[int, int], jax.Array] = {}
        h = x
        for i in range(cols + 1):
            if i > 0:
                # The skip is rebound: its later uses' cotangents meet the pool's in
                # one kernel pass on the models with C++ conv kernels.
                nodes[(i - 1, 0)], h = skip_and_max_pool2(
                    nodes[(i - 1, 0)], use_kernel=self.wgrad != "xla"
                )
            width = self.features * 2**i
            if i == depth and self.dilated_bottleneck:
                block = DilatedBottleneck(
                    width, dilations=tuple(self.dilations), name=f"X_{i}_0", **kw
                )
            else:
                block = ConvBlock(width, name=f"X_{i}_0", **kw)
            nodes[(i, 0)] = block(h, train)
        # Grad-CAM layers: the deepest backbone node computed (X^{L,0}, or
        # X^{k+1,0} for a pruned head k) and the last top-row node X^{0,L}
        # (X^{0,k+1}), which feeds the final (or selected) head.
        nodes[(cols, 0)] = cam_point(self, "bottleneck", nodes[(cols, 0)])
        for j in range(1, cols + 1):
            for i in range(cols + 1 - j):
                width = self.features * 2**i
                up = UpSample(
                    width, self.upsample, dtype=self.dtype, wgrad=self.wgrad, name=f"up_{i}_{j}"
                )(nodes[(i + 1, j - 1)], inference=not train)
                cat = [nodes[(i, k)] for k in range(j)]
                cat.append(up.astype(cat[0].dtype))
                nodes[(i, j)] = ConvBlock(width, name=f"X_{i}_{j}", **kw)(cat, train)
        nodes[(0, cols)] = cam_point(self, "decoder", nodes[(0, cols)])

        def head(j: int, name: str) -> jax.Array:
            return logit_head(self.out_channels, nodes[(0, j)], name=name)

        if not self.deep_supervision:
            return head(depth, "head")
        if head_index is not None and not self.is_initializing():
            return head(head_index + 1, f"head_{head_index}")
        heads = jnp.stack([head(j, f"head_{j - 1}") for j in range(1, depth + 1)])
        if train or self.ds_inference == "all":
            return heads
        if head_index is not None:  # initialising: all heads were built
            return heads[head_index]
        return jnp.mean(heads, axis=0)
