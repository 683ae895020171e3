"""Class scores for whole images: multi-scale and flip TTA, sliding windows.

Shared by `evaluate`, `predict`, the report's gallery and `Segmenter`. TF DeepLab's
`eval_scales` and `add_flipped_images` become `TTA.scales` and `TTA.flip`: softmax
probabilities from every scale (and its mirror) are resized to the original size and
averaged. Images larger than `TTA.window` are cut into overlapping tiles whose
probabilities are averaged, so a full-resolution photo never needs one giant pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segment_deeplab.device import autocast, autocast_dtype, model_device
from segment_deeplab.models.deeplab import DeepLabV3
from segment_deeplab.models.inputs import pad_bottom_right, pad_color, to_input

# Most window tiles (times images) in one forward pass of the sliding-window mode.
TILE_BATCH = 8
MIN_WINDOW = 16


@dataclass(frozen=True)
class TTA:
    """Test-time options: TF DeepLab's eval_scales and add_flipped_images, and tiling.

    Attributes:
        scales: input scales whose probabilities are averaged.
        flip: also average the left-right mirrored input.
        window: tile size for images larger than it (sliding window); None: whole image.
        overlap: fraction of a tile shared with its neighbour.
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: int | None = None
    overlap: float = 1 / 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, e.g. 1.0; got {self.scales}")
        if self.window is not None and self.window < MIN_WINDOW:
            raise ValueError(f"window must be at least {MIN_WINDOW} pixels, got {self.window}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")

    def single_pass(self, h: int, w: int) -> bool:
        """One forward pass of the image as it is: no scales, flip or tiling."""
        tiled = self.window is not None and max(h, w) > self.window
        return self.scales == (1.0,) and not self.flip and not tiled


# No test-time augmentation: one pass of the image as it is (a shared default; frozen).
PLAIN = TTA()


def forward_dtype(model: nn.Module, amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `model` runs under: `amp` for the project's models (as training
    chose it), None (as saved) for exported ones and other models."""
    return autocast_dtype(amp, device) if isinstance(model, DeepLabV3) else None


def labels(scores: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) class ids. `max(1).indices` equals `argmax(1)` and is
    about 10x faster on CPUs, where the argmax kernel over channels is not vectorised."""
    return scores.max(1).indices


def input_multiple(model: nn.Module) -> int:
    """What an input's height and width are padded to a multiple of before the model.

    The project's DeepLab models upsample stride-aligned (`models.deeplab.upsample`), so
    they take any size as it is; exports say what they need (`input_multiple` in their
    metadata); other models with an `output_stride` get padded to it.
    """
    if isinstance(model, DeepLabV3):
        return 1
    multiple = getattr(model, "input_multiple", None)
    if multiple is None:
        multiple = getattr(model, "output_stride", 1)
    return int(multiple or 1)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, C, h, w) of model input (B, 3, h, w), padded to `input_multiple(model)`
    with the mean colour if needed and cut back; channels_last, as the model is laid out.
    """
    s = input_multiple(model)
    h, w = x.shape[-2:]
    ph, pw = (-h) % s, (-w) % s
    if ph or pw:
        x = pad_bottom_right(x, ph, pw, pad_color(model))
    out = model(x.contiguous(memory_format=torch.channels_last))
    if isinstance(out, dict):  # torchvision-style {"out": ...} models
        out = out["out"]
    return out[..., :h, :w]


def _starts(size: int, window: int, step: int) -> list[int]:
    """Tile origins covering 0..size, the last tile flush with the end."""
    if size <= window:
        return [0]
    n = math.ceil((size - window) / step) + 1
    return sorted({min(i * step, size - window) for i in range(n)})


def _probs_tiled(model: nn.Module, x: torch.Tensor, tta: TTA) -> torch.Tensor:
    """Probabilities of (B, 3, h, w), tiled when larger than `tta.window`."""
    b, _, h, w = x.shape
    window = tta.window
    if window is None or (h <= window and w <= window):
        return logits(model, x).float().softmax(1)
    step = max(1, int(window * (1 - tta.overlap)))
    th, tw = min(window, h), min(window, w)  # every tile is this size: starts are clamped
    origins = [(y, x0) for y in _starts(h, window, step) for x0 in _starts(w, window, step)]
    probs: torch.Tensor | None = None
    count = torch.zeros((1, 1, h, w), device=x.device)
    # Several tiles per forward pass keep a GPU busy; TILE_BATCH bounds the memory.
    per_pass = max(1, TILE_BATCH // b)
    for k in range(0, len(origins), per_pass):
        chunk = origins[k : k + per_pass]
        tiles = torch.cat([x[..., y : y + th, x0 : x0 + tw] for y, x0 in chunk])
        p = logits(model, tiles).float().softmax(1)  # (len(chunk) * B, C, th, tw)
        if probs is None:
            probs = x.new_zeros((b, p.shape[1], h, w), dtype=torch.float32)
        for j, (y, x0) in enumerate(chunk):
            probs[..., y : y + th, x0 : x0 + tw] += p[j * b : (j + 1) * b]
            count[..., y : y + th, x0 : x0 + tw] += 1
    return probs / count


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    tta: TTA = PLAIN,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Class probabilities of images at their original size.

    Args:
        model: a segmentation model in eval mode taking (B, 3, H, W) RGB in [0, 1].
        images: uint8 (3, H, W) or (B, 3, H, W); floats are taken as already in [0, 1].
        tta: scales, flip and sliding window.
        dtype: autocast dtype of the forward pass (`forward_dtype`); None: fp32.

    Returns:
        (B, C, H, W) float32 probabilities on the model's device.
    """
    x = to_input(images, model_device(model))
    h, w = x.shape[-2:]
    total: torch.Tensor | None = None
    passes = 0
    for s in tta.scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        xs = x
        if size != (h, w):
            # antialias keeps downscaled inputs free of aliasing, as PIL resizing would be.
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
        for mirrored in (False, True) if tta.flip else (False,):
            with autocast(x.device, dtype):
                p = _probs_tiled(model, xs.flip(-1) if mirrored else xs, tta)
            if mirrored:
                p = p.flip(-1)
            if p.shape[-2:] != (h, w):
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
            passes += 1
    return total / passes


@torch.inference_mode()
def predict_scores(
    model: nn.Module,
    images: torch.Tensor,
    tta: TTA = PLAIN,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, C, H, W) scores whose argmax over C is the prediction (see `predict_probs`).

    A single pass (`TTA.single_pass`) returns the logits: their argmax is that of the
    probabilities, and the softmax is skipped.
    """
    x = to_input(images, model_device(model))
    if not tta.single_pass(*x.shape[-2:]):
        return predict_probs(model, x, tta, dtype)
    with autocast(x.device, dtype):
        return logits(model, x)


def predict_labels(
    model: nn.Module,
    images: torch.Tensor,
    tta: TTA = PLAIN,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, H, W) int64 class ids, with the options of `predict_probs`."""
    return labels(predict_scores(model, images, tta, dtype))


def tta_from(scales: Sequence[float] = (1.0,), flip: bool = False, window: int | None = None):
    """A `TTA` from the CLI's and metrics.json's spelling of the options."""
    return TTA(tuple(scales or (1.0,)), bool(flip), window)
