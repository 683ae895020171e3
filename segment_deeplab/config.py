"""Typed run configuration: dataclasses with commented defaults, YAML load/save, overrides.

The resolved config is written to every run folder and into every checkpoint, so a
checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segment_deeplab.atomic import write_text


@dataclass
class ModelConfig:
    """DeepLab model knobs, with TF DeepLab's meaning."""

    # Backbone: a TF DeepLab variant name (xception_65, resnet_101, mobilenet_v2, ...)
    # or any timm model name that supports features_only.
    model_variant: str = "resnet_50"
    # Filled from the dataset description; never counts the ignore value.
    num_classes: int = 0
    # Ratio of input to backbone output resolution: 8, 16 or 32.
    output_stride: int = 16
    # ASPP dilation rates; None means TF DeepLab's default for the output stride
    # (6, 12, 18 at 16; doubled at 8; halved at 32).
    atrous_rates: list[int] | None = None
    # Stride of the low-level features the v3+ decoder fuses; None builds DeepLab v3.
    decoder_output_stride: int | None = 4
    # ASPP branch with global average pooling ("image pooling").
    image_pooling: bool = True
    # Depthwise-separable convolutions in ASPP and decoder; None: on for xception variants.
    separable: bool | None = None
    # 3x3 convs that fuse the ASPP output with the low-level features in the v3+ decoder
    # (TF DeepLab: 2; smp's DeepLabV3Plus: 1).
    decoder_convs: int = 2
    aspp_channels: int = 256
    decoder_channels: int = 256
    # Channels of the 1x1 projection of the low-level features (TF DeepLab: 48).
    low_level_channels: int = 48
    # The head on the backbone: "aspp" (DeepLab's ASPP; with decoder_output_stride, the
    # v3+ concat decoder) or "lraspp" (TF DeepLab's mobilenet_v3 head, the MobileNetV3
    # paper's Lite R-ASPP: a 1x1 branch of aspp_channels gated by pooled features, and
    # a decoder that sums two 1x1 convs into the logits at decoder_output_stride).
    head: str = "aspp"
    # TF's image_pooling_crop_size: pool the image-level branch over windows of this
    # input size (at the output stride) moved by image_pooling_stride, not over the
    # whole image (null). TF DeepLab's mobilenet_v3 models: [769, 769] and [4, 5].
    image_pooling_crop_size: list[int] | None = None
    image_pooling_stride: list[int] = field(default_factory=lambda: [1, 1])
    # Dropout before the classifier.
    dropout: float = 0.1
    # Added to each class's logit when the model predicts (eval mode), never in training.
    # Training fills it from the class weights (see train.prior_correction).
    logit_bias: list[float] | None = None
    # Ask timm for its named ImageNet weights (needs internet or a warm hub cache).
    pretrained: bool = False
    # A local file to initialise from: segment-deeplab checkpoint or backbone state dict.
    init_checkpoint: str | None = None
    # TF DeepLab's arithmetic, so a model imported from a TF checkpoint (`deeplab
    # import-tf`, which sets it) gives TF's numbers: inputs scaled to [-1, 1], TF's
    # padding of strided convs, batch-norm epsilons, bilinear resizes with
    # align_corners, and the low-level features taken before their ReLU.
    tf_compat: bool = False


@dataclass
class DataConfig:
    """How images become batches."""

    # Training crop (height, width); TF DeepLab's train_crop_size.
    crop_size: list[int] = field(default_factory=lambda: [513, 513])
    # Random scale range of the train preset.
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    batch_size: int = 8
    # Photometric augmentation: brightness, contrast and saturation each scaled by a
    # random factor in [1 - j, 1 + j] per training image (0: off). Helps a model meet
    # lighting it did not train on (other videos, sites, cameras).
    color_jitter: float = 0.0
    # Loader worker processes; None picks min(4, cores).
    workers: int | None = None
    # Training from shards: samples each loader worker holds to shuffle across its
    # shards (memory: this many encoded samples per worker).
    shard_buffer: int = 256


