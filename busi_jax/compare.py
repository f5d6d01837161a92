"""Paired comparison of two segmentation recipes on the same scans.

    python -m busi_jax.compare --a=WD_A1[,WD_A2,...] --b=WD_B1[,WD_B2,...]
        [--split=test] [--n_boot=2000] [--output=FILE.json]

Each entry is an evaluated workdir (its ``eval/<split>_per_scan.csv``, as
written by :mod:`busi_jax.evaluate`) or such a CSV itself. ``--a`` and
``--b`` list runs paired by position: the same seed of two recipes, say.

Why paired: on a test split of ~100 lesion scans, each model's lesion Dice has
a 95% interval ~0.1 wide, so two recipes' intervals nearly always overlap,
although most of that width is which scans happen to be hard, shared by both.
Resampling scans once for both runs (a paired bootstrap) measures the
difference itself. Seed-to-seed spread is a second source of noise that no
bootstrap over scans sees: the per-pair differences are listed so it shows.

The report, for ``lesion_dice`` and ``lesion_iou`` (scans whose true mask is
not empty) and ``dice_all`` (every scan, the empty-mask rule of
:mod:`busi_jax.evalmetrics`):

* per pair: the mean of A, of B, and of B - A with its 95% paired bootstrap
  interval, and on how many scans B is higher, lower or level;
* pooled: B - A averaged over pairs and scans, with the interval of the same
  bootstrap (scans resampled once for all pairs).

Where every CSV also holds ``malignancy_probability`` (an evaluation with a
classifier), ``auc`` (benign vs malignant) is compared the same way, the
bootstrap stratified by class as :mod:`busi_jax.evalmetrics` does for AUC.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from busi_jax import evalmetrics, metrics
from busi_jax import io as busi_io

METRICS = ("lesion_dice", "lesion_iou", "dice_all")
PROBABILITY = "malignancy_probability"
# The classes benign-vs-malignant AUC is scored on ("malignant" is positive).
CLASSES_SCORED = ("benign", "malignant")
# A scan is "level" when the two runs' scores differ by less than this.
TIE = 1e-6


class CompareError(ValueError):
    """A run that cannot be compared (missing or malformed CSV, other scans)."""


@dataclasses.dataclass(frozen=True)
class PerScan:
    """One run's per-scan scores, rows sorted by file name.

    Attributes:
      source: the CSV read.
      files: ``[N]`` scan files (relative to the data folder).
      lesion: ``[N]`` bool, the true mask is not empty.
      dice: ``[N]`` Dice per scan (empty-mask rule on lesion-free scans).
      iou: ``[N]`` IoU per scan.
      lesion_rule: how ``lesion`` was read (a column, or the class folder).
      classes: ``[N]`` class folder names.
      probability: ``[N]`` malignancy probability (NaN where not given, as
        on normal scans), or None when the CSV has no such column.
    """

    source: str
    files: tuple[str, ...]
    lesion: np.ndarray
    dice: np.ndarray
    iou: np.ndarray
    lesion_rule: str
    classes: tuple[str, ...] = ()
    probability: np.ndarray | None = None


def per_scan_csv(run: str | pathlib.Path, split: str = "test") -> pathlib.Path:
    """The per-scan CSV of ``run``: the path itself if it is a CSV, else its evaluation's."""
    path = pathlib.Path(run)
    if path.suffix == ".csv":
        return path
    return path / "eval" / f"{split}_per_scan.csv"


