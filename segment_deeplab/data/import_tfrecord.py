"""`deeplab import tfrecord`: TF DeepLab and cvdata TFRecord shards, read without
TensorFlow.

Each record is a tf.train.Example with the keys of TF DeepLab's
research/deeplab/datasets/build_data.py (`image_seg_to_tfexample`): image/encoded,
image/filename, image/format, image/height, image/width, image/channels,
image/segmentation/class/encoded and image/segmentation/class/format. The image bytes are
written as they are; the segmentation PNG's pixel values (a palette PNG's indices) are
the class ids, 255 the ignore label.

A shard's name says its split: train-00000-of-00004.tfrecord is in train (cvdata's
valid-* is val). TF DeepLab's trainval shards repeat train and val, so they are left out
when both are imported with them. The records name no classes: ids 0..the largest seen
become background, class_1, ... (or `--labels`). Reading is two passes, to find the ids
before the first mask is written, so memory stays flat however many records there are.

A damaged record (a checksum that fails, a file cut short) is reported on stderr with
its shard and byte offset and left out; the rest of the shard is read when the record
can be stepped over. Anything else wrong is an error, and nothing is written.
"""

from __future__ import annotations

import io
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from segment_deeplab.data.import_common import (
    IGNORE,
    DatasetWriter,
    ImportOptions,
    ImportProblems,
    classes_from_names,
    image_size_of_bytes,
    stem_of,
)
from segment_deeplab.data.spec import IMAGE_EXTS, DatasetError
from segment_deeplab.data.tfrecord import BAD_LENGTH, compression_of, decode_example, iter_records

IMAGE, FILENAME = "image/encoded", "image/filename"
HEIGHT, WIDTH = "image/height", "image/width"
SEGMENTATION = "image/segmentation/class/encoded"
SHARD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec", ".record", ".records")
_SHARD_RE = re.compile(r"^(?P<split>.+?)-\d+-of-\d+$")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "trainval": "trainval"}  # fmt: skip
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG


@dataclass
class Item:
    """One record's pair, checked and decoded."""

    where: str  # shard, record index and byte offset (and the filename)
    stem: str
    image: bytes
    ids: np.ndarray  # (H, W) uint8


def _base_name(path: Path) -> str:
    """The shard's name without .gz and the TFRecord suffix."""
    name = path.name.removesuffix(".gz")
    for suffix in SHARD_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def split_of(path: Path) -> str | None:
    """The split a shard holds, from its name: the part before -NNNNN-of-NNNNN, or the
    whole name when it is a split's (val.tfrecord); None otherwise."""
    name = _base_name(path)
    m = _SHARD_RE.match(name)
    if m:
        return SPLIT_NAMES.get(m.group("split").lower(), m.group("split"))
    return SPLIT_NAMES.get(name.lower())


