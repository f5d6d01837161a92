"""The paper's CNN classifier: benign vs malignant from the scan plus a predicted mask.

Needs a trained segmenter: --config.classifier.segmenter_workdir=DIR, or
out-of-fold masks from cross-validation runs (configs/sunet_cv.py):
--config.classifier.segmenter_workdir=FOLD0,FOLD1,FOLD2,FOLD3,FOLD4. For the
ground-truth-mask ablation: --config.classifier.mask_source=ground_truth.
"""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    config.task = "classification"
    config.model = ml_collections.ConfigDict()
    config.model.name = "classifier"  # Conv-pool stages, global pooling, dense head.
    config.model.num_classes = 1  # One sigmoid logit: malignant vs benign (paper).
    config.model.features = (16, 32, 64, 128)  # Channels per conv stage.
    config.model.hidden = 128  # Dense layer width.
    config.model.dropout = 0.3  # Dropout before the output layer.
    config.model.dtype = "float32"  # Compute dtype.
    config.loss = "bce"  # Binary cross-entropy (paper); the classification loss ignores this field.
    config.early_stopping_patience = 10  # Paper: early stopping.
    return config
