"""On-device data augmentation for breast-ultrasound segmentation.

Everything here is pure JAX: it runs on the accelerator, inside ``jax.jit``,
on whole batches, and draws its randomness only from explicit PRNG keys, so a
training step can augment its own batch without a host round trip and a run
is reproducible from its seed.

Two families of augmentation are applied, in this order:

1. **Geometry** (scan and mask together). Per sample, one random affine
   transform is composed from horizontal flip, vertical flip, zoom (scale),
   shear, rotation and translation into a single 3x3 matrix, and the image is
   resampled **once** with it. Composing first and sampling once avoids the
   blur that compounds when each transform resamples separately, and the scan
   and the mask are warped in the *same* call (stacked along channels), so
   they see bit-identical sampling coordinates and cannot drift apart.
2. **Intensity** (scan only, after the warp): multiplicative speckle,
   contrast, brightness and gamma, then a clip to ``[0, 1]``.
3. **Mask input noise** (mask only, off by default; for a classifier, whose
   mask is an *input*, never for a segmenter, whose mask is the target): a
   Gaussian blur of random width and a re-threshold at a random level, which
   rounds off fine margin detail and moves the border in or out by a few
   pixels, as a segmenter's predicted masks do.

Coordinate convention
---------------------
* A pixel is addressed as ``(x, y) = (column, row)``; pixel centres lie on
  integer coordinates, ``x`` grows to the right and ``y`` grows *down*.
* Matrices act on homogeneous column vectors ``[x, y, 1]`` and are
  **forward** maps: input pixel -> output pixel. A point at ``p`` in the input
  appears at ``M @ p`` in the output.
* :func:`warp` therefore fills output pixel ``q`` from input position
  ``inv(M) @ q`` (inverse mapping, so every output pixel gets a value).
* Rotation, zoom, shear and the flips are taken about the image centre
  ``((W - 1) / 2, (H - 1) / 2)``, so they keep the content centred; a flip
  maps column ``x`` to ``W - 1 - x`` exactly like ``jnp.flip``.
* A positive rotation angle turns the content **counter-clockwise as
  displayed** (the ``jnp.rot90`` / ``scipy.ndimage.rotate`` convention).
* ``scale > 1`` enlarges the content (zoom in, i.e. a centred crop);
  ``scale < 1`` shrinks it (zoom out, with fill around it).

Interpolation and fill
----------------------
* The scan is resampled bilinearly.
* The mask is resampled bilinearly and then thresholded at 0.5. Compared with
  nearest-neighbour this gives smoother, less stair-stepped lesion borders
  after rotation/zoom, and the 0.5 level set of the interpolated mask is the
  same curve that the scan's lesion edge follows, so the two stay aligned.
* Samples that fall outside the input read 0 for both scan and mask
  (constant fill). BUSI scans already have black surroundings outside the
  imaged region, so a black fill looks like a plausible scan border, whereas
  reflection would mirror anatomy (and possibly half a lesion that the mask,
  filled with 0, would not contain).

Typical use::

    cfg = AugmentConfig.from_config(config.augment)   # hashable, static
    key, aug_key = jax.random.split(key)
    images, masks = augment_batch(aug_key, images, masks, cfg)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "AugmentConfig",
    "augment_batch",
    "compose_affine",
    "intensity_augment",
    "perturb_masks",
    "sample_affine",
    "warp",
]

# Fields that hold a (low, high) range; they are normalised to tuples of
# floats so that the config stays hashable (it is a static jit argument).
_RANGE_FIELDS = ("scale_range", "contrast_range", "gamma_range", "mask_level_range")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings. Frozen and hashable, so usable as a static arg.

    Every range includes the identity, and a range of zero width (or a
    probability of 0) switches that augmentation off entirely: it is then
    skipped at trace time rather than applied with a neutral value, so an
    all-zero config returns the batch bit-for-bit.

    Attributes:
      enabled: Master switch; ``False`` makes :func:`augment_batch` return its
        inputs unchanged.
      hflip_prob: Probability of a left-right flip, in ``[0, 1]``. Left and
        right breast images are mirror images, so 0.5 is safe.
      vflip_prob: Probability of an up-down flip, in ``[0, 1]``. Off by
        default: the transducer (skin, subcutaneous fat) is always at the top
        of an ultrasound image and a lesion's posterior shadowing points
        down, so a vertical flip makes anatomically impossible images.
      rotation_deg: Maximum absolute rotation in degrees, in ``[0, 180]``;
        the angle is uniform in ``[-rotation_deg, rotation_deg]``.
      scale_range: ``(low, high)`` zoom factors, ``0 < low <= high``; sampled
        log-uniformly so that zooming in by 2 and out by 2 are equally likely.
      translate_frac: Maximum shift as a fraction of the image width
        (horizontally) and height (vertically), in ``[0, 1]``.
      shear_deg: Maximum absolute shear angle in degrees, in ``[0, 45)``;
        independent x and y shears are drawn from ``[-shear_deg, shear_deg]``.
        Below 45 degrees the composed matrix is always invertible.
      brightness_delta: Maximum absolute additive brightness shift, in
        ``[0, 1]``; uniform in ``[-delta, delta]``.
      contrast_range: ``(low, high)`` factors, ``0 < low <= high``, by which
        each scan's deviation from its own mean is multiplied.
      gamma_range: ``(low, high)`` exponents, ``0 < low <= high``, sampled
        log-uniformly; the scan becomes ``scan ** gamma``.
      speckle_sigma: Maximum strength, ``>= 0``, of multiplicative log-normal
        speckle. Each sample draws a strength ``s ~ U[0, speckle_sigma]`` and
        every pixel is multiplied by ``exp(s * z - s**2 / 2)``, ``z ~ N(0,1)``
        (mean 1, so the average brightness is unchanged). Multiplicative
        noise is the physical model of ultrasound speckle and leaves the
        black background black.
      mask_blur_sigma: Maximum Gaussian blur, in pixels, ``[0, 8]``, of the
        mask input noise: each sample draws ``sigma ~ U[0, mask_blur_sigma]``.
        Only for a classifier fed a mask (``train.validate_config`` refuses
        it for a segmentation target).
      mask_level_range: ``(low, high)`` in ``(0, 1)``: the blurred mask is
        re-thresholded at a level drawn uniformly from it. Below 0.5 grows
        the mask, above 0.5 shrinks it. ``(0.5, 0.5)`` with a zero blur is off.
    """

    enabled: bool = True
    hflip_prob: float = 0.5
    vflip_prob: float = 0.0
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translate_frac: float = 0.1
    shear_deg: float = 5.0
    brightness_delta: float = 0.1
    contrast_range: tuple[float, float] = (0.8, 1.2)
    gamma_range: tuple[float, float] = (0.8, 1.25)
    speckle_sigma: float = 0.1
    mask_blur_sigma: float = 0.0
    mask_level_range: tuple[float, float] = (0.5, 0.5)

    def __post_init__(self):
        # Normalise types first (lists -> tuples, ints -> floats) so equal
        # configs hash equal and jit does not retrace for 15 vs 15.0.
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be a bool, got {self.enabled!r}")
        for f in dataclasses.fields(self):
            if f.name == "enabled":
                continue
            value = getattr(self, f.name)
            if f.name in _RANGE_FIELDS:
                value = _as_range(f.name, value)
            else:
                value = _as_float(f.name, value)
            object.__setattr__(self, f.name, value)

        for name in ("hflip_prob", "vflip_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if not 0.0 <= self.rotation_deg <= 180.0:
            raise ValueError(f"rotation_deg must be in [0, 180], got {self.rotation_deg}")
        if not 0.0 <= self.translate_frac <= 1.0:
            raise ValueError(f"translate_frac must be in [0, 1], got {self.translate_frac}")
        if not 0.0 <= self.shear_deg < 45.0:
            raise ValueError(f"shear_deg must be in [0, 45), got {self.shear_deg}")
        if not 0.0 <= self.brightness_delta <= 1.0:
            raise ValueError(f"brightness_delta must be in [0, 1], got {self.brightness_delta}")
        if self.speckle_sigma < 0.0:
            raise ValueError(f"speckle_sigma must be >= 0, got {self.speckle_sigma}")
        if not 0.0 <= self.mask_blur_sigma <= _MAX_MASK_SIGMA:
            raise ValueError(
                f"mask_blur_sigma must be in [0, {_MAX_MASK_SIGMA:g}], got {self.mask_blur_sigma}"
            )
        if not self.mask_level_range[1] < 1.0:
            raise ValueError(f"mask_level_range must lie in (0, 1), got {self.mask_level_range}")
        for name in _RANGE_FIELDS:
            low, high = getattr(self, name)
            if low <= 0.0:
                raise ValueError(f"{name} must be > 0, got {(low, high)}")
            if low > high:
                raise ValueError(f"{name} must satisfy low <= high, got {(low, high)}")

    @classmethod
    def from_config(cls, config: Any = None) -> "AugmentConfig":
        """Builds a config from an ``ml_collections.ConfigDict`` or a mapping.

        Missing keys keep their defaults. Unknown keys raise, because a typo
        such as ``rotation_degs`` would otherwise silently train with the
        default.

        Args:
          config: ``None``, an ``AugmentConfig`` (returned as is), an
            ``ml_collections.ConfigDict`` / ``FrozenConfigDict``, or any
            mapping of field name to value.

        Returns:
          A validated ``AugmentConfig``.

        Raises:
          ValueError: On an unknown key or an invalid value; the message
            names the field.
        """
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if hasattr(config, "to_dict"):  # ml_collections (Frozen)ConfigDict.
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ValueError(
                f"augment config must be a mapping or ConfigDict, got {type(config).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"unknown augment config field(s) {unknown}; known fields are {sorted(known)}"
            )
        return cls(**dict(config))

    @property
    def geometric_identity(self) -> bool:
        """True when no geometric augmentation can change the image."""
        return (
            self.hflip_prob == 0.0
            and self.vflip_prob == 0.0
            and self.rotation_deg == 0.0
            and self.translate_frac == 0.0
            and self.shear_deg == 0.0
            and self.scale_range[0] == self.scale_range[1] == 1.0
        )

    @property
    def mask_identity(self) -> bool:
        """True when the mask input noise is off."""
        return self.mask_blur_sigma == 0.0 and self.mask_level_range == (0.5, 0.5)

    @property
    def intensity_identity(self) -> bool:
        """True when no intensity augmentation can change the scan."""
        return (
            self.brightness_delta == 0.0
            and self.speckle_sigma == 0.0
            and self.contrast_range == (1.0, 1.0)
            and self.gamma_range == (1.0, 1.0)
        )


def _as_float(name: str, value: Any) -> float:
    # numbers.Real covers Python and numpy scalars but not arrays: the config
    # must stay a static, hashable Python object. bool is excluded because
    # True silently meaning 1.0 is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _as_range(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    return (_as_float(name, value[0]), _as_float(name, value[1]))


# Blur kernels are cut at 3 sigma; 8 px (a 49-tap kernel) already erases most of
# a small lesion at 128 px.
_MAX_MASK_SIGMA = 8.0


# ---------------------------------------------------------------------------
# Affine matrices.
# ---------------------------------------------------------------------------


def _matrix(a, b, c, d, e, f):
    """Stacks batched entries into ``[..., 3, 3]`` matrices [[a b c][d e f][0 0 1]]."""
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in (a, b, c, d, e, f)))
    zero = jnp.zeros(shape, jnp.float32)
    one = jnp.ones(shape, jnp.float32)
    rows = [[a, b, c], [d, e, f], [zero, zero, one]]
    return jnp.stack(
        [
            jnp.stack([jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in row], axis=-1)
            for row in rows
        ],
        axis=-2,
    )


