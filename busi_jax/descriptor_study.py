"""How the BI-RADS descriptors relate to benign vs malignant on a BUSI build, and
whether they add to the classifier; and how well they agree with the synthetic
phantoms' truth.

    python -m busi_jax.descriptor_study --workdir=PIPELINE_DIR --manual_dir=DIR --output=FILE.json
    python -m busi_jax.descriptor_study --phantom_seeds=2,5,6 --output=FILE.json
    python -m busi_jax.descriptor_study --floor_dir=BUSI_FOLDER --output=FILE.json

Descriptors are measured on the original-size scans (read from the BUSI
folder) with the segmenter's predicted mask resized back, as predict does.
Two questions:

1. Association: for each categorical descriptor, the share of malignant
   lesions per category, on every benign/malignant scan of the dataset.
2. Added value, without leakage: a logistic regression on the numeric
   descriptors is fitted on the ``train`` split and scored on ``test``; a
   second one adds the classifier's logit. Both are fitted on train only;
   the test split is touched once.
3. Stacking: the descriptor score, the classifier's logit (each
   classifier's, given several) and (with ``--multitask_workdir``) a
   multitask network's logit, combined by a
   logistic regression fitted on the ``validation`` split, on which no
   weights were trained (it did pick checkpoints and post-processing).

``--classifier_workdir`` replaces the pipeline's classifier with another run
on the same splits (e.g. a CNN trained on ground-truth masks), still fed the
segmenter's predicted masks; ``--workdir`` may then be a plain segmenter run.
Several comma-separated runs each join the stack (e.g. CNNs fed the whole scan
and the lesion's close-up, whose errors differ); the first one is "the"
classifier of the single-model rows.
"""

from __future__ import annotations

import collections
import pathlib
import sys
import tempfile
from collections.abc import Sequence

import numpy as np
from scipy import optimize

from busi_jax import checkpoints as ckpt_lib
from busi_jax import data as data_lib
from busi_jax import descriptors as desc_lib
from busi_jax import evalmetrics
from busi_jax import evaluate
from busi_jax import inference
from busi_jax import io as busi_io
from busi_jax import metrics
from busi_jax import postprocess as pp
from busi_jax import synthetic

# The categorical descriptors, in the order of the agreement and association tables.
CATEGORICAL_FIELDS = desc_lib.DESCRIPTOR_FIELDS


def phantom_agreement(
    out_dir: str | pathlib.Path,
    seed: int,
    per_class: int = 40,
    size_range=((200, 260), (260, 340)),
) -> dict:
    """Agreement of each categorical descriptor with the phantoms' truth.

    Generates ``per_class`` benign and malignant phantoms of ``seed`` into
    ``out_dir`` and describes each with its true mask, at the original size
    and resized to 128 px (the spacing scaled to match).

    Returns:
        ``{"original" | "128 px": {field: {"agreement", "judged", "all_cases",
        "n"}}}``: agreement over the lesions where the descriptor made a call,
        the share where it did (only heterogeneity abstains, on black lesions),
        agreement over all lesions with an abstention counted as a miss, and
        the number of lesions.
    """
    out_dir = pathlib.Path(out_dir)
    synthetic.generate(
        out_dir,
        num_normal=0,
        num_benign=per_class,
        num_malignant=per_class,
        seed=seed,
        size_range=size_range,
        duplicate_fraction=0.0,
    )
    truth = synthetic.load_truth(out_dir)
    hits = {"original": collections.defaultdict(list), "128 px": collections.defaultdict(list)}
    for key, rec in sorted(truth.items()):
        image = busi_io.read_scan(out_dir / key)
        mask = np.zeros(image.shape, bool)
        for name in rec["masks"]:
            mask |= busi_io.read_mask(out_dir / name)
        h, w = image.shape
        sp = rec["pixel_spacing_mm"]
        small = (
            busi_io.resize_image(image, 128),
            busi_io.resize_mask(mask, 128),
            (sp * h / 128, sp * w / 128),
        )
        for res, args in (("original", (image, mask, sp)), ("128 px", small)):
            d = desc_lib.describe(*args)
            for f in CATEGORICAL_FIELDS:
                hits[res][f].append(_hit(f, d[f], rec))
    return {
        res: {
            f: {
                "agreement": float(np.mean([h for h in v if h is not None] or [np.nan])),
                "judged": float(np.mean([h is not None for h in v])),
                "all_cases": float(np.mean([h is True for h in v])),
                "n": len(v),
            }
            for f, v in per.items()
        }
        for res, per in hits.items()
    }


