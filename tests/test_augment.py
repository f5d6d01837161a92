"""Tests for busi_jax.augment (small shapes: the CI machine has 2 CPU cores)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from busi_jax import augment
from busi_jax.augment import AugmentConfig, augment_batch, compose_affine, sample_affine, warp


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    """Compiles with fewer XLA optimisations: the tests are compile-bound.

    Roughly halves this file's CPU time on the 2-core CI machine; the value
    is restored afterwards so other test modules are unaffected.
    """
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# Every augmentation switched off, but the master switch on: exercises the
# "all ranges zero" path rather than the "enabled=False" shortcut.
ZERO = AugmentConfig(
    hflip_prob=0.0,
    vflip_prob=0.0,
    rotation_deg=0.0,
    scale_range=(1.0, 1.0),
    translate_frac=0.0,
    shear_deg=0.0,
    brightness_delta=0.0,
    contrast_range=(1.0, 1.0),
    gamma_range=(1.0, 1.0),
    speckle_sigma=0.0,
)
# Strong geometry, no intensity changes.
GEOMETRY = dataclasses.replace(
    ZERO,
    hflip_prob=0.5,
    vflip_prob=0.5,
    rotation_deg=30.0,
    scale_range=(0.8, 1.25),
    translate_frac=0.05,
    shear_deg=8.0,
)
# Strong everything.
STRONG = dataclasses.replace(
    GEOMETRY,
    brightness_delta=0.3,
    contrast_range=(0.5, 1.5),
    gamma_range=(0.5, 2.0),
    speckle_sigma=0.5,
)


def _random_batch(seed=0, batch=4, size=32):
    k1, k2 = jax.random.split(jax.random.key(seed))
    scans = jax.random.uniform(k1, (batch, size, size, 1), jnp.float32)
    masks = (jax.random.uniform(k2, (batch, size, size, 1)) > 0.5).astype(jnp.float32)
    return scans, masks


def _batched(matrix, batch):
    return jnp.broadcast_to(matrix, (batch, 3, 3))


# --------------------------------------------------------------------------
# Exact transforms.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 1])
def test_identity_warp_is_exact(order):
    scans, masks = _random_batch()
    eye = compose_affine(32, 32)
    np.testing.assert_array_equal(eye, np.eye(3, dtype=np.float32))
    np.testing.assert_array_equal(warp(scans, _batched(eye, 4), order), scans)
    np.testing.assert_array_equal(warp(masks, _batched(eye, 4), order), masks)


def test_zero_config_and_disabled_are_identity():
    scans, masks = _random_batch()
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        sample_affine(key, 4, 32, 32, ZERO), np.broadcast_to(np.eye(3), (4, 3, 3))
    )
    assert ZERO.geometric_identity and ZERO.intensity_identity
    for cfg in (ZERO, AugmentConfig(enabled=False), dataclasses.replace(STRONG, enabled=False)):
        out_scans, out_masks = augment_batch(key, scans, masks, cfg)
        np.testing.assert_array_equal(out_scans, scans)
        np.testing.assert_array_equal(out_masks, masks)


@pytest.mark.parametrize("flip, axis", [("hflip", 2), ("vflip", 1)])
def test_flip_matches_jnp_flip(flip, axis):
    # Non-square so that swapping H and W in the maths would be caught.
    scans = jax.random.uniform(jax.random.key(1), (2, 24, 40, 1))
    matrix = _batched(compose_affine(24, 40, **{flip: True}), 2)
    np.testing.assert_array_equal(warp(scans, matrix), jnp.flip(scans, axis))

    # Same through the random path: probability 1, all else off.
    cfg = dataclasses.replace(ZERO, **{f"{flip}_prob": 1.0})
    masks = (scans > 0.5).astype(jnp.float32)
    out_scans, out_masks = augment_batch(jax.random.key(0), scans, masks, cfg)
    np.testing.assert_array_equal(out_scans, jnp.flip(scans, axis))
    np.testing.assert_array_equal(out_masks, jnp.flip(masks, axis))


@pytest.mark.parametrize("angle, k", [(90.0, 1), (180.0, 2), (-90.0, -1)])
def test_rotation_matches_rot90(angle, k):
    scans = jax.random.uniform(jax.random.key(2), (2, 32, 32, 1))
    out = warp(scans, _batched(compose_affine(32, 32, angle_deg=angle), 2))
    expected = jnp.rot90(scans, k, axes=(1, 2))
    # cos(pi/2) is not exactly 0 in float32; the residual sub-pixel offset
    # only matters where a tap falls off the border.
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-4)
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_warp_matches_map_coordinates():
    """Cross-checks the gather-based bilinear sampler against jax.scipy."""
    scans = jax.random.uniform(jax.random.key(4), (3, 20, 28, 2))
    matrices = sample_affine(jax.random.key(5), 3, 20, 28, STRONG)
    out = warp(scans, matrices, order=1)
    inverse = np.linalg.inv(np.asarray(matrices, np.float64))
    ys, xs = np.meshgrid(np.arange(20), np.arange(28), indexing="ij")
    for b in range(3):
        x = inverse[b, 0, 0] * xs + inverse[b, 0, 1] * ys + inverse[b, 0, 2]
        y = inverse[b, 1, 0] * xs + inverse[b, 1, 1] * ys + inverse[b, 1, 2]
        for c in range(2):
            ref = jax.scipy.ndimage.map_coordinates(
                scans[b, :, :, c],
                [jnp.asarray(y, jnp.float32), jnp.asarray(x, jnp.float32)],
                order=1,
                mode="constant",
                cval=0.0,
            )
            np.testing.assert_allclose(out[b, :, :, c], ref, atol=1e-5)


# --------------------------------------------------------------------------
# Scan/mask alignment and the coordinate convention.
# --------------------------------------------------------------------------


def _centroid(region):
    ys, xs = np.nonzero(region)
    return np.array([xs.mean(), ys.mean()])


def test_random_affine_keeps_scan_and_mask_aligned():
    size, batch = 96, 8
    # Off-centre disk: bright in the scan (0.85 on 0.15), 1 in the mask.
    centre = np.array([60.0, 36.0])  # (x, y)
    ys, xs = np.mgrid[:size, :size]
    disk = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= 10.0**2
    scan = np.where(disk, 0.85, 0.15).astype(np.float32)
    scans = jnp.broadcast_to(jnp.asarray(scan)[None, :, :, None], (batch, size, size, 1))
    masks = jnp.broadcast_to(jnp.asarray(disk, jnp.float32)[None, :, :, None], scans.shape)
    centre0 = _centroid(disk)

    key = jax.random.key(7)
    out_scans, out_masks = augment_batch(key, scans, masks, GEOMETRY)
    # augment_batch splits its key as (geometry, intensity).
    matrices = np.asarray(sample_affine(jax.random.split(key)[0], batch, size, size, GEOMETRY))
    assert len({m.tobytes() for m in matrices}) == batch

    for b in range(batch):
        mask = np.asarray(out_masks[b, :, :, 0]) > 0.5
        bright = np.asarray(out_scans[b, :, :, 0]) > 0.5
        assert mask.sum() > 100
        # The disk stays fully inside the frame for these ranges.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        iou = (mask & bright).sum() / (mask | bright).sum()
        assert iou > 0.95, (b, iou)
        np.testing.assert_allclose(_centroid(mask), _centroid(bright), atol=1.0)
        # Convention: content at p moves to M @ p (forward matrices).
        predicted = (matrices[b] @ np.array([*centre0, 1.0]))[:2]
        np.testing.assert_allclose(_centroid(mask), predicted, atol=1.0)
        # Zoom scales the area by |det|.
        area = disk.sum() * abs(np.linalg.det(matrices[b, :2, :2]))
        assert abs(mask.sum() - area) < 0.06 * area


def test_intensity_changes_scan_only():
    scans, masks = _random_batch(batch=4, size=32)
    key = jax.random.key(11)
    geo_scans, geo_masks = augment_batch(key, scans, masks, GEOMETRY)
    all_scans, all_masks = augment_batch(key, scans, masks, STRONG)
    # Same key -> same geometry whatever the intensity settings.
    np.testing.assert_array_equal(all_masks, geo_masks)
    assert not np.allclose(all_scans, geo_scans)

    intensity_only = dataclasses.replace(
        STRONG,
        hflip_prob=0.0,
        vflip_prob=0.0,
        rotation_deg=0.0,
        scale_range=(1.0, 1.0),
        translate_frac=0.0,
        shear_deg=0.0,
    )
    out_scans, out_masks = augment_batch(key, scans, masks, intensity_only)
    np.testing.assert_array_equal(out_masks, masks)
    assert not np.allclose(out_scans, scans)


def test_speckle_preserves_mean_brightness():
    # Dark enough that clipping at 1 is negligible; without the -s^2/2
    # correction the mean would rise by ~6 %.
    cfg = dataclasses.replace(ZERO, speckle_sigma=0.6)
    flat = jnp.full((4, 64, 64, 1), 0.1, jnp.float32)
    out = augment.intensity_augment(jax.random.key(0), flat, cfg)
    assert float(jnp.std(out)) > 0.01  # Noise was added...
    assert abs(float(jnp.mean(out)) / 0.1 - 1.0) < 0.02  # ...with mean 1.


# --------------------------------------------------------------------------
# Randomness, ranges, batching, jit.
# --------------------------------------------------------------------------


def test_determinism():
    scans, masks = _random_batch()
    a = augment_batch(jax.random.key(5), scans, masks, STRONG)
    b = augment_batch(jax.random.key(5), scans, masks, STRONG)
    c = augment_batch(jax.random.key(6), scans, masks, STRONG)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_output_ranges_shapes_and_dtypes():
    scans, masks = _random_batch()
    out_scans, out_masks = augment_batch(jax.random.key(9), scans, masks, STRONG)
    assert out_scans.shape == scans.shape and out_scans.dtype == jnp.float32
    assert out_masks.shape == masks.shape and out_masks.dtype == jnp.float32
    assert float(out_scans.min()) >= 0.0 and float(out_scans.max()) <= 1.0
    assert set(np.unique(np.asarray(out_masks))) <= {0.0, 1.0}


def test_batch_samples_get_different_transforms():
    batch = 4  # Same shapes/config as other tests: reuses their compilation.
    scans, masks = _random_batch(batch=1)
    scans = jnp.repeat(scans, batch, axis=0)
    masks = jnp.repeat(masks, batch, axis=0)
    matrices = np.asarray(sample_affine(jax.random.key(0), batch, 32, 32, AugmentConfig()))
    assert len({m.tobytes() for m in matrices}) == batch
    out_scans, out_masks = augment_batch(jax.random.key(0), scans, masks, AugmentConfig())
    for i in range(batch):
        for j in range(i + 1, batch):
            assert not np.allclose(out_scans[i], out_scans[j]), (i, j)


def test_runs_under_outer_jit_and_config_is_hashable():
    scans, masks = _random_batch()
    cfg = AugmentConfig()
    step = jax.jit(lambda k, x, y: augment_batch(k, x, y, cfg))
    jitted = step(jax.random.key(1), scans, masks)
    direct = augment_batch(jax.random.key(1), scans, masks, cfg)
    for x, y in zip(jitted, direct):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # Equal configs (int vs float, list vs tuple) hash equal: no retrace.
    other = AugmentConfig.from_config({"rotation_deg": 15, "scale_range": [0.9, 1.1]})
    assert other == cfg and hash(other) == hash(cfg)


# --------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------


def test_from_config_accepts_configdict_and_dict():
    cd = ml_collections.ConfigDict(
        {"rotation_deg": 10.0, "scale_range": (0.8, 1.2), "vflip_prob": 0.25}
    )
    cfg = AugmentConfig.from_config(cd)
    assert cfg.rotation_deg == 10.0 and cfg.scale_range == (0.8, 1.2)
    assert cfg.vflip_prob == 0.25 and cfg.hflip_prob == 0.5  # default kept
    assert AugmentConfig.from_config({"enabled": False}).enabled is False
    assert AugmentConfig.from_config(None) == AugmentConfig()
    assert AugmentConfig.from_config(cfg) is cfg


@pytest.mark.parametrize(
    "field, value",
    [
        ("rotation_deg", -1.0),
        ("rotation_deg", 200.0),
        ("scale_range", (0.0, 1.1)),
        ("scale_range", (1.2, 0.9)),
        ("scale_range", (0.9,)),
        ("hflip_prob", 1.5),
        ("vflip_prob", -0.1),
        ("translate_frac", -0.1),
        ("shear_deg", 45.0),
        ("brightness_delta", -0.2),
        ("contrast_range", (-0.5, 1.0)),
        ("gamma_range", (0.0, 1.0)),
        ("speckle_sigma", -0.1),
        ("speckle_sigma", float("nan")),
        ("mask_blur_sigma", -1.0),
        ("mask_blur_sigma", 9.0),
        ("mask_level_range", (0.0, 0.5)),
        ("mask_level_range", (0.5, 1.0)),
        ("mask_level_range", (0.7, 0.3)),
        ("rotation_deg", "15"),
        ("enabled", 1),
    ],
)
def test_config_validation_names_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        AugmentConfig.from_config(ml_collections.ConfigDict({field: value}))


def test_unknown_config_key_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="rotation_degs"):
        AugmentConfig.from_config({"rotation_degs": 10.0})
    scans, masks = _random_batch()
    with pytest.raises(ValueError, match="order"):
        warp(scans, _batched(jnp.eye(3), 4), order=3)
    with pytest.raises(ValueError, match="matrices"):
        warp(scans, jnp.eye(3)[None], order=1)
    with pytest.raises(ValueError, match="same B, H, W"):
        augment_batch(jax.random.key(0), scans, masks[:, :16])


def _disc(radius, size=64, spikes=False):
    yy, xx = np.mgrid[:size, :size] - size // 2
    m = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    if spikes:  # 1-px spicules, the fine margin detail a segmenter rounds off.
        m[size // 2, size // 2 : size // 2 + radius + 8] = 1.0
        m[size // 2 - radius - 8 : size // 2, size // 2] = 1.0
    return m[None, :, :, None]


def test_mask_noise_off_by_default_and_leaves_the_scan_alone():
    scans, masks = _random_batch()
    cfg = AugmentConfig()
    assert cfg.mask_identity
    key = jax.random.key(3)
    noisy = dataclasses.replace(cfg, mask_blur_sigma=2.0, mask_level_range=(0.3, 0.7))
    s0, m0 = augment_batch(key, scans, masks, cfg)
    s1, m1 = augment_batch(key, scans, masks, noisy)
    # Same key: the same geometry and intensity draws; only the mask differs.
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(s1))
    assert not np.array_equal(np.asarray(m0), np.asarray(m1))
    assert set(np.unique(np.asarray(m1))) <= {0.0, 1.0}
    assert m1.shape == masks.shape and m1.dtype == masks.dtype


def test_mask_noise_level_grows_or_shrinks_and_blur_removes_spicules():
    disc = jnp.asarray(np.concatenate([_disc(16)] * 4))
    area = float(disc[0].sum())

    def areas(level, sigma=3.0):
        cfg = AugmentConfig(mask_blur_sigma=sigma, mask_level_range=(level, level))
        return np.asarray(augment.perturb_masks(jax.random.key(0), disc, cfg).sum((1, 2, 3)))

    assert (areas(0.2) >= area).all() and (areas(0.2) > area).any()
    assert (areas(0.8) <= area).all() and (areas(0.8) < area).any()
    spiky = jnp.asarray(_disc(16, spikes=True))
    cfg = AugmentConfig(mask_blur_sigma=4.0, mask_level_range=(0.5, 0.5))
    # Each key draws its own sigma in [0, 4]; eight keys all but surely draw one
    # wide enough (about 0.5 px suffices) to erase a 1-px spicule at level 0.5.
    outs = [augment.perturb_masks(jax.random.key(k), spiky, cfg) for k in range(8)]
    smooth = [np.asarray(o[0, :, :, 0]) for o in outs]
    assert any(s.sum() < _disc(16).sum() + 2 for s in smooth)
    assert all(s[32, 32] == 1.0 for s in smooth)


def test_mask_noise_is_refused_for_segmentation(tiny_config, tmp_path):
    from busi_jax import train

    tiny_config.augment.mask_blur_sigma = 2.0
    with pytest.raises(
        train.ConfigError, match="config.augment.mask_blur_sigma.*only a classifier"
    ):
        train.train_and_evaluate(tiny_config, tmp_path)


def test_mask_noise_is_accepted_for_a_classifier():
    from busi_jax import train
    from configs import classifier

    config = classifier.get_config()
    config.augment.mask_blur_sigma = 2.0
    config.augment.mask_level_range = (0.3, 0.7)
    train.validate_config(config)  # No error: the mask is the classifier's input.
