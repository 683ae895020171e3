"""The `deeplab` command line: argparse subcommands with thin handlers over the library.

Each subcommand has an `_add_<name>(subparsers)` that declares its arguments and a
`_cmd_<name>(args) -> int` handler. Library errors that the user can fix
(DatasetError, ConfigError, CheckpointError, ...) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
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
