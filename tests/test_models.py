"""Tests for the model zoo (busi_jax.models).

CPU budget: shapes and parameter counts use ``jax.eval_shape`` (tracing, no
compilation); only behavioural tests run real computations, on tiny widths.
Init keys use the 'rbg' PRNG: XLA:CPU takes seconds to compile each threefry
draw, i.e. tens of seconds per model init, while rbg compiles in a fraction.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from busi_jax import losses
from busi_jax.models import (
    MODELS,
    AttentionGate,
    ChannelSpatialSE,
    Classifier,
    MultiTaskUNet,
    SpatialSE,
    SqueezeExcitation,
    SUNet,
    UNet,
    UNetPlusPlus,
    classifier_input_channels,
    classifier_inputs,
    crop_boxes,
    roi_boxes,
    uncrop_boxes,
    create_model,
    model_options,
)


def KEY(seed):
    return jax.random.key(seed, impl="rbg")


def n_params(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def abstract_init(model, shape=(2, 32, 32, 1)):
    return jax.eval_shape(lambda: model.init(KEY(0), jnp.zeros(shape), train=False))


def abstract_apply(model, shape=(2, 32, 32, 1), train=False):
    def f():
        x = jnp.zeros(shape)
        v = model.init(KEY(0), x, train=False)
        out = model.apply(
            v, x, train=train, mutable=["batch_stats"] if train else False, rngs={"dropout": KEY(1)}
        )
        return out[0] if train else out

    return jax.eval_shape(f)


@functools.lru_cache(maxsize=None)
def _jit_init(model, shape):
    return jax.jit(lambda key: model.init(key, jnp.zeros(shape), train=False))


def init(model, shape=(2, 32, 32, 1), seed=0):
    return _jit_init(model, shape)(KEY(seed))


# ---------------------------------------------------------------- synthetic
# Behavioural tests reuse the overfit tests' models and input shapes so that
# each model's init is compiled once per session (see ``init``).


def synthetic_scans(n=4, size=32, seed=0, elongated=None):
    """Bright speckled background with a dark elliptic lesion.

    Args:
      elongated: None -> random axes; else a length-n bool sequence choosing
        elongated (aspect ~3:1, random orientation) vs round lesions.

    Returns:
      images [n, size, size, 1] in [0, 1], masks [n, size, size, 1] in {0, 1}.
    """
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images, masks = [], []
    for k in range(n):
        cy, cx = rng.uniform(0.35 * size, 0.65 * size, 2)
        if elongated is None:
            ay, ax = rng.uniform(0.12 * size, 0.25 * size, 2)
        elif elongated[k]:
            ay, ax = rng.uniform(0.28, 0.34) * size, rng.uniform(0.08, 0.1) * size
            if rng.rand() < 0.5:
                ay, ax = ax, ay
        else:
            ay = ax = rng.uniform(0.14, 0.18) * size
        m = (((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1).astype(np.float32)
        img = (0.7 + 0.1 * rng.randn(size, size)) * (1 - m) + (
            0.25 + 0.08 * rng.randn(size, size)
        ) * m
        images.append(np.clip(img, 0, 1))
        masks.append(m)
    return (
        jnp.asarray(np.stack(images)[..., None], jnp.float32),
        jnp.asarray(np.stack(masks)[..., None], jnp.float32),
    )


SEG_MODELS = {
    "unet": dict(),
    "unetpp": dict(deep_supervision=True),
    "sunet": dict(se_reduction=2),
    "multitask": dict(cls_hidden=8, num_classes=1),
}


def seg_model(name, **overrides):
    return create_model({"name": name, "depth": 2, "features": 8, **SEG_MODELS[name], **overrides})


@functools.lru_cache(maxsize=None)
def seg_data():
    """Four 32x32 scans with elliptic lesions: ([4,32,32,1] images, masks)."""
    return synthetic_scans(4, 32, seed=1)


SHAPE_ELONGATED = (False, True) * 4


@functools.lru_cache(maxsize=None)
def cls_data():
    """Eight 32x32 scans, round (label 0) or elongated (label 1) lesions."""
    x, _ = synthetic_scans(8, 32, seed=2, elongated=SHAPE_ELONGATED)
    return x, jnp.asarray(SHAPE_ELONGATED, jnp.int32)


def cls_model(**overrides):
    return Classifier(**{"features": (8, 16), "hidden": 16, "dropout": 0.1, **overrides})


# ------------------------------------------------------------- param formulas


def block(cin, c, norm="batch"):
    """ConvBlock: two bias-free 3x3 convs + two norms (scale, bias)."""
    extra = 2 * c if norm == "none" else 4 * c
    return 9 * cin * c + 9 * c * c + extra


def se_block(c, r):
    h = max(1, c // r)
    return c * h + h + h * c + c


def up(cin, c, mode="transpose"):
    return (4 if mode == "transpose" else 9) * cin * c + c


def attention_gate(cx, cg):
    fi = max(1, cx // 2)
    return 4 * cx * fi + (cg * fi + fi) + (fi + 1)


def unet_params(depth, f, cin=1, norm="batch", mode="transpose", se_r=None, attention=False):
    w = [f * 2**i for i in range(depth + 1)]
    total, prev = 0, cin
    for i in range(depth + 1):
        total += block(prev, w[i], norm)
        prev = w[i]
    for i in range(depth):
        total += up(w[i + 1], w[i], mode) + block(2 * w[i], w[i], norm)
        if attention:
            total += attention_gate(w[i], w[i + 1])
    if se_r is not None:
        total += sum(se_block(w[i], se_r) for i in range(depth + 1))
        total += sum(se_block(w[i], se_r) for i in range(depth))
    return total + w[0] + 1


def unetpp_params(depth, f, cin=1, ds=False):
    w = [f * 2**i for i in range(depth + 1)]
    total = block(cin, w[0]) + sum(block(w[i - 1], w[i]) for i in range(1, depth + 1))
    for j in range(1, depth + 1):
        for i in range(depth + 1 - j):
            total += up(w[i + 1], w[i]) + block((j + 1) * w[i], w[i])
    return total + (depth if ds else 1) * (w[0] + 1)


# ---------------------------------------------------------------- registry


def test_registry_builds_every_model_from_configdict():
    assert set(MODELS) >= {"unet", "unetpp", "sunet", "classifier", "multitask"}
    for name, cls in MODELS.items():
        cfg = ml_collections.ConfigDict({"name": name, "dtype": "bfloat16"})
        model = create_model(cfg)
        assert type(model) is cls and model.dtype == jnp.bfloat16
    m = create_model({"name": "classifier", "features": [4, 8], "num_classes": 3})
    assert m.features == (4, 8) and m.num_classes == 3
    assert create_model({"name": "sunet"}).se == "se"
    assert "deep_supervision" in model_options("unetpp")


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match=r"'resnet'.*unet"):
        create_model({"name": "resnet"})
    with pytest.raises(ValueError, match=r"widht.*features"):
        create_model({"name": "unet", "widht": 8})
    with pytest.raises(ValueError, match="name"):
        create_model({"features": 8})


@pytest.mark.parametrize(
    "kwargs", [dict(norm="layer"), dict(se="cbam"), dict(upsample="cubic"), dict(depth=0)]
)
def test_invalid_option_values_raise(kwargs):
    with pytest.raises(ValueError):
        UNet(**kwargs)


def test_unetpp_rejects_bad_ds_inference_and_bad_sizes():
    for bad in (4, -5, "median", True):
        with pytest.raises(ValueError):
            UNetPlusPlus(depth=4, deep_supervision=True, ds_inference=bad)
    with pytest.raises(ValueError, match="divisible"):
        abstract_init(UNet(depth=3, features=4), (1, 36, 36, 1))


# ----------------------------------------------------------- shapes (traced)


UNET_VARIANTS = [
    dict(),
    dict(depth=1),
    dict(depth=3),
    dict(norm="group", features=6),
    dict(norm="none"),
    dict(upsample="bilinear"),
    dict(upsample="nearest"),
    dict(upsample="resize"),
    dict(se="se"),
    dict(se="sse"),
    dict(se="scse"),
    dict(attention=True),
    dict(dilated_bottleneck=True, dilations=(1, 2)),
    dict(attention=True, se="scse", upsample="bilinear", dilated_bottleneck=True, norm="group"),
]


def _variant_id(name, kwargs):
    return name + ":" + (",".join(f"{k}={v}" for k, v in kwargs.items()) or "default")


# U-Net++ has no attention gates (the registry would reject the option).
SEGMENTER_VARIANTS = [
    pytest.param(n, kw, id=_variant_id(n, kw))
    for n in ("unet", "unetpp")
    for kw in UNET_VARIANTS
    if not (n == "unetpp" and "attention" in kw)
]


@pytest.mark.parametrize("name,kwargs", SEGMENTER_VARIANTS)
def test_segmenter_output_shapes(name, kwargs):
    model = create_model({"name": name, "depth": 2, "features": 4, **kwargs})
    # Non-square, 3-channel input in training mode (BatchNorm batch stats).
    out = abstract_apply(model, (2, 32, 64, 3), train=True)
    assert out.shape == (2, 32, 64, 1) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", ["unet", "sunet", "unetpp"])
def test_segmenter_inference_shape(name):
    out = abstract_apply(create_model({"name": name, "depth": 3, "features": 4}), (3, 64, 64, 1))
    assert out.shape == (3, 64, 64, 1) and out.dtype == jnp.float32


def test_unet_param_count_matches_formula():
    # Depth-2, width-4 U-Net on 1 channel: 7,477 parameters (see unet_params).
    assert unet_params(2, 4) == 7477
    assert n_params(abstract_init(UNet(depth=2, features=4))["params"]) == 7477
    for kw, want in [
        (dict(depth=2, features=4, norm="none"), unet_params(2, 4, norm="none")),
        (dict(depth=2, features=4, upsample="bilinear"), unet_params(2, 4, mode="bilinear")),
        (dict(depth=2, features=4, attention=True), unet_params(2, 4, attention=True)),
        (dict(depth=2, features=4, se="se", se_reduction=2), unet_params(2, 4, se_r=2)),
        (dict(depth=3, features=8), unet_params(3, 8)),
    ]:
        assert n_params(abstract_init(UNet(**kw))["params"]) == want, kw
    # Defaults (depth 4, width 32): the classic ~7.76M-parameter BN U-Net.
    assert (
        n_params(abstract_init(UNet(), (1, 128, 128, 1))["params"])
        == unet_params(4, 32)
        == 7_762_465
    )
    assert n_params(
        abstract_init(SUNet(depth=2, features=8, se_reduction=4))["params"]
    ) == unet_params(2, 8, se_r=4)


def test_unetpp_param_count_matches_formula():
    # Depth-2, width-4 U-Net++: 8,201 parameters; +5 for the second DS head.
    assert unetpp_params(2, 4) == 8201
    assert n_params(abstract_init(UNetPlusPlus(depth=2, features=4))["params"]) == 8201
    assert (
        n_params(abstract_init(UNetPlusPlus(depth=2, features=4, deep_supervision=True))["params"])
        == 8206
    )
    assert n_params(
        abstract_init(UNetPlusPlus(depth=3, features=4, deep_supervision=True))["params"]
    ) == unetpp_params(3, 4, ds=True)
    # Defaults match the 9.04M reported by Zhou et al. for their U-Net++.
    assert (
        n_params(abstract_init(UNetPlusPlus(), (1, 128, 128, 1))["params"])
        == unetpp_params(4, 32)
        == 9_045_249
    )


def test_se_block_param_counts():
    x = jnp.zeros((1, 4, 4, 16))
    count = lambda m: n_params(jax.eval_shape(lambda: m.init(KEY(0), x))["params"])
    assert count(SqueezeExcitation(reduction=4)) == se_block(16, 4) == 2 * 16 * 4 + 4 + 16
    assert count(SpatialSE()) == 16 + 1
    assert count(ChannelSpatialSE(reduction=4)) == se_block(16, 4) + 17


def test_unetpp_deep_supervision_output_shapes():
    model = UNetPlusPlus(depth=3, features=4, deep_supervision=True)
    assert abstract_apply(model, (2, 32, 32, 1), train=True).shape == (3, 2, 32, 32, 1)
    assert abstract_apply(model, (2, 32, 32, 1), train=False).shape == (2, 32, 32, 1)
    assert abstract_apply(model.clone(ds_inference="all"), (2, 32, 32, 1)).shape == (
        3,
        2,
        32,
        32,
        1,
    )
    for k in (0, 1, 2, -1):
        assert abstract_apply(model.clone(ds_inference=k), (2, 32, 32, 1)).shape == (2, 32, 32, 1)
    # Without deep supervision there is one head in both modes.
    assert abstract_apply(model.clone(deep_supervision=False), train=True).shape == (2, 32, 32, 1)


def test_classifier_and_multitask_shapes_and_params():
    clf = Classifier()  # default widths on the intended 128x128 input
    assert abstract_apply(clf, (2, 128, 128, 1)).shape == (2,)
    want = sum(block(a, b) for a, b in [(1, 16), (16, 32), (32, 64), (64, 128)]) + 129 * 128 + 129
    assert n_params(abstract_init(clf, (1, 128, 128, 1))["params"]) == want == 310_353
    three = Classifier(num_classes=3, features=(4, 8), hidden=8)
    assert abstract_apply(three, (2, 64, 64, 2), train=True).shape == (2, 3)
    assert abstract_apply(three, (2, 64, 64, 2)).dtype == jnp.float32

    mt = MultiTaskUNet(depth=2, features=4, num_classes=3, cls_hidden=8)
    seg, cls = jax.eval_shape(
        lambda: mt.apply(mt.init(KEY(0), jnp.zeros((2, 32, 32, 1))), jnp.zeros((2, 32, 32, 1)))
    )
    assert seg.shape == (2, 32, 32, 1) and cls.shape == (2, 3)
    assert seg.dtype == cls.dtype == jnp.float32
    binary = mt.clone(num_classes=1)
    seg, cls = jax.eval_shape(
        lambda: binary.apply(
            binary.init(KEY(0), jnp.zeros((2, 32, 32, 1))),
            jnp.zeros((2, 32, 32, 1)),
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": KEY(1)},
        )[0]
    )
    assert cls.shape == (2,)
    head = (16 + 1) * 8 + (8 + 1) * 3
    assert n_params(abstract_init(mt)["params"]) == unet_params(2, 4) + head


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_compute_keeps_float32_params_and_outputs(name):
    model = create_model(
        {
            "name": name,
            "dtype": "bfloat16",
            **(
                {"features": (4, 8), "hidden": 8}
                if name == "classifier"
                else {"depth": 2, "features": 4}
            ),
        }
    )
    shape = (2, 32, 32, 1)
    variables = abstract_init(model, shape)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
    out = abstract_apply(model, shape, train=True)
    for o in out if isinstance(out, tuple) else (out,):
        assert o.dtype == jnp.float32
    # The convolutions really run in bf16 (all but the float32 1x1 head).
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, jnp.zeros(shape)))
    convs = [
        l
        for l in jaxpr.splitlines()
        if "conv_general_dilated[" in l or "= conv_general_dilated" in l
    ]
    assert convs and sum("bf16[" in l.split("=")[0] for l in convs) >= len(convs) - 1


# ------------------------------------------------------- behaviour (executed)


def test_bf16_output_close_to_float32():
    x, _ = seg_data()
    model = seg_model("unet")
    v = init(model, x.shape)
    y32 = jax.jit(model.apply)(v, x)
    y16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(v, x)
    assert y16.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(y16 - y32)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(y32))) + 1e-2


def test_determinism_under_fixed_key():
    x, _ = seg_data()
    model = seg_model("unet")
    a, b, c = (
        init(model, x.shape, seed=3),
        init(model, x.shape, seed=3),
        init(model, x.shape, seed=4),
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["params"]["head"]["kernel"], c["params"]["head"]["kernel"])
    f = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))
    (y1, s1), (y2, s2) = f(a), f(b)
    np.testing.assert_array_equal(y1, y2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, s1, s2)
    # Training-mode BatchNorm updated its running statistics.
    assert not np.allclose(s1["batch_stats"]["encoder"]["enc0"]["norm0"]["mean"], 0.0)


def test_squeeze_excitation_rescales_each_channel():
    x = jax.random.uniform(KEY(0), (2, 5, 5, 8)) + 0.1
    se = SqueezeExcitation(reduction=2)
    v = se.init(KEY(1), x)
    y, st = se.apply(v, x, mutable=["intermediates"])
    gate = st["intermediates"]["gate"][0]
    assert gate.shape == (2, 1, 1, 8)
    assert np.all((gate > 0) & (gate < 1))
    ratio = y / x
    # One factor per (sample, channel), shared by all pixels, equal to the gate.
    np.testing.assert_allclose(ratio, jnp.broadcast_to(gate, x.shape), rtol=1e-5)
    assert float(jnp.std(gate)) > 1e-3  # channels are weighted differently


def _drop_key(tree, key):
    return (
        {k: _drop_key(v, key) for k, v in tree.items() if k != key}
        if isinstance(tree, dict)
        else tree
    )


def _force_se_open(tree):
    """Sets every SE gate to sigmoid(+30) == 1 (fc2 kernel 0, bias 30)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if k == "se":
            v = dict(
                v,
                fc2={
                    "kernel": jnp.zeros_like(v["fc2"]["kernel"]),
                    "bias": jnp.full_like(v["fc2"]["bias"], 30.0),
                },
            )
        out[k] = _force_se_open(v)
    return out


