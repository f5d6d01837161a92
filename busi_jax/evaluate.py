"""Evaluates a training workdir on the test split or on any BUSI-layout folder.

    python -m busi_jax.evaluate --workdir=DIR [--data_dir=FOLDER] [--output=FILE.json]
        [--split=test] [--tta] [--classifier_tta] [--postprocess=auto|none] [--n_boot=1000]
        [--segmenter_workdir=SEG_DIR] [--ensemble=DIR2,DIR3] [--checkpoint=best|last]

DIR may be a segmenter, classifier, multitask or pipeline workdir. One JSON
holds the segmentation metrics (lesion Dice/IoU, all-scan Dice/IoU with the
empty-mask rule, pixel scores, HD95), the benign-vs-malignant metrics from
*predicted* masks (AUC, accuracy, sensitivity, specificity, F1, confusion
matrix, calibration), each with a 95% bootstrap interval, and the protocol; a
CSV beside it holds one row per scan, and PNG plots sit next to both.

Everything that is tuned -- the post-processing of predicted masks and the
classifier's temperature -- is chosen on the dataset's ``validation`` split,
never on the data being scored.

``--segmenter_workdir`` pairs a classifier with another segmenter (and scores
one trained on ground-truth masks on predicted ones); ``--ensemble`` averages
the lesion probabilities of several segmenters (or the probabilities and
logits of several multitask runs) trained on the same splits.

Cross-validation runs (``data.cv_fold``) passed as ``--workdir=FOLD0
--ensemble=FOLD1,...`` are averaged on test, and post-processing is chosen
on their out-of-fold predictions of train + validation. A classifier trained
on such runs' out-of-fold masks (``classifier.segmenter_workdir=FOLD0,...``)
is scored on the same fold ensemble's test masks, its temperature set on the
validation split's out-of-fold masks.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import pathlib
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from busi_jax import checkpoints as ckpt_lib
from busi_jax import data as data_lib
from busi_jax import evalmetrics
from busi_jax import gradcam
from busi_jax import inference
from busi_jax import io as busi_io
from busi_jax import models as models_lib
from busi_jax import plots
from busi_jax import postprocess as pp
from busi_jax import train as train_lib

CITATION = (
    "BUSI: W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, Dataset of breast ultrasound images,"
    " Data in Brief 28 (2020) 104863 (CC BY 4.0)."
)


# --- Which models a workdir holds ---------------------------------------------


def resolve(
    workdir: str | os.PathLike[str], fold_runs_ok: bool = False
) -> dict[str, pathlib.Path | None]:
    """Finds the segmenter and classifier workdirs behind ``workdir``.

    Args:
      workdir: a training or pipeline workdir.
      fold_runs_ok: accept a classifier trained on the out-of-fold masks of
        several cross-validation runs (``segmenter`` is then the first;
        :func:`evaluate` adds the others). Other callers deploy one
        segmenter and get an error instead of silently using one fold.

    Returns:
      ``{'segmenter': path or None, 'classifier': path or None, 'multitask':
      path or None}``.

    Raises:
      ckpt_lib.CheckpointError: ``workdir`` is not a training workdir, or
        (without ``fold_runs_ok``) its classifier names several fold runs.
    """
    workdir = pathlib.Path(workdir).expanduser()
    out: dict[str, pathlib.Path | None] = {"segmenter": None, "classifier": None, "multitask": None}
    final = workdir / "final_metrics.json"
    if (workdir / "classifier" / "config.json").exists():  # A pipeline workdir.
        seg = workdir / "segmenter"
        if final.exists():
            seg = pathlib.Path(json.loads(final.read_text()).get("segmenter_workdir", seg))
        out["segmenter"], out["classifier"] = seg, workdir / "classifier"
        return out
    config = inference.load_config(workdir)
    if config.task == "segmentation":
        out["segmenter"] = workdir
    elif config.task == "multitask":
        out["multitask"] = workdir
    elif config.task == "classification":
        out["classifier"] = workdir
        if "predicted" in (config.classifier.mask_source, inference.validation_mask_source(config)):
            runs = inference.segmenter_workdirs(config.classifier.segmenter_workdir)
            if len(runs) > 1 and not fold_runs_ok:
                raise ckpt_lib.CheckpointError(
                    f"{workdir}: its classifier was trained on the out-of-fold masks of"
                    f" {len(runs)} cross-validation runs; this command takes one segmenter"
                    " (python -m busi_jax.evaluate scores the fold ensemble)"
                )
            out["segmenter"] = runs[0] if runs else None
    return out


# --- Prediction ------------------------------------------------------------------


def _batched(fn: Callable, arrays: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Applies a jitted ``fn(*batch)`` over fixed-size (padded) batches."""
    n = len(arrays[0])
    outs = []
    for start in range(0, n, batch_size):
        chunk = [a[start : start + batch_size] for a in arrays]
        pad = batch_size - len(chunk[0])
        if pad:
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
        outs.append(np.asarray(fn(*chunk))[: batch_size - pad])
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def segmenter_probs(
    workdir, tta: bool = False, checkpoint: str = "best"
) -> Callable[[np.ndarray], np.ndarray]:
    """``images [N, S, S, 1] uint8 -> lesion probabilities [N, S, S]``."""
    config, model, variables = inference.load_model(workdir, checkpoint=checkpoint)

    @jax.jit
    def prob(images):
        x = images.astype(jnp.float32) / 255.0

        def once(x):
            out = model.apply(variables, x, train=False)
            if isinstance(out, tuple):
                out = out[0]
            if out.ndim == 5:
                out = out.mean(axis=0)
            return jax.nn.sigmoid(out.astype(jnp.float32))

        p = once(x)
        if tta:  # Horizontal flips are label-preserving for breast ultrasound.
            p = (p + jnp.flip(once(jnp.flip(x, axis=2)), axis=2)) / 2
        return p[..., 0]

    return lambda images: _batched(prob, [images])


