"""Deterministic, class-stratified, group-aware splits and folds.

Whole near-duplicate groups are assigned, never single scans, so no group can
straddle two splits or two folds. Stratification: each group is filed under
its most common label (ties broken by label order), then within each label the
groups are dealt, largest first, to whichever split is furthest below its
target share of that label (so a small stratum still reaches every split).
The order among groups of one size comes from a seeded hash of their sorted
member names, so the result depends only on the file names, the groups and
the seed -- never on the file system's order.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

SPLITS = ("train", "validation", "test")


def _group_members(groups: Sequence[int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = collections.defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    return members


def _deal(
    group_list: list[int],
    sizes: dict[int, int],
    targets: np.ndarray,
    tiebreak: dict[int, str],
) -> dict[int, int]:
    """Deals groups to bins, largest first, to the bin furthest below target."""
    counts = np.zeros(len(targets))
    out = {}
    order = sorted(group_list, key=lambda g: (-sizes[g], tiebreak[g]))
    for g in order:
        # The bin whose fill is furthest below its target share takes the
        # group (ties go to the larger target), so even a small stratum puts
        # a group in every split before any split gets a second one; a bin
        # with a zero target never receives anything.
        with np.errstate(divide="ignore", invalid="ignore"):
            fill = np.where(targets > 0, counts / targets, np.inf)
        b = int(np.lexsort((-targets, fill))[0])
        out[g] = b
        counts[b] += sizes[g]
    return out


def _stratum(labels: Sequence[int], idx: list[int]) -> int:
    c = collections.Counter(labels[i] for i in idx)
    return min(c, key=lambda lab: (-c[lab], lab))


def assign(
    file_names: Sequence[str],
    labels: Sequence[int],
    groups: Sequence[int],
    *,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    num_folds: int = 5,
    seed: int = 0,
) -> tuple[list[str], list[int]]:
    """Assigns every scan a split and a cross-validation fold.

    Args:
        file_names: unique names, used for the seeded tie-break.
        labels: integer class of each scan.
        groups: near-duplicate group id of each scan.
        validation_fraction: target share of scans in ``validation``.
        test_fraction: target share of scans in ``test``.
        num_folds: folds 0..k-1 partition ``train`` + ``validation``; test scans
            get fold -1.
        seed: changes which groups land where, not the proportions.

    Returns:
        ``(split names, folds)``, one entry per scan.

    Raises:
        ValueError: fractions outside [0, 1) or summing to 1 or more, or fewer
            than 2 folds.
    """
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError(
            f"split fractions must lie in [0, 1): validation={validation_fraction},"
            f" test={test_fraction}"
        )
    if validation_fraction + test_fraction >= 1:
        raise ValueError("validation_fraction + test_fraction must be below 1")
    if num_folds < 2:
        raise ValueError(f"num_folds must be at least 2, got {num_folds}")
    if not len(file_names) == len(labels) == len(groups):
        raise ValueError("file_names, labels and groups differ in length")

    members = _group_members(groups)
    sizes = {g: len(m) for g, m in members.items()}
    tiebreak = {
        g: hashlib.sha256(
            (str(seed) + "\0" + "\0".join(sorted(file_names[i] for i in m))).encode()
        ).hexdigest()
        for g, m in members.items()
    }
    by_stratum: dict[int, list[int]] = collections.defaultdict(list)
    for g, m in members.items():
        by_stratum[_stratum(labels, m)].append(g)

    split_targets = np.array(
        [1 - validation_fraction - test_fraction, validation_fraction, test_fraction]
    )
    split_of_group: dict[int, int] = {}
    for stratum in sorted(by_stratum):
        split_of_group.update(_deal(by_stratum[stratum], sizes, split_targets, tiebreak))

    fold_of_group: dict[int, int] = {}
    fold_targets = np.ones(num_folds)
    for stratum in sorted(by_stratum):
        dev = [g for g in by_stratum[stratum] if SPLITS[split_of_group[g]] != "test"]
        fold_of_group.update(_deal(dev, sizes, fold_targets, tiebreak))

    split_names = [SPLITS[split_of_group[int(g)]] for g in groups]
    folds = [fold_of_group.get(int(g), -1) for g in groups]
    return split_names, folds
