"""Image and mask bytes to tensors and class ids: the one decoder of the project.

`validate`, `prepare`, training, evaluation and prediction all read files through
here, so a file that passes `deeplab validate` loads the same way in training.

Images decode with torchvision.io (1.5x faster than PIL for JPEG) with EXIF orientation
applied, so a phone photo comes out the way viewers show it and the way it was
annotated; PIL reads what torchvision.io cannot (and everything, once torchvision drops
its deprecated decoders). Masks decode with PIL: torchvision.io returns garbage for
palette PNGs below 8 bits or with transparency, which PIL and annotation tools write for
few-class masks, while PIL gives palette indices for every P-mode PNG. Masks get no EXIF
orientation: annotation tools write them in the upright image's pixel grid.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # deprecated in torchvision 0.29, to be removed
    decode_image = None

from segment_deeplab.data.spec import DatasetError, DatasetSpec

# Every call of torchvision's decoders warns that they are deprecated; they still work.
# One filter for that message (`warnings.catch_warnings` per call is not thread-safe,
# and images are decoded in several threads).
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning
)

EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees
# A file's unknown mask colours count as anti-aliasing when at least this share of
# them touch a pixel of another colour, and they cover at most this share of the mask.
FRINGE_SHARE = 0.75
FRINGE_MAX_AREA = 0.15


class Issue(NamedTuple):
    """Something wrong with a file: level "error" or "warning", a stable code, a message."""

    level: str
    code: str
    message: str


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
        ignore_index: int | None = None,
        remap: dict[int, int] | None = None,
    ) -> MaskOptions:
        """The options of a dataset (None: plain index masks), plus `--remap`."""
        ignore = ignore_index if ignore_index is not None else (spec.ignore_index if spec else 255)
        colors: dict[tuple[int, int, int], int] = {}
        if spec is not None and spec.color_masks:
            colors = {tuple(c.color): c.id for c in spec.classes}
            if spec.ignore_color is not None:
                colors[tuple(spec.ignore_color)] = ignore
        lut = None
        if remap:
            table = np.arange(256, dtype=np.uint8)
            for src, dst in remap.items():
                table[src] = dst
            lut = table.tobytes()
        return cls(ignore, bool(colors), tuple(colors.items()), lut)


def _pil_rgb(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def decode_rgb(data: bytes, path: Path | str, hint: str = "") -> torch.Tensor:
    """Image bytes as uint8 (3, H, W) RGB, EXIF orientation applied.

    Raises:
        DatasetError: the bytes are no image either decoder reads; names `path`.
    """
    if decode_image is not None:
        try:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img = decode_image(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            if img.dtype == torch.uint16:  # 16-bit PNG: keep the high byte
                img = (img >> 8).to(torch.uint8)
            return img
        except (RuntimeError, ValueError):
            pass  # formats libjpeg/libpng decline; PIL reads more of them
    if not data:
        raise DatasetError(
            f"cannot read image {path}: the file is empty" + (f"; {hint}" if hint else "")
        )
    try:
        return _pil_rgb(data)
    except UnidentifiedImageError as e:
        why = "not an image format torchvision or PIL reads (JPEG, PNG, ...)"
        raise DatasetError(
            f"cannot read image {path}: {why}" + (f"; {hint}" if hint else "")
        ) from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}" + (f"; {hint}" if hint else "")) from e


def read_image(path: str | Path, hint: str = "") -> torch.Tensor:
    """An image file as uint8 (3, H, W) RGB, EXIF orientation applied (`decode_rgb`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e.strerror or e}") from e
    return decode_rgb(data, path, hint)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) after EXIF orientation, read from the header without decoding pixels."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(EXIF_ORIENTATION, 1) in _TRANSPOSED:
            w, h = h, w
    return h, w


