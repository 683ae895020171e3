"""`deeplab serve`: an HTTP server over a checkpoint or export (see `segment_deeplab.serve`).

Nothing heavy is imported at parse time (`deeplab serve --help` stays fast): torch,
FastAPI and uvicorn load in the handler.
"""

from __future__ import annotations

import argparse
import re
import sys

from segment_deeplab.cli.common import UserError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def _amount(text: str, base: int, what: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}, e.g. 20MB or 40M")
    value = float(m.group(1)) * base ** _POWERS[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return int(value)


def byte_size(text: str) -> int:
    """'20MB', '20M', '512k', '1048576' -> bytes (K, M, G are powers of 1024)."""
    return _amount(text, 1024, "a size in bytes")


def pixel_count(text: str) -> int:
    """'40M', '40MP', '1.5G', '12000000' -> pixels (K, M, G are powers of 1000)."""
    return _amount(text.upper().removesuffix("P"), 1000, "a number of pixels")


def _add_serve(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP: POST /predict, a page to drop images on, /docs",
        description="An HTTP server (FastAPI on uvicorn) over a checkpoint or export. "
        "POST /predict with the image as the body (Content-Type image/*) or multipart field "
        "`file`; ?output=mask (P-mode PNG of class ids, as `deeplab predict` writes), json "
        "(pixels and share per class) or overlay (JPEG). GET /classes, /healthz, / (a page "
        "to drop an image on) and /docs. Concurrent requests for same-size images share "
        "forward passes. Needs `pip install 'segment-deeplab[serve]'`.",
    )
    p.add_argument(
        "--checkpoint", required=True,
        help="run folder, checkpoint, or exported .onnx/.pt/.safetensors",
    )  # fmt: skip
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    g.add_argument(
        "--port", type=int, default=8000, help="TCP port (default: 8000; 0: any free port)"
    )
    g.add_argument("--access-log", action="store_true", help="log every request (uvicorn's log)")
    g = p.add_argument_group("batching")
    g.add_argument(
        "--max-batch", type=int, default=8, metavar="N",
        help="most same-size images in one forward pass (default: 8)",
    )  # fmt: skip
    g.add_argument(
        "--max-delay-ms", type=float, default=10.0, metavar="MS",
        help="how long a request waits for others to share its pass (default: 10)",
    )  # fmt: skip
    g = p.add_argument_group("limits (over them: 413)")
    g.add_argument(
        "--max-bytes", type=byte_size, default=byte_size("20MB"), metavar="SIZE",
        help="largest upload, e.g. 20MB (default; K/M/G are powers of 1024)",
    )  # fmt: skip
    g.add_argument(
        "--max-pixels", type=pixel_count, default=pixel_count("40M"), metavar="N",
        help="largest image, width x height, e.g. 40M (default: 40 megapixels)",
    )  # fmt: skip
    g = p.add_argument_group("model")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--runtime", choices=["auto", "torch", "onnxruntime", "openvino"], default="auto",
        help="engine of a checkpoint's forward pass on the CPU: auto measures which is "
        "fastest here and agrees with PyTorch (once per model and machine, cached)",
    )  # fmt: skip
    return p


def _cmd_serve(args) -> int:
    from segment_deeplab.serve import MissingServeDeps, require

    try:
        require()
    except MissingServeDeps as e:
        raise UserError(str(e)) from None
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_delay_ms < 0:
        raise UserError(f"--max-delay-ms must be 0 or more, got {args.max_delay_ms}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")

    from segment_deeplab.api import Segmenter
    from segment_deeplab.serve.app import Limits, bind, create_app, serve, warm_up

    try:  # before the model loads: a taken port is said at once
        sock = bind(args.host, args.port)
    except OSError as e:
        raise UserError(
            f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; choose another "
            "--port (0: any free one) or --host"
        ) from None
    with sock:
        seg = Segmenter.from_checkpoint(args.checkpoint, device=args.device, runtime=args.runtime)
        print(f"warming up {args.checkpoint} on {seg.device} ...", file=sys.stderr, flush=True)
        warm_up(seg)
        print(seg.choice.describe(), file=sys.stderr, flush=True)
        limits = Limits(args.max_bytes, args.max_pixels)
        app = create_app(
            seg, str(args.checkpoint), args.max_batch, args.max_delay_ms / 1000, limits
        )
        serve(app, sock, access_log=args.access_log)
    return 0


def register(sub) -> None:
    """Add `deeplab serve` to the `deeplab` parser."""
    _add_serve(sub).set_defaults(handler=_cmd_serve)
