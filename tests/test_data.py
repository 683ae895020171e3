"""Synthetic data, joint transforms, the folder dataset and its loader."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from segment_deeplab.classes import ClassInfo
from segment_deeplab.config import DataConfig
from segment_deeplab.data import decode
from segment_deeplab.data.dataset import (
    SegmentationFolder,
    build_loader,
    pad_collate,
    resolve_workers,
)
from segment_deeplab.data.spec import DatasetError, DatasetSpec, open_dataset
from segment_deeplab.data.synthetic import generate
from segment_deeplab.data.transforms import (
    MEAN_RGB,
    build_transforms,
    eval_transforms,
    resize_nearest,
    train_transforms,
)

IGNORE = 255


def make_spec(root: Path, n: int = 3, color_masks: bool = False) -> DatasetSpec:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    colors = [(0, 0, 0), (200, 0, 0), (0, 200, 0)]
    return DatasetSpec(
        classes=[ClassInfo(i, f"c{i}", c) for i, c in enumerate(colors[:n])],
        image_dir=root / "images",
        mask_dir=root / "masks",
        ignore_index=IGNORE,
        color_masks=color_masks,
    )


def coded_pair(h: int = 96, w: int = 128, block: int = 16, seed: int = 0):
    """A block mask of ids 0..5 (plus ignore blocks) and an image whose channel 0 is
    id * 40, so any misalignment between the two shows as a wrong value."""
    g = np.random.default_rng(seed)
    ids = g.integers(0, 6, (h // block, w // block)).astype(np.uint8)
    ids[0, 0] = IGNORE
    mask = np.kron(ids, np.ones((block, block), np.uint8))
    code = np.where(mask == IGNORE, 250, mask.astype(np.int32) * 40).astype(np.uint8)
    image = np.stack([code, g.integers(0, 256, mask.shape, dtype=np.uint8), code])
    return tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(mask))


def interior(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood holds one mask value (away from edges)."""
    m = mask.float()[None, None]
    hi = torch.nn.functional.max_pool2d(m, 2 * r + 1, 1, r)
    lo = -torch.nn.functional.max_pool2d(-m, 2 * r + 1, 1, r)
    return (hi == lo)[0, 0]


