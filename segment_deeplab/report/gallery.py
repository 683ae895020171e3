"""The best and worst validation images by per-image mIoU, as small embedded pictures.

The ranking comes from `deeplab eval`'s per_image.csv when there is one; otherwise the
checkpoint predicts a bounded, evenly spaced sample of the val split. Only the shown
images are predicted again, so nothing large is held in memory.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segment_deeplab.checkpoint import CheckpointError, load_model
from segment_deeplab.classes import colorize
from segment_deeplab.data.dataset import SegmentationFolder
from segment_deeplab.data.spec import DatasetError
from segment_deeplab.device import pick_device
from segment_deeplab.infer.fold import for_inference
from segment_deeplab.infer.tta import TTA, forward_dtype, labels, predict_probs, tta_from
from segment_deeplab.metrics import image_miou
from segment_deeplab.report.runfolder import RunData

# metrics.json's forward_dtype -> the amp setting that gives it
_AMP_OF = {"float32": "off", "bfloat16": "bf16", "float16": "fp16"}

# Most val images predicted to rank them when eval's per_image.csv is missing.
RANK_LIMIT = 64
THUMB_W, THUMB_H = 200, 160
WRONG = np.array([220, 20, 60], dtype=np.uint8)
IGNORED = np.array([120, 120, 120], dtype=np.uint8)


class GalleryMissing(Exception):
    """The gallery cannot be drawn; the message says what is missing."""


@dataclass
class Row:
    stem: str
    miou: float
    image: str  # data URIs
    truth: str
    pred: str
    error: str


@dataclass
class Gallery:
    best: list[Row]
    worst: list[Row]
    source: str  # how the images were ranked


def data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=85)
    else:
        img.save(buf, "PNG", optimize=True)
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _thumb(img: Image.Image, nearest: bool) -> Image.Image:
    scale = min(THUMB_W / img.width, THUMB_H / img.height, 1.0)
    if scale >= 1.0:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)


def error_map(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, ignore: int) -> np.ndarray:
    """(H, W, 3) uint8: wrong pixels red, ignored grey, correct ones a faded photo."""
    gray = image.astype(np.float32).mean(-1, keepdims=True)
    out = np.repeat(gray * 0.3 + 178, 3, axis=-1).astype(np.uint8)
    ignored = truth == ignore
    out[(truth != pred) & ~ignored] = WRONG
    out[ignored] = IGNORED
    return out


def render_row(data: RunData, stem: str, miou: float, image, truth, pred) -> Row:
    """Four thumbnails of one image: photo, ground truth, prediction, error map."""
    rgb = image.permute(1, 2, 0).numpy()
    t, p = truth.numpy(), pred.numpy()
    ign = data.ignore_index

    def mask(m: np.ndarray) -> str:
        return data_uri(_thumb(colorize(m, data.classes, ign, (128, 128, 128)), nearest=True))

    return Row(
        stem,
        miou,
        data_uri(_thumb(Image.fromarray(rgb), nearest=False), "JPEG"),
        mask(t),
        mask(p),
        data_uri(_thumb(Image.fromarray(error_map(rgb, t, p, ign)), nearest=True), "JPEG"),
    )


def _eval_options(data: RunData) -> tuple[TTA, str]:
    """eval's test-time options and precision, so the shown predictions are the ones it
    ranked."""
    m = data.eval_metrics or {}
    amp = _AMP_OF.get(str(m.get("forward_dtype")), "auto")
    return tta_from(m.get("scales"), m.get("flip"), m.get("window")), amp


def _predict(model, image: torch.Tensor, tta: TTA, dtype) -> torch.Tensor:
    return labels(predict_probs(model, image, tta, dtype))[0].cpu()  # (H, W)


def _pick(ranked: list[tuple[str, float]], count: int) -> tuple[list, list]:
    """(best first, worst first); an image appears in one group only, and a small val
    split is shared between the two groups."""
    k = min(count, (len(ranked) + 1) // 2)
    return ranked[:k], ranked[max(k, len(ranked) - count) :][::-1]


def _rank_val(data: RunData, model, dtype) -> tuple[list[tuple[str, float]], str]:
    """(stem, per-image mIoU) best first over at most RANK_LIMIT evenly spaced val images."""
    stems = data.spec.read_split("val")
    sample = stems[:: max(1, math.ceil(len(stems) / RANK_LIMIT))]
    folder = SegmentationFolder(data.spec, stems=sample)
    ranked = []
    for i, stem in enumerate(sample):
        image, truth = folder.load(i)
        miou = image_miou(
            truth, _predict(model, image, TTA(), dtype), data.spec.num_classes, data.ignore_index
        )
        if miou is not None:  # every pixel ignored
            ranked.append((stem, miou))
    ranked.sort(key=lambda r: -r[1])
    of = f"{len(sample)} of {len(stems)}" if len(sample) < len(stems) else f"all {len(stems)}"
    return ranked, f"per-image mIoU of {of} val images"


def build_gallery(data: RunData, count: int = 4, device: str = "auto") -> Gallery:
    """Rank val images by per-image mIoU and draw the `count` best and worst.

    Raises:
        GalleryMissing: no dataset, no checkpoint, no val split or a class mismatch.
    """
    if data.spec is None:
        raise GalleryMissing(f"the val images: {data.notes.get('dataset', 'no dataset')}")
    from_eval = bool(data.per_image)
    recorded = (data.eval_metrics or {}).get("checkpoint") if from_eval else None
    # The ranking is that of eval's checkpoint; predict with the same weights.
    ckpt = recorded if recorded and Path(recorded).exists() else data.checkpoint
    if ckpt is None:
        raise GalleryMissing("the gallery: no best.pt or last.pt to predict with yet")
    try:
        model, _, meta = load_model(ckpt)
    except CheckpointError as e:
        raise GalleryMissing(f"the gallery: {e}") from e
    names = [c["name"] for c in meta["classes"]]
    if names != data.spec.class_names:
        raise GalleryMissing(
            f"the gallery: the checkpoint's classes {names} differ from the dataset's "
            f"{data.spec.class_names}"
        )
    dev = pick_device(device)
    model = for_inference(model, dev)
    tta, amp = _eval_options(data) if from_eval else (TTA(), "auto")
    dtype = forward_dtype(model, amp, dev)
    try:
        if from_eval:
            ranked = sorted(data.per_image, key=lambda r: -r[1])
            split = (data.eval_metrics or {}).get("split", "?")
            source = f"per-image mIoU of all {len(ranked)} {split} images in {data.eval_dir}"
        else:
            ranked, source = _rank_val(data, model, dtype)
        best, worst = _pick(ranked, count)
        folder = SegmentationFolder(data.spec, stems=[s for s, _ in best + worst])
        rows = []
        for i, (stem, miou) in enumerate(best + worst):
            image, truth = folder.load(i)
            pred = _predict(model, image, tta, dtype)
            rows.append(render_row(data, stem, miou, image, truth, pred))
    except DatasetError as e:
        raise GalleryMissing(f"the val images: {e}") from e
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return Gallery(rows[: len(best)], rows[len(best) :], f"{source}, predicted by {ckpt}")
