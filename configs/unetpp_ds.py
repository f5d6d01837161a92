"""U-Net++ with deep supervision (Zhou et al. 2018): configs/unetpp.py plus a loss on every head.

Each X^{0,j} node gets a 1x1 head; training sums the Dice + BCE of all heads
(equal weights unless ds_weights says otherwise), and evaluation averages their
logits. Everything else is configs/unetpp.py, so the two runs compare one change.
"""

from configs import unetpp


def get_config():
    config = unetpp.get_config()
    config.model.deep_supervision = True  # Heads on X^{0,1}..X^{0,L}, all trained.
    config.model.ds_inference = "mean"  # Evaluate on the average of the heads' logits.
    return config
