"""Evaluation speed: `evaluate()` images/s against the raw forward images/s of the model;
and `predict()` (masks and overlays written) in one stream and in two.

    python bench/eval_speed.py --data CAMVID_PREPARED/dataset.yaml [--config configs/X.yaml]

`evaluate` decodes each val image and mask, runs the model on the image as it is, takes
the argmax and updates the confusion matrix and per-image mIoU; on a CPU it works on two
images at once, one per stream of half the threads (`inference.in_streams`). The raw
forward is `model(x)` on an image already in memory at the same size (480x360 for
CamVid), under `torch.inference_mode`, channels_last and the same autocast as
`evaluate`, three ways:

- plain: one image after another on all threads, for the model `evaluate` runs (batch
  norm folded into the convolutions, as `deeplab eval` prepares it);
- as saved: the same for the model as trained and saved (batch norm separate);
- in streams: the folded model run the way `evaluate` runs it, two images at once.

They alternate in rounds. `predict()` runs on the same val images, writing each mask PNG
and overlay JPEG to a temporary folder, once in one stream and once as shipped.
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
from segment_deeplab.infer.evaluate import evaluate  # noqa: E402
from segment_deeplab.infer.predict import predict  # noqa: E402
from segment_deeplab.infer.tta import (  # noqa: E402
    _autocast,
    cpu_streams,
    in_streams,
    prepare_model,
)
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
    # (prepare_model folds in place: the eager model is a copy taken before.)
    eager = prepare_model(copy.deepcopy(built), torch.device("cpu"), fold_bn=False)
    model = prepare_model(built, torch.device("cpu"))
    val = SegmentationFolder(spec, "val")
    subset = torch.utils.data.Subset(val, range(min(args.images, len(val))))
    x = val.load(0)[0].float().unsqueeze(0) / 255  # (1, 3, 360, 480)
    x = x.contiguous(memory_format=torch.channels_last)

    def forward(net: torch.nn.Module, streams: int = 1) -> float:
        """img/s of `net(x)` as `evaluate` runs the model: channels_last, and bf16
        autocast where the hardware gains from it (`inference._autocast`)."""

        def one(_: int) -> None:
            with torch.inference_mode(), _autocast(net, x.device, "auto"):
                net(x)

        start = time.perf_counter()
        for _ in in_streams(one, range(len(subset)), streams):
            pass
        return len(subset) / (time.perf_counter() - start)

    streams = cpu_streams(x.device)
    forward(model), forward(eager), forward(model, streams)  # warm-up
    images = [val.paths(i)[0] for i in subset.indices]
    tmp = tempfile.TemporaryDirectory(prefix="predict_speed_")
    out = Path(tmp.name)

    def predicting(n: int | None) -> float:
        start = time.perf_counter()
        done = predict(model, images, out, spec.classes, progress=False, streams=n)
        assert len(done.written) == len(images), done.summary()
        return len(images) / (time.perf_counter() - start)

    predicting(None)  # warm-up
    runs: dict[str, list[float]] = {"plain": [], "as_saved": [], "streams": [], "evaluate": []}
    runs.update(predict_1=[], predict=[])
    for _ in range(args.rounds):
        runs["plain"].append(forward(model))
        runs["as_saved"].append(forward(eager))
        runs["streams"].append(forward(model, streams))
        start = time.perf_counter()
        evaluate(model, subset, spec.num_classes, spec.ignore_index, progress=False)
        runs["evaluate"].append(len(subset) / (time.perf_counter() - start))
        runs["predict_1"].append(predicting(1))
        runs["predict"].append(predicting(None))
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = {
        k: statistics.median(e / r for e, r in zip(runs["evaluate"], runs[k], strict=True))
        for k in ("plain", "as_saved", "streams")
    }
    size = "x".join(map(str, x.shape[-1:-3:-1]))
    text = (
        f"{machine()}, evaluate in {streams} stream(s)\n\n"
        "| model | image size | raw forward img/s: plain / as saved / in streams "
        "| evaluate() img/s | evaluate / forward: plain / as saved / in streams |\n"
        "|---|---|---:|---:|---:|\n"
        f"| {Path(args.config).stem} | {size} | {med['plain']:.2f} / {med['as_saved']:.2f} / "
        f"{med['streams']:.2f} | {med['evaluate']:.2f} | {100 * ratio['plain']:.0f}% / "
        f"{100 * ratio['as_saved']:.0f}% / {100 * ratio['streams']:.0f}% |"
    )
    tmp.cleanup()
    gain = statistics.median(a / b for a, b in zip(runs["predict"], runs["predict_1"], strict=True))
    text += (
        "\n\n| `predict()`, mask PNG and overlay JPEG written | img/s |\n|---|---:|\n"
        f"| one stream | {med['predict_1']:.2f} |\n"
        f"| as shipped ({streams} stream(s)) | {med['predict']:.2f} ({gain:.2f}x) |"
    )
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "ratio": ratio, "streams": streams}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
