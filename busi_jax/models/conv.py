"""A convolution whose weight gradient sums the gradients of batch slices.

XLA:CPU computes a 3x3 convolution's weight gradient at 25-40 GFLOP/s on this
project's 2-core machine, a third of its forward pass (issue #9). Summing the
weight gradients of ``chunks`` slices of the batch gives the same number in
2-2.5x less time for 32-64 channels at 32-64 px, where one slice's operands
fit the cache, and is slower for 16 channels at 128 px (batch 16, 8 slices).
The forward pass and the input gradient are left to XLA unchanged. Whole
train steps: ``python -m busi_jax.bench --jax_wgrad_chunks=1,8`` (see
docs/BENCHMARKS.md).

Use :func:`chunked_conv` as ``flax.linen.Conv(conv_general_dilated=...)``;
:func:`busi_jax.models.blocks.conv` does so per layer from the model's
``wgrad_chunks`` setting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax import lax


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(lhs: jax.Array, rhs: jax.Array, static: tuple) -> jax.Array:
    kwargs, _ = static
    return lax.conv_general_dilated(lhs, rhs, **dict(kwargs))


def _fwd(lhs, rhs, static):
    return _conv(lhs, rhs, static), (lhs, rhs)


def _bwd(static, res, g):
    kwargs, chunks = static
    kwargs = dict(kwargs)
    lhs, rhs = res

    def conv(x, w):
        return lax.conv_general_dilated(x, w, **kwargs)

    _, vjp_lhs = jax.vjp(lambda x: conv(x, rhs), lhs)
    (d_lhs,) = vjp_lhs(g)
    batch_axis = kwargs["dimension_numbers"].lhs_spec[0]
    out_batch_axis = kwargs["dimension_numbers"].out_spec[0]
    n = lhs.shape[batch_axis]
    k = _largest_divisor(n, chunks)
    step = n // k
    d_rhs = None
    # A Python loop, not lax.map: XLA then sees k independent small
    # convolutions it can schedule and keep in cache; a scan would serialise
    # them through a loop-carried accumulator.
    for i in range(k):
        x = lax.slice_in_dim(lhs, i * step, (i + 1) * step, axis=batch_axis)
        gi = lax.slice_in_dim(g, i * step, (i + 1) * step, axis=out_batch_axis)
        _, vjp_rhs = jax.vjp(lambda w, x=x: conv(x, w), rhs)
        (part,) = vjp_rhs(gi)
        d_rhs = part if d_rhs is None else d_rhs + part
    return d_lhs, d_rhs


_conv.defvjp(_fwd, _bwd)


@functools.lru_cache(maxsize=None)
def chunked_conv(chunks: int) -> Callable[..., jax.Array]:
    """A ``lax.conv_general_dilated`` replacement with a batch-chunked weight gradient.

    Args:
      chunks: batch slices for the weight gradient (the largest divisor of
        the batch size not above it is used; 1 computes it in one piece).

    Returns:
      A function with ``lax.conv_general_dilated``'s signature; the same
      object for the same ``chunks`` (so Flax modules using it compare equal).
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")

    def conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
    ):
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        kwargs = (
            ("window_strides", tuple(window_strides)),
            ("padding", padding if isinstance(padding, str) else tuple(map(tuple, padding))),
            ("lhs_dilation", None if lhs_dilation is None else tuple(lhs_dilation)),
            ("rhs_dilation", None if rhs_dilation is None else tuple(rhs_dilation)),
            ("dimension_numbers", dn),
            ("feature_group_count", feature_group_count),
            ("batch_group_count", batch_group_count),
            ("precision", precision),
            ("preferred_element_type", preferred_element_type),
        )
        if batch_group_count != 1:  # Already a weight-gradient-shaped conv: leave it to XLA.
            return lax.conv_general_dilated(lhs, rhs, **dict(kwargs))
        return _conv(lhs, rhs, (kwargs, chunks))

    return conv_general_dilated
