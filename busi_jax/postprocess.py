"""Mask post-processing, its selection on validation, and flip test-time augmentation.

The operations run in a fixed order on a probability map:

1. threshold (``prob >= threshold``, as in training);
2. binary opening with a disk of ``opening`` px (removes thin strands and specks);
3. binary closing with a disk of ``closing`` px (bridges small gaps);
4. hole filling;
5. dropping components smaller than ``min_size`` px, then keeping only the
   largest component (a scan shows at most one lesion in most of BUSI).

Components are 8-connected; holes are background regions not 4-connected to
the image edge. Stacks ``[N, H, W]`` are processed in one call with in-plane
structuring elements, so nothing ever connects across neighbouring scans.
Opening and closing pad the scan by edge replication so a lesion touching the
image edge is not eroded from outside the image.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import disk

from busi_jax import evalmetrics


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """How to turn a lesion probability map into a mask.

    Attributes:
        threshold: foreground where ``prob >= threshold``.
        opening: disk radius in px for binary opening; 0 = off.
        closing: disk radius in px for binary closing; 0 = off.
        fill_holes: fill background regions enclosed by the mask.
        largest_component: keep only the largest 8-connected component.
        min_size: drop components smaller than this many px; 0 = off. Applied
            before ``largest_component``, so a scan whose components are all
            small ends up empty.
    """

    threshold: float = 0.5
    opening: int = 0
    closing: int = 0
    fill_holes: bool = False
    largest_component: bool = False
    min_size: int = 0

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} outside [0, 1]")
        for name in ("opening", "closing", "min_size"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def n_ops(self) -> int:
        """Number of operations switched on (the threshold is not counted)."""
        return (
            (self.opening > 0)
            + (self.closing > 0)
            + bool(self.fill_holes)
            + bool(self.largest_component)
            + (self.min_size > 0)
        )

    def describe(self) -> str:
        """A short label, e.g. ``t=0.50 open=1 fill largest``."""
        parts = [f"t={self.threshold:.2f}"]
        if self.opening:
            parts.append(f"open={self.opening}")
        if self.closing:
            parts.append(f"close={self.closing}")
        if self.fill_holes:
            parts.append("fill")
        if self.min_size:
            parts.append(f"min={self.min_size}")
        if self.largest_component:
            parts.append("largest")
        return " ".join(parts)


def _in_plane(structure_2d: np.ndarray) -> np.ndarray:
    # A 3x3x3 element with only its middle plane set: a [N, H, W] stack is then
    # processed scan by scan in one vectorised call (ndimage.label needs 3s).
    out = np.zeros((3, 3, 3), bool)
    out[1] = structure_2d
    return out


_CROSS = _in_plane(ndimage.generate_binary_structure(2, 1))
_SQUARE = _in_plane(ndimage.generate_binary_structure(2, 2))


def _as_stack(x: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """A ``[N, H, W]`` view of ``[H, W]``, ``[N, H, W]`` or ``[N, H, W, 1]``, and its inverse."""
    x = np.asarray(x)
    shape = x.shape
    if x.ndim == 2:
        stack = x[None]
    elif x.ndim == 3:
        stack = x
    elif x.ndim == 4 and shape[-1] == 1:
        stack = x[..., 0]
    else:
        raise ValueError(f"expected [H, W], [N, H, W] or [N, H, W, 1], got {shape}")
    return stack, lambda y: y.reshape(shape)


def _morph(masks: np.ndarray, radius: int, op) -> np.ndarray:
    if radius <= 0:
        return masks
    # A pad of 2r makes both passes of opening/closing exact inside the scan.
    pad = 2 * radius
    padded = np.pad(masks, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    out = op(padded, structure=disk(radius).astype(bool)[None])
    return out[:, pad:-pad, pad:-pad]


def _fill(masks: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(masks, structure=_CROSS)


def _label(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Component labels ``[N, H, W]``, sizes ``[L + 1]`` and owning scan ``[L + 1]``."""
    labels, n = ndimage.label(masks, structure=_SQUARE)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    scan = np.zeros(n + 1, np.int64)
    z = np.nonzero(labels)[0]
    scan[labels[labels > 0]] = z
    return labels, sizes, scan


def _select(
    labelled: tuple[np.ndarray, np.ndarray, np.ndarray], min_size: int, largest: bool
) -> np.ndarray:
    labels, sizes, scan = labelled
    keep = sizes >= max(int(min_size), 1)
    keep[0] = False
    if largest and len(sizes) > 1:
        ids = np.arange(1, len(sizes))
        # Per scan: biggest first, ties to the first component in raster order.
        order = np.lexsort((ids, -sizes[1:], scan[1:]))
        first = np.r_[True, scan[1:][order][1:] != scan[1:][order][:-1]]
        biggest = np.zeros_like(keep)
        biggest[ids[order][first]] = True
        keep &= biggest
    return keep[labels]


