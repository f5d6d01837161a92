"""The paper's Table I in one run: U-Net, U-Net++, SUNet, the CNN classifier on
ground-truth masks (ablation) and the U-Net++ + CNN pipeline, all on one split.

    python launch.py --config=configs/table1.py --workdir=workdirs/table1

Writes WORKDIR/table1.{json,md} and the Table I section of docs/RESULTS.md
(busi_jax/table1.py). The segmenters share configs/unetpp.py's CPU recipe
(width 8, Dice + BCE, Adam 1e-3, warm-up + cosine, 30 epochs); on a GPU use
--config.unet.model.features=32 and likewise for the others.
"""

import ml_collections

from configs import classifier, default, unet, unetpp, sunet


def _cpu_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """configs/unetpp.py's training settings on another segmenter."""
    recipe = unetpp.get_config()
    config.model.features = recipe.model.features
    for field in ("loss", "learning_rate", "schedule", "warmup_epochs", "num_epochs"):
        config[field] = recipe[field]
    return config


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "table1"  # busi_jax.table1.run: trains and scores every row.
    config.data = default.get_config().data  # One data section for every row (same split).
    config.unet = _cpu_recipe(unet.get_config())  # Row 1.
    config.unetpp = unetpp.get_config()  # Row 2, and the pipeline's segmenter.
    config.sunet = _cpu_recipe(sunet.get_config())  # The paper's other segmenter.
    config.classifier = classifier.get_config()  # Rows 3 (ground-truth masks) and 4 (predicted).
    config.n_boot = 1000  # Bootstrap resamples for the 95% intervals.
    config.plots = True  # Evaluation plots beside each row's eval/test.json.
    config.results_md = "docs/RESULTS.md"  # Section rewritten in place; '' writes only WORKDIR.
    return config
