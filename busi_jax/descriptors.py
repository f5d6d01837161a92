"""BI-RADS ultrasound lexicon descriptors measured from a scan and a lesion mask.

:func:`describe` turns a scan and a (ground-truth or predicted) lesion mask into
the mass descriptors of the BI-RADS ultrasound lexicon, each as numbers and as
a category with exactly the vocabulary of :mod:`busi_jax.synthetic`'s truth:

* size: area and longest diameter (max Feret), in px and, given the pixel
  spacing, in mm^2 / mm;
* shape ('oval' | 'round' | 'irregular'): residual of the mask body
  (spicules removed) against its moment-matched ellipse and its aspect ratio;
  solidity and convexity are reported too;
* orientation ('parallel' | 'not_parallel'): width over height of the mask's
  second moments (BI-RADS: parallel = long axis along the skin);
* margin ('circumscribed' | 'not_circumscribed') and its detail ('angular' |
  'microlobulated' | 'spiculated'): spikes left over by a morphological
  opening, the straight share of the contour, and the fine-scale energy of
  the radial profile (plus turning concentration, for classifiers);
* echo pattern ('hypoechoic' | 'isoechoic' | 'hyperechoic'), relative to the
  subcutaneous fat as BI-RADS prescribes, plus internal heterogeneity (texture
  coarser than speckle; None, "not assessable", for a lesion that is mostly
  at the display's black level or too thin to show texture);
* posterior features ('enhancement' | 'shadowing' | 'none'): the tissue below
  the lesion against the tissue beside it at the same depth.

Every decision threshold lives in :data:`THRESHOLDS` with the reason for its
value; they were calibrated on synthetic scans of seed 1 (heterogeneity on
seeds 1, 3 and 4) and are checked on held-out seeds (``tests/test_descriptors.py``;
``python -m busi_jax.descriptor_study --phantom_seeds=2,5,6,7``).

Coordinates: images are ``[H, W]`` with row 0 at the skin (top). A pixel
spacing may be anisotropic -- e.g. a scan resized to 128x128 for the model --
and is then given as ``(row_mm, col_mm)``; all shape measures are taken in
physical proportions, so a resized scan gives the same shape and orientation
as the original.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage import measure

DESCRIPTOR_FIELDS = (
    "shape",
    "orientation",
    "margin",
    "margin_detail",
    "echo_pattern",
    "heterogeneous",
    "posterior",
)

# Numeric features in the fixed order of feature_vector().
FEATURE_NAMES = (
    "area_px",
    "diameter_px",
    "area_mm2",
    "diameter_mm",
    "num_components",
    "aspect_ratio",
    "ellipse_residual",
    "solidity",
    "convexity",
    "width_height_ratio",
    "axis_angle_deg",
    "spike_count",
    "spike_area_fraction",
    "straight_fraction",
    "turning_concentration",
    "fine_energy",
    "lesion_level",
    "fat_level",
    "ring_level",
    "echo_contrast",
    "ring_contrast",
    "heterogeneity",
    "posterior_contrast",
)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every decision threshold of :func:`describe`, in one place.

    Intensities are on the 8-bit grey scale (0-255); on the synthetic scans one
    grey level is about 0.18 dB (40-50 dB dynamic range over 255 levels).
    Lengths relative to the lesion use ``r_eq``, the radius of the disk with the
    lesion's area.
    """

    # --- shape ---------------------------------------------------------------
    # 1 - IoU of the lesion body (spicules removed) with its moment-matched
    # ellipse. On the calibration phantoms, oval and round masses without
    # angular margins stay <= 0.05 (original and 128 px) and irregular ones
    # are >= 0.08.
    irregular_residual: float = 0.062
    # Same for angular margins. A polygon of 6-9 vertices jittered by -15/+25 %
    # already deviates 0.05-0.16 from its ellipse, as much as a lumpy outline
    # does, so the two overlap: this cut maximised agreement (~0.69) on 160
    # extra angular phantoms of the calibration seed. Shape errors are almost
    # all angular masses.
    irregular_residual_angular: float = 0.10
    # Aspect ratio (major/minor axis of the body) below which a regular mass is
    # 'round': round phantoms are drawn with axes within 10 % (measured <= 1.16
    # in 95 %), oval ones with ratio >= 1.35 (measured >= 1.32).
    round_max_aspect: float = 1.22

    # --- orientation -----------------------------------------------------------
    # Width / height of the body's second moments in physical units: a mass
    # wider than tall is parallel to the skin. 1.0 is the definition itself.
    parallel_min_ratio: float = 1.0

    # --- margin ----------------------------------------------------------------
    # Opening radius that separates the body from spicules, in r_eq: spicule
    # roots are at most ~0.25 r_eq wide, lobules and corners are broader.
    opening_radius: float = 0.15
    # A protrusion counts as a spike when it reaches this far (in r_eq) beyond
    # the opened body: corners and lobules reach < 0.15, spicules > 0.27.
    spike_min_depth: float = 0.2
    # Spikes needed for 'spiculated': one long protrusion may be a lobe of an
    # irregular outline; spiculated phantoms show >= 3, all others 0.
    spiculated_min_spikes: int = 2
    # Share of the body's outline that is straight (curvature * r_eq < 0.25)
    # above which the margin is 'angular': polygons measure >= 0.27 at full
    # resolution (>= 0.2 in 95 % at 128 px); ellipses, lumps and lobules < 0.22.
    angular_min_straight: float = 0.22
    # Energy of the whitened radial profile above harmonic 12 (relative to the
    # mean radius) above which the margin is 'microlobulated': lobules give
    # 0.009-0.023, large smooth outlines < 0.005 ...
    microlobulated_min_fine: float = 0.006
    # ... but the pixel staircase of a small mask adds about this much divided
    # by its equivalent radius in pixels (0.005 at r_eq = 12 px, 128 px scans).
    # Both fitted together with the angular cut on the calibration seed.
    fine_pixel_noise: float = 0.06

    # --- echo pattern ------------------------------------------------------------
    # Lesion minus fat level, grey levels, after the depth correction below.
    # Isoechoic phantoms are within +-1.5 dB of fat and hypoechoic ones 3-12 dB
    # below; measured, isoechoic ones read -12 +- 9 (5th percentile about -28)
    # and hypoechoic ones <= -26 in 95 %. Agreement on the calibration seed
    # is flat from -28 to -22; -25 is the middle.
    hypoechoic_max_contrast: float = -25.0
    # Hyperechoic phantoms are at glandular level, >= 13 dB (~70 levels) above
    # fat, and measure >= +40; isoechoic ones <= +8.
    hyperechoic_min_contrast: float = 25.0
    # Residual depth attenuation, grey levels per image height, added back to
    # the lesion for its depth below the fat: the TGC undoes only ~80-90 % of
    # the depth loss. Least-squares slope of the isoechoic error vs depth.
    depth_attenuation: float = 38.0
    # Lesion minus ring level plus this gives a fat-referenced contrast when no
    # fat layer is found: the ring is usually gland, ~13 dB (70 levels) above fat.
    ring_to_fat: float = 70.0
    # Internal texture coarser than speckle: the standard deviation (grey
    # levels) of the lesion's texture that is still correlated at a lag past the
    # speckle grain (see _heterogeneity). Calibration phantoms (seeds 1, 3, 4;
    # original size and 128 px): homogeneous lesions measure 3.9-4.5 (median;
    # 95th percentile 8.4-8.7), heterogeneous ones 15-16 (5th percentile
    # 8.2-9.0); agreement is flat from 8.5 to 9.0.
    heterogeneous_min_texture: float = 8.8
    # The lag, as a share of the image height (at least 2 px): speckle grains
    # are a fixed size in the field of view, 1-3 px at the phantoms' 200-340 px.
    # Calibrated against lags tied to the lesion's size, which did worse.
    texture_lag: float = 0.025
    # A lesion whose core is mostly at the display's black level (grey <=
    # black_level) shows no texture at all: heterogeneity is 'not assessable'
    # (None), not a guess; the phantoms' truth says the same of a lesion whose
    # speckle-free interior is mostly below the display floor
    # (synthetic._texture_visible). That is 5.4% of BUSI's lesions
    # (ground-truth masks) but about a fifth of the phantoms'.
    black_level: int = 2
    texture_max_black: float = 0.5

    # --- posterior features --------------------------------------------------------
    # Grey-level change of the tissue below the lesion relative to the tissue
    # beside it at the same depth (~5.7 levels per dB). Phantoms without a
    # posterior feature measure -9..+11 (5th-95th percentile), enhancement
    # (4-9 dB) >= +10 and shadowing (8-18 dB, partly lost to black clipping)
    # <= -24. Agreement is flat for 8..11 and -25..-11 respectively.
    enhancement_min_contrast: float = 10.0
    shadowing_max_contrast: float = -16.0
    # Rows of tissue needed below the lesion for a posterior call, as a share
    # of the image height (and at least 3 rows).
    posterior_min_depth: float = 0.03

    # --- robustness ----------------------------------------------------------------
    # Below this many pixels (r_eq < 3.6 px) the outline is all pixel staircase:
    # margin and irregularity are not judged (and 'notes' says so).
    min_reliable_pixels: int = 40


