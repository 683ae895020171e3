"""Training and inference images/s of DeepLabV3+ against smp's, alternating in one process.

    python bench/throughput.py                        # resnet_18 and resnet_50, 512x512, CPU
    python bench/throughput.py --device cuda --amp bf16 --compile

Each round times a few steps of every contender in turn, so a machine that slows down
midway slows all of them alike; the table reports the median over rounds and the
ratio project / peer. Contenders for each backbone:

- peer: smp DeepLabV3Plus (defaults) in torchvision's reference step (`peer_smp.py`).
- project: `build_model` + the project's own train step (`engine/train.py::_train_step`,
  uint8 in, channels_last, foreach SGD), once with the head matched to smp's
  (separable ASPP and decoder convs) and once at TF DeepLab's defaults (full 3x3 convs,
  about twice the peer's decoder FLOPs).

Inference is a forward pass under `torch.inference_mode` on a batch: the project's
`predict_probs` path (uint8 in, softmax out), the peer's plain `model(x)`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_info, gflops, machine  # noqa: E402
from peer_smp import build_peer, normalize_batch, peer_optimizer, peer_train_step  # noqa: E402

from segment_deeplab.config import Config  # noqa: E402
from segment_deeplab.engine.inference import predict_probs  # noqa: E402
from segment_deeplab.engine.runstate import build_optimizer  # noqa: E402
from segment_deeplab.engine.train import _train_step  # noqa: E402
from segment_deeplab.losses import build_loss  # noqa: E402
from segment_deeplab.models import build_model  # noqa: E402

NUM_CLASSES = 11


class Contender:
    """One model with a train step and an inference step on fixed random batches."""

    def __init__(self, name: str, variant: str, args: argparse.Namespace, head: str) -> None:
        self.name, self.variant, self.head = name, variant, head
        self.device = torch.device(args.device)
        b, s = args.batch, args.size
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
        self.masks = torch.randint(0, NUM_CLASSES, (b, s, s), generator=g)
        self.masks[:, :8] = 255  # some ignored pixels, as real masks have
        self.images, self.masks = self.images.to(self.device), self.masks.to(self.device)
        self.amp = torch.bfloat16 if args.amp == "bf16" else None
        if name == "peer":
            self._build_peer(args)
        else:
            self._build_project(args)
        self.gflops = gflops(self.model.eval(), self._infer_input())
        self.model.train()
        if args.compile:
            self.compiled = torch.compile(self.model)
        else:
            self.compiled = self.model

    def _build_peer(self, args: argparse.Namespace) -> None:
        self.model = build_peer(self.variant, NUM_CLASSES).to(self.device)
        if args.device != "cpu":  # the GPU row gives the peer the same speed settings
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = peer_optimizer(self.model)
        self.x = normalize_batch(self.images.cpu()).to(self.device)
        if args.device != "cpu":
            self.x = self.x.contiguous(memory_format=torch.channels_last)

    def _build_project(self, args: argparse.Namespace) -> None:
        cfg = Config()
        cfg.model.model_variant, cfg.model.num_classes = self.variant, NUM_CLASSES
        cfg.model.separable = True if self.head == "matched" else None
        self.model = build_model(cfg.model).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.loss_fn = build_loss(cfg.train, NUM_CLASSES, 255, None, self.device)
        self.info = cpu_info()
        self.info.device = self.device

    def _infer_input(self) -> torch.Tensor:
        return self.x if self.name == "peer" else self.images.float() / 255

    def train_step(self) -> None:
        if self.name == "peer":
            with torch.autocast(self.device.type, self.amp or torch.float32, self.amp is not None):
                peer_train_step(self.compiled, self.x, self.masks, self.optimizer)
            return
        _train_step(
            self.compiled, self.images, self.masks, self.loss_fn, self.optimizer, None,
            self.amp, self.info, True, False,
        )  # fmt: skip

    def infer_step(self) -> None:
        model = self.compiled.eval()
        with torch.autocast(self.device.type, self.amp or torch.float32, self.amp is not None):
            if self.name == "peer":
                with torch.inference_mode():
                    model(self.x).float()
            else:
                predict_probs(model, self.images)
        self.compiled.train()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _timed(c: Contender, fn, steps: int) -> float:
    import time

    c.sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    c.sync()
    return (time.perf_counter() - start) / steps


def bench_backbone(variant: str, args: argparse.Namespace) -> list[dict]:
    heads = ["matched", "default"] if not args.matched_only else ["matched"]
    contenders = [Contender("peer", variant, args, "smp")]
    contenders += [Contender("project", variant, args, h) for h in heads]
    for c in contenders:  # warm-up: allocator, oneDNN primitives, compile
        for _ in range(args.warmup):
            c.train_step()
            c.infer_step()
    times = {id(c): {"train": [], "infer": []} for c in contenders}
    for r in range(args.rounds):
        for c in contenders:
            times[id(c)]["train"].append(_timed(c, c.train_step, args.steps))
            times[id(c)]["infer"].append(_timed(c, c.infer_step, args.steps))
        print(f"{variant}: round {r + 1}/{args.rounds}", file=sys.stderr)
    rows = []
    peer = times[id(contenders[0])]
    for c in contenders:
        t = times[id(c)]
        # Ratio per round (both measured back to back), then the median of the ratios.
        tr = statistics.median(p / m for p, m in zip(peer["train"], t["train"], strict=True))
        ir = statistics.median(p / m for p, m in zip(peer["infer"], t["infer"], strict=True))
        rows.append(
            {
                "backbone": variant,
                "contender": c.name,
                "head": c.head,
                "gflops": round(c.gflops, 1),
                "train_img_s": args.batch / statistics.median(t["train"]),
                "infer_img_s": args.batch / statistics.median(t["infer"]),
                "train_ratio": tr,
                "infer_ratio": ir,
                "train_s": t["train"],
                "infer_s": t["infer"],
            }
        )
    return rows


LABELS = {
    "smp": "smp DeepLabV3Plus + torchvision ref. loop",
    "matched": "segment-deeplab, head as smp's (separable)",
    "default": "segment-deeplab, TF DeepLab head (full 3x3)",
}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    extra = ", ".join(
        x for x in (args.amp if args.amp != "off" else "", "compile" if args.compile else "") if x
    )
    head = (
        f"DeepLabV3+ OS 16, {args.size}x{args.size}, batch {args.batch}, {args.device}"
        f"{' (' + extra + ')' if extra else ''}; median of {args.rounds} alternating rounds "
        f"of {args.steps} steps\n\n"
        "| backbone | contender | GFLOPs/img | train img/s | x peer | infer img/s | x peer |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['backbone']} | {LABELS[r['head']]} | {r['gflops']:.1f} | {r['train_img_s']:.2f} "
        f"| {r['train_ratio']:.2f} | {r['infer_img_s']:.2f} | {r['infer_ratio']:.2f} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet_18", "resnet_50"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["off", "bf16"], default="off")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="steps per contender per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matched-only", action="store_true", help="skip the TF-default head")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for v in args.backbones:
        rows += bench_backbone(v, args)
        print(markdown(rows, args), file=sys.stderr, flush=True)  # partial results
    text = f"{machine()}\n\n{markdown(rows, args)}"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
