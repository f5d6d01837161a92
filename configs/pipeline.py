"""The paper's pipeline: U-Net++ segmenter, then the CNN classifier on its predicted masks.

One command, one workdir: DIR/segmenter and DIR/classifier. Override a stage's
field with --config.segmenter.FIELD=... or --config.classifier_stage.FIELD=...
"""

import ml_collections

from configs import classifier
from configs import unetpp


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "pipeline"  # Trains `segmenter`, then `classifier_stage` on its predicted masks.
    config.segmenter = unetpp.get_config()  # Stage 1 (its data section is used by both stages).
    config.classifier_stage = classifier.get_config()  # Stage 2; segmenter_workdir is filled in.
    config.segmenter_workdir = ml_collections.config_dict.placeholder(
        str
    )  # A finished segmenter run to reuse instead of stage 1.
    return config
