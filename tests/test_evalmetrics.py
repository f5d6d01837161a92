"""Known-answer tests for busi_jax.evalmetrics (small arrays: CI has 2 busy CPU cores)."""

import json
import time

import numpy as np
import pytest
from scipy import special

from busi_jax import evalmetrics as em
from busi_jax import metrics


def _square(shape, top, left, size):
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


# --- Segmentation ---------------------------------------------------------------


def test_per_scan_scores_hand_computed():
    # pred: 2x2 block; truth: 2x3 block containing it. TP 4, FP 0, FN 2, TN 10.
    pred = np.zeros((1, 4, 4), bool)
    pred[0, :2, :2] = True
    truth = np.zeros((1, 4, 4), bool)
    truth[0, :2, :3] = True
    s = em.segmentation_scores(pred, truth)
    assert (s["tp"][0], s["fp"][0], s["fn"][0], s["tn"][0]) == (4, 0, 2, 10)
    assert s["dice"][0] == pytest.approx(8 / 10)
    assert s["iou"][0] == pytest.approx(4 / 6)
    assert s["precision"][0] == pytest.approx(1.0)
    assert s["recall"][0] == pytest.approx(4 / 6)
    assert s["f1"][0] == pytest.approx(0.8)
    assert s["accuracy"][0] == pytest.approx(14 / 16)


def test_empty_mask_rule_and_agreement_with_jax_metrics():
    rng = np.random.default_rng(0)
    pred = rng.random((6, 8, 8, 1)) > 0.6
    truth = rng.random((6, 8, 8, 1)) > 0.6
    pred[0] = truth[0] = False  # both empty: 1
    truth[1] = False  # empty truth, non-empty prediction: 0
    pred[1, 0, 0] = True
    pred[2] = False  # empty prediction on a lesion: 0
    truth[2, 3, 3] = True
    s = em.segmentation_scores(pred, truth, with_hd95=False)
    assert s["dice"][0] == 1.0 and s["iou"][0] == 1.0
    assert s["dice"][1] == 0.0 and s["iou"][1] == 0.0
    assert s["dice"][2] == 0.0
    np.testing.assert_allclose(s["dice"], np.asarray(metrics.binary_dice(pred, truth)), atol=1e-6)
    np.testing.assert_allclose(s["iou"], np.asarray(metrics.binary_iou(pred, truth)), atol=1e-6)
    np.testing.assert_allclose(em.dice_per_scan(pred, truth), s["dice"])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hd95_of_offset_squares_is_the_offset(k):
    a = _square((48, 48), 10, 10, 20)
    b = _square((48, 48), 10, 10 + k, 20)
    assert em.hd95(a, b) == pytest.approx(k)
    assert em.hd95(b, a) == pytest.approx(k)
    assert em.hd95(a, a) == 0.0
    # Spacing scales distances: k columns of 0.5 units.
    assert em.hd95(a, b, spacing=(1.0, 0.5)) == pytest.approx(0.5 * k)


def test_hd95_nan_when_a_mask_is_empty():
    a = _square((16, 16), 2, 2, 5)
    empty = np.zeros_like(a)
    assert np.isnan(em.hd95(a, empty))
    assert np.isnan(em.hd95(empty, a))
    assert np.isnan(em.hd95(empty, empty))


