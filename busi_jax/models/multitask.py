"""Multi-task U-Net: one encoder, a segmentation decoder and a class head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from busi_jax.models.blocks import cam_point
from busi_jax.models.classifier import ClassHead
from busi_jax.models.head import logit_head
from busi_jax.models.unet import UNet


class MultiTaskUNet(UNet):
    """U-Net whose bottleneck also feeds a classification head.

    Both tasks back-propagate into the shared encoder, so the lesion mask
    supervises the features the classifier uses (and vice versa). The
    classification head is global average pooling of the bottleneck ->
    dense(hidden) -> ReLU -> dropout -> dense(num_classes).

    Parameter count: that of :class:`UNet` with the same options plus
    ``(f_d + 1) * cls_hidden + (cls_hidden + 1) * num_classes`` with
    ``f_d = features * 2**depth``.

    Attributes:
      All :class:`busi_jax.models.unet.UNet` options, plus
      num_classes: 1 -> ``[B]`` benign-vs-malignant logit; >= 2 ->
        ``[B, num_classes]`` logits.
      cls_hidden: hidden width of the classification head.
      dropout: dropout rate in the classification head (train=True needs
        ``rngs={'dropout': key}``).
    """

    num_classes: int = 1
    cls_hidden: int = 128
    dropout: float = 0.3

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Segments and classifies a batch.

        Args:
          x: ``[B, H, W, C_in]`` float images in [0, 1].
          train: BatchNorm batch statistics and dropout on.

        Returns:
          ``(seg_logits, cls_logits)``: float32 ``[B, H, W, out_channels]``
          and float32 ``[B]`` (num_classes == 1) or ``[B, num_classes]``.
        """
        skips, bottom = self._encoder()(x, train)
        # Marked before the fork: the decoder and the class head both read
        # it, so one point serves both Grad-CAM targets.
        bottom = cam_point(self, "bottleneck", bottom)
        y = self._decoder()(skips, bottom, train)
        y = cam_point(self, "decoder", y)
        seg = logit_head(self.out_channels, y, name="head")
        cls = ClassHead(
            self.num_classes, self.cls_hidden, self.dropout, dtype=self.dtype, name="cls_head"
        )(bottom, train)
        return seg.astype(jnp.float32), cls
