"""Tests of the synthetic BUSI-layout generator (busi_jax/synthetic.py).

Besides the folder contract (layout, determinism, truth.json), these check that
the physics the generator claims is measurable on the rendered pixels:
hypoechoic lesions, posterior enhancement/shadowing, orientation, speckle and
depth attenuation.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from busi_jax import synthetic

SMALL = ((120, 150), (150, 190))
LESION_KEYS = (
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
FILE_KEYS = (
    "label",
    "true_label",
    "image",
    "masks",
    "num_mask_files",
    "height",
    "width",
    "pixel_spacing_mm",
    "frequency_mhz",
    "dynamic_range_db",
    "gain_db",
    "tgc_compensation",
    "layers",
    "duplicate_of",
    "duplicate_transform",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("synthetic") / "busi"
    return synthetic.generate(
        out,
        num_normal=6,
        num_benign=12,
        num_malignant=12,
        seed=3,
        size_range=SMALL,
        duplicate_fraction=0.25,
        cross_label_duplicate_fraction=0.5,
        multi_mask_fraction=0.25,
    )


def _read(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L", path
        return np.asarray(im)


def _scans(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.glob("*/*.png") if "_mask" not in p.stem)


def _union(root: pathlib.Path, rec: dict) -> np.ndarray:
    return np.logical_or.reduce([_read(root / m) > 0 for m in rec["masks"]])


# --- Folder contract -------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(
        num_normal=1,
        num_benign=3,
        num_malignant=3,
        size_range=SMALL,
        duplicate_fraction=0.5,
        multi_mask_fraction=0.5,
    )
    a = synthetic.generate(tmp_path / "a", seed=11, **kw)
    b = synthetic.generate(tmp_path / "b", seed=11, **kw)
    c = synthetic.generate(tmp_path / "c", seed=12, **kw)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    same_name = [
        rel
        for rel in files_a
        if rel.suffix == ".png" and "_mask" not in rel.stem and (c / rel).exists()
    ]
    assert same_name
    for rel in same_name:
        assert (a / rel).read_bytes() != (c / rel).read_bytes(), rel


def test_layout(dataset):
    scans = _scans(dataset)
    assert {p.parent.name for p in scans} == {"benign", "malignant", "normal"}
    # 30 rendered + round(0.25 * n) duplicates per class (3 + 3 + 2).
    assert len(scans) == 38
    all_files = {p for p in dataset.rglob("*") if p.is_file()}
    assert not [p for p in all_files if p.name.startswith(".")], "temp left"
    seen_masks = set()
    for scan in scans:
        image = _read(scan)
        h, w = image.shape
        assert 100 <= h <= 200 and 120 <= w <= 240
        assert image.std() > 10  # not blank
        masks = sorted(scan.parent.glob(f"{scan.stem}_mask*.png"))
        assert masks and masks[0].name == f"{scan.stem}_mask.png"
        union = np.zeros((h, w), bool)
        for m in masks:
            arr = _read(m)
            assert arr.shape == (h, w)
            assert set(np.unique(arr)) <= {0, 255}
            union |= arr > 0
            seen_masks.add(m)
        if scan.parent.name == "normal":
            assert not union.any()
            assert len(masks) == 1
        else:
            assert union.any()
    assert all_files == set(scans) | seen_masks | {dataset / "truth.json"}


def test_truth_complete_and_consistent(dataset):
    truth = synthetic.load_truth(dataset)
    assert set(truth) == {str(p.relative_to(dataset)) for p in _scans(dataset)}
    for key, rec in truth.items():
        assert set(rec) == set(FILE_KEYS) | set(LESION_KEYS) | {"label"}, key
        folder = key.split("/")[0]
        assert rec["label"] == folder and rec["image"] == key
        image = _read(dataset / key)
        assert [rec["height"], rec["width"]] == list(image.shape)
        masks = sorted(
            str(p.relative_to(dataset))
            for p in (dataset / folder).glob(f"{pathlib.Path(key).stem}_mask*.png")
        )
        assert sorted(rec["masks"]) == masks
        assert rec["num_mask_files"] == len(masks)
        assert 0.02 < rec["pixel_spacing_mm"] < 1.0
        assert set(rec["layers"]) == {
            "skin",
            "fat_bottom",
            "gland_bottom",
            "muscle_top",
            "muscle_bottom",
        }
        if rec["true_label"] == "normal":
            assert rec["label"] == "normal"
            assert all(rec[k] is None for k in LESION_KEYS), key
            continue
        assert rec["shape"] in synthetic.SHAPES
        assert rec["orientation"] in synthetic.ORIENTATIONS
        assert rec["margin_detail"] in synthetic.MARGIN_DETAILS
        assert rec["margin"] == (
            "circumscribed" if rec["margin_detail"] == "circumscribed" else "not_circumscribed"
        )
        assert rec["echo_pattern"] in synthetic.ECHO_PATTERNS
        assert isinstance(rec["heterogeneous"], bool)
        assert rec["posterior"] in synthetic.POSTERIOR
        assert (rec["posterior_db"] > 0, rec["posterior_db"] < 0) == (
            rec["posterior"] == "enhancement",
            rec["posterior"] == "shadowing",
        )
        a, b = rec["axes"]
        assert (a > b) == (rec["orientation"] == "parallel"), key
        union = _union(dataset, rec)
        ys, xs = np.nonzero(union)
        assert rec["bbox"] == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert rec["mask_area_px"] == union.sum()
        cx, cy = rec["centre"]
        assert union[int(round(cy)), int(round(cx))], "centre outside the lesion"
        assert 0.01 < rec["area_fraction"] < 0.25


def test_multi_mask_files_or_back_to_lesion(dataset):
    truth = synthetic.load_truth(dataset)
    multi = [r for r in truth.values() if r["num_mask_files"] > 1]
    # round(0.25 * 12) = 3 per lesion class, plus duplicates of them.
    assert len(multi) >= 6
    for rec in multi:
        assert 2 <= rec["num_mask_files"] <= 3
        parts = [_read(dataset / m) > 0 for m in rec["masks"]]
        assert all(p.any() for p in parts)
        assert sum(p.astype(int) for p in parts).max() == 1  # disjoint
        assert np.logical_or.reduce(parts).sum() == rec["mask_area_px"]
    # And the splitting itself is exact on a freshly rendered mask.
    rng = np.random.default_rng(0)
    _, mask, attrs = synthetic.render_phantom(rng, 160, 200, "malignant")
    for n in (2, 3):
        parts = synthetic._split_mask(rng, mask, attrs["centre"], n)
        assert len(parts) == n
        assert np.array_equal(np.logical_or.reduce(parts), mask)
        assert sum(p.astype(int) for p in parts).max() == 1


def _fingerprint(image: np.ndarray, size: int = 64) -> np.ndarray:
    small = np.asarray(
        Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), np.float64
    )
    # High-pass: every breast scan shares the bright-top/dark-bottom layout; the
    # speckle and tissue edges that remain belong to one acquisition.
    return ndimage.gaussian_filter(small - ndimage.gaussian_filter(small, 3), 0.7)


def _ncc(fa: np.ndarray, fb: np.ndarray, margin: int = 8) -> float:
    """Best normalised correlation of fa's centre with fb over small shifts."""

    def norm(x):
        x = x - x.mean()
        return x / (np.linalg.norm(x) + 1e-9)

    size = fa.shape[0]
    centre = norm(fa[margin : size - margin, margin : size - margin])
    best = -1.0
    for dy in range(-margin + 2, margin - 1):
        for dx in range(-margin + 2, margin - 1):
            win = fb[margin + dy : size - margin + dy, margin + dx : size - margin + dx]
            best = max(best, float(np.sum(centre * norm(win))))
    return best


