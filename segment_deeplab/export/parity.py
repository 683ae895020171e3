"""An export compared with PyTorch on the same images, before it is written.

The parity check runs the PyTorch model and the reloaded export on the same images, at
sizes other than the one the export was traced at, so a graph that froze its example
size fails here. It reports the max logit difference and the argmax agreement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segment_deeplab.data.decode import read_image
from segment_deeplab.data.spec import IMAGE_EXTS, SPEC_NAME, DatasetError, open_dataset
from segment_deeplab.export.runtime import ExportError
from segment_deeplab.models.inputs import to_input

SYNTHETIC_BATCHES = ((2, 97, 131), (1, 160, 224))  # (B, H, W): an odd and an aligned size
MIN_AGREEMENT = 0.999  # argmax pixel agreement
LOGIT_RTOL = 1e-3  # max |logit diff| allowed, relative to the largest |logit| (at least 1)
FP16_LOGIT_RTOL = 3e-2  # the same for an fp16 export (a TensorRT engine) against fp32
MAX_SIDE = 512  # parity images are shrunk to this: a full photo adds time, not evidence


class ParityError(ExportError):
    """The export cannot be compared at all: it fails to run, or gives another shape."""


@dataclass
class Parity:
    """Exported model vs PyTorch on the same inputs."""

    max_abs_diff: float | None  # None when the output is class ids
    tolerance: float | None
    agreement: float  # fraction of pixels with the same argmax
    pixels: int
    images: int
    sizes: list[list[int]]  # (H, W) of each batch
    source: str  # "synthetic", or the image folder and "synthetic"

    @property
    def passed(self) -> bool:
        logits_ok = self.max_abs_diff is None or self.max_abs_diff <= (self.tolerance or 0.0)
        return logits_ok and self.agreement >= MIN_AGREEMENT

    def summary(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        diff = ""
        if self.max_abs_diff is not None:
            diff = f"max |logit diff| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.2e}), "
        return (
            f"parity {'ok' if self.passed else 'FAILED'}: {diff}argmax agreement "
            f"{100 * self.agreement:.3f}% (need {100 * MIN_AGREEMENT:.1f}%) over "
            f"{self.images} images ({self.source}; {sizes})"
        )


def synthetic_images(b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """uint8 (b, 3, h, w): smooth colour regions plus noise, closer to photos than noise."""
    coarse = torch.rand(b, 3, max(1, h // 16), max(1, w // 16), generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.randn(b, 3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _shrink(img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape[-2:]
    if max(h, w) <= MAX_SIDE:
        return img
    size = (max(1, round(h * MAX_SIDE / max(h, w))), max(1, round(w * MAX_SIDE / max(h, w))))
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def parity_images(
    data: str | Path | None, spec: str | Path | None = None, count: int = 3
) -> tuple[list[torch.Tensor], str]:
    """uint8 (B, 3, H, W) batches to compare on, and where they came from.

    Args:
        data: a dataset (the first images of its val split, else train) or a plain
            image folder; None: synthetic images only. Synthetic images at an odd
            size and batch 2 always come too: real images may all have the traced size.
        spec: a dataset.yaml kept elsewhere.
        count: how many images to take from `data`.
    """
    g = torch.Generator().manual_seed(0)
    synthetic = [synthetic_images(b, h, w, g) for b, h, w in SYNTHETIC_BATCHES]
    if data is None:
        return synthetic, "synthetic"
    root = Path(data)
    if root.is_dir() and not (root / SPEC_NAME).is_file() and not (root / "images").is_dir():
        folder, stems = root, None  # a plain folder of images
    else:
        ds = open_dataset(root, spec=spec)
        folder = ds.image_dir
        split = next((s for s in ("val", "train") if s in ds.splits), None)
        stems = set(ds.read_split(split)) if split else None
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    files = [f for f in files if stems is None or f.stem in stems][:count]
    if not files:
        raise DatasetError(
            f"no images for the parity check in {folder}; drop --data to use synthetic ones"
        )
    real = [_shrink(read_image(f))[None] for f in files]
    return real + synthetic[:1], f"{folder} and synthetic"


def as_input(images: torch.Tensor, preprocessing: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) as an exported model takes it."""
    if preprocessing:
        return images.permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3) uint8
    return to_input(images)


@torch.no_grad()
def check_parity(
    module: nn.Module,
    runner: Callable,
    batches: list[torch.Tensor],
    source: str,
    device: torch.device | None = None,
    logit_rtol: float = LOGIT_RTOL,
) -> Parity:
    """Run `module` (PyTorch, a DeployModel) and `runner` (the reloaded export) alike,
    on `device` (None: the CPU); logits may differ by `logit_rtol` of the largest.

    Raises:
        ParityError: the export fails to run at a size, or gives another output shape.
    """
    diff, scale, same, pixels, sizes = 0.0, 0.0, 0, 0, []
    for images in batches:
        x = as_input(images, module.preprocessing)
        if device is not None:
            x = x.to(device)
        ref = module(x)
        size = "x".join(map(str, images.shape[-2:]))
        try:
            out = torch.as_tensor(runner(x)).to(ref.device)
        except Exception as e:  # e.g. a graph that froze the example size
            raise ParityError(f"the export fails on {len(images)} image(s) of {size}: {e}") from e
        if out.shape != ref.shape:
            raise ParityError(
                f"the export gives shape {tuple(out.shape)} at {size}, PyTorch {tuple(ref.shape)}"
            )
        if not module.argmax:
            diff = max(diff, (out.float() - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            ref, out = ref.argmax(1), out.argmax(1)
        same += (ref == out).sum().item()
        pixels += ref.numel()
        sizes.append(list(images.shape[-2:]))
    logits = not module.argmax
    return Parity(
        max_abs_diff=diff if logits else None,
        tolerance=logit_rtol * max(1.0, scale) if logits else None,
        agreement=same / max(1, pixels),
        pixels=pixels,
        images=sum(len(b) for b in batches),
        sizes=sizes,
        source=source,
    )
