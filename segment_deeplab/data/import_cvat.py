"""`deeplab import cvat`: CVAT's "CVAT for images 1.1" XML export.

"CVAT for images 1.1": annotations.xml, with images/ beside it when exported with
images (a project's as images/<subset>/<name>). The classes are the task's (project's,
job's) labels in their order and colours. Each image's shapes are painted in CVAT's
drawing order, z_order then position in the file, so by default (`--overlap later`) a
shape covers the ones below it, as in CVAT's own mask export. The geometry is that
export's (cvat/apps/dataset_manager/formats/mask.py and transformations.py):
polygons, boxes and rotated boxes become polygons rasterised by pycocotools (datumaro's
`polygons_to_masks`, `boxes_to_masks`), so a box covers [round(xtl), round(xbr)) x
[round(ytl), round(ybr)); a <mask> is CVAT's RLE over its box; an ellipse covers the
pixels whose centre lies inside it, centre and axes rounded as `EllipsesToMasks` does
(which draws it with cv2.ellipse, so a boundary pixel may differ). Polylines, points,
skeletons and cuboids hold no area: they are counted in `skipped_shapes`, not painted.
The images' `subset` attribute (Train, Validation, ...) becomes the split.

(`deeplab import cvat-mask`, CVAT's colour-mask export, is import_cvat_mask.py.)
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segment_deeplab.data.import_common import (
    BACKGROUND_NAMES,
    DatasetWriter,
    ImportOptions,
    ImportProblems,
    Shape,
    check_points,
    check_size,
    class_lookup,
    classes_from_names,
    find_images_dir,
    image_size,
    paint,
    parse_hex_color,
    resolve_image,
    stem_of,
)
from segment_deeplab.data.spec import DatasetError

AREAS = ("polygon", "box", "ellipse", "mask")
NOT_AREAS = ("polyline", "points", "skeleton", "cuboid")
SPLIT_ALIASES = {"validation": "val", "valid": "val"}


def one_source(sources: list[Path], fmt: str) -> Path:
    if len(sources) != 1:
        raise DatasetError(
            f"`deeplab import {fmt}` reads one export, got {len(sources)}; a project export "
            "holds all its tasks and subsets, so export the project instead"
        )
    return sources[0]


def split_name(subset: str) -> str:
    """A CVAT subset as a split name: 'Validation' -> 'val', 'Train' -> 'train'."""
    name = re.sub(r"[^a-z0-9_-]+", "_", subset.strip().lower()).strip("_")
    return SPLIT_ALIASES.get(name, name)


def use_splits(names: set[str]) -> bool:
    """Subsets are splits unless the export only has CVAT's 'default' one."""
    return bool(names) and names != {"default"}


