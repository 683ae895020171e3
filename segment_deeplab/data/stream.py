"""Sharded datasets as torch datasets: read from a folder, `https://` or an object store.

Files are opened with fsspec (`s3://`, `gs://`, `https://`, local paths: whatever
fsspec has a file system for) and read as a stream, never seeked, so a shard on a web
server or in a bucket is read once, front to back. The tar members are turned into
samples by webdataset's own `tar_file_expander` and `group_by_keys`.

Training (`ShardStream`): every epoch, each process (rank) takes its shards
(`shards[rank::world]`, fixed for the run), in an order shuffled per epoch; each loader
worker takes every W-th of those; samples pass a shuffle buffer seeded by (seed, epoch,
rank, worker), and each sample's crops and flips are seeded by (seed, epoch, stem). The
DataLoader takes the workers' batches in turn, so the batches of an epoch are a
function of the seed, the epoch and the worker count alone: a run resumed at batch k of
an epoch skips exactly the samples of the first k batches (read, not decoded) and goes
on with the same batches as an uninterrupted run. Every rank yields the same number of
batches per epoch (`batches_per_epoch`), so no process waits for another at the end.

Validation and `eval` (`ShardSplit`): a map-style dataset over a split whose items are
read in order as one stream (memory stays flat however large the split is).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchvision import tv_tensors

from segment_deeplab.data.decode import MaskOptions, check_ids, decode_rgb, mask_ids, open_mask
from segment_deeplab.data.shards import MANIFEST, MASK_EXT, Manifest, Shard, decode_key
from segment_deeplab.data.shards import parse_manifest as _parse
from segment_deeplab.data.spec import DatasetError

IMAGE_KEYS = ("jpg", "jpeg", "png")


def is_url(data: str | Path) -> bool:
    return "://" in str(data)


def manifest_location(data: str | Path) -> str | None:
    """The manifest a `--data` value names: a URL (to manifest.json or to the folder
    holding it), a manifest.json file, or a folder holding one but no images/ (a
    dataset folder's own shards are `DATASET/shards`). None: not a sharded dataset."""
    text = str(data)
    if is_url(text):
        return text if text.endswith(".json") else text.rstrip("/") + "/" + MANIFEST
    p = Path(text)
    if p.is_file() and p.name == MANIFEST:
        return str(p)
    if p.is_dir() and (p / MANIFEST).is_file() and not (p / "images").is_dir():
        return str(p / MANIFEST)
    return None


def open_url(url: str, what: str = "shard"):
    """A readable binary stream of `url` (fsspec); a DatasetError naming it when it
    cannot be opened."""
    import fsspec

    try:
        # block_size=0: HTTP(S) is streamed, not fetched in range requests (servers
        # need not support them); other file systems ignore it or read ahead.
        kw = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
        return fsspec.open(url, "rb", **kw).open()
    except ImportError as e:  # e.g. s3fs or gcsfs not installed
        raise DatasetError(
            f"cannot open {what} {url}: {e}; install the file system's package (s3fs for "
            "s3://, gcsfs for gs://)"
        ) from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot open {what} {url}: {e}") from None
    except Exception as e:  # aiohttp/botocore errors are no OSErrors
        raise DatasetError(f"cannot open {what} {url}: {type(e).__name__}: {e}") from None


def load_manifest(location: str) -> Manifest:
    """The manifest at a path or URL."""
    with open_url(location, "manifest") as f:
        text = f.read().decode("utf-8")
    m = _parse(text, location)
    if m.format != "webdataset":
        raise DatasetError(
            f"{location} describes {m.format} shards, which are written for TF pipelines; "
            "train, eval and predict read WebDataset shards (`deeplab prepare --shards N`), "
            "or import the records with `deeplab import tfrecord`"
        )
    return m


def shard_samples(manifest: Manifest, shard: Shard) -> Iterator[tuple[str, str, bytes, bytes]]:
    """(stem, where, image bytes, mask bytes) of every sample of a shard, in order."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    url = manifest.url(shard)
    with open_url(url) as stream:
        files = tar_file_expander([{"url": url, "stream": stream}])
        for s in group_by_keys(files):
            stem = decode_key(s["__key__"])
            where = f"{url} sample {stem}"
            image = next((s[k] for k in IMAGE_KEYS if k in s), None)
            if image is None or MASK_EXT not in s:
                raise DatasetError(
                    f"{where} lacks its {'image' if image is None else MASK_EXT}; write the "
                    "shards again with `deeplab prepare --shards`"
                )
            yield stem, where, image, s[MASK_EXT]


def decode_sample(
    where: str, image: bytes, mask: bytes, opts: MaskOptions, num_classes: int, ignore: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample's bytes as (uint8 (3, H, W), uint8 (H, W)), checked as folders are (the
    mask stays 8-bit through the transforms, which are several times faster on it)."""
    img = decode_rgb(image, where)
    ids, issues = mask_ids(open_mask(mask, Path(where)), Path(where), opts)
    if ids is None:
        raise DatasetError(f"{issues[0].message} ({where})")
    check_ids(ids, Path(where), num_classes, ignore)
    if img.shape[-2:] != ids.shape:
        raise DatasetError(f"{where}: image {tuple(img.shape[-2:])} and mask {ids.shape} differ")
    return img, torch.from_numpy(ids.copy() if not ids.flags.writeable else ids)


def _apply(transform, image, mask):
    if transform is None:
        return image, mask.long()
    image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def _seed(*parts) -> int:
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


class ShardStream(IterableDataset):
    """Training samples from a split's shards; see the module docstring.

    Set `set_epoch(epoch, start_batch)` before each pass; the DataLoader must batch
    with `batch_size`, drop_last=True and `workers` workers (`build_stream_loader`).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        transform: Callable | None,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        buffer: int = 256,
    ) -> None:
        shards = manifest.shards(split)
        if len(shards) < world:
            raise DatasetError(
                f"{manifest.location}: split {split!r} has {len(shards)} shards for {world} "
                f"processes; write at least {world} (`deeplab prepare --shards {world * 4}`)"
            )
        self.manifest, self.split, self.transform = manifest, split, transform
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.workers, self.buffer = max(0, workers), buffer
        self.mine = shards[rank::world]
        self.opts = MaskOptions.build(None, manifest.ignore_index)
        self.num_classes = len(manifest.classes)
        self.epoch, self.start = 0, 0
        per_rank = [sum(s.samples for s in shards[r::world]) for r in range(world)]
        # Each worker drops its last incomplete batch: at most W - 1 fewer than n // B.
        self._batches = min(n // batch_size for n in per_rank) - max(self.workers - 1, 0)
        if self._batches < 1:
            raise DatasetError(
                f"split {split!r} of {manifest.location} holds {min(per_rank)} samples for "
                f"one of {world} processes, fewer than a batch of {batch_size} per loader "
                "worker; lower data.batch_size or data.workers, or add images"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def _order(self) -> list[Shard]:
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank, "shards"))
        return [self.mine[int(i)] for i in torch.randperm(len(self.mine), generator=g)]

    def worker_batches(self) -> list[int]:
        """Full batches each loader worker makes this epoch."""
        order, w = self._order(), max(self.workers, 1)
        return [sum(s.samples for s in order[k::w]) // self.batch_size for k in range(w)]

    def resume_point(self) -> tuple[list[int], int]:
        """(batches of each worker's part already taken, the part whose turn is next)
        after the first `start` batches of the epoch. The DataLoader takes batches from
        its workers in turn, skipping those run dry, and always starts at worker 0: so
        worker i of a resumed pass reads part (i + next) % W, which keeps the turns."""
        counts = self.worker_batches()
        taken, left, nxt = [0] * len(counts), self.start, 0
        for r in itertools.count():
            active = [w for w, c in enumerate(counts) if r < c]
            if not active or left <= 0:
                break
            for w in active[:left]:
                taken[w] += 1
            if left < len(active):
                nxt = active[left]
            left -= min(left, len(active))
        return taken, nxt

    def _samples(self, part: int) -> Iterator[tuple[str, str, bytes, bytes]]:
        from webdataset.filters import _shuffle

        shards = self._order()[part :: max(self.workers, 1)]
        raw = itertools.chain.from_iterable(shard_samples(self.manifest, s) for s in shards)
        seed = _seed(self.seed, self.epoch, self.rank, part, "buffer")
        return _shuffle(raw, bufsize=self.buffer, initial=self.buffer, seed=seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        taken, nxt = self.resume_point()
        part = ((info.id if info is not None else 0) + nxt) % len(taken)
        skip = taken[part] * self.batch_size
        for stem, where, image, mask in itertools.islice(self._samples(part), skip, None):
            pair = decode_sample(
                where, image, mask, self.opts, self.num_classes, self.manifest.ignore_index
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(self.seed, self.epoch, stem))
                yield _apply(self.transform, *pair)


class StreamLoader:
    """The DataLoader over a `ShardStream`, cut at the epoch's length: every rank takes
    `batches_per_epoch` batches (less those a resumed run skipped)."""

    def __init__(self, stream: ShardStream, loader) -> None:
        self.stream, self.loader = stream, loader

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))

    def __len__(self) -> int:
        return self.stream.batches_per_epoch - self.stream.start


class ShardSplit(Dataset):
    """A split's samples by index, read as one stream in order (validation, eval).

    Items asked for in increasing order (a loop, a torchrun shard) read each shard once;
    asking for an earlier item starts again at its shard.
    """

    def __init__(self, manifest: Manifest, split: str, transform: Callable | None = None):
        self.manifest, self.split, self.transform = manifest, split, transform
        self.shard_list = manifest.shards(split)
        self.stems = [k for s in self.shard_list for k in s.keys]
        if len(self.stems) != manifest.samples(split):
            raise DatasetError(f"{manifest.location}: the keys of split {split!r} are incomplete")
        self._first = list(itertools.accumulate([0] + [s.samples for s in self.shard_list]))
        self.opts = MaskOptions.build(None, manifest.ignore_index)
        self._pos, self._it = None, None

    def __len__(self) -> int:
        return len(self.stems)

    def __getstate__(self) -> dict:
        # A loader worker gets its own copy: without the open stream, which cannot travel.
        return {**self.__dict__, "_pos": None, "_it": None}

    def _shard_of(self, i: int) -> int:
        return bisect.bisect_right(self._first, i) - 1

    def paths(self, i: int) -> tuple[str, str]:
        shard = self._shard_of(i)
        where = f"{self.manifest.url(self.shard_list[shard])}#{self.stems[i]}"
        return where, where

    def _seek(self, i: int) -> None:
        shard = self._shard_of(i)
        shards = self.shard_list[shard:]
        self._it = itertools.chain.from_iterable(shard_samples(self.manifest, s) for s in shards)
        self._pos = self._first[shard]

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._pos is None or i < self._pos:
            self._seek(i)
        for _ in range(i - self._pos):
            next(self._it)
        stem, where, image, mask = next(self._it)
        self._pos = i + 1
        if stem != self.stems[i]:
            raise DatasetError(f"{where}: expected sample {self.stems[i]}; the shard changed")
        n = len(self.manifest.classes)
        return decode_sample(where, image, mask, self.opts, n, self.manifest.ignore_index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _apply(self.transform, *self.load(i))
