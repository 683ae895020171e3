"""Joint image + mask transforms and the train / eval presets.

Image and mask always move together: images are `tv_tensors.Image` uint8 (3, H, W),
masks `tv_tensors.Mask` (H, W) of class ids. Masks resize with nearest neighbour and
pad with the ignore index, so no invented label ever reaches the loss. Images stay
uint8 here, which keeps batches small to move; `models.inputs.to_input` scales them to
the model's [0, 1] input in the training step, and the model normalises them itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors
from torchvision.transforms.v2._utils import query_size

from segment_deeplab.config import ConfigError, DataConfig
from segment_deeplab.models.inputs import MEAN_RGB


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"{name} must be [height, width] of positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])


def _span(size: int, crop: int, scale: float) -> tuple[int, int]:
    """For one axis: (source length kept, its length after scaling, at most `crop`)."""
    keep = min(size, max(1, round(crop / scale)))
    # A window inside the image fills the crop exactly; a whole axis shorter than the
    # crop after scaling keeps its scaled length and is padded later.
    out = crop if keep < size else min(crop, max(1, round(size * scale)))
    return keep, out


def resize_nearest(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest-neighbour resize of the last two dims, for masks of any integer dtype.

    Samples pixel centres as bilinear does (torch's "nearest-exact"); plain "nearest"
    would shift the mask up to half a pixel against the image. Index gathers, unlike
    `interpolate`, also work for int32/int64 masks.
    """
    ih, iw = x.shape[-2:]
    rows = ((torch.arange(h) + 0.5) * (ih / h)).long().clamp_(max=ih - 1)
    cols = ((torch.arange(w) + 0.5) * (iw / w)).long().clamp_(max=iw - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


class RandomScaleCrop(v2.Transform):
    """Random scale, pad to the crop size, random crop: one op, cropping first.

    Equivalent to resizing the whole image by a random factor in `scale_range`, padding
    it to `crop_size` (image with `fill`, mask with `ignore_index`, bottom and right as
    TF DeepLab and torchvision's references do) and taking a random `crop_size` window.
    It picks the source window that lands in the crop first and resizes only that, so
    a 2x scale costs a crop-sized resize rather than a 4x-sized one.

    Args:
        crop_size: output (height, width).
        scale_range: (min, max) of the uniformly drawn scale factor.
        ignore_index: mask value for padded pixels.
        fill: per-channel image value for padded pixels.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        scale_range: Sequence[float] = (0.5, 2.0),
        ignore_index: int = 255,
        fill: Sequence[int] = MEAN_RGB,
    ) -> None:
        super().__init__()
        self.crop_size = _pair(crop_size, "data.crop_size")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ConfigError(
                f"data.scale_range must be [min, max] with 0 < min <= max, got {scale_range!r}"
            )
        self.scale_range = (lo, hi)
        self.ignore_index = int(ignore_index)
        self.fill = tuple(int(v) for v in fill)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        lo, hi = self.scale_range
        # torch's RNG: DataLoader seeds it per worker, so runs repeat for a seed.
        scale = lo + (hi - lo) * float(torch.rand(()))
        keep_h, out_h = _span(h, self.crop_size[0], scale)
        keep_w, out_w = _span(w, self.crop_size[1], scale)
        top = int(torch.randint(0, h - keep_h + 1, ()))
        left = int(torch.randint(0, w - keep_w + 1, ()))
        return {"box": (top, left, keep_h, keep_w), "out": (out_h, out_w)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, kh, kw = params["box"]
        out_h, out_w = params["out"]
        ch, cw = self.crop_size
        x = inpt.as_subclass(torch.Tensor)[..., top : top + kh, left : left + kw]
        is_mask = isinstance(inpt, tv_tensors.Mask)
        if (out_h, out_w) != (kh, kw):
            if is_mask:
                x = resize_nearest(x, out_h, out_w)
            else:
                x = F.resize_image(x, [out_h, out_w], antialias=True)
        if (out_h, out_w) != (ch, cw):
            if is_mask:
                padded = x.new_full((*x.shape[:-2], ch, cw), self.ignore_index)
            else:
                fill = torch.tensor(self.fill, dtype=x.dtype)
                if x.shape[-3] != len(self.fill):
                    fill = fill[:1]
                padded = fill.view(-1, 1, 1).expand(*x.shape[:-2], ch, cw).clone()
            padded[..., :out_h, :out_w] = x
            x = padded
        x = x.contiguous()
        return tv_tensors.wrap(x, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else x

    # torchvision < 0.21 calls these private names.
    _get_params = make_params
    _transform = transform


def train_transforms(
    crop_size: int | Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    ignore_index: int = 255,
    fill: Sequence[int] = MEAN_RGB,
    color_jitter: float = 0.0,
) -> v2.Compose:
    """DeepLab's train augmentation: random scale, pad, random crop, horizontal flip,
    and optionally colour jitter (applied after the crop, to the image only)."""
    steps = [RandomScaleCrop(crop_size, scale_range, ignore_index, fill), v2.RandomHorizontalFlip()]
    if color_jitter > 0:
        j = color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return v2.Compose(steps)


def eval_transforms() -> v2.Transform:
    """Evaluation sees the full image at its own size (no resize, no crop)."""
    return v2.Identity()


def build_transforms(
    cfg: DataConfig, train: bool, ignore_index: int = 255
) -> Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[Any, Any]]:
    """The preset for a run: `train_transforms` from the data config, or `eval_transforms`."""
    if not train:
        return eval_transforms()
    return train_transforms(
        cfg.crop_size, cfg.scale_range, ignore_index, color_jitter=cfg.color_jitter
    )
