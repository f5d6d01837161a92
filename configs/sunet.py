"""SUNet on BUSI: U-Net with squeeze-and-excitation blocks, the paper's second segmenter."""

from configs import unet


def get_config():
    config = unet.get_config()  # The U-Net family's options (attention gates, bottleneck, ...).
    config.model.name = "sunet"
    config.model.se = "se"  # SE blocks (Hu et al. 2018) in encoder and decoder.
    return config
