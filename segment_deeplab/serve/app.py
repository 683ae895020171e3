"""The HTTP app: POST an image, get its class-id mask, per-class shares or an overlay.

    POST /predict?output=mask|json|overlay   the image as the body, or multipart `file`
    GET  /classes                            [{id, name, color}]
    GET  /healthz                            ok, model, runtime, device, batch counters
    GET  /                                   a page to drop an image on (`serve.page`)
    GET  /docs                               the OpenAPI docs FastAPI writes

Each request is read (at most `max_bytes`), decoded by `data.decode.decode_rgb` (the
project's one decoder, EXIF orientation applied) in a thread, and handed to the
`Batcher`, which runs the `Segmenter`'s forward passes, batching concurrent requests of
the same size. The answers are encoded as `deeplab predict` writes its files: the mask a
P-mode PNG of the class ids in the class colours, the overlay a JPEG at quality 90.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from segment_deeplab.classes import to_dicts
from segment_deeplab.data.decode import decode_rgb
from segment_deeplab.data.spec import DatasetError
from segment_deeplab.serve.batcher import Batcher
from segment_deeplab.serve.page import PAGE

OVERLAY_QUALITY = 90  # the JPEG quality of `infer.predict.write_prediction`'s overlays
# After a body passes max_bytes, up to this much more is read and dropped, so the client
# gets to read the 413 instead of a connection reset; past it the connection is closed.
DRAIN_BYTES = 64 * 2**20
Output = Literal["mask", "json", "overlay"]
UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


@dataclass(frozen=True)
class Limits:
    """What one request may send: body bytes and decoded pixels (width x height)."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000


class _TooLarge(Exception):
    pass


