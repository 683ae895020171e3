"""Typed run configuration: dataclasses with commented defaults, YAML load/save, overrides.

The resolved config is written to every run folder and into every checkpoint, so a
checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


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
    aspp_channels: int = 256
    decoder_channels: int = 256
    # Channels of the 1x1 projection of the low-level features (TF DeepLab: 48).
    low_level_channels: int = 48
    # Dropout before the classifier.
    dropout: float = 0.1
    # Added to each class's logit when the model predicts (eval mode), never in training.
    # Training fills it from the class weights (see train.prior_correction).
    logit_bias: list[float] | None = None
    # Ask timm for its named ImageNet weights (needs internet or a warm hub cache).
    pretrained: bool = False
    # A local file to initialise from: segment-deeplab checkpoint or backbone state dict.
    init_checkpoint: str | None = None


@dataclass
class DataConfig:
    """How images become batches."""

    # Training crop (height, width); TF DeepLab's train_crop_size.
    crop_size: list[int] = field(default_factory=lambda: [513, 513])
    # Random scale range of the train preset.
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    batch_size: int = 8
    # Loader worker processes; None picks min(4, cores).
    workers: int | None = None


@dataclass
class TrainConfig:
    """Optimisation recipe: SGD + poly LR, as DeepLab trains."""

    # Length of the run: steps wins over epochs; time ("20m", "1h") scales the schedule
    # to a wall-clock budget.
    steps: int | None = None
    epochs: int | None = None
    time: str | None = None
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
    channels_last: bool = True
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


# The recommended recipe on a CPU, found by the CamVid benchmark (BENCHMARKS.md) and
# shipped as configs/deeplabv3plus_resnet18_camvid_256.yaml. `deeplab train` starts
# from it on a CPU when no --config is given: cheap steps (output stride 32, separable
# 128-channel head, 256x256 crops) and AdamW get furthest per CPU minute.
CPU_RECIPE: dict[str, dict[str, Any]] = {
    "model": {
        "model_variant": "resnet_18",
        "output_stride": 32,
        "separable": True,
        "aspp_channels": 128,
        "decoder_channels": 128,
    },
    "data": {"crop_size": [256, 256], "scale_range": [0.75, 1.25], "batch_size": 8},
    "train": {
        "optimizer": "adamw",
        "lr": 0.004,
        "weight_decay": 0.01,
        "warmup_steps": 20,
        "class_weights": "auto",
    },
}


def cpu_recipe() -> Config:
    """Defaults with CPU_RECIPE applied."""
    return Config.from_dict(CPU_RECIPE)


class ConfigError(ValueError):
    """A config key or value that does not fit; the message says how to fix it."""


def _closest(name: str, choices: list[str]) -> str:
    hit = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean '{hit[0]}'?" if hit else ""


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
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
            kwargs[key] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    # YAML gives ints, floats, bools, null and [lists] for free.
    return yaml.safe_load(text)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` (or unique `key=value`) overrides to a config."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.lr=0.02)")
        key, text = item.split("=", 1)
        parts = key.split(".")
        if len(parts) == 1:
            owners = [s for s in d if isinstance(d[s], dict) and parts[0] in d[s]]
            if len(owners) != 1:
                every = [f"{s}.{k}" for s in d for k in d[s]]
                raise ConfigError(
                    f"unknown config key '{key}'.{_closest(key, every)} Use section.key=value."
                )
            parts = [owners[0], parts[0]]
        node = d
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown config section '{p}' in '{key}'")
            node = node[p]
        if parts[-1] not in node:
            section = ".".join(parts[:-1])
            full = [f"{section}.{k}" for k in node]
            raise ConfigError(
                f"unknown config key '{key}'.{_closest('.'.join(parts), full)} "
                f"Valid keys: {', '.join(full)}"
            )
        node[parts[-1]] = _parse_value(text)
    return Config.from_dict(d)


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, base: Config | None = None
) -> Config:
    """Defaults (or `base`), then the YAML file (if any), then key=value overrides."""
    cfg = base or Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        with p.open() as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping with model/data/train sections")
        cfg = Config.from_dict(data)
    return apply_overrides(cfg, overrides or [])


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
