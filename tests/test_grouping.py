"""Near-duplicate rule: finds re-saved scans, leaves distinct ones apart, resists chaining."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tfds_busi import grouping


def _tissue(seed, h=300, w=400):
    """A scan-like image: layered low-frequency structure plus speckle."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(1.0, 0.3, h)[:, None]
    layers = ndimage.gaussian_filter(rng.normal(size=(h, w)), (8, 30))
    speckle = ndimage.gaussian_filter(rng.rayleigh(size=(h, w)), 1.2)
    img = 120 * depth + 400 * layers + 60 * speckle
    return np.clip(img, 0, 255).astype(np.uint8)


def _crop_resize(img, frac_top, frac_left, frac_bottom, frac_right, scale):
    h, w = img.shape
    c = img[
        int(h * frac_top) : h - int(h * frac_bottom), int(w * frac_left) : w - int(w * frac_right)
    ]
    new = (int(c.shape[1] * scale), int(c.shape[0] * scale))
    return np.asarray(Image.fromarray(c).resize(new, Image.Resampling.BILINEAR))


def test_resaved_scans_group_and_distinct_scans_do_not():
    bases = [_tissue(s) for s in range(6)]
    copies = [
        _crop_resize(bases[0], 0.03, 0.0, 0.0, 0.04, 1.0),
        _crop_resize(bases[1], 0.0, 0.0, 0.0, 0.0, 0.8),
        _crop_resize(bases[2], 0.02, 0.02, 0.02, 0.02, 1.3),
    ]
    groups = grouping.find_groups(bases + copies)
    assert groups[6] == groups[0]
    assert groups[7] == groups[1]
    assert groups[8] == groups[2]
    assert len(set(groups[:6].tolist())) == 6, groups


def test_similarity_is_symmetric_and_bounded():
    fps = np.stack([grouping.fingerprint(_tissue(s, 120, 150)) for s in range(4)])
    sim = grouping.similarity_matrix(fps)
    np.testing.assert_allclose(sim, sim.T)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    assert sim.max() <= 1.0 + 1e-5 and sim.min() >= -1.0 - 1e-5
    assert sim[~np.eye(4, dtype=bool)].max() < grouping.DEFAULT_THRESHOLD


def test_blank_scan_matches_nothing():
    fps = np.stack(
        [
            grouping.fingerprint(np.zeros((50, 60), np.uint8)),
            grouping.fingerprint(_tissue(0, 120, 150)),
        ]
    )
    sim = grouping.similarity_matrix(fps)
    assert sim[0, 1] == 0.0


def test_average_linkage_does_not_chain():
    # A chain 0-1-2-...-9 where neighbours look alike (0.9) and all else does
    # not (0.1): connected components would glue all ten into one group.
    n = 10
    sim = np.full((n, n), 0.1)
    for i in range(n - 1):
        sim[i, i + 1] = sim[i + 1, i] = 0.9
    np.fill_diagonal(sim, 1.0)
    groups = grouping.group_ids(sim, 0.65)
    sizes = np.bincount(groups)
    assert sizes.max() <= 2, sizes
    # Neighbours still end up together where they pair up.
    assert len(sizes) == 5


def test_group_ids_numbered_by_first_member():
    sim = np.array([[1, 0, 0.9], [0, 1, 0], [0.9, 0, 1]], float)
    np.testing.assert_array_equal(grouping.group_ids(sim), [0, 1, 0])


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        grouping.group_ids(np.eye(2), 1.5)
