"""Atrous Spatial Pyramid Pooling (ASPP) with image pooling, and separable convs.

Follows TF DeepLab's `extract_features`: a 1x1 branch, one 3x3 atrous branch per rate
(depthwise-separable for xception), an optional image-pooling branch, then a 1x1
projection. Every conv is followed by batch norm and ReLU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1
) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU (TF split_separable_conv2d)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                in_channels,
                3,
                padding=dilation,
                dilation=dilation,
                groups=in_channels,
                bias=False,
            ),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def conv3x3(in_channels: int, out_channels: int, dilation: int, separable: bool) -> nn.Module:
    """A 3x3 conv + BN + ReLU, depthwise-separable when `separable`."""
    if separable:
        return SeparableConv2d(in_channels, out_channels, dilation)
    return conv_bn_relu(in_channels, out_channels, 3, dilation)


class ImagePooling(nn.Module):
    """Global average -> 1x1 conv + BN + ReLU -> broadcast back to the feature size.

    Batch norm on a 1x1 map needs more than one image per batch in training mode
    (or frozen batch norm), as in TF DeepLab.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        # mean() rather than AdaptiveAvgPool2d: same result, exports to ONNX as ReduceMean.
        y = self.conv(x.mean(dim=(2, 3), keepdim=True))  # (B, C, 1, 1)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """(B, in_channels, h, w) -> (B, out_channels, h, w).

    Args:
        in_channels: channels of the backbone's last feature map.
        out_channels: channels of every branch and of the projection (TF depth: 256).
        rates: dilation of the 3x3 branches; [] keeps only the 1x1 branch (TF
            mobilenet setting without ASPP rates).
        image_pooling: add the global-average branch.
        separable: depthwise-separable 3x3 branches (TF aspp_with_separable_conv).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: list[int],
        image_pooling: bool = True,
        separable: bool = False,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [conv_bn_relu(in_channels, out_channels, 1)]
        for rate in rates:
            branches.append(conv3x3(in_channels, out_channels, rate, separable))
        if image_pooling:
            branches.append(ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(len(branches) * out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))