def _hit(field: str, called, rec: dict) -> bool | None:
    """Whether a descriptor's call matches the phantom's truth; None for an abstention.

    Heterogeneity is judged only where the phantom shows its interior
    (``texture_visible``): on a lesion rendered black the truth is 'not
    assessable', which an abstention matches and any call misses.
    """
    if field == "heterogeneous" and not rec.get("texture_visible", True):
        return called is None
    return None if called is None else called == rec[field]


def floor_share(folder: str | pathlib.Path) -> dict:
    """How many lesions of a BUSI-layout folder are mostly at the display's black level.

    Uses the ground-truth masks (all mask files of a scan merged) and
    :func:`descriptors.floor_fraction`, the quantity behind heterogeneity's
    'not assessable'.

    Returns:
        ``{"lesions", "half_black", "share_half_black", "share_third_black"}``,
        plus ``texture_not_visible`` (lesions the phantom renders black) for a
        phantom folder.
    """
    fractions = []
    for rec in busi_io.list_scans(folder):
        if rec.label == "normal":
            continue
        image, mask = busi_io.read_example(rec)
        f = desc_lib.floor_fraction(image, mask)
        if f is not None:
            fractions.append(f)
    f = np.asarray(fractions)
    limit = desc_lib.THRESHOLDS.texture_max_black
    out = {
        "lesions": int(f.size),
        "half_black": int(np.sum(f >= limit)),
        "share_half_black": float(np.mean(f >= limit)) if f.size else float("nan"),
        "share_third_black": float(np.mean(f >= 0.3)) if f.size else float("nan"),
    }
    if (pathlib.Path(folder) / "truth.json").exists():  # Phantoms: their own verdict too.
        truth = synthetic.load_truth(folder).values()
        out["texture_not_visible"] = sum(r.get("texture_visible") is False for r in truth)
    return out


def pooled_agreement(tables: dict) -> dict:
    """:func:`phantom_agreement` results of several seeds pooled over their lesions."""
    first = next(iter(tables.values()))
    out: dict = {}
    for res, per in first.items():
        out[res] = {}
        for f in per:
            cells = [t[res][f] for t in tables.values()]
            n = sum(c["n"] for c in cells)
            judged = sum(c["judged"] * c["n"] for c in cells)
            hits = sum(c["agreement"] * c["judged"] * c["n"] for c in cells if c["judged"])
            out[res][f] = {
                "agreement": hits / judged if judged else float("nan"),
                "judged": judged / n,
                "all_cases": hits / n,
                "n": n,
            }
    return out


def agreement_table(tables: dict) -> str:
    """Plain-text table of :func:`phantom_agreement` results, one column per seed."""
    lines = []
    for res in ("original", "128 px"):
        lines.append(f"{res}: agreement where judged / over all cases (share judged)")
        lines.append(f"{'descriptor':16s}" + "".join(f"{str(s):>22s}" for s in tables))
        for f in CATEGORICAL_FIELDS:
            cells = "".join(
                f"{t[res][f]['agreement']:9.3f} /{t[res][f]['all_cases']:6.3f}"
                f" ({t[res][f]['judged']:.2f})"
                for t in tables.values()
            )
            lines.append(f"{f:16s}{cells}")
    return "\n".join(lines)


def _logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """L2-regularised logistic regression; returns weights with the bias last."""
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)

    def loss(w):
        z = xb @ w
        nll = np.sum(np.logaddexp(0, z) - y * z)
        return nll + 0.5 * l2 * np.sum(w[:-1] ** 2)

    def grad(w):
        p = 1 / (1 + np.exp(-(xb @ w)))
        g = xb.T @ (p - y)
        g[:-1] += l2 * w[:-1]
        return g

    return optimize.minimize(loss, np.zeros(xb.shape[1]), jac=grad, method="L-BFGS-B").x


