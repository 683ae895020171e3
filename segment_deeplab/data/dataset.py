"""A torch Dataset over `images/` + `masks/` paired by file stem, and its DataLoader.

Files are paired by `pairs.index_stems` and decoded by `decode`, as `deeplab validate`
pairs and decodes them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors

from segment_deeplab.config import DataConfig
from segment_deeplab.data.decode import MaskOptions, check_ids, read_image, read_mask
from segment_deeplab.data.pairs import Problem, index_stems
from segment_deeplab.data.spec import DatasetError, DatasetSpec
from segment_deeplab.data.transforms import build_transforms
from segment_deeplab.models.inputs import MEAN_RGB

FIX_HINT = "run `deeplab validate` on the dataset to list every problem"


class SegmentationFolder(Dataset):
    """Image/mask pairs of a described dataset, as (uint8 (3, H, W), int64 (H, W)) tensors.

    Args:
        spec: the dataset description.
        split: a split name from `spec.splits`; None with no `stems` means every pair.
        stems: an explicit list of stems (overrides `split`).
        transform: joint transform called as `transform(Image, Mask)`; None keeps the
            pair as decoded.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        split: str | None = None,
        stems: Sequence[str] | None = None,
        transform: Callable | None = None,
    ) -> None:
        self.spec = spec
        self.transform = transform
        self.mask_options = MaskOptions.build(spec)
        problems: list[Problem] = []
        images = index_stems(spec.image_dir, "images", problems)
        masks = index_stems(spec.mask_dir, "masks", problems)
        if stems is None:
            stems = spec.read_split(split) if split is not None else sorted(images.keys() & masks)
        self.stems = list(stems)
        missing = [s for s in self.stems if s not in images or s not in masks]
        if missing:
            s = missing[0]
            for p in problems:  # a stem left out of the index because two files share it
                if p.code == "duplicate_stem" and Path(p.file).stem == s:
                    raise DatasetError(f"{p.message} ({Path(p.file).parent}); {FIX_HINT}")
            what = (
                f"image {spec.image_dir / s}.{{jpg,jpeg,png}}"
                if s not in images
                else f"mask {spec.mask_dir / s}.png"
            )
            raise DatasetError(
                f"{what} not found ({len(missing)} of {len(self.stems)} stems"
                f"{f' of split {split!r}' if split else ''} lack a file); {FIX_HINT}, "
                "or `deeplab prepare` to rewrite the splits"
            )
        self._images = [images[s] for s in self.stems]
        self._masks = [masks[s] for s in self.stems]

    def __len__(self) -> int:
        return len(self.stems)

    def paths(self, i: int) -> tuple[Path, Path]:
        """(image file, mask file) of pair `i`, for overlays and reports."""
        return self._images[i], self._masks[i]

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair `i` as decoded and checked, before any transform: uint8 (3, H, W), (H, W)."""
        image_path, mask_path = self.paths(i)
        if not image_path.is_file():
            raise DatasetError(f"image {image_path} is missing; {FIX_HINT}")
        if not mask_path.is_file():
            raise DatasetError(f"mask {mask_path} is missing; {FIX_HINT}")
        image = read_image(image_path, FIX_HINT)
        ids = read_mask(mask_path, self.mask_options, FIX_HINT)
        check_ids(ids, mask_path, self.spec.num_classes, self.spec.ignore_index)
        mask = torch.from_numpy(ids)
        if image.shape[-2:] != mask.shape:
            raise DatasetError(
                f"image {image_path} is {tuple(image.shape[-2:])} (H, W) but mask {mask_path} "
                f"is {tuple(mask.shape)}; masks must match their upright image (EXIF "
                f"orientation applied); {FIX_HINT}"
            )
        return image, mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(i)
        if self.transform is not None:
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        # Plain tensors out: collate and the model need no torchvision types.
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def pad_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ignore_index: int = 255,
    fill: Sequence[int] = MEAN_RGB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack pairs, padding differently sized ones bottom/right to the largest: images
    with `fill`, masks with `ignore_index` so padding never counts in loss or metrics."""
    images, masks = zip(*batch, strict=True)
    h = max(m.shape[-2] for m in masks)
    w = max(m.shape[-1] for m in masks)
    if all(m.shape[-2:] == (h, w) for m in masks):
        return torch.stack(images), torch.stack(masks)
    out_img = torch.tensor(fill, dtype=images[0].dtype).view(1, -1, 1, 1)
    out_img = out_img.expand(len(images), images[0].shape[0], h, w).clone()
    out_mask = masks[0].new_full((len(masks), h, w), ignore_index)
    for k, (img, m) in enumerate(zip(images, masks, strict=True)):
        out_img[k, :, : img.shape[-2], : img.shape[-1]] = img
        out_mask[k, : m.shape[-2], : m.shape[-1]] = m
    return out_img, out_mask