def classifier_logits(
    workdir, tta: bool = False, checkpoint: str = "best"
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``(images, masks) [N, S, S, 1] uint8 -> logits [N] (or [N, C])``.

    Args:
      workdir: a classifier run.
      tta: average the logits of each scan and its horizontal mirror (scan
        and mask mirrored together, before any close-up crop), as the
        segmenters' ``tta`` averages their probabilities. Logits, not
        probabilities, so that a temperature fitted afterwards scales both.
    """
    config, model, variables = inference.load_model(workdir, checkpoint=checkpoint)
    mode = config.classifier.input_mode

    @jax.jit
    def logits(images, masks):
        def once(images, masks):
            x = models_lib.classifier_inputs(
                images.astype(jnp.float32) / 255.0, masks.astype(jnp.float32), mode
            )
            return model.apply(variables, x, train=False).astype(jnp.float32)

        out = once(images, masks)
        if tta:  # [N, S, S, 1]: axis 2 is the scan's width.
            out = (out + once(jnp.flip(images, axis=2), jnp.flip(masks, axis=2))) / 2
        return out

    return lambda images, masks: _batched(logits, [images, masks])


def multitask_outputs(workdir, tta: bool = False, checkpoint: str = "best"):
    """``images -> (lesion probabilities [N, S, S], malignancy logits [N])``."""
    config, model, variables = inference.load_model(workdir, checkpoint=checkpoint)

    @jax.jit
    def both(images):
        x = images.astype(jnp.float32) / 255.0
        seg, cls = model.apply(variables, x, train=False)
        p = jax.nn.sigmoid(seg.astype(jnp.float32))
        if tta:
            seg2, _ = model.apply(variables, jnp.flip(x, axis=2), train=False)
            p = (p + jnp.flip(jax.nn.sigmoid(seg2.astype(jnp.float32)), axis=2)) / 2
        return jnp.concatenate([p[..., 0].reshape(p.shape[0], -1), cls.reshape(-1, 1)], axis=1)

    def run(images):
        out = _batched(both, [images])
        s = images.shape[1]
        return out[:, :-1].reshape(-1, s, s), out[:, -1]

    return run


# --- Data ------------------------------------------------------------------------


def load_folder(folder: str | os.PathLike[str], size: int) -> dict[str, np.ndarray]:
    """Reads a BUSI-layout folder at model size, with the same checks as the builder."""
    records = busi_io.list_scans(folder)
    images, masks, labels, names = [], [], [], []
    for record, image, mask in busi_io.read_examples(records):
        images.append(busi_io.resize_image(image, size)[..., None])
        masks.append(busi_io.resize_mask(mask, size)[..., None].astype(np.uint8))
        labels.append(busi_io.CLASS_NAMES.index(record.label))
        names.append(record.file_name)
    return {
        "image": np.stack(images),
        "mask": np.stack(masks),
        "label": np.array(labels, np.int32),
        "file_name": np.array(names),
    }


# --- Evaluation ---------------------------------------------------------------------


def evaluate(
    workdir: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    split: str = "test",
    output: str | None = None,
    tta: bool = False,
    postprocess: str = "auto",
    n_boot: int = 1000,
    plots_enabled: bool = True,
    segmenter_workdir: str | os.PathLike[str] | None = None,
    ensemble: Sequence[str | os.PathLike[str]] = (),
    classifier_tta: bool = False,
    checkpoint: str = "best",
) -> dict:
    """Scores ``workdir``'s best (or last) checkpoint(s); see the module docstring.

    Args:
      tta: average the segmenter's (or multitask net's) lesion probabilities
        over horizontal flips.
      classifier_tta: average the classifier's logits over horizontal flips
        of scan and mask (:func:`classifier_logits`); validation and test
        alike, so the temperature is fitted to what is scored.
      segmenter_workdir: a segmenter run whose predicted masks replace those of
        the workdir's own segmenter; a classifier trained on ground-truth masks
        is then scored on these predicted masks (a deployable score).
      ensemble: further segmenter (or, for a multitask workdir, multitask)
        runs on the same data and splits; their lesion probabilities (and
        multitask logits) are averaged with the workdir's before
        post-processing (which is then chosen on validation for the average).
      checkpoint: 'best' (what validation picked) or 'last' (what each run
        ended with), for every run scored; 'last' adds ``_last`` to the
        default report name.

    Returns:
      The report written to ``output`` (default ``workdir/eval/<split>.json``).
    """
    if postprocess not in ("auto", "none"):
        raise ValueError(f"--postprocess must be 'auto' or 'none', got {postprocess!r}")
    if checkpoint not in inference.CHECKPOINTS:
        raise ValueError(f"--checkpoint must be one of {inference.CHECKPOINTS}, got {checkpoint!r}")
    workdir = pathlib.Path(workdir).expanduser()
    parts = resolve(workdir, fold_runs_ok=True)
    if classifier_tta and not parts["classifier"]:
        raise ValueError(
            f"--classifier_tta: {workdir} holds no classifier run (a multitask net's"
            " flips are --tta)"
        )
    forced_masks = segmenter_workdir is not None
    if forced_masks:
        if not parts["classifier"]:
            raise ckpt_lib.CheckpointError(
                f"--segmenter_workdir pairs a classifier with a segmenter: {workdir} holds no"
                " classifier (to score a segmenter, pass it as --workdir)"
            )
        parts["segmenter"] = pathlib.Path(segmenter_workdir).expanduser()
        check_same_splits(
            inference.load_config(parts["classifier"]),
            parts["segmenter"],
            "--segmenter_workdir",
            "segmentation",
        )
    oof_runs = [] if forced_masks else _classifier_fold_runs(parts)
    if oof_runs:
        if ensemble:
            raise ckpt_lib.CheckpointError(
                f"--ensemble: {workdir}'s classifier was trained on the out-of-fold masks of"
                " its own cross-validation runs, which are its segmenter ensemble"
            )
        ensemble = oof_runs[1:]
    main = parts["segmenter"] or parts["multitask"] or parts["classifier"]
    config = inference.load_config(main)
    members = _ensemble_members(parts, config, ensemble)
    size = int(config.data.image_size)
    name = pathlib.Path(data_dir).name if data_dir else split
    if members:
        name += "_ensemble"  # Never overwrite the run's own report.
    if forced_masks:
        name += f"_on_{parts['segmenter'].name}"
    if checkpoint == "last":
        name += "_last"
    out_json = pathlib.Path(output) if output else workdir / "eval" / f"{name}.json"
    out_dir = out_json.parent
    stem = out_json.stem

    runs = [r for r in (parts["segmenter"] or parts["multitask"],) if r] + members
    cv_folds = _cv_folds(runs, parts, oof_classifier=bool(oof_runs))
    if cv_folds is None:
        val = data_lib.load_split(config.data, "validation")
    else:
        # Out-of-fold: each held-out fold is predicted by the run that did not
        # train on it, so tuning sees no scan any scoring model fitted.
        val = data_lib.select_folds(data_lib.load_pool(config.data), cv_folds)
    target = load_folder(data_dir, size) if data_dir else data_lib.load_split(config.data, split)
    if cv_folds is not None and not data_dir and (target["fold"] >= 0).any():
        raise ckpt_lib.CheckpointError(
            f"--split={split}: cross-validation runs trained on most of train + validation;"
            " score them on 'test' or a --data_dir"
        )

    seg_fn = cls_fn = None
    run_seg_fns: list = []  # One probability function per run, for out-of-fold tuning.
    if parts["multitask"]:
        mts = [
            multitask_outputs(m, tta, checkpoint=checkpoint) for m in [parts["multitask"], *members]
        ]

        def mt(im):
            # Members average probabilities and logits alike.
            outs = [f(im) for f in mts]
            return tuple(np.mean([o[i] for o in outs], axis=0) for i in (0, 1))

        seg_fn = lambda im: mt(im)[0]  # noqa: E731
        run_seg_fns = [lambda im, f=f: f(im)[0] for f in mts]
        mt_logits = lambda im, _m: mt(im)[1]  # noqa: E731
        cls_fn = mt_logits
    if parts["segmenter"]:
        seg_fn = segmenter_probs(parts["segmenter"], tta, checkpoint=checkpoint)
        run_seg_fns = [seg_fn]
        if members:
            run_seg_fns += [segmenter_probs(m, tta, checkpoint=checkpoint) for m in members]
            seg_fn = lambda im: np.mean([f(im) for f in run_seg_fns], axis=0)  # noqa: E731
    if parts["classifier"]:
        cls_fn = classifier_logits(parts["classifier"], classifier_tta, checkpoint=checkpoint)

    report: dict = {"citation": CITATION if not data_dir else None}
    protocol = {
        "workdir": os.fspath(workdir),
        "data": os.fspath(data_dir) if data_dir else f"busi/{size} split '{split}'",
        "resolution": f"{size}x{size} (masks resized by area-weighted resampling, threshold 0.5)",
        "scans_per_class": {
            c: int((target["label"] == i).sum()) for i, c in enumerate(busi_io.CLASS_NAMES)
        },
        "tta": "horizontal flip averaging" if tta else "none",
        "classifier_tta": "horizontal flip averaging of logits" if classifier_tta else "none",
        "segmenter_workdir": os.fspath(parts["segmenter"]) if parts["segmenter"] else None,
        "ensemble": [os.fspath(m) for m in members],
        "tuned_on": (
            "validation split (post-processing, temperature)"
            if cv_folds is None
            else f"out-of-fold predictions of cross-validation folds {cv_folds} of"
            " train + validation (post-processing)"
        ),
        "bootstrap": f"{n_boot} percentile resamples of scans, seed 0",
        "checkpoint": (
            "best on validation"
            if checkpoint == "best"
            else "last (the weights each run ended with)"
        ),
    }

    def step_of(path):
        ck = ckpt_lib.Checkpoints(path)
        try:
            return ck.best_step() if checkpoint == "best" else ck.latest_step()
        finally:
            ck.close()

    for role, path in parts.items():
        if path is not None:
            protocol[f"{role}_checkpoint_step"] = step_of(path)
    protocol["ensemble_checkpoint_steps"] = [step_of(m) for m in members]
    per_scan = {
        "file": target["file_name"],
        "class": [busi_io.CLASS_NAMES[i] for i in target["label"]],
    }

    # Each split goes through the segmenter once; its masks serve both the
    # segmentation scores and the classifier.
    pred_masks = val_masks = None
    if seg_fn is not None:
        pp_cfg = pp.PostprocessConfig(threshold=float(config.get("threshold", 0.5)))
        if cv_folds is None:
            val_probs = seg_fn(val["image"])
        else:
            val_probs = np.zeros(val["mask"].shape[:-1], np.float32)
            for fold, fn in zip(cv_folds, run_seg_fns):
                rows = val["fold"] == fold
                val_probs[rows] = fn(val["image"][rows])
        val_truth = val["mask"][..., 0] > 0
        if postprocess == "auto":
            pp_cfg, _ = pp.choose_on_validation(val_probs, val_truth)
        protocol["postprocess"] = pp_cfg.describe()
        # Model selection reads these, never the test scores.
        tuned = evalmetrics.dice_per_scan(pp.apply(val_probs, pp_cfg), val_truth)
        protocol["tuning_scans"] = len(tuned)
        protocol["tuning_dice_all"] = float(tuned.mean())
        lesion_rows = val_truth.any(axis=(1, 2))
        protocol["tuning_lesion_dice"] = (
            float(tuned[lesion_rows].mean()) if lesion_rows.any() else None
        )
        val_masks = pp.apply(val_probs, pp_cfg)
        pred_masks = pp.apply(seg_fn(target["image"]), pp_cfg)
        truth = target["mask"][..., 0] > 0
        seg_report = evalmetrics.segmentation_report(pred_masks, truth, n_boot=n_boot)
        scores = seg_report.pop("per_scan")
        report["segmentation"] = seg_report
        # Which rows count for lesion Dice, so a CSV alone can be compared (busi_jax.compare).
        per_scan["lesion"] = truth.any(axis=(1, 2)).astype(int)
        per_scan["dice"] = scores["dice"]
        per_scan["iou"] = scores["iou"]
        per_scan["hd95"] = scores["hd95"]
        if plots_enabled:
            _segmentation_plots(out_dir, stem, target, truth, pred_masks, scores, seg_report)

    if cls_fn is not None:
        cls_val, cls_val_masks = val, val_masks
        if cv_folds is not None:
            # The classifier fitted the train split's scans: only the
            # validation split's out-of-fold masks are new to it.
            eval_split = data_lib.load_split(config.data, config.data.eval_split)
            keep = np.isin(val["file_name"], eval_split["file_name"])
            cls_val = {k: v[keep] for k, v in val.items()}
            cls_val_masks = None if val_masks is None else val_masks[keep]
            protocol["tuned_on"] += (
                f"; classifier temperature on the {int(keep.sum())} {config.data.eval_split}"
                " scans among them"
            )
        cls_report, probs_all = _classify(
            cls_fn, parts, cls_val, target, cls_val_masks, pred_masks, n_boot, forced_masks
        )
        report["classification"] = cls_report
        per_scan["malignancy_probability"] = probs_all
        if plots_enabled and "confusion" in cls_report:
            lesion = target["label"] > 0
            y = (target["label"][lesion] == 2).astype(int)
            p = probs_all[lesion]
            plots.plot_confusion(
                np.array(cls_report["confusion"]),
                ["benign", "malignant"],
                out_dir / f"{stem}_class_confusion.png",
                "Benign vs malignant (predicted masks)",
            )
            plots.plot_reliability(p, y, out_dir / f"{stem}_reliability.png")
            plots.plot_roc_pr(p, y, out_dir / f"{stem}_roc_pr.png")
    report["protocol"] = protocol
    if plots_enabled and parts["segmenter"] and pred_masks is not None:
        _gradcam_plot(out_dir, stem, parts, target, pred_masks, per_scan)
    if plots_enabled:
        for role, path in parts.items():
            if path is not None and (path / "metrics.jsonl").exists():
                plots.plot_curves(path / "metrics.jsonl", out_dir / f"{stem}_{role}_curves.png")

    report = evalmetrics.to_jsonable(report)
    busi_io.atomic_write_json(out_json, report)
    _write_csv(out_dir / f"{stem}_per_scan.csv", per_scan)
    return report


def _classify(cls_fn, parts, val, target, val_masks, target_masks, n_boot, forced=False):
    """Benign-vs-malignant scores on lesion scans.

    The masks are the segmenter's post-processed predictions (``[N, S, S]``
    bool), or None for a classifier trained on ground-truth masks, which is
    then scored on them and labelled as an ablation -- unless ``forced``
    (``--segmenter_workdir``) asks for predicted masks, or the classifier
    chose its checkpoint on its segmenter's masks (``val_mask_source``).
    """
    cls_cfg = inference.load_config(parts["classifier"] or parts["multitask"])
    trained_on_truth = (
        bool(parts["classifier"]) and cls_cfg.classifier.mask_source == "ground_truth"
    )
    if trained_on_truth and inference.validation_mask_source(cls_cfg) == "predicted":
        forced = True  # Its own run paired it with a segmenter: score it as deployed.
    mask_source = "predicted"
    if trained_on_truth and forced:
        mask_source = "predicted (classifier trained on ground-truth masks)"
    if (trained_on_truth and not forced) or val_masks is None:
        mask_source = "ground_truth (ablation: not a deployable score)"
        val_in, target_in = val["mask"], target["mask"]
    else:
        val_in = val_masks[..., None].astype(np.uint8)
        target_in = target_masks[..., None].astype(np.uint8)
    val_logits = cls_fn(val["image"], val_in)
    logits = cls_fn(target["image"], target_in)
    lesion_val = val["label"] > 0
    lesion = target["label"] > 0
    probs_all = np.full(len(target["label"]), np.nan)
    if logits.ndim == 1:
        y_val = (val["label"][lesion_val] == 2).astype(int)
        temperature = evalmetrics.temperature_scale(val_logits[lesion_val], y_val)
        y = (target["label"][lesion] == 2).astype(int)
        raw = evalmetrics.apply_temperature(logits[lesion], 1.0)
        cal = evalmetrics.apply_temperature(logits[lesion], temperature)
        rep = evalmetrics.classification_report(raw, y, n_boot=n_boot)
        rep["temperature"] = float(temperature)
        rep["ece_calibrated"] = float(evalmetrics.expected_calibration_error(cal, y))
        rep["masks"] = mask_source
        probs_all[lesion] = raw
        return rep, probs_all
    rep = evalmetrics.multiclass_report(
        evalmetrics.apply_temperature(logits, 1.0),
        target["label"],
        class_names=list(busi_io.CLASS_NAMES),
        n_boot=n_boot,
    )
    rep["masks"] = mask_source
    probs_all = evalmetrics.apply_temperature(logits, 1.0)[:, 2]
    return rep, probs_all


def _ensemble_members(parts, config, ensemble) -> list[pathlib.Path]:
    """Checks that every ensemble member is a run of the same kind on the same data and splits.

    Members of a segmenter (or a pipeline's segmenter) are segmenters; members
    of a multitask run are multitask runs, whose logits are averaged too.
    """
    members = [pathlib.Path(m).expanduser() for m in ensemble]
    if members and not (parts["segmenter"] or parts["multitask"]):
        raise ckpt_lib.CheckpointError(
            "--ensemble averages segmenters or multitask runs: the workdir has neither"
        )
    task = "segmentation" if parts["segmenter"] else "multitask"
    for m in members:
        # Cross-validation members differ in their held-out fold only.
        check_same_splits(config, m, "--ensemble", task, ignore_fold=True)
    return members


def _classifier_fold_runs(parts) -> list[pathlib.Path]:
    """The cross-validation runs whose out-of-fold masks the classifier trained on, or []."""
    if not parts["classifier"]:
        return []
    cfg = inference.load_config(parts["classifier"])
    if "predicted" not in (cfg.classifier.mask_source, inference.validation_mask_source(cfg)):
        return []
    runs = inference.segmenter_workdirs(cfg.classifier.segmenter_workdir)
    if len(runs) < 2:
        return []
    if cfg.data.get("cv_fold") is not None:
        # Its temperature would be set on validation scans it trained on.
        raise ckpt_lib.CheckpointError(
            f"{parts['classifier']}: a classifier on out-of-fold masks trains on the splits,"
            f" not on a cross-validation fold (data.cv_fold={cfg.data.cv_fold})"
        )
    for run in runs:
        check_same_splits(cfg, run, "classifier.segmenter_workdir", "segmentation", True)
    return runs


def _cv_folds(
    runs: Sequence[pathlib.Path], parts, oof_classifier: bool = False
) -> list[int] | None:
    """The held-out folds of cross-validation runs (one each), or None for runs on the splits.

    Raises:
        CheckpointError: runs mix the two, share a fold, or (for now) a
            multitask head, or a classifier not trained on these runs'
            out-of-fold masks, would be scored with them.
    """
    folds = [inference.load_config(r).data.get("cv_fold") for r in runs]
    if all(f is None for f in folds):
        return None
    if any(f is None for f in folds) or len(set(folds)) != len(folds):
        raise ckpt_lib.CheckpointError(
            "--ensemble: cross-validation runs must each hold out a different fold and cannot be"
            f" mixed with runs trained on the splits (held-out folds: {folds})"
        )
    if (parts["classifier"] and not oof_classifier) or parts["multitask"]:
        raise ckpt_lib.CheckpointError(
            "cross-validation runs are scored as segmenters, or with a classifier trained on"
            " their out-of-fold masks (classifier.segmenter_workdir=FOLD0,FOLD1,...): pair"
            " other classifiers with a segmenter trained on the splits"
        )
    return [int(f) for f in folds]


def check_same_splits(
    config, other: pathlib.Path, flag: str, task: str, ignore_fold: bool = False
) -> None:
    """Raises CheckpointError unless ``other`` holds a ``task`` run on ``config``'s data and splits.

    ``flag`` names the option in the message (e.g. ``--ensemble``);
    ``ignore_fold`` lets cross-validation runs of other folds pass.
    """
    cfg = inference.load_config(other)
    if cfg.task != task:
        raise ckpt_lib.CheckpointError(f"{flag}: {other} holds a {cfg.task} run, not {task}")
    if _data_identity(cfg, ignore_fold) != _data_identity(config, ignore_fold):
        # A run trained on other splits may have seen the scans scored here.
        raise ckpt_lib.CheckpointError(f"{flag}: {other} was trained on other data or splits")
    if not train_lib.same_scans(other, config.data):
        raise ckpt_lib.CheckpointError(
            f"{flag}: {other} was trained on other data or splits (its dataset holds other"
            f" scans than the one at data_dir={config.data.data_dir})"
        )


def _data_identity(config, ignore_fold: bool) -> dict:
    """The data config as resuming compares it, without the held-out fold if ``ignore_fold``."""
    return train_lib.data_identity(config.data, ignore_fold)


def _segmentation_plots(out_dir, stem, target, truth, pred, scores, seg_report):
    cm = np.array(seg_report["pixel_confusion"]) if "pixel_confusion" in seg_report else None
    if cm is not None:
        plots.plot_confusion(
            cm, ["background", "lesion"], out_dir / f"{stem}_pixel_confusion.png", "Pixels"
        )
    table = {}
    for i, c in enumerate(busi_io.CLASS_NAMES):
        sel = target["label"] == i
        if sel.any():
            table[c] = {
                "Dice": float(np.nanmean(scores["dice"][sel])),
                "IoU": float(np.nanmean(scores["iou"][sel])),
            }
    plots.plot_metric_heatmap(table, out_dir / f"{stem}_per_class.png", "Per-class segmentation")
    lesion = np.flatnonzero(target["label"] > 0)
    if len(lesion):
        cases = plots.pick_cases(scores["dice"][lesion], min(4, len(lesion)))
        idx = np.concatenate([lesion[cases[k]] for k in ("best", "median", "worst")])
        titles = [
            f"{kind} {target['file_name'][i]}"
            for kind in ("best", "median", "worst")
            for i in lesion[cases[kind]]
        ]
        plots.plot_contour_grid(
            target["image"][idx, ..., 0],
            truth[idx],
            pred[idx],
            scores["dice"][idx],
            titles,
            out_dir / f"{stem}_contours.png",
        )


def _gradcam_plot(out_dir, stem, parts, target, pred, per_scan) -> None:
    """Grad-CAM of the segmenter (and classifier) on the best, median and worst scans."""
    lesion = np.flatnonzero(target["label"] > 0)
    if not len(lesion):
        return
    cases = plots.pick_cases(np.asarray(per_scan["dice"])[lesion], min(2, len(lesion)))
    idx = np.concatenate([lesion[cases[k]] for k in ("best", "median", "worst")])
    seg_cam, cls_cam = gradcam.workdir_cams(parts["segmenter"], parts["classifier"])(
        target["image"][idx], pred[idx]
    )
    cams = {"segmenter Grad-CAM": seg_cam}
    if cls_cam is not None:
        # Grad-CAM of the malignant logit: blank where nothing argues for malignancy.
        cams["classifier Grad-CAM (malignant)"] = cls_cam
    titles = [
        f"{kind} Dice: {target['file_name'][i]}"
        for kind in ("best", "median", "worst")
        for i in lesion[cases[kind]]
    ]
    plots.plot_gradcam_grid(
        target["image"][idx], pred[idx], cams, titles, out_dir / f"{stem}_gradcam.png"
    )


def _write_csv(path: pathlib.Path, columns: dict) -> None:
    keys = list(columns)
    n = len(columns[keys[0]])
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for i in range(n):
        row = []
        for k in keys:
            v = columns[k][i]
            if isinstance(v, (float, np.floating)):
                v = "" if not np.isfinite(v) else f"{float(v):.6f}"
            row.append(v)
        w.writerow(row)
    busi_io.atomic_write_text(path, buf.getvalue())


def main(argv=None) -> None:
    from absl import app, flags

    flags.DEFINE_string(
        "workdir", None, "Training workdir (segmenter, classifier, multitask or pipeline)."
    )
    flags.DEFINE_string(
        "data_dir", None, "A BUSI-layout folder to score instead of the dataset split."
    )
    flags.DEFINE_string("split", "test", "Dataset split scored when --data_dir is not given.")
    flags.DEFINE_string("output", None, "JSON path (default WORKDIR/eval/<split>.json).")
    flags.DEFINE_bool("tta", False, "Average lesion probabilities over horizontal flips.")
    flags.DEFINE_bool(
        "classifier_tta", False, "Average the classifier's logits over horizontal flips."
    )
    flags.DEFINE_enum(
        "postprocess", "auto", ["auto", "none"], "Mask post-processing chosen on validation."
    )
    flags.DEFINE_integer("n_boot", 1000, "Bootstrap resamples for the 95% intervals.")
    flags.DEFINE_enum(
        "checkpoint",
        "best",
        ["best", "last"],
        "Score each run's validation-picked weights (best) or those it ended with (last).",
    )
    flags.DEFINE_string(
        "segmenter_workdir",
        None,
        "Score the classifier on this segmenter's predicted masks (even one trained on true masks).",
    )
    flags.DEFINE_list(
        "ensemble", [], "More segmenter (or multitask) workdirs averaged with --workdir's."
    )
    flags.mark_flag_as_required("workdir")
    FLAGS = flags.FLAGS

    def run(_):
        from busi_jax import cli

        report = cli.run_command(
            evaluate,
            FLAGS.workdir,
            data_dir=FLAGS.data_dir,
            split=FLAGS.split,
            output=FLAGS.output,
            tta=FLAGS.tta,
            postprocess=FLAGS.postprocess,
            n_boot=FLAGS.n_boot,
            segmenter_workdir=FLAGS.segmenter_workdir,
            ensemble=FLAGS.ensemble,
            classifier_tta=FLAGS.classifier_tta,
            checkpoint=FLAGS.checkpoint,
        )
        _print_summary(report)

    app.run(run, argv=argv)


def _print_summary(report: dict) -> None:
    for section in ("segmentation", "classification"):
        if section in report:
            parts = []
            for k, v in report[section].items():
                if isinstance(v, dict) and "mean" in v and v["mean"] is not None:
                    lo, hi = v["ci95"]
                    parts.append(
                        f"{k} {v['mean']:.4f} [{lo:.3f}, {hi:.3f}]"
                        if lo is not None
                        else f"{k} {v['mean']:.4f}"
                    )
            print(f"{section}: " + ", ".join(parts), file=sys.stderr)


if __name__ == "__main__":
    main()
