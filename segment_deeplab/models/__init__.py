"""DeepLab models: `build_model(cfg)` from a ModelConfig, and the names it accepts.

model = build_model(ModelConfig(model_variant="xception_65", num_classes=21))
logits = model(images)  # (B, 3, H, W) RGB in [0, 1] -> (B, 21, H, W)
"""

from __future__ import annotations

import torch.nn as nn

from segment_deeplab.config import ModelConfig
from segment_deeplab.models.backbones import VARIANTS, ModelError
from segment_deeplab.models.deeplab import DeepLabV3, DeepLabV3Plus
from segment_deeplab.models.init import InitSummary, load_pretrained
from segment_deeplab.models.lraspp import LiteRASPP

# Architecture name -> class; build_model picks by model.head and decoder_output_stride.
MODELS: dict[str, type[DeepLabV3]] = {
    "deeplabv3": DeepLabV3,
    "deeplabv3plus": DeepLabV3Plus,
    "lraspp": LiteRASPP,
}

__all__ = [
    "MODELS",
    "VARIANTS",
    "DeepLabV3",
    "DeepLabV3Plus",
    "InitSummary",
    "LiteRASPP",
    "ModelError",
    "build_model",
    "load_pretrained",
]


def build_model(cfg: ModelConfig, verbose: bool = False) -> nn.Module:
    """Build DeepLabV3 (decoder_output_stride None), DeepLabV3Plus, or LiteRASPP
    (model.head=lraspp).

    `cfg.pretrained` loads timm's named weights and prints a one-line summary of what was
    loaded (names too when `verbose`). `cfg.init_checkpoint` is a file for the training
    setup to read (`checkpoint.load_init_checkpoint`); building never reads files.

    Raises:
        ModelError: a setting that cannot be built, or weights that cannot be loaded.
    """
    arch = "deeplabv3" if cfg.decoder_output_stride is None else "deeplabv3plus"
    arch = "lraspp" if cfg.head == "lraspp" else arch
    model = MODELS[arch](cfg)
    if cfg.pretrained:
        print(load_pretrained(model, verbose))
    return model
