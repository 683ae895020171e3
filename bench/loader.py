"""Input pipeline: images/s the training loader delivers against images/s training eats.

    python bench/loader.py --data CAMVID_PREPARED/dataset.yaml [--config configs/X.yaml]

The loader is built as `fit()` builds it (SegmentationFolder -> decode -> random scale,
pad, crop, flip on uint8 tensors -> collate; seeded batches), for 0, 1 and 2 worker
processes. Consumption is the recipe's train step on batches already in memory. Last,
a real loop of loader + train step reports the share of time spent waiting for data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from segment_deeplab.config import load_config  # noqa: E402
from segment_deeplab.data.dataset import build_loader  # noqa: E402
from segment_deeplab.data.spec import open_dataset  # noqa: E402
from segment_deeplab.losses import build_loss  # noqa: E402
from segment_deeplab.models import build_model  # noqa: E402
from segment_deeplab.train import schedule  # noqa: E402
from segment_deeplab.train.loop import train_step  # noqa: E402
from segment_deeplab.train.setup import build_optimizer  # noqa: E402


def make_loader(cfg, spec, workers: int) -> torch.utils.data.DataLoader:
    """The loader `fit()` trains from (`build_loader` with its resumable sampler)."""
    cfg.data.workers = workers
    sampler = schedule.EpochBatchSampler(
        len(spec.read_split("train")), cfg.data.batch_size, cfg.train.seed
    )
    return build_loader(spec, "train", cfg.data, True, device="cpu", batch_sampler=sampler)


def delivered(cfg, spec, workers: int, batches: int) -> float:
    """Images/s out of the loader, after its first batch (worker start-up excluded)."""
    it = iter(make_loader(cfg, spec, workers))
    next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        images, _ = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - start)


class Trainer:
    def __init__(self, cfg, spec) -> None:
        cfg.model.num_classes = spec.num_classes
        self.model = build_model(cfg.model).to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.loss_fn = build_loss(
            cfg.train, spec.num_classes, spec.ignore_index, spec.stats.get("class_pixels")
        )

    def step(self, images, masks) -> None:
        train_step(
            self.model, images, masks, self.loss_fn, self.optimizer, None, None,
            torch.device("cpu"), True, False,
        )  # fmt: skip


def consumed(trainer: Trainer, batch, steps: int) -> float:
    """Images/s of training on one batch held in memory."""
    trainer.step(*batch)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(*batch)
    return steps * batch[0].shape[0] / (time.perf_counter() - start)


def wait_share(trainer: Trainer, cfg, spec, workers: int, steps: int) -> float:
    """Fraction of a real loader + train loop spent waiting in `next(loader)`."""
    it = iter(make_loader(cfg, spec, workers))
    trainer.step(*next(it))
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - t
        trainer.step(*batch)
    return waited / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset.yaml")
    p.add_argument("--config", default="configs/deeplabv3plus_resnet18_camvid_256.yaml")
    p.add_argument("--batches", type=int, default=12, help="batches per loader measurement")
    p.add_argument("--steps", type=int, default=6, help="train steps per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    spec = open_dataset(args.data)
    trainer = Trainer(cfg, spec)
    batch = next(iter(make_loader(cfg, spec, 0)))
    eat = consumed(trainer, batch, args.steps)
    rows = [{"workers": w, "img_s": delivered(cfg, spec, w, args.batches)} for w in args.workers]
    share = {w: wait_share(trainer, cfg, spec, w, args.steps) for w in (0, 2)}
    crop = "x".join(map(str, cfg.data.crop_size))
    lines = [
        f"{machine()}",
        "",
        f"Recipe {Path(args.config).name}: crop {crop}, scale {cfg.data.scale_range}, "
        f"batch {cfg.data.batch_size}. Training consumes **{eat:.1f} img/s**.",
        "",
        "| loader workers | delivered img/s | x training's need |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['workers']} | {r['img_s']:.1f} | {r['img_s'] / eat:.1f} |" for r in rows]
    lines += [
        "",
        "Share of a real loader + train loop spent waiting for data: "
        + ", ".join(f"{100 * s:.1f}% with {w} workers" for w, s in share.items()),
    ]
    text = "\n".join(lines)
    print(text)
    if args.json:
        out = {"consumed_img_s": eat, "delivered": rows, "wait_share": share}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
