"""The descriptor study's pieces: the leak-free logistic fit and its standardisation."""

import pathlib

import numpy as np
import pytest

from busi_jax import descriptor_study
from busi_jax import metrics


def test_logistic_fit_separates_and_generalises():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] - 0.5 * x[:, 1] + 0.1 * rng.normal(size=400) > 0).astype(float)
    w = descriptor_study._logistic_fit(x[:300], y[:300])
    score = np.concatenate([x[300:], np.ones((100, 1))], 1) @ w
    assert metrics.roc_auc(score, y[300:]) > 0.97
    assert w[0] > 0 > w[1]  # The signs of the true weights.


def test_standardise_uses_train_statistics_and_fills_nan():
    train = np.array([[1.0, np.nan], [3.0, 2.0], [5.0, 4.0]])
    test = np.array([[np.nan, 10.0]])
    tr, te = descriptor_study._standardise(train, test)
    np.testing.assert_allclose(tr.mean(0), 0, atol=1e-12)
    assert np.isfinite(te).all()
    assert te[0, 0] == 0.0  # NaN -> train median 3 -> (3 - 3) / sd.


def test_auc_interval_brackets_known_answers():
    y = np.array([0] * 20 + [1] * 20)
    perfect = descriptor_study._auc_ci(y.astype(float), y, n_boot=200)
    assert perfect == [1.0, 1.0]
    rng = np.random.default_rng(0)
    lo, hi = descriptor_study._auc_ci(rng.normal(size=40), y, n_boot=200)
    assert lo < 0.5 < hi and hi - lo > 0.2


def test_floor_share_counts_every_lesion(tmp_path):
    from busi_jax import synthetic

    synthetic.generate(
        tmp_path, num_normal=1, num_benign=3, num_malignant=3, seed=5, duplicate_fraction=0.0
    )
    share = descriptor_study.floor_share(tmp_path)
    assert share["lesions"] == 6
    assert 0.0 <= share["share_half_black"] <= share["share_third_black"] <= 1.0
    assert share["half_black"] == round(6 * share["share_half_black"])
    assert 0 <= share["texture_not_visible"] <= 6


def test_pooled_agreement_weights_by_lesions_and_judged_share():
    a = {
        "original": {"heterogeneous": {"agreement": 1.0, "judged": 0.5, "all_cases": 0.5, "n": 10}}
    }
    b = {
        "original": {"heterogeneous": {"agreement": 0.5, "judged": 1.0, "all_cases": 0.5, "n": 30}}
    }
    pooled = descriptor_study.pooled_agreement({"a": a, "b": b})["original"]["heterogeneous"]
    assert pooled["n"] == 40
    assert pooled["judged"] == pytest.approx(35 / 40)
    assert pooled["agreement"] == pytest.approx(20 / 35)
    assert pooled["all_cases"] == pytest.approx(20 / 40)


def test_study_swaps_in_another_classifier_and_refuses_a_wrong_one(tiny_pipeline, tiny_data_dir):
    from busi_jax import checkpoints
    from busi_jax import evaluate

    _, workdir, _ = tiny_pipeline
    manual = tiny_data_dir / "synthetic_manual" / "seed0_n6"
    parts = evaluate.resolve(workdir)
    base = descriptor_study.study(str(workdir), str(manual))
    # The pipeline's own classifier passed explicitly, beside a bare segmenter run.
    swapped = descriptor_study.study(
        str(parts["segmenter"]), str(manual), classifier_workdir=str(parts["classifier"])
    )
    for key in ("test_auc", "stack_weights_standardised", "n_lesion_scans"):
        np.testing.assert_equal(swapped[key], base[key])
    assert swapped["classifier_workdir"] == [str(parts["classifier"])]
    with pytest.raises(checkpoints.CheckpointError, match="holds a segmentation run"):
        descriptor_study.study(
            str(parts["segmenter"]), str(manual), classifier_workdir=str(parts["segmenter"])
        )
    with pytest.raises(checkpoints.CheckpointError, match="holds no classifier"):
        descriptor_study.study(str(parts["segmenter"]), str(manual))