def test_se_recalibration_changes_unet_output():
    x, _ = seg_data()
    sunet = seg_model("sunet")
    v = init(sunet, x.shape)
    plain_vars = {"params": _drop_key(v["params"], "se"), "batch_stats": v["batch_stats"]}
    y_plain = seg_model("sunet", se="none").apply(plain_vars, x)
    y_se = sunet.apply(v, x)
    y_open = sunet.apply(
        {"params": _force_se_open(v["params"]), "batch_stats": v["batch_stats"]}, x
    )
    # Same weights with every SE gate forced to 1 reproduce the plain U-Net,
    # so SE is a pure recalibration -- and with learned gates it changes the output.
    np.testing.assert_allclose(y_open, y_plain, atol=1e-5)
    assert float(jnp.max(jnp.abs(y_se - y_plain))) > 1e-3


def test_attention_gates_keep_shapes_and_coefficients_in_unit_interval():
    x, _ = seg_data()
    model = seg_model("unet", attention=True)
    v = init(model, x.shape)
    y, st = model.apply(v, x, mutable=["intermediates"])
    assert y.shape == (4, 32, 32, 1)
    coeffs = st["intermediates"]["decoder"]
    for i, size in [(0, 32), (1, 16)]:
        a = coeffs[f"att{i}"]["coefficients"][0]
        assert a.shape == (4, size, size, 1) and a.dtype == jnp.float32
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert float(a.std()) > 0  # spatially varying, not a constant
    # Not sown unless asked for: plain apply returns only the logits.
    np.testing.assert_allclose(model.apply(v, x), y, rtol=1e-6)


