"""Images too large for memory (GeoTIFFs, scans, huge photos), predicted window by window.

`predict_large` gives the masks `predict_probs` with `TTA(window=...)` gives on the whole
image (the same windows and the same sums per pixel, so the same floats), while the
memory stays flat as the image grows in either direction:

- The image is cut into vertical strips, each as wide as `band_bytes` of probability
  sums allows (one strip when the image is narrow enough: 12,000 columns for 21 classes
  and 1024-pixel windows at the default 1 GiB). A strip is predicted top to bottom, a
  row of windows at a time; only a band of one window's height of class probabilities
  over the strip's columns is held. The windows that straddle two strips are predicted
  for each (a few percent more windows; `LargeResult.windows` counts them).
- The mask is finished a band at a time and kept as deflate-compressed 256 x 256 tiles
  in an unnamed temporary file beside the output, then written, in row-major tile order,
  into a tiled TIFF of uint8 class ids with the class colours as its palette.

What is read, and how:

- TIFF / GeoTIFF (tiled or striped, BigTIFF too): through tifffile's zarr store, one band
  of rows at a time; the whole image is never read. The first image of the file is
  taken (level 0 of a pyramid). 3 bands or more: the first 3 are R, G, B (an RGBA's
  alpha, a 4th near-infrared band are left out, and the result's notes say so); 1 or 2
  bands: the first is grey, repeated as R, G and B. uint8 is used as it is; uint16 is
  scaled linearly, `round(v * 255 / top)` clipped to 255, where `top` is `uint16_max`
  if given, else the file's MaxSampleValue tag when it is below 65535, else 65535 (so
  12-bit data with no tag needs `uint16_max=4095`). Other sample types are refused.
- JPEG / PNG: these cannot be read by window, so they are decoded once (uint8, 3 x H x W,
  as `predict` decodes them, EXIF orientation applied); the prediction and the output
  are still window by window, so the probabilities (C floats per pixel) never are whole.

The mask's georeferencing: the GeoTIFF tags (`GEO_TAGS`) are copied as they are (the
mask is on the image's pixel grid). An input GDAL_NODATA (42113) says which *input*
values are empty, so it is not copied: pixels whose bands all hold that value get the
ignore index in the mask, and the mask's GDAL_NODATA is the ignore index.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import tempfile
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from segment_deeplab.atomic import OutputError, check_writable_file, refuse_inputs, staged
from segment_deeplab.classes import ClassInfo, make_palette
from segment_deeplab.data.decode import image_size, read_image
from segment_deeplab.data.spec import DatasetError
from segment_deeplab.device import autocast, model_device
from segment_deeplab.infer.predict import AUTO_TILE_PIXELS, AUTO_WINDOW
from segment_deeplab.infer.tta import PLAIN, TILE_BATCH, TTA, _starts, labels, logits
from segment_deeplab.models.inputs import to_input

TIFF_EXTS = (".tif", ".tiff")
OUT_TILE = 256  # the mask TIFF's tile size
# Columns of the finished rows turned into class ids at once: bounds the temporaries.
LABEL_COLUMNS = 1024
# The most memory one strip's probability sums take (float32, classes x window x columns).
BAND_BYTES = 1 << 30
GEO_TAGS = {
    33550: "ModelPixelScaleTag",
    33922: "ModelTiepointTag",
    34264: "ModelTransformationTag",
    34735: "GeoKeyDirectoryTag",
    34736: "GeoDoubleParamsTag",
    34737: "GeoAsciiParamsTag",
}
NODATA_TAG = 42113
MAX_SAMPLE_VALUE_TAG = 281
INSTALL = "pip install 'segment-deeplab[large]' (tifffile, imagecodecs, zarr)"


@dataclass
class LargeResult:
    """The mask written, the image's size, the windows predicted and what was assumed."""

    written: Path
    size: tuple[int, int]  # (H, W)
    windows: int  # forward-pass windows, flipped ones included
    seconds: float
    notes: list[str] = field(default_factory=list)  # bands, scaling, georeferencing

    def summary(self) -> str:
        h, w = self.size
        text = f"wrote {self.written} ({w}x{h}, {self.windows} windows, {self.seconds:.1f} s)"
        return text + "".join(f"; {n}" for n in self.notes)