# --------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    kw = dict(num=6, size=(48, 64), num_classes=4)
    a, b, c = (generate(tmp_path / n, seed=s, **kw) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    assert len(files) == 6 * 2 + 3  # pairs, dataset.yaml, two split files
    for f in files:
        assert (a.parent / f).read_bytes() == (b.parent / f).read_bytes(), f
    assert (a.parent / "images/0000.jpg").read_bytes() != (
        c.parent / "images/0000.jpg"
    ).read_bytes()


def test_synthetic_dataset_loads(tmp_path: Path) -> None:
    path = generate(tmp_path, num=8, seed=0, size=(64, 80), num_classes=4)
    spec = open_dataset(tmp_path)
    assert spec.path == path and spec.num_classes == 4 and spec.ignore_index == IGNORE
    assert spec.class_names == ["background", "circle", "rectangle", "triangle"]
    assert len(set(spec.palette)) == 4
    assert spec.read_split("train") == [f"{i:04d}" for i in range(6)]
    assert spec.read_split("val") == ["0006", "0007"]
    masks = np.stack([np.asarray(Image.open(p)) for p in sorted(spec.mask_dir.glob("*.png"))])
    values = set(np.unique(masks).tolist())
    assert values <= {0, 1, 2, 3, IGNORE} and IGNORE in values and len(values) >= 4


def test_synthetic_is_fast(tmp_path: Path) -> None:
    t = time.perf_counter()
    generate(tmp_path, num=64)
    assert time.perf_counter() - t < 5.0


# --------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("scale", [(1.0, 1.0), (2.0, 2.0), (0.5, 2.0)])
def test_train_transforms_keep_image_and_mask_aligned(scale) -> None:
    tf = train_transforms((64, 80), scale, IGNORE)
    for seed in range(20):
        torch.manual_seed(seed)
        image, mask = tf(*coded_pair(seed=seed))
        assert image.shape == (3, 64, 80) and image.dtype == torch.uint8
        assert mask.shape == (64, 80)
        # Exact without resizing; with it, compare away from edges, where bilinear
        # (antialiased) and nearest agree on a constant region.
        labelled = mask != IGNORE
        keep = labelled & interior(mask, 2) if scale != (1.0, 1.0) else labelled
        got, want = image[0][keep].int(), mask[keep].int() * 40
        assert (got - want).abs().max() <= (0 if scale == (1.0, 1.0) else 2), seed
        # one geometry for every channel
        assert torch.equal(image[0][labelled], image[2][labelled])


def test_train_transforms_pad_small_images_to_the_crop() -> None:
    image, mask = coded_pair(20, 30, block=10)
    mask[mask == IGNORE] = 1
    for seed in range(4):
        torch.manual_seed(seed)
        out_img, out_mask = train_transforms((64, 80), (1.0, 1.0), IGNORE)(image, mask)
        assert out_img.shape == (3, 64, 80) and out_mask.shape == (64, 80)
        pad = out_mask == IGNORE
        assert int((~pad).sum()) == 20 * 30  # every pixel kept once, the rest padding
        assert (out_img[:, pad] == torch.tensor(MEAN_RGB, dtype=torch.uint8)[:, None]).all()


def test_nearest_resize_samples_pixel_centres() -> None:
    m = torch.arange(12, dtype=torch.int64).view(3, 4)  # int64: interpolate() lacks it
    assert torch.equal(resize_nearest(m, 6, 8), m.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(resize_nearest(m.repeat_interleave(2, 1), 3, 4), m)


def test_eval_preset_keeps_the_full_image() -> None:
    image, mask = coded_pair(50, 70, block=10)
    for tf in (eval_transforms(), build_transforms(DataConfig(crop_size=[32, 32]), False)):
        out_img, out_mask = tf(image, mask)
        assert torch.equal(out_img, image) and torch.equal(out_mask, mask)
    tf = build_transforms(DataConfig(crop_size=[32, 48]), True, IGNORE)
    assert tf(image, mask)[0].shape == (3, 32, 48)


# --------------------------------------------------------------------------- folder
def _phone_pair(spec: DatasetSpec) -> None:
    """A JPEG stored rotated with EXIF orientation 6, its mask drawn on the upright
    picture (40 x 24 upright, 24 x 40 as stored)."""
    upright = np.zeros((40, 24, 3), np.uint8)
    upright[:20] = (255, 0, 0)  # red top half, blue bottom half
    upright[20:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(spec.image_dir / "phone.jpg", exif=exif.tobytes(), quality=95)
    ids = np.zeros((40, 24), np.uint8)
    ids[20:] = 2
    ids[0, :3] = IGNORE
    Image.fromarray(ids).save(spec.mask_dir / "phone.png")


def _palette_pairs(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Palette masks: 3 colours with transparency (PIL writes them 2-bit, where
    torchvision.io decodes garbage) and a VOC-style 256-colour palette holding the
    ignore index; plus a grey mask saved RGB. Returns the ids of the two palette masks."""
    few = np.array([[0, 1, 2, 1], [2, 2, 1, 0], [1, 0, 0, 2]], np.uint8)
    voc = few.copy()
    voc[1, 2] = IGNORE
    pal = [30, 60, 90, 200, 10, 10, 10, 200, 10]
    for stem, ids, palette, extra in (
        ("few", few, pal, {"transparency": 0}),
        ("voc", voc, pal + [255, 255, 255] * 253, {}),
    ):
        Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(spec.image_dir / f"{stem}.png")
        m = Image.new("P", (4, 3))
        m.putdata(ids.ravel().tolist())
        m.putpalette(palette)
        m.save(spec.mask_dir / f"{stem}.png", **extra)
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(spec.image_dir / "grey.jpg")
    Image.fromarray(np.repeat(few[..., None], 3, axis=2)).save(spec.mask_dir / "grey.png")
    return few, voc


def test_palette_masks_give_indices(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    few, voc = _palette_pairs(spec)
    ds = SegmentationFolder(spec, stems=["few", "voc"])
    for i, ids in enumerate((few, voc)):
        image, mask = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 3, 4)
        assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(ids).long())


def test_color_masks_map_to_ids(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, color_masks=True)
    rgb = np.array([[[0, 0, 0], [200, 0, 0]], [[0, 200, 0], [9, 9, 9]]], np.uint8)
    Image.fromarray(rgb).save(spec.mask_dir / "a.png")
    Image.fromarray(rgb).save(spec.image_dir / "a.jpg")
    _, mask = SegmentationFolder(spec, stems=["a"])[0]
    assert mask.tolist() == [[0, 1], [2, IGNORE]]


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path: Path, monkeypatch, decoder: str) -> None:
    if decoder == "pil":  # the path taken once torchvision drops its decoders
        monkeypatch.setattr(decode, "decode_image", None)
    spec = make_spec(tmp_path)
    upright = np.zeros((40, 24, 3), np.uint8)
    upright[:20] = (255, 0, 0)  # red top half
    upright[20:] = (0, 0, 255)
    ids = np.zeros((40, 24), np.uint8)
    ids[20:] = 2
    # Store the pixels rotated, with the EXIF orientation (6) that turns them upright,
    # as phone cameras do; the mask was drawn on the upright picture.
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(spec.image_dir / "phone.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(ids).save(spec.mask_dir / "phone.png")
    image, mask = SegmentationFolder(spec, stems=["phone"])[0]
    assert image.shape == (3, 40, 24)
    red = image[0].int() > image[2].int()
    assert torch.equal(red, mask == 0)


def test_missing_and_broken_files_name_the_file(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(spec.mask_dir / "lonely.png")
    with pytest.raises(DatasetError, match=r"images/lonely\..*deeplab validate"):
        SegmentationFolder(spec, stems=["lonely"])
    (spec.image_dir / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(spec.mask_dir / "broken.png")
    with pytest.raises(DatasetError, match=r"broken\.jpg"):
        SegmentationFolder(spec, stems=["broken"])[0]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(spec.image_dir / "bad.png")
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(spec.mask_dir / "bad.png")
    with pytest.raises(DatasetError, match=r"masks/bad\.png has values \[7\]"):
        SegmentationFolder(spec, stems=["bad"])[0]


def test_folder_exposes_stems_and_paths(tmp_path: Path) -> None:
    generate(tmp_path, num=4, size=(32, 40))
    ds = SegmentationFolder(open_dataset(tmp_path))  # no split: every pair
    assert ds.stems == ["0000", "0001", "0002", "0003"]
    image_path, mask_path = ds.paths(2)
    assert image_path.name == "0002.jpg" and mask_path.name == "0002.png"


# --------------------------------------------------------------------------- loader
@pytest.mark.parametrize("workers", [0, 1])
def test_loader_batches(tmp_path: Path, workers: int) -> None:
    generate(tmp_path, num=8, size=(48, 64))
    spec = open_dataset(tmp_path)
    cfg = DataConfig(crop_size=[32, 40], batch_size=3, workers=workers)
    batches = list(build_loader(spec, "train", cfg, train=True, seed=0))
    assert len(batches) == 2  # 6 train pairs, last incomplete batch dropped
    image, mask = batches[0]
    assert image.shape == (3, 3, 32, 40) and image.dtype == torch.uint8
    assert mask.shape == (3, 32, 40) and mask.dtype == torch.int64
    image, mask = next(iter(build_loader(spec, "val", cfg, train=False)))
    assert image.shape == (2, 3, 48, 64) and mask.shape == (2, 48, 64)


def test_loader_shuffle_follows_the_seed(tmp_path: Path) -> None:
    generate(tmp_path, num=16, size=(16, 16))
    spec = open_dataset(tmp_path)
    cfg = DataConfig(crop_size=[16, 16], scale_range=[1.0, 1.0], batch_size=12, workers=0)

    def first_batch(seed: int) -> torch.Tensor:
        loader = build_loader(spec, "train", cfg, train=True, seed=seed)
        torch.manual_seed(0)  # the transforms draw from torch's RNG without workers
        return next(iter(loader))[0]

    assert torch.equal(first_batch(3), first_batch(3))
    with pytest.raises(DatasetError, match="batch_size"):
        build_loader(spec, "val", cfg, train=True)


def test_pad_collate_pads_to_the_largest() -> None:
    small = (torch.zeros(3, 4, 5, dtype=torch.uint8), torch.zeros(4, 5, dtype=torch.int64))
    large = (torch.ones(3, 6, 3, dtype=torch.uint8), torch.ones(6, 3, dtype=torch.int64))
    images, masks = pad_collate([small, large], ignore_index=IGNORE)
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert (masks[0, 4:] == IGNORE).all() and (masks[1, :, 3:] == IGNORE).all()
    assert (masks[0, :4] == 0).all() and images[1, 0, 0, 4] == MEAN_RGB[0]


def test_default_workers_follow_the_device() -> None:
    assert resolve_workers(3, "cpu") == 3
    assert resolve_workers(None, "cpu") == 0  # on CPU the model needs the cores
    assert resolve_workers(None, "cuda") == min(4, os.cpu_count() or 1)


# --------------------------------------------------------------------------- one decoder
@pytest.mark.parametrize("color_masks", [False, True])
def test_validate_and_training_read_the_same_ids(tmp_path: Path, color_masks: bool) -> None:
    """What `deeplab validate` checks is what training loads: for every pair, the size
    validate reports is the size of the image training decodes (EXIF applied), and
    the per-value pixel counts validate reads from the mask bytes are those of the
    ids training gets."""
    from segment_deeplab.data.decode import MaskOptions
    from segment_deeplab.data.pair_check import check_pair
    from segment_deeplab.data.pairs import pair_files

    spec = make_spec(tmp_path, color_masks=color_masks)
    if color_masks:  # RGB masks in the class colours, one colour of no class
        rgb = np.array([[[0, 0, 0], [200, 0, 0]], [[0, 200, 0], [9, 9, 9]]], np.uint8)
        Image.fromarray(np.kron(rgb, np.ones((3, 2, 1), np.uint8))).save(spec.mask_dir / "a.png")
        Image.fromarray(np.zeros((6, 4, 3), np.uint8)).save(spec.image_dir / "a.jpg")
    _phone_pair(spec)
    _palette_pairs(spec)
    pairs, problems = pair_files(spec.image_dir, spec.mask_dir)
    assert not problems and len(pairs) == (5 if color_masks else 4)
    folder = SegmentationFolder(spec, stems=[p.stem for p in pairs])
    opts = MaskOptions.build(spec)
    for i, pair in enumerate(pairs):
        checked = check_pair(pair.stem, pair.image, pair.mask, opts)
        image, mask = folder.load(i)
        assert checked.size_hw == tuple(image.shape[-2:]) == tuple(mask.shape), pair.stem
        counts = np.bincount(mask.numpy().ravel(), minlength=256)
        assert checked.values.tolist() == np.flatnonzero(counts).tolist(), pair.stem
        assert checked.stats[:, 0].tolist() == counts[checked.values].tolist(), pair.stem
        # Colours of no class are errors to validate and ignore to training; nothing else.
        assert {p.code for p in checked.problems if p.level == "error"} <= {"unknown_values"}
    # The phone photo comes out upright in both: red on top, where the mask says 0.
    image, mask = folder.load([p.stem for p in pairs].index("phone"))
    assert torch.equal(image[0].int() > image[2].int(), mask != 2)


def test_color_jitter_changes_the_image_only():
    from segment_deeplab.config import ConfigError, load_config
    from segment_deeplab.data.transforms import train_transforms

    g = torch.Generator().manual_seed(0)
    image = tv_tensors.Image(torch.randint(40, 200, (3, 60, 70), dtype=torch.uint8, generator=g))
    mask = tv_tensors.Mask(torch.randint(0, 4, (60, 70), dtype=torch.uint8, generator=g))
    outs = {}
    for j in (0.0, 0.4):
        torch.manual_seed(3)  # the same crop and flip for both
        outs[j] = train_transforms(48, (0.75, 1.25), color_jitter=j)(image, mask)
    assert torch.equal(outs[0.0][1], outs[0.4][1])  # labels untouched
    assert not torch.equal(outs[0.0][0], outs[0.4][0])  # pixels changed
    assert outs[0.4][0].dtype == torch.uint8
    with pytest.raises(ConfigError, match="data.color_jitter"):
        load_config(None, ["data.color_jitter=1.5"])
