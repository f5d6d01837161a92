"""Speed benchmark: the project's JAX train step against the same networks in PyTorch.

Usage::

    python -m busi_jax.bench --quick --output=bench.json
    python -m busi_jax.bench --models=unetpp,unet,sunet --widths=8,16 --batch=16 --steps=6

``--quick`` times the width-16 U-Net++ only (JAX fp32 with XLA's kernels, the C++
weight gradient and, on CPUs with AMX or AVX-512 BF16, the bf16 kernels; PyTorch fp32 channels_last
and PyTorch bf16), with 3 timed steps unless ``--steps`` says otherwise, to stay
within 5 minutes on 2 free cores (a step is about 175 GFLOP); the full run covers
U-Net, U-Net++ and SUNet at widths 8 and 16, JAX in fp32 and bf16 and PyTorch in
fp32 NCHW, fp32 channels_last and bf16 autocast channels_last. Every number is
only meaningful on an otherwise idle machine: the header records the load
average before and after the run.

PyTorch is an optional dependency, not in ``requirements.txt``: install it with
``pip install torch==2.13.0`` (a CPU wheel). Without it the PyTorch rows are
skipped with a note; ``--no_torch`` skips them on purpose.

How each number is measured:

* ``train_img_per_s``: ``batch`` / the median wall time of ``--steps`` train
  steps, after ``--warmup`` untimed steps (so compilation, or oneDNN's first-call
  set-up, is excluded). JAX runs the training loop's own step
  (:func:`busi_jax.train.train_step` jitted with the state donated, the batch
  gathered by index from device memory and augmented inside the step, Dice + BCE
  loss, Adam); PyTorch runs the same work eagerly: uint8 -> float, the same
  kind of augmentation (``affine_grid``/``grid_sample`` warp of scan and mask,
  speckle, contrast, brightness, gamma), forward, Dice + BCE, backward, Adam.
* ``infer_ms_b1``: median wall time of the jitted (JAX) or ``inference_mode``
  (PyTorch) forward pass on one scan, eval-mode BatchNorm, in ms. JAX models on
  the bf16 kernels run with their weights packed once, as
  :func:`busi_jax.inference.load_model` gives them
  (:func:`busi_jax.models.packing.pack_inference`); calls with the unpacked
  weights alternate with those, and their median is in the row's ``notes``.
* ``peak_rss_mb``: ``ru_maxrss`` of the process that ran the row. Each row runs
  in its own subprocess (unless ``--inprocess``), which imports only the
  framework it times, so this is that configuration's own peak.
* ``gflop_per_step``: XLA's count for the compiled JAX train step
  (``cost_analysis()['flops']``: forward, backward, augmentation and Adam;
  for ``nhwc/native``, ``nhwc/native_bf16`` and ``nhwc/native_amx`` rows, that of the same step
  with XLA's kernels, since XLA cannot see inside the C++ ones).
  PyTorch rows reuse the JAX fp32 count of the same architecture: the networks
  are identical (their parameter counts are asserted equal).
* ``fraction_of_peak``: achieved GFLOP/s (``gflop_per_step`` / median step
  time) over the matrix-multiply peak of the row's precision, measured in the
  same run as the best GFLOP/s of square ``--matmul_n`` products with
  ``jnp.dot`` and, when PyTorch is there, ``torch.mm`` (the higher of the two is
  the machine's peak: on CPUs with AMX, oneDNN's bf16 kernels are far faster
  than XLA's). Both frameworks' peaks are in the header. ``native_bf16`` and
  ``native_amx`` rows multiply in bf16 and are measured against the bf16 peak.

Output: a table on stdout, the PyTorch/JAX parameter counts, the ratios JAX fp32
(float32 products: bf16-kernel rows excluded) / PyTorch fp32 channels_last, best JAX
(any row) / PyTorch fp32 channels_last and best JAX / PyTorch bf16 per
network, and with
``--output`` a JSON file ``{"header": {...}, "rows": [...]}`` whose rows have the
fields of :data:`ROW_FIELDS`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ROW_FIELDS = (
    "framework",
    "model",
    "width",
    "precision",
    "batch",
    "train_img_per_s",
    "infer_ms_b1",
    "peak_rss_mb",
    "gflop_per_step",
    "fraction_of_peak",
    "layout",
    "notes",
    "round",
)
MODELS = ("unetpp", "unet", "sunet")
JAX_PRECISIONS = ("fp32", "bf16")
# (precision, memory layout) of the PyTorch rows.
TORCH_VARIANTS = (("fp32", "nchw"), ("fp32", "channels_last"), ("bf16", "channels_last"))
QUICK_TORCH_VARIANTS = (("fp32", "channels_last"), ("bf16", "channels_last"))
TORCH_PIN = "torch==2.13.0"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# Training settings of configs/unetpp.py that matter for speed; the schedule is
# constant here (a cosine schedule costs the same per step).
_LR = 1e-3
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
_BCE_WEIGHT = 0.5


def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_time(fn: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _step_note(times: Sequence[float]) -> str:
    return f"median of {len(times)} steps {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


# --- JAX -------------------------------------------------------------------------


def bench_config(
    model: str,
    width: int,
    precision: str,
    *,
    batch: int = 16,
    image_size: int = 128,
    depth: int = 4,
    wgrad_chunks: int = 1,
    wgrad: str = "xla",
    winograd: bool = True,
):
    """The training config of one benchmark configuration.

    Segmentation, Dice + 0.5 BCE, Adam at a constant 1e-3, the default
    augmentation (on, as in training), no EMA, BatchNorm, transposed-conv
    upsampling.

    Args:
        model: 'unet', 'unetpp' or 'sunet'.
        width: base width (``features``).
        precision: 'fp32' or 'bf16' compute (parameters stay float32).
        batch: training batch.
        image_size: side of the square scans.
        depth: number of 2x downsamplings.
        wgrad_chunks: the model's batch-chunked weight gradient (1: XLA's own).
        wgrad: 'xla' or 'native' (the C++ weight-gradient kernel).
        winograd: the model's ``winograd`` (bf16 kernels on AVX-512 BF16).
    """
    import ml_collections

    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    c = ml_collections.ConfigDict()
    c.task = "segmentation"
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        dict(
            name=model,
            features=width,
            depth=depth,
            norm="batch",
            upsample="transpose",
            dtype=_DTYPES[precision],
            wgrad_chunks=wgrad_chunks,
            wgrad=wgrad,
            winograd=winograd,
        )
    )
    c.loss = "dice_bce"
    c.bce_weight = _BCE_WEIGHT
    c.ds_weights = None
    c.optimizer = "adam"
    c.learning_rate = _LR
    c.weight_decay = 0.0
    c.schedule = "constant"
    c.warmup_epochs = 0
    c.num_epochs = 1
    c.grad_clip = 0.0
    c.ema_decay = 0.0
    c.batch_size = batch
    c.augment = ml_collections.ConfigDict(dict(enabled=True))
    return c


def _random_scans(n: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` uint8 noise scans ``[n, S, S, 1]`` with a random box lesion each.

    Content does not change the cost of any op here; boxes keep the masks
    realistic for the loss.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, image_size, image_size, 1), dtype=np.uint8)
    masks = np.zeros_like(images)
    for m in masks:
        y, x = rng.integers(0, image_size // 2, 2)
        h, w = rng.integers(image_size // 8, image_size // 2, 2)
        m[y : y + h, x : x + w] = 1
    return {"image": images, "mask": masks}


def flax_param_count(model: str, width: int, depth: int = 4, in_channels: int = 1) -> int:
    """Number of trainable parameters of the Flax segmenter (shape tracing only)."""
    import jax
    import jax.numpy as jnp

    from busi_jax import models as models_lib

    net = models_lib.create_model(dict(name=model, features=width, depth=depth))
    size = 2**depth
    shapes = jax.eval_shape(
        lambda: net.init(
            jax.random.key(0, impl="rbg"), jnp.zeros((1, size, size, in_channels)), train=False
        )
    )
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))


def _jax_setup(
    model: str,
    width: int,
    precision: str,
    batch: int,
    image_size: int,
    depth: int,
    compile_step: bool = True,
    wgrad_chunks: int = 1,
    wgrad: str = "xla",
    winograd: bool = True,
):
    """Builds and compiles the training loop's step for one configuration.

    Args:
        model, width, precision, batch, image_size, depth: see :func:`time_jax`.
        compile_step: False stops after lowering: ``flops`` is then XLA's count of
            the unoptimised program and ``step`` is None.

    Returns:
        A dict with the compiled step, its initial state, per-step index
        arrays, the jitted eval function and its inputs, the FLOP count, the
        parameter count and the compile time.
    """
    import jax
    import jax.numpy as jnp

    from busi_jax import augment as augment_lib
    from busi_jax import train as train_lib

    config = bench_config(
        model,
        width,
        precision,
        batch=batch,
        image_size=image_size,
        depth=depth,
        wgrad_chunks=wgrad_chunks,
        wgrad=wgrad,
        winograd=winograd,
    )
    task = train_lib.make_task(config)
    tx = train_lib.make_optimizer(config, steps_per_epoch=1)
    aug_cfg = augment_lib.AugmentConfig.from_config(config.augment)
    # Two batches' worth of scans, so consecutive steps gather different ones as
    # the training loop does.
    host = _random_scans(2 * batch, image_size)
    data = {k: jnp.asarray(v) for k, v in host.items()}

    # As train_and_evaluate initialises, but jitted whole: op-by-op dispatch
    # compiles every op of the init separately, which takes longer.
    @jax.jit
    def init_state(root):
        init_key, state_key = jax.random.split(root)
        return train_lib.init_state(task, tx, data, init_key, state_key)

    root = jax.random.key(config.seed, impl=train_lib.PRNG_IMPL)
    # Lowering alone needs only shapes: skip running (and compiling) the init.
    state = init_state(root) if compile_step else jax.eval_shape(init_state, root)
    params = state.params

    # The step of train.train_and_evaluate: gather by index, augment and update
    # in one jitted call with the old state's buffers donated.
    def run_step(state, idx):
        raw = jax.tree.map(lambda a: a[idx], data)
        s = state.replace(rng=jax.random.wrap_key_data(state.rng, impl=train_lib.PRNG_IMPL))
        s, m = train_lib.train_step(s, raw, task=task, tx=tx, aug_cfg=aug_cfg, ema_decay=0.0)
        return s.replace(rng=jax.random.key_data(s.rng)), m

    idxs = [jnp.arange(batch, dtype=jnp.int32) + (i % 2) * batch for i in range(2)]
    t0 = time.perf_counter()
    lowered = jax.jit(run_step, donate_argnums=(0,)).lower(state, idxs[0])
    # One compilation serves both the FLOP count and the timed calls.
    compiled = lowered.compile() if compile_step else None
    compile_s = time.perf_counter() - t0
    cost = (compiled if compiled is not None else lowered).cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older JAX: one dict per computation.
        cost = cost[0]
    eval_fn = jax.jit(functools.partial(train_lib.eval_step, task=task))
    infer_batch = {k: v[:1] for k, v in data.items()}
    return dict(
        step=compiled,
        state=state,
        idxs=idxs,
        task=task,
        eval_fn=eval_fn,
        infer_batch=infer_batch,
        infer_inputs=task.inputs(train_lib.to_model_batch(infer_batch)),
        flops=float(cost["flops"]),
        params=sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)),
        compile_s=compile_s,
    )


def jax_step_flops(
    model: str,
    width: int,
    precision: str = "fp32",
    *,
    batch: int = 16,
    image_size: int = 128,
    depth: int = 4,
) -> float:
    """FLOPs of one JAX train step: XLA's cost analysis of the lowered program.

    Skipping the compilation saves seconds; convolutions and matmuls, nearly all
    of the count, are the same before and after XLA's optimisations (the timed
    rows use the compiled program's count).
    """
    return _jax_setup(model, width, precision, batch, image_size, depth, compile_step=False)[
        "flops"
    ]


def time_jax(
    model: str,
    width: int,
    precision: str,
    *,
    batch: int = 16,
    image_size: int = 128,
    depth: int = 4,
    steps: int = 6,
    warmup: int = 1,
    infer_reps: int = 10,
    wgrad_chunks: int = 1,
    wgrad: str = "xla",
    winograd: bool = True,
) -> dict:
    """Times the JAX train step and batch-1 inference of one configuration.

    Args:
        model: 'unet', 'unetpp' or 'sunet'.
        width: base width.
        precision: 'fp32' or 'bf16' compute.
        batch: training batch ``B`` (scans ``[B, S, S, 1]``).
        image_size: ``S``.
        depth: number of 2x downsamplings.
        steps: timed train steps (median).
        warmup: untimed steps after compilation.
        infer_reps: timed batch-1 forward passes (median).
        wgrad_chunks: batch slices of the wider layers' weight gradients
            (busi_jax.models.conv); shown in the row's layout as "nhwc/wgradN".
        wgrad: 'native' takes every weight gradient from the C++ kernel
            (busi_jax/csrc/conv_wgrad.cc); shown as "nhwc/native".
        winograd: the model's ``winograd``; where it applies (bf16 kernels
            on AVX-512 BF16) the layout ends in "/winograd".

    Returns:
        A row (see :data:`ROW_FIELDS`) with ``fraction_of_peak`` None (set by
        :func:`add_fraction_of_peak`), plus private ``_params`` and
        ``_step_s`` entries.
    """
    import jax

    setup = _jax_setup(
        model,
        width,
        precision,
        batch,
        image_size,
        depth,
        wgrad_chunks=wgrad_chunks,
        wgrad=wgrad,
        winograd=winograd,
    )
    step, state, idxs = setup["step"], setup["state"], setup["idxs"]

    for i in range(warmup):
        state, m = step(state, idxs[i % 2])
        jax.block_until_ready((state, m))
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, idxs[i % 2])
        # The loop reads the loss every step, so each step ends in a sync too.
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    if not math.isfinite(float(m["loss"])):
        raise RuntimeError(f"JAX {model} w{width} {precision}: loss is {float(m['loss'])}")

    from busi_jax import train as train_lib
    from busi_jax.models.packing import pack_inference

    variables = train_lib.inference_weights(state, use_ema=False)
    eval_fn, infer_batch = setup["eval_fn"], setup["infer_batch"]
    # As busi_jax.inference loads a checkpoint for the bf16 kernels: weights
    # packed once (models.packing); the unpacked time is kept beside it.
    # Calls alternate, so drift on these machines hits both alike. Models
    # on XLA's kernels pack nothing: one arm.
    packed = pack_inference(setup["task"].model, variables, setup["infer_inputs"])
    arms = {"packed": packed, "unpacked": variables} if "packed" in packed else {"packed": packed}
    for v in arms.values():
        jax.block_until_ready(eval_fn(v, infer_batch))  # Compile.
    infer_times = {name: [] for name in arms}
    for _ in range(infer_reps):
        for name, v in arms.items():
            t0 = time.perf_counter()
            jax.block_until_ready(eval_fn(v, infer_batch))
            infer_times[name].append(time.perf_counter() - t0)
    infer_s = {name: statistics.median(t) for name, t in infer_times.items()}
    step_s = statistics.median(times)
    return {
        "framework": "jax",
        "model": model,
        "width": width,
        "precision": precision,
        "batch": batch,
        "train_img_per_s": batch / step_s,
        "infer_ms_b1": infer_s["packed"] * 1e3,
        "peak_rss_mb": _rss_mb(),
        # XLA does not count the C++ kernel's work: take the same network's
        # count with XLA's weight gradient, so rows compare like for like.
        "gflop_per_step": (
            setup["flops"]
            if wgrad == "xla"
            else jax_step_flops(
                model, width, precision, batch=batch, image_size=image_size, depth=depth
            )
        )
        / 1e9,
        "fraction_of_peak": None,
        "layout": _jax_layout(wgrad, wgrad_chunks, winograd),
        "notes": (
            f"{_step_note(times)}; trace+compile {setup['compile_s']:.1f} s;"
            f" jax {jax.__version__}, {jax.devices()[0].platform}"
            + (
                f"; infer b1 {infer_s['unpacked'] * 1e3:.2f} ms unpacked"
                if "unpacked" in infer_s
                else ""
            )
        ),
        "_params": setup["params"],
        "_step_s": step_s,
    }


def jax_matmul_peak(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best GFLOP/s of an ``n x n`` ``jnp.dot`` in fp32 and bf16."""
    import jax
    import jax.numpy as jnp

    out = {}
    for prec, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.key(0, impl="rbg"), (n, n), jnp.float32).astype(dtype)
        f = jax.jit(jnp.dot)
        jax.block_until_ready(f(a, a))
        _, times = _median_time(lambda f=f, a=a: jax.block_until_ready(f(a, a)), reps)
        out[prec] = 2 * n**3 / min(times) / 1e9
    return out


