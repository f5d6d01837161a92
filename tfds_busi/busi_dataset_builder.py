"""BUSI: Breast Ultrasound Images (Al-Dhabyani et al., 2020) as a TFDS dataset."""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from busi_jax import io as busi_io

from . import curation
from . import grouping
from . import splits as splits_lib

_DESCRIPTION = """\
Breast ultrasound scans of women aged 25-75 (Baheya Hospital, Cairo, 2018),
labelled normal, benign or malignant, with lesion masks drawn by radiologists.

Each scan is converted to 8-bit grayscale and resized (with antialiasing) to
the config's size; its mask files are merged by logical OR and resized by
area-weighted resampling with a 0.5 threshold. `segmentation_mask` holds 0
(background) and 1 (lesion).

Near-duplicate scans (the same frame saved twice, slightly cropped or resized,
or a neighbouring frame of the same lesion) are grouped by a documented
similarity rule (see `tfds_busi/grouping.py`) and each group is kept whole in
one split and one fold, so evaluation does not leak through duplicates.
`curation_report.md` beside the built files lists the groups, cross-label
conflicts and multi-mask scans.
"""

_CITATION = """\
@article{aldhabyani2020busi,
    title   = {Dataset of breast ultrasound images},
    author  = {Al-Dhabyani, Walid and Gomaa, Mohammed and Khaled, Hussien and Fahmy, Aly},
    journal = {Data in Brief},
    volume  = {28},
    pages   = {104863},
    year    = {2020},
    doi     = {10.1016/j.dib.2019.104863},
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
BUSI cannot be downloaded automatically. Get the public release
"Dataset_BUSI_with_GT" (780 PNG scans with masks, CC BY 4.0) from the page of
the article: Al-Dhabyani et al., "Dataset of breast ultrasound images", Data in
Brief 28 (2020) 104863, https://doi.org/10.1016/j.dib.2019.104863 (its
"Dataset of breast ultrasound images" link), or from a mirror of that release.
Put either the folder or the zip into the manual dir:

    MANUAL_DIR/Dataset_BUSI_with_GT/{benign,malignant,normal}/*.png
    or MANUAL_DIR/Dataset_BUSI_with_GT.zip

then run `tfds build tfds_busi/busi_dataset_builder.py --manual_dir=MANUAL_DIR`
(or set BUSI_MANUAL_DIR=MANUAL_DIR for busi-jax's training commands).
A folder that holds the class folders directly is accepted too.
"""


@dataclasses.dataclass
class BusiConfig(tfds.core.BuilderConfig):
    """Config of the `busi` builder.

    Attributes:
        image_size: side of the square output scans and masks, in pixels.
        validation_fraction: target share of scans in `validation`.
        test_fraction: target share of scans in `test`.
        num_folds: cross-validation folds inside train + validation.
        split_seed: seed of the group-to-split deal.
        dedup_threshold: NCC threshold of the near-duplicate rule.
    """

    image_size: int = 128
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    num_folds: int = 5
    split_seed: int = 0
    dedup_threshold: float = grouping.DEFAULT_THRESHOLD