def compose_affine(
    height: int,
    width: int,
    *,
    hflip=False,
    vflip=False,
    angle_deg=0.0,
    scale=1.0,
    translate=(0.0, 0.0),
    shear_deg=(0.0, 0.0),
) -> jax.Array:
    """Composes one forward affine matrix per sample (input -> output pixel).

    The content is, about the image centre, first flipped, then scaled, then
    sheared, then rotated, and finally translated::

        M = T(centre + translate) @ R(angle) @ Sh(shear) @ S(scale)
            @ F(hflip, vflip) @ T(-centre)

    All parameters may be Python scalars or arrays with a common batch shape
    ``[...]``; the result is ``[..., 3, 3]``. With all parameters at their
    defaults the result is exactly the identity.

    Args:
      height: Image height H in pixels (static).
      width: Image width W in pixels (static).
      hflip: Bool ``[...]``; mirror left-right (column x -> W - 1 - x).
      vflip: Bool ``[...]``; mirror up-down (row y -> H - 1 - y).
      angle_deg: Float ``[...]``; counter-clockwise rotation as displayed.
      scale: Float ``[...]``; zoom factor (> 1 enlarges the content).
      translate: ``(tx, ty)`` floats ``[...]`` in pixels; positive moves the
        content right / down.
      shear_deg: ``(shx, shy)`` shear angles in degrees: ``x += tan(shx) * y``
        and ``y += tan(shy) * x`` (centred coordinates).

    Returns:
      Float32 ``[..., 3, 3]`` forward matrices acting on ``[x, y, 1]``.
    """
    cx = (width - 1) / 2.0
    cy = (height - 1) / 2.0
    fx = jnp.where(jnp.asarray(hflip), -1.0, 1.0)
    fy = jnp.where(jnp.asarray(vflip), -1.0, 1.0)
    theta = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    scale = jnp.asarray(scale, jnp.float32)
    shx = jnp.tan(jnp.deg2rad(jnp.asarray(shear_deg[0], jnp.float32)))
    shy = jnp.tan(jnp.deg2rad(jnp.asarray(shear_deg[1], jnp.float32)))
    tx = jnp.asarray(translate[0], jnp.float32)
    ty = jnp.asarray(translate[1], jnp.float32)
    zero, one = 0.0, 1.0

    to_origin = _matrix(one, zero, -cx, zero, one, -cy)
    flip = _matrix(fx, zero, zero, zero, fy, zero)
    zoom = _matrix(scale, zero, zero, zero, scale, zero)
    shear = _matrix(one, shx, zero, shy, one, zero)
    # y points down, so the usual [[c, -s], [s, c]] would turn the picture
    # clockwise on screen; flipping the sign of s makes positive angles
    # counter-clockwise as displayed, matching jnp.rot90.
    rotate = _matrix(cos, sin, zero, -sin, cos, zero)
    back = _matrix(one, zero, cx + tx, zero, one, cy + ty)
    # HIGHEST keeps float32 products exact on accelerators that would
    # otherwise use reduced-precision (e.g. TF32/bf16) matmuls.
    mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    return mm(back, mm(rotate, mm(shear, mm(zoom, mm(flip, to_origin)))))


