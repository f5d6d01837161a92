"""U-Net++ on BUSI, sized to train on 2 CPU cores in well under an hour.

Differences from the paper's settings (configs/unetpp_paper.py), chosen by a
measured run (docs/RESULTS.md, BUSI validation split, same width 8 and 30
epochs): Dice + BCE instead of Dice alone and Adam 1e-3 with a cosine decay
instead of a constant 1e-4 gave best validation lesion Dice 0.728 against
0.455. The network is the paper's U-Net++ at base width 8; on a GPU use
--config.model.features=32 for its 9.0 M-parameter size.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "unetpp"  # Nested dense skips (Zhou et al. 2018).
    config.model.features = 8  # 0.57 M parameters: about 11 img/s training on 2 CPU cores.
    config.loss = (
        "dice_bce"  # Dice + 0.5 BCE: BCE gives useful gradients while Dice is flat early on.
    )
    config.learning_rate = 1e-3  # Peak of the cosine schedule.
    config.schedule = "cosine"  # Warm-up, then decay to 1% of the peak.
    config.warmup_epochs = 1  # One epoch of linear warm-up.
    config.num_epochs = 30  # With early stopping (patience 10).
    return config
