"""Evaluation and prediction speed against the raw forward pass of the model.

    python bench/eval_speed.py --data CAMVID_PREPARED/dataset.yaml [--config configs/X.yaml]

`evaluate` decodes each val image and mask, runs the model on the image as it is, takes
the argmax and updates the confusion matrix and per-image mIoU. Measured, in
alternating rounds on the same val images (480x360 for CamVid):

- raw forward: `model(x)` on an image already in memory, one after another on all
  threads (for the model `evaluate` runs: batch norm folded, as `deeplab eval`
  prepares it; and for the model as trained and saved);
- `evaluate()` as shipped (one batch after another on all threads, decoding in this
  process) and with one DataLoader worker process decoding ahead (`workers=1`);
- `predict()` (mask PNG and overlay JPEG written to a temporary folder).

(Two images at once, one per core in two threads, was measured here before it was
removed: BENCHMARKS.md §4 has the figures.)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from segment_deeplab.config import load_config  # noqa: E402
from segment_deeplab.data.dataset import SegmentationFolder  # noqa: E402
from segment_deeplab.data.spec import open_dataset  # noqa: E402
from segment_deeplab.device import autocast  # noqa: E402
from segment_deeplab.infer.evaluate import evaluate  # noqa: E402
from segment_deeplab.infer.fold import for_inference  # noqa: E402
from segment_deeplab.infer.predict import predict  # noqa: E402
from segment_deeplab.infer.tta import forward_dtype  # noqa: E402
from segment_deeplab.models import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset.yaml")
    p.add_argument("--config", default="configs/deeplabv3plus_resnet18_camvid_256.yaml")
    p.add_argument("--images", type=int, default=12, help="val images per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--amp", default="auto", help="auto, off or bf16 (off: the fp32 path)")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    spec = open_dataset(args.data)
    cfg.model.num_classes = spec.num_classes
    cpu = torch.device("cpu")
    built = build_model(cfg.model)
    # for_inference folds in place: the model as saved is a copy taken before.
    eager = for_inference(copy.deepcopy(built), cpu, fold_bn=False)
    model = for_inference(built, cpu)
    dtype = forward_dtype(model, args.amp, cpu)
    val = SegmentationFolder(spec, "val")
    subset = torch.utils.data.Subset(val, range(min(args.images, len(val))))
    n = len(subset)
    x = val.load(0)[0].float().unsqueeze(0) / 255  # (1, 3, 360, 480)
    x = x.contiguous(memory_format=torch.channels_last)

    def forward(net: torch.nn.Module) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), autocast(cpu, dtype):
            for _ in range(n):
                net(x)
        return n / (time.perf_counter() - start)

    def evaluating(**how) -> float:
        start = time.perf_counter()
        args_ = (model, subset, spec.num_classes, spec.ignore_index)
        evaluate(*args_, progress=False, dtype=dtype, **how)
        return n / (time.perf_counter() - start)

    images = [val.paths(i)[0] for i in subset.indices]
    tmp = tempfile.TemporaryDirectory(prefix="predict_speed_")

    def predicting() -> float:
        start = time.perf_counter()
        done = predict(model, images, tmp.name, spec.classes, progress=False, dtype=dtype)
        assert len(done.written) == len(images), done.summary()
        return len(images) / (time.perf_counter() - start)

    cases = {
        "forward": lambda: forward(model),
        "forward_as_saved": lambda: forward(eager),
        "eval": lambda: evaluating(),
        "eval_worker": lambda: evaluating(workers=1),
        "predict": predicting,
    }
    for fn in cases.values():  # warm-up
        fn()
    runs: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            runs[name].append(fn())
    tmp.cleanup()
    med = {k: statistics.median(v) for k, v in runs.items()}

    def gain(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))

    fwd = med["forward"]
    text = (
        f"{machine()}, forward in {str(dtype or torch.float32).removeprefix('torch.')}; "
        f"{Path(args.config).stem}, {x.shape[-1]}x{x.shape[-2]}, median of {args.rounds} "
        f"alternating rounds of {n} val images\n\n"
        "| measurement | img/s | x raw forward |\n|---|---:|---:|\n"
        f"| raw forward `model(x)`, image in memory, batch norm folded | {fwd:.2f} | 1.00 |\n"
        f"| raw forward, model as saved | {med['forward_as_saved']:.2f} | "
        f"{gain('forward_as_saved', 'forward'):.2f} |\n"
        f"| `evaluate()` as shipped | {med['eval']:.2f} | {gain('eval', 'forward'):.2f} |\n"
        f"| `evaluate(workers=1)`: a DataLoader worker decodes ahead | "
        f"{med['eval_worker']:.2f} | {gain('eval_worker', 'forward'):.2f} |\n"
        f"| `predict()`, mask PNG and overlay JPEG written | {med['predict']:.2f} | "
        f"{gain('predict', 'forward'):.2f} |"
    )
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