# --- PyTorch ---------------------------------------------------------------------


def import_torch():
    """The ``torch`` module, or None when it is not importable."""
    try:
        import torch
    except (ImportError, OSError):  # OSError: a wheel whose shared libraries are broken.
        return None
    return torch


@functools.cache
def _torch_nets():
    """PyTorch versions of the Flax segmenters (defined lazily: torch is optional).

    Same layers as :mod:`busi_jax.models`: (conv3x3 without bias -> BatchNorm ->
    ReLU) x 2 blocks, optional squeeze-and-excitation (reduction 16) after each,
    2x2 max-pooling, 2x2 stride-2 transposed convs with bias, a 1x1 head with
    bias; BatchNorm momentum 0.1 (Flax's 0.9) and eps 1e-5. NCHW tensors.
    """
    import torch
    from torch import nn

    class SE(nn.Module):
        def __init__(self, c, reduction=16):
            super().__init__()
            h = max(1, c // reduction)
            self.fc1, self.fc2 = nn.Linear(c, h), nn.Linear(h, c)

        def forward(self, x):
            s = x.float().mean(dim=(2, 3))  # Flax squeezes in float32 too.
            s = self.fc2(torch.relu(self.fc1(s)))
            return x * torch.sigmoid(s.float()).to(x.dtype)[:, :, None, None]

    class ConvBlock(nn.Module):
        def __init__(self, cin, cout, se=False):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )
            self.se = SE(cout) if se else nn.Identity()

        def forward(self, x):
            return self.se(self.body(x))

    def up(cin, cout):
        return nn.ConvTranspose2d(cin, cout, 2, stride=2)

    class UNet(nn.Module):
        def __init__(self, features=32, depth=4, in_channels=1, se=False):
            super().__init__()
            f = [features * 2**i for i in range(depth + 1)]
            self.enc = nn.ModuleList(
                ConvBlock(in_channels if i == 0 else f[i - 1], f[i], se) for i in range(depth)
            )
            self.bottleneck = ConvBlock(f[depth - 1], f[depth], se)
            self.up = nn.ModuleList(up(f[i + 1], f[i]) for i in range(depth))
            self.dec = nn.ModuleList(ConvBlock(2 * f[i], f[i], se) for i in range(depth))
            self.head = nn.Conv2d(f[0], 1, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            skips = []
            for block in self.enc:
                x = block(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottleneck(x)
            for i in reversed(range(len(skips))):
                x = self.dec[i](torch.cat([skips[i], self.up[i](x)], dim=1))
            return self.head(x)

    class SUNet(UNet):
        def __init__(self, features=32, depth=4, in_channels=1):
            super().__init__(features, depth, in_channels, se=True)

    class UNetPlusPlus(nn.Module):
        def __init__(self, features=32, depth=4, in_channels=1):
            super().__init__()
            self.depth = depth
            f = [features * 2**i for i in range(depth + 1)]
            blocks, ups = {}, {}
            for i in range(depth + 1):
                blocks[f"X_{i}_0"] = ConvBlock(in_channels if i == 0 else f[i - 1], f[i])
            for j in range(1, depth + 1):
                for i in range(depth + 1 - j):
                    ups[f"up_{i}_{j}"] = up(f[i + 1], f[i])
                    blocks[f"X_{i}_{j}"] = ConvBlock((j + 1) * f[i], f[i])
            self.blocks, self.ups = nn.ModuleDict(blocks), nn.ModuleDict(ups)
            self.head = nn.Conv2d(f[0], 1, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            d = self.depth
            nodes = {}
            for i in range(d + 1):
                nodes[i, 0] = self.blocks[f"X_{i}_0"](x if i == 0 else self.pool(nodes[i - 1, 0]))
            for j in range(1, d + 1):
                for i in range(d + 1 - j):
                    cat = [nodes[i, k] for k in range(j)]
                    cat.append(self.ups[f"up_{i}_{j}"](nodes[i + 1, j - 1]))
                    nodes[i, j] = self.blocks[f"X_{i}_{j}"](torch.cat(cat, dim=1))
            return self.head(nodes[0, d])

    return {"unet": UNet, "sunet": SUNet, "unetpp": UNetPlusPlus}


def torch_model(model: str, width: int, depth: int = 4, in_channels: int = 1):
    """The PyTorch twin of the Flax segmenter ``model`` (a ``torch.nn.Module``)."""
    nets = _torch_nets()
    if model not in nets:
        raise ValueError(f"no PyTorch twin of {model!r}; choose one of {sorted(nets)}")
    return nets[model](features=width, depth=depth, in_channels=in_channels)


def torch_param_count(net) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, as in Flax)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _torch_augment(torch, images, masks, gen):
    """Per-sample random affine warp of scan and mask together, then scan intensity.

    The same augmentations and ranges as :mod:`busi_jax.augment` (flip, rotation
    15 deg, zoom 0.9-1.1, shear 5 deg, shift 10 %, speckle, contrast,
    brightness, gamma), built from ``affine_grid``/``grid_sample`` so the cost
    is what a PyTorch pipeline would pay.

    Args:
        images, masks: ``[B, 1, H, W]`` float32 in [0, 1] / {0, 1}.
    """
    import torch.nn.functional as F

    b = images.shape[0]

    def u(lo, hi, shape=(b,)):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    ang = u(-15, 15) * math.pi / 180
    scale = torch.exp(u(math.log(0.9), math.log(1.1)))
    shx, shy = (torch.tan(u(-5, 5) * math.pi / 180) for _ in range(2))
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [
            torch.stack([flip * (cos + sin * shy), flip * (cos * shx - sin), u(-0.2, 0.2)], -1),
            torch.stack([sin + cos * shy, sin * shx + cos, u(-0.2, 0.2)], -1),
        ],
        1,
    )
    grid = F.affine_grid(theta, (b, 2, *images.shape[2:]), align_corners=False)
    warped = F.grid_sample(
        torch.cat([images, masks], 1), grid, "bilinear", "zeros", align_corners=False
    )
    images, masks = warped[:, :1], (warped[:, 1:] >= 0.5).float()
    per = (b, 1, 1, 1)
    sigma = u(0.0, 0.1, per)
    out = images * torch.exp(sigma * torch.randn(images.shape, generator=gen) - 0.5 * sigma**2)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * u(0.8, 1.2, per) + mean + u(-0.1, 0.1, per)
    out = out.clamp(0.0, 1.0)
    gamma = torch.exp(u(math.log(0.8), math.log(1.25), per))
    return out.pow(gamma).clamp(0.0, 1.0), masks


def _torch_dice_bce(torch, logits, mask):
    """``busi_jax.losses.dice_bce_loss`` (eps 1, BCE weight 0.5) in float32."""
    import torch.nn.functional as F

    logits = logits.float()
    p = torch.sigmoid(logits)
    inter = (p * mask).flatten(1).sum(1)
    denom = p.flatten(1).sum(1) + mask.flatten(1).sum(1)
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return dice.mean() + _BCE_WEIGHT * F.binary_cross_entropy_with_logits(logits, mask)


def time_torch(
    model: str,
    width: int,
    precision: str,
    layout: str,
    *,
    batch: int = 16,
    image_size: int = 128,
    depth: int = 4,
    steps: int = 6,
    warmup: int = 1,
    infer_reps: int = 10,
    expected_params: int | None = None,
) -> dict:
    """Times the PyTorch twin's train step and batch-1 inference.

    Args:
        model, width, batch, image_size, depth, steps, warmup, infer_reps: as
            in :func:`time_jax`.
        precision: 'fp32', or 'bf16' (autocast; parameters and loss float32).
        layout: 'nchw' (contiguous) or 'channels_last'.
        expected_params: the Flax model's parameter count, asserted equal.

    Returns:
        A row with ``gflop_per_step`` and ``fraction_of_peak`` None (the caller
        fills them from the JAX count).
    """
    torch = import_torch()
    if torch is None:
        raise ImportError(f"PyTorch is not installed (pip install {TORCH_PIN})")
    if layout not in ("nchw", "channels_last"):
        raise ValueError(f"layout must be 'nchw' or 'channels_last', got {layout!r}")
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    net = torch_model(model, width, depth)
    n_params = torch_param_count(net)
    if expected_params is not None and n_params != expected_params:
        raise AssertionError(
            f"PyTorch {model} w{width} has {n_params} parameters, Flax {expected_params}"
        )
    net = net.to(memory_format=fmt).train()
    try:  # The fused CPU Adam is the fastest PyTorch offers; older builds lack it.
        opt = torch.optim.Adam(net.parameters(), lr=_LR, fused=True)
        adam = "fused Adam"
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(net.parameters(), lr=_LR)
        adam = "Adam"
    host = _random_scans(2 * batch, image_size)
    # NHWC uint8 -> NCHW, as a PyTorch data pipeline would hold them.
    data = {k: torch.from_numpy(v).permute(0, 3, 1, 2).contiguous() for k, v in host.items()}
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(i):
        sl = slice((i % 2) * batch, (i % 2 + 1) * batch)
        images = data["image"][sl].float() / 255.0
        masks = data["mask"][sl].float()
        images, masks = _torch_augment(torch, images, masks, gen)
        images = images.contiguous(memory_format=fmt)
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = net(images)
        loss = _torch_dice_bce(torch, logits, masks)
        loss.backward()
        opt.step()
        return loss.detach()

    for i in range(warmup):
        step(i)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = float(step(i))  # Reading the loss, as the JAX loop does.
        times.append(time.perf_counter() - t0)
    if not math.isfinite(loss):
        raise RuntimeError(f"PyTorch {model} w{width} {precision}: loss is {loss}")

    net.eval()
    x1 = (data["image"][:1].float() / 255.0).contiguous(memory_format=fmt)

    def infer():
        with torch.inference_mode(), autocast():
            return torch.sigmoid(net(x1).float())

    infer()  # oneDNN primitive creation.
    infer_s, _ = _median_time(infer, infer_reps)
    step_s = statistics.median(times)
    return {
        "framework": "pytorch",
        "model": model,
        "width": width,
        "precision": precision,
        "batch": batch,
        "train_img_per_s": batch / step_s,
        "infer_ms_b1": infer_s * 1e3,
        "peak_rss_mb": _rss_mb(),
        "gflop_per_step": None,
        "fraction_of_peak": None,
        "layout": layout,
        "notes": (
            f"{_step_note(times)}; {adam}, {threads} threads,"
            f" {'bf16 autocast' if precision == 'bf16' else 'fp32'}; torch {torch.__version__}"
        ),
        "_params": n_params,
        "_step_s": step_s,
    }


def torch_matmul_peak(n: int = 2048, reps: int = 5) -> dict[str, float] | None:
    """Best GFLOP/s of an ``n x n`` ``torch.mm`` in fp32 and bf16 (None without torch)."""
    torch = import_torch()
    if torch is None:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
        torch.mm(a, a)
        _, times = _median_time(lambda a=a: torch.mm(a, a), reps)
        out[prec] = 2 * n**3 / min(times) / 1e9
    return out


# --- Orchestration ---------------------------------------------------------------


def matmul_peaks(n: int = 2048, with_torch: bool = True) -> dict:
    """``{'jax': {...}, 'pytorch': {...} or None, 'peak': {'fp32': .., 'bf16': ..}}`` GFLOP/s."""
    out = {"jax": jax_matmul_peak(n), "pytorch": torch_matmul_peak(n) if with_torch else None}
    out["peak"] = {
        p: max(v[p] for v in (out["jax"], out["pytorch"]) if v is not None) for p in JAX_PRECISIONS
    }
    out["n"] = n
    return out


def add_fraction_of_peak(row: dict, peak_gflops: dict[str, float]) -> dict:
    """Sets ``fraction_of_peak`` = achieved GFLOP/s / the peak of the row's precision.

    Rows whose convolutions multiply in bf16 (layout ``*native_amx`` or ``*native_bf16``) are
    measured against the bf16 matmul peak; XLA's matmul does not use AMX, so
    such a row can exceed 1.
    """
    step_s = row.get("_step_s")
    key = "bf16" if _amx_row(row) else row["precision"]
    if row.get("gflop_per_step") and step_s and peak_gflops.get(key):
        row["fraction_of_peak"] = row["gflop_per_step"] / step_s / peak_gflops[key]
    return row


def _amx_row(row: dict) -> bool:
    # Rows on the bf16 conv kernels (AMX tiles or AVX-512 BF16).
    layout = row.get("layout") or ""
    return "native_amx" in layout or "native_bf16" in layout


def _round_label(rnd: int, rounds: int) -> str:
    return f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""


def public_row(row: dict) -> dict:
    """The row with exactly :data:`ROW_FIELDS`, in that order."""
    return {k: row.get(k) for k in ROW_FIELDS}


def machine_info() -> dict:
    """CPU model, core counts, library versions and the date."""
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    # The vector/matrix units decide the bf16 peak (AMX >> AVX-512).
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in _CPU_FLAGS if x in have]
                    break
    except OSError:
        pass
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    torch = import_torch()
    versions["torch"] = torch.__version__ if torch is not None else None
    return {
        "cpu_model": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


def _run_worker_subprocess(spec: dict, timeout: float) -> dict:
    """Runs one measurement in a fresh interpreter; returns its result dict."""
    with tempfile.TemporaryDirectory(prefix="busi_bench_") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable,
            "-m",
            "busi_jax.bench",
            "--_worker",
            json.dumps({**spec, "out": out}),
        ]
        # The worker's chatter goes to stderr so that stdout is the table alone.
        try:
            chatter = sys.stderr.fileno()
        except (AttributeError, OSError):  # A stream without a file (captured output).
            chatter = None
        proc = subprocess.run(cmd, check=False, timeout=timeout, stdout=chatter)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"worker exited with status {proc.returncode}")
        with open(out) as f:
            return json.load(f)


