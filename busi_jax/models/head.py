"""The segmentation models' 1x1 logit head, with a fast path for bfloat16 features.

Every segmenter ends in a 1x1 convolution to float32 logits. ``nn.Conv`` in
float32 on bfloat16 features first writes a float32 copy of the whole
``[B, H, W, C]`` feature map and, in the backward pass, another for the
weight gradient, then converts the input gradient back, where the head does
0.1% of the step's multiply-adds (worth ~4 ms of the width-16 U-Net++'s
~650 ms bf16 train step on 2 CPU cores in an in-process A/B,
docs/BENCHMARKS.md, fifteenth session). For bfloat16 features
:func:`logit_head` computes the same function from the bf16 features
directly (float32 sums, the kernel split into two bf16 halves so the logits
keep float32's precision);
float32 features keep ``nn.Conv`` exactly. Both create ``nn.Conv``'s
variables (``kernel`` ``[1, 1, C, O]``, ``bias`` ``[O]``) with its
initialisers, so checkpoints and initial values do not depend on the dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from busi_jax.models.blocks import PARAM_DTYPE


def logit_head(features: int, x: jax.Array, name: str) -> jax.Array:
    """1x1 convolution of ``x`` ``[B, H, W, C]`` to float32 logits ``[B, H, W, features]``.

    Call from inside a parent module's compact method: the layer is created
    as that module's child ``name``.
    """
    if x.dtype == jnp.bfloat16:
        return Bf16LogitHead(features, name=name)(x)
    y = nn.Conv(features, (1, 1), dtype=jnp.float32, param_dtype=PARAM_DTYPE, name=name)(x)
    return y.astype(jnp.float32)


class Bf16LogitHead(nn.Module):
    """``nn.Conv(features, (1, 1))`` in float32 on bfloat16 features, without float32 copies.

    Attributes:
      features: output channels ``O``.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x ``[..., C]`` bfloat16. Returns: float32 ``[..., features]``."""
        c = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (1, 1, c, self.features), PARAM_DTYPE
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), PARAM_DTYPE)
        return bf16_logits(x, kernel[0, 0], bias)


@jax.custom_vjp
def bf16_logits(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``x @ kernel + bias`` in float32: bf16 ``x`` ``[..., C]``, float32 ``kernel`` ``[C, O]``.

    The kernel is taken as the sum of two bfloat16 halves (its bf16 rounding
    and the rounding of the rest), so the products are exact in float32 and
    the result differs from the float32 product by the second half's
    rounding, ~2^-16 of the kernel's magnitude. Gradients: ``dx`` computed
    in float32 and rounded once to bfloat16; ``dkernel`` and ``dbias``
    summed in float32 from the exact float32 values.
    """
    hi = kernel.astype(jnp.bfloat16)
    lo = (kernel - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    both = jnp.einsum(
        "...c,co->...o", x, jnp.concatenate([hi, lo], 1), preferred_element_type=jnp.float32
    )
    o = kernel.shape[1]
    return both[..., :o] + both[..., o:] + bias


def _bf16_logits_fwd(x, kernel, bias):
    return bf16_logits(x, kernel, bias), (x, kernel)


def _bf16_logits_bwd(res, g):
    x, kernel = res
    dx = jnp.einsum("...o,co->...c", g, kernel).astype(x.dtype)
    dkernel = jnp.einsum("...c,...o->co", x.astype(jnp.float32), g)
    dbias = jnp.sum(g.reshape(-1, g.shape[-1]), axis=0)
    return dx, dkernel, dbias


bf16_logits.defvjp(_bf16_logits_fwd, _bf16_logits_bwd)
