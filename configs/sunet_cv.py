"""SUNet width 32, one fold of five-fold cross-validation on train + validation.

nnU-Net's protocol: train each fold into its own workdir
(``--config.data.cv_fold=0`` ... ``4``), then score the five together with
``python -m busi_jax.evaluate --workdir=FOLD0 --ensemble=FOLD1,...,FOLD4``,
which tunes post-processing on their out-of-fold predictions (each scan of
train + validation predicted by the run that held it out) and averages the
five on ``test``. Folds deal whole near-duplicate groups, so no group is in
a run's training and held-out scans at once.
"""

from configs import sunet


def get_config():
    config = sunet.get_config()
    config.data.cv_fold = 0  # Held-out fold (0..4); one workdir per fold.
    config.model.features = 32  # Width 32: the best single SUNet on the fixed splits.
    config.loss = "dice_bce"  # Dice + BCE: steadier gradients than Dice alone early on.
    config.learning_rate = 1e-3  # Peak of the warm-up + cosine schedule.
    config.schedule = "cosine"  # Decays to zero at the last epoch.
    config.warmup_epochs = 1  # Linear warm-up avoids early BatchNorm blow-ups at 1e-3.
    config.num_epochs = 40  # Fixed budget; the best epoch on the held-out fold is kept.
    config.early_stopping_patience = 0  # The cosine schedule ends training, not patience.
    config.ema_decay = 0.99  # Weight EMA: the best single-split recipe (RESULTS (24), (33)).
    return config
