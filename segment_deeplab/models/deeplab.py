"""DeepLabV3 (ASPP on the last feature map) and DeepLabV3Plus (ASPP + low-level decoder).

Both take RGB in [0, 1] of any size and return logits at the input size. Normalisation
happens inside the model (buffers `mean`/`std`), so export and prediction need no
preprocessing beyond scaling to [0, 1].
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from segment_deeplab.config import ModelConfig
from segment_deeplab.models.aspp import ASPP, conv3x3, conv_bn_relu, pooling_window
from segment_deeplab.models.backbones import (
    FeatureSpec,
    ModelError,
    create_features,
    feature_spec,
    is_bottleneck_resnet,
    is_xception,
    low_level_index,
    mobilenet_depthwise_output,
    tf_resnet_layout,
    tf_squeeze_excite,
    timm_name,
)

OUTPUT_STRIDES = (8, 16, 32)
HEADS = ("aspp", "lraspp")
# TF DeepLab's decoder end points of the mobilenets (feature_extractor.py's
# networks_to_feature_maps): decoder_output_stride -> K of layer_K/depthwise_output.
TF_MOBILENET_END_POINTS = {
    "mobilenetv2_100": {4: 4, 8: 7, 16: 14},
    "mobilenetv3_large_seg": {4: 4, 8: 7, 16: 13},
    "mobilenetv3_small_seg": {4: 2, 8: 4, 16: 9},
}


def default_atrous_rates(output_stride: int) -> list[int]:
    """TF DeepLab's rates: 6, 12, 18 at output stride 16, scaled with the stride."""
    return [r * 16 // output_stride for r in (6, 12, 18)]


def check_config(cfg: ModelConfig) -> None:
    """Reject settings that cannot build, with the fix in the message."""
    if cfg.num_classes < 1:
        raise ModelError(
            f"model.num_classes is {cfg.num_classes}; it comes from the dataset description "
            "(or set model.num_classes=N)"
        )
    if cfg.output_stride not in OUTPUT_STRIDES:
        raise ModelError(f"model.output_stride={cfg.output_stride}; use one of {OUTPUT_STRIDES}")
    dos = cfg.decoder_output_stride
    if dos is not None and (dos < 2 or dos > cfg.output_stride):
        raise ModelError(
            f"model.decoder_output_stride={dos} must lie between 2 and the output stride "
            f"({cfg.output_stride}); TF DeepLab v3+ uses 4, null builds DeepLab v3"
        )
    if cfg.atrous_rates is not None and any(int(r) < 1 for r in cfg.atrous_rates):
        raise ModelError(f"model.atrous_rates={cfg.atrous_rates}: rates must be >= 1")
    if cfg.logit_bias is not None and len(cfg.logit_bias) != cfg.num_classes:
        raise ModelError(
            f"model.logit_bias has {len(cfg.logit_bias)} values for {cfg.num_classes} classes; "
            "give one per class, or null"
        )
    if cfg.head not in HEADS:
        raise ModelError(f"model.head={cfg.head!r}; use one of {', '.join(HEADS)}")
    if cfg.head == "lraspp" and dos is None:
        raise ModelError(
            "model.head=lraspp sums the logits of two feature maps: set "
            "model.decoder_output_stride (TF DeepLab's mobilenet_v3 models: 8)"
        )
    for key in ("image_pooling_crop_size", "image_pooling_stride"):
        v = getattr(cfg, key)
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise ModelError(f"model.{key}={v}: give [height, width], each 1 or more")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ModelError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    for key in ("aspp_channels", "decoder_channels", "low_level_channels"):
        if getattr(cfg, key) < 1:
            raise ModelError(f"model.{key}={getattr(cfg, key)} must be >= 1")


def upsample(x: torch.Tensor, factor: int, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a stride-`s` map by `factor`, cut to `size` (H, W).

    Each stride-2 layer rounds up, so the map of an input whose size is no multiple of
    the stride covers ceil(H / s) * s pixels, a little more than the input. Scaling by
    the stride ratio and cutting off the excess keeps every feature over the pixels it
    was computed from; resizing straight to `size` would stretch the map by up to one
    feature and shift the far edge (1.7 mIoU on CamVid's 480x360 at output stride 32).
    """
    h, w = size[0], size[1]  # no int(): tracing for export keeps them dynamic
    if factor > 1:
        y = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        return y[..., :h, :w]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def resize(x: torch.Tensor, factor: int, size, tf_compat: bool) -> torch.Tensor:
    """`upsample`, or TF DeepLab's resize: bilinear to `size` with align_corners=True."""
    if tf_compat:
        return F.interpolate(x, size=(size[0], size[1]), mode="bilinear", align_corners=True)
    return upsample(x, factor, size)


# TF DeepLab's batch-norm epsilon: its head (model.py) and each backbone's arg scope;
# 1e-5 becomes 1.001e-5, the least TF's fused batch norm (slim's default) takes.
TF_HEAD_EPS = 1.001e-5
TF_BACKBONE_EPS = {"xception": 1e-3, "mobilenet": 1e-3, "resnet": 1.001e-5}
# feature_extractor._MEAN_RGB: resnet_v1_50/101 subtract it from 0..255 pixels.
TF_MEAN_RGB = (123.15, 115.90, 103.06)


def tf_input_scaling(backbone: nn.Module) -> tuple[tuple, tuple]:
    """(mean, std) of [0, 1] input that give TF DeepLab's preprocessing: 2 / 255 * pixel
    - 1 for most backbones (the beta resnets too), pixel - TF_MEAN_RGB for resnet_v1
    with its 7x7 stem."""
    if is_bottleneck_resnet(backbone) and isinstance(backbone.conv1, nn.Conv2d):
        return tuple(m / 255 for m in TF_MEAN_RGB), (1 / 255,) * 3
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def set_bn_eps(module: nn.Module, eps: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps


def init_head(module: nn.Module) -> None:
    """Kaiming for convs (they feed ReLUs), BN to identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Decoder(nn.Module):
    """v3+ decoder: upsample ASPP output to the low-level features, concat, two 3x3 convs."""

    def __init__(
        self,
        high_channels: int,
        low_in_channels: int,
        low_channels: int,
        channels: int,
        separable: bool,
        factor: int = 1,
        convs: int = 2,
        tf_compat: bool = False,
    ) -> None:
        super().__init__()
        self.factor = factor  # high-level stride / low-level stride
        self.tf_compat = tf_compat
        # TF reduces the low-level features to 48 channels so they do not outweigh ASPP.
        self.project = conv_bn_relu(low_in_channels, low_channels, 1)
        fuse = [conv3x3(high_channels + low_channels, channels, 1, separable)]
        fuse += [conv3x3(channels, channels, 1, separable) for _ in range(convs - 1)]
        self.fuse = nn.Sequential(*fuse)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.project(low)  # (B, low_channels, H/4, W/4) at decoder stride 4
        high = resize(high, self.factor, low.shape[-2:], self.tf_compat)
        return self.fuse(torch.cat([high, low], dim=1))  # (B, channels, H/4, W/4)


class DeepLabV3(nn.Module):
    """Backbone -> ASPP -> dropout -> 1x1 classifier -> upsample to the input size.

    Attributes:
        cfg: the ModelConfig it was built from (a copy).
        output_stride: input size / backbone output size.
        timm_name: the timm model behind `backbone`.
        atrous_rates, separable: the resolved ASPP settings.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_config(cfg)
        self.cfg = copy.deepcopy(cfg)
        self.timm_name = timm_name(cfg.model_variant)
        self.output_stride = cfg.output_stride
        self.atrous_rates = (
            [int(r) for r in cfg.atrous_rates]
            if cfg.atrous_rates is not None
            else default_atrous_rates(cfg.output_stride)
        )
        self.separable = is_xception(self.timm_name) if cfg.separable is None else cfg.separable
        self.tf_compat = cfg.tf_compat
        # TF DeepLab pads mobilenet's strided convs SAME (more after than before on even
        # sizes); xception and resnet pad them explicitly and evenly, as PyTorch does.
        same = cfg.tf_compat and "mobilenet" in self.timm_name
        self.backbone = create_features(self.timm_name, cfg.output_stride, pad_type="same" * same)
        spec = feature_spec(self.backbone)
        if cfg.tf_compat and is_bottleneck_resnet(self.backbone):
            tf_resnet_layout(self.backbone, cfg.output_stride)
        if same:
            tf_squeeze_excite(self.backbone)
        if cfg.tf_compat:
            spec.mean, spec.std = tf_input_scaling(self.backbone)
            kind = next((k for k in TF_BACKBONE_EPS if k in self.timm_name), None)
            if kind is not None:
                set_bn_eps(self.backbone, TF_BACKBONE_EPS[kind])
        self.feature_strides = spec.reductions
        # Not saved in state dicts: they follow from the config, and files from timm or
        # torchvision would otherwise lack them.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.aspp = self._build_aspp(spec)
        # Stride of the classifier's input: the decoder's in v3+, the output stride in v3.
        self.head_stride = cfg.output_stride
        head_channels = self._build_decoder(spec)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Conv2d(head_channels, cfg.num_classes, 1)
        # Class prior correction, added to the logits in eval mode only (training's loss
        # sees the raw logits). It follows from the config, so it is not in state dicts.
        bias = None
        if cfg.logit_bias is not None:
            bias = torch.tensor(cfg.logit_bias, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("logit_bias", bias, persistent=False)
        init_head(self.aspp)
        if cfg.tf_compat:
            set_bn_eps(self.aspp, TF_HEAD_EPS)
            if hasattr(self, "decoder"):
                set_bn_eps(self.decoder, TF_HEAD_EPS)
        # Small logits at the start: no class is favoured before training.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def _build_aspp(self, spec: FeatureSpec) -> nn.Module:
        cfg = self.cfg
        return ASPP(
            spec.channels[-1],
            cfg.aspp_channels,
            self.atrous_rates,
            cfg.image_pooling,
            self.separable,
            pooling_window(cfg.image_pooling_crop_size, cfg.output_stride),
            tuple(cfg.image_pooling_stride),
            align_corners=cfg.tf_compat,
        )

    def _build_decoder(self, spec: FeatureSpec) -> int:
        """Create the decoder (none in v3); return the classifier's input channels."""
        return self.cfg.aspp_channels

    def decode(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        return x

    def logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The backbone's features -> logits at `head_stride`."""
        # Dropout after the ASPP projection, where TF DeepLab has it (keep_prob 0.9): at
        # the output stride it costs a sixteenth of what it would at the decoder's.
        y = self.dropout(self.aspp(features[-1]))  # (B, aspp_channels, H/os, W/os)
        return self.classifier(self.decode(y, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> logits (B, num_classes, H, W)."""
        size = x.shape[-2:]
        y = self.logits(self.backbone((x - self.mean) / self.std))
        if self.logit_bias is not None and not self.training:
            y = y + self.logit_bias
        # In fp32: under bf16 autocast the CPU's bilinear kernel is slower in bf16 (11%
        # of the whole forward pass at 480x360), and the loss wants fp32 logits anyway.
        return resize(y.float(), self.head_stride, size, self.tf_compat)


class DeepLabV3Plus(DeepLabV3):
    """DeepLabV3 plus a decoder that fuses features at `decoder_output_stride` (TF default 4)."""

    def _build_decoder(self, spec: FeatureSpec) -> int:
        cfg = self.cfg
        if cfg.decoder_output_stride is None:
            raise ModelError("DeepLabV3Plus needs model.decoder_output_stride (TF default: 4)")
        self.decoder = Decoder(
            cfg.aspp_channels,
            self._low_level(spec),
            cfg.low_level_channels,
            cfg.decoder_channels,
            self.separable,
            factor=cfg.output_stride // cfg.decoder_output_stride,
            convs=cfg.decoder_convs,
            tf_compat=cfg.tf_compat,
        )
        init_head(self.decoder)
        return cfg.decoder_channels

    def _low_level(self, spec: FeatureSpec) -> int:
        """Choose the decoder's low-level features (TF DeepLab's end point under
        tf_compat); return their channels."""
        cfg = self.cfg
        self.low_index = low_level_index(spec, cfg.decoder_output_stride, self.timm_name)
        self.head_stride = cfg.decoder_output_stride
        self._pre_act: list[torch.Tensor] = []
        if cfg.tf_compat and is_xception(self.timm_name):
            self._tap_before_activation()
        elif cfg.tf_compat and is_bottleneck_resnet(self.backbone):
            self._tap_resnet_end_point()
        elif cfg.tf_compat and self.timm_name in TF_MOBILENET_END_POINTS:
            return self._tap_mobilenet_end_point()
        return spec.channels[self.low_index]

    def _tap_before_activation(self) -> None:
        """TF DeepLab's xception decoder end point (entry_flow/block2/.../
        separable_conv2_pointwise) is the tensor before the ReLU that timm's feature
        tap follows: take the ReLU's input instead (and keep the ReLU from overwriting
        it in place)."""
        name = self.backbone.feature_info.module_name()[self.low_index]
        act = self.backbone.get_submodule(name.replace("blocks.", "blocks_", 1))
        act.inplace = False
        act.register_forward_pre_hook(lambda _m, args: self._pre_act.append(args[0]))

    def _tap_resnet_end_point(self) -> None:
        """TF DeepLab's resnet decoder end point, block1/unit_2/bottleneck_v1/conv3: the
        second unit's residual branch before the sum (block1's last unit is strided
        there, so its output is at stride 8)."""
        if self.cfg.decoder_output_stride != 4:
            raise ModelError(
                "TF DeepLab's resnet decoder reads stride 4 (block1/unit_2): set "
                f"model.decoder_output_stride=4, not {self.cfg.decoder_output_stride}"
            )
        bn3 = self.backbone.layer1[-2].bn3
        # A copy: the unit adds the shortcut to this tensor in place.
        bn3.register_forward_hook(lambda _m, _args, out: self._pre_act.append(out.clone()))

    def _tap_mobilenet_end_point(self) -> int:
        """TF DeepLab's mobilenet decoder end points are inner tensors, layer_K/
        depthwise_output: a unit's depthwise conv after its batch norm and activation
        (before squeeze-excite and the projection). Returns their channels."""
        points = TF_MOBILENET_END_POINTS[self.timm_name]
        dos = self.cfg.decoder_output_stride
        if dos not in points:
            raise ModelError(
                f"TF DeepLab's {self.cfg.model_variant} decoder reads output stride "
                f"{', '.join(map(str, points))}: set model.decoder_output_stride to one of them"
            )
        bn = mobilenet_depthwise_output(self.backbone, points[dos])
        bn.register_forward_hook(lambda _m, _args, out: self._pre_act.append(out.clone()))
        return bn.num_features

    def low_level(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The decoder's low-level features of this forward pass."""
        low = self._pre_act.pop() if self._pre_act else features[self.low_index]
        self._pre_act.clear()
        return low

    def decode(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(x, self.low_level(features))
