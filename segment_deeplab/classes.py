"""The classes of a model or dataset, and their colours as pictures.

`ClassInfo` (id, name, colour) is how checkpoints, exports, dataset.yaml and reports
all carry the class list (`to_dicts` / `from_dicts`). Index masks are saved as palette
("P") PNGs: the pixel values are the class ids, so the file is a valid training mask,
and any image viewer shows the class colours.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


@dataclass
class ClassInfo:
    id: int
    name: str
    color: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "color": list(self.color)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassInfo:
        return cls(int(d["id"]), str(d["name"]), tuple(int(v) for v in d["color"]))


def to_dicts(classes: Iterable[ClassInfo]) -> list[dict[str, Any]]:
    """The JSON/YAML form of a class list: [{id, name, color}]."""
    return [c.to_dict() for c in classes]


def from_dicts(items: Iterable[dict[str, Any]]) -> list[ClassInfo]:
    """A class list from its JSON/YAML form (checkpoints, exports, metadata)."""
    return [ClassInfo.from_dict(d) for d in items]


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """PASCAL VOC's colour map: distinct colours for any number of classes."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def placeholder_classes(ids: list[int]) -> list[ClassInfo]:
    """Classes for ids seen in the masks, named class_<id>, coloured by the VOC palette."""
    pal = default_palette(max(ids) + 1 if ids else 0)
    return [ClassInfo(i, f"class_{i}", pal[i]) for i in sorted(ids)]


# The confusion heat map's ramp, white to dark blue (metrics PNG and the HTML report).
HEAT_LOW, HEAT_HIGH = (255, 255, 255), (8, 48, 107)


def heat_color(v: float) -> tuple[int, int, int]:
    """The heat-map colour of a fraction v in [0, 1]."""
    return tuple(
        int(round(lo + (hi - lo) * float(v))) for lo, hi in zip(HEAT_LOW, HEAT_HIGH, strict=True)
    )


Color = tuple[int, int, int]
ArrayLike = np.ndarray | torch.Tensor


def _as_numpy(x: ArrayLike | Image.Image) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _colors(classes: Sequence[ClassInfo] | Sequence[Color]) -> list[Color]:
    return [tuple(c.color) if isinstance(c, ClassInfo) else tuple(c) for c in classes]


def make_palette(
    colors: Sequence[ClassInfo] | Sequence[Color],
    ignore_index: int = 255,
    ignore_color: Color = (0, 0, 0),
) -> list[int]:
    """A flat 768-value PIL palette: class i gets colors[i], the ignore value its colour."""
    colors = _colors(colors)
    if len(colors) > 256:
        raise ValueError(f"a P-mode palette holds 256 colours, got {len(colors)} classes")
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(colors)] = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if 0 <= ignore_index < 256 and ignore_index >= len(colors):
        pal[ignore_index] = ignore_color
    return pal.reshape(-1).tolist()


