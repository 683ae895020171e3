"""`deeplab export`: ONNX, OpenVINO, TorchScript, safetensors or a TensorRT engine, checked
against PyTorch."""

from __future__ import annotations

import argparse
import sys

from segment_deeplab.cli.common import UserError


def _add_export(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX, OpenVINO, TorchScript, safetensors or TensorRT, "
        "parity-checked",
        description="Write the model with its classes, colours and normalisation inside, "
        "after checking the reloaded file against PyTorch (max logit difference, argmax "
        "agreement); a file that disagrees is not written and the exit status is 1.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--output", required=True, metavar="FILE", help="file to write")
    p.add_argument(
        "--format", dest="fmt", metavar="FORMAT",
        help="onnx, openvino (IR: NAME.xml + NAME.bin), torchscript, safetensors, or "
        "tensorrt (an fp16 engine for this machine's GPU: NAME.engine + NAME.json) "
        "(default: from the --output suffix)",
    )  # fmt: skip
    p.add_argument(
        "--with-preprocessing", action="store_true",
        help="take uint8 (N, H, W, 3) RGB images as they are decoded; no scaling by the caller",
    )  # fmt: skip
    p.add_argument(
        "--with-argmax", action="store_true", help="output class ids (N, H, W) instead of logits"
    )
    p.add_argument(
        "--opset", type=int, default=18,
        help="ONNX opset (default: 18, torch's torch.export-based exporter; 11-17 use the "
        "TorchScript-based one, for older runtimes)",
    )  # fmt: skip
    p.add_argument(
        "--max-batch", type=int, default=4,
        help="tensorrt: the largest batch the engine runs at once; larger ones run in "
        "chunks (default: 4; more needs more GPU memory)",
    )  # fmt: skip
    p.add_argument(
        "--max-side", type=int, default=2048,
        help="tensorrt: the largest height or width the engine takes (default: 2048)",
    )  # fmt: skip
    p.add_argument("--data", metavar="DATASET", help="dataset or image folder for the parity check")
    p.add_argument("--spec", metavar="FILE", help="a dataset.yaml kept elsewhere")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _cmd_export(args) -> int:
    import json

    from segment_deeplab.export.parity import ParityError
    from segment_deeplab.export.runtime import ExportError
    from segment_deeplab.export.write import export

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
            overwrite=args.overwrite,
            max_batch=args.max_batch,
            max_side=args.max_side,
        )
    except ParityError as e:
        print(f"error: parity check failed: {e}; nothing written to {args.output}", file=sys.stderr)
        return 1
    except ExportError as e:
        raise UserError(str(e)) from e
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.path is not None:
        also = f" and {result.sidecar.name}" if result.sidecar else ""
        print(f"wrote {result.path}{also} ({result.format}, {result.seconds:.1f} s)")
    if not args.json or not result.parity.passed:
        print(result.parity.summary(), file=sys.stdout if result.parity.passed else sys.stderr)
    if not result.parity.passed:
        print(
            f"error: the exported model does not match PyTorch; nothing written to {args.output}",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_import_tf(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "import-tf",
        help="turn a TF DeepLab checkpoint (model zoo or your own) into a segment-deeplab one",
        description="Read a TensorFlow V2 checkpoint (PREFIX.index + PREFIX.data-*; no "
        "TensorFlow needed), map TF DeepLab's variables to the model, and write a "
        "checkpoint that eval, predict, export and --init-checkpoint take. The model keeps "
        "TF's arithmetic (model.tf_compat), so its outputs are TF's.",
    )
    p.add_argument(
        "checkpoint", metavar="CKPT_PREFIX", help="model.ckpt (or .index, or its folder)"
    )
    p.add_argument("--model-variant", required=True, help="xception_65, mobilenet_v2, ...")
    p.add_argument("--num-classes", type=int, help="needed when the checkpoint has no logits")
    p.add_argument(
        "--output-stride", type=int, choices=[8, 16, 32],
        help="TF's output_stride (default: 16; 32 for the mobilenet_v3 head, as its zoo)",
    )  # fmt: skip
    p.add_argument(
        "--image-pooling-crop-size", type=_pair, metavar="H,W",
        help="TF's image_pooling_crop_size, or none for the whole image (default: none; "
        "769,769 for the mobilenet_v3 head, as its zoo)",
    )  # fmt: skip
    p.add_argument(
        "--image-pooling-stride", type=_pair, metavar="H,W",
        help="TF's image_pooling_stride (default: 1,1; 4,5 for the mobilenet_v3 head)",
    )  # fmt: skip
    p.add_argument("--output", required=True, metavar="FILE", help="the .pt to write")
    p.add_argument("--data", metavar="DATASET", help="take the class names from this dataset")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _pair(text: str) -> list[int]:
    """'769,769' -> [769, 769] (TF's comma-separated flag values); 'none' -> []."""
    if text.strip().lower() in ("none", "null"):
        return []
    try:
        values = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give two positive integers, e.g. 769,769")
    return values


def _cmd_import_tf(args) -> int:
    import json
    from pathlib import Path

    from segment_deeplab.atomic import check_writable_file
    from segment_deeplab.checkpoint import FORMAT, save
    from segment_deeplab.classes import placeholder_classes, to_dicts
    from segment_deeplab.config import Config
    from segment_deeplab.models.tf_import import import_tf, summary

    out = check_writable_file(args.output)
    if out.exists():
        raise UserError(f"--output {out} exists; choose a new file (nothing is written over)")
    model, report = import_tf(
        args.checkpoint, args.model_variant, args.num_classes, args.output_stride,
        args.image_pooling_crop_size, args.image_pooling_stride,
    )  # fmt: skip
    classes = placeholder_classes(list(range(model.cfg.num_classes)))
    if args.data:
        from segment_deeplab.data.spec import open_dataset

        spec = open_dataset(args.data)
        if spec.num_classes != model.cfg.num_classes:
            raise UserError(
                f"--data {args.data} has {spec.num_classes} classes, the checkpoint "
                f"{model.cfg.num_classes}"
            )
        classes = spec.classes
    cfg = Config()
    cfg.model = model.cfg
    save(
        {
            "format": FORMAT,
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "classes": to_dicts(classes),
            "ignore_index": 255,
            "step": 0,
            "imported_from": str(Path(args.checkpoint).resolve()),
        },
        out,
    )
    if args.json:
        print(json.dumps({"output": str(out), "mapped": report.mapped,
                          "left_in_tf": report.left_in_tf, "new_in_model": report.new_in_model,
                          "head_is_new": report.head_is_new}))  # fmt: skip
        return 0
    print(summary(report))
    print(
        f"wrote {out} ({model.cfg.model_variant}, {model.cfg.num_classes} classes, TF arithmetic)"
    )
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `deeplab` parser."""
    _add_export(sub).set_defaults(handler=_cmd_export)
    _add_import_tf(sub).set_defaults(handler=_cmd_import_tf)
