"""Inference weights packed once for the bf16 conv kernels: the ``'packed'`` collection.

Every call of the C++ bf16 convolution (:func:`busi_jax.models.conv.amx_conv`)
first rounds its float32 kernel to bf16 and reorders it for the vector units
(Winograd layers: also transforms it, ``G g G^T``). With fixed weights that
is the same work on every scan: :func:`pack_inference` does it once and
stores the packed kernels as a variable collection, ``'packed'``, that the
modules read at ``train=False`` instead (the idea of oneDNN's weight
prepacking or ``torch.jit.freeze``). Outputs are bit for bit those of the
unpacked variables: the packing is the same C++ code either way, and what
is computed in float32 from several variables (the folded BatchNorm) stays
in the traced model, where eager and jitted arithmetic could round apart.

    variables = pack_inference(model, variables, jnp.zeros((1, 128, 128, 1)))
    logits = model.apply(variables, x, train=False)

The collection is derived data: never saved (checkpoints hold ``params`` and
``batch_stats``), valid only for the weights, input size and machine it was
made from, and forward only (no gradients through it). Models or layers that
do not run on the bf16 kernels (``wgrad='xla'``, the classifier) add nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

PACKED = "packed"


def packed_entry(module: nn.Module, name: str, make: Callable[[], Any]) -> Any | None:
    """``module``'s ``'packed'`` variable ``name``: stored, made now, or None.

    Args:
      module: the (bound) module asking.
      name: the variable's name in the module's ``'packed'`` collection.
      make: computes the value from the module's own variables; called only
        while :func:`pack_inference` runs (the collection is mutable).

    Returns:
      The stored value if ``variables`` holds one, else ``make()`` (stored)
      while packing, else None (and always None in ``init``): the caller
      then computes from ``params``.
    """
    if module.is_initializing():  # init makes every collection mutable.
        return None
    if module.has_variable(PACKED, name):
        return module.get_variable(PACKED, name)
    if module.is_mutable_collection(PACKED):
        value = make()
        module.put_variable(PACKED, name, value)
        return value
    return None


def check_packed_kernel(kernel: jax.Array, winograd: bool, where: str) -> None:
    """Raises ValueError unless ``kernel`` was packed for the path this call takes.

    Whether a 3x3 conv runs by Winograd depends on its input size
    (:func:`busi_jax.models.conv.winograd_fits`); a kernel packed at another
    size may have the other layout (``[4, 4, C, O]`` against ``[3, 3, C, O]``).
    """
    if (kernel.shape[0] == 4) != winograd:
        raise ValueError(
            f"{where}: its packed kernel {tuple(kernel.shape)} was made for "
            f"{'the direct pass' if winograd else 'Winograd'}, but this input size runs "
            f"{'Winograd' if winograd else 'the direct pass'}; run pack_inference again "
            "with an input of the size you apply the model to"
        )


def pack_inference(model: nn.Module, variables: dict, x: jax.Array) -> dict:
    """``variables`` plus the ``'packed'`` collection for applying ``model`` to inputs like ``x``.

    Runs ``model`` once at ``train=False`` on ``x`` with the collection
    mutable; each bf16-kernel conv stores its packed kernel there. Any batch
    size serves: the packing depends on the input's height, width and
    channels only.

    Args:
      model: a model from :func:`busi_jax.models.create_model`.
      variables: its ``params`` and ``batch_stats`` (a ``'packed'``
        collection already there is made again).
      x: ``[B, H, W, C]`` input of the size inference will use.

    Returns:
      A new dict: ``variables`` with ``'packed'`` added where any layer packs.
    """
    base = {k: v for k, v in variables.items() if k != PACKED}
    _, made = model.apply(base, x, train=False, mutable=[PACKED])
    return {**base, **made}
