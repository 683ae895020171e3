"""A generated dataset of textured shapes, for the demo and the tests.

Each foreground class is one shape (circle, rectangle, triangle, ...) with its own hue
and texture, drawn over a blotchy, tinted background with noise, random brightness and
overlaps. The background also holds untextured blobs in the class colours, so single
pixel colours are ambiguous (a per-pixel classifier stays near 0.5 mIoU) while a small
CNN, using texture and shape, passes 0.8 val mIoU within a few hundred CPU steps. Like
PASCAL VOC, a thin band along every shape edge is marked with the ignore index.

Everything comes from a seeded numpy Generator: the same seed writes byte-identical files,
and image `i` depends only on `(seed, i)`, so `num` can grow without changing earlier pairs.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from segment_deeplab.classes import ClassInfo, default_palette
from segment_deeplab.data.spec import DatasetSpec

SHAPES = ("circle", "rectangle", "triangle", "ellipse", "diamond", "ring", "cross")
TEXTURES = ("stripes", "checker", "grid", "rings")
IGNORE_INDEX = 255


def class_names(num_classes: int) -> list[str]:
    """background, then one shape name per class (suffixed once the shapes run out)."""
    names = ["background"]
    for k in range(num_classes - 1):
        rnd, j = divmod(k, len(SHAPES))
        names.append(SHAPES[j] if rnd == 0 else f"{SHAPES[j]}_{rnd + 1}")
    return names


def _appearance(cls: int, num_classes: int) -> tuple[np.ndarray, str, float]:
    """A fixed colour, texture kind and texture period per foreground class."""
    k = cls - 1
    # Hues spread evenly so classes differ, but noise and brightness jitter make
    # single pixels ambiguous: the texture and the shape carry the rest.
    hue = k / max(1, num_classes - 1)
    rgb = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.9), np.float32) * 255
    return rgb, TEXTURES[k % len(TEXTURES)], 4.0 + 2.0 * (k % 3)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float, aspect: float) -> np.ndarray:
    """Inside test in the shape's own rotated frame (u, v centred on the shape)."""
    if shape == "circle":
        return u * u + v * v < r * r
    if shape == "rectangle":
        return (np.abs(u) < r) & (np.abs(v) < r * aspect)
    if shape == "triangle":
        # Regular triangle: three half-planes at 120 degrees.
        inside = np.ones(u.shape, bool)
        for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3):
            inside &= u * np.cos(a) + v * np.sin(a) < r * 0.6
        return inside
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (r * aspect * 0.6)) ** 2 < 1
    if shape == "diamond":
        return np.abs(u) / r + np.abs(v) / (r * aspect) < 1
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if shape == "cross":
        w = 0.3 * r
        return ((np.abs(u) < r) & (np.abs(v) < w)) | ((np.abs(v) < r) & (np.abs(u) < w))
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Values in [0, 1] that mix a class's light and dark tone."""
    f = 2 * np.pi / period
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(f * u)
    if kind == "checker":
        return (np.sin(f * u) * np.sin(f * v) > 0).astype(np.float32)
    if kind == "grid":
        return ((np.abs(np.sin(f * u)) > 0.85) | (np.abs(np.sin(f * v)) > 0.85)).astype(np.float32)
    return 0.5 + 0.5 * np.sin(f * np.sqrt(u * u + v * v))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int, ch: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid, bilinearly upsampled to (h, w, ch)."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.standard_normal((gh, gw, ch)).astype(np.float32)
    y = np.arange(h, dtype=np.float32) / cell
    x = np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    top = g00 * (1 - fx) + g01 * fx
    return top * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def _ignore_edges(label: np.ndarray, ignore_index: int) -> np.ndarray:
    """Mark pixels with a differently-labelled 4-neighbour: a 2-pixel band on every edge."""
    edge = np.zeros(label.shape, bool)
    dy = label[1:, :] != label[:-1, :]
    dx = label[:, 1:] != label[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    out = label.copy()
    out[edge] = ignore_index
    return out


def make_pair(
    rng: np.random.Generator, size: tuple[int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its index mask (H, W) uint8."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Background: a random greyish tint, blotches at two scales.
    base = rng.uniform(60, 190) + rng.uniform(-20, 20, 3)
    image = base + 30 * _smooth_noise(rng, h, w, 16, 1) + 12 * _smooth_noise(rng, h, w, 4, 3)
    # Untextured blobs in a class's colour, labelled background: the colour also occurs
    # outside the class, so single pixels cannot tell it; texture and shape must.
    for _ in range(int(rng.integers(1, 4)) if num_classes > 1 else 0):
        blob = _smooth_noise(rng, h, w, 24, 1)[..., 0] > 0.9
        colour = _appearance(int(rng.integers(1, num_classes)), num_classes)[0]
        tone = colour * rng.uniform(0.4, 1.1) + rng.uniform(-15, 15, 3)
        image = np.where(blob[..., None], tone, image)
    label = np.zeros((h, w), np.uint8)

    for _ in range(int(rng.integers(1, 5)) if num_classes > 1 else 0):
        cls = int(rng.integers(1, num_classes))
        colour, kind, period = _appearance(cls, num_classes)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.12, 0.3) * min(h, w)
        angle = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(angle), np.sin(angle)
        u = (xx - cx) * c + (yy - cy) * s
        v = (yy - cy) * c - (xx - cx) * s
        inside = _shape_mask(SHAPES[(cls - 1) % len(SHAPES)], u, v, r, rng.uniform(0.6, 1.0))
        # Light and dark tone of the class colour, jittered per shape so that
        # brightness alone never identifies a class.
        t = _texture(kind, u, v, period * rng.uniform(0.85, 1.15))[..., None]
        tone = colour * rng.uniform(0.7, 1.15) + rng.uniform(-15, 15, 3)
        painted = tone * (1 - 0.6 * t)
        image = np.where(inside[..., None], painted, image)
        label[inside] = cls

    image = image * rng.uniform(0.8, 1.2) + rng.normal(0, rng.uniform(3, 10), image.shape)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return image, _ignore_edges(label, IGNORE_INDEX)


def generate(
    out: str | Path,
    num: int = 64,
    seed: int = 0,
    size: tuple[int, int] = (128, 160),
    num_classes: int = 4,
) -> Path:
    """Write `num` pairs to `out/images/NNNN.jpg` + `out/masks/NNNN.png` and a dataset.yaml.

    Args:
        out: folder to write into (created).
        num: number of image/mask pairs.
        seed: the same seed writes byte-identical files.
        size: image (height, width).
        num_classes: classes including background (2 or more).

    Returns:
        The path of the written dataset.yaml. Its `val` split holds the last quarter
        of the pairs (none when `num` < 4) and `train` the rest.
    """
    if not 2 <= num_classes <= 255:
        raise ValueError(
            f"num_classes must be 2 (background + a shape) to 255 (8-bit masks), got {num_classes}"
        )
    if num < 1 or min(size) < 8:
        raise ValueError(f"need num >= 1 and a size of at least 8x8, got num={num}, size={size}")
    out = Path(out)
    image_dir, mask_dir, split_dir = out / "images", out / "masks", out / "splits"
    for d in (image_dir, mask_dir, split_dir):
        d.mkdir(parents=True, exist_ok=True)

    width = max(4, len(str(num - 1)))
    stems = [f"{i:0{width}d}" for i in range(num)]
    for i, stem in enumerate(stems):
        # A generator per pair: pair i never depends on how many pairs came before.
        rng = np.random.default_rng([seed, i])
        image, mask = make_pair(rng, (int(size[0]), int(size[1])), num_classes)
        Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=95)
        Image.fromarray(mask).save(mask_dir / f"{stem}.png")  # uint8 (H, W): mode L

    n_val = num // 4 if num >= 4 else 0
    splits = {"train": stems[: num - n_val], "val": stems[num - n_val :]}
    split_paths = {}
    for name, members in splits.items():
        if members:
            split_paths[name] = split_dir / f"{name}.txt"
            split_paths[name].write_text("\n".join(members) + "\n")

    palette = default_palette(num_classes)
    spec = DatasetSpec(
        classes=[ClassInfo(i, n, palette[i]) for i, n in enumerate(class_names(num_classes))],
        image_dir=image_dir,
        mask_dir=mask_dir,
        ignore_index=IGNORE_INDEX,
        splits=split_paths,
    )
    path = out / "dataset.yaml"
    spec.save(path)
    return path