def hex_color(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


# ---------------------------------------------------------------- CVAT for images 1.1


@dataclass
class _Image:
    """One <image> element: its attributes and its shapes (tag, attributes) in file order."""

    id: str
    name: str
    hw: tuple[int, int] | None
    subset: str | None
    shapes: list[tuple[str, dict]] = field(default_factory=list)


def _xml_path(source: Path) -> Path:
    if source.is_dir():
        if not (source / "annotations.xml").is_file():
            raise DatasetError(
                f"{source} has no annotations.xml; give the 'CVAT for images 1.1' export "
                "folder (unzipped) or its annotations.xml"
            )
        return source / "annotations.xml"
    return source


def _meta_labels(meta: ET.Element) -> list[tuple[str, tuple | None]]:
    """(name, colour) of the project's, task's or job's labels in their order; a
    skeleton's point labels (those with a parent) are not classes."""
    found = (meta.find(f"{k}/labels") for k in ("project", "task", "job"))
    labels = next((x for x in found if x is not None), None)
    if labels is None:
        return []
    return [
        (lab.findtext("name", "").strip(), parse_hex_color(lab.findtext("color")))
        for lab in labels.findall("label")
        if not (lab.findtext("parent") or "").strip()
    ]


def _image_record(el: ET.Element, path: Path) -> _Image:
    a = el.attrib
    hw = None
    if "width" in a and "height" in a:
        try:
            hw = (int(a["height"]), int(a["width"]))
        except ValueError:
            raise DatasetError(
                f"{path} image {a.get('id', '?')}: width {a['width']!r} and height "
                f"{a['height']!r} must be whole numbers"
            ) from None
    shapes = [(ch.tag, dict(ch.attrib)) for ch in el]
    return _Image(a.get("id", "?"), a.get("name", ""), hw, a.get("subset"), shapes)


def _read_xml(path: Path) -> tuple[list, list[_Image]]:
    """The labels of <meta> and every <image>, read as a stream (elements are freed)."""
    labels, images = [], []
    try:
        events = ET.iterparse(path, events=("start", "end"))
        _, root = next(events)
        if root.tag != "annotations":
            raise DatasetError(
                f"{path} is not a CVAT XML file: its root is <{root.tag}>, not <annotations>"
            )
        for event, el in events:
            if event == "start":
                if el.tag == "track":
                    raise DatasetError(
                        f"{path} is a 'CVAT for video 1.1' export (it has <track>s); export "
                        "the task as 'CVAT for images 1.1'"
                    )
                continue
            if el.tag == "meta":
                labels = _meta_labels(el)
                el.clear()
            elif el.tag == "image":
                images.append(_image_record(el, path))
                el.clear()
    except ET.ParseError as e:
        raise DatasetError(f"{path} is not well-formed XML ({e}); re-export it") from None
    except OSError as e:
        raise DatasetError(f"{path} cannot be read: {e.strerror or e}") from None
    if not images:
        raise DatasetError(f"{path} lists no <image>; is it a 'CVAT for images 1.1' export?")
    return labels, images


def _xml_classes(labels: list, images: list[_Image], wanted: list[str] | None):
    """(classes, name -> id): the export's labels (or `--labels`), with their colours;
    labels in order of use when the file has no <meta> labels (one written by hand)."""
    names = [n for n, _ in labels]
    if not names:
        used = (a.get("label", "") for im in images for tag, a in im.shapes if tag in AREAS)
        names = list(dict.fromkeys(used))
    colors = {n: c for n, c in labels if c}
    classes = classes_from_names(wanted if wanted is not None else names, colors)
    return classes, class_lookup(classes)


def _images_root(xml: Path, images: list[_Image], opts: ImportOptions) -> tuple[Path, bool]:
    """The folder the image names are relative to, and whether they sit in a folder per
    subset there (a project exported with images: images/<subset>/<name>)."""
    candidates = [opts.images] if opts.images else [xml.parent / "images", xml.parent]
    hint = "export with images, or give the image folder with --images DIR"
    try:
        return find_images_dir([im.name for im in images], candidates, hint), False
    except DatasetError as e:
        error = e
    if all(im.subset for im in images):
        try:
            names = [f"{im.subset}/{im.name}" for im in images]
            return find_images_dir(names, candidates, hint), True
        except DatasetError:
            pass
    raise DatasetError(f"{xml}: {error}") from None


def _points(text: str) -> np.ndarray:
    """CVAT's 'x1,y1;x2,y2;...' as (N, 2) floats; ValueError when malformed."""
    arr = np.array([p.split(",") for p in text.strip().split(";") if p.strip()], dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"points {text[:40]!r} are not 'x1,y1;x2,y2;...'")
    return arr


def _fill_polygon(xy: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Pixels of a polygon as pycocotools draws them (datumaro's polygons_to_masks)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([xy.ravel().tolist()], hw[0], hw[1])
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _box_corners(a: dict) -> np.ndarray:
    """A box's four corners, turned by its `rotation` (degrees, clockwise on screen)
    about its centre as CVAT's RotatedBoxesToPolygons does."""
    x0, y0, x1, y1 = (float(a[k]) for k in ("xtl", "ytl", "xbr", "ybr"))
    xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    angle = math.radians(float(a.get("rotation") or 0))
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        centre = xy.mean(axis=0)
        xy = (xy - centre) @ np.array([[c, -s], [s, c]]).T + centre
    return xy


def _fill_ellipse(a: dict, hw: tuple[int, int], where: str, problems) -> np.ndarray | None:
    cx, cy, rx, ry = (float(a[k]) for k in ("cx", "cy", "rx", "ry"))
    if rx <= 0 or ry <= 0:
        problems.add(where, f"an ellipse needs radii above 0, this one has {rx:g} and {ry:g}")
        return None
    if not check_points(problems, where, np.array([[cx, cy]]), hw, min_points=1):
        return None
    # EllipsesToMasks: cv2.ellipse with the centre and axes rounded to whole pixels
    cx, cy, rx, ry = round(cx), round(cy), max(round(rx), 1), max(round(ry), 1)
    angle = math.radians(float(a.get("rotation") or 0))
    y, x = np.mgrid[: hw[0], : hw[1]]
    dx, dy = x - cx, y - cy
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = dy * math.cos(angle) - dx * math.sin(angle)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _fill_rle(a: dict, hw: tuple[int, int], where: str, problems) -> np.ndarray | None:
    """CVAT's mask RLE: run lengths over the mask's box (left, top, width, height) in
    row-major order, alternating 0s and 1s and starting with a run of 0s (CVAT's
    MaskConverter.cvat_rle_to_dm_rle)."""
    counts = [int(v) for v in a["rle"].split(",")]  # written as "0, 5, 3, ..."
    left, top, width, height = (int(float(a[k])) for k in ("left", "top", "width", "height"))
    if any(c < 0 for c in counts) or sum(counts) != width * height:
        problems.add(
            where,
            f"its RLE runs sum to {sum(counts)}, not the {width * height} pixels of its "
            f"{width}x{height} box; the export is damaged, export it again",
        )
        return None
    h, w = hw
    if left < 0 or top < 0 or left + width > w or top + height > h:
        problems.add(
            where,
            f"its {width}x{height} box at ({left}, {top}) reaches outside the {w}x{h} image",
        )
        return None
    runs = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    out = np.zeros(hw, bool)
    out[top : top + height, left : left + width] = runs.reshape(height, width)
    return out


def _shape_mask(tag: str, a: dict, hw, where: str, problems) -> np.ndarray | None:
    """The (H, W) bool pixels of one area shape, or None after recording why not."""
    try:
        if tag in ("polygon", "box"):
            xy = _points(a["points"]) if tag == "polygon" else _box_corners(a)
            return _fill_polygon(xy, hw) if check_points(problems, where, xy, hw) else None
        if tag == "ellipse":
            return _fill_ellipse(a, hw, where, problems)
        return _fill_rle(a, hw, where, problems)
    except KeyError as e:
        problems.add(where, f"the <{tag}> has no {e.args[0]!r} attribute")
    except ValueError as e:
        problems.add(where, f"a malformed <{tag}>: {e}")
    return None


@dataclass
class _XmlRun:
    """What every image of one annotations.xml import needs."""

    xml: Path
    opts: ImportOptions
    root: Path  # the folder the image names are relative to
    per_subset: bool  # images sit in root/<subset>/<name>
    lookup: dict[str, int]
    splits: bool  # the subsets become splits
    overlap: str


def _unknown_label(label: str, lookup: dict, labels_flag: bool) -> str:
    names = ", ".join(n for n in lookup if n not in BACKGROUND_NAMES)
    if labels_flag:
        return f"label {label!r} is not in --labels ({names}); add it there"
    return (
        f"label {label!r} is not one of the export's labels ({names}); fix the shape's "
        "label in CVAT, or give the classes with --labels"
    )


def _z_order(a: dict, where: str, problems) -> float | None:
    try:
        return float(a.get("z_order") or 0)
    except ValueError:
        problems.add(where, f"z_order {a['z_order']!r} is not a number")
        return None


def _image_shapes(im: _Image, hw, where: str, run: _XmlRun, problems, counts) -> list[Shape]:
    """The area shapes of one image, with their drawing order (z_order, position)."""
    shapes = []
    for i, (tag, a) in enumerate(im.shapes):
        if tag in NOT_AREAS:
            counts["skipped_shapes"][tag] = counts["skipped_shapes"].get(tag, 0) + 1
        if tag not in AREAS:
            continue
        label = a.get("label", "")
        at = f"{where} <{tag}> #{i + 1} (label {label!r})"
        if label not in run.lookup:
            problems.add(at, _unknown_label(label, run.lookup, run.opts.labels is not None))
            continue
        z = _z_order(a, at, problems)
        mask = _shape_mask(tag, a, hw, at, problems)
        if mask is not None and z is not None:
            shapes.append(Shape(mask, run.lookup[label], order=(z, i), where=at))
    return shapes


def _import_image(im: _Image, run: _XmlRun, writer: DatasetWriter, problems, counts) -> None:
    where = f"{run.xml} image {im.id} ({im.name})"
    if run.opts.empty == "skip" and not any(t in AREAS for t, _ in im.shapes):
        counts["skipped_empty"] += 1
        return
    rel = f"{im.subset}/{im.name}" if run.per_subset else im.name
    src = resolve_image(run.root, rel)
    if not src.is_file():
        problems.add(where, f"the image file {src} is missing")
        return
    hw = image_size(src)
    if im.hw is not None and not check_size(problems, where, hw, im.hw):
        return
    shapes = _image_shapes(im, hw, where, run, problems, counts)
    counts["shapes"] += len(shapes)
    if problems.items:
        return  # keep collecting problems, write nothing more
    stem = stem_of(im.name)
    writer.claim(stem, where)
    split = split_name(im.subset) if run.splits and im.subset else None
    writer.add_image_file(stem, src, split)
    writer.add_mask(stem, paint(hw, shapes, run.overlap))
    counts["images"] += 1


def import_cvat_xml(sources: list[Path], output: Path, opts: ImportOptions):
    """Import a 'CVAT for images 1.1' export (annotations.xml or its folder) into a new
    dataset at `output`; see the module docstring. Returns (DatasetSpec, counts)."""
    xml = _xml_path(one_source(sources, "cvat"))
    labels, images = _read_xml(xml)
    classes, lookup = _xml_classes(labels, images, opts.labels)
    root, per_subset = _images_root(xml, images, opts)
    subsets = {split_name(im.subset) for im in images if im.subset}
    run = _XmlRun(xml, opts, root, per_subset, lookup, use_splits(subsets), opts.overlap or "later")
    problems = ImportProblems(xml)
    counts = {"images": 0, "shapes": 0, "skipped_empty": 0, "skipped_shapes": {}}
    with DatasetWriter(output, classes, copy=opts.copy) as writer:
        for im in tqdm(images, desc=f"import {xml.name}", disable=not opts.progress):
            _import_image(im, run, writer, problems, counts)
        problems.raise_if_any()
        source = {
            "format": "cvat",
            "files": [str(xml)],
            "label_colors": {n: hex_color(c) for n, c in labels if c},
        }
        spec = writer.finish(opts.command, source)
    counts["splits"] = {k: len(v) for k, v in writer.splits.items()}
    return spec, counts
