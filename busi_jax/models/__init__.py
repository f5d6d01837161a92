"""Model zoo and registry.

Every model is a ``flax.linen`` module used functionally::

    model = create_model(config.model)          # config.model.name = 'unet'
    variables = model.init(key, x, train=False)
    logits, updates = model.apply(variables, x, train=True,
                                  mutable=['batch_stats'],
                                  rngs={'dropout': key})

Inputs are NHWC ``[B, H, W, C]`` floats in [0, 1]; segmenters return float32
logits ``[B, H, W, 1]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from busi_jax.models.blocks import (
    AttentionGate,
    ChannelSpatialSE,
    ConvBlock,
    DilatedBottleneck,
    SpatialSE,
    SqueezeExcitation,
    UpSample,
)
from busi_jax.models.classifier import (
    CLASSIFIER_INPUT_MODES,
    ClassHead,
    Classifier,
    classifier_input_channels,
    classifier_inputs,
    crop_boxes,
    roi_boxes,
    uncrop_boxes,
)
from busi_jax.models.multitask import MultiTaskUNet
from busi_jax.models.unet import SUNet, UNet, UNetDecoder, UNetEncoder
from busi_jax.models.unetpp import UNetPlusPlus

MODELS: dict[str, type] = {
    "unet": UNet,
    "sunet": SUNet,
    "unetpp": UNetPlusPlus,
    "classifier": Classifier,
    "multitask": MultiTaskUNet,
}

# Segmenters return [B, H, W, 1] (or [K, B, H, W, 1]); the others differ.
SEGMENTATION_MODELS = ("unet", "sunet", "unetpp")

_DTYPE_ALIASES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
    "f16": jnp.float16,
}


def model_options(name: str) -> tuple[str, ...]:
    """The option names (constructor fields) model ``name`` accepts.

    Raises:
      ValueError: if ``name`` is not registered.
    """
    return tuple(
        f.name
        for f in dataclasses.fields(_lookup(name))
        if f.init and f.name not in ("parent", "name")
    )


def _lookup(name: str) -> type:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}")
    return MODELS[name]


def _as_dict(model_config: Any) -> dict[str, Any]:
    if hasattr(model_config, "to_dict"):  # ml_collections.ConfigDict
        return dict(model_config.to_dict())
    if isinstance(model_config, Mapping):
        return dict(model_config)
    raise TypeError(f"model_config must be a ConfigDict or mapping, got {type(model_config)}")


def _convert(key: str, value: Any) -> Any:
    if key == "dtype" and isinstance(value, str):
        if value not in _DTYPE_ALIASES:
            raise ValueError(
                f"dtype={value!r} is not valid; choose one of {sorted(_DTYPE_ALIASES)}"
            )
        return _DTYPE_ALIASES[value]
    # Config files produce lists; module fields must be hashable.
    if isinstance(value, list):
        return tuple(value)
    return value


def create_model(model_config: Any) -> nn.Module:
    """Builds a registered model from its config.

    Args:
      model_config: ``ml_collections.ConfigDict`` or mapping with ``name``
        (a key of :data:`MODELS`) and any of that model's options (see
        :func:`model_options`), passed as constructor arguments. ``dtype`` may
        be a string such as 'bfloat16'; lists become tuples.

    Returns:
      The unbound ``flax.linen`` module.

    Raises:
      ValueError: unknown model name, unknown option, or invalid option value.
    """
    cfg = _as_dict(model_config)
    if "name" not in cfg:
        raise ValueError(f"model config needs a 'name'; valid models: {sorted(MODELS)}")
    name = cfg.pop("name")
    cls = _lookup(name)
    valid = model_options(name)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; valid options: {list(valid)}"
        )
    return cls(**{k: _convert(k, v) for k, v in cfg.items()})


__all__ = [
    "MODELS",
    "SEGMENTATION_MODELS",
    "create_model",
    "model_options",
    "UNet",
    "SUNet",
    "UNetEncoder",
    "UNetDecoder",
    "UNetPlusPlus",
    "Classifier",
    "ClassHead",
    "MultiTaskUNet",
    "classifier_inputs",
    "classifier_input_channels",
    "roi_boxes",
    "crop_boxes",
    "uncrop_boxes",
    "CLASSIFIER_INPUT_MODES",
    "ConvBlock",
    "SqueezeExcitation",
    "SpatialSE",
    "ChannelSpatialSE",
    "AttentionGate",
    "DilatedBottleneck",
    "UpSample",
]
