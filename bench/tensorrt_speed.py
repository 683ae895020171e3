"""A TensorRT fp16 engine against PyTorch and ONNX Runtime on the GPU, same network.

    python bench/tensorrt_speed.py [--variant resnet_50] [--batch 8] [--size 512] [--rounds 5]

One checkpoint (random weights: speed does not depend on them) of the project's
DeepLabV3+ goes through `deeplab export --format tensorrt` (built and parity-checked
against the fp32 model on the GPU); then, on the same input batch, alternating rounds
time the forward pass of: PyTorch fp32, PyTorch under bf16 autocast (channels_last),
ONNX Runtime's CUDA provider when onnxruntime-gpu is installed, and the engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, random_checkpoint  # noqa: E402

from segment_deeplab.checkpoint import load_any, load_model  # noqa: E402
from segment_deeplab.config import Config  # noqa: E402
from segment_deeplab.export.write import export  # noqa: E402
from segment_deeplab.infer.fold import for_inference  # noqa: E402

NUM_CLASSES = 19


def _checkpoint(variant: str, folder: Path) -> Path:
    cfg = Config()
    cfg.model.model_variant, cfg.model.num_classes = variant, NUM_CLASSES
    return random_checkpoint(cfg, folder / "model.pt")


def _timed(fn, x: torch.Tensor, steps: int) -> float:
    """Images per second of `fn(x)` over `steps` calls, the GPU synchronised."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn(x)
    torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="resnet_50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="forward passes per round")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the TensorRT comparison needs one; skipped")
        return 0
    if importlib.util.find_spec("tensorrt") is None:
        print("tensorrt is not installed (pip install 'segment-deeplab[tensorrt]'); skipped")
        return 0
    work = Path(tempfile.mkdtemp(prefix="tensorrt-speed-"))
    ckpt = _checkpoint(args.variant, work)
    start = time.perf_counter()
    result = export(ckpt, work / "model.engine", max_batch=args.batch, max_side=args.size)
    built = time.perf_counter() - start
    print(f"engine built in {built:.0f} s; {result.parity.summary()}", file=sys.stderr)
    if result.path is None:
        return 1
    cuda = torch.device("cuda")
    model = for_inference(load_model(ckpt)[0], cuda)
    x = torch.rand(args.batch, 3, args.size, args.size, device=cuda)
    xl = x.contiguous(memory_format=torch.channels_last)

    def fp32(t):
        with torch.inference_mode():
            return model(t)

    def bf16(t):
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            return model(t)

    contenders = {
        "PyTorch fp32": (fp32, xl),
        "PyTorch bf16 autocast, channels_last": (bf16, xl),
        "TensorRT fp16 engine": (load_any(result.path, cuda).model, x),
    }
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            onnx_path = work / "model.onnx"
            export(ckpt, onnx_path)
            contenders["ONNX Runtime CUDA (fp32)"] = (load_any(onnx_path, cuda).model, x)
    except ImportError:
        pass
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    for fn, inp in contenders.values():
        _timed(fn, inp, 3)  # warm-up: cuDNN autotuning, engine context memory
    for _ in range(args.rounds):
        for name, (fn, inp) in contenders.items():
            rates[name].append(_timed(fn, inp, args.steps))
    base = statistics.median(rates["PyTorch fp32"])
    lines = [
        f"{torch.cuda.get_device_name()}; {machine()}",
        "",
        f"{args.variant} DeepLabV3+, batch {args.batch}, {args.size}x{args.size}, median of "
        f"{args.rounds} alternating rounds of {args.steps} forward passes",
        result.parity.summary(),
        "",
        "| contender | img/s | x PyTorch fp32 |",
        "|---|---:|---:|",
    ]
    for name, r in rates.items():
        lines.append(f"| {name} | {statistics.median(r):.1f} | {statistics.median(r) / base:.2f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
