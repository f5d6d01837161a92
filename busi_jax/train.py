"""Training: ``train_and_evaluate(config, workdir)`` for every task.

The loop is task-agnostic. A :class:`Task` bundles the pure functions that
differ between segmentation, classification and multitask training (model,
loss, inputs, evaluation outputs); swap a model or a loss by passing another
``Task`` (or ``model=`` / ``loss_fn=``) rather than editing the loop.

Data live in device memory for the whole run: each step gathers its batch by
index inside the jitted step, augments it there, and shards it over the
``data`` axis of a device mesh (one device on a laptop, all local devices
otherwise; GSPMD inserts the gradient all-reduce).

Workdir layout: ``config.json`` (written first), ``data_fingerprint.json``
(the scans of each split, :func:`same_scans`), ``checkpoints/latest`` and
``checkpoints/best`` (see :mod:`busi_jax.checkpoints`), ``metrics.jsonl`` (one
line per epoch), ``tensorboard/`` and, at the end, ``final_metrics.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from busi_jax import augment as augment_lib
from busi_jax import checkpoints as ckpt_lib
from busi_jax import data as data_lib
from busi_jax import io as busi_io
from busi_jax import losses
from busi_jax import metrics as metrics_lib
from busi_jax import models as models_lib

LossFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]
PRNG_IMPL = "rbg"


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# --- State -----------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    Attributes:
        step: number of optimizer updates so far.
        params: model parameters (float32).
        batch_stats: BatchNorm running statistics (empty dict without BatchNorm).
        opt_state: Optax state.
        ema_params: exponential moving average of ``params`` (equal to them when
            ``ema_decay`` is 0).
        rng: PRNG key, split once per step for augmentation and dropout.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array


def init_state(
    task: "Task",
    tx: optax.GradientTransformation,
    raw_arrays: Mapping[str, jax.Array],
    init_key: jax.Array,
    state_key: jax.Array,
) -> TrainState:
    """A fresh state: parameters initialised on one sample of ``raw_arrays``.

    Args:
      task: model and inputs.
      tx: the optimizer.
      raw_arrays: uint8 ``image``/``mask`` arrays (and targets), ``[N, ...]``.
      init_key: parameter (and dropout) initialisation key.
      state_key: the key the training steps split from, stored as raw data.
    """
    sample = to_model_batch({k: v[:1] for k, v in raw_arrays.items()})
    variables = task.model.init(
        {"params": init_key, "dropout": init_key}, task.inputs(sample), train=False
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        rng=jax.random.key_data(state_key),
    )


def inference_weights(state: TrainState, use_ema: bool) -> dict:
    """The variables used for evaluation and saved as 'best'."""
    return {
        "params": state.ema_params if use_ema else state.params,
        "batch_stats": state.batch_stats,
    }


# --- Tasks -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """The pure functions that make the loop a segmentation, classification or multitask loop.

    Attributes:
        kind: 'segmentation', 'classification' or 'multitask'.
        model: a Flax module.
        inputs: ``batch -> model input [B, H, W, C]``.
        loss_fn: ``(model outputs, batch) -> scalar``.
        outputs: ``(model outputs at train=False) -> dict`` of per-sample
            predictions: ``mask_prob [B, H, W, 1]`` and/or ``cls_prob [B]`` or
            ``[B, C]``.
        metric: the validation metric that ranks checkpoints ('lesion_dice' or 'auc').
    """

    kind: str
    model: nn.Module
    inputs: Callable[[Mapping[str, jax.Array]], jax.Array]
    loss_fn: LossFn
    outputs: Callable[[Any], dict]
    metric: str


# config.loss for segmenters: a region loss, BCE, or a region loss + bce_weight * BCE.
SEGMENTATION_LOSSES = ("dice", "tversky", "lovasz", "bce", "dice_bce", "tversky_bce", "lovasz_bce")
# Tversky settings where a config predates them (configs/default.py sets the same).
TVERSKY_DEFAULTS = {"tversky_alpha": 0.7, "tversky_beta": 0.3, "tversky_gamma": 1.0}


def _tversky(config: ml_collections.ConfigDict, field: str) -> float:
    return config.get(field, TVERSKY_DEFAULTS[field])


def segmentation_loss(config: ml_collections.ConfigDict) -> Callable:
    """The pixel loss named by ``config.loss``, wrapped for deep supervision."""
    name = config.loss
    if name not in SEGMENTATION_LOSSES:
        raise ConfigError(f"config.loss must be one of {list(SEGMENTATION_LOSSES)}, got {name!r}")
    region = {
        "dice": losses.dice_loss,
        "tversky": functools.partial(
            losses.tversky_loss,
            alpha=_tversky(config, "tversky_alpha"),
            beta=_tversky(config, "tversky_beta"),
            gamma=_tversky(config, "tversky_gamma"),
        ),
        "lovasz": losses.lovasz_hinge_loss,
    }
    if name == "bce":
        fn = losses.bce_loss
    elif name == "dice_bce":
        fn = functools.partial(losses.dice_bce_loss, bce_weight=config.bce_weight)
    elif name in region:
        fn = region[name]
    else:
        fn = _plus_bce(region[name[: -len("_bce")]], config.bce_weight)
    return losses.deep_supervision(fn, config.get("ds_weights"))


def _plus_bce(region_loss: Callable, bce_weight: float) -> Callable:
    """``region_loss + bce_weight * BCE``, as losses.dice_bce_loss is for Dice."""

    def fn(logits, mask):
        return region_loss(logits, mask) + bce_weight * losses.bce_loss(logits, mask)

    return fn


def _seg_prob(logits):
    if logits.ndim == 5:  # Stacked deep-supervision heads: average the logits.
        logits = logits.mean(axis=0)
    return jax.nn.sigmoid(logits.astype(jnp.float32))


def _cls_prob(logits):
    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if logits.ndim == 1 else jax.nn.softmax(logits, -1)


def make_task(
    config: ml_collections.ConfigDict, model: nn.Module | None = None, loss_fn: LossFn | None = None
) -> Task:
    """Builds the :class:`Task` named by ``config.task``.

    Args:
        config: the experiment config.
        model: overrides the model named by ``config.model``.
        loss_fn: overrides the loss, as ``(model outputs, batch) -> scalar``.
    """
    model = model or models_lib.create_model(config.model)
    kind = config.task
    if kind == "segmentation":
        pixel_loss = segmentation_loss(config)
        return Task(
            kind=kind,
            model=model,
            inputs=lambda b: b["image"],
            loss_fn=loss_fn or (lambda out, b: pixel_loss(out, b["mask"])),
            outputs=lambda out: {"mask_prob": _seg_prob(out)},
            metric="lesion_dice",
        )
    if kind == "classification":
        mode = config.classifier.input_mode
        return Task(
            kind=kind,
            model=model,
            inputs=lambda b: models_lib.classifier_inputs(b["image"], b["mask"], mode),
            loss_fn=loss_fn or (lambda out, b: losses.classification_loss(out, b["target"])),
            outputs=lambda out: {"cls_prob": _cls_prob(out)},
            metric="auc" if config.model.get("num_classes", 1) == 1 else "accuracy",
        )
    if kind == "multitask":
        pixel_loss = segmentation_loss(config)
        cls_weight = config.get("cls_weight", 1.0)

        def mt_loss(out, b):
            seg, cls = out
            # Normal scans have no lesion to call benign or malignant: they train
            # the segmentation head only.
            w = b["cls_weight"]
            per = optax.sigmoid_binary_cross_entropy(
                cls.astype(jnp.float32), b["target"].astype(jnp.float32)
            )
            cls_loss = jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
            return pixel_loss(seg, b["mask"]) + cls_weight * cls_loss

        return Task(
            kind=kind,
            model=model,
            inputs=lambda b: b["image"],
            loss_fn=loss_fn or mt_loss,
            outputs=lambda out: {"mask_prob": _seg_prob(out[0]), "cls_prob": _cls_prob(out[1])},
            metric="lesion_dice",
        )
    raise ConfigError(
        f"config.task must be 'segmentation', 'classification' or 'multitask', got {kind!r}"
    )


# --- Config checks -----------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the first bad field."""

    def need(cond, field, msg):
        if not cond:
            raise ConfigError(
                f"config.{field}={config[field] if '.' not in field else _get(config, field)!r}: {msg}"
            )

    need(
        isinstance(config.batch_size, int) and config.batch_size > 0,
        "batch_size",
        "must be a positive integer",
    )
    need(
        isinstance(config.eval_batch_size, int) and config.eval_batch_size > 0,
        "eval_batch_size",
        "must be a positive integer",
    )
    need(
        config.learning_rate > 0 and math.isfinite(config.learning_rate),
        "learning_rate",
        "must be a positive number",
    )
    need(
        isinstance(config.num_epochs, int) and config.num_epochs > 0,
        "num_epochs",
        "must be a positive integer",
    )
    need(config.early_stopping_patience >= 0, "early_stopping_patience", "must be >= 0")
    need(config.keep_best >= 1, "keep_best", "must be >= 1")
    need(
        isinstance(config.get("checkpoint_every_epochs", 1), int)
        and config.get("checkpoint_every_epochs", 1) >= 1,
        "checkpoint_every_epochs",
        "must be a positive integer",
    )
    need(0 <= config.ema_decay < 1, "ema_decay", "must lie in [0, 1)")
    need(isinstance(config.get("ema_warmup", True), bool), "ema_warmup", "must be True or False")
    need(
        isinstance(config.model.get("winograd", True), bool),
        "model.winograd",
        "must be True or False",
    )
    if config.task != "classification":
        need(
            config.loss in SEGMENTATION_LOSSES,
            "loss",
            f"must be one of {', '.join(repr(n) for n in SEGMENTATION_LOSSES)}",
        )
    for field in ("tversky_alpha", "tversky_beta"):
        need(_tversky(config, field) >= 0, field, "must be >= 0")
    need(_tversky(config, "tversky_gamma") > 0, "tversky_gamma", "must be > 0")
    need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(config.grad_clip >= 0, "grad_clip", "must be >= 0")
    need(0 < config.threshold < 1, "threshold", "must lie in (0, 1)")
    need(config.optimizer in ("adam", "adamw"), "optimizer", "must be 'adam' or 'adamw'")
    need(
        config.schedule in ("constant", "cosine", "onecycle"),
        "schedule",
        "must be 'constant', 'cosine' or 'onecycle'",
    )
    n_dev = jax.device_count()
    need(config.batch_size % n_dev == 0, "batch_size", f"must be divisible by the {n_dev} devices")
    try:
        aug = augment_lib.AugmentConfig.from_config(config.augment)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.augment: {e}") from None
    # Noise on a segmentation target would teach the segmenter wrong borders.
    need(
        aug.mask_identity or config.task == "classification",
        "augment.mask_blur_sigma",
        "and augment.mask_level_range perturb the mask, which only a classifier takes as"
        " input: keep them at 0 and (0.5, 0.5) for segmentation and multitask",
    )
    if config.task == "classification":
        modes = models_lib.CLASSIFIER_INPUT_MODES
        need(
            config.classifier.get("input_mode", "image_mask") in modes,
            "classifier.input_mode",
            f"must be one of {', '.join(repr(m) for m in modes)}",
        )
        need(
            config.classifier.get("val_mask_source", "same") in ("same", "predicted"),
            "classifier.val_mask_source",
            "must be 'same' or 'predicted'",
        )
    wgrad = config.model.get("wgrad", "xla")
    if wgrad in ("native", "native_amx", "native_bf16"):
        # Build the C++ kernels now: a missing compiler is then one clear error
        # before any data is read, not a failure inside the first jit trace.
        from busi_jax import native
        from busi_jax.models import conv

        if wgrad == "native_amx" and not conv.amx_available():
            raise ConfigError(
                "config.model.wgrad='native_amx' needs a CPU with AMX bf16 tiles (amx_tile and"
                " amx_bf16 in /proc/cpuinfo), and this one has none: use 'native_bf16' (AMX or"
                " AVX-512 BF16), 'native' or 'xla'"
            )
        if wgrad == "native_bf16" and not conv.bf16_kernels_available():
            raise ConfigError(
                "config.model.wgrad='native_bf16' needs a CPU with AMX bf16 tiles or AVX-512"
                " BF16 (amx_bf16 or avx512_bf16 in /proc/cpuinfo), and this one has neither:"
                " use 'native' or 'xla'"
            )
        try:
            native.load("conv_wgrad")
            if wgrad != "native":
                native.load("conv_amx_wgrad")
                conv.amx_selftest()
        except native.NativeBuildError as e:
            raise ConfigError(f"config.model.wgrad={wgrad!r}: {e}") from None


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


