"""TF DeepLab checkpoints as segment-deeplab models: variable names mapped, layouts
converted, TF's arithmetic kept (`model.tf_compat`), without TensorFlow.

The checkpoint is read by `tf_checkpoint.read_checkpoint` (TF's tensor-bundle format).
TF DeepLab's variables (research/deeplab/model.py and core/xception.py, slim's
mobilenet_v2) map to the model's modules:

    xception_65/entry_flow/conv1_1              backbone.stem_0 (conv + BatchNorm)
    xception_65/{entry,middle,exit}_flow/blockB/unit_U/xception_module/
        separable_convJ_{depthwise,pointwise}   backbone.blocks_N.stack.convJ.{conv_dw,conv_pw}
        shortcut                                backbone.blocks_N.shortcut
    MobilenetV2/Conv, expanded_conv[_K]/{expand,depthwise,project}
                                                backbone.conv_stem, backbone.blocks.S.I.*
    MobilenetV3/..., expanded_conv_K/squeeze_excite/Conv[_1], Conv_1
                                                ... .se.conv_{reduce,expand}, the last 1x1
    aspp0, aspp{i}[_depthwise|_pointwise]       aspp.branches.{0,i}
    image_pooling                               aspp.branches[-1]
    concat_projection                           aspp.project (its input blocks reordered:
                                                TF concatenates image pooling first)
    decoder/feature_projection0                 decoder.project
    decoder/decoder_conv{0,1}_*                 decoder.fuse.{0,1}
    logits/semantic                             classifier

TF DeepLab's mobilenet_v3 head (model.head=lraspp, models/lraspp.py) maps as

    aspp0, image_pooling (a gate, with biases)  aspp.branch, aspp.gate
    decoder/feature_projection0                 decoder (the low-level logits)
    decoder/decoder_conv0                       classifier (decoder_output_is_logits)

Kernels go from TF's HWIO to PyTorch's OIHW (depthwise HW-C-1 to C-1-HW); batch norm
takes gamma (1 when TF had scale=False), beta and the moving statistics; the epsilons
are TF's (`tf_compat`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from segment_deeplab.config import ModelConfig
from segment_deeplab.models.backbones import ModelError

# TF DeepLab's model_variant -> the scope its backbone variables live under
BACKBONE_SCOPES = {
    "xception_41": "xception_41",
    "xception_65": "xception_65",
    "xception_71": "xception_71",
    "mobilenet_v2": "MobilenetV2",
    "resnet_v1_50": "resnet_v1_50",
    "resnet_v1_50_beta": "resnet_v1_50",
    "resnet_v1_101": "resnet_v1_101",
    "resnet_v1_101_beta": "resnet_v1_101",
    "mobilenet_v3_large_seg": "MobilenetV3",
    "mobilenet_v3_small_seg": "MobilenetV3",
}
# The flags of TF DeepLab's mobilenet_v3 model zoo (g3doc/model_zoo.md) that no
# variable records: output stride, and the image-pooling windows of the gate.
LRASPP_ZOO = {"output_stride": 32, "image_pooling_crop_size": [769, 769],
              "image_pooling_stride": [4, 5]}  # fmt: skip
# Xception: (flow, block) of each timm block, in order
_XCEPTION_FLOWS = {
    "xception_41": [("entry_flow", 1), ("entry_flow", 2), ("entry_flow", 3)]
    + [("middle_flow", 1)] * 8
    + [("exit_flow", 1), ("exit_flow", 2)],
    "xception_65": [("entry_flow", 1), ("entry_flow", 2), ("entry_flow", 3)]
    + [("middle_flow", 1)] * 16
    + [("exit_flow", 1), ("exit_flow", 2)],
    "xception_71": [("entry_flow", b) for b in range(1, 6)]
    + [("middle_flow", 1)] * 16
    + [("exit_flow", 1), ("exit_flow", 2)],
}
# resnet_v1_50/101: units per block (timm's layer1..layer4)
_RESNET_UNITS = {"resnet_v1_50": [3, 4, 6, 3], "resnet_v1_101": [3, 4, 23, 3]}
BN_KEYS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
           "moving_variance": "running_var"}  # fmt: skip


@dataclass
class ImportReport:
    mapped: int = 0
    left_in_tf: list[str] = field(default_factory=list)  # optimizer slots, global_step, ...
    new_in_model: list[str] = field(default_factory=list)  # e.g. the head of an ImageNet file
    head_is_new: bool = False


def _xception_layers(variant: str) -> list[tuple[str, str, str]]:
    """(TF scope, conv key, batch-norm prefix) of every conv of the backbone."""
    scope = BACKBONE_SCOPES[variant]
    out = [
        (f"{scope}/entry_flow/conv1_1", "backbone.stem_0.conv", "backbone.stem_0.bn"),
        (f"{scope}/entry_flow/conv1_2", "backbone.stem_1.conv", "backbone.stem_1.bn"),
    ]
    units: dict[tuple[str, int], int] = {}
    for n, (flow, block) in enumerate(_XCEPTION_FLOWS[variant]):
        units[(flow, block)] = units.get((flow, block), 0) + 1
        tf = f"{scope}/{flow}/block{block}/unit_{units[(flow, block)]}/xception_module"
        ours = f"backbone.blocks_{n}"
        for j in (1, 2, 3):
            for part, conv, bn in (
                ("depthwise", "conv_dw", "bn_dw"),
                ("pointwise", "conv_pw", "bn_pw"),
            ):
                out.append((f"{tf}/separable_conv{j}_{part}", f"{ours}.stack.conv{j}.{conv}",
                            f"{ours}.stack.conv{j}.{bn}"))  # fmt: skip
        out.append((f"{tf}/shortcut", f"{ours}.shortcut.conv", f"{ours}.shortcut.bn"))
    return out


def _resnet_layers(variant: str) -> list[tuple[str, str, str]]:
    """resnet_v1_{50,101}[_beta]: the stem (conv1, or the beta's conv1_1..3) and every
    unit's bottleneck_v1/{conv1,conv2,conv3,shortcut}."""
    scope = BACKBONE_SCOPES[variant]
    if variant.endswith("_beta"):  # timm's deep stem: conv1.{0,3,6}, the last one's BN bn1
        out = [(f"{scope}/conv1_1", "backbone.conv1.0", "backbone.conv1.1"),
               (f"{scope}/conv1_2", "backbone.conv1.3", "backbone.conv1.4"),
               (f"{scope}/conv1_3", "backbone.conv1.6", "backbone.bn1")]  # fmt: skip
    else:
        out = [(f"{scope}/conv1", "backbone.conv1", "backbone.bn1")]
    for b, units in enumerate(_RESNET_UNITS[scope], 1):
        for u in range(units):
            tf, ours = f"{scope}/block{b}/unit_{u + 1}/bottleneck_v1", f"backbone.layer{b}.{u}"
            out += [(f"{tf}/conv{j}", f"{ours}.conv{j}", f"{ours}.bn{j}") for j in (1, 2, 3)]
            out.append((f"{tf}/shortcut", f"{ours}.downsample.0", f"{ours}.downsample.1"))
    return out


def _mobilenet_layers(scope: str, body: torch.nn.Module) -> list[tuple[str, str, str | None]]:
    """slim's mobilenet (v2, v3) over timm's blocks: Conv (the stem), expanded_conv,
    expanded_conv_1, ... ({expand,} depthwise, project, squeeze_excite/Conv{,_1}), and
    v3's last 1x1 conv, Conv_1. A batch-norm prefix of None: a conv with biases."""
    out: list[tuple[str, str, str | None]] = [
        (f"{scope}/Conv", "backbone.conv_stem", "backbone.bn1")
    ]
    k = 0
    for s, stage in enumerate(body.blocks):
        for i, unit in enumerate(stage):
            ours = f"backbone.blocks.{s}.{i}"
            if not hasattr(unit, "conv_dw"):  # timm's ConvBnAct: v3's final 1x1 conv
                out.append((f"{scope}/Conv_1", f"{ours}.conv", f"{ours}.bn1"))
                continue
            tf = f"{scope}/expanded_conv" + (f"_{k}" if k else "")
            k += 1
            if hasattr(unit, "conv_pwl"):  # inverted residual: expand, depthwise, project
                out += [(f"{tf}/expand", f"{ours}.conv_pw", f"{ours}.bn1"),
                        (f"{tf}/depthwise", f"{ours}.conv_dw", f"{ours}.bn2"),
                        (f"{tf}/project", f"{ours}.conv_pwl", f"{ours}.bn3")]  # fmt: skip
            else:  # no expansion (TF's inner size = the input's): depthwise, project
                out += [(f"{tf}/depthwise", f"{ours}.conv_dw", f"{ours}.bn1"),
                        (f"{tf}/project", f"{ours}.conv_pw", f"{ours}.bn2")]  # fmt: skip
            if hasattr(unit.se, "conv_reduce"):
                se = f"{tf}/squeeze_excite/Conv"
                out += [(se, f"{ours}.se.conv_reduce", None),
                        (f"{se}_1", f"{ours}.se.conv_expand", None)]  # fmt: skip
    return out


def _lraspp_layers() -> list[tuple[str, str, str | None]]:
    return [
        ("aspp0", "aspp.branch.0", "aspp.branch.1"),
        ("image_pooling", "aspp.gate", None),
        ("decoder/feature_projection0", "decoder", None),
        ("decoder/decoder_conv0", "classifier", None),
    ]


def _head_layers(rates: int, separable: bool, pooling: bool, decoder: bool) -> list:
    out = [("aspp0", "aspp.branches.0.0", "aspp.branches.0.1")]
    for i in range(1, rates + 1):
        b = f"aspp.branches.{i}"
        if separable:
            out += [(f"aspp{i}_depthwise", f"{b}.0", f"{b}.1"),
                    (f"aspp{i}_pointwise", f"{b}.3", f"{b}.4")]  # fmt: skip
        else:
            out.append((f"aspp{i}", f"{b}.0", f"{b}.1"))
    if pooling:
        b = f"aspp.branches.{rates + 1}.conv"
        out.append(("image_pooling", f"{b}.0", f"{b}.1"))
    out.append(("concat_projection", "aspp.project.0", "aspp.project.1"))
    if decoder:
        out.append(("decoder/feature_projection0", "decoder.project.0", "decoder.project.1"))
        for j in (0, 1):
            f = f"decoder.fuse.{j}"
            if separable:
                out += [(f"decoder/decoder_conv{j}_depthwise", f"{f}.0", f"{f}.1"),
                        (f"decoder/decoder_conv{j}_pointwise", f"{f}.3", f"{f}.4")]  # fmt: skip
            else:
                out.append((f"decoder/decoder_conv{j}", f"{f}.0", f"{f}.1"))
    return out


def _kernel(tensors: dict, scope: str) -> np.ndarray | None:
    if f"{scope}/depthwise_weights" in tensors:  # (H, W, C, 1) -> (C, 1, H, W)
        w = tensors[f"{scope}/depthwise_weights"]
        return w.reshape(w.shape[0], w.shape[1], -1, 1).transpose(2, 3, 0, 1)
    if f"{scope}/weights" in tensors:  # (H, W, I, O) -> (O, I, H, W)
        return tensors[f"{scope}/weights"].transpose(3, 2, 0, 1)
    return None


def tf_variant(variant: str) -> str:
    """The TF DeepLab variant of a model variant (resnet_50 is resnet_v1_50: one network)."""
    from segment_deeplab.models.backbones import timm_name

    if variant in BACKBONE_SCOPES:
        return variant
    same = [v for v in BACKBONE_SCOPES if timm_name(v) == timm_name(variant)]
    if not same:
        raise ModelError(f"{variant}: TF checkpoints import for {', '.join(BACKBONE_SCOPES)}")
    return same[0]


def _decoder_stride(variant: str, channels: int, output_stride: int) -> int:
    """The decoder_output_stride whose TF end point has `channels` (read off
    decoder/feature_projection0): the mobilenets' differ per stride; 4 for the others."""
    from segment_deeplab.models.backbones import (
        create_features,
        mobilenet_depthwise_output,
        timm_name,
    )
    from segment_deeplab.models.deeplab import TF_MOBILENET_END_POINTS

    name = timm_name(variant)
    if name not in TF_MOBILENET_END_POINTS:
        return 4
    body = create_features(name, output_stride)
    points = TF_MOBILENET_END_POINTS[name]
    for dos, layer in sorted(points.items()):
        if mobilenet_depthwise_output(body, layer).num_features == channels:
            return dos
    raise ModelError(
        f"decoder/feature_projection0 takes {channels} channels, which no {variant} end "
        f"point has (TF's decoder_output_stride {', '.join(map(str, points))}): check "
        "--model-variant"
    )


def model_config(
    tensors: dict,
    variant: str,
    num_classes: int | None,
    output_stride: int | None = None,
    image_pooling_crop_size: list[int] | None = None,
    image_pooling_stride: list[int] | None = None,
) -> ModelConfig:
    """The ModelConfig of the network a TF DeepLab checkpoint holds (its head read off
    the variables present), with tf_compat on. What no variable records (the output
    stride, the image-pooling windows) is the caller's, else TF's defaults: output
    stride 16, and for the mobilenet_v3 head its model zoo's flags (LRASPP_ZOO). An
    image_pooling_crop_size of [] pools the whole image."""
    if variant not in BACKBONE_SCOPES:
        raise ModelError(
            f"--model-variant {variant}: TF checkpoints import for {', '.join(BACKBONE_SCOPES)}"
        )
    scope = BACKBONE_SCOPES[variant]
    if not any(k.startswith(scope + "/") for k in tensors):
        found = sorted({k.split("/")[0] for k in tensors})[:8]
        raise ModelError(
            f"no {scope}/ variables in the checkpoint (it holds {', '.join(found)}); give "
            "the --model-variant it was trained with"
        )
    has_head = "aspp0/weights" in tensors
    # aspp_with_squeeze_and_excitation: image pooling is a gate (biases, no batch norm)
    gated = "image_pooling/biases" in tensors
    lraspp = gated or (not has_head and variant.startswith("mobilenet_v3"))
    if gated and ("concat_projection/weights" in tensors or "logits/semantic/weights" in tensors
                  or "decoder/decoder_conv0/biases" not in tensors):  # fmt: skip
        raise ModelError(
            "the checkpoint's head gates ASPP with image pooling but is not TF DeepLab's "
            "mobilenet_v3 head (aspp_with_concat_projection=0, decoder_use_sum_merge=1, "
            "decoder_output_is_logits=1), the one gated head that imports"
        )
    logits = "decoder/decoder_conv0/weights" if lraspp else "logits/semantic/weights"
    if logits in tensors:
        found = int(tensors[logits].shape[-1])
        if num_classes is not None and num_classes != found:
            raise ModelError(
                f"the checkpoint's logits have {found} classes, not --num-classes "
                f"{num_classes}; leave --num-classes out, or give {found}"
            )
        num_classes = found
    if num_classes is None:
        raise ModelError("the checkpoint has no logits (a backbone only): give --num-classes N")
    zoo = LRASPP_ZOO if lraspp else {"output_stride": 16}
    output_stride = output_stride or zoo["output_stride"]
    if image_pooling_crop_size is None:
        image_pooling_crop_size = zoo.get("image_pooling_crop_size")
    image_pooling_crop_size = image_pooling_crop_size or None  # []: the whole image
    image_pooling_stride = image_pooling_stride or zoo.get("image_pooling_stride", [1, 1])
    separable = "aspp1_depthwise/depthwise_weights" in tensors or (
        "decoder/decoder_conv0_depthwise/depthwise_weights" in tensors
    )
    rates = sum(1 for i in (1, 2, 3) if f"aspp{i}_depthwise/depthwise_weights" in tensors
                or f"aspp{i}/weights" in tensors)  # fmt: skip
    decoder = "decoder/feature_projection0/weights" in tensors or (
        not has_head and (variant.startswith("xception") or lraspp)
    )
    dos = None
    if "decoder/feature_projection0/weights" in tensors:
        channels = int(tensors["decoder/feature_projection0/weights"].shape[-2])
        dos = _decoder_stride(variant, channels, output_stride)
    elif decoder:
        dos = 8 if lraspp else 4
    base = [6, 12, 18]
    aspp_channels = int(tensors["aspp0/weights"].shape[-1]) if has_head else 256
    return ModelConfig(
        model_variant=variant,
        num_classes=num_classes,
        output_stride=output_stride,
        atrous_rates=[r * 16 // output_stride for r in base[:rates]] if has_head else None,
        decoder_output_stride=dos,
        image_pooling="image_pooling/weights" in tensors or not has_head,
        separable=separable if has_head else None,
        aspp_channels=aspp_channels if has_head or not lraspp else 128,
        head="lraspp" if lraspp else "aspp",
        image_pooling_crop_size=image_pooling_crop_size,
        image_pooling_stride=list(image_pooling_stride),
        tf_compat=True,
    )


def convert(tensors: dict, model: torch.nn.Module, strict: bool = True) -> ImportReport:
    """Copy the checkpoint's tensors into `model` (in place); what was used and not.

    strict: a tensor whose shape differs from the model's is an error (`import-tf`);
    otherwise it is left out (training from a TF checkpoint: a new head, other classes).
    """
    rates = len(model.atrous_rates)
    cfg = model.cfg
    variant = tf_variant(cfg.model_variant)
    if variant.startswith("xception"):
        layers = _xception_layers(variant)
    elif variant.startswith("resnet"):
        layers = _resnet_layers(variant)
    else:
        layers = _mobilenet_layers(BACKBONE_SCOPES[variant], model.backbone)
    if cfg.head == "lraspp":
        layers += _lraspp_layers()
    else:
        layers += _head_layers(rates, bool(model.separable), cfg.image_pooling,
                               hasattr(model, "decoder"))  # fmt: skip
    state = model.state_dict()
    used: set[str] = set()
    filled: set[str] = set()
    for scope, conv, bn in layers:
        w = _kernel(tensors, scope)
        if w is None or f"{conv}.weight" not in state:
            continue
        if scope == "concat_projection" and cfg.image_pooling:
            w = _pooling_last(w, cfg.aspp_channels)
        if not _put(state, f"{conv}.weight", w, scope, strict):
            continue
        filled.add(f"{conv}.weight")
        used.update(k for k in (f"{scope}/weights", f"{scope}/depthwise_weights") if k in tensors)
        name = f"{scope}/biases"
        has_bias = name in tensors and f"{conv}.bias" in state
        if has_bias and _put(state, f"{conv}.bias", tensors[name], name, strict):
            used.add(name)
            filled.add(f"{conv}.bias")
        if bn is None:
            continue
        for tf_key, key in BN_KEYS.items():
            name = f"{scope}/BatchNorm/{tf_key}"
            if name in tensors and _put(state, f"{bn}.{key}", tensors[name], name, strict):
                used.add(name)
                filled.add(f"{bn}.{key}")
            elif tf_key == "gamma" and f"{bn}.weight" in state:  # slim's scale=False
                state[f"{bn}.weight"].fill_(1.0)
                filled.add(f"{bn}.weight")
    for tf_key, key in (("weights", "weight"), ("biases", "bias")):
        name = f"logits/semantic/{tf_key}"
        if name in tensors:
            w = tensors[name]
            w = w.transpose(3, 2, 0, 1) if w.ndim == 4 else w
            if _put(state, f"classifier.{key}", w, name, strict):
                used.add(name)
                filled.add(f"classifier.{key}")
    model.load_state_dict(state)
    report = ImportReport(mapped=len(used))
    report.left_in_tf = sorted(k for k in tensors if k not in used)
    report.new_in_model = sorted(
        k for k in state if k not in filled and not k.endswith("num_batches_tracked")
    )
    report.head_is_new = "classifier.weight" not in filled
    return report


def _pooling_last(w: np.ndarray, depth: int) -> np.ndarray:
    """concat_projection's input blocks from TF's order (image pooling, aspp0, aspp1..)
    to the model's (aspp0, aspp1.., image pooling)."""
    return np.concatenate([w[:, depth:], w[:, :depth]], axis=1)


def _put(state: dict, key: str, value: np.ndarray, name: str, strict: bool) -> bool:
    """Copy `value` into state[key]; False (or an error when `strict`) on other shapes."""
    target = state[key]
    value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if tuple(value.shape) != tuple(target.shape):
        if not strict:
            return False
        raise ModelError(
            f"TF variable {name} has shape {tuple(value.shape)} (converted), the model's "
            f"{key} {tuple(target.shape)}: the checkpoint holds another network; check "
            "--model-variant and --output-stride"
        )
    target.copy_(value.to(target.dtype))
    return True


def is_tf_checkpoint(path: str | Path) -> bool:
    """A TF V2 checkpoint: PREFIX.index (or its prefix, or a folder with `checkpoint`)."""
    p = Path(path)
    return (
        p.name.endswith(".index")
        or Path(f"{p}.index").is_file()
        or (p.is_dir() and (p / "checkpoint").is_file())
    )


_SLOTS = re.compile(r"/(Momentum|Adam(_1)?|ExponentialMovingAverage|RMSProp(_1)?)$")


def describe_left(names: list[str]) -> str:
    """The TF tensors left out, summarised: optimizer slots, step counters, the rest."""
    slots = [n for n in names if _SLOTS.search(n)]
    steps = [n for n in names if n.endswith("global_step")]
    rest = [n for n in names if n not in slots and n not in steps]
    parts = []
    if slots:
        parts.append(f"{len(slots)} optimizer slots")
    if steps:
        parts.append("global_step")
    if rest:
        shown = ", ".join(rest[:5]) + (f" and {len(rest) - 5} more" if len(rest) > 5 else "")
        parts.append(f"{len(rest)} others ({shown})")
    return "; ".join(parts) or "none"


def import_tf(
    path: str | Path,
    variant: str,
    num_classes: int | None = None,
    output_stride: int | None = None,
    image_pooling_crop_size: list[int] | None = None,
    image_pooling_stride: list[int] | None = None,
) -> tuple[torch.nn.Module, ImportReport]:
    """The model of a TF DeepLab checkpoint, its weights in place (eval mode); see
    `model_config` for the settings no variable records."""
    from segment_deeplab.models import build_model
    from segment_deeplab.models.tf_checkpoint import read_checkpoint

    tensors = read_checkpoint(path)
    cfg = model_config(tensors, variant, num_classes, output_stride, image_pooling_crop_size,
                       image_pooling_stride)  # fmt: skip
    model = build_model(cfg)
    return model.eval(), convert(tensors, model, strict=True)


def lraspp_settings(path: str | Path, cfg: ModelConfig) -> dict | None:
    """The model settings that training from a checkpoint with TF DeepLab's mobilenet_v3
    head needs to keep that head (model.head=lraspp, the decoder's stride and channels
    read off the checkpoint, the zoo's pooling windows unless set), or None for a
    checkpoint without that head or a model of another variant."""
    from segment_deeplab.models.tf_checkpoint import list_checkpoint

    if cfg.model_variant not in ("mobilenet_v3_large_seg", "mobilenet_v3_small_seg"):
        return None
    shapes = list_checkpoint(path)
    if "image_pooling/biases" not in shapes or "decoder/feature_projection0/weights" not in shapes:
        return None
    channels = int(shapes["decoder/feature_projection0/weights"][1][-2])
    out = {
        "head": "lraspp",
        "decoder_output_stride": _decoder_stride(cfg.model_variant, channels, cfg.output_stride),
        "aspp_channels": int(shapes["aspp0/weights"][1][-1]),
        "atrous_rates": [],
    }
    if cfg.image_pooling_crop_size is None:
        out["image_pooling_crop_size"] = LRASPP_ZOO["image_pooling_crop_size"]
        out["image_pooling_stride"] = LRASPP_ZOO["image_pooling_stride"]
    return out


def init_from_tf(model: torch.nn.Module, path: str | Path) -> ImportReport:
    """Training's `--init-checkpoint CKPT.index`: whatever of the checkpoint fits the
    model (the backbone; the head when its shapes agree)."""
    from segment_deeplab.models.tf_checkpoint import read_checkpoint

    return convert(read_checkpoint(path), model, strict=False)


def summary(report: ImportReport) -> str:
    """One paragraph for the user: what was mapped, left, and new."""
    lines = [f"mapped {report.mapped} TF tensors"]
    lines.append(f"left in the TF checkpoint: {describe_left(report.left_in_tf)}")
    if report.new_in_model:
        new = report.new_in_model
        shown = ", ".join(new[:4]) + (f" and {len(new) - 4} more" if len(new) > 4 else "")
        what = "the head is new (trained from scratch)" if report.head_is_new else "new"
        lines.append(f"{what}: {len(new)} model tensors not in it ({shown})")
    return "; ".join(lines)