@functools.partial(jax.jit, static_argnames=("batch", "height", "width", "cfg"))
def sample_affine(
    key: jax.Array, batch: int, height: int, width: int, cfg: AugmentConfig
) -> jax.Array:
    """Draws one random forward affine matrix per sample.

    Each sample gets independent draws. Parameters whose range is zero are
    drawn as exact neutral values, so a config without geometric
    augmentation yields exact identity matrices.

    Args:
      key: PRNG key.
      batch: Number of matrices B (static).
      height: Image height H (static).
      width: Image width W (static).
      cfg: ``AugmentConfig`` (static).

    Returns:
      Float32 ``[B, 3, 3]`` forward matrices (input pixel -> output pixel),
      see :func:`compose_affine`.
    """
    keys = jax.random.split(key, 8)
    shape = (batch,)
    hflip = jax.random.bernoulli(keys[0], cfg.hflip_prob, shape)
    vflip = jax.random.bernoulli(keys[1], cfg.vflip_prob, shape)

    def symmetric(k, limit):
        return jax.random.uniform(k, shape, jnp.float32, -limit, limit)

    angle = symmetric(keys[2], cfg.rotation_deg)
    # Log-uniform zoom: symmetric in zoom-in vs zoom-out; exp(0) == 1 exactly.
    log_lo, log_hi = (math.log(s) for s in cfg.scale_range)
    scale = jnp.exp(jax.random.uniform(keys[3], shape, jnp.float32, log_lo, log_hi))
    tx = symmetric(keys[4], cfg.translate_frac * width)
    ty = symmetric(keys[5], cfg.translate_frac * height)
    shx = symmetric(keys[6], cfg.shear_deg)
    shy = symmetric(keys[7], cfg.shear_deg)
    return compose_affine(
        height,
        width,
        hflip=hflip,
        vflip=vflip,
        angle_deg=angle,
        scale=scale,
        translate=(tx, ty),
        shear_deg=(shx, shy),
    )


