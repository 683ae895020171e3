"""Peak memory and time of `predict_large` on GeoTIFFs of growing size, each in a fresh process.

    python bench/large_images.py --sizes 10000 40000 [--classes 21] [--window 1024] [--compare]

For each size N, an N x N RGB GeoTIFF (256 x 256 deflate tiles, georeferencing tags) is
written tile by tile (never whole in memory) into --workdir, and a child process runs
`predict_large` on it with a tiny model: DeepLabV3+ mobilenet_v3_small, 16-channel ASPP
and decoder, random weights, --classes classes, fp32 on the CPU, window 1024 with 1/3
overlap (`deeplab predict`'s AUTO_WINDOW). Peak RSS is the child's VmHWM: the
interpreter, torch and the model count too. `--compare` also runs, in its own child,
what `predict` does with an image that fits in memory: the decoded image through
`predict_probs` with the same window, whose probabilities are held whole.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

GEO = [  # UTM 33N, 0.5 m pixels
    (33550, 12, 3, (0.5, 0.5, 0.0), True),
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 5400000.0, 0.0), True),
    (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True),
]
MODEL = "DeepLabV3+ mobilenet_v3_small, ASPP/decoder 16 channels, random weights"


def tiny_checkpoint(folder: Path, num_classes: int) -> Path:
    """best.pt of the tiny model, as training would save it."""
    from segment_deeplab.checkpoint import FORMAT
    from segment_deeplab.checkpoint import save as save_checkpoint
    from segment_deeplab.classes import placeholder_classes, to_dicts
    from segment_deeplab.config import Config, ModelConfig
    from segment_deeplab.models import build_model

    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(
            model_variant="mobilenet_v3_small", num_classes=num_classes, aspp_channels=16,
            decoder_channels=16, low_level_channels=8,
        )
    )  # fmt: skip
    model = build_model(cfg.model)
    torch.nn.init.normal_(model.classifier.weight, std=2.0)  # clear argmaxes, many classes
    ckpt = {
        "format": FORMAT, "model": model.state_dict(), "config": cfg.to_dict(),
        "classes": to_dicts(placeholder_classes(list(range(num_classes)))),
        "ignore_index": 255, "dataset_hash": None, "step": 0,
    }  # fmt: skip
    save_checkpoint(ckpt, folder / "best.pt")
    return folder / "best.pt"


def write_geotiff(path: Path, size: int) -> None:
    """An N x N tiled GeoTIFF, tile by tile: gradients plus a repeated noise pattern."""
    import tifffile

    noise = np.random.default_rng(0).integers(0, 64, (256, 256, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:256, 0:256]

    def tiles():
        for y in range(0, size, 256):
            for x in range(0, size, 256):
                r, g = (x + xx) * 191 // size, (y + yy) * 191 // size
                t = np.stack([r, g, (r + g) // 2], -1).astype(np.uint8) + noise
                yield t[: min(256, size - y), : min(256, size - x)]

    with tifffile.TiffWriter(path, bigtiff=size * size * 3 > 2**31) as tif:
        tif.write(
            tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(256, 256),
            compression="zlib", compressionargs={"level": 1}, photometric="rgb", extratags=GEO,
        )  # fmt: skip


def child(how: str, ckpt: str, src: str, out: str, window: int, threads: int) -> None:
    """Predict `src` one way; print peak RSS (MiB), seconds and windows as JSON."""
    from segment_deeplab.infer.tta import TTA

    torch.set_num_threads(threads)
    tta, start = TTA(window=window), time.perf_counter()
    if how == "large":
        from segment_deeplab.infer.large import run_predict_large

        res = run_predict_large(ckpt, src, out, device="cpu", amp="off", tta=tta, progress=False)
        windows = res.windows
    else:  # the whole image in memory, as `predict` holds it
        import tifffile

        from segment_deeplab.checkpoint import load_any
        from segment_deeplab.infer.fold import for_inference
        from segment_deeplab.infer.tta import predict_probs

        model = for_inference(load_any(ckpt).model, torch.device("cpu"))
        image = torch.from_numpy(tifffile.imread(src)).permute(2, 0, 1)
        _ = predict_probs(model, image, tta).max(1).indices
        windows = 0
    seconds = time.perf_counter() - start
    print(json.dumps({"rss": peak_rss_mib(), "seconds": seconds, "windows": windows}))


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss would
    start from the parent's size at the fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(how: str, ckpt: Path, src: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", how, str(ckpt), str(src), str(out)]
    cmd += ["--window", str(args.window), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000])
    p.add_argument("--classes", type=int, default=21, help="model classes (VOC: 21)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compare", action="store_true", help="also predict_probs, image whole")
    p.add_argument("--workdir", help="where the GeoTIFFs go (default: a temporary folder)")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument(
        "--child", nargs=4, metavar=("HOW", "CKPT", "SRC", "OUT"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.child:
        child(*args.child, args.window, args.threads)
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="large-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = tiny_checkpoint(work, args.classes)
    rows, numbers = [], []
    for size in args.sizes:
        src = work / f"{size}.tif"
        t = time.perf_counter()
        write_geotiff(src, size)
        made = time.perf_counter() - t
        cases = ["large", "whole"] if args.compare else ["large"]
        for how in cases:
            r = measure(how, ckpt, src, work / f"{size}_{how}_mask.tif", args)
            numbers.append({"size": size, "how": how, "input_s": made, **r})
            probs_gib = args.classes * size * size * 4 / 2**30
            name = "`predict_large`" if how == "large" else "`predict_probs`, image whole"
            if "error" in r:
                rows.append(
                    f"| {size} x {size} | {name} | failed: {r['error']} | | | {probs_gib:.1f} |"
                )
                continue
            mpx = size * size / r["seconds"] / 1e6
            rows.append(
                f"| {size} x {size} | {name} | {r['seconds']:.0f} | {mpx:.2f} | {r['rss']:.0f} "
                f"| {probs_gib:.1f} |"
            )
        src.unlink()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        machine(),
        "",
        f"Model: {MODEL}, {args.classes} classes; fp32, window {args.window}, overlap 1/3.",
        "",
        "| image | how | time (s) | Mpx/s | peak RSS (MiB) | full probabilities (GiB) |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