_WORKERS: dict[str, Callable[..., Any]] = {
    "jax": time_jax,
    "torch": time_torch,
    "peaks": matmul_peaks,
}


def _worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    out = spec.pop("out")
    kind = spec.pop("kind")
    if spec.pop("keep_freed_memory", False):
        # As launch.py's runs: large freed blocks are reused, not page-faulted
        # afresh each step; every worker, PyTorch's too, so both frameworks
        # run on the same allocator settings.
        from busi_jax import memory

        memory.keep_freed_memory()
    result = _WORKERS[kind](**spec)
    with open(out, "w") as f:
        json.dump(result, f)


def _measure(
    kind: str, spec: dict, inprocess: bool, timeout: float, keep_freed_memory: bool = False
) -> dict:
    if inprocess:
        return _WORKERS[kind](**spec)
    return _run_worker_subprocess(
        {"kind": kind, **spec, "keep_freed_memory": keep_freed_memory}, timeout
    )


def _failed_row(framework, model, width, precision, batch, layout, error) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(
        framework=framework,
        model=model,
        width=width,
        precision=precision,
        batch=batch,
        layout=layout,
        notes=f"failed: {error}",
    )
    return row


def run_benchmark(
    models: Sequence[str] = MODELS,
    widths: Sequence[int] = (8, 16),
    *,
    batch: int = 16,
    image_size: int = 128,
    depth: int = 4,
    steps: int = 6,
    warmup: int = 1,
    infer_reps: int = 10,
    jax_precisions: Sequence[str] = JAX_PRECISIONS,
    jax_wgrad_chunks: Sequence[int] = (1,),
    jax_wgrad: Sequence[str] = ("xla",),
    jax_winograd: Sequence[bool] = (True,),
    torch_variants: Sequence[tuple[str, str]] = TORCH_VARIANTS,
    rounds: int = 1,
    with_torch: bool = True,
    matmul_n: int = 2048,
    inprocess: bool = False,
    worker_timeout: float = 3600.0,
    keep_freed_memory: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs every configuration and returns ``{'header': {...}, 'rows': [...]}``.

    Args:
        models, widths: the networks timed (every pair).
        batch, image_size, depth, steps, warmup, infer_reps: see :func:`time_jax`.
        jax_precisions: JAX compute precisions timed.
        jax_wgrad_chunks: for each precision, a JAX row per value (1: XLA's
            weight gradient; N: batch-chunked, busi_jax.models.conv).
        jax_wgrad: weight-gradient kernels timed: 'xla' (with each of
            ``jax_wgrad_chunks``) and/or 'native' (the C++ kernel, one row).
        jax_winograd: for the bf16 kernels, a row per value of the model's
            ``winograd`` (True and False: Winograd against the direct pass).
        torch_variants: ``(precision, layout)`` PyTorch rows.
        rounds: every network's rows are timed this many times, JAX first in
            even rounds and PyTorch first in odd ones; each row carries its
            ``round`` and the ratios are taken within a round, then their
            median (see :func:`ratios`).
        with_torch: False skips the PyTorch rows (as does a missing torch).
        matmul_n: side of the square matrices of the peak measurement.
        inprocess: run everything in this process (for tests; peak RSS then
            covers all rows so far) instead of one subprocess per row.
        worker_timeout: seconds one subprocess may take.
        keep_freed_memory: every worker subprocess (JAX and PyTorch alike)
            first calls :func:`busi_jax.memory.keep_freed_memory`, as
            ``launch.py`` training runs do; in-process rows get whatever
            this process has.
        log: where progress lines go.
    """
    header = {"machine": machine_info(), "notes": []}
    header["settings"] = dict(
        models=list(models),
        widths=list(widths),
        batch=batch,
        image_size=image_size,
        depth=depth,
        steps=steps,
        warmup=warmup,
        infer_reps=infer_reps,
        jax_precisions=list(jax_precisions),
        jax_wgrad_chunks=list(jax_wgrad_chunks),
        jax_wgrad=list(jax_wgrad),
        jax_winograd=list(jax_winograd),
        torch_variants=[list(v) for v in torch_variants],
        rounds=rounds,
        loss="dice_bce (bce_weight 0.5)",
        optimizer=f"adam, lr {_LR}",
        augmentation="on, inside the step",
        subprocess_per_row=not inprocess,
        keep_freed_memory=keep_freed_memory,
    )
    if with_torch and torch_variants and import_torch() is None:
        note = f"PyTorch is not importable: its rows are skipped (pip install {TORCH_PIN})."
        log(f"note: {note}")
        header["notes"].append(note)
        with_torch = False
    elif not with_torch:
        header["notes"].append("PyTorch rows skipped (--no_torch).")
    if not with_torch:
        torch_variants = ()

    log(f"matmul peak ({matmul_n}x{matmul_n})...")
    peaks = _measure(
        "peaks",
        dict(n=matmul_n, with_torch=with_torch),
        inprocess,
        worker_timeout,
        keep_freed_memory,
    )
    header["matmul_peak_gflops"] = peaks
    log(
        "  peak GFLOP/s: "
        + ", ".join(
            f"{fw} {p} {v[p]:.1f}"
            for fw in ("jax", "pytorch")
            if (v := peaks.get(fw))
            for p in JAX_PRECISIONS
        )
    )

    common = dict(
        batch=batch,
        image_size=image_size,
        depth=depth,
        steps=steps,
        warmup=warmup,
        infer_reps=infer_reps,
    )
    rows: list[dict] = []
    params: dict[str, dict] = {}
    for model in models:
        for width in widths:
            key = f"{model}_w{width}"
            flax_n = flax_param_count(model, width, depth)
            params[key] = {"flax": flax_n, "pytorch": None}
            variants = [
                (wg, chunks, wino)
                for wg in jax_wgrad
                for chunks in (jax_wgrad_chunks if wg == "xla" else (1,))
                for wino in (jax_winograd if _winograd_runs(wg, True) else (True,))
            ]
            flops: dict[str, float | None] = {"fp32": None}

            def jax_rows(rnd, model=model, width=width, variants=variants, flops=flops):
                for prec in jax_precisions:
                    xla_flops = None
                    for wg, chunks, wino in variants:
                        log(
                            f"jax {model} w{width} {prec} wgrad={wg} wgrad_chunks={chunks}"
                            f" winograd={wino}{_round_label(rnd, rounds)}..."
                        )
                        try:
                            row = _measure(
                                "jax",
                                dict(
                                    model=model,
                                    width=width,
                                    precision=prec,
                                    wgrad_chunks=chunks,
                                    wgrad=wg,
                                    winograd=wino,
                                    **common,
                                ),
                                inprocess,
                                worker_timeout,
                                keep_freed_memory,
                            )
                            if wg == "xla":
                                xla_flops = row["gflop_per_step"]
                            elif xla_flops:  # The compiled count of the same step, as above.
                                row["gflop_per_step"] = xla_flops
                            if prec == "fp32":
                                flops["fp32"] = row["gflop_per_step"]
                        except Exception as e:  # noqa: BLE001 -- one failed row must not end the run.
                            log(f"  failed: {e}")
                            layout = _jax_layout(wg, chunks, wino)
                            row = _failed_row("jax", model, width, prec, batch, layout, e)
                        row["round"] = rnd
                        rows.append(add_fraction_of_peak(row, peaks["peak"]))

            def torch_rows(rnd, model=model, width=width, key=key, flax_n=flax_n, flops=flops):
                if flops["fp32"] is None and torch_variants:
                    try:
                        flops["fp32"] = (
                            jax_step_flops(
                                model, width, batch=batch, image_size=image_size, depth=depth
                            )
                            / 1e9
                        )
                    except Exception as e:  # noqa: BLE001
                        log(f"  FLOP count failed: {e}")
                for prec, layout in torch_variants:
                    log(f"pytorch {model} w{width} {prec} {layout}{_round_label(rnd, rounds)}...")
                    try:
                        row = _measure(
                            "torch",
                            dict(
                                model=model,
                                width=width,
                                precision=prec,
                                layout=layout,
                                expected_params=flax_n,
                                **common,
                            ),
                            inprocess,
                            worker_timeout,
                            keep_freed_memory,
                        )
                        params[key]["pytorch"] = row["_params"]
                        row["gflop_per_step"] = flops["fp32"]
                    except Exception as e:  # noqa: BLE001
                        log(f"  failed: {e}")
                        row = _failed_row("pytorch", model, width, prec, batch, layout, e)
                    row["round"] = rnd
                    rows.append(add_fraction_of_peak(row, peaks["peak"]))

            for rnd in range(rounds):
                # Odd rounds time PyTorch first: with rounds alternating, a
                # machine that slows or speeds up over minutes (these VMs
                # drift 20-30%) favours neither framework.
                first, second = (jax_rows, torch_rows) if rnd % 2 == 0 else (torch_rows, jax_rows)
                first(rnd)
                second(rnd)
    header["param_counts"] = params
    header["ratios"] = ratios(rows)
    header["machine"]["loadavg_end"] = list(os.getloadavg())
    return {"header": header, "rows": [public_row(r) for r in rows]}


# (side, input channels, output channels) of 3x3 convolutions in the width-16
# U-Net++: encoder levels and the widest nested-skip inputs.
WGRAD_LAYER_SHAPES = (
    (128, 1, 16),
    (128, 16, 16),
    (128, 80, 16),
    (64, 16, 32),
    (64, 32, 32),
    (64, 128, 32),
    (32, 32, 64),
    (32, 64, 64),
    (16, 64, 128),
    (16, 128, 128),
    (8, 128, 256),
    (8, 256, 256),
)


def time_wgrad_layers(
    shapes: Sequence[tuple[int, int, int]] = WGRAD_LAYER_SHAPES,
    *,
    batch: int = 16,
    reps: int = 5,
) -> list[dict]:
    """Times one 3x3 'SAME' convolution's weight gradient: XLA's against the C++ kernels.

    All in the same process, one shape after another, so machine noise hits each.

    Returns:
      One dict per shape: ``side``, ``c_in``, ``c_out``, ``xla_ms``, ``native_ms``
      (medians), ``xla_gflops``, ``native_gflops`` and ``speedup`` (XLA / native
      time), and the largest relative difference of the two gradients; on a
      CPU with AMX or AVX-512 BF16 also ``amx_ms``, ``amx_gflops``,
      ``amx_speedup`` (XLA / bf16 kernel) and ``amx_max_rel_diff`` for the bf16
      kernel (AMX tiles, else AVX-512 BF16; the keys keep their first name)
      where the shape fits it (16-channel multiples), else None.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    from busi_jax.models.conv import (
        AMX_CHANNELS,
        amx_weight_gradient,
        bf16_kernels_available,
        native_weight_gradient,
    )

    dn = ("NHWC", "HWIO", "NHWC")
    rows = []
    for side, c_in, c_out in shapes:
        kx, kg = jax.random.split(jax.random.key(side * 1000 + c_in))
        x = jax.random.normal(kx, (batch, side, side, c_in))
        g = jax.random.normal(kg, (batch, side, side, c_out))
        w = jnp.zeros((3, 3, c_in, c_out))

        def xla(x, g, w=w):
            def conv(w):
                return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

            return jax.vjp(conv, w)[1](g)[0]

        def native(x, g, w=w):
            return native_weight_gradient(x, g, w.shape, (1, 1), ((1, 1), (1, 1)))

        def amx(x, g, w=w):
            return amx_weight_gradient(x, g, w.shape, (1, 1), ((1, 1), (1, 1)))

        fns = {"xla": jax.jit(xla), "native": jax.jit(native)}
        if bf16_kernels_available() and c_in % AMX_CHANNELS == 0 and c_out % AMX_CHANNELS == 0:
            fns["amx"] = jax.jit(amx)
        out = {k: jax.block_until_ready(f(x, g)) for k, f in fns.items()}
        ms = {}
        for k, f in fns.items():
            t, _ = _median_time(lambda f=f, x=x, g=g: jax.block_until_ready(f(x, g)), reps)
            ms[k] = t * 1e3
        flop = 2.0 * batch * side * side * c_in * c_out * 9
        scale = float(jnp.max(jnp.abs(out["xla"])))
        rows.append(
            dict(
                side=side,
                c_in=c_in,
                c_out=c_out,
                xla_ms=ms["xla"],
                native_ms=ms["native"],
                xla_gflops=flop / ms["xla"] / 1e6,
                native_gflops=flop / ms["native"] / 1e6,
                speedup=ms["xla"] / ms["native"],
                max_rel_diff=float(jnp.max(jnp.abs(out["xla"] - out["native"]))) / scale,
                amx_ms=ms.get("amx"),
                amx_gflops=flop / ms["amx"] / 1e6 if "amx" in ms else None,
                amx_speedup=ms["xla"] / ms["amx"] if "amx" in ms else None,
                amx_max_rel_diff=(
                    float(jnp.max(jnp.abs(out["xla"] - out["amx"]))) / scale
                    if "amx" in out
                    else None
                ),
            )
        )
    return rows


# Every distinct 3x3 'SAME' convolution of the width-16 U-Net++ that the bf16
# kernels run (the 1-channel first one is not among them).
WINOGRAD_LAYER_SHAPES = (
    (128, 16, 16),
    (128, 32, 16),
    (128, 48, 16),
    (128, 64, 16),
    (128, 80, 16),
    (64, 16, 32),
    (64, 32, 32),
    (64, 64, 32),
    (64, 96, 32),
    (64, 128, 32),
    (32, 32, 64),
    (32, 64, 64),
    (32, 128, 64),
    (32, 192, 64),
    (16, 64, 128),
    (16, 128, 128),
    (16, 256, 128),
    (8, 128, 256),
    (8, 256, 256),
)


def time_winograd_layers(
    shapes: Sequence[tuple[int, int, int]] = WINOGRAD_LAYER_SHAPES,
    *,
    batch: int = 16,
    reps: int = 5,
    rounds: int = 3,
) -> list[dict]:
    """Times one bf16 3x3 'SAME' convolution, direct against Winograd F(2x2, 3x3).

    Two passes per shape: the forward pass (bf16 input, float32 kernel, bf16
    output; :func:`busi_jax.models.conv.amx_conv`) and the weight gradient
    (bf16 input and output gradient, float32 result;
    :func:`busi_jax.models.conv.amx_weight_gradient`), on the AVX-512 BF16
    kernels. Direct and Winograd run alternately, ``rounds`` times ``reps``
    calls each, in this process, so machine drift hits both; each time is
    the fastest call.

    Returns:
      One dict per shape: ``side``, ``c_in``, ``c_out``; for the forward
      pass ``direct_ms``, ``winograd_ms``, ``direct_gflops`` (of the direct
      pass's 2 * 9 * C_in * C_out products per pixel, for both),
      ``winograd_gflops``, ``speedup`` (direct / Winograd time) and the
      largest absolute difference of each from XLA's exact result for the
      same bf16-rounded operands, relative to that result's largest
      magnitude (``direct_rel_err``, ``winograd_rel_err``); the same keys
      prefixed ``wgrad_`` for the weight gradient.

    Raises:
      RuntimeError: this CPU does not run the Winograd path (AMX, or no
        AVX-512 BF16).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    from busi_jax.models.conv import amx_conv, amx_weight_gradient, winograd_fits

    if not winograd_fits(8, 8):
        raise RuntimeError("Winograd runs on CPUs with AVX-512 BF16 and without AMX only")
    dn = ("NHWC", "HWIO", "NHWC")
    pads = ((1, 1), (1, 1))
    rows = []
    for side, c_in, c_out in shapes:
        kx, kw, kg = jax.random.split(jax.random.key(side * 1000 + c_in), 3)
        x = jax.random.normal(kx, (batch, side, side, c_in)).astype(jnp.bfloat16)
        w = jax.random.normal(kw, (3, 3, c_in, c_out)) / (3.0 * c_in**0.5)
        dy = jax.random.normal(kg, (batch, side, side, c_out)).astype(jnp.bfloat16)

        def exact_conv(x, w):
            return lax.conv_general_dilated(
                x, w, (1, 1), "SAME", dimension_numbers=dn, precision="highest"
            )

        x32 = x.astype(jnp.float32)
        exact = {
            "": exact_conv(x32, w.astype(jnp.bfloat16).astype(jnp.float32)),
            "wgrad_": jax.vjp(functools.partial(exact_conv, x32), w)[1](dy.astype(jnp.float32))[0],
        }
        passes = {
            "": lambda wino, hw=(side, side): jax.jit(
                lambda a, kern, g: amx_conv(
                    a, kern, (1, 1), (1, 1), hw, out_dtype=jnp.bfloat16, winograd=wino
                )
            ),
            "wgrad_": lambda wino: jax.jit(
                lambda a, kern, g: amx_weight_gradient(
                    a, g, kern.shape, (1, 1), pads, winograd=wino
                )
            ),
        }
        flop = 2.0 * batch * side * side * c_in * c_out * 9
        row = dict(side=side, c_in=c_in, c_out=c_out)
        for prefix, make in passes.items():
            fns = {name: make(wino) for name, wino in (("direct", False), ("winograd", True))}
            out = {k: jax.block_until_ready(f(x, w, dy)) for k, f in fns.items()}
            best = dict.fromkeys(fns, math.inf)
            for _ in range(rounds):
                for k, f in fns.items():
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        jax.block_until_ready(f(x, w, dy))
                        best[k] = min(best[k], time.perf_counter() - t0)
            scale = float(jnp.max(jnp.abs(exact[prefix])))
            for k in fns:
                row[f"{prefix}{k}_ms"] = best[k] * 1e3
                row[f"{prefix}{k}_gflops"] = flop / best[k] / 1e9
                err = jnp.max(jnp.abs(out[k].astype(jnp.float32) - exact[prefix]))
                row[f"{prefix}{k}_rel_err"] = float(err) / scale
            row[f"{prefix}speedup"] = best["direct"] / best["winograd"]
        rows.append(row)
    return rows


def format_winograd_layers(rows: Sequence[dict]) -> str:
    """The per-layer direct / Winograd rows as a text table (forward, then weight gradient)."""
    lines = []
    for prefix, title in (("", "forward pass"), ("wgrad_", "weight gradient")):
        lines.append(title)
        lines.append(
            f"{'side':>4} {'C_in':>5} {'C_out':>5} {'direct ms':>9} {'Wino ms':>8}"
            f" {'direct GF/s':>11} {'Wino GF/s*':>10} {'speedup':>8} {'direct err':>10}"
            f" {'Wino err':>9}"
        )
        for r in rows:
            p = prefix
            lines.append(
                f"{r['side']:>4} {r['c_in']:>5} {r['c_out']:>5} {r[p + 'direct_ms']:9.3f}"
                f" {r[p + 'winograd_ms']:8.3f} {r[p + 'direct_gflops']:11.0f}"
                f" {r[p + 'winograd_gflops']:10.0f} {r[p + 'speedup']:7.2f}x"
                f" {r[p + 'direct_rel_err']:10.1e} {r[p + 'winograd_rel_err']:9.1e}"
            )
    lines.append("* the direct pass's product count over Winograd's time")
    return "\n".join(lines)


def format_wgrad_layers(rows: Sequence[dict]) -> str:
    """The per-layer weight-gradient rows as a text table."""
    title = (
        f"{'side':>4} {'C_in':>5} {'C_out':>5} {'XLA ms':>8} {'C++ ms':>8}"
        f" {'XLA GF/s':>9} {'C++ GF/s':>9} {'speedup':>8} {'max rel diff':>12}"
        f" {'bf16 ms':>7} {'bf16 GF/s':>9} {'bf16 speedup':>11} {'bf16 rel diff':>12}"
    )
    lines = [title]
    for r in rows:
        amx = (
            f" {r['amx_ms']:7.1f} {r['amx_gflops']:9.0f} {r['amx_speedup']:10.2f}x"
            f" {r['amx_max_rel_diff']:12.1e}"
            if r.get("amx_ms") is not None
            else f" {'-':>7} {'-':>9} {'-':>11} {'-':>12}"
        )
        lines.append(
            f"{r['side']:>4} {r['c_in']:>5} {r['c_out']:>5} {r['xla_ms']:8.1f} {r['native_ms']:8.1f}"
            f" {r['xla_gflops']:9.0f} {r['native_gflops']:9.0f} {r['speedup']:7.2f}x"
            f" {r['max_rel_diff']:12.1e}" + amx
        )
    return "\n".join(lines)


def profile_step(
    model: str,
    width: int,
    trace_dir: str,
    *,
    precision: str = "fp32",
    wgrad: str = "xla",
    batch: int = 16,
    image_size: int = 128,
    depth: int = 4,
    steps: int = 2,
) -> dict:
    """Traces ``steps`` train steps with ``jax.profiler`` and sums time per kind of XLA op.

    The trace (TensorBoard / Perfetto format) stays in ``trace_dir``. Op names
    are grouped by their stem (``ynn_fusion.12`` -> ``ynn_fusion``), so e.g. all
    convolutions XLA hands to YNNPACK and all base-dilated (transposed)
    convolutions add up; C++ kernel calls by their target, with
    ``/winograd`` where the call takes the Winograd path
    (``ffi:busi_conv_amx_wgrad/winograd``).

    Returns:
      ``{"step_ms": wall time per step, "ops": [{"op", "ms_per_step", "count"}...]}``
      sorted by time; op time can exceed wall time where ops ran in parallel.
    """
    import collections
    import glob
    import gzip
    import json

    import jax

    setup = _jax_setup(model, width, precision, batch, image_size, depth, wgrad=wgrad)
    step, state, idxs = setup["step"], setup["state"], setup["idxs"]
    for i in range(2):  # Warm-up outside the trace.
        state, m = step(state, idxs[i % 2])
        jax.block_until_ready((state, m))
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for i in range(steps):
            state, m = step(state, idxs[i % 2])
            jax.block_until_ready((state, m))
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not traces:
        raise RuntimeError(f"{trace_dir}: jax.profiler wrote no *.trace.json.gz")
    with gzip.open(traces[-1]) as f:
        events = json.load(f)["traceEvents"]
    kernels = _custom_call_targets(step.as_text())
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Executor and Python frames wrap the ops: counting them would double up.
        if e.get("ph") != "X" or name.startswith(("ThunkExecutor", "$", "SlinkyThreadPool")):
            continue
        stem = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name
        stem = kernels.get(name, stem)
        total[stem] += e.get("dur", 0)
        count[stem] += 1
    ops = [
        {"op": k, "ms_per_step": v / 1e3 / steps, "count": count[k] // steps}
        for k, v in total.most_common()
    ]
    return {"step_ms": step_ms, "ops": ops}


def _custom_call_targets(hlo_text: str) -> dict[str, str]:
    """Instruction name -> ``ffi:TARGET`` (plus ``/winograd``) for a compiled module's custom calls."""
    import re

    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*%?([\w.\-]+) = .*custom_call_target=\"([^\"]+)\"", line)
        if m:
            wino = "/winograd" if re.search(r"winograd = 1\b", line) else ""
            out[m.group(1)] = f"ffi:{m.group(2)}{wino}"
    return out


