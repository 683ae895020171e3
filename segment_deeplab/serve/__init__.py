"""`deeplab serve`: a model behind HTTP, with concurrent requests batched together.

Why FastAPI on uvicorn: an ASGI app handles requests as coroutines on one event loop,
so many requests can be waiting at once while the batcher (`serve.batcher`) gathers them
into shared forward passes, and the passes themselves run in a worker thread that never
blocks the loop; a thread-per-request WSGI server would need locks and queues for the
same. FastAPI adds request validation and the OpenAPI docs (/docs) for free, and
FastAPI + uvicorn is the standard pair that people already know how to deploy.

    app.py       the routes, upload limits, decoding and encoding, the uvicorn server
    batcher.py   the dynamic batcher
    page.py      the HTML page at /

They are an optional extra (`pip install 'segment-deeplab[serve]'`); `require()` says so
in one line when they are missing. Nothing here is imported by the rest of the package.
"""

from __future__ import annotations

INSTALL = "pip install 'segment-deeplab[serve]'"


class MissingServeDeps(ImportError):
    """FastAPI, uvicorn or python-multipart is not installed."""


def require() -> None:
    """Raise MissingServeDeps, naming the install command, if a server package is missing."""
    missing = []
    # python-multipart is `python_multipart` since 0.0.13, `multipart` before.
    for package, modules in (
        ("fastapi", ["fastapi"]), ("uvicorn", ["uvicorn"]),
        ("python-multipart", ["python_multipart", "multipart"]),
    ):  # fmt: skip
        if not any(_importable(m) for m in modules):
            missing.append(package)
    if missing:
        raise MissingServeDeps(f"deeplab serve needs {', '.join(missing)}: {INSTALL}")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
