"""The export artifact: self-contained, any batch size, matches the in-memory model."""

import subprocess
import sys

import numpy as np
import pytest

from busi_jax import data
from busi_jax import evaluate
from busi_jax import export
from busi_jax import inference
from busi_jax.io import BusiDataError


@pytest.fixture(scope="module")
def artifact(tiny_pipeline, tmp_path_factory):
    _, workdir, _ = tiny_pipeline
    path = tmp_path_factory.mktemp("export") / "model.busi"
    export.export(workdir, path)
    return workdir, path


def test_artifact_matches_in_memory_model(artifact):
    workdir, path = artifact
    art = export.load(path)
    assert art.has_classifier
    assert set(art.meta["postprocess"]) >= {"threshold", "largest_component"}
    arrays = data.load_split(inference.load_config(workdir / "segmenter").data, "test")
    images = arrays["image"]
    ref = evaluate.segmenter_probs(workdir / "segmenter")(images)
    for n in (1, 3, len(images)):  # The batch dimension is symbolic.
        got = art.segment(images[:n])
        np.testing.assert_allclose(got, ref[:n], atol=1e-4)
    masks = (ref >= 0.5)[..., None].astype(np.uint8)
    logits = evaluate.classifier_logits(workdir / "classifier")(images, masks)
    np.testing.assert_allclose(art.classify(images, masks), 1 / (1 + np.exp(-logits)), atol=1e-4)


def test_artifact_runs_without_model_code(artifact, tmp_path):
    _, path = artifact
    code = f"""
import sys
sys.modules['flax'] = None            # importing Flax or the model zoo would now fail
sys.modules['busi_jax.models'] = None
sys.modules['orbax'] = None
import numpy as np
from busi_jax import export
art = export.load({str(path)!r})
p = art.segment(np.zeros((2, 128, 128, 1), np.uint8))
c = art.classify(np.zeros((2, 128, 128, 1), np.uint8), np.zeros((2, 128, 128, 1), np.uint8))
assert p.shape == (2, 128, 128) and c.shape == (2,)
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_bad_artifact_is_one_clear_error(tmp_path):
    bad = tmp_path / "x.busi"
    bad.write_bytes(b"not a zip")
    with pytest.raises(BusiDataError, match="not a busi-jax export artifact"):
        export.load(bad)


def test_tflite_matches_in_memory_model(artifact, tmp_path):
    tf = pytest.importorskip("tensorflow")  # In the test extras; absent from a runtime install.
    workdir, _ = artifact
    paths = export.export_tflite(workdir, tmp_path / "model")
    assert sorted(p.name for p in paths) == ["model.classifier.tflite", "model.segmenter.tflite"]
    arrays = data.load_split(inference.load_config(workdir / "segmenter").data, "test")
    image = arrays["image"][:1]
    ref = evaluate.segmenter_probs(workdir / "segmenter")(image)
    interp = tf.lite.Interpreter(model_path=str(tmp_path / "model.segmenter.tflite"))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], image.astype(np.float32) / 255.0)
    interp.invoke()
    got = interp.get_tensor(interp.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, ref, atol=1e-4)