def test_segmentation_report_lesion_vs_all_and_micro_pixels():
    truth = np.zeros((3, 10, 10), bool)
    pred = np.zeros((3, 10, 10), bool)
    truth[0, 2:6, 2:6] = True  # 16 px
    pred[0, 2:6, 2:4] = True  # 8 px inside: Dice 2*8/24
    truth[1, 0:2, 0:2] = True  # 4 px, perfectly predicted
    pred[1, 0:2, 0:2] = True
    pred[2, 9, 9] = True  # normal scan with a 1-px false positive
    r = em.segmentation_report(pred, truth, n_boot=200, seed=1)
    d0 = 16 / 24
    assert r["lesion_dice"]["mean"] == pytest.approx((d0 + 1) / 2)
    assert r["dice_all"]["mean"] == pytest.approx((d0 + 1 + 0) / 3)
    tp, fp, fn = 12, 1, 8
    assert r["pixel_precision"]["mean"] == pytest.approx(tp / (tp + fp))
    assert r["pixel_recall"]["mean"] == pytest.approx(tp / (tp + fn))
    assert r["pixel_f1"]["mean"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert r["pixel_accuracy"]["mean"] == pytest.approx(1 - (fp + fn) / 300)
    assert r["pixel_confusion"] == [[300 - tp - fp - fn, fp], [fn, tp]]
    assert r["n_scans"] == 3 and r["n_lesion_scans"] == 2 and r["n_hd95_undefined"] == 0
    assert r["hd95"]["mean"] == pytest.approx(np.mean([em.hd95(pred[0], truth[0]), 0.0]))
    for key in ("lesion_dice", "dice_all", "pixel_f1", "hd95"):
        lo, hi = r[key]["ci95"]
        assert lo <= r[key]["mean"] <= hi
    # JSON-ready after to_jsonable (the per-scan arrays included).
    json.dumps(em.to_jsonable(r), allow_nan=False)


def test_segmentation_bootstrap_is_vectorised_fast():
    rng = np.random.default_rng(0)
    truth = np.zeros((150, 16, 16), bool)
    truth[:100, 4:10, 4:10] = True
    pred = truth ^ (rng.random(truth.shape) > 0.95)
    t0 = time.perf_counter()
    em.segmentation_report(pred, truth, n_boot=1000, seed=0)
    assert time.perf_counter() - t0 < 2.0  # generous: the CPU is shared with training


# --- Bootstrap ------------------------------------------------------------------


def test_bootstrap_ci_contains_mean_shrinks_and_is_seeded():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=40), rng.normal(size=4000)
    a = em.bootstrap_ci(small, n_boot=500, seed=3)
    assert a["ci95"][0] <= a["mean"] <= a["ci95"][1]
    assert a["mean"] == pytest.approx(small.mean())
    b = em.bootstrap_ci(large, n_boot=500, seed=3)

    def width(r):
        return r["ci95"][1] - r["ci95"][0]

    assert width(b) < width(a) / 4  # ~1/sqrt(100) in theory
    assert em.bootstrap_ci(small, n_boot=500, seed=3) == a
    assert em.bootstrap_ci(small, n_boot=500, seed=4) != a


def test_stratified_indices_keep_class_counts():
    strata = np.array([0] * 7 + [1] * 3)
    idx = em.bootstrap_indices(10, 50, seed=0, strata=strata)
    assert idx.shape == (50, 10)
    np.testing.assert_array_equal((strata[idx] == 1).sum(1), 3)


# --- Binary classification ----------------------------------------------------------


def test_auc_perfect_and_reversed():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert em.classification_report(probs, labels, n_boot=50)["auc"]["mean"] == 1.0
    assert em.classification_report(1 - probs, labels, n_boot=50)["auc"]["mean"] == 0.0


