"""DeepLab v3 / v3+ semantic segmentation for your own data."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `Segmenter` loads on first use: `import segment_deeplab` (and the CLI) stays free of torch.
    if name == "Segmenter":
        from segment_deeplab.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'segment_deeplab' has no attribute {name!r}")
