"""`deeplab eval`, `predict` and `report`: metrics, pictures and the run report."""

from __future__ import annotations

import argparse
import sys

from segment_deeplab.cli.common import UserError, check_tta, tta_args


def _add_eval(sub) -> argparse.ArgumentParser:
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
    tta_args(p)
    return p


def _cmd_eval(args) -> int:
    import json

    from segment_deeplab.infer.eval_outputs import format_table
    from segment_deeplab.infer.evaluate import run_eval

    tta = check_tta(args)
    result = run_eval(
        args.checkpoint,
        args.data,
        split=args.split,
        output=args.output,
        spec=args.spec,
        device=args.device,
        tta=tta,
        background=args.background,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        amp=args.amp,
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


def _add_predict(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="segment images: index PNGs (class colours) and overlays with a legend",
        description="For each image write STEM.png (class ids, P-mode, original size) and "
        "STEM_overlay.jpg; for each video (.mp4 .mov .mkv .avi .webm) STEM_mask.mkv "
        "(lossless class ids) and STEM_overlay.mp4 at its frame rate; unreadable inputs "
        "are reported and skipped (exit status 1).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images, videos, folders or globs")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint, run folder, or exported .onnx/.pt/.safetensors",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the results")
    p.add_argument(
        "--save-probs", action="store_true", help="also STEM_probs.npy (float16, C x H x W)"
    )
    p.add_argument(
        "--frames", action="store_true",
        help="videos: also STEM_frames/NNNNNN.png, the mask of each frame (besides "
        "STEM_mask.mkv and STEM_overlay.mp4)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace the files of an earlier prediction in --output (inputs are never "
        "written over)",
    )  # fmt: skip
    p.add_argument(
        "--runtime", choices=["auto", "torch", "onnxruntime", "openvino"], default="auto",
        help="engine of a checkpoint's forward pass on the CPU: auto measures which is "
        "fastest here and agrees with PyTorch (once per model and machine, cached)",
    )  # fmt: skip
    tta_args(p)
    return p


def _cmd_predict(args) -> int:
    import json

    from segment_deeplab.infer.predict import run_predict

    tta = check_tta(args)
    result = run_predict(
        args.checkpoint,
        args.inputs,
        args.output,
        device=args.device,
        tta=tta,
        batch_size=args.batch_size,
        save_probs=args.save_probs,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        amp=args.amp,
        runtime=args.runtime,
        frames=args.frames,
    )
    if args.json:
        written = [str(p) for p in result.written]
        failed = [{"input": n, "reason": r} for n, r in result.failed]
        out = {"written": written, "failed": failed, "runtime": result.runtime}
        out["videos"] = [
            {"source": str(v.source), "mask": str(v.mask), "overlay": str(v.overlay),
             "frames": v.written, "skipped": v.skipped, "fps": v.fps}
            for v in result.videos
        ]  # fmt: skip
        print(json.dumps(out, indent=2))
    else:
        print(result.runtime_note, file=sys.stderr)
        print(f"{result.summary()} (in {args.output})")
    return 1 if result.failed else 0


def _add_report(sub) -> argparse.ArgumentParser:
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
    return p


def _cmd_report(args) -> int:
    from pathlib import Path

    from segment_deeplab.report import build_report

    run = Path(args.run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    run_files = ("metrics.jsonl", "config.yaml", "best.pt", "last.pt")
    if not any((run / n).exists() for n in run_files) and args.eval_dir is None:
        raise UserError(f"{run} is not a run folder: it holds none of {', '.join(run_files)}")
    if args.gallery < 0:
        raise UserError(f"--gallery must be 0 or more, got {args.gallery}")
    if args.eval_dir and not (Path(args.eval_dir) / "metrics.json").is_file():
        raise UserError(f"--eval {args.eval_dir} holds no metrics.json from `deeplab eval`")
    report = build_report(run, args.eval_dir, args.gallery, args.device)
    path = report.save(_report_path(args.output or run / "report.html"))
    for line in report.missing:
        print(f"missing: {line}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


def _report_path(path):
    """The report's file: new, or an earlier report (never another kind of file)."""
    from pathlib import Path

    from segment_deeplab.atomic import OutputError, check_writable_file

    path = check_writable_file(Path(path))
    if path.is_file():
        with path.open("rb") as f:
            if not f.read(64).lstrip().lower().startswith(b"<!doctype html"):
                raise OutputError(f"--output {path} exists and is not a report; choose a new name")
    return path


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


def register(sub) -> None:
    """Add this module's subcommands to the `deeplab` parser."""
    _add_eval(sub).set_defaults(handler=_cmd_eval)
    _add_predict(sub).set_defaults(handler=_cmd_predict)
    _add_report(sub).set_defaults(handler=_cmd_report)
