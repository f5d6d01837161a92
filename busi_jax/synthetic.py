"""Seeded breast-ultrasound phantoms written in the BUSI release's layout.

This is the project's built-in data: the demo trains on it and most tests use
it, and it goes through the same dataset builder as the real BUSI release. The
scans are physics-inspired rather than physically simulated -- everything is
cheap numpy/scipy, about 30-60 ms per 400x500 scan on one core:

* Anatomy, as a map of backscatter power ("echogenicity"): coupling gel, a
  bright skin line over the dermis, subcutaneous fat (dark) with lobules and
  Cooper ligaments, fibroglandular tissue (bright, laterally streaky, with
  fat islands and ducts), retromammary fat, the pectoral muscle (striated,
  between two bright fasciae) and the dark chest wall.
* A lesion, painted into that map from its mask, so the mask is exact truth.
* Acquisition: scatterers are complex white noise scaled by the square root of
  the power map, blurred by a Gaussian point-spread function (wider laterally
  than axially, as in real probes). The envelope of that field is
  Rayleigh-distributed speckle whose grain follows the PSF. Round-trip
  attenuation accumulates down each column (tissue- and lesion-specific),
  time-gain compensation undoes most of the *average* loss, and the result is
  log-compressed into 8 bits. Posterior enhancement and shadowing therefore
  arise from the lesion attenuating less or more than tissue, not from
  painting a column.

Lesion descriptors follow the BI-RADS ultrasound lexicon and depend on the
class only through probabilities (:data:`PRIORS`), so they carry signal
without making the task trivial.

Folder layout written by :func:`generate` (the class folders sit directly in
``out_dir``)::

  out_dir/benign/benign (12).png          8-bit grayscale ('L') scan
  out_dir/benign/benign (12)_mask.png     'L', values 0/255, same size
  out_dir/benign/benign (12)_mask_1.png   only for multi-mask scans: the mask
                                          split into 2-3 disjoint parts that
                                          OR back to the lesion mask
  out_dir/malignant/...
  out_dir/normal/normal (3).png, normal (3)_mask.png (all zero)
  out_dir/truth.json

``truth.json`` maps ``"<class>/<stem>.png"`` to a flat dict:

* ``label``: the class folder the file is in ('benign'|'malignant'|'normal').
* ``true_label``: the class of what was drawn. Equal to ``label`` except for
  cross-label duplicates (BUSI has a few scans filed under both classes).
* ``image``, ``masks``: paths relative to ``out_dir``; ``num_mask_files``.
* ``height``, ``width`` (px); ``pixel_spacing_mm`` (isotropic).
* ``frequency_mhz``, ``dynamic_range_db``, ``gain_db``, ``tgc_compensation``
  (fraction of the mean depth loss undone by TGC): acquisition settings.
* ``layers``: mean depth (px, row) of ``skin``, ``fat_bottom``,
  ``gland_bottom``, ``muscle_top`` and ``muscle_bottom`` (may exceed height).
* ``duplicate_of``: key of the scan this file re-saves, else null;
  ``duplicate_transform``: null or ``{"crop_tblr": [top, bottom, left,
  right] px removed before resizing, "scale": [sy, sx]}``.
* Lesion attributes, all null for normal scans:

  * ``shape``: 'oval'|'round'|'irregular'.
  * ``orientation``: 'parallel' (``axes[0] > axes[1]``: wider than tall,
    |angle| <= 15) or 'not_parallel' (taller than wide). Round masses get one
    too (their axes differ by up to 10 %).
  * ``margin``: 'circumscribed'|'not_circumscribed'; ``margin_detail``:
    'circumscribed'|'angular'|'microlobulated'|'spiculated'.
  * ``echo_pattern``: 'hypoechoic'|'isoechoic'|'hyperechoic', relative to
    subcutaneous fat as in BI-RADS; plus the boolean ``heterogeneous``
    (internal texture drawn). There is no separate 'complex' category.
  * ``texture_visible``: False when the lesion's interior lies, speckle
    aside, mostly below the display floor (grey 0): the image then shows no
    texture, whatever ``heterogeneous`` says.
  * ``echo_level_db``: nominal lesion power relative to fat, dB (before its
    internal texture).
  * ``posterior``: 'enhancement'|'shadowing'|'none'; ``posterior_db``: the
    nominal change of echo level just below the thickest part of the lesion
    (positive brighter, 0 for 'none'; shadows get a mean-1 lateral streak
    modulation on top).
  * ``edge_shadows`` (thin lateral refraction shadows), ``calcifications``
    (bright microcalcification dots inside the lesion): booleans.
  * ``centre``: ``[x, y]`` px (column, row) of the base ellipse;
    ``axes``: ``[a, b]`` its semi-axes px, ``a`` along the ellipse's x axis;
    ``angle``: degrees the ellipse is rotated, positive turning +x towards +y
    (clockwise on screen). Irregular outlines, lobules and spicules are
    perturbations of this ellipse.
  * ``bbox``: ``[x0, y0, x1, y1]`` of the mask, inclusive px;
    ``mask_area_px``: mask pixel count; ``area_fraction``: the drawn size as a
    fraction of the image area.

For a duplicate, geometry (centre, axes, bbox, area, layers, spacing) is mapped
through its crop and resize; the resize keeps the aspect ratio up to rounding,
so ``axes`` is exact to well under 1 %.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage, special

CLASSES = ("benign", "malignant", "normal")
LESION_CLASSES = ("benign", "malignant")
SHAPES = ("oval", "round", "irregular")
ORIENTATIONS = ("parallel", "not_parallel")
MARGINS = ("circumscribed", "not_circumscribed")
MARGIN_DETAILS = ("circumscribed", "angular", "microlobulated", "spiculated")
ECHO_PATTERNS = ("hypoechoic", "isoechoic", "hyperechoic")
POSTERIOR = ("enhancement", "shadowing", "none")

# Class-conditional priors. Loosely after the BI-RADS literature: benign masses
# are mostly oval, parallel, circumscribed and homogeneous with enhancement;
# malignant ones mostly irregular, often not parallel, with angular,
# microlobulated or spiculated margins, heterogeneous, with shadowing. Every
# descriptor still occurs in both classes, so no single one decides the label.
PRIORS: dict[str, dict[str, Any]] = {
    "benign": {
        "shape": {"oval": 0.70, "round": 0.15, "irregular": 0.15},
        "orientation": {"parallel": 0.85, "not_parallel": 0.15},
        "margin_detail": {
            "circumscribed": 0.75,
            "microlobulated": 0.12,
            "angular": 0.10,
            "spiculated": 0.03,
        },
        "echo_pattern": {"hypoechoic": 0.75, "isoechoic": 0.15, "hyperechoic": 0.10},
        "heterogeneous": 0.2,
        "posterior": {"enhancement": 0.60, "none": 0.33, "shadowing": 0.07},
        "calcifications": 0.05,
        # log-uniform range of the lesion's share of the image area
        "area_fraction": (0.02, 0.15),
    },
    "malignant": {
        "shape": {"irregular": 0.75, "oval": 0.15, "round": 0.10},
        "orientation": {"not_parallel": 0.55, "parallel": 0.45},
        "margin_detail": {
            "spiculated": 0.32,
            "angular": 0.30,
            "microlobulated": 0.30,
            "circumscribed": 0.08,
        },
        "echo_pattern": {"hypoechoic": 0.85, "isoechoic": 0.12, "hyperechoic": 0.03},
        "heterogeneous": 0.7,
        "posterior": {"shadowing": 0.80, "none": 0.12, "enhancement": 0.08},
        "calcifications": 0.35,
        "area_fraction": (0.03, 0.20),
    },
}

# Tissue backscatter power (linear, arbitrary units). The ~10 dB gap between
# fat and gland is what makes fat grey and gland bright on real scans.
_FAT_POWER = 0.035
_GLAND_POWER = 0.7
# One-way attenuation, dB/cm/MHz, typical soft-tissue literature values.
_ATTEN = {"gel": 0.0, "dermis": 1.0, "fat": 0.6, "gland": 0.9, "muscle": 1.1, "deep": 1.5}
# Top of the displayed range, dB re. unit power; tuned so that gland lands
# around grey 150 and hypoechoic lesions near 30, as on BUSI scans.
_DISPLAY_TOP_DB = 12.0

_LESION_KEYS = (
    "shape",
    "orientation",
    "margin",
    "margin_detail",
    "echo_pattern",
    "heterogeneous",
    "texture_visible",
    "echo_level_db",
    "posterior",
    "posterior_db",
    "edge_shadows",
    "calcifications",
    "centre",
    "axes",
    "angle",
    "bbox",
    "mask_area_px",
    "area_fraction",
)
_SCAN_KEYS = (
    "pixel_spacing_mm",
    "frequency_mhz",
    "dynamic_range_db",
    "gain_db",
    "tgc_compensation",
)
_OVERRIDABLE = frozenset(_SCAN_KEYS) | (
    frozenset(_LESION_KEYS) - {"bbox", "mask_area_px", "texture_visible"}
)


# --------------------------------------------------------------------------
# Small helpers


def _choice(rng: np.random.Generator, probs: Mapping[str, float]) -> str:
    names = list(probs)
    p = np.array([probs[n] for n in names], np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _child_rngs(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    # Each stage gets its own stream, so overriding one attribute (say the
    # posterior feature) leaves the anatomy and the speckle of the scan
    # unchanged: descriptor tests can compare otherwise identical scans.
    seeds = rng.integers(0, 2**63 - 1, size=n)
    return [np.random.default_rng(int(s)) for s in seeds]


def _noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma_y: float, sigma_x: float
) -> np.ndarray:
    """Unit-variance smooth Gaussian noise with the given correlation lengths.

    Large blurs are done at a reduced resolution and upsampled bilinearly, which
    looks the same for smooth fields and is an order of magnitude cheaper.
    """
    h, w = shape
    fy, fx = max(1, int(sigma_y / 1.5)), max(1, int(sigma_x / 1.5))
    hs, ws = -(-h // fy) + 2, -(-w // fx) + 2
    z = _white(rng, (hs, ws))
    z = ndimage.gaussian_filter(z, (max(sigma_y / fy, 0.5), max(sigma_x / fx, 0.5)), mode="wrap")
    if fy > 1 or fx > 1:
        z = np.asarray(Image.fromarray(z).resize((ws * fx, hs * fy), Image.Resampling.BILINEAR))
    z = z[:h, :w]
    z = z - z.mean()
    return (z / (z.std() + 1e-6)).astype(np.float32)


def _white(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance white noise (uniform, not Gaussian).

    Every use is blurred over many samples before it matters, which makes it
    Gaussian by the central limit theorem; uniform draws are ~5x cheaper.
    """
    z = rng.random(shape, dtype=np.float32)
    z -= 0.5
    z *= np.float32(math.sqrt(12.0))
    return z


