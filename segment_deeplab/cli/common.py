"""Pieces the subcommands share: the user-error type and common argument groups."""

from __future__ import annotations

import argparse


class UserError(Exception):
    """An input problem the user can fix; printed without a traceback."""


def dataset_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument(
        "dataset",
        nargs="?" if not required else None,
        help="dataset folder (images/ + masks/ + dataset.yaml) or a dataset.yaml",
    )
    g.add_argument("--images", metavar="DIR", help="image folder, for other layouts")
    g.add_argument("--masks", metavar="DIR", help="mask folder, for other layouts")
    g.add_argument("--spec", metavar="FILE", help="a dataset.yaml kept elsewhere")


def tta_args(p: argparse.ArgumentParser) -> None:
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
    g.add_argument(
        "--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
        help="precision of the forward pass: auto is bf16 on GPUs and AMX CPUs (as training "
        "uses), off is fp32 (exported models always run as saved)",
    )  # fmt: skip
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_tta(args):
    """The TTA the flags ask for, with the device and precision checked, before any
    model is loaded. Returns an `infer.tta.TTA`."""
    from segment_deeplab.device import DeviceError, pick_device
    from segment_deeplab.infer.tta import TTA

    try:
        device = pick_device(args.device)
    except DeviceError as e:
        raise UserError(f"--device {args.device}: {e}") from e
    if args.amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device, not {device}; use bf16 or off")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        return TTA(tuple(args.scales), args.flip, args.window)
    except ValueError as e:
        raise UserError(f"--scales/--window: {e}") from e
