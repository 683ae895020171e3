"""`deeplab import cvat-mask`: CVAT's "Segmentation mask 1.1" export (Pascal VOC layout).

labelmap.txt gives the classes in order and their colours, SegmentationClass/ the colour
masks, JPEGImages/ the images and ImageSets/Segmentation/<subset>.txt the subsets.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from segment_deeplab.data.import_common import (
    BACKGROUND_NAMES,
    DatasetWriter,
    ImportOptions,
    ImportProblems,
    check_size,
    class_lookup,
    classes_from_names,
    image_size,
    palette_to_ids,
    stem_of,
)
from segment_deeplab.data.import_cvat import hex_color, one_source, split_name, use_splits
from segment_deeplab.data.spec import IMAGE_EXTS, DatasetError


def _read_labelmap(path: Path) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of each 'name:r,g,b:parts:actions' line (datumaro's VOC
    labelmap.txt), in order."""
    if not path.is_file():
        raise DatasetError(
            f"{path.parent} has no labelmap.txt; give the unzipped 'Segmentation mask 1.1' "
            "export folder (labelmap.txt, SegmentationClass/, JPEGImages/)"
        )
    entries: list[tuple[str, tuple[int, int, int]]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            rgb = tuple(int(v) for v in rest.split(":")[0].split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
        except ValueError:
            raise DatasetError(
                f"{path} line {n}: {line!r} is not 'name:r,g,b::' with r, g, b in 0..255"
            ) from None
        clash = [o for o, c in entries if o == name.strip() or c == rgb]
        if clash:
            raise DatasetError(
                f"{path} line {n}: {line!r} repeats the name or colour of {clash[0]!r}"
            )
        entries.append((name.strip(), rgb))
    if not entries:
        raise DatasetError(f"{path} names no labels")
    return entries


def _mask_classes(entries: list, wanted: list[str] | None):
    """(classes, colour -> class id): labelmap order (or --labels) and colours; black is
    background when labelmap.txt has no background line."""
    colors = dict(entries)
    classes = classes_from_names(wanted if wanted is not None else list(colors), colors)
    lookup = class_lookup(classes)
    ids = {rgb: lookup[n] for n, rgb in entries if n in lookup}
    if not any(n.lower() in BACKGROUND_NAMES for n in colors):
        ids.setdefault((0, 0, 0), 0)
    return classes, ids


def _mask_root(source: Path) -> Path:
    root = source.parent if source.name == "labelmap.txt" else source
    if not (root / "SegmentationClass").is_dir():
        raise DatasetError(
            f"{root} has no SegmentationClass/ folder; give the unzipped 'Segmentation mask "
            "1.1' export folder"
        )
    return root


def _mask_splits(root: Path, items: list[str], problems) -> dict[str, str]:
    """item -> split, from ImageSets/Segmentation/<subset>.txt ({} without splits)."""
    sets = {f: split_name(f.stem) for f in sorted(root.glob("ImageSets/Segmentation/*.txt"))}
    use = use_splits(set(sets.values()))
    known, out = set(items), {}
    for f, split in sets.items():
        for item in filter(None, (s.strip() for s in f.read_text("utf-8").splitlines())):
            if item not in known:
                problems.add(str(f), f"lists {item!r}, but SegmentationClass/{item}.png is missing")
            elif use and out.setdefault(item, split) != split:
                problems.add(str(f), f"lists {item!r}, which the {out[item]} subset lists too")
    for item in sorted(known - set(out)) if use else []:
        problems.add(str(root / "SegmentationClass" / f"{item}.png"), "is in no ImageSets list")
    return out


def _find_image(img_dir: Path, item: str) -> Path | None:
    """The image of a mask: ITEM.jpg or .png (the dataset's formats first), or another
    extension (which DatasetWriter then refuses by name)."""
    found = [Path(p) for p in glob.glob(glob.escape(str(img_dir / item)) + ".*")]
    found = sorted(
        (p for p in found if p.is_file()), key=lambda p: (p.suffix.lower() not in IMAGE_EXTS, p)
    )
    return found[0] if found else None


def _color_ids(png: Path, rgb: np.ndarray, ids: dict, labelmap: Path, problems):
    """(H, W, 3) colours -> (H, W) uint8 class ids; None after naming the colours that
    are not classes (up to three, with their pixel counts)."""
    out = palette_to_ids(rgb, ids)
    unknown = out < 0
    if not unknown.any():
        return out.astype(np.uint8)
    colours, n = np.unique(rgb[unknown], axis=0, return_counts=True)
    shown = ", ".join(
        f"({', '.join(str(int(v)) for v in colours[i])}) in {n[i]} pixels"
        for i in np.argsort(-n)[:3]
    )
    many = len(colours) != 1
    problems.add(
        str(png),
        f"{len(colours)} colour{'s' * many} that {'are' if many else 'is'} not a class of "
        f"{labelmap}: {shown}",
    )
    return None


def _mask_ids(png: Path, entries: list, ids: dict, labelmap: Path, problems):
    """A mask's class ids: a colour PNG, or a one-channel one holding labelmap line
    numbers (datumaro reads both)."""
    with Image.open(png) as img:
        if img.mode not in ("L", "I", "I;16"):
            return _color_ids(png, np.array(img.convert("RGB")), ids, labelmap, problems)
        idx = np.array(img).astype(np.int64)
    table = np.array([ids.get(c, -1) for _, c in entries] + [-1])  # past the end: unknown
    out = table[np.minimum(idx, len(entries))]
    if (out < 0).any():
        bad = ", ".join(str(v) for v in np.unique(idx[out < 0])[:3])
        problems.add(
            str(png),
            f"a one-channel mask whose values {bad} are not classes of {labelmap} (line "
            f"numbers 0..{len(entries) - 1})",
        )
        return None
    return out.astype(np.uint8)


@dataclass
class _MaskRun:
    """What every mask of one Segmentation mask import needs."""

    opts: ImportOptions
    img_dir: Path
    labelmap: Path
    entries: list
    ids: dict  # colour -> class id
    splits: dict[str, str]  # item -> split


def _import_mask(item: str, png: Path, run: _MaskRun, writer, problems, counts) -> None:
    src = _find_image(run.img_dir, item)
    if src is None:
        problems.add(str(png), f"its image {run.img_dir / item}.jpg (or .png) is missing")
        return
    ids = _mask_ids(png, run.entries, run.ids, run.labelmap, problems)
    if ids is None or not check_size(problems, f"{png} (image {src})", image_size(src), ids.shape):
        return
    if not ids.any() and run.opts.empty == "skip":
        counts["skipped_empty"] += 1
        return
    if problems.items:
        return  # keep collecting problems, write nothing more
    stem = stem_of(f"{item}.png")
    writer.claim(stem, str(png))
    writer.add_image_file(stem, src, run.splits.get(item))
    writer.add_mask(stem, ids)
    counts["images"] += 1


def import_cvat_masks(sources: list[Path], output: Path, opts: ImportOptions):
    """Import a 'Segmentation mask 1.1' export folder into a new dataset at `output`;
    see the module docstring. Returns (DatasetSpec, counts)."""
    root = _mask_root(one_source(sources, "cvat-mask"))
    labelmap = root / "labelmap.txt"
    entries = _read_labelmap(labelmap)
    classes, ids = _mask_classes(entries, opts.labels)
    img_dir = opts.images or root / "JPEGImages"
    if not img_dir.is_dir():
        raise DatasetError(
            f"{img_dir} does not exist (the export was made without images); give the "
            "image folder with --images DIR"
        )
    seg = root / "SegmentationClass"
    pngs = {p.relative_to(seg).with_suffix("").as_posix(): p for p in sorted(seg.rglob("*.png"))}
    problems = ImportProblems(root)
    run = _MaskRun(opts, img_dir, labelmap, entries, ids, _mask_splits(root, list(pngs), problems))
    counts = {"images": 0, "skipped_empty": 0}
    with DatasetWriter(output, classes, copy=opts.copy) as writer:
        for item, png in tqdm(pngs.items(), desc=f"import {seg}", disable=not opts.progress):
            _import_mask(item, png, run, writer, problems, counts)
        problems.raise_if_any()
        source = {
            "format": "cvat-mask",
            "files": [str(labelmap)],
            "label_colors": {n: hex_color(c) for n, c in entries},
        }
        spec = writer.finish(opts.command, source)
    counts["splits"] = {k: len(v) for k, v in writer.splits.items()}
    return spec, counts
