"""`deeplab import labelstudio`: a Label Studio JSON export to index masks.

SOURCE is the JSON export (a list of tasks; a folder of per-task JSON files, as cloud
target storage writes them, also works). Each task names its image in `data.image`
and holds `annotations`, each with a `result` list of regions:

- polygonlabels: `value.points`, [x, y] in percent of original_width/original_height.
- rectanglelabels: `value.x/y/width/height` in percent; `rotation` in degrees about the
  top-left corner (x, y), turned into corners as label-studio-converter's
  `convert_annotation_to_yolo_obb` does.
- brushlabels: `value.rle`, decoded by Label Studio's own `brush.decode_rle` into the
  RGBA canvas (H * W * 4 values); pixels with alpha > 0 are the region.
Other results (choices, text, keypoints, relations) are not areas and are skipped.

Which annotation: the latest (by updated_at, then created_at, then position) that is
not `was_cancelled`, since that is the one the annotators last agreed on. Tasks with no
such annotation (unlabeled, or only model `predictions`) are left out, because an
unlabeled image is not an all-background one.

Geometry: label-studio-converter has no polygon-to-mask converter; its only one for
polygons is the COCO export, which scales the points to pixels (x / 100 * width) for
COCO tools to rasterise. So polygons and rectangles are rasterised as `deeplab import
coco` does, by pycocotools: a point is a position on the image (0% the left edge of
pixel 0, 100% the right edge of the last), and a pixel belongs to a shape when its
area is inside it, so a box from 20% to 60% of a 50-pixel row covers exactly pixels
10..29. The JSON and COCO exports of one project thus import to the same masks.

Classes are the labels in name order (or `--labels`); background is 0. Overlaps
(default `later`): regions are painted in result order, later on top, as Label Studio
draws them. Images are looked up by file name beside the export (or under `--images`):
the name as given and without the 8-character prefix Label Studio adds to uploads.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segment_deeplab.data.import_common import (
    DatasetWriter,
    ImportOptions,
    ImportProblems,
    Shape,
    check_points,
    check_size,
    class_lookup,
    classes_from_names,
    image_size,
    paint,
    stem_of,
)
from segment_deeplab.data.spec import DatasetError

# Label Studio stores uploads as `{uuid4()[:8]}-{original name}`
UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
POLYGON_TYPES = ("polygonlabels", "polygon")
RECTANGLE_TYPES = ("rectanglelabels", "rectangle")
BRUSH_TYPES = ("brushlabels", "brush")
# Areas this importer cannot draw: an error rather than silently background.
UNSUPPORTED_AREAS = ("ellipselabels", "ellipse")


def _json_files(sources: list[Path]) -> list[Path]:
    out = []
    for p in sources:
        out += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not out:
        raise DatasetError(f"{', '.join(map(str, sources))} holds no .json export")
    return out


def _load(path: Path) -> list[dict]:
    """The tasks of one export file (a list, or one task as target storage writes it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not a readable Label Studio JSON export: {e}") from None
    if isinstance(data, dict) and "data" in data:
        data = [data]
    if not isinstance(data, list) or not all(isinstance(t, dict) and "data" in t for t in data):
        raise DatasetError(
            f"{path} is not a Label Studio JSON export: it must be a list of tasks, each "
            "with 'data' and 'annotations' (export with the 'JSON' format, not JSON-MIN "
            "or CSV)"
        )
    return data


def _when(ann: dict) -> float:
    for key in ("updated_at", "created_at"):
        try:
            t = datetime.fromisoformat(str(ann[key]).replace("Z", "+00:00"))
        except (KeyError, ValueError):
            continue
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    return -math.inf


def _annotation(task: dict) -> dict | None:
    """The latest annotation that was not cancelled; None when there is none."""
    anns = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    anns = [(i, a) for i, a in enumerate(anns) if not a.get("was_cancelled")]
    if not anns:
        return None
    return max(anns, key=lambda ia: (_when(ia[1]), ia[0]))[1]


def _kind(result: dict) -> str | None:
    """polygon | rectangle | brush | unsupported, or None for a result that is no area."""
    t = str(result.get("type", "")).lower()
    value = result.get("value") if isinstance(result.get("value"), dict) else {}
    if t in POLYGON_TYPES or (t == "labels" and "points" in value):
        return "polygon"
    if t in BRUSH_TYPES or (t == "labels" and "rle" in value):
        return "brush"
    if t in UNSUPPORTED_AREAS or (t == "labels" and "radiusX" in value):
        return "unsupported"
    if t in RECTANGLE_TYPES or (t == "labels" and "width" in value):
        return "rectangle"
    return None


def _label(result: dict) -> list[str]:
    value = result.get("value") or {}
    labels = value.get(result.get("type")) or value.get("labels") or []
    return [str(x) for x in labels] if isinstance(labels, list) else [str(labels)]


def _regions(task: dict) -> list[dict]:
    ann = _annotation(task)
    results = (ann or {}).get("result") or []
    return [r for r in results if isinstance(r, dict)]


def _classes(tasks: list[tuple[Path, dict]], labels: list[str] | None):
    """(classes, name -> id); the names every chosen annotation uses, sorted."""
    if labels is None:
        used = {n for _, t in tasks for r in _regions(t) if _kind(r) for n in _label(r)}
        labels = sorted(used)
    classes = classes_from_names(labels)
    return classes, class_lookup(classes)


def _image_names(url: str) -> list[str]:
    """Names to look for, relative to the image folder, most specific first."""
    parsed = urllib.parse.urlparse(url)
    query = urllib.parse.parse_qs(parsed.query)
    if "d" in query:  # /data/local-files/?d=dir/photo.jpg
        rel = query["d"][0].replace("\\", "/")
    elif parsed.path.startswith("/data/upload/"):
        rel = urllib.parse.unquote(parsed.path.removeprefix("/data/upload/"))
    elif parsed.scheme in ("", "file"):
        rel = urllib.parse.unquote(parsed.path)
    else:  # http(s), s3, gs: only the file name can be matched
        rel = urllib.parse.unquote(parsed.path).rsplit("/", 1)[-1]
    rel = rel.lstrip("/")
    base = rel.rsplit("/", 1)[-1]
    names = [rel, base, UPLOAD_PREFIX.sub("", base)]
    return [n for n in dict.fromkeys(names) if n]


def _find_image(url: str, roots: list[Path]) -> tuple[Path | None, str, list[str]]:
    """(the file, the name it was found by, every name tried) of a task's image."""
    names = _image_names(url)
    p = Path(url)
    if p.is_absolute() and p.is_file():
        return p, p.name, names
    for root in roots:
        for n in names:
            if (root / n).is_file():
                return root / n, n, names
    return None, names[-1] if names else "", names


def _task_image(task: dict) -> str | None:
    """`data.image`, or the only value of `data` that names an image file."""
    data = task.get("data") or {}
    if isinstance(data.get("image"), str):
        return data["image"]
    found = [v for v in data.values() if isinstance(v, str) and re.search(r"\.\w{3,4}$", v)]
    return found[0] if len(found) == 1 else None


def _polygon_mask(xy: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Pixel-coordinate polygon -> (H, W) bool, as COCO's annToMask draws it."""
    from pycocotools import mask as mask_utils

    h, w = hw
    rle = mask_utils.merge(mask_utils.frPyObjects([xy.ravel().tolist()], h, w))
    return mask_utils.decode(rle).astype(bool)


def _rectangle_corners(value: dict, hw: tuple[int, int]) -> np.ndarray:
    """(4, 2) pixel corners of a rectangle rotated by `rotation` degrees (clockwise on
    screen) about its top-left corner."""
    h, w = hw
    x, y = value["x"] / 100 * w, value["y"] / 100 * h
    rw, rh = value["width"] / 100 * w, value["height"] / 100 * h
    a = math.radians(value.get("rotation") or 0)
    c, s = math.cos(a), math.sin(a)
    return np.array(
        [(x, y), (x + rw * c, y + rw * s), (x + rw * c - rh * s, y + rw * s + rh * c),
         (x - rh * s, y + rh * c)]
    )  # fmt: skip


def _brush_decoder():
    """Label Studio's own RLE decoder, imported only when an export has brush masks."""
    try:
        from label_studio_converter.brush import decode_rle
    except ImportError:
        try:
            from label_studio_sdk.converter.brush import decode_rle
        except ImportError:
            raise DatasetError(
                "the export has brush masks, decoded with Label Studio's own RLE decoder: "
                "pip install 'segment-deeplab[labelstudio]'"
            ) from None
    return decode_rle


def _brush_mask(value: dict, hw: tuple[int, int], where: str, problems: ImportProblems):
    if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
        problems.add(where, f"brush format {value.get('format')!r}: only 'rle' is read")
        return None
    h, w = hw
    decode_rle = _brush_decoder()
    try:
        flat = decode_rle(value["rle"])
    except Exception as e:  # a truncated or foreign RLE fails inside the decoder
        problems.add(where, f"its brush RLE does not decode ({type(e).__name__}: {e})")
        return None
    if flat.size != h * w * 4:
        problems.add(
            where,
            f"its brush RLE decodes to {flat.size} values, not the {w}x{h}x4 = {h * w * 4} "
            "of an RGBA mask of the image",
        )
        return None
    return flat.reshape(h, w, 4)[..., 3] > 0


def _result_mask(result: dict, hw, where: str, problems: ImportProblems):
    """One region -> (H, W) bool, or None after recording the problem."""
    kind, value = _kind(result), result.get("value") or {}
    try:
        if kind == "polygon":
            xy = np.asarray(value["points"], float).reshape(-1, 2) * [hw[1] / 100, hw[0] / 100]
            return _polygon_mask(xy, hw) if check_points(problems, where, xy, hw) else None
        if kind == "rectangle":
            xy = _rectangle_corners(value, hw)
            return _polygon_mask(xy, hw) if check_points(problems, where, xy, hw) else None
    except (KeyError, TypeError, ValueError) as e:
        problems.add(where, f"malformed {result.get('type')} value ({type(e).__name__}: {e})")
        return None
    if kind == "brush":
        return _brush_mask(value, hw, where, problems)
    problems.add(where, f"{result.get('type')} regions are not imported; redraw as polygons")
    return None


def import_labelstudio(sources: list[Path], output: Path, opts: ImportOptions):
    """Import a Label Studio JSON export into a new dataset at `output`; see the module
    docstring. Returns (DatasetSpec, counts)."""
    files = _json_files(sources)
    tasks = [(path, t) for path in files for t in _load(path)]
    classes, lookup = _classes(tasks, opts.labels)
    problems = ImportProblems(", ".join(str(p) for p in sources))
    keys = ("images", "regions", "unannotated", "skipped_results", "skipped_empty")
    counts = dict.fromkeys(keys, 0)
    with DatasetWriter(output, classes, copy=opts.copy) as writer:
        for path, task in tqdm(tasks, desc="import", disable=not opts.progress):
            _import_task(path, task, lookup, writer, problems, opts, counts)
        problems.raise_if_any()
        source = {"format": "labelstudio", "files": [str(p) for p in files]}
        return writer.finish(opts.command, source), counts


def _shapes(task_where: str, results: list[dict], hw, lookup, problems, counts) -> list[Shape]:
    shapes = []
    for i, r in enumerate(results):
        if _kind(r) is None:
            counts["skipped_results"] += 1
            continue
        labels = _label(r)
        where = f"{task_where} result {i} ({r.get('type')} {', '.join(labels) or 'no label'})"
        if len(labels) != 1:
            problems.add(where, f"a region needs exactly one label, it has {len(labels)}")
            continue
        if labels[0] not in lookup:
            problems.add(where, f"label {labels[0]!r} is not in --labels; add it there")
            continue
        declared = (r.get("original_height"), r.get("original_width"))
        if None not in declared and not check_size(problems, where, hw, declared):
            continue
        m = _result_mask(r, hw, where, problems)
        if m is not None:
            shapes.append(Shape(m, lookup[labels[0]], order=(i,), where=where))
    return shapes


def _import_task(path, task, lookup, writer, problems, opts, counts) -> None:
    where = f"{path} task {task.get('id', '?')}"
    if _annotation(task) is None:
        counts["unannotated"] += 1
        return
    results = _regions(task)
    if not any(_kind(r) for r in results) and opts.empty == "skip":
        counts["skipped_empty"] += 1
        return
    url = _task_image(task)
    if url is None:
        problems.add(where, "data.image is missing: which image was annotated?")
        return
    roots = [opts.images] if opts.images else [path.parent, path.parent / "images"]
    src, name, tried = _find_image(url, roots)
    if src is None:
        problems.add(
            where,
            f"its image {url} is not in {', '.join(map(str, roots))} (looked for "
            f"{', '.join(tried)}); give the image folder with --images DIR",
        )
        return
    hw = image_size(src)
    shapes = _shapes(where, results, hw, lookup, problems, counts)
    counts["regions"] += len(shapes)
    if problems.items:
        return  # keep collecting problems, write nothing more
    stem = stem_of(name)
    writer.claim(stem, where)
    writer.add_image_file(stem, src)
    writer.add_mask(stem, paint(hw, shapes, opts.overlap or "later"))
    counts["images"] += 1
