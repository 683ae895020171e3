"""`deeplab serve`: a real uvicorn server on a loopback port, answers equal to `Segmenter`'s,
limits, failures that leave the server working, batching, and the page in Chromium."""

from __future__ import annotations

import asyncio
import io
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import make_run
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx")

from segment_deeplab.api import Segmenter  # noqa: E402
from segment_deeplab.cli import main  # noqa: E402
from segment_deeplab.cli.serve import byte_size, pixel_count  # noqa: E402
from segment_deeplab.serve.app import (  # noqa: E402
    OVERLAY_QUALITY,
    Limits,
    bind,
    create_app,
    make_server,
    url_of,
)
from segment_deeplab.serve.batcher import Batcher  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = [
    {"id": 0, "name": "background", "color": [0, 0, 0]},
    {"id": 1, "name": "road", "color": [128, 64, 128]},
    {"id": 2, "name": "sky", "color": [70, 130, 180]},
    {"id": 3, "name": "tree", "color": [0, 128, 0]},
]
MAX_BYTES, MAX_PIXELS = 300_000, 1_000_000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _photo(h: int = 72, w: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth random picture (a few blobs of colour), (H, W, 3) uint8."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _encode(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve") / "run", CLASSES)


@pytest.fixture(scope="module")
def reference(run):
    """The model as the Python API runs it, apart from the server's copy."""
    return Segmenter.from_checkpoint(run, device="cpu", runtime="torch")


@pytest.fixture(scope="module")
def server(run):
    """(base URL, app) of uvicorn serving the tiny run in a background thread."""
    seg = Segmenter.from_checkpoint(run, device="cpu", runtime="torch")
    # 50 ms of gathering: 8 threads starting together all arrive within it on a busy CI box.
    app = create_app(
        seg, str(run), max_batch=8, max_delay=0.05, limits=Limits(MAX_BYTES, MAX_PIXELS)
    )
    sock = bind("127.0.0.1", 0)
    uv = make_server(app)
    thread = threading.Thread(target=lambda: asyncio.run(uv.serve(sockets=[sock])), daemon=True)
    thread.start()
    for _ in range(500):
        if uv.started or not thread.is_alive():
            break
        threading.Event().wait(0.01)
    assert uv.started, "uvicorn did not start"
    yield url_of(sock), app
    uv.should_exit = True
    thread.join(10)
    sock.close()


def _post(url: str, data: bytes, output: str = "mask", multipart: bool = False, **kw):
    if multipart:
        files = {"file": ("photo.png", data, "image/png")}
        return httpx.post(f"{url}/predict", params={"output": output}, files=files, timeout=60)
    headers = {"content-type": "image/png"}
    return httpx.post(f"{url}/predict", params={"output": output}, content=data, headers=headers,
                      timeout=60, **kw)  # fmt: skip


def test_mask_json_and_overlay_equal_the_python_api(server, reference):
    url, _ = server
    rgb = _photo()
    expected = reference.predict(rgb)
    r = _post(url, _encode(rgb))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = Image.open(io.BytesIO(r.content))
    assert mask.mode == "P"  # class ids as pixels, in the class colours, as predict writes
    np.testing.assert_array_equal(np.asarray(mask), expected)
    assert mask.getpalette()[:12] == [v for c in CLASSES for v in c["color"]]

    r = _post(url, _encode(rgb), "json", multipart=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (96, 72)
    counts = np.bincount(expected.ravel(), minlength=len(CLASSES))
    assert [c["pixels"] for c in body["classes"]] == counts.tolist()
    assert [c["name"] for c in body["classes"]] == [c["name"] for c in CLASSES]
    assert sum(c["share"] for c in body["classes"]) == pytest.approx(1.0)
    assert body["timing"]["forward_ms"] > 0 and body["batch"] >= 1

    r = _post(url, _encode(rgb), "overlay")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    buf = io.BytesIO()
    reference.overlay(rgb, expected).save(buf, format="JPEG", quality=OVERLAY_QUALITY)
    assert r.content == buf.getvalue()


def test_a_corrupt_upload_is_400_naming_the_problem_and_the_next_works(server):
    url, _ = server
    r = _post(url, b"this is no picture")
    assert r.status_code == 400
    assert "cannot read image" in r.json()["detail"] and "not an image" in r.json()["detail"]
    truncated = _encode(_photo(), "JPEG")[:300]
    r = _post(url, truncated, "json", multipart=True)
    assert r.status_code == 400 and "'photo.png'" in r.json()["detail"], r.text
    r = httpx.post(f"{url}/predict", files={"other": ("x.png", b"..")}, timeout=60)
    assert r.status_code == 400 and "`file`" in r.json()["detail"]
    assert _post(url, _encode(_photo())).status_code == 200


def test_too_large_bodies_and_images_are_413(server):
    url, _ = server
    big = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    data = _encode(big)  # noise does not compress: about 480 KB
    assert len(data) > MAX_BYTES
    r = _post(url, data)
    assert r.status_code == 413 and "--max-bytes" in r.json()["detail"]
    # Without a Content-Length (chunked), the server counts what arrives, answers 413 and
    # closes the connection; a client still writing may see the close first.
    chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
    try:
        r = _post(url, chunks)
        assert r.status_code == 413 and "over" in r.json()["detail"]
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass
    r = _post(url, _encode(np.zeros((1100, 1000, 3), np.uint8)))  # 1.1 MP, a few KB
    assert r.status_code == 413 and "--max-pixels" in r.json()["detail"], r.text
    assert _post(url, _encode(_photo())).status_code == 200


def test_a_failing_pass_answers_500_and_the_server_carries_on(server, monkeypatch):
    url, app = server
    batcher = app.state.batcher
    real, calls = batcher.forward, []

    def flaky(images):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(images)

    monkeypatch.setattr(batcher, "forward", flaky)
    r = _post(url, _encode(_photo()))
    assert r.status_code == 500 and "RuntimeError: boom" in r.json()["detail"]
    assert _post(url, _encode(_photo())).status_code == 200
    assert httpx.get(f"{url}/healthz").json()["failures"] >= 1


def test_concurrent_requests_share_forward_passes(server, reference):
    url, _ = server
    rgb = _photo(seed=3)
    data, expected = _encode(rgb), reference.predict(rgb)
    before = httpx.get(f"{url}/healthz").json()
    start, results = threading.Barrier(8), [None] * 8

    def client(i):
        start.wait()
        results[i] = _post(url, data)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200] * 8
    for r in results:  # a batched pass gives what a lone one does
        assert (np.asarray(Image.open(io.BytesIO(r.content))) == expected).mean() > 0.999
    after = httpx.get(f"{url}/healthz").json()
    assert after["images"] - before["images"] == 8
    assert after["batches"] - before["batches"] < 8  # some pass held more than one image
    assert after["largest_batch"] > 1


