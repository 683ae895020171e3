"""Read one image/mask pair the way training will, and note what is wrong with it.

Used by `validate.py` (per-file checks, run in parallel) and `prepare.py` (writing
remapped or colour-converted masks with the same reading rules).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segment_deeplab.data.spec import DatasetSpec
from segment_deeplab.data.pairs import Problem

EXIF_ORIENTATION = 0x0112
# A file's unknown mask values count as anti-aliasing when at least this share of
# them touch a pixel of another value, and they cover at most this share of the mask.
FRINGE_SHARE = 0.75
FRINGE_MAX_AREA = 0.15


@dataclass(frozen=True)
class MaskOptions:
    """How mask pixels become class ids."""

    ignore_index: int = 255
    color_masks: bool = False
    # (r, g, b) -> id, for colour masks
    colors: tuple[tuple[tuple[int, int, int], int], ...] = ()
    # value -> value lookup applied last (`prepare --remap`); None: identity
    lut: bytes | None = None

    @classmethod
    def build(
        cls,
        spec: DatasetSpec | None,
        ignore_index: int,
        remap: dict[int, int] | None = None,
        ignore_color: tuple[int, int, int] | None = None,
    ) -> MaskOptions:
        colors: dict[tuple[int, int, int], int] = {}
        if spec is not None and spec.color_masks:
            colors = {tuple(c.color): c.id for c in spec.classes}
            if ignore_color is not None:
                colors[tuple(ignore_color)] = ignore_index
        lut = None
        if remap:
            table = np.arange(256, dtype=np.uint8)
            for src, dst in remap.items():
                table[src] = dst
            lut = table.tobytes()
        return cls(ignore_index, bool(colors), tuple(colors.items()), lut)


@dataclass
class FileResult:
    """What one pair contributed: problems, value histograms, size and hashes."""

    stem: str
    mask_file: str
    mask_name: str
    problems: list[Problem]
    # Mask values present (K,), and per value (K, 3): pixels, pixels on a region
    # boundary, pixels strictly between their neighbours' values. Sparse, because a
    # large dataset keeps one of these per file.
    values: np.ndarray | None = None
    stats: np.ndarray | None = None
    size_hw: tuple[int, int] | None = None
    image_sha: str = ""
    mask_sha: str = ""


def classify_unknown(n: int, n_fringe: int, total: int = 0) -> bool:
    """True when unknown values look like anti-aliasing: thin fringes on boundaries
    (and, given the mask's `total` pixels, a small part of it)."""
    return n_fringe >= FRINGE_SHARE * n and (not total or n <= FRINGE_MAX_AREA * total)


def fringe_mask(m: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another value. (H, W) -> (H, W) bool."""
    f = np.zeros(m.shape, dtype=bool)
    d = m[1:, :] != m[:-1, :]
    f[1:, :] |= d
    f[:-1, :] |= d
    d = m[:, 1:] != m[:, :-1]
    f[:, 1:] |= d
    f[:, :-1] |= d
    return f


def between_mask(m: np.ndarray) -> np.ndarray:
    """Pixels whose value lies strictly between their 4-neighbours' smallest and largest:
    what smoothing or bilinear resizing leaves on a boundary. (H, W) -> (H, W) bool."""
    p = np.pad(m, 1, mode="edge")
    nbrs = (p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:])
    lo = np.minimum(np.minimum(nbrs[0], nbrs[1]), np.minimum(nbrs[2], nbrs[3]))
    hi = np.maximum(np.maximum(nbrs[0], nbrs[1]), np.maximum(nbrs[2], nbrs[3]))
    return (lo < m) & (m < hi)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) as shown: EXIF orientations 5-8 rotate by 90 degrees (exif_transpose)."""
    w, h = img.size
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _open(path: Path, data: bytes, kind: str, problems: list[Problem]) -> Image.Image | None:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decodes everything: truncated files fail here, not in training
        if img.format == "PNG":
            # load() stops once the pixels are decoded; verify() also checks every
            # chunk's CRC and that the file reaches its end.
            Image.open(io.BytesIO(data)).verify()
        return img
    except Exception as e:  # PIL raises many types for broken files
        problems.append(
            Problem.error(
                path,
                "unreadable",
                f"{kind}/{path.name} cannot be read ({e}); re-export or remove it",
            )
        )
        return None


def to_ids(
    img: Image.Image, path: Path, opts: MaskOptions, problems: list[Problem]
) -> np.ndarray | None:
    """Mask image -> (H, W) uint8 class ids, or None when it is not a usable mask."""
    where = f"masks/{path.name}"
    if img.format == "JPEG":
        problems.append(
            Problem.error(
                path,
                "jpeg_mask",
                f"{where} is a JPEG: lossy compression corrupts the class "
                "ids at every edge. Export masks as PNG from the annotation tool",
            )
        )
        return None
    if img.mode in ("RGB", "RGBA"):
        if opts.color_masks:
            return _apply_lut(_colors_to_ids(img, path, opts, problems), opts)
        rgb = np.asarray(img)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            # Grey saved as RGB: the values are still ids, and training reads them so.
            msg = (
                f"{where} is {img.mode} but grey (R=G=B), read as ids; saving it "
                "single-channel makes it 3x smaller: Image.open(p).convert('L').save(p)"
            )
            problems.append(Problem.warning(path, "grey_rgb_mask", msg))
            return _apply_lut(np.ascontiguousarray(rgb[..., 0]), opts)
        msg = (
            f"{where} is an {img.mode} colour mask; masks must hold class ids. Add "
            "`color_masks: true` and each class colour to dataset.yaml, then `deeplab "
            "prepare` converts the colours to ids"
        )
        problems.append(Problem.error(path, "color_mask", msg))
        return None
    if img.mode not in ("L", "P"):
        problems.append(
            Problem.error(
                path,
                "not_index_mask",
                f"{where} has mode {img.mode}; masks must be 8-bit "
                "single-channel (mode L) or palette (mode P) PNGs whose values are class ids",
            )
        )
        return None
    # P-mode masks: the palette indices are the ids; the palette colours are only for display.
    return _apply_lut(np.asarray(img, dtype=np.uint8), opts)


def _apply_lut(ids: np.ndarray, opts: MaskOptions) -> np.ndarray:
    if opts.lut is None:
        return ids
    return np.frombuffer(opts.lut, dtype=np.uint8)[ids]


def _colors_to_ids(img, path: Path, opts: MaskOptions, problems: list[Problem]) -> np.ndarray:
    """(H, W) ids from class colours; colours of no class become ignore, and a problem."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint32)  # (H, W, 3)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniq, inv = np.unique(code, return_inverse=True)
    table = {(r << 16) | (g << 8) | b: i for (r, g, b), i in opts.colors}
    known = np.array([int(u) in table for u in uniq])
    lut = np.array([table.get(int(u), opts.ignore_index) for u in uniq], dtype=np.uint8)
    ids = lut[inv.reshape(code.shape)]
    if not known.all():
        unknown = ~known[inv.reshape(code.shape)]
        n, n_fringe = int(unknown.sum()), int((unknown & fringe_mask(code)).sum())
        cols = [(int(u) >> 16, (int(u) >> 8) & 255, int(u) & 255) for u in uniq[~known]]
        shown = ", ".join(str(c) for c in cols[:6]) + (" ..." if len(cols) > 6 else "")
        where = f"masks/{path.name}: {n} pixels have colours of no class ({shown})"
        if classify_unknown(n, n_fringe, code.size):
            msg = (
                f"{where}; they lie on region boundaries: the mask was drawn or resized with "
                "smoothing (anti-aliasing). Export it without; resize masks with NEAREST"
            )
            problems.append(Problem.error(path, "antialiased", msg))
        else:
            msg = (
                f"{where}; add those classes to dataset.yaml, or name the colour that "
                "means ignore: `ignore_color: [R, G, B]`"
            )
            problems.append(Problem.error(path, "unknown_values", msg))
    return ids


def check_pair(stem: str, image: Path, mask: Path, opts: MaskOptions) -> FileResult:
    """Read one pair fully and return its problems and value histograms."""
    res = FileResult(stem, str(mask), mask.name, [])
    try:
        img_bytes, mask_bytes = image.read_bytes(), mask.read_bytes()
    except OSError as e:
        failed = Path(e.filename or image)
        msg = f"{failed.parent.name}/{failed.name} cannot be read: {e.strerror or e}"
        res.problems.append(Problem.error(failed, "unreadable", msg))
        return res
    res.image_sha = hashlib.sha256(img_bytes).hexdigest()
    res.mask_sha = hashlib.sha256(mask_bytes).hexdigest()
    img = _open(image, img_bytes, "images", res.problems)
    m = _open(mask, mask_bytes, "masks", res.problems)
    if img is not None:
        w, h = _oriented_size(img)
        res.size_hw = (h, w)
    if m is None:
        return res
    ids = to_ids(m, mask, opts, res.problems)
    if img is not None and m.size != (w, h):
        res.problems.append(_size_problem(image, mask, img, m, (w, h)))
    elif ids is not None:
        hists = [ids.ravel(), ids[fringe_mask(ids)], ids[between_mask(ids)]]
        hist = np.stack([np.bincount(h, minlength=256) for h in hists], 1)  # (256, 3)
        res.values = np.flatnonzero(hist[:, 0])
        res.stats = hist[res.values].astype(np.int64)
    return res


def _size_problem(image: Path, mask: Path, img, m, shown: tuple[int, int]) -> Problem:
    msg = (
        f"images/{image.name} is {shown[0]}x{shown[1]} but masks/{mask.name} is "
        f"{m.size[0]}x{m.size[1]} (width x height); a mask must have its image's size"
    )
    if m.size == img.size:
        msg += (
            "; the image carries an EXIF rotation, which loading applies, and the mask "
            "matches the unrotated pixels. Save the image rotated (PIL ImageOps.exif_transpose)"
        )
    else:
        msg += ": re-export the mask, or resize it with NEAREST"
    return Problem.error(image, "size_mismatch", msg)
