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


BAND = 8  # Rows per run's signature band.
COMMON = slice(100, 128)  # Rows every run calls lesion.


def _signature_probabilities(monkeypatch, runs):
    """Run k calls lesion in its own band of rows (and every run in COMMON): a mask shows its run."""
    band = {path: i for i, path in enumerate(runs)}

    def predictor(path, *args, **kwargs):
        def probs(images):
            p = np.full(images.shape, 0.1, np.float32)
            i = band[pathlib.Path(path)]
            p[:, i * BAND : (i + 1) * BAND] = 0.9
            p[:, COMMON] = 0.9
            return p

        return probs, 0.5

    monkeypatch.setattr(inference, "probability_predictor", predictor)


def _pool(tiny_pipeline):
    config, _, _ = tiny_pipeline
    return data.load_pool(config.segmenter.data)


def test_each_scan_is_masked_by_the_run_that_held_it_out(tiny_pipeline, tmp_path, monkeypatch):
    pool = _pool(tiny_pipeline)
    folds = sorted(set(pool["fold"].tolist()))
    assert len(folds) >= 3
    runs = _fold_runs(tiny_pipeline, tmp_path, folds)
    order = [runs[f] for f in folds]
    _signature_probabilities(monkeypatch, order)
    masks = inference.segmenter_masks(",".join(str(r) for r in order))
    assert isinstance(masks, inference.FoldMasks)
    out = masks(pool["image"], pool["fold"])[..., 0]
    bands = out[:, : len(folds) * BAND].reshape(len(out), len(folds), BAND, -1).min(axis=(2, 3))
    # Each scan carries exactly its own fold's run's band, never another run's.
    expected = np.asarray([[f == g for g in folds] for f in pool["fold"]], np.uint8)
    np.testing.assert_array_equal(bands, expected)
    assert out[:, COMMON].all()
    # Outside the folds (no folds given): the runs' mean, 0.9 only where all agree.
    outside = masks(pool["image"][:3])[..., 0]
    assert outside[:, COMMON].all() and not outside[:, : len(folds) * BAND].any()


def test_fold_masks_misuse_is_one_clear_error(tiny_pipeline, tmp_path, monkeypatch):
    pool = _pool(tiny_pipeline)
    folds = sorted(set(pool["fold"].tolist()))
    runs = _fold_runs(tiny_pipeline, tmp_path, folds)
    _signature_probabilities(monkeypatch, list(runs.values()))
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
    # A lone fold run is not a plain segmenter: its training scans are refused.
    lone = inference.segmenter_masks(str(runs[folds[0]]))
    with pytest.raises(ckpt_lib.CheckpointError, match="no run holds out fold"):
        lone(pool["image"], pool["fold"])
    good = inference.FoldMasks([runs[folds[0]], runs[folds[2]]])
    other = ml_collections.ConfigDict(dict(cfg["data"]))
    with pytest.raises(ckpt_lib.CheckpointError, match="trained on other data or splits"):
        good.check_data(other, "config.classifier.segmenter_workdir")
    # The same config, but a fold run trained on a build of other scans.
    same = inference.load_config(runs[folds[0]]).data
    good.check_data(same, "config.classifier.segmenter_workdir")
    fp = runs[folds[2]] / train.DATA_FINGERPRINT
    fp.write_text(json.dumps(dict(json.loads(fp.read_text()), test="0" * 16)))
    with pytest.raises(ckpt_lib.CheckpointError, match="trained on other data or splits"):
        good.check_data(same, "config.classifier.segmenter_workdir")


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
    # Temperature only on validation-split scans: the classifier fitted the rest.
    n_val = len(data.load_split(cls.data, "validation")["file_name"])
    assert f"classifier temperature on the {n_val} validation scans" in protocol["tuned_on"]
    assert protocol["tuning_scans"] > n_val
    assert report["classification"]["masks"] == "predicted"
    # A second segmenter ensemble on top is refused, not silently merged.
    with pytest.raises(ckpt_lib.CheckpointError, match="its segmenter ensemble"):
        evaluate.evaluate(out, ensemble=[runs[folds[0]]], n_boot=0, plots_enabled=False)

    # predict and export deploy one segmenter: refused, not fold 0 alone.
    with pytest.raises(ckpt_lib.CheckpointError, match="takes one segmenter"):
        evaluate.resolve(out)
    # Nor may the classifier be a fold run itself (its validation scans would be in training).
    cls.data.cv_fold = folds[0]
    with pytest.raises(train.ConfigError, match="train the classifier on the splits"):
        train.train_and_evaluate(cls, tmp_path / "classifier_fold")


def test_pipeline_refuses_several_segmenters(tiny_pipeline, tmp_path):
    from busi_jax import pipeline

    config, _, _ = tiny_pipeline
    config = ml_collections.ConfigDict(config.to_dict())
    config.segmenter_workdir = "a,b"
    with pytest.raises(train.ConfigError, match="a pipeline takes one segmenter"):
        pipeline.run(config, tmp_path / "p")
