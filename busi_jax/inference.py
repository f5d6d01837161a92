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


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote into its workdir.

    Raises:
        ckpt_lib.CheckpointError: no ``config.json`` there.
    """
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise ckpt_lib.CheckpointError(f"{path}: missing; is {workdir} a training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


KERNELS = ("xla", "native_amx")


def validation_mask_source(config: ml_collections.ConfigDict) -> str:
    """Where a classifier run's validation masks come from: 'predicted' or 'ground_truth'.

    ``config.classifier.val_mask_source`` ('same' when absent, as in runs saved
    before it existed) follows ``config.classifier.mask_source``.
    """
    source = config.classifier.get("val_mask_source", "same")
    return config.classifier.mask_source if source == "same" else source


def load_model(workdir: str | pathlib.Path, kernels: str = "xla"):
    """Restores the best checkpoint of a training workdir.

    Args:
        workdir: a training workdir.
        kernels: 'xla' (default: float32 convolutions, differentiable, so
            Grad-CAM works, and no C++ compiler needed) or 'native_amx' (the
            3x3 convolutions on AMX tiles in bf16 with eval-mode BatchNorm and
            ReLU folded in: the fastest CPU forward pass, no gradients; needs
            an AMX CPU and a C++ compiler; see busi_jax.models.conv). The
            checkpoint is the same either way; models without AMX kernels
            (the classifier) run on XLA whatever this says.

    Returns:
        ``(config, model, variables)``.

    Raises:
        ValueError: unknown ``kernels``.
        busi_jax.native.NativeBuildError: 'native_amx' where it cannot run.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not valid; choose one of {KERNELS}")
    config = load_config(workdir)
    model_config = config.model.to_dict()
    if kernels == "native_amx":
        _check_amx()
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
    like = model.init(
        {"params": jax.random.key(0, impl="rbg"), "dropout": jax.random.key(0, impl="rbg")},
        jnp.zeros((1, size, size, channels), jnp.float32),
        train=False,
    )
    like = {"params": like["params"], "batch_stats": like.get("batch_stats", {})}
    ckpts = ckpt_lib.Checkpoints(workdir)
    try:
        variables, _ = ckpts.restore_best(like)
    finally:
        ckpts.close()
    return config, model, variables


def _check_amx() -> None:
    from busi_jax import native
    from busi_jax.models import conv

    if not conv.amx_available():
        raise native.NativeBuildError(
            "kernels='native_amx' needs a CPU with AMX bf16 tiles; use kernels='xla'"
        )
    conv.amx_selftest()


def mask_predictor(
    workdir: str | pathlib.Path, batch_size: int = 32, kernels: str = "xla"
) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``images [N, S, S, 1] uint8 -> masks [N, S, S, 1] uint8 {0, 1}``.

    Uses the segmenter's (or multitask net's) best checkpoint and its training
    threshold; ``kernels`` as in :func:`load_model`.
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
        p = np.concatenate(out) if out else np.zeros(images.shape, np.float32)
        return (p >= threshold).astype(np.uint8)

    return predict