def _find_manual_root(manual_dir: pathlib.Path, dl_manager) -> pathlib.Path:
    """The folder holding the class folders, extracting the release zip if needed."""
    manual_dir = pathlib.Path(manual_dir)
    if not manual_dir.is_dir():
        raise busi_io.BusiDataError(
            f"{manual_dir}: manual dir does not exist.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    try:
        return busi_io.find_dataset_root(manual_dir)
    except busi_io.BusiDataError:
        zips = sorted(manual_dir.glob("*.zip"))
        if not zips:
            raise busi_io.BusiDataError(
                f"{manual_dir}: holds neither {busi_io.RELEASE_FOLDER}/ nor its .zip.\n"
                f"{MANUAL_DOWNLOAD_INSTRUCTIONS}"
            ) from None
        extracted = pathlib.Path(dl_manager.extract(os.fspath(zips[0])))
        return busi_io.find_dataset_root(extracted)


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of a ``[H, W]`` uint8 array.

    Encoding with Pillow here (rather than handing TFDS an array) keeps the
    build free of TensorFlow, whose PNG encoder TFDS would otherwise call.
    """
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG")
    return buf.getvalue()


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for BUSI."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: merged masks, near-duplicate groups, group-aware splits."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        BusiConfig(name="128", image_size=128, description="Scans and masks at 128x128."),
        BusiConfig(name="256", image_size=256, description="Scans and masks at 256x256."),
    ]
    DEFAULT_CONFIG_NAME = "128"

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 1), dtype=np.uint8),
                    "segmentation_mask": tfds.features.Image(shape=(s, s, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(busi_io.CLASS_NAMES)),
                    "has_lesion": tfds.features.Scalar(dtype=np.bool_),
                    "num_masks": tfds.features.Scalar(dtype=np.int32),
                    "file_name": tfds.features.Text(),
                    "group": tfds.features.Scalar(dtype=np.int32),
                    "fold": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "segmentation_mask"),
            homepage="https://doi.org/10.1016/j.dib.2019.104863",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        cfg = self.builder_config
        root = _find_manual_root(dl_manager.manual_dir, dl_manager)
        records = busi_io.list_scans(root)
        if not records:
            raise busi_io.BusiDataError(f"{root}: no scans found")

        # Everything is read before anything is written: the groups and splits
        # need all scans, and a bad file then stops the build before any output.
        examples, fingerprints = [], []
        for record, image, mask in busi_io.read_examples(records):
            fingerprints.append(grouping.fingerprint(image))
            examples.append(
                {
                    "image": _png(busi_io.resize_image(image, cfg.image_size)),
                    "segmentation_mask": _png(
                        busi_io.resize_mask(mask, cfg.image_size).astype(np.uint8)
                    ),
                    "label": record.label,
                    "has_lesion": bool(mask.any()),
                    "num_masks": len(record.mask_paths),
                    "file_name": record.file_name,
                }
            )
        sim = grouping.similarity_matrix(np.stack(fingerprints))
        groups = grouping.group_ids(sim, cfg.dedup_threshold)
        label_ids = [busi_io.CLASS_NAMES.index(e["label"]) for e in examples]
        names = [e["file_name"] for e in examples]
        split_names, folds = splits_lib.assign(
            names,
            label_ids,
            groups,
            validation_fraction=cfg.validation_fraction,
            test_fraction=cfg.test_fraction,
            num_folds=cfg.num_folds,
            seed=cfg.split_seed,
        )
        for e, g, f in zip(examples, groups, folds):
            e["group"] = int(g)
            e["fold"] = int(f)

        settings = {
            "image_size": cfg.image_size,
            "dedup_rule": "average-linkage on high-pass NCC (tfds_busi/grouping.py)",
            "dedup_threshold": cfg.dedup_threshold,
            "validation_fraction": cfg.validation_fraction,
            "test_fraction": cfg.test_fraction,
            "num_folds": cfg.num_folds,
            "split_seed": cfg.split_seed,
        }
        report = curation.build_report(
            file_names=names,
            labels=[e["label"] for e in examples],
            num_masks=[e["num_masks"] for e in examples],
            groups=groups,
            splits=split_names,
            folds=folds,
            similarity=sim,
            settings=settings,
        )
        # data_dir is TFDS's temporary folder during a build, renamed into place
        # only when the whole build succeeds: the report is written with the data.
        data_dir = pathlib.Path(self.data_dir)
        busi_io.atomic_write_json(data_dir / "curation_report.json", report)
        busi_io.atomic_write_text(data_dir / "curation_report.md", curation.to_markdown(report))

        by_split = {s: [] for s in splits_lib.SPLITS}
        for e, s in zip(examples, split_names):
            by_split[s].append(e)
        return {s: self._generate_examples(exs) for s, exs in by_split.items() if exs}

    def _generate_examples(self, examples):
        for e in examples:
            yield e["file_name"], e