def test_classes_and_health_describe_the_checkpoint(server, run):
    url, _ = server
    assert httpx.get(f"{url}/classes").json() == CLASSES
    health = httpx.get(f"{url}/healthz").json()
    assert health["ok"] is True and health["model"] == str(run)
    assert (health["runtime"], health["device"], health["classes"]) == ("torch", "cpu", 4)
    assert "/predict" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_batcher_runs_sizes_apart_and_at_most_max_batch():
    import torch

    seen = []

    def forward(images):
        seen.append([tuple(im.shape) for im in images])
        return [im.shape for im in images]

    async def go():
        b = Batcher(forward, max_batch=3, max_delay=0.05)
        await b.start()
        sizes = [(3, 4, 5)] * 5 + [(3, 6, 7)] * 2
        answers = await asyncio.gather(*(b.submit(torch.zeros(s)) for s in sizes))
        await b.stop()
        return sizes, answers

    sizes, answers = asyncio.run(go())
    assert [tuple(a.result) for a in answers] == sizes  # each request gets its own answer
    assert all(len(set(batch)) == 1 and len(batch) <= 3 for batch in seen)
    assert sorted(len(batch) for batch in seen) == [2, 2, 3]


def test_the_page_shows_the_overlay_and_a_legend_in_chromium(server, reference, tmp_path):
    url, _ = server
    html = httpx.get(f"{url}/").text
    assert "<script src" not in html and "http" not in html.split("<body>")[1]  # self-contained
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    rgb = _photo(seed=5)
    (tmp_path / "photo.png").write_bytes(_encode(rgb))
    counts = np.bincount(reference.predict(rgb).ravel(), minlength=len(CLASSES))
    present = {c["name"] for c, n in zip(CLASSES, counts, strict=True) if n}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/")
            page.set_input_files("#file", str(tmp_path / "photo.png"))
            page.wait_for_selector("#legend li", timeout=30_000)
            names = page.locator("#legend .name").all_inner_texts()
            shares = page.locator("#legend .share").all_inner_texts()
            page.wait_for_function(
                "() => { const o = document.getElementById('overlay');"
                " return o.complete && o.naturalWidth > 0; }",
                timeout=30_000,
            )
            width = page.evaluate("document.getElementById('overlay').naturalWidth")
        finally:
            browser.close()
    assert set(names) == present and len(names) == len(present)
    assert all(s.endswith("%") for s in shares)
    assert width > rgb.shape[1]  # the picture plus the legend panel beside it
    assert not errors


def test_serve_parses_without_torch_and_says_how_to_install_its_extra(monkeypatch, capsys):
    code = (
        "import sys; from segment_deeplab.cli import build_parser; "
        "a = build_parser().parse_args(['serve', '--checkpoint', 'x', '--max-bytes', '5MB']); "
        "assert a.max_bytes == 5 * 2**20; "
        "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    assert main(["serve", "--checkpoint", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'segment-deeplab[serve]'" in err


def test_the_cli_serves_on_a_free_port_and_stops_on_ctrl_c(run, capsys):
    taken = bind("127.0.0.1", 0)
    taken.listen()
    port = taken.getsockname()[1]
    assert main(["serve", "--checkpoint", str(run), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    taken.close()

    cmd = [sys.executable, "-m", "segment_deeplab", "serve", "--checkpoint", str(run)]
    cmd += ["--port", "0", "--device", "cpu", "--runtime", "torch"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the one line, once it listens
        assert line.startswith("serving on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        assert httpx.get(f"{url}/healthz", timeout=30).json()["runtime"] == "torch"
        assert _post(url, _encode(_photo())).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "GET /healthz" not in out + err  # no access log unless --access-log


def test_size_flags():
    assert byte_size("20MB") == 20 * 2**20 == byte_size("20M") == byte_size("20MiB")
    assert byte_size("512k") == 512 * 1024 and byte_size("1000") == 1000
    assert pixel_count("40M") == 40_000_000 == pixel_count("40MP")
    assert pixel_count("1.5G") == 1_500_000_000
    with pytest.raises(Exception, match="not a size"):
        byte_size("lots")
