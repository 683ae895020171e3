"""`deeplab synth`, `validate`, `prepare`: from two folders to a checked dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segment_deeplab.cli.common import UserError, dataset_args


def _add_synth(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("synth", help="generate a small synthetic dataset (demo, tests)")
    p.add_argument("output", help="folder to write images/, masks/ and dataset.yaml into")
    p.add_argument("--num", type=int, default=64, help="number of image/mask pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=[128, 160], metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=4, help="classes including background")
    return p


def _cmd_synth(args) -> int:
    from segment_deeplab.atomic import check_writable_dir
    from segment_deeplab.data.synthetic import generate

    out = check_writable_dir(args.output, flag="OUTPUT")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; synth writes a new dataset into a new folder")
    try:
        spec = generate(
            out, num=args.num, seed=args.seed, size=tuple(args.size), num_classes=args.classes
        )
    except ValueError as e:
        raise UserError(f"synth: {e}") from e
    print(f"wrote {args.num} pairs and {spec} ({args.classes} classes)")
    return 0


def _add_validate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "validate",
        help="check every image/mask pair and report every problem",
        description="Read every image/mask pair and list every problem per file; exit 1 on "
        "errors (warnings do not fail). Without dataset.yaml, checks against the ids the "
        "masks contain.",
    )
    dataset_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--workers", type=int, metavar="N", help="reader processes (default: cores)")
    return p


def _cmd_validate(args) -> int:
    import json

    from segment_deeplab.data.spec import resolve_dataset
    from segment_deeplab.data.validate import format_report, validate_dataset

    spec, image_dir, mask_dir, _ = resolve_dataset(args.dataset, args.images, args.masks, args.spec)
    report = validate_dataset(
        spec,
        image_dir,
        mask_dir,
        workers=args.workers,
        progress=not args.json and sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


def _add_prepare(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prepare",
        help="validate, split train/val and write dataset.yaml with class statistics",
        description="Validate (after --remap), then write a seeded train/val split, class "
        "statistics and a content hash into dataset.yaml (your lines in it are kept, and "
        "the original copied to dataset.yaml.bak). Images and masks are never modified.",
    )
    dataset_args(p, required=False)
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
        "--group-by",
        metavar="REGEX",
        help="keep groups whole: the regex's match in a file name (its first capture group "
        "if it has one) names the group, e.g. a video sequence, patient or site, and no "
        "group is split between train and val; e.g. '^([^_]+)_' for SEQ_FRAME names",
    )
    p.add_argument(
        "--remap",
        nargs="+",
        metavar="SRC:DST",
        help="change mask values before checking them, e.g. 255:1 for 0/255 binary masks; "
        "writes new masks",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--workers", type=int, metavar="N", help="reader processes (default: cores)")
    _add_shard_args(p)
    return p


def _add_shard_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "shards",
        "also write each split as shards into OUTPUT/shards/ with a manifest.json, for "
        "training across machines or from object storage (--data .../manifest.json)",
    )
    one = g.add_mutually_exclusive_group()
    one.add_argument(
        "--shards", type=int, metavar="N",
        help="train in N shards of near-equal sample counts (a seeded random mix each); "
        "val in as many in proportion to its size",
    )  # fmt: skip
    one.add_argument(
        "--shard-size", metavar="SIZE",
        help="shards of at most SIZE bytes, e.g. 1GB, 500MB or 1GiB",
    )  # fmt: skip
    g.add_argument(
        "--shard-format",
        "--format", choices=["webdataset", "tfrecord"],
        help="webdataset: tars of the image and mask files (default); tfrecord: TF "
        "DeepLab's build_data.py records",
    )  # fmt: skip


def _shard_plan(args):
    """(shards, shard_size, format) from the flags, checked before the long pass; None
    without --shards or --shard-size."""
    from segment_deeplab.data.shard_write import check_shard_args, parse_size

    if args.shards is None and args.shard_size is None:
        if args.shard_format:
            raise UserError("--shard-format needs --shards N or --shard-size SIZE")
        return None
    size = parse_size(args.shard_size) if args.shard_size is not None else None
    fmt = args.shard_format or "webdataset"
    check_shard_args(args.shards, size, fmt)
    return args.shards, size, fmt


def _prepare_command(args) -> str:
    """The command line, as the manifest's created_by."""
    import shlex

    words = ["deeplab", "prepare"] + ([args.dataset] if args.dataset else [])
    for flag, value in (
        ("--images", args.images), ("--masks", args.masks), ("--spec", args.spec),
        ("--output", args.output), ("--val-fraction", args.val_fraction),
        ("--seed", args.seed), ("--group-by", args.group_by),
        ("--shards", args.shards), ("--shard-size", args.shard_size),
        ("--shard-format", args.shard_format),
    ):  # fmt: skip
        if value is not None:
            words += [flag, str(value)]
    if args.remap:
        words += ["--remap", *args.remap]
    return shlex.join(words)