def _jax_layout(wgrad: str, wgrad_chunks: int, winograd: bool = False) -> str:
    if wgrad != "xla":
        return f"nhwc/{wgrad}" + ("/winograd" if _winograd_runs(wgrad, winograd) else "")
    return "nhwc" if wgrad_chunks <= 1 else f"nhwc/wgrad{wgrad_chunks}"


def _winograd_runs(wgrad: str, winograd: bool) -> bool:
    # Whether a model with these settings takes the Winograd path on this CPU.
    from busi_jax.models.blocks import BF16_MODES
    from busi_jax.models.conv import amx_available, avx512_bf16_available

    return winograd and wgrad in BF16_MODES and avx512_bf16_available() and not amx_available()


RATIO_KEYS = (
    "jax_fp32_over_torch_fp32_channels_last",
    "jax_best_over_torch_fp32_channels_last",
    "jax_best_over_torch_bf16",
)


def ratios(rows: Sequence[dict]) -> list[dict]:
    """Per network: JAX fp32 / PyTorch fp32 channels_last and best JAX / PyTorch bf16 img/s.

    Rows of several rounds (their ``round`` field) are compared within each
    round only; each ratio is then the median over rounds, and
    ``<ratio>_rounds`` lists the per-round values (with one round, no such
    lists).
    """
    by_round: dict[int, list[dict]] = {}
    for r in rows:
        by_round.setdefault(r.get("round") or 0, []).append(r)
    per_round = [_ratios_within(by_round[k]) for k in sorted(by_round)]
    if len(per_round) <= 1:
        return per_round[0] if per_round else []
    out = []
    for model, width in dict.fromkeys((r["model"], r["width"]) for r in rows):
        entry: dict[str, Any] = {"model": model, "width": width}
        for key in RATIO_KEYS:
            vals = [
                e[key]
                for once in per_round
                for e in once
                if (e["model"], e["width"]) == (model, width) and e[key] is not None
            ]
            entry[key] = statistics.median(vals) if vals else None
            entry[f"{key}_rounds"] = vals
        out.append(entry)
    return out