def create_app(
    segmenter: Any,
    model_name: str = "",
    max_batch: int = 8,
    max_delay: float = 0.010,
    limits: Limits = Limits(),
) -> FastAPI:
    """The FastAPI app over a loaded `Segmenter` (see the module docstring).

    Args:
        segmenter: an `api.Segmenter`; its forward passes run in the batcher's thread.
        model_name: what /healthz calls the model (e.g. the checkpoint's path).
        max_batch, max_delay: the batcher's most images per pass and seconds of waiting.
        limits: body and image size limits (413 beyond them).
    """

    def forward(images):  # the worker thread: one pass for same-size images
        return segmenter.predict_batch(images, batch_size=len(images))

    batcher = Batcher(forward, max_batch, max_delay)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="segment-deeplab", summary="DeepLab semantic segmentation", lifespan=lifespan
    )
    app.state.segmenter, app.state.batcher = segmenter, batcher
    classes = to_dicts(segmenter.classes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    @app.get("/classes")
    async def get_classes() -> list[dict]:
        """The model's classes: id, name and colour (RGB)."""
        return classes

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness, the model and engine, and how many passes held how many images."""
        s = batcher.stats
        return {
            "ok": True, "model": model_name, "runtime": segmenter.runtime,
            "device": str(segmenter.device), "classes": len(classes),
            "batches": s.batches, "images": s.images, "largest_batch": s.largest,
            "failures": s.failures, "max_batch": max_batch, "max_delay_ms": max_delay * 1000,
        }  # fmt: skip

    @app.post("/predict", openapi_extra=UPLOAD_DOC)
    async def predict(request: Request, output: Output = "mask") -> Response:
        """Segment one image: `mask` (P-mode PNG of class ids), `json` (pixels and share of
        each class, image size, timing) or `overlay` (JPEG with a legend)."""
        t0 = time.perf_counter()
        data, where = await read_upload(request, limits.max_bytes)
        image = await asyncio.to_thread(decode, data, where, limits.max_pixels)
        t1 = time.perf_counter()
        try:
            answer = await batcher.submit(image)
        except Exception as e:  # this request's pass failed; the batcher carries on
            raise HTTPException(500, f"prediction failed: {type(e).__name__}: {e}") from e
        ids = answer.result
        if output == "mask":
            png = await asyncio.to_thread(mask_png, segmenter, ids)
            return Response(png, media_type="image/png")
        if output == "overlay":
            jpeg = await asyncio.to_thread(overlay_jpeg, segmenter, image, ids)
            return Response(jpeg, media_type="image/jpeg")
        timing = {
            "decode_ms": (t1 - t0) * 1000, "queued_ms": answer.queued_ms,
            "forward_ms": answer.forward_ms, "total_ms": (time.perf_counter() - t0) * 1000,
        }  # fmt: skip
        return JSONResponse(summary(ids, classes, timing, answer.batch))

    return app


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The image bytes of a request (raw body, or multipart field `file`) and what to call
    them in errors. Raises HTTPException 413 past `max_bytes`, 400 for a form without `file`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        # A client waiting for "100 Continue" (curl, for large bodies) sends nothing more.
        if request.headers.get("expect", "").lower() != "100-continue":
            await _drain(request.receive)
        raise HTTPException(413, _too_large(int(declared), max_bytes))
    seen = 0

    async def receive():  # counts what arrives, so a body without a length is capped too
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > max_bytes:
            raise _TooLarge
        return message

    limited = Request(request.scope, receive)
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await _form_file(limited)
        return await limited.body(), "upload"
    except _TooLarge:
        # A body of no stated length could go on for ever: answer, and close the
        # connection rather than read the rest (draining it raced the client's writes).
        detail = _too_large(seen, max_bytes, more=True)
        raise HTTPException(413, detail, headers={"Connection": "close"}) from None


async def _form_file(request: Request) -> tuple[bytes, str]:
    async with request.form(max_files=1, max_fields=8) as form:
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise HTTPException(400, "the multipart form needs the image in a file field `file`")
        return await file.read(), repr(file.filename or "upload")


async def _drain(receive) -> None:
    """Read and drop the rest of a body (at most DRAIN_BYTES)."""
    dropped = 0
    while dropped < DRAIN_BYTES:
        message = await receive()
        dropped += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _too_large(n: int, max_bytes: int, more: bool = False) -> str:
    return (
        f"the upload is {'over ' if more else ''}{_mb(n)}; this server takes images of at "
        f"most {_mb(max_bytes)} (deeplab serve --max-bytes)"
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"


def decode(data: bytes, where: str, max_pixels: int):
    """uint8 (3, H, W) RGB of uploaded bytes; HTTPException 413 for a picture over
    `max_pixels` (checked in the header first, before decoding), 400 for bytes that are
    no readable image."""
    size = None
    # No header PIL knows: the decoder below says why.
    with contextlib.suppress(Exception), Image.open(io.BytesIO(data)) as im:
        size = im.size
    if size is not None:
        _check_pixels(*size, max_pixels)
    try:
        image = decode_rgb(data, where)
    except DatasetError as e:
        raise HTTPException(400, str(e)) from e
    _check_pixels(image.shape[2], image.shape[1], max_pixels)
    return image


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise HTTPException(
            413,
            f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; this server takes at most "
            f"{max_pixels / 1e6:g} (deeplab serve --max-pixels)",
        )


def mask_png(segmenter: Any, ids: np.ndarray) -> bytes:
    """The P-mode PNG `deeplab predict` writes: class ids as pixels, class colours."""
    buf = io.BytesIO()
    segmenter.colorize(ids).save(buf, format="PNG")
    return buf.getvalue()


def overlay_jpeg(segmenter: Any, image, ids: np.ndarray) -> bytes:
    """The overlay `deeplab predict` writes: classes blended in, legend beside, JPEG."""
    buf = io.BytesIO()
    segmenter.overlay(image, ids).save(buf, format="JPEG", quality=OVERLAY_QUALITY)
    return buf.getvalue()


def summary(ids: np.ndarray, classes: list[dict], timing: dict, batch: int) -> dict:
    """The JSON answer: image size, each class's pixels and share, timing."""
    counts = np.bincount(ids.ravel(), minlength=len(classes))[: len(classes)]
    total = int(ids.size)
    per_class = [
        {**c, "pixels": int(n), "share": int(n) / total if total else 0.0}
        for c, n in zip(classes, counts, strict=True)
    ]
    return {
        "width": int(ids.shape[1]), "height": int(ids.shape[0]), "classes": per_class,
        "timing": {k: round(v, 3) for k, v in timing.items()}, "batch": batch,
    }  # fmt: skip


def warm_up(segmenter: Any, size: tuple[int, int] = (360, 480)) -> None:
    """One pass on a grey (H, W) image: the runtime is chosen (`infer.runtimes`) and the
    model's first-call costs are paid before the first request rather than during it."""
    import torch

    segmenter.predict(torch.full((3, *size), 128, dtype=torch.uint8))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). Raises OSError, e.g.
    when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def make_server(app: FastAPI, access_log: bool = False) -> uvicorn.Server:
    """A uvicorn server for `app`: its own logs at warning level, the access log off
    unless asked for."""
    config = uvicorn.Config(app, access_log=access_log, log_level="warning", lifespan="on")
    if access_log:  # uvicorn sets its access logger to log_level; requests log at info
        import logging

        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    return uvicorn.Server(config)


def _say(line: str) -> None:
    print(line, flush=True)


def serve(app: FastAPI, sock: socket.socket, access_log: bool = False, on_ready=_say) -> None:
    """Serve `app` on the bound `sock` until Ctrl-C; `on_ready(line)` once it listens."""
    server = make_server(app, access_log)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            url = url_of(sock)
            on_ready(f"serving on {url} (page: {url}/, API docs: {url}/docs; Ctrl-C stops)")
        await task

    asyncio.run(main())
    # uvicorn re-raises the Ctrl-C it caught once it has shut down, but asyncio's own
    # SIGINT handler can take that second signal after the task has finished and drop
    # it: a server that started and was told to exit was stopped by a signal.
    if server.started and server.should_exit:
        raise KeyboardInterrupt
