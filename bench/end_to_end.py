"""End-to-end training speed on real image files: `deeplab train`'s loop against the peer's.

    python bench/end_to_end.py --data CAMVID_PREPARED/dataset.yaml --device cuda \
        --variant resnet_50 --crop 512 --batch 16 --steps 60 --amp bf16
    python bench/end_to_end.py --data DATASET --device cpu --variant resnet_18 --crop 64 \
        --batch 2 --steps 4 --amp off      # the tiny CPU form CI runs

Both sides read the same JPEG/PNG files through a DataLoader (same workers, pinned
memory on a GPU), random-scale, crop and flip, and train the same crop, batch and
precision, channels_last on both:

- project: `fit()` exactly as `deeplab train` runs it (the shipped loader, train step,
  logging, no validation);
- peer: smp DeepLabV3Plus in torchvision's reference loop (`peer_smp.py`) over a
  DataLoader of torchvision's reference transforms, `loss.item()` every step as that
  loop does.

Reported: images/s after the warm-up steps, and on a GPU the share of the wall time the
GPU was busy (nvidia-smi's utilisation, sampled every 100 ms; needs nvidia-smi).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402
from peer_smp import build_peer, peer_optimizer, peer_train_transforms  # noqa: E402

from segment_deeplab.config import Config  # noqa: E402
from segment_deeplab.data.dataset import SegmentationFolder  # noqa: E402
from segment_deeplab.data.spec import open_dataset  # noqa: E402
from segment_deeplab.train.loop import fit  # noqa: E402


class GpuBusy:
    """Mean GPU utilisation (%) while the block runs, from nvidia-smi; None without it."""

    def __init__(self, device: torch.device) -> None:
        self.on = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []
        self._stop = threading.Event()

    def _poll(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(cmd, capture_output=True, text=True).stdout.split()
            if out:
                self.samples.append(float(out[0]))
            self._stop.wait(0.1)

    def __enter__(self) -> GpuBusy:
        if self.on:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.on:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def run_project(args, spec, device: torch.device) -> dict:
    cfg = Config()
    m, d, t = cfg.model, cfg.data, cfg.train
    m.model_variant, m.num_classes = args.variant, spec.num_classes
    d.crop_size, d.batch_size, d.workers = [args.crop, args.crop], args.batch, args.workers
    t.steps, t.amp, t.log_every = args.warmup + args.steps, args.amp, args.warmup
    t.val_every = t.checkpoint_every = 10**9
    out = Path(tempfile.mkdtemp(prefix="e2e-project-"))
    with GpuBusy(device) as busy:
        fit(cfg, spec, out / "run", device=str(device), progress=False)
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "images_per_s" in r]
    # The first window holds the warm-up (compile of kernels, worker start).
    rate = windows[-1]["images_per_s"] if len(windows) > 1 else windows[0]["images_per_s"]
    return {"images_per_s": rate, "gpu_busy": busy.mean}


def run_peer(args, spec, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_peer(args.variant, spec.num_classes).to(device, memory_format=torch.channels_last)
    optimizer = peer_optimizer(model)
    base = max(args.crop, 360)
    data = SegmentationFolder(
        spec, "train", transform=peer_train_transforms(base, args.crop, (0.5, 2.0))
    )
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    )  # fmt: skip
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    amp = torch.bfloat16 if args.amp == "bf16" else None
    step, start = 0, None
    model.train()
    with GpuBusy(device) as busy:
        while step < args.warmup + args.steps:
            for images, masks in loader:
                if step == args.warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                x = (images.to(device, non_blocking=True).float() - mean) / std
                x = x.contiguous(memory_format=torch.channels_last)
                y = masks.to(device, non_blocking=True).long()
                with torch.autocast(device.type, amp or torch.float32, enabled=amp is not None):
                    out = model(x)
                loss = torch.nn.functional.cross_entropy(out.float(), y, ignore_index=255)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss.item()  # the reference loop logs every step
                step += 1
                if step == args.warmup + args.steps:
                    break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images_per_s": args.steps * args.batch / seconds, "gpu_busy": busy.mean}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", default="resnet_50")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=60, help="timed steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--amp", choices=["bf16", "off"], default="bf16")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    spec = open_dataset(args.data)
    device = torch.device(args.device)
    peer = run_peer(args, spec, device)
    project = run_project(args, spec, device)
    ratio = project["images_per_s"] / peer["images_per_s"]

    def busy(r):
        return "n/a" if r["gpu_busy"] is None else f"{r['gpu_busy']:.0f}%"

    text = (
        f"{machine()}\n\n{args.variant}, crop {args.crop}, batch {args.batch}, {args.amp}, "
        f"channels_last, {args.workers} loader workers, {args.steps} timed steps after "
        f"{args.warmup}\n\n| contender | img/s | x peer | GPU busy |\n|---|---:|---:|---:|\n"
        f"| peer: smp DeepLabV3Plus + torchvision ref. loop | {peer['images_per_s']:.1f} | 1.00 "
        f"| {busy(peer)} |\n"
        f"| segment-deeplab `fit()` | {project['images_per_s']:.1f} | {ratio:.2f} "
        f"| {busy(project)} |"
    )
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"peer": peer, "project": project}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
