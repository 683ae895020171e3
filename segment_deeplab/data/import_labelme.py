"""`deeplab import labelme`: labelme JSON files (one per image) to index masks.

SOURCE is a folder of labelme .json files (not searched recursively, as labelme's own
labelme2voc.py reads one) or the files themselves; each image's stem in the dataset
is its JSON file's name. The image is the file's embedded `imageData` when it has
one, written byte for byte: that is what labelme loads and shows, so the shapes were
drawn on it. Otherwise `imagePath`, relative to the JSON file (or to `--images`).
`imageHeight`/`imageWidth` must match the image.

Geometry is labelme's own `labelme/utils/shape.py`: `shape_to_mask` draws with PIL on
pixel coordinates (a point is a pixel centre; outlines are filled too), polygon (and
no shape_type) and oriented_rectangle with `ImageDraw.polygon`, rectangle with
`ImageDraw.rectangle` over its two corners, circle with `ImageDraw.ellipse` of the
radius to its second point; and `shapes_to_label` pastes a `mask` shape's base64 PNG
(labelme >= 5.3) with its top-left at the first point, rounded. line, linestrip and
point shapes are no areas (labelme would draw them 10 pixels wide): skipped, counted.

Classes are the labels in name order, or `--labels` (a labels.txt in labelme's
convention works: a first line `__ignore__` and `_background_` are no classes). A
shape labelled `_background_` or `background` paints 0, one labelled `__ignore__`
paints 255. Overlaps (default `later`): shapes are painted in file order, later on
top, as `shapes_to_label` paints them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from segment_deeplab.data.import_common import (
    BACKGROUND_NAMES,
    IGNORE,
    DatasetWriter,
    ImportOptions,
    ImportProblems,
    Shape,
    check_points,
    check_size,
    class_lookup,
    classes_from_names,
    image_size,
    image_size_of_bytes,
    paint,
    resolve_image,
)
from segment_deeplab.data.spec import DatasetError

IGNORE_LABEL = "__ignore__"
LINE_TYPES = ("line", "linestrip", "point", "points")
# shape_type -> the number of points it needs (None: any, at least 3)
AREA_TYPES = {"polygon": None, "rectangle": 2, "circle": 2, "mask": 2, "oriented_rectangle": 4}


def _json_files(sources: list[Path]) -> list[Path]:
    out = []
    for p in sources:
        out += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not out:
        raise DatasetError(f"{', '.join(map(str, sources))} holds no labelme .json files")
    return out


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not a readable labelme JSON file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise DatasetError(
            f"{path} is not a labelme file: it needs a 'shapes' list and 'imagePath' or 'imageData'"
        )
    if not all(isinstance(s, dict) and isinstance(s.get("label"), str) for s in data["shapes"]):
        raise DatasetError(f"{path}: every shape needs a 'label' string")
    return data


def _classes(files: dict[Path, dict], labels: list[str] | None):
    """(classes, name -> id); `__ignore__` is 255 and no class."""
    if labels is None:
        shapes = [s for d in files.values() for s in d["shapes"]]
        labels = sorted({s["label"] for s in shapes if s.get("shape_type") not in LINE_TYPES})
    names = [n for n in labels if n != IGNORE_LABEL and n.lower() not in BACKGROUND_NAMES]
    classes = classes_from_names(names)
    lookup = class_lookup(classes)
    lookup[IGNORE_LABEL] = IGNORE
    return classes, lookup


def _embedded(path: Path, data: dict, problems: ImportProblems):
    """(bytes, (H, W)) of a file's imageData, or None after recording the problem."""
    try:
        raw = base64.b64decode(data["imageData"], validate=True)
        return raw, image_size_of_bytes(raw)
    except (binascii.Error, TypeError, ValueError, OSError) as e:
        problems.add(str(path), f"its imageData is not a base64 image ({e})")
        return None


def _image_file(path: Path, data: dict, images: Path | None, problems: ImportProblems):
    """The file `imagePath` names, or None after recording the problem."""
    name = PureWindowsPath(str(data.get("imagePath") or "")).as_posix()
    if not name:
        problems.add(str(path), "it has neither imageData nor imagePath: which image is it?")
        return None
    roots = [images] if images else [path.parent]
    tried = [resolve_image(r, n) for r in roots for n in dict.fromkeys([name, Path(name).name])]
    for p in tried:
        if p.is_file():
            return p
    problems.add(
        str(path),
        f"its image {name} is missing (looked for {', '.join(map(str, tried))}); give the "
        "image folder with --images DIR",
    )
    return None


def _points(shape: dict, where: str, problems: ImportProblems) -> np.ndarray | None:
    try:
        return np.asarray(shape.get("points"), float).reshape(-1, 2)
    except (TypeError, ValueError):
        problems.add(where, f"points must be a list of [x, y], got {shape.get('points')!r}")
        return None


