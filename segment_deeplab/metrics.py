"""Segmentation metrics, all from one bincount confusion matrix.

Rows of the matrix are ground truth, columns are predictions (as torchvision's
`references/segmentation/utils.py::ConfusionMatrix`). The matrix is summed across
processes before anything is derived from it, so every rank reports the same numbers.

A class absent from both ground truth and prediction has no IoU: it is None ("n/a")
and left out of every mean, never counted as 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """A (C, C) int64 matrix of (ground truth, prediction) pixel counts.

    Args:
        num_classes: number of classes, not counting the ignore value.
        ignore_index: ground-truth value of pixels left out of every metric.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat: torch.Tensor | None = None

    def reset(self) -> None:
        self.mat = None

    @torch.inference_mode()
    def count(self, target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The (C, C) int64 matrix of integer label maps of the same shape, on any
        device, without adding it: safe to call from several threads at once."""
        if target.shape != pred.shape:
            raise ValueError(f"target {tuple(target.shape)} and pred {tuple(pred.shape)} differ")
        n = self.num_classes
        # int32 arithmetic on a copy: half the memory traffic of int64, and it fits.
        t = target.reshape(-1).to(torch.int32, copy=True)
        p = pred.reshape(-1).to(t.device, torch.int32)
        if not t.numel():
            return torch.zeros((n, n), dtype=torch.int64, device=t.device)
        # Pixels without ground truth (the ignore index, any value outside the classes)
        # go to a spare row n, cut off below: cheaper than selecting the labelled ones.
        if 0 <= self.ignore_index < n:
            t.masked_fill_(t == self.ignore_index, n)
        if int(t.min()) < 0:
            t.masked_fill_(t < 0, n)
        t.clamp_(max=n)
        low, high = torch.aminmax(p)
        if int(low) < 0 or int(high) >= n:
            # Only predictions where there is ground truth must be classes; an
            # out-of-range one would silently land in another row's cell.
            low, high = torch.aminmax(p.masked_fill(t == n, 0))
            if int(low) < 0 or int(high) >= n:
                raise ValueError(f"predictions must lie in 0..{n - 1}")
            p = p.clamp(0, n - 1)  # those left are in the spare row
        index = t.mul_(n).add_(p)
        return torch.bincount(index, minlength=n * n + n)[: n * n].reshape(n, n).long()

    @torch.inference_mode()
    def add(self, batch: torch.Tensor) -> None:
        """Add a (C, C) matrix from `count`."""
        if self.mat is None:
            self.mat = torch.zeros_like(batch, dtype=torch.int64)
        self.mat += batch.to(self.mat.device)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Add a batch: integer label maps of the same shape, on any device.

        Returns the batch's own (C, C) matrix (e.g. for a per-image mIoU).
        """
        batch = self.count(target, pred)
        self.add(batch)
        return batch

    def reduce_from_all_processes(self) -> None:
        """Sum the matrix over all ranks (no-op outside torch.distributed)."""
        if self.mat is None:
            self.mat = torch.zeros((self.num_classes,) * 2, dtype=torch.int64)
        if dist.is_available() and dist.is_initialized():
            # NCCL only reduces CUDA tensors; gloo takes CPU ones.
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            mat = self.mat.to(device)
            dist.barrier()
            dist.all_reduce(mat)
            self.mat = mat

    def numpy(self) -> np.ndarray:
        if self.mat is None:
            return np.zeros((self.num_classes,) * 2, dtype=np.int64)
        return self.mat.cpu().numpy()

    def compute(
        self, class_names: Sequence[str] | None = None, background: int | None = None
    ) -> dict[str, Any]:
        """Every metric of this matrix; see `metrics_from_matrix`."""
        return metrics_from_matrix(self.numpy(), class_names, background)


def background_index(class_names: Sequence[str], flag: int | None = None) -> int | None:
    """The class to leave out of foreground mIoU: `flag`, else one named 'background'.

    Raises:
        ValueError: `flag` is no class id.
    """
    if flag is not None:
        if not 0 <= flag < len(class_names):
            raise ValueError(
                f"--background {flag} is no class id; the classes are 0..{len(class_names) - 1} "
                f"({', '.join(class_names)})"
            )
        return flag
    for i, name in enumerate(class_names):
        if name.strip().lower() == "background":
            return i
    return None


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(a) / float(b) if b > 0 else None for a, b in zip(num, den, strict=True)]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(sum(kept) / len(kept)) if kept else None


def metrics_from_matrix(
    mat: np.ndarray | torch.Tensor,
    class_names: Sequence[str] | None = None,
    background: int | None = None,
) -> dict[str, Any]:
    """Per-class and summary metrics of a (C, C) ground-truth x prediction matrix.

    Per class: IoU, recall (class accuracy), precision, Dice/F1, and ground-truth and
    predicted pixel counts. A ratio whose denominator is 0 is None (e.g. IoU of a class
    in neither ground truth nor prediction, recall of a class with no ground truth).

    Returns:
        Per-class lists in class order: "class_names", "iou", "recall", "precision",
        "dice", "gt_pixels", "pred_pixels"; summaries: "miou", "miou_foreground" (None
        without a background class), "mean_recall", "mean_precision", "mean_dice",
        "pixel_accuracy", "fwiou", "pixels", "background". Means skip None; with no
        pixels at all they are None.
    """
    h = mat.cpu().numpy() if isinstance(mat, torch.Tensor) else np.asarray(mat)
    h = h.astype(np.int64)
    n = h.shape[0]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}x{n} confusion matrix")
    tp = np.diag(h)
    gt = h.sum(1)
    pred = h.sum(0)
    total = int(h.sum())
    iou = _ratio(tp, gt + pred - tp)
    recall = _ratio(tp, gt)
    precision = _ratio(tp, pred)
    dice = _ratio(2 * tp, gt + pred)
    # Frequency-weighted IoU: classes weighted by their share of ground-truth pixels;
    # a class without ground truth weighs 0, so its missing IoU does not matter.
    fwiou = sum(int(gt[i]) * iou[i] for i in range(n) if gt[i] > 0) / total if total else None
    fg = None
    if background is not None:
        fg = _mean([v for i, v in enumerate(iou) if i != background])
    return {
        "class_names": names,
        "iou": iou,
        "recall": recall,
        "precision": precision,
        "dice": dice,
        "gt_pixels": [int(v) for v in gt],
        "pred_pixels": [int(v) for v in pred],
        "miou": _mean(iou),
        "miou_foreground": fg,
        "mean_recall": _mean(recall),
        "mean_precision": _mean(precision),
        "mean_dice": _mean(dice),
        "pixel_accuracy": float(tp.sum()) / total if total else None,
        "fwiou": float(fwiou) if fwiou is not None else None,
        "pixels": total,
        "background": background,
    }


def image_miou(
    target: torch.Tensor, pred: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> float | None:
    """mIoU of one image over the classes in its ground truth or prediction.

    Used to rank images (best/worst galleries); None when every pixel is ignored.
    """
    return matrix_miou(ConfusionMatrix(num_classes, ignore_index).update(target, pred))


def matrix_miou(mat: torch.Tensor) -> float | None:
    """mIoU over the classes present in a confusion matrix's rows or columns."""
    if int(mat.sum()) == 0:
        return None
    h = mat.double()
    tp = torch.diag(h)
    union = h.sum(0) + h.sum(1) - tp
    seen = union > 0
    return float((tp[seen] / union[seen]).mean())
