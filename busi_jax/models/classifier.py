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

CLASSIFIER_INPUT_MODES = ("image", "image_mask", "masked", "roi", "image_mask_roi")

# The lesion's box is widened by this fraction of its side on each side: the
# margin and the tissue just behind the lesion (posterior shadowing or
# enhancement) are diagnostic, so the crop must hold more than the outline.
ROI_MARGIN = 0.25
# Smallest crop side as a fraction of the scan side: a handful of predicted
# pixels must not be blown up into a whole input of interpolation artefacts.
ROI_MIN_SIDE = 0.25


def classifier_input_channels(mode: str) -> int:
    """Number of channels :func:`classifier_inputs` produces for ``mode``."""
    check_choice("mode", mode, CLASSIFIER_INPUT_MODES)
    return {"image_mask": 2, "roi": 2, "image_mask_roi": 4}.get(mode, 1)


def roi_boxes(
    mask: jax.Array, margin: float = ROI_MARGIN, min_side: float = ROI_MIN_SIDE
) -> jax.Array:
    """Square boxes around each scan's lesion, for :func:`crop_boxes`.

    The box is centred on the lesion, then moved inside the scan where it
    would cross a border, and never larger than the scan: a crop only ever
    enlarges (a lesion too large for its margin gets the whole scan).

    Args:
      mask: ``[B, S, S, 1]`` (or ``[B, S, S]``) mask or probabilities; pixels
        at or above 0.5 are lesion.
      margin: added on each side, as a fraction of the lesion's longer side.
      min_side: smallest box side, as a fraction of ``S``.

    Returns:
      float32 ``[B, 3]``: top, left and side of each box in pixels, inside
      the scan. An empty mask gives the whole scan.

    Raises:
      ValueError: the scans are not square.
    """
    if mask.ndim == 4:
        mask = mask[..., 0]
    h, w = mask.shape[1:]
    if h != w:
        raise ValueError(f"lesion crops need square scans, got {h}x{w}")
    lesion = mask >= 0.5
    rows, cols = jnp.any(lesion, axis=2), jnp.any(lesion, axis=1)

    def extent(hit, n):
        idx = jnp.arange(n, dtype=jnp.float32)
        lo = jnp.min(jnp.where(hit, idx, n), axis=1)
        hi = jnp.max(jnp.where(hit, idx, -1.0), axis=1) + 1.0
        return lo, hi

    top, bottom = extent(rows, h)
    left, right = extent(cols, w)
    side = jnp.maximum(bottom - top, right - left) * (1.0 + 2.0 * margin)
    side = jnp.clip(side, min_side * h, float(h))
    # An empty mask: the whole scan (its extents, (n, 0), then centre it too).
    side = jnp.where(jnp.any(rows, axis=1), side, float(h))
    y0 = jnp.clip((top + bottom - side) / 2, 0.0, h - side)
    x0 = jnp.clip((left + right - side) / 2, 0.0, w - side)
    return jnp.stack([y0, x0, side], axis=-1)


def _resample_boxes(x: jax.Array, boxes: jax.Array, into_box: bool) -> jax.Array:
    """Bilinear map between each scan's frame and its box's (zero outside)."""
    side = x.shape[1]

    def one(img, box):
        # scale_and_translate maps input pixel coordinate u to u * scale + shift.
        scale = side / box[2] if into_box else box[2] / side
        shift = -box[:2] * scale if into_box else box[:2]
        return jax.image.scale_and_translate(
            img.astype(jnp.float32), img.shape, (0, 1), jnp.stack([scale, scale]), shift, "linear"
        )

    return jax.vmap(one)(x, boxes.astype(jnp.float32)).astype(x.dtype)


def crop_boxes(x: jax.Array, boxes: jax.Array) -> jax.Array:
    """Resamples each box of ``x`` to ``x``'s own size (bilinear; zero outside).

    Args:
      x: ``[B, S, S, C]`` images.
      boxes: ``[B, 3]`` top, left, side in pixels (:func:`roi_boxes`).

    Returns:
      ``[B, S, S, C]``, dtype of ``x``.
    """
    return _resample_boxes(x, boxes, into_box=True)


def uncrop_boxes(x: jax.Array, boxes: jax.Array) -> jax.Array:
    """The inverse of :func:`crop_boxes`: puts each crop back where its box was.

    Args:
      x: ``[B, S, S, C]`` maps in the crop's frame (e.g. a Grad-CAM).
      boxes: ``[B, 3]`` the boxes :func:`crop_boxes` was given.

    Returns:
      ``[B, S, S, C]`` in the scan's frame; zero outside the box.
    """
    return _resample_boxes(x, boxes, into_box=False)


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
        'roi' -- scan and mask cropped to a square box around the lesion
        (:func:`roi_boxes`; square scans only) and resampled to the input
        size, ``[B, H, W, 2]``:
        a small lesion fills the input, so the CNN's receptive fields see its
        margin in detail instead of a few pixels after four poolings; the
        absolute size is lost.
        'image_mask_roi' -- 'image_mask' and 'roi' stacked, ``[B, H, W, 4]``:
        both the whole scan (size, context) and the lesion's close-up.
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
    if mode == "masked":
        return image * dilate_mask(mask, margin)
    both = jnp.concatenate([image, mask], axis=-1)
    if mode == "image_mask":
        return both
    roi = crop_boxes(both, roi_boxes(mask))
    return roi if mode == "roi" else jnp.concatenate([both, roi], axis=-1)


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