def _ratios_within(rows: Sequence[dict]) -> list[dict]:
    """:func:`ratios` of rows timed in one round (the best row of each kind)."""

    def rate(fw, model, width, prec=None, layout=None, amx=True):
        vals = [
            r["train_img_per_s"]
            for r in rows
            if r["framework"] == fw
            and r["model"] == model
            and r["width"] == width
            and (prec is None or r["precision"] == prec)
            and (layout is None or r.get("layout") == layout)
            and (amx or not _amx_row(r))
            and r["train_img_per_s"]
        ]
        return max(vals) if vals else None

    def div(a, b):
        return a / b if a and b else None

    out = []
    for model, width in dict.fromkeys((r["model"], r["width"]) for r in rows):
        # fp32 here means float32 products: AMX rows multiply in bf16.
        jax_fp32 = rate("jax", model, width, "fp32", amx=False)
        jax_best = rate("jax", model, width)
        torch_fp32 = rate("pytorch", model, width, "fp32", "channels_last")
        out.append(
            {
                "model": model,
                "width": width,
                "jax_fp32_over_torch_fp32_channels_last": div(jax_fp32, torch_fp32),
                "jax_best_over_torch_fp32_channels_last": div(jax_best, torch_fp32),
                "jax_best_over_torch_bf16": div(
                    jax_best, rate("pytorch", model, width, "bf16", "channels_last")
                ),
            }
        )
    return out


