"""The paper's Table I, reproduced from real runs in one command.

    python launch.py --config=configs/table1.py --workdir=workdirs/table1

trains every row on the same data and group-aware split (U-Net, U-Net++,
SUNet, the CNN classifier on ground-truth masks as an ablation, and the
U-Net++ + CNN pipeline, whose classifier is trained and scored on the
U-Net++'s predicted masks), scores each once on the ``test`` split with
:func:`busi_jax.evaluate.evaluate` (post-processing and temperature chosen on
validation), and writes the table beside the paper's numbers:

* ``WORKDIR/table1.json``: every row's metrics with 95% bootstrap intervals;
* ``WORKDIR/table1.md``: the Markdown section;
* the same section inside ``config.results_md`` (``docs/RESULTS.md``),
  between ``<!-- table1:begin -->`` and ``<!-- table1:end -->``; the rest of
  that file is left as it is.

Rerunning resumes: finished stages are not retrained (each stage's workdir
resumes like any training run), so an interrupted run picks up where it was.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import sys

import ml_collections

from busi_jax import evaluate
from busi_jax import io as busi_io
from busi_jax import pipeline
from busi_jax import train

# The paper's Table I (accuracy, precision, recall, F1), quoted from its text
# (../shared/paper/): random splits of BUSI, no control of near-duplicates.
PAPER_TABLE_I = {
    "unet": ("U-Net", ("0.9686", "0.89", "0.88", "0.89")),
    "unetpp": ("U-Net++", ("0.9907", "0.97", "0.96", "0.97")),
    "classifier_gt": ("CNN Classifier", ("0.9103", "0.90", "0.91", "0.91")),
    "pipeline": ("U-Net++ + CNN", ("0.9604", "0.88", "0.84", "0.86")),
}
SEGMENTERS = ("unet", "unetpp", "sunet")
ROW_NAMES = {
    "unet": "U-Net",
    "unetpp": "U-Net++",
    "sunet": "SUNet (not in the paper's Table I)",
    "classifier_gt": "CNN classifier, ground-truth masks (ablation)",
    "pipeline": "U-Net++ + CNN (predicted masks)",
}
BEGIN, END = "<!-- table1:begin -->", "<!-- table1:end -->"


def _stage(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A stage's config with the shared data section, so every row sees one split."""
    stage = ml_collections.ConfigDict(config[name].to_dict())
    stage.data = ml_collections.ConfigDict(config.data.to_dict())
    return stage


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> dict:
    """Trains and evaluates every row; writes the table. See the module docstring.

    Returns:
      ``{row: {"config", "workdir", "report"}}``, also in ``WORKDIR/table1.json``.
    """
    workdir = pathlib.Path(workdir).expanduser().absolute()
    dirs = {name: workdir / name for name in (*SEGMENTERS, "classifier_gt", "pipeline")}
    for name in SEGMENTERS:
        train.train_and_evaluate(_stage(config, name), dirs[name])

    gt = _stage(config, "classifier")
    gt.classifier.mask_source = "ground_truth"
    train.train_and_evaluate(gt, dirs["classifier_gt"])

    pipe = ml_collections.ConfigDict(
        {
            "task": "pipeline",
            "segmenter": _stage(config, "unetpp").to_dict(),
            "classifier_stage": _stage(config, "classifier").to_dict(),
            "segmenter_workdir": os.fspath(dirs["unetpp"]),
        }
    )
    pipeline.run(pipe, dirs["pipeline"])

    rows = {}
    for name, d in dirs.items():
        report = evaluate.evaluate(
            d, split="test", n_boot=int(config.n_boot), plots_enabled=bool(config.plots)
        )
        rows[name] = {"workdir": os.fspath(d), "report": report}
    command = " ".join(shlex.quote(a) for a in sys.argv) if sys.argv else "launch.py"
    if command.split(" ")[0].endswith(".py"):
        command = "python " + command
    if config.data.source == "busi" and not config.data.manual_dir:
        command = "BUSI_MANUAL_DIR=... " + command
    section = markdown(rows, command, data=_describe_data(config))
    busi_io.atomic_write_json(workdir / "table1.json", rows)
    busi_io.atomic_write_text(workdir / "table1.md", section)
    if config.results_md:
        write_section(config.results_md, section)
    return rows


