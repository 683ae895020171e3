"""timm feature extractors with TF DeepLab's output_stride, and the variant names.

A backbone is a timm `features_only` model built with `output_stride=` (dilated last
stages). It returns every feature level; the model picks the last one for ASPP and
the one at `decoder_output_stride` for the v3+ decoder. Keeping every level keeps the
state dict the same for v3 and v3+, so either can initialise the other.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

# TF DeepLab `model_variant` -> timm model name. Any timm name that supports
# features_only works too (e.g. efficientnet_b0, resnet50.a1_in1k).
VARIANTS: dict[str, str] = {
    "xception_41": "xception41",
    "xception_65": "xception65",
    "xception_71": "xception71",
    "resnet_18": "resnet18",
    "resnet_50": "resnet50",
    "resnet_101": "resnet101",
    # TF DeepLab's names: resnet_v1 (7x7 stem) and the _beta stem of three 3x3 convs
    # (64, 64, 128), which is timm's "s" stem.
    "resnet_v1_50": "resnet50",
    "resnet_v1_101": "resnet101",
    "resnet_v1_50_beta": "resnet50s",
    "resnet_v1_101_beta": "resnet101s",
    "mobilenet_v2": "mobilenetv2_100",
    "mobilenet_v3_large": "mobilenetv3_large_100",
    "mobilenet_v3_small": "mobilenetv3_small_100",
    # TF DeepLab's segmentation MobileNetV3s (see MOBILENET_V3_SEG); no timm weights.
    "mobilenet_v3_large_seg": "mobilenetv3_large_seg",
    "mobilenet_v3_small_seg": "mobilenetv3_small_seg",
}

# TF DeepLab's feature_extractor.mobilenet_v3_{large,small}_seg: slim's V3_LARGE and
# V3_SMALL with the last stage and the final 1x1 conv at half width (and the first unit
# of that stage expanding by 3, not 6), as timm block strings.
_V3_LARGE_STEM = [
    ["ds_r1_k3_s1_e1_c16_nre"],
    ["ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"],
    ["ir_r3_k5_s2_e3_c40_se0.25_nre"],
    ["ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"],
    ["ir_r2_k3_s1_e6_c112_se0.25"],
]
_V3_SMALL_STEM = [
    ["ds_r1_k3_s2_e1_c16_se0.25_nre"],
    ["ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"],
    ["ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"],
    ["ir_r2_k5_s1_e3_c48_se0.25"],
]
MOBILENET_V3_SEG = {
    "mobilenetv3_large_seg": _V3_LARGE_STEM
    + [["ir_r1_k5_s2_e3_c80_se0.25", "ir_r2_k5_s1_e6_c80_se0.25"], ["cn_r1_k1_s1_c480"]],
    "mobilenetv3_small_seg": _V3_SMALL_STEM
    + [["ir_r1_k5_s2_e3_c48_se0.25", "ir_r2_k5_s1_e6_c48_se0.25"], ["cn_r1_k1_s1_c288"]],
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """A model setting that cannot be built or initialised; the message says how to fix it."""


@dataclass
class FeatureSpec:
    """What a timm feature extractor gives: one entry per feature level."""

    reductions: list[int]  # input size / feature size, e.g. [2, 4, 8, 16, 16]
    channels: list[int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def timm_name(variant: str) -> str:
    """Map a TF DeepLab variant (or a timm model name) to a timm model name."""
    if variant in VARIANTS:
        return VARIANTS[variant]
    if timm.is_model(variant) or variant in MOBILENET_V3_SEG:  # also pretrained tags
        return variant
    choices = list(VARIANTS) + timm.list_models()
    hit = difflib.get_close_matches(variant, choices, n=1, cutoff=0.6)
    hint = f" Did you mean '{hit[0]}'?" if hit else ""
    raise ModelError(
        f"unknown model_variant '{variant}'.{hint} Valid names: {', '.join(VARIANTS)}, "
        "or any timm model name that supports features_only (see timm.list_models())"
    )


def is_xception(name: str) -> bool:
    return "xception" in name


def create_features(
    name: str, output_stride: int, pretrained: bool = False, pad_type: str = ""
) -> nn.Module:
    """Build timm's features_only model for `name`, dilated to `output_stride`;
    `pad_type="same"` pads as TensorFlow's SAME does (more at the end for stride 2).

    Raises:
        ModelError: the model has no feature extractor, cannot dilate, or does not
            reach `output_stride`.
    """
    # Natively stride-32 models need no output_stride; some constructors reject it.
    kwargs = {} if output_stride == 32 else {"output_stride": output_stride}
    try:
        if name in MOBILENET_V3_SEG:
            body = _mobilenet_v3_seg(name, output_stride, pretrained)
        else:
            body = timm.create_model(name, features_only=True, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "output_stride" not in str(e):
            raise
        raise ModelError(
            f"timm model '{name}' cannot change its output stride (it takes no "
            f"output_stride); use model.output_stride=32 or another backbone, e.g. "
            f"{', '.join(VARIANTS)}"
        ) from e
    except RuntimeError as e:
        if "features_only" not in str(e):
            raise
        raise ModelError(
            f"timm model '{name}' has no feature extractor (features_only); use one of "
            f"{', '.join(VARIANTS)}"
        ) from e
    if pad_type == "same":
        same_padding(body)
    last = body.feature_info.reduction()[-1]
    if last != output_stride:
        raise ModelError(
            f"timm model '{name}' reaches output stride {last}, not the requested "
            f"{output_stride}; set model.output_stride={last} or pick a backbone that "
            f"supports dilation ({', '.join(VARIANTS)})"
        )
    return body


def _mobilenet_v3_seg(name: str, output_stride: int, pretrained: bool) -> nn.Module:
    """timm's MobileNetV3 feature extractor with TF DeepLab's segmentation layout (the
    activations, squeeze-excite gates and channel rounding of timm's mobilenetv3_*_100)."""
    from functools import partial

    from timm.layers import get_act_layer
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.mobilenetv3 import MobileNetV3Features

    if pretrained:
        raise ModelError(
            f"timm has no pretrained weights for '{name}' (TF DeepLab's segmentation "
            "MobileNetV3): start from a TF checkpoint (model.init_checkpoint=CKPT.index, "
            "or `deeplab import-tf`), or use mobilenet_v3_large / mobilenet_v3_small"
        )
    se = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU,
                 rd_round_fn=round_channels)  # fmt: skip
    return MobileNetV3Features(
        decode_arch_def(MOBILENET_V3_SEG[name]),
        output_stride=output_stride,
        act_layer=get_act_layer("hard_swish"),
        se_layer=se,
    )


