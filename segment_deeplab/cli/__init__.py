"""The `deeplab` command line: argparse subcommands with thin handlers over the library.

Each module here adds its subcommands with `register(subparsers)`; a handler takes the
parsed arguments and returns the exit status. Errors the user can fix (DatasetError,
ConfigError, CheckpointError, ModelError, DeviceError, ExportError, UserError) print one
line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from segment_deeplab import __version__
from segment_deeplab.cli import data, export, inference, serve, train
from segment_deeplab.cli.common import UserError

__all__ = ["UserError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeplab",
        description="DeepLab v3 / v3+ semantic segmentation for your own images and masks.",
    )
    parser.add_argument("--version", action="version", version=f"segment-deeplab {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (data, train, inference, export, serve):
        module.register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported here so `deeplab --help` stays fast (no torch import).
    from segment_deeplab.atomic import OutputError
    from segment_deeplab.checkpoint import CheckpointError
    from segment_deeplab.config import ConfigError
    from segment_deeplab.data.spec import DatasetError
    from segment_deeplab.device import DeviceError
    from segment_deeplab.export.runtime import ExportError
    from segment_deeplab.models import ModelError
    from segment_deeplab.models.tf_checkpoint import TFCheckpointError

    errors = (UserError, ConfigError, DatasetError, CheckpointError, ModelError, DeviceError)
    return (*errors, ExportError, OutputError, TFCheckpointError)


def _message(e: BaseException) -> str:
    """The error's own words; for one raised in a DataLoader worker, the original's
    last line (torch wraps it in the worker's traceback)."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _os_error(e: OSError) -> str:
    """A file system error as one line that names the file: disk full, no permission."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}" if e.strerror else str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("DEEPLAB_DEBUG", "") not in ("", "0")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, _user_errors()):
            print(f"error: {_message(e)}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):
            print(f"error: {_os_error(e)}", file=sys.stderr)
            return 2
        # Not a mistake of the user's: say what broke, in one line, and how to see more.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"error: {type(e).__name__}: {first} (an unexpected failure; `deeplab --debug "
            f"{args.command} ...` shows the traceback to report)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
