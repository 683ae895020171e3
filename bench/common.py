"""Helpers shared by the benchmarks: the machine's description, CamVid, step timing."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# The shared datasets sit beside the checkout; CAMVID=... points elsewhere.
CAMVID_SOURCE = os.environ.get("CAMVID", str(ROOT.parent / "shared" / "datasets" / "camvid"))


def machine() -> str:
    """'Intel Xeon ..., 2 cores, torch 2.x (2 threads), 2026-01-01' for the report."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{name}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {datetime.date.today().isoformat()}"
    )


# CamVid's file names start with their video sequence (0001TP_006690): grouping by it
# holds whole sequences out, so val frames are no neighbours of training frames.
SEQUENCE = "^([^_]+)_"


def prepared_camvid(cache: Path, source: str = CAMVID_SOURCE, group_by: str | None = None) -> Path:
    """dataset.yaml of CamVid prepared into `cache`, once: a seeded 80/20 split of the
    frames, or with `group_by` (e.g. `SEQUENCE`) one of whole groups."""
    spec = cache / "dataset.yaml"
    if spec.is_file():
        return spec
    if not Path(source, "images").is_dir():
        raise SystemExit(
            f"CamVid not found at {source}: set CAMVID=/path/to/camvid (images/ + masks/, "
            "11-class 480x360 version)"
        )
    deeplab = Path(sys.executable).parent / "deeplab"
    cmd = [str(deeplab), "prepare", source, "--spec", str(ROOT / "datasets/camvid.yaml")]
    if group_by:
        cmd += ["--group-by", group_by]
    subprocess.run([*cmd, "--output", str(cache)], check=True)
    return spec


def time_steps(fn: Callable[[], object], steps: int) -> float:
    """Seconds per call of `fn` over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward GFLOPs of one image (2 x multiply-adds), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x[:1])
    return counter.get_total_flops() / 1e9


def random_checkpoint(cfg, path: Path) -> Path:
    """A checkpoint at `path` of `cfg`'s model with seeded random weights (speed does
    not depend on them) and placeholder classes."""
    from segment_deeplab.checkpoint import FORMAT
    from segment_deeplab.checkpoint import save as save_checkpoint
    from segment_deeplab.classes import placeholder_classes
    from segment_deeplab.models import build_model

    torch.manual_seed(0)
    classes = placeholder_classes(list(range(cfg.model.num_classes)))
    save_checkpoint(
        {
            "format": FORMAT,
            "model": build_model(cfg.model).state_dict(),
            "config": cfg.to_dict(),
            "classes": [c.to_dict() for c in classes],
            "ignore_index": 255,
            "step": 0,
        },
        path,
    )
    return path
