"""Grad-CAM (Selvaraju et al., ICCV 2017) for the segmenters and the classifier.

For a feature map ``A`` (``[B, h, w, K]``) and a scalar score ``y`` per
image::

    alpha_k = mean_{u,v} dy / dA_k[u, v]          # channel importance
    cam     = ReLU(sum_k alpha_k A_k)              # [B, h, w]

then bilinearly upsampled to the input size and divided by its per-image
maximum (an all-zero map -- no positive evidence -- stays zero).

Scores:
  * classification: the chosen class logit. With one output logit (benign vs
    malignant) that is the malignant logit; ``class_index=0`` explains the
    benign decision instead (score ``-logit``). With ``C >= 2`` logits the
    default is each image's predicted (argmax) class.
  * segmentation (Seg-Grad-CAM, Vinogradova et al., AAAI 2020): the sum of
    the lesion logits over the predicted mask ``{sigmoid(logit) >
    threshold}``. The mask is held constant, so the map explains why the
    predicted lesion pixels were called lesion. An empty prediction gives an
    all-zero map.

Layers (hooks added with :func:`busi_jax.models.blocks.cam_point`; an
ordinary ``init``/``apply`` is unchanged by them):
  * Classifier ``'features'``: the last conv stage's output before its
    max-pool (the paper uses VGG's last conv layer), ``H/2**(S-1)`` wide for
    ``S`` stages.
  * U-Net / SUNet / multitask ``'decoder'`` (segmentation default): the last
    decoder block, at full resolution. The segmentation head is a 1x1 conv
    ``w . A + b``, so here ``alpha = w |M| / HW`` and the map is exactly
    ``ReLU(logit - b)`` rescaled: sharp and always on the predicted lesion,
    but it adds little beyond the logits themselves.
  * ``'bottleneck'`` (multitask classification default and only choice):
    the encoder output at ``H/2**depth``, the most abstract map and the only
    input of the multitask class head. For segmentation it is offered for
    context analysis only: the skip connections let a U-Net segment without
    it, and in our tests (briefly trained nets on synthetic disks) its
    segmentation maps did not favour the lesion over the background.
  * U-Net++ ``'decoder'``: the top-row node ``X^{0,L}`` (``X^{0,k+1}`` for a
    pruned head ``k``) feeding the final head; ``'bottleneck'``: the deepest
    backbone node computed, ``X^{L,0}`` (``X^{k+1,0}``). With deep
    supervision and ``ds_inference='mean'`` only the last head depends on
    either node, so the map explains that head's share of the mean.

The gradients come from flax's perturbation trick: ``apply`` is given a
zero 'perturbations' collection added to the hooked maps, and the gradient
with respect to it equals ``dy/dA``. Variables need only 'params' (and
'batch_stats'); old checkpoints work as they are.

Example::

    cam_fn = jax.jit(gradcam, static_argnames=("model", "target", "layer"))
    cams = cam_fn(model, variables, images, target="segmentation")  # [B, H, W]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from busi_jax.models.blocks import CAM_PREFIX
from busi_jax.models.classifier import classifier_inputs, roi_boxes, uncrop_boxes
from busi_jax.models.multitask import MultiTaskUNet

TARGETS = ("segmentation", "classification")

_PERTURBATIONS = "perturbations"
_INTERMEDIATES = "intermediates"


def _base_variables(variables: Any) -> dict[str, Any]:
    # A stale 'perturbations' entry would be added to the features; drop it.
    return {k: v for k, v in dict(variables).items() if k != _PERTURBATIONS}


def _probe(model: nn.Module, variables: Any, images: jax.Array) -> tuple[Any, dict[str, Any]]:
    """Output shapes and Grad-CAM perturbation shapes (keyed by full name)."""

    def run(v, x):
        out, state = model.apply(v, x, train=False, mutable=[_PERTURBATIONS])
        return out, dict(state.get(_PERTURBATIONS, {}))

    # eval_shape: tracing only, even outside jit.
    return jax.eval_shape(run, _base_variables(variables), images)


def cam_layers(model: nn.Module, variables: Any, images: jax.Array) -> tuple[str, ...]:
    """The Grad-CAM layer names ``model`` offers for inputs like ``images``.

    Args:
      model: a model from :func:`busi_jax.models.create_model`.
      variables: its variables ({'params', 'batch_stats'}).
      images: ``[B, H, W, C]`` example inputs (only shapes are used).

    Returns:
      Sorted layer names, e.g. ``('bottleneck', 'decoder')``.
    """
    _, names = _probe(model, variables, images)
    return tuple(sorted(k[len(CAM_PREFIX) :] for k in names if k.startswith(CAM_PREFIX)))


def default_layer(model: nn.Module, target: str) -> str:
    """The layer :func:`gradcam` explains when none is named.

    'decoder' for segmentation, 'bottleneck' for the multitask class head
    (its only input) and 'features' for the classifier; see the module
    docstring for why.
    """
    if target == "segmentation":
        return "decoder"
    return "bottleneck" if isinstance(model, MultiTaskUNet) else "features"


def _pick_output(out: Any, target: str) -> Any:
    """The output ``target`` refers to (None if the model lacks it)."""
    if isinstance(out, tuple):  # Multitask: (seg [B,H,W,C], cls [B] or [B,C]).
        return out[0] if target == "segmentation" else out[1]
    # Segmenters give [B,H,W,C] (U-Net++ 'all': [K,B,H,W,C]); the classifier [B] or [B,C].
    is_segmentation = out.ndim >= 4
    return out if is_segmentation == (target == "segmentation") else None


def _classification_score(logits: jax.Array, class_index: Any) -> jax.Array:
    """Per-image class score ``[B]`` from logits ``[B]`` or ``[B, C]``."""
    if logits.ndim == 1:
        if class_index is None:
            return logits
        # One sigmoid logit: class 1 (malignant) is the logit, class 0 its negation.
        idx = jnp.broadcast_to(jnp.asarray(class_index), logits.shape)
        return jnp.where(idx == 0, -logits, logits)
    if class_index is None:
        idx = jnp.argmax(logits, axis=-1)
    else:
        idx = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), logits.shape[:1])
    return jnp.take_along_axis(logits, idx[:, None], axis=-1)[:, 0]


def _segmentation_score(logits: jax.Array, class_index: Any, threshold: Any) -> jax.Array:
    """Per-image Seg-Grad-CAM score ``[B]`` from logits ``[B, H, W, C]``."""
    channel = logits[..., 0 if class_index is None else class_index]
    threshold = jnp.asarray(threshold, jnp.float32)
    # Compare logits, not probabilities: sigmoid saturates to exactly 1.0.
    cut = jnp.log(threshold) - jnp.log1p(-threshold)
    region = jax.lax.stop_gradient(channel > cut)
    return jnp.sum(jnp.where(region, channel, 0.0), axis=(1, 2))


def feature_gradients(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    target: str = "segmentation",
    class_index: Any = None,
    layer: str | None = None,
    threshold: Any = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """The hooked feature map and the score's gradient with respect to it.

    Arguments as in :func:`gradcam`, of which this is the first half (other
    CAM variants, e.g. Grad-CAM++, can start from it too).

    Returns:
      ``(features, grads)``, both float32 ``[B, h, w, K]``: the activations
      ``A`` of ``layer`` and ``d score / d A`` (each image's own score).

    Raises:
      ValueError: unknown ``target`` or ``layer``, or a target the model
        does not produce.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not valid; choose one of {TARGETS}")
    if layer is None:
        layer = default_layer(model, target)
    variables = _base_variables(variables)
    out_shapes, shapes = _probe(model, variables, images)
    if _pick_output(out_shapes, target) is None:
        raise ValueError(f"target={target!r} is not an output of {type(model).__name__}")
    name = CAM_PREFIX + layer
    if name not in shapes:
        raise ValueError(
            f"layer={layer!r} is not valid for {type(model).__name__}; "
            f"choose one of {list(cam_layers(model, variables, images))}"
        )
    if isinstance(model, MultiTaskUNet) and target == "classification" and layer != "bottleneck":
        # The class head reads the bottleneck only: any later map has zero gradient.
        raise ValueError("the multitask classification head only sees layer 'bottleneck'")
    # Every hook needs its entry once the collection is present; the unused
    # ones cost a zero array each.
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def total_score(perturbations):
        out, state = model.apply(
            {**variables, _PERTURBATIONS: perturbations},
            images,
            train=False,
            mutable=[_INTERMEDIATES],
        )
        logits = _pick_output(out, target)
        if target == "classification":
            score = _classification_score(logits, class_index)
        else:
            if logits.ndim == 5:  # U-Net++ ds_inference='all': explain the mean.
                logits = jnp.mean(logits, axis=0)
            score = _segmentation_score(logits, class_index, threshold)
        # Images are independent in eval mode, so the gradient of the sum is
        # each image's own gradient.
        return jnp.sum(score), state[_INTERMEDIATES][name][0]

    grads, features = jax.grad(total_score, has_aux=True)(zeros)
    return features.astype(jnp.float32), grads[name].astype(jnp.float32)


def gradcam(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    target: str = "segmentation",
    class_index: Any = None,
    layer: str | None = None,
    threshold: Any = 0.5,
) -> jax.Array:
    """Grad-CAM heat maps for a batch.

    Pure and jit-able with ``model``, ``target`` and ``layer`` static.
    BatchNorm runs on its running averages (``train=False``), so every image's
    map depends on that image only.

    Args:
      model: a model from :func:`busi_jax.models.create_model` ('unet',
        'sunet', 'unetpp', 'classifier' or 'multitask').
      variables: its variables ({'params', 'batch_stats'}; any other
        collection is passed through, a 'perturbations' one is ignored).
      images: ``[B, H, W, C]`` float32 model inputs.
      target: 'segmentation' (segmenters, multitask) or 'classification'
        (classifier, multitask). See the module docstring for the scores.
      class_index: classification: None (single logit: malignant; several:
        the predicted class), an int, or an int array ``[B]``; a single-logit
        model reads 0 as benign and 1 as malignant. Segmentation: the logit
        channel (None = 0).
      layer: feature map to explain (see :func:`cam_layers`); None picks
        :func:`default_layer`: 'decoder' for segmentation, 'features' for the
        classifier and 'bottleneck' for the multitask class head.
      threshold: segmentation only: probability above which a pixel belongs
        to the predicted mask (use the threshold chosen in training).

    Returns:
      float32 ``[B, H, W]`` maps in [0, 1], each scaled to a maximum of 1
      (all zeros where the weighted features are nowhere positive).

    Raises:
      ValueError: unknown ``target`` or ``layer``, or a target the model
        does not produce.
    """
    features, grads = feature_gradients(
        model,
        variables,
        images,
        target=target,
        class_index=class_index,
        layer=layer,
        threshold=threshold,
    )
    alpha = jnp.mean(grads, axis=(1, 2), keepdims=True)  # [B, 1, 1, K]
    cam = nn.relu(jnp.sum(alpha * features, axis=-1))  # [B, h, w]
    b, h, w = images.shape[:3]
    cam = jax.image.resize(cam, (b, h, w), method="bilinear")
    peak = jnp.max(cam, axis=(1, 2), keepdims=True)
    scaled = jnp.clip(cam / jnp.where(peak > 0, peak, 1.0), 0.0, 1.0)
    # XLA may divide via a rounded reciprocal: pin the peak to exactly 1.
    scaled = jnp.where(cam >= peak, 1.0, scaled)
    return jnp.where(peak > 0, scaled, 0.0)


def make_gradcam(
    model: nn.Module, *, target: str = "segmentation", layer: str | None = None
) -> Callable[..., jax.Array]:
    """A jitted ``f(variables, images, class_index=None, threshold=0.5) -> [B, H, W]``.

    See :func:`gradcam` for the arguments; ``class_index`` and ``threshold``
    are traced, so changing them does not recompile (None versus an index
    does).
    """

    @jax.jit
    def cam_fn(variables, images, class_index=None, threshold=0.5):
        return gradcam(
            model,
            variables,
            images,
            target=target,
            class_index=class_index,
            layer=layer,
            threshold=threshold,
        )

    return cam_fn


def classifier_cam(model, variables, images: jax.Array, masks: jax.Array, mode: str) -> jax.Array:
    """Grad-CAM of a segmentation-guided classifier, on the scan's own pixels.

    Args:
      model, variables: the classifier and its variables.
      images: ``[N, S, S, 1]`` scans in [0, 1].
      masks: ``[N, S, S, 1]`` the masks it is fed (predicted ones in use).
      mode: its ``config.classifier.input_mode``.

    Returns:
      ``[N, S, S]`` maps in [0, 1]. For mode 'roi' the network saw each
      lesion's close-up, so its map is put back where the crop came from
      (zero outside the crop).

    Raises:
      ValueError: mode 'image_mask_roi', whose first layer mixes each scan
        pixel with an unrelated close-up pixel: its map belongs to neither.
    """
    if mode == "image_mask_roi":
        raise ValueError("a classifier fed both the scan and a close-up has no map on the scan")
    cam = gradcam(model, variables, classifier_inputs(images, masks, mode), target="classification")
    if mode == "roi":
        cam = uncrop_boxes(cam[..., None], roi_boxes(masks))[..., 0]
    return cam


def workdir_cams(seg_dir, cls_dir=None) -> Callable[..., tuple[np.ndarray, np.ndarray | None]]:
    """Grad-CAM of a trained segmenter (and classifier) loaded from their workdirs.

    Args:
      seg_dir: segmenter workdir (best checkpoint).
      cls_dir: classifier workdir, or None.

    Returns:
      ``f(images, masks) -> (seg_cam, cls_cam)``: ``images`` ``[N, S, S, 1]``
      uint8, ``masks`` ``[N, S, S]`` bool (the classifier's input masks, i.e.
      the predicted ones); maps ``[N, S, S]`` in [0, 1]; ``cls_cam`` is None
      without a classifier, or for one fed both the scan and a close-up.
    """
    from busi_jax import inference

    _, seg_model, seg_vars = inference.load_model(seg_dir)
    cls = inference.load_model(cls_dir) if cls_dir else None

    def run(images, masks):
        x = jnp.asarray(images, jnp.float32) / 255.0
        seg_cam = np.asarray(gradcam(seg_model, seg_vars, x, target="segmentation"))
        cls_cam = None
        if cls is not None:
            config, model, variables = cls
            mode = config.classifier.input_mode
            if mode != "image_mask_roi":  # No map on the scan (classifier_cam).
                m = jnp.asarray(masks[..., None], jnp.float32)
                cls_cam = np.asarray(classifier_cam(model, variables, x, m, mode))
        return seg_cam, cls_cam

    return run
