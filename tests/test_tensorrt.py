"""TensorRT engines: refused with the fix where no GPU or no TensorRT is there, built,
parity-checked and predicted with where both are."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import make_run

from segment_deeplab.checkpoint import CheckpointError, load_any, sniff_format
from segment_deeplab.cli import main
from segment_deeplab.export import tensorrt as trt_export
from segment_deeplab.export.runtime import ExportError
from segment_deeplab.export.write import export

CLASSES = [
    {"id": 0, "name": "background", "color": [0, 0, 0]},
    {"id": 1, "name": "cat", "color": [255, 0, 0]},
    {"id": 2, "name": "dog", "color": [0, 255, 0]},
]
HAS_GPU = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), CLASSES)


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without a GPU")
def test_export_without_a_gpu_says_where_to_build_and_writes_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "model.engine"
    code = main(["export", "--checkpoint", str(run_dir), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "NVIDIA GPU" in err and "--format onnx" in err and "trtexec" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    # The format is read off the suffix; .plan too.
    with pytest.raises(ExportError, match="NVIDIA GPU"):
        export(run_dir, tmp_path / "model.plan")


def test_engine_settings_that_cannot_be_built_are_named(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_export, "require_gpu", lambda: None)
    monkeypatch.setattr(trt_export, "tensorrt", lambda: None)
    with pytest.raises(ExportError, match="returns logits; --with-preprocessing"):
        export(run_dir, tmp_path / "m.engine", argmax=True)
    with pytest.raises(ExportError, match="name it NAME.engine"):
        export(run_dir, tmp_path / "m.json", fmt="tensorrt")
    with pytest.raises(ExportError, match="--max-side 100: give 512 or more"):
        export(run_dir, tmp_path / "m.engine", max_side=100)
    with pytest.raises(ExportError, match="--max-batch 0"):
        export(run_dir, tmp_path / "m.engine", max_batch=0)
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_missing_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    with pytest.raises(ExportError, match=r"segment-deeplab\[tensorrt\]"):
        trt_export.tensorrt()


def test_an_engine_is_known_by_its_json_and_refused_clearly_elsewhere(tmp_path, capsys):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00\x01 not a real engine")
    with pytest.raises(CheckpointError, match="model.json"):
        sniff_format(engine)
    meta = {"classes": CLASSES, "input": {}, "output": {}, "mean": [0, 0, 0], "tensorrt": {}}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    assert sniff_format(engine) == "tensorrt"
    if not HAS_GPU:
        with pytest.raises(ExportError, match="NVIDIA GPU"):
            load_any(engine)
        code = main(["predict", "--checkpoint", str(engine), "--output", str(tmp_path / "o"),
                     str(tmp_path / "model.json")])  # fmt: skip
        err = capsys.readouterr().err
        assert code != 0 and "NVIDIA GPU" in err and "Traceback" not in err


@pytest.mark.skipif(not (HAS_GPU and HAS_TRT), reason="needs an NVIDIA GPU and tensorrt")
def test_engine_matches_pytorch_and_predicts(run_dir, tmp_path):
    out = tmp_path / "model.engine"
    result = export(run_dir, out, max_batch=2, max_side=512)
    assert result.path == out and result.parity.passed, result.parity.summary()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["tensorrt"]["precision"] == "fp16"
    assert meta["tensorrt"]["max_shape"] == [2, 3, 512, 512]
    loaded = load_any(out, "cuda")
    x = torch.rand(3, 3, 97, 131, device="cuda")  # over --max-batch: run in chunks
    assert loaded.model(x).shape == (3, len(CLASSES), 97, 131)
    with pytest.raises(ExportError, match="--max-side"):
        loaded.model(torch.rand(1, 3, 64, 600, device="cuda"))