THRESHOLDS = Thresholds()


# --------------------------------------------------------------------------
# Public API


def describe(
    image: np.ndarray,
    mask: np.ndarray,
    pixel_spacing_mm: float | Sequence[float] | None = None,
    *,
    thresholds: Thresholds = THRESHOLDS,
) -> dict[str, Any]:
    """Measures the BI-RADS mass descriptors of the lesion in ``mask``.

    Args:
        image: ``[H, W]`` scan, uint8 or float in [0, 1] (``[H, W, 1]`` is
            accepted too; floats above 1 are taken as 8-bit grey levels).
            Row 0 is the skin side.
        mask: ``[H, W]`` bool lesion mask (ground truth or predicted). With
            several connected components the largest is described and the
            count reported.
        pixel_spacing_mm: isotropic pixel size in mm, or ``(row_mm, col_mm)``
            for a resized scan; None when unknown (sizes then only in px, and
            pixels are taken as square).
        thresholds: decision thresholds; defaults to :data:`THRESHOLDS`.

    Returns:
        A JSON-serialisable flat dict: ``has_lesion``; the numeric features of
        :data:`FEATURE_NAMES` (floats, None when not measurable); the
        categorical fields of :data:`DESCRIPTOR_FIELDS` with the vocabulary of
        :mod:`busi_jax.synthetic` (None without a lesion; ``echo_pattern`` is
        also None when the mask leaves no tissue to compare with); ``bbox``
        ``[x0, y0, x1, y1]``, ``centroid`` ``[x, y]`` (px) and ``notes``, a list
        of strings saying which measurements were unreliable or impossible.
        ``diameter_px`` is measured on the pixel grid; with an anisotropic
        spacing only ``diameter_mm`` is a physical length.

    Raises:
        ValueError: image and mask sizes differ, an array is not 2-D, or the
            spacing is not positive.
    """
    img = _as_gray(image)
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    m = m.astype(bool)
    if m.shape != img.shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {img.shape}")
    spacing, sy, sx = _spacing(pixel_spacing_mm)
    t = thresholds
    out: dict[str, Any] = {name: None for name in FEATURE_NAMES}
    out.update({name: None for name in DESCRIPTOR_FIELDS})
    out.update(has_lesion=False, num_components=0, bbox=None, centroid=None, notes=[])
    notes: list[str] = out["notes"]
    if not m.any():
        notes.append("empty mask: no lesion")
        return out

    comp, n = _largest_component(m)
    out["has_lesion"] = True
    out["num_components"] = int(n)
    if n > 1:
        notes.append(f"{n} mask components: the largest is described")
    ys, xs = np.nonzero(comp)
    h, w = comp.shape
    out["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    out["centroid"] = [float(xs.mean()), float(ys.mean())]
    if xs.min() == 0 or ys.min() == 0 or xs.max() == w - 1 or ys.max() == h - 1:
        notes.append("lesion touches the image border: it may be cut off")
    if comp.sum() < t.min_reliable_pixels:
        notes.append(
            f"only {int(comp.sum())} px: margin reported as circumscribed and shape from the"
            " aspect ratio alone; both are unreliable"
        )

    # --- size -------------------------------------------------------------------
    contour = _pixel_contour(comp)
    out["area_px"] = float(comp.sum())
    out["diameter_px"] = _feret(contour)
    if spacing is not None:
        out["area_mm2"] = float(comp.sum() * sy * sx)
        out["diameter_mm"] = _feret(contour * np.array([sx, sy]))

    # --- shape, orientation, margin -----------------------------------------------
    geo = _geometry(comp, sy / sx, t)
    r_eq_px = math.sqrt(comp.sum() / math.pi)
    out.update({k: geo[k] for k in geo if k in FEATURE_NAMES})
    small = comp.sum() < t.min_reliable_pixels
    if small:
        # A few pixels cannot show corners, lobules or spicules; claiming them
        # from pixelisation would be noise. Keep the default calls.
        detail = "circumscribed"
    elif geo["spike_count"] >= t.spiculated_min_spikes:
        detail = "spiculated"
    elif geo["straight_fraction"] >= t.angular_min_straight:
        detail = "angular"
    elif geo["fine_energy"] >= t.microlobulated_min_fine + t.fine_pixel_noise / r_eq_px:
        detail = "microlobulated"
    else:
        detail = "circumscribed"
    out["margin_detail"] = detail
    out["margin"] = "circumscribed" if detail == "circumscribed" else "not_circumscribed"
    cut = t.irregular_residual_angular if detail == "angular" else t.irregular_residual
    if geo["ellipse_residual"] > cut and not small:
        out["shape"] = "irregular"
    elif geo["aspect_ratio"] < t.round_max_aspect:
        out["shape"] = "round"
    else:
        out["shape"] = "oval"
    out["orientation"] = (
        "parallel" if geo["width_height_ratio"] > t.parallel_min_ratio else "not_parallel"
    )

    # --- posterior, echo ---------------------------------------------------------
    smooth = ndimage.gaussian_filter(img, (max(0.5, 0.005 * h), max(0.5, 0.008 * w)))
    other = ndimage.distance_transform_edt(~m) <= max(1, round(0.01 * h))
    post, why = _posterior_contrast(smooth, comp, other, t)
    out["posterior_contrast"] = post
    if post is None:
        out["posterior"] = "none"
        notes.append(f"posterior features not measurable ({why}): reported as 'none'")
    elif post >= t.enhancement_min_contrast:
        out["posterior"] = "enhancement"
    elif post <= t.shadowing_max_contrast:
        out["posterior"] = "shadowing"
    else:
        out["posterior"] = "none"

    echo = _echo(img, smooth, comp, other, post or 0.0, t)
    out.update(echo)
    contrast = echo["echo_contrast"]
    if echo["fat_level"] is None:
        notes.append("no subcutaneous fat layer found: echo pattern from the lesion's ring")
    if contrast is None:
        notes.append("no tissue to compare the lesion with: echo pattern unknown")
    elif contrast <= t.hypoechoic_max_contrast:
        out["echo_pattern"] = "hypoechoic"
    elif contrast >= t.hyperechoic_min_contrast:
        out["echo_pattern"] = "hyperechoic"
    else:
        out["echo_pattern"] = "isoechoic"
    black = echo.pop("black_fraction")
    if echo["heterogeneity"] is None:
        out["heterogeneous"] = None
        notes.append("lesion too thin to judge its texture: heterogeneity not assessable")
    elif black is not None and black >= t.texture_max_black:
        out["heterogeneous"] = None
        notes.append(
            f"{100 * black:.0f}% of the lesion is at the display's black level: "
            "heterogeneity not assessable"
        )
    else:
        out["heterogeneous"] = bool(echo["heterogeneity"] >= t.heterogeneous_min_texture)
    return _plain(out)


def feature_vector(desc: Mapping[str, Any]) -> np.ndarray:
    """The numeric features of a :func:`describe` result, in FEATURE_NAMES order.

    Args:
        desc: output of :func:`describe`.

    Returns:
        ``[len(FEATURE_NAMES)]`` float32; NaN where a feature was not measurable
        (no lesion, unknown spacing, no tissue below the lesion, ...).
    """
    vals = [desc.get(name) for name in FEATURE_NAMES]
    return np.array([np.nan if v is None else float(v) for v in vals], np.float32)


# --------------------------------------------------------------------------
# Helpers: input


def _as_gray(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"image must be [H, W], got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32)
    img = img.astype(np.float32)
    # Floats in [0, 1] are rescaled so thresholds stay in 8-bit grey levels.
    return img * 255.0 if float(np.nanmax(img, initial=0.0)) <= 1.0 else img


def _spacing(pixel_spacing_mm: Any) -> tuple[Any, float, float]:
    if pixel_spacing_mm is None:
        return None, 1.0, 1.0
    if np.ndim(pixel_spacing_mm) == 0:
        s = float(pixel_spacing_mm)
        sy = sx = s
    else:
        sy, sx = (float(v) for v in pixel_spacing_mm)
    if not (sy > 0 and sx > 0):
        raise ValueError(f"pixel_spacing_mm must be positive, got {pixel_spacing_mm}")
    return (sy, sx), sy, sx


def _plain(value: Any) -> Any:
    """Numpy scalars to Python ones, recursively, so json.dumps accepts the dict."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


# --------------------------------------------------------------------------
# Helpers: geometry


def _largest_component(m: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest connected part of a non-empty mask, holes filled; and the part count."""
    # 8-connectivity, so a spicule touching the body at a corner stays attached.
    lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
    sizes = ndimage.sum_labels(m, lab, np.arange(1, n + 1))
    return _fill_holes(lab == 1 + int(np.argmax(sizes))), int(n)


def _fill_holes(comp: np.ndarray) -> np.ndarray:
    """Fills holes of one component, working on its bounding box only."""
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    out = np.zeros_like(comp)
    out[y0:y1, x0:x1] = ndimage.binary_fill_holes(comp[y0:y1, x0:x1])
    return out


def _pixel_contour(comp: np.ndarray) -> np.ndarray:
    """Outline through the pixel-edge midpoints, ``[N, 2]`` (x, y) px."""
    padded = np.pad(comp, 1).astype(np.float32)
    pts = np.concatenate(measure.find_contours(padded, 0.5))
    return pts[:, ::-1] - 1.0


def _feret(points: np.ndarray) -> float:
    """Largest distance between two points of the set (max Feret diameter)."""
    if len(points) > 3:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # collinear points: all of them are on the hull
            pass
    d = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((d**2).sum(-1)).max())


def _work_mask(comp: np.ndarray, aspect: float) -> np.ndarray:
    """The component on a square-pixel grid with an equivalent radius of 40-100 px.

    Args:
        comp: ``[H, W]`` bool, one component.
        aspect: row pixel height over column pixel width.

    Returns:
        ``[h, w]`` bool, padded so that openings and contours never touch the
        border.
    """
    ys, xs = np.nonzero(comp)
    crop = comp[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    crop = np.pad(crop, 2)
    r_eq = math.sqrt(comp.sum() * aspect / math.pi)
    zoom = float(np.clip(r_eq, 40.0, 100.0) / r_eq)
    zy, zx = aspect * zoom, zoom
    shape = (max(1, round(crop.shape[0] * zy)), max(1, round(crop.shape[1] * zx)))
    big = ndimage.zoom(crop, (shape[0] / crop.shape[0], shape[1] / crop.shape[1]), order=1)
    # Blurring by ~0.6 input pixels before the threshold removes the staircase
    # of the pixel grid, which would otherwise read as corners and roughness.
    big = ndimage.gaussian_filter(big, (0.6 * zy, 0.6 * zx)) > 0.5
    if not big.any():  # a sliver thinner than the blur: keep it undilated
        big = ndimage.zoom(crop, (shape[0] / crop.shape[0], shape[1] / crop.shape[1]), order=0)
        big = big > 0.5
    pad = int(0.2 * np.clip(r_eq, 40.0, 100.0)) + 4
    return np.pad(big, pad)


def _moments(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid ``[x, y]`` and 2x2 covariance of a mask's pixel coordinates."""
    ys, xs = np.nonzero(m)
    c = np.array([xs.mean(), ys.mean()])
    d = np.stack([xs - c[0], ys - c[1]])
    # + 1/12: the variance of a uniform pixel, so a single pixel is not singular.
    return c, d @ d.T / len(xs) + np.eye(2) / 12.0


def _ellipse_residual(m: np.ndarray, c: np.ndarray, cov: np.ndarray) -> float:
    """1 - IoU of the mask with the uniform ellipse of the same moments."""
    yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
    p = np.stack([xx - c[0], yy - c[1]], -1)
    q = np.einsum("...i,ij,...j->...", p, np.linalg.inv(cov), p)
    ell = q <= 4.0  # a uniform ellipse of semi-axis a has variance a^2 / 4
    return 1.0 - float((ell & m).sum()) / float((ell | m).sum())


def _resampled_contour(m: np.ndarray, n: int = 512) -> tuple[np.ndarray, float]:
    """The longest outline of ``m``, resampled to ``n`` points evenly in arclength."""
    c = max(measure.find_contours(m.astype(np.float32), 0.5), key=len)[:, ::-1]
    if len(c) > 1 and np.allclose(c[0], c[-1]):
        c = c[:-1]
    closed = np.vstack([c, c[:1]])
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    perimeter = float(s[-1])
    u = np.linspace(0.0, perimeter, n, endpoint=False)
    pts = np.stack([np.interp(u, s, closed[:, 0]), np.interp(u, s, closed[:, 1])], 1)
    return pts, perimeter


def _geometry(comp: np.ndarray, aspect: float, t: Thresholds) -> dict[str, float]:
    """Shape, orientation and margin measures on a square-pixel work grid.

    Args:
        comp: ``[H, W]`` bool, one filled component.
        aspect: row pixel height over column pixel width.
        t: thresholds (the opening radius and spike depth).

    Returns:
        The numeric shape, orientation and margin features of FEATURE_NAMES,
        lengths in units of the lesion (scale-free).
    """
    m = _work_mask(comp, aspect)
    area = float(m.sum())
    r_eq = math.sqrt(area / math.pi)
    g: dict[str, float] = {}

    # Body: the opening removes spicules, whose roots are thinner than the disk;
    # shape and orientation are judged on the body so spicules do not skew them.
    # An opening by a disk, through distance transforms (exact and much faster
    # than a large structuring element).
    r_open = t.opening_radius * r_eq
    eroded = ndimage.distance_transform_edt(m) > r_open
    body = ndimage.distance_transform_edt(~eroded) <= r_open if eroded.any() else eroded
    lab, n = ndimage.label(body)
    if n > 1:
        body = lab == 1 + int(np.argmax(ndimage.sum_labels(body, lab, np.arange(1, n + 1))))
    if body.sum() < 0.3 * area:  # too thin to open (a sliver): use it whole
        body = m
    # Spikes: parts cut off by the opening that reach far beyond the body.
    resid = m & ~body
    lab, n = ndimage.label(resid, structure=np.ones((3, 3), bool))
    if n:
        reach = ndimage.distance_transform_edt(~body)
        depth = np.asarray(ndimage.maximum(reach, lab, np.arange(1, n + 1))) / r_eq
        spikes = depth >= t.spike_min_depth
        spike_area = float(ndimage.sum_labels(resid, lab, np.arange(1, n + 1))[spikes].sum())
    else:
        spikes, spike_area = np.zeros(0, bool), 0.0
    g["spike_count"] = float(spikes.sum())
    g["spike_area_fraction"] = spike_area / area

    c, cov = _moments(body)
    ev, evec = np.linalg.eigh(cov)
    g["aspect_ratio"] = float(math.sqrt(ev[1] / ev[0]))
    g["width_height_ratio"] = float(math.sqrt(cov[0, 0] / cov[1, 1]))
    major = evec[:, 1]
    # Angle of the long axis from the skin line; positive turns x towards +y.
    ang = math.degrees(math.atan2(major[1], major[0]))
    g["axis_angle_deg"] = float((ang + 90.0) % 180.0 - 90.0)
    g["ellipse_residual"] = _ellipse_residual(body, c, cov)
    g["solidity"] = float(m.sum()) / max(float(_hull_area(m)), 1.0)

    pts, perimeter = _resampled_contour(m)
    g["convexity"] = min(1.0, _hull_perimeter(pts) / max(perimeter, 1e-9))

    # Whitened radial profile of the body: the moment ellipse maps to a circle,
    # so what is left are lumps (low harmonics) and lobules (high harmonics).
    bpts, bper = _resampled_contour(body)
    w_mat = evec @ np.diag(1.0 / np.sqrt(ev)) @ evec.T
    q = (bpts - c) @ w_mat.T
    nb = 256
    bins = ((np.arctan2(q[:, 1], q[:, 0]) + np.pi) / (2 * np.pi) * nb).astype(int) % nb
    rho = np.zeros(nb)
    np.maximum.at(rho, bins, np.hypot(q[:, 0], q[:, 1]))
    have = np.nonzero(rho > 0)[0]
    rho = np.interp(np.arange(nb), have, rho[have], period=nb)
    spec = np.abs(np.fft.rfft(rho)) / nb
    g["fine_energy"] = float(np.sqrt(2.0 * np.sum(spec[12:40] ** 2)) / spec[0])

    # Curvature of the body outline, lightly smoothed: polygons (angular
    # margins) are straight between a few sharp corners.
    sm = ndimage.gaussian_filter1d(bpts, sigma=0.02 * len(bpts), axis=0, mode="wrap")
    d1 = np.roll(sm, -1, axis=0) - np.roll(sm, 1, axis=0)
    heading = np.arctan2(d1[:, 1], d1[:, 0])
    turn = np.angle(np.exp(1j * (np.roll(heading, -1) - heading)))  # wrapped to (-pi, pi]
    ds = bper / len(bpts)
    kappa = turn / ds * math.sqrt(float(body.sum()) / math.pi)
    g["straight_fraction"] = float(np.mean(np.abs(kappa) < 0.25))
    at = np.sort(np.abs(turn))[::-1]
    g["turning_concentration"] = float(at[: len(at) // 10].sum() / max(float(at.sum()), 1e-9))
    return g


def _hull_area(m: np.ndarray) -> float:
    pts = _resampled_contour(m, 1024)[0]
    try:
        return float(ConvexHull(pts).volume)
    except QhullError:
        return float(m.sum())


def _hull_perimeter(pts: np.ndarray) -> float:
    try:
        v = pts[ConvexHull(pts).vertices]
    except QhullError:
        return 0.0
    return float(np.linalg.norm(v - np.roll(v, 1, axis=0), axis=1).sum())


# --------------------------------------------------------------------------
# Helpers: intensity


def _posterior_contrast(
    smooth: np.ndarray, comp: np.ndarray, other: np.ndarray, t: Thresholds
) -> tuple[float | None, str]:
    """Grey-level change of the tissue below the lesion against tissue beside it.

    Depth profiles below the thickest part of the lesion are compared with
    profiles of columns beside it. Tissue layers undulate, so each side profile
    is first shifted in depth (up to 8 % of the image height) to line its layers
    up with the central one, by maximum correlation -- which ignores a constant
    offset, i.e. the very enhancement or shadowing being measured. The
    contrast is the median difference over rows and column pairs.

    Args:
        smooth: ``[H, W]`` smoothed scan, grey levels.
        comp: ``[H, W]`` bool, the lesion.
        other: ``[H, W]`` bool, lesion pixels (all components) with a margin,
            excluded from the reference columns.
        t: thresholds.

    Returns:
        ``(contrast, why)``: the contrast in grey levels (positive: brighter
        below), or None with the reason it cannot be measured.
    """
    h, w = smooth.shape
    ys, xs = np.nonzero(comp)
    x0, x1 = int(xs.min()), int(xs.max())
    thick = comp.sum(axis=0)
    # The synthetic (and physical) effect scales with the path length through
    # the lesion: look below its thickest columns.
    central = np.nonzero(thick >= 0.7 * thick.max())[0]
    bottom = max(int(np.nonzero(comp[:, x])[0].max()) for x in central)
    gap_y = max(1, round(0.01 * h))
    y0 = bottom + 1 + gap_y
    n = min(h - y0, round(max(ys.max() - ys.min() + 1, 0.2 * h)))
    if n < max(3, t.posterior_min_depth * h):
        return None, "no tissue below the lesion"
    gw = max(1, round(0.04 * w))
    gap_x = max(1, round(0.01 * w))
    sides = []
    for k in range(2):
        a = x0 - gap_x - (k + 1) * gw
        if a >= 0:
            sides.append(np.arange(a, a + gw))
        a = x1 + 1 + gap_x + k * gw
        if a + gw <= w:
            sides.append(np.arange(a, a + gw))
    if not sides:
        return None, "no tissue beside the lesion"
    ms = round(0.08 * h)
    ya, yb = max(0, y0 - ms), min(h, y0 + n + ms)
    masked = np.where(other[ya:yb], np.nan, smooth[ya:yb])

    def profile(cols: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # all-NaN rows (other lesions) stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            p = np.nanmedian(masked[:, cols], axis=1)
        # Rows [ya, yb) padded to [y0 - ms, y0 + n + ms) with NaN.
        full = np.full(n + 2 * ms, np.nan)
        full[ya - (y0 - ms) : ya - (y0 - ms) + len(p)] = p
        return full

    centre_groups = [central[i : i + gw] for i in range(0, len(central), gw)]
    side_windows = [
        np.lib.stride_tricks.sliding_window_view(profile(s), n) for s in sides
    ]  # [2 ms + 1, n] each: row d is the side profile shifted by d - ms
    ests = []
    for cg in centre_groups:
        a = profile(cg)[ms : ms + n]
        for win in side_windows:
            ok = np.isfinite(win) & np.isfinite(a)[None, :]
            cnt = ok.sum(1)
            av = np.where(ok, a[None, :], 0.0)
            bv = np.where(ok, win, 0.0)
            am = av.sum(1) / np.maximum(cnt, 1)
            bm = bv.sum(1) / np.maximum(cnt, 1)
            a0 = np.where(ok, av - am[:, None], 0.0)
            b0 = np.where(ok, bv - bm[:, None], 0.0)
            corr = (a0 * b0).sum(1) / np.sqrt((a0**2).sum(1) * (b0**2).sum(1) + 1e-9)
            corr[cnt < 0.7 * n] = -np.inf
            d = int(np.argmax(corr))
            if not np.isfinite(corr[d]):
                continue
            # Clipped pixels (black shadows, saturated highlights) carry no
            # information about the change.
            valid = ok[d] & (a > 10) & (a < 245) & (win[d] > 10) & (win[d] < 245)
            if valid.sum() >= 3:
                ests.append(float(np.median(a[valid] - win[d][valid])))
    if not ests:
        return None, "no comparable tissue beside the lesion"
    return float(np.median(ests)), ""


def _echo(
    img: np.ndarray,
    smooth: np.ndarray,
    comp: np.ndarray,
    other: np.ndarray,
    posterior: float,
    t: Thresholds,
) -> dict[str, float | None]:
    """Lesion, fat and ring grey levels, echo contrast and heterogeneity.

    Args:
        img: ``[H, W]`` scan, grey levels.
        smooth: ``[H, W]`` the scan lightly smoothed (speckle grain scale).
        comp: ``[H, W]`` bool, the lesion.
        other: ``[H, W]`` bool, all lesion pixels with a margin.
        posterior: posterior contrast (grey levels, 0 when unknown).
        t: thresholds.

    Returns:
        ``lesion_level``, ``fat_level``, ``ring_level``, ``echo_contrast``,
        ``ring_contrast`` and ``heterogeneity`` (None where not measurable).
    """
    h, w = img.shape
    r_eq = math.sqrt(comp.sum() / math.pi)
    ys, xs = np.nonzero(comp)
    out: dict[str, float | None] = {}
    fat = _fat_level(smooth, other)

    # Everything else happens near the lesion: work on a crop.
    pad = math.ceil(0.5 * r_eq) + 8
    y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)
    x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
    img, smooth = img[y0:y1, x0:x1], smooth[y0:y1, x0:x1]
    comp, other = comp[y0:y1, x0:x1], other[y0:y1, x0:x1]
    inside = ndimage.distance_transform_edt(comp)
    outside = ndimage.distance_transform_edt(~comp)

    # Attenuation inside the lesion darkens (or brightens) its own deeper part
    # by the posterior contrast times the share of the lesion's thickness
    # crossed so far: undo it before reading the lesion's level.
    crossed = (np.cumsum(comp, axis=0) - comp) / max(int(comp.sum(axis=0).max()), 1)
    # The smoothed scan, as for the fat level: a median of raw speckle and one
    # of smoothed speckle differ by an amount that depends on the grain size.
    corrected = smooth - posterior * crossed * comp
    inner = inside > 0.15 * r_eq  # clear of the blurred boundary
    if inner.sum() < max(4, 0.2 * comp.sum()):
        inner = comp
    out["lesion_level"] = float(np.median(corrected[inner]))

    # Ring of tissue around the lesion (other lesions excluded).
    ring = (outside > max(1.0, 0.05 * r_eq)) & (outside <= max(2.0, 0.35 * r_eq)) & ~other
    out["ring_level"] = float(np.median(smooth[ring])) if ring.sum() >= 4 else None
    out["ring_contrast"] = (
        out["lesion_level"] - out["ring_level"] if out["ring_level"] is not None else None
    )

    out["fat_level"] = fat[0] if fat else None
    if fat is not None:
        # The TGC leaves part of the depth loss: the lesion, deeper than the
        # fat, reads darker by about depth_attenuation per image height.
        depth = (float(ys.mean()) - fat[1]) / h
        out["echo_contrast"] = out["lesion_level"] - fat[0] + t.depth_attenuation * depth
    elif out["ring_level"] is not None:
        out["echo_contrast"] = out["ring_contrast"] + t.ring_to_fat
    else:
        out["echo_contrast"] = None

    lag = max(2, round(t.texture_lag * h))
    out["heterogeneity"], out["black_fraction"] = _heterogeneity(
        img, comp, inside, crossed, posterior, lag, t
    )
    return out


def _heterogeneity(
    img: np.ndarray,
    comp: np.ndarray,
    inside: np.ndarray,
    crossed: np.ndarray,
    posterior: float,
    lag: int,
    t: Thresholds,
) -> tuple[float | None, float | None]:
    """Grey-level spread of the lesion's internal texture coarser than speckle.

    Speckle decorrelates within its grain (1-3 px); internal texture
    (blotches, necrotic or cystic pools) stays correlated over about a tenth
    of the lesion. The autocovariance of the lesion's grey levels at a lag
    past the grain therefore measures the texture's variance without the
    speckle's, whatever the lesion's size or the smoothing would leave of the
    speckle. Before it, the attenuation ramp inside the lesion is undone and a
    plane is removed, so that depth gradients do not read as texture.

    Args:
        img: ``[h, w]`` scan crop, grey levels.
        comp: ``[h, w]`` bool, the lesion.
        inside: ``[h, w]`` distance to the lesion's outside, px.
        crossed: ``[h, w]`` share of the lesion's thickness above each pixel.
        posterior: posterior contrast, grey levels.
        lag: px, past the speckle grain.
        t: thresholds.

    Returns:
        ``(texture, black)``: the texture's standard deviation in grey levels
        (None for a lesion too thin to measure) and the share of the lesion's
        core at the display's black level (None likewise).
    """
    core = _texture_core(comp, inside)
    pairs = (core[:, :-lag] & core[:, lag:]).sum() + (core[:-lag] & core[lag:]).sum()
    if core.sum() < 10 or pairs < 20:
        return None, None
    black = float(np.mean(img[core] <= t.black_level))
    cy, cx = np.nonzero(core)
    vals = img[core] - posterior * crossed[core]
    design = np.stack([np.ones_like(cy), cy, cx], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, vals, rcond=None)
    res = np.zeros(img.shape, np.float64)
    res[core] = vals - design @ coef
    prods = []
    for a, b, ok in (
        (res[:, :-lag], res[:, lag:], core[:, :-lag] & core[:, lag:]),
        (res[:-lag], res[lag:], core[:-lag] & core[lag:]),
    ):
        prods.append((a * b)[ok])
    cov = float(np.mean(np.concatenate(prods)))
    return math.sqrt(max(cov, 0.0)), black


def _texture_core(comp: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``[h, w]`` bool: the lesion clear of its blurred boundary."""
    ys, xs = np.nonzero(comp)
    ext = min(np.ptp(ys), np.ptp(xs)) + 1
    return inside > max(1.0, 0.05 * ext)


def floor_fraction(
    image: np.ndarray, mask: np.ndarray, thresholds: Thresholds = THRESHOLDS
) -> float | None:
    """Share of the largest lesion's core at the display's black level.

    The quantity behind heterogeneity's 'not assessable' (``>=
    texture_max_black``), for comparing how dark lesions are rendered across
    data sets (BUSI against the phantoms).

    Args:
        image: ``[H, W]`` grey scan (or ``[H, W, 1]``).
        mask: ``[H, W]`` lesion mask, the scan's size.

    Returns:
        The share in [0, 1], or None when the lesion is too thin to have a core.
    """
    img = _as_gray(np.asarray(image))
    m = np.asarray(mask) > 0
    if m.shape != img.shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {img.shape}")
    if not m.any():
        return None
    comp, _ = _largest_component(m)
    core = _texture_core(comp, ndimage.distance_transform_edt(comp))
    if core.sum() < 10:
        return None
    return float(np.mean(img[core] <= thresholds.black_level))


def _fat_level(smooth: np.ndarray, other: np.ndarray) -> tuple[float, float] | None:
    """Grey level and depth (row) of the subcutaneous fat below the skin line.

    The median of each row (lesions excluded) gives a depth profile: the skin
    is its maximum near the top, the fat the lowest valley below the skin in
    the upper half of the image.

    Returns:
        ``(level, row)``, or None when no row has enough tissue.
    """
    h, w = smooth.shape
    valid = ~other
    ok = valid.sum(1) >= 0.2 * w
    if ok.sum() < 5:
        return None
    rows = np.nonzero(ok)[0]
    prof = np.nanmedian(np.where(valid[rows], smooth[rows], np.nan), axis=1)
    prof = np.interp(np.arange(h), rows, prof)
    prof = ndimage.gaussian_filter1d(prof, max(1.0, 0.01 * h))
    skin = int(np.argmax(prof[: max(2, int(0.15 * h))]))
    lo, hi = skin + 1, max(skin + 3, int(0.55 * h))
    seg = prof[lo:hi]
    if seg.size < 2:
        return None
    v = lo + int(np.argmin(seg))
    # The valley: contiguous rows within a quarter of the way up to the
    # bright tissue around it.
    tol = 0.25 * (np.percentile(seg, 90) - prof[v])
    a = v
    while a > lo and prof[a - 1] <= prof[v] + tol:
        a -= 1
    b = v
    while b < hi - 1 and prof[b + 1] <= prof[v] + tol:
        b += 1
    band = smooth[a : b + 1][valid[a : b + 1]]
    level = float(np.median(band)) if band.size else float(prof[v])
    return level, 0.5 * (a + b)
