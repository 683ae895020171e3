"""Evaluation: stream a dataset through the model into one confusion matrix.

Predictions are never kept: each batch updates the matrix and a per-image mIoU, then
is dropped. Under torchrun each rank evaluates its shard and the matrix is summed, so
every rank ends with the same metrics. `write_outputs` turns a result into
metrics.json, confusion_matrix.csv/.png and per_image.csv.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from segment_deeplab.checkpoint import CheckpointError
from segment_deeplab.infer.tta import (
    cpu_streams,
    in_streams,
    labels,
    predict_scores,
    prepare_model,
)
from segment_deeplab.metrics import ConfusionMatrix, matrix_miou
from segment_deeplab.classes import load_font


def check_classes(ckpt_classes: Sequence[Any], dataset_names: Sequence[str]) -> None:
    """Refuse a checkpoint whose classes (count and names) differ from the dataset's."""
    names = [c["name"] if isinstance(c, dict) else c.name for c in ckpt_classes]
    if list(names) != list(dataset_names):
        raise CheckpointError(
            f"the checkpoint's {len(names)} classes {names} differ from the dataset's "
            f"{len(dataset_names)} classes {list(dataset_names)}; evaluate on the dataset "
            "the model was trained for, or fix the class list in its dataset.yaml"
        )


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Every `world_size`-th item from `rank`: each process's share under torchrun."""
    if world_size <= 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world_size))


def _origin(dataset: Dataset, i: int) -> tuple[int, str]:
    """Index and stem of item `i` in the dataset beneath any Subset (shard)."""
    while isinstance(dataset, Subset):
        dataset, i = dataset.dataset, int(dataset.indices[i])
    stems = getattr(dataset, "stems", None)
    return i, str(stems[i]) if stems is not None else str(i)