def colorize(
    index_map: ArrayLike,
    colors: Sequence[ClassInfo] | Sequence[Color],
    ignore_index: int = 255,
    ignore_color: Color = (0, 0, 0),
) -> Image.Image:
    """An (H, W) class-id map as a P-mode image whose palette is the class colours.

    Ignore pixels outside 0..255 (e.g. -1) are stored as 255 (or the first free id),
    coloured `ignore_color`.
    """
    m = _as_numpy(index_map)
    if m.ndim != 2:
        raise ValueError(f"index map must be (H, W), got shape {m.shape}")
    n = len(colors)
    ignored = m == ignore_index
    stored_ignore = ignore_index if 0 <= ignore_index < 256 else 255
    bad = ~ignored & ((m < 0) | (m >= n))
    if bad.any():
        raise ValueError(f"index map holds values outside 0..{n - 1}: {np.unique(m[bad])[:8]}")
    # putpalette turns the 8-bit "L" image into mode "P" with the pixel values kept.
    img = Image.fromarray(np.where(ignored, stored_ignore, m).astype(np.uint8))
    img.putpalette(make_palette(colors, stored_ignore, ignore_color))
    return img


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at `size` pixels (no font files needed)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def legend(
    classes: Sequence[ClassInfo], height: int | None = None, font_size: int = 14
) -> Image.Image:
    """A white RGB panel listing classes as coloured squares with their names."""
    font = load_font(font_size)
    pad, box = font_size // 2, font_size
    row = box + pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(probe.textlength(c.name, font=font)) for c in classes), default=0)
    width = pad * 3 + box + text_w
    h = max(height or 0, pad + row * len(classes))
    panel = Image.new("RGB", (width, h), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, c in enumerate(classes):
        y = pad + i * row
        draw.rectangle([pad, y, pad + box - 1, y + box - 1], fill=tuple(c.color), outline=(0,) * 3)
        draw.text((2 * pad + box, y + box // 2), c.name, fill=(0, 0, 0), font=font, anchor="lm")
    return panel


def overlay(
    image: ArrayLike | Image.Image,
    index_map: ArrayLike,
    classes: Sequence[ClassInfo],
    alpha: float = 0.5,
    ignore_index: int = 255,
    show_legend: bool = True,
) -> Image.Image:
    """Blend class colours over an image and add a legend of the classes present.

    Args:
        image: PIL image, (H, W, 3) uint8 array or (3, H, W) uint8 tensor.
        index_map: (H, W) class ids at the image's size; ignore pixels and classes
            coloured black stay unblended.
        classes: the class list (ids 0..C-1), for colours and names.
        alpha: weight of the class colour.

    Returns:
        RGB image: the blend, with the legend panel to its right.
    """
    if isinstance(image, Image.Image):
        rgb = np.asarray(image.convert("RGB"))
    else:
        rgb = _as_numpy(image)
        if rgb.ndim == 3 and rgb.shape[0] == 3 and rgb.shape[-1] != 3:
            rgb = rgb.transpose(1, 2, 0)
    m = _as_numpy(index_map)
    if rgb.shape[:2] != m.shape:
        raise ValueError(f"image {rgb.shape[:2]} and index map {m.shape} sizes differ")
    colors = np.asarray(_colors(classes), dtype=np.uint8).reshape(-1, 3)
    n = len(colors)
    valid = (m >= 0) & (m < n) & (m != ignore_index)
    # Row n of the look-up tables: pixels of no class. Black is VOC's "background"
    # colour: blending it would only darken the photo, so it tints nothing either.
    ids = np.where(valid, m, n)
    lut = np.concatenate([colors, np.zeros((1, 3), np.uint8)])
    tint = np.append(np.where(colors.any(-1), 255, 0), 0).astype(np.uint8)
    base = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if n < 256:  # PIL looks the colours up in C
        index = Image.fromarray(ids.astype(np.uint8), "L")
        paint = index.copy()
        paint.putpalette(lut.reshape(-1).tolist())
        paint, mask = paint.convert("RGB"), index.point(tint.tolist() + [0] * (255 - n))
    else:
        paint, mask = Image.fromarray(lut[ids]), Image.fromarray(tint[ids])
    # PIL blends and masks in C: about 4x faster than the same sums in numpy floats.
    out = Image.composite(Image.blend(base, paint, alpha), base, mask)
    if not show_legend:
        return out
    present = [
        classes[int(i)] for i in np.flatnonzero(np.bincount(ids.ravel(), minlength=n + 1)[:n])
    ]
    # Text scales with the picture so the legend stays legible on large photos.
    size = max(12, min(48, out.height // 40))
    panel = legend(present, height=out.height, font_size=size)
    canvas = Image.new("RGB", (out.width + panel.width, panel.height), (255, 255, 255))
    canvas.paste(out, (0, 0))
    canvas.paste(panel, (out.width, 0))
    return canvas
