"""What a training run leaves to read: metrics.jsonl and TensorBoard logs.

Train loss is averaged over each logging window; validation metrics and a few
prediction overlays are written at every validation.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from segment_deeplab.classes import overlay
from segment_deeplab.data.spec import DatasetSpec
from segment_deeplab.infer.tta import predict_labels


def log_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def open_tensorboard(out: Path, step: int = 0):
    """A TensorBoard writer for `out/tb`; a resumed run (`step` > 0) drops the events of
    steps after its checkpoint, which it trains and logs again."""
    # tensorboard imports all of TensorFlow when it is installed (seconds, and its
    # protobuf messages) unless `tensorboard.compat.notf` exists: its own switch to the
    # stub, which is all the event writer needs.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep training if it breaks
        return None
    return SummaryWriter(str(out / "tb"), purge_step=step + 1 if step else None)


class RunLog:
    """metrics.jsonl + TensorBoard: train loss averaged over each logging window."""

    def __init__(self, path: Path, writer, spec: DatasetSpec, active: bool):
        self.path, self.writer, self.spec, self.active = path, writer, spec, active
        self._reset()

    def _reset(self) -> None:
        self.t0, self.images, self.losses, self.last = time.perf_counter(), 0, [], {}

    def train(self, step: int, epoch: int, loss, lr: float, images: int, elapsed: float):
        """Note one step; `loss` may be a device tensor, read only when the window is
        written."""
        self.losses.append(loss)
        self.images += images
        self.last = {"step": step, "epoch": epoch, "lr": lr, "elapsed_s": round(elapsed, 1)}

    def flush(self) -> dict[str, str]:
        """Write the window's record; return the progress bar's postfix."""
        if not self.losses:
            return {}
        ips = self.images / max(time.perf_counter() - self.t0, 1e-9)
        loss = float(
            torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in self.losses]).mean().cpu()
        )
        rec = {**self.last, "loss": loss, "images_per_s": round(ips, 2)}
        if self.active:
            log_jsonl(self.path, rec)
            if self.writer is not None:
                for k, v in (("loss", loss), ("lr", rec["lr"]), ("images_per_s", ips)):
                    self.writer.add_scalar(f"train/{k}", v, rec["step"])
        self._reset()
        return {"loss": f"{loss:.3f}", "lr": f"{rec['lr']:.2e}", "img/s": f"{ips:.1f}"}

    def val(self, step: int, metrics: dict | None) -> float | None:
        """Record validation metrics; return the mIoU (None without a val split)."""
        if metrics is None:
            return None
        self.flush()
        if self.active:
            log_jsonl(self.path, {"step": step, "val": metrics})
            if self.writer is not None:
                if metrics.get("miou") is not None:
                    self.writer.add_scalar("val/mIoU", metrics["miou"], step)
                for name, iou in zip(self.spec.class_names, metrics.get("iou", []), strict=False):
                    if iou is not None:
                        self.writer.add_scalar(f"val_iou/{name}", iou, step)
        return metrics.get("miou")

    def overlays(self, step: int, model, val_set, count: int = 3) -> None:
        """A few validation predictions as TensorBoard images (ground truth | prediction)."""
        if not self.active or self.writer is None or val_set is None:
            return
        was_training = model.training
        model.eval()
        for i in range(min(count, len(val_set))):
            image, mask = val_set[i]
            pred = predict_labels(model, image.unsqueeze(0))[0].cpu()
            pair = [overlay(image, m, self.spec.classes, show_legend=False) for m in (mask, pred)]
            both = np.concatenate([np.asarray(p) for p in pair], axis=1)  # (H, 2W, 3)
            self.writer.add_image(f"val_predictions/{i}", both, step, dataformats="HWC")
        model.train(was_training)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
