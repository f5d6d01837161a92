"""The curation report: what the builder found in a BUSI folder, for a person to read.

Written beside the built dataset as ``curation_report.md`` and
``curation_report.json``: class counts, scans whose mask was merged from
several files, near-duplicate groups (with their similarity), groups whose
members carry different labels, and the resulting split and fold sizes.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np


def build_report(
    *,
    file_names: Sequence[str],
    labels: Sequence[str],
    num_masks: Sequence[int],
    groups: Sequence[int],
    splits: Sequence[str],
    folds: Sequence[int],
    similarity: np.ndarray,
    settings: dict,
) -> dict:
    """Collects the report as a JSON-ready dict."""
    members: dict[int, list[int]] = collections.defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    dup_groups = []
    for g, idx in sorted(members.items()):
        if len(idx) < 2:
            continue
        sub = similarity[np.ix_(idx, idx)]
        off = sub[~np.eye(len(idx), dtype=bool)]
        dup_groups.append(
            {
                "group": g,
                "files": [file_names[i] for i in idx],
                "labels": sorted({labels[i] for i in idx}),
                "split": splits[idx[0]],
                "min_similarity": round(float(off.min()), 3),
                "mean_similarity": round(float(off.mean()), 3),
            }
        )
    conflicts = [d for d in dup_groups if len(d["labels"]) > 1]
    in_groups = sum(len(d["files"]) for d in dup_groups)
    split_counts = {
        s: dict(sorted(collections.Counter(l for l, sp in zip(labels, splits) if sp == s).items()))
        for s in ("train", "validation", "test")
    }
    fold_counts = {
        int(f): dict(
            sorted(collections.Counter(l for l, ff in zip(labels, folds) if ff == f).items())
        )
        for f in sorted(set(folds))
        if f >= 0
    }
    return {
        "settings": settings,
        "num_scans": len(file_names),
        "class_counts": dict(sorted(collections.Counter(labels).items())),
        "multi_mask_scans": [
            {"file": f, "num_masks": int(n)} for f, n in zip(file_names, num_masks) if n > 1
        ],
        "num_groups": len(members),
        "num_duplicate_groups": len(dup_groups),
        "scans_in_duplicate_groups": in_groups,
        "largest_group": max((len(d["files"]) for d in dup_groups), default=1),
        "duplicate_groups": dup_groups,
        "cross_label_groups": conflicts,
        "split_counts": split_counts,
        "fold_counts": fold_counts,
    }


def to_markdown(report: dict) -> str:
    """Renders the report as Markdown."""
    n = report["num_scans"]
    lines = [
        "# BUSI curation report",
        "",
        "Written by the `busi` TFDS builder. Data: W. Al-Dhabyani et al., Dataset of",
        "breast ultrasound images, Data in Brief 28 (2020) 104863 (CC BY 4.0).",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- `{k}`: {v}" for k, v in report["settings"].items()]
    lines += [
        "",
        "## Scans",
        "",
        f"{n} scans: " + ", ".join(f"{c} {k}" for k, c in report["class_counts"].items()),
    ]
    lines += [
        "",
        f"Scans whose mask was merged from several files: {len(report['multi_mask_scans'])}",
        "",
    ]
    lines += [f"- `{m['file']}`: {m['num_masks']} mask files" for m in report["multi_mask_scans"]]
    share = report["scans_in_duplicate_groups"] / max(n, 1)
    lines += [
        "",
        "## Near-duplicate groups",
        "",
        f"{report['num_duplicate_groups']} groups of two or more scans hold"
        f" {report['scans_in_duplicate_groups']} scans ({share:.0%}); the largest holds"
        f" {report['largest_group']}. Each group lies wholly in one split and one fold.",
        "",
        f"Groups whose scans carry different labels: {len(report['cross_label_groups'])}",
        "",
    ]
    for d in report["cross_label_groups"]:
        lines.append(
            f"- group {d['group']} ({d['split']}): " + ", ".join(f"`{f}`" for f in d["files"])
        )
    lines += [
        "",
        "| group | split | scans | min NCC | mean NCC | files |",
        "|---|---|---|---|---|---|",
    ]
    for d in report["duplicate_groups"]:
        lines.append(
            f"| {d['group']} | {d['split']} | {len(d['files'])} | {d['min_similarity']:.2f} |"
            f" {d['mean_similarity']:.2f} | " + ", ".join(f"`{f}`" for f in d["files"]) + " |"
        )
    lines += ["", "## Splits", "", "| split | " + " | ".join(report["class_counts"]) + " | total |"]
    lines.append("|---" * (len(report["class_counts"]) + 2) + "|")
    for s, c in report["split_counts"].items():
        lines.append(
            f"| {s} | "
            + " | ".join(str(c.get(k, 0)) for k in report["class_counts"])
            + f" | {sum(c.values())} |"
        )
    lines += ["", "| fold | " + " | ".join(report["class_counts"]) + " | total |"]
    lines.append("|---" * (len(report["class_counts"]) + 2) + "|")
    for f, c in report["fold_counts"].items():
        lines.append(
            f"| {f} | "
            + " | ".join(str(c.get(k, 0)) for k in report["class_counts"])
            + f" | {sum(c.values())} |"
        )
    return "\n".join(lines) + "\n"
