"""predict: masks at original size, JSON and HTML per scan, index page, rendered in Chromium."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from busi_jax import export
from busi_jax import predict

ROOT = pathlib.Path(__file__).resolve().parents[1]
DUMMY = ROOT / "tfds_busi" / "dummy_data" / "Dataset_BUSI_with_GT"
BROWSERS = ("chromium-headless-shell", "chromium")


@pytest.fixture(scope="module")
def predicted(tiny_pipeline, tmp_path_factory):
    _, workdir, _ = tiny_pipeline
    out = tmp_path_factory.mktemp("pred")
    reps = predict.predict(DUMMY, out, workdir=str(workdir), pixel_spacing_mm=0.1)
    return workdir, out, reps


def test_outputs_per_scan(predicted):
    _, out, reps = predicted
    assert len(reps) == len([p for p in DUMMY.rglob("*.png") if "_mask" not in p.name])
    for rep in reps:
        cls, name = rep["file"].split("/")
        stem = pathlib.Path(name).stem
        scan = Image.open(DUMMY / cls / name)
        mask = Image.open(out / cls / f"{stem}_pred_mask.png")
        assert mask.size == scan.size  # The original size, not the model's.
        saved = json.loads((out / cls / f"{stem}.json").read_text())
        assert saved["category"] in ("1", "2", "3", "4A", "4B", "4C", "5")
        assert "not a medical device" in saved["disclaimer"]
        assert (out / cls / f"{stem}.html").exists()
        assert 0.0 <= saved["reference_dice"] <= 1.0  # The mask files beside each scan.
        if saved["descriptors"]["has_lesion"]:
            assert 0.0 <= saved["malignancy_probability"] <= 1.0
    assert (out / "index.html").exists()
    assert not [p for p in out.rglob(".*")]


def test_grad_cam_on_the_page(predicted):
    _, out, _ = predicted
    page = next(out.rglob("*.html"))
    if page.name == "index.html":
        page = next(p for p in out.rglob("*.html") if p.name != "index.html")
    assert "Grad-CAM, segmenter" in page.read_text()


def test_single_rgb_jpeg_and_artifact(predicted, tmp_path):
    workdir, _, _ = predicted
    rgb = np.stack(
        [np.asarray(Image.open(next(DUMMY.glob("malignant/*).png"))).convert("L"))] * 3, -1
    )
    jpg = tmp_path / "scan one.jpg"
    Image.fromarray(rgb).save(jpg)
    art = tmp_path / "m.busi"
    export.export(workdir, art)
    reps = predict.predict(jpg, tmp_path / "out", artifact=str(art))
    assert len(reps) == 1 and reps[0]["file"] == "scan one.jpg"
    assert Image.open(tmp_path / "out" / "scan one_pred_mask.png").size == Image.open(jpg).size
    assert "Grad-CAM is not available from an exported artifact." in reps[0]["notes"]


def test_bad_input_one_line_and_no_output(predicted, tmp_path):
    workdir, _, _ = predicted
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(next(DUMMY.glob("benign/*).png")), folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "busi_jax.predict",
            f"--workdir={workdir}",
            f"--input={folder}",
            f"--output={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1 and str(folder / "broken.png") in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists()


def _browser():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "no headless Chromium: install Debian's chromium-headless-shell (tests/run.sh does)"
    )


def test_pages_render_with_their_images_in_chromium(predicted):
    from playwright.sync_api import sync_playwright

    _, out, reps = predicted
    pages = [out / "index.html"] + sorted(p for p in out.rglob("*.html") if p.name != "index.html")[
        :3
    ]
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_browser(), args=args)
        page = browser.new_page()
        for html in pages:
            page.goto(html.as_uri())
            page.wait_for_load_state("load")
            sizes = page.evaluate(
                "Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1)"
            )
            assert sizes and all(s > 0 for s in sizes), (html, sizes)
            assert "Research use only" in page.inner_text("body")
        # Every link on the index leads to an existing report page.
        page.goto((out / "index.html").as_uri())
        hrefs = page.evaluate("Array.from(document.links).map(a => a.href)")
        assert len(set(hrefs)) == len(reps)
        for href in set(hrefs):
            page.goto(href)
            assert page.title().endswith("busi-jax research report")
        browser.close()
