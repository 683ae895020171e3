"""A torch Dataset over `images/` + `masks/` paired by file stem, and its DataLoader.

Images decode with torchvision.io (1.5x faster than PIL for JPEG) with EXIF orientation
applied, so a phone photo comes out the way viewers show it and the way it was
annotated; PIL reads what torchvision.io cannot (and everything, once torchvision drops
its deprecated decoders). Masks decode with PIL: torchvision.io returns garbage for
palette PNGs below 8 bits or with transparency, which PIL and annotation tools write for
few-class masks, while PIL gives palette indices for every P-mode PNG at about the same
speed (0.43 vs 0.37 ms for a CamVid mask).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors

try:
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # deprecated in torchvision 0.29, to be removed
    decode_image = None

from segment_deeplab.config import DataConfig
from segment_deeplab.data.spec import IMAGE_EXTS, DatasetError, DatasetSpec
from segment_deeplab.data.transforms import MEAN_RGB, build_transforms

# Every call of torchvision's decoders warns that they are deprecated; they still work.
# One filter for that message (`warnings.catch_warnings` per call is not thread-safe,
# and images are decoded in several threads).
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning
)

FIX_HINT = "run `deeplab validate` on the dataset to list every problem"


def _index_files(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    """stem -> file for the files in `folder` with one of `exts` (any case), first ext wins."""
    found: dict[str, Path] = {}
    rank = {e: i for i, e in enumerate(exts)}
    for entry in os.scandir(folder):
        ext = os.path.splitext(entry.name)[1].lower()
        if ext in rank and entry.is_file():
            stem = entry.name[: -len(ext)]
            if stem not in found or rank[ext] < rank[found[stem].suffix.lower()]:
                found[stem] = Path(entry.path)
    return found


def read_image(path: Path, hint: str = FIX_HINT) -> torch.Tensor:
    """An RGB image as uint8 (3, H, W), EXIF orientation applied.

    The one image decoder of the project: training, evaluation and prediction all read
    pixels through it, so they see the same values.
    """
    if decode_image is not None:
        try:
            img = decode_image(
                read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True
            )
            if img.dtype == torch.uint16:  # 16-bit PNG: keep the high byte
                img = (img >> 8).to(torch.uint8)
            return img
        except (RuntimeError, ValueError):
            pass  # formats libjpeg/libpng decline; PIL reads more of them
    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}" + (f"; {hint}" if hint else "")) from e


def read_mask(path: Path, spec: DatasetSpec) -> torch.Tensor:
    """A mask as class ids (H, W): palette indices for P-mode PNGs, colours mapped to ids
    when `spec.color_masks` (colours of no class become the ignore index)."""
    try:
        # No EXIF orientation here: annotation tools write masks in the upright image's
        # pixel grid, and `deeplab validate` compares sizes the same way.
        with Image.open(path) as im:
            if spec.color_masks:
                return _colors_to_ids(np.array(im.convert("RGB")), spec)
            arr = np.array(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"cannot read mask {path}: {e}; {FIX_HINT}") from e
    if arr.ndim == 3:
        # Grey masks saved as RGB(A) are common; real colour masks need color_masks.
        if (
            arr.shape[2] >= 3
            and (arr[..., 0] == arr[..., 1]).all()
            and (arr[..., 0] == arr[..., 2]).all()
        ):
            arr = arr[..., 0]
        else:
            raise DatasetError(
                f"mask {path} has {arr.shape[2]} colour channels; masks hold one class id per "
                "pixel. If its colours are the class colours, set `color_masks: true` in "
                f"{spec.path or 'dataset.yaml'}"
            )
    if arr.dtype != np.uint8:
        # bool ('1' mode), uint16 ('I;16') or int32 ('I'): int64 supports every op later.
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _colors_to_ids(rgb: np.ndarray, spec: DatasetSpec) -> torch.Tensor:
    """(H, W, 3) uint8 colours -> (H, W) uint8 ids via one searchsorted over packed colours."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in spec.palette], np.int32)
    order = np.argsort(keys)
    keys, ids = keys[order], np.array(spec.class_ids(), np.int64)[order]
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    out = np.where(keys[pos] == code, ids[pos], spec.ignore_index)
    dtype = np.uint8 if spec.ignore_index < 256 and spec.num_classes <= 256 else np.int64
    return torch.from_numpy(out.astype(dtype))


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
        images = _index_files(spec.image_dir, IMAGE_EXTS)
        masks = _index_files(spec.mask_dir, (".png",))
        if stems is None:
            stems = spec.split_stems(split) if split is not None else sorted(images.keys() & masks)
        self.stems = list(stems)
        missing = [s for s in self.stems if s not in images or s not in masks]
        if missing:
            s = missing[0]
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
        image, mask = read_image(image_path), read_mask(mask_path, self.spec)
        if image.shape[-2:] != mask.shape:
            raise DatasetError(
                f"image {image_path} is {tuple(image.shape[-2:])} (H, W) but mask {mask_path} "
                f"is {tuple(mask.shape)}; masks must match their upright image (EXIF "
                f"orientation applied); {FIX_HINT}"
            )
        self._check_ids(mask, mask_path)
        return image, mask

    def _check_ids(self, mask: torch.Tensor, path: Path) -> None:
        # Out-of-range ids would crash the loss far from their cause (a CUDA assert).
        # numpy: ~15x faster than torch for these uint8 comparisons.
        n, ignore, m = self.spec.num_classes, self.spec.ignore_index, mask.numpy()
        bad = (m >= n) & (m != ignore)
        if bad.any():
            values = np.unique(m[bad])[:10].tolist()
            raise DatasetError(
                f"mask {path} has values {values} outside 0..{n - 1} and the ignore index "
                f"{ignore}; add the classes to dataset.yaml or remap them with "
                "`deeplab prepare --remap SRC:DST`"
            )

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
