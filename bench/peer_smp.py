"""The peer: segmentation_models_pytorch's DeepLabV3Plus in a torchvision-reference loop.

What a user would write instead of segment-deeplab: `smp.DeepLabV3Plus(encoder_name=...)`
trained as torchvision's `references/segmentation/train.py` trains (SGD over every
parameter with weight decay, cross-entropy with ignore index, poly LR per iteration,
contiguous fp32 tensors, ImageNet normalisation in the data pipeline).

Needs the bench extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
from torch import nn
from torchvision import tv_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The project's variant names -> smp encoder names of the same network.
ENCODERS = {"resnet_18": "resnet18", "resnet_50": "resnet50", "xception_65": "xception"}


def build_peer(variant: str, num_classes: int) -> nn.Module:
    """smp DeepLabV3Plus at its defaults (OS 16, 256 channels), random weights."""
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus(
        encoder_name=ENCODERS.get(variant, variant), encoder_weights=None, classes=num_classes
    )


class NormalizedPeer(nn.Module):
    """Wraps a peer model to take RGB in [0, 1], so the project's `evaluate` runs it.

    `output_stride` and `mean` tell `predict_probs` to pad inputs to a multiple of 16
    with the mean colour, which smp requires of its input size.
    """

    output_stride = 16

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def peer_optimizer(model: nn.Module, lr: float = 0.01) -> torch.optim.SGD:
    """torchvision reference: SGD, momentum 0.9, weight decay 1e-4 on every parameter."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def peer_train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    ignore_index: int = 255,
) -> float:
    """One step of torchvision's `train_one_epoch`: normalised fp32 images in."""
    output = model(images)
    loss = F.cross_entropy(output, masks, ignore_index=ignore_index)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def peer_train_transforms(
    base_size: int, crop: int, scale_range=(0.5, 2.0), ignore_index: int = 255
) -> v2.Compose:
    """torchvision reference's train preset: random resize of the short side between
    0.5x and 2x `base_size`, flip, random crop padded with 0 / ignore."""
    lo, hi = (int(s * base_size) for s in scale_range)
    return v2.Compose(
        [
            v2.RandomResize(lo, hi),
            v2.RandomHorizontalFlip(),
            v2.RandomCrop(
                crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
            ),
        ]
    )


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float, as the reference's ToDtype+Normalize."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std
