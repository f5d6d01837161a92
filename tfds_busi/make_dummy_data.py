"""Regenerates `dummy_data/`: tiny synthetic phantoms in BUSI's layout (no BUSI pixels).

python -m tfds_busi.make_dummy_data
"""

import pathlib
import shutil

from busi_jax import synthetic

DUMMY_DIR = pathlib.Path(__file__).parent / "dummy_data"
# Small and few, so the builder test runs in seconds; duplicates and
# multi-mask scans are forced so grouping and merging are exercised.
SETTINGS = dict(
    num_normal=3,
    num_benign=6,
    num_malignant=5,
    seed=7,
    size_range=((72, 96), (96, 128)),
    duplicate_fraction=0.34,
    cross_label_duplicate_fraction=0.5,
    multi_mask_fraction=0.34,
)


def make(out_dir: pathlib.Path = DUMMY_DIR) -> pathlib.Path:
    root = out_dir / "Dataset_BUSI_with_GT"
    if root.exists():
        shutil.rmtree(root)
    synthetic.generate(root, **SETTINGS)
    return root


if __name__ == "__main__":
    print(make())
