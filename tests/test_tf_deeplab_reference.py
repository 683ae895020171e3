"""tests/tf_deeplab_reference.py, the TF DeepLab reference for the port's comparisons, runs and
writes a checkpoint with TF DeepLab's variable names, and the outputs of the network."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("tf_deeplab_reference.py")

# A few of the names and shapes in TF DeepLab's mobilenet_v2 checkpoints (no decoder, no atrous
# ASPP branches), here with 3 classes.
EXPECTED = {
    "MobilenetV2/Conv/weights": [3, 3, 3, 32],
    "MobilenetV2/Conv/BatchNorm/gamma": [32],
    "MobilenetV2/Conv/BatchNorm/moving_mean": [32],
    "MobilenetV2/expanded_conv/depthwise/depthwise_weights": [3, 3, 32, 1],
    "MobilenetV2/expanded_conv/depthwise/BatchNorm/beta": [32],
    "MobilenetV2/expanded_conv/project/weights": [1, 1, 32, 16],
    "MobilenetV2/expanded_conv_1/expand/weights": [1, 1, 16, 96],
    "MobilenetV2/expanded_conv_2/depthwise/depthwise_weights": [3, 3, 144, 1],
    "MobilenetV2/expanded_conv_16/project/weights": [1, 1, 960, 320],
    "MobilenetV2/expanded_conv_16/project/BatchNorm/moving_variance": [320],
    "image_pooling/weights": [1, 1, 320, 256],
    "image_pooling/BatchNorm/gamma": [256],
    "aspp0/weights": [1, 1, 320, 256],
    "concat_projection/weights": [1, 1, 512, 256],
    "logits/semantic/weights": [1, 1, 256, 3],
    "logits/semantic/biases": [3],
}


@pytest.mark.slow  # TensorFlow builds and runs the network: ~25 s
@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason="TensorFlow is not installed: the reference network is built with it",
)
def test_mobilenet_v2_reference(tmp_path):
    sizes = [(33, 49), (17, 33)]
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "--variant", "mobilenet_v2",
           "--num-classes", "3", "--output-stride", "16",
           "--sizes", *(f"{h}x{w}" for h, w in sizes)]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]

    for name in ["model.ckpt.index", "model.ckpt.data-00000-of-00001", "variables.json"]:
        assert (tmp_path / name).is_file(), name
    info = json.loads((tmp_path / "variables.json").read_text())
    assert info["config"]["decoder_output_stride"] is None
    assert info["config"]["atrous_rates"] == []
    shapes = {v["name"]: v["shape"] for v in info["variables"]}
    assert {n: shapes.get(n) for n in EXPECTED} == EXPECTED
    assert len(shapes) == 272  # 18 layers up to layer_18, image pooling, aspp0, projection, logits
    assert "MobilenetV2/expanded_conv/expand/weights" not in shapes  # expansion 1: none
    assert not [n for n in shapes if n.startswith(("MobilenetV2/Conv_1", "aspp1", "decoder/"))]

    ref = np.load(tmp_path / "reference.npz")
    for h, w in sizes:
        image, logits = ref[f"image_{h}x{w}"], ref[f"logits_{h}x{w}"]
        assert image.shape == (1, h, w, 3) and image.dtype == np.uint8
        assert logits.shape == (1, h, w, 3) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        assert (logits.std(axis=(1, 2)) > 1e-3).all()  # varies over the image, every class
        small = ref[f"logits_os_{h}x{w}"]  # at output stride 16: (size - 1) // 16 + 1
        assert small.shape == (1, (h - 1) // 16 + 1, (w - 1) // 16 + 1, 3)
        assert ref[f"features_{h}x{w}"].shape[-1] == 320
        # predict_labels' resize (align_corners=True) keeps the corners
        np.testing.assert_allclose(logits[0, [0, -1]][:, [0, -1]],
                                   small[0, [0, -1]][:, [0, -1]], rtol=1e-5, atol=1e-5)  # fmt: skip
