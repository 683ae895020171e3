"""`deeplab import coco`: COCO instance annotations (polygons, RLE) to index masks.

Categories become classes 1..N in category-id order (or `--labels` order), background
is 0, and the mapping goes into dataset.yaml by name. The geometry is pycocotools':
polygons and uncompressed RLE are turned into compressed RLE by `frPyObjects` and
decoded by `decode`, exactly as `COCO.annToMask` does.

Overlaps (default `smaller`): COCO lists annotations in no drawing order, so larger
objects are painted first and a smaller object on top of one stays visible. Crowd
regions (`iscrowd: 1`) are painted as their class, or as 255 with `--crowd ignore`, or
left out with `--crowd skip`. Several JSON files (e.g. instances_train2017.json and
instances_val2017.json) import into one dataset, each file a split.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from segment_deeplab.data.import_common import (
    IGNORE,
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
    resolve_image,
    run_jobs,
    stem_of,
    write_mask,
)
from segment_deeplab.data.spec import DatasetError

CROWD_RULES = ("class", "ignore", "skip")


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not a readable COCO JSON file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(
            f"{path} is not a COCO instances file: it needs 'images', 'annotations' and "
            "'categories' lists"
        )
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise DatasetError(f"{path}: '{key}' must be a list")
    return data


def _json_files(sources: list[Path]) -> list[Path]:
    """The JSON files named, a folder standing for its instances_*.json (or its only
    JSON file), also in an annotations/ folder inside it."""
    out = []
    for src in sources:
        if not src.is_dir():
            out.append(src)
            continue
        found = sorted(src.glob("instances_*.json")) or sorted(
            (src / "annotations").glob("instances_*.json")
        )
        if not found:
            found = sorted(src.glob("*.json")) or sorted((src / "annotations").glob("*.json"))
            if len(found) > 1:
                raise DatasetError(
                    f"{src} holds {len(found)} JSON files ({', '.join(p.name for p in found)}); "
                    "name the COCO instances file(s) to import"
                )
        if not found:
            raise DatasetError(f"{src} holds no COCO JSON file (instances_*.json)")
        out.extend(found)
    return out


def _split_name(path: Path, n_files: int) -> str | None:
    """The split a file holds, read off its name (instances_train2017 -> train)."""
    if n_files == 1:
        return None
    m = re.search(r"(train|val|valid|test)", path.stem.lower())
    if not m:
        raise DatasetError(
            f"{path}: with several COCO files, each name must say its split (train, val "
            "or test), e.g. instances_val2017.json"
        )
    return {"valid": "val"}.get(m.group(1), m.group(1))


def _categories(files: dict[Path, dict], labels: list[str] | None):
    """(classes, {category id: class id}) agreed by every file."""
    cats: dict[int, str] = {}
    for path, data in files.items():
        for c in data.get("categories", []):
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise DatasetError(f"{path}: every category needs an id and a name, got {c!r}")
            cid, name = int(c["id"]), str(c["name"])
            if cats.get(cid, name) != name:
                raise DatasetError(
                    f"{path}: category {cid} is {name!r} here but {cats[cid]!r} in another "
                    "file; import files of one export together"
                )
            cats[cid] = name
    names = labels if labels is not None else [cats[k] for k in sorted(cats)]
    classes = classes_from_names(names)
    lookup = class_lookup(classes)
    mapping = {}
    for cid, name in cats.items():
        if name not in lookup:
            raise DatasetError(
                f"category {cid} ({name!r}) is not in --labels; add it, or leave --labels "
                "out to take every category"
            )
        mapping[cid] = lookup[name]
    return classes, mapping


def _decode(segm, hw: tuple[int, int], where: str, problems: ImportProblems):
    """A segmentation (polygons, uncompressed or compressed RLE) -> (H, W) bool, or None
    after recording the problem."""
    from pycocotools import mask as mask_utils

    h, w = hw
    if isinstance(segm, list):
        if not segm:
            problems.add(where, "has no segmentation (a box-only export?); export masks")
            return None
        for poly in segm:
            if not isinstance(poly, list) or len(poly) % 2:
                problems.add(where, "a polygon must be a flat list [x1, y1, x2, y2, ...]")
                return None
            if not check_points(problems, where, np.asarray(poly, float).reshape(-1, 2), hw):
                return None
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(v) for v in segm["size"]] != [h, w]:
            problems.add(
                where,
                f"its RLE is {segm['size'][1]}x{segm['size'][0]} but the image is {w}x{h}",
            )
            return None
        counts = segm["counts"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != h * w:
                problems.add(
                    where,
                    f"its RLE covers {sum(counts)} pixels, not the image's {h * w} ({w}x{h})",
                )
                return None
            rle = mask_utils.frPyObjects(segm, h, w)
        else:
            rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        problems.add(where, f"unknown segmentation {type(segm).__name__}: polygons or RLE")
        return None
    return mask_utils.decode(rle).astype(bool)


def import_coco(sources: list[Path], output: Path, opts: ImportOptions):
    """Import COCO instance files into a new dataset at `output`; see the module
    docstring. Returns (DatasetSpec, counts)."""
    if opts.crowd not in CROWD_RULES:
        raise DatasetError(f"--crowd {opts.crowd!r}: choose one of {', '.join(CROWD_RULES)}")
    overlap = opts.overlap or "smaller"
    files = {p: _load(p) for p in _json_files(sources)}
    classes, mapping = _categories(files, opts.labels)
    problems = ImportProblems(", ".join(str(p) for p in sources))
    counts = {"images": 0, "annotations": 0, "skipped_empty": 0, "crowd": 0}
    with DatasetWriter(output, classes, copy=opts.copy) as writer:
        for path, data in files.items():
            split = _split_name(path, len(files))
            _import_file(path, data, split, mapping, writer, problems, opts, overlap, counts)
        problems.raise_if_any()
        names = {c.id: c.name for c in classes}
        source = {
            "format": "coco",
            "files": [str(p) for p in sources],
            # class name -> the COCO category id(s) it holds
            "category_ids": {
                names[k]: sorted(c for c, v in mapping.items() if v == k)
                for k in sorted(set(mapping.values()))
            },
        }
        return writer.finish(opts.command, source), counts


def _import_file(path, data, split, mapping, writer, problems, opts, overlap, counts) -> None:
    images = {}
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DatasetError(f"{path}: every image needs an id and a file_name, got {im!r}")
        images[im["id"]] = im
    by_image = defaultdict(list)
    for ann in data.get("annotations", []):
        aid = ann.get("id", "?")
        if ann.get("image_id") not in images:
            problems.add(
                f"{path} annotation {aid}",
                f"image_id {ann.get('image_id')} is not listed in 'images'",
            )
        elif ann.get("category_id") not in mapping:
            problems.add(
                f"{path} annotation {aid}",
                f"category_id {ann.get('category_id')} is not listed in 'categories'",
            )
        else:
            by_image[ann["image_id"]].append(ann)
    names = [im["file_name"] for im in images.values()]
    root = opts.images or find_images_dir(
        names,
        [path.parent, path.parent / "images", path.parent.parent / "images",
         path.parent.parent / path.stem.removeprefix("instances_"), path.parent.parent],
        "give the image folder with --images DIR",
    )  # fmt: skip
    jobs, stems = [], []
    for im in images.values():
        anns = by_image.get(im["id"], [])
        if not anns and opts.empty == "skip":
            counts["skipped_empty"] += 1
            continue
        src = resolve_image(root, im["file_name"])
        where = f"{path} image {im['id']} ({im['file_name']})"
        if not src.is_file():
            problems.add(where, f"the image file {src} is missing")
            continue
        stem = stem_of(im["file_name"])
        writer.claim(stem, where)
        declared = (im.get("height"), im.get("width"))
        shapes = []
        for ann in anns:
            crowd = bool(ann.get("iscrowd", 0))
            if crowd and opts.crowd == "skip":
                continue
            cid = IGNORE if crowd and opts.crowd == "ignore" else mapping[ann["category_id"]]
            shapes.append((f"{path} annotation {ann.get('id', '?')}", ann.get("segmentation"), cid))
            counts["crowd"] += crowd
        jobs.append((where, src, declared, shapes, overlap, writer.mask_path(stem), writer.palette))
        stems.append((stem, src))
    for found, n_shapes in run_jobs(_rasterise, jobs, opts.progress):
        problems.items.extend(found)
        counts["annotations"] += n_shapes
    if problems.items:
        return
    for stem, src in stems:
        writer.add_image_file(stem, src, split)
    counts["images"] += len(stems)


def _rasterise(where, src, declared, shapes, overlap, mask_path, palette):
    """One image's mask from its annotations, written to `mask_path` (in a worker
    process); returns (problems, shapes painted)."""
    problems = ImportProblems(where)
    hw = image_size(src)
    declared = (int(declared[0] or hw[0]), int(declared[1] or hw[1]))
    if not check_size(problems, where, hw, declared):
        return problems.items, 0
    painted = []
    for i, (ann_where, segm, cid) in enumerate(shapes):
        m = _decode(segm, hw, ann_where, problems)
        if m is not None:
            painted.append(Shape(m, cid, order=(i,)))
    if not problems.items:
        write_mask(mask_path, paint(hw, painted, overlap), palette)
    return problems.items, len(painted)