@dataclass
class TrainConfig:
    """Optimisation recipe: SGD + poly LR, as DeepLab trains."""

    # Length of the run: steps wins over epochs; time ("20m", "1h") scales the schedule
    # to a wall-clock budget.
    steps: int | None = None
    epochs: int | None = None
    time: str | None = None
    # With a time budget: the run does not end before this many steps, however slow the
    # machine (it then runs past the budget, and the LR schedule follows the steps), so
    # a budget picked on a fast CPU still trains enough on a slow one.
    min_steps: int | None = None
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # Poly decay power (TF DeepLab: 0.9) and linear warm-up length.
    poly_power: float = 0.9
    warmup_steps: int = 0
    loss: str = "ce"  # ce | dice | focal | ce+dice
    # None, "auto" (from the class frequencies prepare recorded) or one weight per class.
    class_weights: str | list[float] | None = None
    # Class weights make rare classes learn faster but also shift every decision towards
    # them (a weighted model over-predicts pole, sign, ...). The trained model takes
    # this fraction of that shift back out: model.logit_bias = -prior_correction *
    # log(weight), applied at inference only. 1 undoes it fully (logit adjustment, Menon
    # et al. 2021); 0 keeps it.
    prior_correction: float = 1.0
    # Hard-pixel mining: keep this fraction of the hardest pixels (TF DeepLab's
    # top_k_percent_pixels); 1.0 keeps all.
    top_k_percent: float = 1.0
    # Freeze batch norm: None decides from the per-device batch size (< 8 freezes),
    # as TF DeepLab's fine_tune_batch_norm advice does.
    freeze_bn: bool | None = None
    # Mixed precision: "auto" uses bf16 where the hardware gains from it.
    amp: str = "auto"  # auto | off | bf16 | fp16
    # Activations laid out channels_last: None decides (`device.channels_last_pays`): on
    # GPUs and under CPU autocast (bf16), not for fp32 on a CPU, where it is slower.
    channels_last: bool | None = None
    # Training on the CPU: glibc's malloc keeps freed memory for the next step instead of
    # returning every large tensor to the system (`device.keep_freed_memory`): 11-20%
    # faster steps for about 13% more peak memory.
    keep_cpu_memory: bool = True
    compile: bool = False
    val_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 20
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return _build(cls, d or {}, "")


# The ready-made runs shipped with the package (also at configs/ in a source checkout).
RECIPES = Path(__file__).resolve().parent / "configs"
# The recommended recipe on a CPU, found by the CamVid benchmark (BENCHMARKS.md):
# `deeplab train` starts from it on a CPU when no --config is given.
CPU_RECIPE = RECIPES / "deeplabv3plus_resnet18_camvid_256.yaml"
# Run-length keys: a length given on the command line replaces a config file's.
LENGTH_KEYS = ("train.steps", "train.epochs", "train.time", "train.min_steps")


def cpu_recipe() -> Config:
    """The shipped CPU recipe (`CPU_RECIPE`)."""
    return load_config(CPU_RECIPE)


class ConfigError(ValueError):
    """A config key or value that does not fit; the message says how to fix it."""


def _closest(name: str, choices: list[str]) -> str:
    hit = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean '{hit[0]}'?" if hit else ""