class SeededSamples(Dataset):
    """Runs the wrapped dataset's random transforms under a per-sample seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        # fork_rng keeps the caller's RNG (dropout, ...) untouched when workers=0.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def resolve_workers(workers: int | None, device: str | torch.device | None = None) -> int:
    """DataConfig.workers; None means min(4, cores) when training on a GPU and 0 on CPU.

    On CPU the model is the cost: loading and augmenting a CamVid batch of 8 takes
    ~25 ms against seconds for the step, so worker processes only take cores from it.
    """
    if workers is not None:
        return max(0, int(workers))
    return min(4, os.cpu_count() or 1) if _device(device).type == "cuda" else 0


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Long for its docstring and the DataLoader's many settings, not for its logic.
def build_loader(
    spec: DatasetSpec,
    split: str | None,
    cfg: DataConfig,
    train: bool,
    *,
    stems: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    sampler: Sampler | None = None,
    batch_size: int | None = None,
    batch_sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader over one split with the train or eval preset.

    Train: shuffled by a generator seeded with `seed` (or by `sampler`, e.g. a
    DistributedSampler), incomplete last batch dropped, fixed-size crops. Eval: full
    images in order; differently sized ones are padded by `pad_collate`.

    Args:
        batch_sampler: yields batches of (index, augmentation seed) pairs (the
            training loop's resumable `EpochBatchSampler`); replaces shuffling,
            `sampler` and `batch_size`, and makes the random transforms of each
            sample depend on its seed alone.
        batch_size: overrides `cfg.batch_size` (e.g. 1 for evaluation at native size).
        device: where batches go (None: CUDA when available); it picks the default
            worker count and pins memory only for CUDA.
    """
    ds = SegmentationFolder(
        spec, split, stems=stems, transform=build_transforms(cfg, train, spec.ignore_index)
    )
    bs = int(batch_size or cfg.batch_size)
    if train and len(ds) < bs:
        raise DatasetError(
            f"split {split!r} has {len(ds)} pairs, fewer than one batch of {bs}; "
            "lower data.batch_size or add images"
        )
    workers = resolve_workers(cfg.workers, device)
    pin = _device(device).type == "cuda"
    collate = functools.partial(pad_collate, ignore_index=spec.ignore_index)
    if batch_sampler is not None:
        return DataLoader(
            SeededSamples(ds),
            batch_sampler=batch_sampler,
            # Its own generator: a new iterator draws its worker seed from it, not from
            # the global RNG, which a resumed run has just restored (dropout draws there).
            generator=torch.Generator().manual_seed(seed),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin,
            collate_fn=collate,
        )
    generator = None
    if train and sampler is None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=bs,
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=train,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
        collate_fn=collate,
    )


def open_split(spec: DatasetSpec, split: str, transform: Callable | None = None) -> Dataset:
    """A split as a map-style dataset (validation, eval): from the folders, or read in
    order from the shards of a sharded dataset."""
    if spec.manifest is not None:
        from segment_deeplab.data.stream import ShardSplit

        return ShardSplit(spec.manifest, split, transform)
    return SegmentationFolder(spec, split, transform=transform)


def build_stream_loader(
    spec: DatasetSpec, cfg: DataConfig, *, seed: int, rank: int, world: int, device
):
    """The training loader of a sharded dataset: a `stream.ShardStream` (which is also
    the loop's epoch schedule: `set_epoch`, `batches_per_epoch`) and its loader, cut to
    the epoch's length. Returns (stream, loader)."""
    from segment_deeplab.data.stream import ShardStream, StreamLoader

    workers = resolve_workers(cfg.workers, device)
    stream = ShardStream(
        spec.manifest,
        "train",
        build_transforms(cfg, True, spec.ignore_index),
        batch_size=cfg.batch_size,
        seed=seed,
        rank=rank,
        world=world,
        workers=workers,
        buffer=cfg.shard_buffer,
    )
    loader = DataLoader(
        stream,
        batch_size=cfg.batch_size,
        drop_last=True,
        num_workers=workers,
        # New workers each epoch: they take the epoch and the batches to skip with them.
        persistent_workers=False,
        pin_memory=_device(device).type == "cuda",
        collate_fn=functools.partial(pad_collate, ignore_index=spec.ignore_index),
    )
    return stream, StreamLoader(stream, loader)