def open_mask(data: bytes, path: Path, verify: bool = False) -> Image.Image:
    """Mask bytes as a loaded PIL image; `verify` also checks every PNG chunk's CRC and
    that the file reaches its end (what `deeplab validate` asks of each file).

    Raises:
        DatasetError: the bytes are no readable image.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decodes everything: truncated files fail here, not in training
        if verify and img.format == "PNG":
            Image.open(io.BytesIO(data)).verify()
        return img
    except Exception as e:  # PIL raises many types for broken files
        raise DatasetError(f"masks/{path.name} cannot be read ({e}); re-export or remove it") from e


def mask_ids(img: Image.Image, path: Path, opts: MaskOptions) -> tuple[np.ndarray | None, list]:
    """A mask image as (H, W) uint8 class ids, and the issues found on the way.

    Returns:
        (ids, issues): ids is None when the file is no usable mask (a JPEG, a colour
        picture without `color_masks`, a mode that holds no ids); then an "error" issue
        says why. Colours of no class become the ignore index, with an "error" issue.
    """
    where = f"masks/{path.name}"
    if img.format == "JPEG":
        msg = (
            f"{where} is a JPEG: lossy compression corrupts the class ids at every edge. "
            "Export masks as PNG from the annotation tool"
        )
        return None, [Issue("error", "jpeg_mask", msg)]
    if img.mode in ("RGB", "RGBA"):
        if opts.color_masks:
            ids, issues = _colors_to_ids(img, where, opts)
            return _apply_lut(ids, opts), issues
        rgb = np.asarray(img)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            msg = (
                f"{where} is {img.mode} but grey (R=G=B), read as ids; saving it "
                "single-channel makes it 3x smaller: Image.open(p).convert('L').save(p)"
            )
            ids = np.ascontiguousarray(rgb[..., 0])
            return _apply_lut(ids, opts), [Issue("warning", "grey_rgb_mask", msg)]
        msg = (
            f"{where} is an {img.mode} colour mask; masks must hold class ids. Add "
            "`color_masks: true` and each class colour to dataset.yaml, then `deeplab "
            "prepare` converts the colours to ids"
        )
        return None, [Issue("error", "color_mask", msg)]
    if img.mode not in ("L", "P"):
        msg = (
            f"{where} has mode {img.mode}; masks must be 8-bit single-channel (mode L) or "
            "palette (mode P) PNGs whose values are class ids"
        )
        return None, [Issue("error", "not_index_mask", msg)]
    # P-mode masks: the palette indices are the ids; the palette colours are only for display.
    return _apply_lut(np.asarray(img, dtype=np.uint8), opts), []


def read_mask(path: Path, opts: MaskOptions, hint: str = "") -> np.ndarray:
    """A mask file as (H, W) uint8 class ids, by `mask_ids`' rules.

    Raises:
        DatasetError: unreadable, or no usable mask (the issue's message, then `hint`).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read mask {path}: {e.strerror or e}") from e
    ids, issues = mask_ids(open_mask(data, path), path, opts)
    if ids is None:
        raise DatasetError(f"{issues[0].message} ({path})" + (f"; {hint}" if hint else ""))
    return ids if ids.flags.writeable else ids.copy()  # torch wants writable memory


def _apply_lut(ids: np.ndarray, opts: MaskOptions) -> np.ndarray:
    if opts.lut is None:
        return ids
    return np.frombuffer(opts.lut, dtype=np.uint8)[ids]


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


def _colors_to_ids(img: Image.Image, where: str, opts: MaskOptions) -> tuple[np.ndarray, list]:
    """(H, W) ids from class colours; colours of no class become ignore, and an issue."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint32)  # (H, W, 3)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniq, inv = np.unique(code, return_inverse=True)
    table = {(r << 16) | (g << 8) | b: i for (r, g, b), i in opts.colors}
    known = np.array([int(u) in table for u in uniq])
    lut = np.array([table.get(int(u), opts.ignore_index) for u in uniq], dtype=np.uint8)
    ids = lut[inv.reshape(code.shape)]
    if known.all():
        return ids, []
    unknown = ~known[inv.reshape(code.shape)]
    n, n_fringe = int(unknown.sum()), int((unknown & fringe_mask(code)).sum())
    cols = [(int(u) >> 16, (int(u) >> 8) & 255, int(u) & 255) for u in uniq[~known]]
    shown = ", ".join(str(c) for c in cols[:6]) + (" ..." if len(cols) > 6 else "")
    what = f"{where}: {n} pixels have colours of no class ({shown})"
    if classify_unknown(n, n_fringe, code.size):
        msg = (
            f"{what}; they lie on region boundaries: the mask was drawn or resized with "
            "smoothing (anti-aliasing). Export it without; resize masks with NEAREST"
        )
        return ids, [Issue("error", "antialiased", msg)]
    msg = (
        f"{what}; add those classes to dataset.yaml, or name the colour that means "
        "ignore: `ignore_color: [R, G, B]`"
    )
    return ids, [Issue("error", "unknown_values", msg)]


def check_ids(ids: np.ndarray, path: Path, num_classes: int, ignore_index: int) -> None:
    """Refuse ids outside 0..num_classes-1 and the ignore index, naming the file.

    Out-of-range ids would crash the loss far from their cause (a CUDA assert).
    """
    bad = (ids >= num_classes) & (ids != ignore_index)
    if bad.any():
        values = np.unique(ids[bad])[:10].tolist()
        raise DatasetError(
            f"mask {path} has values {values} outside 0..{num_classes - 1} and the ignore "
            f"index {ignore_index}; add the classes to dataset.yaml or remap them with "
            "`deeplab prepare --remap SRC:DST`"
        )
