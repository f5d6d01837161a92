"""The pipeline: a segmenter, then a classifier trained and scored on its predicted masks."""

import json

import numpy as np

from busi_jax import inference
from busi_jax import pipeline
from busi_jax import train


def test_pipeline_trains_classifier_on_predicted_masks(tiny_config, tmp_path):
    from configs import pipeline as pipeline_config

    config = pipeline_config.get_config()
    config.segmenter = tiny_config
    config.segmenter.num_epochs = 1
    cls = config.classifier_stage
    cls.num_epochs = 1
    cls.progress = False
    cls.model.features = (4, 8)
    cls.batch_size = 4
    out = pipeline.run(config, tmp_path)
    assert set(out) == {"segmenter_workdir", "segmenter", "classifier"}
    assert 0.0 <= out["classifier"]["auc"] <= 1.0
    saved = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert saved["classifier"]["mask_source"] == "predicted"
    assert saved["classifier"]["segmenter_workdir"] == str(tmp_path / "segmenter")

    # The classifier's inputs are the segmenter's masks, not the truth.
    predict = inference.mask_predictor(tmp_path / "segmenter")
    arrays = train.prepare_arrays(
        train.ml_collections.ConfigDict(saved), "validation", predicted_masks=predict
    )
    truth = train.data_lib.load_split(saved["data"], "validation")
    truth = truth["mask"][truth["label"] > 0]
    assert arrays["mask"].shape == truth.shape
    assert not np.array_equal(arrays["mask"], truth)

    # Reusing the finished segmenter skips stage 1 and gives the same classifier.
    config.segmenter_workdir = str(tmp_path / "segmenter")
    again = pipeline.run(config, tmp_path / "reuse")
    assert again["segmenter"] == out["segmenter"]
    assert again["classifier"] == out["classifier"]