# --- Optimizer -------------------------------------------------------------


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """Adam(W) with the configured schedule and optional clipping."""
    total = steps_per_epoch * config.num_epochs
    lr = config.learning_rate
    if config.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        warm = steps_per_epoch * config.warmup_epochs
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, warm, max(total, warm + 1), end_value=lr * 0.01
        )
    else:
        schedule = optax.cosine_onecycle_schedule(max(total, 1), lr)
    if config.optimizer == "adam":
        opt = optax.adam(schedule)
    else:
        opt = optax.adamw(schedule, weight_decay=config.weight_decay)
    if config.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
    return opt


# --- Steps -----------------------------------------------------------------


def to_model_batch(raw: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """uint8 arrays to float32 model inputs: scans in [0, 1], masks in {0, 1}."""
    out = dict(raw)
    out["image"] = raw["image"].astype(jnp.float32) / 255.0
    out["mask"] = raw["mask"].astype(jnp.float32)
    return out


def ema_decay_at(step: jax.Array, ema_decay: float, warmup: bool) -> jax.Array:
    """The EMA decay used at optimizer step ``step`` (counted from 0).

    With ``warmup`` the decay is ``min(ema_decay, (1 + step) / (10 + step))``
    (the ``num_updates`` rule of TensorFlow's ExponentialMovingAverage):
    0.1 at the first step, 0.9 after 80, capped at ``ema_decay``. Without it,
    a decay of 0.99 keeps 44% of the random initialisation after 80 steps, and
    the averaged network is useless for the first epochs.
    """
    if not warmup or ema_decay == 0.0:
        return jnp.asarray(ema_decay, jnp.float32)
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1.0 + t) / (10.0 + t))


