"""Evaluation speed: `evaluate()` images/s against the raw forward images/s of the model.

    python bench/eval_speed.py --data CAMVID_PREPARED/dataset.yaml [--config configs/X.yaml]

`evaluate` decodes each val image and mask, runs the model on the image as it is, takes
the argmax and updates the confusion matrix and per-image mIoU. The raw forward is
`model(x)` on an image already in memory at the same size (480x360 for CamVid), under
`torch.inference_mode`, channels_last and the same autocast as `evaluate`: once for the
model `evaluate` runs (batch norm folded into the convolutions, as `deeplab eval`
prepares it) and once for the model as trained and saved (batch norm separate). They
alternate in rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from segment_deeplab.config import load_config  # noqa: E402
from segment_deeplab.data.dataset_spec import open_dataset  # noqa: E402
from segment_deeplab.data.folder import SegmentationFolder  # noqa: E402
from segment_deeplab.engine.evaluate import evaluate  # noqa: E402
from segment_deeplab.engine.inference import _autocast, prepare_model  # noqa: E402
from segment_deeplab.models import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset.yaml")
    p.add_argument("--config", default="configs/deeplabv3plus_resnet18_camvid_256.yaml")
    p.add_argument("--images", type=int, default=12, help="val images per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    spec = open_dataset(args.data)
    cfg.model.num_classes = spec.num_classes
    built = build_model(cfg.model)
    # `evaluate`'s model, as `deeplab eval` prepares it (batch norm folded), and the model
    # as trained and saved (eager, batch norm separate), both channels_last.
    model = prepare_model(built, torch.device("cpu"))
    eager = prepare_model(built, torch.device("cpu"), fold_bn=False)
    val = SegmentationFolder(spec, "val")
    subset = torch.utils.data.Subset(val, range(min(args.images, len(val))))
    x = val.load(0)[0].float().unsqueeze(0) / 255  # (1, 3, 360, 480)
    x = x.contiguous(memory_format=torch.channels_last)

    def forward(net: torch.nn.Module) -> float:
        """img/s of `net(x)` as `evaluate` runs the model: channels_last, and bf16
        autocast where the hardware gains from it (`inference._autocast`)."""
        start = time.perf_counter()
        with torch.inference_mode(), _autocast(net, x.device, "auto"):
            for _ in range(len(subset)):
                net(x)
        return len(subset) / (time.perf_counter() - start)

    forward(model), forward(eager)  # warm-up
    raw, raw_eager, full = [], [], []
    for _ in range(args.rounds):
        raw.append(forward(model))
        raw_eager.append(forward(eager))
        start = time.perf_counter()
        evaluate(model, subset, spec.num_classes, spec.ignore_index, progress=False)
        full.append(len(subset) / (time.perf_counter() - start))
    ratio = statistics.median(f / r for f, r in zip(full, raw, strict=True))
    ratio_eager = statistics.median(f / r for f, r in zip(full, raw_eager, strict=True))
    size = "x".join(map(str, x.shape[-1:-3:-1]))
    text = (
        f"{machine()}\n\n"
        "| model | image size | raw forward img/s (folded / as saved) | evaluate() img/s "
        "| evaluate / forward (folded / as saved) |\n"
        "|---|---|---:|---:|---:|\n"
        f"| {Path(args.config).stem} | {size} | {statistics.median(raw):.2f} / "
        f"{statistics.median(raw_eager):.2f} | {statistics.median(full):.2f} "
        f"| {100 * ratio:.0f}% / {100 * ratio_eager:.0f}% |"
    )
    print(text)
    if args.json:
        numbers = {"raw": raw, "raw_eager": raw_eager, "evaluate": full, "ratio": ratio}
        Path(args.json).write_text(json.dumps({**numbers, "ratio_eager": ratio_eager}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
