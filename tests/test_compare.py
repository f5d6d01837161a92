"""busi_jax.compare: paired differences, their intervals, and each bad input."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from busi_jax import compare

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write_run(folder, rows, split="test", lesion_column=True):
    """A fake evaluated workdir: rows of (file, class, dice, iou)."""
    path = folder / "eval" / f"{split}_per_scan.csv"
    path.parent.mkdir(parents=True)
    header = ["file", "class"] + (["lesion"] if lesion_column else []) + ["dice", "iou", "hd95"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for name, cls, dice, iou in rows:
            lesion = [int(cls != "normal")] if lesion_column else []
            w.writerow([name, cls, *lesion, f"{dice:.6f}", f"{iou:.6f}", ""])
    return folder


def _rows(dice, classes=None):
    classes = classes or ["benign"] * len(dice)
    return [
        (f"{c}/{c} ({i}).png", c, d, d / (2 - d)) for i, (c, d) in enumerate(zip(classes, dice))
    ]


def test_a_constant_shift_is_measured_exactly(tmp_path):
    base = np.linspace(0.2, 0.8, 20)
    a = _write_run(tmp_path / "a", _rows(base))
    b = _write_run(tmp_path / "b", _rows(base + 0.1))
    report = compare.compare([a], [b], n_boot=200)
    d = report["lesion_dice"]["difference"]
    assert d["mean"] == pytest.approx(0.1, abs=1e-6)
    assert d["ci95"] == pytest.approx([0.1, 0.1], abs=1e-6)  # Paired: scan difficulty cancels.
    assert report["lesion_dice"]["b_higher"] == [20] and report["lesion_dice"]["b_lower"] == [0]
    assert report["n_scans"] == 20 and report["n_lesion_scans"] == 20


def test_pooled_difference_averages_pairs_and_per_pair_intervals_differ(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, 40)
    runs_a, runs_b = [], []
    for p, shift in enumerate((0.0, 0.04)):
        runs_a.append(_write_run(tmp_path / f"a{p}", _rows(base)))
        noisy = np.clip(base + shift + rng.normal(0, 0.05, 40), 0, 1)
        runs_b.append(_write_run(tmp_path / f"b{p}", _rows(noisy)))
    report = compare.compare(runs_a, runs_b, n_boot=500)
    m = report["lesion_dice"]
    per_pair = [pp["mean"] for pp in m["difference"]["per_pair"]]
    assert m["difference"]["mean"] == pytest.approx(np.mean(per_pair), abs=1e-5)
    assert per_pair[1] - per_pair[0] == pytest.approx(0.04, abs=0.04)
    lo, hi = m["difference"]["ci95"]
    assert lo < m["difference"]["mean"] < hi
    for pp in m["difference"]["per_pair"]:
        assert pp["ci95"][0] < pp["mean"] < pp["ci95"][1]
    assert all(h + lo_ + lv == 40 for h, lo_, lv in zip(m["b_higher"], m["b_lower"], m["level"]))


def test_normal_scans_count_only_in_dice_all(tmp_path):
    classes = ["benign", "malignant", "normal", "normal"]
    a = _write_run(tmp_path / "a", _rows([0.5, 0.5, 1.0, 1.0], classes))
    b = _write_run(tmp_path / "b", _rows([0.7, 0.7, 0.0, 1.0], classes))
    report = compare.compare([a], [b], n_boot=50)
    assert report["n_lesion_scans"] == 2
    assert report["lesion_dice"]["difference"]["mean"] == pytest.approx(0.2, abs=1e-6)
    assert report["dice_all"]["difference"]["mean"] == pytest.approx((0.4 - 1.0) / 4, abs=1e-6)
    assert report["lesion_rule"] == "the CSV's lesion column"


def test_old_csv_without_lesion_column_uses_the_class(tmp_path):
    classes = ["benign", "normal"]
    a = _write_run(tmp_path / "a", _rows([0.5, 1.0], classes), lesion_column=False)
    b = _write_run(tmp_path / "b", _rows([0.6, 1.0], classes), lesion_column=False)
    report = compare.compare([a], [b], n_boot=20)
    assert report["n_lesion_scans"] == 1 and report["lesion_rule"] == "class is not normal"


def test_a_csv_path_and_row_order_do_not_matter(tmp_path):
    rows = _rows([0.1, 0.5, 0.9])
    a = _write_run(tmp_path / "a", rows)
    b = _write_run(tmp_path / "b", rows[::-1])
    report = compare.compare([a / "eval" / "test_per_scan.csv"], [b], n_boot=20)
    assert report["lesion_dice"]["difference"]["mean"] == 0.0
    assert report["lesion_dice"]["level"] == [3]


def test_the_split_picks_the_csv(tmp_path):
    a = _write_run(tmp_path / "a", _rows([0.5, 0.6]), split="validation")
    with pytest.raises(compare.CompareError, match="evaluate --workdir=.* --split=test"):
        compare.compare([a], [a])
    assert compare.compare([a], [a], split="validation", n_boot=10)["n_scans"] == 2


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: p.write_text("file,class,dice\nx.png,benign,0.5\n"), r"missing column.*'iou'"),
        (lambda p: p.write_text("file,class,dice,iou\n"), "no scans"),
        (
            lambda p: p.write_text("file,class,dice,iou\nx.png,benign,0.5,0.3\nx.png,benign,1,1\n"),
            "line 3: 'x.png' appears twice",
        ),
        (
            lambda p: p.write_text("file,class,dice,iou\nx.png,benign,oops,0.3\n"),
            "line 2: dice 'oops' is not a number",
        ),
        (
            lambda p: p.write_text("file,class,dice,iou\nx.png,benign,0.5,nan\n"),
            "line 2: iou 'nan' is not a number",
        ),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"), "not a readable CSV"),
    ],
)
def test_bad_csvs_name_the_file_and_the_problem(tmp_path, mutate, match):
    a = _write_run(tmp_path / "a", _rows([0.5]))
    csv_path = a / "eval" / "test_per_scan.csv"
    mutate(csv_path)
    with pytest.raises(compare.CompareError, match=match) as e:
        compare.compare([a], [a])
    assert str(csv_path) in str(e.value)


def test_runs_on_other_scans_or_unpaired_lists_are_refused(tmp_path):
    a = _write_run(tmp_path / "a", _rows([0.5, 0.6]))
    b = _write_run(tmp_path / "b", _rows([0.5, 0.6, 0.7]))
    with pytest.raises(compare.CompareError, match=r"different scans \('benign/benign \(2\).png'"):
        compare.compare([a], [b])
    with pytest.raises(compare.CompareError, match="--a has 2 run.*--b 1"):
        compare.compare([a, a], [a])
    with pytest.raises(compare.CompareError, match="at least one run"):
        compare.compare([], [a])
    with pytest.raises(compare.CompareError, match="no per-scan CSV"):
        compare.compare([tmp_path / "nowhere"], [a])
    rows = _rows([0.5, 0.6])
    c = _write_run(tmp_path / "c", [(rows[0][0], "normal", 1.0, 1.0), rows[1]])
    d = _write_run(tmp_path / "d", _rows([0.5, 0.6]))
    with pytest.raises(compare.CompareError, match="disagree on whether"):
        compare.compare([c], [d])


def test_command_line_prints_the_table_and_writes_json(tmp_path):
    a = _write_run(tmp_path / "a", _rows([0.4, 0.5, 0.6]))
    b = _write_run(tmp_path / "b", _rows([0.5, 0.6, 0.7]))
    out = tmp_path / "cmp.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "busi_jax.compare",
            f"--a={a}",
            f"--b={b}",
            "--n_boot=50",
            f"--output={out}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "lesion_dice: B - A = +0.1000 [+0.1000, +0.1000]" in proc.stdout
    assert json.loads(out.read_text())["lesion_dice"]["b_higher"] == [3]
    bad = subprocess.run(
        [sys.executable, "-m", "busi_jax.compare", f"--a={a}", f"--b={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,  # It must fail: the exit status is asserted below.
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr


def _write_cls_run(folder, classes, probs, split="test"):
    """A fake evaluated classifier workdir: per-scan probabilities (none on normal scans)."""
    path = folder / "eval" / f"{split}_per_scan.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "lesion", "dice", "iou", "malignancy_probability"])
        for i, (c, p) in enumerate(zip(classes, probs)):
            prob = "" if p is None else f"{p:.6f}"
            w.writerow([f"{c}/{c} ({i}).png", c, int(c != "normal"), "0.5", "0.3", prob])
    return folder


def test_auc_difference_known_answer_and_identical_runs(tmp_path):
    rng = np.random.default_rng(2)
    classes = ["benign"] * 12 + ["malignant"] * 8 + ["normal"] * 3
    y = np.array([c == "malignant" for c in classes[:20]])
    noisy = list(np.clip(y * 0.3 + rng.random(20) * 0.7, 0, 1)) + [None] * 3
    perfect = list(np.where(y, 0.9, 0.1)) + [None] * 3
    a = _write_cls_run(tmp_path / "a", classes, noisy)
    b = _write_cls_run(tmp_path / "b", classes, perfect)
    auc = compare.compare([a], [b], n_boot=300)["auc"]
    from busi_jax import metrics

    expected_a = metrics.roc_auc(np.array(noisy[:20], float), y)
    assert auc["n_scans"] == 20 and auc["n_malignant"] == 8
    assert auc["a_mean"] == pytest.approx([expected_a]) and auc["b_mean"] == [1.0]
    d = auc["difference"]
    assert d["mean"] == pytest.approx(1.0 - expected_a)
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert d["ci95"][0] >= 0.0  # B is perfect on every resample.
    same = compare.compare([a, b], [a, b], n_boot=100)["auc"]["difference"]
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert "auc (benign vs malignant, 20 scans): B - A" in compare.format_report(
        compare.compare([a], [b], n_boot=50)
    )


def test_auc_needs_every_run_to_have_probabilities(tmp_path):
    classes = ["benign", "malignant"]
    a = _write_cls_run(tmp_path / "a", classes, [0.2, 0.8])
    b = _write_run(
        tmp_path / "b", [(f"{c}/{c} ({i}).png", c, 0.5, 0.3) for i, c in enumerate(classes)]
    )
    report = compare.compare([a], [b], n_boot=20)
    assert "no malignancy_probability column" in report["auc"]["not_compared"]
    assert "auc: not compared" in compare.format_report(report)
    c = _write_cls_run(tmp_path / "c", classes, [0.3, None])
    with pytest.raises(compare.CompareError, match="line 3: malignancy_probability '' is not"):
        compare.compare([a], [c])