def _describe_data(config) -> str:
    if config.data.source == "synthetic":
        return f"synthetic phantoms (seed {config.data.synthetic_seed}), not BUSI"
    manual = config.data.manual_dir or os.environ.get("BUSI_MANUAL_DIR", "$BUSI_MANUAL_DIR")
    return (
        f"BUSI (Al-Dhabyani et al., Data in Brief 28, 2020) from {manual}, "
        f"busi/{config.data.image_size}"
    )


def _cell(metric: dict | None) -> str:
    """``0.702 [0.641, 0.754]`` from ``{"mean", "ci95"}``; an em dash when absent."""
    if not metric or metric.get("mean") is None:
        return "—"
    lo, hi = metric.get("ci95") or (None, None)
    if lo is None or hi is None:
        return f"{metric['mean']:.3f}"
    return f"{metric['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def table_rows(rows: dict) -> list[list[str]]:
    """One list of cells per row: paper's four numbers, then ours."""
    out = []
    for name in ("unet", "unetpp", "sunet", "classifier_gt", "pipeline"):
        rep = rows[name]["report"]
        paper = PAPER_TABLE_I.get(name, (None, None))[1]
        paper_cells = list(paper) if paper else ["—"] * 4
        seg, cls = rep.get("segmentation"), rep.get("classification")
        if name in SEGMENTERS:
            ours = [
                _cell(seg["pixel_accuracy"]) + " (pixel)",
                _cell(seg["pixel_precision"]),
                _cell(seg["pixel_recall"]),
                _cell(seg["pixel_f1"]),
                _cell(seg["lesion_dice"]),
                _cell(seg["lesion_iou"]),
                "—",
            ]
        else:
            lesion = name == "pipeline" and seg
            ours = [
                _cell(cls["accuracy"]),
                _cell(cls["precision"]),
                _cell(cls["recall"]),
                _cell(cls["f1"]),
                _cell(seg["lesion_dice"]) if lesion else "—",
                _cell(seg["lesion_iou"]) if lesion else "—",
                _cell(cls["auc"]),
            ]
        out.append([ROW_NAMES[name], *paper_cells, *ours])
    return out


def markdown(rows: dict, command: str, data: str) -> str:
    """The Table I section of RESULTS.md, with the command and data beside it."""
    head = (
        "| model | paper: acc. | prec. | recall | F1 | ours (test): acc. | prec. | recall "
        "| F1 | lesion Dice | lesion IoU | AUC |"
    )
    lines = [
        BEGIN,
        "### Table I, regenerated by one command",
        "",
        f"    {command}",
        "",
        f"Data: {data}. Every row trained on the group-aware `train` split, its",
        "checkpoint picked on `validation`, scored once on `test`; brackets are 95%",
        "percentile-bootstrap intervals over scans. Written by `busi_jax/table1.py`.",
        "",
        head,
        "|" + "---|" * 12,
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    pipe = rows["pipeline"]["report"].get("protocol", {})
    scans = pipe.get("scans_per_class", {})
    lines += [
        "",
        f"Test scans per class: {', '.join(f'{k} {v}' for k, v in scans.items())}.",
        "Segmenter rows: the paper's columns are pixel-level (background pixels",
        "dominate them); lesion Dice and IoU average over scans with a lesion. Classifier",
        "rows: benign vs malignant on lesion scans at threshold 0.5. The ablation row",
        "feeds ground-truth masks, which no deployed pipeline has; the pipeline row",
        "feeds the U-Net++'s predicted masks. The paper's splits were random, so",
        "near-duplicate scans could straddle its train and test sets; ours cannot.",
        END,
        "",
    ]
    return "\n".join(lines)


def write_section(path: str | os.PathLike[str], section: str) -> pathlib.Path:
    """Replaces the marked Table I section of ``path`` (appends it if absent), atomically."""
    path = pathlib.Path(path)
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: section, old, count=1)
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + section
    busi_io.atomic_write_text(path, new)
    return path
