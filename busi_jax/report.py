"""The guidance layer: a BI-RADS-style category, follow-up wording and a page per scan.

Research software, not a medical device: every report carries
:data:`DISCLAIMER`, and a category here is a research suggestion derived from
a model's output, never a diagnosis or a clinical BI-RADS assessment.

How a category is suggested (all rules in :data:`CATEGORY_TABLE` and
:data:`ADJUSTMENTS`, read top to bottom):

1. No lesion segmented -> category 1.
2. Otherwise the malignancy probability picks a base category from
   :data:`CATEGORY_TABLE`, whose bands are the likelihood-of-malignancy
   ranges that BI-RADS (5th edition) attaches to categories 3-5
   (3: <= 2%, 4A: 2-10%, 4B: 10-50%, 4C: 50-95%, 5: >= 95%).
3. The descriptors then move it by at most one step (:data:`ADJUSTMENTS`):
   three or more suspicious features (irregular shape, not-parallel
   orientation, non-circumscribed margin, posterior shadowing) move it up;
   a lesion with all four classic benign features (oval, parallel,
   circumscribed, no shadowing) and a probability below 0.10 moves down,
   never below 2 -- category 2 is reached only this way.

The probability is the classifier's (temperature-scaled where calibrated);
its bands are only as meaningful as its calibration, which evaluate reports.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io as _io
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

DISCLAIMER = (
    "Research software output - not a medical device and not a diagnosis. The suggested"
    " BI-RADS-style category is computed from a model trained on a public research dataset"
    " (BUSI, Al-Dhabyani et al., Data in Brief 28, 2020) and has not been clinically validated."
    " Any clinical decision must be made by a qualified clinician."
)


@dataclasses.dataclass(frozen=True)
class Category:
    """One row of the category table.

    Attributes:
      code: '1', '2', '3', '4A', '4B', '4C' or '5'.
      name: its BI-RADS wording.
      prob_below: the row applies when the probability is below this (and at
        or above the previous row's bound).
      follow_up: the management BI-RADS usually associates with the category,
        worded as information for a clinician, not an instruction.
    """

    code: str
    name: str
    prob_below: float
    follow_up: str


CATEGORY_TABLE: tuple[Category, ...] = (
    Category(
        "1",
        "negative",
        0.0,
        "No lesion was found by the model. In practice, category 1 is followed by routine care.",
    ),
    Category(
        "2",
        "benign",
        0.0,
        "Features favour a benign finding. In practice, category 2 is followed by routine care.",
    ),
    Category(
        "3",
        "probably benign",
        0.02,
        "In practice, category 3 (<= 2% likelihood of malignancy) is usually followed by a"
        " short-interval (about 6-month) ultrasound.",
    ),
    Category(
        "4A",
        "low suspicion",
        0.10,
        "In practice, category 4 findings (4A: 2-10%) are usually considered for tissue sampling.",
    ),
    Category(
        "4B",
        "moderate suspicion",
        0.50,
        "In practice, category 4 findings (4B: 10-50%) are usually considered for tissue sampling.",
    ),
    Category(
        "4C",
        "high suspicion",
        0.95,
        "In practice, category 4 findings (4C: 50-95%) are usually considered for tissue sampling.",
    ),
    Category(
        "5",
        "highly suggestive of malignancy",
        float("inf"),
        "In practice, category 5 (>= 95%) findings are usually sampled and managed by a"
        " specialist team.",
    ),
)
ORDER = tuple(c.code for c in CATEGORY_TABLE)

SUSPICIOUS = {
    "shape": ("irregular", "irregular shape"),
    "orientation": ("not_parallel", "not-parallel (taller-than-wide) orientation"),
    "margin": ("not_circumscribed", "non-circumscribed margin"),
    "posterior": ("shadowing", "posterior acoustic shadowing"),
}
BENIGN = {
    "shape": ("oval", "oval shape"),
    "orientation": ("parallel", "parallel (wider-than-tall) orientation"),
    "margin": ("circumscribed", "circumscribed margin"),
    "posterior": (("enhancement", "none"), "no posterior shadowing"),
}
ADJUSTMENTS = (
    ("up one step", "3 or more suspicious descriptors"),
    ("down one step, not below 2", "all 4 benign descriptors and probability < 0.10"),
)


def _base(prob: float) -> Category:
    for c in CATEGORY_TABLE[2:]:
        if prob < c.prob_below:
            return c
    return CATEGORY_TABLE[-1]


def _matches(value, wanted) -> bool:
    return value in wanted if isinstance(wanted, tuple) else value == wanted


def suggest(probability: float | None, descriptors: Mapping[str, Any]) -> dict:
    """Suggests a BI-RADS-style category with its reasons.

    Args:
      probability: malignancy probability from the classifier, or None when
        the pipeline has no classifier.
      descriptors: the output of :func:`busi_jax.descriptors.describe`.

    Returns:
      ``category``, ``category_name``, ``follow_up``, ``explanation`` (plain
      language), ``suspicious`` and ``benign`` (descriptor phrases found) and
      ``rule`` (which rows fired).
    """
    if not descriptors.get("has_lesion"):
        c = CATEGORY_TABLE[0]
        return {
            "category": c.code,
            "category_name": c.name,
            "follow_up": c.follow_up,
            "explanation": "The segmentation model found no lesion in this scan.",
            "suspicious": [],
            "benign": [],
            "rule": "no lesion",
        }
    suspicious = [p for k, (v, p) in SUSPICIOUS.items() if _matches(descriptors.get(k), v)]
    benign = [p for k, (v, p) in BENIGN.items() if _matches(descriptors.get(k), v)]
    if probability is None:
        # Without a classifier, descriptors alone place the lesion in 3-4B.
        base = CATEGORY_TABLE[ORDER.index({0: "3", 1: "4A", 2: "4A"}.get(len(suspicious), "4B"))]
        rule = f"descriptors only ({len(suspicious)} suspicious)"
        prob_text = "No classifier probability was available."
        p = 0.5
    else:
        p = float(probability)
        base = _base(p)
        rule = f"probability {p:.3f} -> {base.code}"
        prob_text = f"The classifier's malignancy probability is {p:.0%}."
    idx = ORDER.index(base.code)
    if len(suspicious) >= 3 and idx < len(ORDER) - 1:
        idx += 1
        rule += f"; up one step ({len(suspicious)} suspicious descriptors)"
    elif len(benign) == 4 and (probability is None or p < 0.10) and idx > ORDER.index("2"):
        idx -= 1
        rule += "; down one step (all benign descriptors)"
    c = CATEGORY_TABLE[idx]
    parts = [prob_text]
    if suspicious:
        parts.append("Suspicious features: " + ", ".join(suspicious) + ".")
    if benign:
        parts.append("Features usually seen in benign lesions: " + ", ".join(benign) + ".")
    parts.append(f"Together these suggest category {c.code} ({c.name}).")
    return {
        "category": c.code,
        "category_name": c.name,
        "follow_up": c.follow_up,
        "explanation": " ".join(parts),
        "suspicious": suspicious,
        "benign": benign,
        "rule": rule,
    }


def build(
    file_name: str,
    probability: float | None,
    descriptors: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """The JSON report of one scan."""
    rep = {
        "file": file_name,
        "disclaimer": DISCLAIMER,
        "malignancy_probability": None if probability is None else float(probability),
        **suggest(probability, descriptors),
        "descriptors": dict(descriptors),
    }
    if extra:
        rep.update(extra)
    return rep


# --- HTML --------------------------------------------------------------------------


def png_data_uri(rgb: np.ndarray) -> str:
    """A ``data:`` URI of an ``[H, W]`` or ``[H, W, 3]`` uint8 array as PNG."""
    buf = _io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def overlay_contour(image: np.ndarray, mask: np.ndarray, color=(255, 60, 60)) -> np.ndarray:
    """``[H, W]`` uint8 scan with the mask's boundary drawn in ``color`` -> ``[H, W, 3]``."""
    from scipy import ndimage

    rgb = np.repeat(np.asarray(image, np.uint8)[..., None], 3, axis=-1)
    m = np.asarray(mask, bool)
    edge = m & ~ndimage.binary_erosion(m, iterations=max(1, min(m.shape) // 200))
    rgb[edge] = color
    return rgb


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``[H, W]`` uint8 scan blended with a jet-coloured ``[H, W]`` heatmap in [0, 1]."""
    from matplotlib import colormaps

    base = np.repeat(np.asarray(image, np.float32)[..., None], 3, axis=-1) / 255.0
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    return np.clip(255 * ((1 - alpha) * base + alpha * colour), 0, 255).astype(np.uint8)


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;color:#222}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em;border-radius:6px}
.imgs{display:flex;gap:12px;flex-wrap:wrap}.imgs figure{margin:0}
.imgs img{max-width:340px;border:1px solid #ccc}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.cat{font-size:1.6em;font-weight:bold}.bar{background:#eee;width:300px;height:14px}
.bar div{background:#c0392b;height:14px}
"""


def render_html(rep: Mapping[str, Any], images: Sequence[tuple[str, str]]) -> str:
    """One scan's page.

    Args:
      rep: the JSON report of :func:`build`.
      images: ``(caption, src)`` pairs (data URIs or relative paths).
    """
    e = html.escape
    p = rep.get("malignancy_probability")
    prob = "n/a" if p is None else f"{p:.1%}"
    width = 0 if p is None else int(round(100 * p))
    rows = "".join(
        f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>"
        for k, v in rep["descriptors"].items()
        if k not in ("notes",)
    )
    figs = "".join(
        f'<figure><img src="{e(src)}" alt="{e(cap)}"><figcaption>{e(cap)}</figcaption></figure>'
        for cap, src in images
    )
    notes = "".join(f"<li>{e(str(n))}</li>" for n in rep["descriptors"].get("notes") or [])
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>{e(rep["file"])} - busi-jax research report</title><style>{_STYLE}</style></head><body>
<p class="warn"><b>Research use only.</b> {e(rep["disclaimer"])}</p>
<h1>{e(rep["file"])}</h1>
<div class="imgs">{figs}</div>
<h2>Model output</h2>
<p>Malignancy probability: <b>{prob}</b></p><div class="bar"><div style="width:{width}%"></div></div>
<p>Suggested BI-RADS-style category (research suggestion, not an assessment):
<span class="cat">{e(rep["category"])}</span> ({e(rep["category_name"])})</p>
<p>{e(rep["explanation"])}</p>
<p><i>{e(rep["follow_up"])}</i></p>
<p><small>Rule: {e(rep["rule"])}</small></p>
<h2>Descriptors</h2><table>{rows}</table>
{f"<h3>Notes</h3><ul>{notes}</ul>" if notes else ""}
</body></html>
"""


def render_index(entries: Sequence[Mapping[str, Any]]) -> str:
    """The folder's index page: one row per scan with a thumbnail and its category.

    Args:
      entries: dicts with ``file``, ``html`` (relative link), ``thumb`` (src),
        ``category``, ``malignancy_probability``.
    """
    e = html.escape
    rows = "".join(_index_row(r) for r in entries)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>busi-jax research reports</title>
<style>{_STYLE}</style></head><body>
<p class="warn"><b>Research use only.</b> {e(DISCLAIMER)}</p>
<h1>Scans</h1><table><tr><th></th><th>file</th><th>suggested category</th><th>malignancy probability</th></tr>
{rows}</table></body></html>
"""


def _index_row(r: Mapping[str, Any]) -> str:
    e = html.escape
    p = r["malignancy_probability"]
    prob = "n/a" if p is None else f"{p:.1%}"
    link, thumb = e(r["html"]), e(r["thumb"])
    return (
        f'<tr><td><a href="{link}"><img src="{thumb}" width="96"></a></td>'
        f'<td><a href="{link}">{e(r["file"])}</a></td><td>{e(r["category"])}</td><td>{prob}</td></tr>'
    )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return "n/a" if v is None else str(v)
