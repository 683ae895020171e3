"""Training and inference images/s of DeepLabV3+ against smp's, alternating in one process.

    python bench/throughput.py                        # resnet_18 and resnet_50, 512x512, CPU
    python bench/throughput.py --device cuda --amp bf16 --compile

Each round times a few steps of every contender in turn, so a machine that slows down
midway slows all of them alike; the table reports the median over rounds and the
ratio project / peer. Contenders for each backbone:

- peer: smp DeepLabV3Plus (defaults) in torchvision's reference step (`peer_smp.py`),
  fp32 and contiguous as that loop runs on a CPU; on CPUs where the project trains in
  bf16 (AMX), also the peer with channels_last + bf16 autocast added by hand.
- project: `build_model` + the project's own train step (`train/loop.py::train_step`,
  uint8 in, channels_last as `train.channels_last` decides it (not for fp32 on a CPU),
  foreach SGD, `train.amp=auto`), with the head matched to
  smp's (separable ASPP and decoder convs), the same in fp32, and at TF DeepLab's
  defaults (full 3x3 convs, about twice the peer's decoder FLOPs).

Inference is one batch under `torch.inference_mode`: the peer's plain `model(x)`; the
project's `predict_probs` (uint8 in, softmax out) with the model prepared as
`inference.prepare_model` does for `deeplab eval/predict` (channels_last, batch norm
folded into the convolutions, bf16 autocast where the CPU has AMX), and the same without
the folding.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gflops, machine  # noqa: E402
from peer_smp import build_peer, normalize_batch, peer_optimizer, peer_train_step  # noqa: E402

from segment_deeplab.config import Config  # noqa: E402
from segment_deeplab.device import autocast_dtype, channels_last_pays  # noqa: E402
from segment_deeplab.infer.fold import for_inference  # noqa: E402
from segment_deeplab.infer.tta import predict_probs  # noqa: E402
from segment_deeplab.losses import build_loss  # noqa: E402
from segment_deeplab.models import build_model  # noqa: E402
from segment_deeplab.train.loop import train_step  # noqa: E402
from segment_deeplab.train.setup import build_optimizer  # noqa: E402

NUM_CLASSES = 11


class Contender:
    """One model with a train step and inference steps on fixed random batches.

    Args:
        kind: "peer" (smp + torchvision reference step) or "project".
        head: "smp", "matched" (project, separable head as smp's) or "default" (project,
            TF DeepLab's full 3x3 convs).
        amp: training autocast dtype (None: fp32).
        tuned: peer only: channels_last and `amp` applied by hand.
        infer: time inference for this contender.
    """

    def __init__(self, kind, variant, head, args, amp=None, tuned=False, infer=True) -> None:
        self.kind, self.variant, self.head = kind, variant, head
        self.amp, self.tuned, self.infer = amp, tuned, infer
        self.compile = args.compile
        self.device = torch.device(args.device)
        b, s = args.batch, args.size
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
        self.masks = torch.randint(0, NUM_CLASSES, (b, s, s), generator=g)
        self.masks[:, :8] = 255  # some ignored pixels, as real masks have
        self.images, self.masks = self.images.to(self.device), self.masks.to(self.device)
        if kind == "peer":
            self._build_peer()
        else:
            self._build_project()
        with torch.inference_mode():
            self.gflops = gflops(self.model.eval(), self._infer_input())
        self.model.train()
        self.compiled = torch.compile(self.model) if args.compile else self.model

    def _build_peer(self) -> None:
        self.model = build_peer(self.variant, NUM_CLASSES).to(self.device)
        self.optimizer = peer_optimizer(self.model)
        self.x = normalize_batch(self.images.cpu()).to(self.device)
        if self.tuned:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)

    def _build_project(self) -> None:
        cfg = Config()
        cfg.model.model_variant, cfg.model.num_classes = self.variant, NUM_CLASSES
        cfg.model.separable = True if self.head == "matched" else None
        if self.head == "matched":  # smp's decoder: one separable 3x3 conv, not TF's two
            cfg.model.decoder_convs = 1
        # As fit() builds it: channels_last where `device.channels_last_pays` (GPUs, CPU
        # autocast), contiguous for fp32 on a CPU (train.channels_last=None).
        self.channels_last = channels_last_pays(self.device, self.amp)
        self.model = build_model(cfg.model).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.loss_fn = build_loss(cfg.train, NUM_CLASSES, 255, None, self.device)
        # Inference as `deeplab predict/eval` lays the model out (channels_last).
        shipped = for_inference(copy.deepcopy(self.model), self.device)
        self.shipped = torch.compile(shipped) if self.compile else shipped

    def _infer_input(self) -> torch.Tensor:
        return self.x if self.kind == "peer" else self.images.float() / 255

    def _autocast(self):
        return torch.autocast(self.device.type, self.amp or torch.float32, self.amp is not None)

    def train_step(self) -> None:
        if self.kind == "peer":
            with self._autocast():
                peer_train_step(self.compiled, self.x, self.masks, self.optimizer)
            return
        train_step(
            self.compiled, self.images, self.masks, self.loss_fn, self.optimizer, None,
            self.amp, self.device, self.channels_last, False,
        )  # fmt: skip

    def infer_step(self) -> None:
        """The peer's `model(x)`; the project's `predict_probs` with the model laid out as
        `fold.for_inference` lays it out, in the contender's precision."""
        model = self.compiled.eval()
        if self.kind == "peer":
            with torch.inference_mode(), self._autocast():
                model(self.x).float()
        else:
            predict_probs(self.shipped, self.images, dtype=self.amp)
        self.compiled.train()

    def infer_proposed(self) -> None:
        """Project inference without batch norm folding: the trained model as it is,
        channels_last, bf16 autocast where `device.autocast_dtype("auto")` picks it."""
        model = self.compiled.eval()
        predict_probs(model, self.images, dtype=autocast_dtype("auto", self.device))
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


def contenders(variant: str, args: argparse.Namespace) -> list[Contender]:
    """The peer first (the ratios' denominator), then the rest."""
    if args.device == "cpu":
        auto = autocast_dtype(args.amp, torch.device("cpu"))  # the project's default
        out = [Contender("peer", variant, "smp", args)]
        if auto is not None:  # the peer with the same speed settings, applied by hand
            out.append(Contender("peer", variant, "smp", args, amp=auto, tuned=True))
        out.append(Contender("project", variant, "matched", args, amp=auto))
        if auto is not None and not args.quick:
            out.append(Contender("project", variant, "matched", args, amp=None, infer=False))
        if not args.quick:
            out.append(Contender("project", variant, "default", args, amp=auto))
        return out
    amp = torch.bfloat16 if args.amp == "bf16" else None  # GPU: same settings for all
    out = [Contender("peer", variant, "smp", args, amp=amp, tuned=True)]
    out.append(Contender("project", variant, "matched", args, amp=amp))
    if not args.quick:
        out.append(Contender("project", variant, "default", args, amp=amp))
    return out


def label(c: Contender) -> str:
    amp = "bf16 autocast" if c.amp is not None else "fp32"
    if c.kind == "peer":
        if c.tuned:
            return f"smp DeepLabV3Plus, torchvision ref. loop + channels_last, {amp}"
        return f"smp DeepLabV3Plus, torchvision ref. loop ({amp})"
    head = (
        "head as smp's (separable, one decoder conv)"
        if c.head == "matched"
        else "TF DeepLab head (full 3x3)"
    )
    return f"segment-deeplab, {head}, {amp}"


def bench_backbone(variant: str, args: argparse.Namespace) -> list[dict]:
    group = contenders(variant, args)
    kinds = ("train", "infer", "proposed")
    for c in group:  # warm-up: allocator, oneDNN primitives, compile
        for _ in range(args.warmup):
            c.train_step()
            if c.infer:
                c.infer_step()
                if c.kind == "project":
                    c.infer_proposed()
    times = {id(c): {k: [] for k in kinds} for c in group}
    for r in range(args.rounds):
        for c in group:
            t = times[id(c)]
            t["train"].append(_timed(c, c.train_step, args.steps))
            if c.infer:
                t["infer"].append(_timed(c, c.infer_step, args.steps))
                if c.kind == "project":
                    t["proposed"].append(_timed(c, c.infer_proposed, args.steps))
        print(f"{variant}: round {r + 1}/{args.rounds}", file=sys.stderr)
    peer = times[id(group[0])]

    def ratio(mine: list[float], base: list[float]) -> float | None:
        # Per round (measured back to back), then the median over rounds.
        if not mine:
            return None
        return statistics.median(b / m for b, m in zip(base, mine, strict=True))

    def rate(ts: list[float]) -> float | None:
        return args.batch / statistics.median(ts) if ts else None

    rows = []
    for c in group:
        t = times[id(c)]
        rows.append(
            {
                "backbone": variant,
                "contender": label(c),
                "gflops": round(c.gflops, 1),
                **{f"{k}_img_s": rate(t[k]) for k in kinds},
                "train_ratio": ratio(t["train"], peer["train"]),
                "infer_ratio": ratio(t["infer"], peer["infer"]),
                "proposed_ratio": ratio(t["proposed"], peer["infer"]),
                "seconds": t,
            }
        )
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    extra = ", compile" if args.compile else ""
    head = (
        f"DeepLabV3+ OS 16, {args.size}x{args.size}, batch {args.batch}, {args.device}{extra}; "
        f"median of {args.rounds} alternating rounds of {args.steps} step(s); x peer = "
        "median of the per-round ratios to the first row\n\n"
        "| backbone | contender | GFLOPs/img | train img/s | x peer | infer img/s | x peer "
        "| infer img/s, batch norm not folded | x peer |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )

    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    lines = [
        f"| {r['backbone']} | {r['contender']} | {r['gflops']:.1f} | {f(r['train_img_s'])} "
        f"| {f(r['train_ratio'])} | {f(r['infer_img_s'])} | {f(r['infer_ratio'])} "
        f"| {f(r['proposed_img_s'])} | {f(r['proposed_ratio'])} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet_18", "resnet_50"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--amp",
        choices=["auto", "off", "bf16"],
        default="auto",
        help="CPU: the project's train.amp (auto: bf16 on CPUs with AMX); GPU: for all",
    )
    p.add_argument("--quick", action="store_true", help="peer and matched head only")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="steps per contender per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--malloc",
        choices=["system", "keep"],
        default="system",
        help="keep: glibc keeps freed memory for every contender, as `deeplab train` on a "
        "CPU has it (train.keep_cpu_memory); system: glibc's defaults, as the peer runs",
    )
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.malloc == "keep":
        from segment_deeplab.device import keep_freed_memory

        if not keep_freed_memory():
            p.error("--malloc keep needs glibc (Linux)")
    torch.manual_seed(0)
    rows = []
    for v in args.backbones:
        rows += bench_backbone(v, args)
        print(markdown(rows, args), file=sys.stderr, flush=True)  # partial results
    text = f"{machine()}; allocator: {args.malloc}\n\n{markdown(rows, args)}"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