def test_study_stacks_several_classifiers(tiny_pipeline, tiny_data_dir, tmp_path, monkeypatch):
    """Each classifier's logit joins the stack; the first is "the" classifier."""
    import shutil

    from busi_jax import checkpoints
    from busi_jax import evaluate

    _, workdir, _ = tiny_pipeline
    manual = tiny_data_dir / "synthetic_manual" / "seed0_n6"
    parts = evaluate.resolve(workdir)
    # A second run whose logits are the first's negated: known answers below.
    twin = tmp_path / "twin"
    shutil.copytree(parts["classifier"], twin)
    real = evaluate.classifier_logits

    flips = []

    def logits(run, tta=False):
        flips.append(tta)
        f = real(run, tta)
        return (lambda i, m: -f(i, m)) if pathlib.Path(run) == twin else f

    monkeypatch.setattr(evaluate, "classifier_logits", logits)
    one = descriptor_study.study(str(workdir), str(manual))
    two = descriptor_study.study(
        str(parts["segmenter"]), str(manual), classifier_workdir=f"{parts['classifier']},{twin},"
    )
    assert two["stack_inputs"] == ["descriptors", "classifier", "classifier_1"]
    assert two["classifier_workdir"] == [str(parts["classifier"]), str(twin)]
    assert len(two["stack_weights_standardised"]) == 4  # three inputs and a bias
    auc = two["test_auc"]
    assert auc["classifier_1"] == pytest.approx(1 - auc["classifier"])
    # Standardised on validation, -logit is minus the logit's score: the mean
    # of the three inputs is the descriptor score over three.
    assert auc["mean_of_stack_inputs"] == pytest.approx(auc["descriptors_logistic"])
    for key in ("classifier", "descriptors_logistic", "classifier_plus_descriptors_logistic"):
        assert auc[key] == one["test_auc"][key]
    assert flips == [False] * 3 and two["classifier_tta"] == "none"
    # --classifier_tta reaches every CNN of the stack, and the report says so.
    flipped = descriptor_study.study(
        str(parts["segmenter"]), str(manual), classifier_workdir=str(twin), classifier_tta=True
    )
    assert flips[3:] == [True] and flipped["classifier_tta"].startswith("horizontal flip")
    with pytest.raises(checkpoints.CheckpointError, match="repeated"):
        descriptor_study.study(
            str(parts["segmenter"]),
            str(manual),
            classifier_workdir=[str(parts["classifier"]), str(parts["classifier"]) + "/"],
        )


def test_study_refuses_a_cross_validation_run(tiny_pipeline, tiny_data_dir, tmp_path):
    """Its stack is fitted on validation, which a fold run mostly trained on."""
    import json
    import shutil

    from busi_jax import checkpoints
    from busi_jax import evaluate

    _, workdir, _ = tiny_pipeline
    parts = evaluate.resolve(workdir)
    fold = tmp_path / "fold1"
    shutil.copytree(parts["segmenter"], fold)
    cfg = json.loads((fold / "config.json").read_text())
    cfg["data"]["cv_fold"] = 1
    (fold / "config.json").write_text(json.dumps(cfg))
    manual = tiny_data_dir / "synthetic_manual" / "seed0_n6"
    with pytest.raises(checkpoints.CheckpointError, match="is a cross-validation run"):
        descriptor_study.study(str(fold), str(manual), classifier_workdir=str(parts["classifier"]))
    # A classifier from a fold run does not pass as trained on the same splits either.
    with pytest.raises(checkpoints.CheckpointError, match="other data or splits"):
        evaluate.check_same_splits(
            evaluate.inference.load_config(parts["segmenter"]), fold, "--x", "segmentation"
        )
