"""The bad-input matrix: every fault, through the builder, evaluate and predict.

Each fault must stop the command with one BusiDataError naming the file (the
command-line wrappers turn it into one line and exit 1: see test_evaluate.py,
test_predict.py and test_train.py) and leave no output behind.
"""

import os
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfds_busi  # noqa: F401  (registers busi)
from busi_jax import evaluate, predict
from busi_jax.io import BusiDataError

DUMMY = (
    pathlib.Path(__file__).resolve().parents[1]
    / "tfds_busi"
    / "dummy_data"
    / "Dataset_BUSI_with_GT"
)


def _inject(root: pathlib.Path, fault: str) -> tuple[pathlib.Path, str]:
    """Copies the dummy data to ``root`` with one fault; returns (file named, message)."""
    shutil.copytree(DUMMY, root)
    scan = root / "benign" / "benign (1).png"
    mask = root / "benign" / "benign (1)_mask.png"
    if fault == "corrupt":
        scan.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 30)
        return scan, "not a readable image"
    if fault == "truncated":
        scan.write_bytes(scan.read_bytes()[: scan.stat().st_size // 2])
        return scan, "not a readable image"
    if fault == "zero_byte":
        scan.write_bytes(b"")
        return scan, "empty file"
    if fault == "not_an_image":
        scan.write_text("this is a text file named .png")
        return scan, "not a readable image"
    if fault == "orphan_mask":
        ghost = root / "benign" / "ghost_mask.png"
        shutil.copy(mask, ghost)
        return ghost, "mask with no scan"
    if fault == "lesion_without_mask":
        for m in root.glob("benign/benign (1)_mask*.png"):
            m.unlink()
        return scan, "benign scan with no mask"
    if fault == "size_mismatch":
        Image.new("L", (7, 5)).save(mask)
        return mask, "does not match"
    if fault == "empty_class":
        for f in (root / "normal").iterdir():
            f.unlink()
        return root / "normal", "holds no scans"
    raise ValueError(fault)


FAULTS = [
    "corrupt",
    "truncated",
    "zero_byte",
    "not_an_image",
    "orphan_mask",
    "lesion_without_mask",
    "size_mismatch",
    "empty_class",
]


@pytest.mark.parametrize("fault", FAULTS)
def test_builder(tmp_path, fault):
    bad, msg = _inject(tmp_path / "manual" / "Dataset_BUSI_with_GT", fault)
    data_dir = tmp_path / "data"
    builder = tfds.builder("busi/128", data_dir=os.fspath(data_dir), file_format="array_record")
    with pytest.raises(BusiDataError, match=msg) as e:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(tmp_path / "manual"))
        )
    assert str(bad) in str(e.value)
    # TFDS records the builder's config in busi/.config when the builder is
    # created; no dataset file, temporary or not, may remain.
    assert [p for p in data_dir.rglob("*") if p.is_file() and ".config" not in p.parts] == []


@pytest.mark.parametrize("fault", FAULTS)
def test_evaluate(tiny_pipeline, tmp_path, fault):
    _, workdir, _ = tiny_pipeline
    bad, msg = _inject(tmp_path / "data", fault)
    out = tmp_path / "out" / "r.json"
    with pytest.raises(BusiDataError, match=msg) as e:
        evaluate.evaluate(workdir, data_dir=str(tmp_path / "data"), output=str(out))
    assert str(bad) in str(e.value)
    assert not out.parent.exists()


@pytest.mark.parametrize("fault", FAULTS)
def test_predict(tiny_pipeline, tmp_path, fault):
    _, workdir, _ = tiny_pipeline
    bad, msg = _inject(tmp_path / "data", fault)
    out = tmp_path / "out"
    with pytest.raises(BusiDataError, match=msg) as e:
        predict.predict(tmp_path / "data", out, workdir=str(workdir))
    assert str(bad) in str(e.value)
    assert not out.exists()


def _odd_modes(folder: pathlib.Path) -> None:
    """Rewrites scans as RGBA, 16-bit and 1-bit PNGs (and a palette mask)."""
    rgba = folder / "benign" / "benign (1).png"
    Image.open(rgba).convert("RGBA").save(rgba)
    s16 = folder / "malignant" / "malignant (1).png"
    arr = np.asarray(Image.open(s16).convert("L"), np.uint16) * 257
    Image.fromarray(arr).save(s16)
    b1 = folder / "normal" / "normal (1).png"
    Image.open(b1).convert("L").point(lambda v: 255 if v > 90 else 0).convert("1").save(b1)
    pal = folder / "benign" / "benign (2)_mask.png"
    Image.open(pal).convert("P").save(pal)
    assert Image.open(rgba).mode == "RGBA" and Image.open(s16).mode.startswith("I")
    assert Image.open(b1).mode == "1"


def test_rgba_16bit_1bit_accepted_by_builder_and_predict(tiny_pipeline, tmp_path):
    _, workdir, _ = tiny_pipeline
    manual = tmp_path / "manual" / "Dataset_BUSI_with_GT"
    shutil.copytree(DUMMY, manual)
    _odd_modes(manual)
    builder = tfds.builder(
        "busi/128", data_dir=os.fspath(tmp_path / "data"), file_format="array_record"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(tmp_path / "manual"))
    )
    assert sum(s.num_examples for s in builder.info.splits.values()) == len(
        [p for p in DUMMY.rglob("*.png") if "_mask" not in p.name]
    )
    reps = predict.predict(manual, tmp_path / "out", workdir=str(workdir))
    names = {r["file"] for r in reps}
    assert {
        "benign/benign (1).png",
        "malignant/malignant (1).png",
        "normal/normal (1).png",
    } <= names