def test_attention_gate_multiplies_skip_by_coefficients():
    xs = jax.random.normal(KEY(0), (2, 8, 8, 3))
    g = jax.random.normal(KEY(1), (2, 4, 4, 5))
    gate = AttentionGate(inter_features=2)
    v = gate.init(KEY(2), xs, g)
    y, st = gate.apply(v, xs, g, mutable=["intermediates"])
    alpha = st["intermediates"]["coefficients"][0]
    assert y.shape == xs.shape and alpha.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(y, xs * alpha, rtol=1e-6)


def _prune(tree, k):
    """Keeps only what U-Net++ head k needs: nodes/ups with i + j <= k + 1, head_k."""

    def keep(name):
        m = re.fullmatch(r"(?:X|up)_(\d+)_(\d+)", name)
        if m:
            return int(m[1]) + int(m[2]) <= k + 1
        return name == f"head_{k}"

    return {n: v for n, v in tree.items() if keep(n)}


def test_unetpp_ds_inference_heads_and_pruning():
    x, _ = seg_data()
    model = seg_model("unetpp")
    v = init(model, x.shape)
    heads = model.clone(ds_inference="all").apply(v, x)
    assert heads.shape == (2, 4, 32, 32, 1)
    assert float(jnp.max(jnp.abs(heads[0] - heads[1]))) > 1e-4
    np.testing.assert_allclose(model.apply(v, x), heads.mean(0), rtol=1e-5, atol=1e-6)
    n_convs = lambda m, vv: str(jax.make_jaxpr(lambda a: m.apply(a, x))(vv)).count(
        "conv_general_dilated"
    )
    full_convs = n_convs(model, v)
    for k in range(2):
        pruned = {c: _prune(t, k) for c, t in v.items()}
        m_k = model.clone(ds_inference=k)
        # Runs on variables stripped of everything head k does not need ...
        np.testing.assert_allclose(m_k.apply(pruned, x), heads[k], rtol=1e-5, atol=1e-6)
        assert np.array_equal(m_k.apply(v, x), m_k.apply(pruned, x))
    # ... so the first head is the genuinely cheaper, pruned model.
    assert n_convs(model.clone(ds_inference=0), v) < full_convs
    with pytest.raises(Exception, match="head_1|X_"):
        model.apply({c: _prune(t, 0) for c, t in v.items()}, x)


