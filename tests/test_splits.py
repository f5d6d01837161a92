"""Group-aware stratified splits: no group straddles, proportions hold, deterministic."""

import collections

import numpy as np
import pytest

from tfds_busi import splits


def _toy(n_groups=120, seed=0):
    rng = np.random.default_rng(seed)
    names, labels, groups = [], [], []
    for g in range(n_groups):
        size = int(rng.choice([1, 1, 1, 2, 3, 5]))
        lab = int(rng.choice([0, 1, 1, 2]))
        for k in range(size):
            names.append(f"c{lab}/scan_{g}_{k}.png")
            # A few groups mix labels, as BUSI's cross-label duplicates do.
            labels.append(lab if k == 0 or rng.random() > 0.1 else (lab + 1) % 3)
            groups.append(g)
    return names, labels, groups


def test_no_group_straddles_splits_or_folds():
    names, labels, groups = _toy()
    split, fold = splits.assign(names, labels, groups, num_folds=5)
    by_group = collections.defaultdict(set)
    fold_by_group = collections.defaultdict(set)
    for g, s, f in zip(groups, split, fold):
        by_group[g].add(s)
        fold_by_group[g].add(f)
    assert all(len(v) == 1 for v in by_group.values())
    assert all(len(v) == 1 for v in fold_by_group.values())
    for s, f in zip(split, fold):
        assert (f == -1) == (s == "test")
    assert set(fold) - {-1} == set(range(5))


def test_proportions_are_stratified():
    names, labels, groups = _toy(300)
    split, _ = splits.assign(names, labels, groups, validation_fraction=0.1, test_fraction=0.2)
    labels = np.array(labels)
    split = np.array(split)
    for lab in range(3):
        total = (labels == lab).sum()
        test_share = ((labels == lab) & (split == "test")).sum() / total
        val_share = ((labels == lab) & (split == "validation")).sum() / total
        assert abs(test_share - 0.2) < 0.05, (lab, test_share)
        assert abs(val_share - 0.1) < 0.05, (lab, val_share)


def test_deterministic_and_independent_of_input_order():
    names, labels, groups = _toy()
    a = splits.assign(names, labels, groups, seed=3)
    assert a == splits.assign(names, labels, groups, seed=3)
    perm = np.random.default_rng(1).permutation(len(names))
    b = splits.assign(
        [names[i] for i in perm], [labels[i] for i in perm], [groups[i] for i in perm], seed=3
    )
    for j, i in enumerate(perm):
        assert b[0][j] == a[0][i] and b[1][j] == a[1][i]
    c = splits.assign(names, labels, groups, seed=4)
    assert c[0] != a[0]


@pytest.mark.parametrize(
    "kw",
    [
        dict(validation_fraction=-0.1),
        dict(test_fraction=1.0),
        dict(validation_fraction=0.5, test_fraction=0.5),
        dict(num_folds=1),
    ],
)
def test_bad_settings(kw):
    names, labels, groups = _toy(10)
    with pytest.raises(ValueError):
        splits.assign(names, labels, groups, **kw)


@pytest.mark.parametrize("fold", [0, 3])
def test_cross_validation_fold_holds_out_whole_groups_and_never_test(tiny_config, fold):
    from busi_jax import data

    cfg = tiny_config.data
    pool = data.load_pool(cfg)
    test = data.load_split(cfg, "test")
    cfg.cv_fold = fold
    train = data.load_run_split(cfg, "train")
    held = data.load_run_split(cfg, "eval")
    assert set(held["fold"]) == {fold} and fold not in set(train["fold"])
    # Together they are exactly train + validation, each scan once.
    names = sorted(train["file_name"]) + sorted(held["file_name"])
    assert sorted(names) == sorted(pool["file_name"]) and len(set(names)) == len(names)
    assert not set(names) & set(test["file_name"])
    assert not set(train["group"]) & set(held["group"])
    sizes = [len(data.load_split(cfg, s)["label"]) for s in ("train", "validation")]
    assert len(pool["label"]) == sum(sizes)


@pytest.mark.parametrize("bad", [5, -1])
def test_cross_validation_fold_out_of_range_is_one_clear_error(tiny_config, bad):
    from busi_jax import data

    tiny_config.data.cv_fold = bad
    with pytest.raises(data.DataConfigError, match=r"data.cv_fold must be an integer in \[0, 5\)"):
        data.load_run_split(tiny_config.data, "train")


def test_without_cv_fold_runs_read_their_splits(tiny_config):
    from busi_jax import data

    cfg = tiny_config.data
    got = data.load_run_split(cfg, "eval")["file_name"]
    assert list(got) == list(data.load_split(cfg, cfg.eval_split)["file_name"])