# ---------------------------------------------------------------------------
# Resampling.
# ---------------------------------------------------------------------------


def _invert_affine(matrices: jax.Array) -> jax.Array:
    """Inverts ``[..., 3, 3]`` affine matrices (bottom row assumed [0, 0, 1]).

    Closed form rather than ``jnp.linalg.inv``: it is cheaper, cannot pivot
    differently per sample, and returns exact results for identities and
    flips (entries 0 and +-1), which keeps those transforms lossless.
    """
    a, b, c = matrices[..., 0, 0], matrices[..., 0, 1], matrices[..., 0, 2]
    d, e, f = matrices[..., 1, 0], matrices[..., 1, 1], matrices[..., 1, 2]
    det = a * e - b * d
    ia, ib = e / det, -b / det
    id_, ie = -d / det, a / det
    return _matrix(ia, ib, -(ia * c + ib * f), id_, ie, -(id_ * c + ie * f))


def _sample_one(image: jax.Array, x: jax.Array, y: jax.Array, order: int) -> jax.Array:
    """Samples ``image [H, W, C]`` at float positions ``x, y [H', W']``.

    Out-of-bounds taps read 0 (constant fill). All channels share one set of
    gather indices and weights, which is why scan and mask are stacked into
    one image: one resampling, identical geometry.
    """
    height, width, channels = image.shape
    flat = image.reshape(height * width, channels)

    def tap(yi, xi, weight):
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        index = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
        values = jnp.take(flat, index.reshape(-1), axis=0)
        values = values.reshape(*index.shape, channels)
        return values * jnp.where(inside, weight, 0.0)[..., None].astype(image.dtype)

    if order == 0:
        # Round half away from zero, as jax.scipy.ndimage.map_coordinates.
        xi = jax.lax.round(x).astype(jnp.int32)
        yi = jax.lax.round(y).astype(jnp.int32)
        return tap(yi, xi, jnp.ones_like(x))

    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    wx = x - x0  # Weight of the right neighbour.
    wy = y - y0  # Weight of the lower neighbour.
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    # On integer positions (identity, flips) wx = wy = 0, so the result is
    # exactly 1 * image[y0, x0] + 0 * ...: lossless.
    return (
        tap(y0, x0, (1 - wy) * (1 - wx))
        + tap(y0, x0 + 1, (1 - wy) * wx)
        + tap(y0 + 1, x0, wy * (1 - wx))
        + tap(y0 + 1, x0 + 1, wy * wx)
    )