def _batches(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Consecutive (image, mask) pairs of equal size grouped into batches of at most
    `batch_size`: (images (B, 3, H, W), masks)."""
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for image, mask in pairs:
        image, mask = torch.as_tensor(image), torch.as_tensor(mask)
        if images and (image.shape != images[0].shape or len(images) == batch_size):
            yield torch.stack(images), masks
            images, masks = [], []
        images.append(image)
        masks.append(mask)
    if images:
        yield torch.stack(images), masks


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _gather(items: list[Any]) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return items
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    ignore_index: int = 255,
    device: torch.device | str = "cpu",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    progress: bool = True,
    *,
    class_names: Sequence[str] | None = None,
    background: int | None = None,
    batch_size: int = 1,
    workers: int = 0,
    amp: str = "auto",
    streams: int | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on `dataset` (this process's shard) at full resolution.

    Args:
        dataset: yields (image uint8 (3, H, W), mask int64 (H, W)); already sharded
            under torchrun (see `shard`); the matrix is summed over ranks here.
        scales, flip, window, amp: test-time options and precision of `predict_probs`.
        class_names, background: for the result's names and foreground mIoU.
        batch_size: images of the same size predicted together.
        workers: DataLoader worker processes reading the dataset (one stream only).
        streams: batches read, predicted and scored at once, each in its own thread
            (`inference.in_streams`); None: `inference.cpu_streams`.

    Returns:
        `metrics_from_matrix` keys, plus "confusion_matrix" (C x C list, rows ground
        truth), "per_image" ([{stem, miou}] over all ranks) and "images".
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if next(model.parameters()).device != device:
        model.to(device)
    cm = ConfusionMatrix(num_classes, ignore_index)
    batch_size = max(1, batch_size)
    if streams is None:
        streams = cpu_streams(device, model) if workers == 0 else 1

    def score(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """The confusion matrix of each image of some pairs, in order."""
        out = []
        with torch.inference_mode():
            for images, masks in _batches(pairs, batch_size):
                scores = predict_scores(model, images, scales, flip, window, amp=amp)
                for pred, mask in zip(labels(scores), masks, strict=True):
                    out.append(cm.count(mask.to(device, non_blocking=True), pred))
        return out

    if streams > 1:  # each stream reads its own images: decoding runs in parallel too
        n = len(dataset)
        chunks = [range(k, min(k + batch_size, n)) for k in range(0, n, batch_size)]
        matrices = in_streams(lambda c: score(dataset[i] for i in c), chunks, streams)
    else:
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        matrices = map(score, _chunks(loader, batch_size))
    per_image: list[dict[str, Any]] = []
    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    bar = tqdm(total=len(dataset), desc="eval", file=sys.stderr, disable=not (progress and main))
    try:
        for batch in matrices:
            for mat in batch:
                cm.add(mat)
                order, stem = _origin(dataset, len(per_image))
                per_image.append({"index": order, "stem": stem, "miou": matrix_miou(mat)})
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    cm.reduce_from_all_processes()
    result = cm.compute(class_names, background)
    result["confusion_matrix"] = cm.numpy().tolist()
    # Back in dataset order, whichever rank evaluated each image.
    rows = sorted(_gather(per_image), key=lambda r: r["index"])
    result["per_image"] = [{"stem": r["stem"], "miou": r["miou"]} for r in rows]
    result["images"] = len(result["per_image"])
    return result


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """A readable per-class table (percentages) followed by the summary metrics."""
    names = result["class_names"]
    w = max([5] + [len(n) for n in names])
    head = "".join(f"{c:>10}" for c in ("IoU", "recall", "precision", "Dice"))
    lines = [f"{'class':<{w}}  {head}{'GT px':>13}{'pred px':>13}"]
    rule = "-" * len(lines[0])
    lines.append(rule)
    for i, name in enumerate(names):
        vals = "".join(f"{_fmt(result[k][i]):>10}" for k in ("iou", "recall", "precision", "dice"))
        px = f"{result['gt_pixels'][i]:>13,}{result['pred_pixels'][i]:>13,}"
        lines.append(f"{name:<{w}}  {vals}{px}")
    lines.append(rule)
    summary = [("mIoU", result["miou"])]
    if result.get("background") is not None:
        summary.append(("mIoU (foreground)", result["miou_foreground"]))
    summary += [
        ("pixel accuracy", result["pixel_accuracy"]),
        ("mean recall", result["mean_recall"]),
        ("fwIoU", result["fwiou"]),
    ]
    lines += [f"{k:<18} {_fmt(v)}" for k, v in summary]
    lines.append(f"{result.get('images', '?')} images, {result['pixels']:,} labelled pixels")
    return "\n".join(lines)


def confusion_png(mat: np.ndarray, names: Sequence[str]) -> Image.Image:
    """Row-normalised heat map (rows: ground truth, columns: prediction), drawn with PIL."""
    mat = np.asarray(mat, dtype=np.float64)
    n = len(names)
    rows = mat.sum(1, keepdims=True)
    frac = np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)
    cell = int(np.clip(640 // max(n, 1), 10, 48))
    font = load_font(max(10, min(14, cell // 2 + 2)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = max(int(probe.textlength(s, font=font)) for s in names) + 8
    title = 22
    left, top = title + label, title + label
    img = Image.new("RGB", (left + n * cell + 8, top + n * cell + 8), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    # Column labels: drawn horizontally on their own strip, then turned upright.
    strip = Image.new("RGB", (label, n * cell), (255, 255, 255))
    sdraw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        draw.text((left - 4, top + i * cell + cell / 2), name, fill=0, font=font, anchor="rm")
        sdraw.text((4, i * cell + cell / 2), name, fill=0, font=font, anchor="lm")
    img.paste(strip.transpose(Image.Transpose.ROTATE_90), (left, title))
    draw.text((left + n * cell / 2, 4), "prediction", fill=0, font=font, anchor="mt")
    axis = Image.new("RGB", (n * cell, title), (255, 255, 255))
    ImageDraw.Draw(axis).text((n * cell / 2, 4), "ground truth", fill=0, font=font, anchor="mt")
    img.paste(axis.transpose(Image.Transpose.ROTATE_90), (0, top))
    for r in range(n):
        for c in range(n):
            x0, y0 = left + c * cell, top + r * cell
            v = frac[r, c]
            # White to dark blue; a row without ground truth is grey ("n/a").
            color = (225, 225, 225) if rows[r, 0] == 0 else _blue(v)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color)
            if cell >= 28 and rows[r, 0] > 0 and v > 0:
                ink = (255, 255, 255) if v > 0.5 else (0, 0, 0)
                mid = (x0 + cell / 2, y0 + cell / 2)
                draw.text(mid, f"{100 * v:.0f}", fill=ink, font=font, anchor="mm")
    draw.rectangle([left - 1, top - 1, left + n * cell, top + n * cell], outline=(0, 0, 0))
    return img


def _blue(v: float) -> tuple[int, int, int]:
    lo, hi = np.array([255, 255, 255]), np.array([8, 48, 107])
    return tuple(int(x) for x in (lo + (hi - lo) * float(v)).round())


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json, confusion_matrix.csv/.png and per_image.csv into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = result["class_names"]
    mat = np.asarray(result["confusion_matrix"], dtype=np.int64)
    paths = {
        "metrics": out / "metrics.json",
        "confusion_csv": out / "confusion_matrix.csv",
        "confusion_png": out / "confusion_matrix.png",
        "per_image": out / "per_image.csv",
    }
    # The matrix and per-image rows have their own CSVs; the JSON stays readable.
    summary = {k: v for k, v in result.items() if k not in ("confusion_matrix", "per_image")}
    paths["metrics"].write_text(json.dumps(summary, indent=2) + "\n")
    with paths["confusion_csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ground_truth \\ prediction", *names])
        for name, row in zip(names, mat.tolist(), strict=True):
            w.writerow([name, *row])
    confusion_png(mat, names).save(paths["confusion_png"])
    with paths["per_image"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stem", "miou"])
        for rec in result.get("per_image", []):
            w.writerow([rec["stem"], "" if rec["miou"] is None else f"{rec['miou']:.6f}"])
    return paths


def run_eval(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "val",
    output: str | Path | None = None,
    spec: str | Path | None = None,
    device: str = "auto",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    background: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    amp: str = "auto",
) -> dict[str, Any] | None:
    """Evaluate a checkpoint (file or run folder) on a dataset split; write the outputs.

    `output` defaults to `eval_<split>/` in the checkpoint's run folder. Under torchrun
    every rank evaluates a shard; only rank 0 writes and gets the result (others: None).
    """
    from segment_deeplab.checkpoint import load_model
    from segment_deeplab.data.spec import open_dataset
    from segment_deeplab.data.dataset import SegmentationFolder
    from segment_deeplab import device as distributed
    from segment_deeplab.train.setup import resolve_amp
    from segment_deeplab.metrics import background_index

    ds = open_dataset(data, spec)
    model, _, ckpt = load_model(checkpoint)
    check_classes(ckpt["classes"], ds.class_names)
    folder = SegmentationFolder(ds, split)
    info = distributed.setup(device)
    try:
        model = prepare_model(model, info.device)
        result = evaluate(
            model,
            shard(folder, info.rank, info.world_size),
            ds.num_classes,
            ds.ignore_index,
            info.device,
            scales,
            flip,
            window,
            progress,
            class_names=ds.class_names,
            background=background_index(ds.class_names, background),
            batch_size=batch_size,
            amp=amp,
        )
        dtype = resolve_amp(amp, info.device)[0] or torch.float32
    finally:
        distributed.teardown()
    if not info.is_main:
        return None
    ckpt_path = Path(checkpoint)
    run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    out = Path(output) if output is not None else run_dir / f"eval_{split}"
    result.update(checkpoint=str(checkpoint), dataset=str(data), split=split)
    result.update(scales=list(scales), flip=flip, window=window)
    result["forward_dtype"] = str(dtype).removeprefix("torch.")  # of the model's forward pass
    result["outputs"] = {k: str(v) for k, v in write_outputs(result, out).items()}
    return result
