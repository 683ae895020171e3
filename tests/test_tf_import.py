"""`deeplab import-tf`: TF DeepLab checkpoints give TensorFlow's own logits.

TensorFlow builds TF DeepLab's network (tests/tf_deeplab_reference.py, after
research/deeplab's model code) with random weights, saves it with its own Saver and
runs its forward pass on two images of different sizes, in a process of its own. The
checkpoint is then imported without TensorFlow and run in PyTorch.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL, make_dataset

from segment_deeplab.checkpoint import load_file, load_model
from segment_deeplab.cli import main

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.slow,  # TensorFlow builds and runs the networks: about a minute each
    pytest.mark.skipif(
        importlib.util.find_spec("tensorflow") is None,
        reason="TensorFlow builds the reference network: pip install 'segment-deeplab[tf-tests]'",
    ),
]
SCRIPT = Path(__file__).with_name("tf_deeplab_reference.py")
# One even size each: TF pads mobilenet's strided convs SAME (unevenly on even sizes)
# and xception's explicitly (evenly); on odd sizes the two agree.
CASES = {
    "mobilenet_v2": ["--sizes", "64x96", "33x49"],
    "xception_65": ["--sizes", "64x96", "129x161", "--decoder-output-stride", "4"],
    # Strides on each block's last unit, SAME max pooling, the decoder tap before the sum.
    "resnet_v1_101_beta": ["--sizes", "64x96", "33x49"],
    # The other stem, and ImageNet-mean input scaling.
    "resnet_v1_50": ["--sizes", "64x96", "33x49"],
    "xception_71": ["--sizes", "32x48", "33x49"],  # two more entry-flow blocks
    # TF's mobilenet_v3 head (gated image pooling over 5x6 windows moved by 4x5, the
    # sum-merge decoder at stride 8 giving the logits), squeeze-excite, hard swish.
    "mobilenet_v3_large_seg": [
        "--output-stride",
        "32",
        "--sizes",
        "257x321",
        "161x193",
        "--image-pooling-crop-size",
        "129,161",
        "--image-pooling-stride",
        "4,5",
    ],  # fmt: skip
    # The model zoo's pooling flags (769,769 and 4,5), which import-tf defaults to.
    "mobilenet_v3_small_seg": [
        "--output-stride",
        "32",
        "--sizes",
        "897x961",
        "769x801",
        "--image-pooling-crop-size",
        "769,769",
        "--image-pooling-stride",
        "4,5",
    ],  # fmt: skip
}
# What import-tf is told beyond the checkpoint: what no TF variable records.
IMPORT_ARGS = {"mobilenet_v3_large_seg": ["--image-pooling-crop-size", "129,161"]}


@functools.cache
def reference(variant: str, root: str) -> Path:
    """TF's checkpoint and logits of `variant` (built once per session)."""
    out = Path(root) / variant
    cmd = [sys.executable, str(SCRIPT), str(out), "--variant", variant, "--num-classes", "5"]
    subprocess.run([*cmd, "--output-stride", "16", *CASES[variant]], check=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def tf_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tf"))


def _logits(model, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(x).permute(0, 2, 3, 1).numpy()


# mobilenet_v2 and mobilenet_v3_large_seg run in `make test`; the others (xception_65's
# 45 s among them) in CI too (`pytest -m ci_only`).
MORE = {"xception_65", "resnet_v1_101_beta", "resnet_v1_50", "xception_71",
        "mobilenet_v3_small_seg"}  # fmt: skip


@pytest.mark.parametrize(
    "variant", [pytest.param(v, marks=[pytest.mark.ci_only] * (v in MORE)) for v in CASES]
)
def test_imported_checkpoint_gives_tensorflows_logits(variant, tf_root, tmp_path, capsys):
    ref = reference(variant, tf_root)
    out = tmp_path / "model.pt"
    argv = ["import-tf", str(ref / "model.ckpt"), "--model-variant", variant, "--output", str(out)]
    assert main([*argv, *IMPORT_ARGS.get(variant, [])]) == 0
    said = capsys.readouterr().out
    names = [v["name"] for v in json.loads((ref / "variables.json").read_text())["variables"]]
    assert f"mapped {len(names)} TF tensors" in said
    model, cfg, _ = load_model(out)
    assert cfg.model.tf_compat and cfg.model.num_classes == 5
    if variant.startswith("mobilenet_v3"):  # the zoo's output stride, read-off decoder
        assert cfg.model.head == "lraspp" and cfg.model.output_stride == 32
        assert cfg.model.decoder_output_stride == 8 and cfg.model.aspp_channels == 128
    data = np.load(ref / "reference.npz")
    sizes = [k.removeprefix("image_") for k in data.files if k.startswith("image_")]
    assert len(sizes) == 2
    for size in sizes:
        tf_logits, ours = data[f"logits_{size}"], _logits(model, data[f"image_{size}"])
        rel = np.abs(ours - tf_logits).max() / np.abs(tf_logits).max()
        agree = (ours.argmax(-1) == tf_logits.argmax(-1)).mean()
        assert rel < 1e-3 and agree >= 0.999, (size, rel, agree)


def test_training_starts_from_a_tf_checkpoint_and_keeps_tf_arithmetic(tf_root, tmp_path, capsys):
    ref = reference("mobilenet_v2", tf_root)
    data = make_dataset(tmp_path / "ds")  # 4 classes: the TF logits (5) make a new head
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--output", str(run), "--no-progress", "--steps", "1"]
    argv += ["--init-checkpoint", str(ref / "model.ckpt.index"), *SMALL]
    argv += ["model.model_variant=mobilenet_v2", "model.atrous_rates=[]", "model.aspp_channels=256"]
    assert main([*argv, "model.decoder_output_stride=null", "data.batch_size=2"]) == 0
    said = capsys.readouterr().out
    assert "model.tf_compat=true" in said and "the head is new" in said
    ck = load_file(run / "last.pt")
    assert ck["config"]["model"]["tf_compat"] is True


def test_wrong_variant_and_missing_files_are_named(tf_root, tmp_path, capsys):
    ref = reference("mobilenet_v2", tf_root)
    out = tmp_path / "m.pt"
    argv = ["import-tf", str(ref / "model.ckpt"), "--model-variant", "xception_65"]
    assert main([*argv, "--output", str(out)]) == 2
    assert "no xception_65/ variables" in capsys.readouterr().err
    missing = ["import-tf", str(tmp_path / "none.ckpt"), "--model-variant", "mobilenet_v2"]
    assert main([*missing, "--output", str(out)]) == 2
    assert "none.ckpt" in capsys.readouterr().err
    assert not out.exists()


def test_training_from_a_tf_mobilenet_v3_keeps_its_head(tf_root, tmp_path, capsys):
    ref = reference("mobilenet_v3_large_seg", tf_root)
    data = make_dataset(tmp_path / "ds")  # 4 classes: new logits, the rest from TF
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--output", str(run), "--no-progress", "--steps", "1"]
    argv += ["--init-checkpoint", str(ref / "model.ckpt.index"), *SMALL]
    argv += ["model.model_variant=mobilenet_v3_large_seg", "model.output_stride=32"]
    assert main([*argv, "data.batch_size=2"]) == 0
    said = capsys.readouterr().out
    assert "model.head=lraspp" in said and "model.decoder_output_stride=8" in said
    assert "the head is new" in said
    cfg = load_file(run / "last.pt")["config"]["model"]
    assert cfg["head"] == "lraspp" and cfg["aspp_channels"] == 128 and cfg["tf_compat"]
    assert cfg["image_pooling_crop_size"] == [769, 769]


@pytest.mark.ci_only  # the ONNX export takes a minute and more
def test_an_imported_mobilenet_v3_exports_to_onnx_at_any_batch_and_size(tf_root, tmp_path, capsys):
    """Pooling windows, TF's SAME padding and the gate's resize follow the input in the
    exported graph: parity holds at a batch of 2 and sizes other than the traced one."""
    ref = reference("mobilenet_v3_large_seg", tf_root)
    pt = tmp_path / "m.pt"
    argv = ["import-tf", str(ref / "model.ckpt"), "--model-variant", "mobilenet_v3_large_seg"]
    assert main([*argv, "--output", str(pt), *IMPORT_ARGS["mobilenet_v3_large_seg"]]) == 0
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(pt), "--output", str(out)]) == 0
    assert "parity ok" in capsys.readouterr().out and out.is_file()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model, _, _ = load_model(pt)
    data = np.load(ref / "reference.npz")
    image = data["image_257x321"].astype(np.float32) / 255.0
    x = np.concatenate([image, image[:, ::-1]]).transpose(0, 3, 1, 2).copy()  # batch 2
    got = sess.run(None, {"image": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    tf_logits = data["logits_257x321"].transpose(0, 3, 1, 2)
    assert np.abs(got[:1] - tf_logits).max() < 1e-3 * np.abs(tf_logits).max()