def test_classifier_dropout_only_in_training():
    x, _ = cls_data()
    model = cls_model()
    v = init(model, x.shape)
    train = jax.jit(
        lambda key: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]
    )
    assert not np.allclose(train(KEY(1)), train(KEY(2)))
    np.testing.assert_array_equal(train(KEY(1)), train(KEY(1)))
    np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))


def test_classifier_inputs_modes():
    image = jax.random.uniform(KEY(0), (2, 16, 16, 1)) + 0.5
    mask = jnp.zeros((2, 16, 16, 1)).at[0, 8, 8, 0].set(1.0)
    assert classifier_inputs(image, mask, "image").shape == (2, 16, 16, 1)
    both = classifier_inputs(image, mask[..., 0], "image_mask")
    assert both.shape == (2, 16, 16, 2) and classifier_input_channels("image_mask") == 2
    np.testing.assert_array_equal(both[..., 1:], mask)
    masked = jax.jit(classifier_inputs, static_argnames=("mode", "margin"))(
        image, mask, mode="masked", margin=2
    )
    assert masked.shape == (2, 16, 16, 1)
    # A one-pixel lesion keeps exactly its 5x5 neighbourhood; an empty mask keeps nothing.
    keep = np.zeros((16, 16), bool)
    keep[6:11, 6:11] = True
    np.testing.assert_allclose(masked[0, ..., 0][keep], image[0, ..., 0][keep])
    assert np.all(np.asarray(masked[0, ..., 0])[~keep] == 0)
    assert np.all(np.asarray(masked[1]) == 0)
    with pytest.raises(ValueError):
        classifier_inputs(image, mask, "crop")
    with pytest.raises(ValueError):
        classifier_inputs(image, None, "masked")


