"""Near-duplicate groups: scans that show the same view must share a split.

BUSI stores many scans more than once: the same frame saved again (slightly
cropped, shifted or resized, sometimes under another class) and the same lesion
in a neighbouring frame. If such a pair straddles train and test, a model is
partly scored on images it trained on.

The rule, in three steps:

1. Fingerprint: each scan is resized to ``SIZE x SIZE`` and high-pass filtered
      (the scan minus its Gaussian blur, sigma ``HIGHPASS_SIGMA`` px). The
      low-frequency part -- bright fat on top, dark shadow below -- is shared by
      almost every breast scan, so it is removed; the speckle and tissue edges
      that remain are specific to one acquisition.
2. Similarity: normalised cross-correlation (NCC) between the central window of
      one fingerprint and windows of the other shifted by up to ``MAX_SHIFT`` px
      in each direction; the best over shifts, symmetrised. A crop of a few
      percent or a resize moves content by a few pixels at this size, which the
      shift search absorbs.
3. Grouping: average-linkage (UPGMA) agglomerative clustering with distance
      ``1 - NCC`` cut at ``1 - threshold``. Unlike connected components (single
      linkage), two groups merge only when their members are similar *on
      average*, so one spurious link cannot chain distinct scans into one large
      false group.

On the 624-scan BUSI copy this project was developed on, the best-match NCC is
bimodal: unrelated scans score 0.2-0.58, re-saved or neighbouring frames
0.7-1.0, with almost nothing between 0.58 and 0.7, so the default threshold of
0.65 sits in the gap. Single, average and complete linkage give the same groups
there to within one scan, which is evidence that the groups are not chained.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.cluster import hierarchy
from scipy.spatial import distance

SIZE = 64
HIGHPASS_SIGMA = 3.0
SMOOTH_SIGMA = 0.7
MARGIN = 8
MAX_SHIFT = 5
DEFAULT_THRESHOLD = 0.65


def fingerprint(image: np.ndarray) -> np.ndarray:
    """High-pass fingerprint of one scan.

    Args:
        image: ``[H, W]`` uint8 scan of any size.

    Returns:
        ``[SIZE, SIZE]`` float32.
    """
    small = np.asarray(
        Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    high = small - ndimage.gaussian_filter(small, HIGHPASS_SIGMA)
    # A light blur suppresses pixel-level resampling noise that differs between
    # two resizes of the same scan.
    return ndimage.gaussian_filter(high, SMOOTH_SIGMA).astype(np.float32)


def _normalise(windows: np.ndarray) -> np.ndarray:
    flat = windows.reshape(windows.shape[0], -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    # A flat (blank) window has no pattern to match: it gets zero similarity.
    return np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 1e-6)


def similarity_matrix(fingerprints: np.ndarray) -> np.ndarray:
    """Best-over-shifts NCC between every pair of fingerprints.

    Args:
        fingerprints: ``[N, SIZE, SIZE]`` from :func:`fingerprint`.

    Returns:
        ``[N, N]`` float32, symmetric, in [-1, 1], with 1 on the diagonal.
    """
    f = np.asarray(fingerprints, np.float32)
    n = f.shape[0]
    lo, hi = MARGIN, SIZE - MARGIN
    centre = _normalise(f[:, lo:hi, lo:hi])
    best = np.full((n, n), -1.0, np.float32)
    for dy in range(-MAX_SHIFT, MAX_SHIFT + 1):
        for dx in range(-MAX_SHIFT, MAX_SHIFT + 1):
            shifted = _normalise(f[:, lo + dy : hi + dy, lo + dx : hi + dx])
            np.maximum(best, centre @ shifted.T, out=best)
    best = np.maximum(best, best.T)
    np.fill_diagonal(best, 1.0)
    return best


def group_ids(similarity: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Clusters scans into near-duplicate groups by average linkage.

    Args:
        similarity: ``[N, N]`` from :func:`similarity_matrix`.
        threshold: minimum average NCC between two groups for them to merge.

    Returns:
        ``[N]`` int64 group ids, numbered 0, 1, ... in order of each group's first
        member, so the numbering only depends on the input order.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"dedup threshold must lie in (0, 1], got {threshold}")
    n = similarity.shape[0]
    if n == 0:
        return np.zeros((0,), np.int64)
    if n == 1:
        return np.zeros((1,), np.int64)
    d = 1.0 - np.clip(similarity.astype(np.float64), -1.0, 1.0)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    z = hierarchy.linkage(distance.squareform(d, checks=False), method="average")
    raw = hierarchy.fcluster(z, t=1.0 - threshold, criterion="distance")
    remap: dict[int, int] = {}
    return np.array([remap.setdefault(c, len(remap)) for c in raw], np.int64)


def find_groups(images: Sequence[np.ndarray], threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Near-duplicate group id of every scan (see the module docstring).

    Args:
        images: ``N`` scans, each ``[H, W]`` uint8, any sizes.
        threshold: NCC threshold.

    Returns:
        ``[N]`` int64 group ids.
    """
    if len(images) == 0:
        return np.zeros((0,), np.int64)
    fps = np.stack([fingerprint(im) for im in images])
    return group_ids(similarity_matrix(fps), threshold)
