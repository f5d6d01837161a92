"""Evaluation figures as PNG files.

Every figure is drawn on a bare ``matplotlib.figure.Figure`` with the Agg
canvas (never ``pyplot``), so nothing depends on or changes the global backend
and a headless machine works. Each function writes its PNG atomically (a
temporary file beside ``out_path``, then ``os.replace``) and returns the path.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from skimage import measure

from busi_jax import evalmetrics
from busi_jax import io as busi_io

PathLike = str | os.PathLike

# Keys of a metrics.jsonl line that are bookkeeping rather than metrics.
_NOT_METRICS = {"epoch", "step", "split", "img_per_s", "epoch_seconds", "best_epoch"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path: PathLike, dpi: int = 120) -> pathlib.Path:
    with busi_io.atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
        # mkstemp creates 0600 files; figures are meant to be shared.
        os.chmod(tmp, 0o644)
    return pathlib.Path(out_path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_records(metrics: PathLike | Iterable[Mapping]) -> list[Mapping]:
    if isinstance(metrics, (str, os.PathLike)):
        text = pathlib.Path(metrics).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(metrics)


def plot_curves(
    metrics: PathLike | Iterable[Mapping],
    out_path: PathLike,
    *,
    keys: Sequence[str] | None = None,
    title: str = "",
) -> pathlib.Path:
    """Training loss and validation metrics per epoch.

    Args:
        metrics: a ``metrics.jsonl`` path (one JSON object per epoch) or the
            records themselves; each needs ``epoch``.
        out_path: PNG to write.
        keys: validation metrics for the right panel; default every numeric
            key other than losses and bookkeeping.
        title: figure title.

    Returns:
        ``out_path`` as a Path.
    """
    records = sorted(_read_records(metrics), key=lambda r: r.get("epoch", 0))
    epochs = np.array([r.get("epoch", i + 1) for i, r in enumerate(records)], np.float64)
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in _NOT_METRICS and (_finite(v) or v is None):
                seen[k] = None
    loss_keys = [k for k in seen if "loss" in k]
    metric_keys = list(keys) if keys is not None else [k for k in seen if "loss" not in k]

    def series(k):
        return np.array([r[k] if _finite(r.get(k)) else np.nan for r in records], np.float64)

    fig = _figure(11, 4)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for k in loss_keys:
        ax_loss.plot(epochs, series(k), marker=".", label=k)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    for k in metric_keys:
        ax_metric.plot(epochs, series(k), marker=".", label=k)
    ax_metric.set(xlabel="epoch", ylabel="value", title="validation")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out_path)


def _annotate_cells(ax, text: np.ndarray, shade: np.ndarray) -> None:
    # White text on dark cells, black on light ones, for legibility.
    for (i, j), s in np.ndenumerate(text):
        dark = np.isfinite(shade[i, j]) and shade[i, j] > 0.55
        ax.text(j, i, s, ha="center", va="center", fontsize=9, color="white" if dark else "black")


def plot_confusion(
    cm: Sequence[Sequence[float]],
    class_names: Sequence[str],
    out_path: PathLike,
    title: str = "",
) -> pathlib.Path:
    """Confusion matrix: counts and row-normalised percentages (rows truth).

    Args:
        cm: ``[C, C]`` counts, rows truth, columns prediction (e.g. the pixel
            ``[[tn, fp], [fn, tp]]`` with names background/lesion).
        class_names: ``C`` names.
        out_path: PNG to write.
        title: axes title.
    """
    cm = np.asarray(cm, np.float64)
    c = len(class_names)
    if cm.shape != (c, c):
        raise ValueError(f"cm has shape {cm.shape} for {c} class names")
    rows = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(rows > 0, cm / np.where(rows > 0, rows, 1), np.nan)
    text = np.empty(cm.shape, object)
    for (i, j), v in np.ndenumerate(cm):
        pct = "–" if not np.isfinite(frac[i, j]) else f"{100 * frac[i, j]:.1f}%"
        # Pixel counts run to millions: use engineering-style short forms.
        text[i, j] = f"{_short_count(v)}\n({pct})"
    fig = _figure(1.6 + 1.3 * c, 1.2 + 1.2 * c)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    _annotate_cells(ax, text, frac)
    ax.set_xticks(range(c), class_names)
    ax.set_yticks(range(c), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046, label="row fraction")
    return _save(fig, out_path)


def _short_count(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def plot_metric_heatmap(
    table: Mapping[str, Mapping[str, float]], out_path: PathLike, title: str = ""
) -> pathlib.Path:
    """Per-class metrics heatmap (rows classes, columns metrics, colour on [0, 1]).

    Args:
        table: ``{class: {metric: value}}``; missing or None values show as "–".
        out_path: PNG to write.
        title: axes title.
    """
    classes = list(table)
    metrics: dict[str, None] = {}
    for row in table.values():
        metrics.update(dict.fromkeys(row))
    names = list(metrics)
    values = np.array(
        [[_as_float(table[c].get(m)) for m in names] for c in classes], np.float64
    ).reshape(len(classes), len(names))
    text = np.vectorize(lambda v: "–" if not np.isfinite(v) else f"{v:.3f}", otypes=[object])(
        values
    )
    fig = _figure(2 + 1.2 * max(len(names), 1), 1.2 + 0.6 * max(len(classes), 1))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    if values.size:
        # viridis is dark at low values: flip the text-colour rule.
        _annotate_cells(ax, text, 1.0 - values)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_title(title or "per-class metrics")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, out_path)


def _as_float(v) -> float:
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def plot_reliability(
    probs: np.ndarray,
    labels: np.ndarray,
    out_path: PathLike,
    n_bins: int = 10,
    title: str = "",
) -> pathlib.Path:
    """Reliability diagram (observed malignant fraction per probability bin) with ECE.

    Args:
        probs: ``[N]`` malignancy probabilities.
        labels: ``[N]`` in {0, 1}.
        out_path: PNG to write.
        n_bins: equal-width bins on [0, 1] (as in :func:`evalmetrics.expected_calibration_error`).
        title: prefix of the title (the ECE is appended).
    """
    rel = evalmetrics.reliability_bins(probs, labels, n_bins)
    edges = rel["edges"]
    centers, width = 0.5 * (edges[:-1] + edges[1:]), np.diff(edges)
    fig = _figure(5, 6)
    ax, ax_hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(
        centers,
        np.nan_to_num(rel["frac_pos"]),
        width=width,
        edgecolor="k",
        alpha=0.7,
        label="observed fraction",
    )
    ax.plot(
        rel["mean_prob"],
        rel["frac_pos"],
        "o-",
        color="C3",
        ms=4,
        label="observed at bin mean prob.",
    )
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction malignant")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{title + ' — ' if title else ''}ECE = {rel['ece']:.3f} ({n_bins} bins)")
    ax_hist.bar(centers, rel["count"], width=width, edgecolor="k", color="0.6")
    ax_hist.set(xlabel="predicted probability", ylabel="count")
    return _save(fig, out_path)


def plot_roc_pr(
    probs: np.ndarray, labels: np.ndarray, out_path: PathLike, title: str = ""
) -> pathlib.Path:
    """ROC and precision-recall curves side by side, with AUC and average precision.

    Args:
        probs: ``[N]`` malignancy probabilities.
        labels: ``[N]`` in {0, 1}.
        out_path: PNG to write.
        title: figure title.
    """
    roc = evalmetrics.roc_curve(probs, labels)
    pr = evalmetrics.pr_curve(probs, labels)
    auc = evalmetrics.roc_auc(probs, labels)
    prevalence = float(np.mean(np.asarray(labels))) if len(labels) else float("nan")
    fig = _figure(10, 4.5)
    ax_roc, ax_pr = fig.subplots(1, 2)
    ax_roc.plot(roc["fpr"], roc["tpr"], lw=2, label=f"AUC = {auc:.3f}")
    ax_roc.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax_roc.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title="ROC")
    # Recall rises along the arrays, so "pre" draws precision p_k over
    # (r_{k-1}, r_k]: the rectangles that average precision sums.
    ax_pr.step(
        pr["recall"],
        pr["precision"],
        where="pre",
        lw=2,
        label=f"AP = {pr['average_precision']:.3f}",
    )
    ax_pr.axhline(prevalence, color="k", ls="--", lw=1, label=f"prevalence {prevalence:.2f}")
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision", title="precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    if title:
        fig.suptitle(title)
    return _save(fig, out_path)


def pick_cases(scores: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Indices of the best, median and worst ``k`` scans by score.

    NaN scores are ignored. Ties keep index order. With fewer than ``3 k``
    scans the groups overlap.

    Args:
        scores: ``[N]`` per-scan scores (higher is better, e.g. Dice).
        k: cases per group.

    Returns:
        ``{"best": [k], "median": [k], "worst": [k]}`` int arrays; best in
        descending score, worst in ascending, median around the middle.
    """
    scores = np.asarray(scores, np.float64)
    valid = np.flatnonzero(np.isfinite(scores))
    ranked = valid[np.argsort(-scores[valid], kind="stable")]
    n, k = len(ranked), max(0, min(int(k), len(ranked)))
    start = min(max((n - 1) // 2 - (k - 1) // 2, 0), n - k)
    return {
        "best": ranked[:k],
        "median": ranked[start : start + k],
        "worst": ranked[::-1][:k] if k else ranked[:0],
    }


def _contours(ax, mask: np.ndarray, color: str, label: str | None) -> None:
    # Padding closes contours of masks that touch the image edge.
    padded = np.pad(np.asarray(mask, np.float64), 1)
    for i, c in enumerate(measure.find_contours(padded, 0.5)):
        ax.plot(c[:, 1] - 1, c[:, 0] - 1, color=color, lw=1.2, label=label if i == 0 else None)


def plot_contour_grid(
    images: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    scores: Sequence[float] | None,
    titles: Sequence[str] | None,
    out_path: PathLike,
    *,
    ncols: int = 4,
    score_name: str = "Dice",
) -> pathlib.Path:
    """Scans with true (green) and predicted (red) lesion contours.

    Args:
        images: ``[N, H, W]`` (or ``[N, H, W, 1]``) uint8 scans.
        truth: ``[N, H, W]`` bool true masks.
        pred: ``[N, H, W]`` bool predicted masks.
        scores: ``[N]`` per-scan scores shown under each title, or None.
        titles: ``N`` titles (e.g. scan ids), or None.
        out_path: PNG to write.
        ncols: panels per row.
        score_name: label of the score.
    """
    images, truth, pred = (_squeeze(x) for x in (images, truth, pred))
    n = len(images)
    if not (truth.shape == pred.shape == images.shape):
        raise ValueError(f"shapes differ: {images.shape}, {truth.shape}, {pred.shape}")
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(2.6 * ncols, 2.9 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        _contours(ax, truth[i], "lime", "truth" if i == 0 else None)
        _contours(ax, pred[i], "red", "prediction" if i == 0 else None)
        parts = []
        if titles is not None:
            parts.append(str(titles[i]))
        if scores is not None:
            s = float(scores[i])
            parts.append(f"{score_name} {s:.3f}" if math.isfinite(s) else f"{score_name} –")
        ax.set_title("\n".join(parts), fontsize=8)
    if n and axes[0].get_legend_handles_labels()[0]:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncols=2, fontsize=8)
    return _save(fig, out_path)


def _squeeze(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x


def plot_heatmap_overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    out_path: PathLike,
    contour: np.ndarray | None = None,
    *,
    alpha: float = 0.4,
    title: str = "",
) -> pathlib.Path:
    """Grad-CAM style overlay: jet heatmap over the grey scan, optional mask contour.

    Args:
        image: ``[H, W]`` (or ``[H, W, 1]``) scan, uint8 or float.
        heatmap: ``[H, W]`` in [0, 1] (clipped), same size as the scan.
        out_path: PNG to write.
        contour: optional ``[H, W]`` bool mask outlined in white.
        alpha: heatmap opacity.
        title: axes title.
    """
    image = np.asarray(image)
    image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    heatmap = np.clip(np.asarray(heatmap, np.float64), 0.0, 1.0)
    if image.shape != heatmap.shape:
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} differ")
    fig = _figure(5, 5.3)
    ax = fig.subplots()
    ax.imshow(image, cmap="gray")
    im = ax.imshow(heatmap, cmap=matplotlib.colormaps["jet"], vmin=0, vmax=1, alpha=alpha)
    if contour is not None:
        _contours(ax, np.asarray(contour).reshape(image.shape), "white", None)
    ax.set_axis_off()
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, out_path)


