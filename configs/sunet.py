"""SUNet on BUSI: U-Net with squeeze-and-excitation blocks, the paper's second segmenter."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "sunet"  # SE blocks (Hu et al. 2018) in encoder and decoder.
    return config
