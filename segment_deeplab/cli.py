"""The `deeplab` command line: argparse subcommands with thin handlers over the library.

Each subcommand has an `_add_<name>(subparsers)` that declares its arguments and a
`_cmd_<name>(args) -> int` handler. Library errors that the user can fix
(DatasetError, ConfigError, CheckpointError, ...) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from segment_deeplab import __version__


class UserError(Exception):
    """An input problem the user can fix; printed without a traceback."""


def _dataset_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument(
        "dataset",
        nargs="?" if not required else None,
        help="dataset folder (images/ + masks/ + dataset.yaml) or a dataset.yaml",
    )
    g.add_argument("--images", metavar="DIR", help="image folder, for other layouts")
    g.add_argument("--masks", metavar="DIR", help="mask folder, for other layouts")
    g.add_argument("--spec", metavar="FILE", help="a dataset.yaml kept elsewhere")


# --------------------------------------------------------------------------- synth
def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate a small synthetic dataset (demo, tests)")
    p.add_argument("output", help="folder to write images/, masks/ and dataset.yaml into")
    p.add_argument("--num", type=int, default=64, help="number of image/mask pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=[128, 160], metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=4, help="classes including background")


def _cmd_synth(args) -> int:
    from segment_deeplab.data.synthetic import generate

    spec = generate(
        args.output, num=args.num, seed=args.seed, size=tuple(args.size), num_classes=args.classes
    )
    print(f"wrote {args.num} pairs and {spec} ({args.classes} classes)")
    return 0


# --------------------------------------------------------------------------- train
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
    "lr": "train.lr",
    "seed": "train.seed",
}


def _optional_int(text: str) -> str:
    """An int, or 'null' for none (kept as text so "not given" stays distinguishable)."""
    return "null" if text.lower() in ("none", "null", "") else str(int(text))


def _add_train(sub) -> None:
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
    d.add_argument("--lr", type=float, help="base learning rate")
    d.add_argument("--seed", type=int)


def _cmd_train(args) -> int:
    from pathlib import Path

    from segment_deeplab.config import load_config
    from segment_deeplab.data.dataset_spec import open_dataset
    from segment_deeplab.engine.train import TrainingError, fit

    overrides = []
    for flag, key in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value if not isinstance(value, list) else list(value)}")
    if args.pretrained:
        overrides.append("model.pretrained=true")
    overrides += args.overrides

    if args.resume:
        run = Path(args.resume)
        if args.output and Path(args.output).resolve() != run.resolve():
            raise UserError("--resume continues RUN_DIR in place; drop --output")
        base = args.config or (run / "config.yaml")
        cfg = load_config(base, overrides)
        data = args.data or _recorded_dataset(run)
        out = run
    else:
        if not args.output or not args.data:
            raise UserError("train needs --data DATASET and --output RUN_DIR (or --resume RUN_DIR)")
        cfg = load_config(args.config, overrides)
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


def _recorded_dataset(run) -> str:
    from segment_deeplab.checkpoint import load_file

    ck = load_file(run / "last.pt")
    if ck.get("dataset_path"):
        return ck["dataset_path"]
    if (run / "dataset.yaml").is_file():
        return str(run / "dataset.yaml")
    raise UserError(f"{run} does not record its dataset; give --data DATASET")


# --------------------------------------------------------------------------- eval
def _tta_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference (TF DeepLab eval_scales, add_flipped_images)")
    g.add_argument(
        "--scales", type=float, nargs="+", default=[1.0], metavar="S",
        help="average over these input scales, e.g. 0.5 0.75 1.0 1.25 1.5 1.75",
    )  # fmt: skip
    g.add_argument("--flip", action="store_true", help="also average the mirrored image")
    g.add_argument(
        "--window", type=int, metavar="N",
        help="tile images larger than N pixels (e.g. 513): full resolution without OOM",
    )  # fmt: skip
    g.add_argument(
        "--batch-size", type=int, default=1, metavar="N", help="same-size images per pass"
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_tta(args) -> None:
    """Reject a bad device or inference option before any model is loaded."""
    from segment_deeplab.engine.distributed import pick_device

    try:
        pick_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--device {args.device}: {e}") from e
    if any(s <= 0 for s in args.scales):
        raise UserError(f"--scales must be positive, got {args.scales}")
    if args.window is not None and args.window < 16:
        raise UserError(f"--window must be at least 16 pixels, got {args.window}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on a dataset split (mIoU, per-class table, confusion)",
        description="Evaluate at full resolution; writes metrics.json, confusion_matrix.csv "
        "and .png and per_image.csv to --output (default: RUN/eval_SPLIT).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--data", required=True, help="dataset folder or dataset.yaml")
    p.add_argument("--spec", metavar="FILE", help="a dataset.yaml kept elsewhere")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--output", metavar="DIR", help="folder for the metrics files")
    p.add_argument(
        "--background", type=int, metavar="ID",
        help="class left out of foreground mIoU (default: the class named 'background')",
    )  # fmt: skip
    p.add_argument(
        "--report", action="store_true",
        help="also write the HTML report: RUN/report.html, or report.html beside the "
        "metrics for a checkpoint outside a run folder",
    )  # fmt: skip
    _tta_args(p)


def _cmd_eval(args) -> int:
    import json

    from segment_deeplab.engine.evaluate import format_table, run_eval

    _check_tta(args)
    result = run_eval(
        args.checkpoint,
        args.data,
        split=args.split,
        output=args.output,
        spec=args.spec,
        device=args.device,
        scales=args.scales,
        flip=args.flip,
        window=args.window,
        background=args.background,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    if result is None:  # not rank 0 under torchrun
        return 0
    if args.json:
        result.pop("per_image", None)
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        print(f"wrote {result['outputs']['metrics']} and the confusion matrix beside it")
    if args.report:
        path = _eval_report(args.checkpoint, result["outputs"]["metrics"], args.device)
        print(f"wrote the report {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


# --------------------------------------------------------------------------- predict
def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="segment images: index PNGs (class colours) and overlays with a legend",
        description="For each image write STEM.png (class ids, P-mode, original size) and "
        "STEM_overlay.jpg; unreadable inputs are reported and skipped (exit status 1).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the results")
    p.add_argument(
        "--save-probs", action="store_true", help="also STEM_probs.npy (float16, C x H x W)"
    )
    _tta_args(p)


def _cmd_predict(args) -> int:
    import json

    from segment_deeplab.engine.predict import run_predict

    _check_tta(args)
    result = run_predict(
        args.checkpoint,
        args.inputs,
        args.output,
        device=args.device,
        scales=args.scales,
        flip=args.flip,
        window=args.window,
        batch_size=args.batch_size,
        save_probs=args.save_probs,
        progress=not args.no_progress,
    )
    if args.json:
        written = [str(p) for p in result.written]
        failed = [{"input": n, "reason": r} for n, r in result.failed]
        print(json.dumps({"written": written, "failed": failed}, indent=2))
    else:
        print(f"{result.summary()} (in {args.output})")
    return 1 if result.failed else 0


# --------------------------------------------------------------------------- validate
def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check every image/mask pair and report every problem",
        description="Read every image/mask pair and list every problem per file; exit 1 on "
        "errors (warnings do not fail). Without dataset.yaml, checks against the ids the "
        "masks contain.",
    )
    _dataset_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--workers", type=int, metavar="N", help="reader processes (default: cores)")


def _cmd_validate(args) -> int:
    import json

    from segment_deeplab.data.dataset_spec import resolve_dataset
    from segment_deeplab.data.validate import format_report, validate_dataset

    spec, image_dir, mask_dir, raw = resolve_dataset(
        args.dataset, args.images, args.masks, args.spec
    )
    report = validate_dataset(
        spec,
        image_dir,
        mask_dir,
        ignore_color=raw.get("ignore_color"),
        workers=args.workers,
        progress=not args.json and sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- prepare
def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="validate, split train/val and write dataset.yaml with class statistics",
        description="Validate (after --remap), then write a seeded train/val split, class "
        "statistics and a content hash into dataset.yaml. Original files are never modified.",
    )
    _dataset_args(p, required=False)
    p.add_argument(
        "--output",
        metavar="DIR",
        help="write dataset.yaml and splits/ (and converted masks) here instead of the "
        "dataset folder, e.g. for read-only data",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.2, metavar="F", help="share of pairs for val (0.2)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (0)")
    p.add_argument(
        "--remap",
        nargs="+",
        metavar="SRC:DST",
        help="change mask values before checking them, e.g. 255:1 for 0/255 binary masks; "
        "writes new masks",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--workers", type=int, metavar="N", help="reader processes (default: cores)")


def _cmd_prepare(args) -> int:
    import json

    from segment_deeplab.data.prepare import ValidationFailed, parse_remap, prepare_dataset
    from segment_deeplab.data.validate import format_report

    try:
        res = prepare_dataset(
            args.dataset,
            images=args.images,
            masks=args.masks,
            spec=args.spec,
            output=args.output,
            val_fraction=args.val_fraction,
            seed=args.seed,
            remap=parse_remap(args.remap),
            workers=args.workers,
            progress=not args.json and sys.stderr.isatty(),
        )
    except ValidationFailed as e:
        print(json.dumps(e.report.to_dict()) if args.json else format_report(e.report))
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0
    for w in res.report.warnings:
        print(f"warning {w.code}: {w.message}")
    stats = res.spec.stats
    print(
        f"{len(res.train)} train / {len(res.val)} val pairs (seed {args.seed}), "
        f"{res.spec.num_classes} classes, ignore {res.spec.ignore_index} "
        f"({stats['ignore_share']:.1%} of pixels)"
    )
    if res.converted_masks:
        print(f"wrote index masks to {res.converted_masks} (your masks are unchanged)")
    print(f"wrote {res.spec_path} and its splits/ ({res.spec.hash[:19]}...)")
    if res.placeholders:
        print(
            f"there was no dataset.yaml: the classes are placeholders named class_<id> with "
            f"default colours; edit their names and colours in {res.spec_path}"
        )
    return 0


# --------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX, TorchScript or safetensors, with a parity check",
        description="Write the model with its classes, colours and normalisation inside, "
        "after checking the reloaded file against PyTorch (max logit difference, argmax "
        "agreement); a file that disagrees is not written and the exit status is 1.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--output", required=True, metavar="FILE", help="file to write")
    p.add_argument(
        "--format", dest="fmt", metavar="FORMAT",
        help="onnx, torchscript or safetensors (default: from the --output suffix)",
    )  # fmt: skip
    p.add_argument(
        "--with-preprocessing", action="store_true",
        help="take uint8 (N, H, W, 3) RGB images as they are decoded; no scaling by the caller",
    )  # fmt: skip
    p.add_argument(
        "--with-argmax", action="store_true", help="output class ids (N, H, W) instead of logits"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--data", metavar="DATASET", help="dataset or image folder for the parity check")
    p.add_argument("--spec", metavar="FILE", help="a dataset.yaml kept elsewhere")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _cmd_export(args) -> int:
    import json

    from segment_deeplab.engine.export import ExportError, export
    from segment_deeplab.engine.exported import ParityError

    try:
        result = export(
            args.checkpoint,
            args.output,
            fmt=args.fmt,
            preprocessing=args.with_preprocessing,
            argmax=args.with_argmax,
            opset=args.opset,
            data=args.data,
            spec=args.spec,
        )
    except ParityError as e:
        print(f"error: parity check failed: {e}; nothing written to {args.output}", file=sys.stderr)
        return 1
    except ExportError as e:
        raise UserError(str(e)) from e
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.path is not None:
        print(f"wrote {result.path} ({result.format}, {result.seconds:.1f} s)")
    if not args.json or not result.parity.passed:
        print(result.parity.summary(), file=sys.stdout if result.parity.passed else sys.stderr)
    if not result.parity.passed:
        print(
            f"error: the exported model does not match PyTorch; nothing written to {args.output}",
            file=sys.stderr,
        )
        return 1
    return 0


# --------------------------------------------------------------------------- report
def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one HTML page showing how a run does: curves, per-class IoU, confusion, images",
        description="Write a self-contained HTML report (charts and images embedded) from "
        "what the run folder holds. Missing pieces (no validation yet, no evaluation, a "
        "moved dataset) are named in the report with the command that adds them.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="a `deeplab train` run folder")
    p.add_argument("--output", metavar="FILE", help="HTML file (default: RUN_DIR/report.html)")
    p.add_argument(
        "--eval", dest="eval_dir", metavar="DIR",
        help="a `deeplab eval` output (default: RUN_DIR/eval_val, or a folder beside the "
        "run whose metrics.json names it)",
    )  # fmt: skip
    p.add_argument(
        "--gallery", type=int, default=4, metavar="N",
        help="best and worst val images to show, N of each (default: 4; 0: none)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="where the gallery predicts: auto, cpu, cuda")


def _cmd_report(args) -> int:
    from pathlib import Path

    from segment_deeplab.report import build_report

    run = Path(args.run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    if args.gallery < 0:
        raise UserError(f"--gallery must be 0 or more, got {args.gallery}")
    if args.eval_dir and not (Path(args.eval_dir) / "metrics.json").is_file():
        raise UserError(f"--eval {args.eval_dir} holds no metrics.json from `deeplab eval`")
    report = build_report(run, args.eval_dir, args.gallery, args.device)
    path = report.save(args.output or run / "report.html")
    for line in report.missing:
        print(f"missing: {line}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


def _eval_report(checkpoint: str, metrics: str, device: str):
    """The report after `eval --report`: into the evaluated run folder, or beside the
    metrics when the checkpoint lies outside a run folder."""
    from pathlib import Path

    from segment_deeplab.report import write_report

    ckpt, eval_dir = Path(checkpoint), Path(metrics).parent
    run = ckpt if ckpt.is_dir() else ckpt.parent
    in_run = (run / "config.yaml").is_file() or (run / "metrics.jsonl").is_file()
    output = None if in_run else eval_dir / "report.html"
    return write_report(run, output, eval_dir=eval_dir, device=device)


# --------------------------------------------------------------------------- main
COMMANDS = ["synth", "validate", "prepare", "train", "eval", "predict", "export", "report"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeplab",
        description="DeepLab v3 / v3+ semantic segmentation for your own images and masks.",
    )
    parser.add_argument("--version", action="version", version=f"segment-deeplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    module = sys.modules[__name__]
    for name in COMMANDS:
        add = getattr(module, f"_add_{name}", None)
        if add is not None:
            add(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from segment_deeplab.config import ConfigError
    from segment_deeplab.data.dataset_spec import DatasetError

    errors: list[type[BaseException]] = [UserError, ConfigError, DatasetError]
    try:
        from segment_deeplab.checkpoint import CheckpointError

        errors.append(CheckpointError)
    except ImportError:
        pass
    try:
        from segment_deeplab.models import ModelError

        errors.append(ModelError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = getattr(sys.modules[__name__], f"_cmd_{args.command.replace('-', '_')}")
    try:
        return int(handler(args) or 0)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