def train_step(
    state: TrainState,
    raw_batch: Mapping[str, jax.Array],
    *,
    task: Task,
    tx: optax.GradientTransformation,
    aug_cfg: augment_lib.AugmentConfig,
    ema_decay: float,
    ema_warmup: bool = True,
) -> tuple[TrainState, dict]:
    """One optimizer update on an augmented batch.

    Args:
        state: current state.
        raw_batch: ``image``/``mask`` ``[B, H, W, 1]`` uint8 and per-sample
            targets, straight from device memory.
        task: model and loss.
        tx: the optimizer.
        aug_cfg: augmentation (static).
        ema_decay: EMA decay (static); 0 copies the parameters.
        ema_warmup: ramp the decay up from 0.1 (see :func:`ema_decay_at`).

    Returns:
        The new state and ``{'loss': scalar}``.
    """
    rng, aug_key, drop_key = jax.random.split(state.rng, 3)
    batch = to_model_batch(raw_batch)
    batch["image"], batch["mask"] = augment_lib.augment_batch(
        aug_key, batch["image"], batch["mask"], aug_cfg
    )

    def loss_of(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        out, updates = task.model.apply(
            variables,
            task.inputs(batch),
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": drop_key},
        )
        return task.loss_fn(out, batch), updates.get("batch_stats", state.batch_stats)

    (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema,
        rng=rng,
    )
    return new_state, {"loss": loss}


def eval_step(variables: dict, raw_batch: Mapping[str, jax.Array], *, task: Task) -> dict:
    """Per-sample predictions of a batch at ``train=False``."""
    batch = to_model_batch(raw_batch)
    out = task.model.apply(variables, task.inputs(batch), train=False)
    return task.outputs(out)


# --- Data ------------------------------------------------------------------


def _classification_view(arrays: dict, num_classes: int) -> dict:
    """Targets for classification: benign (0) vs malignant (1), or 3 classes."""
    out = dict(arrays)
    if num_classes == 1:
        keep = arrays["label"] > 0
        out = {k: v[keep] for k, v in arrays.items()}
        out["target"] = (out["label"] == 2).astype(np.int32)
    else:
        out["target"] = arrays["label"].astype(np.int32)
    return out


def _multitask_view(arrays: dict) -> dict:
    out = dict(arrays)
    out["target"] = (arrays["label"] == 2).astype(np.int32)
    out["cls_weight"] = (arrays["label"] > 0).astype(np.float32)
    return out


def prepare_arrays(
    config: ml_collections.ConfigDict,
    arrays: Mapping[str, np.ndarray],
    predicted_masks: Callable[[np.ndarray], np.ndarray] | None = None,
    mask_source: str | None = None,
) -> dict:
    """Shapes loaded scans for ``config.task``.

    Args:
        config: experiment config.
        arrays: scans as loaded by :func:`busi_jax.data.load_split` or
            :func:`busi_jax.data.load_run_split`.
        predicted_masks: for classification with predicted masks, ``images
            [N, H, W, 1] uint8 -> masks [N, H, W, 1] uint8``; one with a true
            ``by_fold`` attribute (:class:`busi_jax.inference.FoldMasks`) is
            also given each scan's ``fold``.
        mask_source: overrides ``config.classifier.mask_source`` for this split.

    Returns:
        Host arrays with at least ``image``, ``mask``, ``label``, ``file_name``.
    """
    arrays = dict(arrays)
    if config.task == "classification":
        arrays = _classification_view(arrays, config.model.get("num_classes", 1))
        mask_source = mask_source or config.classifier.mask_source
        if mask_source == "predicted":
            if predicted_masks is None:
                raise ConfigError(
                    "config.classifier.mask_source='predicted' needs"
                    " config.classifier.segmenter_workdir (a trained segmenter's workdir)"
                )
            if getattr(predicted_masks, "by_fold", False):  # inference.FoldMasks
                arrays["mask"] = predicted_masks(arrays["image"], arrays["fold"])
            else:
                arrays["mask"] = predicted_masks(arrays["image"])
        elif mask_source != "ground_truth":
            raise ConfigError(
                f"config.classifier.mask_source must be 'predicted' or 'ground_truth',"
                f" got {mask_source!r}"
            )
    elif config.task == "multitask":
        arrays = _multitask_view(arrays)
    return arrays


_DEVICE_KEYS = ("image", "mask", "label", "target", "cls_weight")


def device_arrays(arrays: Mapping[str, np.ndarray], sharding) -> dict:
    return {k: jax.device_put(arrays[k], sharding) for k in _DEVICE_KEYS if k in arrays}


# --- Evaluation --------------------------------------------------------------


def predict_arrays(
    eval_fn, variables, arrays: Mapping[str, np.ndarray], batch_size: int, batch_sharding=None
) -> dict[str, np.ndarray]:
    """Runs ``eval_fn`` over host arrays in padded batches.

    Returns:
        Each output of the task, concatenated over samples (padding removed).
    """
    n = len(arrays["image"])
    outs: dict[str, list] = {}
    keys = [k for k in _DEVICE_KEYS if k in arrays]
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        pad = batch_size - len(idx)
        idx_p = np.concatenate([idx, np.full(pad, idx[-1])]) if pad else idx
        batch = {k: arrays[k][idx_p] for k in keys}
        if batch_sharding is not None:
            batch = jax.device_put(batch, batch_sharding)
        for k, v in eval_fn(variables, batch).items():
            outs.setdefault(k, []).append(np.asarray(v)[: len(idx)])
    return {k: np.concatenate(v) for k, v in outs.items()}


def summarize(
    task_kind: str,
    preds: Mapping[str, np.ndarray],
    arrays: Mapping[str, np.ndarray],
    threshold: float,
) -> dict[str, float]:
    """Validation metrics from predictions (see :mod:`busi_jax.metrics`)."""
    out: dict[str, float] = {}
    weight = np.ones(len(arrays["image"]), np.float32)
    if "mask_prob" in preds:
        seg = metrics_lib.SegmentationMetrics.from_batch(
            preds["mask_prob"] >= threshold, arrays["mask"] > 0, weight
        )
        out.update(seg.compute())
    if "cls_prob" in preds:
        if task_kind == "multitask":
            keep = arrays["cls_weight"] > 0
            cls = metrics_lib.ClassificationMetrics.from_batch(
                preds["cls_prob"][keep], arrays["target"][keep], weight[keep]
            )
        else:
            cls = metrics_lib.ClassificationMetrics.from_batch(
                preds["cls_prob"], arrays["target"], weight
            )
        out.update(cls.compute())
    return out


# --- Logging -----------------------------------------------------------------


class _Logger:
    """metrics.jsonl (rewritten whole on each epoch) and TensorBoard.

    Only process 0 writes, so a multi-host run keeps one log.
    """

    def __init__(self, workdir: pathlib.Path, resume_epoch: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.lines: list[dict] = []
        if self.path.exists():
            # Lines written after the checkpoint we resume from are dropped: those
            # epochs run again.
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("epoch", 0) <= resume_epoch:
                        self.lines.append(rec)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.fspath(workdir / "tensorboard")) if self.enabled else None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.enabled:
            self.tb.add_scalar(tag, value, step)

    def epoch(self, record: dict) -> None:
        self.lines.append(record)
        if not self.enabled:
            return
        busi_io.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.lines))
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step") and math.isfinite(v):
                self.tb.add_scalar(
                    f"{record['split'].replace(' ', '_')}/{k}"
                    if k != "train_loss"
                    else "train/loss_epoch",
                    v,
                    record["step"],
                )
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