def _draw(kind: str, xy: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """labelme's shape_to_mask: PIL drawing with outline and fill."""
    img = Image.fromarray(np.zeros(hw, np.uint8))
    draw = ImageDraw.Draw(img)
    pts = [tuple(p) for p in xy.tolist()]
    if kind == "circle":
        (cx, cy), (px, py) = pts
        d = math.sqrt((cx - px) ** 2 + (cy - py) ** 2)
        draw.ellipse(((cx - d, cy - d), (cx + d, cy + d)), outline=1, fill=1)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = pts
        box = ((min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1)))
        draw.rectangle(box, outline=1, fill=1)
    else:  # polygon, oriented_rectangle
        draw.polygon(pts, outline=1, fill=1)
    return np.array(img, dtype=bool)


def _paste(shape: dict, xy: np.ndarray, hw, where: str, problems: ImportProblems):
    """labelme's shapes_to_label for a mask shape: the PNG, top-left at round(points[0])."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(shape["mask"], validate=True))) as im:
            patch = np.array(im) != 0
    except (KeyError, binascii.Error, TypeError, ValueError, OSError) as e:
        problems.add(where, f"its mask is not a base64 PNG ({e})")
        return None
    if patch.ndim == 3:
        patch = patch.any(axis=2)
    out = np.zeros(hw, bool)
    x1, y1 = np.asarray(xy[0]).round().astype(int)
    (ph, pw), (h, w) = patch.shape, hw
    ys, ye, xs, xe = max(y1, 0), min(y1 + ph, h), max(x1, 0), min(x1 + pw, w)
    if ys < ye and xs < xe:
        out[ys:ye, xs:xe] = patch[ys - y1 : ye - y1, xs - x1 : xe - x1]
    return out


def _shape_mask(shape: dict, hw, where: str, problems: ImportProblems):
    """One area shape -> (H, W) bool, or None after recording the problem."""
    kind = shape.get("shape_type") or "polygon"
    xy = _points(shape, where, problems)
    if xy is None:
        return None
    need = AREA_TYPES[kind]
    if need is not None and len(xy) != need:
        problems.add(where, f"a {kind} needs {need} points, this one has {len(xy)}")
        return None
    if kind == "mask":
        return _paste(shape, xy, hw, where, problems)
    check = xy[:1] if kind == "circle" else xy  # a circle may reach past the edge
    if not check_points(problems, where, check, hw, min_points=3 if need is None else len(check)):
        return None
    return _draw(kind, xy, hw)


def import_labelme(sources: list[Path], output: Path, opts: ImportOptions):
    """Import labelme JSON files into a new dataset at `output`; see the module
    docstring. Returns (DatasetSpec, counts)."""
    files = {p: _load(p) for p in _json_files(sources)}
    classes, lookup = _classes(files, opts.labels)
    problems = ImportProblems(", ".join(str(p) for p in sources))
    counts = dict.fromkeys(("images", "shapes", "skipped_shapes", "skipped_empty"), 0)
    with DatasetWriter(output, classes, copy=opts.copy) as writer:
        for path, data in tqdm(files.items(), desc="import", disable=not opts.progress):
            _import_file(path, data, lookup, writer, problems, opts, counts)
        problems.raise_if_any()
        source = {"format": "labelme", "files": [str(p) for p in files]}
        return writer.finish(opts.command, source), counts


def _shapes(path: Path, data: dict, hw, lookup, problems, counts) -> list[Shape]:
    shapes = []
    for i, s in enumerate(data["shapes"]):
        kind = s.get("shape_type") or "polygon"
        where = f"{path} shape {i} ({kind} {s['label']!r})"
        if kind in LINE_TYPES:
            counts["skipped_shapes"] += 1
            continue
        if kind not in AREA_TYPES:
            problems.add(where, f"unknown shape_type {kind!r}: {', '.join(AREA_TYPES)} are read")
            continue
        if s["label"] not in lookup:
            problems.add(where, f"label {s['label']!r} is not in --labels; add it there")
            continue
        m = _shape_mask(s, hw, where, problems)
        if m is not None:
            shapes.append(Shape(m, lookup[s["label"]], order=(i,), where=where))
    return shapes


def _import_file(path, data, lookup, writer, problems, opts, counts) -> None:
    if not data["shapes"] and opts.empty == "skip":
        counts["skipped_empty"] += 1
        return
    src = embedded = None
    if data.get("imageData"):
        if (embedded := _embedded(path, data, problems)) is None:
            return
        hw = embedded[1]
    else:
        if (src := _image_file(path, data, opts.images, problems)) is None:
            return
        hw = image_size(src)
    declared = (data.get("imageHeight"), data.get("imageWidth"))
    if None not in declared and not check_size(problems, str(path), hw, declared):
        return
    shapes = _shapes(path, data, hw, lookup, problems, counts)
    counts["shapes"] += len(shapes)
    if problems.items:
        return  # keep collecting problems, write nothing more
    stem = path.stem
    writer.claim(stem, str(path))
    if embedded is not None:
        writer.add_image_bytes(stem, embedded[0], str(path))
    else:
        writer.add_image_file(stem, src)
    writer.add_mask(stem, paint(hw, shapes, opts.overlap or "later"))
    counts["images"] += 1
