"""Shared defaults: the paper's setting (U-Net++, Dice loss, Adam 1e-4, 50 epochs).

Every experiment file imports this and overrides only what differs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "segmentation"  # 'segmentation' | 'classification' | 'multitask' | 'pipeline'.
    config.seed = 0  # Seeds initialisation, data order, augmentation and dropout.
    # Fine-tuning: start from that training workdir's best weights (same split; fresh optimizer).
    config.init_from = ml_collections.config_dict.placeholder(str)  # None: random init.

    config.data = ml_collections.ConfigDict()
    config.data.source = "busi"  # 'busi' (needs a manual dir) or 'synthetic' (built-in phantoms).
    config.data.manual_dir = ml_collections.config_dict.placeholder(
        str
    )  # BUSI folder; None reads $BUSI_MANUAL_DIR.
    config.data.data_dir = "~/tensorflow_datasets"  # Where TFDS keeps built datasets.
    config.data.image_size = 128  # Side of the square scans: 128 (paper) or 256.
    config.data.train_split = "train"  # TFDS split trained on.
    config.data.eval_split = "validation"  # Split that picks checkpoints and stops early.
    # k-fold cross-validation: hold out this fold of train + validation and train
    # on the others (folds deal whole near-duplicate groups); None: the splits above.
    config.data.cv_fold = ml_collections.config_dict.placeholder(int)
    config.data.synthetic_seed = 0  # Seed of the phantom generator (source='synthetic').
    config.data.synthetic_per_class = 40  # Benign and malignant phantoms each; normals get half.

    config.model = ml_collections.ConfigDict()
    config.model.name = "unetpp"  # A key of busi_jax.models.MODELS.
    config.model.features = 16  # Base width; doubles at each level.
    config.model.depth = 4  # Number of 2x downsamplings.
    config.model.norm = "batch"  # 'batch' | 'group' | 'none'.
    config.model.upsample = "transpose"  # 'transpose' or 'bilinear'/'nearest' resize + conv.
    config.model.dtype = "float32"  # Compute dtype ('bfloat16' keeps float32 parameters).
    # Conv kernels: 'xla', 'native' (C++ weight grad; g++), 'native_bf16' (+bf16 fwd/bwd
    # on AMX or AVX-512 BF16), 'native_amx' (the same, AMX only).
    config.model.wgrad = "xla"
    # With the bf16 kernels on AVX-512 BF16 (no AMX): 3x3 convs' forward pass and both
    # gradients by Winograd F(2x2, 3x3) (faster; within bf16 rounding of the direct pass).
    config.model.winograd = True

    # 'dice' (paper) | 'tversky' | 'lovasz' | 'bce', or 'dice_bce' / 'tversky_bce' / 'lovasz_bce'.
    config.loss = "dice"  # Segmentation loss.
    config.bce_weight = 0.5  # BCE weight in the '*_bce' losses.
    config.tversky_alpha = 0.7  # Tversky: weight of missed lesion pixels (false negatives).
    config.tversky_beta = 0.3  # Tversky: weight of false positives.
    config.tversky_gamma = 1.0  # Tversky: focal exponent (0.75 in Abraham & Khan 2019; 1 = plain).
    config.ds_weights = ml_collections.config_dict.placeholder(
        tuple
    )  # Deep-supervision head weights; None = equal.

    config.optimizer = "adam"  # 'adam' (paper) | 'adamw'.
    config.learning_rate = 1e-4  # Peak learning rate (paper: 1e-4).
    config.weight_decay = 0.0  # Decoupled weight decay for 'adamw'.
    config.schedule = "constant"  # 'constant' (paper) | 'cosine' | 'onecycle'.
    config.warmup_epochs = 0  # Linear warm-up before 'cosine'.
    config.grad_clip = 0.0  # Global-norm clipping; 0 disables.
    config.ema_decay = 0.0  # EMA of weights for evaluation; 0 disables.
    config.ema_warmup = True  # Decay min(ema_decay, (1+t)/(10+t)) early on.

    config.batch_size = 16  # Global batch; must divide by the number of devices.
    config.eval_batch_size = 32  # Evaluation batch (padded, so any size works).
    config.num_epochs = 50  # Paper: 50.
    config.early_stopping_patience = 10  # Epochs without a better validation metric; 0 disables.
    config.keep_best = 2  # Best checkpoints kept by the validation metric.
    config.checkpoint_every_epochs = 1  # Resumable state saved every N epochs (and at the end).
    config.threshold = (
        0.5  # Probability threshold of the predicted mask during training evaluation.
    )

    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = True  # Paper: flips, rotation, zoom, translation, shear.
    config.augment.hflip_prob = 0.5  # Left-right flip probability.
    config.augment.vflip_prob = 0.0  # Up-down flip; off because the skin is always on top.
    config.augment.rotation_deg = 15.0  # Maximum rotation.
    config.augment.scale_range = (0.9, 1.1)  # Zoom factors.
    config.augment.translate_frac = 0.1  # Maximum shift as a fraction of the side.
    config.augment.shear_deg = 5.0  # Maximum shear.
    config.augment.brightness_delta = 0.1  # Scan-only brightness shift.
    config.augment.contrast_range = (0.8, 1.2)  # Scan-only contrast factors.
    config.augment.gamma_range = (0.8, 1.25)  # Scan-only gamma.
    config.augment.speckle_sigma = 0.1  # Scan-only multiplicative speckle strength.
    config.augment.mask_blur_sigma = 0.0  # Classifier only: max blur (px) of its mask input.
    config.augment.mask_level_range = (0.5, 0.5)  # Classifier only: re-threshold levels.

    config.classifier = ml_collections.ConfigDict()
    config.classifier.input_mode = "image_mask"  # image, image_mask, masked, roi, image_mask_roi.
    config.classifier.mask_source = (
        "predicted"  # 'predicted' (from segmenter_workdir) | 'ground_truth' (ablation).
    )
    # Trained segmenter for predicted masks; or comma-separated cross-validation
    # runs (data.cv_fold), one per fold: each train/validation scan is then
    # masked by the run that held it out (inference.FoldMasks).
    config.classifier.segmenter_workdir = ml_collections.config_dict.placeholder(str)
    # 'same' (validation masks as mask_source) | 'predicted': the checkpoint is
    # chosen on the segmenter's validation masks, the masks it is deployed with.
    config.classifier.val_mask_source = "same"

    config.log_every_steps = 10  # TensorBoard training-loss interval.
    config.progress = True  # Progress bar on stderr.
    return config
