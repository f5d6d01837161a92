"""Metrics: jit-able per-sample scores, running accumulators, numpy summaries.

Three layers, so the training loop never needs to know which task it runs:

* per-sample scores computed on device inside ``eval_step``
    (:func:`binary_dice`, :func:`binary_iou`);
* small frozen dataclasses that accumulate them across batches with
    ``merge`` and turn them into numbers with ``compute``
    (:class:`Average`, :class:`SegmentationMetrics`, :class:`ClassificationMetrics`);
* numpy functions for what needs every sample at once (:func:`roc_auc`).

Empty-mask rule: a scan with an empty true mask scores Dice = IoU = 1 when the
prediction is empty too and 0 otherwise. ``lesion_dice`` averages only over
scans whose true mask is not empty (the number the literature reports);
``dice_all`` averages over every scan with the rule above.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _flat_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1).astype(jnp.float32), axis=1)


def binary_dice(pred: jax.Array, truth: jax.Array) -> jax.Array:
    """Per-sample Dice of binary masks, with the empty-mask rule.

    Args:
        pred: ``[B, H, W, 1]`` bool or {0, 1}.
        truth: ``[B, H, W, 1]`` bool or {0, 1}.

    Returns:
        ``[B]`` float32.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    inter = _flat_sum(pred & truth)
    total = _flat_sum(pred) + _flat_sum(truth)
    return jnp.where(total > 0, 2 * inter / jnp.maximum(total, 1), 1.0)


def binary_iou(pred: jax.Array, truth: jax.Array) -> jax.Array:
    """Per-sample IoU (Jaccard) of binary masks, with the empty-mask rule.

    Returns:
        ``[B]`` float32.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    inter = _flat_sum(pred & truth)
    union = _flat_sum(pred | truth)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


@dataclasses.dataclass(frozen=True)
class Average:
    """Running weighted mean of a scalar (e.g. the training loss)."""

    total: float = 0.0
    count: float = 0.0

    @classmethod
    def of(cls, value, weight=1.0) -> "Average":
        return cls(float(value) * float(weight), float(weight))

    def merge(self, other: "Average") -> "Average":
        return Average(self.total + other.total, self.count + other.count)

    def compute(self) -> float:
        return self.total / self.count if self.count else float("nan")


@dataclasses.dataclass(frozen=True)
class SegmentationMetrics:
    """Accumulated per-scan Dice/IoU and pixel counts.

    Attributes:
        dice_lesion, iou_lesion: sums over scans whose true mask is not empty.
        n_lesion: number of such scans.
        dice_all, iou_all: sums over every scan (empty-mask rule).
        n_all: number of scans.
        tp, fp, fn, tn: pixel confusion counts.
    """

    dice_lesion: float = 0.0
    iou_lesion: float = 0.0
    n_lesion: float = 0.0
    dice_all: float = 0.0
    iou_all: float = 0.0
    n_all: float = 0.0
    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0
    tn: float = 0.0

    @classmethod
    def from_batch(
        cls, pred: np.ndarray, truth: np.ndarray, weight: np.ndarray
    ) -> "SegmentationMetrics":
        """From ``[B, H, W, 1]`` binary masks; ``weight`` ``[B]`` drops padding."""
        pred = np.asarray(pred).astype(bool)
        truth = np.asarray(truth).astype(bool)
        w = np.asarray(weight, np.float64)
        dice = np.asarray(binary_dice(pred, truth), np.float64)
        iou = np.asarray(binary_iou(pred, truth), np.float64)
        lesion = truth.reshape(len(truth), -1).any(axis=1) * w
        wp = w[:, None, None, None] > 0
        return cls(
            dice_lesion=float((dice * lesion).sum()),
            iou_lesion=float((iou * lesion).sum()),
            n_lesion=float(lesion.sum()),
            dice_all=float((dice * w).sum()),
            iou_all=float((iou * w).sum()),
            n_all=float(w.sum()),
            tp=float((pred & truth & wp).sum()),
            fp=float((pred & ~truth & wp).sum()),
            fn=float((~pred & truth & wp).sum()),
            tn=float((~pred & ~truth & wp).sum()),
        )

    def merge(self, other: "SegmentationMetrics") -> "SegmentationMetrics":
        return SegmentationMetrics(
            *(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other)))
        )

    def compute(self) -> dict[str, float]:
        nan = float("nan")
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        prec = tp / (tp + fp) if tp + fp else nan
        rec = tp / (tp + fn) if tp + fn else nan
        return {
            "lesion_dice": self.dice_lesion / self.n_lesion if self.n_lesion else nan,
            "lesion_iou": self.iou_lesion / self.n_lesion if self.n_lesion else nan,
            "dice_all": self.dice_all / self.n_all if self.n_all else nan,
            "iou_all": self.iou_all / self.n_all if self.n_all else nan,
            "pixel_accuracy": (tp + tn) / (tp + fp + fn + tn) if self.n_all else nan,
            "pixel_precision": prec,
            "pixel_recall": rec,
            "pixel_f1": 2 * prec * rec / (prec + rec) if prec + rec else nan,
        }


@dataclasses.dataclass(frozen=True)
class ClassificationMetrics:
    """Collected probabilities and labels (AUC needs all of them at once).

    Attributes:
        probs: ``[N]`` malignancy probabilities (binary) or ``[N, C]`` softmax.
        labels: ``[N]`` integer labels.
    """

    probs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.float32))
    labels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))

    @classmethod
    def from_batch(cls, probs, labels, weight) -> "ClassificationMetrics":
        keep = np.asarray(weight) > 0
        return cls(np.asarray(probs, np.float32)[keep], np.asarray(labels, np.int32)[keep])

    def merge(self, other: "ClassificationMetrics") -> "ClassificationMetrics":
        if self.probs.size == 0:
            return other
        return ClassificationMetrics(
            np.concatenate([self.probs, other.probs]), np.concatenate([self.labels, other.labels])
        )

    def compute(self) -> dict[str, float]:
        return classification_summary(self.probs, self.labels)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half).

    Args:
        scores: ``[N]`` higher means more likely positive.
        labels: ``[N]`` in {0, 1}.

    Returns:
        AUC in [0, 1], or NaN when one class is absent.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_summary(
    probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity, precision, F1 (binary), or accuracy (multi-class)."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    nan = float("nan")
    if probs.ndim == 2:
        pred = probs.argmax(-1)
        return {"accuracy": float((pred == labels).mean()) if len(labels) else nan}
    pred = probs >= threshold
    pos = labels == 1
    tp = float((pred & pos).sum())
    tn = float((~pred & ~pos).sum())
    fp = float((pred & ~pos).sum())
    fn = float((~pred & pos).sum())
    prec = tp / (tp + fp) if tp + fp else nan
    sens = tp / (tp + fn) if tp + fn else nan
    return {
        "auc": roc_auc(probs, labels),
        "accuracy": (tp + tn) / len(labels) if len(labels) else nan,
        "sensitivity": sens,
        "specificity": tn / (tn + fp) if tn + fp else nan,
        "precision": prec,
        "f1": 2 * prec * sens / (prec + sens) if prec + sens else nan,
    }
