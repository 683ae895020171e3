"""Read one image/mask pair through `decode`, as training will, and note what is wrong.

Used by `validate.py` (per-file checks, run in parallel). Problems come with the file
and a fix; value histograms feed the dataset-wide checks and the class statistics.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segment_deeplab.data.decode import (
    MaskOptions,
    decode_rgb,
    fringe_mask,
    mask_ids,
    open_mask,
)
from segment_deeplab.data.pairs import Problem
from segment_deeplab.data.spec import DatasetError


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


def between_mask(m: np.ndarray) -> np.ndarray:
    """Pixels whose value lies strictly between their 4-neighbours' smallest and largest:
    what smoothing or bilinear resizing leaves on a boundary. (H, W) -> (H, W) bool."""
    p = np.pad(m, 1, mode="edge")
    nbrs = (p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:])
    lo = np.minimum(np.minimum(nbrs[0], nbrs[1]), np.minimum(nbrs[2], nbrs[3]))
    hi = np.maximum(np.maximum(nbrs[0], nbrs[1]), np.maximum(nbrs[2], nbrs[3]))
    return (lo < m) & (m < hi)


def _stored_size(data: bytes) -> tuple[int, int] | None:
    """(w, h) of the pixels as stored, before EXIF orientation; None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # the decoder's error is the one reported
        return None


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
    try:
        res.size_hw = tuple(decode_rgb(img_bytes, image).shape[-2:])
    except DatasetError as e:
        msg = f"images/{image.name} cannot be read ({e.__cause__ or e}); re-export or remove it"
        res.problems.append(Problem.error(image, "unreadable", msg))
    try:
        m = open_mask(mask_bytes, mask, verify=True)
    except DatasetError as e:
        res.problems.append(Problem.error(mask, "unreadable", str(e)))
        return res
    ids, issues = mask_ids(m, mask, opts)
    res.problems += [Problem(i.level, str(mask), i.code, i.message) for i in issues]
    if res.size_hw is not None and m.size != res.size_hw[::-1]:
        res.problems.append(_size_problem(image, mask, _stored_size(img_bytes), m, res.size_hw))
    elif ids is not None:
        hists = [ids.ravel(), ids[fringe_mask(ids)], ids[between_mask(ids)]]
        hist = np.stack([np.bincount(h, minlength=256) for h in hists], 1)  # (256, 3)
        res.values = np.flatnonzero(hist[:, 0])
        res.stats = hist[res.values].astype(np.int64)
    return res


def _size_problem(image: Path, mask: Path, stored, m, shown_hw: tuple[int, int]) -> Problem:
    msg = (
        f"images/{image.name} is {shown_hw[1]}x{shown_hw[0]} but masks/{mask.name} is "
        f"{m.size[0]}x{m.size[1]} (width x height); a mask must have its image's size"
    )
    if m.size == stored:
        msg += (
            "; the image carries an EXIF rotation, which loading applies, and the mask "
            "matches the unrotated pixels. Save the image rotated (PIL ImageOps.exif_transpose)"
        )
    else:
        msg += ": re-export the mask, or resize it with NEAREST"
    return Problem.error(image, "size_mismatch", msg)
