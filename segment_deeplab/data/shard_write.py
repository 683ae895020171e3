"""Write a prepared dataset's splits as shards plus `manifest.json` (`deeplab prepare
--shards N` or `--shard-size SIZE`); the manifest's schema is in `shards.py`.

WebDataset tars (`train-000000.tar`) hold per sample `KEY.jpg` or `KEY.png`, the image
file's bytes as they are on disk, and `KEY.mask.png`, the index mask; TFRecords
(`train-00000-of-00004.tfrecord`) hold TF DeepLab build_data.py's Examples. Nothing is
re-encoded but masks a reader could not take as they are: one that is no mode-L or
mode-P PNG becomes a mode-L PNG of its ids, and TFRecords get mode L always (TF decodes
a palette PNG to its colours, not its indices).

Train samples are put in a seeded order (the prepare seed) before the split is cut into
shards, so each shard is a random mix and a machine that reads a few shards sees the
whole variety; the other splits keep their sorted order.

Everything is written into `OUTPUT/.shards.writing`, renamed to `OUTPUT/shards` only
when complete; an existing `shards/` is refused before any work, never written over.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from segment_deeplab.atomic import OutputError, check_writable_dir, write_text
from segment_deeplab.data.decode import MaskOptions, read_mask
from segment_deeplab.data.import_common import image_size_of_bytes
from segment_deeplab.data.prepare import PrepareResult, output_dir
from segment_deeplab.data.shards import FORMATS, MANIFEST, MASK_EXT, Manifest, Shard, encode_key
from segment_deeplab.data.spec import DatasetError, resolve_dataset
from segment_deeplab.data.tfrecord import encode_example, write_records

SHARDS_DIR = "shards"
STAGING = ".shards.writing"
_TAR_END, _TAR_RECORD = 2 * 512, 20 * 512  # tarfile's end-of-archive blocks and record size
_TFRECORD_FRAME = 16  # a record's length, its checksum and the data's checksum
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str, flag: str = "--shard-size") -> int:
    """'1GB' -> 1_000_000_000: KB, MB, GB, TB are powers of 1000, KiB, MiB, GiB, TiB of
    1024, a plain number is bytes.

    Raises:
        DatasetError: text that is no size, or under one byte; the message names `flag`.
    """
    m = _SIZE_RE.fullmatch(str(text))
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if unit is None:
        raise DatasetError(
            f"{flag} {text!r} is no size; give e.g. 500MB, 1GB or 1GiB (KB, MB, GB, TB are "
            "powers of 1000, KiB, MiB, GiB, TiB of 1024, a plain number is bytes)"
        )
    size = int(Decimal(m.group(1)) * unit)
    if size < 1:
        raise DatasetError(f"{flag} {text!r}: a shard needs at least one byte, e.g. 1GB")
    return size


def format_size(n: int) -> str:
    """Bytes in words, powers of 1000: 41_200_000 -> '41.2 MB'."""
    if n < 1000:
        return f"{n} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def prepare_output_dir(dataset, images=None, masks=None, spec=None, output=None) -> Path:
    """The folder `prepare_dataset` writes into for these arguments (and shards/ in it),
    known before its long pass."""
    ds, image_dir, _, _ = resolve_dataset(dataset, images, masks, spec)
    return output_dir(dataset, output, ds, image_dir)


def check_shards_output(out_dir: str | Path) -> Path:
    """`out_dir`/shards, refused when it exists: shards are never written over."""
    check_writable_dir(out_dir)
    final = Path(out_dir) / SHARDS_DIR
    if final.exists() or final.is_symlink():
        raise OutputError(
            f"{final} already exists and shards are never written over; remove it or give "
            "--output DIR"
        )
    return final


def check_shard_args(shards: int | None, shard_size: int | None, fmt: str) -> None:
    """Exactly one of a shard count (at least 1) and a shard size, and a known format."""
    if (shards is None) == (shard_size is None):
        raise DatasetError("give one of --shards N and --shard-size SIZE")
    if shards is not None and shards < 1:
        raise DatasetError(f"--shards {shards}: give at least 1 shard")
    if shard_size is not None and shard_size < 1:
        raise DatasetError(f"--shard-size {shard_size}: a shard needs at least one byte")
    if fmt not in FORMATS:
        raise DatasetError(f"--shard-format {fmt!r}: one of {', '.join(FORMATS)}")


def shard_counts(n: int, shards: int) -> list[int]:
    """`n` samples as `shards` near-equal counts (at most one apart, the larger first);
    fewer shards when there are fewer samples, none for none."""
    k = min(shards, n)
    return [n // k + (i < n % k) for i in range(k)] if k else []


def _mixed(stems: list[str], seed: int) -> list[str]:
    """Stems in a seeded order: by a hash, as the train/val split is (but salted apart
    from it), so the order does not depend on Python's RNG."""
    return sorted(stems, key=lambda s: hashlib.sha256(f"shards:{seed}:{s}".encode()).hexdigest())