def test_near_duplicates_are_near_duplicates(dataset):
    truth = synthetic.load_truth(dataset)
    keys = sorted(truth)
    fps = {k: _fingerprint(_read(dataset / k)) for k in keys}
    dups = {k: r for k, r in truth.items() if r["duplicate_of"]}
    assert len(dups) == 8
    originals = {r["duplicate_of"] for r in dups.values()}
    assert len(originals) == 8 and not originals & set(dups)
    lesion_dups = [r for r in dups.values() if r["true_label"] != "normal"]
    cross = [r for r in lesion_dups if r["label"] != r["true_label"]]
    assert len(cross) == round(0.5 * len(lesion_dups))
    for key, rec in dups.items():
        orig = truth[rec["duplicate_of"]]
        assert orig["duplicate_of"] is None
        assert rec["true_label"] == orig["label"]
        if rec["true_label"] == "normal":
            assert rec["label"] == "normal"
        for k in ("shape", "margin_detail", "echo_pattern", "posterior"):
            assert rec[k] == orig[k]
        # Its original is by far its most similar scan.
        scores = {k: _ncc(fps[key], fps[k]) for k in keys if k != key}
        assert max(scores, key=scores.get) == rec["duplicate_of"], key
        assert scores[rec["duplicate_of"]] > 0.7
        # The recorded transform reproduces the duplicate's mask exactly.
        t, b, l, r = rec["duplicate_transform"]["crop_tblr"]
        mask = _union(dataset, orig).astype(np.uint8) * 255
        mask = mask[t : mask.shape[0] - b, l : mask.shape[1] - r]
        mask = (
            np.asarray(
                Image.fromarray(mask).resize(
                    (rec["width"], rec["height"]), Image.Resampling.NEAREST
                )
            )
            > 0
        )
        assert np.array_equal(mask, _union(dataset, rec)), key
        assert rec["num_mask_files"] == orig["num_mask_files"]
    unrelated = [
        _ncc(fps[a], fps[b])
        for a in keys[:12]
        for b in keys[:12]
        if a < b and truth[a]["duplicate_of"] != b and truth[b]["duplicate_of"] != a
    ]
    assert max(unrelated) < 0.55


