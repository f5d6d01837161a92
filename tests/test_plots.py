"""Every plot writes a readable, non-empty PNG atomically (no temp file left behind)."""

import json

import numpy as np
import pytest
from PIL import Image

from busi_jax import plots


def _check_png(path, out_dir):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"
    # Only the requested file: the temporary sibling was renamed or removed.
    assert sorted(p.name for p in out_dir.iterdir()) == [path.name]


@pytest.fixture
def cls_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    probs = np.clip(0.35 + 0.3 * labels + 0.2 * rng.normal(size=80), 0, 1)
    return probs, labels


def test_plot_curves_from_jsonl_and_records(tmp_path):
    records = [
        {
            "epoch": e,
            "step": 10 * e,
            "split": "validation",
            "train_loss": 1 / e,
            "lesion_dice": 0.5 + 0.05 * e,
            "dice_all": None if e == 2 else 0.6,
            "img_per_s": 9.0,
        }
        for e in range(1, 5)
    ]
    src = tmp_path / "src"
    src.mkdir()
    jsonl = src / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "a"
    out.mkdir()
    _check_png(plots.plot_curves(jsonl, out / "curves.png"), out)
    out2 = tmp_path / "b"
    out2.mkdir()
    _check_png(plots.plot_curves(records, out2 / "curves.png", keys=["lesion_dice"]), out2)


def test_plot_confusion_pixel_and_class(tmp_path):
    p = plots.plot_confusion(
        [[9_400_000, 45_000], [3_600, 346_000]],
        ["background", "lesion"],
        tmp_path / "px.png",
        "pixels",
    )
    _check_png(p, tmp_path)
    with pytest.raises(ValueError):
        plots.plot_confusion([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plot_confusion_with_an_empty_row(tmp_path):
    _check_png(
        plots.plot_confusion([[0, 0], [2, 5]], ["benign", "malignant"], tmp_path / "c.png"),
        tmp_path,
    )


def test_plot_metric_heatmap(tmp_path):
    table = {
        "benign": {"precision": 0.8, "recall": 0.9, "f1": 0.85},
        "malignant": {"precision": 0.7, "recall": None, "f1": float("nan")},
    }
    _check_png(plots.plot_metric_heatmap(table, tmp_path / "h.png", "per class"), tmp_path)


def test_plot_reliability(tmp_path, cls_data):
    _check_png(plots.plot_reliability(*cls_data, tmp_path / "r.png", n_bins=10), tmp_path)


def test_plot_roc_pr(tmp_path, cls_data):
    _check_png(plots.plot_roc_pr(*cls_data, tmp_path / "roc.png"), tmp_path)


def test_pick_cases_best_median_worst():
    scores = np.array([0.5, 0.9, np.nan, 0.1, 0.7, 0.3, 0.2])
    picked = plots.pick_cases(scores, 2)
    np.testing.assert_array_equal(picked["best"], [1, 4])
    np.testing.assert_array_equal(picked["worst"], [3, 6])
    # Ranked (desc) over the 6 finite scores: 1, 4, 0, 5, 6, 3 -> middle two: 0, 5.
    np.testing.assert_array_equal(picked["median"], [0, 5])
    assert all(len(v) == 1 for v in plots.pick_cases(scores, 1).values())
    assert len(plots.pick_cases(scores, 10)["best"]) == 6


def test_plot_contour_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 32, 32), dtype=np.uint8)
    yy, xx = np.mgrid[:32, :32]
    truth = np.stack([(yy - 16) ** 2 + (xx - 16) ** 2 < r * r for r in (4, 6, 8, 10, 0)])
    pred = np.roll(truth, 2, axis=2)
    pred[4, :4, :4] = True  # a prediction touching the image corner
    scores = [0.9, 0.8, np.nan, 0.5, 0.0]
    p = plots.plot_contour_grid(
        images, truth, pred, scores, [f"scan {i}" for i in range(5)], tmp_path / "g.png", ncols=3
    )
    _check_png(p, tmp_path)


def test_plot_heatmap_overlay(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (24, 24), dtype=np.uint8)
    heat = rng.random((24, 24))
    mask = np.zeros((24, 24), bool)
    mask[6:14, 6:14] = True
    _check_png(plots.plot_heatmap_overlay(image, heat, tmp_path / "o.png", contour=mask), tmp_path)


def test_plot_gradcam_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 24, 24), dtype=np.uint8)
    pred = np.zeros((3, 24, 24), bool)
    pred[:, 8:16, 8:16] = True
    cams = {"segmenter": rng.random((3, 24, 24)), "classifier": rng.random((3, 24, 24))}
    p = plots.plot_gradcam_grid(images, pred, cams, ["a", "b", "c"], tmp_path / "cam.png")
    _check_png(p, tmp_path)
    with pytest.raises(ValueError, match="classifier"):
        plots.plot_gradcam_grid(
            images, pred, {"classifier": np.zeros((3, 12, 12))}, None, tmp_path / "bad.png"
        )
    assert not (tmp_path / "bad.png").exists()


def test_overwrite_keeps_a_single_file(tmp_path, cls_data):
    target = tmp_path / "roc.png"
    plots.plot_roc_pr(*cls_data, target)
    _check_png(plots.plot_roc_pr(*cls_data, target), tmp_path)
