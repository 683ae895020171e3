"""What a segmentation model takes: RGB scaled to [0, 1]; it normalises inside.

Every path into a model (the training step, inference, export, exported files) turns
images into model input here, so all of them see the same values. Padding uses the mean
colour, which the model's normalisation turns into about zero ("nothing"), as TF
DeepLab's mean-pixel padding does and zero-padding convolutions assume anyway.
"""

from __future__ import annotations

import torch
from torch import nn

# ImageNet mean as uint8: the fill of training crops, padded batches and padded inputs.
MEAN_RGB = (124, 116, 104)


def to_input(images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) RGB -> float32 (B, 3, H, W) in [0, 1] on `device`.

    Floats are taken as already in [0, 1].
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W) RGB, got {tuple(images.shape)}")
    x = images.to(device, non_blocking=True) if device is not None else images
    return x.float().div_(255.0) if not x.is_floating_point() else x.float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_input` (exact for images that came from uint8), (B, 3, H, W)."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def pad_color(model: nn.Module) -> torch.Tensor:
    """(1, 3, 1, 1) float32 in [0, 1]: the model's normalisation mean, else MEAN_RGB."""
    mean = getattr(model, "mean", None)
    if not isinstance(mean, torch.Tensor) or mean.numel() != 3:
        mean = torch.tensor(MEAN_RGB, dtype=torch.float32) / 255
    return mean.detach().float().view(1, 3, 1, 1)


def pad_bottom_right(x: torch.Tensor, ph: int, pw: int, color: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) model input padded by `ph` rows and `pw` columns of `color`."""
    b, c, h, w = x.shape
    out = color.to(x).expand(b, c, h + ph, w + pw).clone()
    out[..., :h, :w] = x
    return out