def _standardise(train: np.ndarray, *others: np.ndarray):
    """Fills NaN with the train median and scales by train statistics."""
    med = np.nanmedian(train, axis=0)
    med = np.where(np.isfinite(med), med, 0.0)
    filled = [np.where(np.isfinite(a), a, med) for a in (train, *others)]
    mu, sd = filled[0].mean(0), filled[0].std(0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    return [(a - mu) / sd for a in filled]


def _auc_ci(scores: np.ndarray, labels: np.ndarray, n_boot: int = 1000) -> list[float]:
    """95% bootstrap interval of the AUC, resampling within each class."""

    def stat(idx):
        return np.array([metrics.roc_auc(scores[i], labels[i]) for i in idx[:, :, 0]])

    idx = np.arange(len(labels))[:, None]
    return evalmetrics.bootstrap_ci(idx, stat, n_boot, strata=labels)["ci95"]


def study(
    workdir: str,
    manual_dir: str,
    multitask_workdir: str | None = None,
    classifier_workdir: str | Sequence[str] | None = None,
    *,
    classifier_tta: bool = False,
) -> dict:
    """Association, added value and stacking on a BUSI build (see the module docstring).

    Args:
        workdir: pipeline workdir (segmenter + classifier on its masks), or a
            segmenter run when ``classifier_workdir`` is given.
        manual_dir: the BUSI folder the dataset was built from.
        multitask_workdir: optional multitask run whose malignancy logit joins the stack.
        classifier_workdir: optional classifier run (same data and splits), or
            several (a list or a comma-separated string), used instead of the
            pipeline's, fed the segmenter's predicted masks; each one's logit
            joins the stack.
        classifier_tta: average each CNN's logits over horizontal flips of
            scan and mask (``evaluate.classifier_logits``).

    Returns:
        JSON-able dict: association per descriptor, test AUCs with 95%
        bootstrap intervals, and the stacking weights.
    """
    parts = evaluate.resolve(workdir)
    seg_dir, cls_dir = parts["segmenter"], parts["classifier"]
    if seg_dir is None:
        raise ckpt_lib.CheckpointError(f"--workdir: {workdir} holds no segmenter")
    config = inference.load_config(seg_dir)
    if config.data.get("cv_fold") is not None:
        # Its stack is fitted on validation, which a fold run mostly trained on.
        raise ckpt_lib.CheckpointError(
            f"--workdir: {seg_dir} is a cross-validation run; the study needs a run on the splits"
        )
    if isinstance(classifier_workdir, str):
        classifier_workdir = classifier_workdir.split(",")
    cls_dirs = [pathlib.Path(c).expanduser() for c in classifier_workdir or [] if c.strip()]
    if len({c.resolve() for c in cls_dirs}) < len(cls_dirs):
        raise ckpt_lib.CheckpointError(
            f"--classifier_workdir: a run is repeated in {[str(c) for c in cls_dirs]}"
        )
    for c in cls_dirs:
        # A classifier trained on other splits may have seen this test split.
        evaluate.check_same_splits(config, c, "--classifier_workdir", "classification")
    if not cls_dirs and cls_dir is None:
        raise ckpt_lib.CheckpointError(
            f"--workdir: {workdir} holds no classifier; pass --classifier_workdir"
        )
    cls_dirs = cls_dirs or [cls_dir]
    size = int(config.data.image_size)
    seg = evaluate.segmenter_probs(seg_dir)
    classifiers = [evaluate.classifier_logits(c, classifier_tta) for c in cls_dirs]
    mt = None
    if multitask_workdir:
        # A run on other splits may have seen this test split.
        evaluate.check_same_splits(
            config, pathlib.Path(multitask_workdir), "--multitask_workdir", "multitask"
        )
        mt = evaluate.multitask_outputs(multitask_workdir)
    val = data_lib.load_split(config.data, "validation")
    pp_cfg, _ = pp.choose_on_validation(seg(val["image"]), val["mask"][..., 0] > 0)

    originals = {r.file_name: r for r in busi_io.list_scans(manual_dir)}
    rows = []
    for split in ("train", "validation", "test"):
        arrays = data_lib.load_split(config.data, split)
        lesion = arrays["label"] > 0
        images = arrays["image"][lesion]
        masks = pp.apply(seg(images), pp_cfg)
        masks_u8 = masks[..., None].astype(np.uint8)
        logits = np.stack([cls(images, masks_u8) for cls in classifiers], axis=1)
        mt_logits = mt(images)[1] if mt else np.full(len(images), np.nan)
        for name, label, m, logit, mt_logit in zip(
            arrays["file_name"][lesion], arrays["label"][lesion], masks, logits, mt_logits
        ):
            record = originals[str(name)]
            image = busi_io.read_scan(record.image_path)
            d = desc_lib.describe(image, busi_io.resize_mask(m, image.shape))
            rows.append(
                {
                    "split": split,
                    "file": str(name),
                    "malignant": int(label == 2),
                    "logits": [float(v) for v in logit],
                    "multitask_logit": float(mt_logit),
                    "desc": d,
                }
            )

    assoc = {}
    for field in CATEGORICAL_FIELDS:
        counts = collections.defaultdict(lambda: [0, 0])
        for r in rows:
            counts[str(r["desc"].get(field))][r["malignant"]] += 1
        assoc[field] = {
            k: {"benign": b, "malignant": mal, "malignant_share": round(mal / (b + mal), 3)}
            for k, (b, mal) in sorted(counts.items())
        }

    def arrays_of(split):
        sel = [r for r in rows if r["split"] == split]
        x = np.stack([desc_lib.feature_vector(r["desc"]) for r in sel]).astype(np.float64)
        # Spacing is unknown for BUSI: the mm features are all NaN; drop them.
        keep = [
            i
            for i, n in enumerate(desc_lib.FEATURE_NAMES)
            if not n.endswith("mm2") and not n.endswith("_mm")
        ]
        return (
            x[:, keep],
            np.array([r["logits"] for r in sel]),
            np.array([r["malignant"] for r in sel]),
            np.array([r["multitask_logit"] for r in sel]),
        )

    def score(x, w):
        return np.concatenate([x, np.ones((len(x), 1))], 1) @ w

    xtr, ltr_all, ytr, mtr = arrays_of("train")
    xva, lva_all, yva, mva = arrays_of("validation")
    xte, lte_all, yte, mte = arrays_of("test")
    ltr, lva, lte = ltr_all[:, 0], lva_all[:, 0], lte_all[:, 0]
    xtr_s, xva_s, xte_s = _standardise(xtr, xva, xte)
    w_desc = _logistic_fit(xtr_s, ytr)
    score_desc = score(xte_s, w_desc)
    both_tr = np.concatenate([xtr_s, ltr[:, None]], 1)
    both_te = np.concatenate([xte_s, lte[:, None]], 1)
    w_both = _logistic_fit(both_tr, ytr)
    score_both = score(both_te, w_both)
    test_scores = {
        "classifier": lte,
        "descriptors_logistic": score_desc,
        "classifier_plus_descriptors_logistic": score_both,
    }
    # Stacking. The networks' logits on train are in-sample (they were fitted
    # there, and so was the segmenter whose masks the descriptors read), so a
    # combiner fitted on train over-trusts them. The combiner is fitted on the
    # validation split instead -- no weights were fitted there, though it
    # picked the checkpoints and the post-processing -- and has only a few
    # inputs: the train-fitted descriptor score and the logits.
    stack_in = {"descriptors": (score(xva_s, w_desc), score_desc), "classifier": (lva, lte)}
    for k in range(1, len(cls_dirs)):
        test_scores[f"classifier_{k}"] = lte_all[:, k]
        stack_in[f"classifier_{k}"] = (lva_all[:, k], lte_all[:, k])
    if mt:
        test_scores["multitask"] = mte
        stack_in["multitask"] = (mva, mte)
    names = list(stack_in)
    sva, ste = (np.stack([stack_in[n][i] for n in names], 1) for i in (0, 1))
    sva_s, ste_s = _standardise(sva, ste)
    w_stack = _logistic_fit(sva_s, yva)
    test_scores["stack_on_validation"] = score(ste_s, w_stack)
    # The same inputs averaged with equal weights once put on validation's
    # scale: nothing to fit, so 50-odd validation lesions cannot overfit it.
    test_scores["mean_of_stack_inputs"] = ste_s.mean(axis=1)
    return {
        "data": f"busi/{size} from {manual_dir}; descriptors on original-size scans with predicted masks",
        "segmenter_workdir": str(seg_dir),
        # In stack order: "classifier", then "classifier_1", ...
        "classifier_workdir": [str(c) for c in cls_dirs],
        "classifier_tta": "horizontal flip averaging of logits" if classifier_tta else "none",
        "postprocess": pp_cfg.describe(),
        "n_lesion_scans": {
            s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")
        },
        "association_all_splits": assoc,
        "test_auc": {k: metrics.roc_auc(v, yte) for k, v in test_scores.items()},
        "test_auc_ci95": {k: _auc_ci(v, yte) for k, v in test_scores.items()},
        "stack_inputs": names,
        "stack_weights_standardised": [round(float(w), 4) for w in w_stack],
        "train_auc_classifier": metrics.roc_auc(ltr, ytr),
    }


def main(argv=None) -> None:
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Pipeline workdir (segmenter + classifier).")
    flags.DEFINE_string("manual_dir", None, "The BUSI folder the dataset was built from.")
    flags.DEFINE_string(
        "multitask_workdir", None, "Optional multitask run whose logit joins the stacking."
    )
    flags.DEFINE_list(
        "classifier_workdir",
        None,
        "Optional classifier run(s) (same splits) scored on the segmenter's masks instead of"
        " the pipeline's classifier; each one's logit joins the stack.",
    )
    flags.DEFINE_bool(
        "classifier_tta", False, "Average each CNN's logits over horizontal flips (scan and mask)."
    )
    flags.DEFINE_list(
        "phantom_seeds", None, "Instead of BUSI: agreement with the truth of these phantom seeds."
    )
    flags.DEFINE_integer("phantoms_per_class", 40, "Benign and malignant phantoms per seed.")
    flags.DEFINE_string(
        "floor_dir",
        None,
        "Instead: how many lesions of this BUSI-layout folder are mostly black (true masks).",
    )
    flags.DEFINE_string("output", None, "JSON path.")
    flags.mark_flags_as_required(["output"])
    FLAGS = flags.FLAGS

    def phantoms():
        seeds = [int(s) for s in FLAGS.phantom_seeds]
        tables, floors = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for s in seeds:
                folder = pathlib.Path(tmp) / f"seed{s}"
                tables[s] = phantom_agreement(folder, s, FLAGS.phantoms_per_class)
                floors[f"seed {s}"] = floor_share(folder)
        return tables, floors

    def run(_):
        from busi_jax import cli

        if FLAGS.floor_dir:
            out = cli.run_command(floor_share, FLAGS.floor_dir)
            busi_io.atomic_write_json(FLAGS.output, out)
            print(out)
            return
        if FLAGS.phantom_seeds:
            tables, floors = cli.run_command(phantoms)
            out = {f"seed {k}": v for k, v in tables.items()}
            if len(tables) > 1:
                out["pooled"] = pooled_agreement(tables)
            busi_io.atomic_write_json(FLAGS.output, {**out, "floor_share": floors})
            print(agreement_table(out))
            print("lesions mostly at the black level:", floors)
            return
        if not (FLAGS.workdir and FLAGS.manual_dir):
            print(
                "error: --workdir and --manual_dir are needed without --phantom_seeds",
                file=sys.stderr,
            )
            sys.exit(1)
        out = cli.run_command(
            study,
            FLAGS.workdir,
            FLAGS.manual_dir,
            FLAGS.multitask_workdir,
            FLAGS.classifier_workdir,
            classifier_tta=FLAGS.classifier_tta,
        )
        busi_io.atomic_write_json(FLAGS.output, out)
        print(out["test_auc"])

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