def _float(value: str, path: pathlib.Path, line: int, column: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise CompareError(f"{path}: line {line}: {column} {value!r} is not a number")
    return number


def load_per_scan(run: str | pathlib.Path, split: str = "test") -> PerScan:
    """Reads a per-scan CSV (``file``, ``class``, ``dice``, ``iou``; ``lesion`` if present).

    CSVs written before the ``lesion`` column existed take the lesion scans to
    be those outside the ``normal`` class, which is what BUSI's layout means.

    Raises:
      CompareError: the CSV is missing, lacks a column, repeats a file, holds
        no rows, is not text, or has a value that is not a finite number.
    """
    path = per_scan_csv(run, split)
    if not path.is_file():
        hint = (
            ""
            if pathlib.Path(run).suffix == ".csv"
            else f"; run `python -m busi_jax.evaluate --workdir={run} --split={split}` first"
        )
        raise CompareError(f"{path}: no per-scan CSV{hint}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise CompareError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in ("file", "class", "dice", "iou") if c not in header]
    if missing:
        raise CompareError(
            f"{path}: missing column(s) {missing} (a segmenter's evaluation has them)"
        )
    if not rows:
        raise CompareError(f"{path}: no scans")
    has_lesion_column = "lesion" in header
    has_probability = PROBABILITY in header
    records = {}
    for line, row in enumerate(rows, start=2):
        name = row["file"]
        if name in records:
            raise CompareError(f"{path}: line {line}: {name!r} appears twice")
        lesion = (
            _float(row["lesion"], path, line, "lesion") > 0
            if has_lesion_column
            else row["class"] != "normal"
        )
        # Normal scans get no malignancy probability; a scored class must have one.
        prob = row.get(PROBABILITY, "")
        scored = row["class"] in CLASSES_SCORED
        records[name] = (
            row["class"],
            lesion,
            _float(row["dice"], path, line, "dice"),
            _float(row["iou"], path, line, "iou"),
            _float(prob, path, line, PROBABILITY) if has_probability and scored else math.nan,
        )
    files = tuple(sorted(records))
    values = np.array([records[f][1:] for f in files], dtype=np.float64)
    return PerScan(
        source=str(path),
        files=files,
        lesion=values[:, 0] > 0,
        dice=values[:, 1],
        iou=values[:, 2],
        lesion_rule="the CSV's lesion column" if has_lesion_column else "class is not normal",
        classes=tuple(records[f][0] for f in files),
        probability=values[:, 3] if has_probability else None,
    )


def _check_same_scans(runs: Sequence[PerScan]) -> None:
    first = runs[0]
    for other in runs[1:]:
        if other.files != first.files:
            only_first = sorted(set(first.files) - set(other.files))
            only_other = sorted(set(other.files) - set(first.files))
            detail = (
                f"{only_first[0]!r} is in {first.source} only"
                if only_first
                else f"{only_other[0]!r} is in {other.source} only"
            )
            raise CompareError(
                f"{other.source} and {first.source} score different scans ({detail});"
                " compare evaluations of the same split"
            )
        if not np.array_equal(other.lesion, first.lesion):
            i = int(np.flatnonzero(other.lesion != first.lesion)[0])
            raise CompareError(
                f"{other.source} and {first.source} disagree on whether {first.files[i]!r}"
                " has a lesion"
            )


def _metric_rows(run: PerScan, metric: str) -> np.ndarray:
    if metric == "lesion_dice":
        return run.dice[run.lesion]
    if metric == "lesion_iou":
        return run.iou[run.lesion]
    if metric == "dice_all":
        return run.dice
    raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of ``b - a`` over pairs and scans, with a paired bootstrap interval.

    Args:
      a, b: ``[P, N]`` scores of P run pairs on the same N scans (row p of
        ``a`` pairs with row p of ``b``).
      n_boot: bootstrap resamples; scans are resampled with replacement, the
        same resample for every run, so scan difficulty cancels.
      seed: resampling seed.

    Returns:
      ``{"mean": ..., "ci95": [lo, hi]}`` for the pooled difference, plus
      ``"per_pair"``: a list of P such dicts for each pair's difference.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must both be [P, N]; got {a.shape} and {b.shape}")
    diff = b - a  # [P, N]
    pooled = evalmetrics.bootstrap_ci(
        diff.T, lambda x: x.mean(axis=(-2, -1)), n_boot=n_boot, seed=seed
    )
    per_pair = [evalmetrics.bootstrap_ci(d, n_boot=n_boot, seed=seed) for d in diff]
    return {**pooled, "per_pair": per_pair}


def _aucs(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """:func:`busi_jax.metrics.roc_auc` of each row: ``[..., N]`` scores and labels -> ``[...]``."""
    positive = np.broadcast_to(positive, scores.shape)
    flat = [
        metrics.roc_auc(s, y)
        for s, y in zip(
            scores.reshape(-1, scores.shape[-1]), positive.reshape(-1, scores.shape[-1])
        )
    ]
    return np.array(flat, np.float64).reshape(scores.shape[:-1])


def paired_auc_difference(
    a: np.ndarray, b: np.ndarray, malignant: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict:
    """AUC of B minus AUC of A, per pair and averaged, with a paired bootstrap.

    Args:
      a, b: ``[P, N]`` malignancy probabilities of P run pairs on N lesion scans.
      malignant: ``[N]`` bool labels; both classes must be present.
      n_boot: resamples, stratified by label (class counts fixed, so AUC is
        always defined) and shared by every run.
      seed: resampling seed.

    Returns:
      ``{"mean", "ci95", "per_pair"}`` as :func:`paired_difference`.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    malignant = np.asarray(malignant, bool)
    idx = evalmetrics.bootstrap_indices(len(malignant), n_boot, seed, strata=malignant)
    labels = malignant[idx]  # [n_boot, N]
    diff_point = _aucs(b, malignant) - _aucs(a, malignant)  # [P]
    diff_boot = _aucs(b[:, idx], labels) - _aucs(a[:, idx], labels)

    def summary(point, boot):
        lo, hi = np.percentile(boot, [2.5, 97.5])
        return {"mean": float(point), "ci95": [float(lo), float(hi)]}

    per_pair = [summary(p, d) for p, d in zip(diff_point, diff_boot)]
    return {**summary(diff_point.mean(), diff_boot.mean(axis=0)), "per_pair": per_pair}


def _auc_report(a: Sequence[PerScan], b: Sequence[PerScan], n_boot: int, seed: int) -> dict:
    missing = [r.source for r in (*a, *b) if r.probability is None]
    if missing:
        return {"not_compared": f"no {PROBABILITY} column in {missing[0]}"}
    first = a[0]
    rows = np.array([c in CLASSES_SCORED for c in first.classes])
    malignant = np.array([c == "malignant" for c in first.classes])[rows]
    if malignant.all() or not malignant.any():
        return {"not_compared": "benign and malignant scans are both needed"}
    for run in (*a, *b):
        if run.classes != first.classes:
            i = next(i for i, (x, y) in enumerate(zip(run.classes, first.classes)) if x != y)
            raise CompareError(
                f"{run.source} and {first.source} disagree on the class of {first.files[i]!r}"
            )
    pa = np.stack([r.probability[rows] for r in a])
    pb = np.stack([r.probability[rows] for r in b])
    return {
        "n_scans": int(rows.sum()),
        "n_malignant": int(malignant.sum()),
        "bootstrap": f"{evalmetrics.CLS_BOOTSTRAP}, the same resamples for every run (paired)",
        "a_mean": _aucs(pa, malignant).tolist(),
        "b_mean": _aucs(pb, malignant).tolist(),
        "difference": paired_auc_difference(pa, pb, malignant, n_boot=n_boot, seed=seed),
    }


def compare(
    a_runs: Sequence[str | pathlib.Path],
    b_runs: Sequence[str | pathlib.Path],
    split: str = "test",
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Compares recipe B against recipe A run pair by run pair (see the module doc).

    Args:
      a_runs, b_runs: equally many workdirs or per-scan CSVs; ``a_runs[i]``
        pairs with ``b_runs[i]``.
      split: which evaluation of a workdir to read.
      n_boot: bootstrap resamples.
      seed: resampling seed.

    Returns:
      A JSON-able dict: ``runs`` (the CSVs read), ``n_scans``,
      ``n_lesion_scans``, ``lesion_rule``, and per metric: ``a_mean`` and
      ``b_mean`` per pair, ``difference`` (pooled B - A with ``ci95`` and
      ``per_pair`` intervals), ``b_higher`` / ``b_lower`` / ``level`` scan
      counts per pair.

    Raises:
      CompareError: unequal or empty run lists, a bad CSV, or runs that score
        different scans.
    """
    if not a_runs or not b_runs:
        raise CompareError("give at least one run for each of --a and --b")
    if len(a_runs) != len(b_runs):
        raise CompareError(
            f"--a has {len(a_runs)} run(s) and --b {len(b_runs)}; runs are paired by position"
        )
    if n_boot < 1:
        raise CompareError(f"n_boot must be >= 1, got {n_boot}")
    a = [load_per_scan(r, split) for r in a_runs]
    b = [load_per_scan(r, split) for r in b_runs]
    _check_same_scans(a + b)
    report: dict = {
        "runs": {"a": [r.source for r in a], "b": [r.source for r in b]},
        "n_scans": len(a[0].files),
        "n_lesion_scans": int(a[0].lesion.sum()),
        "lesion_rule": a[0].lesion_rule,
        "bootstrap": f"{evalmetrics.SEG_BOOTSTRAP}, the same resamples for every run (paired)",
        "n_boot": n_boot,
    }
    for metric in METRICS:
        xa = np.stack([_metric_rows(r, metric) for r in a])
        xb = np.stack([_metric_rows(r, metric) for r in b])
        if xa.shape[1] == 0:
            continue
        diff = xb - xa
        report[metric] = {
            "a_mean": xa.mean(axis=1).tolist(),
            "b_mean": xb.mean(axis=1).tolist(),
            "difference": paired_difference(xa, xb, n_boot=n_boot, seed=seed),
            "b_higher": (diff > TIE).sum(axis=1).tolist(),
            "b_lower": (diff < -TIE).sum(axis=1).tolist(),
            "level": (np.abs(diff) <= TIE).sum(axis=1).tolist(),
        }
    report["auc"] = _auc_report(a, b, n_boot, seed)
    return evalmetrics.to_jsonable(report)


def _interval(x: Mapping) -> str:
    return f"{x['mean']:+.4f} [{x['ci95'][0]:+.4f}, {x['ci95'][1]:+.4f}]"


def _pair_lines(m: Mapping) -> list[str]:
    """One line per run pair; with the scan counts where the metric has them."""
    lines = []
    for i, pair in enumerate(m["difference"]["per_pair"]):
        line = (
            f"  pair {i}: A {m['a_mean'][i]:.4f}  B {m['b_mean'][i]:.4f}  B - A {_interval(pair)}"
        )
        if "b_higher" in m:
            line += (
                f"  B higher on {m['b_higher'][i]}, lower on {m['b_lower'][i]},"
                f" level on {m['level'][i]}"
            )
        lines.append(line)
    return lines


def format_report(report: Mapping) -> str:
    """A plain-text table of :func:`compare`'s report."""
    lines = [
        (
            f"{report['n_scans']} scans, {report['n_lesion_scans']} with a lesion"
            f" ({report['lesion_rule']}); {report['bootstrap']}, {report['n_boot']} resamples"
        )
    ]
    for metric in METRICS:
        if metric in report:
            m = report[metric]
            lines.append(
                f"{metric}: B - A = {_interval(m['difference'])} over {len(m['a_mean'])} pair(s)"
            )
            lines += _pair_lines(m)
    auc = report.get("auc", {})
    if "difference" in auc:
        lines.append(
            f"auc (benign vs malignant, {auc['n_scans']} scans): B - A ="
            f" {_interval(auc['difference'])}; {auc['bootstrap']}"
        )
        lines += _pair_lines(auc)
    elif auc:
        lines.append(f"auc: not compared ({auc['not_compared']})")
    return "\n".join(lines)


def main(argv=None) -> None:
    from absl import app, flags

    flags.DEFINE_list("a", [], "Runs of recipe A: evaluated workdirs or per-scan CSVs.")
    flags.DEFINE_list("b", [], "Runs of recipe B, paired with --a by position.")
    flags.DEFINE_string("split", "test", "Which evaluation of a workdir to read.")
    flags.DEFINE_integer("n_boot", 2000, "Bootstrap resamples.")
    flags.DEFINE_string("output", None, "Also write the report as JSON here.")
    FLAGS = flags.FLAGS

    def run(_):
        from busi_jax import cli
        from busi_jax import compare as lib  # Not __main__'s copy: cli catches lib.CompareError.

        report = cli.run_command(
            lib.compare, FLAGS.a, FLAGS.b, split=FLAGS.split, n_boot=FLAGS.n_boot
        )
        if FLAGS.output:
            busi_io.atomic_write_json(FLAGS.output, report)
        print(format_report(report))

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