@functools.partial(jax.jit, static_argnames=("order",))
def warp(images: jax.Array, matrices: jax.Array, order: int = 1) -> jax.Array:
    """Warps a batch of images, each with its own forward affine matrix.

    Output pixel ``q = [x, y, 1]`` of sample ``i`` takes the value of
    ``images[i]`` at ``inv(matrices[i]) @ q`` (inverse mapping), so content at
    input position ``p`` ends up at ``matrices[i] @ p``. Positions outside the
    input read 0.

    Args:
      images: ``[B, H, W, C]`` float array.
      matrices: ``[B, 3, 3]`` forward affine matrices (input -> output pixel,
        ``(x, y) = (column, row)``); the bottom row is assumed ``[0, 0, 1]``.
      order: 1 for bilinear, 0 for nearest-neighbour (static).

    Returns:
      ``[B, H, W, C]`` warped images, same dtype as ``images``.

    Raises:
      ValueError: On bad shapes or an unsupported ``order``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order}")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got {images.shape}")
    if matrices.shape != (images.shape[0], 3, 3):
        raise ValueError(f"matrices must be [{images.shape[0]}, 3, 3], got {matrices.shape}")
    _, height, width, _ = images.shape
    inverse = _invert_affine(matrices.astype(jnp.float32))  # [B, 3, 3]
    ys, xs = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )

    def one(image, inv):
        # Explicit multiply-adds rather than a matmul: exact for the 0/+-1
        # entries of identity/flip matrices on every backend.
        x = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
        y = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
        return _sample_one(image, x, y, order)

    return jax.vmap(one)(images, inverse)


# ---------------------------------------------------------------------------
# Intensity.
# ---------------------------------------------------------------------------


def _pixel_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 samples, one per pixel, from a threefry key derived from ``key``.

    The training loop's keys are 'rbg' keys (``train.PRNG_IMPL``), whose
    normal samples XLA:CPU draws in one serial loop; threefry's bits are
    elementwise ops XLA splits across the cores (~3 ms of the width-16
    U-Net++'s bf16 train step on 2 cores in an in-process A/B,
    docs/BENCHMARKS.md, fifteenth session). Deterministic in ``key`` like
    any draw.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    return jax.random.normal(jax.random.wrap_key_data(seed, impl="threefry2x32"), shape)


@functools.partial(jax.jit, static_argnames=("cfg",))
def intensity_augment(key: jax.Array, images: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Scan-only photometric augmentation, independently per sample.

    Applied in the order speckle -> contrast -> brightness -> clip -> gamma
    -> clip: speckle models the acquired signal, the rest model display
    settings (gain, dynamic range, gamma) applied on top of it. Operations
    whose range is zero are skipped at trace time.

    Args:
      key: PRNG key.
      images: ``[B, H, W, C]`` float scans in ``[0, 1]``.
      cfg: ``AugmentConfig`` (static).

    Returns:
      ``[B, H, W, C]`` scans clipped to ``[0, 1]`` (unchanged if every
      intensity range is zero).
    """
    if cfg.intensity_identity:
        return images
    batch = images.shape[0]
    per_sample = (batch, 1, 1, 1)  # Broadcasts one draw over a whole image.
    k_sigma, k_noise, k_contrast, k_bright, k_gamma = jax.random.split(key, 5)
    out = images.astype(jnp.float32)

    if cfg.speckle_sigma > 0.0:
        sigma = jax.random.uniform(k_sigma, per_sample, jnp.float32, 0.0, cfg.speckle_sigma)
        z = _pixel_normal(k_noise, out.shape)
        # Log-normal with mean exactly 1: E[exp(s z)] = exp(s^2 / 2).
        out = out * jnp.exp(sigma * z - 0.5 * sigma * sigma)

    if cfg.contrast_range != (1.0, 1.0):
        factor = jax.random.uniform(k_contrast, per_sample, jnp.float32, *cfg.contrast_range)
        mean = jnp.mean(out, axis=(1, 2, 3), keepdims=True)
        out = (out - mean) * factor + mean

    if cfg.brightness_delta > 0.0:
        out = out + jax.random.uniform(
            k_bright, per_sample, jnp.float32, -cfg.brightness_delta, cfg.brightness_delta
        )

    out = jnp.clip(out, 0.0, 1.0)  # Gamma needs a non-negative base.
    if cfg.gamma_range != (1.0, 1.0):
        log_lo, log_hi = (math.log(g) for g in cfg.gamma_range)
        gamma = jnp.exp(jax.random.uniform(k_gamma, per_sample, jnp.float32, log_lo, log_hi))
        out = jnp.clip(jnp.power(out, gamma), 0.0, 1.0)
    return out.astype(images.dtype)


