"""2x2 max pooling, and a U-Net encoder's skip-plus-pool pair with a one-pass gradient.

In a U-Net the encoder's output at each level goes two ways: to the decoder
as a skip connection and, max-pooled, to the next level. In a train step
autodiff then computes the pool's gradient (``g * (x == max) / ties``) and
adds it to the skip's gradient: two passes over the level's activation, which
XLA:CPU runs slowly on bfloat16. Doing both in one kernel pass saved 12 ms
of the width-16 U-Net's bf16 train step and 8 ms of the U-Net++'s on 2 cores
(in-process A/B, docs/BENCHMARKS.md, fifteenth session).
:func:`skip_and_max_pool2` returns both branches from one function whose
gradient is one pass of the C++ kernel ``busi_jax/csrc/max_pool.cc``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from busi_jax import native


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2: ``[B, H, W, C] -> [B, H//2, W//2, C]``.

    The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, computed as
    a max over a reshape: its gradient is then one fused elementwise pass
    (``g * (x == max) / ties``), where reduce_window's gradient materialises
    four int32 index arrays the size of ``x`` and a scatter (about a tenth of
    a width-16 U-Net++ step on CPU, issue #9). The two differ only where a
    window holds tied maxima: this splits the gradient among them,
    reduce_window gives it to one.
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def kernel_applies(x: jax.Array, use_kernel: bool) -> bool:
    """Whether :func:`skip_and_max_pool2` takes its gradient from the C++ kernel."""
    return (
        use_kernel
        and x.ndim == 4
        and x.shape[1] % 2 == 0
        and x.shape[2] % 2 == 0
        and x.size > 0
        and x.dtype in (jnp.float32, jnp.bfloat16)
        and jax.default_backend() == "cpu"
    )


def skip_and_max_pool2(x: jax.Array, use_kernel: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(x, max_pool2(x))``: a U-Net level's skip connection and the next level's input.

    Args:
      x: ``[B, H, W, C]`` activations.
      use_kernel: where :func:`kernel_applies` (CPU, float32 or bfloat16, H
        and W even), the gradient with respect to ``x`` is the skip's
        cotangent plus the unpooled one, summed in float32 in one pass of
        ``busi_jax/csrc/max_pool.cc`` (built on first use); else autodiff's
        two passes. The values are those of ``max_pool2``'s gradient and the
        addition, up to one bfloat16 rounding fewer.

    Returns:
      ``(skip, pooled)``: ``skip`` is ``x`` (use it, not ``x``, for every
      later use, so its cotangents reach the kernel); ``pooled`` is
      ``[B, H/2, W/2, C]``.
    """
    if not kernel_applies(x, use_kernel):
        return x, max_pool2(x)
    return _skip_and_pool(x)


@jax.custom_vjp
def _skip_and_pool(x):
    return x, max_pool2(x)


def _skip_and_pool_fwd(x):
    pooled = max_pool2(x)
    return (x, pooled), (x, pooled)


def _skip_and_pool_bwd(res, cotangents):
    x, pooled = res
    g_skip, g_pooled = (g.astype(x.dtype) for g in cotangents)
    call = jax.ffi.ffi_call(
        native.load("max_pool_backward"), jax.ShapeDtypeStruct(x.shape, x.dtype)
    )
    return (call(x, pooled, g_skip, g_pooled),)


_skip_and_pool.defvjp(_skip_and_pool_fwd, _skip_and_pool_bwd)