def test_overwrite(tmp_path):
    kw = dict(num_normal=1, num_benign=2, num_malignant=1, size_range=SMALL, duplicate_fraction=0.0)
    out = synthetic.generate(tmp_path / "d", seed=0, **kw)
    with pytest.raises(FileExistsError):
        synthetic.generate(out, seed=0, **kw)
    kw["num_benign"] = 1
    synthetic.generate(out, seed=1, overwrite=True, **kw)
    assert len(_scans(out)) == 3  # no stale scans from the first run
    assert len(json.loads((out / "truth.json").read_text())) == 3


def test_cli(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "busi_jax.synthetic",
            f"--out_dir={out}",
            "--num_normal=1",
            "--num_benign=1",
            "--num_malignant=1",
            "--min_height=64",
            "--max_height=64",
            "--min_width=80",
            "--max_width=80",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert len(synthetic.load_truth(out)) == 3
    assert len(_scans(out)) == 3


# --- Attributes ------------------------------------------------------------


def test_class_priors_are_probabilistic():
    rng = np.random.default_rng(0)
    draws = {
        c: [synthetic._sample_lesion_attributes(rng, c, {}) for _ in range(1500)]
        for c in ("benign", "malignant")
    }

    def share(c, key, value):
        return np.mean([d[key] == value for d in draws[c]])

    assert 0.72 < share("malignant", "posterior", "shadowing") < 0.88
    assert share("benign", "posterior", "shadowing") < 0.15
    assert share("benign", "shape", "oval") > 0.6
    assert share("malignant", "shape", "irregular") > 0.6
    assert share("benign", "margin", "circumscribed") > 0.6
    assert share("malignant", "margin", "not_circumscribed") > 0.8
    assert (
        share("malignant", "orientation", "not_parallel")
        > share("benign", "orientation", "not_parallel") + 0.2
    )
    # Nothing is deterministic: every value occurs in both classes.
    for key, values in (
        ("shape", synthetic.SHAPES),
        ("orientation", synthetic.ORIENTATIONS),
        ("margin_detail", synthetic.MARGIN_DETAILS),
        ("echo_pattern", synthetic.ECHO_PATTERNS),
        ("posterior", synthetic.POSTERIOR),
    ):
        for c in ("benign", "malignant"):
            for v in values:
                assert share(c, key, v) > 0.0, (c, key, v)


def test_attribute_overrides_and_validation():
    rng = np.random.default_rng(5)
    want = {
        "shape": "round",
        "margin": "not_circumscribed",
        "posterior": "none",
        "echo_pattern": "hyperechoic",
    }
    _, _, attrs = synthetic.render_phantom(rng, 120, 150, "benign", want)
    assert {k: attrs[k] for k in want} == want
    assert attrs["margin_detail"] != "circumscribed"
    with pytest.raises(ValueError, match="unknown attribute"):
        synthetic.render_phantom(rng, 120, 150, "benign", {"colour": "red"})
    with pytest.raises(ValueError, match="normal"):
        synthetic.render_phantom(rng, 120, 150, "normal", {"shape": "oval"})
    with pytest.raises(ValueError, match="disagree"):
        synthetic.render_phantom(
            rng, 120, 150, "benign", {"margin": "circumscribed", "margin_detail": "spiculated"}
        )
    with pytest.raises(ValueError, match="shape"):
        synthetic.render_phantom(rng, 120, 150, "benign", {"shape": "square"})
    with pytest.raises(ValueError, match="label"):
        synthetic.render_phantom(rng, 120, 150, "cyst")


# --- Physics measurable on the pixels --------------------------------------

# A plain oval mass whose only varied attribute is the one under test.
PLAIN = {
    "shape": "oval",
    "orientation": "parallel",
    "margin": "circumscribed",
    "echo_pattern": "hypoechoic",
    "heterogeneous": False,
    "calcifications": False,
    "edge_shadows": False,
    "posterior": "none",
}


def _render(seed, label="benign", h=200, w=250, **attrs):
    return synthetic.render_phantom(
        np.random.default_rng(seed), h, w, label, {**PLAIN, **attrs} if label != "normal" else attrs
    )


def _posterior_vs_sides(image, attrs):
    """Mean grey below the lesion's middle half, and beside it, same rows."""
    x0, _, x1, y1 = attrs["bbox"]
    h, w = image.shape
    rows = slice(y1 + 3, min(h, y1 + 3 + max(10, h // 6)))
    q = (x1 - x0) // 4
    below = image[rows, x0 + q : x1 - q + 1].mean()
    gap, side_w = 6, max(8, (x1 - x0) // 3)
    left = image[rows, max(0, x0 - gap - side_w) : max(0, x0 - gap)]
    right = image[rows, min(w, x1 + gap + 1) : min(w, x1 + gap + 1 + side_w)]
    sides = np.concatenate([left.ravel(), right.ravel()])
    assert sides.size > 50
    return below, sides.mean()


def test_hypoechoic_lesion_darker_than_surroundings():
    for seed in range(6):
        label = ("benign", "malignant")[seed % 2]
        image, mask, attrs = _render(seed, label, heterogeneous=bool(seed % 3))
        ring = ndimage.binary_dilation(mask, iterations=8) & ~mask
        # Only beside and above: below it the posterior feature would interfere.
        ring[int(attrs["centre"][1]) :] = False
        inside = image[ndimage.binary_erosion(mask, iterations=2)].mean()
        assert inside < image[ring].mean() - 15, seed
        # And a hyperechoic version of the same scan is brighter than it.
        hyper, _, _ = _render(seed, label, heterogeneous=bool(seed % 3), echo_pattern="hyperechoic")
        assert hyper[mask].mean() > image[mask].mean() + 30


@pytest.mark.parametrize("posterior", ["enhancement", "shadowing"])
def test_posterior_feature_measurable(posterior):
    for seed in range(6):
        image, _, attrs = _render(seed, posterior=posterior)
        below, sides = _posterior_vs_sides(image, attrs)
        if posterior == "enhancement":
            assert below > sides + 5, (seed, below, sides)
        else:
            assert below < sides - 10, (seed, below, sides)
        # Same anatomy and speckle with no posterior feature, as a control.
        plain, _, attrs0 = _render(seed, posterior="none")
        assert attrs0["bbox"] == attrs["bbox"]
        below0, _ = _posterior_vs_sides(plain, attrs0)
        if posterior == "enhancement":
            assert below > below0 + 5
        else:
            assert below < below0 - 15


def test_orientation_visible_in_mask():
    for seed in range(8):
        for orientation in ("parallel", "not_parallel"):
            _, mask, attrs = _render(
                seed, "malignant" if seed % 2 else "benign", orientation=orientation
            )
            x0, y0, x1, y1 = attrs["bbox"]
            width, height = x1 - x0 + 1, y1 - y0 + 1
            ys, xs = np.nonzero(mask)
            cov = np.cov(np.stack([xs, ys]))
            evals, evecs = np.linalg.eigh(cov)
            major = evecs[:, 1]  # (x, y) direction of the larger spread
            horizontal = abs(major[0]) > abs(major[1])
            if orientation == "parallel":
                assert width > height and horizontal, (seed, width, height)
            else:
                assert height > width and not horizontal, (seed, width, height)


def _fat_patch(image, attrs):
    lay = attrs["layers"]
    top = lay["skin"] + 0.3 * (lay["fat_bottom"] - lay["skin"])
    bottom = lay["skin"] + 0.8 * (lay["fat_bottom"] - lay["skin"])
    return image[int(top) : int(bottom)].astype(np.float64)


def test_speckle_statistics():
    cvs, near, far = [], [], []
    for seed in range(4):
        image, _, attrs = _render(seed, "normal", h=400, w=500)
        patch = _fat_patch(image, attrs)
        assert patch.shape[0] >= 20
        mean = ndimage.uniform_filter(patch, 9)
        sq = ndimage.uniform_filter(patch**2, 9)
        std = np.sqrt(np.maximum(sq - mean**2, 0))
        cvs.append(np.median((std / np.maximum(mean, 1))[5:-5, 5:-5]))
        z = patch - ndimage.uniform_filter(patch, 31)  # remove anatomy

        def corr(dx):
            return np.corrcoef(z[:, :-dx].ravel(), z[:, dx:].ravel())[0, 1]

        near.append(corr(1))
        far.append(corr(20))
    # Log-compressed, lightly filtered Rayleigh speckle: grainy, not smooth...
    assert 0.12 < np.median(cvs) < 0.6, cvs
    # ...with grains a few pixels wide (correlated neighbours), not white noise.
    assert min(near) > 0.6 and max(far) < 0.2, (near, far)


def test_depth_attenuation(dataset):
    truth = synthetic.load_truth(dataset)
    for key, rec in truth.items():
        if rec["label"] != "normal":
            continue
        rows = _read(dataset / key).mean(axis=1)
        h = len(rows)
        assert rows[int(0.85 * h) :].mean() < rows[int(0.4 * h) : int(0.6 * h)].mean()
    # The loss grows with depth: undoing less of it by TGC darkens deep rows
    # more than shallow ones (same anatomy and speckle).
    full, _, _ = _render(1, "normal", tgc_compensation=0.95)
    part, _, _ = _render(1, "normal", tgc_compensation=0.75)
    diff = (full.astype(float) - part).mean(axis=1)
    h = len(diff)
    assert diff[: h // 6].mean() < diff[h // 3 : h // 2].mean() < diff[-h // 6 :].mean()
    assert diff[-h // 6 :].mean() > 10
