"""Loading trained models from a workdir as pure jitted functions."""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from busi_jax import checkpoints as ckpt_lib
from busi_jax import models as models_lib
from busi_jax.models.packing import pack_inference


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote into its workdir.

    Raises:
        ckpt_lib.CheckpointError: no ``config.json`` there.
    """
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise ckpt_lib.CheckpointError(f"{path}: missing; is {workdir} a training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


KERNELS = ("xla", "native_amx", "native_bf16")
# "best": the checkpoint validation picked; "last": the weights the run ended with
# (nnU-Net's default), for when a small validation split picks by noise.
CHECKPOINTS = ("best", "last")


def validation_mask_source(config: ml_collections.ConfigDict) -> str:
    """Where a classifier run's validation masks come from: 'predicted' or 'ground_truth'.

    ``config.classifier.val_mask_source`` ('same' when absent, as in runs saved
    before it existed) follows ``config.classifier.mask_source``.
    """
    source = config.classifier.get("val_mask_source", "same")
    return config.classifier.mask_source if source == "same" else source


def load_model(workdir: str | pathlib.Path, kernels: str = "xla", checkpoint: str = "best"):
    """Restores the best (or the last) checkpoint of a training workdir.

    Args:
        workdir: a training workdir.
        kernels: 'xla' (default: float32 convolutions, differentiable, so
            Grad-CAM works, and no C++ compiler needed), 'native_bf16' (the
            3x3 convolutions in bf16 with eval-mode BatchNorm and ReLU folded
            in, on AMX tiles or else AVX-512 BF16: the fastest CPU forward
            pass, no gradients; needs such a CPU and a C++ compiler; see
            busi_jax.models.conv) or 'native_amx' (the same, AMX tiles only). The
            checkpoint is the same either way; models without AMX kernels
            (the classifier) run on XLA whatever this says. With the bf16
            kernels the variables come packed for them at the run's image
            size (:func:`busi_jax.models.packing.pack_inference`: the same
            outputs, with the weight-only work done once here).
        checkpoint: 'best' (the validation-picked weights) or 'last' (the
            latest saved state's weights, EMA where the run kept one).

    Returns:
        ``(config, model, variables)``.

    Raises:
        ValueError: unknown ``kernels`` or ``checkpoint``.
        busi_jax.native.NativeBuildError: 'native_bf16' / 'native_amx' where it cannot run.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not valid; choose one of {KERNELS}")
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint={checkpoint!r} is not valid; choose one of {CHECKPOINTS}")
    config = load_config(workdir)
    model_config = config.model.to_dict()
    if kernels != "xla":
        _check_bf16(kernels)
    if "wgrad" in models_lib.model_options(model_config["name"]):
        # A training-speed option, not part of the model: whatever the run
        # trained with, inference uses the kernels asked for here. Models
        # without the option (the classifier) always run on XLA.
        model_config["wgrad"] = kernels
    model = models_lib.create_model(model_config)
    size = int(config.data.image_size)
    channels = 1
    if config.task == "classification":
        channels = models_lib.classifier_input_channels(config.classifier.input_mode)
    sample = jnp.zeros((1, size, size, channels), jnp.float32)
    like = model.init(
        {"params": jax.random.key(0, impl="rbg"), "dropout": jax.random.key(0, impl="rbg")},
        sample,
        train=False,
    )
    like = {"params": like["params"], "batch_stats": like.get("batch_stats", {})}
    ckpts = ckpt_lib.Checkpoints(workdir)
    try:
        if checkpoint == "best":
            variables, _ = ckpts.restore_best(like)
        else:
            use_ema = float(config.get("ema_decay", 0.0)) > 0  # As training evaluated it.
            variables, _ = ckpts.restore_last_weights(like, use_ema)
    finally:
        ckpts.close()
    if kernels != "xla":
        variables = pack_inference(model, variables, sample)
    return config, model, variables


def _check_bf16(kernels: str) -> None:
    from busi_jax import native
    from busi_jax.models import conv

    if kernels == "native_amx" and not conv.amx_available():
        raise native.NativeBuildError(
            "kernels='native_amx' needs a CPU with AMX bf16 tiles; use kernels='native_bf16'"
            " (AMX or AVX-512 BF16) or 'xla'"
        )
    if not conv.bf16_kernels_available():
        raise native.NativeBuildError(
            f"kernels={kernels!r} needs a CPU with AMX bf16 tiles or AVX-512 BF16; use"
            " kernels='xla'"
        )
    conv.amx_selftest()


def probability_predictor(
    workdir: str | pathlib.Path, batch_size: int = 32, kernels: str = "xla"
) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """``(images [N, S, S, 1] uint8 -> lesion probabilities [N, S, S, 1], threshold)``.

    Uses the segmenter's (or multitask net's) best checkpoint; the threshold
    is its training threshold; ``kernels`` as in :func:`load_model`.
    """
    config, model, variables = load_model(workdir, kernels)
    threshold = float(config.get("threshold", 0.5))

    @jax.jit
    def prob(images):
        out = model.apply(variables, images.astype(jnp.float32) / 255.0, train=False)
        if isinstance(out, tuple):  # Multitask: (segmentation, classification).
            out = out[0]
        if out.ndim == 5:
            out = out.mean(axis=0)
        return jax.nn.sigmoid(out.astype(jnp.float32))

    def predict(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pad = batch_size - len(chunk)
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
            out.append(np.asarray(prob(padded))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros(images.shape, np.float32)

    return predict, threshold


def mask_predictor(
    workdir: str | pathlib.Path, batch_size: int = 32, kernels: str = "xla"
) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``images [N, S, S, 1] uint8 -> masks [N, S, S, 1] uint8 {0, 1}``.

    Uses the segmenter's (or multitask net's) best checkpoint and its training
    threshold; ``kernels`` as in :func:`load_model`.
    """
    probs, threshold = probability_predictor(workdir, batch_size, kernels)
    return lambda images: (probs(images) >= threshold).astype(np.uint8)


def segmenter_workdirs(setting: str) -> list[pathlib.Path]:
    """``classifier.segmenter_workdir`` as run folders: one, or comma-separated fold runs."""
    if setting is None:
        return []
    return [pathlib.Path(p.strip()).expanduser() for p in str(setting).split(",") if p.strip()]


class FoldMasks:
    """Masks from k-fold cross-validation runs (``data.cv_fold``), none from a run that saw the scan.

    A classifier trained on one segmenter's masks of its own training scans
    learns from masks better than any it will meet on new scans (the
    segmenter fitted those scans). With one run per fold, each scan of the
    train + validation pool is masked by the run that held its fold out, as
    a new scan would be; scans outside the folds (``fold < 0``: the test
    split, other folders) by the runs' mean probability.

    Call as ``masks(images [N, S, S, 1] uint8, folds [N] int)`` ->
    ``[N, S, S, 1] uint8 {0, 1}``; without ``folds`` every scan is taken as
    outside the folds.

    Raises (on construction):
      ckpt_lib.CheckpointError: a run is not a cross-validation run, two runs
        hold out the same fold, or runs differ in data or splits.
    """

    by_fold = True  # train.prepare_arrays passes each scan's fold.

    def __init__(self, workdirs, batch_size: int = 32, kernels: str = "xla"):
        self.workdirs = [pathlib.Path(w) for w in workdirs]
        self.configs = [load_config(w) for w in self.workdirs]
        for w, c in zip(self.workdirs, self.configs):
            if c.task != "segmentation":
                raise ckpt_lib.CheckpointError(
                    f"segmenter_workdir: {w} holds a {c.task} run; out-of-fold masks come from"
                    " segmenter runs"
                )
        folds = [c.data.get("cv_fold") for c in self.configs]
        if any(f is None for f in folds) or len(set(folds)) != len(folds):
            raise ckpt_lib.CheckpointError(
                "segmenter_workdir: several runs must be cross-validation runs (data.cv_fold),"
                f" each holding out a different fold; got held-out folds {folds}"
                f" for {[str(w) for w in self.workdirs]}"
            )
        identities = {json.dumps(self.data_identity(c.data), sort_keys=True) for c in self.configs}
        if len(identities) != 1:
            raise ckpt_lib.CheckpointError(
                f"segmenter_workdir: the fold runs {[str(w) for w in self.workdirs]} were trained"
                " on other data or splits"
            )
        self.folds = [int(f) for f in folds]
        self._probs = [probability_predictor(w, batch_size, kernels) for w in self.workdirs]

    @staticmethod
    def data_identity(data: ml_collections.ConfigDict) -> dict:
        """A data config as runs compare it, less the held-out fold."""
        from busi_jax import train  # train imports this module.

        return train.data_identity(data, ignore_fold=True)

    def check_data(self, data: ml_collections.ConfigDict, who: str) -> None:
        """Raises CheckpointError unless ``data`` deals scans to the runs' folds."""
        from busi_jax import train  # train imports this module.

        if self.data_identity(data) != self.data_identity(self.configs[0].data) or not all(
            train.same_scans(w, data) for w in self.workdirs
        ):
            # Other splits or seeds deal other folds: "held out" would not hold.
            raise ckpt_lib.CheckpointError(
                f"{who}: the fold runs {[str(w) for w in self.workdirs]} were trained on other"
                " data or splits"
            )

    def __call__(self, images: np.ndarray, folds: np.ndarray | None = None) -> np.ndarray:
        folds = np.full(len(images), -1) if folds is None else np.asarray(folds)
        missing = sorted(set(np.unique(folds[folds >= 0]).tolist()) - set(self.folds))
        if missing:
            raise ckpt_lib.CheckpointError(
                f"segmenter_workdir: no run holds out fold(s) {missing}; their scans would be"
                f" masked by runs that trained on them (runs hold out {sorted(self.folds)})"
            )
        masks = np.zeros(images.shape, np.uint8)
        outside = folds < 0
        if outside.any():
            mean = np.mean([p(images[outside]) for p, _ in self._probs], axis=0)
            threshold = float(np.mean([t for _, t in self._probs]))
            masks[outside] = mean >= threshold
        for fold, (probs, threshold) in zip(self.folds, self._probs):
            rows = folds == fold
            if rows.any():
                masks[rows] = probs(images[rows]) >= threshold
        return masks


def segmenter_masks(setting: str, kernels: str = "xla") -> Callable[..., np.ndarray]:
    """The mask predictor ``classifier.segmenter_workdir`` names: :func:`mask_predictor` of one
    run, or :class:`FoldMasks` of comma-separated cross-validation runs."""
    workdirs = segmenter_workdirs(setting)
    if len(workdirs) == 1 and load_config(workdirs[0]).data.get("cv_fold") is None:
        return mask_predictor(workdirs[0], kernels=kernels)
    # A lone fold run too: its own training scans must not get its masks, so
    # FoldMasks refuses the folds no run held out.
    return FoldMasks(workdirs, kernels=kernels)
