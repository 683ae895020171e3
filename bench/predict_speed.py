"""`deeplab predict` end to end on a plain CPU, per engine, against the peer's forward pass.

    python bench/predict_speed.py --images-dir CAMVID/images [--count 24] [--rounds 3]

On the same images (CamVid frames, 480x360), in alternating rounds:

- peer: smp DeepLabV3Plus (resnet18, its defaults: output stride 16, 256 channels),
  eager fp32 `model(x)` on images already decoded and normalised in memory (padded to
  368x480, as smp needs a multiple of 16): the forward pass alone, no decode, no write;
- the project's `predict()` as `deeplab predict` runs it (decode, forward, mask PNG and
  overlay JPEG written), fp32, for each engine: PyTorch, onnxruntime, OpenVINO, and
  `auto` (what `deeplab predict` picks on this machine). Two models:
  * "same network": the project's DeepLabV3+ with smp's head (output stride 16,
    separable 256-channel ASPP and decoder): the comparison of the code;
  * "recipe": the CPU recipe's model (`configs/deeplabv3plus_resnet18_camvid_256.yaml`,
    the default of `deeplab train` on a CPU): the comparison of the defaults.

Weights are random (speed does not depend on them); conversions are made before the
timed rounds (they are cached per model and machine, as `deeplab predict` caches them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, random_checkpoint  # noqa: E402
from peer_smp import build_peer, normalize_batch  # noqa: E402

from segment_deeplab.checkpoint import load_model  # noqa: E402
from segment_deeplab.classes import placeholder_classes  # noqa: E402
from segment_deeplab.config import Config, load_config  # noqa: E402
from segment_deeplab.data.decode import read_image  # noqa: E402
from segment_deeplab.infer.fold import for_inference  # noqa: E402
from segment_deeplab.infer.predict import predict  # noqa: E402
from segment_deeplab.infer.runtimes import choose_runtime  # noqa: E402

NUM_CLASSES = 11
ENGINES = ("torch", "onnxruntime", "openvino", "auto")


def checkpoint(kind: str, folder: Path) -> Path:
    """A checkpoint of the named model with random weights."""
    if kind == "recipe":
        cfg = load_config("configs/deeplabv3plus_resnet18_camvid_256.yaml")
    else:
        cfg = Config()
        cfg.model.model_variant, cfg.model.separable = "resnet_18", True
    cfg.model.num_classes = NUM_CLASSES
    return random_checkpoint(cfg, folder / f"{kind}.pt")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images-dir", required=True, help="a folder of images (e.g. CamVid's)")
    p.add_argument("--count", type=int, default=24, help="images per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["same", "recipe"])
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    files = sorted(Path(args.images_dir).glob("*.jpg"))[: args.count]
    if not files:
        raise SystemExit(f"no .jpg images in {args.images_dir}")
    work = Path(tempfile.mkdtemp(prefix="predict-speed-"))
    os.environ.setdefault("SEGMENT_DEEPLAB_CACHE", str(work / "cache"))
    cpu = torch.device("cpu")

    peer = build_peer("resnet_18", NUM_CLASSES).eval()
    decoded = [normalize_batch(read_image(f)[None]) for f in files]
    padded = [torch.nn.functional.pad(x, (0, 0, 0, (16 - x.shape[-2] % 16) % 16)) for x in decoded]

    def peer_round() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for x in padded:
                peer(x)
        return len(padded) / (time.perf_counter() - start)

    models = {}
    notes = {}
    for kind in args.models:
        ckpt = checkpoint(kind, work)
        for engine in ENGINES:
            model = for_inference(load_model(ckpt)[0], cpu)
            # Convert (and for auto, choose) before the timed rounds, as a second run of
            # `deeplab predict` finds it cached.
            choice = choose_runtime(model, cpu, None, engine, (360, 480))
            models[(kind, engine)] = choice.model
            notes[(kind, engine)] = choice.describe()
            print(f"{kind} {engine}: {choice.describe()}", file=sys.stderr)

    def project_round(kind: str, engine: str) -> float:
        out = work / "out" / f"{kind}-{engine}-{time.perf_counter_ns()}"
        start = time.perf_counter()
        predict(
            models[(kind, engine)], files, out, placeholder_classes(list(range(NUM_CLASSES))),
            progress=False, runtime="torch" if engine == "torch" else "auto",
        )  # fmt: skip
        return len(files) / (time.perf_counter() - start)

    peer_round()  # warm-up
    for key in models:
        project_round(*key)
    rates: dict[str, list[float]] = {"peer": []}
    for r in range(args.rounds):
        rates["peer"].append(peer_round())
        for kind, engine in models:
            rates.setdefault(f"{kind}/{engine}", []).append(project_round(kind, engine))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    ratio = {
        k: statistics.median(m / b for m, b in zip(v, rates["peer"], strict=True))
        for k, v in rates.items()
    }
    label = {"same": "same network as the peer", "recipe": "the CPU recipe's model"}
    lines = [
        machine(),
        "",
        f"{len(files)} images of {files[0].parent}, fp32, median of {args.rounds} alternating "
        "rounds; x peer = median of the per-round ratios",
        "",
        "| contender | what is timed | img/s | x peer forward |",
        "|---|---|---:|---:|",
        f"| peer: smp DeepLabV3Plus (resnet18) | eager fp32 forward only | "
        f"{statistics.median(rates['peer']):.2f} | 1.00 |",
    ]
    for kind, engine in models:
        key = f"{kind}/{engine}"
        lines.append(
            f"| segment-deeplab, {label[kind]}, {engine} | `predict()`: decode, forward, "
            f"mask + overlay written | {statistics.median(rates[key]):.2f} | {ratio[key]:.2f} |"
        )
    text = "\n".join(lines)
    text += "\n\n" + "\n".join(f"- {k[0]} {k[1]}: {v}" for k, v in notes.items() if k[1] == "auto")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rates": rates}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
