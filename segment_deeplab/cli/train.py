"""`deeplab train`: flags named as in TF DeepLab's train.py, mapped onto the config."""

from __future__ import annotations

import argparse
import os
import sys

from segment_deeplab.cli.common import UserError

# Flags named as in TF DeepLab's train.py, each mapped to a config key.
_TRAIN_FLAGS = {
    "model_variant": "model.model_variant",
    "atrous_rates": "model.atrous_rates",
    "output_stride": "model.output_stride",
    "decoder_output_stride": "model.decoder_output_stride",
    "init_checkpoint": "model.init_checkpoint",
    "crop_size": "data.crop_size",
    "batch_size": "data.batch_size",
    "workers": "data.workers",
    "steps": "train.steps",
    "epochs": "train.epochs",
    "time": "train.time",
    "min_steps": "train.min_steps",
    "lr": "train.lr",
    "seed": "train.seed",
}


class _NoStride:
    """--decoder-output-stride none: DeepLab v3 (given, unlike a flag left out)."""


def _optional_int(text: str) -> int | type[_NoStride]:
    """An int, or none/null for no decoder."""
    return _NoStride if text.lower() in ("none", "null", "") else int(text)


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a DeepLab model on a prepared dataset",
        description="Train DeepLab v3/v3+. Settings come from the defaults, then --config, "
        "then the flags below, then key=value overrides (e.g. train.lr=0.02).",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    io = p.add_argument_group("run")
    io.add_argument("--data", help="prepared dataset folder or dataset.yaml")
    io.add_argument("--spec", metavar="FILE", help="a dataset.yaml kept elsewhere")
    io.add_argument("--output", help="run folder to create (checkpoints, logs, config)")
    io.add_argument("--config", help="YAML config file (see configs/)")
    io.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    io.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    io.add_argument("--verbose", action="store_true", help="list skipped/missing tensors")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    m = p.add_argument_group("model (TF DeepLab flag names)")
    m.add_argument("--model-variant", help="e.g. xception_65, resnet_101, mobilenet_v2")
    m.add_argument("--atrous-rates", type=int, nargs="+", metavar="R")
    m.add_argument("--output-stride", type=int, choices=[8, 16, 32])
    m.add_argument("--decoder-output-stride", type=_optional_int, help="4, or none for v3")
    m.add_argument("--init-checkpoint", metavar="PATH", help="weights to start from")
    m.add_argument("--pretrained", action="store_true", help="timm's ImageNet weights (online)")
    d = p.add_argument_group("data and schedule")
    d.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"))
    d.add_argument("--batch-size", type=int)
    d.add_argument("--workers", type=int, help="data loader processes")
    d.add_argument("--steps", type=int, help="training steps (TF: training_number_of_steps)")
    d.add_argument("--epochs", type=int)
    d.add_argument("--time", help="wall-clock budget, e.g. 20m; the LR schedule spans it")
    d.add_argument("--min-steps", type=int, metavar="N",
                   help="with --time: not before N steps, however slow the machine")  # fmt: skip
    d.add_argument("--lr", type=float, help="base learning rate")
    d.add_argument("--seed", type=int)
    return p


def _cmd_train(args) -> int:
    from pathlib import Path

    from segment_deeplab.config import load_config
    from segment_deeplab.data.spec import open_dataset
    from segment_deeplab.train.loop import TrainingError, fit

    values = {}  # flags as typed values, applied before the key=value overrides
    for flag, key in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            values[key] = None if value is _NoStride else value
    if args.pretrained:
        values["model.pretrained"] = True
    overrides = args.overrides

    if args.resume:
        run = Path(args.resume)
        if not run.is_dir():
            raise UserError(f"--resume {run}: no such run folder")
        if args.output and Path(args.output).resolve() != run.resolve():
            raise UserError("--resume continues RUN_DIR in place; drop --output")
        base = args.config or (run / "config.yaml")
        cfg = load_config(base, overrides, values=values)
        data = args.data or _recorded_dataset(run)
        out = run
    else:
        if not args.output or not args.data:
            raise UserError("train needs --data DATASET and --output RUN_DIR (or --resume RUN_DIR)")
        cfg = load_config(args.config, overrides, base=_default_base(args), values=values)
        data, out = args.data, Path(args.output)
    spec = open_dataset(data, spec=args.spec)
    try:
        result = fit(
            cfg,
            spec,
            out,
            resume=bool(args.resume),
            device=args.device,
            progress=not args.no_progress,
            verbose=args.verbose,
        )
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 writes it
        from segment_deeplab.report import write_report

        print(f"wrote the report {write_report(out, device=args.device)}")
    best = f"{result.best_miou:.4f}" if result.best_miou is not None else "n/a"
    print(f"step {result.step}; best val mIoU {best}; checkpoints in {out}")
    if result.interrupted:
        print(f"interrupted: continue with `deeplab train --resume {out}`", file=sys.stderr)
        return 130
    return 0


def _default_base(args):
    """On a CPU without --config, start from the recommended CPU recipe."""
    from segment_deeplab.config import cpu_recipe
    from segment_deeplab.device import pick_device

    if args.config or pick_device(args.device).type != "cpu":
        return None
    if os.environ.get("RANK", "0") == "0":
        print(
            "on the CPU without --config: starting from the CPU recipe (resnet_18, output "
            "stride 32, 256x256 crops, AdamW; configs/deeplabv3plus_resnet18_camvid_256.yaml)",
            file=sys.stderr,
        )
    return cpu_recipe()


def _recorded_dataset(run) -> str:
    from segment_deeplab.checkpoint import read_meta

    if not run.is_dir():
        raise UserError(f"--resume {run}: no such run folder")
    ck = read_meta(run / "last.pt") if (run / "last.pt").is_file() else {}
    if ck.get("dataset_path"):
        return ck["dataset_path"]
    if (run / "dataset.yaml").is_file():
        return str(run / "dataset.yaml")
    raise UserError(f"{run} does not record its dataset; give --data DATASET")


def register(sub) -> None:
    """Add this module's subcommands to the `deeplab` parser."""
    _add_train(sub).set_defaults(handler=_cmd_train)
