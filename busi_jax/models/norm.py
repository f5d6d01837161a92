"""BatchNorm followed by ReLU, with a hand-written gradient (issue #9).

:class:`BatchNormReLU` computes ``relu(nn.BatchNorm(x))`` with the same
variables as ``flax.linen.BatchNorm`` (params ``scale``/``bias``,
batch_stats ``mean``/``var``, the same running-average update), so
checkpoints move between the two. In training its backward pass is
:func:`batch_norm_relu`'s custom VJP: two per-channel sums and one
elementwise pass, with all arithmetic in float32 and one rounding to the
output dtype. XLA's autodiff of the Flax layer in bfloat16 spends about 3x
longer on a ``[16, 128, 128, 16]`` activation on 2 CPU cores (22 vs 6.6 ms,
forward + backward, in a scratch timing on an AMD EPYC); in float32 the two
took the same time. Whole train steps: docs/BENCHMARKS.md. The
values differ from the Flax layer only by rounding: it normalises in the
compute dtype, this in float32 (tests/test_norm.py).

With ``use_kernel`` (set by models on the native conv kernels) both passes
run in ``busi_jax/csrc/batch_norm.cc`` instead of jnp ops: there XLA split
the per-channel sums of a bf16 activation into slow reduce-window ops and
wrote a float32 copy of it; the kernel reads bf16 as it is (2.65 vs 18.3 ms
for that activation's forward + backward in a scratch timing; whole steps in
docs/BENCHMARKS.md, thirteenth session).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from busi_jax import native

Dtype = Any


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel batch mean and (biased) variance in float32, as Flax's fast variance."""
    xf = _flat(x).astype(jnp.float32)
    n = xf.shape[0]
    mean = jnp.sum(xf, axis=0) / n
    var = jnp.maximum(jnp.sum(xf * xf, axis=0) / n - mean * mean, 0.0)
    return mean, var


def _affine_relu(x, a, b, out_dtype):
    return jnp.maximum(x.astype(jnp.float32) * a + b, 0.0).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_relu(x, scale, bias, epsilon: float, out_dtype, use_kernel: bool = False) -> tuple:
    """``relu((x - mean) / sqrt(var + eps) * scale + bias)`` over batch statistics.

    Args:
      x: ``[..., C]`` activations (statistics over all but the last axis).
      scale, bias: ``[C]`` float32.
      epsilon: added to the variance.
      out_dtype: dtype of the output.
      use_kernel: run both passes in the C++ kernel
        (``busi_jax/csrc/batch_norm.cc``, built on first use) where ``x`` is
        float32 or bfloat16 on the CPU backend; elsewhere, and when False,
        jnp ops. The two agree up to float32 summation order.

    Returns:
      ``(y, mean, var)``: ``y`` like ``x`` in ``out_dtype``; the batch mean
      and biased variance ``[C]`` float32, for the running averages. Only
      ``y`` carries a gradient: cotangents of ``mean`` and ``var`` are
      ignored (callers stop their gradient).
    """
    return _forward(x, scale, bias, epsilon, out_dtype, use_kernel)[0]


def kernel_applies(x: jax.Array, out_dtype, use_kernel: bool) -> bool:
    """Whether :func:`batch_norm_relu` runs in the C++ kernel for this input."""
    io = (jnp.float32, jnp.bfloat16)
    return (
        use_kernel
        and x.dtype in io
        and jnp.dtype(out_dtype) in io
        and x.size > 0
        and jax.default_backend() == "cpu"
    )


def _forward(x, scale, bias, epsilon, out_dtype, use_kernel):
    if kernel_applies(x, out_dtype, use_kernel):
        c, f32 = x.shape[-1], jnp.float32
        call = jax.ffi.ffi_call(
            native.load("bn_relu_forward"),
            (
                jax.ShapeDtypeStruct(x.shape, out_dtype),
                jax.ShapeDtypeStruct((c,), f32),
                jax.ShapeDtypeStruct((c,), f32),
            ),
        )
        y, mean, var = call(x, scale, bias, epsilon=np.float32(epsilon))
    else:
        mean, var = _stats(x)
        a = scale * jax.lax.rsqrt(var + epsilon)
        y = _affine_relu(x, a, bias - mean * a, out_dtype)
    return (y, mean, var), (x, y, mean, var, scale)


def _backward(epsilon, out_dtype, use_kernel, res, cotangents):
    x, y, mean, var, scale = res
    g = cotangents[0].astype(y.dtype)
    if kernel_applies(x, out_dtype, use_kernel):
        c, f32 = x.shape[-1], jnp.float32
        call = jax.ffi.ffi_call(
            native.load("bn_relu_backward"),
            (
                jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct((c,), f32),
                jax.ShapeDtypeStruct((c,), f32),
            ),
        )
        return call(x, y, g, mean, var, scale, epsilon=np.float32(epsilon))
    rstd = jax.lax.rsqrt(var + epsilon)
    c = x.shape[-1]
    # ReLU's gradient from its output: y > 0 exactly where its input was.
    gz = jnp.where(_flat(y) > 0, _flat(g).astype(jnp.float32), 0.0)
    xhat = (_flat(x).astype(jnp.float32) - mean) * rstd
    n = gz.shape[0]
    dbias = jnp.sum(gz, axis=0)
    dscale = jnp.sum(gz * xhat, axis=0)
    dx = (scale * rstd) * (gz - dbias / n - xhat * (dscale / n))
    return dx.reshape(x.shape[:-1] + (c,)).astype(x.dtype), dscale, dbias


batch_norm_relu.defvjp(_forward, _backward)


class BatchNormReLU(nn.Module):
    """``relu(BatchNorm(x))`` with Flax BatchNorm's variables and a fast gradient.

    Attributes:
      momentum: running-average decay (``ra = momentum * ra + (1 - momentum) * batch``).
      epsilon: added to the variance.
      dtype: output dtype (statistics and normalisation run in float32).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_kernel: in training, run BatchNorm + ReLU and its gradient in the C++
        kernel (see :func:`batch_norm_relu`); models with
        ``wgrad='native'``, ``'native_bf16'`` or ``'native_amx'`` set it.
    """

    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_kernel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Args: x ``[B, H, W, C]``; train: batch statistics (and update the running ones).
        Returns: ``[B, H, W, C]`` in ``dtype``."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
        if not train:
            # Plain jnp: differentiable by autodiff (Grad-CAM needs that).
            a = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
            return _affine_relu(x, a, bias - ra_mean.value * a, self.dtype)
        y, mean, var = batch_norm_relu(
            x, scale, bias, self.epsilon, jnp.dtype(self.dtype), self.use_kernel
        )
        if not self.is_initializing():
            # As Flax: the init call leaves the running statistics at 0 / 1.
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        return y