def _write_shards(args, res, plan, out_dir: Path, progress: bool):
    from segment_deeplab.data.shard_write import summary, write_shards

    shards, size, fmt = plan
    manifest = write_shards(res, out_dir, shards, size, fmt, progress, _prepare_command(args))
    return manifest, {"manifest": manifest.location, "format": fmt, "splits": summary(manifest)}


def _cmd_prepare(args) -> int:
    import json

    from segment_deeplab.data.prepare import ValidationFailed, parse_remap, prepare_dataset
    from segment_deeplab.data.shard_write import (
        check_shards_output,
        format_size,
        prepare_output_dir,
    )
    from segment_deeplab.data.validate import format_report

    plan = _shard_plan(args)
    progress = not args.json and sys.stderr.isatty()
    if plan:
        out_dir = prepare_output_dir(args.dataset, args.images, args.masks, args.spec, args.output)
        check_shards_output(out_dir)
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
            group_by=args.group_by,
            workers=args.workers,
            progress=progress,
        )
    except ValidationFailed as e:
        print(json.dumps(e.report.to_dict()) if args.json else format_report(e.report))
        print(f"error: {e}", file=sys.stderr)
        return 1
    sharded = _write_shards(args, res, plan, out_dir, progress) if plan else None
    if args.json:
        print(json.dumps({**res.to_dict(), **({"shards": sharded[1]} if sharded else {})}))
        return 0
    for w in res.report.warnings:
        print(f"warning {w.code}: {w.message}")
    stats = res.spec.stats
    print(
        f"{len(res.train)} train / {len(res.val)} val pairs (seed {args.seed}), "
        f"{res.spec.num_classes} classes, ignore {res.spec.ignore_index} "
        f"({stats['ignore_share']:.1%} of pixels)"
    )
    if res.groups:
        for side in ("train", "val"):
            names = res.groups[side]
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            print(f"  {side}: {len(names)} group{'s' * (len(names) != 1)} ({shown})")
    if res.converted_masks:
        print(f"wrote index masks to {res.converted_masks} (your masks are unchanged)")
    print(f"wrote {res.spec_path} and its splits/ ({res.spec.hash[:19]}...)")
    if res.backup:
        print(f"your lines in it are kept as they were; the original is also in {res.backup}")
    if sharded:
        for split, c in sharded[1]["splits"].items():
            print(
                f"{split}: {c['shards']} shard{'s' * (c['shards'] != 1)}, {c['samples']} "
                f"samples, {format_size(c['bytes'])}"
            )
        print(f"wrote {sharded[1]['format']} shards and {sharded[0].location}")
    if res.placeholders:
        print(
            f"there was no dataset.yaml: the classes are placeholders named class_<id> with "
            f"default colours; edit their names and colours in {res.spec_path}"
        )
    return 0


