"""Peak resident memory of training and of prediction, each in a fresh process.

    python bench/memory.py [--config configs/X.yaml]

Training: a few steps of the recipe's model at its crop and batch size (the project's
train step), and the peer (smp DeepLabV3Plus resnet18, torchvision-reference step) at
the peer recipe's crop 320, batch 8. Prediction on 480x360 images (the CamVid size),
batch 1: the project as `deeplab predict` runs (`predict_groups`: batch norm folded into
the model in place), the peer with
`predict_probs`, one image at a time. Peak RSS is `ru_maxrss` of the child, so the
Python interpreter, torch and the model's weights count too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

NUM_CLASSES = 11
CASES = [("project", "train"), ("project", "predict"), ("peer", "train"), ("peer", "predict")]


def child(who: str, what: str, config: str, steps: int) -> None:
    """Run the workload; print peak RSS in MiB."""
    from segment_deeplab.config import load_config
    from segment_deeplab.infer.fold import for_inference
    from segment_deeplab.infer.predict import predict_groups
    from segment_deeplab.infer.tta import predict_probs

    if who == "project":
        from segment_deeplab.losses import build_loss
        from segment_deeplab.models import build_model
        from segment_deeplab.train.loop import train_step
        from segment_deeplab.train.setup import build_optimizer

        cfg = load_config(config, ["train.class_weights=null"])  # weights cost no memory
        cfg.model.num_classes = NUM_CLASSES
        model = build_model(cfg.model)
        (h, w), b = cfg.data.crop_size, cfg.data.batch_size
    else:
        from peer_smp import (
            NormalizedPeer,
            build_peer,
            normalize_batch,
            peer_optimizer,
            peer_train_step,
        )

        model = build_peer("resnet_18", NUM_CLASSES)
        (h, w), b = (320, 320), 8
    images = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8)
    masks = torch.randint(0, NUM_CLASSES, (b, h, w))
    if what == "train" and who == "project":
        model = model.to(memory_format=torch.channels_last)
        opt, loss_fn = build_optimizer(model, cfg.train), build_loss(cfg.train, NUM_CLASSES, 255)
        for _ in range(steps):
            cpu = torch.device("cpu")
            train_step(model, images, masks, loss_fn, opt, None, None, cpu, True, False)
    elif what == "train":
        opt = peer_optimizer(model)
        for _ in range(steps):
            peer_train_step(model, normalize_batch(images), masks, opt)
    else:
        if who == "peer":
            model = NormalizedPeer(model)
        model = for_inference(model, torch.device("cpu"))
        image = torch.randint(0, 256, (1, 3, 360, 480), dtype=torch.uint8)
        if who == "peer":
            for _ in range(steps):
                predict_probs(model, image).argmax(1)
        else:  # as `deeplab predict` runs
            for p in predict_groups(model, [image[0]] * (2 * steps)):
                p.probs.argmax(0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/deeplabv3plus_resnet18_camvid_256.yaml")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("WHO", "WHAT"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    if args.child:
        child(*args.child, args.config, args.steps)
        return 0
    peaks = {}
    for who, what in CASES:
        cmd = [sys.executable, __file__, "--child", who, what, "--config", args.config]
        out = subprocess.run([*cmd, "--steps", str(args.steps)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{who} {what} failed:\n{out.stderr}")
        peaks[f"{who} {what}"] = float(out.stdout.split()[-1])
    from segment_deeplab.config import load_config

    cfg = load_config(args.config)
    crop = "x".join(map(str, cfg.data.crop_size))
    lines = [
        machine(),
        "",
        "| workload | project peak RSS (MiB) | peer peak RSS (MiB) |",
        "|---|---:|---:|",
        f"| training (project: {Path(args.config).stem}, crop {crop}, batch "
        f"{cfg.data.batch_size}; peer: crop 320, batch 8) | {peaks['project train']:.0f} "
        f"| {peaks['peer train']:.0f} |",
        "| prediction, 480x360, batch 1 (project: `predict_groups`) | "
        f"{peaks['project predict']:.0f} "
        f"| {peaks['peer predict']:.0f} |",
    ]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(peaks, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