def test_confusion_and_threshold_metrics_hand_computed():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.6, 0.7, 0.4, 0.8, 0.9])
    # threshold 0.5: TN 2, FP 2, FN 1, TP 2.
    r = em.classification_report(probs, labels, threshold=0.5, n_boot=100)
    assert r["confusion"] == [[2, 2], [1, 2]]
    assert r["accuracy"]["mean"] == pytest.approx(4 / 7)
    assert r["precision"]["mean"] == pytest.approx(2 / 4)
    assert r["recall"]["mean"] == pytest.approx(2 / 3)
    assert r["sensitivity"]["mean"] == pytest.approx(2 / 3)
    assert r["specificity"]["mean"] == pytest.approx(2 / 4)
    assert r["f1"]["mean"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert r["brier"]["mean"] == pytest.approx(np.mean((probs - labels) ** 2))
    assert r["auc"]["mean"] == pytest.approx(metrics.roc_auc(probs, labels))
    json.dumps(em.to_jsonable(r), allow_nan=False)


def test_roc_curve_area_matches_roc_auc_with_ties():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    probs = np.round(rng.random(60) * 0.5 + 0.3 * labels, 1)  # many ties
    roc = em.roc_curve(probs, labels)
    area = np.sum(np.diff(roc["fpr"]) * (roc["tpr"][1:] + roc["tpr"][:-1]) / 2)
    assert area == pytest.approx(metrics.roc_auc(probs, labels))
    assert roc["fpr"][-1] == 1.0 and roc["tpr"][-1] == 1.0
    pr = em.pr_curve(probs, labels)
    assert pr["recall"][-1] == 1.0 and pr["precision"][-1] == pytest.approx(labels.mean())


def test_ece_small_when_calibrated_large_when_overconfident():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert em.expected_calibration_error(p, y) < 0.02
    over = special.expit(4 * special.logit(np.clip(p, 1e-6, 1 - 1e-6)))
    assert em.expected_calibration_error(over, y) > 0.1
    # The vectorised bootstrap statistic agrees with the reference function.
    r = em.classification_report(over[:500], y[:500], n_boot=20)
    assert r["ece"]["mean"] == pytest.approx(em.expected_calibration_error(over[:500], y[:500]))


def test_ece_hand_computed_two_bins():
    # Bin [0.2, 0.3): probs 0.2 x3, labels 1, 0, 0 -> |0.2 - 1/3|, weight 3/5.
    # Bin [0.9, 1.0] (closed, so 1.0 belongs): probs 1.0, 0.9, labels 1, 1 -> |0.95 - 1|, 2/5.
    # Unequal weights: an unweighted mean over bins would give 0.0917, not 0.1.
    probs = np.array([0.2, 0.2, 0.2, 1.0, 0.9])
    labels = np.array([1, 0, 0, 1, 1])
    expected = 0.6 * (1 / 3 - 0.2) + 0.4 * 0.05
    assert em.expected_calibration_error(probs, labels) == pytest.approx(expected)
    rel = em.reliability_bins(probs, labels)
    assert rel["count"][2] == 3 and rel["count"][9] == 2 and rel["count"].sum() == 5


def test_classification_bootstrap_is_stratified_and_seeded(monkeypatch):
    seen = []
    real = em.bootstrap_indices

    def spy(n, n_boot, seed=0, strata=None):
        seen.append(strata)
        return real(n, n_boot, seed, strata)

    monkeypatch.setattr(em, "bootstrap_indices", spy)
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(45), np.ones(5)].astype(int)  # few positives: plain bootstrap would
    probs = np.clip(0.3 + 0.4 * labels + 0.2 * rng.normal(size=50), 0, 1)  # draw none sometimes
    a = em.classification_report(probs, labels, n_boot=300, seed=7)
    assert np.isfinite(a["auc"]["ci95"]).all()
    assert a["auc"]["ci95"][0] <= a["auc"]["mean"] <= a["auc"]["ci95"][1]
    assert em.classification_report(probs, labels, n_boot=300, seed=7)["auc"] == a["auc"]
    assert seen and all(np.array_equal(s, labels) for s in seen)


# --- Multi-class ----------------------------------------------------------------------


def test_multiclass_report_hand_computed():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    r = em.multiclass_report(
        probs, labels, class_names=["normal", "benign", "malignant"], n_boot=50
    )
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r["accuracy"]["mean"] == pytest.approx(4 / 6)
    assert r["per_class"]["benign"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["benign"]["recall"] == pytest.approx(1.0)
    assert r["per_class"]["malignant"]["f1"] == pytest.approx(2 / 3)
    f1 = [0.5, 0.8, 2 / 3]
    assert r["macro_f1"]["mean"] == pytest.approx(np.mean(f1))
    assert r["per_class"]["benign"]["auc_ovr"] == pytest.approx(
        metrics.roc_auc(probs[:, 1], labels == 1)
    )
    json.dumps(em.to_jsonable(r), allow_nan=False)


# --- Temperature scaling ---------------------------------------------------------


def test_temperature_scaling_recovers_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=20000)
    labels = (rng.random(20000) < special.expit(true_logits)).astype(int)
    t = em.temperature_scale(2.0 * true_logits, labels)  # over-confident by 2x
    assert t == pytest.approx(2.0, rel=0.08)
    np.testing.assert_allclose(
        em.apply_temperature(2.0 * true_logits, t), special.expit(2.0 * true_logits / t)
    )
    # Already calibrated: T ~ 1.
    assert em.temperature_scale(true_logits, labels) == pytest.approx(1.0, rel=0.08)


def test_temperature_scaling_multiclass():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(scale=2.0, size=(6000, 3))
    p = special.softmax(true_logits, axis=1)
    labels = (rng.random((6000, 1)) > np.cumsum(p, axis=1)).sum(1)
    t = em.temperature_scale(0.5 * true_logits, labels)  # under-confident: T ~ 0.5
    assert t == pytest.approx(0.5, rel=0.1)
    np.testing.assert_allclose(em.apply_temperature(true_logits, 1.0).sum(1), 1.0)
