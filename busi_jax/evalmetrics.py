"""Host-side (numpy) evaluation metrics with percentile-bootstrap confidence intervals.

Everything here runs once per evaluation on arrays already on the host, so it
favours exact, auditable definitions over speed on device; the bootstrap is
vectorised (one ``[n_boot, N]`` index array) so 1000 resamples cost milliseconds.

Conventions shared by every report:

* Empty-mask rule (as in :mod:`busi_jax.metrics`): a scan whose true mask is
  empty scores Dice = IoU = 1 when the prediction is empty too, else 0.
* Each summary number is ``{"mean": point, "ci95": [lo, hi]}``: ``mean`` is the
  statistic on the full sample (for a mean-type metric it *is* the mean), and
  ``ci95`` the 2.5th and 97.5th percentiles of the statistic over bootstrap
  resamples. Resamples on which the statistic is undefined (NaN) are skipped.
* Segmentation: plain bootstrap over scans (resampled with replacement).
  Classification: bootstrap stratified by true label (each class resampled
  within itself, so class counts stay fixed and AUC is always defined).
* ECE: 10 equal-width bins of the predicted probability on [0, 1] (last bin
  closed), weighted by bin count; for binary tasks it compares the malignancy
  probability with the observed malignant fraction per bin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage, optimize, special

from busi_jax.metrics import roc_auc

EMPTY_MASK_RULE = (
    "a scan with an empty true mask scores Dice = IoU = 1 if the prediction is empty, else 0"
)
SEG_BOOTSTRAP = "percentile bootstrap over scans, resampled with replacement"
CLS_BOOTSTRAP = "percentile bootstrap stratified by true label (classes resampled separately)"
ECE_BINS = "equal-width bins of the predicted probability on [0, 1], last bin closed"

StatFn = Callable[[np.ndarray], np.ndarray]


# --- Bootstrap ----------------------------------------------------------------


def bootstrap_indices(
    n: int, n_boot: int, seed: int = 0, strata: np.ndarray | None = None
) -> np.ndarray:
    """Row indices of ``n_boot`` bootstrap resamples of ``n`` items.

    Args:
        n: sample size.
        n_boot: number of resamples.
        seed: seeds ``numpy.random.default_rng``; the same seed gives the same indices.
        strata: optional ``[n]`` labels; each stratum is resampled within itself,
            so every resample keeps the stratum sizes.

    Returns:
        ``[n_boot, n]`` int64 indices into the sample (grouped by stratum when
        stratified; every statistic used here is order-invariant).
    """
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    strata = np.asarray(strata)
    if strata.shape != (n,):
        raise ValueError(f"strata has shape {strata.shape}, expected ({n},)")
    parts = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        parts.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    return np.concatenate(parts, axis=1) if parts else np.zeros((n_boot, 0), np.int64)


def _finite_mean(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries; NaN where there are none.

    NaN marks "not applicable to this scan" (e.g. lesion Dice on a normal scan),
    so a resample averages over whichever applicable scans it drew.
    """
    ok = np.isfinite(x)
    count = ok.sum(axis=-1)
    total = np.where(ok, x, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap_ci(
    values: np.ndarray,
    stat_fn: StatFn | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    strata: np.ndarray | None = None,
) -> dict:
    """Point statistic and 95% percentile-bootstrap interval.

    Args:
        values: ``[N, ...]`` one row per sampling unit (scan or case).
        stat_fn: vectorised statistic: takes ``[B, N, ...]`` (``B`` resamples)
            and returns ``[B]``. Defaults to the mean of the finite values of a
            ``[N]`` array (NaN = not applicable).
        n_boot: number of resamples; 0 gives a NaN interval.
        seed: resampling seed; every call with the same ``N``, ``seed`` and
            ``strata`` draws the same resamples, so metrics of one report are paired.
        strata: optional ``[N]`` labels for a stratified bootstrap.

    Returns:
        ``{"mean": statistic on all of values, "ci95": [lo, hi]}`` (floats, NaN
        when undefined). Resamples whose statistic is NaN are skipped.
    """
    values = np.asarray(values)
    stat_fn = stat_fn or _finite_mean
    n = values.shape[0]
    point = float(np.asarray(stat_fn(values[None]))[0]) if n else float("nan")
    lo = hi = float("nan")
    if n and n_boot > 0:
        stats = np.asarray(stat_fn(values[bootstrap_indices(n, n_boot, seed, strata)]), float)
        stats = stats[np.isfinite(stats)]
        if stats.size:
            lo, hi = (float(v) for v in np.percentile(stats, [2.5, 97.5]))
    return {"mean": point, "ci95": [lo, hi]}


# --- Segmentation -------------------------------------------------------------


def _as_masks(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{name}: expected [N, H, W] or [N, H, W, 1] masks, got {x.shape}")
    return x.astype(bool)


def _masks_pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = _as_masks(pred, "pred"), _as_masks(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ in shape")
    return pred, truth


def _div(num, den, empty=np.nan):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def pixel_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-scan pixel confusion counts.

    Args:
        pred, truth: ``[N, H, W]`` or ``[N, H, W, 1]`` binary masks.

    Returns:
        ``[N, 4]`` int64 columns ``tp, fp, fn, tn``.
    """
    pred, truth = _masks_pair(pred, truth)
    n = len(pred)
    p, t = pred.reshape(n, -1), truth.reshape(n, -1)
    tp = (p & t).sum(1)
    fp = p.sum(1) - tp
    fn = t.sum(1) - tp
    tn = p.shape[1] - tp - fp - fn
    return np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)


def dice_per_scan(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-scan Dice with the empty-mask rule (numpy twin of ``metrics.binary_dice``).

    Args:
        pred, truth: ``[N, H, W]`` or ``[N, H, W, 1]`` binary masks.

    Returns:
        ``[N]`` float64.
    """
    c = pixel_counts(pred, truth)
    tp, fp, fn = c[:, 0], c[:, 1], c[:, 2]
    return _div(2 * tp, 2 * tp + fp + fn, empty=1.0)


def _boundary(mask: np.ndarray) -> np.ndarray:
    # Inner boundary: mask pixels with a 4-neighbour outside the mask; pixels on
    # the image edge count as boundary (border_value=0).
    cross = ndimage.generate_binary_structure(2, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    percentile: float = 95.0,
) -> float:
    """95th-percentile symmetric Hausdorff distance between two mask boundaries.

    Pools the distances from every predicted boundary pixel to the nearest true
    boundary pixel and vice versa, then takes the percentile of the pool
    (the medpy ``hd95`` convention).

    Args:
        pred, truth: ``[H, W]`` binary masks.
        spacing: pixel size, scalar or ``(dy, dx)``; distances are in pixels when None.
        percentile: 95 for HD95, 100 for the plain Hausdorff distance.

    Returns:
        The distance, or NaN when either mask is empty.
    """
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"hd95 needs two [H, W] masks, got {pred.shape} and {truth.shape}")
    if not pred.any() or not truth.any():
        return float("nan")
    # Cropping to the union's bounding box is exact (every boundary pixel lies
    # inside it) and makes small lesions cheap on large scans.
    (box,) = ndimage.find_objects((pred | truth).astype(np.int8))
    pred, truth = pred[box], truth[box]
    bp, bt = _boundary(pred), _boundary(truth)
    to_truth = ndimage.distance_transform_edt(~bt, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~bp, sampling=spacing)
    return float(np.percentile(np.concatenate([to_truth[bp], to_pred[bt]]), percentile))


def segmentation_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    spacing: float | Sequence[float] | None = None,
    with_hd95: bool = True,
) -> dict[str, np.ndarray]:
    """Per-scan segmentation scores (the rows of a per-scan CSV).

    Args:
        pred, truth: ``[N, H, W]`` or ``[N, H, W, 1]`` binary masks.
        spacing: pixel size for HD95 (pixels when None).
        with_hd95: skip the distance transforms when False (HD95 all NaN).

    Returns:
        ``[N]`` arrays: ``has_lesion`` (bool), ``tp, fp, fn, tn`` (int64),
        ``dice``, ``iou`` (empty-mask rule), ``precision`` (NaN on an empty
        prediction), ``recall`` (NaN on an empty truth), ``f1`` (= Dice, NaN
        when both masks are empty), ``accuracy``, ``hd95`` (NaN when either mask
        is empty).
    """
    pred, truth = _masks_pair(pred, truth)
    c = pixel_counts(pred, truth)
    tp, fp, fn, tn = c.T
    out = {
        "has_lesion": truth.reshape(len(truth), -1).any(1),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "dice": _div(2 * tp, 2 * tp + fp + fn, empty=1.0),
        "iou": _div(tp, tp + fp + fn, empty=1.0),
        "precision": _div(tp, tp + fp),
        "recall": _div(tp, tp + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "accuracy": _div(tp + tn, c.sum(1)),
    }
    if with_hd95:
        out["hd95"] = np.array(
            [hd95(p, t, spacing) for p, t in zip(pred, truth, strict=True)], np.float64
        )
    else:
        out["hd95"] = np.full(len(pred), np.nan)
    return out


def _micro(which: str) -> StatFn:
    """Micro-averaged pixel metric of resampled ``[B, N, 4]`` (tp, fp, fn, tn) counts."""

    def fn(counts: np.ndarray) -> np.ndarray:
        tp, fp, fn_, tn = np.moveaxis(counts.sum(axis=-2), -1, 0)
        if which == "accuracy":
            return _div(tp + tn, tp + fp + fn_ + tn)
        if which == "precision":
            return _div(tp, tp + fp)
        if which == "recall":
            return _div(tp, tp + fn_)
        # 2TP / (2TP + FP + FN) is the harmonic mean of precision and recall
        # wherever those are defined.
        return _div(2 * tp, 2 * tp + fp + fn_)

    return fn


def segmentation_report(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    spacing: float | Sequence[float] | None = None,
) -> dict:
    """Segmentation summary with 95% bootstrap intervals, plus per-scan scores.

    Args:
        pred, truth: ``[N, H, W]`` or ``[N, H, W, 1]`` binary masks.
        n_boot: bootstrap resamples (of scans).
        seed: bootstrap seed.
        spacing: pixel size for HD95; the unit is stated in ``hd95_unit``.

    Returns:
        A dict: ``lesion_dice``, ``lesion_iou`` (mean over scans with a
        non-empty true mask), ``dice_all``, ``iou_all`` (every scan, empty-mask
        rule), ``pixel_accuracy``, ``pixel_precision``, ``pixel_recall``,
        ``pixel_f1`` (micro: counts summed over every pixel of every scan),
        ``hd95`` (mean over lesion scans with a non-empty prediction), each
        ``{"mean", "ci95"}``; counts ``n_scans``, ``n_lesion_scans``,
        ``n_hd95_undefined`` (lesion scans with an empty prediction, left out
        of ``hd95``); the conventions as strings; and ``per_scan``: the numpy
        arrays of :func:`segmentation_scores` (pop it before writing JSON, or
        pass the report through :func:`to_jsonable`).
    """
    s = segmentation_scores(pred, truth, spacing=spacing)
    lesion = s["has_lesion"]
    counts = np.stack([s["tp"], s["fp"], s["fn"], s["tn"]], axis=1).astype(np.float64)

    def ci(values, stat_fn=None):
        return bootstrap_ci(values, stat_fn, n_boot, seed)

    def on_lesion(v):
        # NaN marks normal scans, which _finite_mean then leaves out.
        return np.where(lesion, v, np.nan)

    report = {
        "lesion_dice": ci(on_lesion(s["dice"])),
        "lesion_iou": ci(on_lesion(s["iou"])),
        "dice_all": ci(s["dice"]),
        "iou_all": ci(s["iou"]),
        "pixel_accuracy": ci(counts, _micro("accuracy")),
        "pixel_precision": ci(counts, _micro("precision")),
        "pixel_recall": ci(counts, _micro("recall")),
        "pixel_f1": ci(counts, _micro("f1")),
        "hd95": ci(on_lesion(s["hd95"])),
        "pixel_confusion": [
            [int(s["tn"].sum()), int(s["fp"].sum())],
            [int(s["fn"].sum()), int(s["tp"].sum())],
        ],
        "n_scans": len(lesion),
        "n_lesion_scans": int(lesion.sum()),
        "n_hd95_undefined": int((lesion & ~np.isfinite(s["hd95"])).sum()),
        "hd95_unit": "pixels" if spacing is None else f"spacing units ({spacing})",
        "empty_mask_rule": EMPTY_MASK_RULE,
        "bootstrap": {"method": SEG_BOOTSTRAP, "n_boot": int(n_boot), "seed": int(seed)},
        "per_scan": s,
    }
    return report


# --- Binary classification ----------------------------------------------------


def _binary_inputs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ in length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (benign) or 1 (malignant)")
    return probs, labels.astype(np.int64)


def confusion_binary(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``[[tn, fp], [fn, tp]]`` (rows: truth, columns: prediction ``probs >= threshold``).

    Returns:
        ``[2, 2]`` int64.
    """
    probs, labels = _binary_inputs(probs, labels)
    pred = (probs >= threshold).astype(np.int64)
    return np.bincount(2 * labels + pred, minlength=4).reshape(2, 2)


def roc_curve(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """ROC points at every distinct score, from (0, 0) to (1, 1).

    Its trapezoidal area equals :func:`busi_jax.metrics.roc_auc` (ties count half).

    Returns:
        ``fpr``, ``tpr``, ``thresholds`` (``[K + 1]``; the first threshold is
        +inf: nothing called positive). NaN rates when a class is absent.
    """
    probs, labels = _binary_inputs(probs, labels)
    tps, fps, thr = _cumulative_counts(probs, labels)
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    return {
        "fpr": np.r_[0.0, _div(fps, np.full(fps.shape, n_neg))],
        "tpr": np.r_[0.0, _div(tps, np.full(tps.shape, n_pos))],
        "thresholds": np.r_[np.inf, thr],
    }


def _cumulative_counts(probs, labels):
    # TP and FP counts when calling positive every score >= each distinct score.
    order = np.argsort(-probs, kind="mergesort")
    p, y = probs[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1] if len(p) else np.zeros(0, int)
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    return tps, fps, p[last]


def pr_curve(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Precision-recall points at every distinct score, plus (recall 0, precision 1).

    Returns:
        ``precision``, ``recall``, ``thresholds`` (``[K + 1]``, the first +inf)
        and ``average_precision`` (float: sum over points of recall gain times
        precision, no interpolation).
    """
    probs, labels = _binary_inputs(probs, labels)
    tps, fps, thr = _cumulative_counts(probs, labels)
    recall = np.r_[0.0, _div(tps, np.full(tps.shape, labels.sum()))]
    precision = np.r_[1.0, _div(tps, tps + fps)]
    ap = float(np.sum(np.diff(recall) * precision[1:])) if labels.any() else float("nan")
    return {
        "precision": precision,
        "recall": recall,
        "thresholds": np.r_[np.inf, thr],
        "average_precision": ap,
    }


def _bin_index(probs: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip(np.floor(probs * n_bins).astype(np.int64), 0, n_bins - 1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict:
    """Per-bin calibration data for a reliability diagram.

    Args:
        probs: ``[N]`` predicted probability of the positive (malignant) class.
        labels: ``[N]`` in {0, 1}.
        n_bins: equal-width bins on [0, 1].

    Returns:
        ``edges`` ``[n_bins + 1]``; ``count``, ``mean_prob``, ``frac_pos``
        ``[n_bins]`` (NaN for empty bins); ``ece`` (float).
    """
    probs, labels = _binary_inputs(probs, labels)
    b = _bin_index(probs, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(b, weights=probs, minlength=n_bins)
    sum_y = np.bincount(b, weights=labels.astype(np.float64), minlength=n_bins)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count,
        "mean_prob": _div(sum_p, count),
        "frac_pos": _div(sum_y, count),
        "ece": float(np.abs(sum_p - sum_y).sum() / len(probs)) if len(probs) else float("nan"),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE: count-weighted mean over equal-width bins of |mean probability - positive fraction|.

    Args:
        probs: ``[N]`` predicted probability of the positive class.
        labels: ``[N]`` in {0, 1}.
        n_bins: bins on [0, 1] (the last one closed).
    """
    return reliability_bins(probs, labels, n_bins)["ece"]


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared difference between probability and label, ``[N]`` each."""
    probs, labels = _binary_inputs(probs, labels)
    return float(np.mean((probs - labels) ** 2)) if len(probs) else float("nan")


def _binary_stat(which: str, threshold: float, n_bins: int) -> StatFn:
    """Vectorised statistic of resampled ``[B, N, 2]`` (probability, label) rows."""

    def fn(v: np.ndarray) -> np.ndarray:
        p, y = v[..., 0], v[..., 1] > 0.5
        if which == "auc":
            # roc_auc is the reference implementation; 1000 calls take ~0.1 s.
            return np.array([roc_auc(pi, yi) for pi, yi in zip(p, y, strict=True)])
        if which == "brier":
            return np.mean((p - y) ** 2, axis=-1)
        if which == "ece":
            onehot = _bin_index(p, n_bins)[..., None] == np.arange(n_bins)
            gap = (onehot * (p - y)[..., None]).sum(axis=-2)
            return np.abs(gap).sum(axis=-1) / p.shape[-1]
        pred = p >= threshold
        tp = (pred & y).sum(-1)
        fp = (pred & ~y).sum(-1)
        fn_ = (~pred & y).sum(-1)
        tn = (~pred & ~y).sum(-1)
        if which == "accuracy":
            return _div(tp + tn, tp + fp + fn_ + tn)
        if which == "precision":
            return _div(tp, tp + fp)
        if which in ("recall", "sensitivity"):
            return _div(tp, tp + fn_)
        if which == "specificity":
            return _div(tn, tn + fp)
        if which == "f1":
            return _div(2 * tp, 2 * tp + fp + fn_)
        raise ValueError(f"unknown metric {which!r}")

    return fn


BINARY_METRICS = (
    "auc",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "sensitivity",
    "specificity",
    "ece",
    "brier",
)


def classification_report(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
) -> dict:
    """Benign-vs-malignant summary with 95% stratified-bootstrap intervals.

    Args:
        probs: ``[N]`` malignancy probabilities.
        labels: ``[N]`` 0 = benign, 1 = malignant.
        threshold: a case is called malignant when ``prob >= threshold``.
        n_boot: bootstrap resamples, stratified by label.
        seed: bootstrap seed.
        n_bins: equal-width calibration bins for ECE.

    Returns:
        A dict: each of :data:`BINARY_METRICS` as ``{"mean", "ci95"}`` (F1 is
        2TP / (2TP + FP + FN), i.e. 0 rather than NaN when TP = 0);
        ``confusion`` ``[[tn, fp], [fn, tp]]``; ``roc`` and ``pr`` curve points
        (lists); ``reliability`` bins; counts, threshold and conventions.
    """
    probs, labels = _binary_inputs(probs, labels)
    values = np.stack([probs, labels.astype(np.float64)], axis=1)
    report: dict = {}
    for name in BINARY_METRICS:
        report[name] = bootstrap_ci(
            values, _binary_stat(name, threshold, n_bins), n_boot, seed, strata=labels
        )
    roc = roc_curve(probs, labels)
    pr = pr_curve(probs, labels)
    rel = reliability_bins(probs, labels, n_bins)
    report.update(
        confusion=confusion_binary(probs, labels, threshold).tolist(),
        confusion_layout="[[tn, fp], [fn, tp]]; rows truth (benign, malignant), columns prediction",
        roc={k: roc[k].tolist() for k in ("fpr", "tpr", "thresholds")},
        pr={k: pr[k].tolist() for k in ("precision", "recall", "thresholds")},
        average_precision=pr["average_precision"],
        reliability={k: np.asarray(v).tolist() for k, v in rel.items() if k != "ece"},
        threshold=float(threshold),
        n=len(labels),
        n_malignant=int(labels.sum()),
        ece_bins=f"{n_bins} {ECE_BINS}",
        bootstrap={"method": CLS_BOOTSTRAP, "n_boot": int(n_boot), "seed": int(seed)},
    )
    return report


# --- Multi-class ----------------------------------------------------------------


def _confusion_rows(y: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    """``[..., C, C]`` confusion matrices of ``[..., N]`` label/prediction rows."""
    lead = y.shape[:-1]
    flat_y, flat_p = y.reshape(-1, y.shape[-1]), pred.reshape(-1, y.shape[-1])
    offset = np.arange(len(flat_y))[:, None] * c * c
    cm = np.bincount((offset + flat_y * c + flat_p).ravel(), minlength=len(flat_y) * c * c)
    return cm.reshape(*lead, c, c)


def _per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    pred_n, true_n = cm.sum(-2), cm.sum(-1)
    return {
        "precision": _div(tp, pred_n),
        "recall": _div(tp, true_n),
        # F1 = 2TP / (predicted + true): 0 for a class never predicted correctly,
        # NaN only for a class absent from both truth and predictions.
        "f1": _div(2 * tp, pred_n + true_n),
    }


def multiclass_report(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Multi-class (e.g. normal / benign / malignant) summary; predictions are the argmax.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` ints in ``[0, C)``.
        class_names: ``C`` names for the per-class tables (default "0", "1", ...).
        n_boot: bootstrap resamples (stratified by label) for accuracy,
            macro F1 and macro AUC.
        seed: bootstrap seed.

    Returns:
        A dict: ``accuracy``, ``macro_f1``, ``macro_auc`` as ``{"mean", "ci95"}``;
        ``per_class`` {name: {precision, recall, f1, auc (one-vs-rest), support}};
        ``confusion`` ``[C, C]`` (rows truth, columns prediction); conventions.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be [N, C] with N = len(labels); got {probs.shape}")
    c = probs.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must lie in [0, {c})")
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} classes")
    pred = probs.argmax(-1)
    cm = _confusion_rows(labels[None], pred[None], c)[0]
    per = _per_class(cm)
    aucs = np.array([roc_auc(probs[:, k], labels == k) for k in range(c)])

    # Rows: label, prediction, then the C probabilities (for the AUC).
    values = np.column_stack([labels, pred, probs])

    def acc(v):
        return np.mean(v[..., 0] == v[..., 1], axis=-1)

    def macro_f1(v):
        cms = _confusion_rows(v[..., 0].astype(np.int64), v[..., 1].astype(np.int64), c)
        return _finite_mean(_per_class(cms)["f1"])

    def macro_auc(v):
        y = v[..., 0].astype(np.int64)
        aucs_b = [
            [roc_auc(vi[:, 2 + k], yi == k) for k in range(c)] for vi, yi in zip(v, y, strict=True)
        ]
        return _finite_mean(np.array(aucs_b, np.float64).reshape(len(v), c))

    def ci(fn):
        return bootstrap_ci(values, fn, n_boot, seed, strata=labels)

    return {
        "accuracy": ci(acc),
        "macro_f1": ci(macro_f1),
        "macro_auc": ci(macro_auc),
        "per_class": {
            name: {
                "precision": float(per["precision"][k]),
                "recall": float(per["recall"][k]),
                "f1": float(per["f1"][k]),
                "auc_ovr": float(aucs[k]),
                "support": int(cm[k].sum()),
            }
            for k, name in enumerate(names)
        },
        "confusion": cm.tolist(),
        "class_names": names,
        "confusion_layout": "rows truth, columns prediction (argmax)",
        "n": len(labels),
        "bootstrap": {"method": CLS_BOOTSTRAP, "n_boot": int(n_boot), "seed": int(seed)},
    }


# --- Temperature scaling ----------------------------------------------------------


def logit(probs: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Log-odds of ``[N]`` probabilities (clipped to [eps, 1 - eps]), for stored probabilities."""
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    if z.ndim == 1:
        # Binary cross-entropy in the stable softplus form.
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))
    return float(np.mean(special.logsumexp(z, axis=1) - z[np.arange(len(z)), labels]))


def temperature_scale(
    logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Fits the temperature ``T`` minimising the NLL of ``logits / T``.

    Fit it on validation predictions and apply it (:func:`apply_temperature`)
    to test predictions; fitting on test would leak.

    Args:
        logits: ``[N]`` binary logits (malignant vs benign) or ``[N, C]``.
        labels: ``[N]`` ints ({0, 1} for binary).
        bounds: search range for ``T``.

    Returns:
        ``T`` (> 1 softens an over-confident model).
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if logits.ndim not in (1, 2) or len(logits) != len(labels) or not len(labels):
        raise ValueError(f"logits {logits.shape} do not match labels {labels.shape}")
    # Searching over log T makes the bracket symmetric around T = 1.
    res = optimize.minimize_scalar(
        lambda log_t: _nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(res.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities: ``sigmoid(logits / T)`` for ``[N]``, softmax for ``[N, C]``."""
    z = np.asarray(logits, np.float64) / float(temperature)
    return special.expit(z) if z.ndim == 1 else special.softmax(z, axis=1)


# --- JSON -------------------------------------------------------------------------------


def to_jsonable(obj):
    """A JSON-safe copy: numpy arrays and scalars to Python, NaN and inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
