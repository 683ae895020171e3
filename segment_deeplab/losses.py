"""Segmentation losses that all honour the dataset's ignore index.

`build_loss(cfg, num_classes, ignore_index, class_stats)` returns a callable
`loss(logits (B,C,H,W), target (B,H,W)) -> scalar`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from segment_deeplab.config import ConfigError, TrainConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def auto_class_weights(pixels: Sequence[float]) -> list[float]:
    """ENet's 1 / ln(1.02 + p) weighting from class pixel shares, normalised to mean 1.

    Rare classes weigh more, but bounded (at most ~50x), unlike plain inverse frequency.
    """
    total = float(sum(pixels)) or 1.0
    raw = [1.0 / math.log(1.02 + p / total) for p in pixels]
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    weight: torch.Tensor | None = None,
    top_k_percent: float = 1.0,
) -> torch.Tensor:
    """Pixel-wise cross-entropy; with top_k_percent < 1 only the hardest pixels count.

    Hard-pixel mining is TF DeepLab's `top_k_percent_pixels`: losses of ignored pixels
    are zero, so they never enter the top k.
    """
    if top_k_percent >= 1.0:
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction="none"
    ).flatten()
    valid = int((target != ignore_index).sum())
    k = max(1, int(top_k_percent * valid))
    return per_pixel.topk(k).values.mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Soft Dice over classes present in the batch, ignoring ignore pixels."""
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)  # (B,1,H,W)
    probs = logits.float().softmax(1) * valid
    onehot = F.one_hot(target.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2)
    onehot = onehot * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return 1.0 - dice[present].mean() if present.any() else logits.sum() * 0.0


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    weight: torch.Tensor | None = None,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Focal loss (Lin et al.): cross-entropy scaled down on easy pixels."""
    ce = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    pt = torch.exp(-ce)
    loss = ((1 - pt) ** gamma * ce)[valid]
    return loss.mean() if loss.numel() else logits.sum() * 0.0


def resolve_class_weights(
    spec: str | list[float] | None, num_classes: int, class_pixels: Sequence[float] | None
) -> list[float] | None:
    """Turn the `class_weights` setting into one weight per class (or None)."""
    if spec is None:
        return None
    if spec == "auto":
        if not class_pixels or len(class_pixels) != num_classes:
            raise ConfigError(
                "class_weights=auto needs the class statistics that `deeplab prepare` writes "
                "into dataset.yaml; run prepare again or give explicit weights"
            )
        return auto_class_weights(class_pixels)
    if isinstance(spec, str):
        raise ConfigError(f"class_weights must be 'auto' or a list of numbers, got {spec!r}")
    if len(spec) != num_classes:
        raise ConfigError(f"class_weights has {len(spec)} values for {num_classes} classes")
    return [float(w) for w in spec]


def prior_logit_bias(
    cfg: TrainConfig, num_classes: int, class_pixels: Sequence[float] | None
) -> list[float] | None:
    """`model.logit_bias` that takes class weights' prior shift back out at inference.

    Cross-entropy weighted by w_c is minimised by probabilities proportional to w_c times
    the true ones, so the trained logits carry + log w_c. Subtracting
    `prior_correction * log w_c` (w normalised to geometric mean 1) leaves the features
    the weights taught and removes their bias towards rare classes. None without weights.
    """
    if cfg.prior_correction < 0:
        raise ConfigError(
            f"train.prior_correction={cfg.prior_correction}; use 0 (keep the class weights' "
            "shift) to 1 (undo it)"
        )
    weights = resolve_class_weights(cfg.class_weights, num_classes, class_pixels)
    if not weights or cfg.prior_correction == 0:
        return None
    if min(weights) <= 0:
        raise ConfigError(f"class_weights must all be > 0 to correct for them, got {weights}")
    logs = [math.log(w) for w in weights]
    mean = sum(logs) / len(logs)
    return [round(-cfg.prior_correction * (v - mean), 6) for v in logs]


def build_loss(
    cfg: TrainConfig,
    num_classes: int,
    ignore_index: int,
    class_pixels: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
) -> LossFn:
    weights = resolve_class_weights(cfg.class_weights, num_classes, class_pixels)
    w = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
    names = [n.strip() for n in cfg.loss.split("+")]
    parts: list[LossFn] = []
    for name in names:
        if name == "ce":
            parts.append(lambda x, y: cross_entropy(x, y, ignore_index, w, cfg.top_k_percent))
        elif name == "dice":
            parts.append(lambda x, y: dice_loss(x, y, ignore_index))
        elif name == "focal":
            parts.append(lambda x, y: focal_loss(x, y, ignore_index, w))
        else:
            raise ConfigError(
                f"unknown loss '{name}'; choose from ce, dice, focal (or e.g. ce+dice)"
            )

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # the loss in fp32 even under autocast
        return sum(p(logits, target) for p in parts)

    return loss
