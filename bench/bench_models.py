"""Parameter count and inference throughput of every model variant.

    python bench/bench_models.py                     # all variants, 513x513, CPU
    python bench/bench_models.py --variants resnet_18 mobilenet_v2 --json

Batch 1, eval mode, torch.inference_mode, DeepLabV3+ at TF DeepLab's defaults
(output stride 16, decoder stride 4, 256 channels, 21 classes). Each variant is timed
with contiguous and channels_last tensors; the table shows both.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from segment_deeplab.config import ModelConfig
from segment_deeplab.models import VARIANTS, build_model


def images_per_second(
    model: torch.nn.Module, x: torch.Tensor, warmup: int, iters: int, min_time: float
) -> float:
    """Images/s over at least `iters` calls and `min_time` seconds, after warm-up."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while n < iters or time.perf_counter() - start < min_time:
            model(x)
            n += 1
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return n * x.shape[0] / (time.perf_counter() - start)


def bench_variant(variant: str, args: argparse.Namespace) -> dict:
    cfg = ModelConfig(model_variant=variant, num_classes=args.num_classes, output_stride=args.os)
    model = build_model(cfg).eval().to(args.device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 3, args.size, args.size, device=args.device)
    row = {"variant": variant, "timm": model.timm_name, "params_m": round(params / 1e6, 2)}
    row["contiguous"] = images_per_second(model, x, args.warmup, args.iters, args.min_time)
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    row["channels_last"] = images_per_second(model, x, args.warmup, args.iters, args.min_time)
    return row


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"DeepLabV3+ (OS {args.os}, decoder OS 4), {args.size}x{args.size}, batch 1, "
        f"{args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}\n\n"
        "| variant | timm model | params (M) | img/s contiguous | img/s channels_last |\n"
        "|---|---|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        best = "contiguous" if r["contiguous"] >= r["channels_last"] else "channels_last"
        cells = {k: f"{r[k]:.2f}" for k in ("contiguous", "channels_last")}
        cells[best] = f"**{cells[best]}**"
        lines.append(
            f"| {r['variant']} | {r['timm']} | {r['params_m']:.1f} | "
            f"{cells['contiguous']} | {cells['channels_last']} |"
        )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="default: all")
    p.add_argument("--size", type=int, default=513)
    p.add_argument("--os", type=int, default=16, help="output stride")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--min-time", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for variant in args.variants:
        rows.append(bench_variant(variant, args))
        print(f"{variant}: done", file=sys.stderr)
    if args.json:
        meta = {
            "size": args.size,
            "os": args.os,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        }
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