def split_stems(result: PrepareResult) -> dict[str, list[str]]:
    """Each split's stems in shard order: train mixed by the prepare seed, others sorted."""
    seed = (result.spec.stats.get("split") or {}).get("seed", 0)
    out = {"train": _mixed(result.train, seed), "val": list(result.val)}
    for name in result.spec.splits:
        if name not in out:
            out[name] = result.spec.read_split(name)
    return out


def _mask_png(path: Path, modes: tuple[str, ...], ignore: int) -> bytes:
    """The mask file's bytes when it is a PNG of one of `modes`, else its ids re-encoded
    as a mode-L PNG."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "PNG" and img.mode in modes:
            return data
    buf = io.BytesIO()
    Image.fromarray(read_mask(path, MaskOptions(ignore_index=ignore))).save(buf, format="PNG")
    return buf.getvalue()


def _is_jpeg(image: Path) -> bool:
    return image.suffix.lower() in (".jpg", ".jpeg")


@dataclass
class _Item:
    stem: str
    payload: Any  # a WebDataset sample dict, or a serialized tf.train.Example


class _Discard:
    """A file that forgets what is written to it."""

    def write(self, data) -> int:
        return len(data)


class _WebDataset:
    """Tar shards written with webdataset's TarWriter."""

    def __init__(self) -> None:
        # Samples are sized by writing them here: long or non-ASCII names add headers.
        self._probe = self._writer(_Discard())

    @staticmethod
    def _writer(f):
        from webdataset import TarWriter  # imports torch; only when tars are written

        return TarWriter(f, encoder=False, mtime=0)  # fixed mtime: same files, same sha256

    @staticmethod
    def encode(stem: str, image: Path, mask: Path, ignore: int) -> dict[str, Any]:
        return {
            "__key__": encode_key(stem),
            "jpg" if _is_jpeg(image) else "png": image.read_bytes(),
            MASK_EXT: _mask_png(mask, ("L", "P"), ignore),
        }

    def size(self, sample: dict[str, Any]) -> int:
        before = self._probe.tarstream.offset
        self._probe.write(sample)
        return self._probe.tarstream.offset - before

    @staticmethod
    def file_size(members: int) -> int:
        """A tar's bytes, from its members': tarfile ends it with two zero blocks and
        pads it to whole records."""
        return -(-(members + _TAR_END) // _TAR_RECORD) * _TAR_RECORD

    def write(self, path: Path, items: Iterable[_Item]) -> list[str]:
        stems = []
        with open(path, "wb") as f, self._writer(f) as w:
            for item in items:
                w.write(item.payload)
                stems.append(item.stem)
        return stems

    @staticmethod
    def names(split: str, n: int) -> list[str]:
        return [f"{split}-{i:06d}.tar" for i in range(n)]


class _TFRecord:
    """TF DeepLab shards: build_data.py's `image_seg_to_tfexample` records."""

    @staticmethod
    def encode(stem: str, image: Path, mask: Path, ignore: int) -> bytes:
        data = image.read_bytes()
        h, w = image_size_of_bytes(data)
        return encode_example(
            {
                "image/encoded": data,
                "image/filename": stem,
                "image/format": "jpeg" if _is_jpeg(image) else "png",
                "image/height": h,
                "image/width": w,
                "image/channels": 3,
                "image/segmentation/class/encoded": _mask_png(mask, ("L",), ignore),
                "image/segmentation/class/format": "png",
            }
        )

    @staticmethod
    def size(record: bytes) -> int:
        return len(record) + _TFRECORD_FRAME

    @staticmethod
    def file_size(members: int) -> int:
        return members

    @staticmethod
    def write(path: Path, items: Iterable[_Item]) -> list[str]:
        stems: list[str] = []

        def records() -> Iterator[bytes]:
            for item in items:
                stems.append(item.stem)
                yield item.payload

        write_records(path, records())
        return stems

    @staticmethod
    def names(split: str, n: int) -> list[str]:
        return [f"{split}-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]


class _BySize:
    """The shard of each sample in turn: the next one when a sample would take the
    current shard past `limit` bytes (a shard holds at least one sample)."""

    def __init__(self, limit: int, fmt) -> None:
        self.limit, self.fmt = limit, fmt
        self.index = self.bytes = self.count = 0

    def __call__(self, item: _Item) -> int:
        size = self.fmt.size(item.payload)
        if self.count and self.fmt.file_size(self.bytes + size) > self.limit:
            self.index, self.bytes, self.count = self.index + 1, 0, 0
        self.bytes += size
        self.count += 1
        return self.index


def _by_count(counts: list[int]) -> Callable[[_Item], int]:
    order = iter([i for i, c in enumerate(counts) for _ in range(c)])
    return lambda _item: next(order)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_split(fmt, split: str, items: Iterator[_Item], shard_of, staging: Path) -> list[Shard]:
    """One split's shards, streamed: a shard is written while its samples are read."""
    parts = []
    for i, group in itertools.groupby(items, key=shard_of):
        part = staging / f".{split}-{i:06d}.part"
        parts.append((part, fmt.write(part, group)))
    shards = []
    for (part, stems), name in zip(parts, fmt.names(split, len(parts)), strict=True):
        path = part.rename(staging / name)  # TFRecord names hold the count, known now
        shards.append(Shard(name, len(stems), path.stat().st_size, _sha256(path), stems))
    return shards


def write_shards(
    result: PrepareResult,
    out_dir: Path,
    shards: int | None,
    shard_size: int | None,
    fmt: str = "webdataset",
    progress: bool = False,
    command: str = "",
) -> Manifest:
    """Write every split of a prepared dataset as shards into `out_dir`/shards.

    Args:
        result: what `prepare_dataset` returned.
        out_dir: the folder it wrote into.
        shards: train's shard count (near-equal counts); other splits get as many in
            proportion to their size (at least one, at most one per sample).
        shard_size: instead, the most bytes a shard holds (at least one sample each).
        fmt: 'webdataset' or 'tfrecord'.
        progress: a progress bar in samples on stderr.
        command: the command line, kept in the manifest's `created_by`.

    Returns:
        The manifest, also written as `out_dir`/shards/manifest.json.

    Raises:
        OutputError: `out_dir`/shards exists (nothing is written).
        DatasetError: arguments that do not describe shards.
    """
    check_shard_args(shards, shard_size, fmt)
    final = check_shards_output(out_dir)
    splits = split_stems(result)
    spec = result.spec
    mask_dir = spec.mask_dir  # the converted masks when prepare wrote them
    files = {
        p.stem: (p.image, mask_dir / (f"{p.stem}.png" if result.converted_masks else p.mask.name))
        for p in result.report.pairs
    }
    writer = _WebDataset() if fmt == "webdataset" else _TFRecord()
    staging = Path(out_dir) / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted run left
    staging.mkdir(parents=True)
    total = sum(len(s) for s in splits.values())
    bar = tqdm(total=total, desc="write shards", unit="sample", file=sys.stderr,
               disable=not progress)  # fmt: skip

    def items(stems: list[str]) -> Iterator[_Item]:
        for stem in stems:
            yield _Item(stem, writer.encode(stem, *files[stem], spec.ignore_index))
            bar.update()

    try:
        with bar:
            written = {}
            for split, stems in splits.items():
                if shards is not None:
                    n = shards if split == "train" else _proportional(shards, splits, split)
                    shard_of = _by_count(shard_counts(len(stems), n))
                else:
                    shard_of = _BySize(shard_size, writer)
                written[split] = _write_split(writer, split, items(stems), shard_of, staging)
        manifest = Manifest(
            format=fmt,
            classes=spec.classes,
            splits=written,
            ignore_index=spec.ignore_index,
            stats=spec.stats,
            hash=spec.hash,
            created_by=command,
        )
        write_text(staging / MANIFEST, manifest.dumps())
        check_shards_output(out_dir)  # none appeared meanwhile: a rename would replace it
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest.location = str(final / MANIFEST)
    return manifest


def _proportional(shards: int, splits: dict[str, list[str]], split: str) -> int:
    """A split's shard count in proportion to train's `shards`, at least one."""
    return max(1, round(shards * len(splits[split]) / max(len(splits["train"]), 1)))


def summary(manifest: Manifest) -> dict[str, dict[str, int]]:
    """{split: {"shards", "samples", "bytes"}}."""
    return {
        name: {
            "shards": len(shards),
            "samples": sum(s.samples for s in shards),
            "bytes": sum(s.bytes for s in shards),
        }
        for name, shards in manifest.splits.items()
    }