# --- The loop --------------------------------------------------------------


def check_workdir(
    workdir: str | os.PathLike[str],
    config: ml_collections.ConfigDict,
    fingerprint: dict | None = None,
) -> pathlib.Path:
    """Creates the workdir, checks it is writable and writes ``config.json``.

    Args:
        workdir: the run's folder.
        config: the run's config.
        fingerprint: ``data.fingerprint`` of the data trained on, written to
            :data:`DATA_FINGERPRINT` (None: not written).

    Raises:
        ConfigError: the workdir holds a run of a different model, task or data
            (another config, or, since the data's location may change, a
            fingerprint naming other scans).
    """
    workdir = pathlib.Path(workdir).expanduser().absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: not writable ({e.strerror})") from None
    cfg_path = workdir / "config.json"
    new = json.loads(config.to_json_best_effort())
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        for field in ("task", "model", "data", "classifier"):
            if config_identity(old, field) != config_identity(new, field):
                raise ConfigError(
                    f"--workdir {workdir} holds a run with a different config.{field}"
                    f" ({json.dumps(old.get(field))[:200]}); use a fresh --workdir to train another one"
                )
    fp_path = workdir / DATA_FINGERPRINT
    if fingerprint is not None and fp_path.exists():
        if json.loads(fp_path.read_text()) != fingerprint:
            raise ConfigError(
                f"--workdir {workdir} holds a run trained on other scans than the dataset at"
                f" data_dir={config.data.data_dir}; use a fresh --workdir to train another one"
            )
    busi_io.atomic_write_json(cfg_path, new)
    if fingerprint is not None:
        busi_io.atomic_write_json(fp_path, fingerprint)
    return workdir


