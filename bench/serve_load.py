"""`deeplab serve` under load: N concurrent clients posting a 480x360 JPEG for T seconds.

    python bench/serve_load.py --checkpoint RUN|model.pt|model.onnx [--clients 8]
        [--seconds 10] [--output mask|json|overlay] [--image FILE] [-- SERVE FLAGS...]

Starts `deeplab serve --port 0` on loopback as a subprocess (flags after `--` go to it,
e.g. `-- --runtime torch --max-batch 4`), waits for its "serving on" line, warms it up,
then runs `--clients` asyncio clients (httpx, one keep-alive connection each) that post
the image back to back for `--seconds`. Reports requests/s, p50/p99 latency, errors
(anything but 200; must be 0, else the exit status is 1), the mean images per forward
pass (from /healthz), and the server's RSS before and after, as a markdown table naming
the machine. The image is the first CamVid frame (../shared/datasets/camvid/images, or
$CAMVID/images) when there is one, else a synthetic picture; either way 480x360. The
clients share the machine with the server: on a small CPU they take some of its time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CAMVID_SOURCE, machine  # noqa: E402

SIZE = (480, 360)  # (W, H), CamVid's


def test_image(path: str | None) -> tuple[bytes, str]:
    """(JPEG bytes at SIZE, where they came from)."""
    if path is None:
        found = sorted(Path(CAMVID_SOURCE, "images").glob("*.jpg"))[:1]
        path = str(found[0]) if found else None
    if path is not None:
        img, where = Image.open(path).convert("RGB"), path
    else:
        g = np.random.default_rng(0)
        small = g.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img, where = Image.fromarray(small).resize(SIZE, Image.BILINEAR), "synthetic"
    if img.size != SIZE:
        img = img.resize(SIZE, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), where


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (psutil if installed, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(
    checkpoint: str, extra: list[str], timeout: float = 300
) -> tuple[subprocess.Popen, str]:
    """The server subprocess and its URL, once it listens."""
    cmd = [sys.executable, "-m", "segment_deeplab", "serve", "--checkpoint", checkpoint]
    proc = subprocess.Popen([*cmd, "--port", "0", *extra], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if line.startswith("serving on "):
            return proc, line.split()[2]
    proc.kill()
    raise SystemExit(f"the server did not start (exit status {proc.poll()}): {line.strip()}")


async def load(url: str, data: bytes, output: str, clients: int, seconds: float) -> dict:
    """Latencies (s) of successful requests and the error count, over `seconds`."""
    latencies: list[float] = []
    errors: list[str] = []
    headers = {"content-type": "image/jpeg"}
    end = time.perf_counter() + seconds

    async def client() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    r = await http.post(
                        f"{url}/predict", params={"output": output}, content=data, headers=headers
                    )
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"latencies": latencies, "errors": errors, "wall": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint or export")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--seconds", type=float, default=10, help="how long they post (default: 10)")
    p.add_argument("--output", choices=["mask", "json", "overlay"], default="mask")
    p.add_argument("--image", help="a picture to post instead of CamVid's first frame")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    data, where = test_image(args.image)
    proc, url = start_server(args.checkpoint, extra)
    try:
        headers = {"content-type": "image/jpeg"}
        for _ in range(3):  # warm-up: first-call costs are not the load's
            r = httpx.post(f"{url}/predict", content=data, headers=headers, timeout=120)
            r.raise_for_status()
        health0 = httpx.get(f"{url}/healthz").json()
        rss0 = rss_mb(proc.pid)
        got = asyncio.run(load(url, data, args.output, args.clients, args.seconds))
        health1 = httpx.get(f"{url}/healthz").json()
        rss1 = rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = np.asarray(got["latencies"]) * 1000
    n = len(lat) + len(got["errors"])
    passes = health1["batches"] - health0["batches"]
    mean_batch = (health1["images"] - health0["images"]) / passes if passes else float("nan")
    p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (float("nan"),) * 2
    row = {
        "requests": n, "rps": n / got["wall"], "p50_ms": p50, "p99_ms": p99,
        "errors": len(got["errors"]), "mean_batch": mean_batch, "largest_batch":
        health1["largest_batch"], "rss_before_mb": rss0, "rss_after_mb": rss1,
    }  # fmt: skip
    serve_flags = " ".join(extra) or "(defaults)"
    lines = [
        machine(),
        "",
        f"`deeplab serve --checkpoint {args.checkpoint} {serve_flags}` (runtime "
        f"{health1['runtime']}, {health1['device']}); {args.clients} clients for "
        f"{args.seconds:g} s posting {SIZE[0]}x{SIZE[1]} JPEG ({where}), ?output={args.output}",
        "",
        "| clients | requests | req/s | p50 ms | p99 ms | errors | images/pass | "
        "largest pass | server RSS before -> after MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.clients} | {n} | {row['rps']:.1f} | {p50:.0f} | {p99:.0f} | {row['errors']} | "
        f"{mean_batch:.2f} | {row['largest_batch']} | {rss0:.0f} -> {rss1:.0f} |",
    ]
    print("\n".join(lines))
    for e in got["errors"][:5]:
        print(f"error: {e}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), **row}, indent=2) + "\n")
    return 1 if got["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
