"""U-Net on BUSI, the paper's baseline segmenter."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "unet"  # Ronneberger et al. 2015.
    return config
