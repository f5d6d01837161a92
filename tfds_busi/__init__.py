"""The `busi` TFDS dataset: `import tfds_busi` registers it with TFDS."""

from tfds_busi.busi_dataset_builder import Builder  # noqa: F401  (registers 'busi')
from tfds_busi.busi_dataset_builder import BusiConfig  # noqa: F401