def test_roi_crop_known_answer():
    # A 40x20 lesion at rows 40-59, cols 50-89 of a 128 scan: its box is 40
    # wide plus a quarter on each side (side 60), centred on the lesion.
    mask = jnp.zeros((2, 128, 128, 1)).at[0, 40:60, 50:90, 0].set(1.0)
    boxes = roi_boxes(mask)
    np.testing.assert_allclose(boxes[0], [20.0, 40.0, 60.0])
    np.testing.assert_allclose(boxes[1], [0.0, 0.0, 128.0])  # empty: the whole scan
    # A 2-pixel lesion is not blown up past a quarter of the scan, and its box
    # (centred at 11) moves inside the scan rather than reaching past it.
    tiny = jnp.zeros((1, 128, 128, 1)).at[0, 10:12, 10:12, 0].set(1.0)
    np.testing.assert_allclose(roi_boxes(tiny)[0], [0.0, 0.0, 32.0])
    corner = jnp.zeros((1, 128, 128)).at[0, 120:124, 100:104].set(1.0)  # [B, H, W] accepted
    np.testing.assert_allclose(roi_boxes(corner)[0], [96.0, 86.0, 32.0])
    # A lesion whose margin would not fit is given the whole scan, never shrunk.
    large = jnp.zeros((1, 128, 128, 1)).at[0, 10:110, 20:120, 0].set(1.0)
    np.testing.assert_allclose(roi_boxes(large)[0], [0.0, 0.0, 128.0])
    with pytest.raises(ValueError, match="square scans, got 64x128"):
        roi_boxes(jnp.zeros((1, 64, 128, 1)))
    image = jax.random.uniform(KEY(0), (2, 128, 128, 1))
    roi = jax.jit(classifier_inputs, static_argnames=("mode",))(image, mask, mode="roi")
    assert roi.shape == (2, 128, 128, 2) and classifier_input_channels("roi") == 2
    # The lesion fills 40/60 of the crop's width: columns 21..106 of 128.
    cols = np.where(np.asarray(roi[0, 64, :, 1]) > 0.5)[0]
    assert (cols[0], cols[-1]) == (21, 106)
    # Crop pixel (i, j) samples scan pixel (top + (i + .5) * 60 / 128 - .5, ...).
    i, j = 64, 64
    y, x = 20 + (i + 0.5) * 60 / 128 - 0.5, 40 + (j + 0.5) * 60 / 128 - 0.5
    y0, x0 = int(y), int(x)
    fy, fx = y - y0, x - x0
    im = np.asarray(image[0, ..., 0])
    want = (
        im[y0, x0] * (1 - fy) * (1 - fx)
        + im[y0 + 1, x0] * fy * (1 - fx)
        + im[y0, x0 + 1] * (1 - fy) * fx
        + im[y0 + 1, x0 + 1] * fy * fx
    )
    np.testing.assert_allclose(roi[0, i, j, 0], want, rtol=1e-5)
    np.testing.assert_allclose(roi[1, ..., 0], image[1, ..., 0], atol=1e-6)  # empty: identity
    both = classifier_inputs(image, mask, "image_mask_roi")
    assert both.shape == (2, 128, 128, 4) and classifier_input_channels("image_mask_roi") == 4
    np.testing.assert_array_equal(both[..., :2], classifier_inputs(image, mask, "image_mask"))
    np.testing.assert_allclose(both[..., 2:], roi, atol=1e-5)
    # Putting the crop back restores the lesion where it was: inside it and
    # away from the border exactly, at its border within interpolation.
    back = uncrop_boxes(crop_boxes(mask, boxes), boxes)
    np.testing.assert_allclose(back[0, 41:59, 51:89, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(back[0, 20:38, :, 0], 0.0, atol=1e-6)
    assert float(jnp.abs(back - mask).mean()) < 1.5e-3
    assert float(back[0, 5, 5, 0]) == 0.0  # outside the box
    with pytest.raises(ValueError, match="needs a mask"):
        classifier_inputs(image, None, "roi")


# ---------------------------------------------------------------- overfit


def _fit(model, x, mask, steps, lr=1e-2, labels=None, seg=True):
    """Adam on Dice+BCE (deep supervision aware) and/or classification loss."""
    variables = init(model, x.shape)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.adam(lr)
    opt = tx.init(params)
    seg_loss = losses.deep_supervision(losses.dice_bce_loss)

    def loss_fn(p, s, key):
        out, upd = model.apply(
            {"params": p, "batch_stats": s},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )
        seg_out, cls_out = out if isinstance(out, tuple) else ((out, None) if seg else (None, out))
        loss = 0.0
        if seg_out is not None:
            loss += seg_loss(seg_out, mask)
        if labels is not None:
            loss += losses.classification_loss(cls_out, labels)
        return loss, upd["batch_stats"]

    @jax.jit
    def step(p, s, o, key):
        (_, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, key)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), s, o

    key = KEY(7)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, stats, opt = step(params, stats, opt, sub)
    return jax.jit(lambda p, s: model.apply({"params": p, "batch_stats": s}, x))(params, stats)


@pytest.mark.parametrize("name", sorted(SEG_MODELS))
def test_segmenters_overfit_four_scans(name):
    x, mask = seg_data()
    model = seg_model(name)
    labels = jnp.asarray([0, 1, 0, 1]) if name == "multitask" else None
    out = _fit(model, x, mask, steps=120, labels=labels)
    seg = out[0] if name == "multitask" else out
    assert seg.shape == mask.shape
    # Evaluated in inference mode (BatchNorm running stats; U-Net++: mean of heads).
    assert float(losses.dice_loss(seg, mask)) < 0.1


def test_classifier_separates_round_from_elongated_lesions():
    x, labels = cls_data()
    logits = _fit(cls_model(), x, None, steps=80, labels=labels, seg=False)
    assert logits.shape == (8,)
    np.testing.assert_array_equal(np.asarray(logits > 0), np.asarray(labels, bool))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_deconv2x2_is_the_transposed_conv_it_replaces(dtype):
    """Same parameters, initialisation, outputs and gradients as nn.ConvTranspose."""
    from busi_jax.models.blocks import HE_INIT, Deconv2x2

    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 12))
    ref = nn.ConvTranspose(
        8, (2, 2), strides=(2, 2), padding="VALID", kernel_init=HE_INIT, dtype=dtype
    )
    new = Deconv2x2(8, dtype=dtype)
    v_ref, v_new = ref.init(jax.random.key(1), x), new.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, v_ref) == jax.tree.map(jnp.shape, v_new)
    for a, b in zip(jax.tree.leaves(v_ref), jax.tree.leaves(v_new)):
        np.testing.assert_array_equal(a, b)
    # A non-zero bias, so a bias bug shows.
    v = {"params": {**v_ref["params"], "bias": jnp.linspace(-1, 1, 8)}}
    y = new.apply(v, x)
    assert y.shape == (2, 10, 12, 8) and y.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(ref.apply(v, x), np.float32), atol=tol, rtol=tol
    )

    def loss(v, x, m):
        return jnp.sum(jnp.sin(m.apply(v, x).astype(jnp.float32)))

    g_ref = jax.grad(loss, argnums=(0, 1))(v, x, ref)
    g_new = jax.grad(loss, argnums=(0, 1))(v, x, new)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_new)):
        np.testing.assert_allclose(b, a, atol=tol * float(jnp.max(jnp.abs(a))), rtol=tol)


def test_channel_bias_gradient_is_summed_in_float32():
    """A bf16 activation's bias gradient: 2^18 ones sum to 2^18, not bf16's 256."""
    from busi_jax.models.blocks import add_channel_bias

    y = jnp.zeros((16, 128, 128, 2), jnp.bfloat16)
    bias = jnp.array([0.5, -1.0])
    out = add_channel_bias(y, bias)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out[0, 0, 0], np.float32), [0.5, -1.0])
    dy, db = jax.grad(lambda y, b: jnp.sum(add_channel_bias(y, b).astype(jnp.float32)), (0, 1))(
        y, bias
    )
    assert dy.dtype == jnp.bfloat16 and db.dtype == jnp.float32
    np.testing.assert_array_equal(db, [16 * 128 * 128] * 2)