def _apply_stack(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    m = prob >= cfg.threshold
    m = _morph(m, int(cfg.opening), ndimage.binary_opening)
    m = _morph(m, int(cfg.closing), ndimage.binary_closing)
    if cfg.fill_holes:
        m = _fill(m)
    if cfg.min_size > 0 or cfg.largest_component:
        m = _select(_label(m), int(cfg.min_size), cfg.largest_component)
    return m


def apply(prob: np.ndarray, cfg: PostprocessConfig = PostprocessConfig()) -> np.ndarray:
    """Turns probability maps into post-processed masks.

    Args:
        prob: ``[H, W]``, ``[N, H, W]`` or ``[N, H, W, 1]`` float lesion probabilities.
        cfg: the operations to apply.

    Returns:
        bool masks of the same shape as ``prob``.
    """
    stack, restore = _as_stack(prob)
    return restore(_apply_stack(stack, cfg))


DEFAULT_GRID: dict[str, Sequence] = {
    "threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "opening": (0, 1, 2),
    "closing": (0, 1, 2),
    "fill_holes": (False, True),
    "min_size": (0,),
    "largest_component": (False, True),
}


def choose_on_validation(
    probs: np.ndarray,
    truth: np.ndarray,
    grid: Mapping[str, Sequence] | None = None,
    *,
    tol: float = 1e-4,
    reference_threshold: float = 0.5,
) -> tuple[PostprocessConfig, list[tuple[PostprocessConfig, float]]]:
    """Grid-searches post-processing on VALIDATION predictions only.

    Call this on the validation split and then apply the chosen config,
    unchanged, to the test split; choosing on test predictions would make
    the test numbers optimistic.

    The score is the mean per-scan Dice over ALL scans with the empty-mask
    rule, so removing false positives on normal (lesion-free) scans counts.
    An operation is kept only if it helps: among configs scoring within
    ``tol`` of the best, the one with the fewest operations wins, then the
    threshold nearest ``reference_threshold``, then the smallest radii and
    ``min_size``, then the lowest threshold.

    Args:
        probs: ``[N, H, W]`` (or ``[N, H, W, 1]``) validation lesion probabilities.
        truth: same-shape validation masks.
        grid: values to try per :class:`PostprocessConfig` field; missing keys
            take :data:`DEFAULT_GRID` (180 configs).
        tol: score margin within which configs count as tied.
        reference_threshold: the training threshold, preferred among ties.

    Returns:
        ``(best config, rows)``; rows are ``(config, mean Dice)`` for every
        config tried, in grid order.
    """
    probs, _ = _as_stack(probs)
    truth, _ = _as_stack(truth)
    truth = truth.astype(bool)
    if probs.shape != truth.shape:
        raise ValueError(f"probs {probs.shape} and truth {truth.shape} differ in shape")
    grid = dict(grid or {})
    unknown = set(grid) - set(DEFAULT_GRID)
    if unknown:
        raise ValueError(f"unknown grid keys {sorted(unknown)}; known: {list(DEFAULT_GRID)}")
    g = {k: tuple(grid.get(k, v)) for k, v in DEFAULT_GRID.items()}

    def score(m):
        return float(np.mean(evalmetrics.dice_per_scan(m, truth)))

    # Nested loops in pipeline order reuse each stage's output across every
    # later choice; only the cheap final selection runs for every config.
    rows: list[tuple[PostprocessConfig, float]] = []
    for t in g["threshold"]:
        m0 = probs >= t
        for r_open in g["opening"]:
            m1 = _morph(m0, int(r_open), ndimage.binary_opening)
            for r_close in g["closing"]:
                m2 = _morph(m1, int(r_close), ndimage.binary_closing)
                for fill in g["fill_holes"]:
                    m3 = _fill(m2) if fill else m2
                    labelled = None
                    for min_size, largest in itertools.product(
                        g["min_size"], g["largest_component"]
                    ):
                        cfg = PostprocessConfig(
                            float(t),
                            int(r_open),
                            int(r_close),
                            bool(fill),
                            bool(largest),
                            int(min_size),
                        )
                        if min_size > 0 or largest:
                            if labelled is None:
                                labelled = _label(m3)
                            m = _select(labelled, int(min_size), bool(largest))
                        else:
                            m = m3
                        rows.append((cfg, score(m)))

    best = max(s for _, s in rows)

    def simplicity(row):
        c = row[0]
        return (
            c.n_ops,
            abs(c.threshold - reference_threshold),
            c.opening + c.closing,
            c.min_size,
            c.threshold,
        )

    chosen = min((r for r in rows if r[1] >= best - tol), key=simplicity)
    return chosen[0], rows


def tta_flip_average(predict_fn: Callable, images):
    """Horizontal-flip test-time augmentation.

    Args:
        predict_fn: ``images [N, H, W, 1] -> probs [N, H, W, 1]`` (numpy or jax).
        images: ``[N, H, W, 1]``.

    Returns:
        ``[N, H, W, 1]``: the mean of ``predict_fn(x)`` and
        ``flip(predict_fn(flip(x)))``, flipping the width axis.
    """
    # Slicing (not np.flip) keeps jax arrays on device.
    direct = predict_fn(images)
    mirrored = predict_fn(images[:, :, ::-1])[:, :, ::-1]
    return 0.5 * (direct + mirrored)
