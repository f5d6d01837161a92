"""Out-of-fold masks for the classifier (inference.FoldMasks) and its evaluation."""

import json
import pathlib
import shutil

import ml_collections
import numpy as np
import pytest

from busi_jax import checkpoints as ckpt_lib
from busi_jax import data, evaluate, inference, train


def _fold_runs(tiny_pipeline, tmp_path, folds):
    """Copies of the tiny segmenter relabelled as the runs holding out ``folds``."""
    _, workdir, _ = tiny_pipeline
    seg = pathlib.Path(workdir) / "segmenter"
    runs = {}
    for f in folds:
        dst = tmp_path / f"fold{f}"
        shutil.copytree(seg, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["data"]["cv_fold"] = f
        (dst / "config.json").write_text(json.dumps(cfg))
        runs[f] = dst
    return runs


def _constant_probabilities(monkeypatch, values):
    """Each run predicts one constant probability everywhere: masks show which run ran."""
    monkeypatch.setattr(
        inference,
        "probability_predictor",
        lambda path, *a, **k: (
            lambda im: np.full(im.shape, values[pathlib.Path(path)], np.float32),
            0.5,
        ),
    )


def _pool(tiny_pipeline):
    config, _, _ = tiny_pipeline
    return data.load_pool(config.segmenter.data)


def test_each_scan_is_masked_by_the_run_that_held_it_out(tiny_pipeline, tmp_path, monkeypatch):
    pool = _pool(tiny_pipeline)
    folds = sorted(set(pool["fold"].tolist()))
    assert len(folds) >= 2
    runs = _fold_runs(tiny_pipeline, tmp_path, folds)
    # The first fold's run says lesion everywhere, the others nowhere; their
    # mean (outside the folds) says lesion only if enough of them do.
    values = {runs[f]: (0.9 if f == folds[0] else 0.2) for f in folds}
    _constant_probabilities(monkeypatch, values)
    masks = inference.segmenter_masks(",".join(str(runs[f]) for f in folds))
    assert isinstance(masks, inference.FoldMasks)
    out = masks(pool["image"], pool["fold"])
    per_scan = out.reshape(len(out), -1)
    np.testing.assert_array_equal(per_scan.min(1), per_scan.max(1))  # One constant per scan.
    np.testing.assert_array_equal(per_scan[:, 0], (pool["fold"] == folds[0]).astype(np.uint8))
    mean = np.mean(list(values.values()))
    outside = masks(pool["image"][:3])  # No folds given: outside every fold.
    assert (outside == (mean >= 0.5)).all()


def test_fold_masks_misuse_is_one_clear_error(tiny_pipeline, tmp_path, monkeypatch):
    pool = _pool(tiny_pipeline)
    folds = sorted(set(pool["fold"].tolist()))
    runs = _fold_runs(tiny_pipeline, tmp_path, folds)
    _constant_probabilities(monkeypatch, {r: 0.9 for r in runs.values()})
    # A fold without its run: its scans would be masked by runs that fitted them.
    partial = inference.FoldMasks([runs[f] for f in folds[1:]])
    with pytest.raises(
        ckpt_lib.CheckpointError, match=rf"no run holds out fold\(s\) \[{folds[0]}\]"
    ):
        partial(pool["image"], pool["fold"])
    with pytest.raises(ckpt_lib.CheckpointError, match="each holding out a different fold"):
        inference.FoldMasks([runs[folds[0]], runs[folds[0]]])
    _, workdir, _ = tiny_pipeline
    with pytest.raises(ckpt_lib.CheckpointError, match="each holding out a different fold"):
        inference.FoldMasks([runs[folds[0]], pathlib.Path(workdir) / "segmenter"])
    cfg = json.loads((runs[folds[1]] / "config.json").read_text())
    cfg["data"]["synthetic_seed"] += 1
    (runs[folds[1]] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt_lib.CheckpointError, match="trained on other data or splits"):
        inference.FoldMasks([runs[folds[0]], runs[folds[1]]])
    good = inference.FoldMasks([runs[folds[0]], runs[folds[2]]])
    other = ml_collections.ConfigDict(dict(cfg["data"]))
    with pytest.raises(ckpt_lib.CheckpointError, match="trained on other data or splits"):
        good.check_data(other, "config.classifier.segmenter_workdir")


def test_classifier_trains_and_is_scored_on_out_of_fold_masks(tiny_pipeline, tmp_path):
    """End to end with real (tiny) models: train on out-of-fold masks, evaluate on the folds' test masks."""
    config, _, _ = tiny_pipeline
    folds = sorted(set(_pool(tiny_pipeline)["fold"].tolist()))
    runs = _fold_runs(tiny_pipeline, tmp_path, folds)
    cls = ml_collections.ConfigDict(config.classifier_stage.to_dict())
    cls.data = ml_collections.ConfigDict(config.segmenter.data.to_dict())
    cls.classifier.segmenter_workdir = ",".join(str(runs[f]) for f in folds)
    # prepare_arrays hands each scan's fold to the predictor.
    seen = []

    class Recording(inference.FoldMasks):
        def __call__(self, images, folds=None):
            seen.append(np.asarray(folds))
            return super().__call__(images, folds)

    masks = Recording(list(runs.values()))
    arrays = train.prepare_arrays(cls, data.load_split(cls.data, "train"), masks)
    np.testing.assert_array_equal(seen[-1], arrays["fold"])
    assert (arrays["fold"] >= 0).all() and arrays["mask"].shape == arrays["image"].shape

    out = tmp_path / "classifier"
    train.train_and_evaluate(cls, out)
    report = evaluate.evaluate(out, n_boot=0, plots_enabled=False)
    protocol = report["protocol"]
    assert protocol["ensemble"] == [str(runs[f]) for f in folds[1:]]
    assert "classifier temperature on the" in protocol["tuned_on"]
    assert report["classification"]["masks"] == "predicted"
    # A second segmenter ensemble on top is refused, not silently merged.
    with pytest.raises(ckpt_lib.CheckpointError, match="its segmenter ensemble"):
        evaluate.evaluate(out, ensemble=[runs[folds[0]]], n_boot=0, plots_enabled=False)