def _curve(rng: np.random.Generator, n: int, amp: float, corr: float) -> np.ndarray:
    """Smooth random 1-D profile (layer interfaces), zero mean, std ``amp``."""
    z = rng.standard_normal(n + 1)
    z = ndimage.gaussian_filter1d(z, max(corr, 0.5), mode="reflect")
    z = z[:n] - z.mean()
    return (amp * z / (z.std() + 1e-9)).astype(np.float32)


def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(3.5 * sigma + 0.5))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


# --------------------------------------------------------------------------
# Attributes


def _sample_lesion_attributes(
    rng: np.random.Generator, label: str, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    pri = PRIORS[label]
    # Everything is always drawn, in a fixed order, and overrides replace draws
    # afterwards: the random stream never depends on what was overridden.
    a: dict[str, Any] = {
        "shape": _choice(rng, pri["shape"]),
        "orientation": _choice(rng, pri["orientation"]),
        "margin_detail": _choice(rng, pri["margin_detail"]),
        "echo_pattern": _choice(rng, pri["echo_pattern"]),
        "heterogeneous": bool(rng.random() < pri["heterogeneous"]),
        "posterior": _choice(rng, pri["posterior"]),
        "calcifications": bool(rng.random() < pri["calcifications"]),
    }
    lo, hi = pri["area_fraction"]
    a["area_fraction"] = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    fallback_detail = _choice(
        rng, {k: v for k, v in pri["margin_detail"].items() if k != "circumscribed"}
    )
    edge_draw = rng.random()
    u_echo, u_post, u_edge = rng.random(3)

    for k in ("shape", "orientation", "margin_detail", "echo_pattern", "posterior"):
        if k in overrides:
            a[k] = overrides[k]
    if "margin" in overrides:
        if overrides["margin"] not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got {overrides['margin']!r}")
        if "margin_detail" in overrides:
            if (overrides["margin"] == "circumscribed") != (
                overrides["margin_detail"] == "circumscribed"
            ):
                raise ValueError(
                    "margin and margin_detail disagree: "
                    f"{overrides['margin']!r} vs "
                    f"{overrides['margin_detail']!r}"
                )
        elif overrides["margin"] == "circumscribed":
            a["margin_detail"] = "circumscribed"
        elif a["margin_detail"] == "circumscribed":
            a["margin_detail"] = fallback_detail
    for k, allowed in (
        ("shape", SHAPES),
        ("orientation", ORIENTATIONS),
        ("margin_detail", MARGIN_DETAILS),
        ("echo_pattern", ECHO_PATTERNS),
        ("posterior", POSTERIOR),
    ):
        if a[k] not in allowed:
            raise ValueError(f"{k} must be one of {allowed}, got {a[k]!r}")
    a["margin"] = "circumscribed" if a["margin_detail"] == "circumscribed" else "not_circumscribed"
    for k in ("heterogeneous", "calcifications", "area_fraction"):
        if k in overrides:
            a[k] = overrides[k]

    # Echo level relative to fat (BI-RADS' reference tissue).
    if a["echo_pattern"] == "hypoechoic":
        level = -12.0 + 9.0 * u_echo
    elif a["echo_pattern"] == "isoechoic":
        level = -1.5 + 3.0 * u_echo
    else:  # hyperechoic: at or above glandular level
        level = 10.0 * np.log10(_GLAND_POWER / _FAT_POWER) + 4.0 * u_echo
    a["echo_level_db"] = round(float(overrides.get("echo_level_db", level)), 4)
    post_db = {"enhancement": 4.0 + 5.0 * u_post, "shadowing": -(8.0 + 10.0 * u_post), "none": 0.0}[
        a["posterior"]
    ]
    a["posterior_db"] = round(float(overrides.get("posterior_db", post_db)), 4)
    # Refraction at a smooth curved wall casts thin shadows from its sides.
    smooth = a["margin"] == "circumscribed" and a["shape"] != "irregular"
    a["edge_shadows"] = bool(overrides.get("edge_shadows", smooth and edge_draw < 0.4))
    a["_edge_db"] = 5.0 + 6.0 * u_edge
    return a


# --------------------------------------------------------------------------
# Lesion outline


def _lesion_outline(
    rng: np.random.Generator, a: float, b: float, angle_deg: float, shape: str, margin_detail: str
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Outline polygon and spicule polygons, as ``[N, 2]`` (x, y) offsets."""
    n = 400
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    if shape == "irregular":
        # Low-order harmonics on a warped angle: a lumpy, asymmetric outline.
        tw = t + 0.35 * np.sin(t + rng.uniform(0, 2 * np.pi))
        for k in range(2, 7):
            r += (
                rng.uniform(0.06, 0.16)
                * (2.0 / k) ** 0.7
                * np.cos(k * tw + rng.uniform(0, 2 * np.pi))
            )
    else:
        for k in (2, 3):
            r += rng.uniform(0.0, 0.025) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    if margin_detail == "microlobulated":
        # |cos| gives rounded lobules separated by sharp inward notches.
        lobes = int(rng.integers(14, 26))
        amp = rng.uniform(0.05, 0.09)
        r += amp * (np.abs(np.cos(lobes * t / 2 + rng.uniform(0, np.pi))) - 0.64)
    r = np.maximum(r, 0.5)
    x, y = a * r * np.cos(t), b * r * np.sin(t)

    if margin_detail == "angular":
        # Few vertices joined by straight edges: sharp corners, some jutting out.
        # Roughly even angular spacing keeps every gap < pi, so the polygon
        # always contains the centre.
        m = int(rng.integers(6, 10))
        pos = (np.arange(m) + rng.uniform(-0.3, 0.3, size=m)) * (n / m)
        idx = np.mod(np.round(pos + rng.uniform(0, n)).astype(int), n)
        jitter = rng.uniform(0.85, 1.25, size=m)
        x, y = x[idx] * jitter, y[idx] * jitter

    spicules = []
    if margin_detail == "spiculated":
        k = int(rng.integers(7, 15))
        base = min(a, b)
        for ti in np.sort(rng.uniform(0, 2 * np.pi, size=k)):
            i = int(ti / (2 * np.pi) * n) % n
            p = np.array([a * r[i] * np.cos(t[i]), b * r[i] * np.sin(t[i])])
            d = p / (np.linalg.norm(p) + 1e-9)
            d = d + rng.normal(0, 0.15, 2)  # not perfectly radial
            d /= np.linalg.norm(d)
            perp = np.array([-d[1], d[0]])
            length = rng.uniform(0.3, 0.8) * base
            # At least ~4 px wide at the root: thinner spicules vanish in the PSF
            # blur, and a mask part that cannot be seen is label noise.
            half_w = max(2.0, rng.uniform(0.06, 0.12) * base)
            root = p - d * 0.15 * base  # start inside so the spicule is attached
            tip = p + d * length
            spicules.append(
                np.stack(
                    [root + perp * half_w, tip + perp * 1.0, tip - perp * 1.0, root - perp * half_w]
                )
            )

    th = np.deg2rad(angle_deg)
    c, s = np.cos(th), np.sin(th)

    def rot(xy: np.ndarray) -> np.ndarray:
        # x' = x cos - y sin, y' = x sin + y cos: rotates +x towards +y (down).
        return np.stack([xy[:, 0] * c - xy[:, 1] * s, xy[:, 0] * s + xy[:, 1] * c], axis=1)

    return rot(np.stack([x, y], axis=1)), [rot(p) for p in spicules]


def _rasterize(
    polys: Sequence[np.ndarray], cx: float, cy: float, shape: tuple[int, int]
) -> np.ndarray:
    # PIL's scan-line fill is ~100x faster than a point-in-polygon test.
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    pen = ImageDraw.Draw(canvas)
    for p in polys:
        pen.polygon([(float(x + cx), float(y + cy)) for x, y in p], fill=1)
    return np.asarray(canvas, dtype=bool)


# --------------------------------------------------------------------------
# Rendering


def render_phantom(
    rng: np.random.Generator,
    height: int,
    width: int,
    label: str,
    attributes: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Renders one synthetic breast-ultrasound scan.

    Args:
      rng: random generator; the scan is a deterministic function of its state.
      height: image rows (depth direction), at least 48.
      width: image columns, at least 48.
      label: 'benign', 'malignant' or 'normal'.
      attributes: optional overrides of sampled attributes (any key of the
        truth schema in the module docstring except ``bbox``/``mask_area_px``/``texture_visible``,
        e.g. ``{"posterior": "shadowing", "shape": "oval"}``). Unset ones are
        drawn from :data:`PRIORS`; the random stream does not depend on the
        overrides, so the same seed with a different override renders the same
        anatomy and speckle.

    Returns:
      ``(image, mask, attributes)``: ``[H, W]`` uint8 scan, ``[H, W]`` bool
      lesion mask (all False for 'normal'), and a JSON-serialisable dict with
      the scan's truth (keys as in the module docstring, less the file-level
      ones ``image``, ``masks``, ``num_mask_files``, ``duplicate_of``,
      ``duplicate_transform``, ``true_label``).

    Raises:
      ValueError: unknown label, attribute name or attribute value.
    """
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    h, w = int(height), int(width)
    if h < 48 or w < 48:
        raise ValueError(f"scan must be at least 48x48, got {h}x{w}")
    overrides = dict(attributes or {})
    unknown = set(overrides) - _OVERRIDABLE
    if unknown:
        raise ValueError(f"unknown attribute(s) {sorted(unknown)}; allowed: {sorted(_OVERRIDABLE)}")
    if label == "normal" and set(overrides) - set(_SCAN_KEYS):
        raise ValueError("a normal scan has no lesion attributes to override")

    (r_scan, r_layers, r_tissue, r_attr, r_shape, r_lesion, r_speckle) = _child_rngs(rng, 7)

    # --- acquisition settings -------------------------------------------
    depth_mm = r_scan.uniform(30.0, 50.0)
    scan = {
        "pixel_spacing_mm": depth_mm / h,
        "frequency_mhz": r_scan.uniform(7.0, 12.0),
        "dynamic_range_db": r_scan.uniform(40.0, 50.0),
        "gain_db": r_scan.uniform(-2.5, 2.5),
        "tgc_compensation": r_scan.uniform(0.78, 0.9),
    }
    psf_axial_mm = r_scan.uniform(0.12, 0.18)
    psf_lateral_mm = r_scan.uniform(0.3, 0.45)
    despeckle = r_scan.uniform(0.8, 1.3)
    for k in _SCAN_KEYS:
        if k in overrides:
            scan[k] = float(overrides[k])
    # Rounded before use, so truth.json holds exactly what was rendered.
    scan = {k: round(float(v), 5) for k, v in scan.items()}
    sp = scan["pixel_spacing_mm"]

    # --- layer interfaces (rows, per column) ----------------------------
    rl = r_layers
    skin = h * rl.uniform(0.015, 0.04) + _curve(rl, w, 0.004 * h, w / 4)
    dermis = max(2.0, rl.uniform(1.5, 2.5) / sp)
    fat_b = (
        skin
        + dermis
        + h * rl.uniform(0.10, 0.28)
        + _curve(rl, w, h * rl.uniform(0.015, 0.04), w / 5)
    )
    gland_b = fat_b + h * rl.uniform(0.25, 0.45) + _curve(rl, w, h * rl.uniform(0.02, 0.05), w / 5)
    retro = max(2.0, rl.uniform(1.0, 3.0) / sp)
    muscle_t = gland_b + retro
    muscle_b = muscle_t + h * rl.uniform(0.08, 0.18) + _curve(rl, w, 0.01 * h, w / 3)
    fat_b = np.maximum(fat_b, skin + dermis + 3)
    gland_b = np.maximum(gland_b, fat_b + 3)
    muscle_t = np.maximum(muscle_t, gland_b + 2)
    muscle_b = np.maximum(muscle_b, muscle_t + 3)
    layers = {
        "skin": skin,
        "fat_bottom": fat_b,
        "gland_bottom": gland_b,
        "muscle_top": muscle_t,
        "muscle_bottom": muscle_b,
    }

    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    # Region of each pixel: 0 gel, 1 dermis, 2 fat, 3 gland, 4 retromammary fat,
    # 5 pectoral muscle, 6 chest wall (the interfaces never cross).
    region = np.zeros((h, w), np.int8)
    for line in (skin, skin + dermis, fat_b, gland_b, muscle_t, muscle_b):
        region += yy >= line

    # --- echogenicity (backscatter power) -------------------------------
    rt = r_tissue
    pw = lambda mm: mm / sp  # mm -> px
    # Fat: dark and lobulated; the lobules' thin bright septa lie along the zero
    # set of a smooth random field.
    lob = _noise(rt, (h, w), pw(rt.uniform(1.5, 2.5)), pw(rt.uniform(3.0, 5.0)))
    fat = _FAT_POWER * np.exp(0.3 * _noise(rt, (h, w), pw(2.0), pw(4.0)))
    fat = fat * (1.0 + 4.0 * np.exp(-((lob / 0.12) ** 2)))
    # Fibroglandular tissue: bright, streaky along the skin, with fat islands.
    streak = _noise(rt, (h, w), pw(0.5), pw(rt.uniform(1.5, 3.0)))
    islands = _noise(rt, (h, w), pw(2.5), pw(4.0))
    frac_fat = special.expit((islands - 1.0) / 0.15)
    gland = (1 - frac_fat) * (_GLAND_POWER * np.exp(0.5 * streak)) + frac_fat * fat
    # Pectoral muscle: dim, with oblique bright striations; chest wall: dark.
    phi = np.deg2rad(rt.uniform(-15, 15))
    period = pw(rt.uniform(1.0, 2.0))
    wobble = _noise(rt, (h, w), pw(1.0), pw(3.0))
    u = yy * np.cos(phi) + xx * np.sin(phi)
    stripes = np.clip(np.cos(2 * np.pi * u / period + 1.5 * wobble), 0, 1) ** 6
    power = np.select(
        [region == k for k in range(1, 7)],
        [
            0.25 * np.exp(0.3 * streak),
            fat,
            gland,
            fat,
            0.12 * (1.0 + 3.0 * stripes),
            0.02 * np.exp(0.5 * wobble),
        ],
        1e-3,
    ).astype(np.float32)  # coupling gel: near black
    # Lactiferous ducts: thin dark tubes running roughly along the gland.
    for _ in range(int(rt.integers(0, 4))):
        x0, x1 = sorted(int(v) for v in rt.uniform(0, w, 2))
        yd = (fat_b + (gland_b - fat_b) * rt.uniform(0.2, 0.8) + _curve(rt, w, pw(1.0), w / 6))[
            x0:x1
        ]
        rad = pw(rt.uniform(0.4, 1.2))
        if x1 > x0:
            band = power[:, x0:x1]
            band *= 1.0 - 0.95 * (region[:, x0:x1] == 3) * np.exp(-(((yy - yd) / rad) ** 2))
    # Specular interfaces: skin entry echo, pectoral fasciae, pleura.
    pleura = muscle_b + pw(rt.uniform(3.0, 6.0))
    for line, strength, thick in (
        (skin, 2.5, 0.3),
        (muscle_t, 0.9, 0.25),
        (muscle_b, 0.7, 0.25),
        (pleura, 0.6, 0.25),
    ):
        t_px = max(pw(thick), 0.7)
        lo = max(0, int(line.min() - 4 * t_px))
        hi = min(h, int(line.max() + 4 * t_px) + 1)
        if lo < hi:
            power[lo:hi] += strength * np.exp(-(((yy[lo:hi] - line) / t_px) ** 2))
    # Cooper ligaments: thin bright arcs from the dermis down to the gland.
    lig = np.zeros((h, w), np.float32)
    tt = np.linspace(0.0, 1.0, 3 * h)
    for _ in range(int(rt.integers(2, 6))):
        xs = (
            rt.uniform(0, w)
            + rt.uniform(-0.25, 0.25) * w * tt
            + rt.uniform(-0.15, 0.15) * w * tt * (1 - tt)
        )
        xi = np.clip(xs.astype(int), 0, w - 1)
        ys = skin[xi] + dermis + (fat_b[xi] + pw(1.0) - skin[xi] - dermis) * tt
        lig[np.clip(ys.astype(int), 0, h - 1), xi] = rt.uniform(0.4, 1.0)
    lig = ndimage.gaussian_filter(lig, 0.6)
    power += 5.0 * lig * ((region == 2) | (region == 3))

    # One-way attenuation per region, dB/cm/MHz -> round trip, dB per pixel.
    alpha_lut = np.array(
        [_ATTEN[n] for n in ("gel", "dermis", "fat", "gland", "fat", "muscle", "deep")], np.float32
    )
    alpha_px = alpha_lut[region] * (2.0 * scan["frequency_mhz"] * sp * 0.1)
    extra_loss = np.zeros((h, w), np.float32)

    mask = np.zeros((h, w), bool)
    lesion: dict[str, Any] | None = None
    if label != "normal":
        lesion = _sample_lesion_attributes(r_attr, label, overrides)
        mask = _place_lesion(r_shape, lesion, overrides, layers, dermis, h, w)
        _paint_lesion(r_lesion, lesion, mask, power, extra_loss)

    image, mean_gray = _acquire(
        r_speckle, power, alpha_px, extra_loss, scan, psf_axial_mm, psf_lateral_mm, despeckle
    )
    if lesion is not None:
        lesion["texture_visible"] = _texture_visible(mean_gray, mask)

    out: dict[str, Any] = {"label": label, "height": h, "width": w}
    out.update(scan)
    out["layers"] = {k: round(float(np.mean(v)), 2) for k, v in layers.items()}
    for k in _LESION_KEYS:
        out[k] = None if lesion is None else lesion[k]
    return image, mask, out


def _place_lesion(
    rng: np.random.Generator,
    a: dict[str, Any],
    overrides: Mapping[str, Any],
    layers: Mapping[str, Any],
    dermis: float,
    h: int,
    w: int,
) -> np.ndarray:
    """Draws the outline, sizes and places it; fills geometry keys; mask."""
    u_ratio, u_angle, u_cx, u_cy = rng.random(4)
    ratio = {
        "oval": 1.35 + 0.75 * u_ratio,
        "round": 1.02 + 0.08 * u_ratio,
        "irregular": 1.1 + 0.6 * u_ratio,
    }[a["shape"]]
    target = a["area_fraction"] * h * w
    short = math.sqrt(target / (math.pi * ratio))
    if a["orientation"] == "parallel":
        ax, ay = ratio * short, short
    else:
        ax, ay = short, ratio * short
    angle = -15.0 + 30.0 * u_angle
    if "axes" in overrides:
        ax, ay = (float(v) for v in overrides["axes"])
    if "angle" in overrides:
        angle = float(overrides["angle"])
    ax, ay, angle = round(ax, 3), round(ay, 3), round(angle, 3)
    outline, spicules = _lesion_outline(rng, ax, ay, angle, a["shape"], a["margin_detail"])

    # Keep the whole lesion (spicules included) 7 % inside the left, right and
    # bottom borders -- so near-duplicate crops never cut it -- below the skin,
    # and with tissue under it to show the posterior feature.
    pts = np.concatenate([outline] + spicules)
    x_lo, y_lo = pts.min(axis=0)
    x_hi, y_hi = pts.max(axis=0)
    top = float(np.max(layers["skin"])) + dermis + 0.04 * h
    bottom = h - max(0.2 * h, 0.5 * (y_hi - y_lo))
    left, right = 0.07 * w, 0.93 * w
    scale = min(1.0, (right - left) / (x_hi - x_lo), (bottom - top) / (y_hi - y_lo))
    if scale < 1.0 and "axes" not in overrides:
        scale *= 0.98
        ax, ay = round(ax * scale, 3), round(ay * scale, 3)
        outline = outline * scale
        spicules = [p * scale for p in spicules]
        x_lo, x_hi, y_lo, y_hi = (v * scale for v in (x_lo, x_hi, y_lo, y_hi))
    if "centre" in overrides:
        cx, cy = (float(v) for v in overrides["centre"])
    else:
        cx = (left - x_lo) + u_cx * max(0.0, (right - x_hi) - (left - x_lo))
        # Prefer the glandular layer, where most masses arise.
        y_min, y_max = top - y_lo, bottom - y_hi
        g_lo = float(np.mean(layers["fat_bottom"]))
        g_hi = float(np.mean(layers["gland_bottom"]))
        lo, hi = max(y_min, g_lo), min(y_max, g_hi)
        if lo > hi:
            lo, hi = y_min, max(y_min, y_max)
        cy = lo + u_cy * (hi - lo)
    cx, cy = round(cx, 3), round(cy, 3)
    mask = _rasterize([outline] + spicules, cx, cy, (h, w))
    if not mask.any():
        raise ValueError("the lesion falls outside the image; check centre/axes")
    ys, xs = np.nonzero(mask)
    a.update(
        {
            "centre": [cx, cy],
            "axes": [ax, ay],
            "angle": angle,
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
            "mask_area_px": int(mask.sum()),
            "area_fraction": round(float(mask.sum()) / (h * w), 5),
        }
    )
    return mask


def _paint_lesion(
    rng: np.random.Generator,
    a: dict[str, Any],
    mask: np.ndarray,
    power: np.ndarray,
    extra_loss: np.ndarray,
) -> None:
    """Paints the lesion into ``power`` and its attenuation into ``extra_loss``.

    Only pixels of ``mask`` change in ``power`` (so the mask is exact truth);
    ``extra_loss`` holds the lesion's extra round-trip loss density, dB/px.
    """
    x0, y0, x1, y1 = a["bbox"]
    sl = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    m = mask[sl]
    bh, bw = m.shape
    level = _FAT_POWER * 10 ** (a["echo_level_db"] / 10)
    if a["heterogeneous"]:
        # Coarse blotches plus the occasional near-anechoic (necrotic/cystic) pool.
        size = max(1.5, 0.12 * min(bh, bw))
        blot = _noise(rng, (bh, bw), size, size)
        tex = np.exp(0.9 * blot)
        tex *= np.where(blot < -1.3, 0.1, 1.0)
    else:
        tex = np.exp(0.12 * _noise(rng, (bh, bw), 1.5, 3.0))
    sub = power[sl]
    sub[m] = (level * tex)[m]
    if a["calcifications"]:
        yx = np.argwhere(m)
        n = min(len(yx), int(rng.integers(4, 16)))
        pick = yx[rng.choice(len(yx), size=n, replace=False)]
        sub[pick[:, 0], pick[:, 1]] = rng.uniform(3.0, 8.0, size=n)

    # Extra attenuation: spread so that a column crossing the thickest part of
    # the lesion loses about -posterior_db, thinner parts proportionally less;
    # a lateral modulation (mean 1) makes shadows streaky as on real scans.
    thick = m.sum(axis=0).astype(np.float32)
    dens = np.zeros((bh, bw), np.float32)
    if a["posterior_db"] != 0.0:
        streaks = np.exp(0.3 * _noise(rng, (1, bw), 0.5, 2.0)[0] - 0.045)
        dens += m * (-a["posterior_db"] / max(thick.max(), 1.0) * streaks)
    if a["edge_shadows"]:
        cols = np.nonzero(thick > 0)[0]
        span = cols[-1] - cols[0] + 1
        edge_w = max(1, int(round(0.05 * span)))
        edge = np.zeros(bw, bool)
        edge[cols[0] : cols[0] + edge_w] = True
        edge[cols[-1] - edge_w + 1 : cols[-1] + 1] = True
        dens += m * (edge * a.pop("_edge_db") / np.maximum(thick, 1.0))[None, :]
    else:
        a.pop("_edge_db")
    extra_loss[sl] += dens


def _acquire(
    rng: np.random.Generator,
    power: np.ndarray,
    alpha_px: np.ndarray,
    extra_loss: np.ndarray,
    scan: Mapping[str, float],
    psf_axial_mm: float,
    psf_lateral_mm: float,
    despeckle: float,
) -> np.ndarray:
    """Speckle, attenuation, TGC and log compression.

    Returns:
        ``(image, mean_gray)``: the ``[H, W]`` uint8 scan, and the float grey
        level each pixel would have without speckle (unclipped).
    """
    h, w = power.shape
    sp = scan["pixel_spacing_mm"]
    ky = _gauss_kernel(max(0.6, psf_axial_mm / sp))
    kx = _gauss_kernel(max(0.9, psf_lateral_mm / sp))
    # Coherent summation of random scatterers within the PSF: complex Gaussian
    # field whose envelope is Rayleigh, with the PSF's grain size.
    amp = np.sqrt(power)
    env2 = np.zeros((h, w), np.float32)
    for _ in range(2):  # real and imaginary parts
        f = amp * _white(rng, (h, w))
        f = ndimage.correlate1d(f, ky, axis=0, mode="reflect")
        f = ndimage.correlate1d(f, kx, axis=1, mode="reflect")
        env2 += f * f
    # Normalise so that E[env^2] equals the local power.
    env2 /= 2.0 * float(np.sum(ky**2) * np.sum(kx**2))

    # Round-trip loss down each column (echo from row y crossed rows < y twice).
    loss = np.cumsum(alpha_px, axis=0)
    extra = np.cumsum(extra_loss, axis=0)
    # The beam has a finite width: shadows and enhancement have soft edges.
    extra = ndimage.correlate1d(extra, kx, axis=1, mode="nearest")
    # TGC compensates a fixed fraction of the *mean* loss profile, as a
    # sonographer's slider curve would; lateral differences remain.
    tgc = scan["tgc_compensation"] * loss.mean(axis=1, keepdims=True)
    # Scanner speckle reduction: a light blur of the envelope before log
    # compression. It fills the deep speckle nulls that would otherwise show as
    # dark cracks, and leaves the bright grains of real scans.
    env = ndimage.gaussian_filter(np.sqrt(env2), despeckle)
    db = 20.0 * np.log10(env + 1e-6) - loss - extra + tgc + scan["gain_db"]
    dr = scan["dynamic_range_db"]
    gray = 255.0 * (db - (_DISPLAY_TOP_DB - dr)) / dr
    # The same chain without speckle: the expected envelope power (the power
    # map seen through the squared PSF), at the speckle's median (ln 2 of the
    # mean power, for a Rayleigh envelope). It tells what the display could
    # show of the tissue, whatever the speckle draw.
    mean_p = ndimage.correlate1d(power, ky**2 / np.sum(ky**2), axis=0, mode="reflect")
    mean_p = ndimage.correlate1d(mean_p, kx**2 / np.sum(kx**2), axis=1, mode="reflect")
    mean_db = 10.0 * np.log10(math.log(2.0) * mean_p + 1e-12) - loss - extra + tgc
    mean_gray = 255.0 * (mean_db + scan["gain_db"] - (_DISPLAY_TOP_DB - dr)) / dr
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8), mean_gray


def _texture_visible(mean_gray: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the display shows the lesion's interior at all.

    A lesion whose interior lies, speckle aside, mostly below the display's
    floor (grey 0) is rendered black whatever texture was drawn into it: its
    heterogeneity cannot be judged from the image, by a reader or by
    :mod:`busi_jax.descriptors` (BI-RADS reads such a mass as anechoic or
    markedly hypoechoic and does not grade its texture). Judged on the
    speckle-free grey levels, so it is a property of the phantom, not of one
    speckle draw or of any descriptor's rule.
    """
    interior = ndimage.binary_erosion(mask, iterations=2)
    if interior.sum() < 10:
        interior = mask
    if not interior.any():
        return True
    return bool(np.mean(mean_gray[interior] < 0.5) < 0.5)


# --------------------------------------------------------------------------
# Folder writer


def _temp_name(path: pathlib.Path) -> pathlib.Path:
    # Hidden, in the same folder (so os.replace is atomic and readers that skip
    # dotfiles never see a half-written file), and created with open() rather
    # than mkstemp so it gets the usual umask permissions, not 0600.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_png(path: pathlib.Path, array: np.ndarray) -> None:
    tmp = _temp_name(path)
    try:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=3)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_text(path: pathlib.Path, text: str) -> None:
    tmp = _temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _split_mask(
    rng: np.random.Generator, mask: np.ndarray, centre: Sequence[float], parts: int
) -> list[np.ndarray]:
    """Cuts the mask into ``parts`` angular sectors around ``centre``."""
    ys, xs = np.nonzero(mask)
    theta = np.mod(
        np.arctan2(ys - centre[1], xs - centre[0]) - rng.uniform(0, 2 * np.pi), 2 * np.pi
    )
    edges = np.linspace(0, 2 * np.pi, parts + 1)
    out = []
    for i in range(parts):
        sel = (theta >= edges[i]) & (theta < edges[i + 1])
        piece = np.zeros_like(mask)
        piece[ys[sel], xs[sel]] = True
        if piece.any():
            out.append(piece)
    return out


def _duplicate(
    rng: np.random.Generator, image: np.ndarray, masks: list[np.ndarray], truth: dict[str, Any]
) -> tuple[np.ndarray, list[np.ndarray], dict[str, Any]]:
    """Re-saves a scan slightly cropped and/or resized, as BUSI's duplicates."""
    h, w = image.shape
    full = np.logical_or.reduce(masks)
    do_crop = rng.random() < 0.75
    do_resize = (not do_crop) or rng.random() < 0.6
    crop = [0, 0, 0, 0]  # top, bottom, left, right
    if do_crop:
        sides = rng.random(4) < 0.4
        sides[int(rng.integers(4))] = True
        for i, (on, dim) in enumerate(zip(sides, (h, h, w, w))):
            if on:
                crop[i] = int(round(rng.uniform(0.01, 0.035) * dim))
        if full.any():  # never cut the lesion
            ys, xs = np.nonzero(full)
            crop[0] = min(crop[0], max(0, int(ys.min()) - 2))
            crop[1] = min(crop[1], max(0, h - 1 - int(ys.max()) - 2))
            crop[2] = min(crop[2], max(0, int(xs.min()) - 2))
            crop[3] = min(crop[3], max(0, w - 1 - int(xs.max()) - 2))
    t, b, l, r = crop
    ch, cw = h - t - b, w - l - r
    s = rng.uniform(0.85, 1.2) if do_resize else 1.0
    nh, nw = max(48, int(round(ch * s))), max(48, int(round(cw * s)))
    sy, sx = nh / ch, nw / cw

    def tf(a: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        a = a[t : h - b, l : w - r]
        if (nh, nw) == a.shape:
            return a.copy()
        return np.asarray(Image.fromarray(a).resize((nw, nh), resample))

    new_image = tf(image, Image.Resampling.BILINEAR)
    # Nearest neighbour picks pixels, so it commutes with OR: the resized parts
    # still OR to the resized whole mask.
    new_masks = [tf(m.astype(np.uint8) * 255, Image.Resampling.NEAREST) > 127 for m in masks]
    if truth["shape"] is not None:
        kept = [m for m in new_masks if m.any()]
        new_masks = kept or new_masks[:1]

    d = dict(truth)
    d["height"], d["width"] = nh, nw
    d["pixel_spacing_mm"] = round(truth["pixel_spacing_mm"] / math.sqrt(sy * sx), 5)
    d["layers"] = {k: round((v - t + 0.5) * sy - 0.5, 2) for k, v in truth["layers"].items()}
    d["duplicate_transform"] = {"crop_tblr": crop, "scale": [round(sy, 5), round(sx, 5)]}
    if truth["shape"] is not None:
        cx, cy = truth["centre"]
        d["centre"] = [round((cx - l + 0.5) * sx - 0.5, 3), round((cy - t + 0.5) * sy - 0.5, 3)]
        ax, ay = truth["axes"]
        th = math.radians(truth["angle"])
        # An ellipse axis along direction (cos, sin) scales by the norm of the
        # scaled direction vector; exact for sx == sy, and they differ < 1 %.
        d["axes"] = [
            round(ax * math.hypot(sx * math.cos(th), sy * math.sin(th)), 3),
            round(ay * math.hypot(sx * math.sin(th), sy * math.cos(th)), 3),
        ]
        nf = np.logical_or.reduce(new_masks)
        ys, xs = np.nonzero(nf)
        d["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
        d["mask_area_px"] = int(nf.sum())
        d["area_fraction"] = round(float(nf.sum()) / (nh * nw), 5)
    return new_image, new_masks, d


def generate(
    out_dir: str | os.PathLike[str],
    *,
    num_normal: int = 20,
    num_benign: int = 40,
    num_malignant: int = 40,
    seed: int = 0,
    size_range: tuple[tuple[int, int], tuple[int, int]] = ((300, 500), (400, 600)),
    duplicate_fraction: float = 0.1,
    cross_label_duplicate_fraction: float = 0.1,
    multi_mask_fraction: float = 0.1,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a synthetic BUSI-layout dataset.

    ``num_*`` count distinct scans; near-duplicates come on top of them.
    The same arguments give byte-identical files.

    Args:
      out_dir: folder to write; class folders go directly inside it.
      num_normal: normal scans to render.
      num_benign: benign scans to render.
      num_malignant: malignant scans to render.
      seed: random seed.
      size_range: ``((min_h, max_h), (min_w, max_w))`` inclusive, px; each scan
        gets a uniform random size in it (BUSI's are roughly 300-500 x 400-600).
        Use small sizes (e.g. ``((96, 128), (128, 160))``) for speed.
      duplicate_fraction: share of each class's scans saved a second time,
        slightly cropped and/or resized, under another stem
        (``round(fraction * num)`` per class).
      cross_label_duplicate_fraction: share of the benign/malignant duplicates
        filed under the other lesion class (rounded to a count).
      multi_mask_fraction: share of each lesion class's scans whose mask is
        split over 2-3 files (rounded to a count).
      overwrite: if ``out_dir`` already holds class folders or ``truth.json``,
        delete their PNG files and ``truth.json`` first; if False, raise.

    Returns:
      ``out_dir`` as a path.

    Raises:
      FileExistsError: ``out_dir`` holds earlier output and ``overwrite`` is
        False.
      ValueError: a bad count, fraction or size range.
    """
    out = pathlib.Path(out_dir)
    counts = {"benign": int(num_benign), "malignant": int(num_malignant), "normal": int(num_normal)}
    if min(counts.values()) < 0:
        raise ValueError(f"scan counts must be >= 0, got {counts}")
    for name, f in (
        ("duplicate_fraction", duplicate_fraction),
        ("cross_label_duplicate_fraction", cross_label_duplicate_fraction),
        ("multi_mask_fraction", multi_mask_fraction),
    ):
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {f}")
    (h_lo, h_hi), (w_lo, w_hi) = size_range
    if not 48 <= h_lo <= h_hi or not 48 <= w_lo <= w_hi:
        raise ValueError(f"bad size_range {size_range}: need 48 <= min <= max")

    old = [out / c for c in CLASSES if (out / c).is_dir()]
    if old or (out / "truth.json").exists():
        if not overwrite:
            raise FileExistsError(
                f"{out}: already holds a dataset; pass overwrite=True to replace it"
            )
        for folder in old:
            for p in folder.glob("*.png"):
                p.unlink()
        (out / "truth.json").unlink(missing_ok=True)

    # The plan (which scans are duplicated, where duplicates go, which masks are
    # split, the stem numbers) comes from its own stream, so it does not depend
    # on rendering; each scan is rendered from a stream of its own.
    plan = np.random.default_rng([seed, 7919])
    dup_of: dict[tuple[str, int], str] = {}  # (class, index) -> target folder
    split: set[tuple[str, int]] = set()
    for c in CLASSES:
        n = counts[c]
        for i in plan.choice(n, size=int(round(duplicate_fraction * n)), replace=False):
            dup_of[(c, int(i))] = c
        if c != "normal":
            for i in plan.choice(n, size=int(round(multi_mask_fraction * n)), replace=False):
                split.add((c, int(i)))
    lesion_dups = sorted(k for k in dup_of if k[0] != "normal")
    n_cross = int(round(cross_label_duplicate_fraction * len(lesion_dups)))
    for j in plan.choice(len(lesion_dups), size=n_cross, replace=False):
        c, i = lesion_dups[int(j)]
        dup_of[(c, i)] = "malignant" if c == "benign" else "benign"

    # Stem numbers shuffled within each folder, so a duplicate's number says
    # nothing about its original.
    entries: dict[str, list[tuple[str, int, bool]]] = {c: [] for c in CLASSES}
    for c in CLASSES:
        entries[c].extend((c, i, False) for i in range(counts[c]))
    for (c, i), target in sorted(dup_of.items()):
        entries[target].append((c, i, True))
    stem_of: dict[tuple[str, int, bool], tuple[str, str]] = {}
    for folder, items in entries.items():
        numbers = plan.permutation(len(items)) + 1
        for item, num in zip(items, numbers):
            stem_of[item] = (folder, f"{folder} ({int(num)})")

    out.mkdir(parents=True, exist_ok=True)
    for c in CLASSES:
        if entries[c]:
            (out / c).mkdir(exist_ok=True)
    truth: dict[str, dict[str, Any]] = {}

    def write(
        folder: str, stem: str, image: np.ndarray, masks: list[np.ndarray], record: dict[str, Any]
    ) -> str:
        key = f"{folder}/{stem}.png"
        _atomic_png(out / key, image)
        names = []
        for k, m in enumerate(masks):
            name = f"{folder}/{stem}_mask.png" if k == 0 else (f"{folder}/{stem}_mask_{k}.png")
            _atomic_png(out / name, m.astype(np.uint8) * np.uint8(255))
            names.append(name)
        rec = dict(record)
        rec.update(
            {
                "true_label": record["label"],
                "label": folder,
                "image": key,
                "masks": names,
                "num_mask_files": len(names),
            }
        )
        truth[key] = rec
        return key

    for ci, c in enumerate(CLASSES):
        for i in range(counts[c]):
            rng = np.random.default_rng([seed, ci, i])
            h = int(rng.integers(h_lo, h_hi + 1))
            w = int(rng.integers(w_lo, w_hi + 1))
            r_render, r_split, r_dup = _child_rngs(rng, 3)
            image, mask, attrs = render_phantom(r_render, h, w, c)
            attrs.update(duplicate_of=None, duplicate_transform=None)
            masks = [mask]
            if (c, i) in split:
                masks = _split_mask(r_split, mask, attrs["centre"], int(r_split.integers(2, 4)))
            folder, stem = stem_of[(c, i, False)]
            key = write(folder, stem, image, masks, attrs)
            if (c, i) in dup_of:
                d_image, d_masks, d_attrs = _duplicate(r_dup, image, masks, attrs)
                d_attrs["duplicate_of"] = key
                folder, stem = stem_of[(c, i, True)]
                write(folder, stem, d_image, d_masks, d_attrs)

    _atomic_text(out / "truth.json", json.dumps(truth, indent=1, sort_keys=True) + "\n")
    return out


def load_truth(out_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Reads ``truth.json`` written by :func:`generate`."""
    with open(pathlib.Path(out_dir) / "truth.json", encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m busi_jax.synthetic --out_dir=DIR [--num_benign=N ...]``."""
    from absl import app, flags  # pylint: disable=g-import-not-at-top

    # Flags are defined here, not at import, so importing this module never
    # clashes with other modules' flags of the same name (e.g. --seed).
    fl = flags.FLAGS
    if "num_benign" not in fl:
        flags.DEFINE_string("out_dir", None, "Folder to write.", required=True)
        flags.DEFINE_integer("num_normal", 20, "Normal scans.")
        flags.DEFINE_integer("num_benign", 40, "Benign scans.")
        flags.DEFINE_integer("num_malignant", 40, "Malignant scans.")
        flags.DEFINE_integer("seed", 0, "Random seed.")
        flags.DEFINE_integer("min_height", 300, "Smallest scan height, px.")
        flags.DEFINE_integer("max_height", 500, "Largest scan height, px.")
        flags.DEFINE_integer("min_width", 400, "Smallest scan width, px.")
        flags.DEFINE_integer("max_width", 600, "Largest scan width, px.")
        flags.DEFINE_float("duplicate_fraction", 0.1, "Share re-saved as near-duplicates.")
        flags.DEFINE_float(
            "cross_label_duplicate_fraction",
            0.1,
            "Share of lesion duplicates filed under the other lesion class.",
        )
        flags.DEFINE_float(
            "multi_mask_fraction",
            0.1,
            "Share of lesion scans with the mask split over several files.",
        )
        flags.DEFINE_bool("overwrite", False, "Replace an existing dataset.")

    def run(_):
        path = generate(
            fl.out_dir,
            num_normal=fl.num_normal,
            num_benign=fl.num_benign,
            num_malignant=fl.num_malignant,
            seed=fl.seed,
            size_range=((fl.min_height, fl.max_height), (fl.min_width, fl.max_width)),
            duplicate_fraction=fl.duplicate_fraction,
            cross_label_duplicate_fraction=fl.cross_label_duplicate_fraction,
            multi_mask_fraction=fl.multi_mask_fraction,
            overwrite=fl.overwrite,
        )
        n = len(load_truth(path))
        print(f"wrote {n} scans and truth.json to {path}")

    app.run(run, argv=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
