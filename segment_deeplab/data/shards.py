"""Sharded datasets: the manifest that describes them, and where their files live.

`deeplab prepare DATASET --shards N` writes each split as tar shards in WebDataset's
layout (`train-000000.tar`, ...: per sample `KEY.jpg` or `KEY.png`, the original image
bytes, and `KEY.mask.png`, the index mask) or as TF DeepLab TFRecords, and beside them
`manifest.json`:

    {"format": "webdataset" | "tfrecord", "version": 1,
     "ignore_index": 255, "classes": [{"id", "name", "color"}, ...],
     "splits": {"train": {"samples": 367, "shards": [
         {"url": "train-000000.tar", "samples": 92, "bytes": 10485760,
          "sha256": "...", "keys": ["0001TP_006690", ...]}, ...]}, "val": {...}},
     "stats": {... as in dataset.yaml}, "hash": "sha256:...", "created_by": "..."}

Shard URLs are relative to the manifest (or absolute URLs), so a shard folder copied to
a web server or an object store (`https://`, `s3://`, `gs://`: anything fsspec opens) is
used as it is: `--data s3://bucket/camvid/manifest.json`.

A WebDataset key is the part of a member's name before its first dot, so a stem's dots
(and '%') are written percent-encoded (`KEY_ENCODE`) and decoded on reading.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from segment_deeplab.classes import ClassInfo, from_dicts, to_dicts
from segment_deeplab.data.spec import DatasetError

MANIFEST = "manifest.json"
FORMATS = ("webdataset", "tfrecord")
MASK_EXT = "mask.png"


def encode_key(stem: str) -> str:
    """A stem as a WebDataset key: '%' and '.' percent-encoded."""
    return stem.replace("%", "%25").replace(".", "%2E")


def decode_key(key: str) -> str:
    return key.replace("%2E", ".").replace("%25", "%")


@dataclass
class Shard:
    url: str  # relative to the manifest, or absolute
    samples: int
    bytes: int = 0
    sha256: str = ""
    keys: list[str] = field(default_factory=list)  # stems, in the shard's order


@dataclass
class Manifest:
    format: str
    classes: list[ClassInfo]
    splits: dict[str, list[Shard]]
    ignore_index: int = 255
    stats: dict[str, Any] = field(default_factory=dict)
    hash: str | None = None
    created_by: str = ""
    # where the manifest was read from (a path or URL); shard URLs are relative to it
    location: str = ""

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise DatasetError(f"{self.location}: no split {split!r} in its shards ({have})")
        return self.splits[split]

    def url(self, shard: Shard) -> str:
        """The shard's full URL or path."""
        if "://" in shard.url or shard.url.startswith("/"):
            return shard.url
        base = self.location.rsplit("/", 1)[0] if "/" in self.location else "."
        return posixpath.join(base, shard.url) if "://" in base else f"{base}/{shard.url}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": 1,
            "ignore_index": self.ignore_index,
            "classes": to_dicts(self.classes),
            "splits": {
                name: {
                    "samples": sum(s.samples for s in shards),
                    "shards": [vars(s) for s in shards],
                }
                for name, shards in self.splits.items()
            },
            "stats": self.stats,
            "hash": self.hash,
            "created_by": self.created_by,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def parse_manifest(text: str, location: str) -> Manifest:
    """A manifest from its JSON text; errors name `location`."""
    try:
        d = json.loads(text)
        if d.get("format") not in FORMATS:
            raise ValueError(f"format {d.get('format')!r} is not one of {', '.join(FORMATS)}")
        splits = {name: [Shard(**s) for s in body["shards"]] for name, body in d["splits"].items()}
        return Manifest(
            format=d["format"],
            classes=from_dicts(d["classes"]),
            splits=splits,
            ignore_index=int(d.get("ignore_index", 255)),
            stats=d.get("stats") or {},
            hash=d.get("hash"),
            created_by=d.get("created_by", ""),
            location=location,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(
            f"{location} is not a shard manifest written by `deeplab prepare --shards` ({e})"
        ) from None