def perturb_masks(key: jax.Array, masks: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Mask input noise: blur each mask by a random width, re-threshold at a random level.

    A classifier trained on ground-truth masks meets a segmenter's masks at
    test time: rounder, missing fine margin detail, their borders a few
    pixels in or out. Training it on masks degraded that way teaches it not
    to lean on detail that will not be there.

    Args:
      key: PRNG key.
      masks: ``[B, H, W, K]`` binary masks.
      cfg: ``AugmentConfig``; ``mask_blur_sigma`` and ``mask_level_range``.

    Returns:
      ``[B, H, W, K]`` binary masks of ``masks``' dtype.
    """
    if cfg.mask_identity:
        return masks
    k_sigma, k_level = jax.random.split(key)
    batch = masks.shape[0]
    sigma = jax.random.uniform(k_sigma, (batch,), maxval=cfg.mask_blur_sigma)
    low, high = cfg.mask_level_range
    level = jax.random.uniform(k_level, (batch,), minval=low, maxval=high)
    radius = max(1, math.ceil(3 * cfg.mask_blur_sigma))
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    # A zero width gives a unit impulse: the mask passes through unchanged.
    kern = jnp.exp(-0.5 * (taps[None] / jnp.maximum(sigma[:, None], 1e-3)) ** 2)
    kern = kern / jnp.sum(kern, axis=1, keepdims=True)  # [B, T]

    def blur_one(m, k):  # m [H, W, K], k [T]: separable, zero outside the image.
        x = jnp.moveaxis(m.astype(jnp.float32), -1, 0)[..., None]  # [K, H, W, 1]
        for shape in ((k.size, 1, 1, 1), (1, k.size, 1, 1)):
            x = jax.lax.conv_general_dilated(
                x, k.reshape(shape), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return jnp.moveaxis(x[..., 0], 0, -1)

    blurred = jax.vmap(blur_one)(masks, kern)
    return (blurred >= level[:, None, None, None]).astype(masks.dtype)


# ---------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg",))
def augment_batch(
    key: jax.Array, images: jax.Array, masks: jax.Array, cfg: AugmentConfig = AugmentConfig()
) -> tuple[jax.Array, jax.Array]:
    """Randomly augments a batch of scans and their lesion masks.

    Each sample gets its own random affine transform, applied to scan and
    mask in one joint bilinear resampling (the mask is then thresholded at
    0.5), followed by scan-only intensity changes. Pure and jitted; ``cfg``
    is a static (hashable) argument, so each distinct config compiles once.

    The key is always split the same way, so the geometry drawn for a given
    key does not depend on which intensity augmentations are enabled.

    Args:
      key: PRNG key.
      images: ``[B, H, W, C]`` float32 scans in ``[0, 1]`` (C is 1 for BUSI).
      masks: ``[B, H, W, K]`` float32 binary masks (K is 1 for BUSI).
      cfg: ``AugmentConfig``.

    Returns:
      ``(images, masks)`` with the input shapes and dtypes: scans in
      ``[0, 1]`` (if any intensity augmentation is on) and masks in
      ``{0, 1}``. Returns the inputs unchanged when ``cfg.enabled`` is False
      or every range is zero.

    Raises:
      ValueError: If ``images`` and ``masks`` are not 4-D with matching
        ``[B, H, W]``.
    """
    if images.ndim != 4 or masks.ndim != 4 or images.shape[:3] != masks.shape[:3]:
        raise ValueError(
            "images and masks must be [B, H, W, C] with the same B, H, W; got "
            f"{images.shape} and {masks.shape}"
        )
    if not cfg.enabled:
        return images, masks
    k_geometry, k_intensity = jax.random.split(key)

    if not cfg.geometric_identity:
        batch, height, width, channels = images.shape
        matrices = sample_affine(k_geometry, batch, height, width, cfg)
        # One resampling for both: stacking along channels guarantees that
        # scan and mask use the very same coordinates and weights.
        stacked = jnp.concatenate([images.astype(jnp.float32), masks.astype(jnp.float32)], axis=-1)
        warped = warp(stacked, matrices, order=1)
        images = warped[..., :channels].astype(images.dtype)
        masks = (warped[..., channels:] >= 0.5).astype(masks.dtype)

    images = intensity_augment(k_intensity, images, cfg)
    # Folded in, not split off, so runs without it draw what they always drew.
    masks = perturb_masks(jax.random.fold_in(key, 2), masks, cfg)
    return images, masks