def plot_gradcam_grid(
    images: np.ndarray,
    pred: np.ndarray,
    cams: Mapping[str, np.ndarray],
    titles: Sequence[str] | None,
    out_path: PathLike,
    *,
    alpha: float = 0.45,
) -> pathlib.Path:
    """One row per scan: the scan with its predicted contour, then each Grad-CAM.

    Args:
        images: ``[N, H, W]`` (or ``[N, H, W, 1]``) uint8 scans.
        pred: ``[N, H, W]`` bool predicted masks, outlined on every panel.
        cams: column title -> ``[N, H, W]`` heat maps in [0, 1] (e.g.
            ``{"segmenter Grad-CAM": ..., "classifier Grad-CAM": ...}``).
        titles: ``N`` row titles, or None.
        out_path: PNG to write.
        alpha: heat-map opacity.
    """
    images, pred = _squeeze(images), _squeeze(pred)
    n, ncols = len(images), 1 + len(cams)
    for name, cam in cams.items():
        if np.shape(cam) != images.shape:
            raise ValueError(f"{name}: shape {np.shape(cam)} differs from {images.shape}")
    fig = _figure(2.4 * ncols, 2.6 * max(n, 1))
    axes = fig.subplots(max(n, 1), ncols, squeeze=False)
    jet = matplotlib.colormaps["jet"]
    for i in range(n):
        row = axes[i]
        row[0].imshow(images[i], cmap="gray", vmin=0, vmax=255)
        _contours(row[0], pred[i], "red", None)
        row[0].set_title(str(titles[i]) if titles is not None else "scan", fontsize=7)
        for ax, (name, cam) in zip(row[1:], cams.items()):
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
            ax.imshow(np.clip(cam[i], 0, 1), cmap=jet, vmin=0, vmax=1, alpha=alpha)
            _contours(ax, pred[i], "white", None)
            ax.set_title(name, fontsize=7)
        for ax in row:
            ax.set_axis_off()
    return _save(fig, out_path)