class Conv2dSame(nn.Conv2d):
    """A strided conv padded as TensorFlow's SAME: the total padding is
    k - s + (-n mod s) on an axis of n pixels (kernel k, dilation included, stride s;
    never negative here, k >= s), the odd pixel after. timm's Conv2dSame gives the same
    numbers from ceil() and max(); this integer form keeps torch.export's symbolic
    shapes simple (an ONNX export of a mobilenet took minutes with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for axis in (1, 0):  # F.pad takes the last axis first
            k = (self.kernel_size[axis] - 1) * self.dilation[axis] + 1
            s = self.stride[axis]
            total = k - s + (-x.shape[2 + axis]) % s
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)  # fmt: skip


def same_padding(module: nn.Module) -> None:
    """Strided convolutions padded as TensorFlow's SAME padding does: the padding a
    stride-2 3x3 conv needs on an even size goes after the image, not before (PyTorch
    pads both sides alike, TF's stride-1 SAME does too, so only strided convs change)."""
    for name, child in module.named_children():
        conv = isinstance(child, nn.Conv2d) and max(child.stride) > 1
        if conv and max(child.kernel_size) > 1 and min(child.kernel_size) >= max(child.stride):
            same = Conv2dSame(
                child.in_channels, child.out_channels, child.kernel_size, child.stride,
                0, child.dilation, child.groups, child.bias is not None,
            )  # fmt: skip
            same.load_state_dict(child.state_dict())
            setattr(module, name, same)
        else:
            same_padding(child)


def feature_spec(body: nn.Module) -> FeatureSpec:
    """Strides, channels and input normalisation of a timm features_only model."""
    info = body.feature_info
    cfg = getattr(body, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return FeatureSpec(list(info.reduction()), list(info.channels()), mean, std)


def low_level_index(spec: FeatureSpec, decoder_output_stride: int, name: str) -> int:
    """Index of the earliest feature at `decoder_output_stride` (TF: the end of that stride)."""
    for i, r in enumerate(spec.reductions[:-1]):
        if r == decoder_output_stride:
            return i
    have = sorted(set(spec.reductions[:-1]))
    raise ModelError(
        f"backbone '{name}' has no feature at decoder_output_stride {decoder_output_stride} "
        f"(feature strides: {spec.reductions}); use one of {have}, or null for DeepLab v3"
    )


def q_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """TF's hard sigmoid in mobilenet_v3 and DeepLab (utils.q_sigmoid): relu6(x + 3) *
    0.16667, which is not quite 1 / 6: timm's hardsigmoid differs by 2e-5 a gate."""
    return torch.nn.functional.relu6(x + 3.0) * 0.16667


class QSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return q_sigmoid(x)


def tf_squeeze_excite(body: nn.Module) -> None:
    """TF's gate in every squeeze-excite of a timm MobileNetV3 (in place)."""
    for m in body.modules():
        if hasattr(m, "conv_reduce") and hasattr(m, "gate"):
            m.gate = QSigmoid()


def mobilenet_depthwise_output(body: nn.Module, layer: int) -> nn.Module:
    """The batch norm (with its activation) after the depthwise conv of slim's layer_K
    (K counts from 1, the stem conv being layer_1) in a timm MobileNet: its output is
    TF's layer_K/depthwise_output."""
    units = [unit for stage in body.blocks for unit in stage]
    unit = units[layer - 2]
    return unit.bn2 if hasattr(unit, "conv_pwl") else unit.bn1  # inverted residual or not


class Subsample(nn.Module):
    """slim's resnet_utils.subsample: every `factor`-th pixel (a 1x1 max pool, strided)."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.factor, :: self.factor]


def is_bottleneck_resnet(body: nn.Module) -> bool:
    """A timm ResNet of bottleneck units (resnet50/101, their "s" stems)."""
    layer = getattr(body, "layer1", None)
    return layer is not None and hasattr(layer[0], "conv3") and hasattr(body, "maxpool")


def tf_resnet_layout(body: nn.Module, output_stride: int, multi_grid=(1, 1, 1)) -> None:
    """Strides and rates of slim's resnet_v1 as TF DeepLab builds it (resnet_v1_beta.py),
    in place on a timm bottleneck ResNet; the weights keep their shapes and names.

    TF puts a block's stride on its *last* unit (timm: on the first), the shortcut of
    that unit subsampling its input; the 3x3 max pool pads SAME (after, on even sizes);
    once `output_stride` is reached the strides become rates, every later unit dilated
    by the strides skipped before it (timm dilates a stage's first unit less), and the
    last block's units by `multi_grid` too. The stem conv pads evenly as PyTorch does.
    """
    from timm.layers import create_pool2d

    body.maxpool = create_pool2d("max", 3, stride=2, padding="same")
    current, rate = 4, 1  # after the stem and the pool
    layers = [body.layer1, body.layer2, body.layer3, body.layer4]
    for b, layer in enumerate(layers):
        units = list(layer)
        for i, unit in enumerate(units):
            s = 2 if b < 3 and i == len(units) - 1 else 1
            grid = multi_grid[i] if b == 3 and i < len(multi_grid) else 1
            if current == output_stride:
                stride, r = 1, rate * grid
                rate *= s
            else:
                stride, r = s, grid
                current *= s
            unit.conv2.stride, unit.conv2.dilation, unit.conv2.padding = (
                (stride,) * 2,
                (r,) * 2,
                (r,) * 2,
            )
            if unit.downsample is not None:  # a 1x1 conv: the unit's stride
                unit.downsample[0].stride = (stride, stride)
            elif stride > 1:
                unit.downsample = Subsample(stride)