# Bounds checked when a config is built: key -> (test, what the value must be).
_BOUNDS: dict[str, tuple[Any, str]] = {
    "data.batch_size": (lambda v: v >= 1, "at least 1"),
    "data.workers": (lambda v: v >= 0, "0 or more"),
    "data.color_jitter": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.3"),
    "model.decoder_convs": (lambda v: v in (1, 2), "1 or 2 (TF DeepLab: 2)"),
    "train.steps": (lambda v: v >= 1, "at least 1"),
    "train.epochs": (lambda v: v >= 1, "at least 1"),
    "train.min_steps": (lambda v: v >= 1, "at least 1"),
    "train.lr": (lambda v: v > 0, "positive, e.g. 0.01"),
    "train.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.weight_decay": (lambda v: v >= 0, "0 or more"),
    "train.poly_power": (lambda v: v >= 0, "0 or more"),
    "train.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "train.top_k_percent": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.val_every": (lambda v: v >= 1, "at least 1"),
    "train.checkpoint_every": (lambda v: v >= 1, "at least 1"),
    "train.log_every": (lambda v: v >= 1, "at least 1"),
}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(hint: Any) -> str:
    """'a number', 'a list of integers or null', ... for a type hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as type `hint`, or raise TypeError. Numbers written as strings count
    (YAML 1.1 reads 1e-4 as a string); booleans are never numbers."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce(v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint in (int, float):
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise TypeError from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError
        if hint is int:
            if float(value) != int(value):
                raise TypeError
            return int(value)
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError
        return str(value)
    return value


def _typed(key: str, value: Any, hint: Any) -> Any:
    """`value` checked against the field's type and bounds; the error names the key."""
    try:
        out = _coerce(value, hint)
    except TypeError:
        raise ConfigError(
            f"config key '{key}' must be {_describe(hint)}, got {value!r} ({type(value).__name__})"
        ) from None
    if key in _BOUNDS and out is not None:
        test, must = _BOUNDS[key]
        if not test(out):
            raise ConfigError(f"config key '{key}' must be {must}, got {out!r}")
    return out


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{_closest(key, names)} "
                f"Valid keys: {', '.join(prefix + n for n in names)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _typed(prefix + key, value, hint)
    return cls(**kwargs)


def _full_key(d: dict[str, Any], key: str) -> str:
    """`section.key` for `key` or `section.key`, or a ConfigError naming the closest."""
    parts = key.split(".")
    if len(parts) == 1:
        owners = [s for s in d if isinstance(d[s], dict) and parts[0] in d[s]]
        if len(owners) != 1:
            every = [f"{s}.{k}" for s in d for k in d[s]]
            raise ConfigError(
                f"unknown config key '{key}'.{_closest(key, every)} Use section.key=value."
            )
        return f"{owners[0]}.{parts[0]}"
    if len(parts) != 2 or not isinstance(d.get(parts[0]), dict):
        raise ConfigError(f"unknown config section '{parts[0]}' in '{key}'")
    if parts[1] not in d[parts[0]]:
        full = [f"{parts[0]}.{k}" for k in d[parts[0]]]
        raise ConfigError(
            f"unknown config key '{key}'.{_closest(key, full)} Valid keys: {', '.join(full)}"
        )
    return key


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["train.lr=0.02", "crop_size=[321,321]"] -> {"train.lr": 0.02, ...} (YAML values)."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.lr=0.02)")
        key, text = item.split("=", 1)
        try:
            out[key] = yaml.safe_load(text)  # ints, floats, bools, null and [lists]
        except yaml.YAMLError:
            out[key] = text
    return out


def override(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of `cfg` with `section.key` (or unique `key`) set to typed values, checked."""
    d = cfg.to_dict()
    for key, value in values.items():
        section, name = _full_key(d, key).split(".")
        d[section][name] = value
    return Config.from_dict(d)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` (or unique `key=value`) overrides to a config."""
    return override(cfg, parse_overrides(overrides))


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    base: Config | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Defaults (or `base`), then the YAML file (if any), then `values` (typed, e.g. from
    command-line flags), then key=value `overrides`.

    A run length among `values` or `overrides` (steps, epochs, time, min_steps) replaces the
    lengths of the file and the base: the run is as long as the command line says.
    """
    cfg = base or Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping with model/data/train sections")
        cfg = Config.from_dict(data)
    given = {**(values or {}), **parse_overrides(overrides or [])}
    d = cfg.to_dict()
    full = {_full_key(d, k): v for k, v in given.items()}
    if any(k in full for k in LENGTH_KEYS):
        full = {**{k: None for k in LENGTH_KEYS}, **full}
    return override(cfg, full)


def save_config(cfg: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