# Model options that change speed, not the function or the parameters: a run
# may resume with other values (and runs saved before they existed lack them).
# wgrad='native_bf16' / 'native_amx' round conv inputs to bf16, like model.dtype='bfloat16'
# would, but the parameters and what they compute stay the same model.
SPEED_ONLY_MODEL_OPTIONS = ("wgrad", "wgrad_chunks")
# Where the data live, not what they are: a workdir trained on a copy of the
# dataset elsewhere (a GPU host) still pairs with runs here. What the data are
# is compared through DATA_FINGERPRINT (see data.fingerprint).
LOCATION_ONLY_DATA_OPTIONS = ("data_dir", "manual_dir")
# Written beside config.json: the scans in each split of the data trained on.
DATA_FINGERPRINT = "data_fingerprint.json"


def config_identity(cfg: dict, field: str):
    """``cfg[field]`` of a saved or new config (a dict) as what makes a run the same run.

    Speed-only options are dropped, and so are fields that older runs lack
    when they hold their defaults, so a workdir, a paired segmenter or an
    ensemble member saved before such a field existed still matches.
    """
    value = cfg.get(field)
    if field == "model" and isinstance(value, dict):
        # An option stated at the model's own default builds the same model as
        # one left out (configs that gained fields still match older runs).
        defaults = _model_defaults(value.get("name"))
        value = {
            k: v
            for k, v in value.items()
            if k not in SPEED_ONLY_MODEL_OPTIONS
            and not (k in defaults and _same_option(v, defaults[k]))
        }
    if field == "data" and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in LOCATION_ONLY_DATA_OPTIONS}
        if value.get("cv_fold") is None:
            # Runs saved before cross-validation existed trained on the splits.
            value = {k: v for k, v in value.items() if k != "cv_fold"}
    if field == "classifier" and isinstance(value, dict) and value.get("val_mask_source") == "same":
        # Runs saved before the option existed used their training masks.
        value = {k: v for k, v in value.items() if k != "val_mask_source"}
    return value


