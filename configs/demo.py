"""The README's demo: a small U-Net++ on built-in synthetic phantoms, < 5 minutes on 2 CPU cores."""

from configs import default


def get_config():
    config = default.get_config()
    config.data.source = "synthetic"  # Phantoms written by busi_jax.synthetic; no download.
    config.data.data_dir = "./workdirs/tfds"  # Keep the demo's data beside the project.
    config.data.synthetic_per_class = 40  # 40 benign + 40 malignant + 20 normal phantoms.
    config.model.features = 8  # Small and fast on a CPU.
    config.model.depth = 3  # Three downsamplings at 128 px.
    config.loss = "dice_bce"  # Converges faster than Dice alone on a short run.
    config.learning_rate = 3e-3  # A short run needs a larger step than the paper's 1e-4.
    config.schedule = "cosine"  # Decays to 1% by the last epoch.
    config.num_epochs = 12  # About 3 minutes on 2 cores.
    config.early_stopping_patience = 0  # The run is short: no early stop.
    config.batch_size = 8  # Small batches: more updates per epoch.
    return config
