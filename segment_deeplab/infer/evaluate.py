"""Evaluation: stream a dataset through the model into one confusion matrix.

Predictions are never kept: each batch updates the matrix and a per-image mIoU, then
is dropped. Under torchrun each rank evaluates its shard and the matrix is summed, so
every rank ends with the same metrics. `eval_outputs.write_outputs` turns a result into
metrics.json, confusion_matrix.csv/.png and per_image.csv.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from segment_deeplab import device as devices
from segment_deeplab.atomic import check_writable_dir
from segment_deeplab.checkpoint import CheckpointError, load_any
from segment_deeplab.data.dataset import open_split
from segment_deeplab.data.spec import DatasetError, open_dataset
from segment_deeplab.infer.eval_outputs import write_outputs
from segment_deeplab.infer.fold import for_inference
from segment_deeplab.infer.tta import PLAIN, TTA, forward_dtype, labels, predict_scores
from segment_deeplab.metrics import ConfusionMatrix, background_index, matrix_miou


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
    batch_size = max(1, batch_size)
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


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    ignore_index: int = 255,
    device: torch.device | str = "cpu",
    tta: TTA = PLAIN,
    progress: bool = True,
    *,
    class_names: Sequence[str] | None = None,
    background: int | None = None,
    batch_size: int = 1,
    workers: int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on `dataset` (this process's shard) at full resolution.

    Args:
        dataset: yields (image uint8 (3, H, W), mask int64 (H, W)); already sharded
            under torchrun (see `shard`); the matrix is summed over ranks here.
        tta: test-time options; dtype: autocast dtype of the forward pass (None: fp32).
        class_names, background: for the result's names and foreground mIoU.
        batch_size: images of the same size predicted together.
        workers: DataLoader worker processes decoding ahead (0: decode here, which
            was faster on 2 cores: BENCHMARKS.md §4).

    Returns:
        `metrics_from_matrix` keys, plus "confusion_matrix" (C x C list, rows ground
        truth), "per_image" ([{stem, miou}] over all ranks) and "images".
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if devices.model_device(model) != device:
        model.to(device)
    cm = ConfusionMatrix(num_classes, ignore_index)
    n = len(dataset)
    pairs = DataLoader(dataset, batch_size=None, num_workers=workers) if workers else None
    per_image: list[dict[str, Any]] = []
    shown = progress and devices.is_main_process()
    bar = tqdm(total=n, desc="eval", file=sys.stderr, disable=not shown)
    try:
        with torch.inference_mode():
            for images, masks in _batches(pairs or map(dataset.__getitem__, range(n)), batch_size):
                preds = labels(predict_scores(model, images, tta, dtype))
                for pred, mask in zip(preds, masks, strict=True):
                    mat = cm.count(mask.to(device, non_blocking=True), pred)
                    cm.add(mat)
                    order, stem = _origin(dataset, len(per_image))
                    per_image.append({"index": order, "stem": stem, "miou": matrix_miou(mat)})
                bar.update(len(masks))
    finally:
        bar.close()
        model.train(was_training)
    return _result(cm, per_image, class_names, background)


def _result(cm: ConfusionMatrix, per_image: list[dict], class_names, background) -> dict:
    """Metrics summed over ranks, per-image rows back in dataset order."""
    cm.reduce_from_all_processes()
    result = cm.compute(class_names, background)
    result["confusion_matrix"] = cm.numpy().tolist()
    # Back in dataset order, whichever rank evaluated each image.
    rows = sorted(devices.gather_objects(per_image), key=lambda r: r["index"])
    result["per_image"] = [{"stem": r["stem"], "miou": r["miou"]} for r in rows]
    result["images"] = len(result["per_image"])
    return result


def run_eval(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "val",
    output: str | Path | None = None,
    spec: str | Path | None = None,
    device: str = "auto",
    tta: TTA = PLAIN,
    background: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    amp: str = "auto",
) -> dict[str, Any] | None:
    """Evaluate a model file (run folder, checkpoint or export: `checkpoint.load_any`) on
    a dataset split; write the outputs.

    `output` defaults to `eval_<split>/` in the checkpoint's run folder. Under torchrun
    every rank evaluates a shard; only rank 0 writes and gets the result (others: None).
    """
    ckpt_path = Path(checkpoint)
    run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    out = Path(output) if output is not None else run_dir / f"eval_{split}"
    check_writable_dir(out)  # before the work, not after it
    ds = open_dataset(data, spec)
    try:
        background = background_index(ds.class_names, background)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    info = devices.setup(device)
    try:
        loaded = load_any(checkpoint, info.device)
        check_classes(loaded.classes, ds.class_names)
        folder = open_split(ds, split)
        model = for_inference(loaded.model, info.device)
        dtype = forward_dtype(model, amp, info.device)
        result = evaluate(
            model,
            shard(folder, info.rank, info.world_size),
            ds.num_classes,
            ds.ignore_index,
            info.device,
            tta,
            progress,
            class_names=ds.class_names,
            background=background,
            batch_size=batch_size,
            dtype=dtype,
        )
    finally:
        devices.teardown()
    if not info.is_main:
        return None
    result.update(checkpoint=str(checkpoint), dataset=str(data), split=split)
    result.update(scales=list(tta.scales), flip=tta.flip, window=tta.window)
    result["forward_dtype"] = devices.dtype_name(dtype)  # of the model's forward pass
    result["outputs"] = {k: str(v) for k, v in write_outputs(result, out).items()}
    return result
