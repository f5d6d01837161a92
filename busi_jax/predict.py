"""Runs the whole pipeline on scans and writes a research report per scan.

    python -m busi_jax.predict --workdir=DIR --input=FILE_OR_FOLDER --output=OUT
    python -m busi_jax.predict --artifact=model.busi --input=... --output=OUT

Input: one PNG/JPEG, a flat folder of them, or a BUSI-layout folder; any
size, grayscale or colour. For each scan OUT gets ``<stem>_pred_mask.png``
(the predicted mask at the scan's original size), ``<stem>.json`` (probability,
descriptors, suggested BI-RADS-style category, follow-up wording, disclaimer)
and ``<stem>.html`` (scan, contour, Grad-CAM, the same facts), plus
``index.html``. Scans in class sub-folders keep their sub-folder in OUT. Mask
files beside a scan (``<stem>_mask*.png``) are read as its reference and the
report adds their Dice (``reference_dice``).

Every input is read and checked before anything is written, so a bad file
stops the command with one message and no output; each output file is
written whole or not at all.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from busi_jax import descriptors as desc_lib
from busi_jax import io as busi_io
from busi_jax import postprocess as pp
from busi_jax import report as report_lib


class _Engine:
    """Segment, classify and explain at model size, from a workdir or an artifact."""

    def __init__(self, workdir: str | None, artifact: str | None):
        self.notes: list[str] = []
        self.cam = None
        if artifact:
            from busi_jax import export

            art = export.load(artifact)
            self.size = int(art.meta["image_size"])
            self.segment = art.segment
            self.classify = art.classify if art.has_classifier else None
            self.pp_cfg = pp.PostprocessConfig(**art.meta.get("postprocess", {}))
            self.source = f"artifact {artifact}"
            self.notes.append("Grad-CAM is not available from an exported artifact.")
            return
        from busi_jax import data as data_lib
        from busi_jax import evaluate, gradcam, inference

        parts = evaluate.resolve(workdir)
        seg_dir = parts["segmenter"] or parts["multitask"]
        if seg_dir is None:
            raise busi_io.BusiDataError(
                f"{workdir}: predict needs a segmenter (this is a classifier-only run)"
            )
        config = inference.load_config(seg_dir)
        self.size = int(config.data.image_size)
        self.source = f"workdir {workdir}"
        if parts["multitask"]:
            mt = evaluate.multitask_outputs(seg_dir)
            self.segment = lambda im: mt(im)[0]
            self.classify = lambda im, _m: 1 / (1 + np.exp(-mt(im)[1]))
        else:
            self.segment = evaluate.segmenter_probs(seg_dir)
            self.classify = None
        if parts["classifier"]:
            logits = evaluate.classifier_logits(parts["classifier"])
            self.classify = lambda im, m: 1 / (1 + np.exp(-logits(im, m)))
        try:
            # The run's held-out scans: validation, or its fold (cross-validation).
            val = data_lib.load_run_split(config.data, "eval")
            self.pp_cfg, _ = pp.choose_on_validation(
                self.segment(val["image"]), val["mask"][..., 0] > 0
            )
        except Exception as e:  # The training data may be absent on a deployment machine.
            self.pp_cfg = pp.PostprocessConfig(threshold=float(config.get("threshold", 0.5)))
            self.notes.append(
                f"Post-processing not tuned (validation split unavailable: {type(e).__name__})."
            )
        self.cam = gradcam.workdir_cams(seg_dir, parts["classifier"])


def _out_stem(out: pathlib.Path, record: busi_io.ScanRecord) -> pathlib.Path:
    rel = pathlib.PurePosixPath(record.file_name)
    return out.joinpath(*rel.parent.parts, rel.stem)


def predict(
    input_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    workdir: str | None = None,
    artifact: str | None = None,
    pixel_spacing_mm: float | None = None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Runs the pipeline on ``input_path`` and writes the reports into ``output``.

    Returns:
      The JSON report of each scan, in input order.
    """
    if bool(workdir) == bool(artifact):
        raise busi_io.BusiDataError("give exactly one of --workdir and --artifact")
    if pixel_spacing_mm is not None and not pixel_spacing_mm > 0:
        raise busi_io.BusiDataError(f"--pixel_spacing_mm must be positive, got {pixel_spacing_mm}")
    records = busi_io.list_inputs(input_path)
    # Every scan and mask is read (and so checked) before anything is written.
    # Mask files beside a scan are its reference: the report adds its Dice.
    scans, truths = [], []
    for r in records:
        if r.mask_paths:
            image, truth = busi_io.read_example(r)
        else:
            image, truth = busi_io.read_scan(r.image_path), None
        scans.append(image)
        truths.append(truth)
    engine = _Engine(workdir, artifact)
    out = pathlib.Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise busi_io.BusiDataError(
            f"{out}: cannot create the output folder ({e.strerror})"
        ) from None

    reports, index = [], []
    for start in range(0, len(records), batch_size):
        chunk = list(range(start, min(start + batch_size, len(records))))
        small = np.stack([busi_io.resize_image(scans[i], engine.size)[..., None] for i in chunk])
        masks = pp.apply(engine.segment(small), engine.pp_cfg)
        probs = (
            engine.classify(small, masks[..., None].astype(np.uint8)) if engine.classify else None
        )
        cams = engine.cam(small, masks) if engine.cam else (None, None)
        for j, i in enumerate(chunk):
            record, image = records[i], scans[i]
            full_mask = busi_io.resize_mask(masks[j], image.shape)
            d = desc_lib.describe(image, full_mask, pixel_spacing_mm)
            prob = None
            if probs is not None and d.get("has_lesion"):
                prob = float(probs[j])
            stem = _out_stem(out, record)
            extra = {}
            if truths[i] is not None:
                extra["reference_dice"] = _dice(full_mask, truths[i])
            rep = report_lib.build(
                record.file_name,
                prob,
                d,
                extra={
                    "predicted_mask": f"{stem.name}_pred_mask.png",
                    "model": engine.source,
                    "postprocess": engine.pp_cfg.describe(),
                    "notes": list(engine.notes),
                    **extra,
                },
            )
            images = [
                ("scan", report_lib.png_data_uri(image)),
                (
                    "predicted lesion contour",
                    report_lib.png_data_uri(report_lib.overlay_contour(image, full_mask)),
                ),
            ]
            if cams[0] is not None:
                images.append(
                    (
                        "Grad-CAM, segmenter",
                        report_lib.png_data_uri(
                            report_lib.overlay_heatmap(image, _upsample(cams[0][j], image.shape))
                        ),
                    )
                )
            if cams[1] is not None and d.get("has_lesion"):
                images.append(
                    (
                        "Grad-CAM, classifier",
                        report_lib.png_data_uri(
                            report_lib.overlay_heatmap(image, _upsample(cams[1][j], image.shape))
                        ),
                    )
                )
            busi_io.atomic_write_png(stem.parent / f"{stem.name}_pred_mask.png", full_mask)
            busi_io.atomic_write_json(stem.parent / f"{stem.name}.json", rep)
            busi_io.atomic_write_text(
                stem.parent / f"{stem.name}.html", report_lib.render_html(rep, images)
            )
            reports.append(rep)
            index.append(
                {
                    "file": record.file_name,
                    "html": str(pathlib.PurePosixPath(*stem.relative_to(out).parts).with_suffix(""))
                    + ".html",
                    "thumb": report_lib.png_data_uri(
                        busi_io.resize_image(
                            report_lib.overlay_contour(image, full_mask)[..., 0], 96
                        )
                    ),
                    "category": rep["category"],
                    "malignancy_probability": rep["malignancy_probability"],
                }
            )
    busi_io.atomic_write_text(out / "index.html", report_lib.render_index(index))
    return reports


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of the predicted mask against the reference mask files (1.0 when both are empty)."""
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def _upsample(cam: np.ndarray, shape) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.asarray(cam, np.float32))
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def main(argv=None) -> None:
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Training workdir (segmenter, multitask or pipeline).")
    flags.DEFINE_string(
        "artifact", None, "An artifact written by busi_jax.export, instead of --workdir."
    )
    flags.DEFINE_string("input", None, "A PNG/JPEG scan or a folder of them.")
    flags.DEFINE_string("output", None, "Folder for masks, JSON and HTML reports.")
    flags.DEFINE_float("pixel_spacing_mm", None, "Pixel size of the input scans, for sizes in mm.")
    flags.mark_flags_as_required(["input", "output"])
    FLAGS = flags.FLAGS

    def run(_):
        from busi_jax import cli

        reps = cli.run_command(
            predict,
            FLAGS.input,
            FLAGS.output,
            workdir=FLAGS.workdir,
            artifact=FLAGS.artifact,
            pixel_spacing_mm=FLAGS.pixel_spacing_mm,
        )
        print(f"wrote {len(reps)} reports and {pathlib.Path(FLAGS.output) / 'index.html'}")

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
