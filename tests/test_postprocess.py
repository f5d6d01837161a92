"""Post-processing operations, their selection on validation, and flip TTA (tiny arrays)."""

import numpy as np
import pytest

from busi_jax import postprocess as pp
from busi_jax.postprocess import PostprocessConfig


def _disk_mask(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_threshold_only_matches_training_rule_and_keeps_shape():
    prob = np.linspace(0, 1, 2 * 5 * 5).reshape(2, 5, 5, 1)
    out = pp.apply(prob, PostprocessConfig(threshold=0.5))
    assert out.shape == prob.shape and out.dtype == bool
    np.testing.assert_array_equal(out, prob >= 0.5)
    assert pp.apply(prob[0, ..., 0]).shape == (5, 5)


def test_largest_component_removes_a_speck():
    m = _disk_mask((32, 32), 12, 12, 6).astype(float)
    m[28, 28] = 1.0
    out = pp.apply(m, PostprocessConfig(largest_component=True))
    assert not out[28, 28]
    np.testing.assert_array_equal(out, _disk_mask((32, 32), 12, 12, 6))


def test_components_never_connect_across_scans():
    # Scan 0: big blob at the top-left; scan 1: small blob at the same place and
    # a bigger one elsewhere. Each scan keeps its own largest.
    stack = np.zeros((2, 20, 20))
    stack[0, 2:10, 2:10] = 1
    stack[1, 2:4, 2:4] = 1
    stack[1, 12:18, 12:18] = 1
    out = pp.apply(stack, PostprocessConfig(largest_component=True))
    assert out[0].sum() == 64
    assert out[1].sum() == 36 and not out[1, 2, 2]


def test_min_size_drops_small_components_and_can_empty_a_scan():
    stack = np.zeros((2, 20, 20))
    stack[0, 2:10, 2:10] = 1
    stack[0, 15, 15] = 1
    stack[1, 5:7, 5:7] = 1  # only a 4-px speck: a normal scan's false positive
    out = pp.apply(stack, PostprocessConfig(min_size=5))
    assert out[0].sum() == 64
    assert not out[1].any()


def test_fill_holes_fills_a_ring_even_in_a_stack():
    ring = _disk_mask((24, 24), 12, 12, 8) & ~_disk_mask((24, 24), 12, 12, 4)
    stack = np.stack([ring, np.zeros_like(ring)]).astype(float)
    out = pp.apply(stack, PostprocessConfig(fill_holes=True))
    np.testing.assert_array_equal(out[0], _disk_mask((24, 24), 12, 12, 8))
    assert not out[1].any()
    # A notch open to the image edge is not a hole.
    cup = np.zeros((10, 10))
    cup[2:8, 2:8] = 1
    cup[0:6, 4:6] = 0
    np.testing.assert_array_equal(pp.apply(cup, PostprocessConfig(fill_holes=True)), cup > 0)


def test_opening_removes_a_thin_line_but_keeps_the_blob():
    blob = _disk_mask((32, 32), 16, 10, 6)
    m = blob.copy()
    m[16, 16:31] = True  # 1-px strand off the blob
    out = pp.apply(m.astype(float), PostprocessConfig(opening=1))
    assert not out[16, 20:31].any()
    assert out[blob].mean() > 0.95


def test_opening_and_closing_do_not_erode_from_the_image_edge():
    m = np.zeros((16, 16))
    m[:, :8] = 1  # a region running off the left, top and bottom edges
    for cfg in (PostprocessConfig(opening=2), PostprocessConfig(closing=2)):
        np.testing.assert_array_equal(pp.apply(m, cfg), m > 0)


def test_closing_bridges_a_gap():
    m = np.zeros((20, 20))
    m[5:15, 3:9] = 1
    m[5:15, 10:16] = 1  # 1-px gap at column 9
    out = pp.apply(m, PostprocessConfig(closing=1))
    # The disk-1 (cross) closing fills the gap except its two end pixels.
    assert out[6:14, 9].all()
    assert not pp.apply(m, PostprocessConfig())[6:14, 9].any()


def _validation_with_specks(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    probs = np.zeros((n, size, size))
    truth = np.zeros((n, size, size), bool)
    for i in range(n):
        if i % 2 == 0:  # lesion scans
            les = _disk_mask((size, size), 14, 14, 6)
            truth[i] = les
            probs[i][les] = 0.9
        # a 2x2 false-positive speck on every scan, normal ones included
        y, x = rng.integers(26, 30, 2)
        probs[i, y : y + 2, x : x + 2] = 0.8
    return probs, truth


def test_choose_on_validation_picks_largest_component_for_specks():
    probs, truth = _validation_with_specks()
    grid = {"threshold": (0.5,), "opening": (0,), "closing": (0,), "fill_holes": (False, True)}
    cfg, rows = pp.choose_on_validation(probs, truth, grid=grid)
    assert cfg.largest_component
    assert not cfg.fill_holes  # no holes here: filling does not help, so it is left off
    assert len(rows) == 4
    assert max(s for _, s in rows) == pytest.approx(dict(rows)[cfg])


def test_choose_on_validation_rejects_largest_component_when_it_hurts():
    # Two true lesions per lesion scan: keeping the largest loses the other.
    size = 32
    probs = np.zeros((4, size, size))
    truth = np.zeros((4, size, size), bool)
    for i in range(0, 4, 2):
        truth[i] = _disk_mask((size, size), 8, 8, 5) | _disk_mask((size, size), 22, 22, 4)
        probs[i][truth[i]] = 0.9
    grid = {"threshold": (0.5,), "opening": (0,), "closing": (0,), "fill_holes": (False,)}
    cfg, rows = pp.choose_on_validation(probs, truth, grid=grid)
    assert cfg == PostprocessConfig(threshold=0.5)
    scores = dict(rows)
    assert scores[PostprocessConfig(threshold=0.5, largest_component=True)] < scores[cfg]


def test_choose_on_validation_ties_go_to_the_simpler_config():
    # Perfect predictions: every config scores 1, so the bare threshold wins.
    truth = np.zeros((2, 16, 16), bool)
    truth[0, 4:12, 4:12] = True
    probs = truth.astype(float)
    cfg, rows = pp.choose_on_validation(probs, truth)
    assert cfg == PostprocessConfig(threshold=0.5)
    assert len(rows) == 5 * 3 * 3 * 2 * 2


def test_choose_on_validation_rejects_unknown_grid_keys():
    with pytest.raises(ValueError, match="unknown grid keys"):
        pp.choose_on_validation(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), grid={"thresh": (0.5,)})


def test_tta_flip_average_exact_for_flip_equivariant_predictor():
    rng = np.random.default_rng(0)
    images = rng.random((3, 8, 10, 1)).astype(np.float32)

    def pointwise(x):  # acts per pixel, so flip-equivariant
        return 1 / (1 + np.exp(-3 * (x - 0.5)))

    np.testing.assert_array_equal(pp.tta_flip_average(pointwise, images), pointwise(images))

    def left_biased(x):  # cumulative along the width: not equivariant
        return np.cumsum(x, axis=2)

    expected = 0.5 * (left_biased(images) + left_biased(images[:, :, ::-1])[:, :, ::-1])
    out = pp.tta_flip_average(left_biased, images)
    np.testing.assert_allclose(out, expected)
    assert not np.allclose(out, left_biased(images))
