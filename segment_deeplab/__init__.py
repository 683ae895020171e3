"""DeepLab v3 / v3+ semantic segmentation for your own data."""

__version__ = "0.1.0"