def format_table(result: dict) -> str:
    """The rows, parameter counts and ratios as text."""

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    title = (
        f"{'framework':<9} {'model':<7} {'width':>5} {'prec':<5} {'layout':<13} {'batch':>5}"
        f" {'img/s':>8} {'infer ms':>9} {'RSS MB':>8} {'GFLOP/st':>9} {'of peak':>8}"
    )
    lines = [title]
    for r in result["rows"]:
        lines.append(
            f"{r['framework']:<9} {r['model']:<7} {r['width']:>5} {r['precision']:<5}"
            f" {r.get('layout') or '':<13} {r['batch']:>5} {f(r['train_img_per_s'], '8.2f')}"
            f" {f(r['infer_ms_b1'], '9.2f')} {f(r['peak_rss_mb'], '8.0f')}"
            f" {f(r['gflop_per_step'], '9.3g')} {f(r['fraction_of_peak'], '8.1%')}"
        )
    h = result["header"]
    peaks = h.get("matmul_peak_gflops", {})
    lines.append("")
    lines.append(
        f"matmul peak GFLOP/s (n={peaks.get('n')}): "
        + "; ".join(
            f"{fw}: " + ", ".join(f"{p} {v[p]:.1f}" for p in JAX_PRECISIONS)
            for fw in ("jax", "pytorch")
            if (v := peaks.get(fw))
        )
    )
    lines.append("parameters (Flax / PyTorch):")
    for key, c in h.get("param_counts", {}).items():
        status = (
            "" if c["pytorch"] is None else (" match" if c["pytorch"] == c["flax"] else " MISMATCH")
        )
        lines.append(f"  {key}: {c['flax']:,} / {f(c['pytorch'], ',')}{status}")
    rounds = h.get("settings", {}).get("rounds", 1)
    lines.append(
        "ratios (train img/s)"
        + (f", median over {rounds} rounds [each round's]:" if rounds > 1 else ":")
    )

    def ratio(r, key):
        text = f"{f(r.get(key), '.2f')}x"
        per = r.get(f"{key}_rounds")
        return text + (" [" + ", ".join(f"{v:.2f}" for v in per) + "]" if per else "")

    for r in h.get("ratios", []):
        lines.append(
            f"  {r['model']} w{r['width']}: JAX fp32 / PyTorch fp32 channels_last"
            f" {ratio(r, 'jax_fp32_over_torch_fp32_channels_last')};"
            f" best JAX (bf16 kernels included) / PyTorch fp32 channels_last"
            f" {ratio(r, 'jax_best_over_torch_fp32_channels_last')};"
            f" best JAX / PyTorch bf16 {ratio(r, 'jax_best_over_torch_bf16')}"
        )
    for note in h.get("notes", []):
        lines.append(f"note: {note}")
    la, lb = h["machine"].get("loadavg_start"), h["machine"].get("loadavg_end")
    lines.append(
        f"load average at start {la[0]:.2f}, at end {lb[0]:.2f} (numbers need an idle machine)"
        if la and lb
        else ""
    )
    return "\n".join(lines)


