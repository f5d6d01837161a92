"""One network for both tasks: a shared U-Net encoder with a segmentation decoder and a
benign-vs-malignant head (the paper's planned end-to-end network)."""

from configs import unet, unetpp


def get_config():
    config = unetpp.get_config()  # Same data, loss, schedule and epochs as the U-Net++ run.
    config.task = "multitask"
    config.model.name = "multitask"  # MultiTaskUNet: U-Net + classification head on the bottleneck.
    family = unet.get_config().model  # The U-Net options: se ('se' makes it a SUNet), gates, ...
    for key in ("se", "se_reduction", "attention", "dilated_bottleneck"):
        config.model[key] = family[key]
    config.model.num_classes = 1  # Malignant-vs-benign logit; normal scans train segmentation only.
    config.model.cls_hidden = 64  # Width of the head's hidden layer.
    config.model.dropout = 0.3  # Dropout in the head.
    config.cls_weight = 1.0  # Weight of the classification BCE against the segmentation loss.
    return config