def _model_defaults(name: Any) -> dict:
    cls = models_lib.MODELS.get(name) if isinstance(name, str) else None
    if cls is None:
        return {}
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.init and f.default is not dataclasses.MISSING
    }


def _same_option(saved: Any, default: Any) -> bool:
    # JSON keeps tuples as lists.
    if isinstance(saved, list) and isinstance(default, tuple):
        return tuple(saved) == default
    return type(saved) is type(default) and saved == default


@functools.lru_cache(maxsize=8)
def _fingerprint_of(data_json: str) -> dict:
    return data_lib.fingerprint(json.loads(data_json))


def data_fingerprint(data: ml_collections.ConfigDict) -> dict:
    """``data.fingerprint`` of a data config, computed once per config and process.

    A pipeline or a classifier on fold masks checks its segmenters against
    the same data it then trains on: one pass over the splits serves both.
    """
    return _fingerprint_of(json.dumps(json.loads(data.to_json_best_effort()), sort_keys=True))


def same_scans(run_dir: str | os.PathLike[str], data: ml_collections.ConfigDict) -> bool:
    """Whether the run in ``run_dir`` was trained on the scans and splits ``data`` holds.

    Compares the run's :data:`DATA_FINGERPRINT` with ``data``'s (computed once
    per data config and process). Runs saved before fingerprints existed are
    trusted on their config alone (:func:`data_identity`).
    """
    saved = pathlib.Path(run_dir) / DATA_FINGERPRINT
    if not saved.exists():
        return True
    return json.loads(saved.read_text()) == data_fingerprint(data)


def data_identity(data: ml_collections.ConfigDict, ignore_fold: bool = False) -> dict:
    """A data config as runs compare it (:func:`config_identity`), less ``cv_fold`` if ``ignore_fold``.

    Runs that differ only in their held-out fold (cross-validation members)
    deal the same scans to the same folds.
    """
    value = config_identity({"data": json.loads(data.to_json_best_effort())}, "data")
    return {k: v for k, v in value.items() if not (ignore_fold and k == "cv_fold")}


