"""The folder reader: pairing, merging, pixel modes and every bad input."""

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from busi_jax import io


def _png(path, array, mode=None):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode is None else Image.fromarray(
        array
    ).convert(mode).save(path)


def _scan(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _mask(h=20, w=30, box=(5, 10, 5, 15)):
    m = np.zeros((h, w), np.uint8)
    m[box[0] : box[1], box[2] : box[3]] = 255
    return m


@pytest.fixture
def folder(tmp_path):
    """A small valid BUSI-layout folder."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    _png(root / "benign" / "benign (1).png", _scan(seed=1))
    _png(root / "benign" / "benign (1)_mask.png", _mask())
    _png(root / "benign" / "benign (1)_mask_1.png", _mask(box=(12, 18, 20, 28)))
    _png(root / "malignant" / "odd name_x.png", _scan(seed=2))
    _png(root / "malignant" / "odd name_x_mask.png", _mask())
    _png(root / "normal" / "n.png", _scan(seed=3))
    _png(root / "normal" / "n_mask.png", np.zeros((20, 30), np.uint8))
    return tmp_path


def test_lists_pairs_and_merges_masks(folder):
    recs = io.list_scans(folder)
    assert [r.file_name for r in recs] == [
        "benign/benign (1).png",
        "malignant/odd name_x.png",
        "normal/n.png",
    ]
    assert [len(r.mask_paths) for r in recs] == [2, 1, 1]
    image, mask = io.read_example(recs[0])
    assert image.shape == mask.shape == (20, 30)
    assert mask.dtype == bool
    expected = (_mask() > 0) | (_mask(box=(12, 18, 20, 28)) > 0)
    np.testing.assert_array_equal(mask, expected)


def test_root_with_class_folders_directly(folder):
    assert io.find_dataset_root(folder / "Dataset_BUSI_with_GT") == folder / "Dataset_BUSI_with_GT"
    assert io.find_dataset_root(folder) == folder / "Dataset_BUSI_with_GT"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_modes_become_gray(tmp_path, mode):
    gray = _scan()
    p = tmp_path / "x.png"
    Image.fromarray(gray).convert(mode).save(p)
    assert Image.open(p).mode == mode
    out = io.read_scan(p)
    assert out.dtype == np.uint8 and out.shape == gray.shape
    assert np.abs(out.astype(int) - gray).max() <= 1


def test_16bit_scan_is_scaled(tmp_path):
    arr16 = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    p = tmp_path / "x16.png"
    Image.fromarray(arr16).save(p)
    assert Image.open(p).mode.startswith("I")
    out = io.read_scan(p)
    np.testing.assert_array_equal(out, np.round(arr16 / 257.0).astype(np.uint8))


def test_1bit_mask_and_scan(tmp_path):
    p = tmp_path / "m.png"
    Image.fromarray(_mask() > 0).save(p)
    assert Image.open(p).mode == "1"
    np.testing.assert_array_equal(io.read_mask(p), _mask() > 0)
    assert set(np.unique(io.read_scan(p))) == {0, 255}


def test_rgb_and_rgba_masks(tmp_path):
    for mode in ("RGB", "RGBA"):
        p = tmp_path / f"m_{mode}.png"
        Image.fromarray(_mask()).convert(mode).save(p)
        np.testing.assert_array_equal(io.read_mask(p), _mask() > 0)


def _expect_error(fn, *fragments):
    with pytest.raises(io.BusiDataError) as e:
        fn()
    for f in fragments:
        assert f in str(e.value), str(e.value)
    return str(e.value)


def test_corrupt_png(folder):
    bad = folder / "Dataset_BUSI_with_GT" / "benign" / "benign (1).png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    rec = io.list_scans(folder)[0]
    _expect_error(lambda: io.read_example(rec), str(bad), "not a readable image")


def test_truncated_png(folder):
    p = folder / "Dataset_BUSI_with_GT" / "benign" / "benign (1).png"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    rec = io.list_scans(folder)[0]
    _expect_error(lambda: io.read_example(rec), str(p), "not a readable image")


def test_zero_byte_file(folder):
    p = folder / "Dataset_BUSI_with_GT" / "normal" / "n.png"
    p.write_bytes(b"")
    rec = io.list_scans(folder)[2]
    _expect_error(lambda: io.read_example(rec), str(p), "empty file")


def test_text_file_named_png(folder):
    p = folder / "Dataset_BUSI_with_GT" / "malignant" / "odd name_x_mask.png"
    p.write_text("this is not an image")
    rec = io.list_scans(folder)[1]
    _expect_error(lambda: io.read_example(rec), str(p), "not a readable image")


def test_mask_with_no_scan(folder):
    p = folder / "Dataset_BUSI_with_GT" / "benign" / "ghost_mask.png"
    _png(p, _mask())
    _expect_error(lambda: io.list_scans(folder), str(p), "mask with no scan")


def test_lesion_scan_with_no_mask(folder):
    p = folder / "Dataset_BUSI_with_GT" / "malignant" / "lonely.png"
    _png(p, _scan())
    _expect_error(lambda: io.list_scans(folder), str(p), "malignant scan with no mask")


def test_normal_scan_without_mask_is_empty(folder):
    p = folder / "Dataset_BUSI_with_GT" / "normal" / "n_mask.png"
    p.unlink()
    rec = io.list_scans(folder)[2]
    assert rec.mask_paths == ()
    _, mask = io.read_example(rec)
    assert not mask.any()


def test_size_mismatch(folder):
    p = folder / "Dataset_BUSI_with_GT" / "benign" / "benign (1)_mask_1.png"
    _png(p, _mask(h=21, w=30))
    rec = io.list_scans(folder)[0]
    _expect_error(lambda: io.read_example(rec), str(p), "does not match", "30x21")


def test_empty_class_folder(folder):
    d = folder / "Dataset_BUSI_with_GT" / "normal"
    for f in d.iterdir():
        f.unlink()
    _expect_error(lambda: io.list_scans(folder), str(d), "holds no scans")


def test_missing_and_empty_root(tmp_path):
    _expect_error(lambda: io.list_scans(tmp_path / "nope"), "does not exist")
    _expect_error(lambda: io.list_scans(tmp_path), "no class folder")


def test_unexpected_file_is_an_error_not_a_skip(folder):
    p = folder / "Dataset_BUSI_with_GT" / "benign" / "notes.txt"
    p.write_text("x")
    _expect_error(lambda: io.list_scans(folder), str(p), "unexpected file")
    p.unlink()
    (folder / "Dataset_BUSI_with_GT" / "benign" / ".DS_Store").write_text("x")
    assert len(io.list_scans(folder)) == 3


def test_resize_mask_keeps_majority_pixels():
    m = np.zeros((100, 100), bool)
    m[20:60, 30:90] = True
    small = io.resize_mask(m, 10)
    expected = np.zeros((10, 10), bool)
    expected[2:6, 3:9] = True
    np.testing.assert_array_equal(small, expected)
    assert io.resize_image(np.full((50, 70), 7, np.uint8), (16, 12)).shape == (16, 12)


def test_atomic_write_leaves_old_content_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "out.json"
    io.atomic_write_json(p, {"a": 1})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        io.atomic_write_json(p, {"a": 2})
    assert p.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]


def test_list_inputs_flat_folder_and_file(tmp_path):
    _png(tmp_path / "a.png", _scan())
    _png(tmp_path / "a_mask.png", _mask())
    _png(tmp_path / "b.jpg", _scan())
    recs = io.list_inputs(tmp_path)
    assert [r.file_name for r in recs] == ["a.png", "b.jpg"]
    assert len(recs[0].mask_paths) == 1 and recs[0].label is None
    assert len(io.list_inputs(tmp_path / "b.jpg")) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(lambda: io.list_inputs(empty), "no PNG or JPEG")
