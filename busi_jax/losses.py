"""Segmentation and classification losses over logits.

All functions are pure and jit-able, compute in float32 whatever the logits'
dtype, and return a scalar averaged over the batch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
LossFn = Callable[..., Array]


def _match(logits: Array, target: Array) -> tuple[Array, Array]:
    """float32 logits and target of the same shape (``[B,H,W]`` masks are
    reshaped to ``[B,H,W,1]`` logits)."""
    logits = logits.astype(jnp.float32)
    target = jnp.asarray(target).astype(jnp.float32)
    if target.shape != logits.shape:
        if target.size != logits.size:
            raise ValueError(f"target shape {target.shape} does not match logits {logits.shape}")
        target = target.reshape(logits.shape)
    return logits, target


def _per_sample_sum(x: Array) -> Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def dice_coefficient(logits: Array, mask: Array, eps: float = 1.0) -> Array:
    """Per-sample soft Dice ``(2|P.M| + eps) / (|P| + |M| + eps)``.

    Args:
      logits: ``[B, H, W, 1]`` logits; ``P = sigmoid(logits)``.
      mask: ``[B, H, W, 1]`` or ``[B, H, W]`` binary (or soft) target.
      eps: additive smoothing in numerator and denominator.

    Returns:
      ``[B]`` float32 soft Dice in ``[0, 1]``.
    """
    logits, mask = _match(logits, mask)
    p = jax.nn.sigmoid(logits)
    inter = _per_sample_sum(p * mask)
    denom = _per_sample_sum(p) + _per_sample_sum(mask)
    return (2.0 * inter + eps) / (denom + eps)


def dice_loss(logits: Array, mask: Array, eps: float = 1.0) -> Array:
    """Soft Dice loss on sigmoid probabilities, per sample then batch mean.

    ``loss = mean_b [1 - (2 sum(P_b M_b) + eps) / (sum P_b + sum M_b + eps)]``
    with sums over all pixels (and channels) of sample ``b``.

    Empty masks (e.g. BUSI 'normal' scans): the smoothing ``eps`` keeps the
    loss defined and makes it ``1 - eps / (sum P_b + eps)``, i.e. 0 when
    nothing is predicted and rising towards 1 with the predicted area (at
    ``eps=1`` a single fully-confident false-positive pixel already costs
    0.5). So empty-mask samples are not ignored: they penalise false
    positives. Drop them from the batch if that is not wanted.

    Args:
      logits: ``[B, H, W, 1]`` logits (any float dtype).
      mask: ``[B, H, W, 1]`` or ``[B, H, W]`` target in {0, 1} (soft OK).
      eps: smoothing constant (> 0 keeps the gradient finite everywhere).

    Returns:
      Scalar float32 loss in ``[0, 1]``.
    """
    return jnp.mean(1.0 - dice_coefficient(logits, mask, eps))


def bce_loss(logits: Array, target: Array, pos_weight: float | Array | None = None) -> Array:
    """Numerically stable sigmoid binary cross-entropy, mean over elements.

    ``l = w * y * softplus(-x) + (1 - y) * softplus(x)`` where ``w`` is
    ``pos_weight`` (1 if None). Every sample has the same number of elements,
    so the global mean equals the per-sample mean averaged over the batch.

    Args:
      logits: logits of any shape, e.g. ``[B, H, W, 1]`` or ``[B]``.
      target: same shape (or same size) targets in [0, 1].
      pos_weight: weight of positive targets (counteracts class imbalance).

    Returns:
      Scalar float32 loss.
    """
    logits, target = _match(logits, target)
    pos = jax.nn.softplus(-logits)
    if pos_weight is not None:
        pos = pos * pos_weight
    return jnp.mean(target * pos + (1.0 - target) * jax.nn.softplus(logits))


def dice_bce_loss(
    logits: Array,
    mask: Array,
    bce_weight: float = 0.5,
    eps: float = 1.0,
    pos_weight: float | Array | None = None,
) -> Array:
    """``dice_loss + bce_weight * bce_loss`` (U-Net++ uses ``bce_weight=0.5``).

    Args:
      logits: ``[B, H, W, 1]`` logits.
      mask: ``[B, H, W, 1]`` or ``[B, H, W]`` target.
      bce_weight: weight of the BCE term.
      eps: Dice smoothing.
      pos_weight: BCE positive-class weight.

    Returns:
      Scalar float32 loss.
    """
    return dice_loss(logits, mask, eps) + bce_weight * bce_loss(logits, mask, pos_weight)


def tversky_loss(
    logits: Array,
    mask: Array,
    alpha: float = 0.7,
    beta: float = 0.3,
    gamma: float = 1.0,
    eps: float = 1.0,
) -> Array:
    """(Focal) Tversky loss, per sample then batch mean.

    ``TI_b = (TP + eps) / (TP + alpha FN + beta FP + eps)`` on sigmoid
    probabilities (Salehi et al., 2017), ``loss = mean_b (1 - TI_b) ** gamma``
    (Abraham & Khan, 2019, use ``gamma = 0.75``). ``alpha > beta`` weighs
    missed lesion pixels above false alarms: recall over precision, for the
    under-segmentation of faint lesion borders. ``alpha = beta = 0.5`` with
    ``gamma = 1`` is :func:`dice_loss` with twice this ``eps``. Empty masks
    behave as there.

    Args:
      logits: ``[B, H, W, 1]`` logits.
      mask: ``[B, H, W, 1]`` or ``[B, H, W]`` target.
      alpha: weight of false negatives.
      beta: weight of false positives.
      gamma: focal exponent (> 0); below 1 it raises the loss of samples
        already close to the target less than that of poor ones.
      eps: smoothing.

    Returns:
      Scalar float32 loss in ``[0, 1]``.
    """
    logits, mask = _match(logits, mask)
    p = jax.nn.sigmoid(logits)
    tp = _per_sample_sum(p * mask)
    fn = _per_sample_sum((1.0 - p) * mask)
    fp = _per_sample_sum(p * (1.0 - mask))
    index = (tp + eps) / (tp + alpha * fn + beta * fp + eps)
    # The floor keeps d/dx x**gamma finite at a perfect sample when gamma < 1.
    return jnp.mean(jnp.maximum(1.0 - index, 1e-6) ** gamma)


def _lovasz_gradient(gt_sorted: Array) -> Array:
    """The Lovasz extension's weights for pixels sorted by decreasing error.

    Element ``i`` is the Jaccard loss of the first ``i + 1`` pixels taken as
    errors minus that of the first ``i`` (Berman et al., CVPR 2018, Alg. 1).
    """
    positives = jnp.sum(gt_sorted)
    intersection = positives - jnp.cumsum(gt_sorted)
    union = positives + jnp.cumsum(1.0 - gt_sorted)  # >= 1: never 0.
    jaccard = 1.0 - intersection / union
    return jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_hinge_loss(logits: Array, mask: Array) -> Array:
    """Lovasz hinge loss, per image then batch mean (Berman et al., CVPR 2018).

    A convex surrogate of ``1 - IoU`` of the thresholded prediction: the
    hinge errors ``max(0, 1 - logit * (2y - 1))`` of an image's pixels,
    sorted in decreasing order, dotted with the Jaccard loss's increments
    (:func:`_lovasz_gradient`). Where Dice and BCE reward confident pixels
    on average, this scores the IoU the evaluation reports. On an empty
    mask it is the largest hinge error (the most confident false positive).

    Args:
      logits: ``[B, H, W, 1]`` logits (margins: the hinge is at +-1).
      mask: ``[B, H, W, 1]`` or ``[B, H, W]`` binary target.

    Returns:
      Scalar float32 loss (0 when every pixel is on its side by margin 1).
    """
    logits, mask = _match(logits, mask)

    def one(x, y):
        errors = 1.0 - x * (2.0 * y - 1.0)
        order = jnp.argsort(-errors)
        weights = jax.lax.stop_gradient(_lovasz_gradient(y[order]))
        return jnp.dot(jax.nn.relu(errors[order]), weights)

    b = logits.shape[0]
    return jnp.mean(jax.vmap(one)(logits.reshape(b, -1), mask.reshape(b, -1)))


def deep_supervision(loss_fn: LossFn, weights: Sequence[float] | Array | None = None) -> LossFn:
    """Wraps a segmentation loss to average it over deep-supervision heads.

    The returned ``fn(logits, mask, *args, **kwargs)`` applies
    ``loss_fn(logits[k], mask, *args, **kwargs)`` to each head of a
    ``[K, B, H, W, C]`` stack and returns ``sum_k w_k loss_k / sum_k w_k``
    (uniform if ``weights`` is None). A ``[B, H, W, C]`` input (single head,
    e.g. inference output) is passed to ``loss_fn`` unchanged.

    Args:
      loss_fn: loss over ``[B, H, W, C]`` logits returning a scalar.
      weights: optional ``K`` non-negative head weights.

    Returns:
      The wrapped loss function.
    """

    def wrapped(logits: Array, mask: Array, *args: Any, **kwargs: Any) -> Array:
        if logits.ndim != 5:
            return loss_fn(logits, mask, *args, **kwargs)
        k = logits.shape[0]
        losses = jnp.stack([loss_fn(logits[i], mask, *args, **kwargs) for i in range(k)])
        if weights is None:
            return jnp.mean(losses)
        w = jnp.asarray(weights, jnp.float32)
        if w.shape != (k,):
            raise ValueError(f"expected {k} head weights, got shape {w.shape}")
        return jnp.sum(w * losses) / jnp.sum(w)

    return wrapped


def classification_bce_loss(
    logits: Array,
    labels: Array,
    pos_weight: float | Array | None = None,
    label_smoothing: float = 0.0,
) -> Array:
    """Sigmoid cross-entropy for one binary logit per image.

    Args:
      logits: ``[B]`` logits (malignant = positive class).
      labels: ``[B]`` labels in {0, 1} (ints or floats).
      pos_weight: weight of positive samples.
      label_smoothing: targets become ``y (1 - s) + s / 2``.

    Returns:
      Scalar float32 mean loss.
    """
    if logits.ndim != 1:
        raise ValueError(f"expected [B] logits, got shape {logits.shape}")
    y = jnp.asarray(labels).astype(jnp.float32)
    y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return bce_loss(logits, y, pos_weight)


def classification_ce_loss(
    logits: Array,
    labels: Array,
    class_weights: Sequence[float] | Array | None = None,
    label_smoothing: float = 0.0,
) -> Array:
    """Softmax cross-entropy for ``[B, C]`` logits.

    Args:
      logits: ``[B, C]`` logits.
      labels: ``[B]`` integer class ids or ``[B, C]`` one-hot / soft targets.
      class_weights: optional ``[C]`` weights; the loss is then the weighted
        mean ``sum_b w_{y_b} l_b / sum_b w_{y_b}`` (PyTorch convention), with
        ``w_{y_b} = sum_c w_c y_{b,c}`` for soft targets.
      label_smoothing: targets become ``y (1 - s) + s / C``.

    Returns:
      Scalar float32 loss.
    """
    if logits.ndim != 2:
        raise ValueError(f"expected [B, C] logits, got shape {logits.shape}")
    logits = logits.astype(jnp.float32)
    c = logits.shape[-1]
    labels = jnp.asarray(labels)
    if labels.ndim == 1:
        y = jax.nn.one_hot(labels, c, dtype=jnp.float32)
    else:
        y = labels.astype(jnp.float32)
    w_sample = None
    if class_weights is not None:
        w_sample = y @ jnp.asarray(class_weights, jnp.float32)
    y = y * (1.0 - label_smoothing) + label_smoothing / c
    per_sample = -jnp.sum(y * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    if w_sample is None:
        return jnp.mean(per_sample)
    return jnp.sum(w_sample * per_sample) / jnp.sum(w_sample)


def classification_loss(logits: Array, labels: Array, **kwargs: Any) -> Array:
    """Dispatches on the logits' rank: ``[B]`` -> :func:`classification_bce_loss`,
    ``[B, C]`` -> :func:`classification_ce_loss` (``kwargs`` are forwarded)."""
    if logits.ndim == 1:
        return classification_bce_loss(logits, labels, **kwargs)
    return classification_ce_loss(logits, labels, **kwargs)
