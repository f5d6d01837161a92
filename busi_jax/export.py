"""Self-contained inference artifact: serialized StableHLO (jax.export) plus settings.

    python -m busi_jax.export --workdir=DIR --output=FILE.busi

The artifact is a zip holding ``segmenter.jaxexport`` (scans -> lesion
probabilities), ``classifier.jaxexport`` when the workdir has a classifier
(scans + masks -> malignancy probability) and ``meta.json`` (image size,
threshold, post-processing, classifier input mode). The weights are baked into
the serialized computations, so :func:`load` runs them with JAX alone -- no
model code, no Flax, no checkpoint. The batch dimension is symbolic: any batch
size works. ``--tflite`` also writes TFLite models (batch 1) through jax2tf,
for devices without JAX; that path needs TensorFlow.
"""

from __future__ import annotations

import io as _io
import json
import os
import pathlib
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from busi_jax import io as busi_io

FORMAT_VERSION = 1


def _segmenter_fn(workdir) -> tuple[Callable, dict]:
    from busi_jax import inference

    config, model, variables = inference.load_model(workdir)

    def probs(images):  # [b, S, S, 1] float32 in [0, 1] -> [b, S, S] float32.
        out = model.apply(variables, images, train=False)
        if isinstance(out, tuple):
            out = out[0]
        if out.ndim == 5:
            out = out.mean(axis=0)
        return jax.nn.sigmoid(out.astype(jnp.float32))[..., 0]

    return probs, config


def _classifier_fn(workdir) -> tuple[Callable, dict]:
    from busi_jax import inference
    from busi_jax import models

    config, model, variables = inference.load_model(workdir)
    mode = config.classifier.input_mode

    def probs(images, masks):  # [b, S, S, 1] each -> [b] malignancy probability.
        x = models.classifier_inputs(images, masks, mode)
        out = model.apply(variables, x, train=False).astype(jnp.float32)
        return jax.nn.sigmoid(out) if out.ndim == 1 else jax.nn.softmax(out, -1)[:, -1]

    return probs, config


def export(
    workdir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    postprocess: str = "auto",
) -> pathlib.Path:
    """Writes the artifact for a segmenter, classifier, multitask or pipeline workdir.

    Args:
      workdir: training workdir.
      output: artifact path (written whole or not at all).
      postprocess: 'auto' records the mask post-processing chosen on the
        dataset's validation split (as evaluate does); 'none' records plain
        thresholding.

    Returns:
      The artifact path.
    """
    from busi_jax import evaluate

    parts = evaluate.resolve(workdir)
    seg_dir = parts["segmenter"] or parts["multitask"]
    files: dict[str, bytes] = {}
    meta: dict = {"format_version": FORMAT_VERSION, "source_workdir": os.fspath(workdir)}
    if seg_dir is not None:
        fn_seg, config = _segmenter_fn(seg_dir)
        fn = fn_seg
        s = int(config.data.image_size)
        (b,) = jax.export.symbolic_shape("b")
        spec = jax.ShapeDtypeStruct((b, s, s, 1), jnp.float32)
        files["segmenter.jaxexport"] = bytes(jax.export.export(jax.jit(fn))(spec).serialize())
        meta.update(
            image_size=s,
            threshold=float(config.get("threshold", 0.5)),
            segmenter_model=config.model.name,
        )
    if parts["classifier"] is not None:
        fn, config = _classifier_fn(parts["classifier"])
        s = int(config.data.image_size)
        (b,) = jax.export.symbolic_shape("b")
        spec = jax.ShapeDtypeStruct((b, s, s, 1), jnp.float32)
        files["classifier.jaxexport"] = bytes(
            jax.export.export(jax.jit(fn))(spec, spec).serialize()
        )
        meta.update(image_size=s, classifier_input_mode=config.classifier.input_mode)
    if not files:
        raise busi_io.BusiDataError(f"{workdir}: holds no segmenter or classifier to export")
    meta["postprocess"] = {"threshold": meta.get("threshold", 0.5)}
    if seg_dir is not None and postprocess == "auto":
        import dataclasses

        from busi_jax import data as data_lib
        from busi_jax import postprocess as pp

        seg_config = evaluate.inference.load_config(seg_dir)
        # The run's held-out scans: validation, or its fold (cross-validation).
        val = data_lib.load_run_split(seg_config.data, "eval")
        probs = np.asarray(jax.jit(fn_seg)(jnp.asarray(val["image"], jnp.float32) / 255.0))
        chosen, _ = pp.choose_on_validation(probs, val["mask"][..., 0] > 0)
        meta["postprocess"] = dataclasses.asdict(chosen)
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("meta.json", json.dumps(meta, indent=2))
        for name, blob in files.items():
            zf.writestr(name, blob)
    busi_io.atomic_write_bytes(output, buf.getvalue())
    return pathlib.Path(output)


