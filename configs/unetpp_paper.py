"""U-Net++ with the paper's exact training settings: Dice loss, Adam 1e-4 constant, 50 epochs,
early stopping. Width 32 gives the paper-sized 9.0 M-parameter network (slow on a CPU).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "unetpp"  # Nested dense skips (Zhou et al. 2018).
    config.model.features = 32  # 9,045,249 parameters, the standard U-Net++ size.
    config.loss = "dice"  # Paper: Dice loss.
    config.learning_rate = 1e-4  # Paper: Adam 1e-4.
    config.schedule = "constant"  # Paper: no schedule stated.
    config.num_epochs = 50  # Paper: 50 epochs with early stopping.
    return config
