"""busi-jax: segmentation-guided breast-ultrasound CAD in JAX/Flax.

Research software, not a medical device.
"""

__version__ = "0.1.0"
