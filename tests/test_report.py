"""Guidance rules: categories from probability and descriptors, wording, disclaimer, HTML."""

import json

import numpy as np
import pytest

from busi_jax import report

BENIGN = {
    "has_lesion": True,
    "shape": "oval",
    "orientation": "parallel",
    "margin": "circumscribed",
    "posterior": "enhancement",
}
SUSPICIOUS = {
    "has_lesion": True,
    "shape": "irregular",
    "orientation": "not_parallel",
    "margin": "not_circumscribed",
    "posterior": "shadowing",
}
MIXED = {
    "has_lesion": True,
    "shape": "oval",
    "orientation": "not_parallel",
    "margin": "circumscribed",
    "posterior": "none",
}


@pytest.mark.parametrize(
    "prob,desc,expected",
    [
        (0.01, MIXED, "3"),  # probability band only
        (0.05, MIXED, "4A"),
        (0.30, MIXED, "4B"),
        (0.70, MIXED, "4C"),
        (0.97, MIXED, "5"),
        (0.01, BENIGN, "2"),  # all benign features move 3 down to 2
        (0.05, BENIGN, "3"),
        (0.30, BENIGN, "4B"),  # no downgrade above 10%
        (0.05, SUSPICIOUS, "4B"),  # 4 suspicious features move 4A up
        (0.97, SUSPICIOUS, "5"),  # never above 5
    ],
)
def test_category_table(prob, desc, expected):
    assert report.suggest(prob, desc)["category"] == expected


def test_no_lesion_is_category_1_whatever_the_probability():
    out = report.suggest(0.9, {"has_lesion": False})
    assert out["category"] == "1" and "no lesion" in out["explanation"]


def test_explanation_names_the_descriptors_that_drove_it():
    out = report.suggest(0.05, SUSPICIOUS)
    for phrase in ("irregular shape", "posterior acoustic shadowing", "up one step"):
        assert phrase in out["explanation"] + out["rule"]
    assert "5%" in out["explanation"]


def test_every_report_carries_the_disclaimer_and_never_says_diagnosis():
    rep = report.build("a.png", 0.4, SUSPICIOUS)
    assert rep["disclaimer"] == report.DISCLAIMER
    assert "not a medical device" in rep["disclaimer"] and "not a diagnosis" in rep["disclaimer"]
    for c in report.CATEGORY_TABLE:
        assert "diagnos" not in c.follow_up.lower()
    json.dumps(rep)
    page = report.render_html(rep, [("scan", report.png_data_uri(np.zeros((8, 8), np.uint8)))])
    assert "Research use only" in page and "research suggestion, not an assessment" in page


def test_follow_up_differs_by_category():
    wordings = {c.code: c.follow_up for c in report.CATEGORY_TABLE}
    assert "6-month" in wordings["3"] and "sampling" in wordings["4B"]
    assert len(set(wordings.values())) >= 5


def test_overlays_have_image_shape():
    img = np.full((20, 30), 100, np.uint8)
    m = np.zeros((20, 30), bool)
    m[5:15, 10:20] = True
    c = report.overlay_contour(img, m)
    assert c.shape == (20, 30, 3) and (c[5, 12] == [255, 60, 60]).all() and (c[10, 15] == 100).all()
    h = report.overlay_heatmap(img, np.linspace(0, 1, 600).reshape(20, 30))
    assert h.shape == (20, 30, 3) and h.dtype == np.uint8
