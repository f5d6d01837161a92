"""CNN lesion classifier and the segmentation-guided input builder."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from busi_jax.models.blocks import (
    NORMS,
    PARAM_DTYPE,
    ConvBlock,
    cam_point,
    check_choice,
    max_pool2,
)

Dtype = Any

CLASSIFIER_INPUT_MODES = ("image", "image_mask", "masked")


def classifier_input_channels(mode: str) -> int:
    """Number of channels :func:`classifier_inputs` produces for ``mode``."""
    check_choice("mode", mode, CLASSIFIER_INPUT_MODES)
    return 2 if mode == "image_mask" else 1


def dilate_mask(mask: jax.Array, margin: int) -> jax.Array:
    """Grey-level dilation by a ``(2*margin+1)`` square (max filter).

    Args:
      mask: ``[B, H, W, 1]`` mask or probabilities in [0, 1].
      margin: dilation radius in pixels (0 returns ``mask`` unchanged).

    Returns:
      ``[B, H, W, 1]`` dilated mask, same dtype.
    """
    if margin <= 0:
        return mask
    k = 2 * margin + 1
    return nn.max_pool(mask, (k, k), strides=(1, 1), padding="SAME")


def classifier_inputs(
    image: jax.Array, mask: jax.Array | None = None, mode: str = "image", margin: int = 5
) -> jax.Array:
    """Builds the classifier input from a scan and a lesion mask.

    ``mode`` and ``margin`` are Python values: under ``jax.jit`` pass them as
    static arguments.

    Args:
      image: ``[B, H, W, 1]`` scan in [0, 1] (``[B, H, W]`` is accepted).
      mask: ``[B, H, W, 1]`` (or ``[B, H, W]``) binary ground-truth mask or
        soft predicted probabilities; unused for mode 'image'.
      mode: 'image' -- the scan only, ``[B, H, W, 1]``;
        'image_mask' -- scan and mask as two channels, ``[B, H, W, 2]``;
        'masked' -- the scan multiplied by the mask dilated by ``margin``
        pixels (square max filter), ``[B, H, W, 1]``. The margin keeps the
        lesion border and a rim of surrounding tissue -- margin shape and
        posterior shadowing are diagnostic -- while suppressing the rest of
        the scan. Multiplying (rather than cropping to the bounding box and
        resizing) keeps the lesion's absolute size, which is itself a cue,
        and is trivially jit-able. An empty mask (e.g. a 'normal' scan)
        yields an all-zero input.
      margin: dilation radius in pixels for mode 'masked'.

    Returns:
      The classifier input, dtype of ``image``.
    """
    check_choice("mode", mode, CLASSIFIER_INPUT_MODES)
    if image.ndim == 3:
        image = image[..., None]
    if mode == "image":
        return image
    if mask is None:
        raise ValueError(f"mode={mode!r} needs a mask")
    if mask.ndim == 3:
        mask = mask[..., None]
    mask = mask.astype(image.dtype)
    if mode == "image_mask":
        return jnp.concatenate([image, mask], axis=-1)
    return image * dilate_mask(mask, margin)


class ClassHead(nn.Module):
    """GAP -> dense(hidden) -> ReLU -> dropout -> dense(num_classes).

    The last layer runs in float32 so logits keep full precision under bf16.

    Attributes:
      num_classes: 1 -> output ``[B]``; >= 2 -> ``[B, num_classes]``.
      hidden: hidden width.
      dropout: dropout rate (active when train=True).
      dtype: compute dtype of the hidden layer.
    """

    num_classes: int = 1
    hidden: int = 128
    dropout: float = 0.3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Args: x ``[B, h, w, C]``. Returns: float32 ``[B]`` or ``[B, K]``."""
        # Pool in float32: a bf16 mean over many pixels loses precision.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=PARAM_DTYPE, name="fc_hidden")(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=PARAM_DTYPE, name="fc_out")(x)
        x = x.astype(jnp.float32)
        return x[:, 0] if self.num_classes == 1 else x


class Classifier(nn.Module):
    """VGG-style CNN: [ConvBlock -> 2x2 max-pool] per stage, global average
    pool, dense -> ReLU -> dropout -> dense.

    Designed for 128x128 inputs (four stages leave an 8x8 map), but global
    average pooling makes it accept any size divisible by ``2**len(features)``.
    Parameter count (norm='batch', ``C_in`` channels,
    ``block(a, b) = 9ab + 9b^2 + 4b``)::

        sum_s block(C_prev, f_s) + (f_last + 1) * hidden + (hidden + 1) * K

    e.g. 310,353 at the defaults with one input channel and ``K = 1``.

    Attributes:
      num_classes: 1 -> one benign-vs-malignant logit per image, output
        ``[B]`` (use a sigmoid loss); >= 2 -> logits ``[B, num_classes]``
        (e.g. 3 for normal/benign/malignant; use softmax cross-entropy).
      features: channels of each stage.
      hidden: width of the hidden dense layer.
      dropout: dropout rate before the last layer (active when train=True;
        needs ``rngs={'dropout': key}``).
      norm: 'batch', 'group' or 'none'.
      norm_groups: upper bound on GroupNorm groups.
      dtype: compute dtype (the final dense layer runs in float32).
    """

    num_classes: int = 1
    features: Sequence[int] = (16, 32, 64, 128)
    hidden: int = 128
    dropout: float = 0.3
    norm: str = "batch"
    norm_groups: int = 8
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not self.features:
            raise ValueError("features must not be empty")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_choice("norm", self.norm, NORMS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Classifies a batch.

        Args:
          x: ``[B, H, W, C_in]`` inputs (see :func:`classifier_inputs`).
          train: BatchNorm batch statistics and dropout on.

        Returns:
          float32 logits, ``[B]`` if ``num_classes == 1`` else
          ``[B, num_classes]``.
        """
        for s, f in enumerate(self.features):
            x = ConvBlock(
                int(f),
                norm=self.norm,
                norm_groups=self.norm_groups,
                dtype=self.dtype,
                name=f"stage{s}",
            )(x, train)
            if s == len(self.features) - 1:
                # Grad-CAM's layer: the last conv feature map, before its pool
                # (as VGG's conv5_3 in the paper), at twice the pooled size.
                x = cam_point(self, "features", x)
            x = max_pool2(x)
        return ClassHead(
            self.num_classes, self.hidden, self.dropout, dtype=self.dtype, name="head"
        )(x, train)
