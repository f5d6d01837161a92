"""The pipeline: a segmenter, then a classifier trained and scored on its predicted masks."""

import json

import ml_collections
import numpy as np

from busi_jax import data
from busi_jax import inference
from busi_jax import pipeline
from busi_jax import train


def test_pipeline_trains_classifier_on_predicted_masks(tiny_pipeline, tmp_path):
    config, workdir, out = tiny_pipeline
    assert set(out) == {"segmenter_workdir", "segmenter", "classifier"}
    assert 0.0 <= out["classifier"]["auc"] <= 1.0
    saved = json.loads((workdir / "classifier" / "config.json").read_text())
    assert saved["classifier"]["mask_source"] == "predicted"
    assert saved["classifier"]["segmenter_workdir"] == str(workdir / "segmenter")

    # The classifier's inputs are the segmenter's masks, not the truth.
    predict = inference.mask_predictor(workdir / "segmenter")
    arrays = train.prepare_arrays(
        ml_collections.ConfigDict(saved),
        data.load_split(saved["data"], "validation"),
        predicted_masks=predict,
    )
    truth = data.load_split(saved["data"], "validation")
    truth = truth["mask"][truth["label"] > 0]
    assert arrays["mask"].shape == truth.shape
    assert not np.array_equal(arrays["mask"], truth)

    # Reusing the finished segmenter skips stage 1 and gives the same classifier.
    config = ml_collections.ConfigDict(config.to_dict())
    config.segmenter_workdir = str(workdir / "segmenter")
    again = pipeline.run(config, tmp_path / "reuse")
    assert again["segmenter"] == out["segmenter"]
    assert again["classifier"] == out["classifier"]
    assert not (tmp_path / "reuse" / "segmenter").exists()


def test_classifier_on_truth_masks_chooses_checkpoint_on_predicted_masks(tiny_pipeline, tmp_path):
    """val_mask_source='predicted': training reads true masks, validation the segmenter's."""
    import pytest

    from busi_jax import evaluate

    config, workdir, _ = tiny_pipeline
    cls = ml_collections.ConfigDict(config.classifier_stage.to_dict())
    cls.classifier.mask_source = "ground_truth"
    cls.classifier.val_mask_source = "predicted"
    cls.classifier.segmenter_workdir = str(workdir / "segmenter")
    seen = []

    def spy(images):
        seen.append(len(images))
        return inference.mask_predictor(workdir / "segmenter")(images)

    train.train_and_evaluate(cls, tmp_path / "cls", predicted_masks=spy)
    val = data.load_split(cls.data, "validation")
    assert seen == [int(np.sum(val["label"] > 0))]  # Validation only, once.
    # Evaluation pairs the run with the segmenter it was selected on.
    parts = evaluate.resolve(tmp_path / "cls")
    assert parts["segmenter"] == workdir / "segmenter"
    rep = evaluate.evaluate(tmp_path / "cls", n_boot=10, plots_enabled=False)
    assert rep["classification"]["masks"] == "predicted (classifier trained on ground-truth masks)"

    cls.classifier.val_mask_source = "truth"
    with pytest.raises(train.ConfigError, match="val_mask_source='truth': must be"):
        train.train_and_evaluate(cls, tmp_path / "bad")


def test_segmenter_saved_before_cross_validation_is_reused(tiny_pipeline, tmp_path):
    """Runs whose config.json predates data.cv_fold still pair with a new classifier config."""
    import shutil

    config, workdir, _ = tiny_pipeline
    old = tmp_path / "old_segmenter"
    shutil.copytree(workdir / "segmenter", old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["data"]["cv_fold"]
    (old / "config.json").write_text(json.dumps(cfg))
    final = pipeline._finished_segmenter(old, config.segmenter)
    assert final == json.loads((old / "final_metrics.json").read_text())


def test_reused_segmenter_from_other_scans_is_refused(tiny_pipeline, tmp_path):
    """A segmenter whose fingerprint names other scans is refused, wherever its data lived."""
    import shutil

    import pytest

    config, workdir, _ = tiny_pipeline
    seg = tmp_path / "segmenter"
    shutil.copytree(workdir / "segmenter", seg)
    cfg = json.loads((seg / "config.json").read_text())
    cfg["data"]["data_dir"] = str(tmp_path / "elsewhere")
    (seg / "config.json").write_text(json.dumps(cfg))
    # Another location, the same scans: reused.
    pipeline._finished_segmenter(seg, config.segmenter)
    fp = json.loads((seg / train.DATA_FINGERPRINT).read_text())
    (seg / train.DATA_FINGERPRINT).write_text(json.dumps(dict(fp, train="0" * 16)))
    with pytest.raises(train.ConfigError, match="trained on other data or splits"):
        pipeline._finished_segmenter(seg, config.segmenter)