def _is_tiff(path: Path) -> bool:
    if path.suffix.lower() in TIFF_EXTS:
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
    except OSError:
        return False


def is_large(path: str | Path, max_pixels: int = AUTO_TILE_PIXELS) -> bool:
    """Whether `predict_large` should take `path`: any TIFF (its mask keeps the
    georeferencing), or a JPEG/PNG of more than `max_pixels` pixels. A file whose header
    cannot be read is not large: `predict` reports it."""
    path = Path(path)
    if _is_tiff(path):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            h, w = image_size(path)
    except Image.DecompressionBombError:  # PIL's limit is ~179 Mpx: large indeed
        return True
    except Exception:  # not an image, truncated, no access
        return False
    return h * w > max_pixels


class TiffSource:
    """A TIFF read by bands of rows (tifffile's zarr store): uint8 (3, rows, W) tensors."""

    def __init__(self, path: Path, uint16_max: int | None = None) -> None:
        try:
            import tifffile
            import zarr
        except ImportError as e:
            raise DatasetError(f"cannot read {path}: TIFF input needs {INSTALL}") from e
        self.path, self.notes = path, []
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            page = series.pages[0]
            self._z = zarr.open(series.aszarr(level=0), mode="r")
        except Exception as e:  # not a TIFF, truncated, unsupported layout
            raise DatasetError(f"cannot read image {path}: {e}") from e
        axes, shape = series.axes, self._z.shape
        palette = page.photometric.name == "PALETTE"
        if len(axes) != len(shape) or "Y" not in axes or "X" not in axes or palette:
            self.close()
            raise DatasetError(
                f"cannot read image {path}: axes {axes} {shape}, photometric "
                f"{page.photometric.name}; give an RGB or greyscale (multi-band) TIFF"
            )
        self._axes, self.height, self.width = axes, shape[axes.index("Y")], shape[axes.index("X")]
        self._bands = shape[axes.index("S")] if "S" in axes else 1
        self._scale = self._uint16_top(page, np.dtype(self._z.dtype), uint16_max)
        if self._bands > 3:
            self.notes.append(f"{self._bands} bands: the first 3 taken as R, G, B")
        elif self._bands < 3:
            self.notes.append(f"{self._bands} band(s): the first taken as grey (R = G = B)")
        extra = [f"{a}={n}" for a, n in zip(axes, shape, strict=True) if a not in "YXS" and n > 1]
        if extra:
            self.notes.append(f"several images ({', '.join(extra)}): the first predicted")
        self.geotags = [_as_extratag(page.tags[c]) for c in GEO_TAGS if c in page.tags]
        self.nodata = _nodata(page.tags[NODATA_TAG].value) if NODATA_TAG in page.tags else None

    def _uint16_top(self, page, dtype: np.dtype, uint16_max: int | None) -> int | None:
        if dtype == np.uint8:
            return None
        if dtype != np.uint16:
            self.close()
            raise DatasetError(
                f"cannot read image {self.path}: {dtype} samples; give uint8 or uint16 "
                "(scale other types to 0..255 first, e.g. gdal_translate -ot Byte -scale)"
            )
        tag = page.tags.get(MAX_SAMPLE_VALUE_TAG)
        tagged = int(np.max(tag.value)) if tag is not None else 65535
        top = int(uint16_max or (tagged if 0 < tagged < 65535 else 65535))
        self.notes.append(f"uint16 scaled to 0..255 by 255/{top}")
        return top

    def _raw(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        """Rows y0..y1, columns x0..x1 of the bands used, as stored: (rows, cols, 3)."""
        index = []
        for a in self._axes:
            index.append(
                slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else
                slice(0, min(3, self._bands)) if a == "S" else 0
            )  # fmt: skip
        try:
            raw = np.asarray(self._z[tuple(index)])
        except Exception as e:  # a truncated or corrupt tile
            where = f"rows {y0}..{y1}, columns {x0}..{x1 or self.width}"
            raise DatasetError(f"cannot read image {self.path} ({where}): {e}") from e
        kept = [a for a in self._axes if a in "YXS"]
        raw = raw.transpose([kept.index(a) for a in "YXS"]) if "S" in kept else raw[..., None]
        return raw if raw.shape[-1] == 3 else np.repeat(raw[..., :1], 3, axis=-1)

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> torch.Tensor:
        raw = self._raw(y0, y1, x0, x1)
        if self._scale is not None:
            top = self._scale
            raw = np.minimum((raw.astype(np.uint32) * 255 + top // 2) // top, 255)
        return torch.from_numpy(np.ascontiguousarray(raw.transpose(2, 0, 1), dtype=np.uint8))

    def empty(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray | None:
        """(rows, cols) True where every band holds the GDAL_NODATA value; None: none."""
        if self.nodata is None:
            return None
        return (self._raw(y0, y1, x0, x1) == self.nodata).all(-1)

    def close(self) -> None:
        self._tif.close()


class PhotoSource:
    """A JPEG/PNG: decoded once (they cannot be read by window), then cut into bands."""

    def __init__(self, path: Path) -> None:
        self.path, self.notes, self.geotags, self.nodata = path, [], [], None
        self._image = read_image(path)  # DatasetError naming the file if unreadable
        self.height, self.width = self._image.shape[-2:]

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> torch.Tensor:
        return self._image[:, y0:y1, x0:x1]

    def empty(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> None:
        return None

    def close(self) -> None:
        self._image = None


def _as_extratag(tag) -> tuple:
    """A tifffile tag as `TiffWriter.write(extratags=...)` takes it."""
    count = None if int(tag.dtype) == 2 else tag.count  # ASCII: tifffile counts the NUL
    return (tag.code, int(tag.dtype), count, tag.value, True)


def _nodata(text: str) -> float | None:
    try:
        value = float(str(text).strip("\0 "))
    except ValueError:
        return None
    return None if math.isnan(value) else value


def open_source(path: str | Path, uint16_max: int | None = None) -> TiffSource | PhotoSource:
    """The image at `path` as a source of row bands (TIFF by window, others whole)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"cannot read image {path}: no such file")
    return TiffSource(path, uint16_max) if _is_tiff(path) else PhotoSource(path)


class _Bands:
    """Window-high bands of the source over columns x0..x1, the last few kept
    (neighbouring windows share them)."""

    def __init__(self, source, height: int, x0: int, x1: int, keep: int = 2) -> None:
        self.source, self.height, self.keep, self._cache = source, height, keep, OrderedDict()
        self.x0, self.x1 = x0, x1

    def window(self, y: int, x: int, width: int) -> torch.Tensor:
        if y not in self._cache:
            self._cache[y] = self.source.read(y, y + self.height, self.x0, self.x1)
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return self._cache[y][:, :, x - self.x0 : x - self.x0 + width]


def _window_probs(model, bands: _Bands, origins, tw: int, w: int, mirrored: bool, dtype):
    """(y, x, (C, th, tw) probabilities) of every window in `origins` order, predicted
    TILE_BATCH at a time, as `tta._probs_tiled` batches them (the softmax of one window
    alone can differ in the last bit from the batch's). `mirrored`: the windows of
    the left-right flipped image, returned in the original image's columns."""
    device = model_device(model)
    for k in range(0, len(origins), TILE_BATCH):
        chunk = origins[k : k + TILE_BATCH]
        at = [(y, w - x - tw if mirrored else x) for y, x in chunk]
        tiles = torch.stack([bands.window(y, x, tw) for y, x in at])
        batch = to_input(tiles.flip(-1) if mirrored else tiles, device)
        with autocast(device, dtype):
            p = logits(model, batch).float().softmax(1)  # (len(chunk), C, th, tw)
        for j, (y, x0) in enumerate(at):
            yield y, x0, p[j].flip(-1) if mirrored else p[j]


def _coverage(size: int, starts: list[int], length: int, device) -> torch.Tensor:
    """How many windows cover each row (or column): `_probs_tiled`'s count, in 1-D."""
    count = torch.zeros(size, device=device)
    for s in starts:
        count[s : s + length] += 1
    return count


def _grid(h: int, w: int, tta: TTA) -> tuple[list[int], list[int], int, int]:
    """Window rows and columns, window height and width: those of `tta._probs_tiled`."""
    step = max(1, int(tta.window * (1 - tta.overlap)))
    th, tw = min(tta.window, h), min(tta.window, w)
    return _starts(h, tta.window, step), _starts(w, tta.window, step), th, tw


def _strips(
    w: int, classes: int, th: int, tw: int, passes: int, budget: int
) -> list[tuple[int, int]]:
    """Column ranges (x0, x1) of the strips: each strip's band (its columns plus the
    window width its straddling windows add) holds `budget` bytes of float sums at most,
    but no strip is narrower than 3 windows (fewer straddlers to predict twice). Inner
    edges are multiples of OUT_TILE, so no mask tile spans two strips."""
    per_column = classes * th * 4 * passes
    if w * per_column <= budget:
        return [(0, w)]
    width = max(budget // per_column - tw, 3 * tw)
    width = max(OUT_TILE, width // OUT_TILE * OUT_TILE)
    edges = [*range(0, w, width), w]
    if len(edges) > 2 and edges[-1] - edges[-2] < tw:  # no sliver at the right edge
        edges.pop(-2)
    return list(itertools.pairwise(edges))


def _strip_origins(ys, xs, tw: int, w: int, x0: int, x1: int, mirrored: bool):
    """The windows, in `_probs_tiled`'s (row-major) order, that reach columns x0..x1;
    for the mirrored pass, origins in the flipped image's columns."""

    def reaches(x: int) -> bool:
        left = w - x - tw if mirrored else x
        return left < x1 and left + tw > x0

    return [(y, x) for y in ys for x in xs if reaches(x)]


def _label_rows(model, source, tta: TTA, dtype, ignore: int, bar, strip: tuple[int, int]):
    """The mask of the strip's columns as (rows, x1 - x0) uint8 blocks, top to bottom,
    each finished when no later window reaches it: `predict_probs(image, tta)`'s argmax,
    a band at a time. Every pixel's windows are summed in `_probs_tiled`'s order."""
    h, w = source.height, source.width
    x0, x1 = strip
    ys, xs, th, tw = _grid(h, w, tta)
    device = model_device(model)
    passes = [False, True] if tta.flip else [False]
    origins = [_strip_origins(ys, xs, tw, w, x0, x1, m) for m in passes]
    lefts = [w - x - tw if m else x for m, o in zip(passes, origins, strict=True) for _, x in o]
    bx0, bx1 = min(lefts), max(lefts) + tw  # the band: the columns the windows cover
    bands = _Bands(source, th, bx0, bx1, keep=3 if tta.flip else 2)
    cy, cx = _coverage(h, ys, th, device), _coverage(w, xs, tw, device)
    counts = [cx.flip(0) if m else cx for m in passes]  # the mirror's windows, unmirrored
    streams = [
        itertools.groupby(_window_probs(model, bands, o, tw, w, m, dtype), lambda t: t[0])
        for m, o in zip(passes, origins, strict=True)
    ]
    sums: list[torch.Tensor] = []  # per pass: (C, th, bx1 - bx0) sums of rows ys[r]..+th
    for r, rows in enumerate(zip(*streams, strict=True)):
        for i, (_, windows) in enumerate(rows):
            for _, left, p in windows:
                if len(sums) <= i:
                    sums.append(torch.zeros((p.shape[0], th, bx1 - bx0), device=device))
                sums[i][:, :, left - bx0 : left - bx0 + tw] += p
                bar.update(1)
        y, end = ys[r], ys[r + 1] if r + 1 < len(ys) else h
        n = end - y
        block = np.empty((n, x1 - x0), np.uint8)
        for c in range(x0, x1, LABEL_COLUMNS):
            cols = slice(c, min(c + LABEL_COLUMNS, x1))
            band = slice(cols.start - bx0, cols.stop - bx0)
            # The same elementwise sums and quotients as predict_probs: equal floats.
            total = None
            for s, count in zip(sums, counts, strict=True):
                p = s[:, :n, band] / (cy[y:end, None] * count[None, cols])
                total = p if total is None else total + p
            total = total / len(sums) if len(sums) > 1 else total  # / 1 changes nothing
            block[:, cols.start - x0 : cols.stop - x0] = (
                labels(total[None])[0].to(torch.uint8).cpu().numpy()
            )
        empty = source.empty(y, end, x0, x1)
        if empty is not None:
            block[empty] = ignore
        yield block
        for s in sums:
            _shift_up(s, n)


def _shift_up(s: torch.Tensor, n: int) -> None:
    """Rows n.. of (C, rows, W) to the top, zeros below, in place: chunks of n rows copied
    top down never overlap, so no second band is needed."""
    rows = s.shape[1]
    for k in range(0, rows - n, n):
        m = min(n, rows - n - k)
        s[:, k : k + m].copy_(s[:, k + n : k + n + m])
    s[:, rows - n :] = 0


class _TileStore:
    """The mask's tiles, deflate-compressed as the TIFF stores them, kept in an unnamed
    temporary file (gone with the process, however it ends) until they are written in
    row-major order: strips finish column ranges, the TIFF wants rows of tiles."""

    def __init__(self, file) -> None:
        self._file = file  # e.g. tempfile.TemporaryFile(), opened for reading and writing
        self._at: dict[tuple[int, int], tuple[int, int]] = {}

    def add_strip(self, blocks: Iterator[np.ndarray], x0: int) -> None:
        """Cut (rows, cols) blocks of the strip starting at column x0 into tiles."""
        pending, ty = None, 0
        for block in itertools.chain(blocks, [None]):
            if block is not None:
                pending = block if pending is None else np.concatenate([pending, block])
            while pending is not None and (
                len(pending) >= OUT_TILE or (block is None and len(pending))
            ):
                band, pending = pending[:OUT_TILE], pending[OUT_TILE:]
                for x in range(0, band.shape[1], OUT_TILE):
                    tile = np.zeros((OUT_TILE, OUT_TILE), np.uint8)  # edge tiles: zero-padded
                    part = band[:, x : x + OUT_TILE]
                    tile[: part.shape[0], : part.shape[1]] = part
                    data = zlib.compress(tile.tobytes(), 6)
                    self._at[(ty, (x0 + x) // OUT_TILE)] = (self._file.tell(), len(data))
                    self._file.write(data)
                ty += 1

    def tiles(self, h: int, w: int) -> Iterator[bytes]:
        for ty in range(math.ceil(h / OUT_TILE)):
            for tx in range(math.ceil(w / OUT_TILE)):
                offset, length = self._at[(ty, tx)]
                self._file.seek(offset)
                yield self._file.read(length)


def _colormap(classes: Sequence[ClassInfo], ignore: int) -> np.ndarray:
    """The class colours as a TIFF palette: (3, 256) uint16."""
    return (np.asarray(make_palette(classes, ignore), np.uint16).reshape(256, 3).T * 257).copy()


@torch.inference_mode()
def predict_large(
    model: nn.Module,
    path: str | Path,
    out_path: str | Path,
    classes: Sequence[ClassInfo],
    ignore_index: int = 255,
    *,
    tta: TTA = PLAIN,
    dtype: torch.dtype | None = None,
    uint16_max: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    band_bytes: int = BAND_BYTES,
) -> LargeResult:
    """Predict one large image window by window and write its mask as a tiled TIFF.

    Args:
        model: in eval mode on its device (see `fold.for_inference`).
        path: a TIFF/GeoTIFF, JPEG or PNG (see the module's notes on bands and uint16).
        out_path: the mask file: uint8 class ids, 256 x 256 tiles, deflate-compressed,
            the class colours as palette, the input's georeferencing tags.
        classes: the checkpoint's classes (the palette; at most 256).
        tta: `window` (None: AUTO_WINDOW, 1024) and `overlap` as in `predict_probs`, and
            `flip`; multi-scale needs the whole image, so `scales` must be (1.0,).
        dtype: the forward pass's autocast dtype (see `tta.forward_dtype`).
        uint16_max: the uint16 value that becomes 255 (default: see the module).
        overwrite: replace an existing `out_path` (never the input itself).
        band_bytes: the most memory a strip's probability sums may take (see the module).

    Raises:
        DatasetError: the image cannot be read (the message names it).
        OutputError: `out_path` is the input, exists (without `overwrite`) or cannot be
            written.
        ValueError: multi-scale `tta`, or more than 256 classes.
    """
    start = time.perf_counter()
    path, out_path = Path(path), Path(out_path)
    if tta.scales != (1.0,):
        raise ValueError(f"large images are predicted at scale 1 only, not {tta.scales}")
    if len(classes) > 256:
        raise ValueError(f"a uint8 mask holds 256 classes, the model has {len(classes)}")
    tta = dataclasses.replace(tta, window=tta.window or AUTO_WINDOW)
    refuse_inputs([out_path], [path])
    check_writable_file(out_path)
    if out_path.exists() and not overwrite:
        raise OutputError(f"{out_path} already exists; give another name, or overwrite it")
    try:
        import tifffile
    except ImportError as e:
        raise OutputError(f"writing {out_path} (a tiled TIFF) needs {INSTALL}") from e

    ignore = ignore_index if 0 <= ignore_index < 256 else 255
    source = open_source(path, uint16_max)
    bar = tqdm(disable=True)
    try:
        h, w = source.height, source.width
        tags = list(source.geotags)
        if source.nodata is not None:
            tags.append((NODATA_TAG, 2, None, str(ignore), True))
        ys, xs, th, tw = _grid(h, w, tta)
        passes = [False, True] if tta.flip else [False]
        strips = _strips(w, len(classes), th, tw, len(passes), band_bytes)
        n = sum(len(_strip_origins(ys, xs, tw, w, x0, x1, m)) for x0, x1 in strips for m in passes)
        bar = tqdm(
            total=n, desc=f"predict {path.name}", unit="window", file=sys.stderr,
            disable=not progress,
        )  # fmt: skip
        with (
            staged(out_path) as tmp,
            tempfile.TemporaryFile(dir=tmp.parent, prefix=".tiles-") as spill,
        ):
            store = _TileStore(spill)
            for strip in strips:
                store.add_strip(
                    _label_rows(model, source, tta, dtype, ignore, bar, strip), strip[0]
                )
            with tifffile.TiffWriter(tmp, bigtiff=h * w > 2**31) as tif:
                tif.write(
                    store.tiles(h, w), shape=(h, w), dtype=np.uint8, tile=(OUT_TILE, OUT_TILE),
                    compression="zlib", photometric="palette", colormap=_colormap(classes, ignore),
                    extratags=tags,
                )  # fmt: skip
    finally:
        bar.close()
        source.close()
    notes = list(source.notes)
    if len(strips) > 1:
        notes.append(f"{len(strips)} strips of columns (band memory {band_bytes >> 20} MiB)")
    if source.geotags:
        notes.append("georeferencing copied: " + ", ".join(GEO_TAGS[t[0]] for t in source.geotags))
    if source.nodata is not None:
        notes.append(f"input nodata {source.nodata:g}: those pixels are {ignore} (nodata)")
    return LargeResult(out_path, (h, w), n, time.perf_counter() - start, notes)


def run_predict_large(
    checkpoint: str | Path,
    path: str | Path,
    out_path: str | Path,
    device: str = "auto",
    amp: str = "auto",
    **options,
) -> LargeResult:
    """Load a model (run folder, checkpoint or export) and `predict_large` with it."""
    from segment_deeplab.checkpoint import load_any
    from segment_deeplab.device import pick_device
    from segment_deeplab.infer.fold import for_inference
    from segment_deeplab.infer.tta import forward_dtype

    dev = pick_device(device)
    loaded = load_any(checkpoint, dev)
    model = for_inference(loaded.model, dev)
    dtype = forward_dtype(model, amp, dev)
    args = (model, path, out_path, loaded.classes, loaded.ignore_index)
    return predict_large(*args, dtype=dtype, **options)