def warm_start(state: TrainState, source: str | os.PathLike[str], fingerprint: dict) -> TrainState:
    """``state`` with the weights of another run's best checkpoint (fine-tuning).

    Parameters and BatchNorm statistics come from ``source``'s best
    checkpoint (its EMA weights where it kept an EMA); the step, optimizer
    state and PRNG key stay ``state``'s (a fresh run's), and the EMA starts
    from the loaded weights.

    Args:
        state: a freshly initialised state of the same model.
        source: a training workdir.
        fingerprint: ``data.fingerprint`` of this run's data: ``source`` must
            have trained on the same split, or its weights would carry this
            run's validation or test scans into it.

    Raises:
        ConfigError: ``source`` is not a finished training workdir, trained
            on other scans, or holds another model's weights.
    """
    src = pathlib.Path(source).expanduser().absolute()
    if not (src / "checkpoints" / "best").is_dir():
        raise ConfigError(f"config.init_from={str(source)!r}: no best checkpoint in {src}")
    fp_path = src / DATA_FINGERPRINT
    if not fp_path.exists() or json.loads(fp_path.read_text()) != fingerprint:
        raise ConfigError(
            f"config.init_from={str(source)!r}: that run trained on another split or other scans"
            " than this one (its data fingerprint differs), so its weights may have seen this"
            " run's validation or test scans"
        )
    ckpts = ckpt_lib.Checkpoints(src)
    try:
        weights, _ = ckpts.restore_best({"params": state.params, "batch_stats": state.batch_stats})
    except ckpt_lib.CheckpointError as e:
        why = str(e).split(" Was it written")[0]  # Its advice is about --workdir.
        raise ConfigError(f"config.init_from={str(source)!r}: {why}") from None
    finally:
        ckpts.close()
    # A copy: the step donates params and ema_params, which must not share buffers.
    ema = jax.tree.map(jnp.copy, weights["params"])
    return state.replace(
        params=weights["params"], batch_stats=weights["batch_stats"], ema_params=ema
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    predicted_masks: Callable | None = None,
) -> dict:
    """Trains a model, resuming from ``workdir`` if it holds an interrupted run.

    Args:
        config: experiment config (see ``configs/default.py``).
        workdir: output folder.
        model: overrides ``config.model``.
        loss_fn: overrides the task's loss.
        predicted_masks: mask predictor for classification on predicted masks;
            built from ``config.classifier.segmenter_workdir`` when None.

    Returns:
        Validation metrics of the best checkpoint, also written to
        ``workdir/final_metrics.json``.
    """
    validate_config(config)
    task = make_task(config, model, loss_fn)
    from busi_jax import inference

    val_source = None
    if config.task == "classification":
        val_source = inference.validation_mask_source(config)
    if (
        config.task == "classification"
        and "predicted" in (config.classifier.mask_source, val_source)
        and predicted_masks is None
    ):
        if not config.classifier.segmenter_workdir:
            raise ConfigError(
                "config.classifier.segmenter_workdir is empty: classification on predicted masks needs a"
                " trained segmenter (or set config.classifier.mask_source='ground_truth')"
            )
        predicted_masks = inference.segmenter_masks(config.classifier.segmenter_workdir)
        if isinstance(predicted_masks, inference.FoldMasks):
            predicted_masks.check_data(config.data, "config.classifier.segmenter_workdir")
            if config.data.get("cv_fold") is not None:
                raise ConfigError(
                    "config.classifier.segmenter_workdir names cross-validation runs: train the"
                    " classifier on the splits (data.cv_fold unset), so its validation scans"
                    " stay out of its training"
                )

    train = prepare_arrays(config, data_lib.load_run_split(config.data, "train"), predicted_masks)
    val = prepare_arrays(
        config, data_lib.load_run_split(config.data, "eval"), predicted_masks, val_source
    )
    n_train = len(train["image"])
    if n_train < config.batch_size:
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {n_train} training scans"
        )
    steps_per_epoch = n_train // config.batch_size

    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    train_dev = device_arrays(train, replicated)

    tx = make_optimizer(config, steps_per_epoch)
    aug_cfg = augment_lib.AugmentConfig.from_config(config.augment)
    # 'rbg' keys: XLA compiles the default threefry generator very slowly on
    # CPU (tens of seconds for a U-Net's init and the augmentation); rbg is
    # just as deterministic for a given seed and backend.
    root = jax.random.key(config.seed, impl=PRNG_IMPL)
    init_key, data_key, state_key = jax.random.split(root, 3)
    # Jitted whole: op-by-op dispatch would compile every op of the init.
    first = {k: v[:1] for k, v in train_dev.items()}
    state = jax.jit(functools.partial(init_state, task, tx))(first, init_key, state_key)
    state = jax.device_put(state, replicated)
    fingerprint = data_fingerprint(config.data)
    warm = None
    if config.get("init_from"):
        warm = jax.device_put(warm_start(state, config.init_from, fingerprint), replicated)
    # The data (and any init_from weights) are loaded before the workdir is
    # touched, so a missing or bad dataset, segmenter_workdir or init_from
    # leaves nothing behind.
    workdir = check_workdir(workdir, config, fingerprint)

    ckpts = ckpt_lib.Checkpoints(workdir, task.metric, config.keep_best)
    meta = {
        "epoch": 0,
        "best_metric": -math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "stopped": False,
    }
    restored = ckpts.restore_latest(state)
    if restored is None and warm is not None:
        state = warm
    if restored is not None:
        state, meta = restored
        state = jax.device_put(state, replicated)
        print(
            f"Resuming from {workdir}/checkpoints/latest at epoch {meta['epoch']}", file=sys.stderr
        )
    logger = _Logger(workdir, meta["epoch"])

    @functools.partial(jax.jit, donate_argnums=(0,))
    def run_step(state, idx):
        raw = jax.tree.map(lambda a: a[idx], train_dev)
        raw = jax.lax.with_sharding_constraint(raw, batch_sharding)
        # The PRNG key is stored as raw key data so Orbax can save it.
        s = state.replace(rng=jax.random.wrap_key_data(state.rng, impl=PRNG_IMPL))
        s, m = train_step(
            s,
            raw,
            task=task,
            tx=tx,
            aug_cfg=aug_cfg,
            ema_decay=config.ema_decay,
            ema_warmup=config.get("ema_warmup", True),
        )
        return s.replace(rng=jax.random.key_data(s.rng)), m

    eval_fn = jax.jit(functools.partial(eval_step, task=task))
    use_ema = config.ema_decay > 0

    saved_epoch = meta["epoch"]  # Of the last full-state checkpoint.
    total_steps = steps_per_epoch * config.num_epochs
    bar = _progress(config, total_steps, int(state.step))
    try:
        epoch = meta["epoch"]
        while epoch < config.num_epochs and not meta["stopped"]:
            epoch += 1
            t0 = time.time()
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), n_train))
            loss_avg = metrics_lib.Average()
            for s in range(steps_per_epoch):
                idx = jnp.asarray(perm[s * config.batch_size : (s + 1) * config.batch_size])
                state, m = run_step(state, idx)
                step = int(state.step)
                # Every step's loss is checked (one scalar sync per step, which
                # costs nothing next to a CPU step), so a divergence is reported at
                # the step it happens and the NaN state is never checkpointed.
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} at step {step} (epoch {epoch}); training stopped and the"
                        f" last good checkpoint (end of epoch {saved_epoch}) is kept in"
                        f" {workdir}/checkpoints (try a lower config.learning_rate)"
                    )
                loss_avg = loss_avg.merge(metrics_lib.Average.of(loss))
                if s % config.log_every_steps == 0 or s == steps_per_epoch - 1:
                    logger.scalar("train/loss", loss, step)
                if bar is not None:
                    rate = (s + 1) * config.batch_size / max(time.time() - t0, 1e-9)
                    bar.set_postfix_str(
                        f"epoch {epoch}/{config.num_epochs} loss {loss_avg.compute():.4f} {rate:.1f} img/s"
                    )
                    bar.update(1)
            train_time = time.time() - t0
            weights = inference_weights(state, use_ema)
            preds = predict_arrays(eval_fn, weights, val, config.eval_batch_size)
            val_metrics = summarize(task.kind, preds, val, config.threshold)
            value = val_metrics.get(task.metric, float("nan"))
            improved = math.isfinite(value) and value > meta["best_metric"]
            if improved:
                meta.update(best_metric=float(value), best_epoch=epoch, bad_epochs=0)
            else:
                meta["bad_epochs"] += 1
            meta["epoch"] = epoch
            patience = config.early_stopping_patience
            if patience and meta["bad_epochs"] >= patience:
                meta["stopped"] = True
            record = {
                "epoch": epoch,
                "step": int(state.step),
                "split": _eval_name(config.data),
                "train_loss": loss_avg.compute(),
                **val_metrics,
                "devices": jax.device_count(),
                "img_per_s": steps_per_epoch * config.batch_size / max(train_time, 1e-9),
                "epoch_seconds": time.time() - t0,
            }
            logger.epoch(record)
            if improved:
                ckpts.save_best(
                    int(state.step),
                    weights,
                    {"epoch": epoch, **_clean(val_metrics)},
                    {task.metric: value},
                )
            # On a fast accelerator writing the whole state every epoch can
            # cost more than the epoch; an interruption then redoes < N epochs.
            every = config.get("checkpoint_every_epochs", 1)
            if epoch % every == 0 or epoch == config.num_epochs or meta["stopped"]:
                ckpts.save_latest(int(state.step), state, meta)
                saved_epoch = epoch
            if bar is None:
                print(
                    f"epoch {epoch}: train_loss {record['train_loss']:.4f} val {task.metric} {value:.4f}",
                    file=sys.stderr,
                )
            if meta["stopped"]:
                print(
                    f"Early stopping at epoch {epoch}: no better validation {task.metric} for {patience} epochs",
                    file=sys.stderr,
                )
    finally:
        if bar is not None:
            bar.close()
        logger.close()

    best_weights, best_meta = ckpts.restore_best(inference_weights(state, use_ema))
    ckpts.close()
    preds = predict_arrays(eval_fn, best_weights, val, config.eval_batch_size)
    final = {
        "split": _eval_name(config.data),
        "best_epoch": best_meta["epoch"],
        "epochs_run": meta["epoch"],
        **summarize(task.kind, preds, val, config.threshold),
    }
    busi_io.atomic_write_json(workdir / "final_metrics.json", _clean(final))
    print(
        f"Validation ({_eval_name(config.data)}) of the best checkpoint (epoch {best_meta['epoch']}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float)),
        file=sys.stderr,
    )
    return final


def _eval_name(data_config) -> str:
    """What a run validates on, for logs: a split, or a cross-validation fold."""
    fold = data_config.get("cv_fold")
    return data_config.eval_split if fold is None else f"cv fold {fold}"


def _clean(d: Mapping) -> dict:
    """JSON-safe copy (NaN becomes None)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _progress(config, total, initial):
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=1.0,
    )
