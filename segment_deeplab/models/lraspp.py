"""TF DeepLab's mobilenet_v3 head: Lite R-ASPP (the MobileNetV3 paper's segmentation
head), as research/deeplab builds it with the flags of its mobilenet_v3 model zoo
(`aspp_with_squeeze_and_excitation`, `aspp_with_concat_projection=0`,
`decoder_use_sum_merge`, `decoder_output_is_logits`, `image_se_uses_qsigmoid`).

    features (stride os) --1x1 conv+BN+ReLU (aspp0)----------------x gate --> 1x1 conv
                         \\--pool (image_pooling windows)--1x1 conv--hard sigmoid-/  (classifier)
    low-level (stride dos) --1x1 conv (decoder) ---------------------------------------+ = logits

The classifier (TF's decoder/decoder_conv0) and the low-level projection (TF's
decoder/feature_projection0) both have biases and end in the classes: their sum, at
the decoder's stride, is the logits. The classifier runs before the upsampling (TF runs
it after; a 1x1 conv and a bilinear resize commute), on a sixteenth of the pixels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from segment_deeplab.models.aspp import conv_bn_relu, image_pool, pooling_window
from segment_deeplab.models.backbones import FeatureSpec, q_sigmoid
from segment_deeplab.models.deeplab import DeepLabV3Plus, resize


class GatedASPP(nn.Module):
    """(B, in, h, w) -> (B, channels, h, w): a 1x1 conv + BN + ReLU branch, multiplied
    by a gate of pooled features (1x1 conv with bias, hard sigmoid) resized to h x w."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        window: tuple[int, int] | None,
        stride: tuple[int, int],
        tf_compat: bool,
    ) -> None:
        super().__init__()
        self.branch = conv_bn_relu(in_channels, channels, 1)  # TF's aspp0
        self.gate = nn.Conv2d(in_channels, channels, 1)  # TF's image_pooling
        self.window, self.stride, self.tf_compat = window, tuple(stride), tf_compat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(image_pool(x, self.window, self.stride))
        g = q_sigmoid(g) if self.tf_compat else F.hardsigmoid(g)
        g = F.interpolate(g, size=x.shape[-2:], mode="bilinear", align_corners=self.tf_compat)
        return self.branch(x) * g


class LiteRASPP(DeepLabV3Plus):
    """Backbone -> gated 1x1 branch -> classifier, plus the low-level features' own
    1x1 logits, summed at `decoder_output_stride` and upsampled to the input size."""

    def _build_aspp(self, spec: FeatureSpec) -> nn.Module:
        cfg = self.cfg
        window = pooling_window(cfg.image_pooling_crop_size, cfg.output_stride)
        stride = tuple(cfg.image_pooling_stride)
        return GatedASPP(spec.channels[-1], cfg.aspp_channels, window, stride, cfg.tf_compat)

    def _build_decoder(self, spec: FeatureSpec) -> int:
        cfg = self.cfg
        # The low-level features' logits (TF's decoder/feature_projection0)
        self.decoder = nn.Conv2d(self._low_level(spec), cfg.num_classes, 1)
        nn.init.normal_(self.decoder.weight, std=0.01)  # small logits at the start
        nn.init.zeros_(self.decoder.bias)
        self.factor = cfg.output_stride // cfg.decoder_output_stride
        return cfg.aspp_channels

    def logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        low = self.low_level(features)
        y = self.classifier(self.dropout(self.aspp(features[-1])))
        y = resize(y, self.factor, low.shape[-2:], self.tf_compat)
        return y + self.decoder(low)
