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


def pooling_window(crop_size: list[int] | None, output_stride: int) -> tuple[int, int] | None:
    """TF DeepLab's image-pooling window for `image_pooling_crop_size` at the output
    stride (utils.scale_dimension); None pools the whole image."""
    if crop_size is None:
        return None
    h, w = (int((c - 1) / output_stride + 1) for c in crop_size)
    return h, w


def _window_means(n, k: int, stride: int, like: torch.Tensor) -> torch.Tensor:
    """(count, n): row i averages positions [i * stride, i * stride + k) of a length-n
    axis; a window longer than the axis covers all of it."""
    k = torch.sym_min(k, n)
    start = torch.arange((n - k) // stride + 1, device=like.device) * stride
    pos = torch.arange(n, device=like.device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + k)
    return inside.to(like.dtype) / k


def image_pool(x: torch.Tensor, window: tuple[int, int] | None, stride) -> torch.Tensor:
    """Average over `window` moved by `stride` (TF's avg_pool2d, VALID), or over the
    whole map (`window` None). A map smaller than the window (an image smaller than the
    crop, where TF fails) is averaged whole along that axis. The windows are two small
    matrix products, so the pooling follows the image size in exported graphs too."""
    if window is None:
        # mean() rather than AdaptiveAvgPool2d: same result, exports as ReduceMean.
        return x.mean(dim=(2, 3), keepdim=True)
    rows = _window_means(x.shape[-2], window[0], stride[0], x)  # (i, h)
    cols = _window_means(x.shape[-1], window[1], stride[1], x)  # (j, w)
    return rows @ x @ cols.transpose(0, 1)  # (B, C, i, j)


class ImagePooling(nn.Module):
    """Average (the whole image, or TF's pooling windows) -> 1x1 conv + BN + ReLU ->
    resized back to the feature size.

    Batch norm on a 1x1 map needs more than one image per batch in training mode
    (or frozen batch norm), as in TF DeepLab.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        window: tuple[int, int] | None = None,
        stride: tuple[int, int] = (1, 1),
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, out_channels, 1)
        self.window, self.stride, self.align_corners = window, tuple(stride), align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.conv(image_pool(x, self.window, self.stride))  # (B, C, 1, 1) unless windows
        return F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners)


class ASPP(nn.Module):
    """(B, in_channels, h, w) -> (B, out_channels, h, w).

    Args:
        in_channels: channels of the backbone's last feature map.
        out_channels: channels of every branch and of the projection (TF depth: 256).
        rates: dilation of the 3x3 branches; [] keeps only the 1x1 branch (TF
            mobilenet setting without ASPP rates).
        image_pooling: add the global-average branch.
        separable: depthwise-separable 3x3 branches (TF aspp_with_separable_conv).
        window, stride: the image-pooling windows (`pooling_window`; None: global).
        align_corners: resize the pooled map as TF does (tf_compat).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: list[int],
        image_pooling: bool = True,
        separable: bool = False,
        window: tuple[int, int] | None = None,
        stride: tuple[int, int] = (1, 1),
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [conv_bn_relu(in_channels, out_channels, 1)]
        for rate in rates:
            branches.append(conv3x3(in_channels, out_channels, rate, separable))
        if image_pooling:
            branches.append(ImagePooling(in_channels, out_channels, window, stride, align_corners))
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(len(branches) * out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))