def _add_import(sub) -> argparse.ArgumentParser:
    from segment_deeplab.data.importers import FORMATS

    p = sub.add_parser(
        "import",
        help="turn an annotation tool's export (COCO, CVAT, Label Studio, labelme, "
        "TFRecord) into a dataset folder, then validate it",
        description="Write images/ (linked or copied, never re-encoded), masks/ (index "
        "PNGs) and dataset.yaml (classes, ids and colours from the export) into a new "
        "folder, then validate it. The export is never modified. Formats: "
        + "; ".join(f"{k}: {v[2]}" for k, v in FORMATS.items()),
    )
    p.add_argument("format", choices=list(FORMATS), metavar="FORMAT", help=", ".join(FORMATS))
    p.add_argument("source", nargs="+", help="the export: file(s) or folder")
    p.add_argument("--output", required=True, metavar="DIR", help="new dataset folder")
    p.add_argument(
        "--images", metavar="DIR",
        help="folder the export's image names are relative to (default: found beside it)",
    )  # fmt: skip
    p.add_argument(
        "--labels", metavar="NAMES|FILE",
        help="class order after background: 'road,car,person' or a file with one name per "
        "line; a label not listed is an error (default: every label in the export)",
    )  # fmt: skip
    p.add_argument(
        "--overlap", choices=["later", "smaller", "ignore"],
        help="where objects overlap: the later one (drawing order, z_order) on top, the "
        "smaller one on top, or 255 (default: smaller for COCO, later for the others)",
    )  # fmt: skip
    p.add_argument(
        "--crowd", choices=["class", "ignore", "skip"], default="class",
        help="COCO iscrowd regions: painted as their class, as 255 (ignored), or left out",
    )  # fmt: skip
    p.add_argument(
        "--empty", choices=["keep", "skip"], default="keep",
        help="images without annotations: kept as all background, or left out",
    )  # fmt: skip
    p.add_argument("--copy", action="store_true", help="copy images instead of hard-linking")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def _cmd_import(args) -> int:
    import json
    import shlex

    from segment_deeplab.data.import_common import ImportOptions, read_label_list
    from segment_deeplab.data.importers import run_import
    from segment_deeplab.data.validate import format_report

    opts = ImportOptions(
        images=Path(args.images) if args.images else None,
        labels=read_label_list(args.labels),
        overlap=args.overlap,
        crowd=args.crowd,
        empty=args.empty,
        copy=args.copy,
        progress=not args.json and sys.stderr.isatty(),
        command=shlex.join(["deeplab", "import", args.format, *args.source]),
    )
    res = run_import(args.format, args.source, args.output, opts)
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0 if res.report.ok else 1
    c = res.counts
    rate = c["images"] / res.seconds if res.seconds > 0 else 0.0
    print(
        f"imported {c['images']} images into {args.output} in {res.seconds:.1f} s "
        f"({rate:.0f} images/s), {res.spec.num_classes} classes: " + ", ".join(res.spec.class_names)
    )
    for key, what in (
        ("skipped_empty", "images without annotations left out (--empty skip)"),
        ("unannotated", "tasks without a finished annotation left out"),
        ("skipped_shapes", "shapes without an area (lines, points) not painted"),
        ("skipped_results", "results that are no area (choices, text, keypoints) not painted"),
        ("corrupt_records", "corrupt records skipped (listed above)"),
    ):
        if c.get(key):
            print(f"  {c[key]} {what}")
    if res.spec.splits:
        print("  splits: " + ", ".join(f"{k} {v}" for k, v in c.get("splits", {}).items()))
    print(format_report(res.report))
    if res.report.ok:
        nxt = (
            f"deeplab train --data {args.output} --output runs/first"
            if {"train", "val"} <= set(res.spec.splits)
            else f"deeplab prepare {args.output} --val-fraction 0.2"
        )
        print(f"next: {nxt}")
    return 0 if res.report.ok else 1


def register(sub) -> None:
    """Add this module's subcommands to the `deeplab` parser."""
    _add_synth(sub).set_defaults(handler=_cmd_synth)
    _add_validate(sub).set_defaults(handler=_cmd_validate)
    _add_prepare(sub).set_defaults(handler=_cmd_prepare)
    _add_import(sub).set_defaults(handler=_cmd_import)
