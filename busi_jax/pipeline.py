"""Segmenter, then classifier on the segmenter's predicted masks, in one workdir."""

from __future__ import annotations

import json
import os
import pathlib

import ml_collections

from busi_jax import io as busi_io
from busi_jax import train


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> dict:
    """Trains both stages; rerunning resumes whichever stage was interrupted.

    With ``config.segmenter_workdir`` set, stage 1 is not trained here: the
    finished segmenter run in that folder is used, after checking that it was
    trained on the same data and splits.

    Returns:
      ``{'segmenter': metrics, 'classifier': metrics}`` on the validation
      split, also written to ``workdir/final_metrics.json``.
    """
    # Absolute, so the classifier's config and final_metrics.json point at the
    # segmenter from any working directory.
    workdir = pathlib.Path(workdir).expanduser().absolute()
    seg_cfg = config.segmenter
    cls_cfg = ml_collections.ConfigDict(config.classifier_stage.to_dict())
    # Both stages see the same data and splits, so the classifier's validation
    # scans were never seen by the segmenter either.
    cls_cfg.data = ml_collections.ConfigDict(seg_cfg.data.to_dict())
    reuse = config.get("segmenter_workdir")
    if reuse and "," in str(reuse):
        raise train.ConfigError(
            f"config.segmenter_workdir={reuse}: a pipeline takes one segmenter; for out-of-fold"
            " masks of cross-validation runs, train configs/classifier.py with"
            " --config.classifier.segmenter_workdir=FOLD0,FOLD1,..."
        )
    if reuse:
        seg_dir = pathlib.Path(reuse).expanduser().absolute()
        seg = _finished_segmenter(seg_dir, seg_cfg)
    else:
        seg_dir = workdir / "segmenter"
        seg = train.train_and_evaluate(seg_cfg, seg_dir)
    cls_cfg.classifier.segmenter_workdir = os.fspath(seg_dir)
    cls = train.train_and_evaluate(cls_cfg, workdir / "classifier")
    final = {"segmenter_workdir": os.fspath(seg_dir), "segmenter": seg, "classifier": cls}
    busi_io.atomic_write_json(workdir / "final_metrics.json", final)
    return final


def _finished_segmenter(seg_dir: pathlib.Path, seg_cfg) -> dict:
    final = seg_dir / "final_metrics.json"
    cfg_path = seg_dir / "config.json"
    if not final.exists() or not cfg_path.exists():
        raise train.ConfigError(
            f"config.segmenter_workdir={seg_dir}: not a finished segmenter run (no final_metrics.json)"
        )
    old = json.loads(cfg_path.read_text())
    if old.get("task") not in ("segmentation", "multitask"):
        raise train.ConfigError(
            f"config.segmenter_workdir={seg_dir}: holds a {old.get('task')} run"
        )
    data = json.loads(seg_cfg.data.to_json_best_effort())
    # As resuming compares it: runs saved before a data field existed match.
    if train.config_identity(old, "data") != train.config_identity(
        {"data": data}, "data"
    ) or not train.same_scans(seg_dir, seg_cfg.data):
        raise train.ConfigError(
            f"config.segmenter_workdir={seg_dir}: trained on other data or splits ({old.get('data')})"
        )
    return json.loads(final.read_text())