def export_tflite(
    workdir: str | os.PathLike[str], prefix: str | os.PathLike[str]
) -> list[pathlib.Path]:
    """Also writes TFLite models (batch 1) for low-resource devices.

    Needs TensorFlow (the ``build`` or ``test`` extras); the conversion goes
    through ``jax2tf`` with non-native serialization, which TFLite's converter
    accepts. Writes ``<prefix>.segmenter.tflite`` (scan -> probabilities
    ``[1, S, S]``) and, with a classifier, ``<prefix>.classifier.tflite``
    (scan, mask -> ``[1]`` malignancy probability); inputs float32 in [0, 1].

    Returns:
      The paths written.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    from busi_jax import evaluate

    parts = evaluate.resolve(workdir)
    jobs = []
    seg_dir = parts["segmenter"] or parts["multitask"]
    if seg_dir is not None:
        fn, config = _segmenter_fn(seg_dir)
        jobs.append(("segmenter", fn, int(config.data.image_size), 1))
    if parts["classifier"] is not None:
        fn, config = _classifier_fn(parts["classifier"])
        jobs.append(("classifier", fn, int(config.data.image_size), 2))
    written = []
    for name, fn, s, n_inputs in jobs:
        spec = [tf.TensorSpec((1, s, s, 1), tf.float32)] * n_inputs
        tf_fn = tf.function(
            jax2tf.convert(fn, native_serialization=False), autograph=False, input_signature=spec
        )
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [tf_fn.get_concrete_function()], tf_fn
        )
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS,
            tf.lite.OpsSet.SELECT_TF_OPS,
        ]
        path = pathlib.Path(f"{prefix}.{name}.tflite")
        busi_io.atomic_write_bytes(path, converter.convert())
        written.append(path)
    return written


class Artifact:
    """A loaded artifact: ``segment`` and ``classify`` as plain functions.

    Attributes:
      meta: the artifact's ``meta.json``.
    """

    def __init__(self, path: str | os.PathLike[str]):
        path = pathlib.Path(path)
        try:
            with zipfile.ZipFile(path) as zf:
                self.meta = json.loads(zf.read("meta.json"))
                blobs = {n: zf.read(n) for n in zf.namelist() if n.endswith(".jaxexport")}
        except (zipfile.BadZipFile, KeyError, OSError, json.JSONDecodeError) as e:
            raise busi_io.BusiDataError(f"{path}: not a busi-jax export artifact ({e})") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise busi_io.BusiDataError(
                f"{path}: artifact format {self.meta.get('format_version')} is not {FORMAT_VERSION}"
            )
        self._seg = (
            jax.export.deserialize(bytearray(blobs["segmenter.jaxexport"]))
            if ("segmenter.jaxexport" in blobs)
            else None
        )
        self._cls = (
            jax.export.deserialize(bytearray(blobs["classifier.jaxexport"]))
            if ("classifier.jaxexport" in blobs)
            else None
        )

    @property
    def has_classifier(self) -> bool:
        return self._cls is not None

    def segment(self, images: np.ndarray) -> np.ndarray:
        """``[N, S, S, 1]`` uint8 scans -> ``[N, S, S]`` lesion probabilities."""
        if self._seg is None:
            raise busi_io.BusiDataError("this artifact has no segmenter")
        return np.asarray(self._seg.call(jnp.asarray(images, jnp.float32) / 255.0))

    def classify(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """``[N, S, S, 1]`` uint8 scans and {0, 1} masks -> ``[N]`` malignancy probabilities."""
        if self._cls is None:
            raise busi_io.BusiDataError("this artifact has no classifier")
        return np.asarray(
            self._cls.call(
                jnp.asarray(images, jnp.float32) / 255.0, jnp.asarray(masks, jnp.float32)
            )
        )


def load(path: str | os.PathLike[str]) -> Artifact:
    """Loads an artifact written by :func:`export`."""
    return Artifact(path)


def main(argv=None) -> None:
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Training workdir to export.")
    flags.DEFINE_string("output", None, "Artifact path, e.g. model.busi.")
    flags.DEFINE_enum(
        "postprocess", "auto", ["auto", "none"], "Record post-processing chosen on validation."
    )
    flags.DEFINE_bool(
        "tflite",
        False,
        "Also write OUTPUT.segmenter.tflite / .classifier.tflite (needs TensorFlow).",
    )
    flags.mark_flags_as_required(["workdir", "output"])
    FLAGS = flags.FLAGS

    def run(_):
        from busi_jax import cli

        path = cli.run_command(export, FLAGS.workdir, FLAGS.output, postprocess=FLAGS.postprocess)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        if FLAGS.tflite:
            for p in cli.run_command(export_tflite, FLAGS.workdir, FLAGS.output):
                print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
