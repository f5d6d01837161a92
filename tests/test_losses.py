"""Known-answer tests for busi_jax.losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from busi_jax import losses

BIG = 30.0  # sigmoid(30) == 1 to float32 precision


def _mask(rows):
    """[1, H, W, 1] float mask from a nested list."""
    return jnp.asarray(rows, jnp.float32)[None, ..., None]


def _confident(mask):
    return jnp.where(mask > 0.5, BIG, -BIG)


# --------------------------------------------------------------------- Dice


def test_dice_perfect_prediction_is_zero():
    m = _mask([[0, 1, 1], [0, 1, 0], [0, 0, 0]])
    assert float(losses.dice_loss(_confident(m), m)) == pytest.approx(0.0, abs=1e-6)


def test_dice_disjoint_prediction_is_one():
    m = _mask([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred = _confident(1.0 - m)
    # Smoothing leaves eps / (|P| + |M| + eps) = 1/9 of Dice at eps=1.
    assert float(losses.dice_loss(pred, m, eps=1.0)) == pytest.approx(1 - 1 / 9, abs=1e-6)
    assert float(losses.dice_loss(pred, m, eps=1e-7)) == pytest.approx(1.0, abs=1e-6)


def test_dice_hand_computed():
    # p = sigmoid(logits) = [[0.5, 0.5], [0.75, 0.25]], M = [[1, 0], [1, 0]]
    logits = jnp.asarray([[0.0, 0.0], [math.log(3), -math.log(3)]])[None, ..., None]
    m = _mask([[1, 0], [1, 0]])
    # |P.M| = 1.25, |P| = 2, |M| = 2
    assert float(losses.dice_loss(logits, m, eps=1.0)) == pytest.approx(1 - 3.5 / 5, abs=1e-6)
    assert float(losses.dice_loss(logits, m, eps=0.0)) == pytest.approx(1 - 2.5 / 4, abs=1e-6)
    np.testing.assert_allclose(losses.dice_coefficient(logits, m, eps=0.0), [0.625], rtol=1e-6)


def test_dice_is_per_sample_then_mean():
    big = jnp.ones((1, 4, 4, 1))  # 16-pixel lesion, predicted perfectly
    small = _mask([[1, 0, 0, 0]] + [[0] * 4] * 3)  # 1-pixel lesion, missed entirely
    masks = jnp.concatenate([big, small])
    logits = jnp.concatenate([_confident(big), jnp.full((1, 4, 4, 1), -BIG)])
    loss = float(losses.dice_loss(logits, masks, eps=1e-7))
    # Per-sample: mean(0, 1) = 0.5. A pooled Dice would give 1 - 32/33.
    assert loss == pytest.approx(0.5, abs=1e-5)


def test_dice_empty_mask_behaviour():
    empty = jnp.zeros((1, 4, 4, 1))
    assert float(losses.dice_loss(jnp.full((1, 4, 4, 1), -BIG), empty)) == pytest.approx(
        0.0, abs=1e-6
    )
    one_fp = _confident(_mask([[1, 0, 0, 0]] + [[0] * 4] * 3))
    # Documented: 1 - eps / (|P| + eps) = 0.5 for one confident false positive.
    assert float(losses.dice_loss(one_fp, empty, eps=1.0)) == pytest.approx(0.5, abs=1e-6)


def test_dice_accepts_hw_masks_bf16_logits_and_jit():
    m = _mask([[0, 1], [1, 1]])
    logits = jnp.asarray([[[-1.0], [2.0]], [[0.5], [3.0]]])[None]
    ref = losses.dice_loss(logits, m)
    out = jax.jit(losses.dice_loss)(logits.astype(jnp.bfloat16), m[..., 0])
    assert out.dtype == jnp.float32 and out.shape == ()
    assert float(out) == pytest.approx(float(ref), abs=1e-2)


def test_dice_gradient_finite_and_points_the_right_way():
    m = _mask([[1, 0], [0, 0]])
    g = jax.grad(losses.dice_loss)(jnp.zeros((1, 2, 2, 1)), m)
    assert np.all(np.isfinite(g))
    assert g[0, 0, 0, 0] < 0 and np.all(np.asarray(g)[0, 1, :, 0] > 0)


def test_dice_rejects_mismatched_mask():
    with pytest.raises(ValueError):
        losses.dice_loss(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 3, 3, 1)))


# ---------------------------------------------------------------------- BCE


def _naive_bce(x, y, w=1.0):
    p = 1 / (1 + np.exp(-x))
    return np.mean(-(w * y * np.log(p) + (1 - y) * np.log(1 - p)))


def test_bce_known_values():
    assert float(losses.bce_loss(jnp.zeros((2, 3, 3, 1)), jnp.ones((2, 3, 3, 1)))) == pytest.approx(
        math.log(2), rel=1e-6
    )
    x = np.array([2.0, -1.0, 0.3, -4.0], np.float32)
    y = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
    assert float(losses.bce_loss(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(
        _naive_bce(x, y), rel=1e-5
    )
    assert float(losses.bce_loss(jnp.asarray(x), jnp.asarray(y), pos_weight=3.0)) == pytest.approx(
        _naive_bce(x, y, 3.0), rel=1e-5
    )


def test_bce_stable_for_large_logits():
    out = losses.bce_loss(jnp.asarray([100.0, -100.0]), jnp.asarray([0.0, 1.0]))
    assert float(out) == pytest.approx(100.0, rel=1e-6)


def test_dice_bce_combination():
    m = _mask([[0, 1], [1, 1]])
    logits = jnp.asarray([[0.3, -0.2], [1.5, -2.0]])[None, ..., None]
    want = losses.dice_loss(logits, m, eps=0.5) + 0.25 * losses.bce_loss(logits, m)
    got = jax.jit(losses.dice_bce_loss)(logits, m, 0.25, 0.5)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # Default weighting is the U-Net++ paper's: Dice + 0.5 * BCE.
    assert float(losses.dice_bce_loss(logits, m)) == pytest.approx(
        float(losses.dice_loss(logits, m) + 0.5 * losses.bce_loss(logits, m)), rel=1e-6
    )


# --------------------------------------------------------- deep supervision


def test_deep_supervision_averages_heads():
    m = _mask([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    heads = jnp.stack([_confident(m), jnp.zeros_like(m), _confident(1 - m)])  # [3,1,3,3,1]
    per_head = np.array([float(losses.dice_loss(h, m)) for h in heads])
    assert per_head[0] < 1e-5 < per_head[1] < per_head[2]
    ds = losses.deep_supervision(losses.dice_loss)
    assert float(jax.jit(ds)(heads, m)) == pytest.approx(per_head.mean(), rel=1e-6)
    weighted = losses.deep_supervision(losses.dice_loss, weights=[1.0, 0.0, 3.0])
    assert float(weighted(heads, m)) == pytest.approx((per_head[0] + 3 * per_head[2]) / 4, rel=1e-6)
    # Weights are normalised; extra args are forwarded.
    assert float(
        losses.deep_supervision(losses.dice_loss, [2, 2, 2])(heads, m, 0.1)
    ) == pytest.approx(float(ds(heads, m, eps=0.1)), rel=1e-6)
    # A single [B, H, W, 1] head passes straight through.
    assert float(ds(heads[1], m)) == pytest.approx(per_head[1], rel=1e-6)
    with pytest.raises(ValueError):
        losses.deep_supervision(losses.dice_loss, weights=[1.0, 1.0])(heads, m)


# ------------------------------------------------------------ classification


def test_classification_bce():
    logits = jnp.asarray([0.0, 2.0, -1.0])
    labels = jnp.asarray([1, 1, 0])
    want = _naive_bce(np.asarray(logits), np.asarray(labels, np.float32))
    assert float(jax.jit(losses.classification_bce_loss)(logits, labels)) == pytest.approx(
        want, rel=1e-6
    )
    assert float(losses.classification_loss(logits, labels)) == pytest.approx(want, rel=1e-6)
    # Label smoothing s: targets 1 -> 1 - s/2; at logit 0 the loss stays ln 2.
    assert float(
        losses.classification_bce_loss(jnp.zeros(2), jnp.ones(2), label_smoothing=0.2)
    ) == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(ValueError):
        losses.classification_bce_loss(jnp.zeros((2, 1)), jnp.ones(2))


def test_classification_softmax_ce():
    assert float(
        losses.classification_ce_loss(jnp.zeros((4, 3)), jnp.asarray([0, 1, 2, 0]))
    ) == pytest.approx(math.log(3), rel=1e-6)
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
    labels = np.array([0, 1])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    per = -logp[np.arange(2), labels]
    assert float(
        jax.jit(losses.classification_ce_loss)(jnp.asarray(logits), jnp.asarray(labels))
    ) == pytest.approx(per.mean(), rel=1e-5)
    onehot = jax.nn.one_hot(labels, 3)
    assert float(losses.classification_loss(jnp.asarray(logits), onehot)) == pytest.approx(
        per.mean(), rel=1e-5
    )
    w = np.array([1.0, 4.0, 2.0])
    assert float(
        losses.classification_ce_loss(jnp.asarray(logits), jnp.asarray(labels), class_weights=w)
    ) == (pytest.approx((1 * per[0] + 4 * per[1]) / 5, rel=1e-5))
    s = 0.3
    smooth = -((1 - s) * logp[np.arange(2), labels] + s / 3 * logp.sum(-1))
    assert float(
        losses.classification_ce_loss(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=s)
    ) == (pytest.approx(smooth.mean(), rel=1e-5))
    with pytest.raises(ValueError):
        losses.classification_ce_loss(jnp.zeros(3), jnp.zeros(3, jnp.int32))


# ------------------------------------------------------------------ Tversky


def test_tversky_with_equal_weights_is_dice():
    logits = jax.random.normal(jax.random.key(0), (3, 8, 8, 1)) * 3
    mask = (jax.random.uniform(jax.random.key(1), (3, 8, 8, 1)) > 0.6).astype(jnp.float32)
    got = losses.tversky_loss(logits, mask, alpha=0.5, beta=0.5, gamma=1.0, eps=0.5)
    assert float(got) == pytest.approx(float(losses.dice_loss(logits, mask, eps=1.0)), rel=1e-6)


def test_tversky_weighs_missed_pixels_above_false_alarms():
    m = _mask([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    missed = _confident(_mask([[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    extra = _confident(_mask([[0, 1, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]))
    # Two lesion pixels missed (TP 2, FN 2) or two false alarms (TP 4, FP 2):
    # TI = (2 + 1) / (2 + 0.7 * 2 + 1) and (4 + 1) / (4 + 0.3 * 2 + 1).
    assert float(losses.tversky_loss(missed, m)) == pytest.approx(1 - 3 / 4.4, abs=1e-5)
    assert float(losses.tversky_loss(extra, m)) == pytest.approx(1 - 5 / 5.6, abs=1e-5)
    # Weights swapped, false alarms cost more than misses.
    swapped = {"alpha": 0.3, "beta": 0.7}
    assert float(losses.tversky_loss(missed, m, **swapped)) == pytest.approx(1 - 3 / 3.6, abs=1e-5)
    assert float(losses.tversky_loss(extra, m, **swapped)) == pytest.approx(1 - 5 / 6.4, abs=1e-5)


def test_focal_tversky_raises_to_gamma_and_stays_finite_at_a_perfect_sample():
    m = _mask([[0, 1, 1], [0, 1, 0], [0, 0, 0]])
    logits = jnp.where(m > 0.5, 1.0, -1.0)
    plain = float(losses.tversky_loss(logits, m))
    assert float(losses.tversky_loss(logits, m, gamma=0.75)) == pytest.approx(plain**0.75, rel=1e-5)
    g = jax.grad(lambda x: losses.tversky_loss(x, m, gamma=0.75))(_confident(m))
    assert bool(jnp.all(jnp.isfinite(g)))


# ------------------------------------------------------------------- Lovasz


def _lovasz_by_definition(logits, labels):
    """The Lovasz extension of the Jaccard loss at the hinge errors, from its definition:
    sort errors down, weight each by how much IoU loss flipping one more pixel adds."""
    errors = 1.0 - logits * (2.0 * labels - 1.0)
    order = np.argsort(-errors, kind="stable")

    def jaccard_loss(k):  # The first k pixels in error order predicted wrongly.
        pred = labels.copy()
        pred[order[:k]] = 1 - pred[order[:k]]
        union = np.sum((pred + labels) > 0)
        return 0.0 if union == 0 else 1.0 - np.sum(pred * labels) / union

    steps = [jaccard_loss(k + 1) - jaccard_loss(k) for k in range(len(labels))]
    return float(np.dot(np.maximum(errors[order], 0.0), steps))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_hinge_is_the_lovasz_extension_per_image(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 3, 4)).astype(np.float32) * 2
    labels = (rng.uniform(size=(2, 3, 4)) > 0.5).astype(np.float32)
    labels[1] = 0  # An empty mask: only the worst false positive counts.
    want = np.mean([_lovasz_by_definition(x.ravel(), y.ravel()) for x, y in zip(logits, labels)])
    got = losses.lovasz_hinge_loss(jnp.asarray(logits)[..., None], jnp.asarray(labels))
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert _lovasz_by_definition(logits[1].ravel(), labels[1].ravel()) == pytest.approx(
        max(0.0, 1.0 + float(logits[1].max()))
    )


def test_lovasz_hinge_zero_beyond_the_margin_and_trainable():
    m = _mask([[0, 1, 1], [0, 1, 0], [0, 0, 0]])
    assert float(losses.lovasz_hinge_loss(jnp.where(m > 0.5, 2.0, -2.0), m)) == 0.0
    logits = jnp.zeros_like(m)
    loss_fn = jax.jit(losses.lovasz_hinge_loss)
    g = jax.grad(loss_fn)(logits, m)
    # Descending the gradient raises lesion logits and lowers background ones.
    assert bool(jnp.all(g[m > 0.5] < 0)) and bool(jnp.all(g[m < 0.5] >= 0))
    assert float(loss_fn(logits - 0.5 * g, m)) < float(loss_fn(logits, m))