def _csv(cast):
    return lambda s: [cast(x) for x in s.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m busi_jax.bench",
        description="Train/inference speed of the JAX segmenters against their PyTorch twins.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="width-16 U-Net++ only: JAX fp32, PyTorch fp32 channels_last and bf16",
    )
    p.add_argument("--output", default=None, help="write the results here as JSON")
    p.add_argument(
        "--models", type=_csv(str), default=None, help="comma list (default unetpp,unet,sunet)"
    )
    p.add_argument("--widths", type=_csv(int), default=None, help="comma list (default 8,16)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed train steps, median (default 6; 3 with --quick)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--infer_reps", type=int, default=10, help="timed batch-1 forward passes")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument(
        "--jax_wgrad_chunks",
        type=_csv(int),
        default=[1],
        help="JAX rows per precision: weight-gradient batch slices (1 = XLA's own)",
    )
    p.add_argument(
        "--jax_wgrad",
        type=_csv(str),
        default=None,
        help="JAX conv kernels: xla, native (C++ weight gradient), native_bf16 (all three conv"
        " passes in bf16 on AMX or AVX-512 BF16), native_amx (the same, AMX only) (default xla;"
        " with --quick xla,native and, on CPUs with AMX or AVX-512 BF16, native_bf16)",
    )
    p.add_argument(
        "--jax_winograd",
        type=_csv(str),
        default=["on"],
        help="for the bf16 kernels on AVX-512 BF16 CPUs: on (Winograd F(2x2,3x3) where it"
        " pays, the models' default), off (the direct pass), or on,off (a row each)",
    )
    p.add_argument(
        "--winograd_layers",
        action="store_true",
        help="instead: time each bf16 3x3 conv shape of the width-16 U-Net++ at --batch, the"
        " direct pass against Winograd, forward and weight gradient (AVX-512 BF16 CPUs"
        " without AMX)",
    )
    p.add_argument(
        "--wgrad_layers",
        action="store_true",
        help="instead: time each 3x3 conv weight gradient of the width-16 U-Net++, XLA vs C++",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="instead: trace the first --models/--widths/--jax_wgrad step into DIR and print"
        " time per kind of XLA op (C++ kernels by target)",
    )
    p.add_argument(
        "--profile_precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="--profile's activations: fp32, or bf16 (the bf16 kernels' training setting)",
    )
    p.add_argument(
        "--jax_precisions",
        type=_csv(str),
        default=None,
        help="JAX activation precisions timed, comma list of fp32, bf16 (default both; fp32"
        " with --quick)",
    )
    p.add_argument(
        "--torch_variants",
        type=_csv(str),
        default=None,
        help="PyTorch rows as precision/layout, comma list of fp32/nchw, fp32/channels_last,"
        " bf16/channels_last (default all three; the last two with --quick)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every network's rows this many times, JAX and PyTorch first in turn; the"
        " ratios are taken within each round and their median reported",
    )
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument(
        "--inprocess", action="store_true", help="no subprocess per row (RSS then accumulates)"
    )
    p.add_argument(
        "--keep_freed_memory",
        action="store_true",
        help="glibc keeps freed memory for reuse in every worker, as launch.py's training "
        "runs do (busi_jax.memory): no page faults on each step's scratch buffers",
    )
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _refuse_choices(flag: str, values: Sequence[str], choices) -> bool:
    """Prints one error line and returns True where ``values`` is empty or has a non-choice."""
    bad = sorted(set(values) - set(choices))
    if bad or not values:
        print(f"error: {flag} {bad} not valid; choose from {list(choices)}", file=sys.stderr)
    return bool(bad or not values)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker is not None:
        _worker_main(args._worker)
        return 0
    if args.keep_freed_memory:
        from busi_jax import memory

        memory.keep_freed_memory()  # This process (in-process rows, --profile).
    if args.wgrad_layers or args.winograd_layers:
        machine = machine_info()  # Before timing: its load average is the one at start.
        if args.winograd_layers:
            try:
                layer_rows = time_winograd_layers(
                    WINOGRAD_LAYER_SHAPES, batch=args.batch, reps=args.steps or 5
                )
            except RuntimeError as e:
                print(f"error: --winograd_layers: {e}", file=sys.stderr)
                return 1
            print(format_winograd_layers(layer_rows))
        else:
            layer_rows = time_wgrad_layers(
                WGRAD_LAYER_SHAPES, batch=args.batch, reps=args.steps or 5
            )
            print(format_wgrad_layers(layer_rows))
        if args.output:
            from busi_jax import io as busi_io

            payload = {"machine": machine, "batch": args.batch, "rows": layer_rows}
            payload["machine"]["loadavg_end"] = list(os.getloadavg())
            busi_io.atomic_write_json(args.output, payload)
            print(f"wrote {args.output}")
        return 0
    if args.profile:
        model = (args.models or ["unetpp"])[0]
        width = (args.widths or [16])[0]
        wgrad = (args.jax_wgrad or ["xla"])[0]
        prof = profile_step(
            model,
            width,
            args.profile,
            precision=args.profile_precision,
            wgrad=wgrad,
            batch=args.batch,
            image_size=args.image_size,
            depth=args.depth,
            steps=args.steps or 2,
        )
        print(
            f"{model} w{width} {args.profile_precision} wgrad={wgrad}:"
            f" {prof['step_ms']:.0f} ms per step (traced)"
        )
        for op in prof["ops"][:25]:
            print(f"{op['ms_per_step']:9.1f} ms/step  x{op['count']:<4} {op['op']}")
        if args.output:
            from busi_jax import io as busi_io

            busi_io.atomic_write_json(args.output, {"machine": machine_info(), **prof})
        return 0
    models = args.models or (["unetpp"] if args.quick else list(MODELS))
    widths = args.widths or ([16] if args.quick else [8, 16])
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        print(f"error: unknown model(s) {unknown}; choose from {list(MODELS)}", file=sys.stderr)
        return 1
    from busi_jax.models.blocks import WGRAD_MODES
    from busi_jax.models.conv import bf16_kernels_available

    quick_kernels = ["xla", "native"] + (["native_bf16"] if bf16_kernels_available() else [])
    jax_wgrad = args.jax_wgrad or (quick_kernels if args.quick else ["xla"])

    if _refuse_choices("--jax_wgrad", jax_wgrad, WGRAD_MODES):
        return 1
    bad = sorted(set(args.jax_winograd) - {"on", "off"})
    if bad or not args.jax_winograd:
        print(f"error: --jax_winograd {bad} not valid; use on, off or on,off", file=sys.stderr)
        return 1
    jax_precisions = args.jax_precisions or (["fp32"] if args.quick else list(JAX_PRECISIONS))
    if _refuse_choices("--jax_precisions", jax_precisions, JAX_PRECISIONS):
        return 1
    valid_torch = {f"{p}/{lay}": (p, lay) for p, lay in TORCH_VARIANTS}
    torch_names = args.torch_variants or [
        f"{p}/{lay}" for p, lay in (QUICK_TORCH_VARIANTS if args.quick else TORCH_VARIANTS)
    ]
    if _refuse_choices("--torch_variants", torch_names, valid_torch):
        return 1
    if args.rounds < 1:
        print(f"error: --rounds must be >= 1, got {args.rounds}", file=sys.stderr)
        return 1
    result = run_benchmark(
        models,
        widths,
        batch=args.batch,
        image_size=args.image_size,
        depth=args.depth,
        steps=args.steps or (3 if args.quick else 6),
        warmup=args.warmup,
        infer_reps=args.infer_reps,
        jax_precisions=jax_precisions,
        jax_wgrad_chunks=args.jax_wgrad_chunks,
        jax_wgrad=jax_wgrad,
        jax_winograd=[v == "on" for v in args.jax_winograd],
        torch_variants=[valid_torch[n] for n in torch_names],
        rounds=args.rounds,
        with_torch=not args.no_torch,
        matmul_n=args.matmul_n,
        inprocess=args.inprocess,
        keep_freed_memory=args.keep_freed_memory,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(format_table(result))
    if args.output:
        from busi_jax import io as busi_io

        busi_io.atomic_write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
