"""U-Net on BUSI, the paper's baseline segmenter."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "unet"  # Ronneberger et al. 2015.
    config.model.se = "none"  # Recalibration after each conv block: 'none' | 'se' | 'sse' | 'scse'.
    config.model.se_reduction = 16  # Channel-SE reduction ratio r.
    config.model.attention = False  # Attention gates on the skips (Oktay et al. 2018).
    config.model.dilated_bottleneck = False  # Dilated cascade (rates 1, 2, 4) at the bottom.
    return config
