"""The GPU benchmark script runs end to end; here on the CPU at toy size (TINY=1), so a
GPU machine's short window is never spent on a script that breaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ci_only  # a minute of process start-ups and engine probes: CI runs it
def test_gpu_script_runs_at_toy_size_on_the_cpu(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    env = {
        **os.environ,
        "TINY": "1",
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "SEGMENT_DEEPLAB_CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    e2e = (tmp_path / "out" / "end_to_end.md").read_text()
    assert "segment-deeplab `fit()`" in e2e and "x peer" in e2e
    assert "resnet_18" in (tmp_path / "out" / "throughput.md").read_text()
    speed = (tmp_path / "out" / "predict_speed.md").read_text()
    assert "peer: smp DeepLabV3Plus" in speed and "auto" in speed
