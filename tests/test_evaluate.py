"""The evaluate command: JSON report, per-scan CSV, plots, on a split or a folder; bad folders."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from busi_jax import evaluate, inference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _manual_dir(tiny_data_dir):
    return next((pathlib.Path(tiny_data_dir) / "synthetic_manual").iterdir())


def test_evaluate_pipeline_on_test_split(tiny_pipeline, tmp_path):
    _, workdir, _ = tiny_pipeline
    out = tmp_path / "eval" / "report.json"
    report = evaluate.evaluate(workdir, output=str(out), n_boot=50)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    seg, cls = saved["segmentation"], saved["classification"]
    for key in ("lesion_dice", "lesion_iou", "dice_all", "iou_all", "pixel_accuracy", "hd95"):
        assert set(seg[key]) == {"mean", "ci95"}
    for key in ("auc", "accuracy", "sensitivity", "specificity", "f1", "ece"):
        assert set(cls[key]) == {"mean", "ci95"}
    assert cls["masks"] == "predicted"
    assert len(cls["confusion"]) == 2
    proto = saved["protocol"]
    assert proto["segmenter_checkpoint_step"] > 0 and "postprocess" in proto
    assert "Data in Brief 28" in saved["citation"]
    rows = list(csv.DictReader((tmp_path / "eval" / "report_per_scan.csv").open()))
    assert len(rows) == sum(proto["scans_per_class"].values())
    assert {"file", "class", "lesion", "dice", "iou", "malignancy_probability"} <= set(rows[0])
    lesion = [r for r in rows if r["lesion"] == "1"]
    assert len(lesion) == seg["n_lesion_scans"]
    assert np.mean([float(r["dice"]) for r in lesion]) == pytest.approx(
        seg["lesion_dice"]["mean"], abs=1e-5
    )
    for name in (
        "contours",
        "pixel_confusion",
        "class_confusion",
        "reliability",
        "roc_pr",
        "gradcam",
    ):
        png = tmp_path / "eval" / f"report_{name}.png"
        assert png.exists() and png.stat().st_size > 1000, name
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.startswith(".")]


def test_evaluate_on_a_folder(tiny_pipeline, tiny_data_dir, tmp_path):
    _, workdir, _ = tiny_pipeline
    out = tmp_path / "folder.json"
    report = evaluate.evaluate(
        workdir,
        data_dir=str(_manual_dir(tiny_data_dir)),
        output=str(out),
        n_boot=20,
        plots_enabled=False,
    )
    n = sum(report["protocol"]["scans_per_class"].values())
    assert n >= 16 and out.exists()


def _run_cli(args):
    return subprocess.run(
        [sys.executable, "-m", "busi_jax.evaluate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )


@pytest.mark.parametrize("fault", ["corrupt", "orphan_mask", "size_mismatch", "empty_class"])
def test_evaluate_bad_folder_one_line_error(tiny_pipeline, tmp_path, fault):
    import shutil

    from PIL import Image

    _, workdir, _ = tiny_pipeline
    src = (
        pathlib.Path(__file__).resolve().parents[1]
        / "tfds_busi"
        / "dummy_data"
        / "Dataset_BUSI_with_GT"
    )
    folder = tmp_path / "data"
    shutil.copytree(src, folder)
    bad = folder / "benign" / "benign (1).png"
    if fault == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
    elif fault == "orphan_mask":
        shutil.copy(folder / "benign" / "benign (1)_mask.png", folder / "benign" / "ghost_mask.png")
        bad = folder / "benign" / "ghost_mask.png"
    elif fault == "size_mismatch":
        bad = folder / "benign" / "benign (1)_mask.png"
        Image.new("L", (7, 5)).save(bad)
    else:
        for f in (folder / "normal").iterdir():
            f.unlink()
        bad = folder / "normal"
    out = tmp_path / "out" / "r.json"
    r = _run_cli([f"--workdir={workdir}", f"--data_dir={folder}", f"--output={out}"])
    assert r.returncode == 1, r.stderr[-2000:]
    assert str(bad) in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_ensemble_of_a_model_with_itself_scores_as_the_model(tiny_pipeline, tmp_path):
    _, workdir, _ = tiny_pipeline
    seg = pathlib.Path(workdir) / "segmenter"
    kw = dict(n_boot=0, plots_enabled=False)
    single = evaluate.evaluate(seg, output=str(tmp_path / "one.json"), **kw)
    double = evaluate.evaluate(seg, output=str(tmp_path / "two.json"), ensemble=[seg], **kw)
    assert double["protocol"]["ensemble"] == [os.fspath(seg)]
    assert double["protocol"]["ensemble_checkpoint_steps"] == [
        single["protocol"]["segmenter_checkpoint_step"]
    ]
    for key in ("lesion_dice", "dice_all", "pixel_accuracy"):
        assert double["segmentation"][key]["mean"] == pytest.approx(
            single["segmentation"][key]["mean"], abs=1e-6
        )


def test_ensemble_averages_its_members(tiny_pipeline, tmp_path, monkeypatch):
    # A member that is sure of a lesion everywhere lifts every averaged pixel
    # to >= 0.5: at the fixed 0.5 threshold every pixel becomes lesion.
    _, workdir, _ = tiny_pipeline
    seg = pathlib.Path(workdir) / "segmenter"
    member = tmp_path / "member"
    shutil.copytree(seg, member)
    real = evaluate.segmenter_probs

    def fake(path, tta=False, checkpoint="best"):
        if pathlib.Path(path) == member:
            return lambda images: np.ones(images.shape[:3], np.float32)
        return real(path, tta, checkpoint=checkpoint)

    monkeypatch.setattr(evaluate, "segmenter_probs", fake)
    report = evaluate.evaluate(
        seg, ensemble=[member], postprocess="none", n_boot=0, plots_enabled=False
    )
    assert report["segmentation"]["pixel_recall"]["mean"] == pytest.approx(1.0)
    assert report["segmentation"]["pixel_accuracy"]["mean"] < 0.5
    # The default output never overwrites the run's own report.
    assert (seg / "eval" / "test_ensemble.json").exists()


def _as_cv_run(src, dst, fold):
    """A copy of a segmenter workdir relabelled as the run holding out ``fold``."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["data"]["cv_fold"] = fold
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_cross_validation_ensemble_tunes_on_out_of_fold_predictions(
    tiny_pipeline, tmp_path, monkeypatch
):
    from busi_jax import data, inference

    _, workdir, _ = tiny_pipeline
    seg = pathlib.Path(workdir) / "segmenter"
    runs = {f: _as_cv_run(seg, tmp_path / f"fold{f}", f) for f in (1, 3)}
    # Each run predicts a constant, so the tuning masks show which run
    # predicted which scan: fold 1's run says lesion everywhere, fold 3's nowhere.
    const = {runs[1]: 0.9, runs[3]: 0.3}
    monkeypatch.setattr(
        evaluate,
        "segmenter_probs",
        lambda path, tta=False, checkpoint="best": (
            lambda im: np.full(im.shape[:3], const[pathlib.Path(path)])
        ),
    )
    report = evaluate.evaluate(
        runs[1], ensemble=[runs[3]], postprocess="none", n_boot=0, plots_enabled=False
    )
    pool = data.load_pool(inference.load_config(runs[1]).data)
    held = data.select_folds(pool, [1, 3])
    truth = held["mask"][..., 0] > 0
    expected = np.where(
        held["fold"] == 1,
        np.where(truth.any(axis=(1, 2)), 2 * truth.mean((1, 2)) / (truth.mean((1, 2)) + 1), 0.0),
        np.where(truth.any(axis=(1, 2)), 0.0, 1.0),
    )
    protocol = report["protocol"]
    assert protocol["tuning_scans"] == len(held["label"]) > 0
    assert protocol["tuning_dice_all"] == pytest.approx(expected.mean())
    assert "out-of-fold" in protocol["tuned_on"] and "[1, 3]" in protocol["tuned_on"]
    # On test, the members' average (0.6) passes the threshold everywhere.
    assert report["segmentation"]["pixel_recall"]["mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["same_fold", "mixed", "scored_on_validation"])
def test_cross_validation_ensemble_misuse_is_one_clear_error(tiny_pipeline, tmp_path, case):
    from busi_jax import checkpoints

    _, workdir, _ = tiny_pipeline
    seg = pathlib.Path(workdir) / "segmenter"
    first = _as_cv_run(seg, tmp_path / "a", 2)
    kw = dict(n_boot=0, plots_enabled=False)
    if case == "scored_on_validation":
        # The fold runs trained on most of validation: no score on it.
        other = _as_cv_run(seg, tmp_path / "b", 3)
        with pytest.raises(checkpoints.CheckpointError, match="--split=validation: cross-valid"):
            evaluate.evaluate(first, split="validation", ensemble=[other], **kw)
        return
    other = _as_cv_run(seg, tmp_path / "b", 2) if case == "same_fold" else seg
    with pytest.raises(checkpoints.CheckpointError, match="different fold"):
        evaluate.evaluate(first, ensemble=[other], **kw)


def test_classifier_paired_with_another_segmenter(tiny_pipeline, tmp_path):
    _, workdir, _ = tiny_pipeline
    workdir = pathlib.Path(workdir)
    other = tmp_path / "other_segmenter"
    shutil.copytree(workdir / "segmenter", other)
    kw = dict(n_boot=0, plots_enabled=False)
    pipe = evaluate.evaluate(workdir, output=str(tmp_path / "pipe.json"), **kw)
    paired = evaluate.evaluate(
        workdir / "classifier", output=str(tmp_path / "paired.json"), segmenter_workdir=other, **kw
    )
    assert paired["protocol"]["segmenter_workdir"] == os.fspath(other)
    assert paired["classification"]["masks"] == "predicted"
    # The copy holds the same weights: the same masks, the same scores.
    assert paired["classification"]["auc"]["mean"] == pytest.approx(
        pipe["classification"]["auc"]["mean"]
    )


def test_runs_pair_across_data_locations_but_not_across_data(
    tiny_pipeline, tiny_data_dir, tmp_path
):
    """A run trained on a copy of the same build elsewhere pairs; one on other scans does not."""
    from busi_jax import checkpoints, data, train

    _, workdir, _ = tiny_pipeline
    workdir = pathlib.Path(workdir)
    cls_config = evaluate.inference.load_config(workdir / "classifier")
    saved = json.loads((workdir / "segmenter" / train.DATA_FINGERPRINT).read_text())
    assert saved == data.fingerprint(cls_config.data)
    assert set(saved) == {"train", "validation", "test"}
    # The segmenter as if trained on a GPU host: the same build copied elsewhere.
    moved_data = tmp_path / "elsewhere" / "tfds"
    shutil.copytree(tiny_data_dir, moved_data)
    moved = tmp_path / "moved_segmenter"
    shutil.copytree(workdir / "segmenter", moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["data"]["data_dir"] = str(moved_data)
    (moved / "config.json").write_text(json.dumps(cfg))
    evaluate.check_same_splits(cls_config, moved, "--segmenter_workdir", "segmentation")
    # Trained on a build holding other scans: refused, wherever it lives.
    other = dict(saved, test="0" * 16)
    (moved / train.DATA_FINGERPRINT).write_text(json.dumps(other))
    with pytest.raises(checkpoints.CheckpointError, match="other data or splits.*other scans"):
        evaluate.check_same_splits(cls_config, moved, "--segmenter_workdir", "segmentation")


@pytest.mark.parametrize("case", ["member_not_segmenter", "pair_without_classifier"])
def test_ensemble_and_pairing_misuse_one_line_error(tiny_pipeline, tmp_path, case):
    from busi_jax import checkpoints

    _, workdir, _ = tiny_pipeline
    workdir = pathlib.Path(workdir)
    kw = dict(output=str(tmp_path / "x.json"), n_boot=0, plots_enabled=False)
    if case == "member_not_segmenter":
        with pytest.raises(checkpoints.CheckpointError, match="--ensemble: .* not segmentation"):
            evaluate.evaluate(workdir / "segmenter", ensemble=[workdir / "classifier"], **kw)
    else:
        with pytest.raises(checkpoints.CheckpointError, match="holds no classifier"):
            evaluate.evaluate(workdir / "segmenter", segmenter_workdir=workdir / "segmenter", **kw)


@pytest.fixture
def tiny_multitask(tiny_config, tmp_path):
    """A 1-epoch width-4 multitask workdir on the tiny dataset."""
    from busi_jax import train
    from configs import multitask

    config = multitask.get_config()
    config.data = tiny_config.data
    for field in ("batch_size", "eval_batch_size", "progress"):
        config[field] = tiny_config[field]
    config.num_epochs = 1
    config.model.features, config.model.depth, config.model.cls_hidden = 4, 2, 8
    workdir = tmp_path / "multitask"
    train.train_and_evaluate(config, workdir)
    return workdir


def test_multitask_ensemble_averages_logits_and_probabilities(
    tiny_multitask, tmp_path, monkeypatch
):
    member = tmp_path / "member"
    shutil.copytree(tiny_multitask, member)
    real = evaluate.multitask_outputs

    def fake(path, tta=False, checkpoint="best"):
        run = real(path, tta, checkpoint=checkpoint)
        if pathlib.Path(path) != member:
            return run

        def mirrored(images):
            probs, logits = run(images)
            return np.ones_like(probs), -logits  # cancels the first member's logits

        return mirrored

    monkeypatch.setattr(evaluate, "multitask_outputs", fake)
    report = evaluate.evaluate(
        tiny_multitask, ensemble=[member], postprocess="none", n_boot=0, plots_enabled=False
    )
    assert report["classification"]["auc"]["mean"] == pytest.approx(0.5)  # all logits 0: ties
    assert report["segmentation"]["pixel_recall"]["mean"] == pytest.approx(1.0)
    assert report["protocol"]["ensemble"] == [os.fspath(member)]


def test_classifier_tta_averages_the_logits_of_the_scan_and_its_mirror(tiny_pipeline):
    _, workdir, _ = tiny_pipeline
    cls = pathlib.Path(workdir) / "classifier"
    size = int(inference.load_config(cls).data.image_size)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, size, size, 1), dtype=np.uint8)
    masks = (rng.random((3, size, size, 1)) > 0.7).astype(np.uint8)
    plain = evaluate.classifier_logits(cls)
    flipped = plain(images[:, :, ::-1], masks[:, :, ::-1])
    tta = evaluate.classifier_logits(cls, tta=True)(images, masks)
    np.testing.assert_allclose(tta, (plain(images, masks) + flipped) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(tta, plain(images, masks))  # The mirror changes this network's logits.
    # A scan and mask that are their own mirror image score as without it.
    half = size // 2
    sym_i = np.concatenate([images[:, :, :half], images[:, :, :half][:, :, ::-1]], axis=2)
    sym_m = np.concatenate([masks[:, :, :half], masks[:, :, :half][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(
        evaluate.classifier_logits(cls, tta=True)(sym_i, sym_m), plain(sym_i, sym_m), rtol=1e-5
    )


def test_evaluate_with_classifier_tta_records_it(tiny_pipeline, tmp_path):
    _, workdir, _ = tiny_pipeline
    kw = dict(n_boot=0, plots_enabled=False)
    plain = evaluate.evaluate(workdir, output=str(tmp_path / "plain.json"), **kw)
    tta = evaluate.evaluate(workdir, output=str(tmp_path / "tta.json"), classifier_tta=True, **kw)
    assert plain["protocol"]["classifier_tta"] == "none"
    assert tta["protocol"]["classifier_tta"] == "horizontal flip averaging of logits"
    assert tta["protocol"]["tta"] == "none"  # The masks are the same: only the CNN is flipped.
    assert tta["segmentation"]["lesion_dice"] == plain["segmentation"]["lesion_dice"]
    assert 0.0 <= tta["classification"]["auc"]["mean"] <= 1.0
    # Without a classifier the option is one clear error, not silently ignored.
    with pytest.raises(ValueError, match="--classifier_tta: .* holds no classifier"):
        evaluate.evaluate(pathlib.Path(workdir) / "segmenter", classifier_tta=True, **kw)


def test_last_checkpoint_is_the_weights_the_run_ended_with(tiny_data_dir, tmp_path):
    import jax
    import orbax.checkpoint as ocp
    from conftest import tiny_demo_config

    from busi_jax import train

    config = tiny_demo_config(tiny_data_dir, epochs=2)
    config.ema_decay = 0.9
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir)
    _, _, last = inference.load_model(workdir, checkpoint="last")
    mgr = ocp.CheckpointManager((workdir / "checkpoints" / "latest").resolve())
    step = mgr.latest_step()
    raw = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mgr.close()
    got = jax.tree.leaves(last["params"])
    for a, b in zip(got, jax.tree.leaves(raw["ema_params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # EMA weights, as training evaluated them, not the raw parameters.
    assert any(not np.array_equal(a, b) for a, b in zip(got, jax.tree.leaves(raw["params"])))
    for a, b in zip(jax.tree.leaves(last["batch_stats"]), jax.tree.leaves(raw["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    report = evaluate.evaluate(workdir, n_boot=0, plots_enabled=False, checkpoint="last")
    assert report["protocol"]["segmenter_checkpoint_step"] == step
    assert report["protocol"]["checkpoint"].startswith("last")
    assert (workdir / "eval" / "test_last.json").exists()
    assert (workdir / "eval" / "test_last_per_scan.csv").exists()
    with pytest.raises(ValueError, match="checkpoint='final' is not valid"):
        inference.load_model(workdir, checkpoint="final")
    with pytest.raises(ValueError, match="--checkpoint must be one of"):
        evaluate.evaluate(workdir, checkpoint="final")