def _is_shard(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return path.is_file() and (
        name.endswith(SHARD_SUFFIXES) or bool(_SHARD_RE.match(_base_name(path)))
    )


def find_shards(sources: list[Path]) -> list[Path]:
    """The shard files of SOURCE: files as given, folders' shards (by name) sorted."""
    out: list[Path] = []
    for src in sources:
        if src.is_dir():
            found = sorted(p for p in src.iterdir() if _is_shard(p))
            if not found:
                raise DatasetError(
                    f"{src} holds no TFRecord shards: none is named like "
                    "train-00000-of-00004.tfrecord or *.tfrecord; give the shard files"
                )
            out += found
        else:
            out.append(src)
    return list(dict.fromkeys(out))


def _leave_out_unions(shards: list[Path]) -> list[Path]:
    """Without TF DeepLab's trainval shards when train and val come too: they hold the
    same images again, which would be two images of one name."""
    splits = {split_of(p) for p in shards}
    if not {"train", "val", "trainval"} <= splits:
        return shards
    union = [p for p in shards if split_of(p) == "trainval"]
    print(
        f"note: leaving out the {len(union)} trainval shard(s): trainval repeats the train "
        "and val images (import them alone to get trainval)",
        file=sys.stderr,
    )
    return [p for p in shards if split_of(p) != "trainval"]


def _stem(filename: str, shard: Path, index: int) -> str:
    """The dataset stem of a record: its filename without an image extension (TF
    DeepLab writes names without one, which may hold dots); the shard and record index
    when it has none."""
    if not filename:
        return f"{_base_name(shard)}_{index:05d}"
    if Path(filename).suffix.lower() in IMAGE_EXTS:
        return stem_of(filename)
    return stem_of(filename + ".x")  # keep every dot of the name


def mask_ids(data: bytes) -> tuple[np.ndarray | None, str]:
    """Segmentation PNG bytes as (H, W) uint8 ids, or None and why not."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for broken files
        return None, f"its segmentation cannot be decoded ({e})"
    if img.format != "PNG":
        return None, f"its segmentation is {img.format}, not PNG (lossy masks lose their ids)"
    arr = np.asarray(img)
    if img.mode in ("L", "P", "1"):
        return arr.astype(np.uint8, copy=False), ""
    if img.mode in ("I", "I;16") and arr.min() >= 0 and arr.max() <= 255:
        return arr.astype(np.uint8), ""
    if img.mode in ("LA", "RGB", "RGBA"):
        grey = arr[..., :1] if img.mode == "LA" else arr[..., :3]
        if (grey == grey[..., :1]).all():
            return np.ascontiguousarray(arr[..., 0]), ""
    return None, (
        f"its segmentation is a {img.mode} PNG that holds no class ids (TF DeepLab reads "
        "single-channel ids, like VOC's SegmentationClassRaw)"
    )


def _first(features: dict, key: str, default=None):
    values = features.get(key) or [default]
    return values[0]


def _item(data: bytes, where: str, shard: Path, index: int, problems) -> Item | None:
    """A record's checked pair, or None after recording what is wrong with it."""
    try:
        feats = decode_example(data)
    except ValueError as e:
        problems.add(where, f"{e}; is {shard.name} a TFRecord of tf.train.Example?")
        return None
    missing = [k for k in (IMAGE, SEGMENTATION) if not feats.get(k)]
    if missing:
        problems.add(
            where,
            f"has no {' or '.join(missing)} (its keys: {', '.join(sorted(feats)) or 'none'}); "
            "the importer reads TF DeepLab's build_data.py records of an image and its mask",
        )
        return None
    filename = _first(feats, FILENAME, b"").decode("utf-8", "replace")
    where = f"{where} ({filename})" if filename else where
    image = feats[IMAGE][0]
    if not image.startswith(_IMAGE_MAGIC):
        problems.add(where, "its image is neither JPEG nor PNG; the dataset takes those")
        return None
    ids, why = mask_ids(feats[SEGMENTATION][0])
    if ids is None:
        problems.add(where, why)
        return None
    if not _sizes_agree(problems, where, image, ids, feats):
        return None
    return Item(where, _stem(filename, shard, index), image, ids)


def _sizes_agree(problems, where: str, image: bytes, ids: np.ndarray, feats: dict) -> bool:
    """The image, its mask and the record's height/width describe one size."""
    try:
        hw = image_size_of_bytes(image)
    except Exception as e:  # PIL raises many types for broken files
        problems.add(where, f"its image cannot be read ({e})")
        return False
    declared = (_first(feats, HEIGHT), _first(feats, WIDTH))
    if None not in declared and tuple(declared) != hw:
        problems.add(
            where,
            f"its image is {hw[1]}x{hw[0]} but the record says {declared[1]}x{declared[0]} "
            f"({WIDTH} x {HEIGHT}); the shard was written wrongly, rebuild it",
        )
        return False
    if ids.shape != hw:
        problems.add(
            where,
            f"its segmentation is {ids.shape[1]}x{ids.shape[0]} but its image is {hw[1]}x"
            f"{hw[0]}; a mask must cover its image pixel for pixel",
        )
        return False
    return True


def _items(shards, problems, counts: Counter, warn: bool) -> Iterator[tuple[Item, str | None]]:
    """Every good record's pair and split; damaged records are counted (and, with
    `warn`, reported on stderr) and left out."""
    for shard in shards:
        split = split_of(shard)
        kind = compression_of(shard)
        of = f" of its decompressed {kind} stream" if kind else ""
        for rec in iter_records(shard):
            where = f"{shard} record {rec.index} at byte {rec.offset}{of}"
            if rec.data is None:
                if rec.index == 0 and rec.code == BAD_LENGTH:
                    why = "its first record's length checksum fails"
                    problems.add(str(shard), f"is not a TFRecord file ({why}); give the shards")
                    break
                counts["corrupt_records"] += 1
                if warn:
                    left_out = "" if rec.ends else "; left out"
                    print(f"warning: {where}: {rec.error}{left_out}", file=sys.stderr)
                continue
            counts["records"] += 1
            item = _item(rec.data, where, shard, rec.index, problems)
            if item is not None:
                yield item, split


def _classes(labels: list[str] | None, seen: np.ndarray) -> list:
    """background, then `labels` or class_<id> for every id up to the largest seen."""
    if labels is not None:
        return classes_from_names(labels)
    top = int(np.flatnonzero(seen[:IGNORE]).max(initial=0))
    return classes_from_names([f"class_{i}" for i in range(1, top + 1)])


def _scan(shards, labels, problems, progress: bool) -> tuple[list, Counter]:
    """The first pass: check every record, find the class ids the masks use."""
    n_labelled = None if labels is None else len(classes_from_names(labels))
    seen = np.zeros(256, bool)
    counts: Counter = Counter()
    shards = tqdm(shards, desc="check shards", unit="shard", disable=not progress)
    for item, _ in _items(shards, problems, counts, warn=True):
        present = np.bincount(item.ids.ravel(), minlength=256) > 0
        seen |= present
        top = int(np.flatnonzero(present[:IGNORE]).max(initial=0))
        if n_labelled is not None and top >= n_labelled:
            problems.add(
                item.where,
                f"its mask holds class id {top}, but --labels names {n_labelled} classes "
                f"with background (ids 0..{n_labelled - 1}); add the missing names",
            )
    if counts["corrupt_records"]:
        print(
            f"warning: {counts['corrupt_records']} corrupt record(s) left out (listed above)",
            file=sys.stderr,
        )
    return _classes(labels, seen), counts


def import_tfrecord(sources: list[Path], output: Path, opts: ImportOptions):
    """Import TFRecord shards (files or their folders) into a new dataset at `output`;
    see the module docstring. Returns (DatasetSpec, counts)."""
    shards = _leave_out_unions(find_shards(sources))
    problems = ImportProblems(", ".join(str(p) for p in sources))
    classes, scanned = _scan(shards, opts.labels, problems, opts.progress)
    problems.raise_if_any()
    counts = {"images": 0, "skipped_empty": 0, "splits": {}}
    bar = tqdm(total=scanned["records"], desc="import tfrecord", disable=not opts.progress)
    with DatasetWriter(output, classes, copy=opts.copy) as writer, bar:
        for item, split in _items(shards, problems, Counter(), warn=False):
            bar.update()
            if opts.empty == "skip" and not item.ids.any():
                counts["skipped_empty"] += 1
                continue
            writer.claim(item.stem, item.where)
            writer.add_image_bytes(item.stem, item.image, item.where, split)
            writer.add_mask(item.stem, item.ids)
            counts["images"] += 1
            if split:
                counts["splits"][split] = counts["splits"].get(split, 0) + 1
        problems.raise_if_any()  # only when a shard changed between the passes
        counts["records"] = scanned["records"]
        counts["corrupt_records"] = scanned["corrupt_records"]
        source = {
            "format": "tfrecord",
            "shards": [str(p) for p in shards],
            "corrupt_records": scanned["corrupt_records"],
        }
        return writer.finish(opts.command, source), counts
